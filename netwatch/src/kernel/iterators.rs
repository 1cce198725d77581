//! Every TCP socket and every process's socket fds, read in the kernel by
//! netwatch's two iterator programs: root's fast path for what /proc/net/tcp
//! and /proc/[pid]/fd give.

use std::fs::File;
use std::io::Read as _;
use std::os::fd::AsFd as _;

use aya::programs::links::LinkError;
use aya::programs::{Iter, ProgramError};
use aya::Ebpf;
use netwatch_common::{
    SocketFd, TcpSocketRecord, EVENTS_MAP, FILE_OFFSETS, SOCKETS_MAP, SOCKET_FDS_PROGRAM,
    SOCKET_FD_UNREADABLE, SOCK_OFFSETS, TABLE_ONLY, TCP_OFFSETS, TCP_SOCKETS_PROGRAM,
    WITH_COUNTERS,
};

use super::btf::{iterator_attach_points, kernel_offsets, OffsetsError};
use super::loader::ebpf_loader;
use super::prerequisites::{check_capabilities, raise_memlock_limit, PrerequisiteError};
use super::NETWATCH_OBJECT;

/// Why the kernel could not list sockets (the /proc path does then).
#[derive(Debug, thiserror::Error)]
pub enum IteratorError {
    #[error(transparent)]
    Prerequisite(#[from] PrerequisiteError),
    #[error(transparent)]
    Btf(#[from] OffsetsError),
    #[error("loading the iterators failed")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no program {0}")]
    Missing(&'static str),
    #[error("loading or attaching an iterator failed")]
    Program(#[from] ProgramError),
    #[error("opening an iterator failed")]
    Open(#[from] LinkError),
    #[error("reading an iterator's records failed")]
    Read(#[from] std::io::Error),
    #[error("the iterator could not read an fd of process {0}")]
    Unreadable(u32),
}

/// What a socket listing holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail {
    /// Every socket with every field, as /proc/net/tcp lists them.
    Full,
    /// What a live table keeps: no TIME_WAIT or request sockets, and no
    /// queue sizes (0), left out in the kernel.
    Table,
    /// What a live table keeps, with each connection's counters (bytes,
    /// round trip, retransmissions), as `top` refreshes them.
    Counters,
}

/// The two iterator programs, loaded once and attached for each reading.
pub struct SocketIterators {
    ebpf: Ebpf,
}

impl SocketIterators {
    /// Loads both iterators (root only). The kernel's BTF is read once per
    /// process for their offsets and attach points, never by aya.
    pub fn load(detail: Detail) -> Result<SocketIterators, IteratorError> {
        check_capabilities()?;
        raise_memlock_limit();
        let offsets = kernel_offsets(&[&SOCK_OFFSETS[..], &FILE_OFFSETS, &TCP_OFFSETS].concat())?;
        let mut loader = ebpf_loader();
        // Only the iterators run: keep the object's other maps small.
        loader
            .map_max_entries(EVENTS_MAP, 4096)
            .map_max_entries(SOCKETS_MAP, 64)
            .map_max_entries("AYA_LOGS", 4096);
        for (global, offset) in &offsets {
            loader.override_global(global, offset, true);
        }
        let table_only = u32::from(detail != Detail::Full);
        loader.override_global(TABLE_ONLY, &table_only, true);
        let with_counters = u32::from(detail == Detail::Counters);
        loader.override_global(WITH_COUNTERS, &with_counters, true);
        let mut ebpf = loader.load(NETWATCH_OBJECT)?;
        let attach_points = iterator_attach_points()?;
        for (program, iter_type) in [
            (TCP_SOCKETS_PROGRAM, "tcp"),
            (SOCKET_FDS_PROGRAM, "task_file"),
        ] {
            iterator(&mut ebpf, program)?.load(iter_type, &attach_points)?;
        }
        Ok(SocketIterators { ebpf })
    }

    /// Hands `each` every TCP socket of netwatch's network namespace (with
    /// `None`), then of each of `others` (namespace inode, the /proc
    /// directory of a task in it; with `Some(inode)`), as they are read;
    /// with `fds`, returns every socket fd of every process, read meanwhile
    /// on a thread of its own (one pass over every process's fds in the
    /// kernel, about ten times cheaper than a readlinkat per fd).
    ///
    /// The kernel walks the namespace of the task that opens the tcp
    /// iterator, so a thread enters each other namespace to open one there;
    /// a namespace gone meanwhile has no sockets. Entering one needs
    /// CAP_SYS_ADMIN: the namespaces it could not enter are returned, for
    /// the caller to read otherwise.
    pub fn read(
        &mut self,
        others: &[(u32, String)],
        fds: bool,
        mut each: impl FnMut(TcpSocketRecord, Option<u32>),
    ) -> Result<Reading, IteratorError> {
        let fd_listing = match fds {
            true => Some(open(iterator(&mut self.ebpf, SOCKET_FDS_PROGRAM)?)?),
            false => None,
        };
        let program = iterator(&mut self.ebpf, TCP_SOCKETS_PROGRAM)?;
        let mut files = vec![(None, open(program)?)];
        std::thread::scope(|scope| {
            let fds = fd_listing.map(|file| scope.spawn(|| socket_fds(file)));
            let mut not_entered = Vec::new();
            if !others.is_empty() {
                let (opened, refused) = scope
                    .spawn(|| open_in_namespaces(program, others))
                    .join()
                    .unwrap_or_else(|_| {
                        Err(std::io::Error::other("a namespace thread panicked").into())
                    })?;
                files.extend(opened);
                not_entered = refused;
            }
            for (netns, file) in files {
                read_records(file, |record| each(record, netns))?;
            }
            let fds = fds
                .map(|reader| {
                    reader.join().unwrap_or_else(|_| {
                        Err(std::io::Error::other("the fd reader panicked").into())
                    })
                })
                .transpose()?;
            Ok((fds, not_entered))
        })
    }
}

/// Opens the iterator in each namespace, on the calling thread, which it
/// moves from namespace to namespace (call it on a thread of its own).
/// Every socket fd (if asked for), and the namespaces not entered.
pub type Reading = (Option<Vec<SocketFd>>, Vec<(u32, String)>);

/// The files opened, with their namespace, and the namespaces this thread
/// had no right to enter.
type Opened = (Vec<(Option<u32>, File)>, Vec<(u32, String)>);

fn open_in_namespaces(
    program: &mut Iter,
    others: &[(u32, String)],
) -> Result<Opened, IteratorError> {
    let (mut files, mut refused) = (Vec::new(), Vec::new());
    for (netns, task) in others {
        let Ok(namespace) = File::open(format!("{task}/ns/net")) else {
            continue;
        };
        match rustix::thread::move_into_link_name_space(
            namespace.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        ) {
            Ok(()) => files.push((Some(*netns), open(program)?)),
            Err(rustix::io::Errno::PERM) => refused.push((*netns, task.clone())),
            Err(err) => return Err(std::io::Error::from(err).into()),
        }
    }
    Ok((files, refused))
}

fn iterator<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Iter, IteratorError> {
    Ok(ebpf
        .program_mut(name)
        .ok_or(IteratorError::Missing(name))?
        .try_into()?)
}

/// A new reading of the iterator: its own link and seq file, in the
/// network namespace of the calling thread.
fn open(program: &mut Iter) -> Result<File, IteratorError> {
    let link = program.attach()?;
    Ok(program.take_link(link)?.into_file()?)
}

/// Hands each record of an iterator's output to `each`, as it is read (the
/// whole output is never held).
fn read_records<T: aya::Pod>(mut file: File, mut each: impl FnMut(T)) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut filled = 0;
    loop {
        let read = file.read(&mut buffer[filled..])?;
        if read == 0 {
            return Ok(());
        }
        filled += read;
        let whole = filled - filled % size_of::<T>();
        parse_records(&buffer[..whole]).for_each(&mut each);
        buffer.copy_within(whole..filled, 0);
        filled -= whole;
    }
}

/// The records in an iterator's output (whole records only).
fn parse_records<T: aya::Pod>(bytes: &[u8]) -> impl Iterator<Item = T> + '_ {
    bytes
        .chunks_exact(size_of::<T>())
        // SAFETY: the chunk holds a whole T, which is plain old data.
        .map(|chunk| unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<T>()) })
}

/// The fd iterator's records; an error if one says an fd could not be read.
fn socket_fds(file: File) -> Result<Vec<SocketFd>, IteratorError> {
    let mut fds = Vec::new();
    read_records(file, |fd: SocketFd| fds.push(fd))?;
    complete(fds)
}

/// The listing, or an error if a record says an fd could not be read.
fn complete(fds: Vec<SocketFd>) -> Result<Vec<SocketFd>, IteratorError> {
    match fds.iter().find(|fd| fd.fd == SOCKET_FD_UNREADABLE) {
        Some(unreadable) => Err(IteratorError::Unreadable(unreadable.tgid)),
        None => Ok(fds),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inode_of(fd: &impl std::os::fd::AsRawFd) -> u64 {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        link.to_str()
            .and_then(|l| l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
            .unwrap()
    }

    #[test]
    fn the_iterators_find_a_socket_this_process_holds() {
        if !crate::root_tests::runs_as_root("the_iterators_find_a_socket_this_process_holds") {
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = inode_of(&listener);
        let mut iterators =
            SocketIterators::load(Detail::Full).expect("the iterators load (tests run as root)");
        let mut sockets = Vec::new();
        let (fds, _) = iterators
            .read(&[], true, |record, _| sockets.push(record))
            .expect("the iterators run");
        assert!(fds
            .expect("the fds were asked for")
            .iter()
            .any(|record| record.inode == inode && record.tgid == std::process::id()));
        let found = sockets
            .iter()
            .find(|record| record.inode == inode)
            .expect("the listener is listed");
        assert_eq!(found.sport, listener.local_addr().unwrap().port());
        assert_eq!(found.state, 10, "LISTEN");
        assert_ne!(found.skaddr, 0);
    }

    #[test]
    fn an_fd_the_iterator_could_not_read_makes_the_listing_incomplete() {
        let record = |fd: u32| SocketFd {
            inode: 7,
            tgid: 42,
            fd,
        };
        assert_eq!(
            complete(vec![record(3), record(4)]).expect("complete"),
            vec![record(3), record(4)]
        );
        let incomplete = complete(vec![record(3), record(SOCKET_FD_UNREADABLE)]);
        assert!(matches!(incomplete, Err(IteratorError::Unreadable(42))));
    }

    #[test]
    fn records_split_across_reads_are_read_whole() {
        // 104-byte records: the 64 KiB reads end inside one.
        let records: Vec<TcpSocketRecord> = (0..5_000)
            .map(|i| TcpSocketRecord {
                skaddr: i,
                inode: i * 3,
                read_ns: i * 5,
                bytes_acked: 0,
                bytes_received: 0,
                saddr: [7; 16],
                daddr: [9; 16],
                uid: 1,
                tx_queue: 3,
                rx_queue: 4,
                sport: 5,
                dport: 6,
                family: 2,
                state: 1,
                timewait: 0,
                rtt_us: 0,
                retransmits: 0,
                _pad: [0; 4],
            })
            .collect();
        // SAFETY: TcpSocketRecord is plain old data without padding.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                records.as_ptr().cast::<u8>(),
                records.len() * size_of::<TcpSocketRecord>(),
            )
        };
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, bytes).unwrap();
        std::io::Seek::rewind(&mut file).unwrap();
        let mut read = Vec::new();
        read_records(file, |record: TcpSocketRecord| read.push(record)).unwrap();
        assert_eq!(read, records);
    }
}
