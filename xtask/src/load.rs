//! Loopback load for the benchmarks: processes that hold established
//! connections, and a generator of connection churn. Both are bounded and
//! touch only 127.0.0.0/8.

use std::collections::HashSet;
use std::fmt;
use std::io::{BufRead as _, BufReader, Read as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// `xtask hold`: one process's share of the snapshot benchmark's sockets.
#[derive(clap::Args, Debug)]
pub struct HoldArgs {
    /// Connections to open to our own listener (each holds 2 sockets).
    #[arg(long)]
    pub connections: usize,
    /// Loopback address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub addr: Ipv4Addr,
}

/// Opens the connections, prints `ready`, and holds them until stdin closes.
pub fn hold(args: &HoldArgs) -> anyhow::Result<()> {
    if !args.addr.is_loopback() {
        bail!("hold only uses loopback addresses, not {}", args.addr);
    }
    raise_fd_limit(2 * args.connections as u64 + 64)?;
    let listener = TcpListener::bind((args.addr, 0)).context("bind failed")?;
    let target = listener.local_addr()?;
    let wanted = args.connections;
    let acceptor = thread::spawn(move || -> std::io::Result<Vec<TcpStream>> {
        (0..wanted)
            .map(|_| listener.accept().map(|(stream, _)| stream))
            .collect()
    });
    let clients: Vec<TcpStream> = (0..wanted)
        .map(|_| TcpStream::connect(target))
        .collect::<Result<_, _>>()
        .context("connect failed")?;
    let servers = acceptor
        .join()
        .map_err(|_| anyhow::anyhow!("acceptor thread panicked"))??;
    println!("ready");
    // Hold until the benchmark closes our stdin.
    let _ = std::io::stdin().lock().lines().count();
    for stream in clients.iter().chain(&servers) {
        reset_on_close(stream);
    }
    Ok(())
}

/// `xtask churn`: open and close loopback connections from client threads.
#[derive(clap::Args, Debug)]
pub struct ChurnArgs {
    /// Stop after this many connections (0: only the duration bounds the run).
    #[arg(long, default_value_t = 100_000)]
    pub connections: u64,
    /// Stop after this many seconds at most (at most an hour).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,
    /// Client threads (one listener and one accepting thread each).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Connections per second across threads (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
}

/// What a churn run did.
#[derive(Debug)]
pub struct ChurnReport {
    /// Connections made (accepted and closed).
    pub connections: u64,
    pub seconds: f64,
    /// Connections per second.
    pub rate: f64,
    /// connect() calls that failed.
    pub failed: u64,
    /// The listeners' ports.
    pub ports: HashSet<u16>,
}

impl fmt::Display for ChurnReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
        ports.sort();
        write!(
            f,
            "connections={} seconds={:.3} rate={:.0} failed={} ports={}",
            self.connections,
            self.seconds,
            self.rate,
            self.failed,
            ports.join(",")
        )
    }
}

/// Runs the churn.
pub fn churn(args: &ChurnArgs) -> anyhow::Result<ChurnReport> {
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let counts = Arc::new(ChurnCounts::default());
    let mut ports = Vec::new();
    let mut workers = Vec::new();
    let overflows_before = ListenOverflows::now()?;
    for _ in 0..args.threads.max(1) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        deepen_backlog(&listener)?;
        let target = listener.local_addr()?;
        ports.push(target.port());
        let connected = Arc::new(AtomicU64::new(0));
        let clients_done = Arc::new(AtomicBool::new(false));
        let server = {
            let (connected, clients_done) = (connected.clone(), clients_done.clone());
            thread::spawn(move || serve(&listener, &connected, &clients_done))
        };
        let (counts, limit) = (counts.clone(), args.connections);
        let pace = (args.rate > 0)
            .then(|| Duration::from_secs_f64(args.threads.max(1) as f64 / args.rate as f64));
        let client = thread::spawn(move || {
            connect_loop(target, (deadline, pace), limit, &counts, &connected);
            clients_done.store(true, Ordering::Release);
        });
        workers.push((client, server));
    }
    for (client, server) in workers {
        client
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        server
            .join()
            .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let overflows = ListenOverflows::now()?.since(overflows_before);
    if overflows.listen_overflows > 0 {
        bail!(
            "the churn's listeners overflowed their accept queues {} times ({} SYNs retransmitted): \
             connects waited on SYN retransmits, so the rate would measure the load generator, not the tracer; \
             run again on a quieter machine",
            overflows.listen_overflows,
            overflows.syn_retransmits
        );
    }
    let made = counts.made.load(Ordering::Relaxed);
    Ok(ChurnReport {
        connections: made,
        seconds,
        rate: made as f64 / seconds,
        failed: counts.failed.load(Ordering::Relaxed),
        ports: ports.into_iter().collect(),
    })
}

