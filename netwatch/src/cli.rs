//! Command line: `netwatch [watch]` streams, `netwatch snapshot` is a faster
//! `netstat -ntp`, `netwatch audit` logs connections, `netwatch verify`
//! checks the live table against snapshots.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::model::{Owner, TcpState, Tuple};
use crate::sink::SyslogTarget;

/// What `--version` prints after the name: the version and the git commit built.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("NETWATCH_GIT_COMMIT"),
    ")"
);

/// Live TCP connection monitor: a /proc snapshot kept current by eBPF.
///
/// With no subcommand, streams every TCP state transition (needs root).
#[derive(Debug, Parser)]
#[command(name = "netwatch", version = VERSION, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub watch: WatchArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream TCP state transitions live (the default; needs root).
    Watch(WatchArgs),
    /// Print the sockets and their processes once, like `netstat -ntp` (no root needed).
    Snapshot(SnapshotArgs),
    /// Write one JSON record per TCP connection when it closes, and per
    /// listener when it opens and closes, for log pipelines (needs root).
    Audit(AuditArgs),
    /// A full-screen live table of connections, processes, remote hosts and
    /// units, where every connection appears, even one that lived a
    /// millisecond (live with root; from /proc snapshots without).
    Top(TopArgs),
    /// Keep the live table and compare it with a fresh /proc snapshot every
    /// interval; exit 1 if drift persists across two checks (needs root).
    Verify(VerifyArgs),
    /// Write the man pages and the bash, zsh and fish completions into a
    /// directory (for packagers).
    #[command(hide = true)]
    Generate(GenerateArgs),
}

/// `netwatch generate` arguments.
#[derive(Debug, Args, Clone)]
pub struct GenerateArgs {
    /// Directory to write into (created if missing).
    pub dir: std::path::PathBuf,
}

/// Filters shared by snapshot and watch.
#[derive(Debug, Args, Clone, Default)]
pub struct Filters {
    /// IPv4 sockets only.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// IPv6 sockets only (including IPv4-mapped addresses).
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
    /// Only sockets with this local or remote port.
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
    /// Only sockets owned by this process.
    #[arg(long, value_name = "N")]
    pub pid: Option<u32>,
    /// Only sockets in this state (ESTABLISHED, time-wait, LISTEN, ...).
    #[arg(long, value_name = "NAME", value_parser = parse_state)]
    pub state: Option<TcpState>,
}

/// `netwatch snapshot` flags, as netstat spells them.
#[derive(Debug, Args, Clone, Default)]
pub struct SnapshotArgs {
    /// TCP sockets (the default when neither -t nor -u is given).
    #[arg(short = 't', long = "tcp")]
    pub tcp: bool,
    /// UDP sockets.
    #[arg(short = 'u', long = "udp")]
    pub udp: bool,
    /// Listening sockets only (unconnected ones, for UDP).
    #[arg(short = 'l', long = "listening", conflicts_with = "all")]
    pub listening: bool,
    /// Sockets in every state (default: all but listening, as netstat).
    #[arg(short = 'a', long = "all")]
    pub all: bool,
    /// Numeric addresses: accepted for netstat habits, netwatch never resolves names.
    #[arg(short = 'n', long = "numeric")]
    pub numeric: bool,
    /// Show the PID/Program name column.
    #[arg(short = 'p', long = "program")]
    pub program: bool,
    /// Show the User (uid) and Inode columns.
    #[arg(short = 'e', long = "extend")]
    pub extend: bool,
    /// One JSON object per socket per line.
    #[arg(long)]
    pub json: bool,
    /// With -p, the owner's full command line after PID/ (its name where
    /// the command line cannot be read); with --json, `cmdline`.
    #[arg(long)]
    pub cmdline: bool,
    /// Where the TCP sockets and their owners are read.
    #[arg(long, value_enum, default_value_t = SnapshotSource::Auto)]
    pub source: SnapshotSource,
    #[command(flatten)]
    pub filters: Filters,
}

/// Where `snapshot` reads the TCP sockets and their owners.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SnapshotSource {
    /// In the kernel as root when many sockets are open, else /proc.
    #[default]
    Auto,
    /// In the kernel, with netwatch's BPF iterators (root; /proc if they cannot load).
    Kernel,
    /// /proc/net/tcp{,6} and /proc/PID/fd, as netstat reads them.
    Proc,
}

