//! The live socket table: kept current from state transitions alone.
//!
//! Sockets are keyed by the kernel's socket address (`skaddr`), which every
//! transition carries. A baseline read in the kernel has it too, and joins
//! exactly: each socket carries when it was read, so that the transitions
//! queued up during the read and stamped before it (already in what was
//! read) neither count a socket twice nor close the wrong one. Baseline
//! sockets from /proc cannot be keyed that way (the `pointer` column of
//! /proc/net/tcp is hashed), so they wait in an `unbound` map keyed by
//! their address/port tuple until their first transition names them. A
//! socket leaves the table when it reaches CLOSE.
//!
//! The table is bounded: past `capacity` sockets, the ones that changed
//! least recently are evicted (a socket whose close was lost would
//! otherwise stay forever), as the kernel's LRU map of byte counts does.
//!
//! Who owns a socket: the process that called `connect()` or `listen()`;
//! for an accepted socket, its listener's owner until the first process
//! sends or receives on it (or, with the accept hook, until `accept()`
//! returns it), then that process; and from then on, whichever process
//! last sent or received on it when that was not the owner (owner events,
//! see [`SocketTable::set_owner`]). Owners are shared [`Process`] records, so
//! that a process's `exec()` renames all its sockets' owner at once, and a
//! pid reused by another process gets a record of its own.

use rustc_hash::FxHashMap;
use std::rc::Rc;
use std::sync::Arc;

use crate::model::{
    Direction, ImageSlot, Owner, OwnerChange, OwnerEvent, Task, TcpState, Transition, Tuple,
};
use crate::snapshot::Snapshot;

mod closes;
mod listeners;
mod process;

use crate::engine::images::ImageReader;
use closes::RecentCloses;
use listeners::Listener;
pub use process::{NameLookup, Process};

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

impl Observed {
    /// Whether what an owner it shows runs is still being read.
    pub fn waits_for_image(&self) -> bool {
        let closing = [&self.closed, &self.replaced];
        self.owner.as_ref().is_some_and(Owner::image_on_its_way)
            || closing
                .into_iter()
                .flatten()
                .filter_map(|socket| socket.process.as_deref())
                .any(Process::image_on_its_way)
    }
}

/// A socket the table tracks.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveSocket {
    pub tuple: Tuple,
    pub state: TcpState,
    /// Its owner (see the module documentation).
    pub process: Option<Rc<Process>>,
    /// Whether its owner changed from one process to another while the table held it.
    pub owner_changed: bool,
    /// Whether it reached ESTABLISHED: seen doing so, or first seen in a
    /// state past the handshake.
    pub established: bool,
    pub uid: Option<u32>,
    pub netns: Option<u32>,
    pub direction: Direction,
    /// When the socket opened (connect, accept or listen), if the table saw it.
    pub opened_ns: Option<u64>,
    /// When the socket entered `state`, if the table saw it happen.
    pub since_ns: Option<u64>,
    /// The state before `state`, if the table saw the transition.
    pub previous: Option<TcpState>,
    /// When a baseline read it in the kernel: its transitions stamped
    /// before then are already in what was read.
    pub read_ns: Option<u64>,
}

impl LiveSocket {
    /// A socket first seen in mid-life: a baseline socket, or one whose opening was lost.
    pub fn unknown(tuple: Tuple, state: TcpState, process: Option<Rc<Process>>) -> LiveSocket {
        LiveSocket {
            tuple,
            state,
            process,
            owner_changed: false,
            established: matches!(
                state,
                TcpState::Established
                    | TcpState::FinWait1
                    | TcpState::FinWait2
                    | TcpState::CloseWait
                    | TcpState::LastAck
                    | TcpState::Closing
                    | TcpState::TimeWait
            ),
            uid: None,
            netns: None,
            direction: Direction::Unknown,
            opened_ns: None,
            since_ns: None,
            previous: None,
            read_ns: None,
        }
    }

