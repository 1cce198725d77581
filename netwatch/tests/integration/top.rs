//! `netwatch top` in a real terminal (tmux): the rows of processes whose
//! pids the test knows with their round-trip times, the filter, a connection that lived a millisecond
//! still on screen seconds later, the processes view, and `q` leaving the
//! terminal as it was.

use std::net::TcpStream;
use std::os::fd::AsRawFd as _;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::peer::Peer;
use crate::support::is_root;

/// A tmux server of its own running one command in a window of a given size.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(command: &str, (width, height): (u16, u16)) -> Tmux {
        static WINDOWS: AtomicU32 = AtomicU32::new(0);
        let window = WINDOWS.fetch_add(1, Ordering::Relaxed);
        let tmux = Tmux {
            socket: format!("netwatch-test-{}-{window}", std::process::id()),
        };
        // The window stays once the command ends, with its exit status.
        let shell = format!("{command}; echo EXIT=$?; sleep 120");
        let (width, height) = (width.to_string(), height.to_string());
        let started = tmux
            .command(&["new-session", "-d", "-x", &width, "-y", &height, &shell])
            .status()
            .expect("tmux runs (cargo xtask test installs it)");
        assert!(started.success(), "tmux started a session");
        tmux
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("tmux");
        command.args(["-L", &self.socket]).args(args);
        command
    }

    /// The window's text now.
    fn screen(&self) -> String {
        let output = self
            .command(&["capture-pane", "-p"])
            .output()
            .expect("tmux captures the pane");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys"];
        args.extend(keys);
        assert!(self
            .command(&args)
            .status()
            .expect("tmux sends keys")
            .success());
    }

    /// Waits (20 s at most) until the screen passes `check`; returns it.
    fn wait_for(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let screen = self.screen();
            if check(&screen) {
                return screen;
            }
            assert!(Instant::now() < deadline, "{what} within 20 s:\n{screen}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The pid of the command the window's shell runs.
    fn command_pid(&self) -> u32 {
        let output = self
            .command(&["display-message", "-p", "#{pane_pid}"])
            .output()
            .expect("tmux answers");
        let shell = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        let children = Command::new("pgrep")
            .args(["-P", &shell])
            .output()
            .expect("pgrep runs");
        let text = String::from_utf8_lossy(&children.stdout);
        text.lines()
            .next()
            .and_then(|pid| pid.trim().parse().ok())
            .expect("the shell runs the command")
    }

    /// Waits for the command's exit; checks its status is 0 and the
    /// terminal is back from the alternate screen. Returns the screen.
    fn clean_exit(&self) -> String {
        let screen = self.wait_for("top's exit", |s| s.contains("EXIT="));
        assert!(screen.contains("EXIT=0"), "exit status 0:\n{screen}");
        assert!(
            !self.alternate_screen(),
            "the terminal is back from the alternate screen"
        );
        screen
    }

    /// Whether the window shows the alternate screen.
    fn alternate_screen(&self) -> bool {
        let output = self
            .command(&["display-message", "-p", "#{alternate_on}"])
            .output()
            .expect("tmux answers");
        String::from_utf8_lossy(&output.stdout).trim() == "1"
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command(&["kill-server"]).status();
    }
}

/// The netwatch binary, for a test that runs it live (as root: top loads
/// eBPF programs).
fn netwatch_as_root() -> &'static str {
    assert!(
        is_root(),
        "top loads eBPF programs: run it as root (cargo xtask test does)"
    );
    env!("CARGO_BIN_EXE_netwatch")
}

/// `netwatch top` with `flags` in a window of `size`, once it shows its
/// live header (as root: it loads eBPF programs).
fn live_top(flags: &str, size: (u16, u16)) -> Tmux {
    let netwatch = netwatch_as_root();
    let tmux = Tmux::start(&format!("{netwatch} top {flags}"), size);
    tmux.wait_for("top's live header", |s| {
        s.contains("netwatch top · connections · live")
    });
    tmux
}

/// Table rows (after the two header lines and the column titles) that mention `text`.
fn rows_with<'a>(screen: &'a str, text: &str) -> Vec<&'a str> {
    screen
        .lines()
        .skip(3)
        .filter(|line| line.contains(text))
        .collect()
}

