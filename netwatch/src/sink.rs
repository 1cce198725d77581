//! Where records go: stdout, or a file opened for appending that SIGHUP
//! reopens (logrotate moves the file, then signals).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// The output of a mode; netwatch buffers records itself and writes them
/// here in batches.
pub enum Sink {
    Stdout(io::Stdout),
    File { path: PathBuf, file: File },
}

impl Sink {
    /// Standard output.
    pub fn stdout() -> Sink {
        Sink::Stdout(io::stdout())
    }

    /// `path`, created if missing and appended to.
    pub fn append_to(path: &Path) -> anyhow::Result<Sink> {
        Ok(Sink::File {
            path: path.to_owned(),
            file: open_for_append(path)?,
        })
    }

    /// Writes a batch of records, all of it or an error.
    pub fn write_all(&mut self, records: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stdout(stdout) => {
                let mut stdout = stdout.lock();
                stdout.write_all(records)?;
                stdout.flush()
            }
            Sink::File { file, .. } => file.write_all(records),
        }
    }

    /// Reopens the file by its path; stdout stays as it is.
    pub fn reopen(&mut self) -> anyhow::Result<()> {
        if let Sink::File { path, file } = self {
            *file = open_for_append(path)?;
            eprintln!("netwatch: reopened {}", path.display());
        }
        Ok(())
    }
}

fn open_for_append(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {} for appending failed", path.display()))
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
        sink.write_all(b"first\n").unwrap();
        std::fs::rename(&path, &rotated).unwrap();
        sink.write_all(b"second\n").unwrap();
        sink.reopen().unwrap();
        sink.write_all(b"third\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&rotated).unwrap(),
            "first\nsecond\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "third\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_write_error_is_returned() {
        let mut sink = Sink::File {
            path: "/dev/full".into(),
            file: open_for_append(Path::new("/dev/full")).unwrap(),
        };
        assert_eq!(
            sink.write_all(b"record\n").unwrap_err().raw_os_error(),
            Some(libc::ENOSPC)
        );
    }
}
