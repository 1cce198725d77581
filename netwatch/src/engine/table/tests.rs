//! The table's unit tests: owners, baselines, listeners and reuse.

use super::*;
use crate::model::{OwnerCause, ProcessImage, Proto, Task};
use crate::snapshot::SnapshotEntry;
use TcpState::*;

fn fake_names(pid: u32) -> Option<String> {
    (pid < 1000).then(|| format!("proc{pid}"))
}

fn owner(pid: u32) -> Option<Owner> {
    fake_names(pid).map(|program| Owner::new(pid, program.into()))
}

fn tuple(local: &str, remote: &str) -> Tuple {
    Tuple {
        proto: Proto::Tcp,
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
    }
}

/// A transition by a task without a start time, as without BTF: names
/// are looked up.
fn transition(
    ts_ms: u64,
    skaddr: u64,
    tuple: Tuple,
    old: TcpState,
    new: TcpState,
    task: u32,
) -> Transition {
    let task = Task {
        pid: task,
        comm: comm(&format!("thread{task}")),
        start_ns: None,
        cgroup_id: None,
        command_line: None,
    };
    transition_by(ts_ms, skaddr, tuple, (old, new), task)
}

fn comm(name: &str) -> [u8; 16] {
    let mut comm = [0u8; 16];
    comm[..name.len()].copy_from_slice(name.as_bytes());
    comm
}

/// A process as the kernel names it: pid, start time and name.
fn task(pid: u32, start_ns: u64, name: &str) -> Task {
    Task {
        pid,
        comm: comm(name),
        start_ns: Some(start_ns),
        cgroup_id: None,
        command_line: None,
    }
}

fn named(pid: u32, program: &str) -> Option<Owner> {
    Some(Owner::new(pid, program.into()))
}

/// A transition of a socket of uid 1000 in namespace 1, by `task`.
fn transition_by(
    ts_ms: u64,
    skaddr: u64,
    tuple: Tuple,
    states: (TcpState, TcpState),
    task: Task,
) -> Transition {
    Transition {
        uid: Some(1000),
        netns: Some(1),
        ..Transition::scripted(ts_ms * 1_000_000, skaddr, tuple, states, task)
    }
}

fn owner_event(
    skaddr: u64,
    tuple: Tuple,
    state: TcpState,
    task: Task,
    cause: OwnerCause,
) -> OwnerEvent {
    OwnerEvent {
        ts_ns: 0,
        skaddr,
        tuple,
        state: Some(state),
        task,
        uid: Some(1000),
        netns: Some(1),
        cause,
    }
}

/// A listener of `master` on port 80 and a connection to it accepted
/// into the kernel (socket 2), before accept() returns it.
fn listener_with_pending_connection(master: Task) -> (SocketTable, Tuple) {
    let mut table = SocketTable::new(fake_names, 1000);
    let listen = tuple("0.0.0.0:80", "0.0.0.0:0");
    let child = tuple("127.0.0.1:80", "127.0.0.1:5000");
    table.apply(&transition_by(1, 1, listen, (Close, Listen), master));
    table.apply(&transition(2, 2, child, Listen, SynRecv, 0));
    table.apply(&transition(3, 2, child, SynRecv, Established, 0));
    (table, child)
}

#[test]
fn the_worker_that_accepts_owns_the_socket_from_then_on() {
    let (mut table, child) = listener_with_pending_connection(task(100, 1, "nginx"));
    let worker = task(101, 2, "nginx");
    let change = table
        .set_owner(&owner_event(
            2,
            child,
            Established,
            worker,
            OwnerCause::Accept,
        ))
        .expect("the owner changes");
    assert_eq!(change.old, named(100, "nginx"));
    assert_eq!(change.new, Owner::new(101, "nginx".into()));
    assert_eq!(
        (change.tuple, change.state, change.cause),
        (child, Established, OwnerCause::Accept)
    );
    for (ts, old, new) in [
        (4, Established, CloseWait),
        (5, CloseWait, LastAck),
        (6, LastAck, Close),
    ] {
        let seen = table.apply(&transition(ts, 2, child, old, new, 7));
        assert_eq!(seen.owner, named(101, "nginx"), "{old} -> {new}");
    }
}

