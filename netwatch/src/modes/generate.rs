//! `netwatch generate DIR`, for packagers: a man page for netwatch and one
//! for each subcommand (clap_mangen), and bash, zsh and fish completions
//! (clap_complete), all from the command line's own definition.

use std::path::Path;

use anyhow::Context as _;
use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::cli::{Cli, GenerateArgs};

/// Writes `netwatch.1`, `netwatch-SUBCOMMAND.1`, `netwatch.bash`,
/// `_netwatch` (zsh) and `netwatch.fish` into the directory.
pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let dir = &args.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {} failed", dir.display()))?;
    let netwatch = Cli::command();
    write_man_page(&netwatch, "netwatch", dir)?;
    for subcommand in netwatch.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        let name = format!("netwatch-{}", subcommand.get_name());
        write_man_page(&subcommand.clone().name(name.clone()), &name, dir)?;
    }
    for (shell, file) in [
        (Shell::Bash, "netwatch.bash"),
        (Shell::Zsh, "_netwatch"),
        (Shell::Fish, "netwatch.fish"),
    ] {
        let path = dir.join(file);
        let mut out = std::fs::File::create(&path)
            .with_context(|| format!("creating {} failed", path.display()))?;
        clap_complete::generate(shell, &mut Cli::command(), "netwatch", &mut out);
    }
    Ok(())
}

fn write_man_page(command: &clap::Command, name: &str, dir: &Path) -> anyhow::Result<()> {
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .render(&mut page)
        .with_context(|| format!("rendering the man page of {name} failed"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, page).with_context(|| format!("writing {} failed", path.display()))
}