/// Connects to `port` and resets the connection at once (SO_LINGER 0):
/// ESTABLISHED straight to CLOSE, within a millisecond. Returns the local port.
fn brief_connection(port: u16) -> u16 {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connects");
    let local = stream.local_addr().expect("a local address").port();
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a live socket with a linger struct of its size.
    let set = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0, "SO_LINGER set");
    drop(stream);
    local
}

#[test]
fn top_shows_known_connections_filters_keeps_a_brief_one_and_quits_cleanly() {
    let mut peer = Peer::spawn();
    let (listener, port) = peer.listen("127.0.0.1:0");
    let (_client, client_port) = peer.connect(&format!("127.0.0.1:{port}"));
    peer.accept(listener);
    let pid = peer.pid().to_string();
    let tmux = live_top("--keep-closed 60s", (132, 40));
    // The peer's connection was open before top started: the baseline has it.
    let client = format!("127.0.0.1:{client_port}");
    tmux.wait_for("the peer's rows", |s| {
        rows_with(s, &client)
            .iter()
            .any(|row| row.starts_with(&pid))
    });
    // Its round-trip time and retransmissions come with the next refresh
    // (loopback: microseconds, a few milliseconds on a loaded machine; none
    // retransmitted).
    let screen = tmux.wait_for("the peer's round-trip time", |s| {
        rows_with(s, &client).iter().any(|row| {
            let cells: Vec<&str> = row.split_whitespace().collect();
            let rtt = cells.get(10).copied().unwrap_or("-");
            let measured = rtt.ends_with("us") || rtt.ends_with("ms");
            cells[0] == pid && measured && cells.get(11) == Some(&"0")
        })
    });
    let listening = format!("127.0.0.1:{port}");
    assert!(
        rows_with(&screen, &listening)
            .iter()
            .any(|row| row.starts_with(&pid) && row.contains("LISTEN")),
        "the peer's listener:\n{screen}"
    );

    tmux.keys(&["/"]);
    tmux.keys(&["-l", &port.to_string()]);
    tmux.keys(&["Enter"]);
    let filter = format!("filter: {port}");
    let screen = tmux.wait_for("the filter kept", |s| s.contains(&filter));
    let rows: Vec<&str> = screen
        .lines()
        .skip(3)
        .take_while(|l| !l.trim().is_empty())
        .collect();
    assert!(rows.len() >= 3, "the listener and both ends:\n{screen}");
    assert!(
        rows.iter().all(|row| row.contains(&port.to_string())),
        "only port {port}:\n{screen}"
    );

    let brief = format!("127.0.0.1:{}", brief_connection(port));
    let me = std::process::id().to_string();
    tmux.wait_for("the brief connection", |s| !rows_with(s, &brief).is_empty());
    std::thread::sleep(Duration::from_secs(3));
    let screen = tmux.screen();
    let row = rows_with(&screen, &brief);
    assert!(
        row.iter()
            .any(|row| row.starts_with(&me) && row.contains("CLOSE")),
        "the brief connection, closed, seconds later:\n{screen}"
    );

    tmux.keys(&["Escape", "g"]);
    let screen = tmux.wait_for("the processes view", |s| {
        s.contains("netwatch top · processes")
    });
    let peer_rows: Vec<&str> = screen
        .lines()
        .skip(3)
        .filter(|l| l.starts_with(&pid))
        .collect();
    assert_eq!(peer_rows.len(), 1, "one row for the peer:\n{screen}");

    assert!(tmux.alternate_screen(), "top draws on the alternate screen");
    tmux.keys(&["q"]);
    let screen = tmux.clean_exit();
    assert!(
        !screen.contains("netwatch top ·"),
        "the screen is the shell's again:\n{screen}"
    );
}

#[test]
fn sigterm_restores_the_terminal() {
    let tmux = live_top("", (80, 24));
    assert!(tmux.alternate_screen(), "top draws on the alternate screen");
    // SAFETY: signals the netwatch this test started.
    unsafe { libc::kill(tmux.command_pid() as i32, libc::SIGTERM) };
    let screen = tmux.clean_exit();
    assert!(
        screen.contains("netwatch: ran "),
        "the engine's summary, held until then:\n{screen}"
    );
}