#[test]
fn accept_by_the_listener_owner_changes_nothing() {
    let master = task(100, 1, "server");
    let (mut table, child) = listener_with_pending_connection(master.clone());
    let accepted = owner_event(2, child, Established, master, OwnerCause::Accept);
    assert_eq!(table.set_owner(&accepted), None);
    assert!(!table.sockets().any(|(_, socket)| socket.owner_changed));
}

#[test]
fn a_forked_child_that_serves_takes_the_socket_over() {
    let parent = task(100, 1, "server");
    let (mut table, child) = listener_with_pending_connection(parent.clone());
    table.set_owner(&owner_event(
        2,
        child,
        Established,
        parent,
        OwnerCause::Accept,
    ));
    // The child sends first: the kernel reports a handoff.
    let forked = task(150, 9, "server");
    let change = table
        .set_owner(&owner_event(
            2,
            child,
            Established,
            forked.clone(),
            OwnerCause::Handoff,
        ))
        .expect("the child takes over");
    assert_eq!((change.old, change.new.pid), (named(100, "server"), 150));
    // It sends again (an LRU eviction in the kernel repeats the event): no change.
    assert_eq!(
        table.set_owner(&owner_event(
            2,
            child,
            Established,
            forked,
            OwnerCause::Handoff
        )),
        None
    );
    let closed = table.apply(&transition(9, 2, child, LastAck, Close, 0));
    assert_eq!(closed.owner, named(150, "server"));
    assert!(closed.closed.expect("closed").owner_changed);
}

#[test]
fn an_exec_renames_the_sockets_its_process_owns() {
    let mut table = SocketTable::new(fake_names, 1000);
    let conn = tuple("127.0.0.1:5000", "127.0.0.1:80");
    table.apply(&transition_by(
        1,
        7,
        conn,
        (Close, SynSent),
        task(300, 5, "sh"),
    ));
    table.exec(&task(300, 5, "curl"));
    let seen = table.apply(&transition(2, 7, conn, SynSent, Established, 0));
    assert_eq!(seen.owner, named(300, "curl"));
    // An exec by another process that had pid 300 renames nothing.
    table.exec(&task(300, 6, "wget"));
    let seen = table.apply(&transition(3, 7, conn, Established, FinWait1, 0));
    assert_eq!(seen.owner, named(300, "curl"));
}

/// Reads a fake image: the exe names the pid, the start time and the
/// number of reads so far.
fn counted_image(pid: u32, start_ns: Option<u64>, cgroup_id: Option<u64>) -> ProcessImage {
    use std::sync::atomic::{AtomicU32, Ordering};
    static READS: AtomicU32 = AtomicU32::new(0);
    let read = READS.fetch_add(1, Ordering::Relaxed) + 1;
    ProcessImage {
        exe: Some(format!("{pid}@{start_ns:?}/{cgroup_id:?}#{read}").into()),
        ..ProcessImage::default()
    }
}

#[test]
fn what_a_process_runs_is_read_once_and_again_after_exec() {
    let mut table = SocketTable::new(fake_names, 1000);
    table.read_images(ImageReader::Inline(counted_image));
    let exe = |seen: &Observed| {
        let owner = seen.owner.as_ref().expect("an owner");
        let image = owner.image().expect("an image");
        image.exe.as_deref().map(str::to_owned).expect("an exe")
    };
    let conn = |port: u16| tuple(&format!("127.0.0.1:{port}"), "127.0.0.1:80");
    let connect = |table: &mut SocketTable, skaddr: u64, start_ns: u64, name: &str| {
        let opening = (Close, SynSent);
        table.apply(&transition_by(
            1,
            skaddr,
            conn(skaddr as u16),
            opening,
            task(300, start_ns, name),
        ))
    };
    let first = exe(&connect(&mut table, 7, 5, "sh"));
    assert!(first.starts_with("300@Some(5)/None#"), "{first}");
    // The same process again: no new read.
    assert_eq!(exe(&connect(&mut table, 8, 5, "sh")), first);
    // exec(): read again, for every socket it owns.
    table.exec(&task(300, 5, "curl"));
    let seen = table.apply(&transition(2, 7, conn(7), SynSent, Established, 0));
    let after_exec = exe(&seen);
    assert_ne!(after_exec, first);
    assert!(after_exec.starts_with("300@Some(5)/None#"), "{after_exec}");
    // Moved to another cgroup: read again, with the new id.
    let mut moved = task(300, 5, "curl");
    moved.cgroup_id = Some(42);
    let opening = (Close, SynSent);
    let seen = table.apply(&transition_by(3, 10, conn(10), opening, moved));
    assert!(
        exe(&seen).starts_with("300@Some(5)/Some(42)#"),
        "{}",
        exe(&seen)
    );
    // A reused pid: a read of its own.
    let reused = exe(&connect(&mut table, 9, 6, "wget"));
    assert!(reused.starts_with("300@Some(6)/None#"), "{reused}");
}

