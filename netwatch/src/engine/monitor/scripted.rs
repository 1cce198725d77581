//! The monitor fed by a script instead of the kernel, for the tests of the
//! engine and of the modes.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use netwatch_common::ByteCounts;

use super::deferred::Deferred;
use super::{Monitor, Observer};
use crate::engine::images::{ImageLookup, ImageReader};
use crate::engine::source::EventSource;
use crate::metrics::Metrics;
use crate::model::{LossCounters, Record, Task, TcpState, Transition, Tuple};
use crate::sink::{Records, Sink};
use crate::snapshot::Snapshot;

/// What the kernel would send, as a test writes it: records waiting
/// for the next drain, the loss counters, and what each read of the
/// baseline returns (an empty table once the script runs out).
#[derive(Default)]
pub struct ScriptedSource {
    pub waiting: Vec<Record>,
    pub losses: LossCounters,
    pub baselines: VecDeque<anyhow::Result<Snapshot>>,
    /// Transitions the full ring buffer refuses during each baseline read.
    pub lost_during_read: u64,
    pub baselines_read: usize,
    pub stopped: bool,
}

impl EventSource for ScriptedSource {
    async fn drain(&mut self, handle: impl FnMut(Record)) -> io::Result<()> {
        self.drain_now(handle);
        Ok(())
    }
    fn drain_now(&mut self, handle: impl FnMut(Record)) {
        self.waiting.drain(..).for_each(handle);
    }
    fn losses(&self) -> io::Result<LossCounters> {
        Ok(self.losses)
    }
    fn stop_sending(&mut self) -> io::Result<()> {
        self.stopped = true;
        Ok(())
    }
    fn bytes(&self, _: u64) -> Option<ByteCounts> {
        None
    }
    fn ring_buffer_peak(&self) -> Option<u64> {
        None
    }
    fn baseline(&mut self) -> anyhow::Result<Snapshot> {
        self.baselines_read += 1;
        self.losses.ring_buffer_full += self.lost_during_read;
        self.baselines
            .pop_front()
            .unwrap_or_else(|| Ok(Snapshot::default()))
    }
}

/// A mode's observer on a monitor that a script feeds, writing into a
/// buffer the test reads (and empties) instead of an output.
pub struct ScriptedMonitor<O> {
    monitor: Monitor<O>,
}

impl<O: Observer> ScriptedMonitor<O> {
    /// `observer` on a monitor whose baseline is `source`'s first.
    pub fn start(observer: O, source: &mut ScriptedSource) -> ScriptedMonitor<O> {
        let metrics = Arc::new(Metrics::new(4096));
        let mut monitor = Monitor::new(true, None, observer, Sink::stdout(), metrics);
        monitor.take_baseline(source).expect("a scripted baseline");
        ScriptedMonitor { monitor }
    }

    /// From now on, owners get what `lookup` says they run, read on the spot.
    pub fn read_images(&mut self, lookup: ImageLookup) {
        self.monitor.table.read_images(ImageReader::Inline(lookup));
    }

    /// From now on, owners get what `lookup` says they run, read by a
    /// worker thread as in production, and records wait at most `wait` for it.
    pub fn read_images_on_a_worker(&mut self, lookup: ImageLookup, wait: Duration) {
        let reader = ImageReader::spawn(lookup).expect("a thread");
        self.monitor.table.read_images(reader);
        self.monitor.deferred = Deferred::new(wait);
    }

    /// Waits (ten seconds at most) until no record waits for an image,
    /// handing each to the observer as it can go, as the event loop does.
    pub fn settle(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        self.monitor.release_due();
        while self.monitor.deferred.holds() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
            self.monitor.release_due();
        }
    }

    /// From now on, reads the host's clocks from `source`.
    pub fn set_clock(&mut self, source: crate::engine::clock::ClockSource) {
        self.monitor.clock = crate::engine::clock::WallClock::from_source(source);
    }

    /// Anchors the clock again, as the event loop does between two
    /// batches, and drains what `source` has waiting through the table and
    /// the observer.
    pub fn drain(&mut self, source: &mut ScriptedSource) {
        self.monitor.clock.reanchor();
        source.drain_now(|record| self.monitor.on_record(record));
        self.monitor.release_due();
    }

    /// What the observer wrote so far (the monitor writes it out once it
    /// holds 64 KiB: a test empties it before).
    pub fn written(&mut self) -> &mut Records {
        &mut self.monitor.output.buffer
    }
}

impl Transition {
    /// A transition as a test scripts it: what the kernel sends for a
    /// socket whose uid, namespace, bytes and error it did not read.
    pub fn scripted(
        ts_ns: u64,
        skaddr: u64,
        tuple: Tuple,
        (old, new): (TcpState, TcpState),
        task: Task,
    ) -> Transition {
        Transition {
            ts_ns,
            skaddr,
            tuple,
            old,
            new,
            task,
            uid: None,
            netns: None,
            bytes: ByteCounts::default(),
            recovered: false,
            error: None,
        }
    }
}
