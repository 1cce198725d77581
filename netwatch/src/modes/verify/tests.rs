//! verify's unit tests: comparisons by address and by tuple, and its reports.

use std::net::SocketAddr;

use super::compare::portless_form;
use super::*;
use crate::model::{Owner, Proto, TcpState};
use crate::sink::RecordKind;
use crate::snapshot::SnapshotEntry;
use netwatch_common::ByteCounts;
use TcpState::*;

const NETNS: u32 = 7;

fn tuple(local: &str, remote: &str) -> Tuple {
    Tuple {
        proto: Proto::Tcp,
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
    }
}

fn name(pid: u32) -> Option<String> {
    Some(format!("p{pid}"))
}

/// A table holding each (skaddr, tuple, connecting pid) as ESTABLISHED,
/// in namespace `netns`.
fn table(sockets: &[(u64, Tuple, u32, u32)]) -> SocketTable {
    let mut table = SocketTable::new(name, 100);
    for &(skaddr, tuple, pid, netns) in sockets {
        let mut t = Transition {
            ts_ns: 1,
            skaddr,
            tuple: Tuple {
                local: SocketAddr::new(tuple.local.ip(), 0),
                ..tuple
            },
            old: Close,
            new: SynSent,
            task: crate::model::Task {
                pid,
                comm: [0; 16],
                start_ns: None,
                cgroup_id: None,
                command_line: None,
            },
            uid: Some(0),
            netns: Some(netns),
            bytes: ByteCounts::default(),
            recovered: false,
            error: None,
        };
        table.apply(&t);
        (t.tuple, t.old, t.new, t.ts_ns) = (tuple, SynSent, Established, 2);
        table.apply(&t);
    }
    table
}

fn snapshot(sockets: &[(Tuple, TcpState, Option<u32>, bool)]) -> Snapshot {
    let entries = sockets
        .iter()
        .map(|&(tuple, state, pid, timewait)| {
            let owner = pid.map(|pid| Owner::new(pid, format!("p{pid}").into()));
            let mut entry = SnapshotEntry::of(&tuple, state, owner);
            entry.socket.timewait = timewait;
            entry
        })
        .collect();
    Snapshot {
        entries,
        ..Snapshot::default()
    }
}

fn kinds(comparison: &Comparison) -> Vec<DriftKind> {
    comparison.drift.iter().map(|d| d.kind).collect()
}

/// A snapshot read in the kernel: (skaddr, tuple, namespace, pid).
fn kernel_snapshot(sockets: &[(u64, Tuple, Option<u32>, u32)]) -> Snapshot {
    let mut snapshot = snapshot(
        &sockets
            .iter()
            .map(|&(_, tuple, _, pid)| (tuple, Established, Some(pid), false))
            .collect::<Vec<_>>(),
    );
    snapshot.entries = snapshot
        .entries
        .into_iter()
        .zip(sockets)
        .map(|(mut entry, &(skaddr, _, netns, _))| {
            entry.socket.netns = netns;
            entry.read_in_kernel(skaddr, 5)
        })
        .collect();
    snapshot
}

/// Moves the table's socket `skaddr` through `steps`.
fn advance(table: &mut SocketTable, skaddr: u64, tuple: Tuple, steps: &[(TcpState, TcpState)]) {
    for (ts_ns, &step) in (10..).zip(steps) {
        let task = crate::model::Task {
            pid: 10,
            comm: [0; 16],
            start_ns: None,
            cgroup_id: None,
            command_line: None,
        };
        table.apply(&Transition::scripted(ts_ns, skaddr, tuple, step, task));
    }
}

