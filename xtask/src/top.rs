//! `cargo xtask bench top`: `netwatch top` in a 132x40 tmux window while
//! connections are held open and new ones churn at a fixed rate. Prints
//! its CPU (a share of one core) while idle and under the churn, how long
//! its redraws took (it says so when it exits), and its peak memory.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use xtask::loopback::{self, ChurnSpec};

use crate::load::Holders;
use crate::tracer::{peak_rss_kib, process_cpu};

/// tmux's server for this benchmark, killed when dropped.
struct Window {
    socket: String,
}

impl Window {
    /// `netwatch top` in a new 132x40 window, its stderr to `stderr`.
    fn start(netwatch: &Path, stderr: &Path) -> anyhow::Result<Window> {
        let window = Window {
            socket: format!("netwatch-bench-{}", std::process::id()),
        };
        let command = format!("exec {} top 2>{}", netwatch.display(), stderr.display());
        let started = window
            .tmux(&["new-session", "-d", "-x", "132", "-y", "40", &command])
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
        bail!("netwatch top did not show \"{text}\" within 30 s")
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]).status();
    }
}

/// CPU time of `pid` over `seconds` of wall time, as a share of one core.
fn cpu_share(pid: u32, during: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let (cpu, wall) = (process_cpu(pid)?, Instant::now());
    during()?;
    let used = process_cpu(pid)?.saturating_sub(cpu);
    Ok(used.as_secs_f64() / wall.elapsed().as_secs_f64())
}

/// Holds `connections` open (in the snapshot benchmark's holder
/// processes), starts top, then measures it idle for 10 s and
/// under `rate` new connections per second for `seconds`.
pub fn run(
    netwatch: &Path,
    connections: usize,
    rate: u64,
    seconds: u64,
    results: &Path,
) -> anyhow::Result<()> {
    crate::load::raise_fd_limit(4096)?;
    let held = Holders::start(2 * connections)?;
    let stderr = results.join("top.err");
    let window = Window::start(netwatch, &stderr)?;
    window.wait_for("netwatch top · connections · live")?;
    let pid = window.pid()?;
    std::thread::sleep(Duration::from_secs(2));
    let idle = cpu_share(pid, || {
        std::thread::sleep(Duration::from_secs(10));
        Ok(())
    })?;
    let spec = ChurnSpec {
        connections: 0,
        seconds,
        threads: 2,
        rate,
    };
    let mut churned = None;
    let busy = cpu_share(pid, || {
        churned = Some(loopback::churn(&spec)?);
        Ok(())
    })?;
    let peak = peak_rss_kib(pid).unwrap_or(0);
    window.tmux(&["send-keys", "q"]).status()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let said = std::fs::read_to_string(&stderr).unwrap_or_default();
    let redraws = said
        .lines()
        .find(|line| line.contains("redrew the screen"))
        .unwrap_or("(top did not say how long its redraws took)");
    let churned = churned.context("the churn did not run")?;
    drop(held);
    println!(
        "netwatch top, 132x40, {} connections held ({} sockets, both ends):",
        connections,
        2 * connections
    );
    println!("  idle 10 s:       {:>5.1}% of a core", idle * 100.0);
    println!(
        "  churn {seconds} s:      {:>5.1}% of a core ({:.0} new connections per second made)",
        busy * 100.0,
        churned.rate
    );
    println!("  peak memory:     {:.1} MiB (VmHWM)", peak as f64 / 1024.0);
    println!("  {}", redraws.trim_start_matches("netwatch: "));
    Ok(())
}
