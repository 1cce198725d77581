//! `--metrics ADDR:PORT`: counters encoded by prometheus-client, served over
//! plain HTTP to whoever scrapes `/metrics`, in the classic Prometheus text
//! format or in OpenMetrics when the request asks for it (`format`).
//!
//! The counters are atomics bumped on the event path (one relaxed add per
//! transition), read by the server task when scraped.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::model::{ConnResult, Lost, OwnerCause, TcpState};

mod format;
mod server;

pub use server::serve;

/// A routine failure that a long-lived mode reports and goes on after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Re-reading /proc after losses.
    Resync,
    /// Verify's periodic snapshot.
    Snapshot,
    /// Reopening `--output` on SIGHUP.
    Reopen,
}

impl Failure {
    const ALL: [Failure; 3] = [Failure::Resync, Failure::Snapshot, Failure::Reopen];

    /// "resync", "snapshot" or "reopen".
    pub fn name(self) -> &'static str {
        match self {
            Failure::Resync => "resync",
            Failure::Snapshot => "snapshot",
            Failure::Reopen => "reopen",
        }
    }
}

/// A monotonic counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub fn add(&self, count: u64) {
        self.0.fetch_add(count, Ordering::Relaxed);
    }
}

const STATES: usize = TcpState::ALL.len();

/// What netwatch exposes.
#[derive(Debug)]
pub struct Metrics {
    /// By old and new state, indexed by kernel state number - 1.
    transitions: [[Counter; STATES]; STATES],
    /// Sockets in the live table by state, recounted every second.
    sockets: [Counter; STATES],
    pub recovered: Counter,
    lost_ring_buffer_full: Counter,
    lost_skipped: Counter,
    lost_owner_events: Counter,
    /// Owner changes applied, by `OwnerCause`.
    owner_changes: [Counter; OwnerCause::ALL.len()],
    evicted: Counter,
    vanished: Counter,
    pub resyncs: Counter,
    /// Routine failures netwatch went on after, by kind (`Failure`).
    failures: [Counter; Failure::ALL.len()],
    pub conn_records: Counter,
    pub listen_records: Counter,
    /// Audit: connections closed without success, by `ConnResult::FAILURES`.
    failed_connections: [Counter; 6],
    /// Verify: sockets found drifting at the last check.
    pub drift: Counter,
    /// Audit's `--syslog`: records not delivered.
    pub syslog_dropped: Counter,
    ring_buffer_bytes: u32,
}

impl Metrics {
    /// Zeroed counters, for a ring buffer of `ring_buffer_bytes`.
    pub fn new(ring_buffer_bytes: u32) -> Metrics {
        Metrics {
            transitions: Default::default(),
            sockets: Default::default(),
            recovered: Counter::default(),
            lost_ring_buffer_full: Counter::default(),
            lost_skipped: Counter::default(),
            lost_owner_events: Counter::default(),
            owner_changes: Default::default(),
            evicted: Counter::default(),
            vanished: Counter::default(),
            resyncs: Counter::default(),
            failures: Default::default(),
            conn_records: Counter::default(),
            listen_records: Counter::default(),
            failed_connections: Default::default(),
            drift: Counter::default(),
            syslog_dropped: Counter::default(),
            ring_buffer_bytes,
        }
    }

    /// Counts one transition.
    pub fn transition(&self, old: TcpState, new: TcpState) {
        self.transitions[old as usize - 1][new as usize - 1].inc();
    }

    /// Counts how a connection went, when it failed.
    pub fn connection_result(&self, result: ConnResult) {
        if let Some(index) = result.failure_index() {
            self.failed_connections[index].inc();
        }
    }

    /// Counts a routine failure.
    pub fn failure(&self, what: Failure) {
        self.failures[what as usize].inc();
    }

    /// Counts a socket whose owner became another process.
    pub fn owner_change(&self, cause: OwnerCause) {
        self.owner_changes[cause as usize].inc();
    }

    /// Records the losses reported so far, the sockets the table evicted
    /// and those it found freed without a traced CLOSE.
    pub fn set_losses(&self, lost: Lost, evicted: u64, vanished: u64) {
        self.lost_ring_buffer_full.set(lost.ring_buffer_full);
        self.lost_skipped.set(lost.not_recovered);
        self.lost_owner_events.set(lost.owner_events);
        self.evicted.set(evicted);
        self.vanished.set(vanished);
    }

    /// Sets the sockets gauge from the states of the table's sockets.
    pub fn count_sockets(&self, states: impl Iterator<Item = TcpState>) {
        let mut counts = [0u64; STATES];
        for state in states {
            counts[state as usize - 1] += 1;
        }
        for (gauge, count) in self.sockets.iter().zip(counts) {
            gauge.set(count);
        }
    }

