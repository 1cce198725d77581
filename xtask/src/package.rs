//! The Debian package. `cargo xtask dist` builds it with cargo-deb from
//! `[package.metadata.deb]` in netwatch/Cargo.toml; `cargo xtask test` has
//! lintian check it, installs it with dpkg, runs what it installed as the
//! service's user with the unit's capabilities, and purges it again.

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Read as _};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};

use xtask::least_privilege::setpriv;

use crate::command::{cargo, run};

const PACKAGE: &str = "netwatch";
/// Where `netwatch generate` writes the man pages and completions the
/// package takes (see the assets in netwatch/Cargo.toml).
const GENERATED: &str = "dist/generated";
const UNIT: &str = "/usr/lib/systemd/system/netwatch-audit.service";
const LOG_DIR: &str = "/var/log/netwatch";
/// How long a netwatch process may take to say it is watching.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Builds the package from the release binary `netwatch` and returns its path.
pub fn build(root: &Path, netwatch: &Path) -> anyhow::Result<PathBuf> {
    let generated = root.join(GENERATED);
    if generated.exists() {
        std::fs::remove_dir_all(&generated)?;
    }
    run(Command::new(netwatch).arg("generate").arg(&generated))?;
    let out_dir = netwatch
        .parent()
        .and_then(Path::parent)
        .context("the release binary has no target directory")?
        .join("debian");
    let built = cargo()
        .current_dir(root)
        .args(["deb", "-p", PACKAGE, "--no-build", "--output"])
        .arg(&out_dir)
        .stderr(Stdio::inherit())
        .output()
        .context("cargo deb does not run (cargo xtask dist installs cargo-deb)")?;
    ensure!(built.status.success(), "cargo deb failed: {}", built.status);
    let said = String::from_utf8_lossy(&built.stdout);
    let deb = said
        .lines()
        .rev()
        .find(|line| line.trim_end().ends_with(".deb"))
        .with_context(|| format!("cargo deb named no package:\n{said}"))?;
    Ok(PathBuf::from(deb.trim()))
}

/// lintian, then install, use and purge: see the module doc.
pub fn check(deb: &Path) -> anyhow::Result<()> {
    lint(deb)?;
    if installed_version().is_some() {
        bail!("a {PACKAGE} package is installed: purge it (dpkg --purge {PACKAGE}) before `cargo xtask test`, which installs its own and purges it");
    }
    let user_existed = user_exists();
    let before = Tree::read()?;
    let package = Installed::install(deb)?;
    let files = package.files()?;
    check_layout(user_existed)?;
    let (snapshot, stream, records) = run_as_service_user()?;
    check_man_pages(&files)?;
    check_bash_completion()?;
    package.purge()?;
    check_leftovers(&before, &Tree::read()?, user_existed)?;
    println!(
        "xtask: {} installed, ran as the service's user ({snapshot} snapshot lines, {stream} stream and {records} audit lines on its test connection), purged; left: {LOG_DIR}",
        deb.display()
    );
    Ok(())
}

/// lintian: no error. Its warnings are printed; README lists the deliberate ones.
fn lint(deb: &Path) -> anyhow::Result<()> {
    let lintian = Command::new("lintian")
        .arg(deb)
        .output()
        .context("lintian does not run (cargo xtask test installs it)")?;
    let said = String::from_utf8_lossy(&lintian.stdout);
    let errors: Vec<&str> = said.lines().filter(|line| line.starts_with("E:")).collect();
    ensure!(errors.is_empty(), "lintian finds errors:\n{said}");
    for line in said.lines() {
        println!("xtask: lintian: {line}");
    }
    Ok(())
}

fn installed_version() -> Option<String> {
    let query = Command::new("dpkg-query")
        .args(["-W", "-f=${Status} ${Version}", PACKAGE])
        .output()
        .ok()?;
    let said = String::from_utf8_lossy(&query.stdout).into_owned();
    let version = said.strip_prefix("install ok installed ")?;
    Some(version.to_owned())
}

