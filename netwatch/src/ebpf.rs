//! Loads netwatch's eBPF programs, attaches them to `sock:inet_sock_set_state`
//! and to the places where a socket changes hands (accept, send, receive,
//! exec), and reads their events and loss counters.

use std::io::{self, Read as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::{Iter, RawTracePoint, TracePoint};
use aya::{Ebpf, EbpfLoader};
use aya_log::EbpfLogger;
use netwatch_common::{
    event_kind, syscall_exit, tracepoint, ByteCounts, KernelEvent, SocketEntry, SocketFd,
    ACCEPT_PROGRAM, AF_INET6, COUNTS_BYTES, DROPPED_OWNER_EVENTS, DROPPED_RECOVERIES,
    DROPPED_TRANSITIONS, DROPS_MAP, EVENTS_MAP, EXEC_PROGRAM, FILE_OFFSETS, FIRED_MAP,
    RECEIVED_PROGRAM, RECOVERY_PROGRAM, SENT_PROGRAM, SOCKETS_MAP, SOCKET_FDS_PROGRAM,
    SOCKET_FD_UNREADABLE, SOCK_LAYOUT_KNOWN, SOCK_OFFSETS, STATE_PROGRAM, STOPPING_MAP,
    TASK_OFFSETS,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::btf::Btf;
use crate::model::{
    LossCounters, OwnerCause, OwnerEvent, Proto, Record, Task, TcpState, Transition, Tuple,
};

/// Where tracefs is mounted on current systems.
pub const TRACEFS: &str = "/sys/kernel/tracing";
const FORMAT: &str = "events/sock/inet_sock_set_state/format";

/// Why the probe could not start, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("netwatch needs root (CAP_BPF and CAP_PERFMON) to load its eBPF programs: run it with sudo, or use `netwatch snapshot`, which needs no root")]
    NotRoot,
    #[error("tracefs is not mounted at {TRACEFS} and mounting it failed ({0}): mount it with `mount -t tracefs tracefs {TRACEFS}`")]
    NoTracefs(io::Error),
    #[error(
        "this kernel has no sock:inet_sock_set_state tracepoint (it needs Linux 4.16 or later)"
    )]
    NoTracepoint,
    #[error("the sock:inet_sock_set_state tracepoint has an unexpected layout ({0}); this kernel is not supported")]
    Layout(String),
    #[error("loading the eBPF program failed: {0}")]
    Load(String),
}

/// The attached program, its ring buffer and its loss counters.
pub struct StateProbe {
    ring: AsyncFd<RingBuf<MapData>>,
    kernel_log: Option<KernelLog>,
    drops: PerCpuArray<MapData, u64>,
    fired: PerCpuArray<MapData, u64>,
    stopping: aya::maps::Array<MapData, u32>,
    sockets: aya::maps::HashMap<MapData, u64, SocketEntry>,
    /// Raw fds of the two programs, owned by `_ebpf`, for their kernel counters.
    state_fd: i32,
    recovery_fd: Option<i32>,
    // Owns the program and its link: dropping it detaches everything.
    _ebpf: Ebpf,
}