#[test]
fn a_reused_pid_never_shows_the_previous_process_name() {
    let mut table = SocketTable::new(fake_names, 1000);
    let first = tuple("127.0.0.1:5000", "127.0.0.1:80");
    let second = tuple("127.0.0.1:5001", "127.0.0.1:80");
    table.apply(&transition_by(
        1,
        7,
        first,
        (Close, SynSent),
        task(300, 5, "nginx"),
    ));
    let seen = table.apply(&transition_by(
        2,
        8,
        second,
        (Close, SynSent),
        task(300, 6, "curl"),
    ));
    assert_eq!(seen.owner, named(300, "curl"));
    // Even with the same name, a new start time is another process: exec of one renames only it.
    table.exec(&task(300, 6, "wget"));
    let old = table.apply(&transition(3, 7, first, SynSent, Established, 0));
    assert_eq!(old.owner, named(300, "nginx"));
    let new = table.apply(&transition(3, 8, second, SynSent, Established, 0));
    assert_eq!(new.owner, named(300, "wget"));
}

#[test]
fn owner_events_adopt_baseline_sockets_and_first_seen_ones() {
    let mut table = SocketTable::new(fake_names, 1000);
    let conn = tuple("127.0.0.1:80", "127.0.0.1:5000");
    let listen = tuple("0.0.0.0:81", "0.0.0.0:0");
    table.reset_from(
        &baseline(&[(conn, Established, 42), (listen, Listen, 42)]),
        Some(1),
    );
    // The baseline named proc42 without a start time; the kernel now names it with one.
    let same = owner_event(
        9,
        conn,
        Established,
        task(42, 3, "proc42"),
        OwnerCause::Handoff,
    );
    assert_eq!(table.set_owner(&same), None);
    assert_eq!(table.len(), 2);
    let other = owner_event(
        9,
        conn,
        Established,
        task(43, 4, "worker"),
        OwnerCause::Handoff,
    );
    assert_eq!(table.set_owner(&other).map(|c| c.old), Some(owner(42)));
    // A listener keeps the process that called listen().
    let on_listener = owner_event(
        10,
        listen,
        Listen,
        task(43, 4, "worker"),
        OwnerCause::Handoff,
    );
    assert_eq!(table.set_owner(&on_listener), None);
    // A socket never seen: joins in a state that lasts, with no previous owner.
    let unseen = tuple("127.0.0.1:82", "127.0.0.1:6000");
    let change = table.set_owner(&owner_event(
        11,
        unseen,
        CloseWait,
        task(44, 5, "w"),
        OwnerCause::Accept,
    ));
    assert_eq!(change.map(|c| (c.old, c.state)), Some((None, CloseWait)));
    assert_eq!(table.len(), 3);
    // ... but not on its way out.
    let closing = tuple("127.0.0.1:83", "127.0.0.1:6001");
    assert_eq!(
        table.set_owner(&owner_event(
            12,
            closing,
            Close,
            task(44, 5, "w"),
            OwnerCause::Handoff
        )),
        None
    );
    assert_eq!(table.len(), 3);
}

fn baseline(sockets: &[(Tuple, TcpState, u32)]) -> Snapshot {
    Snapshot {
        entries: sockets
            .iter()
            .map(|&(tuple, state, pid)| SnapshotEntry::of(&tuple, state, owner(pid)))
            .collect(),
        ..Snapshot::default()
    }
}

