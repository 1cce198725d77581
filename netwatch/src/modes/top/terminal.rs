//! The terminal while `top` runs: raw mode on the alternate screen, and
//! always restored, on return, on error and on a panic. What netwatch
//! writes to stderr meanwhile (warnings, the engine's notices) would tear
//! the screen: it is kept and written out once the terminal is restored.

use std::fs::File;
use std::io::{self, Read as _, Seek as _, Stdout, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

use crossterm::{cursor, execute, terminal};
use ratatui::backend::CrosstermBackend;
use ratatui::{Frame, Terminal};

/// The terminal in `top`'s hands, until dropped.
pub struct Session {
    /// Taken when the session ends (see `Drop`).
    terminal: Option<Terminal<CrosstermBackend<Stdout>>>,
    stderr: Option<HeldStderr>,
}

impl Session {
    /// Raw mode, the alternate screen, no cursor; stderr held.
    pub fn start() -> io::Result<Session> {
        install_panic_hook();
        let stderr = HeldStderr::start().ok();
        terminal::enable_raw_mode()?;
        let session = Session {
            terminal: Some(Terminal::new(CrosstermBackend::new(io::stdout()))?),
            stderr,
        };
        execute!(io::stdout(), terminal::EnterAlternateScreen, cursor::Hide)?;
        watch_for_hangup()?;
        Ok(session)
    }

    /// Draws a frame.
    pub fn draw(&mut self, render: impl FnOnce(&mut Frame<'_>)) -> io::Result<()> {
        match self.terminal.as_mut() {
            Some(terminal) => terminal.draw(render).map(drop),
            None => Ok(()),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        restore();
        // ratatui's own Drop shows the cursor again and prints why it could
        // not: on a closed output (`top | head`) that is a stray "Broken
        // pipe" line. `restore` did what can be done, so such a terminal
        // is let go without its Drop.
        if let Some(mut terminal) = self.terminal.take() {
            if terminal.show_cursor().is_err() {
                std::mem::forget(terminal);
            }
        }
        if let Some(stderr) = self.stderr.take() {
            stderr.release();
        }
    }
}

/// The real stderr while it is held (a copy of its fd), else -1.
static REAL_STDERR: AtomicI32 = AtomicI32::new(-1);

/// Leaves raw mode and the alternate screen, shows the cursor and puts
/// stderr back; harmless when already done.
fn restore() {
    let _ = terminal::disable_raw_mode();
    let _ = execute!(io::stdout(), terminal::LeaveAlternateScreen, cursor::Show);
    let real = REAL_STDERR.swap(-1, Ordering::SeqCst);
    if real >= 0 {
        // SAFETY: dup2 between two valid fds (the copy lives in HeldStderr).
        unsafe { libc::dup2(real, libc::STDERR_FILENO) };
    }
}

/// Ends netwatch when its terminal goes away (its window closed, its
/// multiplexer killed) without a SIGHUP: crossterm's reader then spins on
/// the terminal's end of file and never returns to the loop. poll says
/// the terminal hung up; the programs detach as the process exits.
fn watch_for_hangup() -> io::Result<()> {
    std::thread::Builder::new()
        .name("netwatch-tty".into())
        .spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let mut terminal = libc::pollfd {
                fd: libc::STDIN_FILENO,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll reads and writes one pollfd, which lives here; no wait.
            let polled = unsafe { libc::poll(&mut terminal, 1, 0) };
            if polled > 0
                && terminal.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
            {
                restore();
                std::process::exit(0);
            }
        })
        .map(drop)
}

/// Restores the terminal before a panic's message is printed.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}

/// stderr sent to an anonymous file while the screen is drawn.
struct HeldStderr {
    /// The real stderr's copy, kept open while held.
    _saved: OwnedFd,
    held: File,
}

impl HeldStderr {
    fn start() -> io::Result<HeldStderr> {
        // SAFETY: memfd_create with a valid C string; the fd is owned here.
        let memfd =
            unsafe { libc::memfd_create(c"netwatch-top-stderr".as_ptr(), libc::MFD_CLOEXEC) };
        if memfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned this new fd.
        let held = unsafe { File::from_raw_fd(memfd) };
        // SAFETY: dup of stderr, a valid fd; the copy is owned here.
        let saved = unsafe { libc::fcntl(libc::STDERR_FILENO, libc::F_DUPFD_CLOEXEC, 3) };
        if saved < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fcntl returned this new fd.
        let saved = unsafe { OwnedFd::from_raw_fd(saved) };
        // SAFETY: dup2 between two valid fds.
        if unsafe { libc::dup2(held.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
            return Err(io::Error::last_os_error());
        }
        REAL_STDERR.store(saved.as_raw_fd(), Ordering::SeqCst);
        Ok(HeldStderr {
            _saved: saved,
            held,
        })
    }

    /// Writes out what stderr held (once `restore` has put it back).
    fn release(mut self) {
        let mut text = Vec::new();
        if self.held.rewind().is_ok() && self.held.read_to_end(&mut text).is_ok() {
            let _ = io::stderr().write_all(&text);
        }
    }
}
