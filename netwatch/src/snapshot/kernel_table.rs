//! The TCP table read in the kernel (netwatch's iterators, as root), in
//! /proc's terms: each socket as its /proc/net/tcp or tcp6 line has it,
//! plus its kernel address, which transitions carry.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use netwatch_common::{ByteCounts, SocketFd, TcpSocketRecord, AF_INET, AF_INET6};
use rustc_hash::FxHashMap;

use super::proc_net::{KernelSocket, ProcSocket};
use crate::model::{Proto, TcpCounters, TcpState};

/// What a kernel read returns beside the sockets: every socket fd, if asked
/// for, and the other namespaces it could not read (as given).
pub type KernelRead = (Option<Vec<SocketFd>>, Vec<(u32, String)>);

/// Reads in the kernel what /proc/net/tcp{,6} and /proc/[pid]/fd give.
pub trait KernelReader {
    /// Hands `each` every TCP socket of netwatch's network namespace (with
    /// `None`) and of each of `others` (namespace inode, the /proc
    /// directory of a task in it; with that inode) it can read; with
    /// `fds`, returns every socket fd of every process.
    fn read(
        &mut self,
        others: &[(u32, String)],
        fds: bool,
        each: &mut dyn FnMut(TcpSocketRecord, Option<u32>),
    ) -> anyhow::Result<KernelRead>;
}

/// What the kernel counts of every TCP socket in netwatch's own network
/// namespace (bytes, round trip, retransmissions), by kernel address.
pub fn tcp_counters(kernel: &mut dyn KernelReader) -> anyhow::Result<FxHashMap<u64, TcpCounters>> {
    let mut counters = FxHashMap::default();
    kernel.read(&[], false, &mut |record, _| {
        counters.insert(record.skaddr, counted(&record));
    })?;
    Ok(counters)
}

/// What the kernel counts of the socket: the peer's acknowledgements are
/// the bytes sent.
fn counted(record: &TcpSocketRecord) -> TcpCounters {
    TcpCounters {
        bytes: ByteCounts {
            sent: record.bytes_acked,
            received: record.bytes_received,
        },
        rtt_us: record.rtt_us,
        retransmits: record.retransmits,
    }
}

/// The socket as /proc prints it; `None` for a family /proc has no table
/// for. `netns` is its namespace when another than netwatch's (whose
/// sockets /proc/net shows without one).
pub fn to_proc_socket(record: &TcpSocketRecord, netns: Option<u32>) -> Option<ProcSocket> {
    let (proto, local, remote) = match record.family {
        AF_INET => (
            Proto::Tcp,
            IpAddr::V4(Ipv4Addr::from(ipv4(&record.saddr))),
            IpAddr::V4(Ipv4Addr::from(ipv4(&record.daddr))),
        ),
        AF_INET6 => (
            Proto::Tcp6,
            IpAddr::V6(Ipv6Addr::from(record.saddr)),
            IpAddr::V6(Ipv6Addr::from(record.daddr)),
        ),
        _ => return None,
    };
    Some(ProcSocket {
        proto,
        local: SocketAddr::new(local, record.sport),
        remote: SocketAddr::new(remote, record.dport),
        state: TcpState::from_kernel(record.state)?,
        tx_queue: record.tx_queue,
        rx_queue: record.rx_queue,
        uid: record.uid,
        inode: record.inode,
        timewait: record.timewait != 0,
        netns,
        kernel: Some(KernelSocket {
            skaddr: record.skaddr,
            read_ns: record.read_ns,
        }),
    })
}

fn ipv4(address: &[u8; 16]) -> [u8; 4] {
    [address[0], address[1], address[2], address[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(family: u16, state: u8) -> TcpSocketRecord {
        let mut saddr = [0; 16];
        saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        TcpSocketRecord {
            skaddr: 0xffff_8880_0000_1000,
            inode: 4242,
            read_ns: 99,
            bytes_acked: 0,
            bytes_received: 0,
            saddr,
            daddr: [0; 16],
            uid: 1000,
            tx_queue: 3,
            rx_queue: 4,
            sport: 8080,
            dport: 0,
            family,
            state,
            timewait: 0,
            rtt_us: 0,
            retransmits: 0,
            _pad: [0; 4],
        }
    }

    #[test]
    fn a_record_reads_as_its_proc_line() {
        let socket = to_proc_socket(&record(AF_INET, 10), None).expect("a TCP socket");
        assert_eq!(socket.proto, Proto::Tcp);
        assert_eq!(socket.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(socket.remote, "0.0.0.0:0".parse().unwrap());
        assert_eq!(socket.state, TcpState::Listen);
        assert_eq!(
            (socket.tx_queue, socket.rx_queue, socket.uid, socket.inode),
            (3, 4, 1000, 4242)
        );
        assert_eq!(socket.netns, None, "netwatch's own namespace");
        assert_eq!(
            socket.kernel,
            Some(KernelSocket {
                skaddr: 0xffff_8880_0000_1000,
                read_ns: 99
            })
        );
        let elsewhere = to_proc_socket(&record(AF_INET, 10), Some(7)).expect("a TCP socket");
        assert_eq!(elsewhere.netns, Some(7));
        let v6 = to_proc_socket(&record(AF_INET6, 1), None).expect("a TCP socket");
        assert_eq!(v6.proto, Proto::Tcp6);
        assert_eq!(v6.local, "[7f00:1::]:8080".parse().unwrap());
    }

    #[test]
    fn unknown_families_and_states_are_left_out() {
        assert_eq!(to_proc_socket(&record(1, 10), None), None);
        assert_eq!(to_proc_socket(&record(AF_INET, 0), None), None);
        assert_eq!(to_proc_socket(&record(AF_INET, 200), None), None);
    }

    #[test]
    fn a_records_counters_are_what_ss_ti_shows() {
        let mut record = record(AF_INET, 1);
        (record.rtt_us, record.retransmits) = (250, 3);
        (record.bytes_acked, record.bytes_received) = (1_000, 20);
        let expected = TcpCounters {
            bytes: ByteCounts {
                sent: 1_000,
                received: 20,
            },
            rtt_us: 250,
            retransmits: 3,
        };
        assert_eq!(counted(&record), expected);
    }
}
