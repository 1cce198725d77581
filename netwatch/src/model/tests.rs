//! The shared words' unit tests: names, parsing, cgroups and command lines.

use super::*;

#[test]
fn a_cgroup_path_names_its_unit_and_container() {
    let id = "0123456789abcdef".repeat(4);
    let named = |path: &str| {
        let cgroup = Cgroup::from_path(path);
        (
            cgroup.unit.map(|u| u.to_string()),
            cgroup.container.map(|c| c.to_string()),
        )
    };
    assert_eq!(
        named("/system.slice/nginx.service"),
        (Some("nginx.service".into()), None)
    );
    assert_eq!(
        named("/user.slice/user-1000.slice/user@1000.service/app.slice/x.service"),
        (Some("user@1000.service/app.slice/x.service".into()), None)
    );
    for path in [
        format!("/system.slice/docker-{id}.scope"),
        format!("/kubepods.slice/kubepods-pod1.slice/cri-containerd-{id}.scope"),
        format!("/machine.slice/libpod-{id}.scope/container"),
        format!("/system.slice/crio-{id}.scope"),
        format!("/docker/{id}"),
    ] {
        assert_eq!(named(&path).1.as_deref(), Some(id.as_str()), "{path}");
    }
    assert_eq!(named("/"), (None, None));
    assert_eq!(named("/docker/abc").1, None, "not 64 hex digits");
}

#[test]
fn a_connection_result_comes_from_its_error_and_whether_it_got_through() {
    let name = |error, established| ConnResult::of(error, established).name();
    let errno = |e: i32| Some(u16::try_from(e).unwrap());
    assert_eq!(name(None, true), "ok");
    assert_eq!(name(None, false), "aborted");
    assert_eq!(name(errno(libc::ECONNREFUSED), false), "refused");
    assert_eq!(name(errno(libc::ETIMEDOUT), false), "timeout");
    assert_eq!(name(errno(libc::ECONNRESET), true), "reset");
    assert_eq!(name(errno(libc::EPIPE), true), "reset");
    assert_eq!(name(errno(libc::EHOSTUNREACH), false), "unreachable");
    assert_eq!(name(errno(libc::ENETUNREACH), false), "unreachable");
    assert_eq!(name(errno(libc::EPROTO), true), "EPROTO");
    assert_eq!(name(Some(999), true), "errno 999");
    assert_eq!(ConnResult::Ok.failure_index(), None);
    for result in [
        ConnResult::Refused,
        ConnResult::Aborted,
        ConnResult::Error(71),
    ] {
        let index = result.failure_index().unwrap();
        let label = ConnResult::FAILURES[index];
        assert!(label == result.name() || label == "other", "{label}");
    }
}

#[test]
fn a_command_line_splits_at_each_nul_keeping_empty_arguments() {
    let split = |bytes: &[u8]| CommandLine::from_proc(bytes).0;
    assert_eq!(split(b"ls\0-l\0\0x y\0"), [&b"ls"[..], b"-l", b"", b"x y"]);
    assert_eq!(split(b"prog\0\0"), [&b"prog"[..], b""]);
    assert_eq!(split(b""), Vec::<Vec<u8>>::new());
    // A process that overwrote its last NUL (setproctitle).
    assert_eq!(
        split(b"nginx: worker process"),
        [&b"nginx: worker process"[..]]
    );
}

#[test]
fn a_command_line_serializes_each_argument_and_displays_as_a_shell_reads_it() {
    let line = CommandLine::from_proc(b"sh\0-c\0echo 'hi'\0\0caf\xc3\xa9\xff\0");
    assert_eq!(
        serde_json::to_value(&line).unwrap(),
        serde_json::json!(["sh", "-c", "echo 'hi'", "", "caf\u{e9}\\xff"])
    );
    assert_eq!(line.to_string(), r#"sh -c "echo 'hi'" '' "café\\xff""#);
}

#[test]
fn kernel_numbers_map_to_netstat_names() {
    assert_eq!(TcpState::from_kernel(1), Some(TcpState::Established));
    assert_eq!(TcpState::from_kernel(10), Some(TcpState::Listen));
    assert_eq!(TcpState::from_kernel(12), Some(TcpState::NewSynRecv));
    assert_eq!(TcpState::from_kernel(0), None);
    for state in TcpState::ALL {
        assert_eq!(TcpState::from_kernel(state as u8), Some(state));
    }
    assert_eq!(TcpState::from_kernel(13), None);
    assert_eq!(TcpState::FinWait1.name(), "FIN_WAIT1");
}

#[test]
fn state_names_parse_in_netstat_and_ss_spelling() {
    assert_eq!(TcpState::from_name("TIME_WAIT"), Some(TcpState::TimeWait));
    assert_eq!(TcpState::from_name("time-wait"), Some(TcpState::TimeWait));
    assert_eq!(TcpState::from_name("listen"), Some(TcpState::Listen));
    assert_eq!(TcpState::from_name("fin-wait-1"), Some(TcpState::FinWait1));
    assert_eq!(TcpState::from_name("bogus"), None);
}

#[test]
fn endpoints_bracket_ipv6_only() {
    let v4: SocketAddr = "127.0.0.1:22".parse().unwrap();
    let v6: SocketAddr = "[::1]:22".parse().unwrap();
    let mapped: SocketAddr = "[::ffff:127.0.0.1]:80".parse().unwrap();
    assert_eq!(format_endpoint(v4), "127.0.0.1:22");
    assert_eq!(format_endpoint(v6), "[::1]:22");
    assert_eq!(format_endpoint(mapped), "[::ffff:127.0.0.1]:80");
    let wildcard: SocketAddr = "0.0.0.0:0".parse().unwrap();
    assert_eq!(format_endpoint(wildcard), "0.0.0.0:*");
}
