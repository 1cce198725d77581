//! The baseline: every socket with its owning process, as `netstat -p`
//! joins them. Read from /proc, or as root by netwatch's iterators in the
//! kernel (same records, each with its kernel address); the /proc path
//! stays for everything the kernel cannot read.

mod cgroups;
mod kernel_table;
mod proc_net;
mod processes;

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::thread;

use rustc_hash::FxHashMap;

pub use kernel_table::{tcp_counters, KernelRead, KernelReader};
#[cfg(feature = "fuzzing")]
pub use proc_net::parse_table;
use proc_net::SocketCounts;
pub use proc_net::{ProcSocket, ProcTable};
use processes::InodeOwners;
pub use processes::{process_image, program_name};

use crate::model::{ImageSlot, Owner, Proto};

/// A socket from /proc/net and, when it could be found, its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotEntry {
    pub socket: ProcSocket,
    /// The lowest pid holding it, as netstat shows one.
    pub owner: Option<Owner>,
    /// Every pid holding it (an fd of it), lowest first, as `ss -p` lists them.
    pub pids: Vec<u32>,
}

/// One reading of the socket tables, joined with their owners.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub entries: Vec<SnapshotEntry>,
    /// Lines of the /proc tables that could not be parsed (skipped).
    pub malformed_lines: usize,
    /// Some processes' fds were unreadable, so some owners are unknown.
    pub owners_incomplete: bool,
    /// The TCP sockets were read in the kernel (each with its address), not from /proc.
    pub in_kernel: bool,
}

/// Whether a snapshot finds the processes holding each socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owners {
    Skip,
    Find,
}

/// Takes a snapshot of the given tables of netwatch's network namespace:
/// in the kernel when `kernel` is given and can read them, else from /proc.
pub fn take(
    protos: &[Proto],
    owners: Owners,
    kernel: Option<&mut dyn KernelReader>,
) -> io::Result<Snapshot> {
    take_in(&[], protos, owners, kernel)
}

/// Takes a snapshot of every network namespace that has a process: netwatch's
/// own, then each other one (through one of its processes), its sockets
/// marked with the namespace's inode. Owners are found across all of them
/// (socket inodes are unique host-wide).
pub fn take_every_namespace(
    protos: &[Proto],
    owners: Owners,
    kernel: Option<&mut dyn KernelReader>,
) -> io::Result<Snapshot> {
    take_in(&other_namespaces(), protos, owners, kernel)
}

/// Calls `each` with every socket of `protos`' /proc tables, in every
/// network namespace that has a process (marked with the namespace's inode
/// when not netwatch's own), reading a chunk at a time: what it costs in
/// memory does not grow with the tables, unlike a [`take`].
pub fn scan_every_namespace(protos: &[Proto], each: &mut dyn FnMut(ProcSocket)) -> io::Result<()> {
    let others = other_namespaces();
    for &proto in protos {
        proc_net::scan_file(proto, "/proc", each)?;
        for (netns, task) in &others {
            // A namespace whose task left meanwhile has no sockets to read.
            let _ = proc_net::scan_file_of(proto, task, *netns, each);
        }
    }
    Ok(())
}

/// Reads netwatch's own tables and those of `others` (namespace inode, a
/// /proc task directory in it): in the kernel if it can, else from /proc,
/// silently (the records are the same).
fn take_in(
    others: &[(u32, String)],
    protos: &[Proto],
    owners: Owners,
    kernel: Option<&mut dyn KernelReader>,
) -> io::Result<Snapshot> {
    if let Some(kernel) = kernel.filter(|_| protos.iter().any(|proto| proto.is_tcp())) {
        match take_in_kernel(kernel, others, protos, owners) {
            Ok(snapshot) => return Ok(snapshot),
            Err(err) => {
                log::debug!("reading the sockets in the kernel failed, reading /proc: {err:#}")
            }
        }
    }
    take_from_proc(others, protos, owners)
}

/// The TCP tables from the kernel's tcp iterator, the owners from its fd
/// iterator, and from /proc the UDP tables (if asked for) and the TCP tables
/// of the namespaces the kernel read could not enter (without CAP_SYS_ADMIN).
fn take_in_kernel(
    kernel: &mut dyn KernelReader,
    others: &[(u32, String)],
    protos: &[Proto],
    owners: Owners,
) -> anyhow::Result<Snapshot> {
    let mut sockets = Vec::new();
    let (fds, not_entered) =
        kernel.read(others, owners == Owners::Find, &mut |record, netns| {
            if let Some(socket) = kernel_table::to_proc_socket(&record, netns) {
                if protos.contains(&socket.proto) {
                    sockets.push(socket);
                }
            }
        })?;
    let mut malformed_lines = 0;
    for &proto in protos {
        let table = match proto.is_tcp() {
            true => read_tables_of(proto, &not_entered),
            false => read_tables(proto, others)?,
        };
        sockets.extend(table.sockets);
        malformed_lines += table.malformed_lines;
    }
    Ok(Snapshot {
        in_kernel: true,
        ..join_owners(sockets, malformed_lines, fds.map(InodeOwners::from_records))
    })
}

/// Reads the /proc tables on a thread each (every one walks the kernel's
/// whole hash of sockets), and finds the owners on two more meanwhile.
fn take_from_proc(
    others: &[(u32, String)],
    protos: &[Proto],
    owners: Owners,
) -> io::Result<Snapshot> {
    let (tables, owners) = thread::scope(|scope| {
        let readers: Vec<_> = protos
            .iter()
            .map(|&proto| scope.spawn(move || read_tables(proto, others)))
            .collect();
        let owners = match owners {
            Owners::Skip => None,
            Owners::Find => Some(processes::walk_proc_fds(FD_SCAN_THREADS)),
        };
        let tables: Vec<io::Result<ProcTable>> = readers
            .into_iter()
            .map(|reader| {
                reader
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("a /proc reader thread panicked")))
            })
            .collect();
        (tables, owners)
    });
    let mut sockets = Vec::new();
    let mut malformed_lines = 0;
    for table in tables {
        let table = table?;
        sockets.extend(table.sockets);
        malformed_lines += table.malformed_lines;
    }
    Ok(join_owners(sockets, malformed_lines, owners))
}

