//! `netwatch snapshot` against real sockets and against `ss`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use netwatch::model::TcpState;
use serde_json::Value;

use crate::peer::{peer_program, Peer};
use crate::support::{
    json_lines, listener_and_connection, run_netwatch, run_netwatch_as_nobody, snapshot_json,
};

/// The record whose local and remote ports are these.
fn find(records: &[Value], local_port: u16, remote_port: u16) -> &Value {
    records
        .iter()
        .find(|r| r["local_port"] == local_port && r["remote_port"] == remote_port)
        .unwrap_or_else(|| panic!("no socket {local_port} -> {remote_port} in {records:#?}"))
}

fn assert_owned_by(record: &Value, state: &str, peer: &Peer) {
    assert_eq!(record["state"], state, "{record}");
    assert_eq!(record["pid"], peer.pid(), "{record}");
    assert_eq!(record["program"], peer_program(), "{record}");
}

#[test]
fn listener_client_and_accepted_sides_have_their_owners() {
    for (bind, proto, loopback) in [
        ("127.0.0.1:0", "tcp", "127.0.0.1"),
        ("[::1]:0", "tcp6", "::1"),
    ] {
        let mut server = Peer::spawn();
        let mut client = Peer::spawn();
        let (listener, port) = server.listen(bind);
        let target = if proto == "tcp6" {
            format!("[::1]:{port}")
        } else {
            format!("127.0.0.1:{port}")
        };
        let (_, client_port) = client.connect(&target);
        server.accept(listener);

        let all = snapshot_json(&["snapshot", "-tanp", "--json", "--port", &port.to_string()]);
        let records = listener_and_connection(&all, port, client_port);
        assert_eq!(
            records.len(),
            3,
            "listener, client and accepted socket, once each: {all:#?}"
        );
        let listening = find(&all, port, 0);
        assert_owned_by(listening, "LISTEN", &server);
        let accepted = find(&all, port, client_port);
        assert_owned_by(accepted, "ESTABLISHED", &server);
        let connected = find(&all, client_port, port);
        assert_owned_by(connected, "ESTABLISHED", &client);
        for record in records {
            assert_eq!(record["proto"], proto);
            assert_eq!(record["local_addr"], loopback);
            assert!(record["inode"].as_u64().is_some_and(|inode| inode > 0));
            assert_eq!(record["uid"], 0);
        }
    }
}

