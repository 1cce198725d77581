//! `netwatch verify`: the live table, kept by transitions alone, against a
//! fresh snapshot every interval.
//!
//! As root the snapshot is read in the kernel, in every network namespace,
//! and each of its sockets is matched with the table's by kernel address:
//! exactly. What is still left out, and why:
//! - any socket with a transition or an owner change stamped at or after
//!   the moment the snapshot began: the two views are of different moments
//!   (every transition up to the snapshot's end is applied before comparing);
//! - TIME_WAIT mini sockets and pending request sockets (SYN_RECV): the
//!   table keeps neither (no state change announces a request socket, and
//!   none ends a TIME_WAIT one); the kernel read leaves them out.
//!
//! Where the snapshot comes from /proc (the iterators cannot load), sockets
//! are matched by tuple in netwatch's namespace only (/proc/net shows it),
//! and a connect() in progress, known only without its local port, leaves
//! out every socket to the same destination on both sides.
//!
//! A table socket in a state where the kernel frees some without a traced
//! CLOSE (`TcpState::may_vanish_untraced`) that two snapshots in a row do
//! not list is taken as freed: the table forgets it, and it is no drift.
//!
//! A pid differs only when the table's owner holds no fd of the socket:
//! several processes may hold one (after fork, a listener shared by
//! workers), and the snapshot names the lowest.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustc_hash::{FxHashMap, FxHashSet};
use serde::Serialize;

use crate::cli::VerifyArgs;
use crate::engine::clock::WallClock;
use crate::engine::monitor::{self, Config, End, Notice, Observer, Summary};
use crate::engine::table::{LiveSocket, Observed, SocketTable};
use crate::metrics::Metrics;
use crate::model::{format_endpoint, OwnerChange, TcpState, Transition, Tuple};
use crate::output::{self, StreamRecord, Timestamp};
use crate::sink::Sink;
use crate::snapshot::{Snapshot, SnapshotEntry};

/// Sockets listed at most in one report (the counts cover them all).
const LISTED_AT_MOST: usize = 50;

/// verify compared nothing: no check could run, or none did (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NothingCompared(String);

/// Compares until SIGINT, SIGTERM or `--duration`; `Ok(true)` when no drift
/// persisted across two consecutive checks. A run that could make no
/// check, or made none, is a [`NothingCompared`] error: it verified nothing.
pub fn run(args: VerifyArgs) -> anyhow::Result<bool> {
    if let Some(duration) = args.duration.filter(|&duration| duration < args.interval) {
        return Err(NothingCompared(format!(
            "verify would stop after {duration} s, before its first check at {} s: give a --duration of at least --interval",
            args.interval
        ))
        .into());
    }
    let duration = args.duration.map(Duration::from_secs);
    let config = Config {
        check_every: Some(Duration::from_secs(args.interval)),
        ..Config::new(&args.probe, false, duration)
    };
    let verify = Verify::new(args.json, config.netns, config.metrics.clone());
    let verify = monitor::run(config, verify, Sink::stdout())?;
    if verify.checks == 0 {
        return Err(NothingCompared(
            "verify stopped before its first check: nothing was compared".to_owned(),
        )
        .into());
    }
    Ok(verify.persisted_checks == 0)
}

/// How a socket differs between the table and the snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    MissingFromTable,
    MissingFromSnapshot,
    PidMismatch,
    StateMismatch,
}

impl DriftKind {
    fn describe(self) -> &'static str {
        match self {
            DriftKind::MissingFromTable => "missing from the table",
            DriftKind::MissingFromSnapshot => "missing from the snapshot",
            DriftKind::PidMismatch => "pid differs",
            DriftKind::StateMismatch => "state differs",
        }
    }
}

/// One socket that differs.
#[derive(Debug, Serialize)]
pub struct Drift {
    pub kind: DriftKind,
    pub proto: &'static str,
    pub local: String,
    pub remote: String,
    pub table_state: Option<&'static str>,
    pub snapshot_state: Option<&'static str>,
    pub table_pid: Option<u32>,
    pub snapshot_pid: Option<u32>,
    /// It differed the same way at the previous check.
    pub persisting: bool,
    #[serde(skip)]
    tuple: Tuple,
    /// Its kernel address, when it is a table socket missing from the
    /// snapshot in a state the kernel may free without a traced CLOSE.
    #[serde(skip)]
    vanishable: Option<u64>,
}

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

