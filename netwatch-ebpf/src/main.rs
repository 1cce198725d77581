//! eBPF side of netwatch: every TCP state transition goes to user space
//! through one ring buffer, sent by one of two programs on the
//! `sock:inet_sock_set_state` tracepoint, and so does every change of a
//! socket's owner (see `accept_exit` and `socket_used`).
//!
//! The tracepoint program sends each transition and first notes it in a
//! per-CPU `HANDLED` slot. The kernel skips a tracepoint program that a
//! softirq interrupts on its own CPU (a shared per-CPU guard), silently but
//! for `recursion_misses`; a raw tracepoint program has a guard of its own,
//! so the recovery program, attached second, still runs then. It finds the
//! slot not naming its transition and sends the transition itself.
#![no_std]
#![no_main]
// core's AtomicU64 has no fetch_add on the BPF target; the intrinsic compiles
// to the BPF atomic add instruction.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use aya_ebpf::helpers::generated::bpf_seq_write;
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::error;
use core::ffi::c_void;
use core::intrinsics::{atomic_xadd, atomic_xchg, AtomicOrdering};
use netwatch_common::{
    event_kind, syscall_exit, tracepoint as field, ByteCounts, KernelEvent, SocketEntry, SocketFd,
    AF_INET, DROPPED_OWNER_EVENTS, DROPPED_RECOVERIES, DROPPED_TRANSITIONS, IPPROTO_TCP,
    SOCKETS_MAP_ENTRIES, SOCKET_FD_UNREADABLE,
};

/// Default size; the loader overrides it from `--ring-buffer-kib`.
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Events the ring buffer had no room for, per CPU: transitions in slots
/// `DROPPED_TRANSITIONS` (tracepoint program) and `DROPPED_RECOVERIES`
/// (recovery program), owner and exec events in `DROPPED_OWNER_EVENTS`.
#[map(name = "DROPS")]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);

/// Calls of the recovery program per CPU (slot 0): with its recursion_misses,
/// every firing of the tracepoint, for user space to check completeness.
#[map(name = "FIRED")]
static FIRED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0 is set to 1 by user space when it stops (see `STOPPING_MAP`).
#[map(name = "STOPPING")]
static STOPPING: Array<u32> = Array::with_max_entries(1, 0);

/// Whether user space is stopping: the transition programs then return at once.
fn stopping() -> bool {
    STOPPING.get(0).is_some_and(|&stopping| stopping != 0)
}

/// The transition the tracepoint program last handled on this CPU.
#[map(name = "HANDLED")]
static HANDLED: PerCpuArray<Handled> = PerCpuArray::with_max_entries(1, 0);

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C)]
struct Handled {
    skaddr: u64,
    states: u64,
}

impl Handled {
    fn new(skaddr: u64, oldstate: i32, newstate: i32) -> Handled {
        // Bit 16 marks a used slot: a zeroed slot matches nothing.
        let states = (1 << 16) | ((oldstate as u64 & 0xff) << 8) | (newstate as u64 & 0xff);
        Handled { skaddr, states }
    }
}

/// Per socket (kernel address): the process that last used it, and (for
/// audit) the bytes the application sent and received, taken when the
/// socket reaches CLOSE.
#[map(name = "SOCKETS")]
static SOCKETS: LruHashMap<u64, SocketEntry> = LruHashMap::with_max_entries(SOCKETS_MAP_ENTRIES, 0);

/// When user space was last woken (bpf_ktime_get_ns), slot 0.
#[map(name = "WOKEN")]
static WOKEN: Array<u64> = Array::with_max_entries(1, 0);

/// Wake user space once this much is waiting (set by the loader: 1/16 of the ring).
#[no_mangle]
static WAKEUP_BYTES: u64 = 1 << 18;
/// ... or when the last wakeup is this old, so that a lone event is not held back.
const WAKEUP_AFTER_NS: u64 = 5_000_000;

/// Declares the field offsets that the loader sets from the kernel's BTF
/// (`netwatch_common::SOCK_OFFSETS` and `FILE_OFFSETS` name them).
macro_rules! kernel_offsets {
    ($($name:ident),*) => {
        $(
            #[no_mangle]
            static $name: u32 = 0;
        )*
    };
}

