//! `netwatch audit`: one record per connection endpoint, with owners, bytes
//! and namespaces, complete under churn; its output file and its errors.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use crate::peer::{peer_program, Peer};
use crate::support::{json_lines, Watch};

/// The `conn` records of connections to `port`, split into (out, in).
fn conn_records(records: &[Value], port: u16) -> (Vec<&Value>, Vec<&Value>) {
    let conns = records.iter().filter(|r| r["type"] == "conn");
    let outgoing = conns
        .clone()
        .filter(|r| r["direction"] == "out" && r["remote_port"] == port)
        .collect();
    let incoming = conns
        .filter(|r| r["direction"] == "in" && r["local_port"] == port)
        .collect();
    (outgoing, incoming)
}

fn own_netns() -> u64 {
    let link = std::fs::read_link("/proc/self/ns/net").expect("own namespace");
    let link = link.to_string_lossy();
    link["net:[".len()..link.len() - 1].parse().expect("inode")
}

#[test]
fn each_connection_gives_an_out_and_an_in_record_with_its_bytes() {
    let mut peer = Peer::spawn();
    let mut audit = Watch::spawn(&["audit"]);
    let port = peer.send("exchange 20 3000")[0] as u16;
    audit.wait_until(|records| {
        let (outgoing, incoming) = conn_records(records, port);
        outgoing.len() + incoming.len() >= 40
    });
    let stopped = audit.stop_with(libc::SIGTERM);
    assert!(stopped.success, "{}", stopped.stderr);
    let (outgoing, incoming) = conn_records(&stopped.records, port);
    assert_eq!((outgoing.len(), incoming.len()), (20, 20));
    let pid = u64::from(peer.pid());
    for (records, sent, received) in [(&outgoing, 3000, 1500), (&incoming, 1500, 3000)] {
        for record in records {
            assert_eq!(record["schema"], 2);
            assert_eq!(record["pid"], pid, "{record}");
            assert_eq!(record["owner_changed"], false, "{record}");
            assert_eq!(record["program"], peer_program());
            assert_eq!(record["uid"], 0);
            assert_eq!(record["netns"], own_netns());
            assert_eq!(record["proto"], "tcp");
            assert_eq!(record["bytes_sent"], sent, "{record}");
            assert_eq!(record["bytes_received"], received, "{record}");
            let start = humantime::parse_rfc3339(record["start"].as_str().unwrap()).unwrap();
            let end = humantime::parse_rfc3339(record["end"].as_str().unwrap()).unwrap();
            assert!(start <= end);
            assert!(record["duration_ms"].as_f64().unwrap() >= 0.0);
        }
    }
    // The client closes first; the server closes from CLOSE_WAIT.
    assert!(outgoing.iter().all(|r| r["last_state"] == "FIN_WAIT2"));
    assert!(incoming.iter().all(|r| r["last_state"] == "LAST_ACK"));
    let listen: Vec<&Value> = stopped
        .records
        .iter()
        .filter(|r| r["type"] == "listen" && r["local_port"] == port)
        .collect();
    assert_eq!(listen.len(), 1, "the listener opened (still open at exit)");
    assert_eq!(listen[0]["event"], "open");
    assert_eq!(listen[0]["pid"], pid);
}

/// Checks that each record of `records` (`count` of each direction, on
/// connections to `port`) has the bytes of an `interleave` of `bytes`.
fn assert_interleaved_bytes(records: &[Value], port: u16, count: usize, bytes: u64) {
    let (outgoing, incoming) = conn_records(records, port);
    assert_eq!((outgoing.len(), incoming.len()), (count, count));
    for (records, sent, received) in [(&outgoing, bytes, bytes / 2), (&incoming, bytes / 2, bytes)]
    {
        for record in records {
            assert_eq!(
                (&record["bytes_sent"], &record["bytes_received"]),
                (&Value::from(sent), &Value::from(received)),
                "{record}"
            );
        }
    }
}

