//! The engine under `watch`, `audit` and `verify`: attach the eBPF
//! programs, read the /proc baseline, keep the live table current from the
//! transitions, account for every loss, and hand what it sees to an
//! [`Observer`], the mode's own logic.
//!
//! Order matters: the programs are attached first, then /proc is read, then
//! the events that queued up during the read are applied on top of it, so
//! that no transition in between is missed (the table adopts a baseline
//! socket on its first transition, see `table`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use netwatch_common::{ByteCounts, KernelEvent};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::ProbeArgs;
use crate::ebpf::{self, KernelLog, Record, StateProbe};
use crate::metrics::{Failure, Metrics};
use crate::model::{LossCause, LossCounters, OwnerChange, OwnerEvent, Proto, Transition};
use crate::sink::Sink;
use crate::snapshot::{self, Snapshot};
use crate::table::{Observed, SocketTable};

/// How often the ring buffer is drained without a wakeup: the eBPF side wakes
/// netwatch only when much is waiting or 5 ms after its last wakeup.
const DRAIN_INTERVAL: Duration = Duration::from_millis(25);
/// How often the kernel's loss counters are read.
const LOSS_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// How often the sockets-by-state gauge is recounted (when metrics are served).
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);
/// A failed reopen of the output is tried again after this long, doubling
/// up to `REOPEN_RETRY_MAX`.
const REOPEN_RETRY_FIRST: Duration = Duration::from_secs(1);
const REOPEN_RETRY_MAX: Duration = Duration::from_secs(60);
/// Resyncs at most this often: under a storm of losses, re-reading /proc
/// (which slows as TIME_WAIT sockets pile up) would only cause more.
const RESYNC_INTERVAL: Duration = Duration::from_secs(2);
/// After failed resyncs, the wait doubles up to this.
const RESYNC_RETRY_MAX: Duration = Duration::from_secs(60);
/// Output is written whenever this much is buffered, and after each batch.
const FLUSH_AT: usize = 64 * 1024;
/// Sockets the live table holds at most (the least recently changed are
/// evicted beyond): twice the kernel's map of owners and byte counts.
pub const TABLE_CAPACITY: usize = 2 * netwatch_common::SOCKETS_MAP_ENTRIES as usize;

/// What a mode does with what the monitor sees. Records go to `out`, a
/// buffer written to the mode's output after each batch.
pub trait Observer {
    /// The counters the monitor serves, for the observer's own.
    fn attach_metrics(&mut self, _metrics: Arc<Metrics>) {}
    /// The baseline is in the table (once, before any transition).
    fn baseline(&mut self, _snapshot: &Snapshot, _table: &SocketTable, _out: &mut Vec<u8>) {}
    /// A transition was applied to the table.
    fn transition(
        &mut self,
        t: &Transition,
        observed: Observed,
        clock: &WallClock,
        out: &mut Vec<u8>,
    );
    /// A socket's owner became another process, at monotonic time `ts_ns`.
    fn owner_changed(
        &mut self,
        _ts_ns: u64,
        _change: &OwnerChange,
        _clock: &WallClock,
        _out: &mut Vec<u8>,
    ) {
    }
    /// A routine failure that the monitor goes on after (reported on
    /// stderr already): `message` says what failed and what happens next.
    fn failed(&mut self, _what: Failure, _message: &str, _out: &mut Vec<u8>) {}
    /// Transitions (or owner changes) were lost.
    fn lost(&mut self, _count: u64, _cause: LossCause, _out: &mut Vec<u8>) {}
    /// The table was rebuilt from /proc after losses.
    fn resynced(&mut self, _table: &SocketTable, _out: &mut Vec<u8>) {}
    /// A periodic check begins: a snapshot is taken from monotonic time `at_ns`.
    fn check_starts(&mut self, _at_ns: u64) {}
    /// How often `check` runs, if at all.
    fn check_interval(&self) -> Option<Duration> {
        None
    }
    /// The periodic check: `snapshot` was just taken (while transitions
    /// were applied), and every transition stamped before it ended has been
    /// applied to `table`.
    fn check(&mut self, _snapshot: &Snapshot, _table: &SocketTable, _out: &mut Vec<u8>) {}
    /// The monitor stops; the table holds what is still open. `bytes` looks
    /// up a socket's byte counts so far by its kernel address.
    fn stopped(
        &mut self,
        _table: &SocketTable,
        _bytes: &dyn Fn(u64) -> Option<ByteCounts>,
        _clock: &WallClock,
        _out: &mut Vec<u8>,
    ) {
    }
}