#[test]
fn a_closed_pipe_ends_top_quietly_and_leaves_the_terminal_cooked() {
    let netwatch = netwatch_as_root();
    // head closes top's output after 64 bytes; stty then shows the
    // terminal's modes, which raw mode would have left without icanon and echo.
    let command = format!(
        "{netwatch} top | head -c 64 >/dev/null; stty -a | tr ' ' '\\n' | grep -x -e '-\\?icanon' -e '-\\?echo' | tr '\\n' ' '"
    );
    let tmux = Tmux::start(&command, (80, 24));
    let screen = tmux.wait_for("top's exit", |s| s.contains("EXIT="));
    assert!(
        screen.contains("icanon echo") && !screen.contains("-icanon") && !screen.contains("-echo"),
        "canonical mode and echo back:\n{screen}"
    );
    assert!(
        !screen.contains("Broken pipe"),
        "no complaint about the closed output:\n{screen}"
    );
    assert!(!tmux.alternate_screen(), "not on the alternate screen");
}

#[test]
fn top_exits_when_its_terminal_goes_away() {
    let tmux = live_top("", (80, 24));
    let pid = tmux.command_pid();
    drop(tmux);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "top still runs 10 s after its terminal went away"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn without_root_top_shows_proc_snapshots_and_says_what_needs_root() {
    let mut peer = Peer::spawn();
    let (_listener, port) = peer.listen("127.0.0.1:0");
    let netwatch = env!("CARGO_BIN_EXE_netwatch");
    let nobody = format!(
        "setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all {netwatch} top"
    );
    let tmux = Tmux::start(&nobody, (132, 40));
    let listening = format!("127.0.0.1:{port}");
    let screen = tmux.wait_for("the peer's listener", |s| {
        !rows_with(s, &listening).is_empty()
    });
    assert!(
        screen.contains("netwatch top · connections · from /proc"),
        "{screen}"
    );
    assert!(
        screen.contains(
            "without root: live events, closed connections, bytes and round-trip times need root"
        ),
        "{screen}"
    );
    tmux.keys(&["q"]);
    tmux.clean_exit();
}

/// dnsmasq answering one PTR record on 127.0.0.77:53, killed when dropped.
struct DnsServer(std::process::Child);

impl DnsServer {
    fn start(ptr: &str) -> DnsServer {
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.77",
                "--port=53",
                "--user=root",
                "--pid-file",
            ])
            .arg(format!("--ptr-record={ptr}"))
            .spawn()
            .expect("dnsmasq runs (cargo xtask test installs it)");
        let server = DnsServer(child);
        // Listening once a TCP connect to its port succeeds.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.77", 53)).is_err() {
            assert!(Instant::now() < deadline, "dnsmasq listens within 10 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn n_names_remote_hosts_from_a_real_dns_server() {
    let netwatch = netwatch_as_root();
    let _dns = DnsServer::start("9.0.0.127.in-addr.arpa,peer.netwatch.test");
    let resolv = std::env::temp_dir().join(format!("netwatch-top-resolv-{}", std::process::id()));
    std::fs::write(
        &resolv,
        "nameserver 127.0.0.77\noptions timeout:1 attempts:1\n",
    )
    .expect("a resolv.conf");
    let mut peer = Peer::spawn();
    let (listener, port) = peer.listen("127.0.0.9:0");
    peer.connect(&format!("127.0.0.9:{port}"));
    peer.accept(listener);
    // top in a mount namespace of its own where /etc/resolv.conf names dnsmasq.
    let command = format!(
        "unshare --mount sh -c 'mount --bind {} /etc/resolv.conf && exec {netwatch} top'",
        resolv.display()
    );
    let tmux = Tmux::start(&command, (132, 40));
    let numeric = format!("127.0.0.9:{port}");
    tmux.wait_for("the connection to 127.0.0.9", |s| {
        rows_with(s, &numeric)
            .iter()
            .any(|row| row.contains("ESTABLISHED"))
    });
    tmux.keys(&["n"]);
    // The name fits the column before the port: "peer.netwatch.…:PORT".
    let named = format!("peer.netwatch.…:{port}");
    let screen = tmux.wait_for("the remote host's name", |s| s.contains(&named));
    assert!(
        screen.contains(" · names"),
        "the footer says names are on:\n{screen}"
    );
    tmux.keys(&["g", "g"]);
    tmux.wait_for("the remote hosts view, named", |s| {
        s.contains("netwatch top · remote hosts") && s.contains("peer.netwatch.test ")
    });
    tmux.keys(&["q"]);
    tmux.clean_exit();
    let _ = std::fs::remove_file(resolv);
}