/// Whether the service's user (named as the package) exists.
pub(crate) fn user_exists() -> bool {
    Command::new("getent")
        .args(["passwd", PACKAGE])
        .output()
        .is_ok_and(|out| out.status.success())
}

/// The installed package, purged when dropped (a failed check leaves nothing).
struct Installed {
    purged: bool,
}

impl Installed {
    fn install(deb: &Path) -> anyhow::Result<Self> {
        let package = Self { purged: false };
        run(Command::new("dpkg").arg("--install").arg(deb))?;
        ensure!(
            installed_version().is_some(),
            "dpkg says {} installed, but {PACKAGE} is not",
            deb.display()
        );
        Ok(package)
    }

    /// The regular files the package installed.
    fn files(&self) -> anyhow::Result<Vec<PathBuf>> {
        let listed = Command::new("dpkg").args(["-L", PACKAGE]).output()?;
        ensure!(listed.status.success(), "dpkg -L {PACKAGE} failed");
        Ok(String::from_utf8_lossy(&listed.stdout)
            .lines()
            .map(PathBuf::from)
            .filter(|path| path.is_file())
            .collect())
    }

    fn purge(mut self) -> anyhow::Result<()> {
        self.purged = true;
        run(Command::new("dpkg").args(["--purge", PACKAGE]))
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if !self.purged {
            let _ = Command::new("dpkg").args(["--purge", PACKAGE]).status();
        }
    }
}

/// The user, the log directory, the unit (valid, and not enabled), and the
/// binary's version.
fn check_layout(user_existed: bool) -> anyhow::Result<()> {
    let passwd = Command::new("getent").args(["passwd", PACKAGE]).output()?;
    let entry = String::from_utf8_lossy(&passwd.stdout);
    let fields: Vec<&str> = entry.trim().split(':').collect();
    ensure!(fields.len() == 7, "postinst made no user {PACKAGE}");
    let uid: u32 = fields[2].parse()?;
    if !user_existed {
        ensure!(
            uid < 1000 && fields[5] == "/nonexistent" && fields[6].ends_with("nologin"),
            "postinst's {PACKAGE} user is not a system user without home or shell: {entry}"
        );
    }
    let log_dir =
        std::fs::metadata(LOG_DIR).with_context(|| format!("postinst made no {LOG_DIR}"))?;
    ensure!(
        log_dir.is_dir() && log_dir.uid() == uid && log_dir.mode() & 0o007 == 0,
        "{LOG_DIR} is not the service user's, closed to others"
    );
    let wants = Path::new("/etc/systemd/system/multi-user.target.wants/netwatch-audit.service");
    ensure!(
        !wants.exists() && !wants.is_symlink(),
        "installing the package enabled the unit"
    );
    // With its man page installed, verify also checks Documentation=.
    let verified = Command::new("systemd-analyze")
        .args(["verify", UNIT])
        .output()?;
    let said = String::from_utf8_lossy(&verified.stderr);
    ensure!(
        verified.status.success() && said.trim().is_empty(),
        "systemd-analyze verify finds fault with the installed unit:\n{said}"
    );
    let version = Command::new("/usr/bin/netwatch")
        .arg("--version")
        .output()?;
    let version = String::from_utf8_lossy(&version.stdout);
    ensure!(
        version.starts_with("netwatch ") && version.contains("(commit "),
        "netwatch --version: {version}"
    );
    Ok(())
}

/// What the unit runs as: `User=`, the ambient capabilities, `ExecStart=`.
struct ServiceLine {
    user: String,
    capabilities: Vec<String>,
    exec_start: Vec<String>,
}

impl ServiceLine {
    fn read() -> anyhow::Result<Self> {
        let unit = std::fs::read_to_string(UNIT)?;
        let value = |key: &str| {
            unit.lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
                .map(str::trim)
                .with_context(|| format!("{UNIT} has no {key}="))
        };
        Ok(Self {
            user: value("User")?.to_owned(),
            capabilities: value("AmbientCapabilities")?
                .split_whitespace()
                .map(|cap| cap.trim_start_matches("CAP_").to_lowercase())
                .collect(),
            exec_start: value("ExecStart")?
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
        })
    }

