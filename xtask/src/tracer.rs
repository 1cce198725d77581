//! The benchmarks' tracer processes: start one and wait until it is
//! attached, stop it, and read what it cost (wall, CPU, peak RSS).

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// Wall time, CPU time and peak RSS of a finished child.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Usage {
    pub wall: Duration,
    /// User plus system time.
    pub cpu: Duration,
    pub user: Duration,
    pub max_rss_kib: u64,
    /// Exit status 0.
    pub success: bool,
}

/// Waits for `child` with wait4 to read its own resource usage.
pub(crate) fn wait_usage(child: &Child, started: Instant) -> anyhow::Result<Usage> {
    let mut status = 0;
    // SAFETY: rusage is plain old data that wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, writing status and usage.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    if pid < 0 {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    let time = |tv: libc::timeval| Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1000);
    Ok(Usage {
        wall: started.elapsed(),
        cpu: time(usage.ru_utime) + time(usage.ru_stime),
        user: time(usage.ru_utime),
        max_rss_kib: usage.ru_maxrss as u64,
        success: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
    })
}

/// `program ARGS`, to be spawned.
pub(crate) fn command(program: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    cmd
}

/// SIGINT to a child: a tracer prints what it has and exits.
pub(crate) fn interrupt(child: &Child) {
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
}

/// A tracer process; killed if the benchmark fails before stopping it, so
/// that no BPF program stays attached.
pub(crate) struct RunningTracer {
    pub child: Child,
    started: Instant,
    stopped: bool,
}

impl RunningTracer {
    /// SIGINT (the tracer prints what it has and exits), then its usage.
    /// Its peak RSS is the kernel's high-water mark since it ran its program
    /// (VmHWM): wait4's counts the pages it shared with the benchmark
    /// between fork and exec too.
    pub(crate) fn stop(&mut self) -> anyhow::Result<Usage> {
        let peak = peak_rss_kib(self.child.id());
        interrupt(&self.child);
        self.stopped = true;
        let usage = wait_usage(&self.child, self.started)?;
        Ok(Usage {
            max_rss_kib: peak.unwrap_or(usage.max_rss_kib),
            ..usage
        })
    }
}

/// VmHWM of a running process, in KiB.
pub(crate) fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl Drop for RunningTracer {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Spawns a tracer writing to files and waits until its BPF programs are
/// attached (a BPF link among its fds) and, for netwatch, its baseline is read.
pub(crate) fn start_tracer(
    mut cmd: Command,
    out_path: &Path,
    err_path: &Path,
) -> anyhow::Result<RunningTracer> {
    let started = Instant::now();
    let child = cmd
        .stdout(File::create(out_path)?)
        .stderr(File::create(err_path)?)
        .spawn()
        .with_context(|| format!("starting {cmd:?} failed"))?;
    let tracer = RunningTracer {
        child,
        started,
        stopped: false,
    };
    while started.elapsed() < Duration::from_secs(20) {
        let watching = std::fs::read_to_string(err_path).is_ok_and(|err| err.contains("watching"));
        // netwatch itself, or run by setpriv.
        let is_netwatch = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .any(|word| word.to_string_lossy().ends_with("netwatch"));
        if (is_netwatch && watching) || (!is_netwatch && has_bpf_link(tracer.child.id())) {
            // Give a tracer that attaches several programs the time to finish.
            std::thread::sleep(Duration::from_millis(200));
            return Ok(tracer);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Dropping the tracer kills it: no programs left attached.
    drop(tracer);
    bail!("{cmd:?} did not get ready in 20 s");
}

fn has_bpf_link(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fdinfo")).is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
            .any(|info| info.contains("link_type:"))
    })
}

/// What a benchmark's round runs besides its workload: nothing, empty
/// programs, or a tracer process.
pub(crate) enum Running {
    Nothing,
    /// Attached while held.
    Programs {
        _attached: crate::empty_programs::EmptyPrograms,
    },
    Process(RunningTracer),
}

impl Running {
    /// The empty program on `raw_tracepoints` (by name) and on
    /// `tracepoints` (through perf).
    pub(crate) fn empty_programs(
        raw_tracepoints: &[&str],
        tracepoints: &[&str],
    ) -> anyhow::Result<Running> {
        let attached = crate::empty_programs::EmptyPrograms::attach(raw_tracepoints, tracepoints)?;
        Ok(Running::Programs {
            _attached: attached,
        })
    }

    /// Stops it; the CPU time a tracer process used.
    pub(crate) fn stop(self) -> anyhow::Result<Duration> {
        match self {
            Running::Process(mut running) => Ok(running.stop()?.cpu),
            Running::Nothing | Running::Programs { .. } => Ok(Duration::ZERO),
        }
    }
}

/// CPU time process `pid` has used so far (/proc/PID/stat, in clock ticks).
pub(crate) fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    // utime and stime: fields 14 and 15, counted from the state (field 3).
    let ticks: u64 = [14, 15]
        .iter()
        .filter_map(|field| fields.get(field - 3)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    Ok(Duration::from_millis(ticks * 1000 / per_second.max(1)))
}
