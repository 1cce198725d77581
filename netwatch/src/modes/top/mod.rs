//! `netwatch top`: a full-screen live table of connections, processes,
//! remote hosts and units. With root the engine feeds it every transition
//! (a connection that lived a millisecond stays on screen, dimmed, for
//! `--keep-closed`) and the kernel's byte counts; without, it shows a /proc
//! snapshot taken at each refresh.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use crate::cli::TopArgs;
use crate::engine::clock::WallClock;
use crate::engine::monitor::{self, Config, Notice, Observer, Refresh};
use crate::engine::table::{Observed, SocketTable};
use crate::model::{OwnerChange, Proto, Transition};
use crate::sink::{Records, Sink};
use crate::snapshot::{self, Owners, Snapshot};

mod names;
mod render;
mod short;
mod state;
mod terminal;
mod view;

use names::RemoteNames;
use render::Palette;
use state::TopState;
use view::Choices;

/// Rows PgUp and PgDn move by.
const PAGE: usize = 20;
/// Redraw intervals `+` and `-` step through.
const INTERVALS: [Duration; 6] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
];

/// Runs the view until `q`, Ctrl-C, SIGTERM or SIGHUP; live when netwatch
/// can attach its programs, else from /proc snapshots.
pub fn run(args: TopArgs) -> anyhow::Result<()> {
    let live = crate::kernel::may_load_programs();
    let state = Arc::new(Mutex::new(TopState::new(live, args.keep_closed)));
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [libc::SIGTERM, libc::SIGHUP] {
        signal_hook::flag::register(signal, stop.clone())
            .context("setting up the signal handlers failed")?;
    }
    let engine = match live {
        true => Some(start_engine(&args, state.clone())?),
        false => None,
    };
    let shown = terminal::Session::start()
        .context("setting up the terminal failed (is this a terminal?)")
        .and_then(|mut session| show(&mut session, &args, &state, &stop, engine.as_ref()));
    let engine_result = match engine {
        Some(engine) => {
            // The engine stops on SIGINT, as it does for every mode.
            // SAFETY: raising a signal at this process, which handles it.
            unsafe { libc::kill(libc::getpid(), libc::SIGINT) };
            engine
                .join()
                .map_err(|_| anyhow::anyhow!("the engine's thread panicked"))
                .and_then(|result| result)
        }
        None => Ok(()),
    };
    shown.and(engine_result)
}

/// The engine on its own thread, feeding `state`.
fn start_engine(
    args: &TopArgs,
    state: Arc<Mutex<TopState>>,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    let config = Config {
        process_images: true,
        refresh_every: Some(Duration::from_secs(1)),
        ..Config::new(&args.probe, true, None)
    };
    let feed = Feed { state };
    let engine = std::thread::Builder::new()
        .name("netwatch-engine".into())
        .spawn(move || monitor::run(config, feed, Sink::discard()).map(drop))
        .context("starting the engine's thread failed")?;
    Ok(engine)
}

/// Locks the state (or the names' cache); a panic elsewhere while it was
/// held leaves it usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The engine's observer: everything it sees goes into the state.
struct Feed {
    state: Arc<Mutex<TopState>>,
}

impl Observer for Feed {
    fn baseline(&mut self, _: &Snapshot, table: &SocketTable, _: &mut Records) {
        lock(&self.state).baseline(table);
    }

    fn transition(&mut self, t: &Transition, seen: &Observed, clock: &WallClock, _: &mut Records) {
        lock(&self.state).transition(t, seen.owner.clone(), clock.at(t.ts_ns));
    }

    fn owner_changed(
        &mut self,
        ts_ns: u64,
        change: &OwnerChange,
        clock: &WallClock,
        _: &mut Records,
    ) {
        lock(&self.state).owner_changed(change.skaddr, &change.new, clock.at(ts_ns));
    }

    fn notice(&mut self, notice: &Notice, _: &mut Records) {
        if let Notice::Lost { count, .. } = notice {
            lock(&self.state).lost(*count);
        }
    }

    fn refresh(&mut self, refresh: &Refresh<'_>) {
        lock(&self.state).refresh(refresh);
    }
}

/// The screen's loop: redraw every interval (unless paused), answer keys.
fn show(
    session: &mut terminal::Session,
    args: &TopArgs,
    state: &Mutex<TopState>,
    stop: &AtomicBool,
    engine: Option<&std::thread::JoinHandle<anyhow::Result<()>>>,
) -> anyhow::Result<()> {
    let palette = Palette::from_env();
    let mut choices = Choices::new(args.interval);
    let mut screen = None;
    let mut timings = Timings::default();
    let mut names = None;
    let mut next_refresh = Instant::now();
    let result = loop {
        if stop.load(Ordering::Relaxed) || engine.is_some_and(|engine| engine.is_finished()) {
            break Ok(());
        }
        // What the state says now: at each interval (unless paused), and
        // at once after a key.
        let mut changed = screen.is_none();
        if Instant::now() >= next_refresh {
            next_refresh = Instant::now() + choices.interval;
            if engine.is_none() {
                read_snapshot(state);
            }
            lock(state).expire();
            changed |= !choices.paused;
        }
        let mut built = Duration::ZERO;
        if changed {
            let started = Instant::now();
            let mut shown = view::screen(&lock(state), &choices, args, SystemTime::now());
            if let Some(names) = remote_names(&mut names, choices.names) {
                names::show_names(&mut shown, |ip| names.name(ip));
            }
            screen = Some(shown);
            built = started.elapsed();
        }
        if let (true, Some(screen)) = (changed, &screen) {
            let started = Instant::now();
            session.draw(|frame| render::draw(frame, screen, &choices, palette))?;
            timings.redrawn(built, started.elapsed());
        }
        let wait = next_refresh.saturating_duration_since(Instant::now());
        if event::poll(wait)? {
            let rows = screen.as_ref().map_or(0, |screen| screen.total);
            match event::read()? {
                Event::Key(key) if key.kind != KeyEventKind::Release => {
                    if !answer(&mut choices, key, rows) {
                        break Ok(());
                    }
                    // What a key changes shows at once, even paused.
                    screen = None;
                }
                Event::Resize(..) => screen = None,
                _ => {}
            }
        }
    };
    log::info!("{timings}");
    result
}