#[test]
fn a_fin_wait1_socket_missing_twice_is_freed_and_other_states_stay_drift() {
    let (a, b, c) = (
        tuple("127.0.0.1:5000", "127.0.0.1:80"),
        tuple("127.0.0.1:5001", "127.0.0.1:80"),
        tuple("127.0.0.1:5002", "127.0.0.1:80"),
    );
    let mut table = table(&[(1, a, 10, NETNS), (2, b, 10, NETNS), (3, c, 10, NETNS)]);
    // The kernel frees socket 1 in FIN_WAIT1 without a trace; socket
    // 2's change to CLOSE from LAST_ACK is lost (real drift).
    advance(&mut table, 1, a, &[(Established, FinWait1)]);
    advance(
        &mut table,
        2,
        b,
        &[(Established, CloseWait), (CloseWait, LastAck)],
    );
    let kernel = kernel_snapshot(&[(3, c, None, 10)]);
    let mut verify = Verify::new(true, Some(NETNS), Arc::new(Metrics::new(4096)));
    let mut out = Records::default();

    let first = verify.check(&kernel, &table, &mut out);
    assert_eq!(first, Vec::<u64>::new(), "one read is not enough");
    assert_eq!((verify.drift_checks, verify.persisted_checks), (1, 0));

    let second = verify.check(&kernel, &table, &mut out);
    assert_eq!(second, vec![1], "missing from two reads in FIN_WAIT1");
    assert_eq!((verify.drift_checks, verify.persisted_checks), (2, 1));
    let reports: Vec<serde_json::Value> = out
        .each()
        .map(|(kind, line)| {
            assert_eq!(kind, RecordKind::Drift);
            serde_json::from_slice(line).expect("a JSON line")
        })
        .collect();
    assert_eq!(reports[1]["freed_untraced"], 1, "{}", reports[1]);
    assert_eq!(reports[1]["missing_from_snapshot"], 1, "{}", reports[1]);
    assert_eq!(reports[1]["sockets"][0]["table_state"], "LAST_ACK");
    assert_eq!(reports[1]["sockets"][0]["persisting"], true);

    assert_eq!(table.forget_freed(1).map(|s| s.state), Some(FinWait1));
    assert_eq!((table.len(), table.vanished()), (2, 1));
    assert_eq!(table.forget_freed(1), None);
}

#[test]
fn a_kernel_snapshot_is_matched_by_address_in_every_namespace() {
    let a = tuple("127.0.0.1:5000", "127.0.0.1:80");
    let b = tuple("10.0.0.2:5000", "10.0.0.1:80");
    // The same tuple in two namespaces, and a third socket in the other one.
    let table = table(&[(1, a, 10, NETNS), (2, a, 11, 8), (3, b, 12, 8)]);
    let none = Changed::default();
    let same = kernel_snapshot(&[(1, a, None, 10), (2, a, Some(8), 11), (3, b, Some(8), 12)]);
    let comparison = compare(&same, &table, Some(NETNS), &none);
    assert_eq!((comparison.compared, kinds(&comparison)), (3, vec![]));

    let other_pid = kernel_snapshot(&[(1, a, None, 10), (2, a, Some(8), 13), (3, b, Some(8), 12)]);
    let comparison = compare(&other_pid, &table, Some(NETNS), &none);
    assert_eq!(kinds(&comparison), vec![DriftKind::PidMismatch]);
    assert_eq!(comparison.drift[0].table_pid, Some(11));

    let changed = Changed {
        sockets: [3].into_iter().collect(),
        ..Changed::default()
    };
    let missing = kernel_snapshot(&[(1, a, None, 10), (3, b, Some(8), 12)]);
    let comparison = compare(&missing, &table, Some(NETNS), &changed);
    assert_eq!((comparison.compared, comparison.excluded), (1, 2));
    assert_eq!(kinds(&comparison), vec![DriftKind::MissingFromSnapshot]);
    assert_eq!(comparison.drift[0].table_pid, Some(11));
}

#[test]
fn the_same_sockets_are_no_drift_and_each_difference_is_named() {
    let a = tuple("127.0.0.1:5000", "127.0.0.1:80");
    let b = tuple("127.0.0.1:5001", "127.0.0.1:80");
    let table = table(&[(1, a, 10, NETNS), (2, b, 10, NETNS)]);
    let none = Changed::default();
    let same = snapshot(&[
        (a, Established, Some(10), false),
        (b, Established, None, false),
    ]);
    let comparison = compare(&same, &table, Some(NETNS), &none);
    assert_eq!((comparison.compared, kinds(&comparison)), (2, vec![]));

    let c = tuple("127.0.0.1:5002", "127.0.0.1:80");
    let differs = snapshot(&[
        (a, Established, Some(11), false),
        (c, Established, Some(10), false),
    ]);
    let comparison = compare(&differs, &table, Some(NETNS), &none);
    assert_eq!(
        kinds(&comparison),
        vec![
            DriftKind::PidMismatch,
            DriftKind::MissingFromTable,
            DriftKind::MissingFromSnapshot
        ]
    );
    let state = snapshot(&[
        (a, CloseWait, Some(10), false),
        (b, Established, Some(10), false),
    ]);
    let comparison = compare(&state, &table, Some(NETNS), &none);
    assert_eq!(kinds(&comparison), vec![DriftKind::StateMismatch]);
}

