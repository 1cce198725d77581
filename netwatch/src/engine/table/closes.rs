//! The sockets that reached CLOSE lately, to recognise a duplicated close
//! (see [`super::SocketTable::is_duplicate`]).
//!
//! The recovery program duplicates a transition only when it races the
//! transition program in the same firing of the tracepoint, on the same
//! CPU: the duplicate comes right after the original in the ring buffer.
//! So only the latest closes need remembering, in a fixed ring of 64 KiB:
//! one store per close instead of a hash-map insert, and a window that
//! slides (a map cleared when full forgot the closes made just before,
//! and a duplicate of one of them then counted twice). It is searched only
//! for a recovered close of a socket no longer in the table, a rare event.

use crate::model::TcpState;

/// Closes remembered: thousands of times what can come between a
/// transition and its duplicate.
const REMEMBERED: usize = 4096;

/// The latest closes, as (socket address, the state it left).
#[derive(Debug)]
pub struct RecentCloses {
    entries: Vec<(u64, TcpState)>,
    /// Where the next close goes once all entries are in use.
    next: usize,
}

impl Default for RecentCloses {
    /// Room for every close it remembers, taken at once: none is
    /// allocated while the stream runs.
    fn default() -> RecentCloses {
        RecentCloses {
            entries: Vec::with_capacity(REMEMBERED),
            next: 0,
        }
    }
}

impl RecentCloses {
    /// Remembers that the socket at `skaddr` went from `old` to CLOSE,
    /// in place of the oldest close once full.
    pub fn remember(&mut self, skaddr: u64, old: TcpState) {
        if self.entries.len() < REMEMBERED {
            self.entries.push((skaddr, old));
        } else {
            self.entries[self.next] = (skaddr, old);
            self.next = (self.next + 1) % REMEMBERED;
        }
    }

    /// The state the socket at `skaddr` left at its latest remembered close.
    pub fn latest(&self, skaddr: u64) -> Option<TcpState> {
        let (older, newer) = self.entries.split_at(self.next);
        newer
            .iter()
            .rev()
            .chain(older.iter().rev())
            .find(|(address, _)| *address == skaddr)
            .map(|&(_, old)| old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_close_of_an_address_is_found_until_it_is_the_oldest_past_the_limit() {
        let mut closes = RecentCloses::default();
        closes.remember(1, TcpState::FinWait2);
        closes.remember(2, TcpState::LastAck);
        closes.remember(1, TcpState::SynSent);
        assert_eq!(closes.latest(1), Some(TcpState::SynSent));
        assert_eq!(closes.latest(2), Some(TcpState::LastAck));
        assert_eq!(closes.latest(3), None);
        for skaddr in 100..100 + REMEMBERED as u64 - 3 {
            closes.remember(skaddr, TcpState::FinWait2);
        }
        // Full: address 1's first close is the oldest; the next one takes its place.
        assert_eq!(closes.latest(1), Some(TcpState::SynSent));
        closes.remember(7, TcpState::CloseWait);
        closes.remember(8, TcpState::CloseWait);
        assert_eq!(closes.latest(2), None, "forgotten");
        assert_eq!(closes.latest(1), Some(TcpState::SynSent));
        assert_eq!(closes.latest(8), Some(TcpState::CloseWait));
        closes.remember(1, TcpState::LastAck);
        assert_eq!(closes.latest(1), Some(TcpState::LastAck), "the newest wins");
    }
}
