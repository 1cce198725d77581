//! A record's fields written as bytes into a reused buffer, without serde
//! or `core::fmt` on the common path: JSON strings and numbers, addresses,
//! RFC 3339 times and text padded to a column. Each writes exactly what the
//! serde or `Display` form it replaces writes (see the tests).

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

/// A JSON string, quoted and escaped as serde_json escapes it: `"`, `\`
/// and the control characters below 0x20, nothing else.
pub fn json_str(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    let bytes = text.as_bytes();
    let mut start = 0;
    for (at, &byte) in bytes.iter().enumerate() {
        if byte >= 0x20 && byte != b'"' && byte != b'\\' {
            continue;
        }
        out.extend_from_slice(&bytes[start..at]);
        start = at + 1;
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0xf)]);
            }
        }
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// A JSON string, or `null`.
pub fn json_opt_str(out: &mut Vec<u8>, text: Option<&str>) {
    match text {
        Some(text) => json_str(out, text),
        None => out.extend_from_slice(b"null"),
    }
}

/// Appends what `write` puts at the start of a room of `N` bytes, of which
/// it returns the length: the room is copied whole, a copy of constant
/// size that compiles to a few moves, and cut back. Copying a slice of
/// varying length calls `memmove`, which cost the stream a fifth of its
/// user time in copies of a few bytes.
fn append<const N: usize>(out: &mut Vec<u8>, write: impl FnOnce(&mut [u8; N]) -> usize) {
    let mut room = [0u8; N];
    let len = write(&mut room);
    append_prefix(out, &room, len);
}

/// Appends the first `len` bytes of `room` (all of it, if `len` is past
/// its end) by copying it whole, a copy of constant size, and cutting back.
pub fn append_prefix<const N: usize>(out: &mut Vec<u8>, room: &[u8; N], len: usize) {
    out.extend_from_slice(room);
    out.truncate(out.len() - (N - len.min(N)));
}

/// Writes `value`'s decimal digits at the start of `room`; returns how many.
fn decimal(room: &mut [u8; 20], value: u64) -> usize {
    let digits = value.checked_ilog10().map_or(1, |log| log as usize + 1);
    let (mut rest, mut at) = (value, digits);
    // Two digits at a time, from the last.
    while at >= 2 {
        let pair = 2 * (rest % 100) as usize;
        room[at - 2..at].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
        rest /= 100;
        at -= 2;
    }
    if at == 1 {
        room[0] = b'0' + rest as u8;
    }
    digits
}

/// `value`'s last `W` decimal digits, with leading zeros: those of
/// `10^W + value` but its first.
fn zero_padded<const W: usize>(value: u64) -> [u8; W] {
    let mut digits = [0u8; 20];
    decimal(
        &mut digits,
        10u64.pow(W as u32) + value % 10u64.pow(W as u32),
    );
    let mut padded = [0u8; W];
    padded.copy_from_slice(&digits[1..=W]);
    padded
}

/// "00" to "99".
const DIGIT_PAIRS: [u8; 200] = {
    let mut pairs = [0u8; 200];
    let mut pair = 0;
    while pair < 100 {
        pairs[2 * pair] = b'0' + (pair / 10) as u8;
        pairs[2 * pair + 1] = b'0' + (pair % 10) as u8;
        pair += 1;
    }
    pairs
};

/// An integer in decimal.
pub fn integer(out: &mut Vec<u8>, value: impl Into<u64>) {
    let value = value.into();
    append(out, |room| decimal(room, value));
}

