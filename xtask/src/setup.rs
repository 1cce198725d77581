//! Installs what building, running and testing netwatch needs, and nothing
//! twice: each step checks first, so a machine that has everything costs a
//! few milliseconds and one line of output.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context as _};

use crate::command::{as_root, cargo, cargo_bin_dir, run};

/// What one task needs: Debian packages, and tools `cargo install` builds.
pub struct Needs {
    packages: &'static [&'static str],
    tools: &'static [CargoTool],
}

/// Building and running netwatch: bpf-linker and the LLVM 22 it builds
/// against; `ss` and `bpftool` for the tests, which compare netwatch with them.
pub const BUILD: Needs = Needs {
    packages: &[
        "llvm-22-dev",
        "zlib1g-dev",
        "libzstd-dev",
        "iproute2",
        "bpftool",
    ],
    tools: &[CargoTool {
        name: "bpf-linker",
        version: "0.13.0",
        options: &["--no-default-features", "--features", "llvm-22"],
        env: &[
            ("LLVM_SYS_221_PREFIX", LLVM_PREFIX),
            ("LLVM_PREFIX", LLVM_PREFIX),
        ],
        takes: "about 2 minutes, against LLVM 22",
    }],
};
/// Building the Debian package: cargo-deb.
pub const DIST: Needs = Needs {
    packages: &[],
    tools: &[CargoTool {
        name: "cargo-deb",
        version: "3.8.0",
        options: &[],
        env: &[],
        takes: "about a minute",
    }],
};
/// The tests: the real servers the owner tests run (nginx, socat), the
/// interpreter of their server process models (tests/servers/models.py),
/// strace, which counts the BTF reads of a netwatch process, netstat, which
/// the snapshot is compared with, what checks the service files
/// (systemd-analyze, logrotate), man, which renders the man pages,
/// lintian, which checks the package, rsyslog, which receives audit's
/// --syslog messages, prometheus (with promtool), which checks and
/// scrapes the metrics, tmux, the terminal `top` is tested in, and
/// dnsmasq, the DNS server that names its remote hosts.
pub const TEST: Needs = Needs {
    packages: &[
        "nginx-light",
        "socat",
        "python3",
        "strace",
        "net-tools",
        "systemd",
        "logrotate",
        "man-db",
        "lintian",
        "rsyslog",
        "prometheus",
        "tmux",
        "dnsmasq-base",
    ],
    tools: &[],
};
/// Fuzzing: cargo-fuzz, and the C++ compiler libFuzzer is built with.
pub const FUZZ: Needs = Needs {
    packages: &["g++"],
    tools: &[CargoTool {
        name: "cargo-fuzz",
        version: "0.13.2",
        options: &[],
        env: &[],
        takes: "about a minute",
    }],
};
/// What the benchmarks compare against or measure with (socat: the
/// forking server; nginx and wrk: the real server and its load; tmux: the
/// terminal `top` runs in; bandwhich: a live table `top` is measured beside).
pub const BENCH: Needs = Needs {
    packages: &[
        "libbpf-tools",
        "net-tools",
        "linux-perf",
        "gnuplot-nox",
        "socat",
        "nginx-light",
        "wrk",
        "tmux",
    ],
    tools: &[CargoTool {
        name: "bandwhich",
        version: "0.23.1",
        options: &[],
        env: &[],
        takes: "about 3 minutes",
    }],
};

/// A tool `cargo install` builds from crates.io, at a pinned version.
struct CargoTool {
    name: &'static str,
    version: &'static str,
    /// `cargo install` options after the version.
    options: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    /// How long building it takes, said before it starts.
    takes: &'static str,
}

impl CargoTool {
    /// Whether `NAME --version` runs and names the pinned version.
    fn installed(&self) -> bool {
        Command::new(cargo_bin_dir().join(self.name))
            .arg("--version")
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(self.version))
    }

    fn install(&self) -> anyhow::Result<()> {
        println!(
            "xtask: building {} {} ({}, once)",
            self.name, self.version, self.takes
        );
        run(cargo()
            .envs(self.env.iter().copied())
            .args(["install", self.name, "--version", self.version, "--locked"])
            .args(self.options))
    }
}

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const TRACEFS: &str = "/sys/kernel/tracing";
const BPFFS: &str = "/sys/fs/bpf";

/// Makes sure every prerequisite is present, installing what is missing.
pub fn ensure(needs: &[&Needs]) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut installed = Vec::new();
    let wanted: Vec<&str> = needs
        .iter()
        .flat_map(|need| need.packages.iter().copied())
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
    let tools: Vec<&CargoTool> = needs.iter().flat_map(|need| need.tools).collect();
    for tool in &tools {
        if !tool.installed() {
            tool.install()?;
            installed.push(format!("{} {}", tool.name, tool.version));
        }
    }
    for (fs_type, target) in [("tracefs", TRACEFS), ("bpf", BPFFS)] {
        if !mounted(fs_type, target)? {
            run(as_root("mount")?.args(["-t", fs_type, fs_type, target]))?;
            installed.push(format!("{fs_type} on {target}"));
        }
    }
    let took = started.elapsed().as_secs_f64();
    if installed.is_empty() {
        let tools: Vec<String> = tools
            .iter()
            .map(|tool| format!("{} {}", tool.name, tool.version))
            .collect();
        println!(
            "xtask: prerequisites present ({} packages, nightly rust-src, {}, tracefs, bpffs) [{took:.2} s]",
            wanted.len(),
            tools.join(", ")
        );
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

fn mounted(fs_type: &str, target: &str) -> anyhow::Result<bool> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts failed")?;
    Ok(mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_, at, kind) = (fields.next(), fields.next(), fields.next());
        at.map(Path::new) == Some(Path::new(target)) && kind == Some(fs_type)
    }))
}
