//! The live socket table: kept current from state transitions alone.
//!
//! Sockets are keyed by the kernel's socket address (`skaddr`), which every
//! transition carries. Baseline sockets from /proc cannot be keyed that way
//! (the `pointer` column of /proc/net/tcp is hashed), so they wait in an
//! `unbound` map keyed by their address/port tuple until their first
//! transition names them. A socket leaves the table when it reaches CLOSE.
//!
//! The table is bounded: past `capacity` sockets, the ones that changed
//! least recently are evicted (a socket whose close was lost would
//! otherwise stay forever), as the kernel's LRU map of byte counts does.

use netwatch_common::ByteCounts;
use rustc_hash::FxHashMap;
use std::net::{IpAddr, SocketAddr};

use crate::snapshot::Snapshot;
use crate::socket::{Direction, Owner, Proto, TcpState};

/// Protocol and both endpoints: what identifies a connection across /proc and eBPF.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub proto: Proto,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// One state change reported by the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub skaddr: u64,
    pub tuple: Tuple,
    pub old: TcpState,
    pub new: TcpState,
    /// The task on the CPU: the owner only when it opens the socket (connect, listen).
    pub task_pid: u32,
    /// That task's thread name (NUL-padded), used when its process is already gone.
    pub task_comm: [u8; 16],
    /// The socket's uid, when the kernel's layout was known.
    pub uid: Option<u32>,
    /// The socket's network namespace inode, when the kernel's layout was known.
    pub netns: Option<u32>,
    /// At a change to CLOSE, what the socket carried (when bytes are
    /// counted); when a socket opens, what the previous one at its address
    /// carried, if that one left without a traced CLOSE.
    pub bytes: ByteCounts,
    /// Sent by the recovery program: a skipped call, or a duplicate.
    pub recovered: bool,
}

/// A transition with what the table knows of its socket.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub owner: Option<Owner>,
    /// Milliseconds spent in the old state; `None` for a baseline socket's first transition.
    pub ms_in_old_state: Option<f64>,
    /// The socket, when this transition closed it (it left the table).
    pub closed: Option<LiveSocket>,
    /// The socket that held this address before an opening transition: it
    /// was freed without a traced change to CLOSE (Linux 6.18 does that to a
    /// few orphaned FIN_WAIT1 sockets under churn), and has left the table.
    pub replaced: Option<LiveSocket>,
}

/// A socket the table tracks.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveSocket {
    pub tuple: Tuple,
    pub state: TcpState,
    pub owner: Option<Owner>,
    pub uid: Option<u32>,
    pub netns: Option<u32>,
    pub direction: Direction,
    /// When the socket opened (connect, accept or listen), if the table saw it.
    pub opened_ns: Option<u64>,
    /// When the socket entered `state`, if the table saw it happen.
    pub since_ns: Option<u64>,
    /// The state before `state`, if the table saw the transition.
    pub previous: Option<TcpState>,
}

impl LiveSocket {
    /// A socket first seen in mid-life: a baseline socket, or one whose opening was lost.
    pub fn unknown(tuple: Tuple, state: TcpState, owner: Option<Owner>) -> LiveSocket {
        LiveSocket {
            tuple,
            state,
            owner,
            uid: None,
            netns: None,
            direction: Direction::Unknown,
            opened_ns: None,
            since_ns: None,
            previous: None,
        }
    }
}

/// A kernel task name: the bytes before the first NUL.
fn comm_name(comm: &[u8; 16]) -> String {
    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..len]).into_owned()
}

/// Looks up a process name by pid (`/proc/PID/comm` in production).
pub type NameLookup = fn(u32) -> Option<String>;

/// A listening socket, to give accepted sockets their owner.
#[derive(Debug)]
struct Listener {
    proto: Proto,
    ip: IpAddr,
    netns: Option<u32>,
    owner: Option<Owner>,
}

