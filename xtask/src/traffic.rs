//! `cargo xtask bench traffic`: what netwatch's programs on every sendmsg
//! and recvmsg cost the host's TCP traffic. Loopback TCP between two
//! processes (this one and an `xtask traffic-server` child), measured with
//! no tracer, with an empty program on the same two hooks (the kernel's
//! dispatch alone), with it also on accept()'s syscall exit tracepoints
//! (netwatch's hooks doing nothing: the floor of its design), under
//! `netwatch` and `netwatch audit`, and under `netwatch` without tracefs,
//! in alternating rounds of the same run:
//! (a) request/response, 64-byte messages each way, `--round-trips` of them;
//! (b) bulk transfer of `--bulk-gib` GiB in 64 KiB writes.
//!
//! Client and server are pinned to the same CPU, the last one: a round trip
//! is then two direct switches rather than two cross-CPU wakeups, whose
//! cost on a virtual machine (tens of microseconds, and variable) would
//! hide what is measured. netwatch itself runs on the other CPUs.
//!
//! The throughputs vary by several percent between rounds on a shared
//! machine, more than the cost measured. So a last pass measures that cost
//! directly: with `kernel.bpf_stats_enabled`, the kernel counts the calls
//! and run time of the send and receive programs, and their share of the
//! workload's time is what they take from its throughput (the CPU is the
//! only one the workload runs on).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::stats::median;
use crate::tracer::{command, start_tracer, Running};
use xtask::bpf_programs::programs_of;
use xtask::cpus;
use xtask::least_privilege::setpriv;

/// Size of one request and of one response.
const MESSAGE: usize = 64;
/// Size of one write of the bulk transfer.
const BULK_WRITE: usize = 64 * 1024;
/// The first byte of a connection: which workload it carries.
const REQUEST_RESPONSE: u8 = b'r';
const BULK: u8 = b'b';

/// What the host runs besides the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tracer {
    None,
    EmptyPrograms,
    /// The empty programs, and one on accept()'s syscall exit tracepoints
    /// as netwatch's accept hook: what netwatch's hooks cost with programs
    /// that do nothing, the floor under netwatch.
    EmptyProgramsOnAccept,
    Watch,
    Audit,
    /// `netwatch --json --accept-hook` as a service without
    /// CAP_DAC_READ_SEARCH runs it: tracefs closed, so accept() is hooked
    /// on every system call's exit.
    WatchWithoutTracefs,
}

/// What `Tracer::WatchWithoutTracefs` runs with: uid 65534 and these capabilities.
const WITHOUT_TRACEFS: [&str; 3] = ["bpf", "perfmon", "sys_ptrace"];

/// The tracepoints of netwatch's send and receive programs.
const HANDOFF_TRACEPOINTS: [&str; 2] = ["sock_send_length", "sock_recv_length"];
/// The tracepoints of netwatch's accept hook, where tracefs is readable.
const ACCEPT_TRACEPOINTS: [&str; 2] = ["syscalls/sys_exit_accept4", "syscalls/sys_exit_accept"];

impl Tracer {
    const ALL: [Tracer; 6] = [
        Tracer::None,
        Tracer::EmptyPrograms,
        Tracer::EmptyProgramsOnAccept,
        Tracer::Watch,
        Tracer::Audit,
        Tracer::WatchWithoutTracefs,
    ];

    fn name(self) -> &'static str {
        match self {
            Tracer::None => "none",
            Tracer::EmptyPrograms => "empty programs",
            Tracer::EmptyProgramsOnAccept => "empty programs + accept hook",
            Tracer::Watch => "netwatch",
            Tracer::Audit => "netwatch audit",
            Tracer::WatchWithoutTracefs => "netwatch --accept-hook, tracefs closed",
        }
    }

    fn start(self, netwatch: &Path, results: &Path) -> anyhow::Result<Running> {
        let out = results.join("traffic-tracer.out");
        let err = results.join("traffic-tracer.err");
        let args: &[&str] = match self {
            Tracer::None => return Ok(Running::Nothing),
            Tracer::EmptyPrograms => return Running::empty_programs(&HANDOFF_TRACEPOINTS, &[]),
            Tracer::EmptyProgramsOnAccept => {
                return Running::empty_programs(&HANDOFF_TRACEPOINTS, &ACCEPT_TRACEPOINTS)
            }
            Tracer::Watch => &["--json"],
            Tracer::Audit => &["audit"],
            Tracer::WatchWithoutTracefs => {
                let mut command = setpriv("65534", &WITHOUT_TRACEFS);
                command.arg(netwatch).args(["--json", "--accept-hook"]);
                return start_tracer(command, &out, &err).map(Running::Process);
            }
        };
        start_tracer(command(netwatch, args), &out, &err).map(Running::Process)
    }
}

