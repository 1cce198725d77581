//! What each owner runs, read from /proc off the event thread: the table
//! asks for a process's image and gets a slot at once, which a worker
//! thread fills. A read of /proc/PID/cmdline can wait on the process's
//! memory lock (a process stuck in a page fault holds it), and the events
//! must not wait with it. The reads asked for while a batch of events is
//! handled go to the worker together at its end ([`ImageReader::send`]):
//! one wakeup of the worker per batch, not per process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;

use crate::model::{CommandLine, ImageSlot, ProcessImage};

/// Reads what process `pid`, started at the given time and in the given
/// cgroup if known, runs ([`crate::snapshot::process_image`] in production).
pub type ImageLookup = fn(u32, Option<u64>, Option<u64>) -> ProcessImage;

/// Reads asked for and not yet done at most; past this, a process gets
/// no slot (its records say its image is unknown) until it is seen again.
pub const QUEUE_LENGTH: usize = 1024;

/// One read for the worker.
#[derive(Debug)]
struct Request {
    pid: u32,
    start_ns: Option<u64>,
    cgroup_id: Option<u64>,
    /// What the kernel read of its command line, if it sent that.
    command_line: Option<Arc<[u8]>>,
    slot: Arc<ImageSlot>,
}

/// Where the table asks for images.
#[derive(Debug)]
pub enum ImageReader {
    /// Read on the spot (the tests' scripted lookups).
    Inline(ImageLookup),
    /// Read by a worker thread, see [`ImageReader::spawn`].
    Worker(Worker),
}

/// The event thread's side of the worker.
#[derive(Debug)]
pub struct Worker {
    requests: Sender<Vec<Request>>,
    /// Asked for during this batch, sent at its end.
    batch: Vec<Request>,
    asked: u64,
    read: Arc<AtomicU64>,
}

impl ImageReader {
    /// A worker thread that reads images with `lookup`, holding only the
    /// capabilities netwatch keeps once attached (they are per thread).
    /// It wakes no one: the event loop looks at the slots when it wakes
    /// anyway (for the next events, or its drain timer).
    pub fn spawn(lookup: ImageLookup) -> std::io::Result<ImageReader> {
        // Bounded by `QUEUE_LENGTH` reads not yet done (see `ask`).
        let (requests, queue) = mpsc::channel::<Vec<Request>>();
        let read = Arc::new(AtomicU64::new(0));
        let count = read.clone();
        std::thread::Builder::new()
            .name("netwatch-images".into())
            .spawn(move || {
                if let Err(err) = crate::kernel::keep_only_what_is_still_used() {
                    log::warn!("the thread that reads process images keeps its capabilities: dropping them failed ({err})");
                }
                for request in queue.iter().flatten() {
                    let image = lookup(request.pid, request.start_ns, request.cgroup_id);
                    request.slot.fill(completed(image, request.command_line));
                    count.fetch_add(1, Ordering::Release);
                }
            })?;
        let worker = Worker {
            requests,
            batch: Vec::new(),
            asked: 0,
            read,
        };
        Ok(ImageReader::Worker(worker))
    }

    /// Asks for what process `pid` runs: a slot filled now or soon (once
    /// [`ImageReader::send`] has sent the batch), or `None` when the worker
    /// has too much to read already. The command line the kernel read, if
    /// given, stands in for one /proc no longer shows.
    pub fn ask(
        &mut self,
        pid: u32,
        start_ns: Option<u64>,
        cgroup_id: Option<u64>,
        command_line: Option<Arc<[u8]>>,
    ) -> Option<Arc<ImageSlot>> {
        match self {
            ImageReader::Inline(lookup) => Some(ImageSlot::filled(completed(
                lookup(pid, start_ns, cgroup_id),
                command_line,
            ))),
            ImageReader::Worker(worker) => {
                let waiting = worker.asked - worker.read.load(Ordering::Acquire);
                if waiting >= QUEUE_LENGTH as u64 {
                    return None;
                }
                let slot = Arc::new(ImageSlot::default());
                worker.batch.push(Request {
                    pid,
                    start_ns,
                    cgroup_id,
                    command_line,
                    slot: slot.clone(),
                });
                worker.asked += 1;
                Some(slot)
            }
        }
    }

    /// Sends the reads asked for since the last call to the worker, in one
    /// message. Were the worker gone, their slots say the image is unknown.
    pub fn send(&mut self) {
        let ImageReader::Worker(worker) = self else {
            return;
        };
        if worker.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut worker.batch);
        if let Err(mpsc::SendError(batch)) = worker.requests.send(batch) {
            for request in batch {
                request.slot.fill(ProcessImage::default());
                worker.read.fetch_add(1, Ordering::Release);
            }
        }
    }

    /// Whether a read asked for is still to be done.
    pub fn reading(&self) -> bool {
        match self {
            ImageReader::Inline(_) => false,
            ImageReader::Worker(worker) => worker.read.load(Ordering::Acquire) < worker.asked,
        }
    }
}