    /// The OpenMetrics text exposition, encoded by prometheus-client from
    /// the counters as they are now.
    pub fn render(self: &Arc<Self>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Exposition(self.clone())));
        let mut text = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }

    fn encode(&self, encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let transitions = TcpState::ALL
            .iter()
            .zip(&self.transitions)
            .flat_map(|(old, row)| {
                TcpState::ALL
                    .iter()
                    .zip(row)
                    .filter(|(_, counter)| counter.get() > 0)
                    .map(move |(new, counter)| {
                        (
                            [("old_state", old.name()), ("new_state", new.name())],
                            counter.get(),
                        )
                    })
            });
        family(
            encoder,
            "netwatch_transitions",
            "TCP state transitions applied, by old and new state.",
            MetricType::Counter,
            transitions,
        )?;
        let lost = [
            ("ring_buffer_full", &self.lost_ring_buffer_full),
            ("skipped", &self.lost_skipped),
            ("owner_ring_buffer_full", &self.lost_owner_events),
        ];
        family(encoder, "netwatch_lost_events", "Events lost, by cause: transitions the ring buffer had no room for, transitions skipped by the kernel and not recovered, owner changes the ring buffer had no room for.", MetricType::Counter, labelled("cause", lost))?;
        let causes = OwnerCause::ALL.map(OwnerCause::name);
        family(encoder, "netwatch_owner_changes", "Sockets whose owner became another process: by accept() (with the accept hook), by the first send or receive on an accepted socket (first_io), or by a send or receive of another process (handoff).", MetricType::Counter, labelled("cause", causes.into_iter().zip(&self.owner_changes)))?;
        single(
            encoder,
            "netwatch_recovered_events",
            "Transitions the kernel skipped that the recovery program sent.",
            MetricType::Counter,
            self.recovered.get(),
        )?;
        single(
            encoder,
            "netwatch_resyncs",
            "Times the table was rebuilt from /proc after losses.",
            MetricType::Counter,
            self.resyncs.get(),
        )?;
        let failures = Failure::ALL
            .map(Failure::name)
            .into_iter()
            .zip(&self.failures);
        family(encoder, "netwatch_failures", "Routine failures netwatch went on after and retries: a resync, a verify snapshot, a reopen of --output.", MetricType::Counter, labelled("what", failures))?;
        single(
            encoder,
            "netwatch_table_evictions",
            "Sockets evicted from the full table (least recently changed first).",
            MetricType::Counter,
            self.evicted.get(),
        )?;
        single(
            encoder,
            "netwatch_vanished_sockets",
            "Sockets found freed without a traced change to CLOSE (their address reused).",
            MetricType::Counter,
            self.vanished.get(),
        )?;
        let states = TcpState::ALL
            .map(TcpState::name)
            .into_iter()
            .zip(&self.sockets);
        family(
            encoder,
            "netwatch_sockets",
            "Sockets in the live table, by state (recounted every second).",
            MetricType::Gauge,
            labelled("state", states),
        )?;
        let records = [
            ("conn", &self.conn_records),
            ("listen", &self.listen_records),
        ];
        family(
            encoder,
            "netwatch_audit_records",
            "Audit records written, by type.",
            MetricType::Counter,
            labelled("type", records),
        )?;
        let failed = ConnResult::FAILURES
            .into_iter()
            .zip(&self.failed_connections);
        family(
            encoder,
            "netwatch_connections_failed",
            "audit: connections closed without success, by result (other: another errno).",
            MetricType::Counter,
            labelled("result", failed),
        )?;
        single(
            encoder,
            "netwatch_drift_sockets",
            "verify: sockets that differed from the last snapshot.",
            MetricType::Gauge,
            self.drift.get(),
        )?;
        single(
            encoder,
            "netwatch_syslog_dropped",
            "audit --syslog: records not delivered (the receiver gone, or reading slower than they came).",
            MetricType::Counter,
            self.syslog_dropped.get(),
        )?;
        single(
            encoder,
            "netwatch_ring_buffer_capacity_bytes",
            "Size of the ring buffer carrying transitions.",
            MetricType::Gauge,
            u64::from(self.ring_buffer_bytes),
        )
    }
}

/// The metrics as prometheus-client collects them at each scrape.
#[derive(Debug)]
struct Exposition(Arc<Metrics>);

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        self.0.encode(&mut encoder)
    }
}

/// Counters with one label each, as samples: ([(key, label value)], count).
fn labelled<'a, C>(
    key: &'static str,
    counters: C,
) -> impl Iterator<Item = ([(&'static str, &'static str); 1], u64)> + 'a
where
    C: IntoIterator<Item = (&'static str, &'a Counter)>,
    C::IntoIter: 'a,
{
    counters
        .into_iter()
        .map(move |(value, counter)| ([(key, value)], counter.get()))
}

/// One metric family: its samples as (labels, value). Counters are named
/// without `_total`, which the encoder adds.
fn family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        sample(family.encode_family(&labels)?, kind, value)?;
    }
    Ok(())
}

/// A metric with one sample and no labels.
fn single(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    value: u64,
) -> fmt::Result {
    sample(
        encoder.encode_descriptor(name, help, None, kind)?,
        kind,
        value,
    )
}

fn sample(encoder: MetricEncoder<'_>, kind: MetricType, value: u64) -> fmt::Result {
    match kind {
        MetricType::Counter => ConstCounter::new(value).encode(encoder),
        _ => ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(encoder),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_carries_each_count_under_its_labels() {
        let metrics = Arc::new(Metrics::new(4096));
        metrics.transition(TcpState::Close, TcpState::SynSent);
        metrics.transition(TcpState::Close, TcpState::SynSent);
        metrics.failure(Failure::Reopen);
        metrics.owner_change(OwnerCause::Handoff);
        let text = metrics.render();
        for line in [
            "# TYPE netwatch_transitions counter",
            r#"netwatch_transitions_total{old_state="CLOSE",new_state="SYN_SENT"} 2"#,
            r#"netwatch_failures_total{what="reopen"} 1"#,
            r#"netwatch_failures_total{what="resync"} 0"#,
            r#"netwatch_owner_changes_total{cause="handoff"} 1"#,
            r#"netwatch_sockets{state="LISTEN"} 0"#,
            "netwatch_ring_buffer_capacity_bytes 4096",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(
            !text.contains(r#"new_state="ESTABLISHED""#),
            "only transitions seen"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
