//! What a socket is, in the words netstat and the kernel use.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

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
pub enum TcpState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    NewSynRecv = 12,
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

/// The process that owns a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    /// The process name (`/proc/PID/comm`, as ss and tcpstates show it).
    pub program: Arc<str>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_numbers_map_to_netstat_names() {
        assert_eq!(TcpState::from_kernel(1), Some(TcpState::Established));
        assert_eq!(TcpState::from_kernel(10), Some(TcpState::Listen));
        assert_eq!(TcpState::from_kernel(12), Some(TcpState::NewSynRecv));
        assert_eq!(TcpState::from_kernel(0), None);
        assert_eq!(TcpState::from_kernel(13), None);
        assert_eq!(TcpState::FinWait1.name(), "FIN_WAIT1");
    }

    #[test]
    fn state_names_parse_in_netstat_and_ss_spelling() {
        assert_eq!(TcpState::from_name("TIME_WAIT"), Some(TcpState::TimeWait));
        assert_eq!(TcpState::from_name("time-wait"), Some(TcpState::TimeWait));
        assert_eq!(TcpState::from_name("listen"), Some(TcpState::Listen));
        assert_eq!(TcpState::from_name("fin-wait-1"), Some(TcpState::FinWait1));
        assert_eq!(TcpState::from_name("bogus"), None);
    }

    #[test]
    fn endpoints_bracket_ipv6_only() {
        let v4: SocketAddr = "127.0.0.1:22".parse().unwrap();
        let v6: SocketAddr = "[::1]:22".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:80".parse().unwrap();
        assert_eq!(format_endpoint(v4), "127.0.0.1:22");
        assert_eq!(format_endpoint(v6), "[::1]:22");
        assert_eq!(format_endpoint(mapped), "[::ffff:127.0.0.1]:80");
        let wildcard: SocketAddr = "0.0.0.0:0".parse().unwrap();
        assert_eq!(format_endpoint(wildcard), "0.0.0.0:*");
    }
}
