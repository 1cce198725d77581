//! Command lines: `snapshot --cmdline`, the stream's `--cmdline` and
//! audit's `cmdline` and `exe` give a process's arguments exactly (spaces,
//! quotes, an empty one, bytes that are not UTF-8), and a reused pid never
//! gives the line of the process that had it before.

use std::ffi::OsStr;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::ffi::OsStrExt as _;
use std::process::{Child, ChildStdin, Command, Stdio};

use serde_json::{json, Value};

use crate::support::{run_netwatch, snapshot_json, Watch};

const PYTHON: &str = "/usr/bin/python3";

/// Listens, prints its port, then at each line on stdin connects to itself
/// once (both ends closed at once); exits at end of input.
const CONNECTOR: &str = "
import socket, sys
listener = socket.socket()
listener.bind(('127.0.0.1', 0))
listener.listen()
port = listener.getsockname()[1]
print(port, flush=True)
for _ in sys.stdin:
    client = socket.create_connection(('127.0.0.1', port))
    served, _ = listener.accept()
    client.close()
    served.close()
    print('done', flush=True)
";

/// A Python process running [`CONNECTOR`] with extra arguments.
pub(crate) struct Connector {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    pub(crate) port: u16,
}

impl Connector {
    fn spawn(args: &[&OsStr]) -> Connector {
        let mut command = Command::new(PYTHON);
        command.arg("-c").arg(CONNECTOR).args(args);
        Connector::start(command)
    }

    /// A connector that moves itself into the cgroup (v2) directory `dir`
    /// before it starts, so that everything it does happens there.
    pub(crate) fn spawn_in_cgroup(dir: &std::path::Path) -> Connector {
        let mut command = Command::new("sh");
        command
            .args([
                "-c",
                r#"echo $$ > "$1/cgroup.procs" && exec "$0" -c "$2""#,
                PYTHON,
            ])
            .arg(dir)
            .arg(CONNECTOR);
        Connector::start(command)
    }

