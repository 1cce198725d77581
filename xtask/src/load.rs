//! The benchmarks' load around the shared generator (`xtask::loopback`):
//! the `hold` and `churn` commands, the processes holding the snapshot
//! benchmark's sockets, and waits on /proc. Bounded, and only on
//! 127.0.0.0/8.

use std::collections::HashSet;
use std::io::{BufRead as _, BufReader};
use std::net::Ipv4Addr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use xtask::loopback::{self, ChurnReport, ChurnSpec, Connections};

/// `xtask hold`: one process's share of the snapshot benchmark's sockets.
#[derive(clap::Args, Debug)]
pub struct HoldArgs {
    /// Connections to open to our own listener (each holds 2 sockets).
    #[arg(long)]
    pub connections: usize,
    /// Loopback address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub addr: Ipv4Addr,
}

/// Opens the connections, prints `ready`, and holds them until stdin closes.
pub fn hold(args: &HoldArgs) -> anyhow::Result<()> {
    raise_fd_limit(2 * args.connections as u64 + 64)?;
    let connections = Connections::open(args.connections, args.addr)?;
    println!("ready");
    // Hold until the benchmark closes our stdin.
    let _ = std::io::stdin().lock().lines().count();
    connections.reset_on_close();
    Ok(())
}

/// `xtask churn`: open and close loopback connections from client threads.
#[derive(clap::Args, Debug)]
pub struct ChurnArgs {
    /// Stop after this many connections (0: only the duration bounds the run).
    #[arg(long, default_value_t = 100_000)]
    pub connections: u64,
    /// Stop after this many seconds at most (at most an hour).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,
    /// Client threads (one listener and one accepting thread each).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Connections per second across threads (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
}

impl ChurnArgs {
    /// The run these flags ask for.
    pub fn spec(&self) -> ChurnSpec {
        ChurnSpec {
            connections: self.connections,
            seconds: self.seconds,
            threads: self.threads,
            rate: self.rate,
        }
    }
}

/// Runs the churn, and fails when the host's listeners overflowed meanwhile.
pub fn churn(args: &ChurnArgs) -> anyhow::Result<ChurnReport> {
    let overflows_before = ListenOverflows::now()?;
    let report = loopback::churn(&args.spec())?;
    let overflows = ListenOverflows::now()?.since(overflows_before);
    if overflows.listen_overflows > 0 {
        bail!(
            "the churn's listeners overflowed their accept queues {} times ({} SYNs retransmitted): \
             connects waited on SYN retransmits, so the rate would measure the load generator, not the tracer; \
             run again on a quieter machine",
            overflows.listen_overflows,
            overflows.syn_retransmits
        );
    }
    Ok(report)
}

/// The host's counters of accept queue overflows and of retransmitted SYNs
/// (TcpExt in /proc/net/netstat).
#[derive(Clone, Copy, Debug)]
struct ListenOverflows {
    listen_overflows: u64,
    syn_retransmits: u64,
}

impl ListenOverflows {
    fn now() -> anyhow::Result<ListenOverflows> {
        let netstat = std::fs::read_to_string("/proc/net/netstat")?;
        let mut tcp_ext = netstat.lines().filter(|line| line.starts_with("TcpExt:"));
        let (Some(names), Some(values)) = (tcp_ext.next(), tcp_ext.next()) else {
            bail!("/proc/net/netstat has no TcpExt counters");
        };
        let counter = |wanted: &str| -> anyhow::Result<u64> {
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(name, _)| *name == wanted)
                .and_then(|(_, value)| value.parse().ok())
                .with_context(|| format!("/proc/net/netstat has no TcpExt {wanted}"))
        };
        Ok(ListenOverflows {
            listen_overflows: counter("ListenOverflows")?,
            syn_retransmits: counter("TCPSynRetrans")?,
        })
    }

    fn since(self, before: ListenOverflows) -> ListenOverflows {
        ListenOverflows {
            listen_overflows: self
                .listen_overflows
                .saturating_sub(before.listen_overflows),
            syn_retransmits: self.syn_retransmits.saturating_sub(before.syn_retransmits),
        }
    }
}

/// Raises RLIMIT_NOFILE to at least `wanted` (root may raise the hard limit).
pub fn raise_fd_limit(wanted: u64) -> anyhow::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: wanted,
        rlim_max: wanted,
    };
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write one rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut current);
        if current.rlim_cur >= wanted {
            return Ok(());
        }
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            bail!(
                "cannot raise the open file limit to {wanted}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Processes holding the benchmark's sockets; they exit when dropped.
pub(crate) struct Holders {
    children: Vec<(Child, ChildStdin)>,
}

/// Processes the snapshot benchmark's sockets are spread over.
pub(crate) const HOLDERS: usize = 20;

impl Holders {
    /// 20 processes holding `sockets` established sockets in all, each on its own 127.0.0.x.
    pub(crate) fn start(sockets: usize) -> anyhow::Result<Holders> {
        let per_holder = sockets / HOLDERS / 2;
        let mut children = Vec::new();
        for i in 0..HOLDERS {
            let mut child = Command::new(std::env::current_exe()?)
                .args(["hold", "--connections", &per_holder.to_string()])
                .args(["--addr", &format!("127.0.0.{}", i + 2)])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let stdin = child.stdin.take().context("holder stdin")?;
            let stdout = child.stdout.take().context("holder stdout")?;
            let mut ready = String::new();
            BufReader::new(stdout).read_line(&mut ready)?;
            if ready.trim() != "ready" {
                bail!("holder {i} did not get ready");
            }
            children.push((child, stdin));
        }
        Ok(Holders { children })
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for (mut child, stdin) in self.children.drain(..) {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

/// The data lines of /proc/net/tcp and /proc/net/tcp6 (headers left out).
fn proc_tcp_lines() -> Vec<String> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|table| table.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

/// Sockets in /proc/net/tcp and tcp6.
pub(crate) fn tcp_socket_count() -> usize {
    proc_tcp_lines().len()
}

/// Waits (70 s at most: TIME_WAIT lasts 60 s) until fewer than 1,000
/// TIME_WAIT sockets are left from earlier loads, so that a benchmark's
/// socket counts are its own. Returns how many are left.
pub(crate) fn wait_for_time_wait_to_drain() -> u64 {
    let time_wait = || {
        std::fs::read_to_string("/proc/net/sockstat")
            .ok()
            .and_then(|sockstat| {
                let tcp = sockstat.lines().find(|line| line.starts_with("TCP:"))?;
                let fields: Vec<&str> = tcp.split_whitespace().collect();
                let at = fields.iter().position(|field| *field == "tw")?;
                fields.get(at + 1)?.parse().ok()
            })
            .unwrap_or(0)
    };
    let started = Instant::now();
    while time_wait() >= 1000 && started.elapsed() < Duration::from_secs(70) {
        std::thread::sleep(Duration::from_secs(1));
    }
    time_wait()
}

/// Waits (30 s at most) until no socket on the churn's ports is open, but for TIME_WAIT.
pub(crate) fn wait_for_churn_to_settle(ports: &HashSet<u16>) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        let open = proc_tcp_lines()
            .iter()
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let port = |field: Option<&&str>| {
                    field
                        .and_then(|f| f.rsplit(':').next())
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                };
                let on_churn = [port(fields.get(1)), port(fields.get(2))]
                    .iter()
                    .any(|p| p.is_some_and(|p| ports.contains(&p)));
                // 06: TIME_WAIT, 0A: LISTEN (the churn's listeners are gone by now).
                on_churn && fields.get(3).is_some_and(|state| *state != "06")
            })
            .count();
        if open == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
