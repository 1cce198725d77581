//! `netwatch` streaming on the real kernel: exact transitions, owners, losses, exit.

use std::process::Command;

use serde_json::Value;

use crate::peer::{peer_program, Peer};
use crate::support::{
    assert_counts_add_up, expect_steps, listener_and_connection, run_netwatch_as_nobody,
    set_fd_limit, snapshot_json, transitions_of, Watch,
};

const CLIENT_STEPS: [&str; 4] = [
    "SYN_SENT->ESTABLISHED",
    "ESTABLISHED->FIN_WAIT1",
    "FIN_WAIT1->FIN_WAIT2",
    "FIN_WAIT2->CLOSE",
];
const SERVER_STEPS: [&str; 5] = [
    "LISTEN->SYN_RECV",
    "SYN_RECV->ESTABLISHED",
    "ESTABLISHED->CLOSE_WAIT",
    "CLOSE_WAIT->LAST_ACK",
    "LAST_ACK->CLOSE",
];

fn has(records: &[Value], local_port: u16, remote_port: u16, new_state: &str) -> bool {
    records.iter().any(|r| {
        r["type"] == "state"
            && r["local_port"] == local_port
            && r["remote_port"] == remote_port
            && r["new_state"] == new_state
    })
}

#[test]
fn client_and_server_transitions_carry_their_owners() {
    for (bind, connect_to) in [("127.0.0.1:0", "127.0.0.1"), ("[::1]:0", "[::1]")] {
        let mut server = Peer::spawn();
        let mut client = Peer::spawn();
        let (listener, port) = server.listen(bind);
        let mut watch = Watch::start(&["--port", &port.to_string()]);
        let (connection, client_port) = client.connect(&format!("{connect_to}:{port}"));
        let (accepted, _) = server.accept(listener);
        client.close(connection);
        server.close(accepted);
        watch.wait_until(|seen| {
            has(seen, client_port, port, "CLOSE") && has(seen, port, client_port, "CLOSE")
        });
        let records = watch.stop().records;

        // connect() binds the port after CLOSE -> SYN_SENT, so that record has local port 0.
        let connect = records
            .iter()
            .find(|r| {
                r["old_state"] == "CLOSE"
                    && r["new_state"] == "SYN_SENT"
                    && r["remote_port"] == port
            })
            .expect("the CLOSE -> SYN_SENT transition");
        assert_eq!(connect["pid"], client.pid());
        assert_eq!(connect["program"], peer_program());
        assert_eq!(
            transitions_of(&records, client_port, port),
            expect_steps(&CLIENT_STEPS, client.pid())
        );
        // The server side runs in softirq context, often on the client's CPU: still the server's.
        assert_eq!(
            transitions_of(&records, port, client_port),
            expect_steps(&SERVER_STEPS, server.pid())
        );
        for record in records.iter().filter(|r| r["type"] == "state") {
            assert_eq!(
                record["proto"],
                if bind.starts_with('[') { "tcp6" } else { "tcp" }
            );
            assert!(
                record["ms"].as_f64().is_some_and(|ms| ms >= 0.0),
                "{record}"
            );
            assert!(
                record["ts"]
                    .as_str()
                    .is_some_and(|ts| ts.ends_with('Z') && ts.len() == 27),
                "{record}"
            );
        }
    }
}

#[test]
fn a_listener_opened_and_closed() {
    let mut server = Peer::spawn();
    let mut watch = Watch::start(&["--pid", &server.pid().to_string()]);
    let (listener, port) = server.listen("127.0.0.1:0");
    server.close(listener);
    watch.wait_until(|seen| has(seen, port, 0, "CLOSE"));
    let records = watch.stop().records;
    assert_eq!(
        transitions_of(&records, port, 0),
        expect_steps(&["CLOSE->LISTEN", "LISTEN->CLOSE"], server.pid())
    );
}

