//! The words every layer uses: what a socket, a transition, an owner and
//! a loss are, in the terms netstat and the kernel use.

use netwatch_common::{tcp_state, ByteCounts};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

mod losses;
mod process;

pub use losses::{LossCause, LossCounters, Lost};
pub use process::{escape_non_utf8, Cgroup, CommandLine, ImageSlot, Owner, ProcessImage};

/// Transport and address family, named as netstat names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Tcp6,
    Udp,
    Udp6,
}

impl Proto {
    /// All four, in netstat's order.
    pub const ALL: [Proto; 4] = [Proto::Tcp, Proto::Tcp6, Proto::Udp, Proto::Udp6];

    /// "tcp", "tcp6", "udp" or "udp6".
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Tcp6 => "tcp6",
            Proto::Udp => "udp",
            Proto::Udp6 => "udp6",
        }
    }

    /// The /proc table that lists sockets of this kind.
    pub fn proc_path(self) -> &'static str {
        match self {
            Proto::Tcp => "/proc/net/tcp",
            Proto::Tcp6 => "/proc/net/tcp6",
            Proto::Udp => "/proc/net/udp",
            Proto::Udp6 => "/proc/net/udp6",
        }
    }

    /// Whether this is TCP (either family).
    pub fn is_tcp(self) -> bool {
        matches!(self, Proto::Tcp | Proto::Tcp6)
    }

    /// Whether this is an IPv6 socket (which may carry IPv4-mapped addresses).
    pub fn is_ipv6(self) -> bool {
        matches!(self, Proto::Tcp6 | Proto::Udp6)
    }

    /// The TCP protocol of an address family, as the tracepoint reports it.
    pub fn tcp_for(ipv6: bool) -> Proto {
        if ipv6 {
            Proto::Tcp6
        } else {
            Proto::Tcp
        }
    }
}

/// A TCP state, numbered as the kernel numbers it (include/net/tcp_states.h).
///
/// UDP sockets reuse the numbering: ESTABLISHED when connected, CLOSE otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum TcpState {
    Established = tcp_state::ESTABLISHED,
    SynSent = tcp_state::SYN_SENT,
    SynRecv = tcp_state::SYN_RECV,
    FinWait1 = tcp_state::FIN_WAIT1,
    FinWait2 = tcp_state::FIN_WAIT2,
    TimeWait = tcp_state::TIME_WAIT,
    Close = tcp_state::CLOSE,
    CloseWait = tcp_state::CLOSE_WAIT,
    LastAck = tcp_state::LAST_ACK,
    Listen = tcp_state::LISTEN,
    Closing = tcp_state::CLOSING,
    NewSynRecv = tcp_state::NEW_SYN_RECV,
}

impl TcpState {
    /// Every state, in the kernel's order.
    pub const ALL: [TcpState; 12] = [
        TcpState::Established,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Listen,
        TcpState::Closing,
        TcpState::NewSynRecv,
    ];

    /// Whether Linux is seen to free a socket in this state without a
    /// traced change to CLOSE: FIN_WAIT1 alone, a few orphaned sockets per
    /// 100,000 connections under churn (audit's `close_seen: false`
    /// records all end there). `verify` takes such a socket, missing from
    /// two kernel reads in a row, as freed.
    pub fn may_vanish_untraced(self) -> bool {
        self == TcpState::FinWait1
    }

    /// The state with the kernel's number, if there is one.
    pub fn from_kernel(code: u8) -> Option<TcpState> {
        Self::ALL.get(usize::from(code).checked_sub(1)?).copied()
    }

    /// netstat's name: ESTABLISHED, SYN_SENT, FIN_WAIT1, ...
    pub fn name(self) -> &'static str {
        match self {
            TcpState::Established => "ESTABLISHED",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::FinWait1 => "FIN_WAIT1",
            TcpState::FinWait2 => "FIN_WAIT2",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Listen => "LISTEN",
            TcpState::Closing => "CLOSING",
            TcpState::NewSynRecv => "NEW_SYN_RECV",
        }
    }

    /// Parses a state name the way netstat (`TIME_WAIT`) or ss (`time-wait`)
    /// spell it, in any case.
    pub fn from_name(name: &str) -> Option<TcpState> {
        let wanted = fold_state_name(name);
        Self::ALL
            .into_iter()
            .find(|state| fold_state_name(state.name()) == wanted)
    }
}

