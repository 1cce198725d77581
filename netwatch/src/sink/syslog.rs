//! `--syslog`: every record also goes to a syslog receiver, as an RFC 5424
//! message whose MSG is the JSON record: to the local syslog socket, or to
//! a collector over UDP (one message per datagram, RFC 5426) or TCP
//! (octet-counting framing, RFC 6587).
//!
//! A thread of its own sends them, fed through a bounded queue, so that the
//! monitor never waits on a receiver: one that is gone or slower than the
//! records costs messages, each counted (`netwatch_syslog_dropped_total`)
//! and reported on stderr, never a stalled monitor or a lost transition.
//! Messages already handed to the kernel when a TCP receiver goes away
//! cannot be counted: without acknowledgements (RELP), nothing tells them
//! from those it read.

use std::fmt;
use std::io::{self, Write as _};
use std::net::{TcpStream, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use super::{RecordKind, Records};
use crate::metrics::Metrics;

/// The local syslog socket.
const DEV_LOG: &str = "/dev/log";
/// Messages waiting for the sending thread at most; beyond, they are dropped.
const QUEUE: usize = 16_384;
/// Messages sent in one write at most.
const BATCH: usize = 256;
/// How long one write may block before the receiver counts as stuck.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// The wait between two attempts to reach a receiver that is gone.
const RETRY: Duration = Duration::from_secs(1);
/// How long, once netwatch stops, the thread may go on sending what is queued.
const LAST_SENDS: Duration = Duration::from_secs(2);
/// How often drops from a full queue are reported, at most.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// RFC 5424 facility: daemon.
const FACILITY: u8 = 3;
/// The structured-data element's id: private, under the example enterprise
/// number of RFC 5612 (netwatch has none registered).
const SD_ID: &str = "netwatch@32473";

/// Where `--syslog` sends: `local` (/dev/log), `unix:PATH`,
/// `udp://HOST:PORT` or `tcp://HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyslogTarget {
    Unix(PathBuf),
    Udp(String),
    Tcp(String),
}

impl FromStr for SyslogTarget {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let host_port = |address: &str| -> Result<String, String> {
            match address.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(address.to_owned())
                }
                _ => Err(format!("{text}: expected HOST:PORT after the scheme")),
            }
        };
        if text == "local" {
            Ok(SyslogTarget::Unix(DEV_LOG.into()))
        } else if let Some(path) = text.strip_prefix("unix:").filter(|path| !path.is_empty()) {
            Ok(SyslogTarget::Unix(path.into()))
        } else if let Some(address) = text.strip_prefix("udp://") {
            host_port(address).map(SyslogTarget::Udp)
        } else if let Some(address) = text.strip_prefix("tcp://") {
            host_port(address).map(SyslogTarget::Tcp)
        } else {
            Err(format!(
                "{text}: expected local, unix:PATH, udp://HOST:PORT or tcp://HOST:PORT"
            ))
        }
    }
}

impl fmt::Display for SyslogTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyslogTarget::Unix(path) => write!(f, "unix:{}", path.display()),
            SyslogTarget::Udp(address) => write!(f, "udp://{address}"),
            SyslogTarget::Tcp(address) => write!(f, "tcp://{address}"),
        }
    }
}

/// The sending side kept by the sink: records in, counted drops out.
pub struct Syslog {
    queue: Option<SyncSender<Vec<u8>>>,
    header: Header,
    metrics: Arc<Metrics>,
    stopping: Arc<AtomicBool>,
    /// The sending thread; it returns how many messages it sent.
    thread: Option<JoinHandle<u64>>,
    target: SyslogTarget,
}

