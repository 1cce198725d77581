//! What `top` shows, kept current as the engine sees it: every connection
//! open, and those closed lately (however briefly they lived), with their
//! owners, transitions and bytes; opens and closes per second; losses.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use netwatch_common::ByteCounts;
use rustc_hash::FxHashMap;

use crate::engine::monitor::Refresh;
use crate::engine::table::{LiveSocket, SocketTable};
use crate::model::{Owner, TcpCounters, TcpState, Transition, Tuple};
use crate::snapshot::Snapshot;

/// Transitions remembered per connection (its detail pane lists them).
const HISTORY_LIMIT: usize = 32;
/// Closed connections kept at most; past this the oldest are dropped, and counted.
pub const CLOSED_LIMIT: usize = 20_000;
/// Seconds of opens and closes kept for the sparkline.
pub const SECONDS_KEPT: usize = 60;

/// One connection (or listener) as `top` shows it.
#[derive(Clone, Debug)]
pub struct Connection {
    pub tuple: Tuple,
    pub state: TcpState,
    pub owner: Option<Owner>,
    /// When it opened, if seen (a baseline socket's is unknown).
    pub opened: Option<SystemTime>,
    /// When it closed, for a closed one.
    pub closed: Option<Instant>,
    /// How long it lived, for a closed one whose opening was seen.
    pub lifetime: Option<Duration>,
    pub bytes: ByteCounts,
    /// Bytes per second sent and received, over the last refresh.
    pub rates: (f64, f64),
    /// What the kernel counted of it at the last refresh that read it (as
    /// root, in netwatch's network namespace); its bytes are also in `bytes`.
    pub counters: Option<TcpCounters>,
    /// Its owner changed from one process to another (a handoff).
    pub handed_off: bool,
    /// Its last transitions: when, from, to.
    pub history: VecDeque<(SystemTime, TcpState, TcpState)>,
    /// Its owner changes: when, and the new owner.
    pub owner_changes: Vec<(SystemTime, Owner)>,
}

impl Connection {
    fn new(tuple: Tuple, state: TcpState, owner: Option<Owner>) -> Connection {
        Connection {
            tuple,
            state,
            owner,
            opened: None,
            closed: None,
            lifetime: None,
            bytes: ByteCounts::default(),
            rates: (0.0, 0.0),
            counters: None,
            handed_off: false,
            history: VecDeque::new(),
            owner_changes: Vec::new(),
        }
    }

    /// Its counters once the kernel has measured a round trip (RTT and
    /// RETR show `-` before).
    pub fn measured(&self) -> Option<TcpCounters> {
        self.counters.filter(|counted| counted.rtt_us > 0)
    }

    fn of_table(socket: &LiveSocket) -> Connection {
        let mut connection = Connection::new(socket.tuple, socket.state, socket.owner());
        connection.handed_off = socket.owner_changed;
        connection
    }

    /// Its age now: since it opened, or its lifetime once closed.
    pub fn age(&self, now: SystemTime) -> Option<Duration> {
        match self.closed {
            Some(_) => self.lifetime,
            None => now.duration_since(self.opened?).ok(),
        }
    }

    fn record(&mut self, at: SystemTime, old: TcpState, new: TcpState) {
        if self.history.len() == HISTORY_LIMIT {
            self.history.pop_front();
        }
        self.history.push_back((at, old, new));
        self.state = new;
    }
}

/// Opens and closes counted per second, for the last minute.
#[derive(Clone, Debug, Default)]
pub struct PerSecond {
    /// Oldest first; the last is the second under way.
    pub seconds: VecDeque<(u64, u64)>,
    second: u64,
}

impl PerSecond {
    fn count(&mut self, now: Instant, origin: Instant, opened: bool) {
        self.advance(now, origin);
        if let Some((opens, closes)) = self.seconds.back_mut() {
            *if opened { opens } else { closes } += 1;
        }
    }

