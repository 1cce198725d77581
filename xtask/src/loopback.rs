//! The loopback load shared by the benchmarks and netwatch's integration
//! tests: connections opened and held (`Connections`), connections opened
//! and closed one after the other in one thread (`burst`: the tests' exact
//! per-process load) or from client threads as fast as they go (`churn`:
//! the benchmarks' load). Bounded, and only on 127.0.0.0/8.

use std::collections::HashSet;
use std::fmt;
use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::bail;

/// A churn run: connections opened and closed from client threads, each
/// client closing first.
#[derive(Clone, Copy, Debug)]
pub struct ChurnSpec {
    /// Stop after this many connections (0: only the duration bounds the run).
    pub connections: u64,
    /// Stop after this many seconds at most.
    pub seconds: u64,
    /// Client threads (one listener and one accepting thread each).
    pub threads: usize,
    /// Connections per second across threads (0: as fast as possible).
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

/// Runs the churn: every connection is accepted and closed when it returns.
pub fn churn(spec: &ChurnSpec) -> anyhow::Result<ChurnReport> {
    let deadline = Instant::now() + Duration::from_secs(spec.seconds);
    let started = Instant::now();
    let counts = Arc::new(ChurnCounts::default());
    let mut ports = Vec::new();
    let mut workers = Vec::new();
    for _ in 0..spec.threads.max(1) {
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
        let (counts, limit) = (counts.clone(), spec.connections);
        let pace = (spec.rate > 0)
            .then(|| Duration::from_secs_f64(spec.threads.max(1) as f64 / spec.rate as f64));
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

/// Connections to a listener of this process, both ends held.
pub struct Connections {
    pub listener: TcpListener,
    pub clients: Vec<TcpStream>,
    pub servers: Vec<TcpStream>,
}

impl Connections {
    /// Opens `count` connections, one after the other, to a new listener
    /// on `addr`, a loopback address.
    pub fn open(count: usize, addr: Ipv4Addr) -> anyhow::Result<Connections> {
        if !addr.is_loopback() {
            bail!("only loopback addresses are used, not {addr}");
        }
        let listener = TcpListener::bind((addr, 0))?;
        let target = listener.local_addr()?;
        let mut clients = Vec::with_capacity(count);
        let mut servers = Vec::with_capacity(count);
        for _ in 0..count {
            clients.push(TcpStream::connect(target)?);
            servers.push(listener.accept()?.0);
        }
        Ok(Connections {
            listener,
            clients,
            servers,
        })
    }

    /// Makes every end send RST when closed: no TIME_WAIT left behind.
    pub fn reset_on_close(&self) {
        for stream in self.clients.iter().chain(&self.servers) {
            reset_on_close(stream);
        }
    }
}

/// Opens and closes `count` connections to a new listener, one after the
/// other in the calling thread: connect, accept, the client closes, the
/// server reads its FIN and closes. Every transition then comes from this
/// thread's process, at the pace of one thread. Returns the listener, still
/// open.
pub fn burst(count: usize) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let target = listener.local_addr()?;
    for _ in 0..count {
        let client = TcpStream::connect(target)?;
        let (mut server, _) = listener.accept()?;
        drop(client);
        let _ = server.read(&mut [0u8; 1]);
    }
    Ok(listener)
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
pub fn reset_on_close(stream: &TcpStream) {
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
