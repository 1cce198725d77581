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
use crate::output::{self, LossCause, StreamRecord};
use crate::snapshot;
use crate::socket::{Owner, Proto};
use crate::table::{SocketTable, Transition, Tuple};

/// How often the kernel's loss counters are read.
const LOSS_CHECK_INTERVAL: Duration = Duration::from_millis(100);

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
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut watcher = Watcher::new(args, out);
    watcher.resync()?;
    eprintln!(
        "netwatch: watching TCP state transitions ({} sockets in the table, attached in {} ms)",
        watcher.table.len(),
        started.elapsed().as_millis()
    );
    let mut kernel_log = probe.take_kernel_log();
    let mut loss_check = tokio::time::interval(LOSS_CHECK_INTERVAL);
    loop {
        tokio::select! {
            drained = probe.drain(|event| watcher.on_event(&event)) => {
                drained.context("reading the ring buffer failed")?;
            }
            logged = forward(kernel_log.as_mut()) => logged.context("reading the eBPF program's log failed")?,
            _ = loss_check.tick() => watcher.check_losses(&probe)?,
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
        watcher.flush()?;
    }
    probe.drain_now(|event| watcher.on_event(&event));
    watcher.check_losses(&probe)?;
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
    reported_losses: LossCounters,
    resyncs: u64,
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
            reported_losses: LossCounters::default(),
            resyncs: 0,
        }
    }

    fn on_event(&mut self, event: &StateEvent) {
        let Some(transition) = ebpf::to_transition(event) else {
            return;
        };
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
        }
    }

    fn render_transition(&mut self, t: &Transition, owner: Option<&Owner>, ms: Option<f64>) {
        let ts = output::rfc3339(self.clock.at(t.ts_ns));
        // Writing to a Vec cannot fail.
        let _ = if self.args.json {
            let (local_addr, local_port) = output::split_endpoint(t.tuple.local);
            let (remote_addr, remote_port) = output::split_endpoint(t.tuple.remote);
            output::write_json_line(
                &mut self.buffer,
                &StreamRecord::State {
                    ts,
                    pid: owner.map(|owner| owner.pid),
                    program: owner.map(|owner| owner.program.as_str()),
                    proto: t.tuple.proto.name(),
                    local_addr,
                    local_port,
                    remote_addr,
                    remote_port,
                    old_state: t.old.name(),
                    new_state: t.new.name(),
                    ms,
                },
            )
        } else {
            output::write_state_text(&mut self.buffer, &ts, owner, &t.tuple, t.old, t.new, ms)
        };
    }

    /// Rebuilds the table from a fresh /proc snapshot (the baseline at start).
    fn resync(&mut self) -> anyhow::Result<()> {
        let snapshot = snapshot::take(&[Proto::Tcp, Proto::Tcp6], true)
            .context("reading the /proc baseline failed")?;
        self.table.reset_from(&snapshot);
        let first = self.resyncs == 0 && self.transitions == 0;
        let ts = output::rfc3339(SystemTime::now());
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
        if !self.args.json && !snapshot.entries.is_empty() {
            self.buffer
                .extend_from_slice(output::STREAM_HEADER.as_bytes());
            self.buffer.push(b'\n');
        }
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
                    pid,
                    program: entry.owner.as_ref().map(|owner| owner.program.as_str()),
                    proto: socket.proto.name(),
                    local_addr: socket.local.ip().to_string(),
                    local_port: socket.local.port(),
                    remote_addr: socket.remote.ip().to_string(),
                    remote_port: socket.remote.port(),
                    state: socket.state.name(),
                    inode: socket.inode,
                    uid: socket.uid,
                };
                output::write_json_line(&mut self.buffer, &record)
            } else {
                output::write_baseline_text(&mut self.buffer, ts, entry)
            };
        }
    }

    /// Reports transitions lost since the last check and resyncs after a loss.
    fn check_losses(&mut self, probe: &StateProbe) -> anyhow::Result<()> {
        let now = probe.losses().context("reading the loss counters failed")?;
        let new_losses = [
            (
                now.ring_buffer_full - self.reported_losses.ring_buffer_full,
                LossCause::RingBufferFull,
            ),
            (
                now.recursion - self.reported_losses.recursion,
                LossCause::Recursion,
            ),
        ];
        self.reported_losses = now;
        let mut lost_any = false;
        for (count, cause) in new_losses.into_iter().filter(|(count, _)| *count > 0) {
            lost_any = true;
            eprintln!("netwatch: lost {count} transition(s): {}", cause.describe());
            if self.args.json {
                let ts = output::rfc3339(SystemTime::now());
                let _ = output::write_json_line(
                    &mut self.buffer,
                    &StreamRecord::Lost { ts, count, cause },
                );
            }
        }
        if lost_any && !self.args.no_resync {
            self.resync()?;
        }
        Ok(())
    }

    /// Writes what is buffered.
    fn flush(&mut self) -> io::Result<()> {
        if !self.buffer.is_empty() {
            self.out.write_all(&self.buffer)?;
            self.out.flush()?;
            self.buffer.clear();
        }
        Ok(())
    }

    fn summary(&self, runtime: Duration) {
        let lost = self.reported_losses;
        eprintln!(
            "netwatch: ran {:.1} s: {} transitions, {} lost ({} ring buffer full, {} skipped by the kernel), {} resyncs, {} sockets in the table",
            runtime.as_secs_f64(),
            self.transitions,
            lost.ring_buffer_full + lost.recursion,
            lost.ring_buffer_full,
            lost.recursion,
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