kernel_offsets!(
    TASK_TGID,
    TASK_GROUP_LEADER,
    TASK_COMM,
    TASK_START_TIME,
    TASK_FLAGS,
    TASK_FILES,
    FILES_FDT,
    FDTABLE_MAX_FDS,
    FDTABLE_FD,
    SOCKET_SK,
    FILE_F_INODE,
    FILE_PRIVATE_DATA,
    INODE_I_MODE,
    INODE_I_INO,
    SK_PROTOCOL,
    SKC_FAMILY,
    SKC_DADDR,
    SKC_RCV_SADDR,
    SKC_DPORT,
    SKC_V6_DADDR,
    SKC_V6_RCV_SADDR,
    INET_SPORT,
    SK_UID,
    SKC_NET,
    NET_NS_INUM,
    SKC_STATE,
    SOCK_LAYOUT_KNOWN,
    COUNTS_BYTES
);

/// TCP state numbers the programs act on (include/net/tcp_states.h).
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;
const TCP_LISTEN: i32 = 10;
/// `task_struct.flags`: a kernel thread (its sends are the kernel's own).
const PF_KTHREAD: u32 = 0x0020_0000;
/// recvmsg flag: data peeked at is not consumed.
const MSG_PEEK: i32 = 2;

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if stopping() {
        return 0;
    }
    if let Err(err) = try_inet_sock_set_state(&ctx) {
        // A failed read of the tracepoint record: it should not happen. The
        // transition is counted as dropped, so that user space resyncs.
        count_drop(DROPPED_TRANSITIONS);
        error!(
            &ctx,
            "reading the inet_sock_set_state record failed: {}", err
        );
    }
    0
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: offsets come from the tracepoint's stable format (checked by the loader).
    let protocol: u16 = unsafe { ctx.read_at(field::PROTOCOL)? };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    // SAFETY: as above.
    let (skaddr, oldstate, newstate): (u64, i32, i32) = unsafe {
        (
            ctx.read_at(field::SKADDR)?,
            ctx.read_at(field::OLDSTATE)?,
            ctx.read_at(field::NEWSTATE)?,
        )
    };
    if let Some(slot) = HANDLED.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; only code on this CPU touches it.
        unsafe { *slot = Handled::new(skaddr, oldstate, newstate) };
    }
    // SAFETY: as above.
    let (family, sport, dport): (u16, u16, u16) = unsafe {
        (
            ctx.read_at(field::FAMILY)?,
            ctx.read_at(field::SPORT)?,
            ctx.read_at(field::DPORT)?,
        )
    };
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    // SAFETY: as above.
    unsafe {
        if family == AF_INET {
            saddr[..4].copy_from_slice(&ctx.read_at::<[u8; 4]>(field::SADDR)?);
            daddr[..4].copy_from_slice(&ctx.read_at::<[u8; 4]>(field::DADDR)?);
        } else {
            saddr = ctx.read_at(field::SADDR_V6)?;
            daddr = ctx.read_at(field::DADDR_V6)?;
        }
    }
    send(event(
        skaddr,
        oldstate,
        newstate,
        family,
        (saddr, sport),
        (daddr, dport),
        0,
    ));
    Ok(())
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn recover_state(ctx: RawTracePointContext) -> i32 {
    if stopping() {
        return 0;
    }
    if try_recover_state(&ctx).is_err() {
        count_drop(DROPPED_RECOVERIES);
    }
    0
}

fn try_recover_state(ctx: &RawTracePointContext) -> Result<(), i64> {
    add_per_cpu(&FIRED, 0);
    let sk: u64 = ctx.arg(0);
    let (oldstate, newstate): (i32, i32) = (ctx.arg(1), ctx.arg(2));
    // Checked first: the shorter the time before the check, the rarer the
    // duplicate from a softirq that sneaks in before it (user space drops those).
    let slot = HANDLED.get_ptr_mut(0).ok_or(0i64)?;
    // SAFETY: per-CPU slot; only code on this CPU touches it.
    unsafe {
        if *slot == Handled::new(sk, oldstate, newstate) {
            *slot = Handled {
                skaddr: 0,
                states: 0,
            };
            return Ok(());
        }
    }
    if read_kernel::<u16>(sk, &SK_PROTOCOL)? != IPPROTO_TCP {
        return Ok(());
    }
    let (family, local, remote) = read_tuple(sk)?;
    send_to(
        event(sk, oldstate, newstate, family, local, remote, 1),
        DROPPED_RECOVERIES,
    );
    Ok(())
}

