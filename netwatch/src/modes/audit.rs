//! `netwatch audit`: one JSON record per TCP connection when it closes, and
//! per listener when it opens and closes, for log pipelines.
//!
//! Every socket's record comes from its change to CLOSE, which the kernel
//! delivers exactly once (recovered when skipped, deduplicated when
//! repeated), so a connection gives one record per local endpoint. What is
//! still open at exit gets a record with `end: null`.

use std::time::SystemTime;

use crate::cli::{AuditArgs, CgroupFilters};
use crate::engine::clock::WallClock;
use crate::engine::monitor::{self, Config, End, Notice, Observer};
use crate::engine::table::{LiveSocket, Observed, SocketTable};
use crate::kernel;
use crate::metrics::Metrics;
use crate::model::{ConnResult, Owner, Proto, TcpState, Transition, Tuple};
use crate::output::{self, AuditSocket, AuditWriter, ConnRecord, ListenRecord};
use crate::sink::{RecordKind, Records, Sink, Syslog};
use crate::snapshot::{self, Snapshot};
use anyhow::Context as _;
use netwatch_common::ByteCounts;
use std::collections::HashSet;
use std::sync::Arc;

/// Writes records until SIGINT or SIGTERM.
pub fn run(args: AuditArgs) -> anyhow::Result<()> {
    let mut sink = match &args.output {
        Some(path) => Sink::append_to(path)?,
        None => Sink::stdout(),
    };
    let config = Config {
        process_images: true,
        ..Config::new(&args.probe, true, None)
    };
    if !kernel::reads_every_exe() {
        log::warn!("netwatch lacks CAP_SYS_PTRACE: `exe` is null for other users' processes (their /proc/PID/exe needs it); grant it, or run audit as root");
    }
    if let Some(target) = args.syslog {
        let syslog = Syslog::start(target, config.metrics.clone())
            .context("starting the syslog sender failed")?;
        sink = sink.and_syslog(syslog);
    }
    let audit = Audit {
        metrics: config.metrics.clone(),
        netns: config.netns,
        cgroups: args.cgroups,
        writer: AuditWriter::default(),
    };
    monitor::run(config, audit, sink)?;
    Ok(())
}

/// What audit's records say of a socket the table holds, owned by `owner`.
fn socket_fields<'a>(socket: &'a LiveSocket, owner: Option<&'a Owner>) -> AuditSocket<'a> {
    AuditSocket {
        owner,
        uid: socket.uid,
        netns: socket.netns,
        tuple: &socket.tuple,
    }
}

/// The audit observer; `metrics` counts its records.
struct Audit {
    metrics: Arc<Metrics>,
    /// netwatch's network namespace, whose sockets /proc lists.
    netns: Option<u32>,
    /// `--unit` and `--container`: the records written are those they pass.
    cgroups: CgroupFilters,
    writer: AuditWriter,
}

/// Which of `sockets` (by namespace, `own` for netwatch's, and tuple)
/// /proc lists open in no namespace (TIME_WAIT mini sockets left out): the
/// table's sockets freed without a trace; `None` when /proc cannot be
/// read. The tables are scanned a chunk at a time: tens of thousands of
/// TIME_WAIT sockets at exit cost no memory.
fn missing_from_proc(
    own: Option<u32>,
    mut sockets: HashSet<(Option<u32>, Tuple)>,
) -> Option<HashSet<(Option<u32>, Tuple)>> {
    if sockets.is_empty() {
        // Nothing to look for: after a burst the tables hold tens of
        // thousands of TIME_WAIT sockets (0.1 s of system time to read here).
        return Some(sockets);
    }
    snapshot::scan_every_namespace(&[Proto::Tcp, Proto::Tcp6], &mut |socket| {
        if !socket.timewait && socket.state != TcpState::TimeWait {
            sockets.remove(&(socket.netns.or(own), socket.tuple()));
        }
    })
    .ok()?;
    Some(sockets)
}

/// How a connection's record ends.
#[derive(Clone, Copy)]
enum Ending {
    /// Its change to CLOSE, at this time, with the error the kernel closed it with.
    Closed(SystemTime, Option<u16>),
    /// Freed without a traced change to CLOSE, found by this time (its
    /// address reused, or absent from /proc when audit stopped).
    Vanished(SystemTime),
    /// Still open when audit stopped.
    Open,
}