/// `image`, with the command line the kernel read where /proc gave none:
/// a process that exited (or was exiting) before its read.
fn completed(mut image: ProcessImage, command_line: Option<Arc<[u8]>>) -> ProcessImage {
    if image.cmdline.is_none() {
        image.cmdline = command_line.map(|bytes| Arc::new(CommandLine::from_proc(&bytes)));
    }
    image
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn exe_named_by_pid(pid: u32, _: Option<u64>, _: Option<u64>) -> ProcessImage {
        ProcessImage {
            exe: Some(format!("/bin/{pid}").into()),
            ..ProcessImage::default()
        }
    }

    /// Waits (a bounded time) until the worker has read what it was asked.
    fn settle(reader: &ImageReader) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while reader.reading() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn the_worker_fills_each_slot_with_its_process_image() {
        let mut reader = ImageReader::spawn(exe_named_by_pid).expect("a thread");
        let slots: Vec<_> = (1..=100)
            .map(|pid| {
                reader
                    .ask(pid, None, None, None)
                    .expect("room in the queue")
            })
            .collect();
        reader.send();
        settle(&reader);
        assert!(!reader.reading());
        for (pid, slot) in (1..=100).zip(&slots) {
            let exe = slot.get().and_then(|image| image.exe.as_deref());
            assert_eq!(exe, Some(format!("/bin/{pid}").as_str()));
        }
    }

    #[test]
    fn a_full_queue_gives_no_slot_and_the_events_do_not_wait() {
        static HOLD: std::sync::Mutex<()> = std::sync::Mutex::new(());
        /// Waits until the test lets it go, as a read of a process stuck in a page fault does.
        fn held(_: u32, _: Option<u64>, _: Option<u64>) -> ProcessImage {
            drop(HOLD.lock());
            ProcessImage::default()
        }
        let hold = HOLD.lock().expect("the gate");
        let mut reader = ImageReader::spawn(held).expect("a thread");
        // The worker waits on the first read; the others wait for it.
        let started = Instant::now();
        let mut given = 0;
        for batch in 0..4u32 {
            given += (0..QUEUE_LENGTH as u32 / 2)
                .filter(|&pid| reader.ask(batch * 10_000 + pid, None, None, None).is_some())
                .count();
            reader.send();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "asking waited");
        assert_eq!(given, QUEUE_LENGTH, "slots given");
        assert!(reader.reading());
        drop(hold);
        settle(&reader);
        assert!(!reader.reading());
    }

    #[test]
    fn the_kernels_command_line_stands_in_only_for_one_proc_no_longer_shows() {
        fn gone(_: u32, _: Option<u64>, _: Option<u64>) -> ProcessImage {
            ProcessImage::default()
        }
        fn running(pid: u32, _: Option<u64>, _: Option<u64>) -> ProcessImage {
            ProcessImage {
                cmdline: Some(Arc::new(CommandLine(vec![format!("{pid}").into_bytes()]))),
                ..ProcessImage::default()
            }
        }
        let from_kernel: Option<Arc<[u8]>> = Some(Arc::from(&b"socat\0-d\0"[..]));
        let arguments = |reader: &mut ImageReader| {
            let slot = reader.ask(7, None, None, from_kernel.clone());
            settle(reader);
            let image = slot.expect("a slot").get().cloned().expect("filled");
            image.cmdline.map(|line| line.0.clone())
        };
        let kernels = Some(vec![b"socat".to_vec(), b"-d".to_vec()]);
        assert_eq!(arguments(&mut ImageReader::Inline(gone)), kernels);
        assert_eq!(
            arguments(&mut ImageReader::Inline(running)),
            Some(vec![b"7".to_vec()])
        );
        let mut worker = ImageReader::spawn(gone).expect("a thread");
        let slot = worker.ask(7, None, None, from_kernel.clone());
        worker.send();
        settle(&worker);
        let image = slot.expect("a slot").get().cloned().expect("filled");
        assert_eq!(image.cmdline.map(|line| line.0.clone()), kernels);
    }

    #[test]
    fn inline_reads_fill_the_slot_at_once() {
        let mut reader = ImageReader::Inline(exe_named_by_pid);
        let slot = reader.ask(7, None, None, None).expect("a slot");
        assert_eq!(
            slot.get().and_then(|image| image.exe.as_deref()),
            Some("/bin/7")
        );
        assert!(!reader.reading());
    }
}
