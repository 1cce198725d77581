//! Maps socket inodes to the processes that hold them, through /proc/[pid]/fd,
//! and reads what those processes run (command line, executable).
//!
//! The walk costs one `readlinkat` per fd, relative to an open fd directory
//! (procfs's `Process::fd` opens, stats and closes each fd as well, four
//! times the system calls); names come from procfs for the few owning pids.

use std::collections::hash_map::Entry;
use std::ffi::CStr;
use std::io::Read as _;
use std::mem::MaybeUninit;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use rustix::fd::OwnedFd;
use rustix::fs::{openat, readlinkat_raw, Dir, Mode, OFlags, CWD};
use rustix::io::Errno;

use netwatch_common::SocketFd;

use super::cgroups::{cgroup_in_proc_file, cgroup_of_id};
use crate::model::{escape_non_utf8, CommandLine, ProcessImage};

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

/// The command line and executable of process `pid`, read through one open
/// /proc/PID directory, so that all of it is that one process's even if the
/// pid is reused meanwhile. With `started_ns` (CLOCK_MONOTONIC, as the
/// kernel stamps a task), a process that started at another time (the pid
/// reused since) gives nothing; so does one that had begun to exit by the
/// end of the read (its memory going away, it can give part of its line).
/// An empty command line (a kernel thread) gives `None`, as does an exe
/// link that cannot be read (another user's process, without CAP_SYS_PTRACE).
/// Its cgroup comes from `cgroup_id` where the kernel gave it (a cgroup
/// outlives a short process), else from /proc/PID/cgroup.
pub fn process_image(pid: u32, started_ns: Option<u64>, cgroup_id: Option<u64>) -> ProcessImage {
    let from_id = cgroup_id.and_then(cgroup_of_id);
    // What is known of a process /proc no longer shows (or shows another).
    let gone = |cgroup| ProcessImage {
        cgroup,
        ..ProcessImage::default()
    };
    let Ok(path) = std::ffi::CString::new(format!("/proc/{pid}")) else {
        return gone(from_id);
    };
    let Ok(dir) = open_dir(CWD, &path) else {
        return gone(from_id);
    };
    let cmdline = read_file(&dir, c"cmdline")
        .filter(|bytes| !bytes.is_empty())
        .map(|bytes| Arc::new(CommandLine::from_proc(&bytes)));
    let exe = rustix::fs::readlinkat(&dir, c"exe", Vec::new())
        .ok()
        .map(|target| Arc::from(escape_non_utf8(target.as_bytes())));
    let from_proc = || read_file(&dir, c"cgroup").and_then(|file| cgroup_in_proc_file(&file));
    let cgroup = from_id.clone().or_else(from_proc);
    // Read last: a process exits once, and its start time never changes.
    let stat = read_file(&dir, c"stat").and_then(|stat| ProcStat::parse(&stat));
    let same = stat.is_some_and(|stat| {
        !stat.exiting() && started_ns.is_none_or(|started_ns| stat.started_at(started_ns))
    });
    if !same {
        return gone(from_id);
    }
    ProcessImage {
        cmdline,
        cgroup,
        exe,
    }
}

/// What netwatch reads from /proc/PID/stat.
#[derive(Debug, PartialEq, Eq)]
struct ProcStat {
    /// Field 9: the kernel's PF_* flags of the task.
    flags: u64,
    /// Field 22: when the process started, in clock ticks since boot.
    start_ticks: u64,
}

/// The task flag set when a task begins to exit (include/linux/sched.h).
const PF_EXITING: u64 = 0x4;

impl ProcStat {
    /// The name (field 2, in parentheses) may hold spaces and parentheses:
    /// fields are counted from the last `)`.
    fn parse(stat: &[u8]) -> Option<ProcStat> {
        let after_name = stat.rsplit(|&b| b == b')').next()?;
        let fields: Vec<&str> = std::str::from_utf8(after_name)
            .ok()?
            .split_ascii_whitespace()
            .collect();
        let field = |number: usize| fields.get(number - 3)?.parse().ok();
        Some(ProcStat {
            flags: field(9)?,
            start_ticks: field(22)?,
        })
    }