#[test]
fn connect_owner_sticks_to_every_later_transition() {
    let mut table = SocketTable::new(fake_names, 1000);
    let unbound = tuple("127.0.0.1:0", "127.0.0.1:80");
    let bound = tuple("127.0.0.1:5000", "127.0.0.1:80");
    assert_eq!(
        table
            .apply(&transition(1, 7, unbound, Close, SynSent, 10))
            .owner,
        owner(10)
    );
    // Later transitions run in softirq context on whatever task is current.
    let established = table.apply(&transition(3, 7, bound, SynSent, Established, 99));
    assert_eq!(established.owner, owner(10));
    assert_eq!(established.ms_in_old_state, Some(2.0));
    assert_eq!(
        table
            .apply(&transition(4, 7, bound, Established, FinWait1, 98))
            .owner,
        owner(10)
    );
    assert_eq!(table.len(), 1);
    assert_eq!(
        table
            .apply(&transition(5, 7, bound, FinWait2, Close, 97))
            .owner,
        owner(10)
    );
    assert!(table.is_empty());
}

#[test]
fn accepted_sockets_belong_to_the_listener_owner() {
    let mut table = SocketTable::new(fake_names, 1000);
    let listen = tuple("0.0.0.0:80", "0.0.0.0:0");
    let child = tuple("127.0.0.1:80", "127.0.0.1:5000");
    table.apply(&transition(1, 1, listen, Close, Listen, 20));
    let syn_recv = table.apply(&transition(2, 2, child, Listen, SynRecv, 30));
    assert_eq!(syn_recv.owner, owner(20));
    assert_eq!(
        table
            .apply(&transition(3, 2, child, SynRecv, Established, 30))
            .owner,
        owner(20)
    );
    assert_eq!(
        table
            .apply(&transition(4, 2, child, LastAck, Close, 30))
            .owner,
        owner(20)
    );
    // The listener closes: accepted sockets no longer find it.
    table.apply(&transition(5, 1, listen, Listen, Close, 20));
    assert_eq!(
        table
            .apply(&transition(6, 3, child, Listen, SynRecv, 30))
            .owner,
        None
    );
}

#[test]
fn an_exact_listener_wins_over_a_wildcard_and_families_stay_apart() {
    let mut table = SocketTable::new(fake_names, 1000);
    table.apply(&transition(
        1,
        1,
        tuple("0.0.0.0:80", "0.0.0.0:0"),
        Close,
        Listen,
        1,
    ));
    table.apply(&transition(
        1,
        2,
        tuple("127.0.0.2:80", "0.0.0.0:0"),
        Close,
        Listen,
        2,
    ));
    let v6 = Tuple {
        proto: Proto::Tcp6,
        local: "[::]:80".parse().unwrap(),
        remote: "[::]:0".parse().unwrap(),
    };
    table.apply(&transition(1, 3, v6, Close, Listen, 3));
    let to = |local: &str| tuple(local, "127.0.0.1:4000");
    assert_eq!(
        table
            .apply(&transition(2, 10, to("127.0.0.2:80"), Listen, SynRecv, 0))
            .owner,
        owner(2)
    );
    assert_eq!(
        table
            .apply(&transition(2, 11, to("127.0.0.3:80"), Listen, SynRecv, 0))
            .owner,
        owner(1)
    );
    let mapped = Tuple {
        proto: Proto::Tcp6,
        local: "[::ffff:127.0.0.1]:80".parse().unwrap(),
        remote: "[::ffff:127.0.0.1]:4000".parse().unwrap(),
    };
    assert_eq!(
        table
            .apply(&transition(2, 12, mapped, Listen, SynRecv, 0))
            .owner,
        owner(3)
    );
}

