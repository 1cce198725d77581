//! The loss ledger: the transitions delivered, and those lost with their
//! cause, from the records that arrive and the kernel's counters, so that
//! delivered + lost equals what the kernel fired, each loss counted once.

use crate::model::{LossCause, LossCounters, Lost};

/// Transitions delivered and lost so far.
#[derive(Debug, Default)]
pub struct LossLedger {
    /// Transitions applied: recovered ones in, duplicates out.
    transitions: u64,
    /// Transitions the recovery program sent that the kernel had skipped.
    recovered: u64,
    /// Transitions the recovery program repeated (dropped).
    duplicates: u64,
    /// Recoveries the full ring buffer refused beyond the calls the kernel
    /// skipped: repeats of handled transitions (see `check`), no loss.
    refused_repeats: u64,
    /// The kernel's counters at the previous check.
    counters: LossCounters,
    /// Losses reported so far.
    lost: Lost,
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
    ///
    /// The recovery program repeats a transition the transition program
    /// handled when a nested pair of calls on its CPU overwrote the note
    /// between the two programs; user space drops the repeat, unless the
    /// full ring buffer refused it. Such refusals are told apart by count:
    /// every recovery that arrived or was refused is of a skipped call,
    /// unless there are more of them than the kernel skipped (the skips are
    /// read after the refusals, so that each refusal's skip is in the count).
    pub fn check(&mut self, now: LossCounters, last: bool) -> Vec<(u64, LossCause)> {
        let settled = if last { now } else { self.counters };
        self.counters = now;
        self.refused_repeats = self
            .refused_repeats
            .max((self.recovered + now.recoveries_refused).saturating_sub(now.skipped));
        let refused = self.recoveries_refused();
        let ring_buffer_full = now.ring_buffer_full.saturating_sub(self.refused_repeats);
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
            .saturating_sub(refused);
        let new_losses = [
            (
                ring_buffer_full.saturating_sub(self.lost.ring_buffer_full),
                LossCause::RingBufferFull,
            ),
            (
                unrecovered.saturating_sub(self.lost.not_recovered),
                LossCause::Recursion,
            ),
            (
                now.owner_events_dropped
                    .saturating_sub(self.lost.owner_events),
                LossCause::OwnerRingBufferFull,
            ),
        ];
        self.lost.ring_buffer_full = self.lost.ring_buffer_full.max(ring_buffer_full);
        self.lost.owner_events = self.lost.owner_events.max(now.owner_events_dropped);
        self.lost.not_recovered = self.lost.not_recovered.max(unrecovered);
        new_losses
            .into_iter()
            .filter(|(count, _)| *count > 0)
            .collect()
    }

    /// Losses reported so far.
    pub fn lost(&self) -> Lost {
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

    /// Repeats dropped on arrival, and those the full ring buffer refused.
    pub fn duplicates(&self) -> u64 {
        self.duplicates + self.refused_repeats
    }

    /// Recoveries of skipped calls that the full ring buffer refused.
    pub fn recoveries_refused(&self) -> u64 {
        self.counters
            .recoveries_refused
            .saturating_sub(self.refused_repeats)
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
            (ledger.lost().ring_buffer_full, ledger.lost().not_recovered),
            (10, 0)
        );
    }

    #[test]
    fn a_refused_repeat_of_a_handled_transition_is_no_loss() {
        let mut ledger = LossLedger::default();
        // 3 calls skipped, 2 recovered; 1 refused by the full ring buffer,
        // and 1 refusal more: a repeat of a transition already delivered,
        // whose note a nested pair of calls overwrote. The transition
        // program's own sends found the ring full 4 times.
        for _ in 0..2 {
            ledger.arrived(Arrival::Recovered);
        }
        let now = LossCounters {
            ring_buffer_full: 6,
            recoveries_refused: 2,
            owner_events_dropped: 0,
            skipped: 3,
            fired: Some(100),
            recovery_skipped: 0,
        };
        assert_eq!(ledger.check(now, true), [(5, LossCause::RingBufferFull)]);
        assert_eq!(
            (ledger.lost().ring_buffer_full, ledger.lost().not_recovered),
            (5, 0)
        );
        assert_eq!((ledger.recoveries_refused(), ledger.duplicates()), (1, 1));
        // skipped = recovered + refused + not recovered.
        assert_eq!(3, ledger.recovered() + ledger.recoveries_refused());
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