fn fold_state_name(name: &str) -> String {
    name.chars()
        .filter(|c| !matches!(c, '_' | '-'))
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Who opened a connection: this host (connect) or the peer (accept).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Out,
    In,
    /// A baseline socket (/proc cannot tell), or a listener.
    Unknown,
}

impl Direction {
    /// "out", "in" or "unknown".
    pub fn name(self) -> &'static str {
        match self {
            Direction::Out => "out",
            Direction::In => "in",
            Direction::Unknown => "unknown",
        }
    }
}

/// `addr:port`, with IPv6 in brackets and port 0 as `*`, as ss prints it.
pub fn format_endpoint(addr: SocketAddr) -> String {
    Endpoint(addr).to_string()
}

/// Displays as [`format_endpoint`] formats, without allocating.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint(pub SocketAddr);

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.ip() {
            IpAddr::V4(ip) => write!(f, "{ip}:")?,
            IpAddr::V6(ip) => write!(f, "[{ip}]:")?,
        }
        match self.0.port() {
            0 => f.write_str("*"),
            port => write!(f, "{port}"),
        }
    }
}

/// Protocol and both endpoints: what identifies a connection across /proc and eBPF.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub proto: Proto,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// What the kernel itself counts of a TCP connection, as `ss -ti` shows
/// it: read by the tcp iterator, by socket (kernel address).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// Bytes the peer acknowledged, and bytes received in order.
    pub bytes: ByteCounts,
    /// Smoothed round-trip time, microseconds (0: none measured yet).
    pub rtt_us: u32,
    /// Segments retransmitted over the connection's life.
    pub retransmits: u32,
}

/// The process of the task on the CPU at a kernel event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// Its thread group id.
    pub pid: u32,
    /// The process's name (NUL-padded); all zero where the kernel did not read it.
    pub comm: [u8; 16],
    /// When the process started (CLOCK_MONOTONIC), if the kernel could read
    /// it: with the pid, the process's identity across pid reuse.
    pub start_ns: Option<u64>,
    /// Its cgroup (v2) id, where the kernel read its start time.
    pub cgroup_id: Option<u64>,
    /// Its command line as the kernel read it from the process's memory
    /// (arguments, each NUL-terminated, cut at `COMMAND_LINE_BYTES`): on the
    /// first owner event that names the process, and on its exec; else `None`.
    pub command_line: Option<Arc<[u8]>>,
}

impl Task {
    /// A process known by its pid alone (an owner /proc named).
    pub fn of_pid(pid: u32) -> Task {
        Task {
            pid,
            comm: [0; 16],
            start_ns: None,
            cgroup_id: None,
            command_line: None,
        }
    }
}

/// One state change reported by the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub skaddr: u64,
    pub tuple: Tuple,
    pub old: TcpState,
    pub new: TcpState,
    /// The task on the CPU: the owner only when it opens the socket
    /// (connect, listen), and only then does the kernel name its process.
    pub task: Task,
    /// The socket's uid, when the kernel's layout was known.
    pub uid: Option<u32>,
    /// The socket's network namespace inode, when the kernel's layout was known.
    pub netns: Option<u32>,
    /// At a change to CLOSE, what the socket carried (when bytes are
    /// counted); when a socket opens, what the previous one at its address
    /// carried, if that one left without a traced CLOSE.
    pub bytes: ByteCounts,
    /// Sent by the recovery program: a skipped call, or a duplicate.
    pub recovered: bool,
    /// At a change to CLOSE: the error (errno) the kernel closed the
    /// socket with, if any, when the kernel's layout was known.
    pub error: Option<u16>,
}

/// How a connection went, as audit's `result` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnResult {
    /// It reached ESTABLISHED, and no error closed it.
    Ok,
    /// The peer answered the SYN with a reset (ECONNREFUSED).
    Refused,
    /// No answer came before the retries ran out (ETIMEDOUT).
    Timeout,
    /// A reset ended it after the handshake, or during it (ECONNRESET, EPIPE).
    Reset,
    /// An ICMP error said the peer cannot be reached (EHOSTUNREACH, ENETUNREACH).
    Unreachable,
    /// Closed by its process before the handshake completed, with no error.
    Aborted,
    /// Another error, by its errno.
    Error(u16),
}

