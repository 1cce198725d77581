//! What a mode writes for its output: records as bytes (JSON or text
//! lines), each with its kind, so that a sink that needs the kind (syslog's
//! MSGID and severity) has it without reading the record back.

/// What a record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// The column headers of a text stream.
    Header,
    /// A transition.
    State,
    /// An owner change.
    Owner,
    /// A socket of the starting snapshot.
    Baseline,
    /// The table was read again after losses.
    Resync,
    /// Transitions or owner changes were lost.
    Lost,
    /// A routine failure netwatch went on after.
    Failure,
    /// What the run saw, at its end.
    Summary,
    /// A connection (audit).
    Conn,
    /// A listener (audit).
    Listen,
    /// One of verify's comparisons.
    Drift,
}

impl RecordKind {
    /// The kind as records name it in their `type`.
    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Header => "header",
            RecordKind::State => "state",
            RecordKind::Owner => "owner",
            RecordKind::Baseline => "baseline",
            RecordKind::Resync => "resync",
            RecordKind::Lost => "lost",
            RecordKind::Failure => "failure",
            RecordKind::Summary => "summary",
            RecordKind::Conn => "conn",
            RecordKind::Listen => "listen",
            RecordKind::Drift => "drift",
        }
    }
}

/// Records written and not yet handed to the sink: their bytes, and where
/// each ends with its kind. Cleared, not freed, after each batch.
#[derive(Debug, Default)]
pub struct Records {
    bytes: Vec<u8>,
    ends: Vec<(usize, RecordKind)>,
}

impl Records {
    /// Room for `bytes` bytes of records.
    pub fn with_capacity(bytes: usize) -> Records {
        Records {
            bytes: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(bytes / 64),
        }
    }

    /// Appends one record of `kind`: what `write` writes (a whole line, or
    /// several for one text report).
    pub fn push(&mut self, kind: RecordKind, write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.bytes.len();
        write(&mut self.bytes);
        if self.bytes.len() > start {
            self.ends.push((self.bytes.len(), kind));
        }
    }

    /// Every record's bytes, one after the other.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Each record with its kind, in order.
    pub fn each(&self) -> impl Iterator<Item = (RecordKind, &[u8])> {
        let starts = std::iter::once(0).chain(self.ends.iter().map(|&(end, _)| end));
        starts
            .zip(&self.ends)
            .map(|(start, &(end, kind))| (kind, &self.bytes[start..end]))
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Forgets every record, keeping the room.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_record_keeps_its_kind_and_an_empty_one_is_none() {
        let mut records = Records::default();
        records.push(RecordKind::Conn, |out| {
            out.extend_from_slice(b"{\"a\":1}\n")
        });
        records.push(RecordKind::Lost, |_| {});
        records.push(RecordKind::Summary, |out| out.extend_from_slice(b"x\ny\n"));
        let each: Vec<(RecordKind, &[u8])> = records.each().collect();
        assert_eq!(
            each,
            [
                (RecordKind::Conn, &b"{\"a\":1}\n"[..]),
                (RecordKind::Summary, &b"x\ny\n"[..])
            ]
        );
        assert_eq!(records.bytes(), b"{\"a\":1}\nx\ny\n");
        records.clear();
        assert!(records.is_empty() && records.each().next().is_none());
    }
}
