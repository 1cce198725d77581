//! `netwatch verify`: the table kept by transitions alone matches /proc,
//! and losses without resync show up as drift.

use std::time::Duration;

use serde_json::Value;

use crate::peer::Peer;
use crate::support::{assert_counts_add_up, drift_reports, run_netwatch, set_fd_limit, Watch};

fn drifted(report: &Value) -> u64 {
    [
        "missing_from_table",
        "missing_from_snapshot",
        "pid_mismatch",
        "state_mismatch",
    ]
    .iter()
    .map(|kind| report[*kind].as_u64().expect("a count"))
    .sum()
}

#[test]
fn the_live_table_matches_snapshots_after_churn() {
    let mut holder = Peer::spawn();
    holder.send("bulk 500");
    let verify = Watch::spawn(&["verify", "--json", "--interval", "1", "--duration", "16"]);
    let churners: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(|| {
                let mut peer = Peer::spawn();
                for _ in 0..10 {
                    peer.send("burst 500");
                    peer.send("exchange 50 1000");
                }
            })
        })
        .collect();
    for churner in churners {
        churner.join().expect("churn finished");
    }
    // Linux 6.18 frees a few orphaned FIN_WAIT1 sockets per 50,000
    // connections without a traced change to CLOSE; the table learns of each
    // when its address is reused. A last, ordinary burst gives them that
    // chance before the final checks.
    holder.send("burst 1000");
    let stopped = verify.wait_exit(Duration::from_secs(60));
    assert!(
        stopped.success,
        "verify found persistent drift: {}",
        stopped.stderr
    );
    let reports = drift_reports(&stopped.records);
    assert!(
        reports.len() >= 8,
        "a report per interval: {}",
        reports.len()
    );
    assert!(
        reports.iter().all(|r| r["compared"].as_u64() >= Some(1000)),
        "the 1,000 held sockets are compared each time"
    );
    let last = reports.last().expect("a report");
    assert_eq!(drifted(last), 0, "no drift once the churn stopped: {last}");
    assert!(reports.iter().all(|r| r["persisting"] == 0), "{reports:#?}");
    let summary = stopped.records.last().expect("a summary");
    assert_eq!(summary["type"], "summary");
    assert_eq!(summary["persisting_checks"], 0);
    assert_counts_add_up(summary);
}

#[test]
fn lost_events_without_resync_are_reported_as_drift() {
    let verify = Watch::spawn(&[
        "verify",
        "--json",
        "--interval",
        "1",
        "--duration",
        "4",
        "--ring-buffer-kib",
        "4",
        "--no-resync",
    ]);
    // Its reader stopped meanwhile, so that the 4 KiB ring overflows
    // whatever the machine's speed.
    // SAFETY: signals the netwatch child this test started.
    unsafe { libc::kill(verify.pid() as i32, libc::SIGSTOP) };
    let mut holder = Peer::spawn();
    holder.send("bulk 2000");
    // SAFETY: as above.
    unsafe { libc::kill(verify.pid() as i32, libc::SIGCONT) };
    let stopped = verify.wait_exit(Duration::from_secs(30));
    assert!(
        !stopped.success,
        "persistent drift is exit status 1: {}",
        stopped.stderr
    );
    assert!(stopped.stderr.contains("lost"), "{}", stopped.stderr);
    let reports = drift_reports(&stopped.records);
    let last = reports.last().expect("a report");
    assert!(drifted(last) > 0, "{last}");
    assert!(last["persisting"].as_u64() > Some(0), "{last}");
    let summary = stopped.records.last().expect("a summary");
    assert!(summary["persisting_checks"].as_u64() > Some(0));
    assert!(summary["ring_buffer_full"].as_u64() > Some(0), "{summary}");
    assert_counts_add_up(summary);
}

#[test]
fn a_verify_that_checks_nothing_fails() {
    for args in [
        &["verify", "--duration", "0"][..],
        &["verify", "--duration", "1", "--interval", "5"],
    ] {
        let output = run_netwatch(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("before its first check at 5 s"),
            "{args:?}: {stderr}"
        );
    }
    let verify = Watch::spawn(&["verify", "--interval", "5"]);
    let stopped = verify.stop();
    assert_eq!(stopped.code, Some(2), "{}", stopped.stderr);
    assert!(
        stopped.stderr.contains("stopped before its first check"),
        "{}",
        stopped.stderr
    );
}

#[test]
fn a_snapshot_that_fails_is_reported_and_verify_goes_on() {
    let verify = Watch::spawn(&["verify", "--json", "--interval", "1", "--duration", "6"]);
    let pid = verify.pid();
    // No file left to open: the next snapshots fail (EMFILE). A check under
    // way may hold a few fds now (its iterators'), which it then closes:
    // the limit stays below what is open even without them.
    let open_now = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("its fds")
        .count() as u64;
    set_fd_limit(pid, Some(open_now.saturating_sub(8)));
    std::thread::sleep(Duration::from_millis(2500));
    set_fd_limit(pid, None);
    let stopped = verify.wait_exit(Duration::from_secs(30));
    assert!(
        stopped.success,
        "verify went on and passed: {}",
        stopped.stderr
    );
    let failures: Vec<&Value> = stopped
        .records
        .iter()
        .filter(|r| r["type"] == "failure" && r["what"] == "snapshot")
        .collect();
    assert!(
        !failures.is_empty(),
        "a failure record: {:#?}",
        stopped.records
    );
    assert!(
        stopped.stderr.contains("this check is skipped"),
        "{}",
        stopped.stderr
    );
    let after: Vec<&Value> = drift_reports(&stopped.records);
    assert!(
        !after.is_empty(),
        "checks ran once files could be opened again"
    );
}