impl Syslog {
    /// Starts the sending thread. The receiver need not be there yet: until
    /// it is, messages are dropped, counted and reported.
    pub fn start(target: SyslogTarget, metrics: Arc<Metrics>) -> io::Result<Syslog> {
        let (queue, waiting) = mpsc::sync_channel(QUEUE);
        let stopping = Arc::new(AtomicBool::new(false));
        let sender = Sender {
            target: target.clone(),
            waiting,
            metrics: metrics.clone(),
            stopping: stopping.clone(),
            connection: None,
            next_attempt: Instant::now(),
            outage: None,
            sent: 0,
            reported_drops: 0,
            last_report: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("netwatch-syslog".into())
            .spawn(move || sender.run())?;
        Ok(Syslog {
            queue: Some(queue),
            header: Header::new(),
            metrics,
            stopping,
            thread: Some(thread),
            target,
        })
    }

    /// Queues one message per record in `records` (JSON lines), its kind
    /// as the MSGID; a full queue drops and counts the message.
    pub fn send(&mut self, records: &Records) {
        let Some(queue) = &self.queue else {
            return;
        };
        let now = SystemTime::now();
        for (kind, record) in records.each() {
            let record = record.strip_suffix(b"\n").unwrap_or(record);
            let message = self.header.message(now, kind, record);
            match queue.try_send(message) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    self.metrics.syslog_dropped.inc();
                }
            }
        }
    }
}

impl Drop for Syslog {
    /// Lets the thread send what is queued, for `LAST_SENDS` at most, and
    /// says what was sent and dropped.
    fn drop(&mut self) {
        drop(self.queue.take());
        self.stopping.store(true, Ordering::Relaxed);
        let sent = self
            .thread
            .take()
            .and_then(|thread| thread.join().ok())
            .unwrap_or_default();
        log::info!(
            "syslog: {sent} records sent to {}, {} dropped",
            self.target,
            self.metrics.syslog_dropped.get()
        );
    }
}

/// The parts of every message's header that do not change, and the sequence.
struct Header {
    hostname: String,
    procid: u32,
    sequence: u32,
}

impl Header {
    fn new() -> Header {
        let hostname = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        Header {
            hostname: printable_or_nil(&hostname, 255),
            procid: std::process::id(),
            sequence: 0,
        }
    }

    /// The RFC 5424 message for one JSON record:
    /// `<PRI>1 TIMESTAMP HOSTNAME netwatch PROCID TYPE [netwatch@32473 type="TYPE"][meta sequenceId="N"] RECORD`.
    /// The record's kind is the MSGID and picks the severity; the sequence (1 to 2^31 - 1, then 1 again) lets a receiver
    /// see where messages are missing.
    fn message(&mut self, at: SystemTime, kind: RecordKind, record: &[u8]) -> Vec<u8> {
        self.sequence = self.sequence % (i32::MAX as u32) + 1;
        let pri = FACILITY * 8 + severity(kind);
        let kind = kind.name();
        let mut message = Vec::with_capacity(record.len() + 160);
        // Writing to a Vec cannot fail.
        let _ = write!(
            message,
            "<{pri}>1 {} {} netwatch {} {kind} [{SD_ID} type=\"{kind}\"][meta sequenceId=\"{}\"] ",
            humantime::format_rfc3339_micros(at),
            self.hostname,
            self.procid,
            self.sequence
        );
        message.extend_from_slice(record);
        message
    }
}

/// Warning for losses and failures, notice for the summary, informational
/// for the rest.
fn severity(kind: RecordKind) -> u8 {
    match kind {
        RecordKind::Lost | RecordKind::Failure => 4,
        RecordKind::Summary => 5,
        _ => 6,
    }
}

/// `text` as a header field: printable ASCII, at most `max` bytes, or `-`.
fn printable_or_nil(text: &str, max: usize) -> String {
    let field: String = text
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if field.is_empty() {
        "-".into()
    } else {
        field
    }
}

/// A message with octet-counting framing (RFC 6587): its length, a space, it.
fn octet_counted(message: &[u8], frames: &mut Vec<u8>) {
    // Writing to a Vec cannot fail.
    let _ = write!(frames, "{} ", message.len());
    frames.extend_from_slice(message);
}

/// An open way to the receiver.
enum Connection {
    Unix(UnixDatagram),
    Udp(UdpSocket),
    Tcp(TcpStream),
}

impl Connection {
    fn open(target: &SyslogTarget) -> io::Result<Connection> {
        match target {
            SyslogTarget::Unix(path) => {
                let socket = UnixDatagram::unbound()?;
                socket.connect(path)?;
                socket.set_write_timeout(Some(WRITE_TIMEOUT))?;
                Ok(Connection::Unix(socket))
            }
            SyslogTarget::Udp(address) => {
                let peer = resolve(address)?;
                let local = if peer.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let socket = UdpSocket::bind(local)?;
                socket.connect(peer)?;
                socket.set_write_timeout(Some(WRITE_TIMEOUT))?;
                Ok(Connection::Udp(socket))
            }
            SyslogTarget::Tcp(address) => {
                let stream = TcpStream::connect_timeout(&resolve(address)?, WRITE_TIMEOUT)?;
                stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
                stream.set_nodelay(true)?;
                Ok(Connection::Tcp(stream))
            }
        }
    }

