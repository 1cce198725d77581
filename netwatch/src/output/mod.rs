//! What netwatch prints: netstat-style tables, tcpstates-style lines, and
//! JSON lines. The stream's hot records have a writer of their own
//! (`stream`), built on byte writers (`bytes`).

mod audit;
mod bytes;
#[cfg(test)]
pub mod fixtures;
mod fragments;
mod stream;
mod verify;

pub use audit::{AuditSocket, AuditWriter, ConnRecord, ListenRecord};
pub use stream::{StateRecord, StreamWriter};
pub use verify::{write_drift_report, Drift, DriftKind, DriftReport, VerifySummaryRecord};

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use crate::engine::monitor::{Notice, Summary};
use crate::model::{format_endpoint, CommandLine, Endpoint, LossCause, Owner, Proto, TcpState};
use crate::sink::{RecordKind, Records};
use crate::snapshot::SnapshotEntry;

/// Version of the JSON records' layout, the same in every mode (each
/// record's `schema`); bumped when a field changes meaning or goes away.
/// 2: `pid` and `program` of an accepted connection are the process that
/// owned it when it closed (the accepting process, or the one it was handed
/// to), no longer its listener's owner; `owner_changed` is new (audit).
pub const SCHEMA: u32 = 2;

/// Which optional columns the snapshot table has.
#[derive(Clone, Copy, Debug, Default)]
pub struct SnapshotColumns {
    /// PID/Program name (`-p`).
    pub program: bool,
    /// User and Inode (`-e`).
    pub extend: bool,
    /// The command line after PID/ instead of the name (`--cmdline`).
    pub cmdline: bool,
}

/// netstat's title line for the states shown.
pub fn snapshot_title(listening: bool, all: bool) -> &'static str {
    match (listening, all) {
        (true, _) => "Active Internet connections (only servers)",
        (false, true) => "Active Internet connections (servers and established)",
        (false, false) => "Active Internet connections (w/o servers)",
    }
}

/// Writes sockets as netstat does, columns widened to fit IPv6 addresses.
pub fn write_snapshot_text(
    out: &mut impl Write,
    title: &str,
    entries: &[&SnapshotEntry],
    columns: SnapshotColumns,
) -> io::Result<()> {
    // netstat's 23 columns fit any IPv4 endpoint: only IPv6 ones can widen them.
    let width = |endpoint: fn(&SnapshotEntry) -> SocketAddr| {
        entries
            .iter()
            .map(|entry| endpoint(entry))
            .filter(SocketAddr::is_ipv6)
            .map(|addr| format_endpoint(addr).len())
            .fold(23, usize::max)
    };
    let (local_w, remote_w) = (width(|e| e.socket.local), width(|e| e.socket.remote));
    writeln!(out, "{title}")?;
    let mut line = format!(
        "Proto Recv-Q Send-Q {:local_w$} {:remote_w$} State      ",
        "Local Address", "Foreign Address"
    );
    if columns.extend {
        line.push_str(" User       Inode     ");
    }
    if columns.program {
        line.push_str(" PID/Program name");
    }
    line.push('\n');
    out.write_all(line.as_bytes())?;
    for entry in entries {
        line.clear();
        let socket = &entry.socket;
        push_cell(&mut line, socket.proto.name(), 5);
        push_number(&mut line, socket.rx_queue, 7);
        push_number(&mut line, socket.tx_queue, 7);
        line.push(' ');
        push_cell(&mut line, Endpoint(socket.local), local_w + 1);
        push_cell(&mut line, Endpoint(socket.remote), remote_w + 1);
        push_cell(&mut line, text_state(socket.proto, socket.state), 11);
        if columns.extend {
            line.push(' ');
            push_cell(&mut line, socket.uid, 11);
            push_cell(&mut line, socket.inode, 10);
        }
        if columns.program {
            match &entry.owner {
                Some(owner) => {
                    let _ = match cmdline_field(Some(owner), columns.cmdline).flatten() {
                        Some(cmdline) => {
                            write!(line, " {}/{}", owner.pid, Printable(&cmdline.to_string()))
                        }
                        None => write!(line, " {}/{}", owner.pid, Printable(&owner.program)),
                    };
                }
                None => line.push_str(" -"),
            }
        }
        line.push('\n');
        out.write_all(line.as_bytes())?;
    }
    Ok(())
}

