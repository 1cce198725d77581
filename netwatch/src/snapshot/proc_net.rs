//! Parser for the socket tables in /proc/net (tcp, tcp6, udp, udp6).
//!
//! Written by hand rather than with `procfs::net`: that parser fails a whole
//! table on one bad line and allocates per field, while a snapshot must skip
//! and count a malformed line and stay fast at 100k lines.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::model::{Proto, TcpState, Tuple};

/// One line of a /proc/net socket table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcSocket {
    pub proto: Proto,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: TcpState,
    pub tx_queue: u32,
    pub rx_queue: u32,
    pub uid: u32,
    pub inode: u64,
    /// A TIME_WAIT mini socket (timer 3): what is left of a closed
    /// connection. The kernel prints its substate, TIME_WAIT or FIN_WAIT2.
    pub timewait: bool,
    /// The network namespace, when read from another than netwatch's own.
    pub netns: Option<u32>,
    /// Where the kernel holds it, when read there (never from /proc).
    pub kernel: Option<KernelSocket>,
}

/// A socket as the kernel's tcp iterator read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSocket {
    /// Its kernel address: the key of its transitions.
    pub skaddr: u64,
    /// When it was read (`bpf_ktime_get_ns`): transitions stamped before
    /// are in what was read.
    pub read_ns: u64,
}

impl ProcSocket {
    /// Its protocol and endpoints.
    pub fn tuple(&self) -> Tuple {
        Tuple {
            proto: self.proto,
            local: self.local,
            remote: self.remote,
        }
    }
}

/// A /proc/net table: the sockets of its well-formed lines and how many were not.
#[derive(Debug, Default)]
pub struct ProcTable {
    pub sockets: Vec<ProcSocket>,
    pub malformed_lines: usize,
}

impl ProcTable {
    /// The sockets `scan` hands its callback, and the malformed lines it counts.
    fn collect(
        scan: impl FnOnce(&mut dyn FnMut(ProcSocket)) -> io::Result<usize>,
    ) -> io::Result<ProcTable> {
        let mut sockets = Vec::new();
        let malformed_lines = scan(&mut |socket| sockets.push(socket))?;
        Ok(ProcTable {
            sockets,
            malformed_lines,
        })
    }
}

/// What /proc/net/sockstat and sockstat6 count in one network namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketCounts {
    tcp: u64,
    tcp6: u64,
    udp: u64,
    udp6: u64,
    /// TIME_WAIT sockets of both families.
    time_wait: u64,
}

impl SocketCounts {
    /// The counts of the namespace of `dir` (`/proc`, or a task's /proc
    /// directory); `None` when sockstat is unreadable. Without IPv6,
    /// sockstat6 is missing and its counts are 0.
    pub fn read(dir: &str) -> Option<SocketCounts> {
        let sockstat = std::fs::read_to_string(format!("{dir}/net/sockstat")).ok()?;
        let sockstat6 = std::fs::read_to_string(format!("{dir}/net/sockstat6")).unwrap_or_default();
        Some(SocketCounts::parse(&sockstat, &sockstat6))
    }

    fn parse(sockstat: &str, sockstat6: &str) -> SocketCounts {
        let count = |text: &str, table: &str, name: &str| -> u64 {
            let Some(fields) = text.lines().find_map(|line| line.strip_prefix(table)) else {
                return 0;
            };
            let words: Vec<&str> = fields.split_whitespace().collect();
            words
                .chunks_exact(2)
                .find(|pair| pair[0] == name)
                .and_then(|pair| pair[1].parse().ok())
                .unwrap_or(0)
        };
        SocketCounts {
            tcp: count(sockstat, "TCP: ", "inuse"),
            tcp6: count(sockstat6, "TCP6: ", "inuse"),
            udp: count(sockstat, "UDP: ", "inuse"),
            udp6: count(sockstat6, "UDP6: ", "inuse"),
            time_wait: count(sockstat, "TCP: ", "tw"),
        }
    }

    /// TCP sockets open, TIME_WAIT included.
    pub fn tcp_sockets(&self) -> u64 {
        self.tcp + self.tcp6 + self.time_wait
    }

    /// Whether the kernel counts no socket that `proto`'s table would list.
    /// Its open sockets are counted per family (request sockets need a
    /// counted listener); TIME_WAIT ones only for both families together.
    fn none_in(&self, proto: Proto) -> bool {
        match proto {
            Proto::Tcp => self.tcp == 0 && self.time_wait == 0,
            Proto::Tcp6 => self.tcp6 == 0 && self.time_wait == 0,
            Proto::Udp => self.udp == 0,
            Proto::Udp6 => self.udp6 == 0,
        }
    }
}

