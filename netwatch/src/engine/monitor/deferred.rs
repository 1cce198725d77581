//! Observer calls held back while an image they show is being read (see
//! `engine::images`): they go out in the order they came, each once what
//! its owners run has arrived, or after a wait, with it unknown.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::Notice;
use crate::engine::table::Observed;
use crate::model::{OwnerChange, Transition};

/// How long a call waits at most for an image: a read stuck on a process
/// (its memory locked) delays the records this long, then they say the
/// image is unknown.
pub const IMAGE_WAIT: Duration = Duration::from_secs(1);
/// Calls held back at most; past this, the oldest goes out without waiting.
const HELD_LIMIT: usize = 65536;

/// An observer call, as the monitor makes it.
// Boxing the large variant would allocate for every transition.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Call {
    Transition(Transition, Observed),
    /// A socket's owner changed, at monotonic time `ts_ns`.
    OwnerChanged(u64, OwnerChange),
    Notice(Notice),
}

impl Call {
    /// Whether an image this call shows is still being read.
    fn waits_for_image(&self) -> bool {
        match self {
            Call::Transition(_, seen) => seen.waits_for_image(),
            Call::OwnerChanged(_, change) => {
                change.new.image_on_its_way()
                    || change
                        .old
                        .as_ref()
                        .is_some_and(|old| old.image_on_its_way())
            }
            Call::Notice(_) => false,
        }
    }
}

/// The calls held back, oldest first.
#[derive(Debug)]
pub struct Deferred {
    held: VecDeque<(Instant, Call)>,
    wait: Duration,
}

impl Deferred {
    /// No call held, each to wait at most `wait` once held.
    pub fn new(wait: Duration) -> Deferred {
        Deferred {
            held: VecDeque::new(),
            wait,
        }
    }

    /// `call` if it can go out now: nothing is held before it and it
    /// waits for no image; else it is held.
    pub fn pass(&mut self, call: Call) -> Option<Call> {
        if !self.holds() && !call.waits_for_image() {
            return Some(call);
        }
        self.hold(call);
        None
    }

    /// Holds `call` back, after those held.
    pub fn hold(&mut self, call: Call) {
        self.held.push_back((Instant::now(), call));
    }

    /// The oldest call held, if it can go out at `now`: its images have
    /// arrived, or it has waited long enough, or too many are held.
    pub fn next_due(&mut self, now: Instant) -> Option<Call> {
        let (since, call) = self.held.front()?;
        let due = !call.waits_for_image()
            || now.saturating_duration_since(*since) >= self.wait
            || self.held.len() > HELD_LIMIT;
        due.then(|| self.held.pop_front().map(|(_, call)| call))?
    }

    /// Whether a call is held.
    pub fn holds(&self) -> bool {
        !self.held.is_empty()
    }

    /// The oldest call held, whatever it waits for.
    pub fn next(&mut self) -> Option<Call> {
        self.held.pop_front().map(|(_, call)| call)
    }

    /// How long a call waits at most.
    pub fn wait(&self) -> Duration {
        self.wait
    }
}