    /// Sends `batch`; returns how many messages went out before an error.
    fn send(&mut self, batch: &[Vec<u8>]) -> (usize, Option<io::Error>) {
        match self {
            Connection::Unix(socket) => send_each(batch, |message| socket.send(message)),
            Connection::Udp(socket) => send_each(batch, |message| socket.send(message)),
            Connection::Tcp(stream) => {
                if let Err(err) = still_open(stream) {
                    return (0, Some(err));
                }
                let mut frames = Vec::with_capacity(batch.iter().map(|m| m.len() + 8).sum());
                for message in batch {
                    octet_counted(message, &mut frames);
                }
                // A write cut short leaves a cut frame: the whole batch
                // counts as dropped, and the connection is closed.
                match stream.write_all(&frames) {
                    Ok(()) => (batch.len(), None),
                    Err(err) => (0, Some(err)),
                }
            }
        }
    }
}

/// Sends each message as one datagram.
fn send_each(
    batch: &[Vec<u8>],
    mut send: impl FnMut(&[u8]) -> io::Result<usize>,
) -> (usize, Option<io::Error>) {
    for (sent, message) in batch.iter().enumerate() {
        if let Err(err) = send(message) {
            return (sent, Some(err));
        }
    }
    (batch.len(), None)
}

/// A syslog receiver sends nothing back: a TCP stream that reads as ready
/// has been closed or reset by it, and a write would be lost.
fn still_open(stream: &TcpStream) -> io::Result<()> {
    let mut byte = 0u8;
    // SAFETY: recv() writes at most one byte into `byte`, which lives here.
    let peeked = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match peeked {
        0 => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the receiver closed the connection",
        )),
        1.. => Ok(()),
        _ => match io::Error::last_os_error() {
            err if err.kind() == io::ErrorKind::WouldBlock => Ok(()),
            err => Err(err),
        },
    }
}

fn resolve(address: &str) -> io::Result<std::net::SocketAddr> {
    address.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{address} resolves to no address"),
        )
    })
}

/// The sending thread's state.
struct Sender {
    target: SyslogTarget,
    waiting: Receiver<Vec<u8>>,
    metrics: Arc<Metrics>,
    stopping: Arc<AtomicBool>,
    connection: Option<Connection>,
    /// When a receiver that is gone may be tried again.
    next_attempt: Instant,
    /// While messages cannot be delivered: the drops counted when that began.
    outage: Option<u64>,
    /// Messages sent.
    sent: u64,
    /// Drops already reported, and when.
    reported_drops: u64,
    last_report: Instant,
}

impl Sender {
    fn run(mut self) -> u64 {
        let mut stopped_at = None;
        while let Ok(first) = self.waiting.recv() {
            let mut batch = vec![first];
            batch.extend(self.waiting.try_iter().take(BATCH - 1));
            if self.stopping.load(Ordering::Relaxed) {
                let since = *stopped_at.get_or_insert_with(Instant::now);
                if since.elapsed() > LAST_SENDS {
                    self.drop_messages(batch.len());
                    continue;
                }
            }
            self.deliver(&batch);
            self.report_queue_drops();
        }
        self.sent
    }

    /// Sends a batch, (re)connecting first where needed; what cannot be
    /// sent is dropped and counted.
    fn deliver(&mut self, batch: &[Vec<u8>]) {
        if self.connection.is_none() && Instant::now() >= self.next_attempt {
            match Connection::open(&self.target) {
                Ok(connection) => self.connection = Some(connection),
                Err(err) => self.unreachable(&err),
            }
        }
        let Some(connection) = &mut self.connection else {
            self.drop_messages(batch.len());
            return;
        };
        let (sent, error) = connection.send(batch);
        self.sent += sent as u64;
        if sent > 0 {
            self.reachable();
        }
        if let Some(err) = error {
            self.connection = None;
            self.unreachable(&err);
            self.drop_messages(batch.len() - sent);
        }
    }

    fn drop_messages(&self, count: usize) {
        self.metrics.syslog_dropped.add(count as u64);
    }

