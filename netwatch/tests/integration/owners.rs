//! Who owns a connection on real server process models: the process that
//! accepts it, and after that whichever process takes it over (fork, fd
//! passing, exec), checked on every transition and owner record netwatch
//! streams, and against `ss -tnp` for nginx and socat from Debian.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{self, Watch};

/// Connections opened to each server.
const CONNECTIONS: usize = 4;

/// A server process group: a model from tests/servers/models.py, or a real
/// server; killed as a group when dropped.
struct Server {
    child: Child,
    lines: Option<Receiver<String>>,
    port: u16,
}

impl Server {
    /// Starts `models.py MODEL` and reads its port.
    fn model(model: &str) -> Server {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/servers/models.py");
        let mut command = Command::new("python3");
        command.args([script, model]).stdout(Stdio::piped());
        let mut server = Server::spawn(command, 0);
        let listening = server.line();
        let port = listening
            .strip_prefix("listening ")
            .and_then(|rest| rest.split(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("models.py {model} said {listening:?}"));
        server.port = port;
        server
    }

    /// Starts `command` (in a process group of its own) and waits until
    /// something accepts connections on `port`, when one is given.
    fn spawn(mut command: Command, port: u16) -> Server {
        command.process_group(0).stdin(Stdio::null());
        let mut child = command.spawn().expect("the server starts");
        let lines = child.stdout.take().map(support::lines_of);
        let server = Server { child, lines, port };
        if port != 0 {
            let deadline = Instant::now() + Duration::from_secs(10);
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "the server listens on {port}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        server
    }

    /// Debian's socat forking a child per connection, each echoing
    /// through a `cat` of its own, on a free loopback port.
    fn socat_echo() -> Server {
        let port = free_port();
        let mut command = Command::new("socat");
        command.args([
            &format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"),
            "EXEC:cat",
        ]);
        Server::spawn(command, port)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line the model printed (10 s at most).
    fn line(&mut self) -> String {
        let lines = self.lines.as_ref().expect("the model's stdout is piped");
        lines
            .recv_timeout(Duration::from_secs(10))
            .expect("the server model prints a line within 10 s")
    }

    /// The pid that serves each connection, by peer port, as the model says.
    fn serving(&mut self, count: usize) -> HashMap<u16, u32> {
        (0..count)
            .map(|_| {
                let line = self.line();
                let mut words = line
                    .strip_prefix("serving ")
                    .expect("a serving line")
                    .split(' ');
                let mut number = || words.next().and_then(|word| word.parse().ok());
                let (port, pid) = (number().expect("a port"), number().expect("a pid"));
                (port as u16, pid)
            })
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signals the process group this test started.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Opens `count` connections to `port`, sends `request` on each and reads
/// until the answer ends with `answer_end`; keeps them open.
fn connect(port: u16, count: usize, request: &[u8], answer_end: &[u8]) -> Vec<TcpStream> {
    (0..count)
        .map(|_| {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connects");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("a timeout");
            stream.write_all(request).expect("sends the request");
            let mut answer = Vec::new();
            let mut buffer = [0u8; 4096];
            while !answer.ends_with(answer_end) {
                let read = stream.read(&mut buffer).expect("the server answers");
                assert!(read > 0, "the server closed before answering");
                answer.extend_from_slice(&buffer[..read]);
            }
            stream
        })
        .collect()
}

/// The local port of each stream.
fn local_ports(streams: &[TcpStream]) -> Vec<u16> {
    streams
        .iter()
        .map(|stream| stream.local_addr().expect("bound").port())
        .collect()
}

/// The state and owner records of one socket, in order.
fn records_of(records: &[Value], local_port: u16, remote_port: u16) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| r["type"] == "state" || r["type"] == "owner")
        .filter(|r| r["local_port"] == local_port && r["remote_port"] == remote_port)
        .collect()
}

fn closed(records: &[Value], local_port: u16, remote_port: u16) -> bool {
    records_of(records, local_port, remote_port)
        .iter()
        .any(|r| r["new_state"] == "CLOSE")
}

/// How an accepted connection changes hands.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Takeover {
    /// The listener's owner accepts and serves it: no owner record.
    Never,
    /// Another process accepts it (a pre-forked worker).
    Accept,
    /// The listener's owner accepts it, another process then uses it.
    Handoff,
}

/// Where netwatch learns an accepted socket's owner.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Hook {
    /// By default: at the first send or receive on it.
    FirstIo,
    /// With `--accept-hook`: when accept() returns it.
    Accept,
}

impl Hook {
    /// netwatch's flags for this hook.
    fn flags(self) -> &'static [&'static str] {
        match self {
            Hook::FirstIo => &[],
            Hook::Accept => &["--accept-hook"],
        }
    }

