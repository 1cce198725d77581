//! Draws a [`Screen`]: the header's counts, the table with the columns
//! that fit (the most useful first), the footer with the filter, the pause
//! and the losses, and the detail pane or the help over it.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Row as TableRow, Table, TableState};
use ratatui::Frame;

use super::short::{bytes, duration};
use super::view::{Choices, Screen, View};

/// The keys, as `?` lists them.
pub const KEYS: [(&str, &str); 13] = [
    (
        "g",
        "next view: connections, processes, remote hosts, units",
    ),
    ("/", "filter: program, pid, address, port, state, unit"),
    ("Enter", "keep the filter; on a row, open its detail"),
    ("Esc", "clear the filter, close the detail or this help"),
    ("s / S", "next sort column / reverse the order"),
    ("Space", "pause the display (counting goes on)"),
    ("Up Down", "select a row (PgUp PgDn Home End)"),
    (
        "n",
        "remote names (looked up aside, numeric until they come)",
    ),
    ("+ / -", "redraw less / more often"),
    ("?", "this help"),
    ("q Ctrl-C", "quit"),
    ("*", "after a program: the socket changed owner"),
    ("dim", "a closed connection, kept --keep-closed"),
];

/// How the screen is coloured: `NO_COLOR` leaves only bold, dim and reverse.
#[derive(Clone, Copy, Debug)]
pub struct Palette {
    pub color: bool,
}

impl Palette {
    /// Colours unless `NO_COLOR` is set to something.
    pub fn from_env() -> Palette {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
        Palette { color: !no_color }
    }

    fn alarm(self) -> Style {
        let style = Style::new().add_modifier(Modifier::BOLD);
        match self.color {
            true => style.fg(Color::White).bg(Color::Red),
            false => style.add_modifier(Modifier::REVERSED),
        }
    }

    fn title(self) -> Style {
        let style = Style::new().add_modifier(Modifier::BOLD);
        match self.color {
            true => style.fg(Color::Cyan),
            false => style,
        }
    }
}

/// Draws `screen` as `choices` asks.
pub fn draw(frame: &mut Frame<'_>, screen: &Screen, choices: &Choices, palette: Palette) {
    let [header, body, footer] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Min(3),
        Constraint::Length(2),
    ])
    .areas(frame.area());
    frame.render_widget(
        Paragraph::new(header_lines(screen, header.width, palette)),
        header,
    );
    let (table_area, detail_area) = match choices.detail && !screen.detail.is_empty() {
        true => {
            let height = (screen.detail.len() as u16 + 2).min(body.height / 2).max(3);
            let [table, detail] =
                Layout::vertical([Constraint::Min(3), Constraint::Length(height)]).areas(body);
            (table, Some(detail))
        }
        false => (body, None),
    };
    draw_table(frame, table_area, screen, choices, palette);
    if let Some(area) = detail_area {
        let lines: Vec<Line> = screen
            .detail
            .iter()
            .map(|l| Line::raw(l.as_str()))
            .collect();
        let block = Block::new()
            .borders(Borders::TOP)
            .title(" detail (Esc closes) ");
        frame.render_widget(Paragraph::new(lines).block(block), area);
    }
    frame.render_widget(
        Paragraph::new(footer_lines(screen, choices, palette)),
        footer,
    );
    if choices.help {
        draw_help(frame, body);
    }
}

fn header_lines(screen: &Screen, width: u16, palette: Palette) -> Vec<Line<'static>> {
    let totals = &screen.totals;
    let source = match totals.live {
        true => "live",
        false => "from /proc",
    };
    let states: Vec<String> = totals
        .by_state
        .iter()
        .map(|(state, n)| format!("{n} {state}"))
        .collect();
    let states = match states.is_empty() {
        true => "none".to_owned(),
        false => states.join(", "),
    };
    let title = format!("netwatch top · {}", screen.view.title());
    let first = Line::from(vec![
        Span::styled(title, palette.title()),
        Span::raw(format!(
            " · {source} · {} open: {states} · {} closed",
            totals.open, totals.closed_shown
        )),
    ]);
    let counts = format!(
        "opens {}/s closes {}/s ",
        totals.opens_per_second, totals.closes_per_second
    );
    let rates = format!(
        " · sent {}/s received {}/s",
        bytes(totals.rates.0),
        bytes(totals.rates.1)
    );
    // The sparkline takes what is left of the line, the last minute at most.
    let room = usize::from(width).saturating_sub(counts.chars().count() + rates.chars().count());
    let recent = &totals.sparkline[totals.sparkline.len().saturating_sub(room)..];
    let second = Line::raw(format!("{counts}{}{rates}", sparkline(recent)));
    vec![first, second]
}

