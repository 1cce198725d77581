//! Where records go: stdout, or a file opened for appending that SIGHUP
//! reopens (logrotate moves the file, then signals); and with `--syslog`,
//! also to a syslog receiver.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt as _, FileTypeExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

mod records;
mod syslog;

pub use records::{RecordKind, Records};
pub use syslog::{Syslog, SyslogTarget};

/// The output of a mode; netwatch buffers records itself and writes them
/// here in batches.
pub struct Sink {
    destination: Destination,
    syslog: Option<Syslog>,
}

/// Where a sink writes its records.
enum Destination {
    Stdout(io::Stdout),
    /// Nowhere: a mode that shows what it sees rather than writing records.
    Discard,
    File {
        path: PathBuf,
        file: File,
    },
}

impl Sink {
    /// Standard output.
    pub fn stdout() -> Sink {
        Destination::Stdout(io::stdout()).into()
    }

    /// Nowhere (`top` draws what it sees instead).
    pub fn discard() -> Sink {
        Destination::Discard.into()
    }

    /// This sink, and each record also to `syslog`.
    pub fn and_syslog(self, syslog: Syslog) -> Sink {
        Sink {
            syslog: Some(syslog),
            ..self
        }
    }

    /// `path`, created if missing and appended to: a regular file, or a
    /// FIFO that has a reader. A file that ends in a cut record (a write
    /// error ended an earlier run) gets a newline first, so that every
    /// line stays one JSON record.
    pub fn append_to(path: &Path) -> anyhow::Result<Sink> {
        let file = open_for_append(path)?;
        end_a_cut_line(path, &file)?;
        Ok(Destination::File {
            path: path.to_owned(),
            file,
        }
        .into())
    }

    /// Writes a batch of records, all of it or an error, and queues each
    /// for syslog, which never waits.
    pub fn write_all(&mut self, records: &Records) -> io::Result<()> {
        if let Some(syslog) = &mut self.syslog {
            syslog.send(records);
        }
        self.write_bytes(records.bytes())
    }

    fn write_bytes(&mut self, records: &[u8]) -> io::Result<()> {
        match &mut self.destination {
            Destination::Stdout(stdout) => {
                let mut stdout = stdout.lock();
                stdout.write_all(records)?;
                stdout.flush()
            }
            Destination::Discard => Ok(()),
            Destination::File { file, path } => file.write_all(records).map_err(|err| {
                io::Error::new(
                    err.kind(),
                    format!(
                        "writing to {} failed ({err}): free space where it is or give --output another file, then start audit again",
                        path.display()
                    ),
                )
            }),
        }
    }

    /// Reopens the file by its path; stdout stays as it is.
    pub fn reopen(&mut self) -> anyhow::Result<()> {
        if let Destination::File { path, file } = &mut self.destination {
            *file = open_for_append(path)?;
            log::info!("reopened {}", path.display());
        }
        Ok(())
    }
}

impl From<Destination> for Sink {
    fn from(destination: Destination) -> Sink {
        Sink {
            destination,
            syslog: None,
        }
    }
}

/// Mode of an output file netwatch creates: it holds the host's
/// connections, so only its owner reads it (a stricter umask still applies).
const OUTPUT_MODE: u32 = 0o600;

