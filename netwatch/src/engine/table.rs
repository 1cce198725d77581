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
use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;

use crate::model::{
    Direction, Owner, OwnerChange, OwnerEvent, ProcessImage, Proto, Task, TcpState, Transition,
    Tuple,
};
use crate::snapshot::Snapshot;

/// A process that owns sockets in the table. Its name (and what it runs,
/// where the table reads that) follows `exec()`.
#[derive(Debug)]
pub struct Process {
    pub pid: u32,
    /// When it started, once the kernel said (a baseline owner's is unknown).
    start_ns: Cell<Option<u64>>,
    name: RefCell<Arc<str>>,
    /// The cgroup (v2) id the kernel last gave for it.
    cgroup_id: Cell<Option<u64>>,
    image: RefCell<Option<Arc<ProcessImage>>>,
}

impl Process {
    fn new(
        pid: u32,
        start_ns: Option<u64>,
        cgroup_id: Option<u64>,
        name: Arc<str>,
        image: Option<Arc<ProcessImage>>,
    ) -> Rc<Process> {
        Rc::new(Process {
            pid,
            start_ns: Cell::new(start_ns),
            name: RefCell::new(name),
            cgroup_id: Cell::new(cgroup_id),
            image: RefCell::new(image),
        })
    }

    /// A process as `owner` names it, for tests of what records show.
    #[cfg(test)]
    pub fn of(owner: &Owner) -> Rc<Process> {
        Process::new(
            owner.pid,
            None,
            None,
            owner.program.clone(),
            owner.image.clone(),
        )
    }

    /// The process as records name it: its pid, current name and image.
    pub fn owner(&self) -> Owner {
        Owner {
            pid: self.pid,
            program: self.name.borrow().clone(),
            image: self.image.borrow().clone(),
        }
    }

    /// Whether a task with this start time and name is this process: the
    /// start times decide when both are known, else the names.
    fn is(&self, start_ns: Option<u64>, name: &str) -> bool {
        match (self.start_ns.get(), start_ns) {
            (Some(known), Some(start_ns)) => known == start_ns,
            _ => *self.name.borrow().as_ref() == *name,
        }
    }
}

