//! What the monitor reads from: the records and loss counters of the
//! kernel's programs, and the sockets open when it starts or resyncs.
//! Behind a trait, so that unit tests drive the monitor through crafted
//! sequences (a skipped call and its recovery, a duplicate, losses during a
//! resync) that a real kernel gives only by chance.

use std::io;

use anyhow::Context as _;
use netwatch_common::{ByteCounts, TcpSocketRecord};

use crate::kernel::{self, Detail, SocketIterators, StateProbe};
use crate::model::{LossCounters, Proto, Record};
use crate::snapshot::{self, KernelRead, KernelReader, Owners, Snapshot};

impl KernelReader for SocketIterators {
    fn read(
        &mut self,
        others: &[(u32, String)],
        fds: bool,
        each: &mut dyn FnMut(TcpSocketRecord, Option<u32>),
    ) -> anyhow::Result<KernelRead> {
        Ok(SocketIterators::read(self, others, fds, each)?)
    }
}

/// The iterators that read sockets in the kernel, when they load (as
/// root); `None` leaves snapshots to /proc, which gives the same records.
pub fn kernel_reader(detail: Detail) -> Option<SocketIterators> {
    SocketIterators::load(detail)
        .inspect_err(|err| {
            log::debug!("the socket iterators do not load, /proc is read instead: {err:#}")
        })
        .ok()
}

/// Where the monitor's records come from.
pub(crate) trait EventSource {
    /// Waits until records are waiting, then hands each to `handle`.
    async fn drain(&mut self, handle: impl FnMut(Record)) -> io::Result<()>;
    /// Hands every record already waiting to `handle`, without waiting.
    fn drain_now(&mut self, handle: impl FnMut(Record));
    /// The loss counters so far.
    fn losses(&self) -> io::Result<LossCounters>;
    /// Nothing is sent or counted from here on, so that a last drain and
    /// a last count of losses describe the same transitions.
    fn stop_sending(&mut self) -> io::Result<()>;
    /// The bytes counted so far for an open socket, by its kernel address.
    fn bytes(&self, skaddr: u64) -> Option<ByteCounts>;
    /// The most bytes the ring buffer held when drained, if known.
    fn ring_buffer_peak(&self) -> Option<u64>;
    /// The TCP sockets open now in every network namespace, with their
    /// owners: the baseline, and the table after losses.
    fn baseline(&mut self) -> anyhow::Result<Snapshot>;
}

/// The attached eBPF programs, with the iterators (or /proc) for the baseline.
pub(crate) struct KernelSource {
    pub probe: StateProbe,
    pub iterators: Option<SocketIterators>,
}

impl EventSource for KernelSource {
    async fn drain(&mut self, mut handle: impl FnMut(Record)) -> io::Result<()> {
        self.probe
            .drain(|item| kernel::to_record(item).into_iter().for_each(&mut handle))
            .await
    }

    fn drain_now(&mut self, mut handle: impl FnMut(Record)) {
        self.probe
            .drain_now(|item| kernel::to_record(item).into_iter().for_each(&mut handle));
    }

    fn losses(&self) -> io::Result<LossCounters> {
        self.probe.losses()
    }

    fn stop_sending(&mut self) -> io::Result<()> {
        self.probe.stop_sending()
    }

    fn bytes(&self, skaddr: u64) -> Option<ByteCounts> {
        self.probe.bytes(skaddr)
    }

    fn ring_buffer_peak(&self) -> Option<u64> {
        self.probe.ring_buffer_peak()
    }