/// One /proc table of netwatch's namespace and of each of `others`.
fn read_tables(proto: Proto, others: &[(u32, String)]) -> io::Result<ProcTable> {
    let mut table = proc_net::read_table(proto)?;
    let other = read_tables_of(proto, others);
    table.sockets.extend(other.sockets);
    table.malformed_lines += other.malformed_lines;
    Ok(table)
}

/// One /proc table of each of `others` (namespace inode, a task in it).
fn read_tables_of(proto: Proto, others: &[(u32, String)]) -> ProcTable {
    let mut table = ProcTable::default();
    for (netns, task) in others {
        let other = proc_net::read_table_of(proto, task, *netns);
        table.sockets.extend(other.sockets);
        table.malformed_lines += other.malformed_lines;
    }
    table
}

#[cfg(test)]
impl SnapshotEntry {
    /// A TCP socket as /proc would list it, for tests.
    pub fn of(
        tuple: &crate::model::Tuple,
        state: crate::model::TcpState,
        owner: Option<Owner>,
    ) -> SnapshotEntry {
        SnapshotEntry {
            socket: ProcSocket {
                proto: tuple.proto,
                local: tuple.local,
                remote: tuple.remote,
                state,
                tx_queue: 0,
                rx_queue: 0,
                uid: 0,
                inode: 1,
                timewait: false,
                netns: None,
                kernel: None,
            },
            pids: owner.iter().map(|owner| owner.pid).collect(),
            owner,
        }
    }

    /// The same socket as the kernel's iterator read it, for tests.
    pub fn read_in_kernel(mut self, skaddr: u64, read_ns: u64) -> SnapshotEntry {
        self.socket.kernel = Some(proc_net::KernelSocket { skaddr, read_ns });
        self
    }
}

/// Each network namespace other than netwatch's that a thread is in (a
/// thread can leave its process's), as (namespace inode, the
/// `/proc/PID/task/TID` directory of one such thread).
fn other_namespaces() -> Vec<(u32, String)> {
    let own = own_netns();
    let mut found: HashMap<u32, String> = HashMap::new();
    for pid in numbered_entries("/proc") {
        for tid in numbered_entries(&format!("/proc/{pid}/task")) {
            let task = format!("{pid}/task/{tid}");
            if let Some(netns) = netns_of(&task).filter(|&netns| Some(netns) != own) {
                found.entry(netns).or_insert(format!("/proc/{task}"));
            }
        }
    }
    found.into_iter().collect()
}

/// The numeric names in a directory (pids, tids).
fn numbered_entries(dir: &str) -> Vec<u32> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The inode number of netwatch's own network namespace, whose sockets
/// /proc/net shows (`net:[4026531840]` read from /proc/self/ns/net).
pub fn own_netns() -> Option<u32> {
    netns_of("self")
}

/// The network namespace inode of process `pid` ("self" for netwatch, or
/// `PID/task/TID` for a thread).
pub fn netns_of(pid: &str) -> Option<u32> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    let link = link.to_str()?;
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// TCP sockets open in netwatch's network namespace, TIME_WAIT included, as
/// /proc/net/sockstat and sockstat6 count them (0 if unreadable).
pub fn tcp_sockets_in_use() -> u64 {
    SocketCounts::read("/proc").map_or(0, |counts| counts.tcp_sockets())
}

/// Gives each entry's owner its command line and executable, read once per process.
pub fn add_images<'a>(entries: impl IntoIterator<Item = &'a mut SnapshotEntry>) {
    let mut images: FxHashMap<u32, Arc<ImageSlot>> = FxHashMap::default();
    for owner in entries.into_iter().filter_map(|entry| entry.owner.as_mut()) {
        let image = images
            .entry(owner.pid)
            .or_insert_with(|| ImageSlot::filled(process_image(owner.pid, None, None)));
        owner.image = Some(image.clone());
    }
}

/// Threads that walk /proc/[pid]/fd, each over part of the pids.
const FD_SCAN_THREADS: usize = 2;

fn join_owners(
    sockets: Vec<ProcSocket>,
    malformed_lines: usize,
    owners: Option<InodeOwners>,
) -> Snapshot {
    let owners_incomplete = owners.as_ref().is_some_and(|owners| owners.incomplete);
    let owners = owners.unwrap_or_default();
    let mut names: FxHashMap<u32, Option<Arc<str>>> = FxHashMap::default();
    let entries = sockets
        .into_iter()
        .map(|socket| {
            let owner = owners.pids.get(&socket.inode).and_then(|&pid| {
                let program = names
                    .entry(pid)
                    .or_insert_with(|| program_name(pid).map(Arc::from));
                Some(Owner::new(pid, program.clone()?))
            });
            let pids = owners.holders(socket.inode);
            SnapshotEntry {
                socket,
                owner,
                pids,
            }
        })
        .collect();
    Snapshot {
        entries,
        malformed_lines,
        owners_incomplete,
        in_kernel: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_network_namespace_is_an_inode_number() {
        let netns = own_netns().expect("/proc/self/ns/net is readable");
        assert_eq!(netns_of(&std::process::id().to_string()), Some(netns));
        assert_eq!(netns_of("0"), None);
    }
}
