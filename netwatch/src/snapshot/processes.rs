//! Maps socket inodes to the processes that hold them, through /proc/[pid]/fd.
//!
//! The walk costs one `readlinkat` per fd, relative to an open fd directory
//! (procfs's `Process::fd` opens, stats and closes each fd as well, four
//! times the system calls); names come from procfs for the few owning pids.

use std::collections::hash_map::Entry;
use std::ffi::CStr;
use std::mem::MaybeUninit;

use rustc_hash::FxHashMap;
use rustix::fd::OwnedFd;
use rustix::fs::{openat, readlinkat_raw, Dir, Mode, OFlags, CWD};
use rustix::io::Errno;

use netwatch_common::SocketFd;

/// Socket inode -> pid, for every process whose fds could be read.
#[derive(Debug, Default)]
pub struct InodeOwners {
    /// The lowest pid holding each socket, netstat's choice of one owner.
    pub pids: FxHashMap<u64, u32>,
    /// The other pids holding a socket, for the few that more than one holds
    /// (after fork(), pre-fork workers' listener): unordered, each once.
    pub shared: FxHashMap<u64, Vec<u32>>,
    /// Some fd directories were not readable (not root): their sockets have no owner.
    pub incomplete: bool,
}

impl InodeOwners {
    /// Notes that process `pid` holds socket `inode`.
    pub fn add(&mut self, inode: u64, pid: u32) {
        match self.pids.entry(inode) {
            Entry::Vacant(first) => {
                first.insert(pid);
            }
            Entry::Occupied(mut lowest) => {
                let other = match pid.cmp(lowest.get()) {
                    std::cmp::Ordering::Equal => return,
                    std::cmp::Ordering::Less => lowest.insert(pid),
                    std::cmp::Ordering::Greater => pid,
                };
                let others = self.shared.entry(inode).or_default();
                if !others.contains(&other) {
                    others.push(other);
                }
            }
        }
    }

    /// Every pid holding socket `inode`, lowest first.
    pub fn holders(&self, inode: u64) -> Vec<u32> {
        let Some(&lowest) = self.pids.get(&inode) else {
            return Vec::new();
        };
        let mut pids = vec![lowest];
        if let Some(others) = self.shared.get(&inode) {
            pids.extend(others);
            pids[1..].sort_unstable();
        }
        pids
    }

    /// The holders the kernel's fd iterator listed.
    pub fn from_records(records: Vec<SocketFd>) -> InodeOwners {
        let mut owners = InodeOwners::default();
        owners.pids.reserve(records.len());
        for record in records {
            owners.add(record.inode, record.tgid);
        }
        owners
    }

    fn merge(&mut self, part: InodeOwners) {
        self.incomplete |= part.incomplete;
        for (inode, pid) in part.pids {
            self.add(inode, pid);
        }
        for (inode, pids) in part.shared {
            for pid in pids {
                self.add(inode, pid);
            }
        }
    }
}

/// Walks /proc/[pid]/fd of every process on `threads` threads.
pub fn walk_proc_fds(threads: usize) -> InodeOwners {
    let Ok(proc_dir) = open_dir(CWD, c"/proc") else {
        return InodeOwners {
            incomplete: true,
            ..InodeOwners::default()
        };
    };
    let pids: Vec<u32> = read_dir_names(&proc_dir)
        .into_iter()
        .filter_map(|name| name.to_str().ok()?.parse().ok())
        .collect();
    let threads = threads.max(1);
    let parts: Vec<InodeOwners> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|part| {
                let (pids, proc_dir) = (&pids, &proc_dir);
                scope.spawn(move || scan_pids(proc_dir, pids.iter().skip(part).step_by(threads)))
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| {
                worker.join().unwrap_or_else(|_| InodeOwners {
                    incomplete: true,
                    ..InodeOwners::default()
                })
            })
            .collect()
    });
    let mut owners = InodeOwners::default();
    for part in parts {
        owners.merge(part);
    }
    owners
}