/// Runs the peer's `command` of `connections` (an interleave of 3000
/// bytes) under audit until `done` holds for its records and the
/// listener's port, then stops audit; checks every record's bytes and
/// returns the records and the port.
fn interleave_under_audit(
    command: &str,
    connections: usize,
    done: impl Fn(&[Value], u16) -> bool,
) -> (Vec<Value>, u16) {
    let mut peer = Peer::spawn();
    let mut audit = Watch::spawn(&["audit"]);
    let port = peer.send(&format!("{command} {connections} 3000"))[0] as u16;
    audit.wait_until(|records| done(records, port));
    let stopped = audit.stop_with(libc::SIGTERM);
    assert!(stopped.success, "{}", stopped.stderr);
    assert_interleaved_bytes(&stopped.records, port, connections, 3000);
    (stopped.records, port)
}

#[test]
fn bytes_counted_on_every_cpu_across_more_sockets_than_cache_slots_stay_each_sockets_own() {
    const CONNECTIONS: usize = 100;
    interleave_under_audit("interleave", CONNECTIONS, |records, port| {
        let (outgoing, incoming) = conn_records(records, port);
        outgoing.len() + incoming.len() >= 2 * CONNECTIONS
    });
}

#[test]
fn connections_open_at_exit_carry_the_bytes_counted_on_every_cpu() {
    let (records, port) = interleave_under_audit("interleave-open", 10, |records, port| {
        records
            .iter()
            .any(|r| r["type"] == "listen" && r["local_port"] == port)
    });
    let (outgoing, incoming) = conn_records(&records, port);
    assert!(outgoing.iter().chain(&incoming).all(|r| r["end"].is_null()));
}

#[test]
fn churn_gives_exactly_one_record_per_endpoint() {
    const PER_PEER: usize = 5000;
    let mut audit = Watch::spawn(&["audit"]);
    let churners: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(|| {
                let mut peer = Peer::spawn();
                peer.send(&format!("burst {PER_PEER}"))[0] as u16
            })
        })
        .collect();
    let ports: Vec<u16> = churners.into_iter().map(|c| c.join().unwrap()).collect();
    let complete = |records: &[Value]| {
        ports.iter().all(|&port| {
            let (outgoing, incoming) = conn_records(records, port);
            outgoing.len() + incoming.len() >= 2 * PER_PEER
        })
    };
    // Servers close last, when the client's FIN has arrived; give retransmits time.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !complete(&audit.seen) && std::time::Instant::now() < deadline {
        audit.collect_until(|_| false, Duration::from_millis(500));
    }
    let stopped = audit.stop_with(libc::SIGTERM);
    for port in ports {
        let (outgoing, incoming) = conn_records(&stopped.records, port);
        let closed = |records: &[&Value]| records.iter().filter(|r| !r["end"].is_null()).count();
        assert_eq!(
            (closed(&outgoing), closed(&incoming)),
            (PER_PEER, PER_PEER),
            "one closed record per endpoint; stderr: {}",
            stopped.stderr
        );
        let mut endpoints = HashMap::new();
        for record in outgoing.iter().chain(&incoming) {
            // Ports are reused across the run: the start time tells connections apart.
            let key = (
                record["direction"].to_string(),
                record["local_port"].as_u64(),
                record["remote_port"].as_u64(),
                record["start"].to_string(),
            );
            *endpoints.entry(key).or_insert(0) += 1;
        }
        assert_eq!(endpoints.len(), 2 * PER_PEER, "no endpoint recorded twice");
    }
    assert!(
        !stopped.records.iter().any(|r| r["type"] == "lost"),
        "no loss reported"
    );
}

