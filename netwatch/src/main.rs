use std::io::{self, BufWriter};
use std::process::ExitCode;

use clap::Parser;
use netwatch::cli::{Cli, Command};
use netwatch::{snapshot_command, watch};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Snapshot(args)) => {
            snapshot_command::run(&args, &mut BufWriter::new(io::stdout().lock()))
        }
        Some(Command::Watch(args)) => watch::run(args),
        None => watch::run(cli.watch),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `netwatch | head`: the reader is gone, which is not an error.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("netwatch: {err:#}");
            ExitCode::FAILURE
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