#[test]
fn time_wait_sockets_have_no_owner() {
    let mut server = Peer::spawn();
    let mut client = Peer::spawn();
    let (listener, port) = server.listen("127.0.0.1:0");
    let (connection, client_port) = client.connect(&format!("127.0.0.1:{port}"));
    let (accepted, _) = server.accept(listener);
    // The side that closes first ends in TIME_WAIT.
    client.close(connection);
    server.close(accepted);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let records = snapshot_json(&[
            "snapshot",
            "-tanp",
            "--json",
            "--state",
            "time-wait",
            "--port",
            &port.to_string(),
        ]);
        if let Some(record) = records.iter().find(|r| r["local_port"] == client_port) {
            assert_eq!(record["state"], "TIME_WAIT");
            assert_eq!(record["pid"], Value::Null);
            assert_eq!(record["program"], Value::Null);
            assert_eq!(record["inode"], 0);
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no TIME_WAIT socket for port {client_port}: {records:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn text_output_follows_netstat_defaults() {
    let mut server = Peer::spawn();
    let mut client = Peer::spawn();
    let (listener, port) = server.listen("127.0.0.1:0");
    let (_, client_port) = client.connect(&format!("127.0.0.1:{port}"));
    server.accept(listener);
    let port_arg = port.to_string();
    let text = |flags: &str| {
        let output = run_netwatch(&["snapshot", flags, "--port", &port_arg]);
        assert!(output.status.success());
        String::from_utf8(output.stdout).expect("UTF-8 output")
    };
    let listening_line = format!(
        "{:<23} {:<23} LISTEN",
        format!("127.0.0.1:{port}"),
        "0.0.0.0:*"
    );
    let default = text("-tnp");
    assert!(default.starts_with(
        "Active Internet connections (w/o servers)\nProto Recv-Q Send-Q Local Address"
    ));
    assert!(
        !default.contains("LISTEN"),
        "netstat hides listeners by default:\n{default}"
    );
    assert!(default.contains(&format!("127.0.0.1:{client_port}")));
    assert!(default.contains(&format!("ESTABLISHED {}/{}", client.pid(), peer_program())));
    let listening = text("-tlnp");
    assert!(listening.contains(&listening_line), "{listening}");
    assert!(listening.contains(&format!("LISTEN      {}/{}", server.pid(), peer_program())));
    assert!(!listening.contains("ESTABLISHED"));
    let extended = text("-tane");
    assert!(extended.contains("User       Inode"), "{extended}");
    assert!(!extended.contains("PID/Program"), "{extended}");
}

#[test]
fn without_root_other_users_sockets_show_no_owner() {
    let mut server = Peer::spawn();
    let (_, port) = server.listen("127.0.0.1:0");
    let output =
        run_netwatch_as_nobody(&["snapshot", "-tlnp", "--json", "--port", &port.to_string()]);
    assert!(output.status.success());
    let records = json_lines(&output.stdout);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["pid"], Value::Null);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line on stderr: {stderr}");
    assert!(
        stderr.contains("not all processes could be identified"),
        "{stderr}"
    );
}

#[test]
fn survives_sockets_and_processes_vanishing_mid_scan() {
    let mut churners: Vec<Peer> = (0..2).map(|_| Peer::spawn()).collect();
    std::thread::scope(|scope| {
        for peer in &mut churners {
            scope.spawn(move || {
                for _ in 0..4 {
                    peer.send("burst 500");
                }
            });
        }
        scope.spawn(|| {
            for _ in 0..20 {
                // Short-lived processes appear and exit during the scans too.
                let _ = std::process::Command::new("true").status();
                let output = run_netwatch(&["snapshot", "-tanp", "--json"]);
                assert!(
                    output.status.success(),
                    "{}",
                    String::from_utf8_lossy(&output.stderr)
                );
                assert!(!String::from_utf8_lossy(&output.stderr).contains("panicked"));
                json_lines(&output.stdout);
            }
        });
    });
}

/// A socket as both tools name it: (local, remote, state).
type SocketKey = (SocketAddr, SocketAddr, TcpState);

/// `ss -tanpH`: every socket with the pids ss attributes to it.
fn ss_sockets() -> HashMap<SocketKey, HashSet<u64>> {
    let output = std::process::Command::new("ss")
        .arg("-tanpH")
        .output()
        .expect("ss runs");
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let state = match fields[0] {
                "ESTAB" => TcpState::Established,
                other => TcpState::from_name(other).unwrap_or_else(|| panic!("ss state {other}")),
            };
            let key = (ss_endpoint(fields[3]), ss_endpoint(fields[4]), state);
            let pids = fields
                .get(5)
                .map(|users| {
                    users
                        .split("pid=")
                        .skip(1)
                        .filter_map(|rest| rest.split(',').next()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            (key, pids)
        })
        .collect()
}

/// `127.0.0.1:22`, `[::1]:22`, `0.0.0.0:*`, `[::]:*`, `[fe80::1]%lo:22`.
fn ss_endpoint(text: &str) -> SocketAddr {
    let (host, port) = text.rsplit_once(':').expect("ss endpoint has a port");
    let port = if port == "*" {
        0
    } else {
        port.parse().expect("numeric port")
    };
    let host = host.split('%').next().unwrap_or(host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if host == "*" { "0.0.0.0" } else { host };
    SocketAddr::new(
        host.parse().unwrap_or_else(|_| panic!("ss address {text}")),
        port,
    )
}

/// `netwatch snapshot` read from `source` (kernel or proc).
fn netwatch_sockets(source: &str) -> HashMap<SocketKey, Option<u64>> {
    snapshot_json(&["snapshot", "-tanp", "--json", "--source", source])
        .iter()
        .map(|r| {
            let endpoint = |addr: &str, port: &str| {
                SocketAddr::new(
                    r[addr].as_str().unwrap().parse().unwrap(),
                    r[port].as_u64().unwrap() as u16,
                )
            };
            let state = TcpState::from_name(r["state"].as_str().unwrap()).unwrap();
            let key = (
                endpoint("local_addr", "local_port"),
                endpoint("remote_addr", "remote_port"),
                state,
            );
            (key, r["pid"].as_u64())
        })
        .collect()
}

#[test]
fn the_whole_table_matches_ss_on_thousands_of_sockets_read_in_the_kernel_and_from_proc() {
    let mut holders: Vec<Peer> = (0..4).map(|_| Peer::spawn()).collect();
    let ports: Vec<u16> = holders
        .iter_mut()
        .map(|peer| peer.send("bulk 500")[0] as u16)
        .collect();
    for source in ["kernel", "proc"] {
        matches_ss(source, &holders, &ports);
        matches_netstat(source, &ports);
    }
}

/// `netstat -tanp`'s IPv4 sockets on `ports`, with the pid it names.
fn netstat_sockets(ports: &[u16]) -> HashMap<SocketKey, Option<u64>> {
    let output = std::process::Command::new("netstat")
        .arg("-tanp")
        .output()
        .expect("netstat runs (cargo xtask test installs net-tools)");
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.starts_with("tcp "))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let endpoint = |text: &str| -> SocketAddr {
                let (host, port) = text.rsplit_once(':').expect("netstat endpoint");
                let port = if port == "*" {
                    0
                } else {
                    port.parse().expect("numeric port")
                };
                SocketAddr::new(host.parse().expect("numeric address"), port)
            };
            let (local, remote) = (endpoint(fields[3]), endpoint(fields[4]));
            if !ports.contains(&local.port()) && !ports.contains(&remote.port()) {
                return None;
            }
            let state = TcpState::from_name(fields[5]).expect("netstat state");
            let pid = fields
                .get(6)
                .and_then(|owner| owner.split('/').next()?.parse().ok());
            Some(((local, remote, state), pid))
        })
        .collect()
}

/// netwatch read from `source` names the sockets on `ports` and their
/// owners as `netstat -tanp` does. The holders' sockets are the listening
/// and established ones there: an earlier test's TIME_WAIT socket may have
/// one of those port numbers too.
fn matches_netstat(source: &str, ports: &[u16]) {
    let held = |sockets: HashMap<SocketKey, Option<u64>>| -> HashMap<SocketKey, Option<u64>> {
        sockets
            .into_iter()
            .filter(|((local, remote, state), _)| {
                (ports.contains(&local.port()) || ports.contains(&remote.port()))
                    && matches!(state, TcpState::Listen | TcpState::Established)
            })
            .collect()
    };
    let netwatch = held(netwatch_sockets(source));
    assert_eq!(netwatch.len(), ports.len() * 1001, "{source}");
    assert_eq!(
        netwatch,
        held(netstat_sockets(ports)),
        "{source}: netwatch and netstat differ"
    );
}

/// netwatch read from `source` agrees with ss, and finds every holder's sockets.
fn matches_ss(source: &str, holders: &[Peer], ports: &[u16]) {
    // A socket may change between two reads: compare what netwatch saw twice
    // (before and after ss) with ss, and what ss saw with either netwatch read.
    let before = netwatch_sockets(source);
    let ss = ss_sockets();
    let after = netwatch_sockets(source);
    assert!(
        ss.len() >= 4 * 1001,
        "ss sees the 4004 test sockets, saw {}",
        ss.len()
    );
    for (key, pid) in before.iter().filter(|(key, _)| after.contains_key(*key)) {
        let ss_pids = ss
            .get(key)
            .unwrap_or_else(|| panic!("{source}: netwatch has {key:?}, ss has not"));
        match pid {
            Some(pid) => assert!(
                ss_pids.contains(pid),
                "{source}: {key:?}: netwatch pid {pid}, ss pids {ss_pids:?}"
            ),
            None => assert!(
                ss_pids.is_empty(),
                "{source}: {key:?}: netwatch found no owner, ss found {ss_pids:?}"
            ),
        }
    }
    for key in ss.keys() {
        assert!(
            before.contains_key(key) || after.contains_key(key),
            "{source}: ss has {key:?}, netwatch has not"
        );
    }
    // And every test socket is there with its holder's pid.
    for (holder, &port) in holders.iter().zip(ports) {
        let owned = after
            .iter()
            .filter(|((local, remote, _), _)| local.port() == port || remote.port() == port)
            .filter(|(_, pid)| **pid == Some(u64::from(holder.pid())))
            .count();
        assert_eq!(
            owned, 1001,
            "{source}: holder on port {port}: listener and 500 connections, both ends"
        );
    }
}

#[test]
fn a_process_named_with_control_characters_cannot_write_to_the_terminal() {
    // Names itself "ev<ESC>[2J<LF>il" (prctl PR_SET_NAME), listens, waits for stdin to close.
    let script = "import ctypes, socket, sys\n\
                  ctypes.CDLL(None).prctl(15, b'ev\\x1b[2J\\nil', 0, 0, 0)\n\
                  s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n\
                  print(s.getsockname()[1], flush=True)\n\
                  sys.stdin.read()\n";
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut port = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("piped")),
        &mut port,
    )
    .expect("the port");
    let output = run_netwatch(&["snapshot", "-tlnp", "--port", port.trim()]);
    drop(child.stdin.take());
    let _ = child.wait();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(!text.contains('\u{1b}'), "{text:?}");
    let line = text
        .lines()
        .find(|line| line.contains(&format!(":{}", port.trim())))
        .unwrap_or_else(|| panic!("the listener is listed: {text}"));
    assert!(line.ends_with("/ev\\u{1b}[2J\\nil"), "{line:?}");
}

#[test]
fn the_version_names_the_git_commit_built() {
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("git runs");
    let head = String::from_utf8_lossy(&head.stdout).trim().to_owned();
    assert_eq!(head.len(), 12, "the tests run in a git checkout");
    let output = run_netwatch(&["--version"]);
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("netwatch {} (commit {head})", env!("CARGO_PKG_VERSION"))
    );
}