/// The verify observer: collects what changed during a snapshot, compares,
/// reports, and remembers the previous check's drift.
struct Verify {
    json: bool,
    netns: Option<u32>,
    /// Sockets that changed since the current check began.
    changed: Changed,
    check_began_ns: Option<u64>,
    previous: HashSet<(DriftKind, Tuple)>,
    checks: u64,
    drift_checks: u64,
    persisted_checks: u64,
    metrics: Arc<Metrics>,
}

impl Verify {
    /// Leaves a socket that changed at `ts_ns` out of the current check if
    /// the check's snapshot had begun by then.
    fn note_change(&mut self, ts_ns: u64, skaddr: u64, tuple: Tuple) {
        if self.check_began_ns.is_some_and(|began| ts_ns >= began) {
            self.changed.sockets.insert(skaddr);
            self.changed.tuples.insert(tuple);
        }
    }

    fn new(json: bool, netns: Option<u32>, metrics: Arc<Metrics>) -> Verify {
        Verify {
            json,
            netns,
            changed: Changed::default(),
            check_began_ns: None,
            previous: HashSet::new(),
            checks: 0,
            drift_checks: 0,
            persisted_checks: 0,
            metrics,
        }
    }

    fn report(&self, comparison: &Comparison, out: &mut Vec<u8>) {
        let ts = Timestamp(SystemTime::now());
        let count = |kind| comparison.drift.iter().filter(|d| d.kind == kind).count();
        let persisting = comparison.drift.iter().filter(|d| d.persisting).count();
        if self.json {
            let record = DriftRecord {
                kind: "drift",
                ts,
                compared: comparison.compared,
                excluded: comparison.excluded,
                missing_from_table: count(DriftKind::MissingFromTable),
                missing_from_snapshot: count(DriftKind::MissingFromSnapshot),
                pid_mismatch: count(DriftKind::PidMismatch),
                state_mismatch: count(DriftKind::StateMismatch),
                persisting,
                freed_untraced: comparison.freed.len(),
                sockets: &comparison.drift[..comparison.drift.len().min(LISTED_AT_MOST)],
            };
            let _ = output::write_json_line(out, &record);
            return;
        }
        let mut text = format!(
            "{ts} verify: {} sockets compared, {} changed during the snapshot (excluded), {} taken as freed without a traced CLOSE: ",
            comparison.compared,
            comparison.excluded,
            comparison.freed.len()
        );
        if comparison.drift.is_empty() {
            text.push_str("no drift\n");
        } else {
            let _ = writeln!(
                text,
                "{} missing from the table, {} missing from the snapshot, {} pid and {} state mismatches, {persisting} persisting",
                count(DriftKind::MissingFromTable),
                count(DriftKind::MissingFromSnapshot),
                count(DriftKind::PidMismatch),
                count(DriftKind::StateMismatch),
            );
        }
        for drift in comparison.drift.iter().take(LISTED_AT_MOST) {
            let _ = writeln!(
                text,
                "  {}: {} {} -> {} table {} pid {} / snapshot {} pid {}{}",
                drift.kind.describe(),
                drift.proto,
                drift.local,
                drift.remote,
                drift.table_state.unwrap_or("-"),
                drift.table_pid.map_or("-".into(), |pid| pid.to_string()),
                drift.snapshot_state.unwrap_or("-"),
                drift.snapshot_pid.map_or("-".into(), |pid| pid.to_string()),
                if drift.persisting {
                    " (persisting)"
                } else {
                    ""
                }
            );
        }
        out.extend_from_slice(text.as_bytes());
    }
}

