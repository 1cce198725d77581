//! The eBPF programs' own log (aya-log), handed on to netwatch's log.

use std::io;

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The eBPF program's aya-log records.
pub struct KernelLog(AsyncFd<EbpfLogger<&'static dyn log::Log>>);

impl KernelLog {
    /// Waits for log records and prints them on stderr.
    pub async fn forward(&mut self) -> io::Result<()> {
        let mut guard = self.0.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
        Ok(())
    }
}

/// Forwards the program's aya-log records to netwatch's log; a warning,
/// not a failure, when that cannot be set up.
pub(super) fn start_kernel_log(ebpf: &mut Ebpf) -> Option<KernelLog> {
    static FORWARDER: KernelLogForwarder = KernelLogForwarder;
    let logger = match EbpfLogger::init_with_logger(ebpf, &FORWARDER as &'static dyn log::Log) {
        Ok(logger) => logger,
        Err(err) => {
            log::warn!("the eBPF program's log is not available: {err}");
            return None;
        }
    };
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd lives.
    unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .inspect_err(|err| log::warn!("cannot poll the eBPF program's log: {err}"))
        .ok()
        .map(KernelLog)
}

/// Hands the eBPF program's log records (warnings and errors) on to netwatch's log.
struct KernelLogForwarder;

impl log::Log for KernelLogForwarder {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            log::info!("eBPF program {}: {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}
