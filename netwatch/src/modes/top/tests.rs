//! `top`'s screens, rendered at 80x24 and 132x40 and compared with golden
//! text files, and its keys.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use clap::Parser as _;
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use netwatch_common::ByteCounts;
use ratatui::backend::TestBackend;
use ratatui::Terminal;

use super::render::{draw, Palette};
use super::state::TopState;
use super::view::{screen, Choices, Screen, View};
use super::{answer, step};
use crate::cli::{Cli, Command, TopArgs};
use crate::engine::monitor::Refresh;
use crate::model::{Proto, TcpCounters, TcpState, Transition, Tuple};
use crate::output::fixtures::{assert_golden, image, owner, task};

/// The wall time the screens are drawn at.
fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_000_000)
}

fn args(flags: &[&str]) -> TopArgs {
    let cli = Cli::try_parse_from(["netwatch", "top"].iter().chain(flags)).expect("flags");
    match cli.command {
        Some(Command::Top(args)) => args,
        other => panic!("{other:?}"),
    }
}

fn tuple(local: &str, remote: &str) -> Tuple {
    Tuple {
        proto: Proto::Tcp,
        local: local.parse::<SocketAddr>().expect("an address"),
        remote: remote.parse::<SocketAddr>().expect("an address"),
    }
}

/// nginx listening and serving two clients (one busy, one handed to a
/// worker), curl connected out, and a connection that opened and closed
/// within a millisecond.
fn state() -> TopState {
    let mut state = TopState::new(true, Duration::from_secs(3600));
    let nginx = Some(owner(
        812,
        "nginx",
        Some(image(
            Some(&[b"nginx: worker process"]),
            Some("/system.slice/nginx.service"),
        )),
    ));
    let curl = Some(owner(
        4242,
        "curl",
        Some(image(Some(&[b"curl", b"http://10.0.0.9/"]), None)),
    ));
    let at = |ms: u64| now() - Duration::from_millis(ms);
    let mut apply = |skaddr, tuple, states, owner: &Option<crate::model::Owner>, ms| {
        let t = Transition::scripted(0, skaddr, tuple, states, task(1, 1, b"x"));
        state.transition(&t, owner.clone(), at(ms));
    };
    use TcpState::*;
    apply(
        1,
        tuple("0.0.0.0:80", "0.0.0.0:0"),
        (Close, Listen),
        &nginx,
        3_600_000,
    );
    let busy = tuple("10.0.0.1:80", "10.0.0.7:51000");
    apply(2, busy, (Listen, SynRecv), &nginx, 65_000);
    apply(2, busy, (SynRecv, Established), &nginx, 65_000);
    let handed = tuple("10.0.0.1:80", "10.0.0.8:51001");
    apply(3, handed, (Listen, SynRecv), &nginx, 5_000);
    apply(3, handed, (SynRecv, Established), &nginx, 5_000);
    let out = tuple("10.0.0.1:43210", "10.0.0.9:443");
    apply(4, out, (Close, SynSent), &curl, 2_000);
    apply(4, out, (SynSent, Established), &curl, 1_990);
    let brief = tuple("10.0.0.1:43211", "10.0.0.9:443");
    apply(5, brief, (Close, SynSent), &curl, 3_000);
    apply(5, brief, (SynSent, Established), &curl, 3_000);
    apply(5, brief, (Established, FinWait1), &curl, 2_999);
    apply(5, brief, (FinWait1, Close), &curl, 2_999);
    let worker = owner(813, "nginx", None);
    state.owner_changed(3, &worker, at(4_000));
    let bytes = |skaddr| {
        Some(ByteCounts {
            sent: skaddr * 1_000_000,
            received: skaddr * 1_000,
        })
    };
    // The busy client far away and losing segments; curl's nearby (their
    // bytes as the kernel counts them, the same).
    let counters = [
        (
            2,
            TcpCounters {
                bytes: bytes(2).unwrap_or_default(),
                rtt_us: 38_250,
                retransmits: 7,
            },
        ),
        (
            4,
            TcpCounters {
                bytes: bytes(4).unwrap_or_default(),
                rtt_us: 420,
                retransmits: 0,
            },
        ),
    ];
    state.refresh(&Refresh {
        bytes: &bytes,
        counters: &counters.into_iter().collect(),
    });
    state
}

