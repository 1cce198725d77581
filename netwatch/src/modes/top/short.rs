//! Figures as short as a table cell wants them: times of day, durations,
//! round trips and byte counts.

use std::time::{Duration, SystemTime};

/// A wall time as the time of day (UTC) with microseconds.
pub fn clock(at: SystemTime) -> String {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = since.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60,
        since.subsec_micros()
    )
}

/// A duration, short: 350ms, 42s, 7m12s, 3h05m, 2d04h.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        _ => format!("{}d{:02}h", s / 86_400, s / 3600 % 24),
    }
}

/// A round-trip time in microseconds, short: 45us, 1.2ms, 38ms, 1.3s.
pub fn rtt(us: u32) -> String {
    match us {
        0..1000 => format!("{us}us"),
        1000..10_000 => format!("{:.1}ms", f64::from(us) / 1000.0),
        10_000..1_000_000 => format!("{}ms", us / 1000),
        _ => format!("{:.1}s", f64::from(us) / 1_000_000.0),
    }
}

/// A byte count or rate, short: 0, 512, 1.5K, 12M, 3.2G.
pub fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{}", value.round() as u64),
        _ if value < 10.0 => format!("{value:.1}{}", UNITS[unit]),
        _ => format!("{}{}", value.round() as u64, UNITS[unit]),
    }
}
