//! The engine under `watch`, `audit` and `verify`: attach the eBPF
//! programs, read the baseline (in the kernel as root, else /proc), keep
//! the live table current from the
//! transitions, account for every loss, and hand what it sees to an
//! [`Observer`], the mode's own logic.
//!
//! Order matters: the programs are attached first, then the baseline is read, then
//! the events that queued up during the read are applied on top of it, so
//! that no transition in between is missed (the table adopts a baseline
//! socket on its first transition, see `table`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rustc_hash::FxHashMap;
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::ProbeArgs;
use crate::engine::clock::{monotonic_ns, WallClock};
use crate::engine::images::ImageReader;
use crate::engine::ledger::{Arrival, LossLedger};
use crate::engine::source::{kernel_reader, EventSource, KernelSource};
use crate::engine::table::{Observed, SocketTable};
use crate::kernel::{self, Detail, KernelLog, SocketIterators, StateProbe};
use crate::metrics::{Failure, Metrics};
use crate::model::{LossCounters, OwnerEvent, Proto, Record, TcpCounters, Transition};
use crate::sink::Sink;
use crate::snapshot::{self, Owners, Snapshot};

mod deferred;
mod observer;
mod output;
mod resync;
#[cfg(test)]
pub(crate) mod scripted;
mod summary;

use deferred::{Call, Deferred, IMAGE_WAIT};
pub use observer::{End, Notice, Observer, Refresh};
use output::Output;
use resync::ResyncSchedule;
pub use summary::Summary;

/// How often the ring buffer is drained without a wakeup: the eBPF side wakes
/// netwatch only when much is waiting or 5 ms after its last wakeup.
const DRAIN_INTERVAL: Duration = Duration::from_millis(25);
/// How often the kernel's loss counters are read.
const LOSS_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// How often the sockets-by-state gauge is recounted (when metrics are served).
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);
/// How often a wait for the images being read looks again.
const IMAGE_POLL: Duration = Duration::from_millis(1);
/// Sockets the live table holds at most (the least recently changed are
/// evicted beyond): twice the kernel's map of owners and byte counts.
pub const TABLE_CAPACITY: usize = 2 * netwatch_common::SOCKETS_MAP_ENTRIES as usize;

/// How the monitor runs, whatever the mode.
pub struct Config {
    pub ring_bytes: u32,
    pub no_resync: bool,
    /// See accept() return (`--accept-hook`), at the cost of every system call.
    pub accept_hook: bool,
    /// Count each socket's bytes in the kernel (audit).
    pub count_bytes: bool,
    /// The counters served at `metrics_addr`, which observers add to.
    pub metrics: Arc<Metrics>,
    pub metrics_addr: Option<SocketAddr>,
    /// Stop after this long (SIGINT and SIGTERM stop it in any case).
    pub duration: Option<Duration>,
    /// How often the observer's `check` runs, if at all.
    pub check_every: Option<Duration>,
    /// How often the observer's `refresh` runs, if at all (with what the
    /// kernel counts of each socket).
    pub refresh_every: Option<Duration>,
    /// netwatch's own network namespace, where /proc is read.
    pub netns: Option<u32>,
    /// Give owners their command line and executable (audit, `--cmdline`).
    pub process_images: bool,
}