/// Opens `path` for appending without blocking (a FIFO without a reader
/// would block open() forever), and refuses what is neither a regular file
/// nor a FIFO. A file it creates is `OUTPUT_MODE`. As root it follows no
/// symbolic link: in a directory others can write to, a link planted at
/// `path` would have root append records to any file.
fn open_for_append(path: &Path) -> anyhow::Result<File> {
    // SAFETY: geteuid has no preconditions.
    let as_root = unsafe { libc::geteuid() } == 0;
    let no_follow = if as_root { libc::O_NOFOLLOW } else { 0 };
    let file = match OpenOptions::new()
        .create(true)
        .append(true)
        .mode(OUTPUT_MODE)
        .custom_flags(libc::O_NONBLOCK | no_follow)
        .open(path)
    {
        Ok(file) => file,
        Err(err) if err.raw_os_error() == Some(libc::ENXIO) => bail!(
            "{} is a FIFO with no reader: start its reader first, or give --output a file",
            path.display()
        ),
        Err(err) if as_root && err.raw_os_error() == Some(libc::ELOOP) => bail!(
            "{} is a symbolic link, which netwatch does not follow as root (a link planted there could send the records to any file): give --output the path it points to",
            path.display()
        ),
        Err(err) => {
            return Err(err)
                .with_context(|| format!("opening {} for appending failed", path.display()))
        }
    };
    let kind = file
        .metadata()
        .with_context(|| format!("reading what {} is failed", path.display()))?
        .file_type();
    if !kind.is_file() && !kind.is_fifo() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        bail!(
            "{} is {what}: give --output a regular file (or a FIFO with a reader)",
            path.display()
        );
    }
    // Writes block again, as records must not be dropped.
    set_blocking(&file).with_context(|| format!("opening {} failed", path.display()))?;
    Ok(file)
}

fn set_blocking(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on an fd this function borrows; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes a newline if the regular file `file` does not end with one.
fn end_a_cut_line(path: &Path, file: &File) -> anyhow::Result<()> {
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    // `file` is open for writing only (read-write would make a FIFO its own reader).
    File::open(path)
        .and_then(|reader| reader.read_at(&mut last, meta.len() - 1))
        .with_context(|| format!("reading the end of {} failed", path.display()))?;
    if last[0] != b'\n' {
        log::warn!(
            "{} ended in a cut record (an earlier write failed); a newline ends it, so that every line stays one JSON record",
            path.display()
        );
        (&*file)
            .write_all(b"\n")
            .with_context(|| format!("writing to {} failed", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_follows_the_path_after_a_rotation() {
        let dir = std::env::temp_dir().join(format!("netwatch-sink-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, rotated) = (dir.join("audit.log"), dir.join("audit.log.1"));
        let mut sink = Sink::append_to(&path).unwrap();
        sink.write_bytes(b"first\n").unwrap();
        std::fs::rename(&path, &rotated).unwrap();
        sink.write_bytes(b"second\n").unwrap();
        sink.reopen().unwrap();
        sink.write_bytes(b"third\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&rotated).unwrap(),
            "first\nsecond\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "third\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("netwatch-sink-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_write_error_names_the_file_and_keeps_its_kind() {
        let mut sink = Sink::from(Destination::File {
            path: "/dev/full".into(),
            file: OpenOptions::new().append(true).open("/dev/full").unwrap(),
        });
        let err = sink.write_bytes(b"record\n").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        assert!(
            err.to_string().contains("writing to /dev/full failed"),
            "{err}"
        );
    }

    #[test]
    fn a_cut_record_is_ended_before_the_next() {
        let dir = scratch("cut");
        let path = dir.join("audit.log");
        std::fs::write(&path, "{\"a\":1}\n{\"cut").unwrap();
        let mut sink = Sink::append_to(&path).unwrap();
        sink.write_bytes(b"{\"b\":2}\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"cut\n{\"b\":2}\n"
        );
        // A file that ends well is left as it is.
        drop(Sink::append_to(&path).unwrap());
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("2}\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_created_output_is_for_its_owner_only_and_root_follows_no_link() {
        let dir = scratch("mode");
        let path = dir.join("audit.log");
        drop(Sink::append_to(&path).unwrap());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o077, 0, "not readable by others: {mode:o}");
        let link = dir.join("link.log");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        if crate::root_tests::runs_as_root("root follows no link") {
            let err = Sink::append_to(&link).err().expect("refused as root");
            assert!(err.to_string().contains("is a symbolic link"), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_fifo_without_reader_or_a_device_is_refused_at_once() {
        let dir = scratch("fifo");
        let fifo = dir.join("fifo");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let err = Sink::append_to(&fifo).err().expect("refused, not blocked");
        assert!(err.to_string().contains("FIFO with no reader"), "{err}");
        let err = Sink::append_to(Path::new("/dev/null"))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("is a device"), "{err}");
        let err = Sink::append_to(&dir).err().expect("refused");
        assert!(format!("{err:#}").contains("directory"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
