//! verify's records: one report per check (a JSON record, or a text line
//! and one line per socket that differs), and the summary it ends with.

use std::fmt::Write as _;
use std::time::SystemTime;

use serde::Serialize;

use super::{push_json_line, Timestamp, SCHEMA};
use crate::engine::monitor::Summary;
use crate::model::Tuple;
use crate::sink::{RecordKind, Records};

/// Sockets listed at most in one report (the counts cover them all).
const LISTED_AT_MOST: usize = 50;

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
    pub tuple: Tuple,
    /// Its kernel address, when it is a table socket missing from the
    /// snapshot in a state the kernel may free without a traced CLOSE.
    #[serde(skip)]
    pub vanishable: Option<u64>,
}

/// The JSON record verify ends with: watch's summary (what the run saw,
/// its losses) and the checks.
#[derive(Serialize)]
pub struct VerifySummaryRecord<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub schema: u32,
    pub ts: Timestamp,
    #[serde(flatten)]
    pub counts: &'a Summary,
    pub checks: u64,
    pub drift_checks: u64,
    pub persisting_checks: u64,
}

/// What one check found, as its report says it.
pub struct DriftReport<'a> {
    pub compared: usize,
    /// Sockets that changed during the snapshot, left out.
    pub excluded: usize,
    /// Table sockets taken as freed without a traced CLOSE at this check.
    pub freed_untraced: usize,
    pub drift: &'a [Drift],
}

/// The JSON report of one check.
#[derive(Serialize)]
struct DriftRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    schema: u32,
    ts: Timestamp,
    compared: usize,
    excluded: usize,
    missing_from_table: usize,
    missing_from_snapshot: usize,
    pid_mismatch: usize,
    state_mismatch: usize,
    persisting: usize,
    freed_untraced: usize,
    sockets: &'a [Drift],
}

/// Writes the report of one check, stamped now: a JSON record, or a
/// line of counts and one line per socket that differs.
pub fn write_drift_report(out: &mut Records, json: bool, report: &DriftReport<'_>) {
    let ts = Timestamp(SystemTime::now());
    let count = |kind| report.drift.iter().filter(|d| d.kind == kind).count();
    let persisting = report.drift.iter().filter(|d| d.persisting).count();
    let listed = &report.drift[..report.drift.len().min(LISTED_AT_MOST)];
    if json {
        let record = DriftRecord {
            kind: "drift",
            schema: SCHEMA,
            ts,
            compared: report.compared,
            excluded: report.excluded,
            missing_from_table: count(DriftKind::MissingFromTable),
            missing_from_snapshot: count(DriftKind::MissingFromSnapshot),
            pid_mismatch: count(DriftKind::PidMismatch),
            state_mismatch: count(DriftKind::StateMismatch),
            persisting,
            freed_untraced: report.freed_untraced,
            sockets: listed,
        };
        push_json_line(out, RecordKind::Drift, &record);
        return;
    }
    let mut text = format!(
        "{ts} verify: {} sockets compared, {} changed during the snapshot (excluded), {} taken as freed without a traced CLOSE: ",
        report.compared, report.excluded, report.freed_untraced
    );
    if report.drift.is_empty() {
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
    for drift in listed {
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
    out.push(RecordKind::Drift, |out| {
        out.extend_from_slice(text.as_bytes())
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::fixtures::{json_lines, tuples};

    fn drift(kind: DriftKind, persisting: bool) -> Drift {
        Drift {
            kind,
            proto: "tcp",
            local: "127.0.0.1:8080".into(),
            remote: "127.0.0.1:40000".into(),
            table_state: Some("ESTABLISHED"),
            snapshot_state: None,
            table_pid: Some(42),
            snapshot_pid: None,
            persisting,
            tuple: tuples()[0],
            vanishable: None,
        }
    }

    fn report(drift: &[Drift], json: bool) -> String {
        let report = DriftReport {
            compared: 10,
            excluded: 2,
            freed_untraced: 1,
            drift,
        };
        let mut out = Records::default();
        write_drift_report(&mut out, json, &report);
        String::from_utf8(out.bytes().to_vec()).expect("UTF-8")
    }

    #[test]
    fn a_text_report_counts_and_lists_each_socket_that_differs() {
        let drift = [
            drift(DriftKind::MissingFromSnapshot, true),
            drift(DriftKind::PidMismatch, false),
        ];
        let text = report(&drift, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].ends_with(
            " verify: 10 sockets compared, 2 changed during the snapshot (excluded), 1 taken as freed without a traced CLOSE: 0 missing from the table, 1 missing from the snapshot, 1 pid and 0 state mismatches, 1 persisting"
        ), "{text}");
        assert_eq!(lines[1], "  missing from the snapshot: tcp 127.0.0.1:8080 -> 127.0.0.1:40000 table ESTABLISHED pid 42 / snapshot - pid - (persisting)");
        assert_eq!(lines[2], "  pid differs: tcp 127.0.0.1:8080 -> 127.0.0.1:40000 table ESTABLISHED pid 42 / snapshot - pid -");
        assert!(report(&[], false).ends_with("without a traced CLOSE: no drift\n"));
    }

    #[test]
    fn a_json_report_lists_at_most_fifty_sockets_and_counts_them_all() {
        let drift: Vec<Drift> = (0..60)
            .map(|i| drift(DriftKind::StateMismatch, i % 2 == 0))
            .collect();
        let records = json_lines(report(&drift, true).as_bytes());
        assert_eq!(records.len(), 1);
        let record = &records[0];
        assert_eq!(record["type"], "drift");
        assert_eq!(record["schema"], SCHEMA);
        assert_eq!(record["state_mismatch"], 60);
        assert_eq!(record["persisting"], 30);
        assert_eq!(record["freed_untraced"], 1);
        let sockets = record["sockets"].as_array().expect("sockets");
        assert_eq!(sockets.len(), LISTED_AT_MOST);
        assert_eq!(sockets[0]["kind"], "state_mismatch");
        assert_eq!(sockets[0]["table_pid"], 42);
    }
}