/// The screen of `state` with counts fixed (the per-second ones follow
/// the real clock).
fn fixed(mut screen: Screen, lost: u64) -> Screen {
    screen.totals.opens_per_second = 12;
    screen.totals.closes_per_second = 11;
    screen.totals.sparkline = (0..60).map(|s| s % 9).collect();
    screen.totals.rates = (1_250_000.0, 3_000.0);
    screen.totals.lost = lost;
    screen
}

/// The screen drawn at `width` x `height`, as text, one line per row.
fn rendered(screen: &Screen, choices: &Choices, (width, height): (u16, u16)) -> String {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("a test terminal");
    let palette = Palette { color: false };
    terminal
        .draw(|frame| draw(frame, screen, choices, palette))
        .expect("drawn");
    let buffer = terminal.backend().buffer();
    let mut text = String::new();
    for y in 0..height {
        let line: String = (0..width)
            .map(|x| buffer[(x, y)].symbol().to_owned())
            .collect();
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// Renders `choices` over the test state at both sizes into golden files.
fn check(name: &str, state: &TopState, choices: &Choices, lost: u64) {
    let screen = fixed(screen(state, choices, &args(&[]), now()), lost);
    for size in [(80, 24), (132, 40)] {
        let file = format!("top/{name}-{}x{}.txt", size.0, size.1);
        assert_golden(&file, rendered(&screen, choices, size).as_bytes());
    }
}

fn choices() -> Choices {
    Choices::new(Duration::from_secs(1))
}

#[test]
fn each_view_renders_at_both_sizes() {
    let state = state();
    let mut choices = choices();
    for name in ["connections", "processes", "remotes", "units"] {
        check(name, &state, &choices, 0);
        choices.view = choices.view.next();
    }
    assert_eq!(choices.view, View::Connections);
}

#[test]
fn help_paused_filter_detail_empty_and_losses_render() {
    let state = state();
    let mut help = choices();
    help.help = true;
    check("help", &state, &help, 0);
    let mut paused = choices();
    paused.paused = true;
    check("paused", &state, &paused, 0);
    let mut filtered = choices();
    filtered.filter = "443".into();
    check("filter", &state, &filtered, 0);
    let mut detail = choices();
    detail.sort = Some(0);
    detail.reversed = true;
    detail.detail = true;
    check("detail", &state, &detail, 0);
    check(
        "empty",
        &TopState::new(true, Duration::from_secs(10)),
        &choices(),
        0,
    );
    check("lost", &state, &choices(), 17);
}

#[test]
fn every_connection_shows_including_one_that_lived_a_millisecond() {
    let state = state();
    let screen = screen(&state, &choices(), &args(&[]), now());
    assert_eq!(screen.rows.len(), 5);
    let brief = screen
        .rows
        .iter()
        .find(|row| row.cells[2] == "10.0.0.1:43211")
        .expect("the brief connection");
    assert!(brief.closed);
    assert_eq!(brief.cells[4], "CLOSE");
    assert_eq!(brief.cells[5], "1ms");
    let handed = screen
        .rows
        .iter()
        .find(|row| row.cells[3] == "10.0.0.8:51001")
        .expect("the handed-off connection");
    assert!(handed.handed_off);
    assert_eq!(handed.cells[..2], ["813".to_owned(), "nginx*".to_owned()]);
}

#[test]
fn start_up_filters_and_the_typed_filter_narrow_the_rows() {
    let state = state();
    let by_port = screen(&state, &choices(), &args(&["--port", "443"]), now());
    assert_eq!(by_port.rows.len(), 2);
    let by_pid = screen(&state, &choices(), &args(&["--pid", "812"]), now());
    assert_eq!(by_pid.rows.len(), 2, "{:?}", by_pid.rows);
    let mut typed = choices();
    typed.filter = "nginx.service".into();
    assert_eq!(screen(&state, &typed, &args(&[]), now()).rows.len(), 2);
    typed.filter = "listen".into();
    assert_eq!(screen(&state, &typed, &args(&[]), now()).rows.len(), 1);
}

#[test]
fn the_processes_view_has_one_row_per_process() {
    let state = state();
    let mut choices = choices();
    choices.view = View::Processes;
    let screen = screen(&state, &choices, &args(&[]), now());
    let mut pids: Vec<&str> = screen
        .rows
        .iter()
        .map(|row| row.cells[0].as_str())
        .collect();
    pids.sort_unstable();
    assert_eq!(pids, ["4242", "812", "813"]);
}

fn key(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

#[test]
fn keys_change_the_view_the_sort_the_filter_and_quit() {
    let mut choices = choices();
    assert!(answer(&mut choices, key(KeyCode::Char('g')), 5));
    assert_eq!(choices.view, View::Processes);
    answer(&mut choices, key(KeyCode::Char('s')), 5);
    assert_eq!(choices.sort, Some(0));
    answer(&mut choices, key(KeyCode::Char('S')), 5);
    assert!(choices.reversed);
    answer(&mut choices, key(KeyCode::Char('/')), 5);
    for c in "80".chars() {
        answer(&mut choices, key(KeyCode::Char(c)), 5);
    }
    assert_eq!(choices.active_filter(), "80");
    assert!(
        answer(&mut choices, key(KeyCode::Char('q')), 5),
        "q types while filtering"
    );
    answer(&mut choices, key(KeyCode::Backspace), 5);
    answer(&mut choices, key(KeyCode::Enter), 5);
    assert_eq!(choices.filter, "80");
    answer(&mut choices, key(KeyCode::Char(' ')), 5);
    assert!(choices.paused);
    answer(&mut choices, key(KeyCode::End), 5);
    assert_eq!(choices.selected, 4);
    answer(&mut choices, key(KeyCode::Enter), 5);
    assert!(choices.detail);
    answer(&mut choices, key(KeyCode::Esc), 5);
    assert!(!choices.detail && choices.filter.is_empty());
    assert!(!answer(&mut choices, key(KeyCode::Char('q')), 5));
    let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
    assert!(!answer(&mut crate::modes::top::tests::choices(), ctrl_c, 0));
}

#[test]
fn plus_and_minus_step_the_interval() {
    assert_eq!(step(Duration::from_secs(1), true), Duration::from_secs(2));
    assert_eq!(
        step(Duration::from_secs(1), false),
        Duration::from_millis(500)
    );
    assert_eq!(step(Duration::from_secs(10), true), Duration::from_secs(10));
    assert_eq!(
        step(Duration::from_millis(250), false),
        Duration::from_millis(250)
    );
}

#[test]
fn only_the_rows_around_the_selection_are_formatted_and_it_stays_on_screen() {
    let mut state = TopState::new(true, Duration::from_secs(10));
    for port in 0..500u16 {
        let local = format!("10.0.1.1:{}", 10_000 + port);
        let t = Transition::scripted(
            0,
            u64::from(port),
            tuple(&local, "10.0.0.9:443"),
            (TcpState::Close, TcpState::SynSent),
            task(1, 1, b"x"),
        );
        state.transition(&t, Some(owner(7, "wget", None)), now());
    }
    let mut choices = choices();
    choices.sort = Some(2);
    choices.selected = 300;
    let screen = screen(&state, &choices, &args(&[]), now());
    assert_eq!(
        (screen.total, screen.first, screen.rows.len()),
        (500, 200, 200)
    );
    let text = rendered(&screen, &choices, (80, 24));
    assert!(text.contains("10.0.1.1:10300"), "the selected row:\n{text}");
    assert!(
        !text.contains("10.0.1.1:10200 "),
        "rows far above it:\n{text}"
    );
}

#[test]
fn names_that_arrived_replace_the_remote_addresses_and_the_rest_stay_numeric() {
    let state = state();
    let name_of = |ip: std::net::IpAddr| {
        (ip == std::net::IpAddr::from([10, 0, 0, 9])).then(|| std::sync::Arc::from("api.example"))
    };
    let mut connections = screen(&state, &choices(), &args(&[]), now());
    super::names::show_names(&mut connections, name_of);
    let remotes: Vec<&str> = connections
        .rows
        .iter()
        .map(|row| row.cells[3].as_str())
        .collect();
    assert!(remotes.contains(&"api.example:443"), "{remotes:?}");
    assert!(remotes.contains(&"10.0.0.7:51000"), "{remotes:?}");
    assert!(
        remotes.contains(&"0.0.0.0:*"),
        "a listener's stays: {remotes:?}"
    );
    let mut by_remote = choices();
    by_remote.view = View::Remotes;
    let mut remotes = screen(&state, &by_remote, &args(&[]), now());
    super::names::show_names(&mut remotes, name_of);
    let hosts: Vec<&str> = remotes
        .rows
        .iter()
        .map(|row| row.cells[0].as_str())
        .collect();
    assert!(hosts.contains(&"api.example"), "{hosts:?}");
    assert!(hosts.contains(&"10.0.0.8"), "{hosts:?}");
}

#[test]
fn any_terminal_size_draws_without_panicking() {
    let state = state();
    let mut choices = choices();
    choices.help = true;
    choices.detail = true;
    choices.typing = Some("nginx".into());
    for view in [
        View::Connections,
        View::Processes,
        View::Remotes,
        View::Units,
    ] {
        choices.view = view;
        let screen = fixed(screen(&state, &choices, &args(&[]), now()), 3);
        for size in [(1, 1), (10, 3), (20, 5), (40, 8), (300, 100)] {
            let text = rendered(&screen, &choices, size);
            assert_eq!(text.lines().count(), usize::from(size.1), "{size:?}");
            if size.0 >= 40 {
                assert!(text.starts_with("netwatch top"), "{size:?}:\n{text}");
            }
        }
    }
}

#[test]
fn round_trip_times_read_short() {
    use super::short::rtt;
    let shown: Vec<String> = [45, 999, 1_250, 38_250, 999_999, 1_300_000]
        .into_iter()
        .map(rtt)
        .collect();
    assert_eq!(shown, ["45us", "999us", "1.2ms", "38ms", "999ms", "1.3s"]);
}

#[test]
fn round_trip_times_and_retransmissions_sort_as_they_show() {
    // A connection still retransmitting its SYN has retransmissions
    // counted but no round trip measured: both its cells show "-", and it
    // sorts with the unmeasured, not above one that shows a number.
    let mut state = TopState::new(true, Duration::from_secs(3600));
    let curl = Some(owner(4242, "curl", None));
    let unanswered = tuple("10.0.0.1:43210", "10.0.0.9:443");
    let answered = tuple("10.0.0.1:43211", "10.0.0.9:443");
    for (skaddr, tuple, states) in [
        (1, unanswered, (TcpState::Close, TcpState::SynSent)),
        (2, answered, (TcpState::Close, TcpState::SynSent)),
        (2, answered, (TcpState::SynSent, TcpState::Established)),
    ] {
        let t = Transition::scripted(0, skaddr, tuple, states, task(1, 1, b"x"));
        state.transition(&t, curl.clone(), now());
    }
    let counted = |rtt_us, retransmits| TcpCounters {
        bytes: ByteCounts::default(),
        rtt_us,
        retransmits,
    };
    let counters = [(1, counted(0, 5)), (2, counted(300, 1))];
    state.refresh(&Refresh {
        bytes: &|_| None,
        counters: &counters.into_iter().collect(),
    });
    let columns = View::Connections.columns();
    for title in ["RTT", "RETR"] {
        let mut sorted = choices();
        let column = columns.iter().position(|column| column.title == title);
        sorted.sort = Some(column.expect("a column of the connections view"));
        let rows = screen(&state, &sorted, &args(&[]), now()).rows;
        let remotes: Vec<&str> = rows.iter().map(|row| row.cells[3].as_str()).collect();
        assert_eq!(
            remotes[..2],
            ["10.0.0.9:443"; 2],
            "{title}: the two connections, {rows:?}"
        );
        let local = |row: &super::view::Row| row.cells[2].clone();
        assert_eq!(
            local(&rows[0]),
            "10.0.0.1:43211",
            "{title}: the measured one first, {rows:?}"
        );
    }
}
