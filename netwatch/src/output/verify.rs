//! verify's JSON records: one report per check, and the summary it ends with.

use serde::Serialize;

use super::Timestamp;
use crate::engine::monitor::Summary;

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

/// The JSON report of one check.
#[derive(Serialize)]
pub struct DriftRecord<'a, S> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub schema: u32,
    pub ts: Timestamp,
    pub compared: usize,
    pub excluded: usize,
    pub missing_from_table: usize,
    pub missing_from_snapshot: usize,
    pub pid_mismatch: usize,
    pub state_mismatch: usize,
    pub persisting: usize,
    /// Table sockets taken as freed without a traced CLOSE at this check.
    pub freed_untraced: usize,
    pub sockets: &'a [S],
}