/// How the monitor runs, whatever the mode.
pub struct Config {
    pub ring_bytes: u32,
    pub no_resync: bool,
    /// Count each socket's bytes in the kernel (audit).
    pub count_bytes: bool,
    pub metrics: Option<SocketAddr>,
    /// Stop after this long (SIGINT and SIGTERM stop it in any case).
    pub duration: Option<Duration>,
}

impl Config {
    /// The monitor's configuration from a mode's flags.
    pub fn new(probe: &ProbeArgs, count_bytes: bool, duration: Option<Duration>) -> Config {
        Config {
            ring_bytes: probe.ring_buffer_kib * 1024,
            no_resync: probe.no_resync,
            count_bytes,
            metrics: probe.metrics,
            duration,
        }
    }
}

/// Runs `observer` on a monitor until SIGINT, SIGTERM or `config.duration`,
/// writing to `sink`; returns the observer for its verdict.
pub fn run<O: Observer>(config: Config, observer: O, sink: Sink) -> anyhow::Result<O> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event loop failed")?;
    runtime.block_on(monitor(config, observer, sink))
}

async fn monitor<O: Observer>(config: Config, observer: O, sink: Sink) -> anyhow::Result<O> {
    let started = Instant::now();
    let metrics = Arc::new(Metrics::new(config.ring_bytes));
    if let Some(addr) = config.metrics {
        crate::metrics::serve(addr, metrics.clone())?;
    }
    let mut probe = StateProbe::attach(config.ring_bytes, config.count_bytes)?;
    let attached = started.elapsed();
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut monitor = Monitor::new(config.no_resync, observer, sink, metrics.clone());
    monitor.observer.attach_metrics(metrics);
    monitor.take_baseline()?;
    eprintln!(
        "netwatch: watching TCP state transitions (loaded and attached in {} ms, baseline of {} sockets read in {} ms{})",
        attached.as_millis(),
        monitor.table.len(),
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
    let mut gauge_timer = tokio::time::interval(GAUGE_INTERVAL);
    let check_every = monitor.observer.check_interval();
    let mut check_timer = tokio::time::interval(check_every.unwrap_or(Duration::from_secs(3600)));
    check_timer.tick().await;
    // The check's snapshot is read on a thread while transitions keep flowing.
    let mut pending_check: Option<tokio::task::JoinHandle<anyhow::Result<Snapshot>>> = None;
    let deadline = tokio::time::sleep(config.duration.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);
    let mut write_failed = None;
    // Armed while a reopen of the output is to be tried again.
    let reopen_retry = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(reopen_retry);
    loop {
        let retrying_reopen = monitor.reopen_backoff.is_some();
        tokio::select! {
            drained = probe.drain(|event| monitor.on_event(&event)) => {
                drained.context("reading the ring buffer failed")?;
            }
            logged = forward(kernel_log.as_mut()) => logged.context("reading the eBPF program's log failed")?,
            _ = drain_timer.tick() => probe.drain_now(|event| monitor.on_event(&event)),
            _ = loss_check.tick() => {
                let counters = probe.losses().context("reading the loss counters failed")?;
                probe.drain_now(|event| monitor.on_event(&event));
                monitor.check_losses(counters, false)?;
            }
            _ = gauge_timer.tick(), if config.metrics.is_some() => monitor.metrics.count_sockets(&monitor.table),
            _ = check_timer.tick(), if check_every.is_some() && pending_check.is_none() => {
                monitor.observer.check_starts(clock_ns(libc::CLOCK_MONOTONIC));
                pending_check = Some(tokio::task::spawn_blocking(read_proc));
            }
            taken = async { pending_check.as_mut().expect("guarded").await }, if pending_check.is_some() => {
                pending_check = None;
                match taken.context("the snapshot thread failed").and_then(|taken| taken) {
                    Ok(snapshot) => monitor.check(&mut probe, snapshot).await,
                    Err(err) => monitor.report_failure(Failure::Snapshot, &err, "this check is skipped; the next one comes at the next interval"),
                }
            }
            _ = hangup.recv() => reopen_retry.as_mut().reset(monitor.reopen_output()),
            _ = &mut reopen_retry, if retrying_reopen => reopen_retry.as_mut().reset(monitor.reopen_output()),
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = &mut deadline => break,
        }
        if let Err(err) = monitor.flush() {
            write_failed = Some(err);
            break;
        }
    }
    // Even when the output failed, stop writes what it still can and the
    // summary goes to stderr; the first error is the one reported.
    let stopped = monitor.stop(&mut probe).await;
    monitor.summary(started.elapsed());
    if let Some(err) = write_failed {
        return Err(err.into());
    }
    stopped?;
    Ok(monitor.observer)
}

/// Reads the TCP tables of every network namespace, with their owners.
fn read_baseline() -> anyhow::Result<Snapshot> {
    snapshot::take_every_namespace(&[Proto::Tcp, Proto::Tcp6], true)
        .context("reading the /proc TCP tables failed")
}

/// Reads netwatch's own namespace's TCP tables of /proc with their owners.
fn read_proc() -> anyhow::Result<Snapshot> {
    snapshot::take(&[Proto::Tcp, Proto::Tcp6], true).context("reading the /proc TCP tables failed")
}

/// Forwards the eBPF program's log, or waits forever when there is none.
async fn forward(kernel_log: Option<&mut KernelLog>) -> io::Result<()> {
    match kernel_log {
        Some(kernel_log) => kernel_log.forward().await,
        None => std::future::pending().await,
    }
}

/// The table, the loss accounting and the observer, fed event by event.
struct Monitor<O> {
    observer: O,
    no_resync: bool,
    sink: Sink,
    buffer: Vec<u8>,
    table: SocketTable,
    clock: WallClock,
    metrics: Arc<Metrics>,
    /// Network namespace of netwatch, where /proc is read.
    netns: Option<u32>,
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
    /// The wait before the next resync: `RESYNC_INTERVAL`, doubled after each failure.
    resync_wait: Duration,
    resyncs: u64,
    /// The first error writing the output, raised after the batch.
    write_error: Option<io::Error>,
    /// While a reopen of the output keeps failing: the wait before the next try.
    reopen_backoff: Option<Duration>,
}

impl<O: Observer> Monitor<O> {
    fn new(no_resync: bool, observer: O, sink: Sink, metrics: Arc<Metrics>) -> Self {
        Monitor {
            observer,
            no_resync,
            sink,
            buffer: Vec::with_capacity(1 << 16),
            table: SocketTable::new(snapshot::program_name, TABLE_CAPACITY),
            clock: WallClock::now(),
            metrics,
            netns: snapshot::own_netns(),
            transitions: 0,
            recovered: 0,
            duplicates: 0,
            counters: LossCounters::default(),
            lost: LossCounters::default(),
            stale: false,
            last_resync: Instant::now(),
            resync_wait: RESYNC_INTERVAL,
            resyncs: 0,
            write_error: None,
            reopen_backoff: None,
        }
    }

    /// Reopens the output (SIGHUP, or a retry). When that fails (the
    /// directory was moved or removed, no fd left), records keep going to
    /// the file already open: the failure is reported and tried again
    /// after a backoff. Returns when the next try is due.
    fn reopen_output(&mut self) -> tokio::time::Instant {
        match self.sink.reopen() {
            Ok(()) => {
                self.reopen_backoff = None;
                tokio::time::Instant::now()
            }
            Err(err) => {
                let wait = self
                    .reopen_backoff
                    .map_or(REOPEN_RETRY_FIRST, |wait| (wait * 2).min(REOPEN_RETRY_MAX));
                self.reopen_backoff = Some(wait);
                let next = format!(
                    "records keep going to the file already open, and the reopen is tried again in {} s",
                    wait.as_secs()
                );
                self.report_failure(Failure::Reopen, &err, &next);
                tokio::time::Instant::now() + wait
            }
        }
    }

    /// Reports a failure that netwatch goes on after: on stderr, in the
    /// metrics, and as a record of the mode's output.
    fn report_failure(&mut self, what: Failure, err: &anyhow::Error, next: &str) {
        self.metrics.failure(what);
        let message = format!("{err:#}; {next}");
        eprintln!("netwatch: warning: {message}");
        self.observer.failed(what, &message, &mut self.buffer);
    }

    fn on_event(&mut self, event: &KernelEvent) {
        match ebpf::to_record(event) {
            Some(Record::Transition(transition)) => self.on_transition(&transition),
            Some(Record::Owner(owner)) => self.on_owner(&owner),
            Some(Record::Exec(task)) => self.table.exec(&task),
            None => {}
        }
    }

    fn on_owner(&mut self, event: &OwnerEvent) {
        if let Some(change) = self.table.set_owner(event) {
            self.metrics.owner_change(change.cause);
            self.observer
                .owner_changed(event.ts_ns, &change, &self.clock, &mut self.buffer);
            self.flush_when_full();
        }
    }

    fn on_transition(&mut self, transition: &Transition) {
        if transition.recovered {
            if self.table.is_duplicate(transition) {
                self.duplicates += 1;
                return;
            }
            self.recovered += 1;
            self.metrics.recovered.inc();
        }
        self.transitions += 1;
        self.metrics.transition(transition.old, transition.new);
        let observed = self.table.apply(transition);
        self.observer
            .transition(transition, observed, &self.clock, &mut self.buffer);
        self.flush_when_full();
    }

    /// Writes the buffer once it holds `FLUSH_AT`; an error waits for the end of the batch.
    fn flush_when_full(&mut self) {
        if self.buffer.len() >= FLUSH_AT && self.write_error.is_none() {
            self.write_error = self.flush().err();
        }
    }

    /// Fills the table from /proc: the baseline at start, or a resync.
    fn reload(&mut self) -> anyhow::Result<Snapshot> {
        let snapshot = read_baseline()?;
        self.table.reset_from(&snapshot, self.netns);
        self.stale = false;
        self.last_resync = Instant::now();
        self.resync_wait = RESYNC_INTERVAL;
        Ok(snapshot)
    }

    fn take_baseline(&mut self) -> anyhow::Result<()> {
        let snapshot = self.reload()?;
        self.observer
            .baseline(&snapshot, &self.table, &mut self.buffer);
        Ok(())
    }

    /// Hands the observer a snapshot just read, once every transition
    /// stamped before its end is applied.
    async fn check(&mut self, probe: &mut StateProbe, snapshot: Snapshot) {
        // Transitions stamped before the snapshot ended may still be on their way on other CPUs.
        tokio::time::sleep(Duration::from_millis(10)).await;
        probe.drain_now(|event| self.on_event(&event));
        self.observer
            .check(&snapshot, &self.table, &mut self.buffer);
    }

    /// Drains what is left, counts the last losses and lets the observer
    /// write its last records.
    async fn stop(&mut self, probe: &mut StateProbe) -> anyhow::Result<()> {
        // The transition programs neither send nor count from here on:
        // once the calls under way on other CPUs have finished, the last
        // drain and the kernel's counters describe the same transitions,
        // and delivered + lost = fired exactly.
        probe
            .stop_sending()
            .context("telling the eBPF programs to stop failed")?;
        let at_stop = probe.losses().context("reading the loss counters failed")?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        probe.drain_now(|event| self.on_event(&event));
        let mut counters = probe.losses().context("reading the loss counters failed")?;
        // The kernel still counts the calls it skips after the stop, which
        // were neither sent nor counted as fired: leave them out.
        counters.skipped = at_stop.skipped;
        let skipped_since = counters.recovery_skipped - at_stop.recovery_skipped;
        counters.fired = counters.fired.map(|fired| fired - skipped_since);
        self.check_losses(counters, true)?;
        self.observer.stopped(
            &self.table,
            &|skaddr| probe.bytes(skaddr),
            &self.clock,
            &mut self.buffer,
        );
        Ok(self.flush()?)
    }

    /// Rebuilds the table from a fresh /proc snapshot after losses.
    fn resync(&mut self) -> anyhow::Result<()> {
        self.reload()?;
        self.resyncs += 1;
        self.metrics.resyncs.inc();
        eprintln!(
            "netwatch: resynced the table from /proc: {} sockets",
            self.table.len()
        );
        self.observer.resynced(&self.table, &mut self.buffer);
        Ok(())
    }

    /// Reports transitions lost since the last check and resyncs after a
    /// loss. A skipped call counts as lost once its recovery had time to
    /// arrive: skips counted at the previous check (or, when `last`, now).
    fn check_losses(&mut self, now: LossCounters, last: bool) -> anyhow::Result<()> {
        let settled = if last { now } else { self.counters };
        self.counters = now;
        // A skipped call whose recovery the full ring buffer refused is a
        // ring buffer loss already: counting it here too would make
        // delivered + lost exceed what the kernel fired.
        let unrecovered = settled
            .skipped
            .saturating_sub(self.recovered)
            .saturating_sub(settled.recoveries_refused);
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
            (
                now.owner_events_dropped
                    .saturating_sub(self.lost.owner_events_dropped),
                LossCause::OwnerRingBufferFull,
            ),
        ];
        self.lost.ring_buffer_full = self.lost.ring_buffer_full.max(now.ring_buffer_full);
        self.lost.owner_events_dropped =
            self.lost.owner_events_dropped.max(now.owner_events_dropped);
        self.lost.skipped = self.lost.skipped.max(unrecovered);
        self.metrics.set_losses(self.lost, &self.table);
        for (count, cause) in new_losses.into_iter().filter(|(count, _)| *count > 0) {
            self.stale = true;
            eprintln!(
                "netwatch: lost {count} {}: {}",
                cause.lost_what(),
                cause.describe()
            );
            self.observer.lost(count, cause, &mut self.buffer);
        }
        let due = last || self.last_resync.elapsed() >= self.resync_wait;
        if self.stale && due && !self.no_resync {
            if let Err(err) = self.resync() {
                // Tried again later, while the table stays stale.
                self.last_resync = Instant::now();
                self.resync_wait = (self.resync_wait * 2).min(RESYNC_RETRY_MAX);
                let next = format!(
                    "the table stays as it is, and the resync is tried again in {} s",
                    self.resync_wait.as_secs()
                );
                self.report_failure(Failure::Resync, &err, &next);
            }
        }
        Ok(())
    }

    /// Writes what is buffered.
    fn flush(&mut self) -> io::Result<()> {
        if let Some(err) = self.write_error.take() {
            return Err(err);
        }
        if !self.buffer.is_empty() {
            self.sink.write_all(&self.buffer)?;
            self.buffer.clear();
        }
        Ok(())
    }

    fn summary(&self, runtime: Duration) {
        let lost = self.lost;
        eprintln!(
            "netwatch: ran {:.1} s: {} transitions ({} fired in the kernel), {} lost ({} ring buffer full, {} skipped by the kernel and not recovered); {} of {} skipped calls recovered, {} duplicates dropped; {} resyncs, {} sockets in the table, {} found freed without a traced CLOSE",
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
            self.table.len(),
            self.table.vanished()
        );
    }
}

