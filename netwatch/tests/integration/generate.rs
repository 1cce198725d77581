//! `netwatch generate DIR`, for packagers: every man page renders, and the
//! bash completion completes subcommands.

use std::process::Command;

use crate::support::run_netwatch;

#[test]
fn the_man_pages_render_and_bash_completes_a_subcommand() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let output = run_netwatch(&["generate", &dir.path().to_string_lossy()]);
    assert!(output.status.success(), "{output:?}");
    for page in [
        "netwatch",
        "netwatch-watch",
        "netwatch-snapshot",
        "netwatch-audit",
        "netwatch-verify",
    ] {
        let rendered = Command::new("man")
            .arg("-l")
            .arg(dir.path().join(format!("{page}.1")))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .output()
            .expect("man runs (cargo xtask test installs man-db)");
        let text = String::from_utf8_lossy(&rendered.stdout);
        assert!(rendered.status.success(), "{page}: {rendered:?}");
        assert!(
            text.contains("NAME") && text.contains(page),
            "{page}:\n{text}"
        );
    }
    let script = dir.path().join("netwatch.bash");
    let completed = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source '{}'; COMP_WORDS=(netwatch sn); COMP_CWORD=1; COMP_LINE='netwatch sn'; COMP_POINT=11; _netwatch netwatch sn netwatch; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display()
        ))
        .output()
        .expect("bash runs");
    assert_eq!(
        String::from_utf8_lossy(&completed.stdout).trim(),
        "snapshot"
    );
    for file in ["_netwatch", "netwatch.fish"] {
        let script = std::fs::read_to_string(dir.path().join(file)).expect("written");
        assert!(
            script.contains("snapshot"),
            "{file} completes the subcommands"
        );
    }
}
