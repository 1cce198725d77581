//! What the screen shows, taken from the state at each refresh: the view,
//! its rows filtered and sorted, the header's counts and the detail of the
//! selected row. Pure: the drawing only lays it out.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hash::{Hash as _, Hasher as _};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use rustc_hash::FxHashSet;

use super::short::{bytes, clock, duration, rtt};
use super::state::{Connection, TopState};
use crate::cli::TopArgs;
use crate::model::{format_endpoint, Owner, TcpState};

/// The views `g` cycles through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    Connections,
    Processes,
    Remotes,
    Units,
}

impl View {
    /// The view after this one.
    pub fn next(self) -> View {
        match self {
            View::Connections => View::Processes,
            View::Processes => View::Remotes,
            View::Remotes => View::Units,
            View::Units => View::Connections,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            View::Connections => "connections",
            View::Processes => "processes",
            View::Remotes => "remote hosts",
            View::Units => "units and containers",
        }
    }

    /// Its columns: title, width, and the rank in which columns are kept
    /// when the terminal is narrow (0 first).
    pub fn columns(self) -> &'static [Column] {
        match self {
            View::Connections => &CONNECTION_COLUMNS,
            View::Processes => &PROCESS_COLUMNS,
            View::Remotes => &REMOTE_COLUMNS,
            View::Units => &UNIT_COLUMNS,
        }
    }
}

const fn c(title: &'static str, width: u16, rank: u8, numeric: bool) -> Column {
    Column {
        title,
        width,
        rank,
        numeric,
    }
}

const CONNECTION_COLUMNS: [Column; 13] = [
    c("PID", 7, 1, true),
    c("PROGRAM", 15, 0, false),
    c("LOCAL", 21, 4, false),
    c("REMOTE", 21, 2, false),
    c("STATE", 11, 3, false),
    c("AGE", 7, 5, true),
    c("SENT", 6, 6, true),
    c("RECV", 6, 7, true),
    c("TX/s", 6, 8, true),
    c("RX/s", 6, 9, true),
    c("RTT", 7, 10, true),
    c("RETR", 5, 11, true),
    c("UNIT", 24, 12, false),
];
const PROCESS_COLUMNS: [Column; 13] = [
    c("PID", 7, 1, true),
    c("PROGRAM", 15, 0, false),
    c("CONNS", 6, 2, true),
    c("ESTAB", 6, 3, true),
    c("LISTEN", 6, 4, true),
    c("OTHER", 6, 8, true),
    c("CLOSED", 6, 5, true),
    c("OPENS/s", 7, 6, true),
    c("SENT", 6, 7, true),
    c("RECV", 6, 9, true),
    c("TX/s", 6, 10, true),
    c("RX/s", 6, 11, true),
    c("UNIT", 24, 12, false),
];
const REMOTE_COLUMNS: [Column; 8] = [
    c("REMOTE", 39, 0, false),
    c("CONNS", 6, 1, true),
    c("PROCS", 6, 2, true),
    c("PROGRAMS", 24, 3, false),
    c("SENT", 6, 4, true),
    c("RECV", 6, 5, true),
    c("TX/s", 6, 6, true),
    c("RX/s", 6, 7, true),
];
const UNIT_COLUMNS: [Column; 7] = [
    c("UNIT OR CONTAINER", 36, 0, false),
    c("CONNS", 6, 1, true),
    c("PROCS", 6, 2, true),
    c("SENT", 6, 3, true),
    c("RECV", 6, 4, true),
    c("TX/s", 6, 5, true),
    c("RX/s", 6, 6, true),
];

/// A column of a view.
#[derive(Clone, Copy, Debug)]
pub struct Column {
    pub title: &'static str,
    pub width: u16,
    pub rank: u8,
    pub numeric: bool,
}

/// What the person at the keyboard chose.
#[derive(Clone, Debug)]
pub struct Choices {
    pub view: View,
    /// The text filter kept (Enter), matched against every field shown.
    pub filter: String,
    /// The filter being typed after `/`, if it is.
    pub typing: Option<String>,
    /// The column sorted by, or `None` for the busiest first.
    pub sort: Option<usize>,
    pub reversed: bool,
    pub paused: bool,
    pub selected: usize,
    pub detail: bool,
    pub help: bool,
    /// Remote names shown where they have arrived (`n`).
    pub names: bool,
    pub interval: Duration,
}