    /// Moves on to the second `now` is in, with zeros for the quiet ones.
    fn advance(&mut self, now: Instant, origin: Instant) {
        let second = now.saturating_duration_since(origin).as_secs();
        if self.seconds.is_empty() {
            self.second = second;
            self.seconds.push_back((0, 0));
        }
        while self.second < second {
            self.second += 1;
            self.seconds.push_back((0, 0));
            if self.seconds.len() > SECONDS_KEPT {
                self.seconds.pop_front();
            }
        }
    }

    /// Opens and closes in the last whole second.
    pub fn last_second(&self) -> (u64, u64) {
        let whole = self.seconds.len().saturating_sub(2);
        self.seconds.get(whole).copied().unwrap_or_default()
    }
}

/// Everything `top` shows.
#[derive(Debug)]
pub struct TopState {
    /// Open sockets by kernel address.
    pub open: FxHashMap<u64, Connection>,
    /// Open sockets of a /proc baseline, not yet named by a transition, by tuple.
    pub unbound: FxHashMap<Tuple, Connection>,
    /// Closed lately, oldest first.
    pub closed: VecDeque<Connection>,
    /// Closed connections dropped before their time (past `CLOSED_LIMIT`).
    pub closed_dropped: u64,
    pub per_second: PerSecond,
    /// Transitions and owner changes lost so far.
    pub lost: u64,
    /// Whether the counts are live (eBPF), or each refresh's /proc snapshot.
    pub live: bool,
    keep_closed: Duration,
    origin: Instant,
    /// When the byte counts were last refreshed.
    bytes_read_at: Option<Instant>,
}

impl TopState {
    /// An empty state that keeps closed connections for `keep_closed`.
    pub fn new(live: bool, keep_closed: Duration) -> TopState {
        TopState {
            open: FxHashMap::default(),
            unbound: FxHashMap::default(),
            closed: VecDeque::new(),
            closed_dropped: 0,
            per_second: PerSecond::default(),
            lost: 0,
            live,
            keep_closed,
            origin: Instant::now(),
            bytes_read_at: None,
        }
    }

    /// Every socket the engine's table holds at the start.
    pub fn baseline(&mut self, table: &SocketTable) {
        for (skaddr, socket) in table.sockets() {
            let connection = Connection::of_table(socket);
            match skaddr {
                Some(skaddr) => self.open.insert(skaddr, connection),
                None => self.unbound.insert(socket.tuple, connection),
            };
        }
    }

    /// Replaces the open sockets with a snapshot's (without root).
    pub fn replace_from(&mut self, snapshot: &Snapshot) {
        self.open.clear();
        self.unbound.clear();
        for entry in &snapshot.entries {
            let socket = &entry.socket;
            if !socket.proto.is_tcp() || socket.timewait || socket.state == TcpState::TimeWait {
                continue;
            }
            let connection = Connection::new(socket.tuple(), socket.state, entry.owner.clone());
            self.unbound.insert(socket.tuple(), connection);
        }
    }

    /// Applies a transition the engine saw, with the socket's owner then.
    pub fn transition(&mut self, t: &Transition, owner: Option<Owner>, at: SystemTime) {
        let now = Instant::now();
        let opens = netwatch_common::tcp_state::opens(t.old as u8, t.new as u8);
        if opens {
            if t.new != TcpState::Listen {
                self.per_second.count(now, self.origin, true);
            }
            let mut connection = Connection::new(t.tuple, t.new, owner.clone());
            connection.opened = Some(at);
            self.open.insert(t.skaddr, connection);
        }
        let connection = match self.open.get_mut(&t.skaddr) {
            Some(connection) => connection,
            None => {
                let known = self.unbound.remove(&t.tuple);
                let connection = known.unwrap_or_else(|| Connection::new(t.tuple, t.old, None));
                self.open.entry(t.skaddr).or_insert(connection)
            }
        };
        connection.tuple = t.tuple;
        if owner.is_some() {
            connection.owner = owner;
        }
        connection.record(at, t.old, t.new);
        // A closed connection's final bytes: the larger of the kernel's
        // last count (a connection older than netwatch: its whole life) and
        // netwatch's at the close (bytes written but never acknowledged).
        connection.bytes = ByteCounts {
            sent: connection.bytes.sent.max(t.bytes.sent),
            received: connection.bytes.received.max(t.bytes.received),
        };
        if t.new == TcpState::Close {
            if let Some(mut closed) = self.open.remove(&t.skaddr) {
                if t.old != TcpState::Listen {
                    self.per_second.count(now, self.origin, false);
                }
                closed.closed = Some(now);
                closed.lifetime = closed
                    .opened
                    .and_then(|opened| at.duration_since(opened).ok());
                closed.rates = (0.0, 0.0);
                self.keep(closed);
            }
        }
    }