/// Appends `value` padded with spaces to `width`, left-aligned (whether or
/// not its `Display` honours a width).
fn push_cell(line: &mut String, value: impl std::fmt::Display, width: usize) {
    let start = line.len();
    // Writing to a String cannot fail.
    let _ = write!(line, "{value}");
    let pad = width.saturating_sub(line.len() - start);
    line.extend(std::iter::repeat_n(' ', pad));
}

/// Appends a number right-aligned in `width`.
fn push_number(line: &mut String, value: u32, width: usize) {
    // Writing to a String cannot fail.
    let _ = write!(line, "{value:>width$}");
}

/// netstat leaves the state of an unconnected UDP socket blank.
fn text_state(proto: Proto, state: TcpState) -> &'static str {
    if !proto.is_tcp() && state == TcpState::Close {
        ""
    } else {
        state.name()
    }
}

/// One socket of a snapshot, as `netwatch snapshot --json` prints it.
#[derive(Debug, Serialize)]
pub struct SocketRecord<'a> {
    pub proto: &'static str,
    pub local_addr: String,
    pub local_port: u16,
    pub remote_addr: String,
    pub remote_port: u16,
    pub state: &'static str,
    pub inode: u64,
    pub uid: u32,
    pub pid: Option<u32>,
    pub program: Option<&'a str>,
    /// Every process holding it, lowest first (`pid` is the first).
    pub pids: &'a [u32],
    /// The owner's arguments, where asked for (null: not readable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<Option<&'a CommandLine>>,
}

impl<'a> SocketRecord<'a> {
    /// The record of a snapshot entry, with `cmdline` when asked for.
    pub fn new(entry: &'a SnapshotEntry, cmdline: bool) -> SocketRecord<'a> {
        let socket = &entry.socket;
        SocketRecord {
            proto: socket.proto.name(),
            local_addr: socket.local.ip().to_string(),
            local_port: socket.local.port(),
            remote_addr: socket.remote.ip().to_string(),
            remote_port: socket.remote.port(),
            state: socket.state.name(),
            inode: socket.inode,
            uid: socket.uid,
            pid: entry.owner.as_ref().map(|owner| owner.pid),
            program: entry.owner.as_ref().map(|owner| &*owner.program),
            pids: &entry.pids,
            cmdline: cmdline_field(entry.owner.as_ref(), cmdline),
        }
    }
}

/// Text from a process (its name) made safe for a terminal: control
/// characters (ESC, newline, ...) are shown escaped, as `\u{1b}` or `\n`,
/// so that a process cannot move the cursor or forge lines. JSON escapes
/// them by itself.
pub struct Printable<'a>(pub &'a str);

impl std::fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// Writes one value as a JSON line.
pub fn write_json_line(out: &mut impl Write, value: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")
}

/// A time that prints (and serializes, without allocating) as RFC 3339 UTC
/// with microseconds.
#[derive(Clone, Copy, Debug)]
pub struct Timestamp(pub SystemTime);

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        humantime::format_rfc3339_micros(self.0).fmt(f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_display(self, serializer)
    }
}

/// Formats on the stack and serializes one string: `collect_str` would
/// escape each formatted fragment separately, the hottest path of the stream.
fn serialize_display<S: serde::Serializer>(
    value: &impl std::fmt::Display,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut buffer = [0u8; 64];
    let mut cursor = io::Cursor::new(&mut buffer[..]);
    match write!(cursor, "{value}") {
        Ok(()) => {
            let len = cursor.position() as usize;
            match std::str::from_utf8(&buffer[..len]) {
                Ok(text) => serializer.serialize_str(text),
                Err(_) => serializer.collect_str(value),
            }
        }
        Err(_) => serializer.collect_str(value),
    }
}

/// A JSON record every mode writes alike, tagged by `type` (the stream's
/// baseline sockets too): the hot records have writers of their own
/// ([`StreamWriter`], [`AuditWriter`]).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum JsonRecord<'a> {
    /// A socket that existed when netwatch started (`--baseline`).
    Baseline {
        schema: u32,
        ts: Timestamp,
        #[serde(flatten)]
        socket: SocketRecord<'a>,
        #[serde(flatten)]
        cgroup: CgroupFields,
    },
    /// Transitions the kernel could not deliver.
    Lost {
        schema: u32,
        ts: Timestamp,
        count: u64,
        cause: LossCause,
    },
    /// The table was rebuilt from a fresh /proc snapshot.
    Resync {
        schema: u32,
        ts: Timestamp,
        sockets: usize,
    },
    /// Something failed that netwatch went on after (a resync, a reopen).
    Failure {
        schema: u32,
        ts: Timestamp,
        what: &'static str,
        message: &'a str,
    },
    /// The last record: what the run saw.
    Summary {
        schema: u32,
        ts: Timestamp,
        #[serde(flatten)]
        counts: &'a Summary,
    },
}