impl Choices {
    pub fn new(interval: Duration) -> Choices {
        Choices {
            view: View::Connections,
            filter: String::new(),
            typing: None,
            sort: None,
            reversed: false,
            paused: false,
            selected: 0,
            detail: false,
            help: false,
            names: false,
            interval,
        }
    }

    /// The filter in effect: the one being typed, else the one kept.
    pub fn active_filter(&self) -> &str {
        self.typing.as_deref().unwrap_or(&self.filter)
    }

    /// The next sort: busiest first, then each column in turn.
    pub fn cycle_sort(&mut self) {
        let columns = self.view.columns().len();
        self.sort = match self.sort {
            None => Some(0),
            Some(column) if column + 1 < columns => Some(column + 1),
            Some(_) => None,
        };
    }
}

/// One row of the table, as drawn.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub cells: Vec<String>,
    /// A closed connection (or a group of closed ones only): dimmed.
    pub closed: bool,
    /// A connection whose owner changed.
    pub handed_off: bool,
    /// The remote end it shows, which `n` names (a remote host's, port 0).
    pub remote: Option<SocketAddr>,
}

/// Rows formatted around the selection: enough for any terminal's height.
pub const WINDOW: usize = 200;

/// The counts of the header and footer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    /// Open connections by state, busiest state first.
    pub by_state: Vec<(TcpState, usize)>,
    pub open: usize,
    pub closed_shown: usize,
    pub opens_per_second: u64,
    pub closes_per_second: u64,
    /// Opens per second over the last minute, oldest first.
    pub sparkline: Vec<u64>,
    pub rates: (f64, f64),
    pub lost: u64,
    pub closed_dropped: u64,
    pub live: bool,
}

/// Everything one frame draws.
#[derive(Clone, Debug, PartialEq)]
pub struct Screen {
    pub view: View,
    /// The rows around the selection (`WINDOW` at most), formatted.
    pub rows: Vec<Row>,
    /// Which row of the whole table `rows` begins with.
    pub first: usize,
    /// Rows in the whole table.
    pub total: usize,
    /// The selected row, in the whole table.
    pub selected: usize,
    pub totals: Totals,
    /// The selected row's detail, when its pane is open.
    pub detail: Vec<String>,
}

/// One row before it is formatted: its connections and what sorts it.
struct Candidate<'a, 'b> {
    members: Members<'a, 'b>,
    /// The sorted column's value, where it is a number.
    number: f64,
    /// The sorted column's text, where it is text.
    text: String,
    activity: (f64, u64, u64),
    /// What orders rows that tie: a hash of the first connection's
    /// addresses, the same at every redraw.
    tie: u64,
}

/// A row's connections: one (the connections view), or a group's.
enum Members<'a, 'b> {
    One(&'a Connection),
    Group(&'b [&'a Connection]),
}

impl<'a> Members<'a, '_> {
    fn as_slice(&self) -> &[&'a Connection] {
        match self {
            Members::One(connection) => std::slice::from_ref(connection),
            Members::Group(group) => group,
        }
    }
}

/// What the screen shows of `state` under `choices` and the start-up
/// filters, at wall time `now`. Only the rows around the selection are
/// formatted: the others are sorted by one value each. The connections
/// are read once, for the header's counts and the rows together: with
/// tens of thousands of them, each pass over their memory costs
/// milliseconds.
pub fn screen(state: &TopState, choices: &Choices, args: &TopArgs, now: SystemTime) -> Screen {
    let filter = choices.active_filter().to_lowercase();
    let numeric = choices
        .sort
        .is_some_and(|i| choices.view.columns()[i].numeric);
    let candidate = |members| Candidate::of(members, choices, numeric, now);
    let mut tally = Tally::default();
    let mut candidates = Vec::new();
    let mut shown = Vec::new();
    for c in state.connections() {
        if c.closed.is_none() {
            tally.count(c);
        }
        if !passes(c, args) || !(filter.is_empty() || haystack(c).contains(&filter)) {
            continue;
        }
        match choices.view {
            View::Connections => candidates.push(candidate(Members::One(c))),
            _ => shown.push(c),
        }
    }
    let groups: Vec<Vec<&Connection>> = match choices.view {
        View::Connections => Vec::new(),
        View::Processes => groups(&shown, |c| c.owner.as_ref().map(|o| o.pid.to_string())),
        View::Remotes => groups(&shown, |c| {
            (!c.tuple.remote.ip().is_unspecified()).then(|| c.tuple.remote.ip().to_string())
        }),
        View::Units => groups(&shown, |c| Some(unit_of(c.owner.as_ref()))),
    };
    candidates.extend(groups.iter().map(|group| candidate(Members::Group(group))));
    let total = candidates.len();
    let selected = choices.selected.min(total.saturating_sub(1));
    let first = selected.saturating_sub(WINDOW / 2);
    sort(&mut candidates, choices, numeric, first);
    let window = candidates.iter().skip(first).take(WINDOW);
    let rows = window
        .map(|candidate| {
            let members = candidate.members.as_slice();
            Row {
                cells: cells(choices.view, members, now),
                closed: members.iter().all(|c| c.closed.is_some()),
                handed_off: members.iter().any(|c| c.handed_off),
                remote: match (choices.view, members.first()) {
                    (View::Connections | View::Remotes, Some(c)) => Some(c.tuple.remote),
                    _ => None,
                },
            }
        })
        .collect();
    let detail = match (choices.detail, candidates.get(selected)) {
        (true, Some(candidate)) => detail(choices.view, candidate.members.as_slice()),
        _ => Vec::new(),
    };
    Screen {
        view: choices.view,
        rows,
        first,
        total,
        selected,
        totals: totals(state, tally),
        detail,
    }
}

