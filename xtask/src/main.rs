//! netwatch's helper: `cargo xtask run` and `cargo xtask test` install what is
//! missing and then run netwatch or every check; `cargo xtask bench` measures.

mod bench;
mod command;
mod empty_programs;
mod forking;
mod fuzz;
mod load;
mod nginx;
mod package;
mod service;
mod setup;
mod soak;
mod stats;
mod top;
mod tracer;
mod traffic;

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::command::{as_root, cargo, is_root, run};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (Debian packages, rust-src, bpf-linker, tracefs/bpffs mounts).
    Setup,
    /// Install, build release and run `netwatch ARGS` as root (streaming by default).
    Run {
        /// Arguments for netwatch, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install, then fmt --check, clippy -D warnings and every test (root ones
    /// included), and install, run and purge the Debian package.
    Test,
    /// Build the Debian package (target/debian/netwatch_VERSION_ARCH.deb).
    Dist,
    /// Run each fuzz target (fuzz/) from its committed corpus for a bounded time.
    Fuzz {
        /// Seconds each target runs.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        /// The targets (all when none is named): ring_buffer, proc_net, btf,
        /// syslog_target, command_line.
        targets: Vec<String>,
    },
    /// Measure netwatch against ss/netstat (snapshot), tcpstates (stream), over time (soak), its cost to TCP traffic (traffic), or beside a forking server (forking).
    Bench {
        /// Measure this netwatch binary (another commit's build, to compare)
        /// instead of building this tree's.
        #[arg(long, value_name = "PATH", global = true)]
        netwatch: Option<PathBuf>,
        #[command(subcommand)]
        which: bench::Which,
    },
    /// (benchmark helper) Hold established loopback connections until stdin closes.
    #[command(hide = true)]
    Hold(load::HoldArgs),
    /// (benchmark helper) Open and close loopback connections as fast as possible.
    #[command(hide = true)]
    Churn(load::ChurnArgs),
    /// (benchmark helper) Serve the traffic benchmark's connections until killed.
    #[command(hide = true)]
    TrafficServer {
        /// The CPU to run on.
        #[arg(long)]
        cpu: usize,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::ensure(&[&setup::BUILD]),
        Task::Run { args } => run_netwatch(&args),
        Task::Test => test(),
        Task::Dist => {
            setup::ensure(&[&setup::BUILD, &setup::DIST])?;
            let deb = dist()?;
            println!("xtask: built {}", deb.display());
            Ok(())
        }
        Task::Fuzz { seconds, targets } => {
            setup::ensure(&[&setup::BUILD, &setup::FUZZ])?;
            fuzz::run_targets(&workspace_root(), seconds, &targets)
        }
        Task::Bench { netwatch, which } => {
            setup::ensure(&[&setup::BUILD, &setup::BENCH])?;
            let netwatch = match netwatch {
                Some(path) => std::path::absolute(path)?,
                None => {
                    build_release()?;
                    netwatch_binary()
                }
            };
            bench::run(which, &netwatch)
        }
        Task::Hold(args) => load::hold(&args),
        Task::Churn(args) => load::churn(&args).map(|report| println!("{report}")),
        Task::TrafficServer { cpu } => traffic::serve(cpu),
    }
}

fn run_netwatch(args: &[String]) -> anyhow::Result<()> {
    setup::ensure(&[&setup::BUILD])?;
    build_release()?;
    let binary = netwatch_binary();
    let mut command = as_root(&binary.to_string_lossy())?;
    let err = command.args(args).exec();
    Err(err).with_context(|| format!("could not start {}", binary.display()))
}

fn test() -> anyhow::Result<()> {
    setup::ensure(&[&setup::BUILD, &setup::TEST, &setup::DIST, &setup::FUZZ])?;
    let root = workspace_root();
    run(cargo().current_dir(&root).args(["fmt", "--all", "--check"]))?;
    let host_crates = ["-p", "netwatch", "-p", "netwatch-common", "-p", "xtask"];
    run(cargo()
        .current_dir(&root)
        .args(["clippy", "--all-targets", "--features", "netwatch/fuzzing"])
        .args(host_crates)
        .args(["--", "-D", "warnings"]))?;
    // Alone and for its own target: a workspace-wide clippy would unify
    // features and see two panic handlers, and the host target has no
    // panic=abort core.
    run(Command::new("rustup").current_dir(&root).args([
        "run",
        "nightly",
        "cargo",
        "clippy",
        "-p",
        "netwatch-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(&mut cargo_test(&root, &host_crates))?;
    fuzz::run_targets(&root, FUZZ_SECONDS, &[])?;
    // The owner tests again, each netwatch in them run as a service would
    // be: as uid 65534 with only the capabilities it needs (tracefs,
    // mode 0700, is closed to it).
    run(cargo_test(
        &root,
        &["-p", "netwatch", "--test", "integration", "owners"],
    )
    .env("NETWATCH_TEST_CAPABILITIES", "bpf,perfmon,sys_ptrace"))?;
    // Before the service files' check, which makes the service's user: on a
    // fresh machine the package's postinst must.
    package::check(&dist()?)?;
    let debug_binary = netwatch_binary()
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| root.join("target"), Path::to_path_buf)
        .join("debug/netwatch");
    service::check(&root, &debug_binary)
}

/// Seconds `cargo xtask test` fuzzes each target for.
const FUZZ_SECONDS: u64 = 30;

/// `cargo test ARGS`, one test at a time (tests that load eBPF programs
/// share kernel state), as root.
fn cargo_test(root: &Path, args: &[&str]) -> Command {
    let mut tests = cargo();
    tests.current_dir(root).arg("test").args(args);
    if !is_root() {
        // The eBPF tests load programs: run the test binaries through sudo.
        tests.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
    tests.args(["--", "--test-threads=1"]);
    tests
}

/// Builds release and the Debian package from it; returns the package's path.
fn dist() -> anyhow::Result<PathBuf> {
    build_release()?;
    package::build(&workspace_root(), &netwatch_binary())
}

fn build_release() -> anyhow::Result<()> {
    run(cargo()
        .current_dir(workspace_root())
        .args(["build", "--release", "-p", "netwatch"]))
}

fn workspace_root() -> PathBuf {
    let xtask_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    xtask_dir.parent().map_or(xtask_dir.clone(), PathBuf::from)
}

fn netwatch_binary() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
        .join("release/netwatch")
}
