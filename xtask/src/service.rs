//! The service files in `dist/`, checked by the tools that read them:
//! `systemd-analyze verify` on the unit and its exposure rating by
//! `systemd-analyze security --offline=true` (at most `MAX_EXPOSURE`), and
//! `logrotate --debug` on the rotation.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context as _};

use crate::command::run;

/// The audit service's unit and its log rotation, under the workspace root.
const UNIT: &str = "dist/netwatch-audit.service";
const LOGROTATE: &str = "dist/netwatch.logrotate";
/// The highest exposure `systemd-analyze security` may rate the unit ("OK").
const MAX_EXPOSURE: f64 = 2.0;
/// Where the unit expects the binary (the package installs it there).
const INSTALLED_BINARY: &str = "/usr/bin/netwatch";

/// Checks the unit and the log rotation; `netwatch` is the binary just built.
pub fn check(root: &Path, netwatch: &Path) -> anyhow::Result<()> {
    ensure_service_user()?;
    verify_unit(root, netwatch)?;
    let exposure = exposure(&root.join(UNIT))?;
    if exposure > MAX_EXPOSURE {
        bail!("systemd-analyze rates {UNIT} at {exposure}, above {MAX_EXPOSURE}: harden it");
    }
    let rotation = Command::new("logrotate")
        .arg("--debug")
        .arg(root.join(LOGROTATE))
        .output()
        .context("logrotate does not run (cargo xtask test installs it)")?;
    let said = String::from_utf8_lossy(&rotation.stderr);
    if !rotation.status.success() || said.contains("error:") {
        bail!("logrotate refuses {LOGROTATE}:\n{said}");
    }
    println!("xtask: {UNIT} verified, exposure {exposure} (at most {MAX_EXPOSURE}); {LOGROTATE} read by logrotate");
    Ok(())
}

/// The service's user, created as the package does when it is missing.
fn ensure_service_user() -> anyhow::Result<()> {
    if crate::package::user_exists() {
        return Ok(());
    }
    run(Command::new("useradd").args([
        "--system",
        "--user-group",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
        "netwatch",
    ]))
}

/// `systemd-analyze verify` on the unit as installed, but for the binary
/// its `ExecStart=` names: the one just built stands in for the package's.
fn verify_unit(root: &Path, netwatch: &Path) -> anyhow::Result<()> {
    let unit = std::fs::read_to_string(root.join(UNIT))?;
    if !unit.contains(INSTALLED_BINARY) {
        bail!("{UNIT} does not start {INSTALLED_BINARY}");
    }
    let scratch = std::env::temp_dir().join(format!("netwatch-unit-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let copy = scratch.join("netwatch-audit.service");
    std::fs::write(
        &copy,
        unit.replace(INSTALLED_BINARY, &netwatch.to_string_lossy()),
    )?;
    let verified = Command::new("systemd-analyze")
        .arg("verify")
        // Its Documentation= page comes with the package, checked there.
        .arg("--man=no")
        .arg(&copy)
        .output()
        .context("systemd-analyze does not run (cargo xtask test installs systemd)");
    let _ = std::fs::remove_dir_all(&scratch);
    let verified = verified?;
    let said = String::from_utf8_lossy(&verified.stderr);
    if !verified.status.success() || !said.trim().is_empty() {
        bail!("systemd-analyze verify finds fault with {UNIT}:\n{said}");
    }
    Ok(())
}

/// The overall exposure `systemd-analyze security --offline=true` gives the unit.
fn exposure(unit: &Path) -> anyhow::Result<f64> {
    let rated = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(unit)
        .output()
        .context("systemd-analyze does not run (cargo xtask test installs systemd)")?;
    let said = String::from_utf8_lossy(&rated.stdout);
    said.lines()
        .find_map(|line| {
            line.split_once("Overall exposure level for ")?
                .1
                .split_once(": ")
        })
        .and_then(|(_, rating)| rating.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no exposure level in systemd-analyze's output:\n{said}"))
}
