//! `cargo xtask bench snapshot|stream|soak|traffic`: netwatch against the tools its users
//! know, measured in the same run on the same load. Prints figures and ratios;
//! asserts nothing about speed (the machines are shared and noisy), but the
//! stream benchmark does check completeness, which noise cannot excuse.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::load::{self, ChurnArgs};
use crate::stats::median;
use crate::tracer::{command, interrupt, start_tracer, wait_usage};
use xtask::bpf_programs::programs_of;

#[derive(clap::Subcommand, Debug)]
pub enum Which {
    /// `netwatch snapshot -tanp` (as root and as nobody) vs reading
    /// /proc/net/tcp{,6}, `ss -tanp` and `netstat -tanp`, at several socket counts.
    Snapshot {
        /// Established sockets to hold (both ends count), comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "100,1000,2000,5000,40000,80000"
        )]
        sockets: Vec<usize>,
        /// Timed runs of each tool per size (the median is shown).
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// `netwatch` vs `tcpstates` under loopback connection churn: a burst, then a sustained run.
    Stream {
        /// Connections in the burst.
        #[arg(long, default_value_t = 100_000)]
        burst: u64,
        /// Seconds of sustained churn.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Write the tracers' outputs to bench-results/ on disk instead of
        /// tmpfs (on this kind of virtual machine a new page of a file on
        /// disk is guest memory touched for the first time, which the
        /// writer pays for in the copy: 0.35 to 0.9 s of system time per
        /// 300 MB, against 0.1 s on tmpfs).
        #[arg(long)]
        on_disk: bool,
    },
    /// `netwatch audit` for a long run: churn at half the maximum rate plus
    /// long-lived connections; RSS sampled and plotted, records counted,
    /// and a `netwatch verify` beside it checks its table against /proc.
    Soak {
        /// Minutes of churn.
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        /// Long-lived connections held meanwhile.
        #[arg(long, default_value_t = 1000)]
        long_lived: usize,
    },
    /// `netwatch audit` beside a fork-per-connection server (socat): its
    /// CPU per connection, each with an owner it reads /proc for, and how
    /// many records name the child's command line.
    Forking {
        /// Connections per round.
        #[arg(long, default_value_t = 3000)]
        connections: usize,
        /// Rounds (the median is shown).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Another netwatch build to measure in alternation (an earlier commit's).
        #[arg(long, value_name = "PATH")]
        against: Option<PathBuf>,
    },
    /// `netwatch top` in a 132x40 tmux window, with connections held open
    /// and a churn of new ones: its CPU, its redraw time and its memory;
    /// then bandwhich (built from crates.io) in the same window and load.
    Top {
        /// Connections held open (both ends are shown: twice as many rows).
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// New connections per second during the churn.
        #[arg(long, default_value_t = 2_000)]
        rate: u64,
        /// Seconds of churn.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// nginx from Debian (one worker) under wrk, with `Connection: close`
    /// and with keep-alive, beside no tracer, netwatch's hooks running empty
    /// programs, `netwatch --json`, `netwatch audit` and tcpstates; and what
    /// each adds to a getppid().
    Nginx {
        /// Seconds of each wrk run.
        #[arg(long, default_value_t = 4)]
        seconds: u64,
        /// Alternating rounds (the median is shown).
        #[arg(long, default_value_t = 7)]
        rounds: usize,
    },
    /// Loopback TCP throughput with no tracer, with empty programs on the
    /// same hooks, under `netwatch` and under `netwatch audit`: what the
    /// programs on every send and receive cost.
    Traffic {
        /// Round trips of 64-byte messages per measurement.
        #[arg(long, default_value_t = 1_000_000)]
        round_trips: u64,
        /// GiB of the bulk transfer per measurement.
        #[arg(long, default_value_t = 4)]
        bulk_gib: u64,
        /// Alternating rounds (the median is shown).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

/// Runs one benchmark with the release netwatch binary.
pub fn run(which: Which, netwatch: &Path) -> anyhow::Result<()> {
    let results = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench-results");
    std::fs::create_dir_all(&results)?;
    match which {
        Which::Snapshot { sockets, runs } => snapshot(netwatch, &sockets, runs.max(1)),
        Which::Stream {
            burst,
            seconds,
            on_disk,
        } => {
            let outputs = if on_disk {
                results.clone()
            } else {
                PathBuf::from("/dev/shm/netwatch-bench")
            };
            std::fs::create_dir_all(&outputs)?;
            stream(netwatch, burst, seconds, &results, &outputs)
        }
        Which::Soak {
            minutes,
            long_lived,
        } => crate::soak::run(netwatch, minutes, long_lived, &results),
        Which::Traffic {
            round_trips,
            bulk_gib,
            rounds,
        } => crate::traffic::run(netwatch, round_trips, bulk_gib, rounds.max(1), &results),
        Which::Nginx { seconds, rounds } => {
            crate::nginx::run(netwatch, seconds.max(1), rounds.max(1), &results)
        }
        Which::Top {
            connections,
            rate,
            seconds,
        } => crate::top::run(netwatch, connections, rate, seconds.max(1), &results),
        Which::Forking {
            connections,
            rounds,
            against,
        } => crate::forking::run(
            netwatch,
            against.as_deref(),
            connections.max(1),
            rounds.max(1),
            &results,
        ),
    }
}

// ---- snapshot -------------------------------------------------------------

/// One command the snapshot benchmark times.
struct Timed {
    name: &'static str,
    command: Command,
}

impl Timed {
    fn new(name: &'static str, program: &Path, args: &[&str]) -> Timed {
        Timed {
            name,
            command: command(program, args),
        }
    }

    /// The same command run as the unprivileged user nobody.
    fn run_as_nobody(mut self) -> Timed {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut self.command, || {
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self
    }

    /// Wall time and peak RSS of one run, output to /dev/null.
    fn run(&mut self) -> anyhow::Result<(f64, u64)> {
        let started = Instant::now();
        let child = self
            .command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("{} does not start", self.name))?;
        let usage = wait_usage(&child, started)?;
        Ok((usage.wall.as_secs_f64() * 1000.0, usage.max_rss_kib))
    }

    /// Lines of output.
    fn lines(&mut self) -> anyhow::Result<usize> {
        let out = self.command.stdout(Stdio::piped()).output()?;
        Ok(out
            .stdout
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count())
    }
}

/// Median wall time (ms) and highest peak RSS (KiB) of each tool over alternating runs.
fn time_alternating(tools: &mut [Timed], runs: usize) -> anyhow::Result<Vec<(f64, u64)>> {
    let mut times = vec![Vec::new(); tools.len()];
    let mut rss = vec![0; tools.len()];
    for _ in 0..runs {
        for (i, tool) in tools.iter_mut().enumerate() {
            let (ms, kib) = tool.run()?;
            times[i].push(ms);
            rss[i] = rss[i].max(kib);
        }
    }
    Ok(times.iter().map(|t| median(t)).zip(rss).collect())
}

fn snapshot(netwatch: &Path, sizes: &[usize], runs: usize) -> anyhow::Result<()> {
    load::raise_fd_limit(4096)?;
    let time_wait = load::wait_for_time_wait_to_drain();
    let mut tools = vec![
        Timed::new("netwatch", netwatch, &["snapshot", "-tanp"]),
        Timed::new(
            "cat",
            Path::new("cat"),
            &["/proc/net/tcp", "/proc/net/tcp6"],
        ),
        Timed::new("ss", Path::new("ss"), &["-tanp"]),
        Timed::new(
            "kernel",
            netwatch,
            &["snapshot", "-tanp", "--source", "kernel"],
        ),
        Timed::new("proc", netwatch, &["snapshot", "-tanp", "--source", "proc"]),
        Timed::new("netwatch as nobody", netwatch, &["snapshot", "-tanp"]).run_as_nobody(),
    ];
    let netstat = Command::new("netstat").arg("--version").output().is_ok();
    if netstat {
        tools.push(Timed::new("netstat", Path::new("netstat"), &["-tanp"]));
    }
    println!(
        "Snapshot benchmark: median of {runs} alternating runs, output to /dev/null, {} processes holding the sockets.",
        load::HOLDERS
    );
    println!("netwatch: as root, by default (auto), with --source kernel (the kernel's iterators) and --source proc; and as nobody (/proc; other users' owners unknown).");
    println!(
        "cat: `cat /proc/net/tcp /proc/net/tcp6` (no pids). RSS: netwatch's peak, by default. TIME_WAIT sockets left from before: {time_wait}."
    );
    println!(
        "{:>8} {:>10} {:>8} {:>7} {:>9} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "sockets",
        "netwatch",
        "cat",
        "nw/cat",
        "ss -tanp",
        "ss/nw",
        "kernel",
        "proc",
        "nobody",
        "netstat",
        "RSS",
        "lines nw/ss"
    );
    let mut netwatch_ms = Vec::new();
    for &size in sizes {
        let holders = load::Holders::start(size)?;
        let sockets = load::tcp_socket_count();
        let measured = time_alternating(&mut tools, runs)?;
        let ms = |name: &str| {
            tools
                .iter()
                .position(|tool| tool.name == name)
                .map(|i| measured[i].0)
        };
        let (nw, cat, ss) = (measured[0].0, measured[1].0, measured[2].0);
        let (kernel, proc) = (ms("kernel"), ms("proc"));
        let (nobody, netstat) = (ms("netwatch as nobody"), ms("netstat"));
        let netwatch_lines = tools[0].lines()?.saturating_sub(2);
        let ss_lines = tools[2].lines()?.saturating_sub(1);
        println!(
            "{:>8} {:>7.1} ms {:>5.1} ms {:>6.2}x {:>6.1} ms {:>6.1}x {:>7.1} ms {:>7.1} ms {:>7.1} ms {:>10} {:>6.1} MiB {:>10}",
            sockets,
            nw,
            cat,
            nw / cat,
            ss,
            ss / nw,
            kernel.unwrap_or(f64::NAN),
            proc.unwrap_or(f64::NAN),
            nobody.unwrap_or(f64::NAN),
            netstat.map_or("-".to_owned(), |ms| format!("{ms:.1} ms")),
            measured[0].1 as f64 / 1024.0,
            format!("{netwatch_lines}/{ss_lines}")
        );
        netwatch_ms.push((size, nw));
        drop(holders);
    }
    let at = |size| {
        netwatch_ms
            .iter()
            .find(|(s, _)| *s == size)
            .map(|(_, ms)| *ms)
    };
    if let (Some(t40), Some(t80)) = (at(40_000), at(80_000)) {
        println!("growth: netwatch time at 80k / at 40k = {:.2}", t80 / t40);
    }
    Ok(())
}

// ---- stream ---------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tracer {
    None,
    /// `netwatch --json`.
    Netwatch,
    /// `netwatch`, text lines.
    NetwatchText,
    NetwatchAudit,
    Tcpstates,
}

/// What one churn run under one tracer gave.
#[derive(Debug, Default)]
struct StreamRun {
    pub connections: u64,
    pub failed: u64,
    pub rate: f64,
    /// Without a tracer: perf's count of the tracepoint (the kernel's own).
    /// perf counts nothing while a BPF program is attached to it.
    fired: Option<u64>,
    /// Transitions delivered on the churn's ports.
    delivered: u64,
    lost_reported: u64,
    /// Calls of the tracer's programs the kernel skipped (`recursion_misses`).
    skipped: u64,
    /// CLOSE -> SYN_SENT and -> CLOSE transitions seen on the churn's ports.
    opens: u64,
    closes: u64,
    cpu: Duration,
    user: Duration,
    max_rss_kib: u64,
}

/// The stream benchmark; the tracers write to files in `outputs`, removed once counted.
fn stream(
    netwatch: &Path,
    burst: u64,
    seconds: u64,
    results: &Path,
    outputs: &Path,
) -> anyhow::Result<()> {
    first_event_cases(netwatch, results)?;
    let every = [
        Tracer::None,
        Tracer::Netwatch,
        Tracer::NetwatchText,
        Tracer::NetwatchAudit,
        Tracer::Tcpstates,
    ];
    let runs = [
        (
            format!("burst of {burst} connections"),
            burst,
            600,
            &every[..],
        ),
        (
            format!("{seconds} s sustained"),
            0,
            seconds,
            &[Tracer::None, Tracer::Netwatch, Tracer::Tcpstates][..],
        ),
    ];
    for (label, connections, seconds, tracers) in runs {
        let churn = ChurnArgs {
            connections,
            seconds,
            threads: 2,
            rate: 0,
        };
        println!("\n== {label} (2 client threads, loopback) ==");
        println!(
            "{:<14} {:>8} {:>7} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>7} {:>10} {:>10} {:>8} {:>6}",
            "tracer",
            "conns",
            "conn/s",
            "expected",
            "fired",
            "delivered",
            "missing",
            "lost",
            "skipped",
            "CPU s",
            "CPU/event",
            "user/event",
            "RSS MiB",
            "failed"
        );
        for &tracer in tracers {
            let run = traced_churn(tracer, netwatch, &churn, outputs)?;
            print_stream_run(tracer, &run);
        }
    }
    println!("\nexpected: 10 transitions per connection on the churn's ports; missing: expected - delivered;");
    println!("fired: the kernel's count of the tracepoint (perf without a tracer; netwatch's own count, which");
    println!("perf cannot give while a BPF program is attached), all ports, so a few more than expected;");
    println!(
        "lost: what the tracer said it lost; skipped: its programs' recursion_misses (kernel);"
    );
    println!(
        "CPU: the tracer process (user + system), per transition delivered (audit: per transition"
    );
    println!("its summary counts, as it writes a record per connection); user: its user time alone; RSS: its peak.");
    println!(
        "Each tracer writes to a file in {} (tcpstates and netwatch's text lines, JSON lines).",
        outputs.display()
    );
    Ok(())
}

fn print_stream_run(tracer: Tracer, run: &StreamRun) {
    let name = match tracer {
        Tracer::None => "none",
        Tracer::Netwatch => "netwatch",
        Tracer::NetwatchText => "netwatch text",
        Tracer::NetwatchAudit => "netwatch audit",
        Tracer::Tcpstates => "tcpstates",
    };
    let expected = TRANSITIONS_PER_CONNECTION * run.connections + 2 * run.failed;
    let fired = run
        .fired
        .map_or_else(|| "-".to_owned(), |fired| fired.to_string());
    if tracer == Tracer::None {
        println!(
            "{name:<14} {:>8} {:>7.0} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>7} {:>10} {:>10} {:>8} {:>6}",
            run.connections,
            run.rate,
            expected,
            fired,
            "-",
            "-",
            "-",
            "-",
            "-",
            "-",
            "-",
            "-",
            run.failed
        );
        return;
    }
    let cpu_per_event = run.cpu.as_secs_f64() * 1e6 / run.delivered.max(1) as f64;
    let user_per_event = run.user.as_secs_f64() * 1e6 / run.delivered.max(1) as f64;
    println!(
        "{name:<14} {:>8} {:>7.0} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>7.2} {:>8.2}us {:>8.2}us {:>8.1} {:>6}",
        run.connections,
        run.rate,
        expected,
        fired,
        run.delivered,
        expected.saturating_sub(run.delivered),
        run.lost_reported,
        run.skipped,
        run.cpu.as_secs_f64(),
        cpu_per_event,
        user_per_event,
        run.max_rss_kib as f64 / 1024.0,
        run.failed
    );
    // Audit writes a record per connection, not per transition: no lines to count opens from.
    let counted = tracer != Tracer::NetwatchAudit;
    if counted
        && (run.opens != run.connections + run.failed
            || run.closes != 2 * run.connections + run.failed)
    {
        println!(
            "{:<10} incomplete: {} CLOSE->SYN_SENT of {}, {} ->CLOSE of {}",
            "",
            run.opens,
            run.connections + run.failed,
            run.closes,
            2 * run.connections + run.failed
        );
    }
}

/// Each loopback connection: client CLOSE->SYN_SENT->ESTABLISHED->FIN_WAIT1->
/// FIN_WAIT2->CLOSE, server LISTEN->SYN_RECV->ESTABLISHED->CLOSE_WAIT->
/// LAST_ACK->CLOSE (the run without a tracer checks it against perf).
const TRANSITIONS_PER_CONNECTION: u64 = 10;

/// Starts `perf stat` counting the tracepoint system-wide: the kernel's own count.
fn start_perf(output: &Path) -> anyhow::Result<Child> {
    let child = Command::new("perf")
        .args([
            "stat",
            "-a",
            "-x",
            ",",
            "-e",
            "sock:inet_sock_set_state",
            "-o",
        ])
        .arg(output)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf failed")?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(child)
}

fn stop_perf(child: Child, output: &Path) -> anyhow::Result<u64> {
    interrupt(&child);
    let _ = wait_usage(&child, Instant::now())?;
    let text = std::fs::read_to_string(output)?;
    text.lines()
        .find(|line| line.contains("inet_sock_set_state"))
        .and_then(|line| line.split(',').next()?.trim().parse().ok())
        .context("perf printed no count for sock:inet_sock_set_state")
}

fn traced_churn(
    tracer: Tracer,
    netwatch: &Path,
    churn: &ChurnArgs,
    results: &Path,
) -> anyhow::Result<StreamRun> {
    let stem = format!("{tracer:?}").to_lowercase();
    let out_path = results.join(format!("{stem}.out"));
    let err_path = results.join(format!("{stem}.err"));
    let perf_path = results.join(format!("{stem}.perf"));
    let perf = (tracer == Tracer::None)
        .then(|| start_perf(&perf_path))
        .transpose()?;
    let traced = match tracer {
        Tracer::None => None,
        Tracer::Netwatch | Tracer::NetwatchText | Tracer::NetwatchAudit => {
            let args: &[&str] = match tracer {
                Tracer::Netwatch => &["--json"],
                Tracer::NetwatchText => &[],
                _ => &["audit"],
            };
            Some(start_tracer(command(netwatch, args), &out_path, &err_path)?)
        }
        Tracer::Tcpstates => Some(start_tracer(
            command(Path::new("tcpstates"), &[]),
            &out_path,
            &err_path,
        )?),
    };
    let report = load::churn(churn)?;
    let ports = &report.ports;
    let mut run = StreamRun {
        connections: report.connections,
        failed: report.failed,
        rate: report.rate,
        ..StreamRun::default()
    };
    // A few FINs are retransmitted: wait until every churn socket has closed.
    load::wait_for_churn_to_settle(ports);
    if let Some(mut tracer) = traced {
        run.skipped = recursion_misses_of(tracer.child.id());
        let usage = tracer.stop()?;
        run.cpu = usage.cpu;
        run.user = usage.user;
        run.max_rss_kib = usage.max_rss_kib;
    }
    if let Some(perf) = perf {
        run.fired = Some(stop_perf(perf, &perf_path)?);
    }
    match tracer {
        Tracer::None => {}
        Tracer::Netwatch | Tracer::NetwatchAudit => {
            count_netwatch(&out_path, ports, &mut run)?;
        }
        Tracer::NetwatchText => count_text_lines(&out_path, &err_path, ports, &mut run)?,
        Tracer::Tcpstates => count_tcpstates(&out_path, &err_path, ports, &mut run)?,
    }
    // Hundreds of MB each: gone before the next tracer writes.
    let _ = std::fs::remove_file(&out_path);
    Ok(run)
}

/// Connections per second of the churn under which netwatch starts.
const CHURN_RATE: u64 = 12_000;

/// Start to first event on a quiet host, with 40k established and 60k
/// TIME_WAIT sockets, and under churn.
fn first_event_cases(netwatch: &Path, results: &Path) -> anyhow::Result<()> {
    load::raise_fd_limit(4096)?;
    load::wait_for_time_wait_to_drain();
    println!("Start to first event (netwatch --json, until its first transition is written):");
    first_event_case(netwatch, results, "quiet host")?;
    {
        let _held = load::Holders::start(40_000)?;
        // Six listeners: connect() reuses the ports of a destination's
        // TIME_WAIT sockets, of which there are about 28k.
        crate::load::churn(&ChurnArgs {
            connections: 72_000,
            seconds: 120,
            threads: 6,
            rate: 0,
        })?;
        first_event_case(netwatch, results, "40k established, 60k TIME_WAIT")?;
    }
    let churn = std::thread::spawn(|| {
        crate::load::churn(&ChurnArgs {
            connections: 0,
            seconds: 8,
            threads: 2,
            rate: CHURN_RATE,
        })
    });
    std::thread::sleep(Duration::from_secs(2));
    let label = format!("under churn of {CHURN_RATE} connections/s");
    first_event_case(netwatch, results, &label)?;
    let report = churn
        .join()
        .map_err(|_| anyhow::anyhow!("the churn thread panicked"))??;
    println!("  (the churn ran at {:.0} connections/s)", report.rate);
    Ok(())
}

/// Starts measured per case (the median is shown).
const FIRST_EVENT_RUNS: usize = 5;

/// Measures and prints start to first event, with the host's TCP sockets then.
fn first_event_case(netwatch: &Path, results: &Path, label: &str) -> anyhow::Result<()> {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat")?;
    let tcp = sockstat
        .lines()
        .find(|line| line.starts_with("TCP:"))
        .unwrap_or("TCP: ?")
        .to_owned();
    let mut times = Vec::new();
    for _ in 0..FIRST_EVENT_RUNS {
        times.push(time_to_first_event(netwatch, results)?.as_secs_f64() * 1000.0);
    }
    let each: Vec<String> = times.iter().map(|ms| format!("{ms:.0}")).collect();
    let startup = std::fs::read_to_string(results.join("first-event.err")).unwrap_or_default();
    println!(
        "  {label}: median {:.0} ms of {} ms ({tcp})\n    last start: {}",
        median(&times),
        each.join(", "),
        startup
            .lines()
            .next()
            .unwrap_or("?")
            .trim_start_matches("netwatch: ")
    );
    Ok(())
}

/// Sum of `recursion_misses` of the BPF programs a process holds.
fn recursion_misses_of(pid: u32) -> u64 {
    programs_of(pid)
        .iter()
        .filter_map(|prog| prog["recursion_misses"].as_u64())
        .sum()
}

/// Time from spawning netwatch to its first event in the output, with a
/// connection made every 2 ms meanwhile (accepted and closed at once, so
/// that a full accept queue never makes connect() wait).
fn time_to_first_event(netwatch: &Path, results: &Path) -> anyhow::Result<Duration> {
    let out_path = results.join("first-event.out");
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let target = listener.local_addr()?;
    std::thread::spawn(move || listener.incoming().take(10_000).for_each(drop));
    let started = Instant::now();
    let child = command(netwatch, &["--json", "--port", &target.port().to_string()])
        .stdout(File::create(&out_path)?)
        .stderr(File::create(results.join("first-event.err"))?)
        .spawn()?;
    let mut first = None;
    while started.elapsed() < Duration::from_secs(10) {
        let _ = std::net::TcpStream::connect_timeout(&target, Duration::from_millis(100));
        if std::fs::metadata(&out_path).is_ok_and(|meta| meta.len() > 0) {
            first = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    interrupt(&child);
    wait_usage(&child, started)?;
    first.context("netwatch delivered no event within 10 s")
}

/// Counts netwatch's JSON lines: transitions, lost records, the churn's opens and
/// closes, and the firings its summary record counted.
fn count_netwatch(
    out_path: &Path,
    ports: &HashSet<u16>,
    run: &mut StreamRun,
) -> anyhow::Result<()> {
    for line in BufReader::new(File::open(out_path)?).lines() {
        let record: serde_json::Value = serde_json::from_str(&line?)?;
        match record["type"].as_str() {
            Some("state") => {
                let port = |key: &str| record[key].as_u64().and_then(|p| u16::try_from(p).ok());
                let on_churn = [port("local_port"), port("remote_port")]
                    .iter()
                    .any(|p| p.is_some_and(|p| ports.contains(&p)));
                let states = (record["old_state"].as_str(), record["new_state"].as_str());
                count_churn_transition(on_churn, states, run);
            }
            Some("lost") => run.lost_reported += record["count"].as_u64().unwrap_or(0),
            // netwatch's own count of the tracepoint's firings; audit
            // writes no state records, so its count of what it applied.
            Some("summary") => {
                run.fired = record["fired"].as_u64();
                if record.get("schema").is_some() {
                    run.delivered = record["transitions"].as_u64().unwrap_or(0);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Counts netwatch's text lines (… LADDR:LPORT RADDR:RPORT OLDSTATE -> NEWSTATE MS);
/// its losses are in its summary on stderr.
fn count_text_lines(
    out_path: &Path,
    err_path: &Path,
    ports: &HashSet<u16>,
    run: &mut StreamRun,
) -> anyhow::Result<()> {
    let port = |endpoint: &str| endpoint.rsplit(':').next()?.parse::<u16>().ok();
    count_state_lines(out_path, ports, run, |fields| {
        [port(from_end(fields, 6)), port(from_end(fields, 5))]
    })?;
    let err = std::fs::read_to_string(err_path)?;
    run.lost_reported = err
        .lines()
        .find_map(|line| {
            let after = line.split("), ").nth(1)?;
            after.split(" lost").next()?.trim().parse().ok()
        })
        .unwrap_or(0);
    Ok(())
}

/// The field `back` places from the end of a line's fields (1: the last).
fn from_end<'a>(fields: &[&'a str], back: usize) -> &'a str {
    fields[fields.len() - back]
}

/// Counts the transition lines of a text output (after its header), whose
/// last fields are `OLDSTATE -> NEWSTATE MS`; `ports` finds the local and
/// remote port in a line's fields.
fn count_state_lines(
    out_path: &Path,
    churn_ports: &HashSet<u16>,
    run: &mut StreamRun,
    ports: impl Fn(&[&str]) -> [Option<u16>; 2],
) -> anyhow::Result<()> {
    for line in BufReader::new(File::open(out_path)?).lines().skip(1) {
        let line = line?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 || fields[fields.len() - 3] != "->" {
            continue;
        }
        let on_churn = ports(&fields)
            .iter()
            .any(|p| p.is_some_and(|p| churn_ports.contains(&p)));
        let states = (Some(from_end(&fields, 4)), Some(from_end(&fields, 2)));
        count_churn_transition(on_churn, states, run);
    }
    Ok(())
}

/// Counts tcpstates' text lines (… LPORT RADDR RPORT OLDSTATE -> NEWSTATE MS) and its lost reports.
fn count_tcpstates(
    out_path: &Path,
    err_path: &Path,
    ports: &HashSet<u16>,
    run: &mut StreamRun,
) -> anyhow::Result<()> {
    count_state_lines(out_path, ports, run, |fields| {
        [from_end(fields, 7), from_end(fields, 5)].map(|port| port.parse().ok())
    })?;
    let err = std::fs::read_to_string(err_path)?;
    run.lost_reported += err
        .lines()
        .filter_map(|line| {
            line.strip_prefix("lost ")?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum::<u64>();
    Ok(())
}

fn count_churn_transition(
    on_churn: bool,
    (old, new): (Option<&str>, Option<&str>),
    run: &mut StreamRun,
) {
    // The churn's own listeners open and close once each: not connections.
    let listener = new == Some("LISTEN") || (old == Some("LISTEN") && new == Some("CLOSE"));
    if !on_churn || listener {
        return;
    }
    run.delivered += 1;
    if old == Some("CLOSE") && new == Some("SYN_SENT") {
        run.opens += 1;
    }
    if new == Some("CLOSE") {
        run.closes += 1;
    }
}
