//! `cargo xtask fuzz`: each cargo-fuzz target in fuzz/ for a bounded time,
//! from its committed corpus (fuzz/corpus/TARGET, read, never written: what
//! libFuzzer finds goes to a scratch directory). A crash stops the run with
//! the failing input in fuzz/artifacts/TARGET, to be fixed and added to the
//! corpus.

use std::path::Path;
use std::process::Command;

use anyhow::bail;

use crate::command::run;

/// The targets, each a parser of input netwatch does not control
/// (netwatch::fuzzing).
pub const TARGETS: [&str; 5] = [
    "ring_buffer",
    "proc_net",
    "btf",
    "syslog_target",
    "command_line",
];

/// Runs `targets` (every one when empty) for `seconds` each.
pub fn run_targets(root: &Path, seconds: u64, targets: &[String]) -> anyhow::Result<()> {
    let chosen: Vec<&str> = match targets {
        [] => TARGETS.to_vec(),
        named => named.iter().map(String::as_str).collect(),
    };
    if let Some(unknown) = chosen.iter().find(|target| !TARGETS.contains(target)) {
        bail!(
            "no fuzz target {unknown}: the targets are {}",
            TARGETS.join(", ")
        );
    }
    let fuzz = root.join("fuzz");
    for target in chosen {
        let scratch = std::env::temp_dir().join(format!("netwatch-fuzz-{target}"));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)?;
        println!("xtask: fuzzing {target} for {seconds} s");
        run(Command::new("rustup")
            .current_dir(&fuzz)
            .args(["run", "nightly", "cargo", "fuzz", "run", target])
            .arg(&scratch)
            .arg(fuzz.join("corpus").join(target))
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-rss_limit_mb=2048",
            ]))?;
        let _ = std::fs::remove_dir_all(&scratch);
    }
    Ok(())
}
