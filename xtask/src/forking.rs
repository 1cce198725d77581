//! `cargo xtask bench forking`: `netwatch audit` beside a server that forks
//! a process per connection (socat's `fork`), where every connection has
//! an owner netwatch has not seen before, whose command line, executable
//! and cgroup it reads. Prints audit's CPU per connection and how many of
//! the children's records name their command line (a child that exits
//! before netwatch reads /proc has none), optionally against another build
//! in alternating rounds.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::stats::median;
use crate::tracer::{command, process_cpu, start_tracer};

/// What one round measured for one build.
struct Round {
    /// audit's CPU time from the first connection to its exit.
    cpu: Duration,
    /// `in` records of the server's connections.
    records: usize,
    /// Those that name socat as their owner's command line.
    with_cmdline: usize,
}

/// Runs `rounds` rounds of `connections` each, for `netwatch` and, when
/// given, `against`, alternating.
pub fn run(
    netwatch: &Path,
    against: Option<&Path>,
    connections: usize,
    rounds: usize,
    results: &Path,
) -> anyhow::Result<()> {
    let builds: Vec<(&str, &Path)> = std::iter::once(("netwatch", netwatch))
        .chain(against.map(|path| ("against", path)))
        .collect();
    let mut measured: Vec<Vec<Round>> = builds.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for ((label, binary), rounds) in builds.iter().zip(&mut measured) {
            let measured = measure(binary, connections, results)
                .with_context(|| format!("round {round}, {label}"))?;
            println!(
                "round {round} {label:<9} audit CPU {:>6.1} ms, {:>5.1} us/connection, {} records, {} with the child's command line",
                measured.cpu.as_secs_f64() * 1e3,
                measured.cpu.as_secs_f64() * 1e6 / connections as f64,
                measured.records,
                measured.with_cmdline,
            );
            rounds.push(measured);
        }
    }
    println!("\n{connections} connections to `socat TCP-LISTEN,fork EXEC:cat`, median of {rounds} rounds:");
    for ((label, binary), rounds) in builds.iter().zip(&measured) {
        let cpu: Vec<f64> = rounds.iter().map(|r| r.cpu.as_secs_f64() * 1e6).collect();
        let named: Vec<f64> = rounds
            .iter()
            .map(|r| 100.0 * r.with_cmdline as f64 / r.records.max(1) as f64)
            .collect();
        println!(
            "  {label:<9} {:>5.1} us of audit CPU per connection, {:>5.1}% of the children's records with their command line ({})",
            median(&cpu) / connections as f64,
            median(&named),
            binary.display()
        );
    }
    Ok(())
}

/// One round: socat, audit, then `connections` one-line exchanges.
fn measure(netwatch: &Path, connections: usize, results: &Path) -> anyhow::Result<Round> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let server = ServerGroup::start(port)?;
    let records = results.join("forking-audit.jsonl");
    let _ = std::fs::remove_file(&records);
    let args = ["audit", "--output", &records.to_string_lossy()];
    let mut audit = start_tracer(
        command(netwatch, &args),
        &results.join("forking-audit.out"),
        &results.join("forking-audit.err"),
    )?;
    let before = process_cpu(audit.child.id())?;
    for _ in 0..connections {
        exchange(port)?;
    }
    // Let the last closes reach the records.
    std::thread::sleep(Duration::from_secs(1));
    let usage = audit.stop()?;
    drop(server);
    let written = std::fs::read_to_string(&records)?;
    let served = written
        .lines()
        .filter(|line| line.contains(&format!("\"local_port\":{port},")))
        .filter(|line| line.contains("\"direction\":\"in\""));
    let (records, with_cmdline) = served.fold((0, 0), |(all, named), line| {
        (
            all + 1,
            named + usize::from(line.contains("\"cmdline\":[\"socat\"")),
        )
    });
    Ok(Round {
        cpu: usage.cpu.saturating_sub(before),
        records,
        with_cmdline,
    })
}

/// One line sent and echoed back, then the connection closed.
fn exchange(port: u16) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.write_all(b"hello\n")?;
    let mut echoed = String::new();
    BufReader::new(&stream).read_line(&mut echoed)?;
    if echoed != "hello\n" {
        bail!("socat echoed {echoed:?}");
    }
    Ok(())
}

/// socat forking a child per connection, killed with its children when dropped.
struct ServerGroup(Child);

impl ServerGroup {
    fn start(port: u16) -> anyhow::Result<ServerGroup> {
        let child = Command::new("socat")
            .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"))
            .arg("EXEC:cat")
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .context("socat does not run (cargo xtask bench installs it)")?;
        let server = ServerGroup(child);
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("socat did not listen on {port}");
    }
}

impl Drop for ServerGroup {
    fn drop(&mut self) {
        // SAFETY: signals the process group this benchmark started.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}