impl StateProbe {
    /// Checks the prerequisites, loads the programs with a ring buffer of
    /// `ring_bytes` and attaches them. Transitions and owner events flow
    /// from here on. With `count_bytes`, each socket's bytes are counted too
    /// and arrive with its change to CLOSE.
    pub fn attach(ring_bytes: u32, count_bytes: bool) -> Result<StateProbe, ProbeError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(ProbeError::NotRoot);
        }
        ensure_tracefs()?;
        check_layout(&Path::new(TRACEFS).join(FORMAT))?;
        raise_memlock_limit();
        let offsets = kernel_offsets(&[&SOCK_OFFSETS[..], &FILE_OFFSETS, &TASK_OFFSETS].concat());
        let mut loader = EbpfLoader::new();
        let wakeup_bytes = u64::from(ring_bytes / 16);
        loader
            .map_max_entries(EVENTS_MAP, ring_bytes)
            .override_global("WAKEUP_BYTES", &wakeup_bytes, true);
        if let Ok(offsets) = &offsets {
            for (global, offset) in offsets {
                loader.override_global(global, offset, true);
            }
            loader.override_global(SOCK_LAYOUT_KNOWN, &1u32, true);
        }
        if count_bytes {
            loader.override_global(COUNTS_BYTES, &1u32, true);
        }
        let mut ebpf = loader.load(netwatch_object()).map_err(|err| load(&err))?;
        let state_fd = attach_tracepoint(&mut ebpf)?;
        // Attached second, so it runs after the tracepoint program on each transition.
        let recovery_fd = match &offsets {
            Ok(_) => Some(attach_raw(
                &mut ebpf,
                RECOVERY_PROGRAM,
                "inet_sock_set_state",
            )?),
            Err(reason) => {
                eprintln!("netwatch: warning: calls the kernel skips cannot be recovered, sockets' uid and network namespace are unknown, and accepted sockets keep their listener's owner ({reason}); skipped calls are counted as lost");
                None
            }
        };
        match &offsets {
            Ok(_) => attach_owner_programs(&mut ebpf, count_bytes)?,
            Err(reason) if count_bytes => {
                return Err(ProbeError::Load(format!(
                    "counting bytes needs the kernel's BTF ({reason})"
                )))
            }
            Err(_) => {}
        }
        let ring = RingBuf::try_from(take_map(&mut ebpf, EVENTS_MAP)?).map_err(|err| load(&err))?;
        // SAFETY: the ring buffer owns its map fd, which stays open and the
        // same for as long as the AsyncFd (which owns the ring buffer) lives.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|err| load(&err))?;
        let drops =
            PerCpuArray::try_from(take_map(&mut ebpf, DROPS_MAP)?).map_err(|err| load(&err))?;
        let fired =
            PerCpuArray::try_from(take_map(&mut ebpf, FIRED_MAP)?).map_err(|err| load(&err))?;
        let stopping = aya::maps::Array::try_from(take_map(&mut ebpf, STOPPING_MAP)?)
            .map_err(|err| load(&err))?;
        let sockets = aya::maps::HashMap::try_from(take_map(&mut ebpf, SOCKETS_MAP)?)
            .map_err(|err| load(&err))?;
        let kernel_log = start_kernel_log(&mut ebpf);
        let probe = StateProbe {
            sockets,
            stopping,
            fired,
            ring,
            kernel_log,
            drops,
            state_fd,
            recovery_fd,
            _ebpf: ebpf,
        };
        // aya reads the list of possible CPUs from a file at a thread's
        // first per-CPU lookup. Read the counters once now, on the thread
        // that keeps reading them, so that a netwatch out of file
        // descriptors later can still count its losses.
        probe.losses().map_err(|err| load(&err))?;
        Ok(probe)
    }

    /// Waits until the ring buffer has events, then hands each to `handle`
    /// until it is empty.
    pub async fn drain(&mut self, mut handle: impl FnMut(KernelEvent)) -> io::Result<()> {
        let mut guard = self.ring.readable_mut().await?;
        drain_ready(guard.get_inner_mut(), &mut handle);
        guard.clear_ready();
        Ok(())
    }

    /// Hands every event already in the ring buffer to `handle`, without waiting.
    pub fn drain_now(&mut self, mut handle: impl FnMut(KernelEvent)) {
        drain_ready(self.ring.get_mut(), &mut handle);
    }

    /// The eBPF program's log, to be polled beside the ring buffer.
    pub fn take_kernel_log(&mut self) -> Option<KernelLog> {
        self.kernel_log.take()
    }

    /// Reads the loss counters from the kernel.
    pub fn losses(&self) -> io::Result<LossCounters> {
        let sum = |map: &PerCpuArray<MapData, u64>, slot: u32| -> io::Result<u64> {
            Ok(map.get(&slot, 0).map_err(io::Error::other)?.iter().sum())
        };
        let recovery_skipped = match self.recovery_fd {
            Some(fd) => recursion_misses(fd)?,
            None => 0,
        };
        let fired = match self.recovery_fd {
            Some(_) => Some(sum(&self.fired, 0)? + recovery_skipped),
            None => None,
        };
        let recoveries_refused = sum(&self.drops, DROPPED_RECOVERIES)?;
        Ok(LossCounters {
            ring_buffer_full: sum(&self.drops, DROPPED_TRANSITIONS)? + recoveries_refused,
            recoveries_refused,
            owner_events_dropped: sum(&self.drops, DROPPED_OWNER_EVENTS)?,
            skipped: recursion_misses(self.state_fd)?,
            fired,
            recovery_skipped,
        })
    }

    /// The bytes counted so far for an open socket, by its kernel address.
    pub fn bytes(&self, skaddr: u64) -> Option<ByteCounts> {
        self.sockets.get(&skaddr, 0).ok().map(|entry| entry.bytes)
    }

    /// Whether the recovery program is attached.
    pub fn recovers_skipped_calls(&self) -> bool {
        self.recovery_fd.is_some()
    }

    /// Makes the transition programs return at once: from here on they
    /// neither send nor count, so that a last drain and count (once the
    /// calls under way have finished) add up exactly. Detaching instead
    /// takes about 100 ms here, one RCU grace period per program, during
    /// which some would still run and others not.
    pub fn stop_sending(&mut self) -> io::Result<()> {
        self.stopping.set(0, 1, 0).map_err(io::Error::other)
    }
}

