//! The words for a socket's owner: the process, what it runs (command
//! line, executable) and the cgroup it runs in.

use serde::Serialize;
use std::fmt::{self, Write as _};
use std::sync::{Arc, OnceLock};

/// The process that owns a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    /// The process name (`/proc/PID/comm`, as ss and tcpstates show it).
    pub program: Arc<str>,
    /// Its command line and executable, where they were asked for.
    pub image: Option<Arc<ImageSlot>>,
}

impl Owner {
    /// An owner known by pid and name only.
    pub fn new(pid: u32, program: Arc<str>) -> Owner {
        Owner {
            pid,
            program,
            image: None,
        }
    }

    /// What it runs, once read.
    pub fn image(&self) -> Option<&ProcessImage> {
        self.image.as_deref()?.get()
    }

    /// Its cgroup, where it was read.
    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.image()?.cgroup.as_deref()
    }

    /// Whether what it runs was asked for and is still being read.
    pub fn image_on_its_way(&self) -> bool {
        self.image
            .as_deref()
            .is_some_and(|slot| slot.get().is_none())
    }
}

/// Where what a process runs arrives, shared by the records of its
/// owners: read off the event thread, it may still be on its way (empty),
/// and is filled once.
#[derive(Debug, Default)]
pub struct ImageSlot(OnceLock<ProcessImage>);

impl ImageSlot {
    /// A slot holding `image` already.
    pub fn filled(image: ProcessImage) -> Arc<ImageSlot> {
        Arc::new(ImageSlot(OnceLock::from(image)))
    }

    /// What the process runs, once read.
    pub fn get(&self) -> Option<&ProcessImage> {
        self.0.get()
    }

    /// Puts what the process runs in the slot (the first time only).
    pub fn fill(&self, image: ProcessImage) {
        let _ = self.0.set(image);
    }
}

impl PartialEq for ImageSlot {
    fn eq(&self, other: &ImageSlot) -> bool {
        self.get() == other.get()
    }
}

impl Eq for ImageSlot {}

/// What a process runs, as /proc shows it when netwatch reads it: its
/// command line and its executable. Each is `None` where it could not be
/// read (the process was gone, or was not the one meant).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessImage {
    pub cmdline: Option<Arc<CommandLine>>,
    /// Its cgroup (v2): from the kernel's id where the kernel gave one,
    /// else from /proc/PID/cgroup.
    pub cgroup: Option<Arc<Cgroup>>,
    /// The target of /proc/PID/exe (" (deleted)" appended when the file is gone).
    pub exe: Option<Arc<str>>,
}

/// A cgroup (v2) and what its path says: the systemd unit and the
/// container it stands for, where it stands for one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    /// Its path under the cgroup2 mount ("/system.slice/nginx.service").
    pub path: Arc<str>,
    /// The outermost systemd service or scope on the path, with what
    /// follows it ("nginx.service", "user@1000.service/app.slice/x.service").
    pub unit: Option<Arc<str>>,
    /// A Docker, containerd, CRI-O or Podman container's 64-hex id.
    pub container: Option<Arc<str>>,
}

impl Cgroup {
    /// What `path` names.
    pub fn from_path(path: &str) -> Cgroup {
        let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        let unit = components
            .iter()
            .position(|c| c.ends_with(".service") || c.ends_with(".scope"))
            .map(|first| Arc::from(components[first..].join("/")));
        let container = components.iter().rev().find_map(|c| container_id(c));
        Cgroup {
            path: Arc::from(path),
            unit,
            container: container.map(Arc::from),
        }
    }
}

/// The container id in one cgroup path component: 64 hex digits, alone
/// (`/docker/ID`, cgroupfs drivers) or in a systemd scope named by the
/// runtime (`docker-ID.scope`, `cri-containerd-ID.scope`,
/// `crio-ID.scope`, `libpod-ID.scope`).
fn container_id(component: &str) -> Option<&str> {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    let id = ["docker-", "cri-containerd-", "crio-", "libpod-"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .unwrap_or(name);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// A command line as the kernel holds it (/proc/PID/cmdline): the
/// arguments, each ended by a NUL, empty ones included. A process that
/// rewrote its arguments (nginx, postgres) shows what it wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandLine(pub Vec<Vec<u8>>);

impl CommandLine {
    /// Splits the bytes of /proc/PID/cmdline: each NUL ends an argument.
    /// Bytes after the last NUL (a process that overwrote it) are one more.
    pub fn from_proc(bytes: &[u8]) -> CommandLine {
        if bytes.is_empty() {
            return CommandLine(Vec::new());
        }
        let body = bytes.strip_suffix(&[0]).unwrap_or(bytes);
        CommandLine(body.split(|&b| b == 0).map(<[u8]>::to_vec).collect())
    }

    /// Each argument as text: UTF-8 as it is, any other byte as `\xNN`
    /// (as Python's `backslashreplace` writes it).
    pub fn texts(&self) -> impl Iterator<Item = std::borrow::Cow<'_, str>> {
        self.0.iter().map(|arg| escape_non_utf8(arg))
    }
}

/// Bytes as text: valid UTF-8 runs as they are, other bytes as `\xNN`.
pub fn escape_non_utf8(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    if let Ok(text) = std::str::from_utf8(bytes) {
        return text.into();
    }
    let mut text = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        text.push_str(chunk.valid());
        for byte in chunk.invalid() {
            // Writing to a String cannot fail.
            let _ = write!(text, "\\x{byte:02x}");
        }
    }
    text.into()
}

impl Serialize for CommandLine {
    /// A JSON array of strings, one per argument (see [`CommandLine::texts`]).
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.texts())
    }
}

impl fmt::Display for CommandLine {
    /// The arguments joined by spaces, each quoted as a POSIX shell would
    /// need it (an empty one as `''`), so that the line reads back exactly.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, arg) in self.texts().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            match shlex::try_quote(&arg) {
                Ok(quoted) => f.write_str(&quoted)?,
                // A NUL cannot be in an argument; shown as it is otherwise.
                Err(_) => f.write_str(&arg)?,
            }
        }
        Ok(())
    }
}
