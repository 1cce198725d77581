//! What a mode plugs into the monitor: an [`Observer`] of what it sees.

use netwatch_common::ByteCounts;
use rustc_hash::FxHashMap;

use super::Summary;
use crate::engine::clock::WallClock;
use crate::engine::table::{Observed, SocketTable};
use crate::metrics::Failure;
use crate::model::{LossCause, OwnerChange, TcpCounters, Transition};
use crate::sink::Records;
use crate::snapshot::Snapshot;

/// What a mode does with what the monitor sees. Records go to `out`, a
/// buffer written to the mode's output after each batch.
pub trait Observer {
    /// The baseline is in the table (once, before any transition).
    fn baseline(&mut self, _snapshot: &Snapshot, _table: &SocketTable, _out: &mut Records) {}
    /// A transition was applied to the table.
    fn transition(&mut self, t: &Transition, seen: &Observed, clock: &WallClock, out: &mut Records);
    /// A socket's owner became another process, at monotonic time `ts_ns`.
    fn owner_changed(
        &mut self,
        _ts_ns: u64,
        _change: &OwnerChange,
        _clock: &WallClock,
        _out: &mut Records,
    ) {
    }
    /// Something happened to the monitor itself: losses, a routine
    /// failure, a resync.
    fn notice(&mut self, _notice: &Notice, _out: &mut Records) {}
    /// A periodic check begins: a snapshot is taken from monotonic time `at_ns`.
    fn check_starts(&mut self, _at_ns: u64) {}
    /// The periodic check: `snapshot` was just taken (while transitions
    /// were applied), and every transition stamped before it ended has been
    /// applied to `table`. Returns the kernel addresses of the sockets it
    /// takes as freed without a traced CLOSE, which the table then forgets.
    fn check(
        &mut self,
        _snapshot: &Snapshot,
        _table: &SocketTable,
        _out: &mut Records,
    ) -> Vec<u64> {
        Vec::new()
    }
    /// Every `Config::refresh_every`: what the kernel counts of each
    /// socket now.
    fn refresh(&mut self, _refresh: &Refresh<'_>) {}
    /// The monitor stops (`end` says with what).
    fn stopped(&mut self, _end: &End<'_>, _out: &mut Records) {}
}

/// What a refresh hands the observer, by a socket's kernel address.
pub struct Refresh<'a> {
    /// A socket's bytes as netwatch's programs count them (where they do):
    /// a lookup in the kernel per call.
    pub bytes: &'a dyn Fn(u64) -> Option<ByteCounts>,
    /// What the kernel itself counts of each socket in netwatch's network
    /// namespace, read by the tcp iterator in one pass (empty without it).
    pub counters: &'a FxHashMap<u64, TcpCounters>,
}

/// What the monitor hands its observer when it stops.
pub struct End<'a> {
    /// What is still open.
    pub table: &'a SocketTable,
    /// A socket's byte counts so far, by its kernel address.
    pub bytes: &'a dyn Fn(u64) -> Option<ByteCounts>,
    pub clock: &'a WallClock,
    /// What the run saw.
    pub summary: &'a Summary,
}

/// What happened to the monitor itself, for the mode to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// Transitions (or owner changes) were lost.
    Lost { count: u64, cause: LossCause },
    /// A routine failure that the monitor goes on after (reported on
    /// stderr already): `message` says what failed and what happens next.
    Failed { what: Failure, message: String },
    /// The table was rebuilt from a snapshot after losses; it holds `sockets` now.
    Resynced { sockets: usize },
}
