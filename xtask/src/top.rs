//! `cargo xtask bench top`: `netwatch top` in a 132x40 tmux window while
//! connections are held open and new ones churn at a fixed rate, then
//! bandwhich (from crates.io, the live table rustnet's peers compare with)
//! in the same window under the same load. Prints each one's CPU (a share
//! of one core) while idle and under the churn and its peak memory, and
//! how long top's redraws took (it says so when it exits).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use xtask::loopback::{self, ChurnSpec};

use crate::command::cargo_bin_dir;
use crate::load::Holders;
use crate::tracer::{peak_rss_kib, process_cpu};

/// tmux's server for this benchmark, killed when dropped.
struct Window {
    socket: String,
}

impl Window {
    /// `command` (a shell's, which should exec the tool) in a new 132x40 window.
    fn start(command: &str) -> anyhow::Result<Window> {
        let window = Window {
            socket: format!("netwatch-bench-{}", std::process::id()),
        };
        let started = window
            .tmux(&["new-session", "-d", "-x", "132", "-y", "40", command])
            .status()
            .context("tmux does not run (cargo xtask bench installs it)")?;
        if !started.success() {
            bail!("tmux did not start a session");
        }
        Ok(window)
    }

    fn tmux(&self, args: &[&str]) -> Command {
        let mut command = Command::new("tmux");
        command.args(["-L", &self.socket]).args(args);
        command
    }

    /// The pid of what the window runs (netwatch, which the shell exec'd).
    fn pid(&self) -> anyhow::Result<u32> {
        let output = self
            .tmux(&["display-message", "-p", "#{pane_pid}"])
            .output()?;
        let text = String::from_utf8_lossy(&output.stdout);
        text.trim().parse().context("tmux gave no pane pid")
    }

    /// Waits until the screen shows `text` (30 s at most).
    fn wait_for(&self, text: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let output = self.tmux(&["capture-pane", "-p"]).output()?;
            if String::from_utf8_lossy(&output.stdout).contains(text) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("the window did not show \"{text}\" within 30 s")
    }

    /// Types `q` and waits (10 s at most) for process `pid` to exit.
    fn quit(&self, pid: u32) -> anyhow::Result<()> {
        self.tmux(&["send-keys", "q"]).status()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // The server is usually gone with its only window's command.
        let _ = self
            .tmux(&["kill-server"])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// CPU time of `pid` over `seconds` of wall time, as a share of one core.
fn cpu_share(pid: u32, during: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let (cpu, wall) = (process_cpu(pid)?, Instant::now());
    during()?;
    let used = process_cpu(pid)?.saturating_sub(cpu);
    Ok(used.as_secs_f64() / wall.elapsed().as_secs_f64())
}

/// What a tool in the window cost.
struct Cost {
    /// Shares of one core, idle and under the churn.
    idle: f64,
    busy: f64,
    /// New connections per second the churn made.
    churned: f64,
    peak_kib: u64,
}

/// Runs `command` in a window until it shows `ready`, then measures it
/// idle for 10 s and under `churn`, and quits it with `q`.
fn measure(command: &str, ready: &str, churn: &ChurnSpec) -> anyhow::Result<Cost> {
    let window = Window::start(command)?;
    window.wait_for(ready)?;
    let pid = window.pid()?;
    std::thread::sleep(Duration::from_secs(2));
    let idle = cpu_share(pid, || {
        std::thread::sleep(Duration::from_secs(10));
        Ok(())
    })?;
    let mut churned = None;
    let busy = cpu_share(pid, || {
        churned = Some(loopback::churn(churn)?);
        Ok(())
    })?;
    let peak_kib = peak_rss_kib(pid).unwrap_or(0);
    window.quit(pid)?;
    let churned = churned.context("the churn did not run")?.rate;
    Ok(Cost {
        idle,
        busy,
        churned,
        peak_kib,
    })
}

/// Holds `connections` open (in the snapshot benchmark's holder
/// processes), then measures `netwatch top` and bandwhich in turn, each
/// idle for 10 s and under `rate` new connections per second for `seconds`.
pub fn run(
    netwatch: &Path,
    connections: usize,
    rate: u64,
    seconds: u64,
    results: &Path,
) -> anyhow::Result<()> {
    crate::load::raise_fd_limit(4096)?;
    let held = Holders::start(2 * connections)?;
    let churn = ChurnSpec {
        connections: 0,
        seconds,
        threads: 2,
        rate,
    };
    let stderr = results.join("top.err");
    let top_command = format!("exec {} top 2>{}", netwatch.display(), stderr.display());
    let top = measure(&top_command, "netwatch top · connections · live", &churn)?;
    let said = std::fs::read_to_string(&stderr).unwrap_or_default();
    let top_said = |about: &str, otherwise: &str| {
        let line = said.lines().find(|line| line.contains(about));
        line.unwrap_or(otherwise)
            .trim_start_matches("netwatch: ")
            .to_owned()
    };
    let redraws = top_said(
        "redrew the screen",
        "(top did not say how long its redraws took)",
    );
    let summary = top_said(
        " lost (",
        "(top did not give its summary: what it lost is unknown)",
    );
    // Numeric, as top is by default: no reverse lookups.
    let bandwhich = cargo_bin_dir().join("bandwhich");
    let bandwhich_command = format!("exec {} --interface lo --no-resolve", bandwhich.display());
    let bandwhich = measure(&bandwhich_command, "Utilization by process name", &churn)?;
    drop(held);
    println!(
        "{} connections held ({} sockets, both ends), a 132x40 tmux window, {seconds} s of churn at {rate} new connections per second:",
        connections,
        2 * connections
    );
    println!(
        "  {:<22} {:>10} {:>12} {:>12} {:>12}",
        "", "idle CPU", "churn CPU", "made /s", "peak memory"
    );
    for (name, cost) in [("netwatch top", &top), ("bandwhich -i lo -n", &bandwhich)] {
        println!(
            "  {name:<22} {:>9.1}% {:>11.1}% {:>12.0} {:>8.1} MiB",
            cost.idle * 100.0,
            cost.busy * 100.0,
            cost.churned,
            cost.peak_kib as f64 / 1024.0
        );
    }
    println!(
        "  ratio of CPU under the churn, bandwhich / top: {:.2}",
        bandwhich.busy / top.busy.max(f64::EPSILON)
    );
    println!("  {redraws}");
    println!("  top's engine: {summary}");
    Ok(())
}