/// Reads and parses one table of netwatch's network namespace (see
/// [`scan_file`]).
pub fn read_table(proto: Proto) -> io::Result<ProcTable> {
    ProcTable::collect(|each| scan_file(proto, "/proc", each))
}

/// Reads one table of network namespace `netns` through a task in it
/// (`task` is its /proc directory). A task gone meanwhile gives an empty
/// table.
pub fn read_table_of(proto: Proto, task: &str, netns: u32) -> ProcTable {
    ProcTable::collect(|each| scan_file_of(proto, task, netns, each)).unwrap_or_default()
}

/// [`scan_file`] of a task's /proc directory in network namespace
/// `netns`, each socket marked with it.
pub fn scan_file_of(
    proto: Proto,
    task: &str,
    netns: u32,
    each: &mut dyn FnMut(ProcSocket),
) -> io::Result<usize> {
    scan_file(proto, task, &mut |mut socket| {
        socket.netns = Some(netns);
        each(socket)
    })
}

/// Calls `each` with every socket of `proto`'s table in the namespace of
/// `dir` (`/proc`, or a task's /proc directory), read a chunk at a time,
/// and returns how many lines were malformed. A missing table (IPv6
/// disabled) is empty, and so is one the kernel counts no socket for: it is
/// not read (each read walks the kernel's whole hash, about 4 ms here even
/// when it is empty).
pub fn scan_file(proto: Proto, dir: &str, each: &mut dyn FnMut(ProcSocket)) -> io::Result<usize> {
    if SocketCounts::read(dir).is_some_and(|counts| counts.none_in(proto)) {
        return Ok(0);
    }
    let path = proto.proc_path().replacen("/proc", dir, 1);
    match File::open(path) {
        Ok(file) => scan_table(proto, BufReader::with_capacity(READ_CHUNK, file), each),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(err) => Err(err),
    }
}

/// Bytes read from a /proc table at a time (the kernel fills a read with
/// as many whole lines as fit).
const READ_CHUNK: usize = 256 * 1024;

/// Parses a whole table, header included; malformed lines are skipped and counted.
#[cfg(any(test, feature = "fuzzing"))]
pub fn parse_table(proto: Proto, contents: &[u8]) -> ProcTable {
    // Reading from memory cannot fail.
    ProcTable::collect(|each| scan_table(proto, contents, each)).unwrap_or_default()
}

/// Calls `each` with the socket of every well-formed line `reader` gives
/// after the header, and returns how many lines were malformed (skipped).
fn scan_table(
    proto: Proto,
    mut reader: impl BufRead,
    each: &mut dyn FnMut(ProcSocket),
) -> io::Result<usize> {
    let mut line = Vec::with_capacity(256);
    let mut malformed_lines = 0;
    let mut header = true;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(malformed_lines);
        }
        if std::mem::take(&mut header) || line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match parse_line(proto, &line) {
            Some(socket) => each(socket),
            None => malformed_lines += 1,
        }
    }
}

/// Parses one data line; `None` when it is not a well-formed socket line.
///
/// Layout: `sl: local rem st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...`
pub fn parse_line(proto: Proto, line: &[u8]) -> Option<ProcSocket> {
    let mut fields = line
        .split(u8::is_ascii_whitespace)
        .filter(|field| !field.is_empty());
    let slot = fields.next()?;
    if slot.last() != Some(&b':') {
        return None;
    }
    let local = parse_endpoint(proto, fields.next()?)?;
    let remote = parse_endpoint(proto, fields.next()?)?;
    let state = TcpState::from_kernel(u8::try_from(hex(fields.next()?)?).ok()?)?;
    let (tx_queue, rx_queue) = split_pair(fields.next()?)?;
    let (timer, _) = split_pair(fields.next()?)?;
    let _retransmits = fields.next()?;
    let uid = decimal(fields.next()?)?;
    let _timeout = fields.next()?;
    let inode = decimal(fields.next()?)?;
    Some(ProcSocket {
        proto,
        local,
        remote,
        state,
        tx_queue: u32::try_from(hex(tx_queue)?).ok()?,
        rx_queue: u32::try_from(hex(rx_queue)?).ok()?,
        uid: u32::try_from(uid).ok()?,
        inode,
        timewait: hex(timer)? == TIMER_TIMEWAIT,
        netns: None,
        kernel: None,
    })
}

/// The `tr` column of a TIME_WAIT mini socket.
const TIMER_TIMEWAIT: u64 = 3;