    /// A socket's owner became another process.
    pub fn owner_changed(&mut self, skaddr: u64, new: &Owner, at: SystemTime) {
        if let Some(connection) = self.open.get_mut(&skaddr) {
            connection.handed_off |= connection.owner.is_some();
            connection.owner = Some(new.clone());
            connection.owner_changes.push((at, new.clone()));
        }
    }

    /// Counts what the engine lost.
    pub fn lost(&mut self, count: u64) {
        self.lost += count;
    }

    /// Updates the open sockets' bytes, rates, round trips and
    /// retransmissions: bytes as the kernel counts them where the tcp
    /// iterator read the socket (`ss -ti`'s acked and received), else as
    /// netwatch's programs count them.
    pub fn refresh(&mut self, refresh: &Refresh<'_>) {
        let now = Instant::now();
        let seconds = self
            .bytes_read_at
            .map(|at| now.saturating_duration_since(at).as_secs_f64())
            .filter(|seconds| *seconds > 0.0);
        self.bytes_read_at = Some(now);
        for (&skaddr, connection) in &mut self.open {
            let counted = refresh.counters.get(&skaddr);
            connection.counters = counted.copied().or(connection.counters);
            let counts = counted.map(|c| c.bytes).or_else(|| (refresh.bytes)(skaddr));
            let Some(counts) = counts else {
                continue;
            };
            let before = connection.bytes;
            connection.rates = match seconds {
                Some(seconds) => (
                    counts.sent.saturating_sub(before.sent) as f64 / seconds,
                    counts.received.saturating_sub(before.received) as f64 / seconds,
                ),
                None => (0.0, 0.0),
            };
            connection.bytes = counts;
        }
    }

    /// Forgets the closed connections older than `--keep-closed`, and
    /// moves the per-second counts on to now.
    pub fn expire(&mut self) {
        let now = Instant::now();
        while let Some(oldest) = self.closed.front() {
            let closed_at = oldest.closed.unwrap_or(now);
            if now.saturating_duration_since(closed_at) < self.keep_closed {
                break;
            }
            self.closed.pop_front();
        }
        self.per_second.advance(now, self.origin);
    }

    fn keep(&mut self, closed: Connection) {
        if self.closed.len() == CLOSED_LIMIT {
            self.closed.pop_front();
            self.closed_dropped += 1;
        }
        self.closed.push_back(closed);
    }

