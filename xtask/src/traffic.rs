//! `cargo xtask bench traffic`: what netwatch's programs on every sendmsg
//! and recvmsg cost the host's TCP traffic. Loopback TCP between two
//! processes (this one and an `xtask traffic-server` child), measured with
//! no tracer, under `netwatch` and under `netwatch audit`, in alternating
//! rounds of the same run:
//! (a) request/response, 64-byte messages each way, `--round-trips` of them;
//! (b) bulk transfer of `--bulk-gib` GiB in 64 KiB writes.
//!
//! Client and server are pinned to the same CPU, the last one: a round trip
//! is then two direct switches rather than two cross-CPU wakeups, whose
//! cost on a virtual machine (tens of microseconds, and variable) would
//! hide what is measured. netwatch itself runs on the other CPUs.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::tracer::{command, start_tracer, RunningTracer};

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
    Watch,
    Audit,
}

impl Tracer {
    const ALL: [Tracer; 3] = [Tracer::None, Tracer::Watch, Tracer::Audit];

    fn name(self) -> &'static str {
        match self {
            Tracer::None => "none",
            Tracer::Watch => "netwatch",
            Tracer::Audit => "netwatch audit",
        }
    }

    fn start(self, netwatch: &Path, results: &Path) -> anyhow::Result<Option<RunningTracer>> {
        let out = results.join("traffic-tracer.out");
        let err = results.join("traffic-tracer.err");
        let args: &[&str] = match self {
            Tracer::None => return Ok(None),
            Tracer::Watch => &["--json"],
            Tracer::Audit => &["audit"],
        };
        start_tracer(command(netwatch, args), &out, &err).map(Some)
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
    let cpu = last_cpu();
    pin_to_cpu(cpu)?;
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
            if let Some(mut running) = running {
                running.stop()?;
            }
            println!(
                "round {round}/{rounds}, {:<15} {rr:>9.0} round trips/s  {gib_s:>6.2} GiB/s",
                tracer.name()
            );
            figures.round_trips_per_s.push(rr);
            figures.bulk_gib_per_s.push(gib_s);
        }
    }
    print_table(&figures, round_trips, bulk_gib, rounds);
    Ok(())
}

fn print_table(figures: &[Figures], round_trips: u64, bulk_gib: u64, rounds: usize) {
    let median = |values: &[f64]| {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    };
    let base_rr = median(&figures[0].round_trips_per_s);
    let base_bulk = median(&figures[0].bulk_gib_per_s);
    println!();
    println!("Loopback TCP between two processes, median of {rounds} alternating rounds:");
    println!("(a) {round_trips} round trips of {MESSAGE}-byte messages; (b) {bulk_gib} GiB in {} KiB writes", BULK_WRITE / 1024);
    println!();
    println!("| tracer | (a) round trips/s | (a) vs none | (b) GiB/s | (b) vs none |");
    println!("|---|---:|---:|---:|---:|");
    for (tracer, figures) in Tracer::ALL.iter().zip(figures) {
        let rr = median(&figures.round_trips_per_s);
        let gib_s = median(&figures.bulk_gib_per_s);
        println!(
            "| {} | {rr:.0} | {:+.1}% | {gib_s:.2} | {:+.1}% |",
            tracer.name(),
            (rr / base_rr - 1.0) * 100.0,
            (gib_s / base_bulk - 1.0) * 100.0
        );
    }
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
    pin_to_cpu(cpu)?;
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

/// The highest-numbered CPU this process may run on.
fn last_cpu() -> usize {
    std::thread::available_parallelism().map_or(0, |cpus| cpus.get() - 1)
}

/// Runs the calling thread (and the threads it starts) on `cpu` only.
fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain old data; CPU_SET writes within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sets the calling thread's affinity from a valid cpu_set_t.
    if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) } != 0 {
        bail!(
            "pinning to CPU {cpu} failed: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