/// The eBPF object built by build.rs, embedded once for both loaders.
fn netwatch_object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netwatch"))
}

/// Every socket fd of every process, from the kernel's task_file iterator:
/// one pass over every process's fds in the kernel, about ten times cheaper
/// than a readlinkat per fd under /proc. Needs root.
pub fn socket_fds() -> Result<Vec<SocketFd>, String> {
    let kernel_btf = aya::Btf::from_sys_fs().map_err(|err| err.to_string())?;
    let mut loader = EbpfLoader::new();
    // Only the iterator is loaded; keep the other maps of the object small.
    loader
        .btf(Some(&kernel_btf))
        .map_max_entries(EVENTS_MAP, 4096);
    let offsets = kernel_offsets(&FILE_OFFSETS)?;
    for (global, offset) in &offsets {
        loader.override_global(global, offset, true);
    }
    let mut ebpf = loader
        .load(netwatch_object())
        .map_err(|err| err.to_string())?;
    let program: &mut Iter = program(&mut ebpf, SOCKET_FDS_PROGRAM)
        .map_err(|err| err.to_string())?
        .try_into()
        .map_err(|err: aya::programs::ProgramError| err.to_string())?;
    program
        .load("task_file", &kernel_btf)
        .map_err(|err| err.to_string())?;
    let link = program.attach().map_err(|err| err.to_string())?;
    let link = program.take_link(link).map_err(|err| err.to_string())?;
    let mut records = Vec::new();
    link.into_file()
        .map_err(|err| err.to_string())?
        .read_to_end(&mut records)
        .map_err(|err| err.to_string())?;
    parse_socket_fds(&records)
}

/// The iterator's records; an error if one says an fd could not be read.
fn parse_socket_fds(records: &[u8]) -> Result<Vec<SocketFd>, String> {
    let fds: Vec<SocketFd> = records
        .chunks_exact(size_of::<SocketFd>())
        // SAFETY: the chunk holds a whole SocketFd; any bit pattern is valid.
        .map(|chunk| unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<SocketFd>()) })
        .collect();
    match fds.iter().find(|fd| fd.fd == SOCKET_FD_UNREADABLE) {
        Some(unreadable) => Err(format!(
            "the fd iterator could not read an fd of process {}",
            unreadable.tgid
        )),
        None => Ok(fds),
    }
}

