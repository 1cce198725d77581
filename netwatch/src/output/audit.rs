//! Audit's two hot records, a connection (`conn`) and a listener
//! (`listen`), as JSON lines written field by field into the output
//! buffer, as the stream's are ([`super::StreamWriter`]): fixed keys as
//! constant bytes, the date and time of day once per second, no
//! allocation. The golden file tests/golden/audit.jsonl pins their bytes;
//! audit's rarer records are the ones every mode writes ([`super::JsonRecord`]).

use std::time::SystemTime;

use netwatch_common::ByteCounts;

use super::bytes::{self, RfcTime};
use super::fragments::OwnerFragments;
use super::stream::{cgroup_fields_json, cmdline_json};
use super::SCHEMA;
use crate::model::{ConnResult, Direction, Owner, TcpState, Tuple};

/// What every socket record of audit says of the socket.
pub struct AuditSocket<'a> {
    pub owner: Option<&'a Owner>,
    pub uid: Option<u32>,
    pub netns: Option<u32>,
    pub tuple: &'a Tuple,
}

/// A connection: at its close, or still open when audit stopped (`end` none).
pub struct ConnRecord<'a> {
    /// None when it opened before audit started (direction "unknown").
    pub start: Option<SystemTime>,
    pub end: Option<SystemTime>,
    pub duration_ms: Option<f64>,
    pub socket: AuditSocket<'a>,
    pub direction: Direction,
    /// None when not counted: a connection from before audit started, still open.
    pub bytes: Option<ByteCounts>,
    /// The state the connection left for CLOSE, or its last state.
    pub last_state: TcpState,
    /// Whether the kernel traced its change to CLOSE.
    pub close_seen: bool,
    /// Whether its owner changed from one process to another while audit watched it.
    pub owner_changed: bool,
    /// How it went; None when unknown.
    pub result: Option<ConnResult>,
}

/// A listener that opened (`end` none) or closed.
pub struct ListenRecord<'a> {
    /// None when it was listening before audit started.
    pub start: Option<SystemTime>,
    pub end: Option<SystemTime>,
    pub socket: AuditSocket<'a>,
}

/// Writes conn and listen records as JSON lines.
#[derive(Debug, Default)]
pub struct AuditWriter {
    time: RfcTime,
    owners: OwnerFragments,
}

impl AuditWriter {
    /// Writes one connection's record.
    pub fn conn(&mut self, out: &mut Vec<u8>, r: &ConnRecord<'_>) {
        out.extend_from_slice(b"{\"type\":\"conn\",\"schema\":");
        bytes::integer(out, SCHEMA);
        self.start_and_end(out, r.start, r.end);
        out.extend_from_slice(b",\"duration_ms\":");
        bytes::json_opt_f64(out, r.duration_ms);
        self.socket_json(out, &r.socket);
        out.extend_from_slice(b",\"direction\":\"");
        out.extend_from_slice(r.direction.name().as_bytes());
        out.extend_from_slice(b"\",\"remote_addr\":\"");
        bytes::ip(out, r.socket.tuple.remote.ip());
        out.extend_from_slice(b"\",\"remote_port\":");
        bytes::integer(out, r.socket.tuple.remote.port());
        out.extend_from_slice(b",\"bytes_sent\":");
        bytes::json_opt_integer(out, r.bytes.map(|bytes| bytes.sent));
        out.extend_from_slice(b",\"bytes_received\":");
        bytes::json_opt_integer(out, r.bytes.map(|bytes| bytes.received));
        out.extend_from_slice(b",\"last_state\":\"");
        out.extend_from_slice(r.last_state.name().as_bytes());
        out.extend_from_slice(b"\",\"close_seen\":");
        boolean(out, r.close_seen);
        out.extend_from_slice(b",\"owner_changed\":");
        boolean(out, r.owner_changed);
        out.extend_from_slice(b",\"result\":");
        match r.result {
            Some(result) => bytes::json_str(out, &result.name()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b"}\n");
    }

    /// Writes one listener's record.
    pub fn listen(&mut self, out: &mut Vec<u8>, r: &ListenRecord<'_>) {
        out.extend_from_slice(b"{\"type\":\"listen\",\"schema\":");
        bytes::integer(out, SCHEMA);
        out.extend_from_slice(match r.end {
            Some(_) => b",\"event\":\"close\"",
            None => b",\"event\":\"open\"",
        });
        self.start_and_end(out, r.start, r.end);
        self.socket_json(out, &r.socket);
        out.extend_from_slice(b"}\n");
    }

    /// The fields every socket record shares (after a field): the owner
    /// (written once per owner, see [`OwnerFragments`]), the socket's uid
    /// and namespace, its local end.
    fn socket_json(&mut self, out: &mut Vec<u8>, socket: &AuditSocket<'_>) {
        match socket.owner {
            Some(owner) => self.owners.write(out, owner, |fragment, owner| {
                owner_json(fragment, Some(owner))
            }),
            None => owner_json(out, None),
        }
        out.extend_from_slice(b",\"uid\":");
        bytes::json_opt_integer(out, socket.uid);
        out.extend_from_slice(b",\"netns\":");
        bytes::json_opt_integer(out, socket.netns);
        out.extend_from_slice(b",\"proto\":\"");
        out.extend_from_slice(socket.tuple.proto.name().as_bytes());
        out.extend_from_slice(b"\",\"local_addr\":\"");
        bytes::ip(out, socket.tuple.local.ip());
        out.extend_from_slice(b"\",\"local_port\":");
        bytes::integer(out, socket.tuple.local.port());
    }

    fn start_and_end(
        &mut self,
        out: &mut Vec<u8>,
        start: Option<SystemTime>,
        end: Option<SystemTime>,
    ) {
        out.extend_from_slice(b",\"start\":");
        self.opt_time(out, start);
        out.extend_from_slice(b",\"end\":");
        self.opt_time(out, end);
    }

    /// An RFC 3339 time as a JSON string, or `null`.
    fn opt_time(&mut self, out: &mut Vec<u8>, time: Option<SystemTime>) {
        match time {
            Some(time) => {
                out.push(b'"');
                self.time.write(out, time);
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
    }
}

/// The owner's fields (after a field): its pid and name, what it runs and its cgroup.
fn owner_json(out: &mut Vec<u8>, owner: Option<&Owner>) {
    let image = owner.and_then(Owner::image);
    out.extend_from_slice(b",\"pid\":");
    bytes::json_opt_integer(out, owner.map(|owner| owner.pid));
    out.extend_from_slice(b",\"program\":");
    bytes::json_opt_str(out, owner.map(|owner| &*owner.program));
    out.extend_from_slice(b",\"cmdline\":");
    cmdline_json(out, image.and_then(|image| image.cmdline.as_deref()));
    out.extend_from_slice(b",\"exe\":");
    bytes::json_opt_str(out, image.and_then(|image| image.exe.as_deref()));
    cgroup_fields_json(out, owner);
}

fn boolean(out: &mut Vec<u8>, value: bool) {
    out.extend_from_slice(if value { b"true" } else { b"false" });
}
