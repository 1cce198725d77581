//! How full the ring buffer gets: the most it held at once, as the reader
//! found it each time it woke to drain it. That is what sizes the ring
//! (`--ring-buffer-kib`): a ring that never holds more than a fraction
//! of its size under a burst is larger than it needs to be, and every
//! byte of it is resident twice (its pages are mapped twice, for
//! wrap-around).
//!
//! The kernel keeps the writer's position in the ring's second page and
//! the reader (aya) keeps its own in the first; both can be mapped again,
//! read-only, from the map's file descriptor.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{Mmap, MmapOptions};

/// The ring's two position pages, mapped read-only, and the most seen.
pub struct RingFill {
    consumer: Mmap,
    producer: Mmap,
    peak: u64,
}

impl RingFill {
    /// Maps the position pages of the ring buffer map `ring`.
    pub fn of(ring: &impl AsRawFd) -> io::Result<RingFill> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let map = |offset: u64| {
            // SAFETY: the kernel writes these pages while they are mapped;
            // they are read only through atomic loads (`position`).
            unsafe {
                MmapOptions::new()
                    .offset(offset)
                    .len(page as usize)
                    .map(ring.as_raw_fd())
            }
        };
        Ok(RingFill {
            consumer: map(0)?,
            producer: map(page)?,
            peak: 0,
        })
    }

    /// Notes how many bytes the ring holds now (records and their headers).
    pub fn sample(&mut self) {
        let held = position(&self.producer).wrapping_sub(position(&self.consumer));
        self.peak = self.peak.max(held);
    }

    /// The most bytes the ring held at a sample.
    pub fn peak(&self) -> u64 {
        self.peak
    }
}

/// The position at the start of a position page, which another thread
/// (the kernel's writers, or the reader) moves.
fn position(page: &Mmap) -> u64 {
    // SAFETY: the page is mapped, page-aligned and at least 8 bytes long,
    // so its first 8 bytes are a valid, aligned AtomicU64 for as long as
    // `page` lives.
    let atomic = unsafe { &*page.as_ptr().cast::<AtomicU64>() };
    atomic.load(Ordering::Acquire)
}