    fn exiting(&self) -> bool {
        self.flags & PF_EXITING != 0
    }

    /// Whether it started at `started_ns` (CLOCK_MONOTONIC): /proc gives
    /// the start in ticks of CLOCK_BOOTTIME, so one tick either way is the
    /// same start.
    fn started_at(&self, started_ns: u64) -> bool {
        let tick_ns = 1_000_000_000 / procfs::ticks_per_second().max(1);
        let expected = (started_ns + boot_offset_ns()) / tick_ns;
        self.start_ticks.abs_diff(expected) <= 1
    }
}

/// How far CLOCK_BOOTTIME is ahead of CLOCK_MONOTONIC: the time suspended.
fn boot_offset_ns() -> u64 {
    use rustix::time::{clock_gettime, ClockId};
    let ns = |clock| {
        let t = clock_gettime(clock);
        u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
    };
    ns(ClockId::Boottime).saturating_sub(ns(ClockId::Monotonic))
}

/// The whole of a (small) /proc file under `dir`; `None` if it cannot be read.
/// These files give all they have to one read that offers room for it, so
/// a read that fills less than the room is the last (`read_to_end` would
/// probe 32 bytes first and read once more for the end: three reads for
/// one).
fn read_file(dir: &OwnedFd, name: &CStr) -> Option<Vec<u8>> {
    let fd = openat(dir, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok()?;
    let mut file = std::fs::File::from(fd);
    let mut bytes = vec![0; 4096];
    let mut len = 0;
    loop {
        let read = file.read(&mut bytes[len..]).ok()?;
        len += read;
        if len < bytes.len() {
            bytes.truncate(len);
            return Some(bytes);
        }
        bytes.resize(len * 2, 0);
    }
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
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let stat = b"42 (a) b (c) S 1 42 42 0 -1 4194564 100 0 0 0 1 2 0 0 20 0 1 0 12345 1000 200";
        let parsed = ProcStat::parse(stat).unwrap();
        assert_eq!(parsed.start_ticks, 12345);
        assert!(parsed.exiting(), "4194564 has PF_EXITING (0x4)");
        assert_eq!(ProcStat::parse(b"42 (short) S 1"), None);
    }

    #[test]
    fn a_process_image_is_read_only_for_the_process_that_started_then() {
        // Waits for a line that never comes, with an empty last argument.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read line", "sh", ""])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let cmdline = format!("/proc/{pid}/cmdline");
        // Until exec() has run, the child shows this test's command line.
        for _ in 0..100 {
            if std::fs::read(&cmdline).is_ok_and(|line| line.starts_with(b"sh\0")) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let image = process_image(pid, None, None);
        let args = image.cmdline.as_ref().map(|cmdline| cmdline.0.clone());
        let expected: Vec<&[u8]> = vec![b"sh", b"-c", b"read line", b"sh", b""];
        assert_eq!(
            args,
            Some(expected.iter().map(|arg| arg.to_vec()).collect())
        );
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert_eq!(image.exe.as_deref(), exe.to_str());
        // The kernel's start time of the child (ticks -> CLOCK_MONOTONIC ns).
        let stat = std::fs::read(format!("/proc/{pid}/stat")).unwrap();
        let tick_ns = 1_000_000_000 / procfs::ticks_per_second();
        let started_ns = ProcStat::parse(&stat).unwrap().start_ticks * tick_ns - boot_offset_ns();
        assert_eq!(process_image(pid, Some(started_ns), None), image);
        // Another start time: another process that had this pid.
        let later = started_ns + 5 * tick_ns;
        assert_eq!(
            process_image(pid, Some(later), None),
            ProcessImage::default()
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(process_image(pid, None, None), ProcessImage::default());
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