/// Writes the record of what happened to the monitor (`lost`, `failure`,
/// `resync`), stamped now.
pub fn write_notice(out: &mut Records, notice: &Notice) {
    let ts = Timestamp(SystemTime::now());
    let (kind, record) = match notice {
        Notice::Lost { count, cause } => (
            RecordKind::Lost,
            JsonRecord::Lost {
                schema: SCHEMA,
                ts,
                count: *count,
                cause: *cause,
            },
        ),
        Notice::Failed { what, message } => (
            RecordKind::Failure,
            JsonRecord::Failure {
                schema: SCHEMA,
                ts,
                what: what.name(),
                message: message.as_str(),
            },
        ),
        Notice::Resynced { sockets } => (
            RecordKind::Resync,
            JsonRecord::Resync {
                schema: SCHEMA,
                ts,
                sockets: *sockets,
            },
        ),
    };
    push_json_line(out, kind, &record);
}

/// Writes the record a run ends with: what it saw, stamped now.
pub fn write_summary(out: &mut Records, summary: &Summary) {
    let record = JsonRecord::Summary {
        schema: SCHEMA,
        ts: Timestamp(SystemTime::now()),
        counts: summary,
    };
    push_json_line(out, RecordKind::Summary, &record);
}

/// Appends `value` as one JSON line, a record of `kind`.
pub fn push_json_line(out: &mut Records, kind: RecordKind, value: &impl Serialize) {
    out.push(kind, |out| {
        // Writing to a Vec cannot fail.
        let _ = write_json_line(out, value);
    });
}

/// The owner's cgroup in a JSON record (the stream's and audit's): each
/// field null where none applies.
#[derive(Debug, Default, Serialize)]
pub struct CgroupFields {
    pub cgroup: Option<Arc<str>>,
    pub unit: Option<Arc<str>>,
    pub container: Option<Arc<str>>,
}

impl CgroupFields {
    /// The fields of `owner`'s cgroup.
    pub fn of(owner: Option<&Owner>) -> CgroupFields {
        let Some(cgroup) = owner.and_then(Owner::cgroup) else {
            return CgroupFields::default();
        };
        CgroupFields {
            cgroup: Some(cgroup.path.clone()),
            unit: cgroup.unit.clone(),
            container: cgroup.container.clone(),
        }
    }
}

/// The `cmdline` of a JSON record: absent unless `asked`, then the
/// owner's arguments, or null where there is no owner or they were unreadable.
pub fn cmdline_field(owner: Option<&Owner>, asked: bool) -> Option<Option<&CommandLine>> {
    asked.then(|| owner?.image()?.cmdline.as_deref())
}

/// Ends the text line just written to `out` with the owner's command line
/// (`-` where unknown), for `--cmdline`.
pub fn append_cmdline(out: &mut Vec<u8>, owner: Option<&Owner>) {
    if out.last() == Some(&b'\n') {
        out.pop();
    }
    append_cmdline_text(out, owner);
    out.push(b'\n');
}

/// Appends two spaces and the owner's command line as a shell would quote
/// it, made printable, or `  -` where unknown.
fn append_cmdline_text(out: &mut Vec<u8>, owner: Option<&Owner>) {
    match cmdline_field(owner, true).flatten() {
        Some(cmdline) => {
            out.extend_from_slice(b"  ");
            // Writing to a Vec cannot fail.
            let _ = write!(PrintableBytes(out), "{cmdline}");
        }
        None => out.extend_from_slice(b"  -"),
    }
}

/// Writes what it is given as [`Printable`] shows it, without a String between.
struct PrintableBytes<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for PrintableBytes<'_> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        bytes::printable(self.0, text);
        Ok(())
    }
}

/// Header of the text stream, tcpstates' columns.
pub const STREAM_HEADER: &str = "TIME            PID     COMM             LADDR:LPORT                  RADDR:RPORT                  OLDSTATE     -> NEWSTATE        MS";