/// The JSON record verify ends with: watch's summary (what the run saw,
/// its losses) and the checks.
#[derive(Serialize)]
struct SummaryRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    ts: String,
    #[serde(flatten)]
    counts: &'a Summary,
    checks: u64,
    drift_checks: u64,
    persisting_checks: u64,
}

/// The JSON report of one check.
#[derive(Serialize)]
struct DriftRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    ts: Timestamp,
    compared: usize,
    excluded: usize,
    missing_from_table: usize,
    missing_from_snapshot: usize,
    pid_mismatch: usize,
    state_mismatch: usize,
    persisting: usize,
    /// Table sockets taken as freed without a traced CLOSE at this check.
    freed_untraced: usize,
    sockets: &'a [Drift],
}

impl Observer for Verify {
    fn transition(
        &mut self,
        t: &Transition,
        _seen: Observed,
        _clock: &WallClock,
        _out: &mut Vec<u8>,
    ) {
        self.note_change(t.ts_ns, t.skaddr, t.tuple);
    }

    fn owner_changed(
        &mut self,
        ts_ns: u64,
        change: &OwnerChange,
        _clock: &WallClock,
        _out: &mut Vec<u8>,
    ) {
        self.note_change(ts_ns, change.skaddr, change.tuple);
    }

    fn notice(&mut self, notice: Notice<'_>, out: &mut Vec<u8>) {
        if let (true, Notice::Failed { what, message }) = (self.json, notice) {
            let record = StreamRecord::Failure {
                ts: output::rfc3339(SystemTime::now()),
                what: what.name(),
                message,
            };
            let _ = output::write_json_line(out, &record);
        }
    }

    fn check_starts(&mut self, at_ns: u64) {
        self.check_began_ns = Some(at_ns);
        self.changed = Changed::default();
    }

    fn check(&mut self, snapshot: &Snapshot, table: &SocketTable, out: &mut Vec<u8>) -> Vec<u64> {
        let mut comparison = compare(snapshot, table, self.netns, &self.changed);
        comparison.take_freed(&self.previous);
        for drift in &mut comparison.drift {
            drift.persisting = self.previous.contains(&(drift.kind, drift.tuple));
        }
        self.previous = comparison.drift.iter().map(|d| (d.kind, d.tuple)).collect();
        self.checks += 1;
        self.drift_checks += u64::from(!comparison.drift.is_empty());
        self.persisted_checks += u64::from(comparison.drift.iter().any(|d| d.persisting));
        self.metrics.drift.set(comparison.drift.len() as u64);
        self.report(&comparison, out);
        self.check_began_ns = None;
        self.changed = Changed::default();
        comparison.freed
    }