/// Converts CLOCK_MONOTONIC timestamps (bpf_ktime_get_ns) to wall-clock time.
pub struct WallClock {
    realtime_at_zero: SystemTime,
}

impl WallClock {
    fn now() -> WallClock {
        let monotonic = clock_ns(libc::CLOCK_MONOTONIC);
        WallClock {
            realtime_at_zero: SystemTime::now() - Duration::from_nanos(monotonic),
        }
    }

    /// The wall-clock time of a monotonic timestamp.
    pub fn at(&self, monotonic_ns: u64) -> SystemTime {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An observer that writes nothing.
    struct Silent;

    impl Observer for Silent {
        fn transition(&mut self, _: &Transition, _: Observed, _: &WallClock, _: &mut Vec<u8>) {}
    }

    fn monitor() -> Monitor<Silent> {
        Monitor::new(true, Silent, Sink::stdout(), Arc::new(Metrics::new(4096)))
    }

    #[test]
    fn a_skipped_call_refused_by_the_full_ring_is_lost_once() {
        let mut monitor = monitor();
        monitor.recovered = 2;
        // 5 calls skipped: 2 recovered, 3 refused by the full ring buffer,
        // which also refused 7 of the tracepoint program's.
        let now = LossCounters {
            ring_buffer_full: 10,
            recoveries_refused: 3,
            owner_events_dropped: 0,
            skipped: 5,
            fired: Some(100),
            recovery_skipped: 0,
        };
        monitor.check_losses(now, true).expect("no resync");
        assert_eq!(
            (monitor.lost.ring_buffer_full, monitor.lost.skipped),
            (10, 0)
        );
    }

    #[test]
    fn skips_count_as_lost_once_their_recovery_had_time_to_arrive() {
        let mut monitor = monitor();
        let skipped = LossCounters {
            skipped: 4,
            ..LossCounters::default()
        };
        monitor.check_losses(skipped, false).expect("no resync");
        assert_eq!(
            monitor.lost.skipped, 0,
            "recoveries may still be on their way"
        );
        monitor.recovered = 3;
        monitor.check_losses(skipped, false).expect("no resync");
        assert_eq!(monitor.lost.skipped, 1);
        assert!(monitor.stale);
    }
}
