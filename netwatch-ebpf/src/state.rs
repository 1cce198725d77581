//! The transition programs: one program sends every TCP state transition,
//! and the recovery program those the kernel skipped it for.
//!
//! The transition program is the raw tracepoint `transition`, attached by
//! name: it needs no tracefs, and only its own guard (another call of it on
//! the CPU) makes the kernel skip it. It reads the socket's endpoints from
//! `struct sock` at offsets from the kernel's BTF. Without BTF, the
//! tracepoint program `inet_sock_set_state` takes its place: it reads the
//! tracepoint's record, whose layout and id only tracefs gives.

use crate::owners::{owners_changed, take_cached_bytes, take_counts};
// What the programs share: maps, kernel offsets, reading and sending.
use crate::*;

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

/// The transition the transition program last handled on this CPU.
#[map(name = "HANDLED")]
static HANDLED: PerCpuArray<Handled> = PerCpuArray::with_max_entries(1, 0);

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C)]
struct Handled {
    skaddr: u64,
    states: u64,
}

impl Handled {
    fn new(skaddr: u64, oldstate: u8, newstate: u8) -> Handled {
        // Bit 16 marks a used slot: a zeroed slot matches nothing.
        let states = (1 << 16) | (u64::from(oldstate) << 8) | u64::from(newstate);
        Handled { skaddr, states }
    }
}

/// Notes on this CPU that the transition program handles this transition,
/// for the recovery program, which runs after it, to leave it out.
fn note_handled(skaddr: u64, oldstate: u8, newstate: u8) {
    if let Some(slot) = HANDLED.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; only code on this CPU touches it.
        unsafe { *slot = Handled::new(skaddr, oldstate, newstate) };
    }
}

/// A transition's states as the tracepoint passes them (ints), as the
/// kernel's numbers (`tcp_state`, all below 13).
fn states(oldstate: i32, newstate: i32) -> (u8, u8) {
    (oldstate as u8, newstate as u8)
}

