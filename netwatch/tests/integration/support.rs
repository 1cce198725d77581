//! Running the netwatch binary from tests and reading what it prints.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Names capabilities (setpriv's, comma-separated) that every netwatch the
/// tests start runs with, as uid 65534 and without any other: the owner
/// tests run so in `cargo xtask test`, as the service would run them.
pub const CAPABILITIES_VARIABLE: &str = "NETWATCH_TEST_CAPABILITIES";

/// The netwatch binary cargo built for these tests, as root or as
/// `CAPABILITIES_VARIABLE` says.
pub fn netwatch() -> Command {
    match std::env::var(CAPABILITIES_VARIABLE) {
        Ok(capabilities) => netwatch_with_capabilities(&capabilities),
        Err(_) => Command::new(env!("CARGO_BIN_EXE_netwatch")),
    }
}

/// The netwatch binary run as uid 65534 with exactly `capabilities`
/// (setpriv's names, comma-separated) and no other. setpriv execs it: the
/// child's pid is netwatch's.
pub fn netwatch_with_capabilities(capabilities: &str) -> Command {
    let capabilities: Vec<&str> = capabilities.split(',').collect();
    let mut command = xtask::least_privilege::setpriv("65534", &capabilities);
    command.arg(env!("CARGO_BIN_EXE_netwatch"));
    command
}

/// Runs `netwatch ARGS` to completion.
pub fn run_netwatch(args: &[&str]) -> Output {
    netwatch().args(args).output().expect("netwatch runs")
}

/// Runs `netwatch ARGS` as the unprivileged user nobody.
pub fn run_netwatch_as_nobody(args: &[&str]) -> Output {
    let mut command = netwatch();
    command.args(args);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.output().expect("netwatch runs as nobody")
}

/// Parses JSON lines.
pub fn json_lines(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"))
        })
        .collect()
}

/// Asserts the run succeeded and returns its JSON records.
pub fn snapshot_json(args: &[&str]) -> Vec<Value> {
    let output = run_netwatch(args);
    assert!(
        output.status.success(),
        "netwatch {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    json_lines(&output.stdout)
}

/// The records of a listener on `port` and of one connection between
/// `port` and `client_port`, both ends: an earlier test's TIME_WAIT socket
/// may have either port number too, since the kernel hands ports out again.
pub fn listener_and_connection(records: &[Value], port: u16, client_port: u16) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| {
            let ports = (r["local_port"].as_u64(), r["remote_port"].as_u64());
            let (port, client_port) = (Some(u64::from(port)), Some(u64::from(client_port)));
            ports == (port, Some(0)) || ports == (port, client_port) || ports == (client_port, port)
        })
        .collect()
}

/// Starts `netwatch ARGS` with stdout and stderr piped to the test.
fn spawn_piped(args: &[&str]) -> Child {
    netwatch()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("netwatch starts")
}

/// Runs `netwatch ARGS` with its stdout's reader gone, making listeners
/// until it exits (10 s at most); its exit status and stderr.
pub fn run_with_closed_stdout(args: &[&str]) -> (std::process::ExitStatus, String) {
    assert!(is_root());
    let mut child = spawn_piped(args);
    drop(child.stdout.take());
    let mut server = crate::peer::Peer::spawn();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let (listener, _) = server.listen("127.0.0.1:0");
        server.close(listener);
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "netwatch kept running with no reader"
        );
        thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::io::read_to_string(child.stderr.take().expect("stderr")).expect("stderr");
    (status, stderr)
}

/// Whether the process runs as root (the eBPF tests need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A running `netwatch --json` stream, killed if a failing test drops it.
pub struct Watch {
    child: Option<Child>,
    records: Receiver<Value>,
    stderr: Receiver<String>,
    /// Every record received so far.
    pub seen: Vec<Value>,
    /// What netwatch printed on stderr up to the line in which it said it is watching.
    pub started: String,
}

/// What a stopped stream left.
pub struct Stopped {
    pub records: Vec<Value>,
    pub stderr: String,
    pub success: bool,
    /// The exit status, when netwatch exited (not killed by a signal).
    pub code: Option<i32>,
}

impl Watch {
    /// Starts `netwatch --json ARGS` and waits until it says it is watching.
    pub fn start(args: &[&str]) -> Watch {
        let args: Vec<&str> = std::iter::once("--json")
            .chain(args.iter().copied())
            .collect();
        Watch::spawn(&args)
    }

    /// Starts `netwatch ARGS` (JSON lines on stdout, if any) and waits until
    /// it says it is watching.
    pub fn spawn(args: &[&str]) -> Watch {
        assert!(
            is_root(),
            "the stream tests load eBPF programs: run them as root (cargo xtask test does)"
        );
        let mut child = spawn_piped(args);
        let records = lines_of(child.stdout.take().expect("piped stdout"));
        let stderr = lines_of(child.stderr.take().expect("piped stderr"));
        let (records, stderr) = (parse_json(records), stderr);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut started = String::new();
        loop {
            let line = stderr
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("netwatch says it is watching within 20 s");
            started.push_str(&line);
            started.push('\n');
            if line.contains("watching") {
                break;
            }
        }
        Watch {
            child: Some(child),
            records,
            stderr,
            seen: Vec::new(),
            started,
        }
    }

