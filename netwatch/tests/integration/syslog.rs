//! `audit --syslog` against a real rsyslog (Debian's; `cargo xtask test`
//! installs it), which the test starts on a loopback port, stops and
//! starts again.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::metrics::{free_port, scrape, value};
use crate::support::{json_lines, Watch};

/// What the test's rsyslog writes for each message it receives: the
/// RFC 5424 fields as rsyslog parsed them, then the message.
const RECEIVED_FORMAT: &str = "%app-name%|%msgid%|%structured-data%|%msg%\\n";

/// README's rsyslog configuration, which receives netwatch's records on
/// TCP port 514 and writes their JSON to a file.
const README: &str = include_str!("../../../README.md");
/// The first line of that configuration (a comment), which the test leaves out.
const README_CONF_START: &str = "# /etc/rsyslog.d/10-netwatch.conf";

/// README's configuration, with TCP port `port` and the records written to
/// `dir`/records.jsonl, after the test's own: `inputs`, and a file of what
/// rsyslog received with the fields it parsed.
fn rsyslog_conf(dir: &Path, port: u16, inputs: &str) -> String {
    let readme_conf = README
        .split_once(README_CONF_START)
        .and_then(|(_, rest)| rest.split_once('\n'))
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(conf, _)| conf)
        .expect("README shows the rsyslog configuration");
    let readme_conf = readme_conf
        .replace("port=\"514\"", &format!("port=\"{port}\""))
        .replace(
            "/var/log/netwatch/syslog.jsonl",
            &dir.join("records.jsonl").display().to_string(),
        );
    format!(
        r#"global(workDirectory="{dir}" maxMessageSize="64k")
{inputs}
template(name="fields" type="string" string="{RECEIVED_FORMAT}")
if $app-name == "netwatch" then {{
    action(type="omfile" file="{dir}/received.log" template="fields")
}}
{readme_conf}"#,
        dir = dir.display()
    )
}

/// What README's configuration wrote: one JSON record per line.
fn readme_records(dir: &Path) -> Vec<String> {
    written(&dir.join("records.jsonl"))
}

/// A running rsyslogd, stopped (SIGTERM) when dropped.
struct Rsyslog {
    child: Child,
}