    /// The cause of the one owner record a takeover makes, if it makes one:
    /// without the hook, the first process to use the socket is its first
    /// owner, whether it accepted the socket or was handed it.
    fn cause(self, takeover: Takeover) -> Option<&'static str> {
        match (self, takeover) {
            (_, Takeover::Never) => None,
            (Hook::FirstIo, _) => Some("first_io"),
            (Hook::Accept, Takeover::Accept) => Some("accept"),
            (Hook::Accept, Takeover::Handoff) => Some("handoff"),
        }
    }
}

/// Checks one server-side socket: the transitions before its owner is
/// known name the listener's owner, the owner records are exactly what
/// `takeover` makes under `hook`, and every transition after them names
/// `server` running `program`.
fn check_server_socket(
    records: &[&Value],
    listener_owner: u32,
    (server, program): (u32, &str),
    takeover: Takeover,
    hook: Hook,
) {
    let owners: Vec<&&Value> = records.iter().filter(|r| r["type"] == "owner").collect();
    match hook.cause(takeover) {
        None => assert!(owners.is_empty(), "no owner record: {owners:#?}"),
        Some(cause) => {
            assert_eq!(owners.len(), 1, "one owner record: {records:#?}");
            let owner = owners[0];
            assert_eq!(owner["cause"], cause, "{owner}");
            assert_eq!(owner["old_pid"], listener_owner, "{owner}");
            assert_eq!(
                (&owner["pid"], &owner["program"]),
                (&server.into(), &program.into()),
                "{owner}"
            );
        }
    }
    let taken = records
        .iter()
        .position(|r| r["type"] == "owner")
        .unwrap_or(2);
    let (before, after) = records.split_at(taken);
    let steps: Vec<(&Value, &Value)> = before
        .iter()
        .map(|r| (&r["old_state"], &r["new_state"]))
        .collect();
    assert_eq!(
        steps,
        [
            (&"LISTEN".into(), &"SYN_RECV".into()),
            (&"SYN_RECV".into(), &"ESTABLISHED".into())
        ],
        "the socket is established before accept() returns it: {records:#?}"
    );
    for record in before {
        assert_eq!(record["pid"], listener_owner, "before accept: {record}");
    }
    let states: Vec<&&Value> = after.iter().filter(|r| r["type"] == "state").collect();
    assert!(
        states.iter().any(|r| r["new_state"] == "CLOSE"),
        "the close is seen: {records:#?}"
    );
    for record in states {
        assert_eq!(
            (&record["pid"], &record["program"]),
            (&server.into(), &program.into()),
            "after accept: {record}"
        );
    }
}