/// The table, see the module documentation.
#[derive(Debug)]
pub struct SocketTable {
    bound: FxHashMap<u64, LiveSocket>,
    /// Baseline sockets not yet named by a transition, by namespace and tuple.
    unbound: FxHashMap<(Option<u32>, Tuple), LiveSocket>,
    /// netwatch's own namespace, where /proc/net is read.
    baseline_netns: Option<u32>,
    /// Listening sockets by local port.
    listeners: FxHashMap<u16, Vec<Listener>>,
    names: FxHashMap<u32, String>,
    lookup_name: NameLookup,
    /// Sockets that reached CLOSE lately, with the state they left.
    closed: FxHashMap<u64, TcpState>,
    capacity: usize,
    evicted: u64,
    /// Sockets found freed without a traced CLOSE (their address reused).
    vanished: u64,
}

/// Process names cached at most; the cache is cleared when it grows past this.
const NAME_CACHE_LIMIT: usize = 4096;
/// Closed sockets remembered at most, to recognise a duplicated close.
const CLOSED_LIMIT: usize = 65536;

/// Whether a transition starts a new socket: connect() and listen() leave
/// CLOSE, an accepted socket leaves its listener's LISTEN.
fn opens(old: TcpState, new: TcpState) -> bool {
    old == TcpState::Close || (old == TcpState::Listen && new != TcpState::Close)
}

impl SocketTable {
    /// An empty table of at most `capacity` sockets that names processes with `lookup_name`.
    pub fn new(lookup_name: NameLookup, capacity: usize) -> SocketTable {
        SocketTable {
            bound: FxHashMap::default(),
            unbound: FxHashMap::default(),
            baseline_netns: None,
            listeners: FxHashMap::default(),
            names: FxHashMap::default(),
            lookup_name,
            closed: FxHashMap::default(),
            capacity: capacity.max(1),
            evicted: 0,
            vanished: 0,
        }
    }

    /// Replaces the contents with the TCP sockets of a snapshot taken in
    /// network namespace `netns` (its sockets of other namespaces say
    /// which). TIME_WAIT mini sockets (whatever substate /proc prints) are
    /// left out: they have no owner and no transition ends them.
    pub fn reset_from(&mut self, snapshot: &Snapshot, netns: Option<u32>) {
        self.bound.clear();
        self.unbound.clear();
        self.listeners.clear();
        self.names.clear();
        self.baseline_netns = netns;
        for entry in &snapshot.entries {
            let socket = &entry.socket;
            if !socket.proto.is_tcp() || socket.state == TcpState::TimeWait || socket.timewait {
                continue;
            }
            let tuple = Tuple {
                proto: socket.proto,
                local: socket.local,
                remote: socket.remote,
            };
            let mut live = LiveSocket::unknown(tuple, socket.state, entry.owner.clone());
            live.uid = Some(socket.uid);
            live.netns = socket.netns.or(netns);
            if socket.state == TcpState::Listen {
                self.add_listener(&live);
            }
            self.unbound.insert((live.netns, tuple), live);
        }
        self.evict_beyond_capacity();
    }

