//! `cargo xtask bench soak`: `netwatch audit --output FILE` for a long run
//! of loopback churn at half the maximum rate, plus long-lived connections.
//! Samples the RSS of netwatch every 10 s and plots it (gnuplot, PNG),
//! counts the records against the connections made, and runs `netwatch
//! verify` beside it, whose table, kept as long, must match /proc at the end.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Deserialize;

use crate::load::{self, wait_for_churn_to_settle, ChurnArgs, Holders};
use crate::tracer::{command, start_tracer};

const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// RSS growth is measured from this point on (start-up allocations settle first).
const WARM_UP: Duration = Duration::from_secs(60);
/// netwatch verify's interval: after the churn, two of them pass before it stops.
const VERIFY_INTERVAL_S: u64 = 10;

/// Runs the soak and prints its figures.
pub fn run(netwatch: &Path, minutes: u64, long_lived: usize, results: &Path) -> anyhow::Result<()> {
    let rate = half_the_maximum_rate()?;
    let audit_path = results.join("soak-audit.jsonl");
    let _ = std::fs::remove_file(&audit_path);
    let audit_args = [
        "audit",
        "--output",
        audit_path.to_str().context("UTF-8 path")?,
    ];
    let mut audit = start_tracer(
        command(netwatch, &audit_args),
        &results.join("soak-audit.out"),
        &results.join("soak-audit.err"),
    )?;
    let interval = VERIFY_INTERVAL_S.to_string();
    let verify_path = results.join("soak-verify.jsonl");
    let mut verify = start_tracer(
        command(netwatch, &["verify", "--json", "--interval", &interval]),
        &verify_path,
        &results.join("soak-verify.err"),
    )?;
    let holders = Holders::start(2 * long_lived)?;
    let pids = [audit.child.id(), verify.child.id()];
    let sampler = RssSampler::start(pids);
    println!(
        "churn: {rate} connections/s for {minutes} min, {long_lived} long-lived connections held"
    );
    let churn = load::churn(&ChurnArgs {
        connections: 0,
        seconds: minutes * 60,
        threads: 2,
        rate,
    })?;
    let ports = &churn.ports;
    wait_for_churn_to_settle(ports);
    thread::sleep(Duration::from_secs(2 * VERIFY_INTERVAL_S + 2));
    let samples = sampler.stop();
    let verified = verify.stop()?;
    audit.stop()?;
    drop(holders);

    let records = count_records(&audit_path, ports)?;
    println!("\n== soak: {minutes} min ==");
    println!(
        "connections made: {} ({:.0}/s, {} failed connects); expected records: {} out + {} in",
        churn.connections, churn.rate, churn.failed, churn.connections, churn.connections
    );
    println!(
        "audit records on the churn's ports: {} out, {} in, closed ({} of them without a traced CLOSE); {} duplicates; lost records: {}",
        records.outgoing, records.incoming, records.close_unseen, records.duplicates, records.lost
    );
    println!(
        "records of connections open at exit (end null): {} (the {long_lived} long-lived connections give {})",
        records.open_at_exit,
        2 * long_lived
    );
    report_verify(&verify_path, verified.success)?;
    report_rss(&samples, results)?;
    Ok(())
}

/// Churns for 10 s without a tracer; half of what it reached.
fn half_the_maximum_rate() -> anyhow::Result<u64> {
    let report = load::churn(&ChurnArgs {
        connections: 0,
        seconds: 10,
        threads: 2,
        rate: 0,
    })?;
    wait_for_churn_to_settle(&report.ports);
    let max = report.rate;
    println!("maximum churn rate without a tracer: {max:.0} connections/s");
    Ok((max / 2.0) as u64)
}

/// Samples the RSS of some processes every 10 s on a thread of its own.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<Vec<(f64, Vec<u64>)>>,
}

impl RssSampler {
    fn start<const N: usize>(pids: [u32; N]) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = thread::spawn(move || {
            let started = Instant::now();
            let mut samples = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                let rss = pids.iter().map(|&pid| rss_kib(pid).unwrap_or(0)).collect();
                samples.push((started.elapsed().as_secs_f64(), rss));
                let next = SAMPLE_EVERY * samples.len() as u32;
                while started.elapsed() < next && !stopped.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(100));
                }
            }
            samples
        });
        RssSampler { stop, thread }
    }

    /// (seconds since start, RSS KiB of each process) every 10 s.
    fn stop(self) -> Vec<(f64, Vec<u64>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The fields of an audit record the soak counts.
#[derive(Deserialize)]
struct Record<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    direction: Option<&'a str>,
    start: Option<&'a str>,
    end: Option<&'a str>,
    local_port: Option<u16>,
    remote_port: Option<u16>,
    count: Option<u64>,
    close_seen: Option<bool>,
}

#[derive(Default)]
struct RecordCounts {
    outgoing: u64,
    incoming: u64,
    duplicates: u64,
    open_at_exit: u64,
    lost: u64,
    /// Closed records whose change to CLOSE the kernel did not trace.
    close_unseen: u64,
}