impl<'a, 'b> Candidate<'a, 'b> {
    /// The row of `members`, with what sorts it under `choices`.
    fn of(
        members: Members<'a, 'b>,
        choices: &Choices,
        numeric: bool,
        now: SystemTime,
    ) -> Candidate<'a, 'b> {
        let slice = members.as_slice();
        let (number, text) = match (choices.sort, numeric) {
            (Some(i), true) => (numbers(choices.view, slice, now)[i], String::new()),
            (Some(i), false) => (0.0, cells(choices.view, slice, now).swap_remove(i)),
            (None, _) => (0.0, String::new()),
        };
        let activity = activity(slice);
        let tie = slice.first().map_or(0, |c| {
            let mut hasher = rustc_hash::FxHasher::default();
            (c.tuple.local, c.tuple.remote).hash(&mut hasher);
            hasher.finish()
        });
        Candidate {
            members,
            number,
            text,
            activity,
            tie,
        }
    }
}

/// The open connections counted by state (`TcpState::ALL`'s order), and
/// their rates summed.
#[derive(Default)]
struct Tally {
    by_state: [usize; TcpState::ALL.len()],
    rates: (f64, f64),
}

impl Tally {
    fn count(&mut self, c: &Connection) {
        // `ALL` lists the states by their kernel number, from 1.
        if let Some(count) = self.by_state.get_mut(usize::from(c.state as u8) - 1) {
            *count += 1;
        }
        self.rates = (self.rates.0 + c.rates.0, self.rates.1 + c.rates.1);
    }
}

/// Whether a connection passes the start-up filters.
fn passes(c: &Connection, args: &TopArgs) -> bool {
    let pid = c.owner.as_ref().map(|owner| owner.pid);
    args.filters.matches(&c.tuple, pid, &[c.state]) && args.cgroups.matches(c.owner.as_ref())
}

/// The text a typed filter is looked for in: program, pid, addresses and
/// ports, state, unit and container.
fn haystack(c: &Connection) -> String {
    let mut text = String::new();
    if let Some(owner) = &c.owner {
        let _ = write!(text, "{} {} ", owner.program, owner.pid);
    }
    let _ = write!(
        text,
        "{} {} {} {}",
        format_endpoint(c.tuple.local),
        format_endpoint(c.tuple.remote),
        c.state,
        unit_of(c.owner.as_ref())
    );
    text.to_lowercase()
}

/// The unit, else the container, else `-`.
fn unit_of(owner: Option<&Owner>) -> String {
    let cgroup = owner.and_then(Owner::cgroup);
    let unit = cgroup.and_then(|cgroup| cgroup.unit.as_deref().or(cgroup.container.as_deref()));
    unit.unwrap_or("-").to_owned()
}

/// The connections grouped by `key` (those without one left out), in key order.
fn groups<'a>(
    shown: &[&'a Connection],
    key: impl Fn(&Connection) -> Option<String>,
) -> Vec<Vec<&'a Connection>> {
    let mut groups: BTreeMap<String, Vec<&Connection>> = BTreeMap::new();
    for c in shown {
        if let Some(key) = key(c) {
            groups.entry(key).or_default().push(c);
        }
    }
    groups.into_values().collect()
}

