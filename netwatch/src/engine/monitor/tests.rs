//! The monitor's unit tests: loss accounting, resyncs and failures, on a scripted source.

use std::collections::VecDeque;

use super::resync::RESYNC_INTERVAL;
use super::scripted::ScriptedSource;
use super::*;
use crate::engine::table::Observed;
use crate::model::{LossCause, Task, TcpState, Tuple};
use crate::sink::Records;
use crate::snapshot::{ProcSocket, SnapshotEntry};

/// What the monitor told the mode.
#[derive(Default)]
struct Recorder {
    transitions: Vec<Transition>,
    lost: Vec<(u64, LossCause)>,
    failures: Vec<Failure>,
    resyncs: usize,
}

impl Observer for Recorder {
    fn transition(&mut self, t: &Transition, _: &Observed, _: &WallClock, _: &mut Records) {
        self.transitions.push(t.clone());
    }
    fn notice(&mut self, notice: &Notice, _: &mut Records) {
        match notice {
            Notice::Lost { count, cause } => self.lost.push((*count, *cause)),
            Notice::Failed { what, .. } => self.failures.push(*what),
            Notice::Resynced { .. } => self.resyncs += 1,
        }
    }
}

fn monitor(resync: bool) -> Monitor<Recorder> {
    let metrics = Arc::new(Metrics::new(4096));
    Monitor::new(!resync, None, Recorder::default(), Sink::stdout(), metrics)
}

/// A transition of the socket at `skaddr`, from port 40000 + skaddr to port 80.
fn transition(skaddr: u64, states: (TcpState, TcpState), recovered: bool) -> Record {
    let tuple = Tuple {
        proto: Proto::Tcp,
        local: SocketAddr::from(([127, 0, 0, 1], 40_000 + skaddr as u16)),
        remote: SocketAddr::from(([127, 0, 0, 1], 80)),
    };
    let task = Task {
        pid: 1,
        comm: [0; 16],
        start_ns: None,
        cgroup_id: None,
        command_line: None,
    };
    Record::Transition(Transition {
        recovered,
        ..Transition::scripted(skaddr, skaddr, tuple, states, task)
    })
}

const CONNECT: (TcpState, TcpState) = (TcpState::Close, TcpState::SynSent);
const ESTABLISH: (TcpState, TcpState) = (TcpState::SynSent, TcpState::Established);

/// `count` established sockets, as /proc lists them.
fn snapshot_of(count: u16) -> Snapshot {
    let entries = (0..count)
        .map(|index| SnapshotEntry {
            socket: ProcSocket {
                proto: Proto::Tcp,
                local: SocketAddr::from(([127, 0, 0, 1], 50_000 + index)),
                remote: SocketAddr::from(([127, 0, 0, 1], 80)),
                state: TcpState::Established,
                tx_queue: 0,
                rx_queue: 0,
                uid: 0,
                inode: u64::from(index) + 1,
                timewait: false,
                netns: None,
                kernel: None,
            },
            owner: None,
            pids: Vec::new(),
        })
        .collect();
    Snapshot {
        entries,
        ..Snapshot::default()
    }
}

/// Drains what is waiting, then checks the losses as the monitor does
/// every 100 ms, `checks` times, with any resync due.
fn check(monitor: &mut Monitor<Recorder>, source: &mut ScriptedSource, checks: usize) {
    for _ in 0..checks {
        source.drain_now(|record| monitor.on_record(record));
        monitor.resync.last -= monitor.resync.wait;
        let counters = source.losses().expect("scripted");
        monitor
            .check_losses(source, counters, false)
            .expect("scripted");
    }
}

/// Stops the monitor as at SIGINT: its summary.
fn stop(monitor: &mut Monitor<Recorder>, source: &mut ScriptedSource) -> Summary {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    runtime
        .block_on(monitor.stop(source, Instant::now()))
        .expect("scripted stop");
    assert!(source.stopped);
    monitor.summary(Duration::ZERO, source)
}