/// Throughputs measured under one tracer, one value per round.
#[derive(Default)]
struct Figures {
    round_trips_per_s: Vec<f64>,
    bulk_gib_per_s: Vec<f64>,
}

/// Runs the benchmark and prints its table.
pub fn run(
    netwatch: &Path,
    round_trips: u64,
    bulk_gib: u64,
    rounds: usize,
    results: &Path,
) -> anyhow::Result<()> {
    let cpu = *cpus::allowed()?
        .last()
        .context("this process may run on no CPU")?;
    cpus::run_on(&[cpu])?;
    let server = TrafficServer::start(cpu)?;
    let mut figures: Vec<Figures> = Tracer::ALL.iter().map(|_| Figures::default()).collect();
    for round in 1..=rounds {
        for (tracer, figures) in Tracer::ALL.iter().zip(&mut figures) {
            let running = tracer.start(netwatch, results)?;
            let started = Instant::now();
            request_response(server.port, round_trips)?;
            let rr = round_trips as f64 / started.elapsed().as_secs_f64();
            let started = Instant::now();
            bulk(server.port, bulk_gib << 30)?;
            let gib_s = bulk_gib as f64 / started.elapsed().as_secs_f64();
            let tracer_cpu = running.stop()?.as_secs_f64();
            println!(
                "round {round}/{rounds}, {:<15} {rr:>9.0} round trips/s  {gib_s:>6.2} GiB/s  (tracer CPU {tracer_cpu:.2} s)",
                tracer.name()
            );
            figures.round_trips_per_s.push(rr);
            figures.bulk_gib_per_s.push(gib_s);
        }
    }
    print_table(&figures, round_trips, bulk_gib, rounds);
    let calls = program_costs(netwatch, results, server.port, round_trips, bulk_gib)?;
    let unit_ns = PerUnit {
        round_trip: 1e9 / median(&figures[0].round_trips_per_s),
        mib: 1e9 / (median(&figures[0].bulk_gib_per_s) * 1024.0),
    };
    call_costs(netwatch, results, rounds, calls, unit_ns)
}

/// Calls and run time of a tracer's send, receive and syscall exit programs, as the
/// kernel counts them (kernel.bpf_stats_enabled).
#[derive(Clone, Copy, Debug, Default)]
struct ProgramTime {
    calls: u64,
    run_ns: u64,
}

impl ProgramTime {
    /// The programs on the send, receive and syscall exit hooks that process `pid` holds.
    fn of(pid: u32) -> ProgramTime {
        programs_of(pid)
            .iter()
            .filter(|prog| {
                matches!(
                    prog["name"].as_str(),
                    Some("socket_sent" | "socket_received" | "syscall_exit" | "empty")
                )
            })
            .fold(ProgramTime::default(), |sum, prog| ProgramTime {
                calls: sum.calls + prog["run_cnt"].as_u64().unwrap_or(0),
                run_ns: sum.run_ns + prog["run_time_ns"].as_u64().unwrap_or(0),
            })
    }
}

