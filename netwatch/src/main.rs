use std::io::{self, BufWriter};
use std::process::ExitCode;

use clap::Parser;
use netwatch::cli::{Cli, Command};
use netwatch::{audit, generate, snapshot_command, top, verify, watch};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The only other logger would be a second call here.
    let _ = log::set_logger(&NOTICES).map(|()| log::set_max_level(log::LevelFilter::Info));
    raise_fd_limit();
    let (result, pipe_closed_is_fine) = match cli.command {
        Some(Command::Snapshot(args)) => (
            snapshot_command::run(&args, &mut BufWriter::new(io::stdout().lock())),
            true,
        ),
        Some(Command::Watch(args)) => (watch::run(args), true),
        Some(Command::Top(args)) => (top::run(args), true),
        None => (watch::run(cli.watch), true),
        // An auditor's reader going away loses records: that is an error.
        Some(Command::Audit(args)) => (audit::run(args), false),
        Some(Command::Generate(args)) => (generate::run(&args), false),
        Some(Command::Verify(args)) => match verify::run(args) {
            Ok(true) => (Ok(()), false),
            Ok(false) => return ExitCode::FAILURE,
            Err(err) => (Err(err), false),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `netwatch | head`: the reader is gone, which is not an error.
        Err(err) if pipe_closed_is_fine && is_broken_pipe(&err) => ExitCode::SUCCESS,
        // verify that compared nothing neither passed nor found drift.
        Err(err) if err.downcast_ref::<verify::NothingCompared>().is_some() => {
            eprintln!("netwatch: {err:#}");
            ExitCode::from(2)
        }
        Err(err) => {
            eprintln!("netwatch: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the library reports as it goes (warnings, and notices such as
/// "watching" and the summary), one line each on stderr. Other crates'
/// records are left out: they are not meant for netwatch's users.
struct Notices;

static NOTICES: Notices = Notices;

impl log::Log for Notices {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info && metadata.target().starts_with("netwatch")
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        match record.level() {
            log::Level::Error | log::Level::Warn => {
                eprintln!("netwatch: warning: {}", record.args())
            }
            _ => eprintln!("netwatch: {}", record.args()),
        }
    }

    fn flush(&self) {}
}

/// Raises the soft limit on open files to the hard one: systemd's default
/// soft limit (1024) is soon reached by the /proc walk, the metrics
/// server's clients and the output files together.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one valid rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}