/// Counts the closed connection records on the churn's ports (an endpoint
/// recorded twice has the same direction, ports and start), records of
/// connections still open at exit, and reported losses.
fn count_records(path: &Path, ports: &HashSet<u16>) -> anyhow::Result<RecordCounts> {
    let mut counts = RecordCounts::default();
    let mut seen = HashSet::new();
    let mut line = String::new();
    let mut reader = BufReader::with_capacity(1 << 20, File::open(path)?);
    while reader.read_line(&mut line)? > 0 {
        let record: Record =
            serde_json::from_str(&line).with_context(|| format!("not an audit record: {line}"))?;
        let churn_port = |port: Option<u16>| port.is_some_and(|port| ports.contains(&port));
        match (record.kind, record.direction, record.end) {
            ("lost", ..) => counts.lost += record.count.unwrap_or(0),
            ("conn", Some(_), None) => counts.open_at_exit += 1,
            ("conn", Some(direction), Some(_)) => {
                let (counter, on_churn) = match direction {
                    "out" => (&mut counts.outgoing, churn_port(record.remote_port)),
                    _ => (&mut counts.incoming, churn_port(record.local_port)),
                };
                if on_churn {
                    *counter += 1;
                    let key = (
                        direction == "out",
                        record.local_port,
                        record.remote_port,
                        record.start.map(str::to_owned),
                    );
                    if !seen.insert(key) {
                        counts.duplicates += 1;
                    }
                    counts.close_unseen += u64::from(record.close_seen == Some(false));
                }
            }
            _ => {}
        }
        line.clear();
    }
    Ok(counts)
}

/// Prints what netwatch verify found at its last check and overall.
fn report_verify(path: &Path, success: bool) -> anyhow::Result<()> {
    let reports: Vec<serde_json::Value> = BufReader::new(File::open(path)?)
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| serde_json::from_str(&line).ok())
        .collect();
    let drift: Vec<&serde_json::Value> = reports.iter().filter(|r| r["type"] == "drift").collect();
    let Some(last) = drift.last() else {
        bail!("netwatch verify made no report");
    };
    let drifted = |r: &serde_json::Value| -> u64 {
        [
            "missing_from_table",
            "missing_from_snapshot",
            "pid_mismatch",
            "state_mismatch",
        ]
        .iter()
        .filter_map(|kind| r[*kind].as_u64())
        .sum()
    };
    println!(
        "verify beside it: {} checks, {} with drift (transient), exit status {}; last check after the churn: {} compared, {} drifted",
        drift.len(),
        drift.iter().filter(|r| drifted(r) > 0).count(),
        if success { "0: no drift persisted" } else { "1: drift persisted" },
        last["compared"],
        drifted(last)
    );
    Ok(())
}

/// Writes the samples as CSV, plots them and prints the growth after warm-up.
fn report_rss(samples: &[(f64, Vec<u64>)], results: &Path) -> anyhow::Result<()> {
    let csv = results.join("soak-rss.csv");
    let mut file = File::create(&csv)?;
    for (seconds, rss) in samples {
        writeln!(file, "{seconds:.0},{},{}", rss[0], rss[1])?;
    }
    for (column, name) in ["netwatch audit", "netwatch verify"].iter().enumerate() {
        let warm: Vec<u64> = samples
            .iter()
            .filter(|(seconds, _)| *seconds >= WARM_UP.as_secs_f64())
            .map(|(_, rss)| rss[column])
            .collect();
        let (Some(&at_warm), Some(&max)) = (warm.first(), warm.iter().max()) else {
            println!(
                "{name}: too short a run to measure growth after {} s",
                WARM_UP.as_secs()
            );
            continue;
        };
        println!(
            "{name} RSS: {:.1} MiB at 1 min, max {:.1} MiB after, growth {:.2} MiB (limit 4), final {:.1} MiB",
            at_warm as f64 / 1024.0,
            max as f64 / 1024.0,
            max.saturating_sub(at_warm) as f64 / 1024.0,
            warm.last().copied().unwrap_or(0) as f64 / 1024.0
        );
    }
    let png = results.join("soak-rss.png");
    let script = format!(
        "set terminal png size 900,500\n\
         set output '{}'\n\
         set datafile separator ','\n\
         set title 'RSS during the soak, sampled every 10 s'\n\
         set xlabel 'minutes'\n\
         set ylabel 'RSS (MiB)'\n\
         set yrange [0:*]\n\
         set key bottom right\n\
         plot '{}' using ($1/60):($2/1024) with lines lw 2 title 'netwatch audit', \
         '' using ($1/60):($3/1024) with lines lw 2 title 'netwatch verify'\n",
        png.display(),
        csv.display()
    );
    let mut gnuplot = Command::new("gnuplot")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("starting gnuplot failed")?;
    gnuplot
        .stdin
        .take()
        .context("gnuplot stdin")?
        .write_all(script.as_bytes())?;
    if !gnuplot.wait()?.success() {
        bail!("gnuplot failed to plot {}", csv.display());
    }
    println!("RSS samples: {}; plot: {}", csv.display(), png.display());
    Ok(())
}