/// Flags of every mode that loads the eBPF programs.
#[derive(Debug, Args, Clone)]
pub struct ProbeArgs {
    /// Ring buffer size in KiB (a power of two, at least 4); the summary
    /// says how full it got.
    #[arg(long, value_name = "KIB", default_value_t = 1024, value_parser = parse_ring_kib)]
    pub ring_buffer_kib: u32,
    /// After lost events, keep going without re-reading /proc (the table may drift).
    #[arg(long)]
    pub no_resync: bool,
    /// Name an accepted socket's owner the moment accept() returns, not at
    /// its first send or receive. This hooks the exit of accept() through
    /// the syscall tracepoints, which puts every system call of every
    /// process on the kernel's slower traced path (about 90 ns more each
    /// here, +30-65% on a cheap call such as getppid()).
    #[arg(long)]
    pub accept_hook: bool,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics; a PORT alone
    /// binds 127.0.0.1 (the endpoint has no authentication).
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = parse_metrics_addr)]
    pub metrics: Option<SocketAddr>,
}

/// `ADDR:PORT`, or a port alone on 127.0.0.1.
fn parse_metrics_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port)));
    }
    text.parse().map_err(|_| {
        format!("'{text}' is neither a port nor an address and port (127.0.0.1:9090, [::1]:9090)")
    })
}

/// `netwatch watch` flags.
#[derive(Debug, Args, Clone)]
pub struct WatchArgs {
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Also print each socket of the starting /proc baseline once.
    #[arg(long)]
    pub baseline: bool,
    #[command(flatten)]
    pub cgroups: CgroupFilters,
    /// The owner's full command line: at the end of each text line, and
    /// as `cmdline` in JSON.
    #[arg(long)]
    pub cmdline: bool,
    #[command(flatten)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    pub filters: Filters,
}

/// `netwatch top` flags.
#[derive(Debug, Args, Clone)]
pub struct TopArgs {
    /// How often the screen is redrawn (`+` and `-` change it).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: std::time::Duration,
    /// How long a closed connection stays on screen, dimmed.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub keep_closed: std::time::Duration,
    #[command(flatten)]
    pub cgroups: CgroupFilters,
    #[command(flatten)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    pub filters: Filters,
}

/// `netwatch audit` flags.
#[derive(Debug, Args, Clone)]
pub struct AuditArgs {
    /// Append records to FILE instead of stdout; SIGHUP reopens it (logrotate).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Also send each record as an RFC 5424 message (the JSON record as its
    /// text) to the local syslog socket (local, the default, or unix:PATH),
    /// or over udp://HOST:PORT or tcp://HOST:PORT (octet-counted, RFC 6587).
    /// A receiver that is gone or slow costs dropped messages, counted and
    /// reported, never records in --output.
    #[arg(long, value_name = "TARGET", num_args = 0..=1, default_missing_value = "local")]
    pub syslog: Option<SyslogTarget>,
    #[command(flatten)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    pub cgroups: CgroupFilters,
}

/// Filters by the owner's cgroup (watch and audit).
#[derive(Debug, Args, Clone, Default)]
pub struct CgroupFilters {
    /// Only sockets whose owner runs in this systemd unit (nginx.service;
    /// a unit inside a user's manager matches too).
    #[arg(long, value_name = "NAME")]
    pub unit: Option<String>,
    /// Only sockets whose owner runs in this container (its id, or the
    /// start of it, as `docker ps` shows 12 digits).
    #[arg(long, value_name = "ID")]
    pub container: Option<String>,
}

impl CgroupFilters {
    /// Whether either filter is given.
    pub fn any(&self) -> bool {
        self.unit.is_some() || self.container.is_some()
    }

    /// Whether a socket owned by `owner` passes.
    pub fn matches(&self, owner: Option<&Owner>) -> bool {
        if self.unit.is_none() && self.container.is_none() {
            return true;
        }
        let cgroup = owner.and_then(Owner::cgroup);
        let unit = cgroup.and_then(|cgroup| cgroup.unit.as_deref());
        let container = cgroup.and_then(|cgroup| cgroup.container.as_deref());
        self.matches_cgroup(unit, container)
    }

    /// Whether a socket whose owner runs in this unit and container passes.
    fn matches_cgroup(&self, unit: Option<&str>, container: Option<&str>) -> bool {
        self.unit
            .as_deref()
            .is_none_or(|wanted| unit.is_some_and(|unit| unit.split('/').any(|u| u == wanted)))
            && self.container.as_deref().is_none_or(|wanted| {
                !wanted.is_empty() && container.is_some_and(|id| id.starts_with(wanted))
            })
    }
}

