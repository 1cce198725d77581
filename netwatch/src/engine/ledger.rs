//! The loss ledger: the transitions delivered, and those lost with their
//! cause, from the records that arrive and the kernel's counters, so that
//! delivered + lost equals what the kernel fired, each loss counted once.

use crate::model::{LossCause, LossCounters};

/// Transitions delivered and lost so far.
#[derive(Debug, Default)]
pub struct LossLedger {
    /// Transitions applied: recovered ones in, duplicates out.
    transitions: u64,
    /// Transitions the recovery program sent that the kernel had skipped.
    recovered: u64,
    /// Transitions the recovery program repeated (dropped).
    duplicates: u64,
    /// The kernel's counters at the previous check.
    counters: LossCounters,
    /// Losses reported so far: ring buffer full, skipped and not recovered.
    lost: LossCounters,
}

/// What becomes of a transition that arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Sent by the transition program.
    Sent,
    /// Sent by the recovery program for a call the kernel skipped.
    Recovered,
    /// Sent by the recovery program, repeating one already applied: dropped.
    Duplicate,
}

impl LossLedger {
    /// Counts a transition that arrived; whether it is to be applied.
    pub fn arrived(&mut self, arrival: Arrival) -> bool {
        match arrival {
            Arrival::Duplicate => self.duplicates += 1,
            Arrival::Recovered => self.recovered += 1,
            Arrival::Sent => {}
        }
        let applied = arrival != Arrival::Duplicate;
        self.transitions += u64::from(applied);
        applied
    }

    /// Takes the kernel's counters `now` and returns the losses not
    /// reported before, by cause. A skipped call counts as lost once its
    /// recovery had time to arrive: skips counted at the previous check
    /// (or, when `last`, now), against the recoveries that arrived and
    /// those refused until now.
    pub fn check(&mut self, now: LossCounters, last: bool) -> Vec<(u64, LossCause)> {
        let settled = if last { now } else { self.counters };
        self.counters = now;
        // A skipped call whose recovery the full ring buffer refused is a
        // ring buffer loss already: counting it here too would make
        // delivered + lost exceed what the kernel fired. The refusals are
        // today's, not those read with the skips: a skip the kernel counted
        // just after them may have had its recovery refused a moment later
        // (the counters are read one after the other), and a skip once
        // taken for unrecovered stays counted as lost.
        let unrecovered = settled
            .skipped
            .saturating_sub(self.recovered)
            .saturating_sub(now.recoveries_refused);
        let new_losses = [
            (
                now.ring_buffer_full
                    .saturating_sub(self.lost.ring_buffer_full),
                LossCause::RingBufferFull,
            ),
            (
                unrecovered.saturating_sub(self.lost.skipped),
                LossCause::Recursion,
            ),
            (
                now.owner_events_dropped
                    .saturating_sub(self.lost.owner_events_dropped),
                LossCause::OwnerRingBufferFull,
            ),
        ];
        self.lost.ring_buffer_full = self.lost.ring_buffer_full.max(now.ring_buffer_full);
        self.lost.owner_events_dropped =
            self.lost.owner_events_dropped.max(now.owner_events_dropped);
        self.lost.skipped = self.lost.skipped.max(unrecovered);
        new_losses
            .into_iter()
            .filter(|(count, _)| *count > 0)
            .collect()
    }

    /// Losses reported so far (`skipped`: skipped and not recovered).
    pub fn lost(&self) -> LossCounters {
        self.lost
    }

    /// The kernel's counters at the last check.
    pub fn counters(&self) -> LossCounters {
        self.counters
    }

    pub fn transitions(&self) -> u64 {
        self.transitions
    }

    pub fn recovered(&self) -> u64 {
        self.recovered
    }

    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skipped_call_refused_by_the_full_ring_is_lost_once() {
        let mut ledger = LossLedger::default();
        ledger.arrived(Arrival::Recovered);
        ledger.arrived(Arrival::Recovered);
        // 5 calls skipped: 2 recovered, 3 refused by the full ring buffer,
        // which also refused 7 of the transition program's.
        let now = LossCounters {
            ring_buffer_full: 10,
            recoveries_refused: 3,
            owner_events_dropped: 0,
            skipped: 5,
            fired: Some(100),
            recovery_skipped: 0,
        };
        assert_eq!(ledger.check(now, true), [(10, LossCause::RingBufferFull)]);
        assert_eq!(
            (ledger.lost().ring_buffer_full, ledger.lost().skipped),
            (10, 0)
        );
    }

    #[test]
    fn each_loss_is_reported_once_as_the_counters_grow() {
        let mut ledger = LossLedger::default();
        let mut now = LossCounters {
            ring_buffer_full: 3,
            owner_events_dropped: 1,
            ..LossCounters::default()
        };
        assert_eq!(
            ledger.check(now, false),
            [
                (3, LossCause::RingBufferFull),
                (1, LossCause::OwnerRingBufferFull)
            ]
        );
        assert_eq!(ledger.check(now, false), []);
        now.ring_buffer_full = 5;
        assert_eq!(ledger.check(now, false), [(2, LossCause::RingBufferFull)]);
    }

    #[test]
    fn duplicates_are_counted_and_not_applied() {
        let mut ledger = LossLedger::default();
        assert!(ledger.arrived(Arrival::Sent));
        assert!(ledger.arrived(Arrival::Recovered));
        assert!(!ledger.arrived(Arrival::Duplicate));
        assert_eq!(
            (
                ledger.transitions(),
                ledger.recovered(),
                ledger.duplicates()
            ),
            (2, 1, 1)
        );
    }
}