    /// Every connection shown: the open ones, then those closed lately.
    pub fn connections(&self) -> impl Iterator<Item = &Connection> {
        self.open
            .values()
            .chain(self.unbound.values())
            .chain(self.closed.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Record;
    use crate::output::fixtures::{connection, owner};

    fn replay(state: &mut TopState, records: &[Record]) {
        for record in records {
            match record {
                Record::Transition(t) => {
                    let owner = Some(owner(t.task.pid, "curl", None));
                    state.transition(
                        t,
                        owner,
                        SystemTime::UNIX_EPOCH + Duration::from_nanos(t.ts_ns),
                    );
                }
                Record::Owner(event) => {
                    let new = owner(event.task.pid, "nginx", None);
                    state.owner_changed(event.skaddr, &new, SystemTime::UNIX_EPOCH);
                }
                Record::Exec(_) => {}
            }
        }
    }

    #[test]
    fn a_connection_that_lived_a_moment_stays_closed_with_its_lifetime() {
        let mut state = TopState::new(true, Duration::from_secs(10));
        let mut ts_ns = 1_000_000_000;
        replay(&mut state, &connection(0, &mut ts_ns));
        assert!(state.open.is_empty(), "{:?}", state.open);
        assert_eq!(state.closed.len(), 2, "the client's side and the server's");
        let client = &state.closed[1];
        assert_eq!(client.state, TcpState::Close);
        assert_eq!(client.history.len(), 5);
        // Opened at its SYN_SENT, the first record, closed at the last,
        // 9 records of 20 µs later.
        assert_eq!(client.lifetime, Some(Duration::from_micros(180)));
        let server = &state.closed[0];
        assert!(server.handed_off || server.owner_changes.len() == 1);
        state.expire();
        assert_eq!(state.closed.len(), 2, "kept for 10 s");
        let (opens, closes) = state
            .per_second
            .seconds
            .iter()
            .fold((0, 0), |sum, s| (sum.0 + s.0, sum.1 + s.1));
        assert_eq!((opens, closes), (2, 2));
    }

    #[test]
    fn closed_connections_past_the_limit_are_dropped_and_counted() {
        let mut state = TopState::new(true, Duration::from_secs(3600));
        let mut ts_ns = 1_000_000_000;
        for index in 0..(CLOSED_LIMIT as u64 / 2 + 10) {
            replay(&mut state, &connection(index, &mut ts_ns));
        }
        assert_eq!(state.closed.len(), CLOSED_LIMIT);
        assert_eq!(state.closed_dropped, 20);
    }

    #[test]
    fn a_refresh_takes_the_kernels_counters_where_the_iterator_read_them() {
        let mut state = TopState::new(true, Duration::from_secs(10));
        let opened = |skaddr, tuple| {
            let states = (TcpState::SynSent, TcpState::Established);
            let task = crate::output::fixtures::task(1, 1, b"curl");
            Transition::scripted(1, skaddr, tuple, states, task)
        };
        let tuples = crate::output::fixtures::tuples();
        // 7 is read by the iterator, 8 (another namespace) is not.
        for (skaddr, tuple) in [(7, tuples[0]), (8, tuples[1])] {
            state.transition(&opened(skaddr, tuple), None, SystemTime::UNIX_EPOCH);
        }
        let refresh = |state: &mut TopState, sent| {
            let programs = |_| Some(ByteCounts { sent, received: 1 });
            let kernel = TcpCounters {
                bytes: ByteCounts { sent, received: 10 },
                rtt_us: 50,
                retransmits: 1,
            };
            state.refresh(&Refresh {
                bytes: &programs,
                counters: &[(7, kernel)].into_iter().collect(),
            });
        };
        refresh(&mut state, 100);
        std::thread::sleep(Duration::from_millis(50));
        refresh(&mut state, 1100);
        let connection = &state.open[&7];
        assert_eq!(
            connection.bytes,
            ByteCounts {
                sent: 1100,
                received: 10
            }
        );
        assert!(
            connection.rates.0 > 1000.0 && connection.rates.0 <= 20_000.0,
            "{:?}",
            connection.rates
        );
        assert_eq!(connection.rates.1, 0.0);
        assert_eq!(
            connection.counters.map(|c| (c.rtt_us, c.retransmits)),
            Some((50, 1))
        );
        let elsewhere = &state.open[&8];
        assert_eq!(
            elsewhere.bytes,
            ByteCounts {
                sent: 1100,
                received: 1
            }
        );
        assert_eq!(elsewhere.counters, None);
        // At the close, netwatch's count (bytes never acknowledged) is larger.
        let mut closed = opened(7, tuples[0]);
        (closed.old, closed.new) = (TcpState::Established, TcpState::Close);
        closed.bytes = ByteCounts {
            sent: 1500,
            received: 4,
        };
        state.transition(&closed, None, SystemTime::UNIX_EPOCH);
        let last = state.closed.back().expect("a closed connection");
        assert_eq!(
            last.bytes,
            ByteCounts {
                sent: 1500,
                received: 10
            }
        );
    }
}