impl ConnResult {
    /// The failure kinds the metrics count, each once, `Error` as "other".
    pub const FAILURES: [&'static str; 6] = [
        "refused",
        "timeout",
        "reset",
        "unreachable",
        "aborted",
        "other",
    ];

    /// The result of a connection closed with `error` that did or did not
    /// reach ESTABLISHED.
    pub fn of(error: Option<u16>, established: bool) -> ConnResult {
        let Some(errno) = error.filter(|&errno| errno != 0) else {
            return if established {
                ConnResult::Ok
            } else {
                ConnResult::Aborted
            };
        };
        match i32::from(errno) {
            libc::ECONNREFUSED => ConnResult::Refused,
            libc::ETIMEDOUT => ConnResult::Timeout,
            libc::ECONNRESET | libc::EPIPE => ConnResult::Reset,
            libc::EHOSTUNREACH | libc::ENETUNREACH => ConnResult::Unreachable,
            _ => ConnResult::Error(errno),
        }
    }

    /// "ok", "refused", "timeout", "reset", "unreachable", "aborted", or
    /// the errno's name ("EPROTO"; "errno 123" for one without a name here).
    pub fn name(self) -> std::borrow::Cow<'static, str> {
        let name = match self {
            ConnResult::Ok => "ok",
            ConnResult::Refused => "refused",
            ConnResult::Timeout => "timeout",
            ConnResult::Reset => "reset",
            ConnResult::Unreachable => "unreachable",
            ConnResult::Aborted => "aborted",
            ConnResult::Error(errno) => return errno_name(errno),
        };
        name.into()
    }

    /// Its index in [`ConnResult::FAILURES`]; `None` for `Ok`.
    pub fn failure_index(self) -> Option<usize> {
        match self {
            ConnResult::Ok => None,
            ConnResult::Refused => Some(0),
            ConnResult::Timeout => Some(1),
            ConnResult::Reset => Some(2),
            ConnResult::Unreachable => Some(3),
            ConnResult::Aborted => Some(4),
            ConnResult::Error(_) => Some(5),
        }
    }
}

/// The names of the other errors a TCP socket can be closed with.
fn errno_name(errno: u16) -> std::borrow::Cow<'static, str> {
    let name = match i32::from(errno) {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::EPROTO => "EPROTO",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::ENOPROTOOPT => "ENOPROTOOPT",
        libc::ENETDOWN => "ENETDOWN",
        libc::ENETRESET => "ENETRESET",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ENOBUFS => "ENOBUFS",
        libc::EHOSTDOWN => "EHOSTDOWN",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        _ => return format!("errno {errno}").into(),
    };
    name.into()
}

/// Why a socket has a new owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerCause {
    /// `accept()` returned it to this process (seen with the accept hook).
    Accept,
    /// This process sent or received on it after another process did.
    Handoff,
    /// This process was the first to send or receive on the accepted socket.
    FirstIo,
}

impl OwnerCause {
    /// Every cause, in the order of their numbers.
    pub const ALL: [OwnerCause; 3] = [OwnerCause::Accept, OwnerCause::Handoff, OwnerCause::FirstIo];

    /// "accept", "handoff" or "first_io".
    pub fn name(self) -> &'static str {
        match self {
            OwnerCause::Accept => "accept",
            OwnerCause::Handoff => "handoff",
            OwnerCause::FirstIo => "first_io",
        }
    }
}

/// The kernel saw a process take a socket: it accepted it, or it sent or
/// received on it while the kernel's map named another owner (or none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerEvent {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub skaddr: u64,
    pub tuple: Tuple,
    /// The socket's state then, when it is one the kernel numbers.
    pub state: Option<TcpState>,
    /// The process that takes the socket.
    pub task: Task,
    pub uid: Option<u32>,
    pub netns: Option<u32>,
    pub cause: OwnerCause,
}

/// A socket whose owner is now another process.
#[derive(Clone, Debug, PartialEq)]
pub struct OwnerChange {
    /// The socket's kernel address.
    pub skaddr: u64,
    pub tuple: Tuple,
    pub state: TcpState,
    /// The previous owner, if the table knew one.
    pub old: Option<Owner>,
    pub new: Owner,
    pub cause: OwnerCause,
}

/// What one event of the kernel's programs reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Transition(Transition),
    Owner(OwnerEvent),
    /// A process called exec(): the task carries its new name.
    Exec(Task),
}

#[cfg(test)]
mod tests;
