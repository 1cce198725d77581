//! eBPF side of netwatch: every TCP state transition goes to user space
//! through one ring buffer, sent by one of two programs on the
//! `sock:inet_sock_set_state` tracepoint, and so does every change of a
//! socket's owner (see `accept_exit` and `socket_used`).
//!
//! The transition program sends each transition and first notes it in a
//! per-CPU `HANDLED` slot. The kernel skips a program when a softirq
//! interrupts it on its own CPU and calls it again, silently but for
//! `recursion_misses`. Each raw tracepoint program has a guard of its own
//! (a tracepoint program shares one with every other of its kind), so the
//! recovery program, attached second, still runs then: it finds the slot
//! not naming its transition and sends the transition itself. When the
//! recovery program is the one interrupted, the transition program is not
//! running, and handles the nested call.
//!
//! One module per program family: `state` (the transition and recovery
//! programs), `owners` (accept, send and receive, exec), `fd_iterator`
//! (every process's socket fds) and `tcp_iterator` (every TCP socket);
//! what they share (maps, kernel offsets, reading kernel memory, sending
//! events) is here.
#![no_std]
#![no_main]
// core's AtomicU64 has no fetch_add on the BPF target; the intrinsic compiles
// to the BPF atomic add instruction.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod fd_iterator;
mod owners;
mod state;
mod tcp_iterator;

use aya_ebpf::helpers::generated::{
    bpf_get_current_cgroup_id, bpf_get_smp_processor_id, bpf_map_lookup_percpu_elem,
    bpf_probe_read_user, bpf_seq_write,
};
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
    EbpfContext,
};
use aya_log_ebpf::error;
use core::ffi::c_void;
use core::intrinsics::{atomic_cxchg, atomic_or, atomic_xadd, atomic_xchg, AtomicOrdering};
use netwatch_common::{
    event_kind, owner_cache_slot, syscall_exit, tcp_state, tracepoint as field, ByteCounts,
    CachedOwner, KernelEvent, KernelEventWithCommandLine, SocketEntry, SocketFd, TcpSocketRecord,
    AF_INET, BYTES_MAX_CPUS, COMMAND_LINES_SENT_ENTRIES, COMMAND_LINE_BYTES, DROPPED_OWNER_EVENTS,
    DROPPED_RECOVERIES, DROPPED_TRANSITIONS, IPPROTO_TCP, OWNER_CACHE_SLOTS, OWNER_CACHE_TAKEN,
    SOCKETS_MAP_ENTRIES, SOCKET_FD_UNREADABLE, SOCK_COMMON_HEAD,
};

/// Default size; the loader overrides it from `--ring-buffer-kib`.
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Events the ring buffer had no room for, per CPU: transitions in slots
/// `DROPPED_TRANSITIONS` (transition program) and `DROPPED_RECOVERIES`
/// (recovery program), owner and exec events in `DROPPED_OWNER_EVENTS`.
#[map(name = "DROPS")]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);

/// Per socket (kernel address): the process that last used it, and (for
/// audit) the bytes the application sent and received, taken when the
/// socket reaches CLOSE.
#[map(name = "SOCKETS")]
static SOCKETS: LruHashMap<u64, SocketEntry> = LruHashMap::with_max_entries(SOCKETS_MAP_ENTRIES, 0);

/// Per process (tgid): the start time of the process whose command line
/// was last sent (see `send_naming`).
#[map(name = "COMMAND_LINES_SENT")]
static COMMAND_LINES_SENT: LruHashMap<u32, u64> =
    LruHashMap::with_max_entries(COMMAND_LINES_SENT_ENTRIES, 0);

/// When user space was last woken (bpf_ktime_get_ns), slot 0.
#[map(name = "WOKEN")]
static WOKEN: Array<u64> = Array::with_max_entries(1, 0);

/// Wake user space once this much is waiting (set by the loader: 1/16 of the ring).
#[no_mangle]
static WAKEUP_BYTES: u64 = 1 << 18;
/// ... or when the last wakeup is this old, so that a lone event is not held back.
const WAKEUP_AFTER_NS: u64 = 5_000_000;
/// Wakeups for a full `WAKEUP_BYTES` come at least this far apart: at
/// 300,000 transitions a second (34 MB/s), 1 ms is 1/60 of the default
/// 2 MiB ring.
const WAKEUP_GAP_NS: u64 = 1_000_000;