    fn start(mut command: Command) -> Connector {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs (cargo xtask test installs it)");
        let stdin = child.stdin.take();
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let port = lines
            .next()
            .and_then(Result::ok)
            .and_then(|line| line.parse().ok())
            .expect("the connector prints its port");
        Connector {
            child,
            stdin,
            lines,
            port,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One connection to itself, opened and closed.
    pub(crate) fn connect(&mut self) {
        let stdin = self.stdin.as_mut().expect("running");
        writeln!(stdin, "go").expect("the connector reads");
        let said = self.lines.next().and_then(Result::ok);
        assert_eq!(said.as_deref(), Some("done"));
    }

    /// Its /proc/PID/exe, read while it runs.
    fn exe(&self) -> String {
        let exe = std::fs::read_link(format!("/proc/{}/exe", self.pid())).expect("readable");
        exe.to_string_lossy().into_owned()
    }

    pub(crate) fn exit(mut self) {
        drop(self.stdin.take());
        self.child.wait().expect("the connector exits");
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The awkward arguments, and how JSON gives them.
fn awkward_args() -> (Vec<&'static OsStr>, Value) {
    let args = vec![
        OsStr::new("a b"),
        OsStr::new("it's \"quoted\""),
        OsStr::new(""),
        OsStr::from_bytes(b"caf\xc3\xa9 \xff\xfe"),
    ];
    let expected = json!([
        PYTHON,
        "-c",
        CONNECTOR,
        "a b",
        "it's \"quoted\"",
        "",
        "café \\xff\\xfe"
    ]);
    (args, expected)
}

#[test]
fn the_snapshot_gives_the_arguments_exactly() {
    let (args, expected) = awkward_args();
    let connector = Connector::spawn(&args);
    let port = connector.port.to_string();
    let records = snapshot_json(&["snapshot", "-l", "--json", "--cmdline", "--port", &port]);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["pid"], connector.pid());
    assert_eq!(records[0]["cmdline"], expected);
    let without = snapshot_json(&["snapshot", "-l", "--json", "--port", &port]);
    assert!(without[0].get("cmdline").is_none(), "{without:?}");

    let text = run_netwatch(&["snapshot", "-tlnp", "--cmdline", "--port", &port]);
    let text = String::from_utf8_lossy(&text.stdout);
    let line = text.lines().last().expect("a socket line");
    let owner = line
        .split_once(&format!(" {}/", connector.pid()))
        .map(|(_, cmdline)| cmdline)
        .unwrap_or_else(|| panic!("no PID/ column: {line}"));
    // Each argument shell-quoted where it needs it, so that the line reads back.
    // The script holds single quotes, so the shell's double quotes; its
    // newlines are shown escaped, as every control character.
    let script = CONNECTOR.replace('\n', "\\n");
    assert_eq!(
        owner,
        format!(r#"{PYTHON} -c "{script}" 'a b' "it's \"quoted\"" '' "café \\xff\\xfe""#)
    );
}

#[test]
fn the_stream_and_audit_give_the_owners_arguments_and_executable() {
    let (args, expected) = awkward_args();
    let mut stream = Watch::start(&["--cmdline"]);
    let mut audit = Watch::spawn(&["audit"]);
    let mut connector = Connector::spawn(&args);
    let port = connector.port;
    let exe = connector.exe();
    connector.connect();
    let ours = |record: &Value| record["local_port"] == port || record["remote_port"] == port;
    // Both ends closed: 2 opening, 2 ESTABLISHED, 2 leaving ESTABLISHED at least.
    stream.wait_until(|records| records.iter().filter(|r| ours(r)).count() >= 6);
    audit.wait_until(|records| conns_on(records, port).len() == 2);
    let pid = connector.pid();
    connector.exit();
    for record in stream.stop().records.iter().filter(|r| ours(r)) {
        assert_eq!(record["pid"], pid, "{record}");
        assert_eq!(record["cmdline"], expected, "{record}");
    }
    let records = audit.stop().records;
    for record in conns_on(&records, port) {
        assert_eq!(record["pid"], pid, "{record}");
        assert_eq!(record["cmdline"], expected, "{record}");
        assert_eq!(record["exe"], exe.as_str(), "{record}");
    }
}

#[test]
fn a_reused_pid_never_gives_the_line_of_the_process_before() {
    let mut audit = Watch::spawn(&["audit"]);
    let mut first = Connector::spawn(&[OsStr::new("first")]);
    let (first_pid, first_port) = (first.pid(), first.port);
    first.connect();
    first.exit();
    let second = (0..20)
        .find_map(|_| {
            // The kernel gives the next process ns_last_pid + 1 if it is free.
            std::fs::write("/proc/sys/kernel/ns_last_pid", (first_pid - 1).to_string())
                .expect("root writes ns_last_pid");
            let second = Connector::spawn(&[OsStr::new("second")]);
            (second.pid() == first_pid).then_some(second)
        })
        .expect("pid reused within 20 tries");
    let mut second = second;
    second.connect();
    let second_port = second.port;
    second.exit();
    audit.wait_until(|records| {
        conns_on(records, first_port).len() == 2 && conns_on(records, second_port).len() == 2
    });
    let records = audit.stop().records;
    for (port, marker) in [(first_port, "first"), (second_port, "second")] {
        for record in conns_on(&records, port) {
            assert_eq!(record["pid"], first_pid, "{record}");
            let cmdline = record["cmdline"].as_array().expect("a command line");
            assert_eq!(cmdline.last(), Some(&json!(marker)), "{record}");
        }
    }
}

/// The `conn` records of both ends of connections to `port`.
pub(crate) fn conns_on(records: &[Value], port: u16) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| r["type"] == "conn" && (r["local_port"] == port || r["remote_port"] == port))
        .collect()
}
