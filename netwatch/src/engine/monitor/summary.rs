//! What a run of the monitor saw, as its last words.

/// What a run of the monitor saw: its last words, on stderr and as the
/// last record of the JSON outputs.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Summary {
    pub seconds: f64,
    /// Transitions applied: recovered ones in, duplicates out.
    pub transitions: u64,
    /// Firings of the tracepoint the kernel counted (known with the
    /// recovery program): `transitions + lost` when nothing went uncounted.
    pub fired: Option<u64>,
    /// Transitions lost, whatever the cause: the next two.
    pub lost: u64,
    /// Transitions lost to a full ring buffer.
    pub ring_buffer_full: u64,
    /// Calls the kernel skipped and the recovery program did not send.
    pub not_recovered: u64,
    /// Calls the kernel skipped, of them those recovered, and those whose
    /// recovery the full ring buffer refused (counted in `ring_buffer_full`):
    /// `skipped = recovered + recoveries_refused + not_recovered`.
    pub skipped: u64,
    pub recovered: u64,
    pub recoveries_refused: u64,
    /// Recovery events that repeated a transition the transition program
    /// handled: dropped on arrival, or refused by the full ring buffer
    /// beyond the calls the kernel skipped (no loss).
    pub duplicates: u64,
    pub resyncs: u64,
    /// Sockets in the table at the end.
    pub sockets: usize,
    /// Sockets found freed without a traced CLOSE.
    pub vanished: u64,
    /// The most bytes the ring buffer held when netwatch woke to drain it
    /// (records with their 8-byte headers), where it could see.
    pub ring_buffer_peak_bytes: Option<u64>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fired = self
            .fired
            .map_or_else(|| "?".to_owned(), |fired| fired.to_string());
        write!(
            f,
            "ran {:.1} s: {} transitions ({fired} fired in the kernel), {} lost ({} ring buffer full, {} skipped by the kernel and not recovered); {} of {} skipped calls recovered ({} refused by the full ring buffer), {} duplicates dropped; {} resyncs, {} sockets in the table, {} found freed without a traced CLOSE",
            self.seconds,
            self.transitions,
            self.lost,
            self.ring_buffer_full,
            self.not_recovered,
            self.recovered,
            self.skipped,
            self.recoveries_refused,
            self.duplicates,
            self.resyncs,
            self.sockets,
            self.vanished
        )?;
        match self.ring_buffer_peak_bytes {
            Some(bytes) => write!(
                f,
                "; the ring buffer held {} KiB at most",
                bytes.div_ceil(1024)
            ),
            None => Ok(()),
        }
    }
}