/// `netwatch verify` flags.
#[derive(Debug, Args, Clone)]
pub struct VerifyArgs {
    /// Seconds between two comparisons with a fresh snapshot.
    #[arg(long, value_name = "SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub interval: u64,
    /// Stop after this many seconds (default: at SIGINT or SIGTERM).
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<u64>,
    /// One JSON object per report.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub probe: ProbeArgs,
}

impl Filters {
    /// Whether a socket passes the filters. `states` are the states the
    /// socket is seen in: one for a snapshot, old and new for a transition.
    pub fn matches(&self, tuple: &Tuple, pid: Option<u32>, states: &[TcpState]) -> bool {
        (!self.ipv4 || !tuple.proto.is_ipv6())
            && (!self.ipv6 || tuple.proto.is_ipv6())
            && self
                .port
                .is_none_or(|port| tuple.local.port() == port || tuple.remote.port() == port)
            && self.pid.is_none_or(|wanted| pid == Some(wanted))
            && self.state.is_none_or(|wanted| states.contains(&wanted))
    }
}

fn parse_state(name: &str) -> Result<TcpState, String> {
    TcpState::from_name(name).ok_or_else(|| {
        format!("unknown TCP state '{name}' (try ESTABLISHED, SYN_SENT, TIME_WAIT, LISTEN, ...)")
    })
}

fn parse_ring_kib(value: &str) -> Result<u32, String> {
    let kib: u32 = value
        .parse()
        .map_err(|_| format!("'{value}' is not a size in KiB"))?;
    if kib < 4 || !kib.is_power_of_two() || kib > (1 << 20) {
        return Err(format!(
            "ring buffer size must be a power of two from 4 to 1048576 KiB, not {kib}"
        ));
    }
    Ok(kib)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("netwatch").chain(args.iter().copied()))
    }

    #[test]
    fn no_subcommand_means_watch() {
        let cli = parse(&["--json", "--port", "80"]).unwrap();
        assert!(cli.command.is_none());
        assert!(cli.watch.json);
        assert_eq!(cli.watch.filters.port, Some(80));
    }

    #[test]
    fn netstat_flags_combine() {
        let cli = parse(&["snapshot", "-tanp", "--state", "time-wait"]).unwrap();
        let Some(Command::Snapshot(args)) = cli.command else {
            panic!("expected the snapshot subcommand");
        };
        assert!(args.tcp && args.all && args.numeric && args.program);
        assert_eq!(args.filters.state, Some(TcpState::TimeWait));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(parse(&["snapshot", "--state", "nope"]).is_err());
        assert!(parse(&["snapshot", "--port", "70000"]).is_err());
        assert!(parse(&["snapshot", "-l", "-a"]).is_err());
        assert!(parse(&["--ring-buffer-kib", "1000"]).is_err());
        assert!(parse(&["snapshot", "-4", "-6"]).is_err());
        assert!(parse(&["verify", "--interval", "0"]).is_err());
        assert!(parse(&["audit", "--metrics", "localhost"]).is_err());
        assert!(parse(&["audit", "--metrics", "70000"]).is_err());
    }

    #[test]
    fn syslog_alone_means_the_local_socket() {
        let syslog_of = |args: &[&str]| match parse(args).unwrap().command {
            Some(Command::Audit(audit)) => audit.syslog,
            _ => panic!("expected the audit subcommand"),
        };
        assert_eq!(
            syslog_of(&["audit", "--syslog"]),
            Some(SyslogTarget::Unix("/dev/log".into()))
        );
        assert_eq!(
            syslog_of(&["audit", "--syslog", "tcp://127.0.0.1:514", "--output", "x"]),
            Some(SyslogTarget::Tcp("127.0.0.1:514".into()))
        );
        assert_eq!(syslog_of(&["audit"]), None);
        assert!(parse(&["audit", "--syslog", "syslog.example"]).is_err());
    }

    #[test]
    fn a_metrics_port_alone_binds_the_loopback_address() {
        assert_eq!(
            parse_metrics_addr("9090"),
            Ok("127.0.0.1:9090".parse().unwrap())
        );
        assert_eq!(
            parse_metrics_addr("[::1]:9090"),
            Ok("[::1]:9090".parse().unwrap())
        );
        assert_eq!(
            parse_metrics_addr("0.0.0.0:9090"),
            Ok("0.0.0.0:9090".parse().unwrap())
        );
    }
}
