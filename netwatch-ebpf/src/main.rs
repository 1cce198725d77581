//! eBPF side of netwatch: every TCP state transition goes to user space
//! through one ring buffer, sent by one of two programs on the
//! `sock:inet_sock_set_state` tracepoint.
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
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::error;
use core::ffi::c_void;
use core::intrinsics::{atomic_xadd, AtomicOrdering};
use netwatch_common::{
    tracepoint as field, ByteCounts, SocketFd, StateEvent, AF_INET, BYTES_MAP_ENTRIES, IPPROTO_TCP,
};

/// Default size; the loader overrides it from `--ring-buffer-kib`.
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Events the ring buffer had no room for, per CPU (slot 0).
#[map(name = "DROPS")]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Calls of the recovery program per CPU (slot 0): with its recursion_misses,
/// every firing of the tracepoint, for user space to check completeness.
#[map(name = "FIRED")]
static FIRED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

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

/// Bytes the application sent and received, per socket (kernel address),
/// counted from sendmsg/recvmsg; taken when the socket reaches CLOSE.
#[map(name = "BYTES")]
static BYTES: LruHashMap<u64, ByteCounts> = LruHashMap::with_max_entries(BYTES_MAP_ENTRIES, 0);

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
    FILE_F_INODE,
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
    SOCK_LAYOUT_KNOWN,
    COUNTS_BYTES
);

/// TCP state numbers the programs act on (include/net/tcp_states.h).
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;
const TCP_LISTEN: i32 = 10;
/// recvmsg flag: data peeked at is not consumed.
const MSG_PEEK: i32 = 2;

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if let Err(err) = try_inet_sock_set_state(&ctx) {
        // A failed read of the tracepoint record: it should not happen. The
        // transition is counted as dropped, so that user space resyncs.
        count_drop();
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
    if try_recover_state(&ctx).is_err() {
        count_drop();
    }
    0
}

fn try_recover_state(ctx: &RawTracePointContext) -> Result<(), i64> {
    if let Some(fired) = FIRED.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; only code on this CPU touches it.
        unsafe { *fired += 1 };
    }
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
    send(event(
        sk,
        oldstate,
        newstate,
        family,
        (saddr, sport),
        (daddr, dport),
        1,
    ));
    Ok(())
}

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn count_sent(ctx: RawTracePointContext) -> i32 {
    count_bytes(&ctx, |counts| unsafe { &raw mut (*counts).sent });
    0
}

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn count_received(ctx: RawTracePointContext) -> i32 {
    let flags: i32 = ctx.arg(2);
    if flags & MSG_PEEK == 0 {
        count_bytes(&ctx, |counts| unsafe { &raw mut (*counts).received });
    }
    0
}

/// Adds a sendmsg/recvmsg result (arguments: sk, ret, flags) to the socket's
/// count chosen by `field`.
fn count_bytes(ctx: &RawTracePointContext, field: fn(*mut ByteCounts) -> *mut u64) {
    let (sk, ret): (u64, i32) = (ctx.arg(0), ctx.arg(1));
    if ret <= 0 || read_kernel::<u16>(sk, &SK_PROTOCOL) != Ok(IPPROTO_TCP) {
        return;
    }
    let counts = match BYTES.get_ptr_mut(sk) {
        Some(counts) => counts,
        None => {
            // Another CPU may insert first: BPF_NOEXIST then leaves its entry.
            let _ = BYTES.insert(sk, ByteCounts::default(), 1);
            match BYTES.get_ptr_mut(sk) {
                Some(counts) => counts,
                None => return,
            }
        }
    };
    // SAFETY: the map value lives while the program runs; the add is atomic
    // because threads may send (or receive) on one socket on two CPUs at once.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field(counts), ret as u64) };
}

/// The bytes counted at this address, removing the entry: at a change to
/// CLOSE, the socket's own; when a socket opens, its address's previous
/// occupant's, left when that one was freed without a traced CLOSE (the new
/// socket starts from zero).
fn take_bytes(sk: u64, oldstate: i32, newstate: i32) -> ByteCounts {
    // SAFETY: the loader set the global; volatile keeps its initial 0 from being folded.
    if unsafe { core::ptr::read_volatile(&COUNTS_BYTES) } == 0 {
        // Nothing counts bytes (watch, verify): no map work on this path.
        return ByteCounts::default();
    }
    let opens = oldstate == TCP_CLOSE || (oldstate == TCP_LISTEN && newstate == TCP_SYN_RECV);
    if newstate != TCP_CLOSE && !opens {
        return ByteCounts::default();
    }
    // SAFETY: the value is copied out before the entry is removed.
    let counts = unsafe { BYTES.get(sk) }.copied().unwrap_or_default();
    let _ = BYTES.remove(sk);
    counts
}

/// The socket's network namespace inode and uid, when the loader knew the
/// layout of `struct sock`: (0, u32::MAX) otherwise.
fn socket_identity(sk: u64) -> (u32, u32) {
    // SAFETY: the loader set the global; volatile keeps its initial 0 from being folded.
    if unsafe { core::ptr::read_volatile(&SOCK_LAYOUT_KNOWN) } == 0 {
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
    let _ = try_socket_fds(ctx.cast::<u64>());
    0
}

fn try_socket_fds(ctx: *const u64) -> Result<(), i64> {
    // SAFETY: the kernel passes a `struct bpf_iter__task_file`: meta, task,
    // fd and file, 8 bytes apart.
    let (meta, task, fd, file) = unsafe { (*ctx, *ctx.add(1), *ctx.add(2) as u32, *ctx.add(3)) };
    if meta == 0 || task == 0 || file == 0 {
        return Ok(());
    }
    let inode: u64 = read_kernel(file, &FILE_F_INODE)?;
    if inode == 0 || read_kernel::<u16>(inode, &INODE_I_MODE)? & S_IFMT != S_IFSOCK {
        return Ok(());
    }
    let record = SocketFd {
        inode: read_kernel(inode, &INODE_I_INO)?,
        tgid: read_kernel(task, &TASK_TGID)?,
        fd,
    };
    // SAFETY: `meta` points at a `struct bpf_iter_meta`, whose first field is the seq file.
    let seq = unsafe { *(meta as *const u64) };
    // SAFETY: writes the record's bytes to the iterator's seq file.
    unsafe {
        bpf_seq_write(
            seq as *mut _,
            (&raw const record).cast(),
            size_of::<SocketFd>() as u32,
        )
    };
    Ok(())
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
    (saddr, sport): ([u8; 16], u16),
    (daddr, dport): ([u8; 16], u16),
    recovered: u8,
) -> StateEvent {
    let bytes = take_bytes(skaddr, oldstate, newstate);
    let (netns, uid) = socket_identity(skaddr);
    StateEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        skaddr,
        bytes_sent: bytes.sent,
        bytes_received: bytes.received,
        netns,
        uid,
        saddr,
        daddr,
        comm: bpf_get_current_comm().unwrap_or_default(),
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        sport,
        dport,
        family,
        oldstate: oldstate as u8,
        newstate: newstate as u8,
        recovered,
        _pad: [0; 3],
    }
}

fn send(event: StateEvent) {
    match EVENTS.reserve::<StateEvent>(0) {
        Some(mut entry) => {
            let now = event.ts_ns;
            entry.write(event);
            entry.submit(wakeup_flag(now));
        }
        None => count_drop(),
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

fn count_drop() {
    if let Some(slot) = DROPS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
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