impl Audit {
    fn conn(
        &mut self,
        socket: &LiveSocket,
        ending: Ending,
        bytes: Option<ByteCounts>,
        clock: &WallClock,
        out: &mut Records,
    ) {
        let owner = socket.owner();
        if !self.cgroups.matches(owner.as_ref()) {
            return;
        }
        let (end, last_state) = match ending {
            // The state it left for CLOSE.
            Ending::Closed(end, _) => (Some(end), socket.previous.unwrap_or(socket.state)),
            Ending::Vanished(end) => (Some(end), socket.state),
            Ending::Open => (None, socket.state),
        };
        // Without a traced close, only a connection that got through is known.
        let result = match ending {
            Ending::Closed(_, error) => Some(ConnResult::of(error, socket.established)),
            _ => socket.established.then_some(ConnResult::Ok),
        };
        if let (Ending::Closed(..), Some(result)) = (ending, result) {
            self.metrics.connection_result(result);
        }
        let start = socket.opened_ns.map(|ns| clock.at(ns));
        let duration_ms = start.zip(end).map(|(start, end)| {
            end.duration_since(start).unwrap_or_default().as_micros() as f64 / 1e3
        });
        let record = ConnRecord {
            start,
            end,
            duration_ms,
            socket: socket_fields(socket, owner.as_ref()),
            direction: socket.direction,
            bytes,
            last_state,
            close_seen: matches!(ending, Ending::Closed(..)),
            owner_changed: socket.owner_changed,
            result,
        };
        out.push(RecordKind::Conn, |out| self.writer.conn(out, &record));
        self.metrics.conn_records.inc();
    }

    /// A listener's record: `start` is None when it opened before audit started.
    fn listen(
        &mut self,
        socket: AuditSocket<'_>,
        start: Option<SystemTime>,
        end: Option<SystemTime>,
        out: &mut Records,
    ) {
        if !self.cgroups.matches(socket.owner) {
            return;
        }
        let record = ListenRecord { start, end, socket };
        out.push(RecordKind::Listen, |out| self.writer.listen(out, &record));
        self.metrics.listen_records.inc();
    }

    /// The record of a listener the table holds.
    fn listener(
        &mut self,
        socket: &LiveSocket,
        start: Option<SystemTime>,
        end: Option<SystemTime>,
        out: &mut Records,
    ) {
        let owner = socket.owner();
        self.listen(socket_fields(socket, owner.as_ref()), start, end, out);
    }
}

impl Observer for Audit {
    fn baseline(&mut self, _snapshot: &Snapshot, table: &SocketTable, out: &mut Records) {
        for (_, socket) in table.sockets().filter(|(_, s)| s.state == TcpState::Listen) {
            self.listener(socket, None, None, out);
        }
    }

    fn transition(
        &mut self,
        t: &Transition,
        seen: &Observed,
        clock: &WallClock,
        out: &mut Records,
    ) {
        let now = clock.at(t.ts_ns);
        if let Some(vanished) = &seen.replaced {
            if vanished.state == TcpState::Listen {
                let start = vanished.opened_ns.map(|ns| clock.at(ns));
                self.listener(vanished, start, Some(now), out);
            } else {
                self.conn(vanished, Ending::Vanished(now), Some(t.bytes), clock, out);
            }
        }
        match (t.old, t.new, &seen.closed) {
            (TcpState::Listen, TcpState::Close, Some(listener)) => {
                let start = listener.opened_ns.map(|ns| clock.at(ns));
                self.listener(listener, start, Some(now), out)
            }
            (_, TcpState::Close, Some(conn)) => self.conn(
                conn,
                Ending::Closed(now, t.error),
                Some(t.bytes),
                clock,
                out,
            ),
            (TcpState::Close, TcpState::Listen, _) => {
                let listener = AuditSocket {
                    owner: seen.owner.as_ref(),
                    uid: t.uid,
                    netns: t.netns,
                    tuple: &t.tuple,
                };
                self.listen(listener, Some(now), None, out)
            }
            _ => {}
        }
    }

    fn notice(&mut self, notice: &Notice, out: &mut Records) {
        // After a resync, the records that follow say what is open.
        if !matches!(notice, Notice::Resynced { .. }) {
            output::write_notice(out, notice);
        }
    }