/// Connects and closes at once (the client closes first) until `limit`
/// connections are claimed across threads or the deadline passes; with a
/// `pace`, one connection per pace at most.
fn connect_loop(
    target: SocketAddr,
    (deadline, pace): (Instant, Option<Duration>),
    limit: u64,
    counts: &ChurnCounts,
    connected: &AtomicU64,
) {
    let mut next = Instant::now();
    while Instant::now() < deadline {
        if let Some(pace) = pace {
            next += pace;
            thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        if limit > 0 && counts.claimed.fetch_add(1, Ordering::Relaxed) >= limit {
            return;
        }
        match TcpStream::connect(target) {
            Ok(stream) => {
                counts.made.fetch_add(1, Ordering::Relaxed);
                connected.fetch_add(1, Ordering::Release);
                drop(stream);
            }
            Err(_) => {
                // Retried: the claim goes back. A failed connect still has its
                // CLOSE -> SYN_SENT -> CLOSE transitions, so it is reported.
                counts.claimed.fetch_sub(1, Ordering::Relaxed);
                counts.failed.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Shared by the client threads of one churn run.
#[derive(Default)]
struct ChurnCounts {
    claimed: AtomicU64,
    made: AtomicU64,
    failed: AtomicU64,
}

/// Accepts each connection, reads to the client's FIN, closes; stops once the
/// client thread is done and every connection it made was accepted.
fn serve(
    listener: &TcpListener,
    connected: &AtomicU64,
    clients_done: &AtomicBool,
) -> std::io::Result<()> {
    let mut accepted = 0u64;
    let mut sink = [0u8; 64];
    loop {
        if clients_done.load(Ordering::Acquire) && accepted >= connected.load(Ordering::Acquire) {
            return Ok(());
        }
        if !readable(listener, 50) {
            continue;
        }
        let (mut stream, _) = listener.accept()?;
        accepted += 1;
        while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
    }
}

/// The accept queue std leaves at 128 overflows under churn on a busy host
/// (a SYN is then dropped and retried 1 s later): make it the most the
/// host allows (net.core.somaxconn caps it).
fn deepen_backlog(listener: &TcpListener) -> anyhow::Result<()> {
    // SAFETY: listen() again on a listening socket only changes its backlog.
    if unsafe { libc::listen(listener.as_raw_fd(), 65_535) } != 0 {
        bail!(
            "raising the churn listener's backlog failed: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The host's counters of accept queue overflows and of retransmitted SYNs
/// (TcpExt in /proc/net/netstat).
#[derive(Clone, Copy, Debug)]
struct ListenOverflows {
    listen_overflows: u64,
    syn_retransmits: u64,
}

impl ListenOverflows {
    fn now() -> anyhow::Result<ListenOverflows> {
        let netstat = std::fs::read_to_string("/proc/net/netstat")?;
        let mut tcp_ext = netstat.lines().filter(|line| line.starts_with("TcpExt:"));
        let (Some(names), Some(values)) = (tcp_ext.next(), tcp_ext.next()) else {
            bail!("/proc/net/netstat has no TcpExt counters");
        };
        let counter = |wanted: &str| -> anyhow::Result<u64> {
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(name, _)| *name == wanted)
                .and_then(|(_, value)| value.parse().ok())
                .with_context(|| format!("/proc/net/netstat has no TcpExt {wanted}"))
        };
        Ok(ListenOverflows {
            listen_overflows: counter("ListenOverflows")?,
            syn_retransmits: counter("TCPSynRetrans")?,
        })
    }

    fn since(self, before: ListenOverflows) -> ListenOverflows {
        ListenOverflows {
            listen_overflows: self
                .listen_overflows
                .saturating_sub(before.listen_overflows),
            syn_retransmits: self.syn_retransmits.saturating_sub(before.syn_retransmits),
        }
    }
}

/// Waits up to `ms` for a connection to accept.
fn readable(listener: &TcpListener, ms: i32) -> bool {
    let mut pollfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pollfd, 1, ms) > 0 }
}

/// Closing with SO_LINGER 0 sends RST: no TIME_WAIT left for the next measurement.
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket fd and option of the stated size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// Raises RLIMIT_NOFILE to at least `wanted` (root may raise the hard limit).
pub fn raise_fd_limit(wanted: u64) -> anyhow::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: wanted,
        rlim_max: wanted,
    };
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write one rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut current);
        if current.rlim_cur >= wanted {
            return Ok(());
        }
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            bail!(
                "cannot raise the open file limit to {wanted}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Processes holding the benchmark's sockets; they exit when dropped.
pub(crate) struct Holders {
    children: Vec<(Child, ChildStdin)>,
}

/// Processes the snapshot benchmark's sockets are spread over.
pub(crate) const HOLDERS: usize = 20;

impl Holders {
    /// 20 processes holding `sockets` established sockets in all, each on its own 127.0.0.x.
    pub(crate) fn start(sockets: usize) -> anyhow::Result<Holders> {
        let per_holder = sockets / HOLDERS / 2;
        let mut children = Vec::new();
        for i in 0..HOLDERS {
            let mut child = Command::new(std::env::current_exe()?)
                .args(["hold", "--connections", &per_holder.to_string()])
                .args(["--addr", &format!("127.0.0.{}", i + 2)])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let stdin = child.stdin.take().context("holder stdin")?;
            let stdout = child.stdout.take().context("holder stdout")?;
            let mut ready = String::new();
            BufReader::new(stdout).read_line(&mut ready)?;
            if ready.trim() != "ready" {
                bail!("holder {i} did not get ready");
            }
            children.push((child, stdin));
        }
        Ok(Holders { children })
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for (mut child, stdin) in self.children.drain(..) {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

/// The data lines of /proc/net/tcp and /proc/net/tcp6 (headers left out).
fn proc_tcp_lines() -> Vec<String> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|table| table.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

/// Sockets in /proc/net/tcp and tcp6.
pub(crate) fn tcp_socket_count() -> usize {
    proc_tcp_lines().len()
}

/// Waits (30 s at most) until no socket on the churn's ports is open, but for TIME_WAIT.
pub(crate) fn wait_for_churn_to_settle(ports: &HashSet<u16>) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        let open = proc_tcp_lines()
            .iter()
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let port = |field: Option<&&str>| {
                    field
                        .and_then(|f| f.rsplit(':').next())
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                };
                let on_churn = [port(fields.get(1)), port(fields.get(2))]
                    .iter()
                    .any(|p| p.is_some_and(|p| ports.contains(&p)));
                // 06: TIME_WAIT, 0A: LISTEN (the churn's listeners are gone by now).
                on_churn && fields.get(3).is_some_and(|state| *state != "06")
            })
            .count();
        if open == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