#[test]
fn a_connect_in_progress_leaves_out_its_destination_on_both_sides() {
    // 2 long-lived connections to port 80; a new connect to it during the snapshot.
    let a = tuple("127.0.0.1:5000", "127.0.0.1:80");
    let b = tuple("127.0.0.1:5001", "127.0.0.1:80");
    let table = table(&[(1, a, 10, NETNS), (2, b, 10, NETNS)]);
    let changed = Changed {
        tuples: [portless_form(&a)].into_iter().collect(),
        ..Changed::default()
    };
    let proc = snapshot(&[
        (a, Established, Some(10), false),
        (b, Established, Some(10), false),
    ]);
    let comparison = compare(&proc, &table, Some(NETNS), &changed);
    assert_eq!(kinds(&comparison), vec![]);
    assert_eq!((comparison.compared, comparison.excluded), (0, 4));
}

#[test]
fn a_pid_differs_only_when_the_table_owner_holds_no_fd_of_the_socket() {
    let a = tuple("127.0.0.1:80", "127.0.0.1:5000");
    let table = table(&[(1, a, 12, NETNS)]);
    let none = Changed::default();
    // Held by 10 (the lowest, which the snapshot names) and by 12, the table's owner.
    let mut shared = snapshot(&[(a, Established, Some(10), false)]);
    shared.entries[0].pids = vec![10, 12];
    assert_eq!(kinds(&compare(&shared, &table, Some(NETNS), &none)), vec![]);
    shared.entries[0].pids = vec![10, 11];
    assert_eq!(
        kinds(&compare(&shared, &table, Some(NETNS), &none)),
        vec![DriftKind::PidMismatch]
    );
}

#[test]
fn changed_sockets_time_wait_duplicates_and_other_namespaces_are_left_out() {
    let a = tuple("127.0.0.1:5000", "127.0.0.1:80");
    let b = tuple("127.0.0.1:5001", "127.0.0.1:80");
    let elsewhere = tuple("127.0.0.1:5002", "127.0.0.1:80");
    let table = table(&[(1, a, 10, NETNS), (3, elsewhere, 10, NETNS + 1)]);
    let changed = Changed {
        tuples: [b].into_iter().collect(),
        ..Changed::default()
    };
    let proc = snapshot(&[
        (a, Established, Some(10), false),
        (a, Established, Some(10), false),
        (b, Established, Some(10), false),
        (
            tuple("127.0.0.1:5003", "127.0.0.1:80"),
            FinWait2,
            None,
            true,
        ),
        (
            tuple("127.0.0.1:80", "127.0.0.1:5004"),
            SynRecv,
            None,
            false,
        ),
    ]);
    let comparison = compare(&proc, &table, Some(NETNS), &changed);
    assert_eq!(kinds(&comparison), vec![]);
    assert_eq!((comparison.compared, comparison.excluded), (1, 1));
}

#[test]
fn a_connect_in_progress_matches_without_its_local_port() {
    let mut table = SocketTable::new(name, 100);
    let connecting = tuple("127.0.0.1:0", "127.0.0.1:80");
    table.apply(&Transition {
        ts_ns: 1,
        skaddr: 9,
        tuple: connecting,
        old: Close,
        new: SynSent,
        task: crate::model::Task {
            pid: 10,
            comm: [0; 16],
            start_ns: None,
            cgroup_id: None,
            command_line: None,
        },
        uid: Some(0),
        netns: Some(NETNS),
        bytes: ByteCounts::default(),
        recovered: false,
        error: None,
    });
    let with_port = tuple("127.0.0.1:5000", "127.0.0.1:80");
    let proc = snapshot(&[(with_port, SynSent, Some(10), false)]);
    let none = Changed::default();
    assert_eq!(kinds(&compare(&proc, &table, Some(NETNS), &none)), vec![]);
    // Another connect to the same place began during the snapshot: both are left out.
    let changed = Changed {
        tuples: [connecting].into_iter().collect(),
        ..Changed::default()
    };
    let comparison = compare(&proc, &table, Some(NETNS), &changed);
    assert_eq!((kinds(&comparison), comparison.excluded), (vec![], 2));
}