    /// Its owner's pid and current name.
    pub fn owner(&self) -> Option<Owner> {
        self.process.as_ref().map(|process| process.owner())
    }
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
    /// The owners seen lately, by pid (one process per pid at a time).
    processes: FxHashMap<u32, Rc<Process>>,
    /// Names a process when the kernel could not (no BTF).
    lookup_name: NameLookup,
    /// Reads each owner's command line and executable, where asked to.
    images: Option<ImageReader>,
    /// Sockets that reached CLOSE lately, with the state they left.
    closed: RecentCloses,
    capacity: usize,
    evicted: u64,
    /// Sockets found freed without a traced CLOSE (their address reused).
    vanished: u64,
}

/// Whether a transition starts a new socket (`tcp_state::opens`, the state
/// program's rule too).
fn opens(old: TcpState, new: TcpState) -> bool {
    netwatch_common::tcp_state::opens(old as u8, new as u8)
}

/// Moves `socket` to the transition's new state; returns the milliseconds
/// it spent in the old one, when the table saw it enter that.
fn advance(socket: &mut LiveSocket, t: &Transition) -> Option<f64> {
    let ms_in_old_state = socket
        .since_ns
        .map(|since| t.ts_ns.saturating_sub(since) as f64 / 1e6);
    socket.tuple = t.tuple;
    socket.previous = Some(t.old);
    socket.state = t.new;
    socket.established |= t.new == TcpState::Established;
    socket.since_ns = Some(t.ts_ns);
    socket.uid = socket.uid.or(t.uid);
    socket.netns = socket.netns.or(t.netns);
    ms_in_old_state
}

/// Whether a socket first seen in this state (through an owner event) can
/// join the table: not one on its way in or out, which a transition will
/// name soon, nor a listener.
fn lasts(state: TcpState) -> bool {
    !matches!(
        state,
        TcpState::Close
            | TcpState::TimeWait
            | TcpState::SynSent
            | TcpState::SynRecv
            | TcpState::NewSynRecv
            | TcpState::Listen
    )
}

impl SocketTable {
    /// An empty table of at most `capacity` sockets that names processes with `lookup_name`.
    pub fn new(lookup_name: NameLookup, capacity: usize) -> SocketTable {
        SocketTable {
            bound: FxHashMap::default(),
            unbound: FxHashMap::default(),
            baseline_netns: None,
            listeners: FxHashMap::default(),
            processes: FxHashMap::default(),
            lookup_name,
            images: None,
            closed: RecentCloses::default(),
            capacity: capacity.max(1),
            evicted: 0,
            vanished: 0,
        }
    }

    /// From now on, reads each owner's command line and executable with
    /// `reader`, once per process (and again after it calls `exec()`).
    pub fn read_images(&mut self, reader: ImageReader) {
        self.images = Some(reader);
    }

    /// Sends the image reads asked for since the last call (see
    /// [`ImageReader::send`]): after each batch of events.
    pub fn send_image_reads(&mut self) {
        if let Some(images) = &mut self.images {
            images.send();
        }
    }

    /// Whether an image asked for is still being read.
    pub fn reading_images(&self) -> bool {
        self.images.as_ref().is_some_and(ImageReader::reading)
    }

