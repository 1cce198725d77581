//! The processes that own the table's sockets: one shared record per
//! process (pid and start time), renamed by `exec()`, with what it runs
//! where the table reads that.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use super::SocketTable;
use crate::model::{ImageSlot, Owner, Task};

/// A process that owns sockets in the table. Its name (and what it runs,
/// where the table reads that) follows `exec()`.
#[derive(Debug)]
pub struct Process {
    pub pid: u32,
    /// When it started, once the kernel said (a baseline owner's is unknown).
    pub(super) start_ns: Cell<Option<u64>>,
    pub(super) name: RefCell<Arc<str>>,
    /// The cgroup (v2) id the kernel last gave for it.
    pub(super) cgroup_id: Cell<Option<u64>>,
    /// What it runs, where the table reads that: `None` until asked for
    /// (or while the reader had no room).
    pub(super) image: RefCell<Option<Arc<ImageSlot>>>,
}

impl Process {
    fn new(
        pid: u32,
        start_ns: Option<u64>,
        cgroup_id: Option<u64>,
        name: Arc<str>,
        image: Option<Arc<ImageSlot>>,
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

    /// Whether what it runs was asked for and is still being read.
    pub fn image_on_its_way(&self) -> bool {
        self.image
            .borrow()
            .as_deref()
            .is_some_and(|slot| slot.get().is_none())
    }

    /// Whether a task with this start time and name is this process: the
    /// start times decide when both are known, else the names.
    pub(super) fn is(&self, start_ns: Option<u64>, name: &str) -> bool {
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

/// A kernel task name: the bytes before the first NUL.
fn comm_bytes(comm: &[u8; 16]) -> &[u8] {
    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    &comm[..len]
}

/// A kernel task name as text.
pub(super) fn comm_name(comm: &[u8; 16]) -> Arc<str> {
    String::from_utf8_lossy(comm_bytes(comm)).into()
}

/// Looks up a process name by pid (`/proc/PID/comm` in production).
pub type NameLookup = fn(u32) -> Option<String>;

/// Processes remembered at most; past this, those that own no socket are forgotten.
const PROCESS_LIMIT: usize = 4096;
impl SocketTable {
    /// A process called `exec()`: the sockets it owns now show its new name.
    pub fn exec(&mut self, task: &Task) {
        if let Some(process) = self.processes.get(&task.pid).cloned() {
            let name = comm_name(&task.comm);
            if process.start_ns.get().is_none() || process.start_ns.get() == task.start_ns {
                process.start_ns.set(task.start_ns);
                process
                    .cgroup_id
                    .set(task.cgroup_id.or(process.cgroup_id.get()));
                *process.name.borrow_mut() = name;
                *process.image.borrow_mut() = self.read_image(task);
            }
        }
    }

    /// The process of a task the kernel named. Without its start time (the
    /// kernel's layout unknown), the name is looked up once per pid, as
    /// netstat would, or is the thread's when the process is gone.
    pub(super) fn process_of(&mut self, task: &Task) -> Rc<Process> {
        if task.start_ns.is_none() {
            if let Some(known) = self.processes.get(&task.pid) {
                return known.clone();
            }
            let name = (self.lookup_name)(task.pid)
                .map(Arc::from)
                .unwrap_or_else(|| comm_name(&task.comm));
            return self.process(task, name);
        }
        // The common case, a process seen before under the same name, allocates nothing.
        if let Some(known) = self.processes.get(&task.pid).cloned() {
            if known.start_ns.get() == task.start_ns
                && known.name.borrow().as_bytes() == comm_bytes(&task.comm)
                && known.cgroup_id.get() == task.cgroup_id
            {
                if self.images.is_some() && known.image.borrow().is_none() {
                    // The reader had no room when the process was first seen.
                    *known.image.borrow_mut() = self.read_image(task);
                }
                return known;
            }
        }
        self.process(task, comm_name(&task.comm))
    }

    /// The record of the task's process, named `name`: the one the table
    /// has if it is the same process (learning its start time, or a new
    /// name the kernel gave with the same start time), else a new one,
    /// which a reused pid gets.
    pub(super) fn process(&mut self, task: &Task, name: Arc<str>) -> Rc<Process> {
        let (pid, start_ns, cgroup_id) = (task.pid, task.start_ns, task.cgroup_id);
        if let Some(known) = self.processes.get(&pid).cloned() {
            if known.is(start_ns, &name) {
                if start_ns.is_some() {
                    known.start_ns.set(start_ns);
                    // Renamed by an exec whose own event is still to come,
                    // or moved to another cgroup: what it runs is read again.
                    let moved = cgroup_id.is_some() && known.cgroup_id.get() != cgroup_id;
                    if *known.name.borrow() != name || moved {
                        *known.name.borrow_mut() = name;
                        known.cgroup_id.set(cgroup_id.or(known.cgroup_id.get()));
                        *known.image.borrow_mut() = self.read_image(task);
                    }
                }
                return known;
            }
        }
        if self.processes.len() >= PROCESS_LIMIT {
            // Keep the processes that own sockets; forget the rest.
            self.processes
                .retain(|_, process| Rc::strong_count(process) > 1);
        }
        let image = self.read_image(task);
        let process = Process::new(pid, start_ns, cgroup_id, name, image);
        self.processes.insert(pid, process.clone());
        process
    }

    /// Asks for what the task's process runs, where the table reads that.
    pub(super) fn read_image(&mut self, task: &Task) -> Option<Arc<ImageSlot>> {
        self.images.as_mut()?.ask(
            task.pid,
            task.start_ns,
            task.cgroup_id,
            task.command_line.clone(),
        )
    }
}
