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
use crate::traffic::{fastest, getppid_ns};

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
        let child = xtask::servers::nginx(dir, port, 1)?
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
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How wrk's connections carry requests.
#[derive(Clone, Copy)]
enum Requests {
    /// `Connection: close`: one request per connection.
    Close,
    KeepAlive,
}

/// Requests per second wrk reaches in `seconds` (1 thread, 50 connections).
fn wrk(port: u16, requests: Requests, seconds: u64) -> anyhow::Result<f64> {
    let mut wrk = Command::new("wrk");
    wrk.args(["-t1", "-c50", &format!("-d{seconds}s")]);
    if let Requests::Close = requests {
        wrk.args(["-H", "Connection: close"]);
    }
    let output = wrk
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .context("running wrk failed (Debian's wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|line| line.strip_prefix("Requests/sec:")?.trim().parse().ok())
        .with_context(|| format!("wrk printed no Requests/sec: {text}"))
}

/// Each tracer's figures, one per round.
#[derive(Default)]
struct Figures {
    close: Vec<f64>,
    keep_alive: Vec<f64>,
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
                "round {round}/{rounds}, {:<36} close {close:>8.0} req/s  keep-alive {keep_alive:>8.0} req/s  getppid {getppid:>4.0} ns  (tracer CPU {cpu:.2} s)",
                tracer.name()
            );
            figures.close.push(close);
            figures.keep_alive.push(keep_alive);
            figures.getppid_ns.push(getppid);
            figures.tracer_cpu_s.push(cpu);
        }
    }
    print_table(&figures, seconds, rounds);
    Ok(())
}

fn print_table(figures: &[Figures], seconds: u64, rounds: usize) {
    let none = &figures[0];
    let ratio = |values: &[f64], of: &[f64]| 100.0 * median(values) / median(of);
    println!("\nnginx (1 worker) under wrk (1 thread, 50 connections, {seconds} s a run), median of {rounds} alternating rounds:");
    println!("| tracer | Connection: close req/s | of untraced | keep-alive req/s | of untraced | ns per getppid() | of untraced | tracer CPU s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (tracer, figures) in Tracer::ALL.iter().zip(figures) {
        println!(
            "| {} | {:.0} | {:.1}% | {:.0} | {:.1}% | {:.0} | {:.0}% | {:.2} |",
            tracer.name(),
            median(&figures.close),
            ratio(&figures.close, &none.close),
            median(&figures.keep_alive),
            ratio(&figures.keep_alive, &none.keep_alive),
            median(&figures.getppid_ns),
            ratio(&figures.getppid_ns, &none.getppid_ns),
            median(&figures.tracer_cpu_s),
        );
    }
    println!("Tracer CPU: the tracer process's user + system time over both runs of a round (none for the empty programs, which run in the kernel).");
}