#[test]
fn connections_open_at_exit_get_a_record_without_end() {
    let mut peer = Peer::spawn();
    let (listener, port) = peer.listen("127.0.0.1:0");
    let target = format!("127.0.0.1:{port}");
    let (_, before_port) = peer.connect(&target);
    peer.accept(listener);
    let mut audit = Watch::spawn(&["audit"]);
    let (_, after_port) = peer.connect(&target);
    peer.accept(listener);
    audit.wait_until(|records| {
        records
            .iter()
            .any(|r| r["type"] == "listen" && r["local_port"] == port)
    });
    std::thread::sleep(Duration::from_millis(300));
    let stopped = audit.stop_with(libc::SIGTERM);
    let open: Vec<&Value> = stopped
        .records
        .iter()
        .filter(|r| r["type"] == "conn" && r["end"].is_null())
        .collect();
    let find = |local: u16, remote: u16| {
        open.iter()
            .find(|r| r["local_port"] == local && r["remote_port"] == remote)
            .unwrap_or_else(|| panic!("no open record {local} -> {remote}: {open:#?}"))
    };
    let before = find(before_port, port);
    assert_eq!(before["direction"], "unknown");
    assert!(before["start"].is_null(), "opened before audit started");
    assert!(before["bytes_sent"].is_null());
    assert_eq!(before["last_state"], "ESTABLISHED");
    assert_eq!(before["pid"], u64::from(peer.pid()));
    let after = find(after_port, port);
    assert_eq!(after["direction"], "out");
    assert!(after["start"].is_string());
    assert_eq!(after["bytes_sent"], 0);
    assert_eq!(find(port, after_port)["direction"], "in");
    assert_eq!(find(port, before_port)["direction"], "unknown");
}

#[test]
fn sockets_in_another_network_namespace_carry_its_inode() {
    let mut peer = Peer::spawn();
    let mut audit = Watch::spawn(&["audit"]);
    let netns = u64::from(peer.send("unshare-net")[0]);
    assert_ne!(netns, own_netns());
    let port = peer.send("exchange 3 100")[0] as u16;
    audit.wait_until(|records| {
        let (outgoing, incoming) = conn_records(records, port);
        outgoing.len() + incoming.len() >= 6
    });
    let stopped = audit.stop_with(libc::SIGTERM);
    let (outgoing, incoming) = conn_records(&stopped.records, port);
    for record in outgoing.iter().chain(&incoming) {
        assert_eq!(record["netns"], netns, "{record}");
        assert_eq!(record["pid"], u64::from(peer.pid()), "{record}");
    }
}

