//! `netwatch` / `netwatch watch`: the live stream of TCP state transitions,
//! as text lines with tcpstates' columns or JSON lines.

use std::time::SystemTime;

use crate::cli::WatchArgs;
use crate::engine::clock::WallClock;
use crate::engine::monitor::{self, Config, End, Notice, Observer};
use crate::engine::table::{Observed, SocketTable};
use crate::model::{OwnerChange, Transition};
use crate::output::{
    self, CgroupFields, JsonRecord, SocketRecord, StateRecord, StreamWriter, Timestamp, SCHEMA,
};
use crate::sink::{RecordKind, Records, Sink};
use crate::snapshot::{Snapshot, SnapshotEntry};

/// Streams until SIGINT or SIGTERM, then prints a summary on stderr (and,
/// in JSON, as the last record).
pub fn run(args: WatchArgs) -> anyhow::Result<()> {
    // JSON records carry the owner's cgroup; filters need it.
    let config = Config {
        process_images: args.cmdline || args.json || args.cgroups.any(),
        ..Config::new(&args.probe, false, None)
    };
    monitor::run(config, Stream::new(args), Sink::stdout())?;
    Ok(())
}

/// Renders transitions that pass the filters.
struct Stream {
    args: WatchArgs,
    writer: StreamWriter,
}

impl Stream {
    fn new(args: WatchArgs) -> Stream {
        let writer = StreamWriter::new(args.json, args.cmdline);
        Stream { args, writer }
    }
}

impl Observer for Stream {
    fn baseline(&mut self, snapshot: &Snapshot, table: &SocketTable, out: &mut Records) {
        if !self.args.json {
            out.push(RecordKind::Header, |out| {
                out.extend_from_slice(output::STREAM_HEADER.as_bytes());
                if self.args.cmdline {
                    out.extend_from_slice(b"  CMDLINE");
                }
                out.push(b'\n');
            });
        }
        if !self.args.baseline {
            return;
        }
        let now = Timestamp(SystemTime::now());
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
        let text_ts = now.to_string();
        for entry in &shown {
            out.push(RecordKind::Baseline, |out| {
                // Writing to a Vec cannot fail.
                let _ = if self.args.json {
                    let record = JsonRecord::Baseline {
                        schema: SCHEMA,
                        ts: now,
                        socket: SocketRecord::new(entry, self.args.cmdline),
                        cgroup: CgroupFields::of(entry.owner.as_ref()),
                    };
                    output::write_json_line(out, &record)
                } else {
                    output::write_baseline_text(out, &text_ts, entry)
                };
                if self.args.cmdline && !self.args.json {
                    output::append_cmdline(out, entry.owner.as_ref());
                }
            });
        }
    }

    fn transition(
        &mut self,
        t: &Transition,
        seen: &Observed,
        clock: &WallClock,
        out: &mut Records,
    ) {
        let owner = seen.owner.as_ref();
        let pid = owner.map(|owner| owner.pid);
        if !self.args.filters.matches(&t.tuple, pid, &[t.old, t.new])
            || !self.args.cgroups.matches(owner)
        {
            return;
        }
        let record = StateRecord {
            ts: clock.at(t.ts_ns),
            owner,
            tuple: &t.tuple,
            old: t.old,
            new: t.new,
            ms: seen.ms_in_old_state,
        };
        out.push(RecordKind::State, |out| self.writer.state(out, &record));
    }

    fn owner_changed(
        &mut self,
        ts_ns: u64,
        change: &OwnerChange,
        clock: &WallClock,
        out: &mut Records,
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
        out.push(RecordKind::Owner, |out| {
            self.writer.owner(out, clock.at(ts_ns), change);
        });
    }

    fn notice(&mut self, notice: &Notice, out: &mut Records) {
        if self.args.json {
            output::write_notice(out, notice);
        }
    }