#[test]
fn baseline_sockets_are_adopted_by_tuple_on_their_first_transition() {
    let mut table = SocketTable::new(fake_names, 1000);
    let conn = tuple("127.0.0.1:5000", "127.0.0.1:80");
    let waiting = tuple("127.0.0.1:5001", "127.0.0.1:80");
    table.reset_from(
        &baseline(&[(conn, Established, 42), (waiting, TimeWait, 43)]),
        Some(1),
    );
    assert_eq!(
        table.len(),
        1,
        "TIME_WAIT sockets stay out of the live table"
    );
    let first = table.apply(&transition(9, 5, conn, Established, FinWait1, 99));
    assert_eq!(first.owner, owner(42));
    assert_eq!(
        first.ms_in_old_state, None,
        "how long it was established is unknown"
    );
    assert_eq!(table.len(), 1);
    table.apply(&transition(10, 5, conn, FinWait2, Close, 99));
    assert!(table.is_empty());
}

#[test]
fn a_socket_both_in_the_baseline_and_in_events_is_counted_once() {
    let mut table = SocketTable::new(fake_names, 1000);
    let conn = tuple("127.0.0.1:5000", "127.0.0.1:80");
    // The scan read the socket after connect() began; its events are applied after the scan.
    table.reset_from(&baseline(&[(conn, Established, 42)]), Some(1));
    table.apply(&transition(
        1,
        5,
        tuple("127.0.0.1:0", "127.0.0.1:80"),
        Close,
        SynSent,
        42,
    ));
    table.apply(&transition(2, 5, conn, SynSent, Established, 7));
    assert_eq!(table.len(), 1);
    assert_eq!(table.sockets().next().unwrap().1.state, Established);
}

/// A baseline read in the kernel: (skaddr, tuple, state, owner pid), each read at `read_ms`.
fn kernel_baseline(sockets: &[(u64, Tuple, TcpState, u32)], read_ms: u64) -> Snapshot {
    let mut snapshot = baseline(
        &sockets
            .iter()
            .map(|&(_, tuple, state, pid)| (tuple, state, pid))
            .collect::<Vec<_>>(),
    );
    snapshot.entries = snapshot
        .entries
        .into_iter()
        .zip(sockets)
        .map(|(entry, &(skaddr, ..))| entry.read_in_kernel(skaddr, read_ms * 1_000_000))
        .collect();
    snapshot
}

#[test]
fn a_baseline_read_in_the_kernel_joins_by_address_not_tuple() {
    let mut table = SocketTable::new(fake_names, 1000);
    let conn = tuple("127.0.0.1:5000", "127.0.0.1:80");
    table.reset_from(&kernel_baseline(&[(5, conn, Established, 42)], 10), Some(1));
    assert_eq!(
        table.sockets().next().map(|(skaddr, _)| skaddr),
        Some(Some(5))
    );
    // The transition names another tuple (as one without its namespace
    // or port would): the address alone finds the socket.
    let other_view = tuple("127.0.0.1:0", "127.0.0.1:80");
    let first = table.apply(&transition(11, 5, other_view, Established, FinWait1, 99));
    assert_eq!(first.owner, owner(42));
    assert_eq!(table.len(), 1);
    let closed = table.apply(&transition(12, 5, conn, FinWait2, Close, 99));
    assert_eq!(
        closed.closed.map(|socket| socket.process.map(|p| p.pid)),
        Some(Some(42))
    );
    assert!(table.is_empty());
}

#[test]
fn transitions_stamped_before_the_kernel_read_a_socket_count_it_once() {
    let mut table = SocketTable::new(fake_names, 1000);
    let conn = tuple("127.0.0.1:5000", "127.0.0.1:80");
    // The iterator read the socket at 10 ms, after connect() at 1 ms and
    // its establishment at 2 ms; those transitions are applied after the read.
    table.reset_from(&kernel_baseline(&[(5, conn, Established, 42)], 10), Some(1));
    let opened = table.apply(&transition(1, 5, conn, Close, SynSent, 42));
    assert_eq!(
        opened.replaced, None,
        "the same socket, not one freed unseen"
    );
    table.apply(&transition(2, 5, conn, SynSent, Established, 7));
    assert_eq!(table.len(), 1);
    assert_eq!(table.vanished(), 0);
    let (_, socket) = table.sockets().next().unwrap();
    assert_eq!(
        (socket.state, socket.direction),
        (Established, Direction::Out)
    );
    assert_eq!(socket.owner(), owner(42));
}

