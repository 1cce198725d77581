//! Failed connections: audit's `result` says how each connection went
//! (refused, timed out, reset, unreachable, or ok), and the metrics count
//! the failures by result.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::process::Command;

use serde_json::Value;

use crate::metrics::{free_port, scrape, value};
use crate::support::Watch;

/// Connects with the SYN sent `retries` more times at most (TCP_SYNCNT),
/// and returns the error connect() gave.
fn connect_with_syn_retries(port: u16, retries: i32) -> std::io::Error {
    // SAFETY: plain socket calls on a socket this function owns.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "a socket");
        let set = libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_SYNCNT,
            (&raw const retries).cast(),
            size_of::<i32>() as libc::socklen_t,
        );
        assert_eq!(set, 0, "TCP_SYNCNT");
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let connected = libc::connect(
            fd,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let error = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(connected, -1, "the connection should not get through");
        error
    }
}

/// In a network namespace of its own, connects to a neighbour that never
/// answers ARP: the kernel gives up after 3 s and reports the host
/// unreachable to the socket in SYN_SENT (an ICMP error, not a timeout).
fn connect_to_an_unreachable_host() -> String {
    let script = "ip link set lo up && ip link add v0 type veth peer name v1 \
                  && ip addr add 10.9.0.1/24 dev v0 && ip link set v0 up && ip link set v1 up \
                  && exec python3 -c 'import socket\ntry: socket.create_connection((\"10.9.0.2\", 80))\nexcept OSError as e: print(e.errno)'";
    let output = Command::new("unshare")
        .args(["--net", "sh", "-c", script])
        .output()
        .expect("unshare runs (util-linux)");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn audit_says_how_each_connection_went_and_counts_the_failures() {
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let mut audit = Watch::spawn(&["audit", "--metrics", &metrics]);

    let closed_port = free_port();
    let refused = TcpStream::connect(("127.0.0.1", closed_port)).expect_err("nothing listens");
    assert_eq!(refused.raw_os_error(), Some(libc::ECONNREFUSED));

    // A backlog of 0 holds one connection; a SYN to a full queue is dropped.
    let full = TcpListener::bind("127.0.0.1:0").expect("binds");
    // SAFETY: listen() again on a listening socket only sets its backlog.
    assert_eq!(unsafe { libc::listen(full.as_raw_fd(), 0) }, 0);
    let full_port = full.local_addr().expect("bound").port();
    let queued = TcpStream::connect(("127.0.0.1", full_port)).expect("one fits");
    let timed_out = connect_with_syn_retries(full_port, 1);
    assert_eq!(timed_out.raw_os_error(), Some(libc::ETIMEDOUT));

    let server = TcpListener::bind("127.0.0.1:0").expect("binds");
    let server_port = server.local_addr().expect("bound").port();
    let mut client = TcpStream::connect(("127.0.0.1", server_port)).expect("connects");
    let (mut served, _) = server.accept().expect("accepts");
    client.write_all(b"ok").expect("sends");
    let mut two = [0; 2];
    served.read_exact(&mut two).expect("receives");
    // The first connection ends well; the second is reset by its client.
    drop(client);
    drop(served);
    let aborting = TcpStream::connect(("127.0.0.1", server_port)).expect("connects");
    let (mut reset_one, _) = server.accept().expect("accepts");
    // Closed with a reset (SO_LINGER 0), as a peer that aborts does.
    xtask::loopback::reset_on_close(&aborting);
    drop(aborting);
    let read = reset_one.read(&mut two);
    assert_eq!(
        read.map_err(|e| e.raw_os_error()),
        Err(Some(libc::ECONNRESET))
    );
    drop(reset_one);

    let unreachable = connect_to_an_unreachable_host();
    assert_eq!(unreachable, libc::EHOSTUNREACH.to_string());

    let on = |port: u16, direction: &'static str| {
        move |r: &&Value| {
            r["type"] == "conn"
                && r["direction"] == direction
                && if direction == "out" {
                    r["remote_port"] == port
                } else {
                    r["local_port"] == port
                }
        }
    };
    let to_unreachable = |r: &&Value| r["type"] == "conn" && r["remote_addr"] == "10.9.0.2";
    audit.wait_until(|records| {
        records.iter().filter(on(server_port, "in")).count() == 2
            && records.iter().any(|r| to_unreachable(&r))
    });
    let scraped = scrape(metrics_port);
    drop(queued);
    let records = audit.stop().records;
    // Sorted: a record comes at the close, or at exit for what is still open.
    let results = |filter: &dyn Fn(&&Value) -> bool| -> Vec<String> {
        let mut results: Vec<String> = records
            .iter()
            .filter(|r| filter(r))
            .map(|r| r["result"].as_str().unwrap_or("null").to_owned())
            .collect();
        results.sort();
        results
    };
    assert_eq!(results(&on(closed_port, "out")), ["refused"]);
    assert_eq!(results(&on(full_port, "out")), ["ok", "timeout"]);
    assert_eq!(results(&on(server_port, "out")), ["ok", "ok"]);
    // The aborting client sent the reset; the server's socket received it.
    assert_eq!(results(&on(server_port, "in")), ["ok", "reset"]);
    assert_eq!(results(&to_unreachable), ["unreachable"]);
    for (result, at_least) in [
        ("refused", 1.0),
        ("timeout", 1.0),
        ("reset", 1.0),
        ("unreachable", 1.0),
    ] {
        let counted = value(
            &scraped,
            "netwatch_connections_failed_total",
            &[("result", result)],
        );
        assert!(counted >= Some(at_least), "{result}: {counted:?}");
    }
}

/// The port the reset comes from in `tests/servers/reset_mid_handshake.py`.
const RESETTING_PORT: u16 = 40000;

/// In a network namespace of its own with TCP Fast Open on, a listener
/// gets a SYN with data from a port no socket has: it makes a child socket
/// in SYN_RECV at once, and the kernel answers the child's SYN-ACK with a
/// reset. Returns the listener's port.
fn reset_mid_handshake() -> u16 {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/servers/reset_mid_handshake.py"
    );
    let output = Command::new("unshare")
        .args(["--net", "sh", "-c"])
        .arg(format!(
            "ip link set lo up && sysctl -qw net.ipv4.tcp_fastopen=0x203 && exec python3 {script}"
        ))
        .output()
        .expect("unshare runs (util-linux)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout.trim().parse().unwrap_or_else(|_| {
        panic!(
            "the script prints its port: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

#[test]
fn a_reset_in_the_middle_of_a_handshake_is_the_accepted_sockets_result() {
    let mut audit = Watch::spawn(&["audit"]);
    let port = reset_mid_handshake();
    let reset_child = move |r: &Value| {
        r["type"] == "conn" && r["local_port"] == port && r["remote_port"] == RESETTING_PORT
    };
    audit.wait_until(|records| records.iter().any(reset_child));
    let records = audit.stop().records;
    let record = records
        .iter()
        .find(|r| reset_child(r))
        .expect("the child's record");
    assert_eq!(record["direction"], "in", "{record}");
    assert_eq!(record["last_state"], "SYN_RECV", "{record}");
    assert_eq!(record["result"], "reset", "{record}");
}