/// Opens per second as a line of block characters, oldest first.
fn sparkline(values: &[u64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = values.iter().copied().max().unwrap_or(0).max(1);
    values
        .iter()
        .map(|&v| BARS[(v * 7).div_ceil(max) as usize])
        .collect()
}

/// The columns that fit `width`, the most useful first, in their order.
fn fitting(view: View, width: u16) -> Vec<usize> {
    let columns = view.columns();
    let mut by_rank: Vec<usize> = (0..columns.len()).collect();
    by_rank.sort_by_key(|&i| columns[i].rank);
    let mut used = 0u16;
    let mut kept = Vec::new();
    for i in by_rank {
        let needed = columns[i].width + u16::from(!kept.is_empty());
        if used + needed <= width {
            used += needed;
            kept.push(i);
        }
    }
    kept.sort_unstable();
    kept
}

fn draw_table(
    frame: &mut Frame<'_>,
    area: Rect,
    screen: &Screen,
    choices: &Choices,
    palette: Palette,
) {
    let columns = screen.view.columns();
    let kept = fitting(screen.view, area.width);
    let titles = kept.iter().map(|&i| {
        let mark = match (choices.sort == Some(i), choices.reversed) {
            (true, false) => "▼",
            (true, true) => "▲",
            _ => "",
        };
        format!("{}{mark}", columns[i].title)
    });
    let header = TableRow::new(titles).style(Style::new().add_modifier(Modifier::REVERSED));
    // The rows that fit, from where the selection stays on screen.
    let height = usize::from(area.height.saturating_sub(1)).max(1);
    let offset = screen.selected.saturating_sub(height - 1).max(screen.first);
    let visible = screen.rows.iter().skip(offset - screen.first).take(height);
    let rows = visible.map(|row| {
        let cells = kept.iter().map(|&i| row.cells[i].clone());
        let style = match row.closed {
            true => Style::new().add_modifier(Modifier::DIM),
            false => Style::new(),
        };
        TableRow::new(cells).style(style)
    });
    let widths = kept.iter().map(|&i| Constraint::Length(columns[i].width));
    let table = Table::new(rows, widths)
        .header(header)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED | Modifier::BOLD));
    let mut state = TableState::default();
    if !screen.rows.is_empty() {
        state.select(Some(screen.selected - offset));
    }
    frame.render_stateful_widget(table, area, &mut state);
    if screen.rows.is_empty() {
        let empty = match choices.active_filter() {
            "" => "no connection yet".to_owned(),
            filter => format!("nothing matches \"{filter}\""),
        };
        let [_, line] =
            Layout::vertical([Constraint::Length(2), Constraint::Length(1)]).areas(area);
        frame.render_widget(Paragraph::new(Span::styled(empty, palette.title())), line);
    }
}

fn footer_lines(screen: &Screen, choices: &Choices, palette: Palette) -> Vec<Line<'static>> {
    let totals = &screen.totals;
    let mut first = Vec::new();
    if totals.lost > 0 {
        first.push(Span::styled(
            format!(" LOST {} EVENTS: counts may be short ", totals.lost),
            palette.alarm(),
        ));
        first.push(Span::raw(" "));
    }
    if choices.paused {
        first.push(Span::styled(
            " PAUSED (Space resumes; counting goes on) ",
            palette.alarm(),
        ));
        first.push(Span::raw(" "));
    }
    match &choices.typing {
        Some(typing) => first.push(Span::raw(format!(
            "filter: {typing}_  (Enter keeps, Esc clears)"
        ))),
        None if !choices.filter.is_empty() => {
            first.push(Span::raw(format!("filter: {}", choices.filter)))
        }
        None => {}
    }
    if totals.closed_dropped > 0 {
        first.push(Span::raw(format!(
            " · {} closed rows dropped (cap)",
            totals.closed_dropped
        )));
    }
    let names = if choices.names { " · names" } else { "" };
    let second = match totals.live {
        true => format!(
            "{} rows · every {}{names} · ? help · q quit",
            screen.total,
            duration(choices.interval)
        ),
        false => format!(
            "{} rows · every {}{names} · without root: live events, closed connections, bytes and round-trip times need root or the service's capabilities · q quit",
            screen.total,
            duration(choices.interval)
        ),
    };
    vec![Line::from(first), Line::raw(second)]
}

fn draw_help(frame: &mut Frame<'_>, area: Rect) {
    let width = area.width.min(64);
    let height = area.height.min(KEYS.len() as u16 + 2);
    let popup = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    let lines: Vec<Line> = KEYS
        .iter()
        .map(|(key, what)| Line::raw(format!("{key:>9}  {what}")))
        .collect();
    frame.render_widget(Clear, popup);
    let block = Block::bordered().title(" keys (? or Esc closes) ");
    frame.render_widget(Paragraph::new(lines).block(block), popup);
}
