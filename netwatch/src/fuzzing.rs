//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): each
//! hands arbitrary bytes to a parser of input that netwatch does not
//! control, which must neither panic nor break its own invariants.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt as _;

use clap::Parser as _;
use netwatch_common::{COMMAND_LINE_BYTES, FILE_OFFSETS, SOCK_OFFSETS, TASK_OFFSETS, TCP_OFFSETS};

use crate::cli::Cli;
use crate::kernel::{decode_event, to_record, Btf};
use crate::model::{Proto, Record};
use crate::sink::SyslogTarget;
use crate::snapshot::parse_table;

/// One ring buffer item, decoded and made a record.
pub fn ring_buffer_item(bytes: &[u8]) {
    let Some(event) = decode_event(bytes) else {
        assert_eq!(to_record(bytes), None);
        return;
    };
    let task = match to_record(bytes) {
        Some(Record::Transition(transition)) => {
            assert_eq!(transition.skaddr, event.skaddr);
            transition.task
        }
        Some(Record::Owner(owner)) => owner.task,
        Some(Record::Exec(task)) => task,
        None => return,
    };
    let command_line = task.command_line.as_deref().unwrap_or_default();
    assert!(command_line.len() <= COMMAND_LINE_BYTES);
    assert!(command_line.len() < bytes.len());
}

/// One /proc/net table, read as each protocol's.
pub fn proc_net_table(bytes: &[u8]) {
    for proto in Proto::ALL {
        let table = parse_table(proto, bytes);
        let lines = bytes.split(|&b| b == b'\n').count();
        assert!(table.sockets.len() + table.malformed_lines <= lines);
        assert!(table.sockets.iter().all(|socket| socket.proto == proto));
    }
}

/// A BTF blob, searched for every struct member netwatch's programs read.
pub fn btf(bytes: &[u8]) {
    let fields = [
        &SOCK_OFFSETS[..],
        &TASK_OFFSETS,
        &FILE_OFFSETS,
        &TCP_OFFSETS,
    ]
    .concat();
    let structs: Vec<&str> = fields.iter().map(|&(_, name, _)| name).collect();
    let Ok(btf) = Btf::parse(bytes.to_vec(), &structs) else {
        return;
    };
    for (_, name, member) in fields {
        let _ = btf.member_offset(name, member);
    }
    let _ = btf.function_id("bpf_iter_tcp");
}

/// A `--syslog` target.
pub fn syslog_target(bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = text.parse::<SyslogTarget>();
    }
}

/// A command line (arguments apart at NUL bytes): `--metrics`, the
/// filters, the state names and every other argument's parser.
pub fn command_line(bytes: &[u8]) {
    let args = bytes
        .split(|&b| b == 0)
        .map(|arg| OsString::from_vec(arg.to_vec()));
    let _ = Cli::try_parse_from(std::iter::once(OsString::from("netwatch")).chain(args));
}