/// Runs a server model under `netwatch --json`, opens connections, closes
/// them, and checks every record of both ends.
fn owners_follow(model: &str, program: &str, takeover: Takeover, hook: Hook) {
    let mut server = Server::model(model);
    let port = server.port;
    let port_text = port.to_string();
    let mut watch = Watch::start(&[&["--port", &port_text], hook.flags()].concat());
    let clients = connect(port, CONNECTIONS, b"hello\n", b"\n");
    let serving = server.serving(CONNECTIONS);
    let peers = local_ports(&clients);
    drop(clients);
    watch.wait_until(|records| peers.iter().all(|&peer| closed(records, port, peer)));
    let records = watch.stop().records;
    for peer in peers {
        let pid = serving[&peer];
        check_server_socket(
            &records_of(&records, port, peer),
            server.pid(),
            (pid, program),
            takeover,
            hook,
        );
        let client = records_of(&records, peer, port);
        assert!(!client.is_empty());
        for record in client {
            assert_eq!(
                record["pid"],
                std::process::id(),
                "the client end: {record}"
            );
        }
    }
}

#[test]
fn prefork_workers_own_what_they_accept() {
    owners_follow("prefork", "python3", Takeover::Accept, Hook::FirstIo);
}

#[test]
fn prefork_workers_own_what_they_accept_from_the_accept_with_the_hook() {
    owners_follow("prefork", "python3", Takeover::Accept, Hook::Accept);
}

#[test]
fn a_forked_child_owns_what_its_parent_accepted() {
    owners_follow("fork", "python3", Takeover::Handoff, Hook::FirstIo);
}

#[test]
fn a_forked_child_takes_over_from_its_accepting_parent_with_the_hook() {
    owners_follow("fork", "python3", Takeover::Handoff, Hook::Accept);
}

#[test]
fn an_fd_passed_over_a_unix_socket_changes_owner() {
    owners_follow("scm", "python3", Takeover::Handoff, Hook::FirstIo);
}

#[test]
fn threads_of_one_process_are_one_owner() {
    owners_follow("threads", "python3", Takeover::Never, Hook::FirstIo);
}

#[test]
fn the_program_name_follows_exec() {
    owners_follow("exec", "cat", Takeover::Handoff, Hook::FirstIo);
}

#[test]
fn audit_records_name_the_last_owner_and_say_it_changed() {
    let mut server = Server::model("fork");
    let port = server.port;
    let mut audit = Watch::spawn(&["audit"]);
    let clients = connect(port, CONNECTIONS, b"hello\n", b"\n");
    let serving = server.serving(CONNECTIONS);
    drop(clients);
    let conn = |r: &Value, direction: &str| r["type"] == "conn" && r["direction"] == direction;
    let accepted = |r: &Value| conn(r, "in") && r["local_port"] == port;
    audit.wait_until(|records| records.iter().filter(|r| accepted(r)).count() == CONNECTIONS);
    let records = audit.stop_with(libc::SIGTERM).records;
    for record in records.iter().filter(|r| accepted(r)) {
        let peer = record["remote_port"].as_u64().expect("a port") as u16;
        assert_eq!(record["pid"], serving[&peer], "{record}");
        assert_eq!(record["owner_changed"], true, "{record}");
        assert_eq!(record["schema"], 2, "{record}");
    }
    let connected: Vec<&Value> = records
        .iter()
        .filter(|r| conn(r, "out") && r["remote_port"] == port)
        .collect();
    assert_eq!(connected.len(), CONNECTIONS);
    for record in connected {
        assert_eq!(
            (&record["pid"], &record["owner_changed"]),
            (&std::process::id().into(), &false.into()),
            "{record}"
        );
    }
}