impl Rsyslog {
    /// Starts rsyslogd in the foreground with README's configuration on TCP
    /// port `port` and `inputs`, and waits until `ready` holds.
    fn start(dir: &Path, port: u16, inputs: &str, ready: impl Fn() -> bool) -> Rsyslog {
        let conf = dir.join("rsyslog.conf");
        std::fs::write(&conf, rsyslog_conf(dir, port, inputs)).expect("writes the configuration");
        // rsyslogd skips what it cannot parse and runs: check first.
        let check = Command::new("rsyslogd")
            .args(["-N1", "-f"])
            .arg(&conf)
            .output()
            .expect("rsyslogd runs (cargo xtask test installs rsyslog)");
        let said = String::from_utf8_lossy(&check.stderr);
        assert!(
            check.status.success() && !said.contains("error"),
            "the rsyslog configuration is valid: {said}"
        );
        let child = Command::new("rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(&conf)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdout(Stdio::null())
            .spawn()
            .expect("rsyslogd runs (cargo xtask test installs rsyslog)");
        let rsyslog = Rsyslog { child };
        wait_for("rsyslogd to take messages", ready);
        rsyslog
    }

    /// rsyslogd with README's configuration, once it accepts on `port`.
    fn start_tcp(dir: &Path, port: u16) -> Rsyslog {
        Rsyslog::start(dir, port, "", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM; rsyslogd writes what it has and exits.
    fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        // SAFETY: signals the child this test started and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
        }
    }
}

/// One message as rsyslog parsed it.
struct Received {
    app_name: String,
    msgid: String,
    structured_data: String,
    msg: String,
}

fn received(dir: &Path) -> Vec<Received> {
    let text = std::fs::read_to_string(dir.join("received.log")).unwrap_or_default();
    text.lines()
        .map(|line| {
            let mut fields = line.splitn(4, '|');
            let mut next = || fields.next().unwrap_or_default().to_owned();
            Received {
                app_name: next(),
                msgid: next(),
                structured_data: next(),
                msg: next(),
            }
        })
        .collect()
}

/// The audit file's lines.
fn written(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Opens and closes `count` loopback connections; returns the listener's port.
fn connections(count: usize) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binds");
    let port = listener.local_addr().expect("bound").port();
    for _ in 0..count {
        let client = TcpStream::connect(("127.0.0.1", port)).expect("connects");
        let (served, _) = listener.accept().expect("accepts");
        drop(client);
        drop(served);
    }
    port
}

/// Waits (10 s at most) until `done` holds.
fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The conn records of the connections to `port`, in the audit file.
fn conn_records_to(lines: &[String], port: u16) -> usize {
    json_lines(lines.join("\n").as_bytes())
        .iter()
        .filter(|record| {
            record["type"] == "conn"
                && (record["local_port"] == port || record["remote_port"] == port)
        })
        .count()
}

/// `netwatch audit` sending to syslog `target`, writing `file`, serving
/// its metrics on `metrics_port`.
fn audit_to_syslog(target: &str, file: &Path, metrics_port: u16) -> Watch {
    Watch::spawn(&[
        "audit",
        "--syslog",
        target,
        "--output",
        file.to_str().expect("a UTF-8 path"),
        "--metrics",
        &metrics_port.to_string(),
    ])
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("netwatch-syslog-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creates the scratch directory");
    dir
}

#[test]
fn records_reach_rsyslog_once_in_order_and_drops_while_it_is_down_are_counted() {
    let dir = scratch();
    let (syslog_port, metrics_port) = (free_port(), free_port());
    let audit_file = dir.join("audit.jsonl");
    let rsyslog = Rsyslog::start_tcp(&dir, syslog_port);
    let target = format!("tcp://127.0.0.1:{syslog_port}");
    let mut audit = audit_to_syslog(&target, &audit_file, metrics_port);
    // While rsyslog runs: every record arrives.
    let port = connections(20);
    wait_for("the first connections' records", || {
        conn_records_to(&written(&audit_file), port) == 40
    });
    wait_for("rsyslog to receive every record so far", || {
        received(&dir).len() == written(&audit_file).len()
    });
    // rsyslog stops: audit goes on, and what it cannot send is counted.
    let stopped_receiver = rsyslog.pid();
    rsyslog.stop();
    let port = connections(20);
    wait_for("the records made while rsyslog is down", || {
        conn_records_to(&written(&audit_file), port) == 40
    });
    audit.wait_for_stderr("takes no records");
    // rsyslog is back: records flow again.
    let rsyslog = Rsyslog::start_tcp(&dir, syslog_port);
    let before_restart = received(&dir).len();
    let deadline = Instant::now() + Duration::from_secs(10);
    while received(&dir).len() == before_restart {
        assert!(
            Instant::now() < deadline,
            "no record reached the restarted rsyslog"
        );
        connections(1);
        std::thread::sleep(Duration::from_millis(200));
    }
    audit.wait_for_stderr("takes records again");
    let dropped = value(&scrape(metrics_port), "netwatch_syslog_dropped_total", &[])
        .expect("netwatch_syslog_dropped_total is served");
    let stopped = audit.stop();
    assert!(stopped.success, "{}", stopped.stderr);
    rsyslog.stop();

    let written = written(&audit_file);
    let received = received(&dir);
    eprintln!(
        "{} records written, {} received, {dropped} dropped (metric)",
        written.len(),
        received.len()
    );
    let summary: &str = stopped
        .stderr
        .lines()
        .find(|line| line.contains("syslog:") && line.contains("records sent"))
        .expect("a last syslog line");
    let dropped_at_exit: u64 = summary
        .rsplit(", ")
        .next()
        .and_then(|last| last.strip_suffix(" dropped"))
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("a dropped count: {summary}"));
    assert!(
        dropped >= 1.0,
        "records made while rsyslog was down are counted"
    );
    assert!(dropped_at_exit >= dropped as u64);
    // Each message is a parseable RFC 5424 message with netwatch's fields,
    // whose text is exactly a record of the file.
    let mut sequence = 0;
    let mut in_file = written.iter();
    for message in &received {
        assert_eq!(message.app_name, "netwatch");
        let record: Value = serde_json::from_str(&message.msg)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {}", message.msg));
        assert_eq!(record["type"], message.msgid.as_str());
        let expected_sd = format!("[netwatch@32473 type=\"{}\"]", message.msgid);
        assert!(
            message.structured_data.starts_with(&expected_sd),
            "{}",
            message.structured_data
        );
        let id: u64 = message
            .structured_data
            .split("sequenceId=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .and_then(|id| id.parse().ok())
            .expect("a sequenceId");
        assert!(id > sequence, "in order, each once: {id} after {sequence}");
        sequence = id;
        // Once and in order: the received records are the file's, in its
        // order, with the dropped ones left out.
        assert!(
            in_file.any(|line| *line == message.msg),
            "received but not in the file, or out of order: {}",
            message.msg
        );
    }
    // README's configuration wrote each record it received, as JSON.
    let messages: Vec<&str> = received.iter().map(|m| m.msg.as_str()).collect();
    assert_eq!(readme_records(&dir), messages);
    // Each record of the file was received or counted as dropped, but for
    // what netwatch sent while rsyslog was closing: it had stopped reading
    // and not yet closed the connection, and plain TCP syslog has no
    // acknowledgements to tell. Only records about rsyslog's own sockets
    // (its listener closing) are made then.
    let missing: Vec<Value> = written
        .iter()
        .filter(|line| !received.iter().any(|message| message.msg == **line))
        .map(|line| serde_json::from_str(line).expect("JSON"))
        .collect();
    let uncounted = missing.len() as u64 - dropped_at_exit;
    let about_the_closing_receiver = missing
        .iter()
        .filter(|record| record["pid"] == stopped_receiver)
        .count() as u64;
    eprintln!("lost uncounted: {uncounted}; records about the closing rsyslog's sockets not received: {about_the_closing_receiver}");
    assert!(
        uncounted <= about_the_closing_receiver,
        "{uncounted} records missing without a count"
    );
    std::fs::remove_dir_all(&dir).expect("removes the scratch directory");
}

/// A receiver that accepts and never reads, with a small receive buffer.
fn deaf_receiver() -> TcpListener {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binds");
    let small: libc::c_int = 4096;
    // SAFETY: setsockopt on a socket this function owns, with an int of the size given.
    let set = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&listener),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const small).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0, "SO_RCVBUF");
    listener
}