    /// `program args` through setpriv as the unit would start it: its user
    /// and group, its capabilities only, no_new_privs.
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let capabilities: Vec<&str> = self.capabilities.iter().map(String::as_str).collect();
        let mut command = setpriv(&self.user, &capabilities);
        command.arg(program).args(args).stdin(Stdio::null());
        command
    }
}

/// As the service's user with the unit's capabilities: `snapshot -tanp`
/// lists this process's listener, and the stream (`--json`) and the unit's
/// own `ExecStart=` (audit into /var/log/netwatch) both report one
/// connection to it with this process as owner. Returns the line counts.
fn run_as_service_user() -> anyhow::Result<(usize, usize, usize)> {
    let service = ServiceLine::read()?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let pid = std::process::id();

    let snapshot = service
        .command("/usr/bin/netwatch", &["snapshot", "-tanp"])
        .output()?;
    let text = String::from_utf8_lossy(&snapshot.stdout);
    ensure!(
        snapshot.status.success(),
        "netwatch snapshot -tanp as {}: {}",
        service.user,
        String::from_utf8_lossy(&snapshot.stderr)
    );
    let listed = text.lines().any(|line| {
        line.contains(&format!("127.0.0.1:{port} "))
            && line.contains("LISTEN")
            && line.contains(&format!(" {pid}/"))
    });
    ensure!(
        listed,
        "snapshot -tanp does not show pid {pid} listening on {port}:\n{text}"
    );

    let Some((program, args)) = service.exec_start.split_first() else {
        bail!("{UNIT} has an empty ExecStart=");
    };
    let audit_output = args
        .windows(2)
        .find(|pair| pair[0] == "--output")
        .map(|pair| PathBuf::from(&pair[1]))
        .context("the unit's audit writes no --output file")?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let stream = Watching::start(service.command("/usr/bin/netwatch", &["--json"]))?;
    let audit = Watching::start(service.command(program, &args))?;
    let client = TcpStream::connect(("127.0.0.1", port))?;
    let (served, _) = listener.accept()?;
    drop(client);
    drop(served);
    std::thread::sleep(Duration::from_secs(1));
    let stream = stream.stop()?;
    audit.stop()?;

    let on_port = |line: &&str| {
        line.contains(&format!("\"local_port\":{port},"))
            && line.contains(&format!("\"pid\":{pid},"))
    };
    let seen = stream.lines().filter(on_port).count();
    ensure!(
        seen > 0,
        "the stream shows no transition of port {port} by pid {pid}:\n{stream}"
    );
    let metadata = std::fs::metadata(&audit_output)
        .with_context(|| format!("audit wrote no {}", audit_output.display()))?;
    ensure!(
        metadata.mode() & 0o077 == 0,
        "{} is readable by others: mode {:o}",
        audit_output.display(),
        metadata.mode() & 0o777
    );
    let records = std::fs::read_to_string(&audit_output)?;
    let recorded = records.lines().filter(on_port).count();
    ensure!(
        recorded > 0,
        "audit recorded nothing on port {port} by pid {pid}:\n{records}"
    );
    Ok((text.lines().count(), seen, recorded))
}

/// A netwatch process that has said it is watching.
struct Watching {
    child: Child,
}

impl Watching {
    fn start(mut command: Command) -> anyhow::Result<Self> {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("could not start {command:?}"))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (said, heard) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let watching = line.contains("watching TCP state transitions");
                let _ = said.send((line, watching));
            }
        });
        let mut lines = Vec::new();
        loop {
            match heard.recv_timeout(START_TIMEOUT) {
                Ok((_, true)) => return Ok(Self { child }),
                Ok((line, false)) => lines.push(line),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("{command:?} did not start watching:\n{}", lines.join("\n"));
                }
            }
        }
    }

    /// Stops it as Ctrl-C would, and returns what it printed on stdout.
    fn stop(mut self) -> anyhow::Result<String> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: signals the child this process started and has not reaped.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            stdout.read_to_string(&mut out)?;
        }
        let status = self.child.wait()?;
        ensure!(status.success(), "netwatch exited with {status} on SIGINT");
        Ok(out)
    }
}