/// A transition the transition program could not read: it should not
/// happen. It is counted as dropped, so that user space resyncs.
fn transition_unread<C: EbpfContext>(ctx: &C, err: i64) {
    count_drop(DROPPED_TRANSITIONS);
    error!(
        ctx,
        "reading an inet_sock_set_state transition failed: {}", err
    );
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn transition(ctx: RawTracePointContext) -> i32 {
    if stopping() {
        return 0;
    }
    if let Err(err) = try_transition(&ctx) {
        transition_unread(&ctx, err);
    }
    0
}

fn try_transition(ctx: &RawTracePointContext) -> Result<(), i64> {
    let sk: u64 = ctx.arg(0);
    let (oldstate, newstate) = states(ctx.arg(1), ctx.arg(2));
    if read_kernel::<u16>(sk, &SK_PROTOCOL)? != IPPROTO_TCP {
        return Ok(());
    }
    note_handled(sk, oldstate, newstate);
    // The same fields the tracepoint's record takes (inet_sport, not the
    // bound port, which a change to CLOSE may have cleared already).
    let (family, local, remote) = read_tuple(sk)?;
    send(event(sk, oldstate, newstate, family, local, remote, 0));
    Ok(())
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if stopping() {
        return 0;
    }
    if let Err(err) = try_inet_sock_set_state(&ctx) {
        transition_unread(&ctx, err);
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
    let (oldstate, newstate) = states(oldstate, newstate);
    note_handled(skaddr, oldstate, newstate);
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
    let (oldstate, newstate) = states(ctx.arg(1), ctx.arg(2));
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

/// What a transition does to the socket's entry in the kernel map, and the
/// bytes it carries. At a change to CLOSE (audit only), the socket's own
/// counts; when a socket opens (audit only), those its address's previous
/// occupant left after its CLOSE was traced, or without a traced CLOSE (the
/// new socket starts from zero). The counts are taken from the CPUs' cache
/// slots first, then from the entry, where a slot being reused moves its
/// bytes; each by atomic exchanges with zero, and the entry stays: a send or
/// receive counted on another CPU at the same time lands in these counts or
/// in the entry after them, never in between. At connect(), the connecting
/// process becomes the owner, so that its own sends are no handoff; a
/// socket the kernel accepts gets no owner, so that its first send or
/// receive names one. Elsewhere, and in watch and verify, the map is not
/// touched: a stale entry only names an owner, which these replace.
fn update_socket_entry(sk: u64, oldstate: u8, newstate: u8, owner: u32) -> ByteCounts {
    let opens = tcp_state::opens(oldstate, newstate);
    let mut counts = ByteCounts::default();
    if counts_bytes() && (newstate == tcp_state::CLOSE || opens) {
        if let Some(entry) = SOCKETS.get_ptr_mut(sk) {
            let cached = take_cached_bytes(sk, entry, opens);
            // SAFETY: the map value lives while the program runs.
            counts = cached.plus(take_counts(unsafe { &raw mut (*entry).bytes }));
        }
    }
    if oldstate == tcp_state::CLOSE && newstate == tcp_state::SYN_SENT {
        let entry = SocketEntry {
            owner,
            ..SocketEntry::default()
        };
        let _ = SOCKETS.insert(sk, entry, 0);
        owners_changed();
    } else if oldstate == tcp_state::LISTEN && newstate == tcp_state::SYN_RECV {
        mark_unowned(sk);
    }
    counts
}

/// A socket the kernel accepted has no owner yet: the first process to
/// send or receive on it is its first owner (`event_kind::FIRST_IO`),
/// unless the accept hook names the accepting process before that. The
/// entry is kept if there is one (another CPU may be adding bytes of the
/// socket that held this address before), its owner cleared; the epoch
/// moves on, so that no cached confirmation of that earlier socket hides
/// the first use of this one.
fn mark_unowned(sk: u64) {
    match SOCKETS.get_ptr_mut(sk) {
        // SAFETY: the map value lives while the program runs.
        Some(entry) => unsafe { core::ptr::write_volatile(&raw mut (*entry).owner, 0) },
        None => {
            let _ = SOCKETS.insert(sk, SocketEntry::default(), 1);
        }
    }
    owners_changed();
}

// Inlined: BPF calls pass at most five arguments, in registers.
#[inline(always)]
fn event(
    skaddr: u64,
    oldstate: u8,
    newstate: u8,
    family: u16,
    (saddr, sport): Endpoint,
    (daddr, dport): Endpoint,
    recovered: u8,
) -> KernelEvent {
    // Only connect() and listen() run in the owner's context: their
    // transitions name the process; the rest need just the tgid.
    let process = if oldstate == tcp_state::CLOSE {
        current_process()
    } else {
        Process {
            tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
            comm: [0; 16],
            start_ns: 0,
            cgroup_id: 0,
        }
    };
    let bytes = update_socket_entry(skaddr, oldstate, newstate, process.tgid);
    let (netns, uid) = socket_identity(skaddr);
    KernelEvent {
        sk_err: if newstate == tcp_state::CLOSE {
            close_error(skaddr)
        } else {
            0
        },
        bytes_sent: bytes.sent,
        bytes_received: bytes.received,
        netns,
        uid,
        saddr,
        daddr,
        sport,
        dport,
        family,
        oldstate,
        newstate,
        recovered,
        ..blank_event(skaddr, process)
    }
}

/// The error a socket was closed with: what the kernel stored in `sk_err`
/// just before the change to CLOSE (tcp_done_with_error() for a refused,
/// timed-out or reset connection, tcp_v4_err() and tcp_v6_err() for an
/// unreachable one). The transition itself is the source, not
/// `sock:inet_sk_error_report`, which fires just before it for the same
/// error: one event, in order, and no program more to attach.
#[inline(always)]
fn close_error(sk: u64) -> u16 {
    if !layout_known() {
        return 0;
    }
    let err = read_kernel::<i32>(sk, &SK_ERR).unwrap_or(0);
    u16::try_from(err).unwrap_or(0)
}