/// An address (IPv4 in the first 4 bytes) and a host-order port.
type Endpoint = ([u8; 16], u16);

/// A socket's family and endpoints (local, remote), read from `struct sock`
/// at the loader's offsets.
#[inline(always)]
fn read_tuple(sk: u64) -> Result<(u16, Endpoint, Endpoint), i64> {
    let family: u16 = read_kernel(sk, &SKC_FAMILY)?;
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    if family == AF_INET {
        saddr[..4].copy_from_slice(&read_kernel::<[u8; 4]>(sk, &SKC_RCV_SADDR)?);
        daddr[..4].copy_from_slice(&read_kernel::<[u8; 4]>(sk, &SKC_DADDR)?);
    } else {
        saddr = read_kernel(sk, &SKC_V6_RCV_SADDR)?;
        daddr = read_kernel(sk, &SKC_V6_DADDR)?;
    }
    let sport = u16::from_be(read_kernel(sk, &INET_SPORT)?);
    let dport = u16::from_be(read_kernel(sk, &SKC_DPORT)?);
    Ok((family, (saddr, sport), (daddr, dport)))
}

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn socket_sent(ctx: RawTracePointContext) -> i32 {
    socket_used(&ctx, Counted::Sent);
    0
}

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn socket_received(ctx: RawTracePointContext) -> i32 {
    let flags: i32 = ctx.arg(2);
    // Data peeked at is not consumed: not counted, but the peeker uses the socket.
    let counted = if flags & MSG_PEEK == 0 {
        Counted::Received
    } else {
        Counted::Nothing
    };
    socket_used(&ctx, counted);
    0
}

/// Which byte count a send or receive adds to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Counted {
    Sent,
    Received,
    Nothing,
}

/// A process sent or received on a socket (arguments: sk, ret, flags), in
/// its own context. When it is not the owner the kernel map names, it
/// becomes the owner and user space hears of it: fork after accept, an fd
/// passed over a unix socket, a pre-fork pool. With bytes counted (audit),
/// a positive result is added to the `counted` count.
///
/// This runs on every sendmsg and recvmsg of the host, so the common case,
/// the owner again, must be cheap. Without byte counts it is a hit in a
/// small per-CPU cache of confirmed (socket, thread) pairs, about a sixth
/// of a hash lookup's cost here; with them, one hash lookup does both.
fn socket_used(ctx: &RawTracePointContext, counted: Counted) {
    let (sk, ret): (u64, i32) = (ctx.arg(0), ctx.arg(1));
    let pid_tgid = bpf_get_current_pid_tgid();
    let counting = counts_bytes();
    let confirmed = ConfirmedOwner {
        sk,
        pid_tgid,
        epoch: owner_epoch(),
    };
    let cached = if counting {
        None
    } else {
        OWNER_CACHE.get_ptr_mut(cache_slot(sk))
    };
    if let Some(slot) = cached {
        // SAFETY: per-CPU slot; only this CPU touches it (raw_tp programs do not nest on a CPU).
        if unsafe { *slot } == confirmed {
            return;
        }
    }
    let tgid = (pid_tgid >> 32) as u32;
    // The map holds TCP sockets only: a socket found there needs no
    // protocol check.
    let entry = match SOCKETS.get_ptr_mut(sk) {
        Some(entry) => entry,
        None => {
            if read_kernel::<u16>(sk, &SK_PROTOCOL) != Ok(IPPROTO_TCP) || in_kernel_thread() {
                return;
            }
            // Another CPU may insert first: BPF_NOEXIST then leaves its entry.
            let _ = SOCKETS.insert(sk, SocketEntry::default(), 1);
            match SOCKETS.get_ptr_mut(sk) {
                Some(entry) => entry,
                None => return,
            }
        }
    };
    // SAFETY: the map value lives while the program runs.
    unsafe {
        if (*entry).owner != tgid {
            if in_kernel_thread() {
                return;
            }
            (*entry).owner = tgid;
            owners_changed();
            send_owner(sk, event_kind::HANDOFF);
        } else if let Some(slot) = cached {
            // Confirmed under the epoch read before the lookup: any owner
            // written since has moved the epoch on, and the slot no longer matches.
            *slot = confirmed;
        }
        if ret > 0 && counting {
            let count = match counted {
                Counted::Sent => &raw mut (*entry).bytes.sent,
                Counted::Received => &raw mut (*entry).bytes.received,
                Counted::Nothing => return,
            };
            // Atomic: threads may send (or receive) on one socket on two CPUs at once.
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, ret as u64);
        }
    }
}