/// A row's cells, in the view's columns.
fn cells(view: View, members: &[&Connection], now: SystemTime) -> Vec<String> {
    let (sent, received, rates) = sums(members);
    let owner = members.iter().find_map(|c| c.owner.as_ref());
    let mut cells = match (view, members) {
        (View::Connections, [c]) => {
            let program = owner.map_or("-".into(), |o| o.program.to_string());
            vec![
                owner.map_or("-".into(), |o| o.pid.to_string()),
                if c.handed_off {
                    format!("{program}*")
                } else {
                    program
                },
                format_endpoint(c.tuple.local),
                format_endpoint(c.tuple.remote),
                c.state.to_string(),
                c.age(now).map_or("-".into(), duration),
            ]
        }
        (View::Processes, _) => {
            let mut cells = vec![
                owner.map_or("-".into(), |o| o.pid.to_string()),
                owner.map_or("-".into(), |o| o.program.to_string()),
            ];
            cells.extend(process_counts(members, now).iter().map(usize::to_string));
            cells
        }
        (View::Remotes, _) => {
            let mut programs: Vec<&str> = members
                .iter()
                .filter_map(|c| c.owner.as_ref().map(|o| &*o.program))
                .collect();
            programs.sort_unstable();
            programs.dedup();
            vec![
                members
                    .first()
                    .map_or(String::new(), |c| c.tuple.remote.ip().to_string()),
                members.len().to_string(),
                processes(members).to_string(),
                programs.join(","),
            ]
        }
        (View::Units, _) | (View::Connections, _) => vec![
            unit_of(owner),
            members.len().to_string(),
            processes(members).to_string(),
        ],
    };
    cells.extend([
        bytes(sent as f64),
        bytes(received as f64),
        bytes(rates.0),
        bytes(rates.1),
    ]);
    if let (View::Connections, [c]) = (view, members) {
        let measured = c.measured();
        cells.push(measured.map_or("-".into(), |counted| rtt(counted.rtt_us)));
        cells.push(measured.map_or("-".into(), |counted| counted.retransmits.to_string()));
    }
    if matches!(view, View::Connections | View::Processes) {
        cells.push(unit_of(owner));
    }
    cells
}

/// A row's values in the view's columns, for sorting (0 for text ones).
fn numbers(view: View, members: &[&Connection], now: SystemTime) -> Vec<f64> {
    let (sent, received, rates) = sums(members);
    let pid = members
        .iter()
        .find_map(|c| c.owner.as_ref())
        .map_or(0.0, |o| f64::from(o.pid));
    let pids = || processes(members) as f64;
    let mut numbers = match (view, members) {
        (View::Connections, [c]) => {
            let age = c.age(now).map_or(0.0, |age| age.as_secs_f64());
            vec![pid, 0.0, 0.0, 0.0, 0.0, age]
        }
        (View::Processes, _) => {
            let mut numbers = vec![pid, 0.0];
            numbers.extend(process_counts(members, now).iter().map(|&n| n as f64));
            numbers
        }
        (View::Remotes, _) => vec![0.0, members.len() as f64, pids(), 0.0],
        (View::Units, _) | (View::Connections, _) => vec![0.0, members.len() as f64, pids()],
    };
    numbers.extend([sent as f64, received as f64, rates.0, rates.1]);
    if let (View::Connections, [c]) = (view, members) {
        // As the cells show them: nothing until a round trip is measured.
        let counters = c.measured().unwrap_or_default();
        numbers.extend([f64::from(counters.rtt_us), f64::from(counters.retransmits)]);
    }
    numbers.push(0.0);
    numbers
}

/// How many processes own the connections.
fn processes(members: &[&Connection]) -> usize {
    let pids: FxHashSet<u32> = members
        .iter()
        .filter_map(|c| c.owner.as_ref().map(|o| o.pid))
        .collect();
    pids.len()
}

/// A process's connections: open, established, listening, in another
/// state, closed, and opened in the last second.
fn process_counts(members: &[&Connection], now: SystemTime) -> [usize; 6] {
    let open: Vec<&&Connection> = members.iter().filter(|c| c.closed.is_none()).collect();
    let in_state = |state| open.iter().filter(|c| c.state == state).count();
    let (estab, listen) = (in_state(TcpState::Established), in_state(TcpState::Listen));
    let second_ago = now - Duration::from_secs(1);
    let opens = members
        .iter()
        .filter(|c| c.opened.is_some_and(|opened| opened >= second_ago))
        .count();
    [
        open.len(),
        estab,
        listen,
        open.len() - estab - listen,
        members.len() - open.len(),
        opens,
    ]
}

