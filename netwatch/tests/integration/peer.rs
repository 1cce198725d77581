//! A child process that opens and closes sockets on command, so that tests
//! know exactly which pid owns which socket.
//!
//! Commands, one per line on stdin; each reply is one line on stdout:
//! `listen ADDR` -> `ok ID PORT`, `connect ADDR` -> `ok ID LOCAL_PORT`,
//! `accept ID` -> `ok ID PEER_PORT`, `close ID` -> `ok`,
//! `bulk N` (N connections to a new listener, both ends kept) -> `ok PORT`,
//! `burst N` (N connections opened and closed at once) -> `ok PORT`: both
//! by the load generator the benchmarks use, `xtask::loopback`,
//! `exchange N BYTES` (N connections: the client sends BYTES, the server
//! answers BYTES / 2, both close) -> `ok PORT`,
//! `interleave N BYTES` (the same over N connections open at once, written
//! in turn and from every CPU; see `interleave`) -> `ok PORT`, and
//! `interleave-open N BYTES` (the same, the connections kept open) -> `ok PORT`,
//! `unshare-net` (later sockets live in a new network namespace, its
//! loopback up) -> `ok NETNS_INODE`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use xtask::cpus;
use xtask::loopback::{self, Connections};

const PEER_ENV: &str = "NETWATCH_TEST_PEER";
/// Marks replies: libtest prints `test peer_process ... ` on the same line.
const REPLY: &str = "peer-reply: ";

enum Socket {
    Listener(TcpListener),
    /// Held only to keep the connection open until `close`.
    Stream {
        _open: TcpStream,
    },
}

/// Runs the command loop; returns when stdin closes.
pub fn serve_commands() {
    if std::env::var_os(PEER_ENV).is_none() {
        return;
    }
    let mut sockets: Vec<Option<Socket>> = Vec::new();
    let mut held = Vec::new();
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin is readable");
        let reply =
            run_command(&line, &mut sockets, &mut held).unwrap_or_else(|err| format!("err {err}"));
        let mut out = stdout.lock();
        writeln!(out, "{REPLY}{reply}").expect("stdout is writable");
        out.flush().expect("stdout is writable");
    }
}

fn run_command(
    line: &str,
    sockets: &mut Vec<Option<Socket>>,
    held: &mut Vec<Connections>,
) -> std::io::Result<String> {
    let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
    let addr = || arg.parse::<SocketAddr>().map_err(std::io::Error::other);
    let id = || arg.parse::<usize>().map_err(std::io::Error::other);
    let keep = |sockets: &mut Vec<Option<Socket>>, socket: Socket| {
        sockets.push(Some(socket));
        sockets.len() - 1
    };
    Ok(match verb {
        "listen" => {
            let listener = TcpListener::bind(addr()?)?;
            let port = listener.local_addr()?.port();
            format!("ok {} {port}", keep(sockets, Socket::Listener(listener)))
        }
        "connect" => {
            let stream = TcpStream::connect(addr()?)?;
            let port = stream.local_addr()?.port();
            format!(
                "ok {} {port}",
                keep(sockets, Socket::Stream { _open: stream })
            )
        }
        "accept" => {
            let Some(Some(Socket::Listener(listener))) = sockets.get(id()?) else {
                return Err(std::io::Error::other("no such listener"));
            };
            let (stream, from) = listener.accept()?;
            format!(
                "ok {} {}",
                keep(sockets, Socket::Stream { _open: stream }),
                from.port()
            )
        }
        "close" => {
            let index = id()?;
            sockets
                .get_mut(index)
                .and_then(Option::take)
                .ok_or_else(|| std::io::Error::other("no such socket"))?;
            "ok".to_owned()
        }
        "bulk" => {
            let count: usize = arg.parse().map_err(std::io::Error::other)?;
            let connections =
                Connections::open(count, Ipv4Addr::LOCALHOST).map_err(std::io::Error::other)?;
            let port = connections.listener.local_addr()?.port();
            held.push(connections);
            format!("ok {port}")
        }
        "burst" => {
            let count: usize = arg.parse().map_err(std::io::Error::other)?;
            let listener = loopback::burst(count)?;
            let port = listener.local_addr()?.port();
            keep(sockets, Socket::Listener(listener));
            format!("ok {port}")
        }
        "exchange" => {
            let (count, bytes) = arg.split_once(' ').unwrap_or((arg, "0"));
            let count: usize = count.parse().map_err(std::io::Error::other)?;
            let bytes: usize = bytes.parse().map_err(std::io::Error::other)?;
            let listener = TcpListener::bind("127.0.0.1:0")?;
            for _ in 0..count {
                exchange(&listener, bytes)?;
            }
            let port = listener.local_addr()?.port();
            keep(sockets, Socket::Listener(listener));
            format!("ok {port}")
        }
        "interleave" | "interleave-open" => {
            let (count, bytes) = arg.split_once(' ').unwrap_or((arg, "0"));
            let count: usize = count.parse().map_err(std::io::Error::other)?;
            let bytes: usize = bytes.parse().map_err(std::io::Error::other)?;
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let port = listener.local_addr()?.port();
            let pairs = interleave(&listener, count, bytes)?;
            for (client, mut server) in pairs {
                if verb == "interleave" {
                    drop(client);
                    server.read_to_end(&mut Vec::new())?;
                } else {
                    keep(sockets, Socket::Stream { _open: client });
                    keep(sockets, Socket::Stream { _open: server });
                }
            }
            keep(sockets, Socket::Listener(listener));
            format!("ok {port}")
        }
        "unshare-net" => format!("ok {}", enter_new_netns()?),
        _ => return Err(std::io::Error::other(format!("unknown command {line}"))),
    })
}

