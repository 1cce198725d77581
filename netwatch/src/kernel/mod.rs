//! The kernel side: netwatch's eBPF programs loaded and attached, and what
//! they report.
//!
//! - `prerequisites`: root, tracefs, the tracepoint's record layout;
//! - `probe`: the state, recovery and owner programs, their ring buffer and loss counters;
//! - `events`: their events as netwatch's records;
//! - `program_log`: their own log;
//! - `fd_iterator`: every process's socket fds, listed in the kernel;
//! - `btf`: struct offsets from the running kernel's BTF, for the programs.

mod btf;
mod events;
mod fd_iterator;
mod prerequisites;
mod probe;
mod program_log;

pub use events::to_record;
pub use fd_iterator::socket_fds;
pub use probe::StateProbe;
pub use program_log::KernelLog;

/// `socket_fds` as the snapshot takes it: `None` when the iterator cannot
/// run, and the snapshot walks /proc instead.
pub fn socket_fds_if_possible() -> Option<Vec<netwatch_common::SocketFd>> {
    socket_fds().ok()
}

/// The eBPF object built by build.rs, embedded once for both loaders.
fn netwatch_object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netwatch"))
}
