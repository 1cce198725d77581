//! `cargo xtask bench nginx`: what watching costs a real server. Debian's
//! nginx (one worker) answers wrk on loopback, with `Connection: close`
//! (a connection per request: ten transitions each) and with keep-alive
//! (a receive and a send per request), beside each tracer in turn, round
//! after round; and what each tracer adds to getppid(), a system call that
//! fires no socket hook.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::stats::median;
use crate::tracer::{command, start_tracer, Running};
use crate::traffic::{fastest, getppid_ns, paired_change};

/// What runs beside nginx.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tracer {
    None,
    /// `return 0` programs on netwatch's default hooks: the floor under it.
    Floor,
    Watch,
    Audit,
    Tcpstates,
}

impl Tracer {
    const ALL: [Tracer; 5] = [
        Tracer::None,
        Tracer::Floor,
        Tracer::Watch,
        Tracer::Audit,
        Tracer::Tcpstates,
    ];

    fn name(self) -> &'static str {
        match self {
            Tracer::None => "none",
            Tracer::Floor => "empty programs on netwatch's hooks",
            Tracer::Watch => "netwatch --json",
            Tracer::Audit => "netwatch audit",
            Tracer::Tcpstates => "tcpstates",
        }
    }
}

/// The raw tracepoints netwatch attaches by default: send, receive, the
/// transition and recovery programs, exec.
const NETWATCH_HOOKS: [&str; 5] = [
    "sock_send_length",
    "sock_recv_length",
    "inet_sock_set_state",
    "inet_sock_set_state",
    "sched_process_exec",
];

/// Starts what runs beside nginx for `tracer`.
fn start(tracer: Tracer, netwatch: &Path, results: &Path) -> anyhow::Result<Running> {
    let (out, err) = (
        results.join("nginx-tracer.out"),
        results.join("nginx-tracer.err"),
    );
    let process = match tracer {
        Tracer::None => return Ok(Running::Nothing),
        Tracer::Floor => return Running::empty_programs(&NETWATCH_HOOKS, &[]),
        Tracer::Watch => command(netwatch, &["--json"]),
        Tracer::Audit => command(netwatch, &["audit"]),
        Tracer::Tcpstates => command(Path::new("tcpstates"), &[]),
    };
    start_tracer(process, &out, &err).map(Running::Process)
}

/// nginx from Debian, one worker, on a free loopback port; killed when dropped.
struct Nginx {
    child: Child,
    port: u16,
}

