//! `--metrics`: Prometheus' text format, read by a Prometheus parser.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use prometheus_parse::{Scrape, Value};

use crate::peer::Peer;
use crate::support::{set_fd_limit, Watch};

/// A loopback port free at the time of asking.
pub(crate) fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("bound").port()
}

/// Scrapes /metrics on the loopback port and parses what it serves.
pub(crate) fn scrape(port: u16) -> Scrape {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("metrics are served");
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains("application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    Scrape::parse(body.lines().map(|line| Ok(line.to_owned()))).expect("Prometheus text format")
}

/// The value of the sample `name` whose labels include `labels`.
pub(crate) fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[test]
fn a_port_alone_is_served_on_loopback_and_another_address_is_warned_about() {
    let port = free_port();
    let watch = Watch::start(&["--metrics", &port.to_string()]);
    assert!(
        !watch.started.contains("no authentication"),
        "{}",
        watch.started
    );
    assert!(value(&scrape(port), "netwatch_resyncs_total", &[]).is_some());
    drop(watch);
    let open = format!("0.0.0.0:{}", free_port());
    let watch = Watch::start(&["--metrics", &open]);
    assert!(
        watch.started.contains("has no authentication"),
        "{}",
        watch.started
    );
}

#[test]
fn watch_serves_transitions_losses_sockets_and_ring_size() {
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut watch = Watch::start(&["--metrics", &metrics, "--ring-buffer-kib", "1024"]);
    let mut peer = Peer::spawn();
    let (_, listen_port) = peer.listen("127.0.0.1:0");
    peer.send("exchange 5 10");
    watch.wait_until(|records| {
        records
            .iter()
            .filter(|r| r["new_state"] == "LAST_ACK")
            .count()
            >= 5
    });
    std::thread::sleep(Duration::from_millis(1200));
    let scrape = scrape(port);
    let transitions = |old, new| {
        value(
            &scrape,
            "netwatch_transitions_total",
            &[("old_state", old), ("new_state", new)],
        )
    };
    assert!(transitions("CLOSE", "SYN_SENT") >= Some(5.0));
    assert!(
        transitions("CLOSE", "LISTEN") >= Some(2.0),
        "both peers' listeners"
    );
    assert!(transitions("LAST_ACK", "CLOSE") >= Some(5.0));
    assert_eq!(
        value(
            &scrape,
            "netwatch_lost_events_total",
            &[("cause", "ring_buffer_full")]
        ),
        Some(0.0)
    );
    assert_eq!(value(&scrape, "netwatch_resyncs_total", &[]), Some(0.0));
    assert!(
        value(&scrape, "netwatch_sockets", &[("state", "LISTEN")]) >= Some(2.0),
        "port {listen_port} and the exchange's listener"
    );
    assert_eq!(
        value(&scrape, "netwatch_ring_buffer_capacity_bytes", &[]),
        Some(1024.0 * 1024.0)
    );
    let kinds: Vec<_> = scrape.docs.keys().collect();
    assert!(kinds.len() >= 8, "every family documented: {kinds:?}");
    watch.stop();
}

#[test]
fn audit_counts_its_records() {
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut audit = Watch::spawn(&["audit", "--metrics", &metrics]);
    let mut peer = Peer::spawn();
    peer.send("exchange 3 10");
    audit.wait_until(|records| records.iter().filter(|r| r["type"] == "conn").count() >= 6);
    let scrape = scrape(port);
    assert!(value(&scrape, "netwatch_audit_records_total", &[("type", "conn")]) >= Some(6.0));
    assert!(
        value(
            &scrape,
            "netwatch_audit_records_total",
            &[("type", "listen")]
        ) >= Some(1.0)
    );
    audit.stop();
}

/// CPU seconds (user + system) the thread of process `pid` named `name`
/// has used: the metrics server's own, apart from the work on transitions
/// that the other tests cause meanwhile.
fn thread_cpu_seconds(pid: u32, name: &str) -> f64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("its threads");
    let stat = tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("stat")).ok())
        .find(|stat| stat.contains(&format!("({name})")))
        .unwrap_or_else(|| panic!("process {pid} has a thread named {name}"));
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .expect("a stat line")
        .1
        .split(' ')
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn a_flood_of_idle_connections_neither_stops_nor_slows_netwatch() {
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let verify = Watch::spawn(&["verify", "--json", "--interval", "1", "--metrics", &metrics]);
    // systemd's default soft limit, set after netwatch raised its own.
    set_fd_limit(verify.pid(), Some(1024));
    set_fd_limit(0, None);
    let cpu_before = thread_cpu_seconds(verify.pid(), "metrics");
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let flood: Vec<TcpStream> = (0..2000)
        .filter_map(|_| TcpStream::connect_timeout(&target, Duration::from_secs(2)).ok())
        .collect();
    assert!(flood.len() > 1000, "the flood connected: {}", flood.len());
    std::thread::sleep(Duration::from_secs(2));
    let cpu = thread_cpu_seconds(verify.pid(), "metrics") - cpu_before;
    assert!(
        cpu < 0.5,
        "the metrics server spent {cpu:.2} s of CPU in the flood"
    );
    let started = std::time::Instant::now();
    let answered = scrape(port);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a scrape took {:?}",
        started.elapsed()
    );
    assert!(value(&answered, "netwatch_drift_sockets", &[]).is_some());
    let mut head = TcpStream::connect(("127.0.0.1", port)).expect("connects");
    write!(head, "HEAD /metrics?x=1 HTTP/1.1\r\n\r\n").unwrap();
    let mut response = String::new();
    head.read_to_string(&mut response).unwrap();
    assert!(
        response.starts_with("HTTP/1.1 200") && response.ends_with("\r\n\r\n"),
        "{response}"
    );
    drop(flood);
    // Stopped, not timed: a flood that fills the backlog can take longer
    // than any fixed --duration on a loaded machine.
    let stopped = verify.stop();
    assert!(
        stopped.success,
        "verify kept running and passed: {}",
        stopped.stderr
    );
}
