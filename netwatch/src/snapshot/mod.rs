//! The /proc baseline: every socket with its owning process, as `netstat -p` joins them.

mod proc_net;
mod processes;

use std::collections::HashMap;
use std::thread;

pub use proc_net::{parse_line, parse_table, ProcSocket};
pub use processes::program_name;

use crate::socket::{Owner, Proto};

/// A socket from /proc/net and, when it could be found, its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotEntry {
    pub socket: ProcSocket,
    pub owner: Option<Owner>,
}

/// One reading of the socket tables, joined with their owners.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub entries: Vec<SnapshotEntry>,
    /// Lines of the /proc tables that could not be parsed (skipped).
    pub malformed_lines: usize,
    /// Some processes' fds were unreadable, so some owners are unknown.
    pub owners_incomplete: bool,
}

/// Takes a snapshot of the given tables. With `resolve_owners`, /proc/[pid]/fd
/// is walked on a second thread while the tables are read.
pub fn take(protos: &[Proto], resolve_owners: bool) -> std::io::Result<Snapshot> {
    let (tables, owners) = thread::scope(|scope| {
        let owners = resolve_owners.then(|| scope.spawn(processes::scan_socket_inodes));
        let tables = read_tables(protos);
        let owners = owners.map(|handle| handle.join().unwrap_or_default());
        (tables, owners)
    });
    let (sockets, malformed_lines) = tables?;
    let mut snapshot = Snapshot {
        entries: Vec::with_capacity(sockets.len()),
        malformed_lines,
        owners_incomplete: owners.as_ref().is_some_and(|owners| owners.incomplete),
    };
    let pids = owners.map(|owners| owners.pids).unwrap_or_default();
    let mut names: HashMap<u32, Option<String>> = HashMap::new();
    for socket in sockets {
        let owner = pids.get(&socket.inode).and_then(|&pid| {
            let program = names.entry(pid).or_insert_with(|| program_name(pid));
            Some(Owner {
                pid,
                program: program.clone()?,
            })
        });
        snapshot.entries.push(SnapshotEntry { socket, owner });
    }
    Ok(snapshot)
}

fn read_tables(protos: &[Proto]) -> std::io::Result<(Vec<ProcSocket>, usize)> {
    let mut sockets = Vec::new();
    let mut malformed = 0;
    for &proto in protos {
        let table = proc_net::read_table(proto)?;
        sockets.extend(table.sockets);
        malformed += table.malformed_lines;
    }
    Ok((sockets, malformed))
}