impl Nginx {
    fn start(dir: &Path) -> anyhow::Result<Nginx> {
        std::fs::create_dir_all(dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let nginx = xtask::servers::nginx(dir, port, 1)?;
        let child = pinned(&nginx, NGINX_CPU)
            .stdin(Stdio::null())
            .spawn()
            .context("starting nginx failed (Debian's nginx-light)")?;
        let nginx = Nginx { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("nginx did not listen on {port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }
}

impl Drop for Nginx {
    /// SIGTERM, nginx's fast shutdown: the master stops its worker too
    /// (SIGKILL would leave the worker running).
    fn drop(&mut self) {
        // SAFETY: signals the child this benchmark started and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// nginx and wrk each run on a CPU of their own (the two of this kind of
/// machine), so that the scheduler's placement of the two does not change
/// from one run to the next; the tracer runs where it can.
const NGINX_CPU: usize = 1;
const WRK_CPU: usize = 0;

/// `command` run through `taskset` on `cpu`.
fn pinned(command: &Command, cpu: usize) -> Command {
    let mut pinned = Command::new("taskset");
    pinned
        .args(["-c", &cpu.to_string()])
        .arg(command.get_program())
        .args(command.get_args());
    pinned
}

/// How wrk's connections carry requests.
#[derive(Clone, Copy)]
enum Requests {
    /// `Connection: close`: one request per connection.
    Close,
    KeepAlive,
}

/// What one wrk run gave.
struct Run {
    requests_per_s: f64,
    /// The machine's busy CPU time (all CPUs, steal left out) per request.
    cpu_us_per_request: f64,
}

/// CPU time the machine spent busy so far, all CPUs (user, nice, system,
/// irq, softirq; not idle, iowait or steal), in µs.
fn busy_cpu_us() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .context("/proc/stat has no cpu line")?
        .split_whitespace()
        .filter_map(|field| field.parse().ok())
        .collect();
    let busy: f64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| ticks.get(i)).sum();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(busy * 1e6 / per_second)
}

/// What wrk reaches in `seconds` (1 thread, 50 connections).
fn wrk(port: u16, requests: Requests, seconds: u64) -> anyhow::Result<Run> {
    let mut wrk = Command::new("wrk");
    wrk.args(["-t1", "-c50", &format!("-d{seconds}s")]);
    if let Requests::Close = requests {
        wrk.args(["-H", "Connection: close"]);
    }
    wrk.arg(format!("http://127.0.0.1:{port}/"));
    let busy_before = busy_cpu_us()?;
    let output = pinned(&wrk, WRK_CPU)
        .output()
        .context("running wrk failed (Debian's wrk)")?;
    let busy = busy_cpu_us()? - busy_before;
    let text = String::from_utf8_lossy(&output.stdout);
    let requests_per_s: f64 = text
        .lines()
        .find_map(|line| line.strip_prefix("Requests/sec:")?.trim().parse().ok())
        .with_context(|| format!("wrk printed no Requests/sec: {text}"))?;
    let requests: f64 = text
        .lines()
        .find_map(|line| line.trim().split(" requests in ").next()?.parse().ok())
        .with_context(|| format!("wrk printed no request count: {text}"))?;
    Ok(Run {
        requests_per_s,
        cpu_us_per_request: busy / requests.max(1.0),
    })
}

/// Each tracer's figures, one per round.
#[derive(Default)]
struct Figures {
    close: Vec<f64>,
    keep_alive: Vec<f64>,
    close_cpu_us: Vec<f64>,
    keep_alive_cpu_us: Vec<f64>,
    getppid_ns: Vec<f64>,
    tracer_cpu_s: Vec<f64>,
}

/// Runs the benchmark and prints its table.
pub fn run(netwatch: &Path, seconds: u64, rounds: usize, results: &Path) -> anyhow::Result<()> {
    let nginx = Nginx::start(&results.join("nginx"))?;
    let mut figures: Vec<Figures> = Tracer::ALL.iter().map(|_| Figures::default()).collect();
    for round in 1..=rounds {
        for (&tracer, figures) in Tracer::ALL.iter().zip(&mut figures) {
            let running = start(tracer, netwatch, results)?;
            let close = wrk(nginx.port, Requests::Close, seconds)?;
            let keep_alive = wrk(nginx.port, Requests::KeepAlive, seconds)?;
            let getppid = fastest(getppid_ns);
            let cpu = running.stop()?.as_secs_f64();
            println!(
                "round {round}/{rounds}, {:<36} close {:>8.0} req/s {:>5.1} us  keep-alive {:>8.0} req/s {:>5.1} us  getppid {getppid:>4.0} ns  (tracer CPU {cpu:.2} s)",
                tracer.name(),
                close.requests_per_s,
                close.cpu_us_per_request,
                keep_alive.requests_per_s,
                keep_alive.cpu_us_per_request,
            );
            figures.close.push(close.requests_per_s);
            figures.keep_alive.push(keep_alive.requests_per_s);
            figures.close_cpu_us.push(close.cpu_us_per_request);
            figures
                .keep_alive_cpu_us
                .push(keep_alive.cpu_us_per_request);
            figures.getppid_ns.push(getppid);
            figures.tracer_cpu_s.push(cpu);
        }
    }
    print_table(&figures, seconds, rounds);
    Ok(())
}

fn print_table(figures: &[Figures], seconds: u64, rounds: usize) {
    let none = &figures[0];
    println!("\nnginx (1 worker, CPU {NGINX_CPU}) under wrk (1 thread on CPU {WRK_CPU}, 50 connections, {seconds} s a run), {rounds} alternating rounds:");
    println!("| tracer | Connection: close req/s | change | keep-alive req/s | change | ns per getppid() | change | tracer CPU s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (tracer, figures) in Tracer::ALL.iter().zip(figures) {
        println!(
            "| {} | {:.0} | {} | {:.0} | {} | {:.0} | {} | {:.2} |",
            tracer.name(),
            median(&figures.close),
            paired_change(&figures.close, &none.close),
            median(&figures.keep_alive),
            paired_change(&figures.keep_alive, &none.keep_alive),
            median(&figures.getppid_ns),
            paired_change(&figures.getppid_ns, &none.getppid_ns),
            median(&figures.tracer_cpu_s),
        );
    }
    println!("\nThe machine's CPU per request (both CPUs busy: user, system, irq, softirq, steal left out), which sets the");
    println!(
        "throughput a CPU-bound host can reach; untraced over traced is that throughput's ratio:"
    );
    println!("| tracer | Connection: close µs/request | change | throughput ratio | keep-alive µs/request | change | throughput ratio |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (tracer, figures) in Tracer::ALL.iter().zip(figures) {
        let ratio = |traced: &[f64], untraced: &[f64]| 100.0 * median(untraced) / median(traced);
        println!(
            "| {} | {:.1} | {} | {:.1}% | {:.2} | {} | {:.1}% |",
            tracer.name(),
            median(&figures.close_cpu_us),
            paired_change(&figures.close_cpu_us, &none.close_cpu_us),
            ratio(&figures.close_cpu_us, &none.close_cpu_us),
            median(&figures.keep_alive_cpu_us),
            paired_change(&figures.keep_alive_cpu_us, &none.keep_alive_cpu_us),
            ratio(&figures.keep_alive_cpu_us, &none.keep_alive_cpu_us),
        );
    }
    println!("Figures: medians over the rounds. Change: the median of each round's change against that round's untraced figure, [lowest, highest].");
    println!("Tracer CPU: the tracer process's user + system time over both runs of a round (none for the empty programs, which run in the kernel).");
}