/// A (socket, thread) pair found to be the socket's owner's while no owner
/// was written anywhere (`epoch`). It stays true until an owner is written
/// (accept, connect, a handoff), which moves the epoch on, because only
/// those change what the map says. A thread id reused by another process
/// holding the same socket, on the same CPU, with no connect or accept on
/// the whole host meanwhile (a full pid wrap), is the one case it misses.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C)]
struct ConfirmedOwner {
    sk: u64,
    pid_tgid: u64,
    epoch: u64,
}

/// Slots of the per-CPU cache of confirmed owners.
const OWNER_CACHE_SLOTS: u32 = 64;

/// Per CPU: recently confirmed owners, by a hash of the socket's address.
#[map(name = "OWNER_CACHE")]
static OWNER_CACHE: PerCpuArray<ConfirmedOwner> =
    PerCpuArray::with_max_entries(OWNER_CACHE_SLOTS, 0);

/// Slot 0: how many times an owner was written into `SOCKETS`.
#[map(name = "OWNER_EPOCH")]
static OWNER_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

fn cache_slot(sk: u64) -> u32 {
    // Fibonacci hashing: socket addresses differ in their middle bits.
    (sk.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as u32 % OWNER_CACHE_SLOTS
}

fn owner_epoch() -> u64 {
    // SAFETY: slot 0 of an array always exists; a plain load.
    OWNER_EPOCH
        .get_ptr(0)
        .map_or(0, |epoch| unsafe { core::ptr::read_volatile(epoch) })
}

/// Called after an owner is written into `SOCKETS`: every cached confirmation is stale.
fn owners_changed() {
    if let Some(epoch) = OWNER_EPOCH.get_ptr_mut(0) {
        // SAFETY: the slot lives while the program runs; the add is atomic across CPUs.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(epoch, 1) };
    }
}

/// On the way out of accept()/accept4(), in the accepting process: it owns
/// the socket from now on.
///
/// The socket is found from the returned fd through the task's file table
/// (task->files->fdt->fd[ret]->private_data->sk), at offsets from the
/// kernel's BTF. That is the one way open here: a program on the accept
/// path itself (kprobe or fexit on inet_accept, which would get the socket
/// directly) does not attach on this kernel, `bpf_sock_from_file` is for
/// tracing programs only, and raw_syscalls:sys_exit would run on every
/// system call. The fd is fresh and the syscall has not returned yet, so no
/// other thread of the process can have closed it in between (a racing
/// close of a guessed fd number would at worst make the lookup fail, which
/// the S_ISSOCK and protocol checks catch).
#[tracepoint]
pub fn accept_exit(ctx: TracePointContext) -> u32 {
    // SAFETY: the offset of `ret` in the syscall exit record (checked by the loader).
    let fd: i64 = unsafe { ctx.read_at(syscall_exit::RET) }.unwrap_or(-1);
    if fd < 0 {
        return 0;
    }
    let Ok(sk) = socket_of_fd(fd as u64) else {
        return 0;
    };
    if read_kernel::<u16>(sk, &SK_PROTOCOL) != Ok(IPPROTO_TCP) {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    match SOCKETS.get_ptr_mut(sk) {
        // SAFETY: the map value lives while the program runs.
        Some(entry) => unsafe { (*entry).owner = tgid },
        None => {
            let entry = SocketEntry {
                owner: tgid,
                ..SocketEntry::default()
            };
            let _ = SOCKETS.insert(sk, entry, 0);
        }
    }
    owners_changed();
    send_owner(sk, event_kind::ACCEPT);
    0
}

/// The `struct sock` behind file descriptor `fd` of the current task.
fn socket_of_fd(fd: u64) -> Result<u64, i64> {
    // SAFETY: bpf_get_current_task has no preconditions.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read_kernel(task, &TASK_FILES)?;
    let fdt: u64 = read_kernel(files, &FILES_FDT)?;
    let max_fds: u32 = read_kernel(fdt, &FDTABLE_MAX_FDS)?;
    if fd >= u64::from(max_fds) {
        return Err(0);
    }
    let fds: u64 = read_kernel(fdt, &FDTABLE_FD)?;
    // SAFETY: bpf_probe_read_kernel checks the address.
    let file: u64 = unsafe { bpf_probe_read_kernel((fds + fd * 8) as *const u64) }?;
    if file == 0 {
        return Err(0);
    }
    let inode: u64 = read_kernel(file, &FILE_F_INODE)?;
    if inode == 0 || read_kernel::<u16>(inode, &INODE_I_MODE)? & S_IFMT != S_IFSOCK {
        return Err(0);
    }
    let socket: u64 = read_kernel(file, &FILE_PRIVATE_DATA)?;
    read_kernel(socket, &SOCKET_SK)
}

/// A process called exec(): its sockets' owner has a new name.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn process_exec(_ctx: RawTracePointContext) -> i32 {
    let process = current_process();
    let event = KernelEvent {
        kind: event_kind::EXEC,
        ..blank_event(0, process)
    };
    send_to(event, DROPPED_OWNER_EVENTS);
    0
}

/// Tells user space that the current process owns socket `sk` now (`kind`:
/// accept or handoff), with the socket's endpoints and state.
fn send_owner(sk: u64, kind: u8) {
    let Ok((family, (saddr, sport), (daddr, dport))) = read_tuple(sk) else {
        count_drop(DROPPED_OWNER_EVENTS);
        return;
    };
    let state = read_kernel::<u8>(sk, &SKC_STATE).unwrap_or(0);
    let (netns, uid) = socket_identity(sk);
    let event = KernelEvent {
        saddr,
        daddr,
        sport,
        dport,
        family,
        netns,
        uid,
        oldstate: state,
        newstate: state,
        kind,
        ..blank_event(sk, current_process())
    };
    send_to(event, DROPPED_OWNER_EVENTS);
}

/// The process on the CPU: its tgid, name (the group leader's comm, as
/// /proc/PID/comm shows it, not the thread's) and start time.
struct Process {
    tgid: u32,
    comm: [u8; 16],
    start_ns: u64,
}

#[inline(always)]
fn current_process() -> Process {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if layout_known() {
        // SAFETY: bpf_get_current_task has no preconditions.
        let task = unsafe { bpf_get_current_task() };
        if let Ok(leader) = read_kernel::<u64>(task, &TASK_GROUP_LEADER) {
            if let (Ok(comm), Ok(start_ns)) = (
                read_kernel::<[u8; 16]>(leader, &TASK_COMM),
                read_kernel::<u64>(leader, &TASK_START_TIME),
            ) {
                return Process {
                    tgid,
                    comm,
                    start_ns,
                };
            }
        }
    }
    Process {
        tgid,
        comm: bpf_get_current_comm().unwrap_or_default(),
        start_ns: 0,
    }
}

/// Whether the task on the CPU is a kernel thread (unknown: no).
fn in_kernel_thread() -> bool {
    // SAFETY: bpf_get_current_task has no preconditions.
    let task = unsafe { bpf_get_current_task() };
    read_kernel::<u32>(task, &TASK_FLAGS).is_ok_and(|flags| flags & PF_KTHREAD != 0)
}

/// Whether the loader set the kernel's struct offsets.
fn layout_known() -> bool {
    // SAFETY: the loader set the global; volatile keeps its initial 0 from being folded.
    (unsafe { core::ptr::read_volatile(&SOCK_LAYOUT_KNOWN) }) != 0
}

/// Whether audit counts bytes.
fn counts_bytes() -> bool {
    // SAFETY: the loader set the global; volatile keeps its initial 0 from being folded.
    (unsafe { core::ptr::read_volatile(&COUNTS_BYTES) }) != 0
}

/// What a transition does to the socket's entry in the kernel map, and the
/// bytes it carries. At a change to CLOSE (audit only), the socket's own
/// counts; when a socket opens (audit only), those its address's previous
/// occupant left after its CLOSE was traced, or without a traced CLOSE (the
/// new socket starts from zero). The counts are taken by atomic exchanges
/// with zero, and the entry stays: a send or receive counted on another CPU
/// at the same time lands in these counts or in the entry after them, never
/// in between. At connect(), the connecting process becomes the owner, so
/// that its own sends are no handoff. Elsewhere, and in watch and verify,
/// the map is not touched: a stale entry only names an owner, which
/// accept() and connect() replace.
fn update_socket_entry(sk: u64, oldstate: i32, newstate: i32, owner: u32) -> ByteCounts {
    let opens = oldstate == TCP_CLOSE || (oldstate == TCP_LISTEN && newstate == TCP_SYN_RECV);
    let mut counts = ByteCounts::default();
    if counts_bytes() && (newstate == TCP_CLOSE || opens) {
        if let Some(entry) = SOCKETS.get_ptr_mut(sk) {
            // SAFETY: the map value lives while the program runs; each exchange is one instruction.
            unsafe {
                counts.sent = atomic_xchg::<u64, { AtomicOrdering::Relaxed }>(
                    &raw mut (*entry).bytes.sent,
                    0,
                );
                counts.received = atomic_xchg::<u64, { AtomicOrdering::Relaxed }>(
                    &raw mut (*entry).bytes.received,
                    0,
                );
            }
        }
    }
    if oldstate == TCP_CLOSE && newstate == TCP_SYN_SENT {
        let entry = SocketEntry {
            owner,
            ..SocketEntry::default()
        };
        let _ = SOCKETS.insert(sk, entry, 0);
        owners_changed();
    }
    counts
}

/// The socket's network namespace inode and uid, when the loader knew the
/// layout of `struct sock`: (0, u32::MAX) otherwise.
fn socket_identity(sk: u64) -> (u32, u32) {
    if !layout_known() {
        return (0, u32::MAX);
    }
    let netns = read_kernel::<u64>(sk, &SKC_NET)
        .and_then(|net| read_kernel::<u32>(net, &NET_NS_INUM))
        .unwrap_or(0);
    (netns, read_kernel(sk, &SK_UID).unwrap_or(u32::MAX))
}

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;

/// Lists the socket fds of every process: one `SocketFd` per socket fd,
/// written to the iterator's seq file. Threads that share their leader's
/// files are skipped by the kernel's task_file iterator.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn socket_fds(ctx: *mut c_void) -> i32 {
    let ctx = ctx.cast::<u64>();
    // SAFETY: the kernel passes a `struct bpf_iter__task_file`: meta, task,
    // fd and file, 8 bytes apart.
    let (meta, task, fd, file) = unsafe { (*ctx, *ctx.add(1), *ctx.add(2) as u32, *ctx.add(3)) };
    if meta == 0 || task == 0 || file == 0 {
        return 0;
    }
    // An fd the program cannot read leaves a marker, so that user space
    // knows the listing is incomplete rather than taking it as whole.
    let record = socket_fd(task, fd, file).unwrap_or_else(|_| {
        Some(SocketFd {
            inode: 0,
            tgid: read_kernel(task, &TASK_TGID).unwrap_or(0),
            fd: SOCKET_FD_UNREADABLE,
        })
    });
    let Some(record) = record else {
        return 0;
    };
    // SAFETY: `meta` points at a `struct bpf_iter_meta`, whose first field is the seq file.
    let seq = unsafe { *(meta as *const u64) };
    // SAFETY: writes the record's bytes to the iterator's seq file. When the
    // seq buffer is full, the kernel shows this object again in the next read.
    unsafe {
        bpf_seq_write(
            seq as *mut _,
            (&raw const record).cast(),
            size_of::<SocketFd>() as u32,
        )
    };
    0
}

