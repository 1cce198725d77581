//! An empty BPF program (`return 0`) on raw tracepoints: what the kernel's
//! dispatch to any program there costs, whatever the program does. The
//! traffic benchmark runs it on netwatch's send and receive hooks to
//! measure the floor under netwatch's own cost.

use std::ffi::CString;
use std::os::fd::{FromRawFd as _, OwnedFd};

use anyhow::bail;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;

/// `r0 = 0; exit`, as two 8-byte BPF instructions.
const RETURN_ZERO: [u64; 2] = [
    u64::from_le_bytes([0xb7, 0, 0, 0, 0, 0, 0, 0]),
    u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
];

/// The head of `union bpf_attr` for BPF_PROG_LOAD; the kernel reads the
/// fields it knows beyond these as zero.
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// `union bpf_attr` for BPF_RAW_TRACEPOINT_OPEN.
#[repr(C)]
struct RawTracepointOpen {
    name: u64,
    prog_fd: u32,
    _pad: u32,
    cookie: u64,
}

/// The empty program, attached to each tracepoint it was given until dropped.
pub(crate) struct EmptyPrograms {
    _links: Vec<OwnedFd>,
    _program: OwnedFd,
}

impl EmptyPrograms {
    /// Loads the empty program and attaches it to each of `tracepoints`.
    pub(crate) fn attach(tracepoints: &[&str]) -> anyhow::Result<EmptyPrograms> {
        let program = load()?;
        let links = tracepoints
            .iter()
            .map(|tracepoint| attach(&program, tracepoint))
            .collect::<anyhow::Result<_>>()?;
        Ok(EmptyPrograms {
            _links: links,
            _program: program,
        })
    }
}

fn load() -> anyhow::Result<OwnedFd> {
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    prog_name[..5].copy_from_slice(b"empty");
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_RAW_TRACEPOINT,
        insn_cnt: RETURN_ZERO.len() as u32,
        insns: RETURN_ZERO.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
    };
    bpf(BPF_PROG_LOAD, &attr, "loading the empty program")
}

fn attach(program: &OwnedFd, tracepoint: &str) -> anyhow::Result<OwnedFd> {
    use std::os::fd::AsRawFd as _;
    let name = CString::new(tracepoint)?;
    let attr = RawTracepointOpen {
        name: name.as_ptr() as u64,
        prog_fd: program.as_raw_fd() as u32,
        _pad: 0,
        cookie: 0,
    };
    bpf(
        BPF_RAW_TRACEPOINT_OPEN,
        &attr,
        &format!("attaching the empty program to {tracepoint}"),
    )
}

/// Calls bpf(2) with `attr`; the file descriptor it returns.
fn bpf<T>(command: libc::c_long, attr: &T, what: &str) -> anyhow::Result<OwnedFd> {
    // SAFETY: attr is a valid bpf_attr head of the size passed; the
    // pointers in it live for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *const T,
            size_of::<T>() as libc::c_uint,
        )
    };
    if fd < 0 {
        bail!("{what} failed: {}", std::io::Error::last_os_error());
    }
    // SAFETY: bpf(2) returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