/// The man pages the package installs: netwatch's and one per subcommand.
const MAN_PAGES: [&str; 6] = [
    "netwatch-audit.1.gz",
    "netwatch-snapshot.1.gz",
    "netwatch-top.1.gz",
    "netwatch-verify.1.gz",
    "netwatch-watch.1.gz",
    "netwatch.1.gz",
];

/// Every installed man page renders.
fn check_man_pages(files: &[PathBuf]) -> anyhow::Result<()> {
    let pages: Vec<&PathBuf> = files
        .iter()
        .filter(|file| file.starts_with("/usr/share/man/man1"))
        .collect();
    let mut names: Vec<String> = pages
        .iter()
        .filter_map(|page| Some(page.file_name()?.to_string_lossy().into_owned()))
        .collect();
    names.sort();
    ensure!(
        names == MAN_PAGES,
        "expected the man pages {MAN_PAGES:?}, got {pages:?}"
    );
    for page in pages {
        let rendered = Command::new("man")
            .arg("-l")
            .arg(page)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .output()?;
        let text = String::from_utf8_lossy(&rendered.stdout);
        ensure!(
            rendered.status.success() && text.contains("NAME") && text.contains("netwatch"),
            "man -l {} does not render: {}",
            page.display(),
            String::from_utf8_lossy(&rendered.stderr)
        );
    }
    Ok(())
}

/// bash, through the completion the package installed where
/// bash-completion looks, completes `netwatch sn` to `snapshot`.
fn check_bash_completion() -> anyhow::Result<()> {
    let completed = Command::new("bash")
        .arg("-c")
        .arg(concat!(
            "source /usr/share/bash-completion/completions/netwatch; ",
            "function=$(complete -p netwatch | sed -n 's/.*-F \\([^ ]*\\) .*/\\1/p'); ",
            "COMP_WORDS=(netwatch sn); COMP_CWORD=1; COMP_LINE='netwatch sn'; COMP_POINT=11; ",
            "$function netwatch sn netwatch; printf '%s\\n' \"${COMPREPLY[@]}\""
        ))
        .output()?;
    let said = String::from_utf8_lossy(&completed.stdout);
    ensure!(
        said.trim() == "snapshot",
        "bash completes `netwatch sn` to {said:?}: {}",
        String::from_utf8_lossy(&completed.stderr)
    );
    Ok(())
}

/// The paths under the directories a package can touch, to compare before
/// and after: what the install added and the purge did not take away.
struct Tree(BTreeSet<PathBuf>);

/// Where the package, its maintainer scripts and dpkg write.
const TREE_ROOTS: &[&str] = &[
    "/usr",
    "/etc",
    "/var/lib/systemd",
    "/var/lib/dpkg/info",
    "/var/log",
];

impl Tree {
    fn read() -> anyhow::Result<Self> {
        let mut paths = BTreeSet::new();
        let mut pending: Vec<PathBuf> = TREE_ROOTS.iter().map(PathBuf::from).collect();
        while let Some(dir) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                    pending.push(path.clone());
                }
                paths.insert(path);
            }
        }
        Ok(Self(paths))
    }
}

/// After the purge, nothing the package added is left but the log
/// directory (the records are the operator's) and, when the package made
/// it, the user (files outlive a uid; Debian leaves system users).
fn check_leftovers(before: &Tree, after: &Tree, user_existed: bool) -> anyhow::Result<()> {
    let user_files = [
        "/etc/passwd-",
        "/etc/group-",
        "/etc/shadow-",
        "/etc/gshadow-",
    ];
    let left: Vec<&PathBuf> = after
        .0
        .difference(&before.0)
        .filter(|path| !path.starts_with(LOG_DIR))
        .filter(|path| {
            user_existed
                || !user_files
                    .iter()
                    .any(|file| path.as_path() == Path::new(file))
        })
        .collect();
    ensure!(left.is_empty(), "purging {PACKAGE} left {left:?}");
    Ok(())
}
