//! `netwatch` / `netwatch watch`: the live stream of TCP state transitions,
//! as text lines with tcpstates' columns or JSON lines.

use std::time::SystemTime;

use netwatch_common::ByteCounts;

use crate::cli::WatchArgs;
use crate::engine::monitor::{self, Config, Notice, Observer, Summary, WallClock};
use crate::engine::table::{Observed, SocketTable};
use crate::model::{OwnerChange, Transition};
use crate::output::{self, CgroupFields, SocketRecord, StreamRecord, Timestamp, TupleFields};
use crate::sink::Sink;
use crate::snapshot::{Snapshot, SnapshotEntry};

/// Streams until SIGINT or SIGTERM, then prints a summary on stderr (and,
/// in JSON, as the last record).
pub fn run(args: WatchArgs) -> anyhow::Result<()> {
    // JSON records carry the owner's cgroup; filters need it.
    let config = Config {
        process_images: args.cmdline || args.json || args.cgroups.any(),
        ..Config::new(&args.probe, false, None)
    };
    monitor::run(config, Stream { args }, Sink::stdout())?;
    Ok(())
}

/// Renders transitions that pass the filters.
struct Stream {
    args: WatchArgs,
}

impl Observer for Stream {
    fn baseline(&mut self, snapshot: &Snapshot, table: &SocketTable, out: &mut Vec<u8>) {
        if !self.args.json {
            out.extend_from_slice(output::STREAM_HEADER.as_bytes());
            if self.args.cmdline {
                out.extend_from_slice(b"  CMDLINE");
            }
            out.push(b'\n');
        }
        if !self.args.baseline {
            return;
        }
        let ts = output::rfc3339(SystemTime::now());
        // netwatch's own namespace, as netstat shows it.
        let mut shown: Vec<SnapshotEntry> = snapshot
            .entries
            .iter()
            .filter(|entry| entry.socket.netns.is_none())
            .filter(|entry| {
                let pid = entry.owner.as_ref().map(|owner| owner.pid);
                let states = [entry.socket.state];
                self.args
                    .filters
                    .matches(&entry.socket.tuple(), pid, &states)
            })
            .cloned()
            .collect();
        // The table read them for its owners (see `run`).
        for owner in shown.iter_mut().filter_map(|entry| entry.owner.as_mut()) {
            owner.image = table.image_of(owner.pid);
        }
        shown.retain(|entry| self.args.cgroups.matches(entry.owner.as_ref()));
        for entry in &shown {
            // Writing to a Vec cannot fail.
            let _ = if self.args.json {
                let record = StreamRecord::Baseline {
                    ts: ts.clone(),
                    socket: SocketRecord::new(entry, self.args.cmdline),
                    cgroup: CgroupFields::of(entry.owner.as_ref()),
                };
                output::write_json_line(out, &record)
            } else {
                output::write_baseline_text(out, &ts, entry)
            };
            if self.args.cmdline && !self.args.json {
                output::append_cmdline(out, entry.owner.as_ref());
            }
        }
    }

    fn transition(
        &mut self,
        t: &Transition,
        observed: Observed,
        clock: &WallClock,
        out: &mut Vec<u8>,
    ) {
        let owner = observed.owner.as_ref();
        let pid = owner.map(|owner| owner.pid);
        if !self.args.filters.matches(&t.tuple, pid, &[t.old, t.new])
            || !self.args.cgroups.matches(owner)
        {
            return;
        }
        let ts = Timestamp(clock.at(t.ts_ns));
        let ms = observed.ms_in_old_state;
        let _ = if self.args.json {
            output::write_json_line(
                out,
                &StreamRecord::State {
                    ts,
                    pid,
                    program: owner.map(|owner| &*owner.program),
                    tuple: TupleFields::of(&t.tuple),
                    old_state: t.old.name(),
                    new_state: t.new.name(),
                    ms,
                    cmdline: output::cmdline_field(owner, self.args.cmdline),
                    cgroup: CgroupFields::of(owner),
                },
            )
        } else {
            output::write_state_text(out, &ts.to_string(), owner, &t.tuple, t.old, t.new, ms)
        };
        if self.args.cmdline && !self.args.json {
            output::append_cmdline(out, owner);
        }
    }

    fn owner_changed(
        &mut self,
        ts_ns: u64,
        change: &OwnerChange,
        clock: &WallClock,
        out: &mut Vec<u8>,
    ) {
        // --pid matches the new owner or the old one.
        let pids = [Some(change.new.pid), change.old.as_ref().map(|old| old.pid)];
        let filters = &self.args.filters;
        let owners = [Some(&change.new), change.old.as_ref()];
        if !pids
            .into_iter()
            .any(|pid| filters.matches(&change.tuple, pid, &[change.state]))
            || !owners
                .into_iter()
                .any(|owner| self.args.cgroups.matches(owner))
        {
            return;
        }
        let ts = Timestamp(clock.at(ts_ns));
        let _ = if self.args.json {
            let old = change.old.as_ref();
            output::write_json_line(
                out,
                &StreamRecord::Owner {
                    ts,
                    tuple: TupleFields::of(&change.tuple),
                    state: change.state.name(),
                    cause: change.cause.name(),
                    old_pid: old.map(|old| old.pid),
                    old_program: old.map(|old| &*old.program),
                    pid: change.new.pid,
                    program: &change.new.program,
                    cmdline: output::cmdline_field(Some(&change.new), self.args.cmdline),
                    cgroup: CgroupFields::of(Some(&change.new)),
                },
            )
        } else {
            output::write_owner_text(out, &ts.to_string(), change)
        };
        if self.args.cmdline && !self.args.json {
            output::append_cmdline(out, Some(&change.new));
        }
    }

    fn notice(&mut self, notice: Notice<'_>, out: &mut Vec<u8>) {
        if !self.args.json {
            return;
        }
        let ts = output::rfc3339(SystemTime::now());
        let record = match notice {
            Notice::Lost { count, cause } => StreamRecord::Lost { ts, count, cause },
            Notice::Failed { what, message } => StreamRecord::Failure {
                ts,
                what: what.name(),
                message,
            },
            Notice::Resynced { sockets } => StreamRecord::Resync { ts, sockets },
        };
        let _ = output::write_json_line(out, &record);
    }

    fn stopped(
        &mut self,
        _table: &SocketTable,
        _bytes: &dyn Fn(u64) -> Option<ByteCounts>,
        _clock: &WallClock,
        summary: &Summary,
        out: &mut Vec<u8>,
    ) {
        if self.args.json {
            let ts = output::rfc3339(SystemTime::now());
            let record = StreamRecord::Summary {
                ts,
                counts: summary,
            };
            let _ = output::write_json_line(out, &record);
        }
    }
}