/// The remote names' lookups when they are shown, started the first time.
fn remote_names(names: &mut Option<RemoteNames>, shown: bool) -> Option<&RemoteNames> {
    if shown && names.is_none() {
        match RemoteNames::start() {
            Ok(started) => *names = Some(started),
            Err(err) => log::warn!("starting the thread that looks up remote names failed: {err}"),
        }
    }
    names.as_ref().filter(|_| shown)
}

/// How long the screens took to make: the view's rows built from the
/// state, and drawn.
#[derive(Debug, Default)]
struct Timings {
    building: Duration,
    drawing: Duration,
    redraws: u32,
    slowest: Duration,
}

impl Timings {
    fn redrawn(&mut self, building: Duration, drawing: Duration) {
        self.redraws += 1;
        self.building += building;
        self.drawing += drawing;
        self.slowest = self.slowest.max(building + drawing);
    }
}

impl std::fmt::Display for Timings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let each = |total: Duration| total.as_secs_f64() * 1e3 / f64::from(self.redraws.max(1));
        write!(
            f,
            "top redrew the screen {} times: {:.2} ms building the rows and {:.2} ms drawing them on average, {:.2} ms at most",
            self.redraws,
            each(self.building),
            each(self.drawing),
            self.slowest.as_secs_f64() * 1e3
        )
    }
}

/// Replaces the state's sockets with a fresh /proc snapshot (without root).
fn read_snapshot(state: &Mutex<TopState>) {
    match snapshot::take(&[Proto::Tcp, Proto::Tcp6], Owners::Find, None) {
        Ok(mut taken) => {
            snapshot::add_images(taken.entries.iter_mut());
            lock(state).replace_from(&taken);
        }
        Err(err) => log::warn!("reading the TCP tables failed: {err:#}"),
    }
}

/// Acts on a key; `false` to quit.
fn answer(choices: &mut Choices, key: KeyEvent, rows: usize) -> bool {
    let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c');
    if ctrl_c {
        return false;
    }
    if let Some(typing) = &mut choices.typing {
        match key.code {
            KeyCode::Enter => choices.filter = choices.typing.take().unwrap_or_default(),
            KeyCode::Esc => {
                choices.typing = None;
                choices.filter.clear();
            }
            KeyCode::Backspace => {
                typing.pop();
            }
            KeyCode::Char(c) => typing.push(c),
            _ => {}
        }
        choices.selected = 0;
        return true;
    }

    match key.code {
        KeyCode::Char('q') => return false,
        KeyCode::Char('g') => {
            choices.view = choices.view.next();
            choices.sort = None;
            choices.selected = 0;
            choices.detail = false;
        }
        KeyCode::Char('/') => choices.typing = Some(String::new()),
        KeyCode::Char('s') => choices.cycle_sort(),
        KeyCode::Char('S') => choices.reversed = !choices.reversed,
        KeyCode::Char(' ') => choices.paused = !choices.paused,
        KeyCode::Char('?') => choices.help = !choices.help,
        KeyCode::Char('n') => choices.names = !choices.names,
        KeyCode::Char('+') => choices.interval = step(choices.interval, true),
        KeyCode::Char('-') => choices.interval = step(choices.interval, false),
        KeyCode::Enter if rows > 0 => choices.detail = true,
        KeyCode::Esc => {
            choices.help = false;
            choices.detail = false;
            choices.filter.clear();
        }
        KeyCode::Down => choices.selected = (choices.selected + 1).min(rows.saturating_sub(1)),
        KeyCode::Up => choices.selected = choices.selected.saturating_sub(1),
        KeyCode::PageDown => {
            choices.selected = (choices.selected + PAGE).min(rows.saturating_sub(1))
        }
        KeyCode::PageUp => choices.selected = choices.selected.saturating_sub(PAGE),
        KeyCode::Home => choices.selected = 0,
        KeyCode::End => choices.selected = rows.saturating_sub(1),
        _ => {}
    }
    true
}

/// The next redraw interval up (`+`: less often) or down.
fn step(interval: Duration, longer: bool) -> Duration {
    let found = match longer {
        true => INTERVALS.iter().find(|&&i| i > interval),
        false => INTERVALS.iter().rev().find(|&&i| i < interval),
    };
    found.copied().unwrap_or(interval)
}

#[cfg(test)]
mod tests;