#[test]
fn the_owner_follows_a_socket_to_a_child_and_back() {
    let server = Server::model("pingpong");
    let port = server.port;
    let mut watch = Watch::start(&["--port", &port.to_string()]);
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connects");
    let mut reader = std::io::BufReader::new(client.try_clone().expect("a clone"));
    let mut answers = Vec::new();
    for _ in 0..3 {
        client.write_all(b"who?\n").expect("sends");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).expect("an answer");
        answers.push(line.trim().parse::<u64>().expect("a pid"));
    }
    let peer = client.local_addr().expect("bound").port();
    drop((client, reader));
    let parent = u64::from(server.pid());
    assert_eq!(answers[0], parent);
    assert_eq!(answers[2], parent);
    let child = answers[1];
    watch.wait_until(|records| closed(records, port, peer));
    let records = watch.stop().records;
    let socket = records_of(&records, port, peer);
    let owners: Vec<(&Value, &Value, &Value)> = socket
        .iter()
        .filter(|r| r["type"] == "owner")
        .map(|r| (&r["cause"], &r["old_pid"], &r["pid"]))
        .collect();
    assert_eq!(
        owners,
        [
            (&"handoff".into(), &parent.into(), &child.into()),
            (&"handoff".into(), &child.into(), &parent.into())
        ],
        "{socket:#?}"
    );
    let last = socket.last().expect("records");
    assert_eq!(
        (&last["new_state"], &last["pid"]),
        (&"CLOSE".into(), &parent.into())
    );
}

/// The pid `ss -tnp` shows for each established server-side socket on
/// `port`, by peer port: exactly one holder each.
fn ss_owners(port: u16) -> HashMap<u16, u32> {
    let output = Command::new("ss")
        .args(["-tnpH", "state", "established", &format!("sport = :{port}")])
        .output()
        .expect("ss runs");
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .map(|line| {
            let peer: u16 = line
                .split_whitespace()
                .nth(3)
                .and_then(|peer| peer.rsplit(':').next()?.parse().ok())
                .unwrap_or_else(|| panic!("ss line {line:?}"));
            let pids: Vec<u32> = line
                .split("pid=")
                .skip(1)
                .filter_map(|rest| rest.split(',').next()?.parse().ok())
                .collect();
            assert_eq!(pids.len(), 1, "one holder: {line}");
            (peer, pids[0])
        })
        .collect()
}

/// A free port on 127.0.0.1, for a server that takes its port from a config.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binds");
    listener.local_addr().expect("bound").port()
}

/// Holds connections to a real server, compares the owner of each
/// server-side socket with `ss -tnp`, closes them, and checks that every
/// transition from the accept on names that process.
fn real_server_matches_ss(
    server: &Server,
    program: &str,
    request: &[u8],
    answer_end: &[u8],
    takeover: Takeover,
) {
    let port = server.port;
    let mut watch = Watch::start(&["--port", &port.to_string()]);
    let clients = connect(port, CONNECTIONS, request, answer_end);
    let peers = local_ports(&clients);
    let ss = ss_owners(port);
    drop(clients);
    watch.wait_until(|records| peers.iter().all(|&peer| closed(records, port, peer)));
    let records = watch.stop().records;
    for peer in peers {
        let held_by = *ss
            .get(&peer)
            .unwrap_or_else(|| panic!("ss lists the connection from {peer}: {ss:?}"));
        assert_ne!(
            held_by,
            server.pid(),
            "the listener's owner does not hold it"
        );
        check_server_socket(
            &records_of(&records, port, peer),
            server.pid(),
            (held_by, program),
            takeover,
            Hook::FirstIo,
        );
    }
}

/// An HTTP request nginx answers with "ok\n" on a keep-alive connection.
const HTTP_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";

/// nginx from Debian with 2 workers on a free port, its files in `dir`.
fn nginx(dir: &str) -> Server {
    let port = free_port();
    let command = xtask::servers::nginx(Path::new(dir), port, 2).expect("writes the config");
    Server::spawn(command, port)
}

#[test]
fn nginx_workers_own_their_connections_as_ss_shows() {
    let dir = tempdir("nginx");
    let server = nginx(&dir);
    real_server_matches_ss(&server, "nginx", HTTP_REQUEST, b"ok\n", Takeover::Accept);
}

