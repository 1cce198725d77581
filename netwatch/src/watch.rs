//! `netwatch` / `netwatch watch`: the live stream of TCP state transitions.
//!
//! Order matters: the program is attached first, then /proc is read, then the
//! events that queued up during the read are applied on top of it, so that
//! no transition in between is missed (the table adopts a baseline socket on
//! its first transition, see `table`).

use std::io::{self, Write};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use netwatch_common::StateEvent;
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::WatchArgs;
use crate::ebpf::{self, KernelLog, LossCounters, StateProbe};
use crate::output::{self, Addr, LossCause, SocketRecord, StreamRecord, Timestamp};
use crate::snapshot;
use crate::socket::{Owner, Proto};
use crate::table::{SocketTable, Transition, Tuple};

/// How often the ring buffer is drained without a wakeup: the eBPF side wakes
/// netwatch only when much is waiting or 5 ms after its last wakeup.
const DRAIN_INTERVAL: Duration = Duration::from_millis(25);
/// How often the kernel's loss counters are read.
const LOSS_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// Resyncs at most this often: under a storm of losses, re-reading /proc
/// (which slows as TIME_WAIT sockets pile up) would only cause more.
const RESYNC_INTERVAL: Duration = Duration::from_secs(2);
/// Output is written whenever this much is buffered, and after each batch.
const FLUSH_AT: usize = 64 * 1024;

/// Streams until SIGINT or SIGTERM, then prints a summary on stderr.
pub fn run(args: WatchArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event loop failed")?;
    runtime.block_on(stream(args, io::stdout().lock()))
}

async fn stream(args: WatchArgs, out: impl Write) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut probe = StateProbe::attach(args.ring_buffer_kib * 1024)?;
    let attached = started.elapsed();
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut watcher = Watcher::new(args, out);
    watcher.resync()?;
    eprintln!(
        "netwatch: watching TCP state transitions (loaded and attached in {} ms, baseline of {} sockets read in {} ms{})",
        attached.as_millis(),
        watcher.table.len(),
        (started.elapsed() - attached).as_millis(),
        if probe.recovers_skipped_calls() {
            ", recovering skipped calls"
        } else {
            ""
        }
    );
    let mut kernel_log = probe.take_kernel_log();
    let mut loss_check = tokio::time::interval(LOSS_CHECK_INTERVAL);
    let mut drain_timer = tokio::time::interval(DRAIN_INTERVAL);
    loop {
        tokio::select! {
            drained = probe.drain(|event| watcher.on_event(&event)) => {
                drained.context("reading the ring buffer failed")?;
            }
            logged = forward(kernel_log.as_mut()) => logged.context("reading the eBPF program's log failed")?,
            _ = drain_timer.tick() => probe.drain_now(|event| watcher.on_event(&event)),
            _ = loss_check.tick() => {
                let counters = probe.losses().context("reading the loss counters failed")?;
                probe.drain_now(|event| watcher.on_event(&event));
                watcher.check_losses(counters, false)?;
            }
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
        watcher.flush()?;
    }
    // Let recoveries in flight on other CPUs land before the last count.
    let counters = probe.losses().context("reading the loss counters failed")?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    probe.drain_now(|event| watcher.on_event(&event));
    watcher.check_losses(counters, true)?;
    watcher.flush()?;
    watcher.summary(started.elapsed());
    Ok(())
}

/// Forwards the eBPF program's log, or waits forever when there is none.
async fn forward(kernel_log: Option<&mut KernelLog>) -> io::Result<()> {
    match kernel_log {
        Some(kernel_log) => kernel_log.forward().await,
        None => std::future::pending().await,
    }
}