/// The record of fd `fd` of `task`, if `file` is a socket.
fn socket_fd(task: u64, fd: u32, file: u64) -> Result<Option<SocketFd>, i64> {
    let inode: u64 = read_kernel(file, &FILE_F_INODE)?;
    if inode == 0 || read_kernel::<u16>(inode, &INODE_I_MODE)? & S_IFMT != S_IFSOCK {
        return Ok(None);
    }
    Ok(Some(SocketFd {
        inode: read_kernel(inode, &INODE_I_INO)?,
        tgid: read_kernel(task, &TASK_TGID)?,
        fd,
    }))
}

/// Reads the kernel object field at `base` plus the offset held by the global `offset`.
fn read_kernel<T>(base: u64, offset: &'static u32) -> Result<T, i64> {
    // SAFETY: the loader set the global; volatile keeps the compiler from folding its initial 0.
    let offset = unsafe { core::ptr::read_volatile(offset) };
    // SAFETY: bpf_probe_read_kernel checks the address.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) }.map_err(i64::from)
}

// Inlined: BPF calls pass at most five arguments, in registers.
#[inline(always)]
fn event(
    skaddr: u64,
    oldstate: i32,
    newstate: i32,
    family: u16,
    (saddr, sport): Endpoint,
    (daddr, dport): Endpoint,
    recovered: u8,
) -> KernelEvent {
    // Only connect() and listen() run in the owner's context: their
    // transitions name the process; the rest need just the tgid.
    let process = if oldstate == TCP_CLOSE {
        current_process()
    } else {
        Process {
            tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
            comm: [0; 16],
            start_ns: 0,
        }
    };
    let bytes = update_socket_entry(skaddr, oldstate, newstate, process.tgid);
    let (netns, uid) = socket_identity(skaddr);
    KernelEvent {
        bytes_sent: bytes.sent,
        bytes_received: bytes.received,
        netns,
        uid,
        saddr,
        daddr,
        sport,
        dport,
        family,
        oldstate: oldstate as u8,
        newstate: newstate as u8,
        recovered,
        ..blank_event(skaddr, process)
    }
}

