//! Loads netwatch's eBPF programs, attaches them to `sock:inet_sock_set_state`
//! and to the places where a socket changes hands (accept, send, receive,
//! exec), and reads their events and loss counters.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use aya::maps::{MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::{Program, ProgramError, RawTracePoint, TracePoint};
use aya::Ebpf;
use netwatch_common::{
    owner_cache_slot, syscall_exit, ByteCounts, CachedOwner, SocketEntry, ACCEPT_PROGRAM,
    ACCEPT_SYSCALL_NUMBERS, BYTES_MAX_CPUS, COUNTS_BYTES, DROPPED_OWNER_EVENTS, DROPPED_RECOVERIES,
    DROPPED_TRANSITIONS, DROPS_MAP, EVENTS_MAP, EXEC_PROGRAM, FILE_OFFSETS, FIRED_MAP, NR_CPUS,
    OWNER_CACHE_MAP, OWNER_CACHE_TAKEN, RECEIVED_PROGRAM, RECOVERY_PROGRAM, SENT_PROGRAM,
    SOCKETS_MAP, SOCK_LAYOUT_KNOWN, SOCK_OFFSETS, STOPPING_MAP, SYSCALL_EXIT_PROGRAM,
    SYSCALL_OFFSETS, TASK_OFFSETS, TRANSITION_PROGRAM, TRANSITION_TRACEPOINT_PROGRAM,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::btf::{kernel_offsets, OffsetsError};
use super::loader::ebpf_loader;
use super::prerequisites::{
    check_capabilities, check_layout, ensure_tracefs, fields_mismatch, raise_memlock_limit,
    PrerequisiteError, FORMAT, TRACEFS,
};
use super::program_log::{start_kernel_log, KernelLog};
use super::ring_fill::RingFill;
use super::NETWATCH_OBJECT;
use crate::model::LossCounters;

/// Why the probe could not start, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Prerequisite(#[from] PrerequisiteError),
    #[error("loading netwatch's eBPF object failed")]
    Object(#[from] aya::EbpfError),
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("loading or attaching the eBPF program {name} failed")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("opening the eBPF map {name} failed")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("watching the ring buffer failed")]
    Poll(#[source] io::Error),
    #[error("reading the loss counters failed")]
    Counters(#[source] io::Error),
    #[error("counting bytes needs the kernel's struct offsets")]
    BytesNeedOffsets(#[source] OffsetsError),
    #[error("reading the list of possible CPUs from {path} failed")]
    PossibleCpus {
        path: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The attached program, its ring buffer and its loss counters.
pub struct StateProbe {
    ring: AsyncFd<RingBuf<MapData>>,
    /// How full the ring gets, where its pages could be mapped again.
    fill: Option<RingFill>,
    kernel_log: Option<KernelLog>,
    drops: PerCpuArray<MapData, u64>,
    fired: PerCpuArray<MapData, u64>,
    stopping: aya::maps::Array<MapData, u32>,
    sockets: aya::maps::HashMap<MapData, u64, SocketEntry>,
    owner_cache: PerCpuArray<MapData, CachedOwner>,
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
    ///
    /// An accepted socket's first owner is the first process to send or
    /// receive on it; with `accept_hook`, the process accept() returns it
    /// to, seen on the way out of accept() (see `AcceptHook`), which costs
    /// every system call of the host.
    ///
    /// With the kernel's BTF, every program attaches by name, so tracefs
    /// is needed by none; only the accept hook prefers the syscall
    /// tracepoints when tracefs can be read. Without BTF, only the
    /// tracepoint program can run, and it needs tracefs.
    pub fn attach(
        ring_bytes: u32,
        count_bytes: bool,
        accept_hook: bool,
    ) -> Result<StateProbe, ProbeError> {
        check_capabilities()?;
        raise_memlock_limit();
        let offsets = kernel_offsets(&[&SOCK_OFFSETS[..], &FILE_OFFSETS, &TASK_OFFSETS].concat());
        let accept_hook = match &offsets {
            Ok(_) if accept_hook => AcceptHook::choose(),
            Ok(_) => AcceptHook::None,
            Err(reason) if count_bytes => return Err(ProbeError::BytesNeedOffsets(reason.clone())),
            Err(reason) => {
                ensure_tracefs()?;
                check_layout(&Path::new(TRACEFS).join(FORMAT))?;
                log::warn!("calls the kernel skips cannot be recovered, sockets' uid and network namespace are unknown, and sockets keep the owner that connected or listened ({reason}); skipped calls are counted as lost");
                AcceptHook::None
            }
        };
        let cpus = if count_bytes { possible_cpus()? } else { 0 };
        let mut loader = ebpf_loader();
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
        if let AcceptHook::SyscallExit(syscall_nr) = &accept_hook {
            loader.override_global(syscall_nr.0, &syscall_nr.1, true);
            for (global, number) in ACCEPT_SYSCALL_NUMBERS.into_iter().zip(&ACCEPT_SYSCALL_NRS) {
                loader.override_global(global, number, true);
            }
        }
        if count_bytes {
            loader.override_global(COUNTS_BYTES, &1u32, true);
            if cpus > BYTES_MAX_CPUS {
                log::warn!("this host has {cpus} CPUs: bytes that CPUs beyond the first {BYTES_MAX_CPUS} count reach a socket's record only when their cache slot is reused before it closes");
            }
            loader.override_global(NR_CPUS, &cpus, true);
        }
        let mut ebpf = loader.load(NETWATCH_OBJECT)?;
        let (state_fd, recovery_fd) = if offsets.is_ok() {
            verify_at_once(&mut ebpf, &accept_hook.owner_programs());
            let state_fd = attach_raw(&mut ebpf, TRANSITION_PROGRAM, "inet_sock_set_state")?;
            // Attached second, so it runs after the transition program on each transition.
            let recovery_fd = attach_raw(&mut ebpf, RECOVERY_PROGRAM, "inet_sock_set_state")?;
            attach_owner_programs(&mut ebpf, &accept_hook, count_bytes)?;
            (state_fd, Some(recovery_fd))
        } else {
            (attach_tracepoint(&mut ebpf)?, None)
        };
        let ring: RingBuf<MapData> = take_map(&mut ebpf, EVENTS_MAP)?;
        // Only a measure: netwatch runs the same without it.
        let fill = RingFill::of(&ring).ok();
        // SAFETY: the ring buffer owns its map fd, which stays open and the
        // same for as long as the AsyncFd (which owns the ring buffer) lives.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|err| ProbeError::Poll(err.into()))?;
        let drops = take_map(&mut ebpf, DROPS_MAP)?;
        let fired = take_map(&mut ebpf, FIRED_MAP)?;
        let stopping = take_map(&mut ebpf, STOPPING_MAP)?;
        let sockets = take_map(&mut ebpf, SOCKETS_MAP)?;
        let owner_cache = take_map(&mut ebpf, OWNER_CACHE_MAP)?;
        let kernel_log = start_kernel_log(&mut ebpf);
        let probe = StateProbe {
            sockets,
            owner_cache,
            stopping,
            fired,
            ring,
            fill,
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
        probe.losses().map_err(ProbeError::Counters)?;
        Ok(probe)
    }

    /// Waits until the ring buffer has events, then hands each item (see
    /// [`super::to_record`]) to `handle` until it is empty.
    pub async fn drain(&mut self, mut handle: impl FnMut(&[u8])) -> io::Result<()> {
        let mut guard = self.ring.readable_mut().await?;
        if let Some(fill) = &mut self.fill {
            fill.sample();
        }
        drain_ready(guard.get_inner_mut(), &mut handle);
        guard.clear_ready();
        Ok(())
    }

    /// Hands every item already in the ring buffer to `handle`, without waiting.
    pub fn drain_now(&mut self, mut handle: impl FnMut(&[u8])) {
        drain_ready(self.ring.get_mut(), &mut handle);
    }

    /// The most bytes the ring buffer held when the reader woke to drain
    /// it, if its pages could be mapped to see.
    pub fn ring_buffer_peak(&self) -> Option<u64> {
        self.fill.as_ref().map(RingFill::peak)
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

    /// The bytes counted so far for an open socket, by its kernel address:
    /// in its entry, and in the CPUs' cache slots that hold it.
    pub fn bytes(&self, skaddr: u64) -> Option<ByteCounts> {
        let entry = self.sockets.get(&skaddr, 0).ok()?;
        let slots = self.owner_cache.get(&owner_cache_slot(skaddr), 0).ok()?;
        let cached = slots
            .iter()
            .filter(|slot| slot.sk & !OWNER_CACHE_TAKEN == skaddr)
            .map(|slot| slot.bytes);
        Some(cached.fold(entry.bytes, ByteCounts::plus))
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

/// Where netwatch sees accept() and accept4() return, in the accepting process.
enum AcceptHook {
    /// `syscalls:sys_exit_accept4` and `sys_exit_accept`: they fire for
    /// these calls alone, but only tracefs gives their ids.
    SyscallTracepoints,
    /// The raw tracepoint `sys_exit`, attached by name: it fires on every
    /// system call, so each costs a program call more. With the global
    /// that says where `pt_regs` holds the syscall number, and its offset.
    SyscallExit((&'static str, u32)),
    /// Neither (the default): accepted sockets keep their listener's owner
    /// until their first send or receive.
    None,
}

impl AcceptHook {
    /// The syscall tracepoints where tracefs can be read (or mounted) and
    /// has them as expected, the exit of every system call elsewhere.
    fn choose() -> AcceptHook {
        let tracepoints = ensure_tracefs()
            .map_err(|err| err.to_string())
            .and_then(|()| {
                ACCEPT_SYSCALLS.iter().try_for_each(|syscall| {
                    check_syscall_exit_layout(syscall).map_err(|err| err.to_string())
                })
            });
        let Err(why_not) = tracepoints else {
            log::info!("accept() is seen on its way out (--accept-hook): every system call on this host now takes the kernel's traced path, about 90 ns more each");
            return AcceptHook::SyscallTracepoints;
        };
        match kernel_offsets(&SYSCALL_OFFSETS).map(|offsets| offsets.first().copied()) {
            Ok(Some(syscall_nr)) => {
                log::warn!("accept() is seen on the way out of every system call, which adds a program call to each on this host, since the syscall tracepoints cannot be used ({why_not})");
                AcceptHook::SyscallExit(syscall_nr)
            }
            _ => {
                log::warn!("accepted sockets keep their listener's owner until their first send or receive: the syscall tracepoints cannot be used ({why_not}), and this kernel's BTF does not say where it keeps a syscall's number");
                AcceptHook::None
            }
        }
    }

    /// The owner programs to load with this hook: send, receive, exec, and
    /// the hook's own.
    fn owner_programs(&self) -> Vec<&'static str> {
        let mut programs = vec![SENT_PROGRAM, RECEIVED_PROGRAM, EXEC_PROGRAM];
        match self {
            AcceptHook::SyscallTracepoints => programs.push(ACCEPT_PROGRAM),
            AcceptHook::SyscallExit(_) => programs.push(SYSCALL_EXIT_PROGRAM),
            AcceptHook::None => {}
        }
        programs
    }

    /// Attaches the hook's program.
    fn attach(&self, ebpf: &mut Ebpf) -> Result<(), ProbeError> {
        match self {
            AcceptHook::SyscallTracepoints => ACCEPT_SYSCALLS
                .iter()
                .try_for_each(|syscall| attach_accept(ebpf, syscall)),
            AcceptHook::SyscallExit(_) => {
                attach_raw(ebpf, SYSCALL_EXIT_PROGRAM, "sys_exit").map(drop)
            }
            AcceptHook::None => Ok(()),
        }
    }
}

/// The syscall tracepoints of accept() and accept4().
const ACCEPT_SYSCALLS: [&str; 2] = ["sys_exit_accept", "sys_exit_accept4"];

/// The numbers of accept() and accept4() on this architecture, in the
/// order of `ACCEPT_SYSCALL_NUMBERS`.
const ACCEPT_SYSCALL_NRS: [u32; 2] = [libc::SYS_accept as u32, libc::SYS_accept4 as u32];

/// Attaches the programs that follow a socket's owner: accept() gives the
/// accepting process the socket, a send or receive by another process hands
/// it over, exec() renames a process. The send and receive programs also
/// count bytes when `count_bytes`. Each program a kernel cannot attach is
/// left out with a warning naming the rule it would apply; counting bytes
/// needs the send and receive programs.
fn attach_owner_programs(
    ebpf: &mut Ebpf,
    accept_hook: &AcceptHook,
    count_bytes: bool,
) -> Result<(), ProbeError> {
    if let Err(err) = accept_hook.attach(ebpf) {
        log::warn!("accepted sockets keep their listener's owner until their first send or receive ({err})");
    }
    for (name, tracepoint) in [
        (SENT_PROGRAM, "sock_send_length"),
        (RECEIVED_PROGRAM, "sock_recv_length"),
    ] {
        if let Err(err) = attach_raw(ebpf, name, tracepoint) {
            if count_bytes {
                return Err(err);
            }
            log::warn!("a socket used by another process than its owner (after fork, or passed over a unix socket) keeps its owner ({err})");
            break;
        }
    }
    if let Err(err) = attach_raw(ebpf, EXEC_PROGRAM, "sched_process_exec") {
        log::warn!("a socket owner's name does not follow exec() ({err})");
    }
    Ok(())
}

/// Checks where `syscalls:<syscall>`'s record holds the returned fd.
fn check_syscall_exit_layout(syscall: &str) -> Result<(), PrerequisiteError> {
    let format = Path::new(TRACEFS).join(format!("events/syscalls/{syscall}/format"));
    let text = std::fs::read_to_string(&format).map_err(|err| {
        PrerequisiteError::Layout(format!("cannot read {}: {err}", format.display()))
    })?;
    match fields_mismatch(&text, &syscall_exit::FIELDS) {
        Some(mismatch) => Err(PrerequisiteError::Layout(mismatch)),
        None => Ok(()),
    }
}

/// Attaches the accept program to `syscalls:<syscall>`.
fn attach_accept(ebpf: &mut Ebpf, syscall: &str) -> Result<(), ProbeError> {
    let name = ACCEPT_PROGRAM;
    let attach = |program: &mut TracePoint| {
        // One program on both syscalls: loaded at the first.
        if program.fd().is_err() {
            program.load()?;
        }
        program.attach("syscalls", syscall).map(drop)
    };
    attach(typed_program(ebpf, name)?).map_err(|source| ProbeError::Program { name, source })
}

/// Loads the programs to attach (the transition and recovery programs and
/// `others`), half of them on another thread: the kernel's verifier is
/// most of the time attaching takes. What fails to load here is loaded
/// again, and reported, when attached.
fn verify_at_once(ebpf: &mut Ebpf, others: &[&str]) {
    let mut programs: Vec<&mut Program> = ebpf
        .programs_mut()
        .filter(|(name, _)| {
            [TRANSITION_PROGRAM, RECOVERY_PROGRAM].contains(name) || others.contains(name)
        })
        .map(|(_, program)| program)
        .collect();
    let half = programs.len() / 2;
    let (these, those) = programs.split_at_mut(half);
    std::thread::scope(|scope| {
        scope.spawn(|| those.iter_mut().for_each(|program| load(program)));
        these.iter_mut().for_each(|program| load(program));
    });
}

/// Loads a tracepoint or raw tracepoint program; a failure is left for its attach to report.
fn load(program: &mut Program) {
    let _ = match program {
        Program::TracePoint(program) => program.load(),
        Program::RawTracePoint(program) => program.load(),
        _ => Ok(()),
    };
}

/// Attaches the tracepoint program (without BTF) and returns its fd.
fn attach_tracepoint(ebpf: &mut Ebpf) -> Result<i32, ProbeError> {
    let name = TRANSITION_TRACEPOINT_PROGRAM;
    let attach = |program: &mut TracePoint| {
        if program.fd().is_err() {
            program.load()?;
        }
        program.attach("sock", "inet_sock_set_state")?;
        Ok(program.fd()?.as_fd().as_raw_fd())
    };
    attach(typed_program(ebpf, name)?).map_err(|source| ProbeError::Program { name, source })
}

/// Attaches a raw tracepoint program and returns its fd.
fn attach_raw(ebpf: &mut Ebpf, name: &'static str, tracepoint: &str) -> Result<i32, ProbeError> {
    let attach = |program: &mut RawTracePoint| {
        if program.fd().is_err() {
            program.load()?;
        }
        program.attach(tracepoint)?;
        Ok(program.fd()?.as_fd().as_raw_fd())
    };
    attach(typed_program(ebpf, name)?).map_err(|source| ProbeError::Program { name, source })
}

/// Program `name` of the object, as the program type `P`.
fn typed_program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, ProbeError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(ProbeError::Missing(name))?;
    program
        .try_into()
        .map_err(|source| ProbeError::Program { name, source })
}

/// Takes map `name` out of the object, as the map type `M`.
/// How many CPUs the host can have (the per-CPU maps' slot count).
fn possible_cpus() -> Result<u32, ProbeError> {
    aya::util::nr_cpus()
        .map(|cpus| u32::try_from(cpus).unwrap_or(u32::MAX))
        .map_err(|(path, source)| ProbeError::PossibleCpus { path, source })
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, ProbeError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(ProbeError::Missing(name))?;
    M::try_from(map).map_err(|source| ProbeError::Map { name, source })
}

fn drain_ready(ring: &mut RingBuf<MapData>, handle: &mut impl FnMut(&[u8])) {
    while let Some(item) = ring.next() {
        handle(&item);
    }
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