impl Config {
    /// The monitor's configuration from a mode's flags.
    pub fn new(probe: &ProbeArgs, count_bytes: bool, duration: Option<Duration>) -> Config {
        let ring_bytes = probe.ring_buffer_kib * 1024;
        Config {
            ring_bytes,
            no_resync: probe.no_resync,
            accept_hook: probe.accept_hook,
            count_bytes,
            metrics: Arc::new(Metrics::new(ring_bytes)),
            metrics_addr: probe.metrics,
            duration,
            check_every: None,
            refresh_every: None,
            netns: snapshot::own_netns(),
            process_images: false,
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
    let metrics = config.metrics;
    if let Some(addr) = config.metrics_addr {
        crate::metrics::serve(addr, metrics.clone())?;
    }
    // The baseline's iterators load (the verifier's work) while the state
    // programs load and attach; they are read only once those are attached.
    let iterators = std::thread::spawn(|| kernel_reader(Detail::Table));
    let mut probe = StateProbe::attach(config.ring_bytes, config.count_bytes, config.accept_hook)?;
    let attached = started.elapsed();
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut kernel_log = probe.take_kernel_log();
    let recovers_skipped_calls = probe.recovers_skipped_calls();
    let mut source = KernelSource {
        probe,
        iterators: iterators.join().unwrap_or_default(),
    };
    let mut monitor = Monitor::new(config.no_resync, config.netns, observer, sink, metrics);
    if config.process_images {
        let reader = ImageReader::spawn(snapshot::process_image)
            .context("starting the thread that reads process images failed")?;
        monitor.table.read_images(reader);
    }
    let baseline = monitor.reload(&mut source)?;
    monitor.images_read().await;
    let in_kernel = monitor.hand_over_baseline(&baseline);
    drop(baseline);
    let baseline_read = started.elapsed() - attached;
    // The reader of checks and refreshes is loaded now, while netwatch may
    // still load programs; from "watching" on, it keeps only what it still uses.
    let detail = match config.refresh_every {
        Some(_) => Detail::Counters,
        None => Detail::Table,
    };
    let wants_reader = config.check_every.is_some() || config.refresh_every.is_some();
    let table_reader = Arc::new(std::sync::Mutex::new(
        wants_reader.then(|| kernel_reader(detail)).flatten(),
    ));
    drop_privileges();
    log::info!(
        "watching TCP state transitions (loaded and attached in {} ms, baseline of {} sockets read {} in {} ms{})",
        attached.as_millis(),
        monitor.table.len(),
        if in_kernel { "in the kernel" } else { "from /proc" },
        baseline_read.as_millis(),
        if recovers_skipped_calls {
            ", recovering skipped calls"
        } else {
            ""
        }
    );
    let mut loss_check = tokio::time::interval(LOSS_CHECK_INTERVAL);
    let mut drain_timer = tokio::time::interval(DRAIN_INTERVAL);
    let mut gauge_timer = tokio::time::interval(GAUGE_INTERVAL);
    let check_every = config.check_every;
    let mut check_timer = tokio::time::interval(check_every.unwrap_or(Duration::from_secs(3600)));
    check_timer.tick().await;
    let refresh_every = config.refresh_every;
    let mut refresh_timer =
        tokio::time::interval(refresh_every.unwrap_or(Duration::from_secs(3600)));
    // The check's snapshot is read on a thread while transitions keep flowing.
    let mut pending_check: Option<tokio::task::JoinHandle<anyhow::Result<Snapshot>>> = None;
    // So are each refresh's TCP counters.
    let mut pending_counters: Option<tokio::task::JoinHandle<FxHashMap<u64, TcpCounters>>> = None;
    let deadline = tokio::time::sleep(config.duration.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);
    let mut write_failed = None;
    // Armed while a reopen of the output is to be tried again.
    let reopen_retry = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(reopen_retry);
    loop {
        let retrying_reopen = monitor.output.reopen_backoff.is_some();
        tokio::select! {
            drained = source.drain(|record| monitor.on_record(record)) => {
                drained.context("reading the ring buffer failed")?;
            }
            logged = forward(kernel_log.as_mut()) => logged.context("reading the eBPF program's log failed")?,
            _ = drain_timer.tick() => source.drain_now(|record| monitor.on_record(record)),
            _ = loss_check.tick() => {
                let counters = source.losses().context("reading the loss counters failed")?;
                source.drain_now(|record| monitor.on_record(record));
                monitor.check_losses(&mut source, counters, false)?;
            }
            _ = gauge_timer.tick(), if config.metrics_addr.is_some() => monitor.metrics.count_sockets(monitor.table.sockets().map(|(_, socket)| socket.state)),
            _ = check_timer.tick(), if check_every.is_some() && pending_check.is_none() => {
                monitor.observer.check_starts(monotonic_ns());
                let reader = table_reader.clone();
                pending_check = Some(tokio::task::spawn_blocking(move || read_check_snapshot(&reader)));
            }
            taken = async { pending_check.as_mut().expect("guarded").await }, if pending_check.is_some() => {
                pending_check = None;
                match taken.context("the snapshot thread failed").and_then(|taken| taken) {
                    Ok(snapshot) => monitor.check(&mut source, snapshot).await,
                    Err(err) => monitor.report_failure(Failure::Snapshot, &err, "this check is skipped; the next one comes at the next interval"),
                }
            }
            _ = refresh_timer.tick(), if refresh_every.is_some() && pending_counters.is_none() => {
                let reader = table_reader.clone();
                pending_counters = Some(tokio::task::spawn_blocking(move || read_tcp_counters(&reader)));
            }
            counted = async { pending_counters.as_mut().expect("guarded").await }, if pending_counters.is_some() => {
                pending_counters = None;
                let counters = counted.unwrap_or_default();
                let bytes = |skaddr| source.bytes(skaddr);
                monitor.observer.refresh(&Refresh { bytes: &bytes, counters: &counters });
            }
            _ = hangup.recv() => reopen_retry.as_mut().reset(monitor.reopen_output()),
            _ = &mut reopen_retry, if retrying_reopen => reopen_retry.as_mut().reset(monitor.reopen_output()),
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = &mut deadline => break,
        }
        monitor.release_due();
        // The next batch converts its stamps with the wall clock as it is now.
        monitor.clock.reanchor();
        if let Err(err) = monitor.output.flush() {
            write_failed = Some(err);
            break;
        }
    }
    // Even when the output failed, stop writes what it still can and the
    // summary goes to stderr; the first error is the one reported.
    let stopped = monitor.stop(&mut source, started).await;
    log::info!("{}", monitor.summary(started.elapsed(), &source));
    if let Some(err) = write_failed {
        return Err(err.into());
    }
    stopped?;
    Ok(monitor.observer)
}

/// Reads the TCP sockets with their owners, as a check compares them: with
/// `reader`'s iterators in every namespace, without TIME_WAIT and request
/// sockets; without them, netwatch's namespace from /proc (which a check
/// matches by tuple).
fn read_check_snapshot(
    reader: &std::sync::Mutex<Option<SocketIterators>>,
) -> anyhow::Result<Snapshot> {
    let protos = [Proto::Tcp, Proto::Tcp6];
    let mut reader = reader
        .lock()
        .map_err(|_| anyhow::anyhow!("a check's reader panicked"))?;
    let taken = match reader.as_mut() {
        Some(iterators) => snapshot::take_every_namespace(&protos, Owners::Find, Some(iterators)),
        None => snapshot::take(&protos, Owners::Find, None),
    };
    taken.context("reading the TCP tables failed")
}

/// What the kernel counts of every socket in netwatch's namespace (bytes,
/// round trip, retransmissions); none without `reader`'s iterators, or
/// when the read fails (said at debug level).
fn read_tcp_counters(
    reader: &std::sync::Mutex<Option<SocketIterators>>,
) -> FxHashMap<u64, TcpCounters> {
    let Ok(mut reader) = reader.lock() else {
        return FxHashMap::default();
    };
    let Some(iterators) = reader.as_mut() else {
        return FxHashMap::default();
    };
    snapshot::tcp_counters(iterators).unwrap_or_else(|err| {
        log::debug!("reading the sockets' TCP counters failed: {err:#}");
        FxHashMap::default()
    })
}

/// Once attached, netwatch keeps only the capabilities it still uses (see
/// `kernel::keep_only_what_is_still_used`) and sets no_new_privs.
fn drop_privileges() {
    match kernel::keep_only_what_is_still_used() {
        Ok(kept) => log::debug!("capabilities kept: {}", kept.join(", ")),
        Err(err) => log::warn!(
            "dropping the capabilities netwatch no longer needs failed ({err}); it runs on with them"
        ),
    }
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
    output: Output,
    table: SocketTable,
    clock: WallClock,
    metrics: Arc<Metrics>,
    /// Network namespace of netwatch, where /proc is read.
    netns: Option<u32>,
    ledger: LossLedger,
    resync: ResyncSchedule,
    /// Observer calls waiting for the images they show.
    deferred: Deferred,
}

impl<O: Observer> Monitor<O> {
    fn new(
        no_resync: bool,
        netns: Option<u32>,
        observer: O,
        sink: Sink,
        metrics: Arc<Metrics>,
    ) -> Self {
        Monitor {
            observer,
            output: Output::new(sink),
            table: SocketTable::new(snapshot::program_name, TABLE_CAPACITY),
            clock: WallClock::host(),
            metrics,
            netns,
            ledger: LossLedger::default(),
            resync: ResyncSchedule::new(no_resync),
            deferred: Deferred::new(IMAGE_WAIT),
        }
    }

    /// Waits until the images asked for are read, or a call's longest wait.
    async fn images_read(&mut self) {
        self.table.send_image_reads();
        let deadline = Instant::now() + self.deferred.wait();
        while self.table.reading_images() && Instant::now() < deadline {
            tokio::time::sleep(IMAGE_POLL).await;
        }
    }

    /// Hands the observer a call, or holds it back while an image it
    /// shows is read (or a call before it is held).
    fn call(&mut self, call: Call) {
        if let Some(call) = self.deferred.pass(call) {
            self.deliver(call);
        }
    }

    /// Sends the batch's image reads, and hands the observer the calls
    /// held back that can go out now.
    fn release_due(&mut self) {
        self.table.send_image_reads();
        let now = std::time::Instant::now();
        while let Some(call) = self.deferred.next_due(now) {
            self.deliver(call);
        }
    }

    /// Waits for the images asked for (a bounded time), then hands the
    /// observer every call held back: before a check or the end, which
    /// must follow every transition before them.
    async fn release_all(&mut self) {
        self.images_read().await;
        while let Some(call) = self.deferred.next() {
            self.deliver(call);
        }
    }

    fn deliver(&mut self, call: Call) {
        let out = &mut self.output.buffer;
        match call {
            Call::Transition(t, seen) => return self.deliver_transition(&t, &seen),
            Call::OwnerChanged(ts_ns, change) => {
                self.observer
                    .owner_changed(ts_ns, &change, &self.clock, out)
            }
            Call::Notice(notice) => self.observer.notice(&notice, out),
        }
        self.output.flush_when_full();
    }

    fn deliver_transition(&mut self, t: &Transition, seen: &Observed) {
        let out = &mut self.output.buffer;
        self.observer.transition(t, seen, &self.clock, out);
        self.output.flush_when_full();
    }

    /// Reopens the output (SIGHUP, or a retry). When that fails (the
    /// directory was moved or removed, no fd left), records keep going to
    /// the file already open: the failure is reported and tried again
    /// after a backoff. Returns when the next try is due.
    fn reopen_output(&mut self) -> tokio::time::Instant {
        match self.output.reopen() {
            Ok(()) => tokio::time::Instant::now(),
            Err((err, wait)) => {
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
        log::warn!("{message}");
        self.call(Call::Notice(Notice::Failed { what, message }));
    }

    fn on_record(&mut self, record: Record) {
        match record {
            Record::Transition(transition) => self.on_transition(transition),
            Record::Owner(owner) => self.on_owner(&owner),
            Record::Exec(task) => self.table.exec(&task),
        }
    }

    fn on_owner(&mut self, event: &OwnerEvent) {
        if let Some(change) = self.table.set_owner(event) {
            self.metrics.owner_change(change.cause);
            self.call(Call::OwnerChanged(event.ts_ns, change));
        }
    }

    fn on_transition(&mut self, transition: Transition) {
        let arrival = match transition.recovered {
            false => Arrival::Sent,
            true if self.table.is_duplicate(&transition) => Arrival::Duplicate,
            true => Arrival::Recovered,
        };
        if !self.ledger.arrived(arrival) {
            return;
        }
        if arrival == Arrival::Recovered {
            self.metrics.recovered.inc();
        }
        self.metrics.transition(transition.old, transition.new);
        let observed = self.table.apply(&transition);
        // What `call` does, without moving the transition and what the
        // table saw into a `Call` and back out (two copies of 550 bytes)
        // on the common path.
        if self.deferred.holds() || observed.waits_for_image() {
            self.deferred.hold(Call::Transition(transition, observed));
        } else {
            self.deliver_transition(&transition, &observed);
        }
    }

    /// Fills the table from a snapshot: the baseline at start, or a resync.
    fn reload(&mut self, source: &mut impl EventSource) -> anyhow::Result<Snapshot> {
        let snapshot = source.baseline()?;
        self.table.reset_from(&snapshot, self.netns);
        self.resync.table_read();
        Ok(snapshot)
    }

    /// Reads the baseline and hands it to the observer at once (the
    /// scripted lookups read images on the spot); whether it was read in the kernel.
    #[cfg(test)]
    fn take_baseline(&mut self, source: &mut impl EventSource) -> anyhow::Result<bool> {
        let snapshot = self.reload(source)?;
        Ok(self.hand_over_baseline(&snapshot))
    }

    /// Hands the observer the baseline just read into the table (once its
    /// owners' images are read); whether it was read in the kernel.
    fn hand_over_baseline(&mut self, snapshot: &Snapshot) -> bool {
        self.observer
            .baseline(snapshot, &self.table, &mut self.output.buffer);
        snapshot.in_kernel
    }

    /// Hands the observer a snapshot just read, once every transition
    /// stamped before its end is applied.
    async fn check(&mut self, source: &mut impl EventSource, snapshot: Snapshot) {
        // Transitions stamped before the snapshot ended may still be on their way on other CPUs.
        tokio::time::sleep(Duration::from_millis(10)).await;
        source.drain_now(|record| self.on_record(record));
        self.release_all().await;
        let freed = self
            .observer
            .check(&snapshot, &self.table, &mut self.output.buffer);
        for skaddr in freed {
            self.table.forget_freed(skaddr);
        }
    }

    /// Drains what is left, counts the last losses and lets the observer
    /// write its last records.
    async fn stop(
        &mut self,
        source: &mut impl EventSource,
        started: Instant,
    ) -> anyhow::Result<()> {
        // The transition programs neither send nor count from here on:
        // once the calls under way on other CPUs have finished, the last
        // drain and the kernel's counters describe the same transitions,
        // and delivered + lost = fired exactly.
        source
            .stop_sending()
            .context("telling the eBPF programs to stop failed")?;
        let at_stop = source
            .losses()
            .context("reading the loss counters failed")?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        source.drain_now(|record| self.on_record(record));
        let mut counters = source
            .losses()
            .context("reading the loss counters failed")?;
        // The kernel still counts the calls it skips after the stop, which
        // were neither sent nor counted as fired: leave them out.
        counters.skipped = at_stop.skipped;
        let skipped_since = counters.recovery_skipped - at_stop.recovery_skipped;
        counters.fired = counters.fired.map(|fired| fired - skipped_since);
        self.check_losses(source, counters, true)?;
        self.release_all().await;
        let summary = self.summary(started.elapsed(), source);
        let end = End {
            table: &self.table,
            bytes: &|skaddr| source.bytes(skaddr),
            clock: &self.clock,
            summary: &summary,
        };
        self.observer.stopped(&end, &mut self.output.buffer);
        Ok(self.output.flush()?)
    }

    /// Rebuilds the table from a fresh snapshot after losses.
    fn resync(&mut self, source: &mut impl EventSource) -> anyhow::Result<()> {
        let snapshot = self.reload(source)?;
        self.resync.done += 1;
        self.metrics.resyncs.inc();
        log::info!(
            "resynced the table from a snapshot read {}: {} sockets",
            if snapshot.in_kernel {
                "in the kernel"
            } else {
                "from /proc"
            },
            self.table.len()
        );
        let sockets = self.table.len();
        self.call(Call::Notice(Notice::Resynced { sockets }));
        Ok(())
    }

    /// Reports transitions lost since the last check and resyncs after a
    /// loss. A skipped call counts as lost once its recovery had time to
    /// arrive: skips counted at the previous check (or, when `last`, now).
    fn check_losses(
        &mut self,
        source: &mut impl EventSource,
        now: LossCounters,
        last: bool,
    ) -> anyhow::Result<()> {
        let new_losses = self.ledger.check(now, last);
        let (evicted, vanished) = (self.table.evicted(), self.table.vanished());
        self.metrics
            .set_losses(self.ledger.lost(), evicted, vanished);
        for (count, cause) in new_losses {
            self.resync.stale = true;
            log::info!("lost {count} {}: {}", cause.lost_what(), cause.describe());
            self.call(Call::Notice(Notice::Lost { count, cause }));
        }
        if self.resync.due(last) {
            if let Err(err) = self.resync(source) {
                // Tried again later, while the table stays stale.
                let wait = self.resync.failed();
                let next = format!(
                    "the table stays as it is, and the resync is tried again in {} s",
                    wait.as_secs()
                );
                self.report_failure(Failure::Resync, &err, &next);
            }
        }
        Ok(())
    }

    fn summary(&self, runtime: Duration, source: &impl EventSource) -> Summary {
        let (lost, counters) = (self.ledger.lost(), self.ledger.counters());
        Summary {
            seconds: runtime.as_secs_f64(),
            transitions: self.ledger.transitions(),
            fired: counters.fired,
            lost: lost.transitions(),
            ring_buffer_full: lost.ring_buffer_full,
            not_recovered: lost.not_recovered,
            skipped: counters.skipped,
            recovered: self.ledger.recovered(),
            recoveries_refused: self.ledger.recoveries_refused(),
            duplicates: self.ledger.duplicates(),
            resyncs: self.resync.done,
            sockets: self.table.len(),
            vanished: self.table.vanished(),
            ring_buffer_peak_bytes: source.ring_buffer_peak(),
        }
    }
}

#[cfg(test)]
mod tests;