#[test]
fn a_close_stamped_before_the_kernel_read_is_an_earlier_socket_at_that_address() {
    let mut table = SocketTable::new(fake_names, 1000);
    let earlier = tuple("127.0.0.1:5000", "127.0.0.1:80");
    let read = tuple("127.0.0.1:6000", "127.0.0.1:80");
    table.reset_from(&kernel_baseline(&[(5, read, Established, 42)], 10), Some(1));
    let closed = table.apply(&transition(3, 5, earlier, FinWait2, Close, 0));
    assert_eq!(closed.closed.map(|socket| socket.tuple), Some(earlier));
    assert_eq!(closed.owner, None);
    assert_eq!(table.len(), 1, "the socket the baseline read stays");
    let after = table.apply(&transition(11, 5, read, Established, FinWait1, 0));
    assert_eq!(after.owner, owner(42));
    assert_eq!(table.vanished(), 0);
}

#[test]
fn equal_tuples_in_two_namespaces_stay_apart() {
    let mut table = SocketTable::new(fake_names, 1000);
    let conn = tuple("10.0.0.2:5000", "10.0.0.1:80");
    let mut snapshot = baseline(&[(conn, Established, 42), (conn, Established, 43)]);
    snapshot.entries[1].socket.netns = Some(2);
    table.reset_from(&snapshot, Some(1));
    assert_eq!(table.len(), 2);
    let mut other = transition(5, 9, conn, Established, FinWait1, 0);
    other.netns = Some(2);
    assert_eq!(table.apply(&other).owner, owner(43));
    let own = transition(6, 8, conn, Established, FinWait1, 0);
    assert_eq!(table.apply(&own).owner, owner(42));
    assert_eq!(table.len(), 2);
}

#[test]
fn a_reused_socket_address_starts_a_new_socket() {
    let mut table = SocketTable::new(fake_names, 1000);
    let first = tuple("127.0.0.1:5000", "127.0.0.1:80");
    table.apply(&transition(1, 5, first, Close, SynSent, 10));
    // Its close was lost; the kernel reuses the address for another process's socket.
    let second = table.apply(&transition(
        2,
        5,
        tuple("127.0.0.1:0", "127.0.0.1:81"),
        Close,
        SynSent,
        11,
    ));
    assert_eq!(second.owner, owner(11));
    assert_eq!(table.len(), 1);
    let replaced = second.replaced.expect("the first socket is handed back");
    assert_eq!((replaced.tuple, replaced.owner()), (first, owner(10)));
    assert_eq!(table.vanished(), 1);
}

#[test]
fn a_process_gone_before_lookup_keeps_its_thread_name() {
    let mut table = SocketTable::new(fake_names, 1000);
    let seen = table.apply(&transition(
        1,
        5,
        tuple("127.0.0.1:0", "127.0.0.1:80"),
        Close,
        SynSent,
        5000,
    ));
    assert_eq!(seen.owner, Some(Owner::new(5000, "thread5000".into())));
}

#[test]
fn a_repeated_transition_is_a_duplicate_and_a_new_one_is_not() {
    let mut table = SocketTable::new(fake_names, 1000);
    let conn = tuple("127.0.0.1:5000", "127.0.0.1:80");
    let established = transition(2, 7, conn, SynSent, Established, 1);
    table.apply(&transition(1, 7, conn, Close, SynSent, 1));
    assert!(
        !table.is_duplicate(&established),
        "not applied yet: a recovery"
    );
    table.apply(&established);
    assert!(table.is_duplicate(&established));
    let close = transition(3, 7, conn, Established, Close, 1);
    assert!(!table.is_duplicate(&close));
    table.apply(&close);
    assert!(
        table.is_duplicate(&close),
        "a duplicated close of a socket no longer in the table"
    );
    let other = transition(4, 8, conn, Established, Close, 1);
    assert!(!table.is_duplicate(&other));
}

#[test]
fn an_unknown_socket_is_tracked_without_an_owner() {
    let mut table = SocketTable::new(fake_names, 1000);
    let conn = tuple("127.0.0.1:5000", "127.0.0.1:80");
    assert_eq!(
        table
            .apply(&transition(1, 5, conn, Established, CloseWait, 3))
            .owner,
        None
    );
    assert_eq!(table.len(), 1);
}