/// Applies events to the table and renders them; output is buffered per batch.
struct Watcher<W: Write> {
    args: WatchArgs,
    out: W,
    buffer: Vec<u8>,
    table: SocketTable,
    clock: WallClock,
    transitions: u64,
    /// Transitions the recovery program sent that the kernel had skipped.
    recovered: u64,
    /// Transitions the recovery program repeated (dropped).
    duplicates: u64,
    /// The kernel's counters at the previous check.
    counters: LossCounters,
    /// Losses reported so far: ring buffer full, skipped and not recovered.
    lost: LossCounters,
    /// Losses happened since the last resync.
    stale: bool,
    last_resync: Instant,
    /// Whether the starting baseline was taken (later readings are resyncs).
    baseline_taken: bool,
    resyncs: u64,
    /// The first error writing the output, raised after the batch.
    write_error: Option<io::Error>,
}

impl<W: Write> Watcher<W> {
    fn new(args: WatchArgs, out: W) -> Self {
        Watcher {
            args,
            out,
            buffer: Vec::with_capacity(1 << 16),
            table: SocketTable::new(snapshot::program_name),
            clock: WallClock::now(),
            transitions: 0,
            recovered: 0,
            duplicates: 0,
            counters: LossCounters::default(),
            lost: LossCounters::default(),
            stale: false,
            last_resync: Instant::now(),
            baseline_taken: false,
            resyncs: 0,
            write_error: None,
        }
    }

    fn on_event(&mut self, event: &StateEvent) {
        let Some(transition) = ebpf::to_transition(event) else {
            return;
        };
        if transition.recovered {
            if self.table.is_duplicate(&transition) {
                self.duplicates += 1;
                return;
            }
            self.recovered += 1;
        }
        self.transitions += 1;
        let observed = self.table.apply(&transition);
        let pid = observed.owner.as_ref().map(|owner| owner.pid);
        if self
            .args
            .filters
            .matches(&transition.tuple, pid, &[transition.old, transition.new])
        {
            self.render_transition(
                &transition,
                observed.owner.as_ref(),
                observed.ms_in_old_state,
            );
            if self.buffer.len() >= FLUSH_AT && self.write_error.is_none() {
                self.write_error = self.flush().err();
            }
        }
    }

    fn render_transition(&mut self, t: &Transition, owner: Option<&Owner>, ms: Option<f64>) {
        let ts = Timestamp(self.clock.at(t.ts_ns));
        // Writing to a Vec cannot fail.
        let _ = if self.args.json {
            output::write_json_line(
                &mut self.buffer,
                &StreamRecord::State {
                    ts,
                    pid: owner.map(|owner| owner.pid),
                    program: owner.map(|owner| owner.program.as_str()),
                    proto: t.tuple.proto.name(),
                    local_addr: Addr(t.tuple.local.ip()),
                    local_port: t.tuple.local.port(),
                    remote_addr: Addr(t.tuple.remote.ip()),
                    remote_port: t.tuple.remote.port(),
                    old_state: t.old.name(),
                    new_state: t.new.name(),
                    ms,
                },
            )
        } else {
            output::write_state_text(
                &mut self.buffer,
                &ts.to_string(),
                owner,
                &t.tuple,
                t.old,
                t.new,
                ms,
            )
        };
    }

    /// Rebuilds the table from a fresh /proc snapshot (the baseline at start).
    fn resync(&mut self) -> anyhow::Result<()> {
        let snapshot = snapshot::take(&[Proto::Tcp, Proto::Tcp6], true)
            .context("reading the /proc baseline failed")?;
        self.table.reset_from(&snapshot);
        self.stale = false;
        self.last_resync = Instant::now();
        let first = !self.baseline_taken;
        self.baseline_taken = true;
        let ts = output::rfc3339(SystemTime::now());
        if first && !self.args.json {
            self.buffer
                .extend_from_slice(output::STREAM_HEADER.as_bytes());
            self.buffer.push(b'\n');
        }
        if first && self.args.baseline {
            self.render_baseline(&snapshot, &ts);
        }
        if !first {
            self.resyncs += 1;
            eprintln!(
                "netwatch: resynced the table from /proc: {} sockets",
                self.table.len()
            );
            if self.args.json {
                let record = StreamRecord::Resync {
                    ts,
                    sockets: self.table.len(),
                };
                let _ = output::write_json_line(&mut self.buffer, &record);
            }
        }
        Ok(())
    }

