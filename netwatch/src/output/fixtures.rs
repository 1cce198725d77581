//! Records for the output tests: owners, tuples and times that take every
//! path of the writers, and golden files that pin a writer's exact bytes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::engine::monitor::scripted::{ScriptedMonitor, ScriptedSource};
use crate::engine::monitor::Observer;
use crate::model::{
    Cgroup, CommandLine, ImageSlot, Owner, OwnerCause, OwnerEvent, ProcessImage, Proto, Record,
    Task, TcpState, Transition, Tuple,
};

/// An owner with `image`, where given.
pub fn owner(pid: u32, program: &str, image: Option<ProcessImage>) -> Owner {
    Owner {
        image: image.map(ImageSlot::filled),
        ..Owner::new(pid, program.into())
    }
}

/// What a process runs: these arguments and cgroup, and nginx's executable.
pub fn image(cmdline: Option<&[&[u8]]>, cgroup: Option<&str>) -> ProcessImage {
    ProcessImage {
        cmdline: cmdline
            .map(|args| Arc::new(CommandLine(args.iter().map(|a| a.to_vec()).collect()))),
        cgroup: cgroup.map(|path| Arc::new(Cgroup::from_path(path))),
        exe: Some("/usr/sbin/nginx".into()),
    }
}

/// The JSON records, one per line, of what a writer wrote.
pub fn json_lines(bytes: &[u8]) -> Vec<serde_json::Value> {
    let text = std::str::from_utf8(bytes).expect("UTF-8");
    let parse = |line| serde_json::from_str(line).expect("a JSON record");
    text.lines().map(parse).collect()
}

/// Owners whose fields take every path of the writers: escapes,
/// non-ASCII names longer than the column, arguments that need quoting
/// or are not UTF-8, units and containers, no image, an image with
/// nothing readable.
pub fn owners() -> Vec<Option<Owner>> {
    let container = format!("/system.slice/docker-{}.scope", "ab12".repeat(16));
    vec![
        Some(owner(
            4242,
            "nginx",
            Some(image(
                Some(&[b"nginx: worker process", b""]),
                Some("/system.slice/nginx.service"),
            )),
        )),
        Some(owner(
            7,
            "evil\u{1b}[2J\n\"q\"\\ wörker-with-a-long-name",
            Some(image(
                Some(&[
                    b"/bin/sh",
                    b"-c",
                    b"echo 'it''s' \"x\"\t\xff\xfe|",
                    b"\x1b[1m",
                ]),
                Some(&container),
            )),
        )),
        Some(owner(1, "systemd", None)),
        Some(owner(99, "x\u{7f}\u{85}", Some(image(None, None)))),
        None,
    ]
}

/// Tuples of both families: zero ports, the widest addresses, runs of
/// zeros where `::` goes and where it does not, an IPv4-mapped address.
pub fn tuples() -> Vec<Tuple> {
    let tuple = |proto, local: &str, remote: &str| Tuple {
        proto,
        local: local.parse::<SocketAddr>().expect("an address"),
        remote: remote.parse::<SocketAddr>().expect("an address"),
    };
    vec![
        tuple(Proto::Tcp, "127.0.0.1:48286", "127.0.0.1:8080"),
        tuple(Proto::Tcp, "10.200.30.4:0", "255.255.255.255:65535"),
        tuple(Proto::Tcp6, "[::1]:443", "[::]:0"),
        tuple(Proto::Tcp6, "[2001:db8::1:0:0:1]:1", "[fe80::1:2:3:4]:22"),
        tuple(Proto::Tcp6, "[::ffff:127.0.0.1]:80", "[1:2:3:4:5:6:7:8]:9"),
        tuple(Proto::Tcp6, "[1:0:3:4:5:6:7:8]:10", "[1:0:0:4:0:0:7:8]:11"),
        tuple(
            Proto::Tcp6,
            "[2001:db8:85a3:8d3:1319:8a2e:370:7348]:65535",
            "[::2:0]:2",
        ),
    ]
}

/// Times in the old state, in ms: none, zero, ties at the third decimal,
/// tiny, and long.
pub const MS: [Option<f64>; 10] = [
    None,
    Some(0.0),
    Some(0.06034),
    Some(0.0625),
    Some(0.0005),
    Some(0.000001),
    Some(1234.5678),
    Some(2.0005),
    Some(123456789.123456),
    Some(0.0104995),
];

/// Monotonic stamps: within one second, across seconds, a day later.
pub const STAMPS: [u64; 6] = [
    5,
    999_999_999,
    1_000_000_000,
    1_000_000_001,
    86_400_123_456_789,
    86_400_123_457_789,
];

/// Checks `rendered` against the golden file `tests/golden/NAME`;
/// `NETWATCH_BLESS=1` writes it anew.
pub fn assert_golden(name: &str, rendered: &[u8]) {
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let path = golden.join(name);
    if std::env::var_os("NETWATCH_BLESS").is_some() {
        std::fs::create_dir_all(&golden).expect("creates tests/golden");
        std::fs::write(&path, rendered).expect("writes the golden file");
    }
    let expected = std::fs::read(&path).expect("the golden file");
    assert!(
        rendered == expected,
        "{name} differs:\n{}",
        String::from_utf8_lossy(rendered)
    );
}