    fn stopped(&mut self, end: &End<'_>, out: &mut Vec<u8>) {
        let verdict = if self.checks == 0 {
            "nothing compared"
        } else if self.persisted_checks == 0 {
            "no drift persisted"
        } else {
            "drift persisted across two checks"
        };
        log::info!(
            "verify: {} checks, drift in {}, persisting in {}: {verdict}",
            self.checks,
            self.drift_checks,
            self.persisted_checks
        );
        if self.json {
            let record = SummaryRecord {
                kind: "summary",
                ts: output::rfc3339(SystemTime::now()),
                counts: end.summary,
                checks: self.checks,
                drift_checks: self.drift_checks,
                persisting_checks: self.persisted_checks,
            };
            let _ = output::write_json_line(out, &record);
        }
    }
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
    fn take_freed(&mut self, previous: &HashSet<(DriftKind, Tuple)>) {
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
fn portless_form(tuple: &Tuple) -> Tuple {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Owner, Proto};
    use crate::snapshot::SnapshotEntry;
    use netwatch_common::ByteCounts;
    use TcpState::*;

    const NETNS: u32 = 7;

    fn tuple(local: &str, remote: &str) -> Tuple {
        Tuple {
            proto: Proto::Tcp,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
        }
    }

    fn name(pid: u32) -> Option<String> {
        Some(format!("p{pid}"))
    }

    /// A table holding each (skaddr, tuple, connecting pid) as ESTABLISHED,
    /// in namespace `netns`.
    fn table(sockets: &[(u64, Tuple, u32, u32)]) -> SocketTable {
        let mut table = SocketTable::new(name, 100);
        for &(skaddr, tuple, pid, netns) in sockets {
            let mut t = Transition {
                ts_ns: 1,
                skaddr,
                tuple: Tuple {
                    local: SocketAddr::new(tuple.local.ip(), 0),
                    ..tuple
                },
                old: Close,
                new: SynSent,
                task: crate::model::Task {
                    pid,
                    comm: [0; 16],
                    start_ns: None,
                    cgroup_id: None,
                },
                uid: Some(0),
                netns: Some(netns),
                bytes: ByteCounts::default(),
                recovered: false,
                error: None,
            };
            table.apply(&t);
            (t.tuple, t.old, t.new, t.ts_ns) = (tuple, SynSent, Established, 2);
            table.apply(&t);
        }
        table
    }

    fn snapshot(sockets: &[(Tuple, TcpState, Option<u32>, bool)]) -> Snapshot {
        let entries = sockets
            .iter()
            .map(|&(tuple, state, pid, timewait)| {
                let owner = pid.map(|pid| Owner::new(pid, format!("p{pid}").into()));
                let mut entry = SnapshotEntry::of(&tuple, state, owner);
                entry.socket.timewait = timewait;
                entry
            })
            .collect();
        Snapshot {
            entries,
            ..Snapshot::default()
        }
    }

    fn kinds(comparison: &Comparison) -> Vec<DriftKind> {
        comparison.drift.iter().map(|d| d.kind).collect()
    }

    /// A snapshot read in the kernel: (skaddr, tuple, namespace, pid).
    fn kernel_snapshot(sockets: &[(u64, Tuple, Option<u32>, u32)]) -> Snapshot {
        let mut snapshot = snapshot(
            &sockets
                .iter()
                .map(|&(_, tuple, _, pid)| (tuple, Established, Some(pid), false))
                .collect::<Vec<_>>(),
        );
        snapshot.entries = snapshot
            .entries
            .into_iter()
            .zip(sockets)
            .map(|(mut entry, &(skaddr, _, netns, _))| {
                entry.socket.netns = netns;
                entry.read_in_kernel(skaddr, 5)
            })
            .collect();
        snapshot
    }

    /// Moves the table's socket `skaddr` through `steps`.
    fn advance(table: &mut SocketTable, skaddr: u64, tuple: Tuple, steps: &[(TcpState, TcpState)]) {
        for (ts_ns, &step) in (10..).zip(steps) {
            let task = crate::model::Task {
                pid: 10,
                comm: [0; 16],
                start_ns: None,
                cgroup_id: None,
            };
            table.apply(&Transition::scripted(ts_ns, skaddr, tuple, step, task));
        }
    }

    #[test]
    fn a_fin_wait1_socket_missing_twice_is_freed_and_other_states_stay_drift() {
        let (a, b, c) = (
            tuple("127.0.0.1:5000", "127.0.0.1:80"),
            tuple("127.0.0.1:5001", "127.0.0.1:80"),
            tuple("127.0.0.1:5002", "127.0.0.1:80"),
        );
        let mut table = table(&[(1, a, 10, NETNS), (2, b, 10, NETNS), (3, c, 10, NETNS)]);
        // The kernel frees socket 1 in FIN_WAIT1 without a trace; socket
        // 2's change to CLOSE from LAST_ACK is lost (real drift).
        advance(&mut table, 1, a, &[(Established, FinWait1)]);
        advance(
            &mut table,
            2,
            b,
            &[(Established, CloseWait), (CloseWait, LastAck)],
        );
        let kernel = kernel_snapshot(&[(3, c, None, 10)]);
        let mut verify = Verify::new(true, Some(NETNS), Arc::new(Metrics::new(4096)));
        let mut out = Vec::new();

        let first = verify.check(&kernel, &table, &mut out);
        assert_eq!(first, Vec::<u64>::new(), "one read is not enough");
        assert_eq!((verify.drift_checks, verify.persisted_checks), (1, 0));

        let second = verify.check(&kernel, &table, &mut out);
        assert_eq!(second, vec![1], "missing from two reads in FIN_WAIT1");
        assert_eq!((verify.drift_checks, verify.persisted_checks), (2, 1));
        let reports: Vec<serde_json::Value> = out
            .split(|&b| b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).expect("a JSON line"))
            .collect();
        assert_eq!(reports[1]["freed_untraced"], 1, "{}", reports[1]);
        assert_eq!(reports[1]["missing_from_snapshot"], 1, "{}", reports[1]);
        assert_eq!(reports[1]["sockets"][0]["table_state"], "LAST_ACK");
        assert_eq!(reports[1]["sockets"][0]["persisting"], true);

        assert_eq!(table.forget_freed(1).map(|s| s.state), Some(FinWait1));
        assert_eq!((table.len(), table.vanished()), (2, 1));
        assert_eq!(table.forget_freed(1), None);
    }

