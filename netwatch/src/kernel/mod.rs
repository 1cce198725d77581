//! The kernel side: netwatch's eBPF programs loaded and attached, and what
//! they report.
//!
//! - `prerequisites`: root or capabilities, tracefs and tracepoint record layouts where needed;
//! - `probe`: the state, recovery and owner programs, their ring buffer and loss counters;
//! - `ring_fill`: how full the ring buffer gets;
//! - `events`: their events as netwatch's records;
//! - `program_log`: their own log;
//! - `iterators`: every TCP socket and every process's socket fds, read in the kernel;
//! - `privileges`: the capabilities kept once attached;
//! - `loader`: aya's loader, without aya's own parse of the kernel's BTF;
//! - `btf`: struct offsets and iterator attach points from the running kernel's BTF.

mod btf;
mod events;
mod iterators;
mod loader;
mod prerequisites;
mod privileges;
mod probe;
mod program_log;
mod ring_fill;

#[cfg(feature = "fuzzing")]
pub use btf::Btf;
#[cfg(feature = "fuzzing")]
pub use events::decode_event;
pub use events::to_record;
pub use iterators::{Detail, SocketIterators};
pub use privileges::keep_only_what_is_still_used;
pub use probe::StateProbe;
pub use program_log::KernelLog;

/// Whether this process has what loading eBPF programs needs (CAP_BPF and
/// CAP_PERFMON, as root or as a service).
pub fn may_load_programs() -> bool {
    prerequisites::check_capabilities().is_ok()
}

/// Whether this process has CAP_SYS_PTRACE (root has it), which reading
/// another user's /proc/PID/exe needs.
pub fn reads_every_exe() -> bool {
    prerequisites::reads_every_exe()
}

/// The eBPF object built by build.rs, embedded once for both loaders: a
/// static, since the constant `include_bytes_aligned!` makes is copied
/// into each codegen unit that a function returning it is inlined into
/// (two copies, 0.7 MiB more of the binary and of its resident pages).
static NETWATCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netwatch"));
