//! Every socket fd of every process, listed in the kernel by a
//! `task_file` iterator program.

use std::io::Read as _;

use aya::programs::links::LinkError;
use aya::programs::{Iter, ProgramError};
use aya::EbpfLoader;
use netwatch_common::{
    SocketFd, EVENTS_MAP, FILE_OFFSETS, SOCKET_FDS_PROGRAM, SOCKET_FD_UNREADABLE,
};

use super::btf::{kernel_offsets, OffsetsError};
use super::netwatch_object;

/// Why the kernel could not list the socket fds (the /proc walk does then).
#[derive(Debug, thiserror::Error)]
pub enum FdIteratorError {
    #[error("reading the kernel's BTF failed")]
    Btf(#[from] aya::BtfError),
    #[error(transparent)]
    Offsets(#[from] OffsetsError),
    #[error("loading the iterator failed")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no program {SOCKET_FDS_PROGRAM}")]
    Missing,
    #[error("attaching the iterator failed")]
    Attach(#[from] ProgramError),
    #[error("opening the iterator failed")]
    Open(#[from] LinkError),
    #[error("reading the iterator's records failed")]
    Read(#[from] std::io::Error),
    #[error("the iterator could not read an fd of process {0}")]
    Unreadable(u32),
}

/// Every socket fd of every process, from the kernel's task_file iterator:
/// one pass over every process's fds in the kernel, about ten times cheaper
/// than a readlinkat per fd under /proc. Needs root.
pub fn socket_fds() -> Result<Vec<SocketFd>, FdIteratorError> {
    // aya finds the iterator's attach point in its own parse of the BTF.
    let kernel_btf = aya::Btf::from_sys_fs()?;
    let offsets = kernel_offsets(&FILE_OFFSETS)?;
    let mut loader = EbpfLoader::new();
    // Only the iterator is loaded; keep the other maps of the object small.
    loader
        .btf(Some(&kernel_btf))
        .map_max_entries(EVENTS_MAP, 4096);
    for (global, offset) in &offsets {
        loader.override_global(global, offset, true);
    }
    let mut ebpf = loader.load(netwatch_object())?;
    let program: &mut Iter = ebpf
        .program_mut(SOCKET_FDS_PROGRAM)
        .ok_or(FdIteratorError::Missing)?
        .try_into()?;
    program.load("task_file", &kernel_btf)?;
    let link = program.attach()?;
    let link = program.take_link(link)?;
    let mut records = Vec::new();
    link.into_file()?.read_to_end(&mut records)?;
    parse_socket_fds(&records)
}

/// The iterator's records; an error if one says an fd could not be read.
fn parse_socket_fds(records: &[u8]) -> Result<Vec<SocketFd>, FdIteratorError> {
    let fds: Vec<SocketFd> = records
        .chunks_exact(size_of::<SocketFd>())
        // SAFETY: the chunk holds a whole SocketFd; any bit pattern is valid.
        .map(|chunk| unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<SocketFd>()) })
        .collect();
    match fds.iter().find(|fd| fd.fd == SOCKET_FD_UNREADABLE) {
        Some(unreadable) => Err(FdIteratorError::Unreadable(unreadable.tgid)),
        None => Ok(fds),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;

    #[test]
    fn the_task_file_iterator_finds_a_socket_this_process_holds() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = listener.as_raw_fd();
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        let inode: u64 = link
            .to_str()
            .and_then(|l| l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
            .unwrap();
        let records = socket_fds().expect("the iterator loads (tests run as root)");
        assert!(records
            .iter()
            .any(|record| record.inode == inode && record.tgid == std::process::id()));
    }

    #[test]
    fn an_fd_the_iterator_could_not_read_makes_the_listing_incomplete() {
        let record = |fd: u32| SocketFd {
            inode: 7,
            tgid: 42,
            fd,
        };
        let bytes = |records: &[SocketFd]| -> Vec<u8> {
            records
                .iter()
                .flat_map(|record| {
                    // SAFETY: SocketFd is plain old data without padding.
                    unsafe {
                        std::slice::from_raw_parts(
                            (record as *const SocketFd).cast::<u8>(),
                            size_of::<SocketFd>(),
                        )
                    }
                    .to_vec()
                })
                .collect()
        };
        assert_eq!(
            parse_socket_fds(&bytes(&[record(3), record(4)])).expect("complete"),
            vec![record(3), record(4)]
        );
        let incomplete = parse_socket_fds(&bytes(&[record(3), record(SOCKET_FD_UNREADABLE)]));
        assert!(matches!(incomplete, Err(FdIteratorError::Unreadable(42))));
    }
}
