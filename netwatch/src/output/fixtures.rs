//! Records for the output tests: owners, tuples and times that take every
//! path of the writers, and golden files that pin a writer's exact bytes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::model::{Cgroup, CommandLine, Owner, ProcessImage, Proto, Tuple};

/// An owner with `image`, where given.
pub fn owner(pid: u32, program: &str, image: Option<ProcessImage>) -> Owner {
    Owner {
        image: image.map(Arc::new),
        ..Owner::new(pid, program.into())
    }
}

/// What a process runs: these arguments and cgroup, and nginx's executable.
pub fn image(cmdline: Option<&[&[u8]]>, cgroup: Option<&str>) -> ProcessImage {
    ProcessImage {
        cmdline: cmdline
            .map(|args| Arc::new(CommandLine(args.iter().map(|a| a.to_vec()).collect()))),
        cgroup: cgroup.map(|path| Arc::new(Cgroup::from_path(path))),
        exe: Some("/usr/sbin/nginx".into()),
    }
}

/// Owners whose fields take every path of the writers: escapes,
/// non-ASCII names longer than the column, arguments that need quoting
/// or are not UTF-8, units and containers, no image, an image with
/// nothing readable.
pub fn owners() -> Vec<Option<Owner>> {
    let container = format!("/system.slice/docker-{}.scope", "ab12".repeat(16));
    vec![
        Some(owner(
            4242,
            "nginx",
            Some(image(
                Some(&[b"nginx: worker process", b""]),
                Some("/system.slice/nginx.service"),
            )),
        )),
        Some(owner(
            7,
            "evil\u{1b}[2J\n\"q\"\\ wörker-with-a-long-name",
            Some(image(
                Some(&[
                    b"/bin/sh",
                    b"-c",
                    b"echo 'it''s' \"x\"\t\xff\xfe|",
                    b"\x1b[1m",
                ]),
                Some(&container),
            )),
        )),
        Some(owner(1, "systemd", None)),
        Some(owner(99, "x\u{7f}\u{85}", Some(image(None, None)))),
        None,
    ]
}

/// Tuples of both families: zero ports, the widest addresses, runs of
/// zeros where `::` goes and where it does not, an IPv4-mapped address.
pub fn tuples() -> Vec<Tuple> {
    let tuple = |proto, local: &str, remote: &str| Tuple {
        proto,
        local: local.parse::<SocketAddr>().expect("an address"),
        remote: remote.parse::<SocketAddr>().expect("an address"),
    };
    vec![
        tuple(Proto::Tcp, "127.0.0.1:48286", "127.0.0.1:8080"),
        tuple(Proto::Tcp, "10.200.30.4:0", "255.255.255.255:65535"),
        tuple(Proto::Tcp6, "[::1]:443", "[::]:0"),
        tuple(Proto::Tcp6, "[2001:db8::1:0:0:1]:1", "[fe80::1:2:3:4]:22"),
        tuple(Proto::Tcp6, "[::ffff:127.0.0.1]:80", "[1:2:3:4:5:6:7:8]:9"),
        tuple(Proto::Tcp6, "[1:0:3:4:5:6:7:8]:10", "[1:0:0:4:0:0:7:8]:11"),
        tuple(
            Proto::Tcp6,
            "[2001:db8:85a3:8d3:1319:8a2e:370:7348]:65535",
            "[::2:0]:2",
        ),
    ]
}

/// Times in the old state, in ms: none, zero, ties at the third decimal,
/// tiny, and long.
pub const MS: [Option<f64>; 10] = [
    None,
    Some(0.0),
    Some(0.06034),
    Some(0.0625),
    Some(0.0005),
    Some(0.000001),
    Some(1234.5678),
    Some(2.0005),
    Some(123456789.123456),
    Some(0.0104995),
];

/// Monotonic stamps: within one second, across seconds, a day later.
pub const STAMPS: [u64; 6] = [
    5,
    999_999_999,
    1_000_000_000,
    1_000_000_001,
    86_400_123_456_789,
    86_400_123_457_789,
];

/// Checks `rendered` against the golden file `tests/golden/NAME`;
/// `NETWATCH_BLESS=1` writes it anew.
pub fn assert_golden(name: &str, rendered: &[u8]) {
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let path = golden.join(name);
    if std::env::var_os("NETWATCH_BLESS").is_some() {
        std::fs::create_dir_all(&golden).expect("creates tests/golden");
        std::fs::write(&path, rendered).expect("writes the golden file");
    }
    let expected = std::fs::read(&path).expect("the golden file");
    assert!(
        rendered == expected,
        "{name} differs:\n{}",
        String::from_utf8_lossy(rendered)
    );
}