/// Bytes sent and received, and their rates, of a group.
fn sums(members: &[&Connection]) -> (u64, u64, (f64, f64)) {
    members.iter().fold((0, 0, (0.0, 0.0)), |(s, r, rates), c| {
        (
            s + c.bytes.sent,
            r + c.bytes.received,
            (rates.0 + c.rates.0, rates.1 + c.rates.1),
        )
    })
}

/// How busy a group is: its rate, its bytes, then how many are open.
fn activity(members: &[&Connection]) -> (f64, u64, u64) {
    let (sent, received, rates) = sums(members);
    let open = members.iter().filter(|c| c.closed.is_none()).count() as u64;
    (rates.0 + rates.1, sent + received, open)
}

/// Puts the rows from `first` to `first + WINDOW` in their place in the
/// order `choices` asks, the others only on the right side of them: a
/// selection in linear time, then a sort of the window.
fn sort(candidates: &mut [Candidate], choices: &Choices, numeric: bool, first: usize) {
    let order = |a: &Candidate, b: &Candidate| {
        let order = match (choices.sort, numeric) {
            (None, _) => {
                let (a, b) = (a.activity, b.activity);
                b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2))
            }
            (Some(_), true) => b.number.total_cmp(&a.number),
            (Some(_), false) => a.text.cmp(&b.text),
        };
        // Ties go by address, the same way at every redraw.
        let order = order.then(a.tie.cmp(&b.tie));
        if choices.reversed {
            order.reverse()
        } else {
            order
        }
    };
    if first > 0 && first < candidates.len() {
        candidates.select_nth_unstable_by(first, order);
    }
    let start = first.min(candidates.len());
    let rest = &mut candidates[start..];
    if rest.len() > WINDOW {
        rest.select_nth_unstable_by(WINDOW, order);
    }
    let end = rest.len().min(WINDOW);
    rest[..end].sort_by(order);
}

fn totals(state: &TopState, tally: Tally) -> Totals {
    let counted = TcpState::ALL.into_iter().zip(tally.by_state);
    let mut by_state: Vec<(TcpState, usize)> = counted.filter(|(_, n)| *n > 0).collect();
    by_state.sort_by(|a, b| b.1.cmp(&a.1).then((a.0 as u8).cmp(&(b.0 as u8))));
    let (opens, closes) = state.per_second.last_second();
    Totals {
        open: by_state.iter().map(|(_, n)| n).sum(),
        by_state,
        closed_shown: state.closed.len(),
        opens_per_second: opens,
        closes_per_second: closes,
        sparkline: state.per_second.seconds.iter().map(|(o, _)| *o).collect(),
        rates: tally.rates,
        lost: state.lost,
        closed_dropped: state.closed_dropped,
        live: state.live,
    }
}

/// The detail pane of a row: the owner's command line, executable and
/// cgroup; for one connection, its transitions and owner changes.
fn detail(view: View, members: &[&Connection]) -> Vec<String> {
    let mut lines = Vec::new();
    let owner = members.iter().find_map(|c| c.owner.as_ref());
    match owner {
        Some(owner) => {
            lines.push(format!("process  {} {}", owner.pid, owner.program));
            let image = owner.image();
            let cmdline = image.and_then(|image| image.cmdline.as_deref());
            lines.push(format!(
                "cmdline  {}",
                cmdline.map_or("(unknown)".into(), |cmdline| cmdline.to_string())
            ));
            let exe = image.and_then(|image| image.exe.as_deref());
            lines.push(format!("exe      {}", exe.unwrap_or("(unknown)")));
            let cgroup = owner.cgroup().map(|cgroup| &*cgroup.path);
            lines.push(format!("cgroup   {}", cgroup.unwrap_or("(unknown)")));
        }
        None => lines.push("process  (unknown)".into()),
    }
    if let (View::Connections, [c]) = (view, members) {
        lines.push(format!(
            "socket   {} -> {} {}",
            format_endpoint(c.tuple.local),
            format_endpoint(c.tuple.remote),
            c.state
        ));
        if let Some(counters) = c.measured() {
            lines.push(format!(
                "path     rtt {} · {} segments retransmitted",
                rtt(counters.rtt_us),
                counters.retransmits
            ));
        }
        for (at, old, new) in &c.history {
            lines.push(format!("  {}  {old} -> {new}", clock(*at)));
        }
        for (at, owner) in &c.owner_changes {
            lines.push(format!(
                "  {}  owner -> {} {}",
                clock(*at),
                owner.pid,
                owner.program
            ));
        }
    } else {
        lines.push(format!("{} connections", members.len()));
    }
    lines
}
