//! When the table is read again after losses: at most every 2 s, backing
//! off after failures.

use std::time::{Duration, Instant};

/// Resyncs at most this often: under a storm of losses, re-reading the
/// tables (which slows as TIME_WAIT sockets pile up) would only cause more.
pub(super) const RESYNC_INTERVAL: Duration = Duration::from_secs(2);
/// After failed resyncs, the wait doubles up to this.
const RESYNC_RETRY_MAX: Duration = Duration::from_secs(60);
/// When the table is read again after losses.
pub(super) struct ResyncSchedule {
    /// `--no-resync`: never.
    disabled: bool,
    /// Losses happened since the table was last read.
    pub(super) stale: bool,
    pub(super) last: Instant,
    /// The wait before the next resync: `RESYNC_INTERVAL`, doubled after each failure.
    pub(super) wait: Duration,
    pub(super) done: u64,
}

impl ResyncSchedule {
    pub(super) fn new(disabled: bool) -> ResyncSchedule {
        ResyncSchedule {
            disabled,
            stale: false,
            last: Instant::now(),
            wait: RESYNC_INTERVAL,
            done: 0,
        }
    }

    /// The table was just read.
    pub(super) fn table_read(&mut self) {
        self.stale = false;
        self.last = Instant::now();
        self.wait = RESYNC_INTERVAL;
    }

    /// Whether to resync now: after losses, once the wait is over (or at the last check).
    pub(super) fn due(&self, last_check: bool) -> bool {
        self.stale && !self.disabled && (last_check || self.last.elapsed() >= self.wait)
    }

    /// A resync failed: the next waits twice as long. Returns that wait.
    pub(super) fn failed(&mut self) -> Duration {
        self.last = Instant::now();
        self.wait = (self.wait * 2).min(RESYNC_RETRY_MAX);
        self.wait
    }
}