impl PartialEq for Process {
    fn eq(&self, other: &Process) -> bool {
        self.pid == other.pid
            && self.start_ns == other.start_ns
            && *self.name.borrow() == *other.name.borrow()
    }
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

/// A kernel task name: the bytes before the first NUL.
fn comm_bytes(comm: &[u8; 16]) -> &[u8] {
    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    &comm[..len]
}

/// A kernel task name as text.
fn comm_name(comm: &[u8; 16]) -> Arc<str> {
    String::from_utf8_lossy(comm_bytes(comm)).into()
}

/// Looks up a process name by pid (`/proc/PID/comm` in production).
pub type NameLookup = fn(u32) -> Option<String>;

/// Reads what process `pid`, started at the given time and in the given
/// cgroup if known, runs ([`crate::snapshot::process_image`] in production).
pub type ImageLookup = fn(u32, Option<u64>, Option<u64>) -> ProcessImage;

/// A listening socket, to give accepted sockets their owner.
#[derive(Debug)]
struct Listener {
    proto: Proto,
    ip: IpAddr,
    netns: Option<u32>,
    process: Option<Rc<Process>>,
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
    lookup_image: Option<ImageLookup>,
    /// Sockets that reached CLOSE lately, with the state they left.
    closed: FxHashMap<u64, TcpState>,
    capacity: usize,
    evicted: u64,
    /// Sockets found freed without a traced CLOSE (their address reused).
    vanished: u64,
}

/// Processes remembered at most; past this, those that own no socket are forgotten.
const PROCESS_LIMIT: usize = 4096;
/// Closed sockets remembered at most, to recognise a duplicated close.
const CLOSED_LIMIT: usize = 65536;

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
            lookup_image: None,
            closed: FxHashMap::default(),
            capacity: capacity.max(1),
            evicted: 0,
            vanished: 0,
        }
    }

    /// From now on, reads each owner's command line and executable with
    /// `lookup`, once per process (and again after it calls `exec()`).
    pub fn read_images(&mut self, lookup: ImageLookup) {
        self.lookup_image = Some(lookup);
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
                .map(|owner| self.process(owner.pid, None, None, owner.program.clone()));
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
    pub fn image_of(&self, pid: u32) -> Option<Arc<ProcessImage>> {
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
            None => t.new == TcpState::Close && self.closed.get(&t.skaddr) == Some(&t.old),
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

    /// A process called `exec()`: the sockets it owns now show its new name.
    pub fn exec(&mut self, task: &Task) {
        if let Some(process) = self.processes.get(&task.pid) {
            let name = comm_name(&task.comm);
            if process.start_ns.get().is_none() || process.start_ns.get() == task.start_ns {
                process.start_ns.set(task.start_ns);
                process
                    .cgroup_id
                    .set(task.cgroup_id.or(process.cgroup_id.get()));
                *process.name.borrow_mut() = name;
                *process.image.borrow_mut() =
                    self.read_image(task.pid, task.start_ns, task.cgroup_id);
            }
        }
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

    /// The process of a task the kernel named. Without its start time (the
    /// kernel's layout unknown), the name is looked up once per pid, as
    /// netstat would, or is the thread's when the process is gone.
    fn process_of(&mut self, task: &Task) -> Rc<Process> {
        if task.start_ns.is_none() {
            if let Some(known) = self.processes.get(&task.pid) {
                return known.clone();
            }
            let name = (self.lookup_name)(task.pid)
                .map(Arc::from)
                .unwrap_or_else(|| comm_name(&task.comm));
            return self.process(task.pid, None, task.cgroup_id, name);
        }
        // The common case, a process seen before under the same name, allocates nothing.
        if let Some(known) = self.processes.get(&task.pid) {
            if known.start_ns.get() == task.start_ns
                && known.name.borrow().as_bytes() == comm_bytes(&task.comm)
                && known.cgroup_id.get() == task.cgroup_id
            {
                return known.clone();
            }
        }
        self.process(
            task.pid,
            task.start_ns,
            task.cgroup_id,
            comm_name(&task.comm),
        )
    }

    /// The record of process `pid`: the one the table has if it is the same
    /// process (learning its start time, or a new name the kernel gave with
    /// the same start time), else a new one, which a reused pid gets.
    fn process(
        &mut self,
        pid: u32,
        start_ns: Option<u64>,
        cgroup_id: Option<u64>,
        name: Arc<str>,
    ) -> Rc<Process> {
        if let Some(known) = self.processes.get(&pid) {
            if known.is(start_ns, &name) {
                if start_ns.is_some() {
                    known.start_ns.set(start_ns);
                    // Renamed by an exec whose own event is still to come,
                    // or moved to another cgroup: what it runs is read again.
                    let moved = cgroup_id.is_some() && known.cgroup_id.get() != cgroup_id;
                    if *known.name.borrow() != name || moved {
                        *known.name.borrow_mut() = name;
                        known.cgroup_id.set(cgroup_id.or(known.cgroup_id.get()));
                        *known.image.borrow_mut() = self.read_image(pid, start_ns, cgroup_id);
                    }
                }
                return known.clone();
            }
        }
        if self.processes.len() >= PROCESS_LIMIT {
            // Keep the processes that own sockets; forget the rest.
            self.processes
                .retain(|_, process| Rc::strong_count(process) > 1);
        }
        let image = self.read_image(pid, start_ns, cgroup_id);
        let process = Process::new(pid, start_ns, cgroup_id, name, image);
        self.processes.insert(pid, process.clone());
        process
    }

    fn read_image(
        &self,
        pid: u32,
        start_ns: Option<u64>,
        cgroup_id: Option<u64>,
    ) -> Option<Arc<ProcessImage>> {
        self.lookup_image
            .map(|lookup| Arc::new(lookup(pid, start_ns, cgroup_id)))
    }

    fn listener_owner(&self, accepted: &Transition) -> Option<Rc<Process>> {
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
        matching(true).or_else(|| matching(false))?.process.clone()
    }

    fn add_listener(&mut self, socket: &LiveSocket) {
        self.listeners
            .entry(socket.tuple.local.port())
            .or_default()
            .push(Listener {
                proto: socket.tuple.proto,
                ip: socket.tuple.local.ip(),
                netns: socket.netns,
                process: socket.process.clone(),
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
    use crate::model::OwnerCause;
    use crate::snapshot::SnapshotEntry;
    use TcpState::*;

    fn fake_names(pid: u32) -> Option<String> {
        (pid < 1000).then(|| format!("proc{pid}"))
    }

    fn owner(pid: u32) -> Option<Owner> {
        fake_names(pid).map(|program| Owner::new(pid, program.into()))
    }

    fn tuple(local: &str, remote: &str) -> Tuple {
        Tuple {
            proto: Proto::Tcp,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
        }
    }

    /// A transition by a task without a start time, as without BTF: names
    /// are looked up.
    fn transition(
        ts_ms: u64,
        skaddr: u64,
        tuple: Tuple,
        old: TcpState,
        new: TcpState,
        task: u32,
    ) -> Transition {
        let task = Task {
            pid: task,
            comm: comm(&format!("thread{task}")),
            start_ns: None,
            cgroup_id: None,
        };
        transition_by(ts_ms, skaddr, tuple, (old, new), task)
    }

    fn comm(name: &str) -> [u8; 16] {
        let mut comm = [0u8; 16];
        comm[..name.len()].copy_from_slice(name.as_bytes());
        comm
    }

    /// A process as the kernel names it: pid, start time and name.
    fn task(pid: u32, start_ns: u64, name: &str) -> Task {
        Task {
            pid,
            comm: comm(name),
            start_ns: Some(start_ns),
            cgroup_id: None,
        }
    }

    fn named(pid: u32, program: &str) -> Option<Owner> {
        Some(Owner::new(pid, program.into()))
    }

    /// A transition of a socket of uid 1000 in namespace 1, by `task`.
    fn transition_by(
        ts_ms: u64,
        skaddr: u64,
        tuple: Tuple,
        states: (TcpState, TcpState),
        task: Task,
    ) -> Transition {
        Transition {
            uid: Some(1000),
            netns: Some(1),
            ..Transition::scripted(ts_ms * 1_000_000, skaddr, tuple, states, task)
        }
    }

    fn owner_event(
        skaddr: u64,
        tuple: Tuple,
        state: TcpState,
        task: Task,
        cause: OwnerCause,
    ) -> OwnerEvent {
        OwnerEvent {
            ts_ns: 0,
            skaddr,
            tuple,
            state: Some(state),
            task,
            uid: Some(1000),
            netns: Some(1),
            cause,
        }
    }

    /// A listener of `master` on port 80 and a connection to it accepted
    /// into the kernel (socket 2), before accept() returns it.
    fn listener_with_pending_connection(master: Task) -> (SocketTable, Tuple) {
        let mut table = SocketTable::new(fake_names, 1000);
        let listen = tuple("0.0.0.0:80", "0.0.0.0:0");
        let child = tuple("127.0.0.1:80", "127.0.0.1:5000");
        table.apply(&transition_by(1, 1, listen, (Close, Listen), master));
        table.apply(&transition(2, 2, child, Listen, SynRecv, 0));
        table.apply(&transition(3, 2, child, SynRecv, Established, 0));
        (table, child)
    }

    #[test]
    fn the_worker_that_accepts_owns_the_socket_from_then_on() {
        let (mut table, child) = listener_with_pending_connection(task(100, 1, "nginx"));
        let worker = task(101, 2, "nginx");
        let change = table
            .set_owner(&owner_event(
                2,
                child,
                Established,
                worker,
                OwnerCause::Accept,
            ))
            .expect("the owner changes");
        assert_eq!(change.old, named(100, "nginx"));
        assert_eq!(change.new, Owner::new(101, "nginx".into()));
        assert_eq!(
            (change.tuple, change.state, change.cause),
            (child, Established, OwnerCause::Accept)
        );
        for (ts, old, new) in [
            (4, Established, CloseWait),
            (5, CloseWait, LastAck),
            (6, LastAck, Close),
        ] {
            let seen = table.apply(&transition(ts, 2, child, old, new, 7));
            assert_eq!(seen.owner, named(101, "nginx"), "{old} -> {new}");
        }
    }

    #[test]
    fn accept_by_the_listener_owner_changes_nothing() {
        let master = task(100, 1, "server");
        let (mut table, child) = listener_with_pending_connection(master.clone());
        let accepted = owner_event(2, child, Established, master, OwnerCause::Accept);
        assert_eq!(table.set_owner(&accepted), None);
        assert!(!table.sockets().any(|(_, socket)| socket.owner_changed));
    }

    #[test]
    fn a_forked_child_that_serves_takes_the_socket_over() {
        let parent = task(100, 1, "server");
        let (mut table, child) = listener_with_pending_connection(parent.clone());
        table.set_owner(&owner_event(
            2,
            child,
            Established,
            parent,
            OwnerCause::Accept,
        ));
        // The child sends first: the kernel reports a handoff.
        let forked = task(150, 9, "server");
        let change = table
            .set_owner(&owner_event(
                2,
                child,
                Established,
                forked.clone(),
                OwnerCause::Handoff,
            ))
            .expect("the child takes over");
        assert_eq!((change.old, change.new.pid), (named(100, "server"), 150));
        // It sends again (an LRU eviction in the kernel repeats the event): no change.
        assert_eq!(
            table.set_owner(&owner_event(
                2,
                child,
                Established,
                forked,
                OwnerCause::Handoff
            )),
            None
        );
        let closed = table.apply(&transition(9, 2, child, LastAck, Close, 0));
        assert_eq!(closed.owner, named(150, "server"));
        assert!(closed.closed.expect("closed").owner_changed);
    }

    #[test]
    fn an_exec_renames_the_sockets_its_process_owns() {
        let mut table = SocketTable::new(fake_names, 1000);
        let conn = tuple("127.0.0.1:5000", "127.0.0.1:80");
        table.apply(&transition_by(
            1,
            7,
            conn,
            (Close, SynSent),
            task(300, 5, "sh"),
        ));
        table.exec(&task(300, 5, "curl"));
        let seen = table.apply(&transition(2, 7, conn, SynSent, Established, 0));
        assert_eq!(seen.owner, named(300, "curl"));
        // An exec by another process that had pid 300 renames nothing.
        table.exec(&task(300, 6, "wget"));
        let seen = table.apply(&transition(3, 7, conn, Established, FinWait1, 0));
        assert_eq!(seen.owner, named(300, "curl"));
    }

    /// Reads a fake image: the exe names the pid, the start time and the
    /// number of reads so far.
    fn counted_image(pid: u32, start_ns: Option<u64>, cgroup_id: Option<u64>) -> ProcessImage {
        use std::sync::atomic::{AtomicU32, Ordering};
        static READS: AtomicU32 = AtomicU32::new(0);
        let read = READS.fetch_add(1, Ordering::Relaxed) + 1;
        ProcessImage {
            exe: Some(format!("{pid}@{start_ns:?}/{cgroup_id:?}#{read}").into()),
            ..ProcessImage::default()
        }
    }

    #[test]
    fn what_a_process_runs_is_read_once_and_again_after_exec() {
        let mut table = SocketTable::new(fake_names, 1000);
        table.read_images(counted_image);
        let exe = |seen: &Observed| {
            let owner = seen.owner.as_ref().expect("an owner");
            let image = owner.image.as_ref().expect("an image");
            image.exe.as_deref().map(str::to_owned).expect("an exe")
        };
        let conn = |port: u16| tuple(&format!("127.0.0.1:{port}"), "127.0.0.1:80");
        let connect = |table: &mut SocketTable, skaddr: u64, start_ns: u64, name: &str| {
            let opening = (Close, SynSent);
            table.apply(&transition_by(
                1,
                skaddr,
                conn(skaddr as u16),
                opening,
                task(300, start_ns, name),
            ))
        };
        let first = exe(&connect(&mut table, 7, 5, "sh"));
        assert!(first.starts_with("300@Some(5)/None#"), "{first}");
        // The same process again: no new read.
        assert_eq!(exe(&connect(&mut table, 8, 5, "sh")), first);
        // exec(): read again, for every socket it owns.
        table.exec(&task(300, 5, "curl"));
        let seen = table.apply(&transition(2, 7, conn(7), SynSent, Established, 0));
        let after_exec = exe(&seen);
        assert_ne!(after_exec, first);
        assert!(after_exec.starts_with("300@Some(5)/None#"), "{after_exec}");
        // Moved to another cgroup: read again, with the new id.
        let mut moved = task(300, 5, "curl");
        moved.cgroup_id = Some(42);
        let opening = (Close, SynSent);
        let seen = table.apply(&transition_by(3, 10, conn(10), opening, moved));
        assert!(
            exe(&seen).starts_with("300@Some(5)/Some(42)#"),
            "{}",
            exe(&seen)
        );
        // A reused pid: a read of its own.
        let reused = exe(&connect(&mut table, 9, 6, "wget"));
        assert!(reused.starts_with("300@Some(6)/None#"), "{reused}");
    }

    #[test]
    fn a_reused_pid_never_shows_the_previous_process_name() {
        let mut table = SocketTable::new(fake_names, 1000);
        let first = tuple("127.0.0.1:5000", "127.0.0.1:80");
        let second = tuple("127.0.0.1:5001", "127.0.0.1:80");
        table.apply(&transition_by(
            1,
            7,
            first,
            (Close, SynSent),
            task(300, 5, "nginx"),
        ));
        let seen = table.apply(&transition_by(
            2,
            8,
            second,
            (Close, SynSent),
            task(300, 6, "curl"),
        ));
        assert_eq!(seen.owner, named(300, "curl"));
        // Even with the same name, a new start time is another process: exec of one renames only it.
        table.exec(&task(300, 6, "wget"));
        let old = table.apply(&transition(3, 7, first, SynSent, Established, 0));
        assert_eq!(old.owner, named(300, "nginx"));
        let new = table.apply(&transition(3, 8, second, SynSent, Established, 0));
        assert_eq!(new.owner, named(300, "wget"));
    }

    #[test]
    fn owner_events_adopt_baseline_sockets_and_first_seen_ones() {
        let mut table = SocketTable::new(fake_names, 1000);
        let conn = tuple("127.0.0.1:80", "127.0.0.1:5000");
        let listen = tuple("0.0.0.0:81", "0.0.0.0:0");
        table.reset_from(
            &baseline(&[(conn, Established, 42), (listen, Listen, 42)]),
            Some(1),
        );
        // The baseline named proc42 without a start time; the kernel now names it with one.
        let same = owner_event(
            9,
            conn,
            Established,
            task(42, 3, "proc42"),
            OwnerCause::Handoff,
        );
        assert_eq!(table.set_owner(&same), None);
        assert_eq!(table.len(), 2);
        let other = owner_event(
            9,
            conn,
            Established,
            task(43, 4, "worker"),
            OwnerCause::Handoff,
        );
        assert_eq!(table.set_owner(&other).map(|c| c.old), Some(owner(42)));
        // A listener keeps the process that called listen().
        let on_listener = owner_event(
            10,
            listen,
            Listen,
            task(43, 4, "worker"),
            OwnerCause::Handoff,
        );
        assert_eq!(table.set_owner(&on_listener), None);
        // A socket never seen: joins in a state that lasts, with no previous owner.
        let unseen = tuple("127.0.0.1:82", "127.0.0.1:6000");
        let change = table.set_owner(&owner_event(
            11,
            unseen,
            CloseWait,
            task(44, 5, "w"),
            OwnerCause::Accept,
        ));
        assert_eq!(change.map(|c| (c.old, c.state)), Some((None, CloseWait)));
        assert_eq!(table.len(), 3);
        // ... but not on its way out.
        let closing = tuple("127.0.0.1:83", "127.0.0.1:6001");
        assert_eq!(
            table.set_owner(&owner_event(
                12,
                closing,
                Close,
                task(44, 5, "w"),
                OwnerCause::Handoff
            )),
            None
        );
        assert_eq!(table.len(), 3);
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

    /// A baseline read in the kernel: (skaddr, tuple, state, owner pid), each read at `read_ms`.
    fn kernel_baseline(sockets: &[(u64, Tuple, TcpState, u32)], read_ms: u64) -> Snapshot {
        let mut snapshot = baseline(
            &sockets
                .iter()
                .map(|&(_, tuple, state, pid)| (tuple, state, pid))
                .collect::<Vec<_>>(),
        );
        snapshot.entries = snapshot
            .entries
            .into_iter()
            .zip(sockets)
            .map(|(entry, &(skaddr, ..))| entry.read_in_kernel(skaddr, read_ms * 1_000_000))
            .collect();
        snapshot
    }

    #[test]
    fn a_baseline_read_in_the_kernel_joins_by_address_not_tuple() {
        let mut table = SocketTable::new(fake_names, 1000);
        let conn = tuple("127.0.0.1:5000", "127.0.0.1:80");
        table.reset_from(&kernel_baseline(&[(5, conn, Established, 42)], 10), Some(1));
        assert_eq!(
            table.sockets().next().map(|(skaddr, _)| skaddr),
            Some(Some(5))
        );
        // The transition names another tuple (as one without its namespace
        // or port would): the address alone finds the socket.
        let other_view = tuple("127.0.0.1:0", "127.0.0.1:80");
        let first = table.apply(&transition(11, 5, other_view, Established, FinWait1, 99));
        assert_eq!(first.owner, owner(42));
        assert_eq!(table.len(), 1);
        let closed = table.apply(&transition(12, 5, conn, FinWait2, Close, 99));
        assert_eq!(
            closed.closed.map(|socket| socket.process.map(|p| p.pid)),
            Some(Some(42))
        );
        assert!(table.is_empty());
    }

    #[test]
    fn transitions_stamped_before_the_kernel_read_a_socket_count_it_once() {
        let mut table = SocketTable::new(fake_names, 1000);
        let conn = tuple("127.0.0.1:5000", "127.0.0.1:80");
        // The iterator read the socket at 10 ms, after connect() at 1 ms and
        // its establishment at 2 ms; those transitions are applied after the read.
        table.reset_from(&kernel_baseline(&[(5, conn, Established, 42)], 10), Some(1));
        let opened = table.apply(&transition(1, 5, conn, Close, SynSent, 42));
        assert_eq!(
            opened.replaced, None,
            "the same socket, not one freed unseen"
        );
        table.apply(&transition(2, 5, conn, SynSent, Established, 7));
        assert_eq!(table.len(), 1);
        assert_eq!(table.vanished(), 0);
        let (_, socket) = table.sockets().next().unwrap();
        assert_eq!(
            (socket.state, socket.direction),
            (Established, Direction::Out)
        );
        assert_eq!(socket.owner(), owner(42));
    }

    #[test]
    fn a_close_stamped_before_the_kernel_read_is_an_earlier_socket_at_that_address() {
        let mut table = SocketTable::new(fake_names, 1000);
        let earlier = tuple("127.0.0.1:5000", "127.0.0.1:80");
        let read = tuple("127.0.0.1:6000", "127.0.0.1:80");
        table.reset_from(&kernel_baseline(&[(5, read, Established, 42)], 10), Some(1));
        let closed = table.apply(&transition(3, 5, earlier, FinWait2, Close, 0));
        assert_eq!(closed.closed.map(|socket| socket.tuple), Some(earlier));
        assert_eq!(closed.owner, None);
        assert_eq!(table.len(), 1, "the socket the baseline read stays");
        let after = table.apply(&transition(11, 5, read, Established, FinWait1, 0));
        assert_eq!(after.owner, owner(42));
        assert_eq!(table.vanished(), 0);
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
        assert_eq!((replaced.tuple, replaced.owner()), (first, owner(10)));
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
        assert_eq!(seen.owner, Some(Owner::new(5000, "thread5000".into())));
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