/// An event about `skaddr` and `process`, stamped now, its other fields zero.
#[inline(always)]
fn blank_event(skaddr: u64, process: Process) -> KernelEvent {
    KernelEvent {
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        skaddr,
        bytes_sent: 0,
        bytes_received: 0,
        start_ns: process.start_ns,
        saddr: [0; 16],
        daddr: [0; 16],
        comm: process.comm,
        tgid: process.tgid,
        netns: 0,
        uid: u32::MAX,
        sport: 0,
        dport: 0,
        family: 0,
        oldstate: 0,
        newstate: 0,
        recovered: 0,
        kind: event_kind::TRANSITION,
        _pad: [0; 2],
    }
}

/// Sends a transition.
fn send(event: KernelEvent) {
    send_to(event, DROPPED_TRANSITIONS);
}

/// Sends an event, counting it in slot `drops` of `DROPS` if the ring buffer is full.
fn send_to(event: KernelEvent, drops: u32) {
    match EVENTS.reserve::<KernelEvent>(0) {
        Some(mut entry) => {
            let now = event.ts_ns;
            entry.write(event);
            entry.submit(wakeup_flag(now));
        }
        None => count_drop(drops),
    }
}

/// Waking user space for every event costs more than handling it: wake it
/// when enough is waiting or some time has passed; its timer drains the rest.
fn wakeup_flag(now: u64) -> u64 {
    // SAFETY: the loader set the global; volatile keeps its initial value from being folded.
    let wakeup_bytes = unsafe { core::ptr::read_volatile(&WAKEUP_BYTES) };
    let Some(woken) = WOKEN.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: a plain u64 slot; a racy update only moves a wakeup by one event.
    unsafe {
        if EVENTS.query(BPF_RB_AVAIL_DATA.into()) >= wakeup_bytes
            || now.wrapping_sub(*woken) >= WAKEUP_AFTER_NS
        {
            *woken = now;
            BPF_RB_FORCE_WAKEUP.into()
        } else {
            BPF_RB_NO_WAKEUP.into()
        }
    }
}

fn count_drop(slot: u32) {
    add_per_cpu(&DROPS, slot);
}

/// Adds one to a per-CPU counter. Atomically: the recovery program runs
/// nested inside the tracepoint program on the same CPU, and a plain
/// read-modify-write interrupted there would lose the nested increment.
fn add_per_cpu(counters: &PerCpuArray<u64>, slot: u32) {
    if let Some(counter) = counters.get_ptr_mut(slot) {
        // SAFETY: the slot lives while the program runs; the add is one instruction.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1) };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
