//! The live stream's two hot records, a transition (`state`) and an owner
//! change (`owner`), as JSON lines or tcpstates-style text lines, written
//! field by field into the output buffer: fixed keys as constant bytes,
//! the date and time of day once per second, no allocation. The golden
//! files in tests/golden pin their bytes; the stream's rarer records go
//! through serde ([`super::JsonRecord`]).

use std::time::SystemTime;

use super::bytes::{self, RfcTime};
use super::fragments::{OwnerFragments, TupleFragments};
use super::SCHEMA;
use crate::model::{CommandLine, Owner, OwnerChange, TcpState, Tuple};

/// Writes state and owner records in one output form.
#[derive(Debug, Default)]
pub struct StreamWriter {
    /// JSON lines, else text lines.
    json: bool,
    /// With the owner's command line (`--cmdline`).
    cmdline: bool,
    time: RfcTime,
    /// The JSON fields that end an owner's records.
    owners: OwnerFragments,
    /// The endpoints of the connections seen last.
    tuples: TupleFragments,
    /// Scratch for a text line's timestamp, of which it shows the time of day.
    stamp: Vec<u8>,
}

/// One transition, as the stream shows it.
pub struct StateRecord<'a> {
    pub ts: SystemTime,
    pub owner: Option<&'a Owner>,
    pub tuple: &'a Tuple,
    pub old: TcpState,
    pub new: TcpState,
    /// Milliseconds in the old state, when known.
    pub ms: Option<f64>,
}

impl StreamWriter {
    /// A writer of JSON lines (`json`) or text lines, with the owner's
    /// command line where `cmdline`.
    pub fn new(json: bool, cmdline: bool) -> StreamWriter {
        StreamWriter {
            json,
            cmdline,
            ..StreamWriter::default()
        }
    }

    /// Writes one transition.
    pub fn state(&mut self, out: &mut Vec<u8>, record: &StateRecord<'_>) {
        if self.json {
            self.state_json(out, record);
        } else {
            self.state_text(out, record);
        }
    }

    /// Writes one owner change, at `ts`.
    pub fn owner(&mut self, out: &mut Vec<u8>, ts: SystemTime, change: &OwnerChange) {
        if self.json {
            self.owner_json(out, ts, change);
        } else {
            self.owner_text(out, ts, change);
        }
    }

    fn state_json(&mut self, out: &mut Vec<u8>, r: &StateRecord<'_>) {
        out.extend_from_slice(b"{\"type\":\"state\",\"schema\":");
        bytes::integer(out, SCHEMA);
        out.extend_from_slice(b",\"ts\":\"");
        self.time.write(out, r.ts);
        out.extend_from_slice(b"\",\"pid\":");
        bytes::json_opt_integer(out, r.owner.map(|owner| owner.pid));
        out.extend_from_slice(b",\"program\":");
        bytes::json_opt_str(out, r.owner.map(|owner| &*owner.program));
        self.tuples.write(out, r.tuple, tuple_json);
        out.extend_from_slice(b",\"old_state\":\"");
        out.extend_from_slice(r.old.name().as_bytes());
        out.extend_from_slice(b"\",\"new_state\":\"");
        out.extend_from_slice(r.new.name().as_bytes());
        out.extend_from_slice(b"\",\"ms\":");
        bytes::json_opt_f64(out, r.ms);
        self.owner_fields_json(out, r.owner);
    }

    fn owner_json(&mut self, out: &mut Vec<u8>, ts: SystemTime, change: &OwnerChange) {
        out.extend_from_slice(b"{\"type\":\"owner\",\"schema\":");
        bytes::integer(out, SCHEMA);
        out.extend_from_slice(b",\"ts\":\"");
        self.time.write(out, ts);
        out.push(b'"');
        self.tuples.write(out, &change.tuple, tuple_json);
        out.extend_from_slice(b",\"state\":\"");
        out.extend_from_slice(change.state.name().as_bytes());
        out.extend_from_slice(b"\",\"cause\":\"");
        out.extend_from_slice(change.cause.name().as_bytes());
        out.extend_from_slice(b"\",\"old_pid\":");
        let old = change.old.as_ref();
        bytes::json_opt_integer(out, old.map(|old| old.pid));
        out.extend_from_slice(b",\"old_program\":");
        bytes::json_opt_str(out, old.map(|old| &*old.program));
        out.extend_from_slice(b",\"pid\":");
        bytes::integer(out, change.new.pid);
        out.extend_from_slice(b",\"program\":");
        bytes::json_str(out, &change.new.program);
        self.owner_fields_json(out, Some(&change.new));
    }

    /// The end of a JSON record: the owner's command line where asked for,
    /// its cgroup, unit and container (each null where none applies),
    /// written once per owner (see [`OwnerFragments`]).
    fn owner_fields_json(&mut self, out: &mut Vec<u8>, owner: Option<&Owner>) {
        let cmdline = self.cmdline;
        let fields = |out: &mut Vec<u8>, owner: Option<&Owner>| {
            if cmdline {
                out.extend_from_slice(b",\"cmdline\":");
                cmdline_json(out, super::cmdline_field(owner, true).flatten());
            }
            cgroup_fields_json(out, owner);
        };
        match owner {
            Some(owner) => self
                .owners
                .write(out, owner, |fragment, owner| fields(fragment, Some(owner))),
            None => fields(out, None),
        }
        out.extend_from_slice(b"}\n");
    }