/// One connection to `listener`: the client sends `bytes`, the server reads
/// them and answers half as many, the client closes first.
fn exchange(listener: &TcpListener, bytes: usize) -> std::io::Result<()> {
    let mut client = TcpStream::connect(listener.local_addr()?)?;
    let (mut server, _) = listener.accept()?;
    client.write_all(&vec![b'x'; bytes])?;
    server.read_exact(&mut vec![0; bytes])?;
    server.write_all(&vec![b'y'; bytes / 2])?;
    client.read_exact(&mut vec![0; bytes / 2])?;
    drop(client);
    // Reads the client's FIN, so that the server side closes second.
    server.read_to_end(&mut Vec::new())?;
    Ok(())
}

/// `count` connections to `listener`, open at once: each client sends
/// `bytes` and each server answers `bytes / 2`, in 64-byte writes, one per
/// connection in turn, this thread moving to the next CPU it may use after
/// every turn. So each socket's bytes are counted on every CPU, and the
/// sockets outnumber the kernel's per-CPU cache slots: slots are reused
/// all the time. Returns the (client, server) pairs, still open.
fn interleave(
    listener: &TcpListener,
    count: usize,
    bytes: usize,
) -> std::io::Result<Vec<(TcpStream, TcpStream)>> {
    const CHUNK: usize = 64;
    let mut pairs = Vec::with_capacity(count);
    for _ in 0..count {
        let client = TcpStream::connect(listener.local_addr()?)?;
        let (server, _) = listener.accept()?;
        pairs.push((client, server));
    }
    let allowed = cpus::allowed()?;
    let mut buffer = [b'x'; CHUNK];
    for (from_client, total) in [(true, bytes), (false, bytes / 2)] {
        for (turn, start) in (0..total).step_by(CHUNK).enumerate() {
            let chunk = CHUNK.min(total - start);
            cpus::run_on(&[allowed[turn % allowed.len()]])?;
            for (client, server) in &mut pairs {
                let (writer, reader) = if from_client {
                    (client, server)
                } else {
                    (server, client)
                };
                writer.write_all(&buffer[..chunk])?;
                reader.read_exact(&mut buffer[..chunk])?;
            }
        }
    }
    cpus::run_on(&allowed)?;
    Ok(pairs)
}

/// Moves this thread (the one serving commands) into a new network
/// namespace, brings its loopback up and returns the namespace's inode.
fn enter_new_netns() -> std::io::Result<u64> {
    // SAFETY: plain syscalls on this thread's namespaces and a local ifreq.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut request: libc::ifreq = std::mem::zeroed();
        for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        let up = libc::ioctl(fd, libc::SIOCSIFFLAGS, &request);
        libc::close(fd);
        if up != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let link = std::fs::read_link("/proc/thread-self/ns/net")?;
    link.to_string_lossy()
        .trim_start_matches("net:[")
        .trim_end_matches(']')
        .parse()
        .map_err(std::io::Error::other)
}

/// A running peer process.
pub struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    /// Starts a peer: this test binary, running only `peer_process`.
    pub fn spawn() -> Peer {
        let mut child = Command::new(std::env::current_exe().expect("test binary path"))
            .args([
                "--ignored",
                "--exact",
                "peer_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(PEER_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("peer process starts");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut peer = Peer {
            child,
            stdin,
            stdout,
        };
        peer.skip_test_harness_banner();
        peer
    }

    /// libtest prints `running 1 test` before the peer's replies.
    fn skip_test_harness_banner(&mut self) {
        let mut line = String::new();
        while !line.starts_with("running") {
            line.clear();
            assert!(
                self.stdout.read_line(&mut line).expect("peer stdout") > 0,
                "peer exited early"
            );
        }
    }

    /// The peer's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one command and returns the numbers of its `ok` reply.
    pub fn send(&mut self, command: &str) -> Vec<u32> {
        writeln!(self.stdin, "{command}").expect("peer stdin");
        self.stdin.flush().expect("peer stdin");
        let reply = self.read_reply();
        let fields: Vec<&str> = reply.split_whitespace().collect();
        assert_eq!(
            fields.first(),
            Some(&"ok"),
            "peer command '{command}' failed: {reply}"
        );
        fields[1..]
            .iter()
            .map(|n| n.parse().expect("numeric reply"))
            .collect()
    }

    /// The next reply, past what libtest prints around it.
    fn read_reply(&mut self) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                self.stdout.read_line(&mut line).expect("peer stdout") > 0,
                "peer exited"
            );
            if let Some((_, reply)) = line.split_once(REPLY) {
                return reply.trim_end().to_owned();
            }
        }
    }

    /// `listen ADDR`: (socket id, port).
    pub fn listen(&mut self, addr: &str) -> (u32, u16) {
        let reply = self.send(&format!("listen {addr}"));
        (reply[0], reply[1] as u16)
    }

    /// `connect ADDR`: (socket id, local port).
    pub fn connect(&mut self, addr: &str) -> (u32, u16) {
        let reply = self.send(&format!("connect {addr}"));
        (reply[0], reply[1] as u16)
    }

    /// `accept ID`: (socket id, the peer's port).
    pub fn accept(&mut self, listener: u32) -> (u32, u16) {
        let reply = self.send(&format!("accept {listener}"));
        (reply[0], reply[1] as u16)
    }

    /// `close ID`.
    pub fn close(&mut self, socket: u32) {
        self.send(&format!("close {socket}"));
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The program name the kernel gives a peer: this binary's name, cut to 15 bytes.
pub fn peer_program() -> String {
    let exe = std::env::current_exe().expect("test binary path");
    let name = exe
        .file_name()
        .expect("binary file name")
        .to_string_lossy()
        .into_owned();
    name.chars().take(15).collect()
}
