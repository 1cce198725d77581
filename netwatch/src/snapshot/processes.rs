//! Maps socket inodes to the processes that hold them, through /proc/[pid]/fd.
//!
//! The walk costs one `readlinkat` per fd, relative to an open fd directory
//! (procfs's `Process::fd` opens, stats and closes each fd as well, four
//! times the system calls); names come from procfs for the few owning pids.

use std::collections::HashMap;
use std::ffi::CStr;
use std::mem::MaybeUninit;

use rustix::fd::OwnedFd;
use rustix::fs::{openat, readlinkat_raw, Dir, Mode, OFlags, CWD};
use rustix::io::Errno;

/// Socket inode -> pid, for every process whose fds could be read.
#[derive(Debug, Default)]
pub struct InodeOwners {
    pub pids: HashMap<u64, u32>,
    /// Some fd directories were not readable (not root): their sockets have no owner.
    pub incomplete: bool,
}

/// Sockets in use above which the task_file iterator beats the /proc walk:
/// loading it (parsing the kernel's BTF) costs about 45 ms and 45 MiB; the
/// walk costs about 5 us per fd (measured crossover: about 20k sockets).
const ITERATOR_MIN_SOCKETS: u64 = 20_000;

/// Maps socket inodes to processes: with many sockets and root, with the
/// kernel's task_file iterator; else (or if it cannot load) by walking
/// /proc/[pid]/fd. A socket held by several processes is given to the
/// lowest pid, as netstat does.
pub fn scan_socket_inodes(threads: usize) -> InodeOwners {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root && sockets_in_use().is_some_and(|used| used >= ITERATOR_MIN_SOCKETS) {
        if let Ok(pids) = crate::ebpf::socket_fd_owners() {
            return InodeOwners {
                pids,
                incomplete: false,
            };
        }
    }
    walk_proc_fds(threads)
}

/// "sockets: used N" from /proc/net/sockstat: every socket of the namespace.
fn sockets_in_use() -> Option<u64> {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    sockstat
        .lines()
        .next()?
        .strip_prefix("sockets: used ")?
        .trim()
        .parse()
        .ok()
}

/// Walks /proc/[pid]/fd of every process on `threads` threads.
fn walk_proc_fds(threads: usize) -> InodeOwners {
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
        owners.incomplete |= part.incomplete;
        for (inode, pid) in part.pids {
            owners
                .pids
                .entry(inode)
                .and_modify(|owner| *owner = (*owner).min(pid))
                .or_insert(pid);
        }
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
            Ok(fd_dir) => collect_socket_fds(&fd_dir, pid, &mut owners.pids),
            // The process exited during the scan: nothing to report.
            Err(Errno::NOENT) | Err(Errno::SRCH) => {}
            Err(_) => owners.incomplete = true,
        }
    }
    owners
}

fn collect_socket_fds(fd_dir: &OwnedFd, pid: u32, pids: &mut HashMap<u64, u32>) {
    let mut target = [MaybeUninit::<u8>::uninit(); 64];
    for name in read_dir_names(fd_dir) {
        // An fd closed since readdir fails here and is skipped.
        let Ok((link, _)) = readlinkat_raw(fd_dir, name.as_c_str(), &mut target) else {
            continue;
        };
        if let Some(inode) = socket_inode(link) {
            pids.entry(inode)
                .and_modify(|owner| *owner = (*owner).min(pid))
                .or_insert(pid);
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
    fn sockstat_counts_this_process_sockets() {
        let _listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(sockets_in_use().is_some_and(|used| used >= 1));
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
