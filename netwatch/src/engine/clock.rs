//! Wall-clock time for the kernel's CLOCK_MONOTONIC stamps
//! (bpf_ktime_get_ns), anchored to the host's wall clock again as netwatch
//! runs, so that a step of the host clock (NTP, a resumed virtual machine)
//! shows in the records that follow instead of skewing every later one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Reads the host's clocks: the wall clock, and CLOCK_MONOTONIC in ns.
pub type ClockSource = fn() -> (SystemTime, u64);

/// Converts monotonic stamps to wall-clock time, as of its last anchoring.
pub struct WallClock {
    realtime_at_zero: SystemTime,
    source: ClockSource,
}

impl WallClock {
    /// The host's clock, anchored now.
    pub fn host() -> WallClock {
        WallClock::from_source(host_clocks)
    }

    /// A clock read from `source`, anchored now.
    pub fn from_source(source: ClockSource) -> WallClock {
        let mut clock = WallClock {
            realtime_at_zero: UNIX_EPOCH,
            source,
        };
        clock.reanchor();
        clock
    }

    /// A clock whose monotonic zero stays at `realtime_at_zero`.
    #[cfg(test)]
    pub fn anchored(realtime_at_zero: SystemTime) -> WallClock {
        WallClock {
            realtime_at_zero,
            source: || (UNIX_EPOCH, 0),
        }
    }

    /// Reads the clocks again: stamps convert with the wall clock as it is
    /// now (the monitor does so after each batch of events).
    pub fn reanchor(&mut self) {
        let (now, monotonic_ns) = (self.source)();
        self.realtime_at_zero = now
            .checked_sub(Duration::from_nanos(monotonic_ns))
            .unwrap_or(UNIX_EPOCH);
    }

    /// The wall-clock time of a monotonic timestamp.
    pub fn at(&self, monotonic_ns: u64) -> SystemTime {
        self.realtime_at_zero + Duration::from_nanos(monotonic_ns)
    }
}

/// CLOCK_MONOTONIC now, in ns: the kernel's stamps' clock.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

fn host_clocks() -> (SystemTime, u64) {
    (SystemTime::now(), monotonic_ns())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A host whose wall clock a test sets (seconds since the epoch) and
    /// whose monotonic clock reads 1,000 s: per thread, as tests run side by side.
    pub(crate) mod fake {
        use super::*;

        thread_local! {
            static WALL_SECONDS: AtomicU64 = const { AtomicU64::new(1_764_000_000) };
        }

        /// Sets the fake wall clock.
        pub(crate) fn set_wall(seconds: u64) {
            WALL_SECONDS.with(|wall| wall.store(seconds, Ordering::Relaxed));
        }

        /// The fake host's clocks.
        pub(crate) fn clocks() -> (SystemTime, u64) {
            let wall = WALL_SECONDS.with(|wall| wall.load(Ordering::Relaxed));
            (UNIX_EPOCH + Duration::from_secs(wall), MONOTONIC_NOW_NS)
        }

        /// What the fake monotonic clock reads.
        pub(crate) const MONOTONIC_NOW_NS: u64 = 1_000_000_000_000;
    }

    #[test]
    fn a_step_of_the_wall_clock_shows_once_it_is_anchored_again() {
        fake::set_wall(1_764_000_000);
        let mut clock = WallClock::from_source(fake::clocks);
        let stamp = fake::MONOTONIC_NOW_NS - 2_000_000_000;
        let before = UNIX_EPOCH + Duration::from_secs(1_764_000_000 - 2);
        assert_eq!(clock.at(stamp), before);
        // NTP sets the clock an hour back.
        fake::set_wall(1_764_000_000 - 3600);
        assert_eq!(clock.at(stamp), before, "until anchored again");
        clock.reanchor();
        assert_eq!(clock.at(stamp), before - Duration::from_secs(3600));
    }

    #[test]
    fn the_host_clock_converts_a_stamp_taken_now_to_now() {
        let clock = WallClock::host();
        let converted = clock.at(monotonic_ns());
        let now = SystemTime::now();
        let apart = now
            .duration_since(converted)
            .unwrap_or_else(|err| err.duration());
        assert!(apart < Duration::from_millis(100), "{apart:?}");
    }
}