    fn baseline(&mut self) -> anyhow::Result<Snapshot> {
        let kernel = self
            .iterators
            .as_mut()
            .map(|iterators| iterators as &mut dyn KernelReader);
        snapshot::take_every_namespace(&[Proto::Tcp, Proto::Tcp6], Owners::Find, kernel)
            .context("reading the TCP tables failed")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::os::fd::AsFd as _;
    use std::process::{Child, Command};

    use super::*;
    use crate::snapshot::{ProcSocket, SnapshotEntry};

    /// Sockets in every state a quiet host shows, on the loopback of
    /// whichever namespace the calling thread is in: a listener with a
    /// connection waiting to be accepted, an accepted pair, a pair whose
    /// client closed first (TIME_WAIT), and one whose client alone closed
    /// (its orphan in FIN_WAIT2, the server in CLOSE_WAIT). Returns what
    /// must stay open, and the listener's port.
    fn sockets_in_every_state(loopback: &str) -> (Vec<Box<dyn Send>>, u16) {
        let listener = TcpListener::bind(format!("{loopback}:0")).unwrap();
        let target = listener.local_addr().unwrap();
        let mut held: Vec<Box<dyn Send>> = Vec::new();
        let client = TcpStream::connect(target).unwrap();
        let (server, _) = listener.accept().unwrap();
        held.extend([Box::new(client) as Box<dyn Send>, Box::new(server)]);
        let timewait = TcpStream::connect(target).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        drop(timewait);
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(accepted);
        let half_closed = TcpStream::connect(target).unwrap();
        let (close_wait, _) = listener.accept().unwrap();
        drop(half_closed);
        held.push(Box::new(close_wait));
        held.push(Box::new(TcpStream::connect(target).unwrap()));
        let port = target.port();
        held.push(Box::new(listener));
        (held, port)
    }

    /// A process in a new network namespace whose loopback is up.
    fn namespace_holder() -> Child {
        let child = Command::new("unshare")
            .args(["--net", "sh", "-c", "ip link set lo up && exec sleep 60"])
            .spawn()
            .expect("unshare runs (tests run as root)");
        std::thread::sleep(std::time::Duration::from_millis(200));
        child
    }

    /// The snapshot's entries in `netns` (None: netwatch's) on `port`, or
    /// all of them in another namespace, without the kernel's address.
    fn entries_of(
        snapshot: &Snapshot,
        port: u16,
        netns: Option<u32>,
    ) -> BTreeMap<String, (ProcSocket, Option<u32>, Vec<u32>)> {
        snapshot
            .entries
            .iter()
            .filter(|entry| entry.socket.netns == netns)
            .filter(|entry| {
                netns.is_some()
                    || entry.socket.local.port() == port
                    || entry.socket.remote.port() == port
            })
            .map(
                |SnapshotEntry {
                     socket,
                     owner,
                     pids,
                 }| {
                    let key = format!("{:?} {} {}", socket.proto, socket.local, socket.remote);
                    let socket = ProcSocket {
                        kernel: None,
                        ..socket.clone()
                    };
                    (
                        key,
                        (socket, owner.as_ref().map(|owner| owner.pid), pids.clone()),
                    )
                },
            )
            .collect()
    }

    #[test]
    fn the_kernel_reads_the_records_proc_gives() {
        if !crate::root_tests::runs_as_root("the_kernel_reads_the_records_proc_gives") {
            return;
        }
        let (_v4, v4_port) = sockets_in_every_state("127.0.0.1");
        let (_v6, v6_port) = sockets_in_every_state("[::1]");
        let mut holder = namespace_holder();
        let namespace = std::fs::File::open(format!("/proc/{}/ns/net", holder.id())).unwrap();
        let elsewhere = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    rustix::thread::move_into_link_name_space(
                        namespace.as_fd(),
                        Some(rustix::thread::LinkNameSpaceType::Network),
                    )
                    .unwrap();
                    sockets_in_every_state("127.0.0.1")
                })
                .join()
                .unwrap()
        });
        let netns = crate::snapshot::netns_of(&holder.id().to_string());
        let mut iterators = kernel_reader(Detail::Full).expect("the iterators load as root");
        let protos = [Proto::Tcp, Proto::Tcp6];
        let kernel = snapshot::take_every_namespace(&protos, Owners::Find, Some(&mut iterators))
            .expect("the kernel reads");
        let proc =
            snapshot::take_every_namespace(&protos, Owners::Find, None).expect("/proc reads");
        // Without CAP_SYS_ADMIN (as once attached), the other namespace
        // cannot be entered: its sockets come from /proc, the rest from the kernel.
        let limited = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    kernel::keep_only_what_is_still_used().expect("this thread drops capabilities");
                    snapshot::take_every_namespace(&protos, Owners::Find, Some(&mut iterators))
                })
                .join()
                .expect("the limited read ran")
        })
        .expect("the kernel reads, and /proc the namespace it cannot enter");
        let _ = holder.kill();
        let _ = holder.wait();
        let elsewhere_port = elsewhere.1;
        assert_eq!(
            entries_of(&limited, elsewhere_port, netns),
            entries_of(&proc, elsewhere_port, netns)
        );
        assert!(limited
            .entries
            .iter()
            .all(|entry| entry.socket.kernel.is_some() == entry.socket.netns.is_none()));
        assert!(kernel
            .entries
            .iter()
            .all(|entry| entry.socket.kernel.is_some()));
        assert!(proc
            .entries
            .iter()
            .all(|entry| entry.socket.kernel.is_none()));
        for (port, netns) in [(v4_port, None), (v6_port, None), (elsewhere.1, netns)] {
            let from_kernel = entries_of(&kernel, port, netns);
            let states: Vec<_> = from_kernel
                .values()
                .map(|(socket, ..)| socket.state)
                .collect();
            assert_eq!(
                from_kernel.len(),
                8,
                "every socket on port {port}: {states:?}"
            );
            assert_eq!(from_kernel, entries_of(&proc, port, netns), "port {port}");
        }
        let pending = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), v4_port);
        let listener = &entries_of(&kernel, v4_port, None)[&format!("Tcp {pending} 0.0.0.0:0")].0;
        assert_eq!(listener.rx_queue, 1, "one connection waits to be accepted");
    }
}
