//! eBPF side of netwatch: one tracepoint program that forwards every TCP
//! state transition to user space through a ring buffer.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::error;
use netwatch_common::{tracepoint as field, StateEvent, AF_INET, IPPROTO_TCP};

/// Default size; the loader overrides it from `--ring-buffer-size`.
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Events the ring buffer had no room for, per CPU (slot 0).
#[map(name = "DROPS")]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

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
    let Some(mut entry) = EVENTS.reserve::<StateEvent>(0) else {
        count_drop();
        return Ok(());
    };
    match fill_event(ctx) {
        Ok(event) => {
            entry.write(event);
            entry.submit(0);
            Ok(())
        }
        Err(err) => {
            entry.discard(0);
            Err(err)
        }
    }
}

fn fill_event(ctx: &TracePointContext) -> Result<StateEvent, i64> {
    // SAFETY: as above, every read stays inside the tracepoint record.
    unsafe {
        let family: u16 = ctx.read_at(field::FAMILY)?;
        let mut saddr = [0u8; 16];
        let mut daddr = [0u8; 16];
        if family == AF_INET {
            saddr[..4].copy_from_slice(&ctx.read_at::<[u8; 4]>(field::SADDR)?);
            daddr[..4].copy_from_slice(&ctx.read_at::<[u8; 4]>(field::DADDR)?);
        } else {
            saddr = ctx.read_at(field::SADDR_V6)?;
            daddr = ctx.read_at(field::DADDR_V6)?;
        }
        let oldstate: i32 = ctx.read_at(field::OLDSTATE)?;
        let newstate: i32 = ctx.read_at(field::NEWSTATE)?;
        Ok(StateEvent {
            ts_ns: bpf_ktime_get_ns(),
            skaddr: ctx.read_at(field::SKADDR)?,
            saddr,
            daddr,
            comm: bpf_get_current_comm().unwrap_or_default(),
            tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
            sport: ctx.read_at(field::SPORT)?,
            dport: ctx.read_at(field::DPORT)?,
            family,
            oldstate: oldstate as u8,
            newstate: newstate as u8,
            _pad: [0; 4],
        })
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