/// A task as the kernel names it, with a start time and cgroup.
pub fn task(pid: u32, start_ns: u64, name: &[u8]) -> Task {
    let mut comm = [0; 16];
    comm[..name.len()].copy_from_slice(name);
    Task {
        pid,
        comm,
        start_ns: Some(start_ns),
        cgroup_id: Some(1),
        command_line: None,
    }
}

/// What a connection to a listener on 127.0.0.1:8080 sends, as the
/// kernel sends it: the client's five transitions, the server's five,
/// and the first I/O of the worker that accepted it (11 records).
pub fn connection(index: u64, ts_ns: &mut u64) -> Vec<Record> {
    use TcpState::*;
    let client_port = 40_000 + (index % 20_000) as u16;
    let (client, server) = (0x1000 + index % 512 * 2, 0x1001 + index % 512 * 2);
    let client_tuple = |port| Tuple {
        proto: Proto::Tcp,
        local: SocketAddr::from(([127, 0, 0, 1], port)),
        remote: SocketAddr::from(([127, 0, 0, 1], 8080)),
    };
    let server_tuple = Tuple {
        proto: Proto::Tcp,
        local: SocketAddr::from(([127, 0, 0, 1], 8080)),
        remote: SocketAddr::from(([127, 0, 0, 1], client_port)),
    };
    let curl = task(100, 10, b"curl");
    let softirq = task(0, 0, b"swapper/0");
    let mut next = |skaddr, tuple, states, task: &Task| {
        *ts_ns += 20_000;
        let t = Transition::scripted(*ts_ns, skaddr, tuple, states, task.clone());
        Record::Transition(t)
    };
    let mut records = vec![
        next(client, client_tuple(0), (Close, SynSent), &curl),
        next(server, server_tuple, (Listen, SynRecv), &softirq),
        next(server, server_tuple, (SynRecv, Established), &softirq),
        next(
            client,
            client_tuple(client_port),
            (SynSent, Established),
            &softirq,
        ),
    ];
    let first_io = match &records[3] {
        Record::Transition(t) => t.ts_ns + 1,
        _ => unreachable!("the handshake"),
    };
    records.push(Record::Owner(OwnerEvent {
        ts_ns: first_io,
        skaddr: server,
        tuple: server_tuple,
        state: Some(Established),
        task: task(201, 20, b"nginx"),
        uid: Some(0),
        netns: None,
        cause: OwnerCause::FirstIo,
    }));
    let client_tuple = client_tuple(client_port);
    records.extend([
        next(client, client_tuple, (Established, FinWait1), &curl),
        next(server, server_tuple, (Established, CloseWait), &softirq),
        next(client, client_tuple, (FinWait1, FinWait2), &softirq),
        next(server, server_tuple, (CloseWait, LastAck), &softirq),
        next(server, server_tuple, (LastAck, Close), &softirq),
        next(client, client_tuple, (FinWait2, Close), &softirq),
    ]);
    records
}

fn images(_pid: u32, _start_ns: Option<u64>, _cgroup_id: Option<u64>) -> ProcessImage {
    image(
        Some(&[b"nginx: worker process"]),
        Some("/system.slice/nginx.service"),
    )
}

/// Streams 100,000 scripted events (the records of 9,100 connections to a
/// listener, after 1,000 that warm the table, the processes and the
/// buffers up) through `observer`, and checks that no batch allocates
/// once warm; returns the events and the bytes written.
pub fn stream_without_allocating<O: Observer>(observer: O, label: &str) -> (usize, usize) {
    let mut source = ScriptedSource::default();
    let mut monitor = ScriptedMonitor::start(observer, &mut source);
    monitor.read_images(images);
    let mut ts_ns = 1_000_000_000;
    let listener = Tuple {
        proto: Proto::Tcp,
        local: SocketAddr::from(([127, 0, 0, 1], 8080)),
        remote: SocketAddr::from(([0, 0, 0, 0], 0)),
    };
    let listen = (TcpState::Close, TcpState::Listen);
    let opened = Transition::scripted(ts_ns, 1, listener, listen, task(200, 5, b"nginx"));
    source.waiting = vec![Record::Transition(opened)];
    monitor.drain(&mut source);
    let batches: Vec<Vec<Record>> = (0..10_100)
        .map(|index| connection(index, &mut ts_ns))
        .collect();
    let (warm_up, measured) = batches.split_at(1_000);
    let mut run = |batches: &[Vec<Record>]| {
        let mut events = 0;
        let mut written = 0;
        for batch in batches {
            events += batch.len();
            source.waiting = batch.clone();
            let allocations = crate::allocations::count(|| monitor.drain(&mut source));
            written += monitor.written().len();
            monitor.written().clear();
            if events > 11_000 {
                assert_eq!(allocations, 0, "{label}: at event {events}");
            }
        }
        (events, written)
    };
    run(warm_up);
    let (events, written) = run(measured);
    assert!(events >= 100_000, "{events} events");
    (events, written)
}
