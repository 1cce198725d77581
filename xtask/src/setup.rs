//! Installs what building, running and testing netwatch needs, and nothing
//! twice: each step checks first, so a machine that has everything costs a
//! few milliseconds and one line of output.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context as _};

use crate::command::{as_root, cargo, cargo_bin_dir, run};

/// Debian packages bpf-linker needs to build against LLVM 22; `ss` and
/// `bpftool` for the tests, which compare netwatch with them.
pub const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "iproute2",
    "bpftool",
];
/// The real servers the owner tests run (nginx, socat), the interpreter of
/// their server process models (tests/servers/models.py), strace, which
/// counts the BTF reads of a netwatch process, netstat, which the snapshot
/// is compared with, what checks the service files (systemd-analyze,
/// logrotate), and man, which renders the man pages.
pub const TEST_PACKAGES: &[&str] = &[
    "nginx-light",
    "socat",
    "python3",
    "strace",
    "net-tools",
    "systemd",
    "logrotate",
    "man-db",
];
/// What the benchmarks compare against or measure with.
pub const BENCH_PACKAGES: &[&str] = &["libbpf-tools", "net-tools", "linux-perf", "gnuplot-nox"];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const TRACEFS: &str = "/sys/kernel/tracing";
const BPFFS: &str = "/sys/fs/bpf";

/// Makes sure every prerequisite is present, installing what is missing.
pub fn ensure(packages: &[&[&str]]) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut installed = Vec::new();
    let wanted: Vec<&str> = packages
        .iter()
        .flat_map(|list| list.iter().copied())
        .collect();
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if !missing.is_empty() {
        install_packages(&missing)?;
        installed.push(format!("Debian packages {}", missing.join(" ")));
    }
    if !rust_src_installed()? {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        installed.push("nightly rust-src".to_owned());
    }
    if !bpf_linker_installed() {
        install_bpf_linker()?;
        installed.push(format!("bpf-linker {BPF_LINKER_VERSION}"));
    }
    for (fs_type, target) in [("tracefs", TRACEFS), ("bpf", BPFFS)] {
        if !mounted(fs_type, target)? {
            run(as_root("mount")?.args(["-t", fs_type, fs_type, target]))?;
            installed.push(format!("{fs_type} on {target}"));
        }
    }
    let took = started.elapsed().as_secs_f64();
    if installed.is_empty() {
        println!("xtask: prerequisites present (llvm-22, nightly rust-src, bpf-linker {BPF_LINKER_VERSION}, tracefs, bpffs) [{took:.2} s]");
    } else {
        println!("xtask: installed {} [{took:.1} s]", installed.join(", "));
    }
    Ok(())
}

fn package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout.ends_with(b" installed"))
}

fn install_packages(packages: &[&str]) -> anyhow::Result<()> {
    println!("xtask: installing Debian packages: {}", packages.join(" "));
    run(as_root("apt-get")?.args(["update", "-qq"]))?;
    run(as_root("apt-get")?
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages))
}

fn rust_src_installed() -> anyhow::Result<bool> {
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("running rustup failed: is rustup installed, with a nightly toolchain?")?;
    if !sysroot.status.success() {
        bail!(
            "the nightly toolchain is missing: install it with `rustup toolchain install nightly`"
        );
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    Ok(sysroot.join("lib/rustlib/src/rust/library/core").is_dir())
}

fn bpf_linker_installed() -> bool {
    Command::new(cargo_bin_dir().join("bpf-linker"))
        .arg("--version")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION))
}

fn install_bpf_linker() -> anyhow::Result<()> {
    println!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 2 minutes, once)"
    );
    run(cargo()
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ])
        .args(["--no-default-features", "--features", "llvm-22"]))
}

fn mounted(fs_type: &str, target: &str) -> anyhow::Result<bool> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts failed")?;
    Ok(mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_, at, kind) = (fields.next(), fields.next(), fields.next());
        at.map(Path::new) == Some(Path::new(target)) && kind == Some(fs_type)
    }))
}
