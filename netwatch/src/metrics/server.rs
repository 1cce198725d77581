//! The metrics endpoint's HTTP server, on a thread of its own, so that
//! scrapes never slow the draining of the ring buffer, and bounded
//! whatever local clients do:
//! - idle connections (a flood that reconnects whenever one is closed):
//!   the listener defers each accept until the request's first bytes
//!   arrive (`TCP_DEFER_ACCEPT`), so the kernel holds the connections that
//!   send nothing, in its queue of handshakes (`LISTEN_BACKLOG` deep), and
//!   drops them unseen; netwatch never wakes for them;
//! - connections faster than it should serve: at most
//!   `ACCEPTS_PER_SECOND` accepts a second (`AcceptBudget`), beyond which
//!   the kernel's accept queue waits;
//! - many at once: at most `MAX_CONNECTIONS` (a new one closes the oldest,
//!   so that a crowd cannot lock a scraper out);
//! - slow senders and slow readers: `REQUEST_TIMEOUT` for the request,
//!   `EXCHANGE_TIMEOUT` for the whole exchange;
//! - accept failing (no fd left): a wait that doubles up to a second.

use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::format::{self, Format};
use super::Metrics;

/// Connections the server holds at most; a new one beyond closes the oldest.
const MAX_CONNECTIONS: usize = 64;
/// Accepts a second at most (with `MAX_CONNECTIONS` of them at once). A
/// connection costs the server's thread about 50 µs, mostly the kernel's
/// loopback path it runs (the peer's receive, netwatch's own programs), so
/// these cost it about 4% of a core. A scrape waits behind the connections
/// queued before it: idle ones never reach the queue, and 400 clients that
/// each send something and connect again when closed delay it by about
/// half a second (`tests/integration/metrics.rs` floods it so).
const ACCEPTS_PER_SECOND: u64 = 700;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a whole exchange may take, the response read included.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the kernel holds a connection that sends nothing before
/// netwatch sees it; past its SYN-ACK retries (5 by default, 63 s) it
/// drops the connection without netwatch ever accepting it.
const DEFER_ACCEPT_SECONDS: libc::c_int = 120;
/// Handshakes the kernel may hold for the listener (capped by
/// net.core.somaxconn): past it, the kernel answers with SYN cookies, and
/// those connections are accepted without deferring.
const LISTEN_BACKLOG: u32 = 4096;
/// Waits after a failed accept (no fd left, ...), doubling up to the second.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves `metrics` at `addr` from a thread of its own (see the module
/// documentation for its bounds).
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() {
        log::warn!("the metrics endpoint on {addr} has no authentication: anyone who can reach it reads the host's connection counts; bind a loopback address (give --metrics a port alone) unless a firewall or proxy guards it");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the metrics server failed")?;
    let listener = {
        let _in_runtime = runtime.enter();
        listen(addr).with_context(|| {
            format!("serving metrics on {addr} failed: is the address free and local?")
        })?
    };
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || runtime.block_on(accept_loop(listener, metrics)))
        .context("starting the metrics thread failed")?;
    Ok(())
}

/// The listening socket, its accepts deferred until a request's first bytes.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    defer_accept(&socket)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