#[test]
fn a_skipped_call_and_its_recovery_count_once_and_nothing_is_lost() {
    let (mut monitor, mut source) = (monitor(false), ScriptedSource::default());
    // The transition program sent the connect; the kernel skipped its
    // call at the handshake (nested in a softirq), and the recovery
    // program sent that one.
    source.waiting = vec![
        transition(1, CONNECT, false),
        transition(1, ESTABLISH, true),
    ];
    source.losses = LossCounters {
        skipped: 1,
        fired: Some(2),
        ..LossCounters::default()
    };
    check(&mut monitor, &mut source, 2);
    let summary = stop(&mut monitor, &mut source);
    assert_eq!(monitor.observer.transitions.len(), 2);
    assert!(monitor.observer.lost.is_empty());
    assert_eq!(
        (summary.transitions, summary.recovered, summary.lost),
        (2, 1, 0)
    );
    assert_eq!(Some(summary.transitions + summary.lost), summary.fired);
}

#[test]
fn a_recovered_twin_of_a_sent_transition_is_dropped() {
    let (mut monitor, mut source) = (monitor(false), ScriptedSource::default());
    // A softirq interrupted the recovery program before it saw that the
    // transition program had sent the handshake: it sent it again.
    source.waiting = vec![
        transition(1, CONNECT, false),
        transition(1, ESTABLISH, false),
        transition(1, ESTABLISH, true),
    ];
    source.losses.fired = Some(2);
    check(&mut monitor, &mut source, 1);
    let summary = stop(&mut monitor, &mut source);
    assert_eq!(monitor.observer.transitions.len(), 2);
    assert_eq!(
        (summary.transitions, summary.duplicates, summary.recovered),
        (2, 1, 0)
    );
    assert_eq!(Some(summary.transitions + summary.lost), summary.fired);
}

#[test]
fn unrecovered_skips_are_lost_once_their_recovery_could_have_arrived() {
    let (mut monitor, mut source) = (monitor(false), ScriptedSource::default());
    source.waiting = vec![transition(1, CONNECT, true)];
    source.losses = LossCounters {
        skipped: 3,
        fired: Some(3),
        ..LossCounters::default()
    };
    check(&mut monitor, &mut source, 2);
    assert_eq!(monitor.observer.lost, [(2, LossCause::Recursion)]);
    let summary = stop(&mut monitor, &mut source);
    assert_eq!((summary.recovered, summary.not_recovered), (1, 2));
    assert_eq!(Some(summary.transitions + summary.lost), summary.fired);
    assert_eq!(monitor.observer.lost.len(), 1, "reported once");
}

#[test]
fn skips_whose_recovery_the_full_ring_refused_are_ring_buffer_losses() {
    let (mut monitor, mut source) = (monitor(false), ScriptedSource::default());
    source.waiting = vec![transition(1, CONNECT, true)];
    // 4 calls skipped: 1 recovered, 2 recoveries refused, 1 not recovered.
    source.losses = LossCounters {
        skipped: 4,
        recoveries_refused: 2,
        ring_buffer_full: 2,
        fired: Some(4),
        ..LossCounters::default()
    };
    check(&mut monitor, &mut source, 2);
    let summary = stop(&mut monitor, &mut source);
    assert_eq!(
        (
            summary.recovered,
            summary.recoveries_refused,
            summary.not_recovered
        ),
        (1, 2, 1)
    );
    assert_eq!(summary.skipped, 4);
    assert_eq!(summary.ring_buffer_full, 2);
    assert_eq!(Some(summary.transitions + summary.lost), summary.fired);
}