/// Declares each global of `netwatch_common::kernel_offset_tables`, the
/// field offsets the loader sets from the kernel's BTF.
macro_rules! offset_globals {
    ($($(#[$doc:meta])* $table:ident { $($global:ident: $struct:literal, $member:literal;)* })*) => {
        $($(
            #[no_mangle]
            static $global: u32 = 0;
        )*)*
    };
}

netwatch_common::kernel_offset_tables!(offset_globals);

/// The loader's other globals: the system call number's offset
/// (`SYSCALL_OFFSETS`, an architecture's own), and what it knows or attached
/// (`SOCK_LAYOUT_KNOWN`, `COUNTS_BYTES`, `NR_CPUS`).
#[no_mangle]
static PT_REGS_SYSCALL_NR: u32 = 0;
#[no_mangle]
static SOCK_LAYOUT_KNOWN: u32 = 0;
#[no_mangle]
static COUNTS_BYTES: u32 = 0;
#[no_mangle]
static NR_CPUS: u32 = 0;

/// `task_struct.flags`: a kernel thread (its sends are the kernel's own).
const PF_KTHREAD: u32 = 0x0020_0000;
/// recvmsg flag: data peeked at is not consumed.
const MSG_PEEK: i32 = 2;

/// An address (IPv4 in the first 4 bytes) and a host-order port.
type Endpoint = ([u8; 16], u16);

/// A socket's family and endpoints (local, remote), read from `struct sock`
/// at the loader's offsets.
#[inline(always)]
fn read_tuple(sk: u64) -> Result<(u16, Endpoint, Endpoint), i64> {
    let head = read_head(sk)?;
    let (family, saddr, daddr) = addresses(sk, &head)?;
    let sport = u16::from_be(read_kernel(sk, &INET_SPORT)?);
    let dport = u16::from_be_bytes(in_head(&head, &SKC_DPORT));
    Ok((family, (saddr, sport), (daddr, dport)))
}

/// A socket's family and addresses (local, remote; IPv4 in the first 4
/// bytes): from its head, or for IPv6 from `struct sock_common` beyond it.
#[inline(always)]
fn addresses(sk: u64, head: &Head) -> Result<(u16, [u8; 16], [u8; 16]), i64> {
    let family = u16::from_ne_bytes(in_head(head, &SKC_FAMILY));
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    if family == AF_INET {
        saddr[..4].copy_from_slice(&in_head::<4>(head, &SKC_RCV_SADDR));
        daddr[..4].copy_from_slice(&in_head::<4>(head, &SKC_DADDR));
    } else {
        saddr = read_kernel(sk, &SKC_V6_RCV_SADDR)?;
        daddr = read_kernel(sk, &SKC_V6_DADDR)?;
    }
    Ok((family, saddr, daddr))
}

/// The first bytes of `struct sock_common`, read at once (one probe read
/// instead of one a field): the loader checks that the IPv4 addresses, the
/// ports, the family and the state are all there (`SOCK_COMMON_HEAD`).
type Head = [u8; SOCK_COMMON_HEAD];

#[inline(always)]
fn read_head(sk: u64) -> Result<Head, i64> {
    // SAFETY: bpf_probe_read_kernel checks the address.
    unsafe { bpf_probe_read_kernel(sk as *const Head) }.map_err(i64::from)
}

/// Field `field` (its offset in `head`, set by the loader) of the head.
#[inline(always)]
fn in_head<const N: usize>(head: &Head, field: &'static u32) -> [u8; N] {
    let at = loaded(field) as usize;
    let mut bytes = [0u8; N];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = head.get(at + i).copied().unwrap_or(0);
    }
    bytes
}

/// The process on the CPU: its tgid, name (the group leader's comm, as
/// /proc/PID/comm shows it, not the thread's), start time and cgroup (v2).
struct Process {
    tgid: u32,
    comm: [u8; 16],
    start_ns: u64,
    cgroup_id: u64,
}

#[inline(always)]
fn current_process() -> Process {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: bpf_get_current_cgroup_id has no preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
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
                    cgroup_id,
                };
            }
        }
    }
    Process {
        tgid,
        comm: bpf_get_current_comm().unwrap_or_default(),
        start_ns: 0,
        cgroup_id,
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

/// Reads the kernel object field at `base` plus the offset held by the global `field`.
fn read_kernel<T>(base: u64, field: &'static u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel checks the address.
    unsafe { bpf_probe_read_kernel((base + u64::from(loaded(field))) as *const T) }
        .map_err(i64::from)
}

/// The value (an offset, a syscall number) the loader set in one of its globals.
fn loaded(global: &'static u32) -> u32 {
    // SAFETY: the loader set the global; volatile keeps the compiler from folding its initial 0.
    unsafe { core::ptr::read_volatile(global) }
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
        cgroup_id: process.cgroup_id,
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
        sk_err: 0,
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

/// Sends an owner or exec event, which names the process on the CPU: the
/// first to name that process (by its start time), or an exec's, carries
/// the process's command line. (The transition program does not send
/// them: its frame leaves too little of the verifier's 512 bytes of stack.)
fn send_naming(event: KernelEvent) {
    if command_line_due(&event) {
        send_with_command_line(&event, DROPPED_OWNER_EVENTS);
    } else {
        send_to(event, DROPPED_OWNER_EVENTS);
    }
}

/// Whether `event`, which names the process on the CPU when its start time
/// is set, is the first to name that process, or comes from its exec.
#[inline(always)]
fn command_line_due(event: &KernelEvent) -> bool {
    if event.start_ns == 0 {
        return false;
    }
    // SAFETY: a plain copy of the value, which another CPU may replace whole.
    let sent = unsafe { COMMAND_LINES_SENT.get(event.tgid) }.copied();
    event.kind == event_kind::EXEC || sent != Some(event.start_ns)
}

/// Sends `event` with the command line of the process on the CPU, and
/// remembers that it was sent.
fn send_with_command_line(event: &KernelEvent, drops: u32) {
    let Some(mut entry) = EVENTS.reserve::<KernelEventWithCommandLine>(0) else {
        count_drop(drops);
        return;
    };
    let record = entry.as_mut_ptr();
    // SAFETY: the reserved record is ours to write until it is submitted.
    unsafe {
        let length = read_command_line(&raw mut (*record).command_line);
        (&raw mut (*record).event).write(*event);
        (&raw mut (*record).length).write(length);
        (&raw mut (*record)._pad).write([0; 4]);
    }
    entry.submit(wakeup_flag(event.ts_ns));
    let _ = COMMAND_LINES_SENT.insert(event.tgid, event.start_ns, 0);
}

/// Reads the command line of the process on the CPU (its arguments, from
/// its memory between `mm->arg_start` and `arg_end`, as /proc/PID/cmdline
/// does) into `buffer`: the bytes read, or 0 where it has none (a kernel
/// thread) or the read failed.
fn read_command_line(buffer: *mut [u8; COMMAND_LINE_BYTES]) -> u32 {
    // SAFETY: bpf_get_current_task has no preconditions.
    let task = unsafe { bpf_get_current_task() };
    let Ok(mm) = read_kernel::<u64>(task, &TASK_MM) else {
        return 0;
    };
    if mm == 0 {
        return 0;
    }
    let (Ok(start), Ok(end)) = (
        read_kernel::<u64>(mm, &MM_ARG_START),
        read_kernel::<u64>(mm, &MM_ARG_END),
    ) else {
        return 0;
    };
    // The verifier needs a bound it can see: a branch, not a min.
    let whole = end.saturating_sub(start);
    let mut length = whole as u32;
    if whole > COMMAND_LINE_BYTES as u64 {
        length = COMMAND_LINE_BYTES as u32;
    }
    // SAFETY: reads at most the buffer's size from the current process's
    // memory; the helper checks the user address (a page not present
    // fails the read rather than waiting for it).
    let read = unsafe { bpf_probe_read_user(buffer.cast(), length, start as *const c_void) };
    if read != 0 {
        return 0;
    }
    length
}

/// Waking user space for every event costs more than handling it: wake it
/// when enough is waiting or some time has passed; its timer drains the
/// rest. While user space is behind by more than `WAKEUP_BYTES`, it is
/// draining already, and another wakeup tells it nothing: those are at
/// least `WAKEUP_GAP_NS` apart. (Each wakeup is an interrupt the CPU sends
/// itself, an exit to the hypervisor on a virtual machine: forced on every
/// event while user space lagged, they took 12% of the host's CPU under
/// heavy churn.)
fn wakeup_flag(now: u64) -> u64 {
    // SAFETY: the loader set the global; volatile keeps its initial value from being folded.
    let wakeup_bytes = unsafe { core::ptr::read_volatile(&WAKEUP_BYTES) };
    let Some(woken) = WOKEN.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: a plain u64 slot; a racy update only moves a wakeup by one event.
    unsafe {
        let since = now.wrapping_sub(*woken);
        let wake = since >= WAKEUP_AFTER_NS
            || (since >= WAKEUP_GAP_NS && EVENTS.query(BPF_RB_AVAIL_DATA.into()) >= wakeup_bytes);
        if wake {
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
/// nested inside the transition program on the same CPU, and a plain
/// read-modify-write interrupted there would lose the nested increment.
fn add_per_cpu(counters: &PerCpuArray<u64>, slot: u32) {
    if let Some(counter) = counters.get_ptr_mut(slot) {
        // SAFETY: the slot lives while the program runs; the add is one instruction.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1) };
    }
}

/// Writes an iterator's record to its seq file (`meta` is the
/// `struct bpf_iter_meta` the kernel passed). When the seq buffer is full,
/// the kernel shows the same object again at the next read.
#[inline(always)]
fn write_record<T>(meta: u64, record: &T) {
    // SAFETY: `meta` points at a `struct bpf_iter_meta`, whose first field is the seq file.
    let seq = unsafe { *(meta as *const u64) };
    // SAFETY: writes the record's bytes, all of them initialised, to that seq file.
    unsafe {
        bpf_seq_write(
            seq as *mut _,
            (record as *const T).cast(),
            size_of::<T>() as u32,
        )
    };
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