    /// Number of sockets in the table.
    pub fn len(&self) -> usize {
        self.bound.len() + self.unbound.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sockets evicted so far because the table was full.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Sockets found gone without a traced change to CLOSE so far.
    pub fn vanished(&self) -> u64 {
        self.vanished
    }

    /// Every socket in the table, with its kernel address when a transition named it.
    pub fn sockets(&self) -> impl Iterator<Item = (Option<u64>, &LiveSocket)> {
        let bound = self
            .bound
            .iter()
            .map(|(&skaddr, socket)| (Some(skaddr), socket));
        bound.chain(self.unbound.values().map(|socket| (None, socket)))
    }

    /// Whether a recovered transition repeats one already applied. A socket
    /// never makes the same change twice in a row, so this is exact: the
    /// recovery program sends a duplicate only when a softirq interrupts it
    /// before it sees that the tracepoint program sent the transition.
    pub fn is_duplicate(&self, t: &Transition) -> bool {
        match self.bound.get(&t.skaddr) {
            Some(socket) => socket.state == t.new && socket.previous == Some(t.old),
            None => t.new == TcpState::Close && self.closed.get(&t.skaddr) == Some(&t.old),
        }
    }

    /// Applies one transition and says who owns the socket.
    pub fn apply(&mut self, t: &Transition) -> Observed {
        let mut replaced = None;
        let mut socket = if opens(t.old, t.new) {
            replaced = self.bound.remove(&t.skaddr);
            if let Some(stale) = &replaced {
                if stale.state == TcpState::Listen {
                    self.remove_listener(stale);
                }
                self.vanished += 1;
            }
            self.new_socket(t)
        } else {
            match self.bound.remove(&t.skaddr) {
                Some(socket) => socket,
                None => self
                    .take_unbound(t)
                    .unwrap_or_else(|| LiveSocket::unknown(t.tuple, t.old, None)),
            }
        };
        let ms_in_old_state = socket
            .since_ns
            .map(|since| t.ts_ns.saturating_sub(since) as f64 / 1e6);
        if socket.state == TcpState::Listen && t.new != TcpState::Listen {
            self.remove_listener(&socket);
        }
        socket.tuple = t.tuple;
        socket.previous = Some(t.old);
        socket.state = t.new;
        socket.since_ns = Some(t.ts_ns);
        socket.uid = socket.uid.or(t.uid);
        socket.netns = socket.netns.or(t.netns);
        if t.tuple.local.port() != 0 {
            // The baseline may have read this socket after the transitions began.
            if let Some(duplicate) = self.take_unbound(t) {
                socket.owner = socket.owner.or(duplicate.owner);
            }
        }
        let owner = socket.owner.clone();
        let mut closed = None;
        match t.new {
            TcpState::Close => {
                if self.closed.len() >= CLOSED_LIMIT {
                    self.closed.clear();
                }
                self.closed.insert(t.skaddr, t.old);
                closed = Some(socket);
            }
            TcpState::Listen => {
                self.add_listener(&socket);
                self.insert(t.skaddr, socket);
            }
            _ => self.insert(t.skaddr, socket),
        }
        Observed {
            owner,
            ms_in_old_state,
            closed,
            replaced,
        }
    }

    fn insert(&mut self, skaddr: u64, socket: LiveSocket) {
        self.bound.insert(skaddr, socket);
        self.evict_beyond_capacity();
    }

    /// The baseline socket with this transition's tuple, if it is in the baseline's namespace.
    /// The baseline socket of this transition's namespace and tuple (a
    /// transition without a known namespace is taken for netwatch's own).
    fn take_unbound(&mut self, t: &Transition) -> Option<LiveSocket> {
        self.unbound
            .remove(&(t.netns.or(self.baseline_netns), t.tuple))
    }

    /// Past capacity, evicts the eighth of the sockets that changed least
    /// recently (baseline sockets first), so that eviction is rare.
    fn evict_beyond_capacity(&mut self) {
        if self.len() <= self.capacity {
            return;
        }
        let mut ages: Vec<u64> = self
            .sockets()
            .map(|(_, socket)| socket.since_ns.unwrap_or(0))
            .collect();
        let evict = (self.len() - self.capacity).max(self.capacity / 8);
        let nth = evict.min(ages.len() - 1);
        let (_, &mut cutoff, _) = ages.select_nth_unstable(nth);
        let before = self.len();
        let keep = |socket: &LiveSocket| socket.since_ns.unwrap_or(0) > cutoff;
        self.unbound.retain(|_, socket| keep(socket));
        self.bound.retain(|_, socket| keep(socket));
        let listeners: Vec<LiveSocket> = self
            .sockets()
            .filter(|(_, socket)| socket.state == TcpState::Listen)
            .map(|(_, socket)| socket.clone())
            .collect();
        self.listeners.clear();
        listeners
            .iter()
            .for_each(|socket| self.add_listener(socket));
        self.evicted += (before - self.len()) as u64;
    }

    /// A socket that starts here: connect() and listen() run in the owner's
    /// context; an accepted socket (LISTEN -> SYN_RECV) belongs to its listener's owner.
    fn new_socket(&mut self, t: &Transition) -> LiveSocket {
        let (owner, direction) = match (t.old, t.new) {
            (TcpState::Listen, _) => (self.listener_owner(t), Direction::In),
            (_, TcpState::SynSent) => (Some(self.task_owner(t)), Direction::Out),
            (_, TcpState::Listen) => (Some(self.task_owner(t)), Direction::Unknown),
            _ => (None, Direction::Unknown),
        };
        LiveSocket {
            direction,
            opened_ns: Some(t.ts_ns),
            since_ns: Some(t.ts_ns),
            ..LiveSocket::unknown(t.tuple, t.old, owner)
        }
    }

    fn task_owner(&mut self, t: &Transition) -> Owner {
        if self.names.len() >= NAME_CACHE_LIMIT {
            self.names.clear();
        }
        let lookup_name = self.lookup_name;
        let program = self
            .names
            .entry(t.task_pid)
            .or_insert_with(|| lookup_name(t.task_pid).unwrap_or_else(|| comm_name(&t.task_comm)))
            .clone();
        Owner {
            pid: t.task_pid,
            program,
        }
    }

    fn listener_owner(&self, accepted: &Transition) -> Option<Owner> {
        let tuple = &accepted.tuple;
        let candidates = self.listeners.get(&tuple.local.port())?;
        let ip = tuple.local.ip();
        let matching = |exact: bool| {
            candidates.iter().find(|listener| {
                listener.proto == tuple.proto
                    && (listener.netns.is_none()
                        || accepted.netns.is_none()
                        || listener.netns == accepted.netns)
                    && if exact {
                        listener.ip == ip
                    } else {
                        listener.ip.is_unspecified()
                    }
            })
        };
        matching(true).or_else(|| matching(false))?.owner.clone()
    }

    fn add_listener(&mut self, socket: &LiveSocket) {
        self.listeners
            .entry(socket.tuple.local.port())
            .or_default()
            .push(Listener {
                proto: socket.tuple.proto,
                ip: socket.tuple.local.ip(),
                netns: socket.netns,
                owner: socket.owner.clone(),
            });
    }

    fn remove_listener(&mut self, socket: &LiveSocket) {
        let tuple = &socket.tuple;
        let port = tuple.local.port();
        if let Some(listeners) = self.listeners.get_mut(&port) {
            if let Some(at) = listeners.iter().position(|listener| {
                listener.proto == tuple.proto
                    && listener.ip == tuple.local.ip()
                    && listener.netns == socket.netns
            }) {
                listeners.swap_remove(at);
            }
            if listeners.is_empty() {
                self.listeners.remove(&port);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::SnapshotEntry;
    use TcpState::*;

    fn fake_names(pid: u32) -> Option<String> {
        (pid < 1000).then(|| format!("proc{pid}"))
    }

    fn owner(pid: u32) -> Option<Owner> {
        fake_names(pid).map(|program| Owner { pid, program })
    }

    fn tuple(local: &str, remote: &str) -> Tuple {
        Tuple {
            proto: Proto::Tcp,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
        }
    }

    fn transition(
        ts_ms: u64,
        skaddr: u64,
        tuple: Tuple,
        old: TcpState,
        new: TcpState,
        task: u32,
    ) -> Transition {
        Transition {
            ts_ns: ts_ms * 1_000_000,
            skaddr,
            tuple,
            old,
            new,
            task_pid: task,
            task_comm: {
                let mut comm = [0u8; 16];
                let name = format!("thread{task}");
                comm[..name.len()].copy_from_slice(name.as_bytes());
                comm
            },
            uid: Some(1000),
            netns: Some(1),
            bytes: ByteCounts::default(),
            recovered: false,
        }
    }

    fn baseline(sockets: &[(Tuple, TcpState, u32)]) -> Snapshot {
        Snapshot {
            entries: sockets
                .iter()
                .map(|&(tuple, state, pid)| SnapshotEntry::of(&tuple, state, owner(pid)))
                .collect(),
            ..Snapshot::default()
        }
    }

    #[test]
    fn connect_owner_sticks_to_every_later_transition() {
        let mut table = SocketTable::new(fake_names, 1000);
        let unbound = tuple("127.0.0.1:0", "127.0.0.1:80");
        let bound = tuple("127.0.0.1:5000", "127.0.0.1:80");
        assert_eq!(
            table
                .apply(&transition(1, 7, unbound, Close, SynSent, 10))
                .owner,
            owner(10)
        );
        // Later transitions run in softirq context on whatever task is current.
        let established = table.apply(&transition(3, 7, bound, SynSent, Established, 99));
        assert_eq!(established.owner, owner(10));
        assert_eq!(established.ms_in_old_state, Some(2.0));
        assert_eq!(
            table
                .apply(&transition(4, 7, bound, Established, FinWait1, 98))
                .owner,
            owner(10)
        );
        assert_eq!(table.len(), 1);
        assert_eq!(
            table
                .apply(&transition(5, 7, bound, FinWait2, Close, 97))
                .owner,
            owner(10)
        );
        assert!(table.is_empty());
    }

    #[test]
    fn accepted_sockets_belong_to_the_listener_owner() {
        let mut table = SocketTable::new(fake_names, 1000);
        let listen = tuple("0.0.0.0:80", "0.0.0.0:0");
        let child = tuple("127.0.0.1:80", "127.0.0.1:5000");
        table.apply(&transition(1, 1, listen, Close, Listen, 20));
        let syn_recv = table.apply(&transition(2, 2, child, Listen, SynRecv, 30));
        assert_eq!(syn_recv.owner, owner(20));
        assert_eq!(
            table
                .apply(&transition(3, 2, child, SynRecv, Established, 30))
                .owner,
            owner(20)
        );
        assert_eq!(
            table
                .apply(&transition(4, 2, child, LastAck, Close, 30))
                .owner,
            owner(20)
        );
        // The listener closes: accepted sockets no longer find it.
        table.apply(&transition(5, 1, listen, Listen, Close, 20));
        assert_eq!(
            table
                .apply(&transition(6, 3, child, Listen, SynRecv, 30))
                .owner,
            None
        );
    }

    #[test]
    fn an_exact_listener_wins_over_a_wildcard_and_families_stay_apart() {
        let mut table = SocketTable::new(fake_names, 1000);
        table.apply(&transition(
            1,
            1,
            tuple("0.0.0.0:80", "0.0.0.0:0"),
            Close,
            Listen,
            1,
        ));
        table.apply(&transition(
            1,
            2,
            tuple("127.0.0.2:80", "0.0.0.0:0"),
            Close,
            Listen,
            2,
        ));
        let v6 = Tuple {
            proto: Proto::Tcp6,
            local: "[::]:80".parse().unwrap(),
            remote: "[::]:0".parse().unwrap(),
        };
        table.apply(&transition(1, 3, v6, Close, Listen, 3));
        let to = |local: &str| tuple(local, "127.0.0.1:4000");
        assert_eq!(
            table
                .apply(&transition(2, 10, to("127.0.0.2:80"), Listen, SynRecv, 0))
                .owner,
            owner(2)
        );
        assert_eq!(
            table
                .apply(&transition(2, 11, to("127.0.0.3:80"), Listen, SynRecv, 0))
                .owner,
            owner(1)
        );
        let mapped = Tuple {
            proto: Proto::Tcp6,
            local: "[::ffff:127.0.0.1]:80".parse().unwrap(),
            remote: "[::ffff:127.0.0.1]:4000".parse().unwrap(),
        };
        assert_eq!(
            table
                .apply(&transition(2, 12, mapped, Listen, SynRecv, 0))
                .owner,
            owner(3)
        );
    }

    #[test]
    fn baseline_sockets_are_adopted_by_tuple_on_their_first_transition() {
        let mut table = SocketTable::new(fake_names, 1000);
        let conn = tuple("127.0.0.1:5000", "127.0.0.1:80");
        let waiting = tuple("127.0.0.1:5001", "127.0.0.1:80");
        table.reset_from(
            &baseline(&[(conn, Established, 42), (waiting, TimeWait, 43)]),
            Some(1),
        );
        assert_eq!(
            table.len(),
            1,
            "TIME_WAIT sockets stay out of the live table"
        );
        let first = table.apply(&transition(9, 5, conn, Established, FinWait1, 99));
        assert_eq!(first.owner, owner(42));
        assert_eq!(
            first.ms_in_old_state, None,
            "how long it was established is unknown"
        );
        assert_eq!(table.len(), 1);
        table.apply(&transition(10, 5, conn, FinWait2, Close, 99));
        assert!(table.is_empty());
    }

    #[test]
    fn a_socket_both_in_the_baseline_and_in_events_is_counted_once() {
        let mut table = SocketTable::new(fake_names, 1000);
        let conn = tuple("127.0.0.1:5000", "127.0.0.1:80");
        // The scan read the socket after connect() began; its events are applied after the scan.
        table.reset_from(&baseline(&[(conn, Established, 42)]), Some(1));
        table.apply(&transition(
            1,
            5,
            tuple("127.0.0.1:0", "127.0.0.1:80"),
            Close,
            SynSent,
            42,
        ));
        table.apply(&transition(2, 5, conn, SynSent, Established, 7));
        assert_eq!(table.len(), 1);
        assert_eq!(table.sockets().next().unwrap().1.state, Established);
    }

    #[test]
    fn equal_tuples_in_two_namespaces_stay_apart() {
        let mut table = SocketTable::new(fake_names, 1000);
        let conn = tuple("10.0.0.2:5000", "10.0.0.1:80");
        let mut snapshot = baseline(&[(conn, Established, 42), (conn, Established, 43)]);
        snapshot.entries[1].socket.netns = Some(2);
        table.reset_from(&snapshot, Some(1));
        assert_eq!(table.len(), 2);
        let mut other = transition(5, 9, conn, Established, FinWait1, 0);
        other.netns = Some(2);
        assert_eq!(table.apply(&other).owner, owner(43));
        let own = transition(6, 8, conn, Established, FinWait1, 0);
        assert_eq!(table.apply(&own).owner, owner(42));
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn a_reused_socket_address_starts_a_new_socket() {
        let mut table = SocketTable::new(fake_names, 1000);
        let first = tuple("127.0.0.1:5000", "127.0.0.1:80");
        table.apply(&transition(1, 5, first, Close, SynSent, 10));
        // Its close was lost; the kernel reuses the address for another process's socket.
        let second = table.apply(&transition(
            2,
            5,
            tuple("127.0.0.1:0", "127.0.0.1:81"),
            Close,
            SynSent,
            11,
        ));
        assert_eq!(second.owner, owner(11));
        assert_eq!(table.len(), 1);
        let replaced = second.replaced.expect("the first socket is handed back");
        assert_eq!((replaced.tuple, replaced.owner), (first, owner(10)));
        assert_eq!(table.vanished(), 1);
    }

    #[test]
    fn a_process_gone_before_lookup_keeps_its_thread_name() {
        let mut table = SocketTable::new(fake_names, 1000);
        let seen = table.apply(&transition(
            1,
            5,
            tuple("127.0.0.1:0", "127.0.0.1:80"),
            Close,
            SynSent,
            5000,
        ));
        assert_eq!(
            seen.owner,
            Some(Owner {
                pid: 5000,
                program: "thread5000".into()
            })
        );
    }

    #[test]
    fn a_repeated_transition_is_a_duplicate_and_a_new_one_is_not() {
        let mut table = SocketTable::new(fake_names, 1000);
        let conn = tuple("127.0.0.1:5000", "127.0.0.1:80");
        let established = transition(2, 7, conn, SynSent, Established, 1);
        table.apply(&transition(1, 7, conn, Close, SynSent, 1));
        assert!(
            !table.is_duplicate(&established),
            "not applied yet: a recovery"
        );
        table.apply(&established);
        assert!(table.is_duplicate(&established));
        let close = transition(3, 7, conn, Established, Close, 1);
        assert!(!table.is_duplicate(&close));
        table.apply(&close);
        assert!(
            table.is_duplicate(&close),
            "a duplicated close of a socket no longer in the table"
        );
        let other = transition(4, 8, conn, Established, Close, 1);
        assert!(!table.is_duplicate(&other));
    }

    #[test]
    fn an_unknown_socket_is_tracked_without_an_owner() {
        let mut table = SocketTable::new(fake_names, 1000);
        let conn = tuple("127.0.0.1:5000", "127.0.0.1:80");
        assert_eq!(
            table
                .apply(&transition(1, 5, conn, Established, CloseWait, 3))
                .owner,
            None
        );
        assert_eq!(table.len(), 1);
    }
}