    fn stopped(&mut self, end: &End<'_>, out: &mut Records) {
        if self.args.json {
            output::write_summary(out, end.summary);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use clap::Parser as _;

    use super::*;
    use crate::cli::Cli;
    use crate::model::ProcessImage;
    use crate::model::{OwnerCause, TcpState};
    use crate::output::fixtures::{
        assert_golden, connection, image, json_lines, owners, stream_without_allocating, task,
        tuples, MS, STAMPS,
    };

    /// The stream's observer with these flags.
    fn stream(flags: &[&str]) -> Stream {
        let args = Cli::try_parse_from(std::iter::once("netwatch").chain(flags.iter().copied()))
            .expect("valid flags")
            .watch;
        Stream::new(args)
    }

    /// Everything the stream writes for the golden cases with `flags`.
    fn render(flags: &[&str]) -> Vec<u8> {
        let mut stream = stream(flags);
        let clock =
            WallClock::anchored(SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_000_000));
        let mut out = Records::default();
        let (owners, tuples) = (owners(), tuples());
        let states = TcpState::ALL;
        let mut case = 0usize;
        for (i, tuple) in tuples.iter().enumerate() {
            for (j, owner) in owners.iter().enumerate() {
                case += 1;
                let states = (
                    states[case % states.len()],
                    states[(case + i + j + 1) % states.len()],
                );
                let task = task(1, 0, b"");
                let t = Transition::scripted(
                    STAMPS[case % STAMPS.len()],
                    case as u64,
                    *tuple,
                    states,
                    task,
                );
                let observed = Observed {
                    owner: owner.clone(),
                    ms_in_old_state: MS[case % MS.len()],
                    closed: None,
                    replaced: None,
                };
                stream.transition(&t, &observed, &clock, &mut out);
            }
        }
        for (k, new) in owners.iter().flatten().enumerate() {
            let change = OwnerChange {
                skaddr: k as u64,
                tuple: tuples[k % tuples.len()],
                state: TcpState::ALL[k],
                old: owners[(k + 2) % owners.len()].clone(),
                new: new.clone(),
                cause: OwnerCause::ALL[k % OwnerCause::ALL.len()],
            };
            stream.owner_changed(STAMPS[k % STAMPS.len()], &change, &clock, &mut out);
        }
        out.bytes().to_vec()
    }

    /// The exact bytes of every state and owner record, in each output
    /// form: what a faster writer must reproduce.
    #[test]
    fn stream_records_keep_their_exact_bytes() {
        for (flags, file) in [
            (&["--json"][..], "stream.jsonl"),
            (&["--json", "--cmdline"], "stream-cmdline.jsonl"),
            (&[], "stream.txt"),
            (&["--cmdline"], "stream-cmdline.txt"),
        ] {
            assert_golden(file, &render(flags));
        }
    }

    /// Once the table, the processes and the buffers are warm, streaming a
    /// transition allocates nothing, in JSON (with and without the command
    /// line) and in text, across second boundaries.
    #[test]
    fn streaming_allocates_nothing_per_event() {
        for flags in [&["--json"][..], &["--json", "--cmdline"], &[]] {
            let (events, written) = stream_without_allocating(stream(flags), &format!("{flags:?}"));
            assert!(
                written > events * 120,
                "{flags:?}: {written} bytes for {events} events"
            );
        }
    }

    /// The records of a process whose image is being read wait for it, in
    /// order, and the records after them too; they go out once it arrives.
    #[test]
    fn records_wait_in_order_for_the_image_being_read() {
        use crate::engine::monitor::scripted::{ScriptedMonitor, ScriptedSource};
        static GATE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        fn gated(pid: u32, _: Option<u64>, _: Option<u64>) -> ProcessImage {
            drop(GATE.lock());
            image(Some(&[format!("run {pid}").as_bytes()]), None)
        }
        let gate = GATE.lock().expect("the gate");
        let mut source = ScriptedSource::default();
        let mut monitor = ScriptedMonitor::start(stream(&["--json", "--cmdline"]), &mut source);
        monitor.read_images_on_a_worker(gated, Duration::from_secs(60));
        let mut ts_ns = 1_000_000_000;
        source.waiting = connection(0, &mut ts_ns);
        monitor.drain(&mut source);
        assert!(
            monitor.written().is_empty(),
            "written before the image came"
        );
        drop(gate);
        monitor.settle();
        let records = json_lines(monitor.written().bytes());
        assert_eq!(records.len(), 11);
        let stamps: Vec<&str> = records.iter().filter_map(|r| r["ts"].as_str()).collect();
        assert!(stamps.is_sorted(), "{stamps:?}");
        assert_eq!(records[0]["pid"], 100);
        assert_eq!(records[0]["cmdline"], serde_json::json!(["run 100"]));
        let change = records
            .iter()
            .find(|r| r["type"] == "owner")
            .expect("the owner change");
        assert_eq!(change["cmdline"], serde_json::json!(["run 201"]));
    }

    /// A read that does not end (a process stuck with its memory locked)
    /// holds the records back only so long; they say the image is unknown.
    #[test]
    fn records_go_out_without_an_image_that_takes_too_long() {
        use crate::engine::monitor::scripted::{ScriptedMonitor, ScriptedSource};
        static GATE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        fn stuck(_: u32, _: Option<u64>, _: Option<u64>) -> ProcessImage {
            drop(GATE.lock());
            ProcessImage::default()
        }
        let gate = GATE.lock().expect("the gate");
        let mut source = ScriptedSource::default();
        let mut monitor = ScriptedMonitor::start(stream(&["--json", "--cmdline"]), &mut source);
        monitor.read_images_on_a_worker(stuck, Duration::from_millis(50));
        let mut ts_ns = 1_000_000_000;
        source.waiting = connection(0, &mut ts_ns);
        monitor.drain(&mut source);
        assert!(
            monitor.written().is_empty(),
            "written before the wait ended"
        );
        monitor.settle();
        let records = json_lines(monitor.written().bytes());
        assert_eq!(records.len(), 11);
        assert_eq!(records[0]["pid"], 100);
        assert_eq!(records[0]["cmdline"], serde_json::Value::Null);
        drop(gate);
    }

    /// A step of the host's wall clock (NTP setting it an hour back) shows
    /// in the records of the next batch, not only in a restarted netwatch.
    #[test]
    fn a_step_of_the_host_clock_shows_in_the_next_batch() {
        use crate::engine::clock::tests::fake;
        use crate::engine::monitor::scripted::{ScriptedMonitor, ScriptedSource};
        fake::set_wall(1_764_000_000);
        let mut source = ScriptedSource::default();
        let mut monitor = ScriptedMonitor::start(stream(&["--json"]), &mut source);
        monitor.set_clock(fake::clocks);
        let mut ts_ns = fake::MONOTONIC_NOW_NS;
        let first_ts = |monitor: &mut ScriptedMonitor<Stream>, source: &mut ScriptedSource| {
            monitor.written().clear();
            monitor.drain(source);
            let text = String::from_utf8(monitor.written().bytes().to_vec()).expect("UTF-8");
            let first: serde_json::Value =
                serde_json::from_str(text.lines().next().expect("a record")).expect("JSON");
            first["ts"].as_str().expect("a time").to_owned()
        };
        source.waiting = connection(0, &mut ts_ns);
        assert_eq!(
            first_ts(&mut monitor, &mut source),
            "2025-11-24T16:00:00.000020Z"
        );
        fake::set_wall(1_764_000_000 - 3600);
        source.waiting = connection(1, &mut ts_ns);
        // Ten transitions of 20 µs each later, and an hour back.
        assert_eq!(
            first_ts(&mut monitor, &mut source),
            "2025-11-24T15:00:00.000220Z"
        );
    }
}
