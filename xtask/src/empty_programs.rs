//! An empty BPF program (`return 0`) on raw tracepoints, and on
//! tracepoints through perf: what the kernel's dispatch to any program
//! there costs, whatever the program does. The traffic benchmark runs it
//! on netwatch's send and receive hooks to measure the floor under
//! netwatch's own cost, and with it on accept()'s syscall exit tracepoint,
//! the floor of netwatch's design: a syscall tracepoint in use sends every
//! system call of the host through the kernel's traced path.

use std::ffi::CString;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::{bail, Context as _};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `_IOW('$', 8, u32)` and `_IO('$', 0)`.
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;

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

/// The first version of `struct perf_event_attr` (64 bytes), which the
/// kernel still takes; the flags bitfield zero leaves the event enabled.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

/// `union bpf_attr` for BPF_RAW_TRACEPOINT_OPEN.
#[repr(C)]
struct RawTracepointOpen {
    name: u64,
    prog_fd: u32,
    _pad: u32,
    cookie: u64,
}

/// The empty programs, attached to each tracepoint they were given until dropped.
pub(crate) struct EmptyPrograms {
    _links: Vec<OwnedFd>,
    _programs: Vec<OwnedFd>,
}

impl EmptyPrograms {
    /// Loads the empty program and attaches it to each of `raw_tracepoints`
    /// (by name) and of `tracepoints` (`CATEGORY/NAME`, through perf; its
    /// copy there is named `empty_tp`).
    pub(crate) fn attach(
        raw_tracepoints: &[&str],
        tracepoints: &[&str],
    ) -> anyhow::Result<EmptyPrograms> {
        let raw = load(BPF_PROG_TYPE_RAW_TRACEPOINT, "empty")?;
        let mut links = raw_tracepoints
            .iter()
            .map(|tracepoint| attach_raw(&raw, tracepoint))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut programs = vec![raw];
        if !tracepoints.is_empty() {
            let program = load(BPF_PROG_TYPE_TRACEPOINT, "empty_tp")?;
            for tracepoint in tracepoints {
                links.push(attach_perf(&program, tracepoint)?);
            }
            programs.push(program);
        }
        Ok(EmptyPrograms {
            _links: links,
            _programs: programs,
        })
    }
}

fn load(prog_type: u32, name: &str) -> anyhow::Result<OwnedFd> {
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    prog_name[..name.len()].copy_from_slice(name.as_bytes());
    let attr = ProgLoad {
        prog_type,
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

fn attach_raw(program: &OwnedFd, tracepoint: &str) -> anyhow::Result<OwnedFd> {
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

/// Opens a perf event on tracepoint `tracepoint` (its id from tracefs) and
/// runs `program` on it.
fn attach_perf(program: &OwnedFd, tracepoint: &str) -> anyhow::Result<OwnedFd> {
    let id_file = format!("/sys/kernel/tracing/events/{tracepoint}/id");
    let id =
        std::fs::read_to_string(&id_file).with_context(|| format!("reading {id_file} failed"))?;
    let attr = PerfEventAttr {
        kind: PERF_TYPE_TRACEPOINT,
        size: size_of::<PerfEventAttr>() as u32,
        config: id.trim().parse().context("a tracepoint id")?,
        sample_period: 1,
        wakeup_events: 1,
        ..PerfEventAttr::default()
    };
    // SAFETY: attr is a valid perf_event_attr of the size it gives; pid -1
    // and CPU 0 name every process on that CPU, which is what a tracepoint
    // program needs (it then runs on every CPU).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttr,
            -1,
            0,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        bail!(
            "opening a perf event on {tracepoint} failed: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: perf_event_open returned a new file descriptor that nothing else owns.
    let event = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    for (request, argument, what) in [
        (
            PERF_EVENT_IOC_SET_BPF,
            program.as_raw_fd(),
            "attaching the empty program",
        ),
        (PERF_EVENT_IOC_ENABLE, 0, "enabling the event"),
    ] {
        // SAFETY: a perf event fd, with the argument each request takes.
        if unsafe { libc::ioctl(event.as_raw_fd(), request, argument) } != 0 {
            bail!(
                "{what} on {tracepoint} failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(event)
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