#[test]
fn a_skip_counted_before_its_refusal_is_lost_once() {
    let (mut monitor, mut source) = (monitor(false), ScriptedSource::default());
    source.waiting = vec![transition(1, CONNECT, false)];
    // One read of the counters saw the skip but not yet the refusal of
    // its recovery, which the kernel counted a moment later (the
    // counters are read one after the other while programs run).
    source.losses = LossCounters {
        skipped: 1,
        fired: Some(2),
        ..LossCounters::default()
    };
    check(&mut monitor, &mut source, 1);
    source.losses.recoveries_refused = 1;
    source.losses.ring_buffer_full = 1;
    check(&mut monitor, &mut source, 2);
    let summary = stop(&mut monitor, &mut source);
    assert_eq!(
        (
            summary.lost,
            summary.recoveries_refused,
            summary.not_recovered
        ),
        (1, 1, 0)
    );
    assert_eq!(
        summary.skipped,
        summary.recovered + summary.recoveries_refused + summary.not_recovered
    );
    assert_eq!(Some(summary.transitions + summary.lost), summary.fired);
    assert_eq!(monitor.observer.lost, [(1, LossCause::RingBufferFull)]);
}

#[test]
fn a_full_ring_buffer_is_reported_and_the_table_rebuilt() {
    let (mut monitor, mut source) = (monitor(true), ScriptedSource::default());
    source.baselines = VecDeque::from([Ok(snapshot_of(1)), Ok(snapshot_of(3))]);
    monitor.take_baseline(&mut source).expect("scripted");
    source.waiting = vec![transition(1, CONNECT, false)];
    source.losses.ring_buffer_full = 4;
    check(&mut monitor, &mut source, 1);
    assert_eq!(monitor.observer.lost, [(4, LossCause::RingBufferFull)]);
    assert_eq!((source.baselines_read, monitor.observer.resyncs), (2, 1));
    assert_eq!(monitor.table.len(), 3, "the table is the new baseline");
    assert!(!monitor.resync.stale);
    check(&mut monitor, &mut source, 1);
    assert_eq!(source.baselines_read, 2, "no new loss, no new resync");
    assert_eq!(monitor.observer.lost.len(), 1);
}

#[test]
fn losses_during_a_resync_bring_another_one() {
    let (mut monitor, mut source) = (monitor(true), ScriptedSource::default());
    monitor.take_baseline(&mut source).expect("scripted");
    source.lost_during_read = 2;
    source.losses.ring_buffer_full = 1;
    check(&mut monitor, &mut source, 1);
    // The table was read while 2 more transitions were refused.
    check(&mut monitor, &mut source, 1);
    assert_eq!(
        monitor.observer.lost,
        [
            (1, LossCause::RingBufferFull),
            (2, LossCause::RingBufferFull)
        ]
    );
    assert_eq!(monitor.observer.resyncs, 2);
    source.lost_during_read = 0;
    check(&mut monitor, &mut source, 1);
    assert_eq!(
        monitor.observer.lost.len(),
        3,
        "the second resync's read lost 2 more"
    );
    check(&mut monitor, &mut source, 1);
    assert_eq!(monitor.observer.lost.len(), 3, "settled");
    let summary = stop(&mut monitor, &mut source);
    assert_eq!((summary.ring_buffer_full, summary.resyncs), (5, 3));
}

#[test]
fn a_failed_resync_is_reported_and_tried_again_later() {
    let (mut monitor, mut source) = (monitor(true), ScriptedSource::default());
    source.baselines = VecDeque::from([
        Ok(snapshot_of(1)),
        Err(anyhow::anyhow!("Too many open files")),
        Ok(snapshot_of(2)),
    ]);
    monitor.take_baseline(&mut source).expect("scripted");
    source.losses.ring_buffer_full = 1;
    check(&mut monitor, &mut source, 1);
    assert_eq!(monitor.observer.failures, [Failure::Resync]);
    assert!(monitor.resync.stale, "the table stays stale");
    assert_eq!(monitor.resync.wait, RESYNC_INTERVAL * 2, "backs off");
    let counters = source.losses().expect("scripted");
    monitor
        .check_losses(&mut source, counters, false)
        .expect("scripted");
    assert_eq!(source.baselines_read, 2, "not before the backoff ends");
    check(&mut monitor, &mut source, 1);
    assert_eq!(source.baselines_read, 3);
    assert!(!monitor.resync.stale);
    assert_eq!(
        (monitor.table.len(), monitor.resync.wait),
        (2, RESYNC_INTERVAL)
    );
    assert_eq!(monitor.observer.lost.len(), 1, "the loss is reported once");
}
