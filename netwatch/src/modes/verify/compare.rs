//! The comparison of the live table with a snapshot: which sockets are
//! compared, how they are matched (by kernel address, or by tuple), and
//! how each that differs is described.

use std::collections::HashSet;
use std::net::SocketAddr;

use crate::engine::table::{LiveSocket, SocketTable};
use crate::model::{format_endpoint, TcpState, Tuple};
use crate::output::{Drift, DriftKind};
use crate::snapshot::{Snapshot, SnapshotEntry};
use rustc_hash::{FxHashMap, FxHashSet};

/// What one comparison found.
#[derive(Debug, Default)]
pub struct Comparison {
    pub compared: usize,
    pub excluded: usize,
    pub drift: Vec<Drift>,
    /// Table sockets taken as freed without a traced CLOSE (kernel
    /// addresses): missing from this snapshot and the one before, in a
    /// state where the kernel does that (`TcpState::may_vanish_untraced`).
    pub freed: Vec<u64>,
}

/// States compared: the table keeps neither TIME_WAIT nor request sockets.
fn compared_state(state: TcpState) -> bool {
    !matches!(
        state,
        TcpState::TimeWait | TcpState::SynRecv | TcpState::NewSynRecv | TcpState::Close
    )
}

/// Sockets that changed since a check began, by kernel address and by
/// tuple (as transitions name them).
#[derive(Debug, Default)]
pub struct Changed {
    pub sockets: FxHashSet<u64>,
    pub tuples: FxHashSet<Tuple>,
}

impl Changed {
    /// Whether a socket with this tuple changed: itself, or (known only
    /// without its local port then) a connect() in progress to the same destination.
    fn tuple(&self, tuple: &Tuple) -> bool {
        self.tuples.contains(tuple) || self.tuples.contains(&portless_form(tuple))
    }
}

/// Compares the table's sockets with the snapshot's, leaving out the
/// sockets in `changed`: by kernel address when the snapshot was read in
/// the kernel, else by tuple in netwatch's namespace `netns`.
pub fn compare(
    snapshot: &Snapshot,
    table: &SocketTable,
    netns: Option<u32>,
    changed: &Changed,
) -> Comparison {
    if snapshot
        .entries
        .iter()
        .any(|entry| entry.socket.kernel.is_some())
    {
        compare_by_address(snapshot, table, changed)
    } else {
        compare_by_tuple(snapshot, table, netns, changed)
    }
}

/// Every compared socket of the snapshot, each once.
fn compared_entries(snapshot: &Snapshot) -> impl Iterator<Item = &SnapshotEntry> {
    snapshot.entries.iter().filter(|entry| {
        let socket = &entry.socket;
        socket.proto.is_tcp() && !socket.timewait && compared_state(socket.state)
    })
}

/// Matches each socket by its kernel address, in every namespace.
fn compare_by_address(snapshot: &Snapshot, table: &SocketTable, changed: &Changed) -> Comparison {
    let mut comparison = Comparison::default();
    let mut live: FxHashMap<u64, &LiveSocket> = FxHashMap::default();
    // Sockets of a table built from /proc before (a resync without the
    // kernel) are not named by address until their first transition.
    let mut unnamed: FxHashMap<Tuple, (Option<u64>, &LiveSocket)> = FxHashMap::default();
    for (skaddr, socket) in table.sockets() {
        if !compared_state(socket.state) {
            continue;
        }
        match skaddr {
            Some(skaddr) if changed.sockets.contains(&skaddr) => comparison.excluded += 1,
            Some(skaddr) => {
                live.insert(skaddr, socket);
            }
            None => {
                unnamed.insert(socket.tuple, (None, socket));
            }
        }
    }
    let mut listed = FxHashSet::default();
    for entry in compared_entries(snapshot) {
        let Some(kernel) = entry.socket.kernel else {
            continue;
        };
        if !listed.insert(kernel.skaddr) {
            continue;
        }
        if changed.sockets.contains(&kernel.skaddr) {
            comparison.excluded += 1;
            continue;
        }
        let tuple = entry.socket.tuple();
        let found = live
            .remove(&kernel.skaddr)
            .or_else(|| unnamed.remove(&tuple).map(|(_, socket)| socket));
        comparison.add(entry, tuple, found);
    }
    let live = live
        .into_iter()
        .map(|(skaddr, socket)| (Some(skaddr), socket));
    comparison.missing_from_snapshot(live.chain(unnamed.into_values()));
    comparison
}