    #[test]
    fn a_kernel_snapshot_is_matched_by_address_in_every_namespace() {
        let a = tuple("127.0.0.1:5000", "127.0.0.1:80");
        let b = tuple("10.0.0.2:5000", "10.0.0.1:80");
        // The same tuple in two namespaces, and a third socket in the other one.
        let table = table(&[(1, a, 10, NETNS), (2, a, 11, 8), (3, b, 12, 8)]);
        let none = Changed::default();
        let same = kernel_snapshot(&[(1, a, None, 10), (2, a, Some(8), 11), (3, b, Some(8), 12)]);
        let comparison = compare(&same, &table, Some(NETNS), &none);
        assert_eq!((comparison.compared, kinds(&comparison)), (3, vec![]));

        let other_pid =
            kernel_snapshot(&[(1, a, None, 10), (2, a, Some(8), 13), (3, b, Some(8), 12)]);
        let comparison = compare(&other_pid, &table, Some(NETNS), &none);
        assert_eq!(kinds(&comparison), vec![DriftKind::PidMismatch]);
        assert_eq!(comparison.drift[0].table_pid, Some(11));

        let changed = Changed {
            sockets: [3].into_iter().collect(),
            ..Changed::default()
        };
        let missing = kernel_snapshot(&[(1, a, None, 10), (3, b, Some(8), 12)]);
        let comparison = compare(&missing, &table, Some(NETNS), &changed);
        assert_eq!((comparison.compared, comparison.excluded), (1, 2));
        assert_eq!(kinds(&comparison), vec![DriftKind::MissingFromSnapshot]);
        assert_eq!(comparison.drift[0].table_pid, Some(11));
    }

    #[test]
    fn the_same_sockets_are_no_drift_and_each_difference_is_named() {
        let a = tuple("127.0.0.1:5000", "127.0.0.1:80");
        let b = tuple("127.0.0.1:5001", "127.0.0.1:80");
        let table = table(&[(1, a, 10, NETNS), (2, b, 10, NETNS)]);
        let none = Changed::default();
        let same = snapshot(&[
            (a, Established, Some(10), false),
            (b, Established, None, false),
        ]);
        let comparison = compare(&same, &table, Some(NETNS), &none);
        assert_eq!((comparison.compared, kinds(&comparison)), (2, vec![]));

        let c = tuple("127.0.0.1:5002", "127.0.0.1:80");
        let differs = snapshot(&[
            (a, Established, Some(11), false),
            (c, Established, Some(10), false),
        ]);
        let comparison = compare(&differs, &table, Some(NETNS), &none);
        assert_eq!(
            kinds(&comparison),
            vec![
                DriftKind::PidMismatch,
                DriftKind::MissingFromTable,
                DriftKind::MissingFromSnapshot
            ]
        );
        let state = snapshot(&[
            (a, CloseWait, Some(10), false),
            (b, Established, Some(10), false),
        ]);
        let comparison = compare(&state, &table, Some(NETNS), &none);
        assert_eq!(kinds(&comparison), vec![DriftKind::StateMismatch]);
    }

