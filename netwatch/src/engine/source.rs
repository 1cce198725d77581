//! What the monitor reads from: the records and loss counters of the
//! kernel's programs, and the sockets open when it starts or resyncs.
//! Behind a trait, so that unit tests drive the monitor through crafted
//! sequences (a skipped call and its recovery, a duplicate, losses during a
//! resync) that a real kernel gives only by chance.

use std::io;

use anyhow::Context as _;
use netwatch_common::ByteCounts;

use crate::kernel::{self, StateProbe};
use crate::model::{LossCounters, Proto, Record};
use crate::snapshot::{self, Owners, Snapshot};

/// How netwatch finds sockets' owners in a snapshot: the kernel's fd
/// iterator where it pays and works, else the /proc walk.
pub const FIND_OWNERS: Owners = Owners::Find(Some(kernel::socket_fds_if_possible));

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
    /// The TCP sockets open now in every network namespace, with their
    /// owners: the baseline, and the table after losses.
    fn baseline(&mut self) -> anyhow::Result<Snapshot>;
}

/// The attached eBPF programs, with /proc for the baseline.
pub(crate) struct KernelSource(pub StateProbe);

impl EventSource for KernelSource {
    async fn drain(&mut self, mut handle: impl FnMut(Record)) -> io::Result<()> {
        self.0
            .drain(|event| kernel::to_record(&event).into_iter().for_each(&mut handle))
            .await
    }

    fn drain_now(&mut self, mut handle: impl FnMut(Record)) {
        self.0
            .drain_now(|event| kernel::to_record(&event).into_iter().for_each(&mut handle));
    }

    fn losses(&self) -> io::Result<LossCounters> {
        self.0.losses()
    }

    fn stop_sending(&mut self) -> io::Result<()> {
        self.0.stop_sending()
    }

    fn bytes(&self, skaddr: u64) -> Option<ByteCounts> {
        self.0.bytes(skaddr)
    }

    fn baseline(&mut self) -> anyhow::Result<Snapshot> {
        snapshot::take_every_namespace(&[Proto::Tcp, Proto::Tcp6], FIND_OWNERS)
            .context("reading the /proc TCP tables failed")
    }
}
