//! Running a program as an unprivileged user with only some capabilities,
//! as a systemd unit's `User=` and `AmbientCapabilities=` run it.

use std::process::Command;

/// `setpriv`, set to run a program (the caller adds it and its arguments)
/// as `user` (a name or a uid, with its group of the same name or number,
/// and no supplementary groups) with exactly `capabilities` (setpriv's
/// names, such as `bpf`) and no_new_privs. setpriv execs the program, so
/// the child's pid is the program's.
pub fn setpriv(user: &str, capabilities: &[&str]) -> Command {
    let raised = capabilities
        .iter()
        .map(|capability| format!("+{capability}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid", user, "--regid", user, "--clear-groups"])
        .args(["--inh-caps", &raised, "--ambient-caps", &raised])
        .args([
            "--bounding-set",
            &format!("-all,{raised}"),
            "--no-new-privs",
        ]);
    command
}
