//! Running commands: checked, as root when needed, with cargo's bin dir on PATH.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context as _};

/// Runs a command to completion and fails unless it succeeds.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("could not start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

/// Whether a command runs and exits 0 (its output is discarded).
pub fn succeeds(command: &mut Command) -> bool {
    command.output().is_ok_and(|out| out.status.success())
}

/// Whether this process is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `program`, run directly when we are root and through sudo otherwise.
pub fn as_root(program: &str) -> anyhow::Result<Command> {
    if is_root() {
        return Ok(Command::new(program));
    }
    if !succeeds(Command::new("sudo").arg("--version")) {
        bail!("{program} must run as root and sudo is not installed: run this command as root");
    }
    let mut command = Command::new("sudo");
    command.arg("--preserve-env=PATH").arg(program);
    Ok(command)
}

/// Where `cargo install` puts binaries ($CARGO_HOME/bin).
pub fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// A cargo command with $CARGO_HOME/bin on PATH, so build.rs finds bpf-linker.
pub fn cargo() -> Command {
    let mut path =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect::<Vec<_>>();
    let bin = cargo_bin_dir();
    if !path.contains(&bin) {
        path.insert(0, bin);
    }
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    if let Ok(joined) = std::env::join_paths(path) {
        command.env("PATH", joined);
    }
    command
}