/// Enables the kernel's BPF run-time statistics; restores the setting when dropped.
struct BpfStats {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> anyhow::Result<BpfStats> {
        let previous = std::fs::read_to_string(BPF_STATS).context("reading bpf_stats_enabled")?;
        std::fs::write(BPF_STATS, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(BpfStats { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, self.previous.trim());
    }
}

/// A workload's name, how many units it does, and the work.
type Workload<'a> = (&'a str, u64, &'a dyn Fn() -> anyhow::Result<()>);

/// Under each tracer, runs each workload once with the kernel's BPF
/// statistics on and prints what the send and receive programs cost it.
fn program_costs(
    netwatch: &Path,
    results: &Path,
    port: u16,
    round_trips: u64,
    bulk_gib: u64,
) -> anyhow::Result<PerUnit> {
    let _stats = BpfStats::enable()?;
    let mut calls_per_unit = PerUnit::default();
    println!();
    println!(
        "The send and receive programs (and with tracefs closed the one on every system call's exit), as the kernel counts them (kernel.bpf_stats_enabled):"
    );
    println!();
    println!("| tracer | workload | calls | calls per unit | ns per call | share of the workload's time |");
    println!("|---|---|---:|---:|---:|---:|");
    for tracer in Tracer::ALL.into_iter().skip(1) {
        let running = tracer.start(netwatch, results)?;
        let pid = match &running {
            Running::Process(process) => process.child.id(),
            Running::Programs { .. } | Running::Nothing => std::process::id(),
        };
        let workloads: [Workload; 2] = [
            ("(a) per round trip", round_trips, &|| {
                request_response(port, round_trips)
            }),
            ("(b) per MiB", bulk_gib << 10, &|| {
                bulk(port, bulk_gib << 30)
            }),
        ];
        for (index, (workload, units, work)) in workloads.into_iter().enumerate() {
            let before = ProgramTime::of(pid);
            let started = Instant::now();
            work()?;
            let elapsed = started.elapsed().as_nanos() as f64;
            let after = ProgramTime::of(pid);
            let calls = after.calls - before.calls;
            let run_ns = (after.run_ns - before.run_ns) as f64;
            if tracer == Tracer::EmptyPrograms {
                *calls_per_unit.of_workload(index) = calls as f64 / units as f64;
            }
            println!(
                "| {} | {workload} | {calls} | {:.2} | {:.0} | {:.2}% |",
                tracer.name(),
                calls as f64 / units as f64,
                run_ns / calls.max(1) as f64,
                run_ns / elapsed * 100.0
            );
        }
        running.stop()?;
    }
    Ok(calls_per_unit)
}

/// A figure for each workload: per round trip of (a), per MiB of (b).
#[derive(Clone, Copy, Debug, Default)]
struct PerUnit {
    round_trip: f64,
    mib: f64,
}

impl PerUnit {
    /// Workload 0 is (a), 1 is (b).
    fn of_workload(&mut self, index: usize) -> &mut f64 {
        if index == 0 {
            &mut self.round_trip
        } else {
            &mut self.mib
        }
    }
}

/// Calls in one timing of the per-call pass.
const IDLE_CALLS: u32 = 300_000;
/// Timings per tracer and round; the fastest counts (the others were interrupted).
const IDLE_TIMINGS: usize = 5;

/// Per tracer, one figure per round: ns per recv() on an idle connection
/// and per getppid(), each the fastest of its timings.
#[derive(Default)]
struct CallTimes {
    recv_ns: Vec<f64>,
    getppid_ns: Vec<f64>,
}

/// What one send or receive program call adds, measured without the
/// kernel's statistics (whose clock reads are most of an empty program's
/// figure above): the thread CPU time of recv() on an idle connection,
/// which returns EAGAIN and still fires `sock_recv_length`, in alternating
/// rounds. The program takes the path of both workloads (the owner again).
/// The added time, times the calls per unit, over the unit's time without
/// a tracer, is the share of the workload's time the programs take.
/// getppid(), which fires no socket hook, shows what a tracer adds to
/// every system call of the host: a syscall tracepoint in use (netwatch's
/// accept hook) puts every system call on the kernel's traced path.
fn call_costs(
    netwatch: &Path,
    results: &Path,
    rounds: usize,
    calls: PerUnit,
    unit_ns: PerUnit,
) -> anyhow::Result<()> {
    let (client, _server) = idle_connection()?;
    let mut times: Vec<CallTimes> = Tracer::ALL.iter().map(|_| CallTimes::default()).collect();
    for _ in 0..rounds {
        for (tracer, times) in Tracer::ALL.iter().zip(&mut times) {
            let running = tracer.start(netwatch, results)?;
            times.recv_ns.push(fastest(|| idle_recv_ns(&client)));
            times.getppid_ns.push(fastest(getppid_ns));
            running.stop()?;
        }
    }
    print_call_costs(&times, rounds, calls, unit_ns);
    Ok(())
}

fn print_call_costs(times: &[CallTimes], rounds: usize, calls: PerUnit, unit_ns: PerUnit) {
    println!();
    println!(
        "What one call adds, without the kernel's statistics: thread CPU time of recv() on an idle"
    );
    println!("connection (EAGAIN), and of getppid() (no socket hook), fastest of {IDLE_TIMINGS} timings of {IDLE_CALLS}");
    println!("calls, {rounds} alternating rounds; added: against the same round without a tracer, median [lowest, highest];");
    println!("share = added ns per recv() x calls per unit / the unit's time without a tracer");
    println!(
        "({:.2} calls in {:.0} ns per round trip, {:.2} calls in {:.0} ns per MiB):",
        calls.round_trip, unit_ns.round_trip, calls.mib, unit_ns.mib
    );
    println!();
    println!("| tracer | ns per recv() | added per recv() | ns per getppid() | added per getppid() | (a) share | (b) share |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let none = &times[0];
    for (tracer, times) in Tracer::ALL.iter().zip(times).skip(1) {
        let (recv_added, recv_text) = paired_difference(&times.recv_ns, &none.recv_ns);
        let (_, getppid_text) = paired_difference(&times.getppid_ns, &none.getppid_ns);
        println!(
            "| {} | {:.0} | {recv_text} | {:.0} | {getppid_text} | {:.2}% | {:.2}% |",
            tracer.name(),
            median(&times.recv_ns),
            median(&times.getppid_ns),
            recv_added * calls.round_trip / unit_ns.round_trip * 100.0,
            recv_added * calls.mib / unit_ns.mib * 100.0,
        );
    }
}

/// How `traced` differs from `none` round by round: the median, and it as
/// "median [lowest, highest]".
fn paired_difference(traced: &[f64], none: &[f64]) -> (f64, String) {
    let added = traced.iter().zip(none).map(|(traced, none)| traced - none);
    let (typical, spread) = median_and_spread(added.collect());
    (typical, format!("{typical:+.1} {spread}"))
}

/// The fastest of `IDLE_TIMINGS` timings (the others were interrupted).
pub(crate) fn fastest(time: impl Fn() -> f64) -> f64 {
    (0..IDLE_TIMINGS)
        .map(|_| time())
        .fold(f64::INFINITY, f64::min)
}

/// Both ends of a loopback connection on which nothing is sent.
fn idle_connection() -> anyhow::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    Ok((client, server))
}

/// Thread CPU ns per recv() on `socket`, which has nothing to read.
fn idle_recv_ns(socket: &TcpStream) -> f64 {
    let fd = socket.as_raw_fd();
    let mut byte = 0u8;
    let started = thread_cpu_ns();
    for _ in 0..IDLE_CALLS {
        // SAFETY: reads at most one byte into `byte`; EAGAIN is the expected result.
        unsafe { libc::recv(fd, (&raw mut byte).cast(), 1, libc::MSG_DONTWAIT) };
    }
    (thread_cpu_ns() - started) as f64 / f64::from(IDLE_CALLS)
}

/// Thread CPU ns per getppid(), a system call that fires no socket hook.
pub(crate) fn getppid_ns() -> f64 {
    let started = thread_cpu_ns();
    for _ in 0..IDLE_CALLS {
        // SAFETY: no preconditions.
        unsafe { libc::getppid() };
    }
    (thread_cpu_ns() - started) as f64 / f64::from(IDLE_CALLS)
}

/// CPU time of the calling thread, in ns.
fn thread_cpu_ns() -> u64 {
    // SAFETY: timespec is plain old data that clock_gettime fills in.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

fn print_table(figures: &[Figures], round_trips: u64, bulk_gib: u64, rounds: usize) {
    println!();
    println!("Loopback TCP between two processes, {rounds} alternating rounds:");
    println!("(a) {round_trips} round trips of {MESSAGE}-byte messages; (b) {bulk_gib} GiB in {} KiB writes", BULK_WRITE / 1024);
    println!(
        "Throughput: the median of the rounds; change: against the same round without a tracer,"
    );
    println!(
        "median [lowest, highest] of the rounds (pairing rounds cancels the machine's slow drift)."
    );
    println!();
    println!("| tracer | (a) round trips/s | (a) change | (b) GiB/s | (b) change |");
    println!("|---|---:|---:|---:|---:|");
    let none = &figures[0];
    for (tracer, figures) in Tracer::ALL.iter().zip(figures) {
        println!(
            "| {} | {:.0} | {} | {:.2} | {} |",
            tracer.name(),
            median(&figures.round_trips_per_s),
            paired_change(&figures.round_trips_per_s, &none.round_trips_per_s),
            median(&figures.bulk_gib_per_s),
            paired_change(&figures.bulk_gib_per_s, &none.bulk_gib_per_s),
        );
    }
}

/// How `traced` differs from `none` round by round, in percent: median [lowest, highest].
pub(crate) fn paired_change(traced: &[f64], none: &[f64]) -> String {
    let changes = traced
        .iter()
        .zip(none)
        .map(|(traced, none)| (traced / none - 1.0) * 100.0);
    let (typical, spread) = median_and_spread(changes.collect());
    format!("{typical:+.1}% {spread}")
}

/// The median of `values`, and "[lowest, highest]".
fn median_and_spread(mut values: Vec<f64>) -> (f64, String) {
    values.sort_by(f64::total_cmp);
    let spread = format!("[{:+.1}, {:+.1}]", values[0], values[values.len() - 1]);
    (median(&values), spread)
}

/// `count` round trips of one message each way on one connection.
fn request_response(port: u16, count: u64) -> anyhow::Result<()> {
    let mut stream = connect(port, REQUEST_RESPONSE)?;
    let mut message = [7u8; MESSAGE];
    for _ in 0..count {
        stream.write_all(&message)?;
        stream.read_exact(&mut message)?;
    }
    Ok(())
}

/// Sends `bytes` in 64 KiB writes and waits for the server to have read them all.
fn bulk(port: u16, bytes: u64) -> anyhow::Result<()> {
    let mut stream = connect(port, BULK)?;
    let block = vec![7u8; BULK_WRITE];
    for _ in 0..bytes / BULK_WRITE as u64 {
        stream.write_all(&block)?;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut done = [0u8; 1];
    stream
        .read_exact(&mut done)
        .context("the server did not confirm the bulk transfer")?;
    Ok(())
}

fn connect(port: u16, workload: u8) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.write_all(&[workload])?;
    Ok(stream)
}

/// The `xtask traffic-server` child; killed when dropped.
struct TrafficServer {
    child: Child,
    port: u16,
}

impl TrafficServer {
    fn start(cpu: usize) -> anyhow::Result<TrafficServer> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["traffic-server", "--cpu", &cpu.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the traffic server failed")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("piped stdout")?;
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        let Ok(port) = line.trim().parse() else {
            let _ = child.kill();
            bail!("the traffic server said {line:?}, not its port");
        };
        Ok(TrafficServer { child, port })
    }
}

impl Drop for TrafficServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `xtask traffic-server --cpu N`: pinned to CPU N, listens on 127.0.0.1,
/// prints its port, and serves connections one after the other until
/// killed: echoes each message of a request/response connection, reads a
/// bulk connection to its end and confirms with one byte.
pub fn serve(cpu: usize) -> anyhow::Result<()> {
    cpus::run_on(&[cpu])?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("{}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    for stream in listener.incoming() {
        let mut stream = stream?;
        stream.set_nodelay(true)?;
        let mut workload = [0u8; 1];
        stream.read_exact(&mut workload)?;
        match workload[0] {
            REQUEST_RESPONSE => echo(&mut stream)?,
            BULK => drain(&mut stream)?,
            other => bail!("unknown workload {other}"),
        }
    }
    Ok(())
}

fn echo(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut message = [0u8; MESSAGE];
    loop {
        match stream.read_exact(&mut message) {
            Ok(()) => stream.write_all(&message)?,
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(err) => return Err(err),
        }
    }
}

fn drain(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut buffer = vec![0u8; BULK_WRITE];
    while stream.read(&mut buffer)? > 0 {}
    stream.write_all(&[1])
}