#[test]
fn sighup_reopens_the_output_file() {
    let dir = std::env::temp_dir().join(format!("netwatch-audit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (path, rotated) = (dir.join("audit.log"), dir.join("audit.log.1"));
    let mut peer = Peer::spawn();
    let mut audit = Watch::spawn(&["audit", "--output", path.to_str().unwrap()]);
    let first = peer.send("exchange 1 10")[0] as u16;
    wait_for(
        || written(&path, first) == 2,
        "the first records are flushed within 1 s",
    );
    std::fs::rename(&path, &rotated).unwrap();
    // SAFETY: signals the netwatch child.
    unsafe { libc::kill(audit.pid() as i32, libc::SIGHUP) };
    audit.wait_for_stderr("reopened");
    let second = peer.send("exchange 1 10")[0] as u16;
    wait_for(
        || written(&path, second) == 2,
        "the second records go to the new file",
    );
    let stopped = audit.stop_with(libc::SIGTERM);
    assert!(stopped.success, "{}", stopped.stderr);
    assert_eq!(written(&rotated, first), 2);
    assert_eq!(written(&rotated, second), 0);
    assert_eq!(written(&path, first), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sighup_with_the_log_directory_gone_keeps_audit_running() {
    let dir = std::env::temp_dir().join(format!("netwatch-audit-gone-{}", std::process::id()));
    let moved = dir.with_extension("moved");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("audit.log");
    let mut peer = Peer::spawn();
    let mut audit = Watch::spawn(&["audit", "--output", path.to_str().unwrap()]);
    // An operator moves the whole directory away, then logrotate signals.
    std::fs::rename(&dir, &moved).unwrap();
    // SAFETY: signals the netwatch child.
    unsafe { libc::kill(audit.pid() as i32, libc::SIGHUP) };
    audit.wait_for_stderr("records keep going to the file already open");
    let kept = peer.send("exchange 1 10")[0] as u16;
    let old_file = moved.join("audit.log");
    wait_for(
        || written(&old_file, kept) == 2,
        "records go on to the file already open",
    );
    // The directory is back: the retry (1 s after the failure) reopens the path.
    std::fs::create_dir_all(&dir).unwrap();
    audit.wait_for_stderr("reopened");
    let later = peer.send("exchange 1 10")[0] as u16;
    wait_for(|| written(&path, later) == 2, "then to the path again");
    let stopped = audit.stop_with(libc::SIGTERM);
    assert!(stopped.success, "{}", stopped.stderr);
    assert!(
        stopped.stderr.contains("netwatch: ran "),
        "{}",
        stopped.stderr
    );
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&moved).unwrap();
}

/// How many conn records of connections to `port` the file at `path` holds.
fn written(path: &std::path::Path, port: u16) -> usize {
    let records = json_lines(&std::fs::read(path).unwrap_or_default());
    let (outgoing, incoming) = conn_records(&records, port);
    outgoing.len() + incoming.len()
}

/// Polls `done` for up to 1.5 s: records must be flushed within 1 s.
fn wait_for(done: impl Fn() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_millis(1500);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_closed_pipe_is_an_error_for_audit() {
    let (status, stderr) = crate::support::run_with_closed_stdout(&["audit"]);
    assert!(!status.success(), "records would be lost: {stderr}");
    assert_eq!(stderr.matches("Broken pipe").count(), 1, "{stderr}");
}

/// A 64 KiB tmpfs mounted for one test, unmounted when dropped.
struct SmallFilesystem(std::path::PathBuf);

impl SmallFilesystem {
    fn mount() -> SmallFilesystem {
        let dir = std::env::temp_dir().join(format!("netwatch-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(&dir)
            .status()
            .expect("mount runs");
        assert!(status.success(), "tests run as root and can mount a tmpfs");
        SmallFilesystem(dir)
    }

    /// Gives it room for what audit records of every test running beside
    /// this one (a burst test alone makes megabytes of records).
    fn grow(&self) {
        let status = std::process::Command::new("mount")
            .args(["-o", "remount,size=256m"])
            .arg(&self.0)
            .status()
            .expect("mount runs");
        assert!(status.success(), "a tmpfs can be remounted larger");
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_disk_stops_audit_with_one_sentence_and_a_restart_keeps_lines_whole() {
    let disk = SmallFilesystem::mount();
    let filler = disk.0.join("filler");
    // Leaves about one page free: the records soon fill it, mid-record.
    std::fs::write(&filler, vec![0u8; 60 * 1024]).expect("fills the disk");
    let log = disk.0.join("audit.log");
    let log_arg = log.to_str().expect("a UTF-8 path");
    let mut peer = Peer::spawn();
    let audit = Watch::spawn(&["audit", "--output", log_arg]);
    peer.send("exchange 50 10");
    let stopped = audit.wait_exit(Duration::from_secs(20));
    assert!(!stopped.success);
    assert_eq!(
        stopped.stderr.matches("No space left on device").count(),
        1,
        "{}",
        stopped.stderr
    );
    assert!(
        stopped
            .stderr
            .contains(&format!("writing to {log_arg} failed")),
        "the message names the file: {}",
        stopped.stderr
    );
    assert!(
        stopped.stderr.contains("netwatch: ran "),
        "the summary still goes to stderr: {}",
        stopped.stderr
    );
    let cut = std::fs::read_to_string(&log).expect("the log");
    assert!(!cut.ends_with('\n'), "the disk filled mid-record");
    // Space again; audit starts on the same file.
    std::fs::remove_file(&filler).expect("frees the disk");
    disk.grow();
    let audit = Watch::spawn(&["audit", "--output", log_arg]);
    peer.send("exchange 5 10");
    let stopped = audit.stop_with(libc::SIGTERM);
    assert!(stopped.success, "{}", stopped.stderr);
    let text = std::fs::read_to_string(&log).expect("the log");
    assert!(
        text.starts_with(&format!("{cut}\n")),
        "a newline ends the cut record before the next one"
    );
    let lines: Vec<&str> = text.lines().collect();
    let cut_lines = cut.lines().count();
    assert!(lines.len() > cut_lines, "the restart wrote records");
    for line in &lines[cut_lines..] {
        serde_json::from_str::<Value>(line).unwrap_or_else(|err| panic!("{err}: {line}"));
    }
    let last: Value = serde_json::from_str(lines[lines.len() - 1]).expect("JSON");
    assert_eq!(last["type"], "summary", "the run's summary ends it: {last}");
    assert!(last["transitions"].as_u64() > Some(0), "{last}");
}

#[test]
fn the_baseline_covers_other_network_namespaces() {
    let mut peer = Peer::spawn();
    let netns = u64::from(peer.send("unshare-net")[0]);
    let (listener, port) = peer.listen("127.0.0.1:0");
    let (_, client_port) = peer.connect(&format!("127.0.0.1:{port}"));
    peer.accept(listener);
    let audit = Watch::spawn(&["audit"]);
    let stopped = audit.stop_with(libc::SIGTERM);
    assert!(stopped.success, "{}", stopped.stderr);
    let pid = u64::from(peer.pid());
    let of_peer = |r: &&Value| r["netns"] == netns && r["pid"] == pid;
    let listen: Vec<&Value> = stopped
        .records
        .iter()
        .filter(|r| r["type"] == "listen" && r["local_port"] == port)
        .filter(of_peer)
        .collect();
    assert_eq!(listen.len(), 1, "{:#?}", stopped.records);
    assert!(
        listen[0]["start"].is_null(),
        "listening before audit started"
    );
    let open: Vec<&Value> = stopped
        .records
        .iter()
        .filter(|r| r["type"] == "conn" && r["end"].is_null())
        .filter(of_peer)
        .collect();
    let ends: Vec<(u64, u64)> = open
        .iter()
        .map(|r| {
            (
                r["local_port"].as_u64().unwrap(),
                r["remote_port"].as_u64().unwrap(),
            )
        })
        .collect();
    let (port, client_port) = (u64::from(port), u64::from(client_port));
    assert!(ends.contains(&(client_port, port)), "{open:#?}");
    assert!(ends.contains(&(port, client_port)), "{open:#?}");
    assert!(open
        .iter()
        .all(|r| r["direction"] == "unknown" && r["uid"] == 0));
}

#[test]
fn once_attached_audit_keeps_only_the_capabilities_it_still_uses() {
    let audit = Watch::spawn(&["audit"]);
    // Capabilities are per thread: the thread that reads process images
    // drops them too.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", audit.pid()))
        .expect("audit's threads are listed");
    let threads: Vec<String> = tasks
        .map(|task| {
            let status = task.expect("a thread").path().join("status");
            std::fs::read_to_string(status).expect("a thread's status is readable")
        })
        .collect();
    assert!(
        threads
            .iter()
            .any(|status| status.contains("netwatch-images")),
        "the image reader runs: {threads:?}"
    );
    for status in &threads {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_else(|| panic!("{name} in {status}"))
                .to_owned()
        };
        // CAP_DAC_READ_SEARCH (2), CAP_SYS_PTRACE (19), CAP_PERFMON (38), CAP_BPF (39).
        let kept = (1u64 << 2) | (1 << 19) | (1 << 38) | (1 << 39);
        for set in ["CapEff:", "CapPrm:"] {
            assert_eq!(
                u64::from_str_radix(&field(set), 16),
                Ok(kept),
                "{set} {status}"
            );
        }
        assert_eq!(field("CapInh:"), "0000000000000000");
        assert_eq!(field("CapAmb:"), "0000000000000000");
        assert_eq!(field("NoNewPrivs:"), "1");
    }
}