#[test]
fn a_receiver_that_stops_reading_costs_counted_drops_never_records_or_transitions() {
    let dir = scratch();
    let receiver = deaf_receiver();
    let target = format!(
        "tcp://127.0.0.1:{}",
        receiver.local_addr().expect("bound").port()
    );
    let metrics_port = free_port();
    let audit_file = dir.join("audit.jsonl");
    let mut audit = audit_to_syslog(&target, &audit_file, metrics_port);
    // About 10 MB of records: more than the sending socket and the
    // receiver's buffers hold, so that sending blocks.
    const CONNECTIONS: usize = 6000;
    let port = connections(CONNECTIONS);
    audit.wait_for_stderr("takes no records");
    wait_for("drops to be counted", || {
        value(&scrape(metrics_port), "netwatch_syslog_dropped_total", &[])
            .is_some_and(|dropped| dropped > 0.0)
    });
    // The file has every record: the monitor never waited on the receiver.
    wait_for("every record in the file", || {
        conn_records_to(&written(&audit_file), port) == 2 * CONNECTIONS
    });
    // It stops too, within the time left to send what is queued.
    // SAFETY: signals the netwatch child this test started.
    unsafe { libc::kill(audit.pid() as i32, libc::SIGINT) };
    let stopped = audit.wait_exit(Duration::from_secs(20));
    assert!(stopped.success, "{}", stopped.stderr);
    for line in stopped
        .stderr
        .lines()
        .filter(|line| line.contains("syslog"))
    {
        eprintln!("{line}");
    }
    assert!(
        stopped.stderr.contains(", 0 lost ("),
        "no transition lost: {}",
        stopped.stderr
    );
    drop(receiver);
    std::fs::remove_dir_all(&dir).expect("removes the scratch directory");
}

#[test]
fn records_reach_rsyslog_over_udp_and_a_unix_socket() {
    let dir = scratch();
    let udp_port = free_port();
    let socket = dir.join("log.sock");
    // A unix socket of its own, parsed as RFC 5424 (not /dev/log's special
    // parser), with the hostname netwatch sends.
    let inputs = format!(
        r#"module(load="imudp")
input(type="imudp" port="{udp_port}" address="127.0.0.1")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{}" UseSpecialParser="off" ParseHostname="on")"#,
        socket.display()
    );
    let rsyslog = Rsyslog::start(&dir, free_port(), &inputs, || socket.exists());
    for target in [
        format!("udp://127.0.0.1:{udp_port}"),
        format!("unix:{}", socket.display()),
    ] {
        let audit_file = dir.join("audit.jsonl");
        let _ = std::fs::remove_file(&audit_file);
        let audit = audit_to_syslog(&target, &audit_file, free_port());
        let port = connections(5);
        wait_for("the connections' records", || {
            conn_records_to(&written(&audit_file), port) == 10
        });
        // Every record of these connections arrives, parsed, once.
        wait_for(&format!("the records through {target}"), || {
            let messages = received(&dir);
            let ours: Vec<String> = written(&audit_file)
                .into_iter()
                .filter(|line| line.contains(&format!("_port\":{port},")))
                .collect();
            ours.len() >= 10
                && ours
                    .iter()
                    .all(|line| messages.iter().filter(|m| m.msg == *line).count() == 1)
        });
        let stopped = audit.stop();
        assert!(stopped.success, "{}", stopped.stderr);
        assert!(
            stopped.stderr.contains(", 0 dropped"),
            "{target}: {}",
            stopped.stderr
        );
    }
    assert!(received(&dir)
        .iter()
        .all(|message| message.app_name == "netwatch" && !message.msgid.is_empty()));
    rsyslog.stop();
    std::fs::remove_dir_all(&dir).expect("removes the scratch directory");
}