    /// Collects records, showing each new one to `done`, until it says
    /// true (then true) or `timeout` passes (false).
    pub fn collect_until(
        &mut self,
        mut done: impl FnMut(&Value) -> bool,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(record) = self.records.recv_timeout(left) else {
                return false;
            };
            let finished = done(&record);
            self.seen.push(record);
            if finished {
                return true;
            }
        }
    }

    /// Collects records until `done(records so far)` holds; fails after 10 s.
    pub fn wait_until(&mut self, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.records.recv_timeout(left) {
                // `done` reads every record so far: run it once for all
                // that are waiting, not once per record (quadratic).
                Ok(record) => {
                    self.seen.push(record);
                    self.seen.extend(self.records.try_iter());
                }
                Err(_) => panic!("timed out; records so far: {:#?}", self.seen),
            }
        }
    }

    /// The pid of the netwatch process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends `signal`, waits for exit and returns everything printed.
    pub fn stop_with(mut self, signal: i32) -> Stopped {
        let mut child = self.child.take().expect("running");
        // SAFETY: signals our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().expect("netwatch exits");
        self.exited(status)
    }

    /// Waits (at most `timeout`) for netwatch to exit by itself.
    pub fn wait_exit(mut self, timeout: Duration) -> Stopped {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().expect("netwatch is waitable") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("netwatch did not exit within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(50));
        };
        self.exited(status)
    }

    /// What netwatch wrote, once it exited with `status`.
    fn exited(&mut self, status: std::process::ExitStatus) -> Stopped {
        self.seen.extend(self.records.iter());
        Stopped {
            records: std::mem::take(&mut self.seen),
            stderr: self.stderr.iter().collect::<Vec<_>>().join("\n"),
            success: status.success(),
            code: status.code(),
        }
    }

    /// Waits (at most 10 s) for a stderr line containing `needle`.
    pub fn wait_for_stderr(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => {}
                Err(_) => panic!("netwatch did not print '{needle}' within 10 s"),
            }
        }
    }

    /// SIGINT, as an operator's Ctrl-C.
    pub fn stop(self) -> Stopped {
        self.stop_with(libc::SIGINT)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The lines `reader` yields, read on a thread of their own.
pub fn lines_of(reader: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (send, receive) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                return;
            }
        }
    });
    receive
}

fn parse_json(lines: Receiver<String>) -> Receiver<Value> {
    let (send, receive) = mpsc::channel();
    thread::spawn(move || {
        for line in lines {
            let record = serde_json::from_str(&line)
                .unwrap_or_else(|err| panic!("not JSON ({err}): {line}"));
            if send.send(record).is_err() {
                return;
            }
        }
    });
    receive
}

/// The `state` records about one socket, as (old, new, pid) in order.
pub fn transitions_of(
    records: &[Value],
    local_port: u16,
    remote_port: u16,
) -> Vec<(String, String, Option<u64>)> {
    records
        .iter()
        .filter(|r| {
            r["type"] == "state" && r["local_port"] == local_port && r["remote_port"] == remote_port
        })
        .map(|r| {
            (
                r["old_state"].as_str().unwrap_or_default().to_owned(),
                r["new_state"].as_str().unwrap_or_default().to_owned(),
                r["pid"].as_u64(),
            )
        })
        .collect()
}

/// Builds the expected (old, new, pid) list from `A->B` steps.
pub fn expect_steps(steps: &[&str], pid: u32) -> Vec<(String, String, Option<u64>)> {
    steps
        .iter()
        .map(|step| {
            let (old, new) = step.split_once("->").expect("step is OLD->NEW");
            (old.to_owned(), new.to_owned(), Some(u64::from(pid)))
        })
        .collect()
}

/// Sets the soft limit on open files of process `pid` (0: this one), keeping the hard one.
pub fn set_fd_limit(pid: u32, soft: Option<u64>) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit reads and writes valid rlimits of a process the test started (or its own).
    unsafe {
        assert_eq!(
            libc::prlimit(
                pid as i32,
                libc::RLIMIT_NOFILE,
                std::ptr::null(),
                &mut limit
            ),
            0
        );
        limit.rlim_cur = soft.unwrap_or(limit.rlim_max).min(limit.rlim_max);
        assert_eq!(
            libc::prlimit(
                pid as i32,
                libc::RLIMIT_NOFILE,
                &limit,
                std::ptr::null_mut()
            ),
            0
        );
    }
}

/// verify's drift reports among `records`, in order.
pub fn drift_reports(records: &[Value]) -> Vec<&Value> {
    records.iter().filter(|r| r["type"] == "drift").collect()
}

/// The pids whose parent is `pid` (from each /proc/PID/stat).
pub fn children_of(pid: u32) -> Vec<u32> {
    let entries = std::fs::read_dir("/proc").expect("/proc is readable");
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            let after_name = stat.rsplit(')').next().unwrap_or_default();
            after_name.split_whitespace().nth(1) == Some(pid.to_string().as_str())
        })
        .collect()
}

/// /proc/PID/cmdline as a JSON array: each NUL ends an argument.
pub fn proc_cmdline(pid: u32) -> Value {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).expect("a running process");
    let body = bytes.strip_suffix(b"\0").unwrap_or(&bytes);
    body.split(|&b| b == 0)
        .map(|arg| Value::from(String::from_utf8_lossy(arg)))
        .collect()
}

/// A summary record's counts add up exactly: transitions + lost = fired,
/// skipped = recovered + refused + not recovered, lost = ring buffer full +
/// not recovered.
pub fn assert_counts_add_up(summary: &Value) {
    let count = |key: &str| {
        summary[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} in {summary}"))
    };
    assert!(summary["ts"].is_string(), "{summary}");
    assert_eq!(
        count("transitions") + count("lost"),
        count("fired"),
        "{summary}"
    );
    assert_eq!(
        count("skipped"),
        count("recovered") + count("recoveries_refused") + count("not_recovered"),
        "{summary}"
    );
    assert_eq!(
        count("lost"),
        count("ring_buffer_full") + count("not_recovered"),
        "{summary}"
    );
}
