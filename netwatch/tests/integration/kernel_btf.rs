//! The kernel's BTF is parsed once per netwatch process, whatever it loads:
//! strace counts the opens of /sys/kernel/btf/vmlinux that succeed (only
//! those are printed, each whole: two threads' calls at once would
//! otherwise be printed cut in two, unfinished and resumed).

use std::process::Command;

/// Successful opens of the kernel's BTF by `netwatch ARGS` and its threads.
fn btf_opens(args: &[&str]) -> usize {
    let trace = tempfile::NamedTempFile::new().expect("a temporary file");
    let status = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-e",
            "trace=open,openat,openat2",
            "-e",
            "status=successful",
        ])
        .arg("-o")
        .arg(trace.path())
        .arg(env!("CARGO_BIN_EXE_netwatch"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("strace runs (cargo xtask test installs it)");
    assert!(status.success(), "netwatch {args:?} failed under strace");
    let trace = std::fs::read_to_string(trace.path()).expect("strace wrote its trace");
    trace
        .lines()
        .filter(|line| line.contains("\"/sys/kernel/btf/vmlinux\""))
        .count()
}

#[test]
fn a_kernel_snapshot_parses_the_kernel_btf_once() {
    assert_eq!(btf_opens(&["snapshot", "-tanp", "--source", "kernel"]), 1);
}

#[test]
fn the_stream_and_its_checks_parse_the_kernel_btf_once() {
    // The state programs, the baseline's iterators and the checks' iterators.
    assert_eq!(
        btf_opens(&["verify", "--interval", "1", "--duration", "3"]),
        1
    );
}