#[test]
fn a_connection_from_before_the_start_keeps_its_owners() {
    let mut server = Peer::spawn();
    let mut client = Peer::spawn();
    let (listener, port) = server.listen("127.0.0.1:0");
    let (connection, client_port) = client.connect(&format!("127.0.0.1:{port}"));
    let (accepted, _) = server.accept(listener);
    let mut watch = Watch::start(&["--baseline", "--port", &port.to_string()]);
    client.close(connection);
    server.close(accepted);
    watch.wait_until(|seen| {
        has(seen, client_port, port, "CLOSE") && has(seen, port, client_port, "CLOSE")
    });
    let records = watch.stop().records;

    let baseline: Vec<Value> = records
        .iter()
        .filter(|r| r["type"] == "baseline")
        .cloned()
        .collect();
    let ours = listener_and_connection(&baseline, port, client_port);
    assert_eq!(ours.len(), 3, "listener and both ends: {baseline:#?}");
    let steps_client = [
        "ESTABLISHED->FIN_WAIT1",
        "FIN_WAIT1->FIN_WAIT2",
        "FIN_WAIT2->CLOSE",
    ];
    let steps_server = [
        "ESTABLISHED->CLOSE_WAIT",
        "CLOSE_WAIT->LAST_ACK",
        "LAST_ACK->CLOSE",
    ];
    assert_eq!(
        transitions_of(&records, client_port, port),
        expect_steps(&steps_client, client.pid())
    );
    assert_eq!(
        transitions_of(&records, port, client_port),
        expect_steps(&steps_server, server.pid())
    );
    let first = records
        .iter()
        .find(|r| r["type"] == "state")
        .expect("a transition");
    assert_eq!(
        first["ms"],
        Value::Null,
        "time spent before netwatch started is unknown"
    );
}

