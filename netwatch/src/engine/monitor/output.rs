//! The mode's output as the monitor writes it: a buffer, written after each
//! batch, and reopened (SIGHUP) with a backoff when that fails.

use std::io;
use std::time::Duration;

use crate::sink::{Records, Sink};

/// A failed reopen of the output is tried again after this long, doubling
/// up to `REOPEN_RETRY_MAX`.
const REOPEN_RETRY_FIRST: Duration = Duration::from_secs(1);
const REOPEN_RETRY_MAX: Duration = Duration::from_secs(60);
/// Output is written whenever this much is buffered, and after each batch.
const FLUSH_AT: usize = 64 * 1024;
/// The mode's output: records are buffered, and written after each batch
/// of events or once `FLUSH_AT` is buffered.
pub(super) struct Output {
    sink: Sink,
    pub(super) buffer: Records,
    /// The first error writing the output, raised after the batch.
    write_error: Option<io::Error>,
    /// While a reopen of the output keeps failing: the wait before the next try.
    pub(super) reopen_backoff: Option<Duration>,
}

impl Output {
    pub(super) fn new(sink: Sink) -> Output {
        Output {
            sink,
            buffer: Records::with_capacity(1 << 16),
            write_error: None,
            reopen_backoff: None,
        }
    }

    /// Writes the buffer once it holds `FLUSH_AT`; an error waits for the end of the batch.
    pub(super) fn flush_when_full(&mut self) {
        if self.buffer.len() >= FLUSH_AT && self.write_error.is_none() {
            self.write_error = self.flush().err();
        }
    }

    /// Writes what is buffered.
    pub(super) fn flush(&mut self) -> io::Result<()> {
        if let Some(err) = self.write_error.take() {
            return Err(err);
        }
        if !self.buffer.is_empty() {
            self.sink.write_all(&self.buffer)?;
            self.buffer.clear();
        }
        Ok(())
    }

    /// Reopens the file; on failure, the wait before the next try
    /// (`REOPEN_RETRY_FIRST`, doubling up to `REOPEN_RETRY_MAX`).
    pub(super) fn reopen(&mut self) -> Result<(), (anyhow::Error, Duration)> {
        match self.sink.reopen() {
            Ok(()) => {
                self.reopen_backoff = None;
                Ok(())
            }
            Err(err) => {
                let wait = self
                    .reopen_backoff
                    .map_or(REOPEN_RETRY_FIRST, |wait| (wait * 2).min(REOPEN_RETRY_MAX));
                self.reopen_backoff = Some(wait);
                Err((err, wait))
            }
        }
    }
}