#[test]
fn audit_gives_the_command_line_nginx_workers_wrote_over_their_arguments() {
    let dir = tempdir("nginx-cmdline");
    let server = nginx(&dir);
    let mut audit = Watch::spawn(&["audit"]);
    let held = connect(server.port, CONNECTIONS, HTTP_REQUEST, b"ok\n");
    let port = server.port;
    let served = |records: &[Value]| -> Vec<Value> {
        records
            .iter()
            .filter(|r| r["type"] == "conn" && r["local_port"] == port)
            .cloned()
            .collect()
    };
    // /proc while the workers run: what nginx wrote over its arguments.
    let workers: HashMap<u32, Value> = support::children_of(server.pid())
        .into_iter()
        .map(|pid| (pid, support::proc_cmdline(pid)))
        .collect();
    drop(held);
    audit.wait_until(|records| served(records).len() == CONNECTIONS);
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
    let records = served(&audit.stop().records);
    for record in &records {
        let pid = record["pid"]
            .as_u64()
            .and_then(|pid| u32::try_from(pid).ok());
        let cmdline = pid.and_then(|pid| workers.get(&pid));
        let cmdline = cmdline.unwrap_or_else(|| panic!("not a worker's: {record}"));
        assert_eq!(&record["cmdline"], cmdline, "{record}");
        let first = cmdline[0].as_str().unwrap_or_default();
        assert!(first.starts_with("nginx: worker process"), "{cmdline}");
    }
}

#[test]
fn socat_fork_children_own_their_connections_as_ss_shows() {
    let server = Server::socat_echo();
    real_server_matches_ss(&server, "socat", b"hello\n", b"hello\n", Takeover::Handoff);
}

/// A fresh directory under the system's temporary directory.
fn tempdir(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("netwatch-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creates the directory");
    dir.to_string_lossy().into_owned()
}

#[test]
fn verify_finds_no_drift_on_these_servers() {
    let mut servers: Vec<Server> = ["prefork", "fork", "scm", "exec"]
        .into_iter()
        .map(Server::model)
        .collect();
    let nginx_dir = tempdir("nginx-verify");
    let nginx = nginx(&nginx_dir);
    let verify = Watch::spawn(&["verify", "--json", "--interval", "1", "--duration", "4"]);
    // Accepted after verify started: their owners come from owner events.
    let mut held: Vec<TcpStream> = servers
        .iter_mut()
        .flat_map(|server| {
            let streams = connect(server.port, CONNECTIONS, b"hello\n", b"\n");
            server.serving(CONNECTIONS);
            streams
        })
        .collect();
    held.extend(connect(nginx.port, CONNECTIONS, HTTP_REQUEST, b"ok\n"));
    let stopped = verify.wait_exit(Duration::from_secs(30));
    drop(held);
    drop(nginx);
    let _ = std::fs::remove_dir_all(nginx_dir);
    assert!(
        stopped.success,
        "verify found persisting drift: {}",
        stopped.stderr
    );
    let reports = support::drift_reports(&stopped.records);
    assert!(reports.len() >= 3, "a report per interval: {reports:#?}");
    for report in reports {
        assert_eq!(report["pid_mismatch"], 0, "{report}");
    }
}

#[test]
fn the_snapshot_lists_every_process_holding_a_socket_as_ss_does() {
    let server = Server::model("prefork");
    let port = server.port.to_string();
    let output = Command::new("ss")
        .args(["-tlnpH", &format!("sport = :{port}")])
        .output()
        .expect("ss runs");
    let ss_line = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut ss_pids: Vec<u64> = ss_line
        .split("pid=")
        .skip(1)
        .filter_map(|rest| rest.split(',').next()?.parse().ok())
        .collect();
    ss_pids.sort_unstable();
    assert_eq!(ss_pids.len(), 3, "the master and 2 workers: {ss_line}");
    let listeners = support::snapshot_json(&["snapshot", "-tlnp", "--json", "--port", &port]);
    assert_eq!(listeners.len(), 1, "{listeners:#?}");
    let listener = &listeners[0];
    assert_eq!(listener["pids"], serde_json::json!(ss_pids), "{listener}");
    assert_eq!(
        listener["pid"],
        u64::from(server.pid()),
        "the lowest, as netstat shows"
    );
}