    fn render_baseline(&mut self, snapshot: &snapshot::Snapshot, ts: &str) {
        for entry in &snapshot.entries {
            let socket = &entry.socket;
            let tuple = Tuple {
                proto: socket.proto,
                local: socket.local,
                remote: socket.remote,
            };
            let pid = entry.owner.as_ref().map(|owner| owner.pid);
            if !self.args.filters.matches(&tuple, pid, &[socket.state]) {
                continue;
            }
            let _ = if self.args.json {
                let record = StreamRecord::Baseline {
                    ts: ts.to_owned(),
                    socket: SocketRecord::new(entry),
                };
                output::write_json_line(&mut self.buffer, &record)
            } else {
                output::write_baseline_text(&mut self.buffer, ts, entry)
            };
        }
    }

    /// Reports transitions lost since the last check and resyncs after a
    /// loss. A skipped call counts as lost once its recovery had time to
    /// arrive: skips counted at the previous check (or, when `last`, now).
    fn check_losses(&mut self, now: LossCounters, last: bool) -> anyhow::Result<()> {
        let settled_skips = if last {
            now.skipped
        } else {
            self.counters.skipped
        };
        self.counters = now;
        let unrecovered = settled_skips.saturating_sub(self.recovered);
        let new_losses = [
            (
                now.ring_buffer_full
                    .saturating_sub(self.lost.ring_buffer_full),
                LossCause::RingBufferFull,
            ),
            (
                unrecovered.saturating_sub(self.lost.skipped),
                LossCause::Recursion,
            ),
        ];
        self.lost.ring_buffer_full = self.lost.ring_buffer_full.max(now.ring_buffer_full);
        self.lost.skipped = self.lost.skipped.max(unrecovered);
        for (count, cause) in new_losses.into_iter().filter(|(count, _)| *count > 0) {
            self.stale = true;
            eprintln!("netwatch: lost {count} transition(s): {}", cause.describe());
            if self.args.json {
                let ts = output::rfc3339(SystemTime::now());
                let _ = output::write_json_line(
                    &mut self.buffer,
                    &StreamRecord::Lost { ts, count, cause },
                );
            }
        }
        let due = last || self.last_resync.elapsed() >= RESYNC_INTERVAL;
        if self.stale && due && !self.args.no_resync {
            self.resync()?;
        }
        Ok(())
    }

    /// Writes what is buffered.
    fn flush(&mut self) -> io::Result<()> {
        if let Some(err) = self.write_error.take() {
            return Err(err);
        }
        if !self.buffer.is_empty() {
            self.out.write_all(&self.buffer)?;
            self.out.flush()?;
            self.buffer.clear();
        }
        Ok(())
    }

    fn summary(&self, runtime: Duration) {
        let lost = self.lost;
        eprintln!(
            "netwatch: ran {:.1} s: {} transitions ({} fired in the kernel), {} lost ({} ring buffer full, {} skipped by the kernel and not recovered); {} of {} skipped calls recovered, {} duplicates dropped; {} resyncs, {} sockets in the table",
            runtime.as_secs_f64(),
            self.transitions,
            self.counters.fired.map_or_else(|| "?".to_owned(), |fired| fired.to_string()),
            lost.ring_buffer_full + lost.skipped,
            lost.ring_buffer_full,
            lost.skipped,
            self.recovered,
            self.counters.skipped,
            self.duplicates,
            self.resyncs,
            self.table.len()
        );
    }
}

/// Converts CLOCK_MONOTONIC timestamps (bpf_ktime_get_ns) to wall-clock time.
struct WallClock {
    realtime_at_zero: SystemTime,
}

impl WallClock {
    fn now() -> WallClock {
        let monotonic = clock_ns(libc::CLOCK_MONOTONIC);
        WallClock {
            realtime_at_zero: SystemTime::now() - Duration::from_nanos(monotonic),
        }
    }

    fn at(&self, monotonic_ns: u64) -> SystemTime {
        self.realtime_at_zero + Duration::from_nanos(monotonic_ns)
    }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(clock, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
