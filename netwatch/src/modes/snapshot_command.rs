//! `netwatch snapshot`: the sockets and their owners printed once, like `netstat -ntp`.

use std::io::Write;

use anyhow::Context as _;

use crate::cli::{SnapshotArgs, SnapshotSource};
use crate::engine::source::kernel_reader;
use crate::kernel::{self, Detail};
use crate::model::{Proto, TcpState};
use crate::output::{self, SnapshotColumns, SocketRecord};
use crate::snapshot::{self, KernelReader, Owners, SnapshotEntry};

/// TCP sockets open (TIME_WAIT included) from which, by default, the
/// kernel's iterators read them as root: below, loading the iterators costs
/// more than /proc (measured by `cargo xtask bench snapshot`).
const KERNEL_MIN_SOCKETS: u64 = 5_000;

/// Takes a snapshot and writes the sockets the flags select to `out`.
pub fn run(args: &SnapshotArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let owners = if args.program || args.json || args.filters.pid.is_some() {
        Owners::Find
    } else {
        Owners::Skip
    };
    let protos = selected_protos(args);
    let in_kernel = protos.iter().any(|proto| proto.is_tcp())
        && match args.source {
            SnapshotSource::Proc => false,
            SnapshotSource::Kernel => true,
            SnapshotSource::Auto => {
                snapshot::tcp_sockets_in_use() >= KERNEL_MIN_SOCKETS
                    || (owners == Owners::Find
                        && proc_hides_owners()
                        && kernel::may_load_programs())
            }
        };
    let mut iterators = in_kernel.then(|| kernel_reader(Detail::Full)).flatten();
    let kernel = iterators
        .as_mut()
        .map(|iterators| iterators as &mut dyn KernelReader);
    let mut snapshot =
        snapshot::take(&protos, owners, kernel).context("reading the socket tables failed")?;
    if snapshot.malformed_lines > 0 {
        log::info!(
            "skipped {} malformed line(s) in /proc/net socket tables",
            snapshot.malformed_lines
        );
    }
    if args.cmdline {
        snapshot::add_images(
            snapshot
                .entries
                .iter_mut()
                .filter(|entry| is_shown(args, entry)),
        );
    }
    let shown: Vec<&SnapshotEntry> = snapshot
        .entries
        .iter()
        .filter(|entry| is_shown(args, entry))
        .collect();
    if args.json {
        for entry in &shown {
            output::write_json_line(out, &SocketRecord::new(entry, args.cmdline))?;
        }
    } else {
        let title = output::snapshot_title(args.listening, args.all);
        let columns = SnapshotColumns {
            program: args.program,
            extend: args.extend,
            cmdline: args.cmdline,
        };
        output::write_snapshot_text(out, title, &shown, columns)?;
    }
    out.flush()?;
    if snapshot.owners_incomplete && owners == Owners::Find {
        log::info!("not all processes could be identified: sockets of other users' processes show '-'; run as root to see them all");
    }
    Ok(())
}

/// Whether /proc may hide other users' processes' fds: short of root,
/// listing them needs CAP_DAC_READ_SEARCH and reading them CAP_SYS_PTRACE,
/// while the kernel's iterators see them all with the capabilities that
/// load them (a service with CAP_BPF and CAP_PERFMON, say).
fn proc_hides_owners() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() != 0 }
}

/// TCP unless only -u is given; both families unless -4 or -6 is.
fn selected_protos(args: &SnapshotArgs) -> Vec<Proto> {
    let want_tcp = args.tcp || !args.udp;
    Proto::ALL
        .into_iter()
        .filter(|proto| if proto.is_tcp() { want_tcp } else { args.udp })
        .filter(|proto| !args.filters.ipv4 || !proto.is_ipv6())
        .filter(|proto| !args.filters.ipv6 || proto.is_ipv6())
        .collect()
}

/// netstat's rule: listening sockets with -l, the others by default, all with
/// -a; an explicit --state shows that state whatever -l and -a say.
fn is_shown(args: &SnapshotArgs, entry: &SnapshotEntry) -> bool {
    let socket = &entry.socket;
    let listening = if socket.proto.is_tcp() {
        socket.state == TcpState::Listen
    } else {
        socket.state == TcpState::Close
    };
    let by_state = args.all || args.filters.state.is_some() || listening == args.listening;
    let tuple = socket.tuple();
    let pid = entry.owner.as_ref().map(|owner| owner.pid);
    by_state && args.filters.matches(&tuple, pid, &[socket.state])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use crate::model::Tuple;
    use clap::Parser;

    fn args(flags: &[&str]) -> SnapshotArgs {
        let cli = Cli::try_parse_from(["netwatch", "snapshot"].iter().chain(flags)).unwrap();
        match cli.command {
            Some(Command::Snapshot(args)) => args,
            other => panic!("expected snapshot arguments, got {other:?}"),
        }
    }

    fn entry(proto: Proto, state: TcpState, port: u16) -> SnapshotEntry {
        let any = if proto.is_ipv6() {
            "[::1]"
        } else {
            "127.0.0.1"
        };
        let tuple = Tuple {
            proto,
            local: format!("{any}:{port}").parse().unwrap(),
            remote: format!("{any}:9").parse().unwrap(),
        };
        SnapshotEntry::of(&tuple, state, None)
    }

    #[test]
    fn default_shows_all_but_listening_as_netstat() {
        let listen = entry(Proto::Tcp, TcpState::Listen, 80);
        let established = entry(Proto::Tcp, TcpState::Established, 80);
        assert!(!is_shown(&args(&[]), &listen));
        assert!(is_shown(&args(&[]), &established));
        assert!(is_shown(&args(&["-l"]), &listen));
        assert!(!is_shown(&args(&["-l"]), &established));
        assert!(is_shown(&args(&["-a"]), &listen));
        assert!(is_shown(&args(&["--state", "listen"]), &listen));
        assert!(!is_shown(&args(&["--state", "listen"]), &established));
    }

    #[test]
    fn unconnected_udp_counts_as_listening() {
        let unconnected = entry(Proto::Udp, TcpState::Close, 53);
        assert!(is_shown(&args(&["-ul"]), &unconnected));
        assert!(!is_shown(&args(&["-u"]), &unconnected));
    }

    #[test]
    fn family_and_port_filters() {
        let v6 = entry(Proto::Tcp6, TcpState::Established, 443);
        assert!(is_shown(&args(&["-6"]), &v6));
        assert!(!is_shown(&args(&["-4"]), &v6));
        assert!(
            is_shown(&args(&["--port", "9"]), &v6),
            "remote port matches"
        );
        assert!(!is_shown(&args(&["--port", "80"]), &v6));
        assert!(
            !is_shown(&args(&["--pid", "1"]), &v6),
            "no owner, no pid match"
        );
    }

    #[test]
    fn protocol_selection() {
        assert_eq!(selected_protos(&args(&[])), [Proto::Tcp, Proto::Tcp6]);
        assert_eq!(selected_protos(&args(&["-u", "-4"])), [Proto::Udp]);
        assert_eq!(
            selected_protos(&args(&["-tu", "-6"])),
            [Proto::Tcp6, Proto::Udp6]
        );
    }
}
