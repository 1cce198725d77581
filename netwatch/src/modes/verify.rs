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
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::cli::VerifyArgs;
use crate::engine::clock::WallClock;
use crate::engine::monitor::{self, Config, End, Notice, Observer};
use crate::engine::table::{Observed, SocketTable};
use crate::metrics::Metrics;
use crate::model::{OwnerChange, Transition, Tuple};
use crate::output::{self, DriftKind, DriftReport, Timestamp, VerifySummaryRecord, SCHEMA};
use crate::sink::{RecordKind, Records, Sink};
use crate::snapshot::Snapshot;

mod compare;

pub use compare::{compare, Changed, Comparison};

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

    fn report(&self, comparison: &Comparison, out: &mut Records) {
        let report = DriftReport {
            compared: comparison.compared,
            excluded: comparison.excluded,
            freed_untraced: comparison.freed.len(),
            drift: &comparison.drift,
        };
        output::write_drift_report(out, self.json, &report);
    }
}

impl Observer for Verify {
    fn transition(
        &mut self,
        t: &Transition,
        _seen: &Observed,
        _clock: &WallClock,
        _out: &mut Records,
    ) {
        self.note_change(t.ts_ns, t.skaddr, t.tuple);
    }

    fn owner_changed(
        &mut self,
        ts_ns: u64,
        change: &OwnerChange,
        _clock: &WallClock,
        _out: &mut Records,
    ) {
        self.note_change(ts_ns, change.skaddr, change.tuple);
    }

    fn notice(&mut self, notice: &Notice, out: &mut Records) {
        if self.json && matches!(notice, Notice::Failed { .. }) {
            output::write_notice(out, notice);
        }
    }

    fn check_starts(&mut self, at_ns: u64) {
        self.check_began_ns = Some(at_ns);
        self.changed = Changed::default();
    }

    fn check(&mut self, snapshot: &Snapshot, table: &SocketTable, out: &mut Records) -> Vec<u64> {
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

    fn stopped(&mut self, end: &End<'_>, out: &mut Records) {
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
            let record = VerifySummaryRecord {
                kind: "summary",
                schema: SCHEMA,
                ts: Timestamp(SystemTime::now()),
                counts: end.summary,
                checks: self.checks,
                drift_checks: self.drift_checks,
                persisting_checks: self.persisted_checks,
            };
            output::push_json_line(out, RecordKind::Summary, &record);
        }
    }
}

#[cfg(test)]
mod tests;
