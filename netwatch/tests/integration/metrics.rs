//! `--metrics`: the classic Prometheus text format (read by a Prometheus
//! parser and by `promtool`), OpenMetrics when asked for, and a Prometheus
//! server from Debian that scrapes netwatch and answers a query.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prometheus_parse::{Scrape, Value};

use crate::peer::Peer;
use crate::support::{set_fd_limit, Watch};

/// A loopback port free at the time of asking.
pub(crate) fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("bound").port()
}

/// Whether the other end closed or reset this connection (without waiting).
fn closed_by_peer(mut stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).expect("a socket");
    let mut byte = [0u8];
    match stream.read(&mut byte) {
        Ok(read) => read == 0,
        Err(error) => error.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// GET /metrics on the loopback port with these extra header lines: the
/// response's head and body.
fn get_metrics(port: u16, headers: &str) -> (String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("metrics are served");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    (head.to_owned(), body.to_owned())
}

/// Scrapes /metrics on the loopback port as curl would (no Accept header)
/// and parses what it serves: the classic text format.
pub(crate) fn scrape(port: u16) -> Scrape {
    let (head, body) = get_metrics(port, "");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
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
    // Had the server accepted them, it would have closed all but its last
    // MAX_CONNECTIONS (64) by now: the kernel holds them unseen.
    let closed = flood.iter().filter(|stream| closed_by_peer(stream)).count();
    assert_eq!(closed, 0, "the server closed idle connections it accepted");
    let cpu = thread_cpu_seconds(verify.pid(), "metrics") - cpu_before;
    eprintln!("the metrics thread used {cpu:.3} s of CPU in the idle flood");
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

#[test]
fn promtool_finds_nothing_to_say_and_openmetrics_comes_when_asked_for() {
    let port = free_port();
    let watch = Watch::start(&["--metrics", &port.to_string()]);
    let (_, classic) = get_metrics(port, "");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (Debian's prometheus)");
    promtool
        .stdin
        .take()
        .expect("piped")
        .write_all(classic.as_bytes())
        .expect("promtool reads");
    let checked = promtool.wait_with_output().expect("promtool ends");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(checked.status.success(), "{said}\n{classic}");
    assert_eq!(said.trim(), "", "{classic}");
    assert!(!classic.contains("# EOF"));
    let prometheus_accept = "Accept: application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n";
    let (head, open_metrics) = get_metrics(port, prometheus_accept);
    assert!(
        head.contains("application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(open_metrics.ends_with("# EOF\n"), "{open_metrics}");
    drop(watch);
}

/// Debian's Prometheus server on a free loopback port, scraping `target`
/// every second, its data in a fresh directory; killed when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn start(target: u16) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("netwatch-prometheus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a data directory");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{ scrape_interval: 1s }}\nscrape_configs:\n  - job_name: netwatch\n    static_configs: [{{ targets: ['127.0.0.1:{target}'] }}]\n"
            ),
        )
        .expect("writes the config");
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus runs (Debian's prometheus)");
        Prometheus { child, port, dir }
    }

    /// The result of an instant PromQL query, as JSON (None until it answers).
    fn query(&self, promql: &str) -> Option<serde_json::Value> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => char::from(b).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        write!(
            stream,
            "GET /api/v1/query?query={encoded} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (_, body) = response.split_once("\r\n\r\n")?;
        serde_json::from_str(body).ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_prometheus_server_scrapes_netwatch_and_answers_for_its_transitions() {
    let port = free_port();
    let watch = Watch::start(&["--metrics", &port.to_string()]);
    let mut peer = Peer::spawn();
    peer.listen("127.0.0.1:0");
    let prometheus = Prometheus::start(port);
    let query = r#"sum(netwatch_transitions_total{old_state="CLOSE",new_state="LISTEN"})"#;
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        let answer = prometheus.query(query);
        let value = answer.as_ref().and_then(|answer| {
            answer["data"]["result"][0]["value"][1]
                .as_str()?
                .parse::<f64>()
                .ok()
        });
        if value.is_some_and(|value| value >= 1.0) {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus answered {answer:?} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let up = prometheus.query(r#"up{job="netwatch"}"#);
    assert_eq!(
        up.as_ref()
            .map(|up| up["data"]["result"][0]["value"][1].clone()),
        Some("1".into()),
        "{up:?} {answer:?}"
    );
    drop(watch);
}

/// Clients that connect to `port`, optionally send `sends`, wait for the
/// server to close, and connect again, until `until`; how many connections
/// they made.
fn reconnecting_clients(port: u16, clients: u64, sends: &'static [u8], until: Instant) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let tasks: Vec<_> = (0..clients)
            .map(|_| tokio::spawn(reconnect_until(port, sends, until)))
            .collect();
        let mut connections = 0;
        for task in tasks {
            connections += task.await.unwrap_or(0);
        }
        connections
    })
}

async fn reconnect_until(port: u16, sends: &'static [u8], until: Instant) -> u64 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let until = tokio::time::Instant::from_std(until);
    let mut connections = 0;
    while tokio::time::Instant::now() < until {
        let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
        let Ok(Ok(mut stream)) = tokio::time::timeout_at(until, connect).await else {
            break;
        };
        connections += 1;
        if !sends.is_empty() && stream.write_all(sends).await.is_err() {
            continue;
        }
        let mut buffer = [0u8; 4096];
        // Until the server closes it (or the flood ends).
        while let Ok(Ok(read)) = tokio::time::timeout_at(until, stream.read(&mut buffer)).await {
            if read == 0 {
                break;
            }
        }
    }
    connections
}

#[test]
fn floods_that_reconnect_cost_the_endpoint_little_and_scrapes_still_answer() {
    const FLOOD: Duration = Duration::from_secs(6);
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let verify = Watch::spawn(&["verify", "--json", "--interval", "1", "--metrics", &metrics]);
    // systemd's default soft limit, set after netwatch raised its own.
    set_fd_limit(verify.pid(), Some(1024));
    set_fd_limit(0, None);
    scrape(port);
    let cpu_before = thread_cpu_seconds(verify.pid(), "metrics");
    let until = Instant::now() + FLOOD;
    // Idle clients, clients that send a byte of a request and no more, and
    // clients that send a whole request and read its answer: each kind
    // connects again as soon as the server closes it.
    const IDLE: u64 = 3000;
    let started = Instant::now();
    let floods: Vec<_> = [
        (IDLE, &b""[..]),
        (300, &b"G"[..]),
        (100, &b"GET /metrics HTTP/1.1\r\n\r\n"[..]),
    ]
    .into_iter()
    .map(|(clients, sends)| {
        let flood = std::thread::spawn(move || reconnecting_clients(port, clients, sends, until));
        (clients, flood)
    })
    .collect();
    std::thread::sleep(Duration::from_secs(1));
    let mut slowest = Duration::ZERO;
    while Instant::now() + Duration::from_secs(1) < until {
        let started = Instant::now();
        let answered = scrape(port);
        slowest = slowest.max(started.elapsed());
        assert!(value(&answered, "netwatch_drift_sockets", &[]).is_some());
        std::thread::sleep(Duration::from_millis(200));
    }
    let cpu = thread_cpu_seconds(verify.pid(), "metrics") - cpu_before;
    let made: Vec<(u64, u64)> = floods
        .into_iter()
        .map(|(clients, flood)| (clients, flood.join().unwrap()))
        .collect();
    let connections: u64 = made.iter().map(|(_, made)| made).sum();
    let flooded = started.elapsed().as_secs_f64();
    assert!(
        connections > 3400,
        "the clients connected: {connections} connections"
    );
    // Each client connects again only once the server has closed its last
    // connection, which it accepted first: an idle client never again.
    let (_, idle) = made[0];
    assert!(
        idle <= IDLE,
        "the server accepted {} idle connections",
        idle - IDLE
    );
    // What the server costs follows from its accepts (about 50 µs each on
    // a quiet machine); their budget is exact, whatever the machine's load.
    let accepted: u64 = made[1..]
        .iter()
        .map(|(clients, made)| made - clients.min(made))
        .sum();
    let budget = 64.0 + 700.0 * flooded;
    assert!(
        accepted as f64 <= budget,
        "the server accepted {accepted} connections in {flooded:.1} s, beyond its budget of {budget:.0}"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "the slowest scrape took {slowest:?}"
    );
    eprintln!("{connections} connections in {flooded:.1} s, {accepted} of them accepted: the metrics thread used {cpu:.3} s of CPU, the slowest scrape took {slowest:?}");
    let stopped = verify.stop();
    assert!(stopped.success, "verify passed: {}", stopped.stderr);
}