    fn stopped(&mut self, end: &End<'_>, out: &mut Records) {
        let End {
            table,
            bytes,
            clock,
            summary,
        } = *end;
        let connections = || table.sockets().filter(|(_, s)| s.state != TcpState::Listen);
        let own = self.netns;
        let key = move |socket: &LiveSocket| (socket.netns.or(own), socket.tuple);
        let missing = missing_from_proc(self.netns, connections().map(|(_, s)| key(s)).collect());
        let now = SystemTime::now();
        for (skaddr, socket) in connections() {
            let counted = skaddr
                .and_then(bytes)
                .or(socket.opened_ns.map(|_| ByteCounts::default()));
            let ending = match &missing {
                Some(missing) if missing.contains(&key(socket)) => Ending::Vanished(now),
                _ => Ending::Open,
            };
            self.conn(socket, ending, counted, clock, out);
        }
        output::write_summary(out, summary);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::engine::table::Process;
    use crate::model::Direction;
    use crate::output::fixtures::{
        assert_golden, owners, stream_without_allocating, tuples, STAMPS,
    };

    fn audit() -> Audit {
        Audit {
            metrics: Arc::new(Metrics::new(1 << 20)),
            netns: None,
            cgroups: CgroupFilters::default(),
            writer: AuditWriter::default(),
        }
    }

    /// Errors a connection closes with: none, each kind audit names, an
    /// errno with a name and one without.
    const ERRORS: [Option<u16>; 9] = [
        None,
        Some(0),
        Some(111),
        Some(110),
        Some(104),
        Some(32),
        Some(113),
        Some(71),
        Some(4000),
    ];

    /// A connection or listener whose fields vary with `case`.
    fn socket(case: usize, tuple: Tuple, owner: Option<&Owner>) -> LiveSocket {
        let state = TcpState::ALL[case % TcpState::ALL.len()];
        LiveSocket {
            process: owner.map(Process::of),
            owner_changed: case % 3 == 1,
            established: case.is_multiple_of(2),
            uid: [Some(0), Some(1000), None][case % 3],
            netns: [None, Some(4_026_531_840)][case % 2],
            direction: [Direction::Out, Direction::In, Direction::Unknown][case % 3],
            opened_ns: (!case.is_multiple_of(5)).then(|| STAMPS[case % STAMPS.len()]),
            previous: (!case.is_multiple_of(4))
                .then(|| TcpState::ALL[(case + 3) % TcpState::ALL.len()]),
            ..LiveSocket::unknown(tuple, state, None)
        }
    }

    /// Every conn and listen record audit writes for the golden cases.
    fn render() -> Vec<u8> {
        let mut audit = audit();
        let clock =
            WallClock::anchored(SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_000_000));
        let mut out = Records::default();
        let mut case = 0usize;
        for tuple in tuples() {
            for owner in owners() {
                case += 1;
                let socket = socket(case, tuple, owner.as_ref());
                let end = clock.at(STAMPS[(case + 2) % STAMPS.len()] + 1_234_567);
                let ending = match case % 3 {
                    0 => Ending::Closed(end, ERRORS[case / 3 % ERRORS.len()]),
                    1 => Ending::Vanished(end),
                    _ => Ending::Open,
                };
                let bytes = (case % 4 != 3).then_some(ByteCounts {
                    sent: case as u64 * 1_000_003,
                    received: u64::MAX - case as u64,
                });
                audit.conn(&socket, ending, bytes, &clock, &mut out);
                let start = socket.opened_ns.map(|ns| clock.at(ns));
                let closed = (case.is_multiple_of(2)).then_some(end);
                audit.listener(&socket, start, closed, &mut out);
            }
        }
        out.bytes().to_vec()
    }

    /// The exact bytes of every conn and listen record: what a faster
    /// writer must reproduce.
    #[test]
    fn audit_records_keep_their_exact_bytes() {
        assert_golden("audit.jsonl", &render());
    }

    /// Once warm, auditing a transition allocates nothing, and each
    /// connection gets its two records (one per endpoint).
    #[test]
    fn auditing_allocates_nothing_per_event() {
        let (events, written) = stream_without_allocating(audit(), "audit");
        let records = events / 11 * 2;
        assert!(
            written > records * 400,
            "{written} bytes for {records} records"
        );
    }
}