/// The TIME, PID and COMM columns: the clock time of an RFC 3339 timestamp,
/// and `-` for an unknown owner.
fn when_and_who(ts: &str, owner: Option<&Owner>) -> String {
    let time = ts.get(11..26).unwrap_or(ts);
    match owner {
        Some(owner) => format!(
            "{time:<15} {:<7} {:<16}",
            owner.pid,
            Printable(&owner.program).to_string()
        ),
        None => format!("{time:<15} {:<7} {:<16}", "-", "-"),
    }
}

/// One socket of the starting baseline as a text line.
pub fn write_baseline_text(
    out: &mut impl Write,
    ts: &str,
    entry: &SnapshotEntry,
) -> io::Result<()> {
    let socket = &entry.socket;
    writeln!(
        out,
        "{} {:<28} {:<28} {:<12}    (baseline)",
        when_and_who(ts, entry.owner.as_ref()),
        format_endpoint(socket.local),
        format_endpoint(socket.remote),
        socket.state.name(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{OwnerChange, Tuple};
    use crate::snapshot::ProcSocket;

    fn entry(
        proto: Proto,
        local: &str,
        remote: &str,
        state: TcpState,
        owner: Option<Owner>,
    ) -> SnapshotEntry {
        SnapshotEntry {
            socket: ProcSocket {
                proto,
                local: local.parse().unwrap(),
                remote: remote.parse().unwrap(),
                state,
                tx_queue: 5,
                rx_queue: 7,
                uid: 1000,
                inode: 4242,
                timewait: false,
                netns: None,
                kernel: None,
            },
            pids: owner.iter().map(|owner| owner.pid).collect(),
            owner,
        }
    }

    #[test]
    fn text_table_matches_netstat_layout() {
        let sshd = Some(Owner::new(812, "sshd".into()));
        let entries = [
            entry(
                Proto::Tcp,
                "127.0.0.1:22",
                "127.0.0.1:50000",
                TcpState::Established,
                sshd,
            ),
            entry(Proto::Tcp6, "[::1]:8080", "[::]:0", TcpState::Listen, None),
            entry(Proto::Udp, "0.0.0.0:53", "0.0.0.0:0", TcpState::Close, None),
        ];
        let refs: Vec<&SnapshotEntry> = entries.iter().collect();
        let mut out = Vec::new();
        let columns = SnapshotColumns {
            program: true,
            extend: true,
            cmdline: false,
        };
        write_snapshot_text(&mut out, snapshot_title(false, true), &refs, columns).unwrap();
        let expected = "\
Active Internet connections (servers and established)
Proto Recv-Q Send-Q Local Address           Foreign Address         State       User       Inode      PID/Program name
tcp        7      5 127.0.0.1:22            127.0.0.1:50000         ESTABLISHED 1000       4242       812/sshd
tcp6       7      5 [::1]:8080              [::]:*                  LISTEN      1000       4242       -
udp        7      5 0.0.0.0:53              0.0.0.0:*                           1000       4242       -
";
        assert_eq!(String::from_utf8(out).unwrap(), expected);
    }

    #[test]
    fn json_record_has_exactly_the_documented_keys() {
        let e = entry(
            Proto::Tcp6,
            "[::ffff:127.0.0.1]:80",
            "[::ffff:127.0.0.1]:4000",
            TcpState::TimeWait,
            None,
        );
        let value = serde_json::to_value(SocketRecord::new(&e, false)).unwrap();
        let expected = serde_json::json!({
            "proto": "tcp6", "local_addr": "::ffff:127.0.0.1", "local_port": 80,
            "remote_addr": "::ffff:127.0.0.1", "remote_port": 4000, "state": "TIME_WAIT",
            "inode": 4242, "uid": 1000, "pid": null, "program": null, "pids": []
        });
        assert_eq!(value, expected);
    }

    #[test]
    fn stream_records_are_tagged_by_type() {
        let lost = JsonRecord::Lost {
            schema: SCHEMA,
            ts: Timestamp(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_767_225_600)),
            count: 3,
            cause: LossCause::Recursion,
        };
        assert_eq!(
            serde_json::to_value(&lost).unwrap(),
            serde_json::json!({"type": "lost", "schema": 2, "ts": "2026-01-01T00:00:00.000000Z", "count": 3, "cause": "recursion"})
        );
    }

    /// 2026-11-27T08:19:23.428319Z.
    fn at_428319() -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_764_231_563_428_319)
    }

    #[test]
    fn a_transition_line_lines_up_with_the_header() {
        let tuple = Tuple {
            proto: Proto::Tcp,
            local: "127.0.0.1:48286".parse().unwrap(),
            remote: "127.0.0.1:8080".parse().unwrap(),
        };
        let owner = Owner::new(6860, "python3".into());
        let mut out = Vec::new();
        let mut writer = StreamWriter::new(false, false);
        let record = |owner, old, new, ms| StateRecord {
            ts: at_428319(),
            owner,
            tuple: &tuple,
            old,
            new,
            ms,
        };
        let (established, fin_wait1) = (TcpState::Established, TcpState::FinWait1);
        writer.state(
            &mut out,
            &record(Some(&owner), established, fin_wait1, Some(204.718)),
        );
        writer.state(&mut out, &record(None, fin_wait1, TcpState::FinWait2, None));
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "08:19:23.428319 6860    python3          127.0.0.1:48286              127.0.0.1:8080               ESTABLISHED  -> FIN_WAIT1    204.718"
        );
        assert!(lines[1].starts_with("08:19:23.428319 -       -                127.0.0.1:48286"));
        assert!(lines[1].ends_with("      -"));
        let column = |line: &str, name: &str| line.find(name).unwrap();
        assert_eq!(
            column(STREAM_HEADER, "LADDR"),
            column(lines[0], "127.0.0.1:48286")
        );
        assert_eq!(
            column(STREAM_HEADER, "OLDSTATE"),
            column(lines[0], "ESTABLISHED")
        );
    }

    #[test]
    fn an_owner_change_is_a_record_and_a_line_of_its_own() {
        use crate::model::OwnerCause;
        let tuple = Tuple {
            proto: Proto::Tcp,
            local: "127.0.0.1:8080".parse().unwrap(),
            remote: "127.0.0.1:48286".parse().unwrap(),
        };
        let mut change = OwnerChange {
            skaddr: 1,
            tuple,
            state: TcpState::Established,
            old: Some(Owner::new(100, "nginx".into())),
            new: Owner::new(101, "nginx".into()),
            cause: OwnerCause::Accept,
        };
        let mut out = Vec::new();
        StreamWriter::new(true, false).owner(&mut out, SystemTime::UNIX_EPOCH, &change);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&out).unwrap(),
            serde_json::json!({
                "type": "owner", "schema": 2, "ts": "1970-01-01T00:00:00.000000Z", "proto": "tcp",
                "local_addr": "127.0.0.1", "local_port": 8080, "remote_addr": "127.0.0.1",
                "remote_port": 48286, "state": "ESTABLISHED", "cause": "accept",
                "old_pid": 100, "old_program": "nginx", "pid": 101, "program": "nginx",
                "cgroup": null, "unit": null, "container": null
            })
        );
        change.old = None;
        let mut out = Vec::new();
        StreamWriter::new(false, false).owner(&mut out, at_428319(), &change);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "08:19:23.428319 101     nginx            127.0.0.1:8080               127.0.0.1:48286              OWNER        <- -\n"
        );
    }

    #[test]
    fn control_characters_in_a_name_are_shown_escaped() {
        assert_eq!(
            Printable("evil\u{1b}[2J\nfake line\tx").to_string(),
            "evil\\u{1b}[2J\\nfake line\\tx"
        );
        assert_eq!(Printable("nginx: wörker").to_string(), "nginx: wörker");
        let owner = Owner::new(7, "a\u{1b}b".into());
        let entries = [entry(
            Proto::Tcp,
            "127.0.0.1:22",
            "127.0.0.1:5000",
            TcpState::Established,
            Some(owner.clone()),
        )];
        let refs: Vec<&SnapshotEntry> = entries.iter().collect();
        let mut out = Vec::new();
        let columns = SnapshotColumns {
            program: true,
            extend: false,
            cmdline: false,
        };
        write_snapshot_text(&mut out, "title", &refs, columns).unwrap();
        let tuple = Tuple {
            proto: Proto::Tcp,
            local: "127.0.0.1:22".parse().unwrap(),
            remote: "127.0.0.1:5000".parse().unwrap(),
        };
        let record = StateRecord {
            ts: at_428319(),
            owner: Some(&owner),
            tuple: &tuple,
            old: TcpState::Established,
            new: TcpState::FinWait1,
            ms: None,
        };
        StreamWriter::new(false, false).state(&mut out, &record);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains('\u{1b}'), "{text:?}");
        assert_eq!(text.matches("a\\u{1b}b").count(), 2, "{text}");
    }

    #[test]
    fn timestamps_are_utc_with_microseconds() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(Timestamp(t).to_string(), "2023-11-14T22:13:20.123456Z");
    }
}