fn scan_pids<'a>(proc_dir: &OwnedFd, pids: impl Iterator<Item = &'a u32>) -> InodeOwners {
    let mut owners = InodeOwners::default();
    for &pid in pids {
        let Ok(fd_path) = std::ffi::CString::new(format!("{pid}/fd")) else {
            continue;
        };
        match open_dir(proc_dir, &fd_path) {
            Ok(fd_dir) => collect_socket_fds(&fd_dir, pid, &mut owners),
            // The process exited during the scan: nothing to report.
            Err(Errno::NOENT) | Err(Errno::SRCH) => {}
            Err(_) => owners.incomplete = true,
        }
    }
    owners
}

fn collect_socket_fds(fd_dir: &OwnedFd, pid: u32, owners: &mut InodeOwners) {
    let mut target = [MaybeUninit::<u8>::uninit(); 64];
    for name in read_dir_names(fd_dir) {
        // An fd closed since readdir fails here and is skipped.
        let Ok((link, _)) = readlinkat_raw(fd_dir, name.as_c_str(), &mut target) else {
            continue;
        };
        if let Some(inode) = socket_inode(link) {
            owners.add(inode, pid);
        }
    }
}

/// `socket:[12345]` -> 12345.
fn socket_inode(link: &[u8]) -> Option<u64> {
    let digits = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn open_dir<Fd: rustix::fd::AsFd>(dir: Fd, path: &CStr) -> Result<OwnedFd, Errno> {
    openat(
        dir,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Entry names of a directory, without `.` and `..`; stops at the first read error.
fn read_dir_names(dir: &OwnedFd) -> Vec<std::ffi::CString> {
    let Ok(entries) = Dir::read_from(dir) else {
        return Vec::new();
    };
    entries
        .map_while(Result::ok)
        .map(|entry| entry.file_name().to_owned())
        .filter(|name| !name.to_bytes().starts_with(b"."))
        .collect()
}

/// The process name, as /proc/[pid]/comm has it; `None` once the process is gone.
pub fn program_name(pid: u32) -> Option<String> {
    let pid = i32::try_from(pid).ok()?;
    let stat = procfs::process::Process::new(pid).ok()?.stat().ok()?;
    Some(stat.comm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_held_by_several_processes_lists_each_once_lowest_first() {
        let mut owners = InodeOwners::default();
        for (inode, pid) in [(7, 30), (7, 10), (7, 30), (7, 20), (7, 10), (8, 5)] {
            owners.add(inode, pid);
        }
        assert_eq!(owners.pids.get(&7), Some(&10));
        assert_eq!(owners.holders(7), vec![10, 20, 30]);
        assert_eq!(owners.holders(8), vec![5]);
        assert_eq!(owners.holders(9), Vec::<u32>::new());
        let mut merged = InodeOwners::default();
        merged.add(7, 15);
        merged.merge(owners);
        assert_eq!(merged.holders(7), vec![10, 15, 20, 30]);
    }

    #[test]
    fn socket_links_give_their_inode() {
        assert_eq!(socket_inode(b"socket:[12345]"), Some(12345));
        assert_eq!(socket_inode(b"socket:[]"), None);
        assert_eq!(socket_inode(b"pipe:[12345]"), None);
        assert_eq!(socket_inode(b"/dev/null"), None);
        assert_eq!(socket_inode(b"socket:[12x]"), None);
    }

    #[test]
    fn the_proc_walk_finds_a_socket_this_process_holds() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        let inode = socket_inode(link.to_str().unwrap().as_bytes()).unwrap();
        let owners = walk_proc_fds(2);
        assert_eq!(owners.pids.get(&inode), Some(&std::process::id()));
        assert_eq!(
            program_name(std::process::id()),
            Some(
                std::fs::read_to_string("/proc/self/comm")
                    .unwrap()
                    .trim_end()
                    .to_owned()
            )
        );
    }
}
