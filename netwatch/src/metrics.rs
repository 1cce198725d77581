//! `--metrics ADDR:PORT`: counters in Prometheus' text format, served over
//! plain HTTP to whoever scrapes `/metrics`.
//!
//! The counters are atomics bumped on the event path (one relaxed add per
//! transition), read by the server task when scraped.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::ebpf::LossCounters;
use crate::socket::TcpState;
use crate::table::{OwnerCause, SocketTable};

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
    /// Owner changes applied: by accept, by handoff.
    owner_changes: [Counter; 2],
    evicted: Counter,
    vanished: Counter,
    pub resyncs: Counter,
    /// Reopens of the output (SIGHUP) that failed.
    pub reopen_failures: Counter,
    pub conn_records: Counter,
    pub listen_records: Counter,
    /// Verify: sockets found drifting at the last check.
    pub drift: Counter,
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
            reopen_failures: Counter::default(),
            conn_records: Counter::default(),
            listen_records: Counter::default(),
            drift: Counter::default(),
            ring_buffer_bytes,
        }
    }

    /// Counts one transition.
    pub fn transition(&self, old: TcpState, new: TcpState) {
        self.transitions[old as usize - 1][new as usize - 1].inc();
    }

    /// Counts a socket whose owner became another process.
    pub fn owner_change(&self, cause: OwnerCause) {
        self.owner_changes[cause as usize].inc();
    }

    /// Records the losses reported so far, and from the table the sockets
    /// it evicted and those found freed without a traced CLOSE.
    pub fn set_losses(&self, lost: LossCounters, table: &SocketTable) {
        self.lost_ring_buffer_full.set(lost.ring_buffer_full);
        self.lost_skipped.set(lost.skipped);
        self.lost_owner_events.set(lost.owner_events_dropped);
        self.evicted.set(table.evicted());
        self.vanished.set(table.vanished());
    }

    /// Recounts the table's sockets by state.
    pub fn count_sockets(&self, table: &SocketTable) {
        let mut counts = [0u64; STATES];
        for (_, socket) in table.sockets() {
            counts[socket.state as usize - 1] += 1;
        }
        for (gauge, count) in self.sockets.iter().zip(counts) {
            gauge.set(count);
        }
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut text = String::with_capacity(4096);
        family(
            &mut text,
            "netwatch_transitions_total",
            "counter",
            "TCP state transitions applied, by old and new state.",
        );
        for (old, row) in TcpState::ALL.iter().zip(&self.transitions) {
            for (new, counter) in TcpState::ALL.iter().zip(row) {
                if counter.get() > 0 {
                    let _ = writeln!(
                        text,
                        "netwatch_transitions_total{{old_state=\"{old}\",new_state=\"{new}\"}} {}",
                        counter.get()
                    );
                }
            }
        }
        family(&mut text, "netwatch_lost_events_total", "counter", "Events lost, by cause: transitions the ring buffer had no room for, transitions skipped by the kernel and not recovered, owner changes the ring buffer had no room for.");
        let _ = writeln!(
            text,
            "netwatch_lost_events_total{{cause=\"ring_buffer_full\"}} {}",
            self.lost_ring_buffer_full.get()
        );
        let _ = writeln!(
            text,
            "netwatch_lost_events_total{{cause=\"skipped\"}} {}",
            self.lost_skipped.get()
        );
        let _ = writeln!(
            text,
            "netwatch_lost_events_total{{cause=\"owner_ring_buffer_full\"}} {}",
            self.lost_owner_events.get()
        );
        family(
            &mut text,
            "netwatch_owner_changes_total",
            "counter",
            "Sockets whose owner became another process: by accept(), or by a send or receive (handoff).",
        );
        for (cause, counter) in [OwnerCause::Accept, OwnerCause::Handoff]
            .iter()
            .zip(&self.owner_changes)
        {
            let _ = writeln!(
                text,
                "netwatch_owner_changes_total{{cause=\"{}\"}} {}",
                cause.name(),
                counter.get()
            );
        }
        single(
            &mut text,
            "netwatch_recovered_events_total",
            "counter",
            "Transitions the kernel skipped that the recovery program sent.",
            self.recovered.get(),
        );
        single(
            &mut text,
            "netwatch_resyncs_total",
            "counter",
            "Times the table was rebuilt from /proc after losses.",
            self.resyncs.get(),
        );
        single(
            &mut text,
            "netwatch_output_reopen_failures_total",
            "counter",
            "Reopens of --output (SIGHUP) that failed; records keep going to the file already open.",
            self.reopen_failures.get(),
        );
        single(
            &mut text,
            "netwatch_table_evictions_total",
            "counter",
            "Sockets evicted from the full table (least recently changed first).",
            self.evicted.get(),
        );
        single(
            &mut text,
            "netwatch_vanished_sockets_total",
            "counter",
            "Sockets found freed without a traced change to CLOSE (their address reused).",
            self.vanished.get(),
        );
        family(
            &mut text,
            "netwatch_sockets",
            "gauge",
            "Sockets in the live table, by state (recounted every second).",
        );
        for (state, gauge) in TcpState::ALL.iter().zip(&self.sockets) {
            let _ = writeln!(
                text,
                "netwatch_sockets{{state=\"{state}\"}} {}",
                gauge.get()
            );
        }
        family(
            &mut text,
            "netwatch_audit_records_total",
            "counter",
            "Audit records written, by type.",
        );
        let _ = writeln!(
            text,
            "netwatch_audit_records_total{{type=\"conn\"}} {}",
            self.conn_records.get()
        );
        let _ = writeln!(
            text,
            "netwatch_audit_records_total{{type=\"listen\"}} {}",
            self.listen_records.get()
        );
        single(
            &mut text,
            "netwatch_drift_sockets",
            "gauge",
            "verify: sockets that differed from the last snapshot.",
            self.drift.get(),
        );
        single(
            &mut text,
            "netwatch_ring_buffer_capacity_bytes",
            "gauge",
            "Size of the ring buffer carrying transitions.",
            u64::from(self.ring_buffer_bytes),
        );
        text
    }
}

fn family(text: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn single(text: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    family(text, name, kind, help);
    let _ = writeln!(text, "{name} {value}");
}

/// Binds `addr` and serves `metrics` from a task of the runtime.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("serving metrics on {addr} failed: is the address free and local?")
    })?;
    tokio::spawn(async move {
        loop {
            if let Ok((stream, _)) = listener.accept().await {
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(5), respond(stream, &metrics))
                        .await;
                });
            }
        }
    });
    Ok(())
}

/// Answers one HTTP request: the metrics for `GET /metrics`, 404 otherwise.
async fn respond(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            break;
        }
        request.extend_from_slice(&chunk[..read]);
    }
    let wanted = request.starts_with(b"GET /metrics ") || request.starts_with(b"GET / ");
    let (status, body) = if wanted {
        ("200 OK", metrics.render())
    } else {
        ("404 Not Found", "try GET /metrics\n".to_owned())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