/// Matches each socket of netwatch's namespace by tuple (a snapshot read
/// from /proc, which lists netwatch's namespace and hashes addresses).
fn compare_by_tuple(
    snapshot: &Snapshot,
    table: &SocketTable,
    netns: Option<u32>,
    changed: &Changed,
) -> Comparison {
    let mut comparison = Comparison::default();
    let mut live: FxHashMap<Tuple, (Option<u64>, &LiveSocket)> = FxHashMap::default();
    // connect() reports SYN_SENT before the kernel picks the local port.
    let mut portless: Vec<(Option<u64>, &LiveSocket)> = Vec::new();
    for (skaddr, socket) in table.sockets() {
        let elsewhere = netns.is_some() && socket.netns.is_some() && socket.netns != netns;
        if elsewhere || !compared_state(socket.state) {
            continue;
        }
        // Excluded as the snapshot's side is: a connect in progress to the
        // same destination leaves out every socket to it on both sides.
        if changed.tuple(&socket.tuple) {
            comparison.excluded += 1;
        } else if socket.tuple.local.port() == 0 {
            portless.push((skaddr, socket));
        } else {
            live.insert(socket.tuple, (skaddr, socket));
        }
    }
    // /proc lists a socket twice when the hash changes under the reader.
    let mut listed = FxHashSet::default();
    for entry in compared_entries(snapshot).filter(|entry| entry.socket.netns.is_none()) {
        let tuple = entry.socket.tuple();
        if !listed.insert(tuple) {
            continue;
        }
        if changed.tuple(&tuple) {
            comparison.excluded += 1;
            continue;
        }
        let found = live.remove(&tuple).or_else(|| {
            let at = portless.iter().position(|(_, s)| {
                same_connect(&s.tuple, &tuple) && s.state == entry.socket.state
            })?;
            Some(portless.swap_remove(at))
        });
        comparison.add(entry, tuple, found.map(|(_, socket)| socket));
    }
    comparison.missing_from_snapshot(live.into_values().chain(portless));
    comparison
}

impl Comparison {
    /// Compares one snapshot socket with the table's socket `found`, if any.
    fn add(&mut self, entry: &SnapshotEntry, tuple: Tuple, found: Option<&LiveSocket>) {
        self.compared += 1;
        let socket = &entry.socket;
        let snapshot_pid = entry.owner.as_ref().map(|owner| owner.pid);
        let Some(found) = found else {
            self.drift.push(drift(
                DriftKind::MissingFromTable,
                tuple,
                None,
                Some((socket.state, snapshot_pid)),
            ));
            return;
        };
        let table_pid = found.process.as_ref().map(|process| process.pid);
        let kind = if found.state != socket.state {
            Some(DriftKind::StateMismatch)
        } else if snapshot_pid.is_some() && !table_pid.is_some_and(|pid| entry.pids.contains(&pid))
        {
            Some(DriftKind::PidMismatch)
        } else {
            None
        };
        if let Some(kind) = kind {
            self.drift.push(drift(
                kind,
                tuple,
                Some((found.state, table_pid)),
                Some((socket.state, snapshot_pid)),
            ));
        }
    }

    /// The table's sockets the snapshot did not list, with their kernel
    /// addresses where known.
    fn missing_from_snapshot<'a>(
        &mut self,
        sockets: impl Iterator<Item = (Option<u64>, &'a LiveSocket)>,
    ) {
        for (skaddr, socket) in sockets {
            let pid = socket.process.as_ref().map(|process| process.pid);
            let mut missing = drift(
                DriftKind::MissingFromSnapshot,
                socket.tuple,
                Some((socket.state, pid)),
                None,
            );
            missing.vanishable = skaddr.filter(|_| socket.state.may_vanish_untraced());
            self.drift.push(missing);
        }
    }

    /// Moves from the drift to `freed` the sockets the kernel may have
    /// freed without a traced CLOSE that were missing from the previous
    /// snapshot too (`previous`: that check's drift).
    pub(super) fn take_freed(&mut self, previous: &HashSet<(DriftKind, Tuple)>) {
        let (freed, drift): (Vec<Drift>, Vec<Drift>) =
            std::mem::take(&mut self.drift).into_iter().partition(|d| {
                d.vanishable.is_some()
                    && previous.contains(&(DriftKind::MissingFromSnapshot, d.tuple))
            });
        self.drift = drift;
        self.freed = freed.iter().filter_map(|d| d.vanishable).collect();
    }
}

/// A connection as its CLOSE -> SYN_SENT transition names it: without a
/// local port (sockets changed then are known only by this form).
pub(super) fn portless_form(tuple: &Tuple) -> Tuple {
    Tuple {
        local: SocketAddr::new(tuple.local.ip(), 0),
        ..*tuple
    }
}

/// Whether a SYN_SENT socket without a local port yet is this connection.
fn same_connect(portless: &Tuple, tuple: &Tuple) -> bool {
    portless.proto == tuple.proto
        && portless.remote == tuple.remote
        && (portless.local.ip() == tuple.local.ip() || portless.local.ip().is_unspecified())
}

fn drift(
    kind: DriftKind,
    tuple: Tuple,
    table: Option<(TcpState, Option<u32>)>,
    snapshot: Option<(TcpState, Option<u32>)>,
) -> Drift {
    Drift {
        kind,
        proto: tuple.proto.name(),
        local: format_endpoint(tuple.local),
        remote: format_endpoint(tuple.remote),
        table_state: table.map(|(state, _)| state.name()),
        snapshot_state: snapshot.map(|(state, _)| state.name()),
        table_pid: table.and_then(|(_, pid)| pid),
        snapshot_pid: snapshot.and_then(|(_, pid)| pid),
        persisting: false,
        tuple,
        vanishable: None,
    }
}