/// The byte offsets of kernel struct fields, from the running kernel's BTF,
/// for the globals named in `fields` as (global, struct, member).
fn kernel_offsets(
    fields: &[(&'static str, &str, &str)],
) -> Result<Vec<(&'static str, u32)>, String> {
    let btf =
        Btf::from_kernel().map_err(|err| format!("cannot read {}: {err}", crate::btf::VMLINUX))?;
    fields
        .iter()
        .map(|&(global, ty, member)| {
            Ok((
                global,
                btf.member_offset(ty, member)
                    .map_err(|err| err.to_string())?,
            ))
        })
        .collect()
}

fn load(err: &dyn std::fmt::Display) -> ProbeError {
    ProbeError::Load(err.to_string())
}

/// Attaches the programs that follow a socket's owner: accept() gives the
/// accepting process the socket, a send or receive by another process hands
/// it over, exec() renames a process. The send and receive programs also
/// count bytes when `count_bytes`. Each program a kernel cannot attach is
/// left out with a warning naming the rule it would apply; counting bytes
/// needs the send and receive programs.
fn attach_owner_programs(ebpf: &mut Ebpf, count_bytes: bool) -> Result<(), ProbeError> {
    let accept = ["sys_exit_accept4", "sys_exit_accept"]
        .into_iter()
        .try_for_each(|syscall| attach_accept(ebpf, syscall));
    if let Err(err) = accept {
        eprintln!("netwatch: warning: accepted sockets keep their listener's owner until their first send or receive ({err})");
    }
    for (name, tracepoint) in [
        (SENT_PROGRAM, "sock_send_length"),
        (RECEIVED_PROGRAM, "sock_recv_length"),
    ] {
        if let Err(err) = attach_raw(ebpf, name, tracepoint) {
            if count_bytes {
                return Err(err);
            }
            eprintln!("netwatch: warning: a socket used by another process than its owner (after fork, or passed over a unix socket) keeps its owner ({err})");
            break;
        }
    }
    if let Err(err) = attach_raw(ebpf, EXEC_PROGRAM, "sched_process_exec") {
        eprintln!("netwatch: warning: a socket owner's name does not follow exec() ({err})");
    }
    Ok(())
}

/// Attaches the accept program to `syscalls:<syscall>`, after checking
/// where that tracepoint's record holds the returned fd.
fn attach_accept(ebpf: &mut Ebpf, syscall: &str) -> Result<(), ProbeError> {
    let format = Path::new(TRACEFS).join(format!("events/syscalls/{syscall}/format"));
    let text = std::fs::read_to_string(&format)
        .map_err(|err| ProbeError::Layout(format!("cannot read {}: {err}", format.display())))?;
    if let Some(mismatch) = fields_mismatch(&text, &syscall_exit::FIELDS) {
        return Err(ProbeError::Layout(mismatch));
    }
    let program: &mut TracePoint = program(ebpf, ACCEPT_PROGRAM)?
        .try_into()
        .map_err(|err| load(&err))?;
    if program.fd().is_err() {
        program.load().map_err(|err| load(&err))?;
    }
    program
        .attach("syscalls", syscall)
        .map_err(|err| load(&err))?;
    Ok(())
}

/// Attaches the tracepoint program and returns its fd.
fn attach_tracepoint(ebpf: &mut Ebpf) -> Result<i32, ProbeError> {
    let program: &mut TracePoint = program(ebpf, STATE_PROGRAM)?
        .try_into()
        .map_err(|err| load(&err))?;
    program.load().map_err(|err| load(&err))?;
    program
        .attach("sock", "inet_sock_set_state")
        .map_err(|err| load(&err))?;
    Ok(program.fd().map_err(|err| load(&err))?.as_fd().as_raw_fd())
}

/// Attaches a raw tracepoint program and returns its fd.
fn attach_raw(ebpf: &mut Ebpf, name: &str, tracepoint: &str) -> Result<i32, ProbeError> {
    let program: &mut RawTracePoint = program(ebpf, name)?.try_into().map_err(|err| load(&err))?;
    program.load().map_err(|err| load(&err))?;
    program.attach(tracepoint).map_err(|err| load(&err))?;
    Ok(program.fd().map_err(|err| load(&err))?.as_fd().as_raw_fd())
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut aya::programs::Program, ProbeError> {
    ebpf.program_mut(name)
        .ok_or_else(|| ProbeError::Load(format!("program {name} missing from the object")))
}

/// The record an event describes; `None` for a kind or state number the
/// kernel should not send.
pub fn to_record(event: &KernelEvent) -> Option<Record> {
    let task = Task {
        pid: event.tgid,
        comm: event.comm,
        start_ns: (event.start_ns != 0).then_some(event.start_ns),
    };
    let cause = match event.kind {
        event_kind::TRANSITION => return to_transition(event, task).map(Record::Transition),
        event_kind::EXEC => return Some(Record::Exec(task)),
        event_kind::ACCEPT => OwnerCause::Accept,
        event_kind::HANDOFF => OwnerCause::Handoff,
        _ => return None,
    };
    Some(Record::Owner(OwnerEvent {
        ts_ns: event.ts_ns,
        skaddr: event.skaddr,
        tuple: tuple_of(event),
        state: TcpState::from_kernel(event.newstate),
        task,
        uid: (event.uid != u32::MAX).then_some(event.uid),
        netns: (event.netns != 0).then_some(event.netns),
        cause,
    }))
}

fn to_transition(event: &KernelEvent, task: Task) -> Option<Transition> {
    Some(Transition {
        ts_ns: event.ts_ns,
        skaddr: event.skaddr,
        tuple: tuple_of(event),
        old: TcpState::from_kernel(event.oldstate)?,
        new: TcpState::from_kernel(event.newstate)?,
        task,
        uid: (event.uid != u32::MAX).then_some(event.uid),
        netns: (event.netns != 0).then_some(event.netns),
        bytes: ByteCounts {
            sent: event.bytes_sent,
            received: event.bytes_received,
        },
        recovered: event.recovered != 0,
    })
}

fn tuple_of(event: &KernelEvent) -> Tuple {
    let ipv6 = event.family == AF_INET6;
    let ip = |bytes: [u8; 16]| -> IpAddr {
        if ipv6 {
            IpAddr::V6(Ipv6Addr::from(bytes))
        } else {
            IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
        }
    };
    Tuple {
        proto: Proto::tcp_for(ipv6),
        local: SocketAddr::new(ip(event.saddr), event.sport),
        remote: SocketAddr::new(ip(event.daddr), event.dport),
    }
}

fn drain_ready(ring: &mut RingBuf<MapData>, handle: &mut impl FnMut(KernelEvent)) {
    while let Some(item) = ring.next() {
        if item.len() >= size_of::<KernelEvent>() {
            // SAFETY: the kernel wrote a whole KernelEvent (checked length); any bit pattern is valid.
            handle(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<KernelEvent>()) });
        }
    }
}

/// The eBPF program's aya-log records.
pub struct KernelLog(AsyncFd<EbpfLogger<&'static dyn log::Log>>);

impl KernelLog {
    /// Waits for log records and prints them on stderr.
    pub async fn forward(&mut self) -> io::Result<()> {
        let mut guard = self.0.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
        Ok(())
    }
}

/// Forwards the program's aya-log records to stderr; a warning, not a
/// failure, when that cannot be set up.
fn start_kernel_log(ebpf: &mut Ebpf) -> Option<KernelLog> {
    static STDERR_LOG: StderrLog = StderrLog;
    let logger = match EbpfLogger::init_with_logger(ebpf, &STDERR_LOG as &'static dyn log::Log) {
        Ok(logger) => logger,
        Err(err) => {
            eprintln!("netwatch: warning: the eBPF program's log is not available: {err}");
            return None;
        }
    };
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd lives.
    unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .inspect_err(|err| {
            eprintln!("netwatch: warning: cannot poll the eBPF program's log: {err}")
        })
        .ok()
        .map(KernelLog)
}

/// Prints log records from the eBPF program on stderr.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "netwatch: eBPF program {}: {}",
                record.level(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map, ProbeError> {
    ebpf.take_map(name)
        .ok_or_else(|| ProbeError::Load(format!("map {name} missing from the object")))
}

/// Mounts tracefs when it is missing (netwatch runs as root here).
fn ensure_tracefs() -> Result<(), ProbeError> {
    let events = Path::new(TRACEFS).join("events");
    if events.is_dir() {
        return tracepoint_present(&events);
    }
    let target = c"/sys/kernel/tracing";
    // SAFETY: every pointer is a valid NUL-terminated string; data may be null.
    let ret = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(ProbeError::NoTracefs(io::Error::last_os_error()));
    }
    tracepoint_present(&events)
}

fn tracepoint_present(events: &Path) -> Result<(), ProbeError> {
    if events.join("sock/inet_sock_set_state").is_dir() {
        Ok(())
    } else {
        Err(ProbeError::NoTracepoint)
    }
}

/// Compares the tracepoint's format file with the offsets the program reads.
fn check_layout(format: &Path) -> Result<(), ProbeError> {
    let text = std::fs::read_to_string(format)
        .map_err(|err| ProbeError::Layout(format!("cannot read {}: {err}", format.display())))?;
    layout_mismatch(&text).map_or(Ok(()), |mismatch| Err(ProbeError::Layout(mismatch)))
}

/// The first field of inet_sock_set_state whose offset or size differs from netwatch-common's.
fn layout_mismatch(format: &str) -> Option<String> {
    fields_mismatch(format, &tracepoint::FIELDS)
}

/// The first of `fields` (name, offset, size) whose offset or size in a
/// tracepoint's format file differs, if any.
fn fields_mismatch(format: &str, fields: &[(&str, usize, usize)]) -> Option<String> {
    for &(name, offset, size) in fields {
        let found = format.lines().find_map(|line| {
            let (declaration, rest) = line.trim().strip_prefix("field:")?.split_once(';')?;
            let field = declaration.rsplit([' ', '*']).next()?;
            let field = field.split('[').next()?;
            (field == name).then_some(rest)
        });
        let Some(rest) = found else {
            return Some(format!("field {name} is missing"));
        };
        let expected = format!("offset:{offset};\tsize:{size};");
        if !rest.trim().starts_with(&expected) {
            return Some(format!(
                "field {name} is at {}, expected {expected}",
                rest.trim()
            ));
        }
    }
    None
}

/// Older kernels charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit; failure only matters on old kernels.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

/// `bpf_prog_info.recursion_misses`, which aya's ProgramInfo does not expose.
fn recursion_misses(program_fd: i32) -> io::Result<u64> {
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // SAFETY: bpf_prog_info is plain old data.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoByFd {
        bpf_fd: program_fd as u32,
        info_len: size_of_val(&info) as u32,
        info: &raw mut info as u64,
    };
    // SAFETY: attr points at a valid bpf_prog_info of the size it states.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            aya_obj::generated::bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as i32,
            &raw mut attr,
            size_of::<InfoByFd>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.recursion_misses)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netwatch_common::AF_INET;

    const FORMAT_6_18: &str = "name: inet_sock_set_state
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;
";

    fn kernel_event(kind: u8) -> KernelEvent {
        let mut event = KernelEvent {
            ts_ns: 5,
            skaddr: 0xffff_8880_0000_1000,
            bytes_sent: 10,
            bytes_received: 20,
            start_ns: 77,
            saddr: [0; 16],
            daddr: [0; 16],
            comm: [0; 16],
            tgid: 42,
            netns: 4026531840,
            uid: u32::MAX,
            sport: 8080,
            dport: 40000,
            family: AF_INET,
            oldstate: 10,
            newstate: 3,
            recovered: 0,
            kind,
            _pad: [0; 2],
        };
        event.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        event.daddr[..4].copy_from_slice(&[127, 0, 0, 2]);
        event.comm[..4].copy_from_slice(b"curl");
        event
    }

    #[test]
    fn events_become_transitions() {
        let mut event = kernel_event(event_kind::TRANSITION);
        let Some(Record::Transition(t)) = to_record(&event) else {
            panic!("a transition");
        };
        assert_eq!(t.tuple.proto, Proto::Tcp);
        assert_eq!(t.tuple.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.tuple.remote, "127.0.0.2:40000".parse().unwrap());
        assert_eq!((t.old, t.new), (TcpState::Listen, TcpState::SynRecv));
        assert_eq!((t.task.pid, &t.task.comm[..5]), (42, &b"curl\0"[..]));
        assert_eq!(t.task.start_ns, Some(77));
        assert_eq!((t.netns, t.uid), (Some(4026531840), None));
        assert_eq!(
            t.bytes,
            ByteCounts {
                sent: 10,
                received: 20
            }
        );

        event.family = AF_INET6;
        event.saddr = std::net::Ipv6Addr::LOCALHOST.octets();
        let Some(Record::Transition(t)) = to_record(&event) else {
            panic!("a transition");
        };
        assert_eq!(t.tuple.local, "[::1]:8080".parse().unwrap());
        event.newstate = 0;
        assert_eq!(to_record(&event), None);
    }

    #[test]
    fn owner_and_exec_events_become_their_records() {
        let mut event = kernel_event(event_kind::HANDOFF);
        event.oldstate = 1;
        event.newstate = 1;
        let Some(Record::Owner(owner)) = to_record(&event) else {
            panic!("an owner event");
        };
        assert_eq!(owner.cause, OwnerCause::Handoff);
        assert_eq!(owner.state, Some(TcpState::Established));
        assert_eq!((owner.task.pid, owner.task.start_ns), (42, Some(77)));
        assert_eq!(owner.tuple.local, "127.0.0.1:8080".parse().unwrap());
        event.kind = event_kind::ACCEPT;
        event.start_ns = 0;
        let Some(Record::Owner(owner)) = to_record(&event) else {
            panic!("an owner event");
        };
        assert_eq!(
            (owner.cause, owner.task.start_ns),
            (OwnerCause::Accept, None)
        );
        event.kind = event_kind::EXEC;
        assert!(matches!(to_record(&event), Some(Record::Exec(task)) if task.pid == 42));
        event.kind = 200;
        assert_eq!(to_record(&event), None);
    }

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
            parse_socket_fds(&bytes(&[record(3), record(4)])),
            Ok(vec![record(3), record(4)])
        );
        let incomplete = parse_socket_fds(&bytes(&[record(3), record(SOCKET_FD_UNREADABLE)]));
        assert!(incomplete.unwrap_err().contains("process 42"));
    }

    #[test]
    fn the_documented_layout_matches() {
        assert_eq!(layout_mismatch(FORMAT_6_18), None);
    }

    #[test]
    fn a_moved_or_missing_field_is_reported() {
        let moved = FORMAT_6_18.replace("offset:24;\tsize:2", "offset:26;\tsize:2");
        assert!(layout_mismatch(&moved).unwrap().contains("sport"));
        let missing = FORMAT_6_18.replace("saddr_v6", "other");
        assert!(layout_mismatch(&missing)
            .unwrap()
            .contains("saddr_v6 is missing"));
    }

    #[test]
    fn this_kernel_has_the_expected_layout() {
        let format = Path::new(TRACEFS).join(FORMAT);
        if !format.exists() {
            ensure_tracefs().expect("tests run as root and can mount tracefs");
        }
        check_layout(&format).expect("the running kernel's layout matches");
    }
}