#[test]
fn a_baseline_read_under_churn_joins_every_socket_by_address() {
    let _alone = churn_alone();
    let mut holder = Peer::spawn();
    let port = holder.send("bulk 300")[0] as u16;
    // Two peers churn while netwatch starts and reads its baseline.
    let churning = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let churners: Vec<_> = (0..2)
        .map(|_| {
            let churning = churning.clone();
            std::thread::spawn(move || {
                let mut peer = Peer::spawn();
                while churning.load(std::sync::atomic::Ordering::Relaxed) {
                    peer.send("burst 1000");
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut watch = Watch::start(&["--baseline", "--port", &port.to_string()]);
    churning.store(false, std::sync::atomic::Ordering::Relaxed);
    churners
        .into_iter()
        .for_each(|churner| churner.join().expect("churn finished"));
    assert!(
        watch.started.contains("read in the kernel"),
        "{}",
        watch.started
    );
    // Every held socket closes when its holder dies: 300 connections, both
    // ends, and the listener.
    let holder_pid = u64::from(holder.pid());
    drop(holder);
    let mut closed = 0;
    watch.collect_until(
        |record| {
            closed += usize::from(record["type"] == "state" && record["new_state"] == "CLOSE");
            closed >= 601
        },
        std::time::Duration::from_secs(20),
    );
    let records = watch.stop().records;
    // An earlier test's TIME_WAIT socket may have the port number too.
    let baseline = records
        .iter()
        .filter(|r| r["type"] == "baseline" && r["state"] != "TIME_WAIT")
        .count();
    assert_eq!(
        baseline, 601,
        "the listener and both ends of 300 connections"
    );
    let mut first_seen = std::collections::HashMap::new();
    for record in records.iter().filter(|r| r["type"] == "state") {
        let socket = (record["local_port"].clone(), record["remote_port"].clone());
        first_seen.entry(socket).or_insert(record);
    }
    assert_eq!(first_seen.len(), 601, "each socket changed state");
    for first in first_seen.values() {
        assert_eq!(first["pid"], holder_pid, "the baseline's owner: {first}");
        assert_eq!(first["ms"], Value::Null, "a baseline socket: {first}");
    }
}

/// `recursion_misses` of netwatch's loaded program, read by bpftool.
fn kernel_recursion_misses(pid: u32) -> u64 {
    // Other tests' netwatch processes may have theirs loaded too.
    let programs = xtask::bpf_programs::programs_of(pid);
    let program = programs
        .iter()
        .find(|program| program["name"] == netwatch_common::TRANSITION_PROGRAM)
        .expect("netwatch's program is loaded (bpftool runs: cargo xtask test installs it)");
    program["recursion_misses"].as_u64().unwrap_or(0)
}

/// A count of netwatch's last record, `{"type":"summary", ...}`.
fn summary_count(records: &[Value], field: &str) -> u64 {
    let summary = records
        .iter()
        .rev()
        .find(|record| record["type"] == "summary")
        .expect("a summary record");
    summary[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {summary}"))
}

#[test]
fn losses_are_reported_and_the_table_resyncs() {
    let _alone = churn_alone();
    // 4 KiB holds about 45 events: a burst overflows it.
    let watch = Watch::start(&["--ring-buffer-kib", "4"]);
    let mut churner = Peer::spawn();
    for _ in 0..3 {
        churner.send("burst 2000");
    }
    drop(churner);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let live_before = live_sockets();
    let stopped = watch.stop();
    let live_after = live_sockets();
    assert!(stopped.success);
    let lost: u64 = stopped
        .records
        .iter()
        .filter(|r| r["type"] == "lost" && r["cause"] == "ring_buffer_full")
        .map(|r| r["count"].as_u64().expect("count"))
        .sum();
    assert!(
        lost > 0,
        "a 4 KiB ring buffer lost nothing?\n{}",
        stopped.stderr
    );
    assert_eq!(lost, summary_count(&stopped.records, "ring_buffer_full"));
    // The ring was found full, or nearly (a record did not fit), and never more.
    let peak = summary_count(&stopped.records, "ring_buffer_peak_bytes");
    assert!(
        (2048..=4096).contains(&peak),
        "a full 4 KiB ring held {peak} bytes at most"
    );
    // Each transition counted once: a skipped call whose recovery the full
    // ring refused is lost once, not also as a skip not recovered.
    let delivered = summary_count(&stopped.records, "transitions");
    let all_lost = summary_count(&stopped.records, "lost");
    let fired = summary_count(&stopped.records, "fired");
    assert_eq!(
        delivered + all_lost,
        fired,
        "each transition the kernel fired is delivered or lost, once: {}",
        stopped.stderr
    );
    assert!(
        stopped.stderr.contains("transition(s): ring buffer full"),
        "{}",
        stopped.stderr
    );
    let resyncs: Vec<&Value> = stopped
        .records
        .iter()
        .filter(|r| r["type"] == "resync")
        .collect();
    assert!(!resyncs.is_empty(), "a loss is followed by a resync");
    // After the last resync (at the stop) the table is what /proc says
    // (TIME_WAIT aside, which has no owner). Other tests open and close
    // sockets meanwhile, so it is one of the counts /proc went through
    // around the stop.
    let in_table = summary_count(&stopped.records, "sockets");
    let live = [live_before, live_after];
    let (fewest, most) = (live.iter().flatten().min(), live.iter().flatten().max());
    assert!(
        fewest.is_some_and(|&fewest| fewest <= in_table) && most >= Some(&in_table),
        "{in_table} vs {live:?}: {}",
        stopped.stderr
    );
}

/// Non-TIME_WAIT TCP sockets in /proc, counted by a few snapshots in a row.
fn live_sockets() -> Vec<u64> {
    (0..3)
        .map(|_| {
            let fresh = snapshot_json(&["snapshot", "-tan", "--json"]);
            fresh.iter().filter(|r| r["state"] != "TIME_WAIT").count() as u64
        })
        .collect()
}

/// Serializes the tests whose heavy churn makes the others' global counts
/// move: each holds this while it runs.
fn churn_alone() -> std::sync::MutexGuard<'static, ()> {
    static CHURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    CHURN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Transitions of the connections to `ports`: (CLOSE -> SYN_SENT, -> CLOSE, all).
fn churn_counts(records: &[Value], ports: &[u16]) -> (usize, usize, usize) {
    let on_ports: Vec<&Value> = records
        .iter()
        .filter(|r| r["type"] == "state" && r["new_state"] != "LISTEN")
        .filter(|r| {
            ports
                .iter()
                .any(|&p| r["local_port"] == p || r["remote_port"] == p)
        })
        .collect();
    let opens = on_ports
        .iter()
        .filter(|r| r["old_state"] == "CLOSE" && r["new_state"] == "SYN_SENT")
        .count();
    let closes = on_ports
        .iter()
        .filter(|r| r["new_state"] == "CLOSE")
        .count();
    (opens, closes, on_ports.len())
}

#[test]
fn skipped_calls_are_recovered_or_reported_as_the_kernel_counts_them() {
    let _alone = churn_alone();
    const CONNECTIONS: usize = 5000;
    let mut watch = Watch::start(&[]);
    let mut churners: Vec<Peer> = (0..2).map(|_| Peer::spawn()).collect();
    let ports: Vec<u16> = std::thread::scope(|scope| {
        let bursts: Vec<_> = churners
            .iter_mut()
            .map(|churner| {
                scope.spawn(move || churner.send(&format!("burst {CONNECTIONS}"))[0] as u16)
            })
            .collect();
        bursts
            .into_iter()
            .map(|burst| burst.join().expect("burst"))
            .collect()
    });
    // Each connection: one CLOSE -> SYN_SENT, two -> CLOSE, ten transitions in all.
    let expected = 10 * ports.len() * CONNECTIONS;
    // Retransmitted FINs can close a few connections late: wait for them, up to 10 s.
    let mut counted = churn_counts(&watch.seen, &ports).2;
    watch.collect_until(
        |record| {
            counted += churn_counts(std::slice::from_ref(record), &ports).2;
            counted >= expected
        },
        std::time::Duration::from_secs(10),
    );
    let kernel = kernel_recursion_misses(watch.pid());
    let stopped = watch.stop();
    let (opens, closes, all) = churn_counts(&stopped.records, &ports);
    let skipped = summary_count(&stopped.records, "skipped");
    let recovered = summary_count(&stopped.records, "recovered");
    let refused = summary_count(&stopped.records, "recoveries_refused");
    let unrecovered = summary_count(&stopped.records, "not_recovered");
    let ring_full = summary_count(&stopped.records, "ring_buffer_full");
    eprintln!("skipped calls: kernel {kernel}, netwatch {skipped}, recovered {recovered}, refused by the full ring {refused}; transitions {all} of {expected}");
    assert_eq!(
        skipped, kernel,
        "netwatch counts the calls the kernel skipped"
    );
    // A recovery the full ring buffer refused is a ring buffer loss.
    assert_eq!(unrecovered, skipped - recovered - refused);
    assert!(refused <= ring_full);
    let streamed: u64 = stopped
        .records
        .iter()
        .filter(|r| r["type"] == "lost" && r["cause"] == "recursion")
        .map(|r| r["count"].as_u64().expect("count"))
        .sum();
    assert_eq!(streamed, unrecovered);
    // Every transition the kernel fired (its own count, all sockets) was
    // delivered or reported lost. (The model of 10 per connection is not the
    // reference: a retransmitted FIN can close a connection seconds later.)
    let delivered = summary_count(&stopped.records, "transitions");
    let fired = summary_count(&stopped.records, "fired");
    assert_eq!(
        delivered + unrecovered + ring_full,
        fired,
        "each transition the kernel fired is delivered or reported lost, once: {}",
        stopped.stderr
    );
    if unrecovered + ring_full == 0 {
        // connect() fires CLOSE -> SYN_SENT at once: never late.
        assert_eq!(opens, 2 * CONNECTIONS);
        assert!(
            closes <= 4 * CONNECTIONS && all <= expected,
            "more than was fired: {closes}, {all}"
        );
    }
}

#[test]
fn sigterm_stops_cleanly_and_leaves_nothing_attached() {
    let watch = Watch::start(&[]);
    let netwatch_pid = watch.pid();
    // Its programs, by id (other tests' netwatch processes run meanwhile).
    let held: Vec<String> = std::fs::read_dir(format!("/proc/{netwatch_pid}/fdinfo"))
        .expect("netwatch's fdinfo")
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .filter_map(|info| {
            let id = info.lines().find_map(|l| l.strip_prefix("prog_id:"))?;
            Some(id.trim().to_owned())
        })
        .collect();
    assert!(held.len() >= 2, "netwatch holds its programs: {held:?}");
    let stopped = watch.stop_with(libc::SIGTERM);
    assert!(stopped.success, "{}", stopped.stderr);
    assert!(
        stopped.stderr.contains("netwatch: ran "),
        "a summary: {}",
        stopped.stderr
    );
    // The kernel frees a detached program after a grace period: allow 5 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    for id in held {
        loop {
            let shown = Command::new("bpftool")
                .args(["prog", "show", "id", &id])
                .output()
                .expect("bpftool runs");
            if !shown.status.success() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "program {id} still loaded 5 s after netwatch {netwatch_pid} exited: {}",
                String::from_utf8_lossy(&shown.stdout)
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

#[test]
fn a_closed_stdout_pipe_ends_quietly() {
    let (status, stderr) = crate::support::run_with_closed_stdout(&[]);
    assert!(status.success(), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );
}

#[test]
fn without_root_one_clear_sentence() {
    let output = run_netwatch_as_nobody(&[]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("needs root") && stderr.contains("netwatch snapshot"),
        "{stderr}"
    );
}

/// `netwatch ARGS` run as uid 65534 with exactly `capabilities`
/// (setpriv's names, comma-separated), interrupted after 3 s.
fn run_with_capabilities(capabilities: &str, args: &[&str]) -> std::process::Output {
    let child = crate::support::netwatch_with_capabilities(capabilities)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv runs (util-linux)");
    std::thread::sleep(std::time::Duration::from_secs(3));
    // SAFETY: signals the child this test started and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    child.wait_with_output().expect("netwatch exits")
}

#[test]
fn a_user_with_the_capabilities_streams_without_tracefs_and_one_without_is_told_which_is_missing() {
    // By default no program runs on system calls at all.
    let output = run_with_capabilities("bpf,perfmon,sys_ptrace", &["--json"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("system call"), "{stderr}");
    // tracefs (0700 root here) is closed without CAP_DAC_READ_SEARCH, and
    // the opt-in accept hook then moves to the exit of every system call.
    for (capabilities, tracefs_open) in [
        ("bpf,perfmon,sys_ptrace", false),
        ("bpf,perfmon,dac_read_search", true),
    ] {
        let output = run_with_capabilities(capabilities, &["--json", "--accept-hook"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("watching TCP state transitions"),
            "{capabilities}: {stderr}"
        );
        assert!(
            output.status.success(),
            "{capabilities}: {:?}: {stderr}",
            output.status
        );
        assert_eq!(
            stderr.contains("on the way out of every system call"),
            !tracefs_open,
            "{capabilities}: {stderr}"
        );
    }
    // Without CAP_SYS_PTRACE, audit runs and says what it cannot read.
    let output = run_with_capabilities("bpf,perfmon", &["audit"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("lacks CAP_SYS_PTRACE"), "{stderr}");
    for (capabilities, missing) in [
        ("bpf,sys_ptrace", "lacks CAP_PERFMON"),
        ("perfmon,sys_ptrace", "lacks CAP_BPF"),
        ("sys_ptrace", "needs root (CAP_BPF and CAP_PERFMON)"),
    ] {
        let output = run_with_capabilities(capabilities, &["--json"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{capabilities}: {stderr}");
        assert!(stderr.contains(missing), "{capabilities}: {stderr}");
    }
}

#[test]
fn a_stopped_reader_loses_each_transition_once() {
    let _alone = churn_alone();
    // The reader stops under churn: the ring fills, and calls the kernel
    // skips meanwhile find it full too. Each must count once.
    // 16 KiB holds about 145 events; 20,000 transitions overflow it, and
    // stay light for the tests that run beside this one.
    let watch = Watch::start(&["--ring-buffer-kib", "16"]);
    // SAFETY: signals the netwatch child this test started.
    unsafe { libc::kill(watch.pid() as i32, libc::SIGSTOP) };
    let churners: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(|| {
                let mut peer = Peer::spawn();
                peer.send("burst 1000");
            })
        })
        .collect();
    for churner in churners {
        churner.join().expect("churn finished");
    }
    // SAFETY: as above.
    unsafe { libc::kill(watch.pid() as i32, libc::SIGCONT) };
    let stopped = watch.stop();
    assert!(stopped.success, "{}", stopped.stderr);
    let delivered = summary_count(&stopped.records, "transitions");
    let lost = summary_count(&stopped.records, "lost");
    let fired = summary_count(&stopped.records, "fired");
    eprintln!("{}", stopped.stderr);
    assert!(
        lost > 0,
        "a stopped reader lost nothing? {}",
        stopped.stderr
    );
    assert_eq!(
        delivered + lost,
        fired,
        "each transition the kernel fired is delivered or lost, once: {}",
        stopped.stderr
    );
    let summary = stopped.records.last().expect("a summary");
    assert_counts_add_up(summary);
}

#[test]
fn a_resync_that_fails_is_reported_and_tried_again() {
    let _alone = churn_alone();
    let mut watch = Watch::start(&["--ring-buffer-kib", "4"]);
    let pid = watch.pid();
    // No file left to open: the resync after the losses below fails.
    let open_now = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("its fds")
        .count() as u64;
    set_fd_limit(pid, Some(open_now));
    let mut churner = Peer::spawn();
    churner.send("burst 2000");
    let failed = watch.collect_until(
        |r| r["type"] == "failure" && r["what"] == "resync",
        std::time::Duration::from_secs(10),
    );
    set_fd_limit(pid, None);
    assert!(failed, "a failed resync: {:#?}", watch.seen);
    // Tried again 4 s later, with files again.
    let resynced = watch.collect_until(
        |r| r["type"] == "resync",
        std::time::Duration::from_secs(10),
    );
    assert!(resynced, "the resync was tried again: {:#?}", watch.seen);
    let stopped = watch.stop();
    assert!(stopped.success, "{}", stopped.stderr);
    assert!(
        stopped.stderr.contains("the resync is tried again in 4 s"),
        "{}",
        stopped.stderr
    );
}