#[test]
fn an_owner_that_execs_is_renamed_on_its_sockets() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binds");
    let port = listener.local_addr().expect("bound").port();
    let mut watch = Watch::start(&["--port", &port.to_string()]);
    // Connects, then execs sleep, which inherits the socket and closes it when it exits.
    let script = format!(
        "import os, socket\n\
         s = socket.create_connection(('127.0.0.1', {port}))\n\
         s.set_inheritable(True)\n\
         print(s.getsockname()[1], flush=True)\n\
         os.execvp('sleep', ['sleep', '0.3'])\n"
    );
    let client = Command::new("python3")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .output()
        .expect("python3 runs");
    assert!(client.status.success());
    let peer: u16 = String::from_utf8_lossy(&client.stdout)
        .trim()
        .parse()
        .expect("the client's port");
    watch.wait_until(|records| {
        records_of(records, peer, port)
            .iter()
            .any(|r| r["new_state"] == "FIN_WAIT1")
    });
    drop(listener);
    let records = watch.stop().records;
    let client_end = records_of(&records, peer, port);
    let opened = client_end.first().expect("the connect");
    assert_eq!(opened["program"], "python3", "{opened}");
    let closing = client_end
        .iter()
        .find(|r| r["new_state"] == "FIN_WAIT1")
        .expect("the close");
    assert_eq!(closing["pid"], opened["pid"], "exec keeps the pid");
    assert_eq!(closing["program"], "sleep", "{closing}");
}

#[test]
fn verify_finds_no_drift_while_new_connects_go_to_a_busy_port() {
    let mut server = Server::model("threads");
    let port = server.port;
    let held = connect(port, 200, b"hello\n", b"\n");
    server.serving(200);
    let verify = Watch::spawn(&["verify", "--json", "--interval", "1", "--duration", "5"]);
    // A new connection to the same port every 5 ms: each is seen without a
    // local port at first, during the snapshots too.
    let deadline = Instant::now() + Duration::from_millis(5500);
    while Instant::now() < deadline {
        drop(connect(port, 1, b"hello\n", b"\n"));
        std::thread::sleep(Duration::from_millis(5));
    }
    let stopped = verify.wait_exit(Duration::from_secs(30));
    drop(held);
    assert!(
        stopped.success,
        "verify found persisting drift: {}",
        stopped.stderr
    );
    for report in support::drift_reports(&stopped.records) {
        assert_eq!(report["persisting"], 0, "{report}");
    }
}

#[test]
fn socat_children_that_exit_at_once_are_named_by_their_command_line() {
    // Each child serves one line and exits, often before /proc is read:
    // about 60% of them were named when only /proc gave command lines.
    const EXCHANGES: usize = 200;
    let mut audit = Watch::spawn(&["audit"]);
    let server = Server::socat_echo();
    let port = server.port;
    // One at a time, each closed once answered: its child exits then.
    for _ in 0..EXCHANGES {
        drop(connect(port, 1, b"hello\n", b"hello\n"));
    }
    let served = |records: &[Value]| -> Vec<Value> {
        crate::cmdline::conns_on(records, port)
            .into_iter()
            .filter(|record| record["local_port"] == port)
            .cloned()
            .collect()
    };
    audit.wait_until(|records| served(records).len() > EXCHANGES);
    let records = audit.stop().records;
    drop(server);
    let served = served(&records);
    let unnamed: Vec<&Value> = served
        .iter()
        .filter(|record| record["cmdline"].get(0) != Some(&Value::from("socat")))
        .collect();
    assert!(
        unnamed.is_empty(),
        "{} of {} children's records without socat's command line, as {}",
        unnamed.len(),
        served.len(),
        unnamed[0]
    );
}