    fn state_text(&mut self, out: &mut Vec<u8>, r: &StateRecord<'_>) {
        self.when_and_who(out, r.ts, r.owner);
        self.tuples.write(out, r.tuple, endpoints_text);
        bytes::cell(out, r.old.name().as_bytes(), 12);
        out.extend_from_slice(b" -> ");
        bytes::cell(out, r.new.name().as_bytes(), 12);
        out.push(b' ');
        match r.ms {
            Some(ms) => bytes::fixed3_right7(out, ms),
            None => out.extend_from_slice(b"      -"),
        }
        self.end_text(out, r.owner);
    }

    fn owner_text(&mut self, out: &mut Vec<u8>, ts: SystemTime, change: &OwnerChange) {
        self.when_and_who(out, ts, Some(&change.new));
        self.tuples.write(out, &change.tuple, endpoints_text);
        out.extend_from_slice(b"OWNER        <- ");
        match &change.old {
            Some(old) => {
                bytes::integer(out, old.pid);
                out.push(b'/');
                bytes::printable(out, &old.program);
            }
            None => out.push(b'-'),
        }
        self.end_text(out, Some(&change.new));
    }

    /// The TIME, PID and COMM columns, and the space after them: the time
    /// of day with microseconds, and `-` for an unknown owner.
    fn when_and_who(&mut self, out: &mut Vec<u8>, ts: SystemTime, owner: Option<&Owner>) {
        self.stamp.clear();
        self.time.write(&mut self.stamp, ts);
        // "YYYY-MM-DDTHH:MM:SS.ffffffZ": the 15 bytes after the date.
        out.extend_from_slice(self.stamp.get(11..26).unwrap_or(&self.stamp));
        out.push(b' ');
        match owner {
            Some(owner) => {
                let start = out.len();
                bytes::integer(out, owner.pid);
                let digits = out.len() - start;
                bytes::pad_from(out, digits, 7);
                out.push(b' ');
                let chars = bytes::printable(out, &owner.program);
                bytes::pad_from(out, chars, 16);
            }
            None => out.extend_from_slice(b"-       -               "),
        }
        out.push(b' ');
    }

    /// The end of a text line: the owner's command line (`-` where unknown)
    /// where asked for.
    fn end_text(&self, out: &mut Vec<u8>, owner: Option<&Owner>) {
        if self.cmdline {
            super::append_cmdline_text(out, owner);
        }
        out.push(b'\n');
    }
}

/// A command line as a JSON array of its arguments (see
/// [`CommandLine::texts`]), or `null`.
pub(super) fn cmdline_json(out: &mut Vec<u8>, cmdline: Option<&CommandLine>) {
    let Some(cmdline) = cmdline else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'[');
    for (at, arg) in cmdline.texts().enumerate() {
        if at > 0 {
            out.push(b',');
        }
        bytes::json_str(out, &arg);
    }
    out.push(b']');
}

/// The owner's cgroup, unit and container as JSON fields (after a field),
/// each null where none applies.
pub(super) fn cgroup_fields_json(out: &mut Vec<u8>, owner: Option<&Owner>) {
    let cgroup = owner.and_then(Owner::cgroup);
    out.extend_from_slice(b",\"cgroup\":");
    bytes::json_opt_str(out, cgroup.map(|cgroup| &*cgroup.path));
    out.extend_from_slice(b",\"unit\":");
    bytes::json_opt_str(out, cgroup.and_then(|cgroup| cgroup.unit.as_deref()));
    out.extend_from_slice(b",\"container\":");
    bytes::json_opt_str(out, cgroup.and_then(|cgroup| cgroup.container.as_deref()));
}

/// A connection's protocol and endpoints as JSON fields (after a field).
fn tuple_json(out: &mut Vec<u8>, tuple: &Tuple) {
    out.extend_from_slice(b",\"proto\":\"");
    out.extend_from_slice(tuple.proto.name().as_bytes());
    out.extend_from_slice(b"\",\"local_addr\":\"");
    bytes::ip(out, tuple.local.ip());
    out.extend_from_slice(b"\",\"local_port\":");
    bytes::integer(out, tuple.local.port());
    out.extend_from_slice(b",\"remote_addr\":\"");
    bytes::ip(out, tuple.remote.ip());
    out.extend_from_slice(b"\",\"remote_port\":");
    bytes::integer(out, tuple.remote.port());
}

/// The LADDR:LPORT and RADDR:RPORT columns, each followed by its space.
fn endpoints_text(out: &mut Vec<u8>, tuple: &Tuple) {
    for addr in [tuple.local, tuple.remote] {
        let start = out.len();
        bytes::endpoint(out, addr);
        let written = out.len() - start;
        bytes::pad_from(out, written, 28);
        out.push(b' ');
    }
}