/// `0100007F:0016` (IPv4) or 32 hex digits and a port (IPv6). The kernel
/// prints each 32-bit word of the address in host byte order.
fn parse_endpoint(proto: Proto, field: &[u8]) -> Option<SocketAddr> {
    let (addr, port) = split_pair(field)?;
    let port = u16::try_from(hex(port)?).ok()?;
    let ip = match (proto.is_ipv6(), addr.len()) {
        (false, 8) => IpAddr::V4(Ipv4Addr::from(word(addr)?)),
        (true, 32) => {
            let mut octets = [0u8; 16];
            for (chunk, out) in addr.chunks_exact(8).zip(octets.chunks_exact_mut(4)) {
                out.copy_from_slice(&word(chunk)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Eight hex digits of one address word, back to the bytes in memory order.
fn word(digits: &[u8]) -> Option<[u8; 4]> {
    Some(u32::try_from(hex(digits)?).ok()?.to_ne_bytes())
}

fn split_pair(field: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = field.iter().position(|&b| b == b':')?;
    Some((&field[..colon], &field[colon + 1..]))
}

fn hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        let digit = char::from(b).to_digit(16)?;
        Some(acc << 4 | u64::from(digit))
    })
}

fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        let digit = char::from(b).to_digit(10)?;
        acc.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sockstat_tells_which_tables_are_empty() {
        let sockstat =
            "sockets: used 8\nTCP: inuse 1 orphan 0 tw 0 alloc 1 mem 248\nUDP: inuse 0 mem 0\n";
        let sockstat6 = "TCP6: inuse 0\nUDP6: inuse 2\n";
        let counts = SocketCounts::parse(sockstat, sockstat6);
        assert_eq!(counts.tcp_sockets(), 1);
        assert!(!counts.none_in(Proto::Tcp));
        assert!(counts.none_in(Proto::Tcp6));
        assert!(counts.none_in(Proto::Udp));
        assert!(!counts.none_in(Proto::Udp6));
        // TIME_WAIT sockets are counted for both families at once.
        let waiting = SocketCounts::parse(
            "TCP: inuse 1 orphan 0 tw 3 alloc 1 mem 1\n",
            "TCP6: inuse 0\n",
        );
        assert!(!waiting.none_in(Proto::Tcp6));
        assert_eq!(waiting.tcp_sockets(), 4);
        assert_eq!(SocketCounts::parse("", ""), SocketCounts::default());
    }

    #[test]
    fn an_empty_table_is_skipped_and_a_used_one_read() {
        let _listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let counts = SocketCounts::read("/proc").expect("sockstat is readable");
        assert!(counts.tcp_sockets() >= 1);
        assert!(!read_table(Proto::Tcp).unwrap().sockets.is_empty());
    }

    const TCP: &[u8] = b"  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0CEA 00000000:0000 0A 00000000:00000003 00:00000000 00000000   102        0 23456 1 0000000000000000 100 0 0 10 0
   1: 0100007F:A1B2 0100007F:0CEA 01 00000010:00000000 02:0000014B 00000000  1000        0 98765 3 0000000000000000 20 4 30 10 -1
";

    const TCP6: &[u8] = b"  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn parses_ipv4_lines() {
        let table = parse_table(Proto::Tcp, TCP);
        assert_eq!(table.malformed_lines, 0);
        assert_eq!(
            table.sockets[0],
            ProcSocket {
                proto: Proto::Tcp,
                local: "127.0.0.1:3306".parse().unwrap(),
                remote: "0.0.0.0:0".parse().unwrap(),
                state: TcpState::Listen,
                tx_queue: 0,
                rx_queue: 3,
                uid: 102,
                inode: 23456,
                timewait: false,
                netns: None,
                kernel: None,
            }
        );
        assert_eq!(table.sockets[1].remote, "127.0.0.1:3306".parse().unwrap());
        assert_eq!(table.sockets[1].state, TcpState::Established);
        assert_eq!(table.sockets[1].tx_queue, 16);
        assert_eq!(table.sockets[1].uid, 1000);
    }

    #[test]
    fn a_time_wait_mini_socket_is_told_by_its_timer() {
        let line = b"   2: 0100007F:A1B2 0100007F:0CEA 05 00000000:00000000 03:00000A2C 00000000     0        0 0 3 0000000000000000";
        let socket = parse_line(Proto::Tcp, line).unwrap();
        assert_eq!((socket.state, socket.timewait), (TcpState::FinWait2, true));
    }

    #[test]
    fn parses_ipv6_and_mapped_ipv4() {
        let table = parse_table(Proto::Tcp6, TCP6);
        assert_eq!(table.malformed_lines, 0);
        assert_eq!(table.sockets[0].local, "[::1]:8080".parse().unwrap());
        assert_eq!(
            table.sockets[1].remote,
            "[::ffff:127.0.0.1]:54321".parse().unwrap()
        );
        assert_eq!(table.sockets[1].inode, 4343);
    }

    #[test]
    fn skips_and_counts_malformed_and_truncated_lines() {
        let mut contents = TCP.to_vec();
        contents.extend_from_slice(b"   2: 0100007F:0CEA 0000\n");
        contents.extend_from_slice(b"   3: ZZZZZZZZ:0016 00000000:0000 0A 0:0 0:0 0 0 0 1\n");
        contents.extend_from_slice(b"   4: 0100007F:0016 00000000:0000 0D 0:0 0:0 0 0 0 1\n");
        contents.extend_from_slice(b"   5: 0100007F:0CEA 00000000:0000 0A 00000000:00000003 00:00000000 00000000   102        0 ");
        let table = parse_table(Proto::Tcp, &contents);
        assert_eq!(table.sockets.len(), 2);
        assert_eq!(table.malformed_lines, 4);
    }

    #[test]
    fn a_v4_address_in_a_v6_table_is_malformed() {
        let line = b"   0: 0100007F:0CEA 00000000:0000 0A 0:0 0:0 0 0 0 1";
        assert!(parse_line(Proto::Tcp, line).is_some());
        assert!(parse_line(Proto::Tcp6, line).is_none());
    }

    /// Formats a socket as the kernel's seq_show functions do.
    fn kernel_line(socket: &ProcSocket) -> String {
        fn addr(ip: IpAddr) -> String {
            let octets = match ip {
                IpAddr::V4(ip) => ip.octets().to_vec(),
                IpAddr::V6(ip) => ip.octets().to_vec(),
            };
            octets
                .chunks_exact(4)
                .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
                .collect()
        }
        format!(
            "{:4}: {}:{:04X} {}:{:04X} {:02X} {:08X}:{:08X} {:02X}:00000000 00000000 {:5} {:8} {} 1 0000000000000000 20 4 30 10 -1",
            7,
            addr(socket.local.ip()),
            socket.local.port(),
            addr(socket.remote.ip()),
            socket.remote.port(),
            socket.state as u8,
            socket.tx_queue,
            socket.rx_queue,
            if socket.timewait { TIMER_TIMEWAIT } else { 2 },
            socket.uid,
            0,
            socket.inode
        )
    }

    fn any_socket() -> impl Strategy<Value = ProcSocket> {
        (
            any::<bool>(),
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<(u16, u16, u32, u32, u32, u64)>(),
            1u8..=12,
            any::<bool>(),
        )
            .prop_map(
                |(v6, local, remote, (lport, rport, tx, rx, uid, inode), state, timewait)| {
                    let ip = |bytes: [u8; 16]| -> IpAddr {
                        if v6 {
                            IpAddr::V6(Ipv6Addr::from(bytes))
                        } else {
                            IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
                        }
                    };
                    ProcSocket {
                        proto: Proto::tcp_for(v6),
                        local: SocketAddr::new(ip(local), lport),
                        remote: SocketAddr::new(ip(remote), rport),
                        state: TcpState::from_kernel(state).expect("1..=12 are states"),
                        tx_queue: tx,
                        rx_queue: rx,
                        uid,
                        inode,
                        timewait,
                        netns: None,
                        kernel: None,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(proto in 0usize..4, line in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_line(Proto::ALL[proto], &line);
            let table = parse_table(Proto::ALL[proto], &line);
            prop_assert!(table.sockets.len() + table.malformed_lines <= line.len());
        }

        #[test]
        fn kernel_formatted_lines_round_trip(socket in any_socket()) {
            let line = kernel_line(&socket);
            prop_assert_eq!(parse_line(socket.proto, line.as_bytes()), Some(socket));
        }

        #[test]
        fn any_truncation_of_a_line_is_rejected_or_exact(socket in any_socket(), cut in 0usize..200) {
            let line = kernel_line(&socket);
            let cut = cut.min(line.len());
            // A prefix either lacks a field (None) or, cut past the inode, parses the same socket.
            if let Some(parsed) = parse_line(socket.proto, &line.as_bytes()[..cut]) {
                prop_assert_eq!(parsed.local, socket.local);
                prop_assert_eq!(parsed.remote, socket.remote);
            }
        }
    }
}