    #[test]
    fn a_connect_in_progress_leaves_out_its_destination_on_both_sides() {
        // 2 long-lived connections to port 80; a new connect to it during the snapshot.
        let a = tuple("127.0.0.1:5000", "127.0.0.1:80");
        let b = tuple("127.0.0.1:5001", "127.0.0.1:80");
        let table = table(&[(1, a, 10, NETNS), (2, b, 10, NETNS)]);
        let changed = Changed {
            tuples: [portless_form(&a)].into_iter().collect(),
            ..Changed::default()
        };
        let proc = snapshot(&[
            (a, Established, Some(10), false),
            (b, Established, Some(10), false),
        ]);
        let comparison = compare(&proc, &table, Some(NETNS), &changed);
        assert_eq!(kinds(&comparison), vec![]);
        assert_eq!((comparison.compared, comparison.excluded), (0, 4));
    }

    #[test]
    fn a_pid_differs_only_when_the_table_owner_holds_no_fd_of_the_socket() {
        let a = tuple("127.0.0.1:80", "127.0.0.1:5000");
        let table = table(&[(1, a, 12, NETNS)]);
        let none = Changed::default();
        // Held by 10 (the lowest, which the snapshot names) and by 12, the table's owner.
        let mut shared = snapshot(&[(a, Established, Some(10), false)]);
        shared.entries[0].pids = vec![10, 12];
        assert_eq!(kinds(&compare(&shared, &table, Some(NETNS), &none)), vec![]);
        shared.entries[0].pids = vec![10, 11];
        assert_eq!(
            kinds(&compare(&shared, &table, Some(NETNS), &none)),
            vec![DriftKind::PidMismatch]
        );
    }

    #[test]
    fn changed_sockets_time_wait_duplicates_and_other_namespaces_are_left_out() {
        let a = tuple("127.0.0.1:5000", "127.0.0.1:80");
        let b = tuple("127.0.0.1:5001", "127.0.0.1:80");
        let elsewhere = tuple("127.0.0.1:5002", "127.0.0.1:80");
        let table = table(&[(1, a, 10, NETNS), (3, elsewhere, 10, NETNS + 1)]);
        let changed = Changed {
            tuples: [b].into_iter().collect(),
            ..Changed::default()
        };
        let proc = snapshot(&[
            (a, Established, Some(10), false),
            (a, Established, Some(10), false),
            (b, Established, Some(10), false),
            (
                tuple("127.0.0.1:5003", "127.0.0.1:80"),
                FinWait2,
                None,
                true,
            ),
            (
                tuple("127.0.0.1:80", "127.0.0.1:5004"),
                SynRecv,
                None,
                false,
            ),
        ]);
        let comparison = compare(&proc, &table, Some(NETNS), &changed);
        assert_eq!(kinds(&comparison), vec![]);
        assert_eq!((comparison.compared, comparison.excluded), (1, 1));
    }

    #[test]
    fn a_connect_in_progress_matches_without_its_local_port() {
        let mut table = SocketTable::new(name, 100);
        let connecting = tuple("127.0.0.1:0", "127.0.0.1:80");
        table.apply(&Transition {
            ts_ns: 1,
            skaddr: 9,
            tuple: connecting,
            old: Close,
            new: SynSent,
            task: crate::model::Task {
                pid: 10,
                comm: [0; 16],
                start_ns: None,
                cgroup_id: None,
            },
            uid: Some(0),
            netns: Some(NETNS),
            bytes: ByteCounts::default(),
            recovered: false,
            error: None,
        });
        let with_port = tuple("127.0.0.1:5000", "127.0.0.1:80");
        let proc = snapshot(&[(with_port, SynSent, Some(10), false)]);
        let none = Changed::default();
        assert_eq!(kinds(&compare(&proc, &table, Some(NETNS), &none)), vec![]);
        // Another connect to the same place began during the snapshot: both are left out.
        let changed = Changed {
            tuples: [connecting].into_iter().collect(),
            ..Changed::default()
        };
        let comparison = compare(&proc, &table, Some(NETNS), &changed);
        assert_eq!((kinds(&comparison), comparison.excluded), (vec![], 2));
    }
}