    /// The receiver cannot be reached: said once per outage.
    fn unreachable(&mut self, err: &io::Error) {
        self.next_attempt = Instant::now() + RETRY;
        if self.outage.is_none() {
            self.outage = Some(self.metrics.syslog_dropped.get());
            log::warn!(
                "syslog: {} takes no records ({err}); they are dropped and counted (netwatch_syslog_dropped_total) until it does",
                self.target
            );
        }
    }

    /// Messages went out: an outage, if any, is over.
    fn reachable(&mut self) {
        if let Some(dropped_before) = self.outage.take() {
            let dropped = self.metrics.syslog_dropped.get();
            log::warn!(
                "syslog: {} takes records again; {} dropped meanwhile",
                self.target,
                dropped - dropped_before
            );
            self.reported_drops = dropped;
            self.last_report = Instant::now();
        }
    }

    /// Drops of a full queue while the receiver is there (it reads slower
    /// than records come): reported every `REPORT_EVERY` at most.
    fn report_queue_drops(&mut self) {
        let dropped = self.metrics.syslog_dropped.get();
        if self.outage.is_some()
            || dropped == self.reported_drops
            || self.last_report.elapsed() < REPORT_EVERY
        {
            return;
        }
        log::warn!(
            "syslog: {} records dropped: {} reads slower than records come",
            dropped - self.reported_drops,
            self.target
        );
        self.reported_drops = dropped;
        self.last_report = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_parsed_and_bad_ones_refused_with_the_expected_forms() {
        assert_eq!(
            "local".parse(),
            Ok(SyslogTarget::Unix(PathBuf::from("/dev/log")))
        );
        assert_eq!(
            "unix:/run/x.sock".parse(),
            Ok(SyslogTarget::Unix(PathBuf::from("/run/x.sock")))
        );
        assert_eq!(
            "udp://127.0.0.1:514".parse(),
            Ok(SyslogTarget::Udp("127.0.0.1:514".into()))
        );
        assert_eq!(
            "tcp://[::1]:6514".parse(),
            Ok(SyslogTarget::Tcp("[::1]:6514".into()))
        );
        for bad in [
            "",
            "tcp://host",
            "udp://:514",
            "tcp://h:99999",
            "syslog.example",
            "unix:",
        ] {
            let err = bad.parse::<SyslogTarget>().unwrap_err();
            assert!(err.contains("expected"), "{bad}: {err}");
        }
        assert_eq!(SyslogTarget::Tcp("h:1".into()).to_string(), "tcp://h:1");
    }

    #[test]
    fn a_record_becomes_an_rfc_5424_message_with_its_type() {
        let mut header = Header {
            hostname: "host".into(),
            procid: 42,
            sequence: 0,
        };
        let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let record = br#"{"type":"conn","schema":2,"pid":7}"#;
        let message = header.message(at, RecordKind::Conn, record);
        assert_eq!(
            String::from_utf8(message).unwrap(),
            r#"<30>1 2023-11-14T22:13:20.123456Z host netwatch 42 conn [netwatch@32473 type="conn"][meta sequenceId="1"] {"type":"conn","schema":2,"pid":7}"#
        );
        let lost = header.message(at, RecordKind::Lost, br#"{"type":"lost","count":3}"#);
        assert!(lost.starts_with(b"<28>1 "), "warning");
        assert!(String::from_utf8(lost)
            .unwrap()
            .contains("sequenceId=\"2\""));
        header.sequence = i32::MAX as u32;
        let wrapped = header.message(at, RecordKind::Summary, br#"{"type":"summary"}"#);
        assert!(wrapped.starts_with(b"<29>1 "), "notice");
        assert!(String::from_utf8(wrapped)
            .unwrap()
            .contains("sequenceId=\"1\""));
    }

    #[test]
    fn a_host_name_is_printable_ascii_or_nil() {
        assert_eq!(printable_or_nil("h\u{e9}st name", 255), "hstname");
        assert_eq!(printable_or_nil("\u{e9}", 255), "-");
    }

    #[test]
    fn frames_are_octet_counted() {
        let mut frames = Vec::new();
        octet_counted(b"<30>1 a", &mut frames);
        octet_counted(b"", &mut frames);
        assert_eq!(frames, b"7 <30>1 a0 ");
    }
}