fn defer_accept(socket: &TcpSocket) -> std::io::Result<()> {
    let seconds = DEFER_ACCEPT_SECONDS;
    // SAFETY: sets an int option on a socket this function borrows, from a
    // live int of the size given.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const seconds).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    match set {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// The accepts allowed: `ACCEPTS_PER_SECOND`, `MAX_CONNECTIONS` at once (a
/// token bucket, kept as the time it is full again: exact in nanoseconds).
#[derive(Debug)]
struct AcceptBudget {
    /// When the bucket is full again if no accept comes meanwhile.
    full_at: Instant,
}

/// The time one accept takes from the budget.
const ACCEPT_INTERVAL: Duration = Duration::from_nanos(1_000_000_000 / ACCEPTS_PER_SECOND);

impl AcceptBudget {
    fn new(now: Instant) -> AcceptBudget {
        AcceptBudget { full_at: now }
    }

    /// Spends one accept at `now`, or says how long to wait for one.
    fn spend(&mut self, now: Instant) -> Result<(), Duration> {
        let full_at = self.full_at.max(now);
        let burst = ACCEPT_INTERVAL * (MAX_CONNECTIONS as u32 - 1);
        let earliest = full_at.checked_sub(burst).unwrap_or(now);
        if now < earliest {
            return Err(earliest - now);
        }
        self.full_at = full_at + ACCEPT_INTERVAL;
        Ok(())
    }
}

async fn accept_loop(listener: TcpListener, metrics: Arc<Metrics>) {
    let mut open: std::collections::VecDeque<tokio::task::JoinHandle<()>> =
        std::collections::VecDeque::new();
    let mut budget = AcceptBudget::new(Instant::now());
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    loop {
        while let Err(wait) = budget.spend(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        backoff = ACCEPT_BACKOFF_FIRST;
        open.retain(|task| !task.is_finished());
        if open.len() >= MAX_CONNECTIONS {
            if let Some(oldest) = open.pop_front() {
                oldest.abort();
            }
        }
        let metrics = metrics.clone();
        open.push_back(tokio::spawn(async move {
            let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, respond(stream, &metrics)).await;
        }));
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// `GET /metrics` (or `/`), with any query string.
    Metrics,
    /// `HEAD` of the same: the headers alone.
    MetricsHead,
    Other,
}

/// Reads the request line: `GET` or `HEAD` of `/metrics` or `/`, a query
/// string allowed (Prometheus may add one).
fn parse_request(head: &[u8]) -> Request {
    let line = head
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or_default();
    let mut words = line.split(|&b| b == b' ');
    let (method, target) = (words.next(), words.next());
    let path = target.map(|target| target.split(|&b| b == b'?').next().unwrap_or_default());
    let wanted = matches!(path, Some(b"/metrics" | b"/"));
    match method {
        Some(b"GET") if wanted => Request::Metrics,
        Some(b"HEAD") if wanted => Request::MetricsHead,
        _ => Request::Other,
    }
}

/// Answers one HTTP request: the metrics for `GET /metrics`, their headers
/// for `HEAD`, 404 otherwise. A client that sends no request within
/// `REQUEST_TIMEOUT` is closed (the caller bounds the whole exchange).
async fn respond(mut stream: TcpStream, metrics: &Arc<Metrics>) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read_head = async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
            let read = stream.read(&mut chunk).await?;
            if read == 0 {
                break;
            }
            request.extend_from_slice(&chunk[..read]);
        }
        std::io::Result::Ok(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read_head)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let asked = parse_request(&request);
    let format = Format::asked_by(&request);
    let (status, content_type, body) = match (&asked, format) {
        (Request::Other, _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "try GET /metrics\n".to_owned(),
        ),
        (_, Format::OpenMetrics) => ("200 OK", format.content_type(), metrics.render()),
        (_, Format::Classic) => (
            "200 OK",
            format.content_type(),
            format::classic(&metrics.render()),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if asked != Request::MetricsHead {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_a_burst_then_its_rate() {
        let start = Instant::now();
        let mut budget = AcceptBudget::new(start);
        for _ in 0..MAX_CONNECTIONS {
            assert_eq!(budget.spend(start), Ok(()));
        }
        assert_eq!(
            budget.spend(start),
            Err(ACCEPT_INTERVAL),
            "the burst is spent"
        );
        // Then one accept each ACCEPT_INTERVAL, and not two.
        for k in 1..=1000 {
            let now = start + ACCEPT_INTERVAL * k;
            assert_eq!(budget.spend(now), Ok(()), "accept {k}");
            assert!(budget.spend(now).is_err(), "a second accept {k}");
        }
        // A long pause earns the burst, no more.
        let much_later = start + Duration::from_secs(3600);
        let allowed = (0..1000)
            .take_while(|_| budget.spend(much_later).is_ok())
            .count();
        assert_eq!(allowed, MAX_CONNECTIONS);
    }

    #[test]
    fn requests_are_read_as_prometheus_sends_them() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Request::Metrics
        );
        assert_eq!(
            parse_request(b"GET /metrics?name[]=up HTTP/1.1\r\n\r\n"),
            Request::Metrics
        );
        assert_eq!(parse_request(b"GET / HTTP/1.0\r\n\r\n"), Request::Metrics);
        assert_eq!(
            parse_request(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Request::MetricsHead
        );
        assert_eq!(
            parse_request(b"GET /metricsx HTTP/1.1\r\n\r\n"),
            Request::Other
        );
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Request::Other
        );
        assert_eq!(parse_request(b""), Request::Other);
    }
}
