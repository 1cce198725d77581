//! The words of loss accounting: what the kernel counts ([`LossCounters`]),
//! what netwatch reports lost ([`Lost`]) and why ([`LossCause`]). The probe
//! reads the first, the engine's ledger turns it into the second, and the
//! summary and the metrics show that.

use serde::Serialize;

/// Why transitions were lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossCause {
    /// The ring buffer had no room (user space fell behind).
    RingBufferFull,
    /// The kernel skipped the program: it was already running on that CPU.
    Recursion,
    /// Owner changes (accept, handoff, exec) the ring buffer had no room for.
    OwnerRingBufferFull,
}

impl LossCause {
    /// What was lost: "transition(s)" or "owner change(s)".
    pub fn lost_what(self) -> &'static str {
        match self {
            LossCause::RingBufferFull | LossCause::Recursion => "transition(s)",
            LossCause::OwnerRingBufferFull => "owner change(s)",
        }
    }

    /// How a person reads the cause.
    pub fn describe(self) -> &'static str {
        match self {
            LossCause::RingBufferFull => "ring buffer full",
            LossCause::Recursion => "kernel skipped nested calls of the program",
            LossCause::OwnerRingBufferFull => "ring buffer full",
        }
    }
}

/// What the kernel counted since the programs were loaded (they only
/// grow): refused events, skipped calls, firings. Which of them are
/// losses the ledger decides ([`Lost`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LossCounters {
    /// Transitions the ring buffer had no room for (sent by either program).
    pub ring_buffer_full: u64,
    /// Of those, the ones the recovery program could not send: calls the
    /// kernel skipped, already lost to the full ring buffer.
    pub recoveries_refused: u64,
    /// Owner and exec events the ring buffer had no room for.
    pub owner_events_dropped: u64,
    /// Calls of the transition program the kernel skipped (nested on one CPU):
    /// each is lost unless the recovery program sent it.
    pub skipped: u64,
    /// Every firing of the tracepoint (any protocol), when the recovery
    /// program runs: its calls plus the calls the kernel skipped of it.
    pub fired: Option<u64>,
    /// Of those, the calls of the recovery program the kernel skipped.
    pub recovery_skipped: u64,
}

/// Events reported lost so far, by cause: each loss counted once, so that
/// transitions delivered plus `transitions()` equal what the kernel fired.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lost {
    /// Transitions the full ring buffer refused (recoveries of skipped calls included).
    pub ring_buffer_full: u64,
    /// Calls the kernel skipped that the recovery program did not send.
    pub not_recovered: u64,
    /// Owner and exec events the full ring buffer refused.
    pub owner_events: u64,
}

impl Lost {
    /// Transitions lost, whatever the cause.
    pub fn transitions(&self) -> u64 {
        self.ring_buffer_full + self.not_recovered
    }
}