    /// Replaces the contents with the TCP sockets of a snapshot taken in
    /// network namespace `netns` (its sockets of other namespaces say
    /// which). TIME_WAIT mini sockets (whatever substate /proc prints) are
    /// left out: they have no owner and no transition ends them.
    pub fn reset_from(&mut self, snapshot: &Snapshot, netns: Option<u32>) {
        self.bound.clear();
        self.unbound.clear();
        self.listeners.clear();
        self.processes.clear();
        self.baseline_netns = netns;
        self.bound.reserve(snapshot.entries.len());
        for entry in &snapshot.entries {
            let socket = &entry.socket;
            if !socket.proto.is_tcp() || socket.state == TcpState::TimeWait || socket.timewait {
                continue;
            }
            let tuple = socket.tuple();
            let process = entry
                .owner
                .as_ref()
                .map(|owner| self.process(&Task::of_pid(owner.pid), owner.program.clone()));
            let mut live = LiveSocket::unknown(tuple, socket.state, process);
            live.uid = Some(socket.uid);
            live.netns = socket.netns.or(netns);
            live.read_ns = socket.kernel.map(|kernel| kernel.read_ns);
            if socket.state == TcpState::Listen {
                self.add_listener(&live);
            }
            match socket.kernel {
                Some(kernel) => self.bound.insert(kernel.skaddr, live),
                None => self.unbound.insert((live.netns, tuple), live),
            };
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

    /// What the table read of process `pid` (where it reads images).
    pub fn image_of(&self, pid: u32) -> Option<Arc<ImageSlot>> {
        self.processes.get(&pid)?.image.borrow().clone()
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

    /// Forgets the socket at kernel address `skaddr`, found freed without
    /// a traced CLOSE (counted as vanished); `None` if the table has none.
    pub fn forget_freed(&mut self, skaddr: u64) -> Option<LiveSocket> {
        let socket = self.bound.remove(&skaddr)?;
        self.count_vanished(&socket);
        Some(socket)
    }

    /// Counts `socket`, taken out of the table, as freed without a traced
    /// CLOSE (a listener leaves the listeners too).
    fn count_vanished(&mut self, socket: &LiveSocket) {
        if socket.state == TcpState::Listen {
            self.remove_listener(socket);
        }
        self.vanished += 1;
    }

    /// Whether a recovered transition repeats one already applied. A socket
    /// never makes the same change twice in a row, so this is exact: the
    /// recovery program sends a duplicate only when a softirq interrupts it
    /// before it sees that the transition program sent the transition.
    pub fn is_duplicate(&self, t: &Transition) -> bool {
        match self.bound.get(&t.skaddr) {
            Some(socket) => socket.state == t.new && socket.previous == Some(t.old),
            None => t.new == TcpState::Close && self.closed.latest(t.skaddr) == Some(t.old),
        }
    }

    /// Applies one transition and says who owns the socket.
    pub fn apply(&mut self, t: &Transition) -> Observed {
        let read_later = self
            .bound
            .get(&t.skaddr)
            .and_then(|socket| socket.read_ns)
            .is_some_and(|read_ns| t.ts_ns < read_ns);
        if read_later && t.new == TcpState::Close {
            // The baseline read a later socket at this address: this one
            // closed before, unknown to the table.
            return Observed {
                owner: None,
                ms_in_old_state: None,
                closed: Some(LiveSocket::unknown(t.tuple, t.old, None)),
                replaced: None,
            };
        }
        if let Some(observed) = self.apply_in_place(t) {
            return observed;
        }
        let mut replaced = None;
        let mut socket = if opens(t.old, t.new) {
            replaced = self.bound.remove(&t.skaddr);
            let mut socket = self.new_socket(t);
            match replaced.take() {
                // The baseline read this very socket after it opened.
                Some(read) if read_later => {
                    if read.state == TcpState::Listen {
                        self.remove_listener(&read);
                    }
                    socket.process = socket.process.or(read.process);
                    socket.read_ns = read.read_ns;
                }
                Some(stale) => {
                    self.count_vanished(&stale);
                    replaced = Some(stale);
                }
                None => {}
            }
            socket
        } else {
            match self.bound.remove(&t.skaddr) {
                Some(socket) => socket,
                None => self
                    .take_unbound(t)
                    .unwrap_or_else(|| LiveSocket::unknown(t.tuple, t.old, None)),
            }
        };
        if socket.state == TcpState::Listen && t.new != TcpState::Listen {
            self.remove_listener(&socket);
        }
        let ms_in_old_state = advance(&mut socket, t);
        if t.tuple.local.port() != 0 {
            // The baseline may have read this socket after the transitions began.
            if let Some(duplicate) = self.take_unbound(t) {
                socket.process = socket.process.or(duplicate.process);
            }
        }
        let owner = socket.owner();
        let mut closed = None;
        match t.new {
            TcpState::Close => {
                self.closed.remember(t.skaddr, t.old);
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

    /// The common case, a socket the table holds moving on to a state it
    /// stays in the table with (no open, close or listen): updated where it is.
    fn apply_in_place(&mut self, t: &Transition) -> Option<Observed> {
        if opens(t.old, t.new) || matches!(t.new, TcpState::Close | TcpState::Listen) {
            return None;
        }
        let socket = self
            .bound
            .get_mut(&t.skaddr)
            .filter(|socket| socket.state != TcpState::Listen)?;
        let ms_in_old_state = advance(socket, t);
        if t.tuple.local.port() != 0 && !self.unbound.is_empty() {
            // The baseline may have read this socket after the transitions began.
            let key = (t.netns.or(self.baseline_netns), t.tuple);
            if let Some(duplicate) = self.unbound.remove(&key) {
                socket.process = socket.process.take().or(duplicate.process);
            }
        }
        Some(Observed {
            owner: socket.owner(),
            ms_in_old_state,
            closed: None,
            replaced: None,
        })
    }

    /// Applies an owner event: the socket's owner becomes the event's
    /// process. Returns the change when that is another process than the
    /// table's owner. A socket the table does not hold yet joins it (a
    /// baseline socket by its tuple, or one first seen here in a state that
    /// lasts). Listeners keep the process that called `listen()`.
    pub fn set_owner(&mut self, e: &OwnerEvent) -> Option<OwnerChange> {
        if !self.bound.contains_key(&e.skaddr) {
            let socket = match self
                .unbound
                .remove(&(e.netns.or(self.baseline_netns), e.tuple))
            {
                Some(baseline) => baseline,
                None => {
                    let state = e.state.filter(|&state| lasts(state))?;
                    LiveSocket {
                        uid: e.uid,
                        netns: e.netns,
                        ..LiveSocket::unknown(e.tuple, state, None)
                    }
                }
            };
            self.insert(e.skaddr, socket);
        }
        let process = self.process_of(&e.task);
        let socket = self.bound.get_mut(&e.skaddr)?;
        if socket.state == TcpState::Listen {
            return None;
        }
        let old = socket.process.replace(process.clone());
        if let Some(old) = &old {
            if old.pid == process.pid && old.is(process.start_ns.get(), &process.name.borrow()) {
                return None;
            }
            socket.owner_changed = true;
        }
        Some(OwnerChange {
            skaddr: e.skaddr,
            tuple: socket.tuple,
            state: socket.state,
            old: old.map(|old| old.owner()),
            new: process.owner(),
            cause: e.cause,
        })
    }

    fn insert(&mut self, skaddr: u64, socket: LiveSocket) {
        self.bound.insert(skaddr, socket);
        self.evict_beyond_capacity();
    }

    /// The baseline socket of this transition's namespace and tuple (a
    /// transition without a known namespace is taken for netwatch's own).
    fn take_unbound(&mut self, t: &Transition) -> Option<LiveSocket> {
        if self.unbound.is_empty() {
            return None;
        }
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
    /// context; an accepted socket (LISTEN -> SYN_RECV) belongs to its
    /// listener's owner until an owner event names its first user.
    fn new_socket(&mut self, t: &Transition) -> LiveSocket {
        let (owner, direction) = match (t.old, t.new) {
            (TcpState::Listen, _) => (self.listener_owner(t), Direction::In),
            (_, TcpState::SynSent) => (Some(self.process_of(&t.task)), Direction::Out),
            (_, TcpState::Listen) => (Some(self.process_of(&t.task)), Direction::Unknown),
            _ => (None, Direction::Unknown),
        };
        LiveSocket {
            direction,
            opened_ns: Some(t.ts_ns),
            since_ns: Some(t.ts_ns),
            ..LiveSocket::unknown(t.tuple, t.old, owner)
        }
    }
}

#[cfg(test)]
mod tests;