/// A JSON integer, or `null`.
pub fn json_opt_integer(out: &mut Vec<u8>, value: Option<impl Into<u64>>) {
    match value {
        Some(value) => integer(out, value),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON number as serde_json writes an `f64` (shortest round trip), or
/// `null` for none or a value JSON cannot carry.
pub fn json_opt_f64(out: &mut Vec<u8>, value: Option<f64>) {
    match value.filter(|value| value.is_finite()) {
        Some(value) => match whole_millionths(value) {
            Some(millionths) => append(out, |room| millionths_text(room, millionths)),
            None => out.extend_from_slice(zmij::Buffer::new().format_finite(value).as_bytes()),
        },
        None => out.extend_from_slice(b"null"),
    }
}

/// `n` where `value` is the double nearest `n / 10^6` (milliseconds from
/// nanoseconds, as the stream's times are) with `10 <= n < 10^15`: its
/// exact decimal then has at most 15 significant digits, and no other
/// decimal of that many or fewer digits reads back as the same double (a
/// double tells any two of 15 digits apart), so it is the shortest text
/// that round-trips, the one serde_json writes. From 10 on it is written
/// without an exponent (zmij uses one below 10^-5).
fn whole_millionths(value: f64) -> Option<u64> {
    if !(1e-5..1e9).contains(&value) {
        return None;
    }
    // Adding a half and cutting is `round()` but at ties (which the check
    // below then sends to zmij), without a call into libm.
    let millionths = (value * 1e6 + 0.5) as u64;
    ((10..1_000_000_000_000_000).contains(&millionths) && millionths as f64 / 1e6 == value)
        .then_some(millionths)
}

/// `millionths / 10^6` in decimal: the whole part, a point, and the
/// fraction without trailing zeros (`.0` when it is zero).
fn millionths_text(room: &mut [u8; 32], millionths: u64) -> usize {
    let mut whole = [0u8; 20];
    let digits = decimal(&mut whole, millionths / 1_000_000);
    room[..20].copy_from_slice(&whole);
    room[digits] = b'.';
    let fraction = millionths % 1_000_000;
    if fraction == 0 {
        room[digits + 1] = b'0';
        return digits + 2;
    }
    room[digits + 1..digits + 7].copy_from_slice(&zero_padded::<6>(fraction));
    let mut end = digits + 7;
    while room[end - 1] == b'0' {
        end -= 1;
    }
    end
}

/// An address as `IpAddr`'s `Display` writes it.
pub fn ip(out: &mut Vec<u8>, addr: IpAddr) {
    match addr {
        IpAddr::V4(addr) => ipv4(out, addr),
        IpAddr::V6(addr) => ipv6(out, addr),
    }
}

/// Dotted IPv4, built on the stack from a table of the 256 octets'
/// digits and appended at once: a copy per octet cost a fifth of the
/// stream's user time.
fn ipv4(out: &mut Vec<u8>, addr: Ipv4Addr) {
    append(out, |text: &mut [u8; 16]| {
        let mut len = 0;
        for (at, octet) in addr.octets().into_iter().enumerate() {
            if at > 0 {
                text[len] = b'.';
                len += 1;
            }
            let (digits, count) = OCTETS[usize::from(octet)];
            text[len..len + 3].copy_from_slice(&digits);
            len += usize::from(count);
        }
        len
    });
}

/// Each octet's decimal digits (padded to 3) and how many there are.
const OCTETS: [([u8; 3], u8); 256] = {
    let mut table = [([0u8; 3], 0u8); 256];
    let mut octet = 0;
    while octet < 256 {
        let (hundreds, tens, ones) = (octet / 100, octet / 10 % 10, octet % 10);
        table[octet] = if octet >= 100 {
            (
                [b'0' + hundreds as u8, b'0' + tens as u8, b'0' + ones as u8],
                3,
            )
        } else if octet >= 10 {
            ([b'0' + tens as u8, b'0' + ones as u8, 0], 2)
        } else {
            ([b'0' + ones as u8, 0, 0], 1)
        };
        octet += 1;
    }
    table
};

/// RFC 5952, as std writes it: IPv4-mapped addresses in dotted form, the
/// first longest run of two or more zero groups as `::`, hex in lower case.
fn ipv6(out: &mut Vec<u8>, addr: Ipv6Addr) {
    if let Some(v4) = addr.to_ipv4_mapped() {
        out.extend_from_slice(b"::ffff:");
        return ipv4(out, v4);
    }
    let groups = addr.segments();
    let (mut longest, mut current) = ((0, 0), (0, 0));
    for (at, &group) in groups.iter().enumerate() {
        if group != 0 {
            current = (0, 0);
            continue;
        }
        if current.1 == 0 {
            current.0 = at;
        }
        current.1 += 1;
        if current.1 > longest.1 {
            longest = current;
        }
    }
    if longest.1 > 1 {
        hex_groups(out, &groups[..longest.0]);
        out.extend_from_slice(b"::");
        hex_groups(out, &groups[longest.0 + longest.1..]);
    } else {
        hex_groups(out, &groups);
    }
}

fn hex_groups(out: &mut Vec<u8>, groups: &[u16]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (at, &group) in groups.iter().enumerate() {
        if at > 0 {
            out.push(b':');
        }
        let digits = (4 - group.leading_zeros() as usize / 4).max(1);
        for shift in (0..digits).rev() {
            out.push(HEX[usize::from((group >> (shift * 4)) & 0xf)]);
        }
    }
}

/// `addr:port` as [`crate::model::Endpoint`] writes it: IPv6 in brackets, port 0 as `*`.
pub fn endpoint(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => ipv4(out, ip),
        IpAddr::V6(ip) => {
            out.push(b'[');
            ipv6(out, ip);
            out.push(b']');
        }
    }
    out.push(b':');
    match addr.port() {
        0 => out.push(b'*'),
        port => integer(out, port),
    }
}

/// Pads a field just written, `chars` characters long, with spaces to
/// `width` characters, as `{:<width}` does.
pub fn pad_from(out: &mut Vec<u8>, chars: usize, width: usize) {
    out.resize(out.len() + width.saturating_sub(chars), b' ');
}

/// Writes `bytes` (ASCII) left-aligned in `width`.
pub fn cell(out: &mut Vec<u8>, bytes: &[u8], width: usize) {
    out.extend_from_slice(bytes);
    pad_from(out, bytes.len(), width);
}

/// Text from a process made safe for a terminal, as
/// [`super::Printable`] shows it (control characters escaped); returns
/// how many characters it wrote.
pub fn printable(out: &mut Vec<u8>, text: &str) -> usize {
    if text.bytes().all(|byte| (0x20..0x7f).contains(&byte)) {
        out.extend_from_slice(text.as_bytes());
        return text.len();
    }
    let mut chars = 0;
    let mut utf8 = [0u8; 4];
    for c in text.chars() {
        if c.is_control() {
            for escaped in c.escape_default() {
                out.push(escaped as u8);
                chars += 1;
            }
        } else {
            out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            chars += 1;
        }
    }
    chars
}

/// A number of milliseconds as `{:>7.3}` writes it: three decimals,
/// rounded half to even on the exact binary value, right-aligned in 7.
pub fn fixed3_right7(out: &mut Vec<u8>, value: f64) {
    let Some(thousandths) = thousandths(value) else {
        // Negative, huge or not finite: never a time in a state.
        let _ = write!(out, "{value:>7.3}");
        return;
    };
    append(out, |room: &mut [u8; 24]| {
        let mut whole = [0u8; 20];
        let digits = decimal(&mut whole, thousandths / 1000);
        // Below 10^12: at most 12 digits, and at most 3 spaces before them.
        let pad = 7usize.saturating_sub(digits + 4);
        room[..pad].fill(b' ');
        room[pad..pad + 20].copy_from_slice(&whole);
        let point = pad + digits;
        room[point] = b'.';
        room[point + 1..point + 4].copy_from_slice(&zero_padded::<3>(thousandths % 1000));
        point + 4
    });
}

/// `value * 1000` rounded half to even, exactly as `{:.3}` rounds, for a
/// non-negative finite value below 10^12.
fn thousandths(value: f64) -> Option<u64> {
    if !(0.0..1e12).contains(&value) || value.is_sign_negative() {
        return None;
    }
    let scaled = value * 1000.0;
    let floor = scaled.floor();
    let tie = floor + 0.5;
    // The product was rounded: near the tie, its sign comes from the
    // fused multiply-add, which rounds once, after the exact difference.
    let above = match scaled - tie {
        near if near.abs() < 1e-3 => value.mul_add(1000.0, -tie),
        far => far,
    };
    let floor = floor as u64;
    Some(if above > 0.0 || (above == 0.0 && floor % 2 == 1) {
        floor + 1
    } else {
        floor
    })
}

/// RFC 3339 in UTC with microseconds, as `humantime::format_rfc3339_micros`
/// writes it, with the date and time of day formatted once per second.
#[derive(Debug, Default)]
pub struct RfcTime {
    /// The second last formatted, and its text (`YYYY-MM-DDTHH:MM:SS`).
    second: Option<(u64, [u8; 19])>,
}

impl RfcTime {
    /// Writes `time` (27 bytes).
    pub fn write(&mut self, out: &mut Vec<u8>, time: SystemTime) {
        let Ok(since) = time.duration_since(UNIX_EPOCH) else {
            let _ = write!(out, "{}", humantime::format_rfc3339_micros(time));
            return;
        };
        let second = since.as_secs();
        let text = match self.second {
            Some((cached, text)) if cached == second => text,
            _ => {
                let text = seconds_text(UNIX_EPOCH + std::time::Duration::from_secs(second));
                self.second = Some((second, text));
                text
            }
        };
        let mut stamp = [0u8; 27];
        stamp[..19].copy_from_slice(&text);
        stamp[19] = b'.';
        stamp[20..26].copy_from_slice(&zero_padded::<6>(u64::from(since.subsec_micros())));
        stamp[26] = b'Z';
        out.extend_from_slice(&stamp);
    }
}

/// `YYYY-MM-DDTHH:MM:SS` of a whole second.
fn seconds_text(second: SystemTime) -> [u8; 19] {
    let mut text = [b'0'; 19];
    let mut cursor = std::io::Cursor::new(&mut text[..]);
    // 19 bytes for every year humantime formats (up to 9999); a later one
    // is cut, as no clock here reaches it.
    let _ = write!(cursor, "{}", humantime::format_rfc3339_seconds(second));
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn written(write: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        write(&mut out);
        String::from_utf8(out).expect("UTF-8")
    }

    proptest! {
        #[test]
        fn strings_escape_as_serde_json_does(text in any::<String>(), control in 0u8..0x20) {
            let text = format!("{text}{}\"\\", char::from(control));
            prop_assert_eq!(written(|out| json_str(out, &text)), serde_json::to_string(&text).unwrap());
        }

        #[test]
        fn addresses_are_written_as_std_displays_them(v6 in any::<[u16; 8]>(), zeros in 0usize..8, run in 0usize..8, port in any::<u16>()) {
            let mut groups = v6;
            for group in groups.iter_mut().skip(zeros).take(run) {
                *group = 0;
            }
            let addr = IpAddr::V6(Ipv6Addr::from(groups));
            prop_assert_eq!(written(|out| ip(out, addr)), addr.to_string());
            let v4 = IpAddr::V4(Ipv4Addr::from(u32::from(v6[0]) << 16 | u32::from(v6[1])));
            prop_assert_eq!(written(|out| ip(out, v4)), v4.to_string());
            for addr in [addr, v4] {
                let socket = SocketAddr::new(addr, port);
                prop_assert_eq!(written(|out| endpoint(out, socket)), crate::model::format_endpoint(socket));
            }
        }

        #[test]
        fn milliseconds_round_as_fmt_does(ns in 0u64..(1 << 53), thousandth in 0u64..1_000_000_000, float in any::<f64>()) {
            // From nanoseconds (what the stream shows), exact ties, and any value.
            let tie = (thousandth as f64 + 0.5) / 1000.0;
            for ms in [ns as f64 / 1e6, tie, float] {
                prop_assert_eq!(written(|out| fixed3_right7(out, ms)), format!("{ms:>7.3}"));
            }
        }

        #[test]
        fn floats_are_written_as_serde_json_does(ms in any::<f64>(), ns in 0u64..(1 << 53), small in 0u64..10_000_000) {
            // Any value, and milliseconds from nanoseconds (the stream's), short ones most.
            for ms in [ms, ns as f64 / 1e6, small as f64 / 1e6, ms.abs() % 1e9] {
                prop_assert_eq!(written(|out| json_opt_f64(out, Some(ms))), serde_json::to_string(&ms).unwrap());
            }
        }

        #[test]
        fn integers_are_written_as_display_does(value in any::<u64>(), bits in 0u32..64) {
            for value in [value, value >> bits] {
                prop_assert_eq!(written(|out| integer(out, value)), value.to_string());
            }
        }

        #[test]
        fn times_are_written_as_humantime_does(micros in 0u64..253_402_300_799_000_000) {
            let time = UNIX_EPOCH + std::time::Duration::from_micros(micros);
            let mut clock = RfcTime::default();
            let expected = humantime::format_rfc3339_micros(time).to_string();
            prop_assert_eq!(written(|out| clock.write(out, time)), expected.clone());
            prop_assert_eq!(written(|out| clock.write(out, time)), expected, "from the cached second");
        }

        #[test]
        fn printable_text_is_escaped_as_printable_shows_it(text in any::<String>()) {
            let mut out = Vec::new();
            let chars = printable(&mut out, &text);
            let expected = super::super::Printable(&text).to_string();
            prop_assert_eq!(chars, expected.chars().count());
            prop_assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }

    #[test]
    fn edge_numbers() {
        for value in [0, 9, 10, 99, 100, u64::from(u16::MAX), u64::MAX] {
            assert_eq!(written(|out| integer(out, value)), value.to_string());
        }
        for ns in [
            0u64,
            1,
            9,
            10,
            11,
            100_000,
            1_000_000,
            1_000_001,
            1_500_000,
            999_999_999_999_999,
            1_000_000_000_000_000,
            (1 << 53) - 1,
        ] {
            let ms = ns as f64 / 1e6;
            assert_eq!(
                written(|out| json_opt_f64(out, Some(ms))),
                serde_json::to_string(&ms).unwrap()
            );
        }
        for ms in [1e-5, 0.1 + 0.2, 1e9, -1.5, 5e-324, f64::MAX] {
            assert_eq!(
                written(|out| json_opt_f64(out, Some(ms))),
                serde_json::to_string(&ms).unwrap()
            );
        }
    }

    #[test]
    fn edge_addresses_and_ties() {
        for addr in [
            "::",
            "::1",
            "1::",
            "::ffff:0.0.0.0",
            "0:0:1::",
            "1:0:0:1:0:0:0:1",
        ] {
            let addr: IpAddr = addr.parse().unwrap();
            assert_eq!(written(|out| ip(out, addr)), addr.to_string());
        }
        for ms in [
            0.0,
            0.0625,
            0.0005,
            2.0005,
            0.0015,
            999_999.999_5,
            1e12,
            -0.0,
            f64::NAN,
        ] {
            assert_eq!(written(|out| fixed3_right7(out, ms)), format!("{ms:>7.3}"));
        }
    }
}
