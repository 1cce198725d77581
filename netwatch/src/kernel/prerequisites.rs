//! What must hold before the programs load: root or the capabilities, the
//! memlock limit, and where tracepoints (not raw ones) are used, tracefs
//! and their records' layout.

use std::io;
use std::path::Path;

use netwatch_common::tracepoint;

/// Where tracefs is mounted on current systems.
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// The state tracepoint's format file, under tracefs.
pub const FORMAT: &str = "events/sock/inet_sock_set_state/format";

/// What is missing for the programs to load, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum PrerequisiteError {
    #[error("netwatch needs root (CAP_BPF and CAP_PERFMON) to load its eBPF programs: run it with sudo, or use `netwatch snapshot`, which needs no root")]
    NotRoot,
    #[error("netwatch lacks {0} to load its eBPF programs (it needs CAP_BPF and CAP_PERFMON, or root): grant it, or use `netwatch snapshot`, which needs neither")]
    MissingCapability(String),
    #[error("tracefs is not mounted at {TRACEFS} and mounting it failed ({0}): mount it with `mount -t tracefs tracefs {TRACEFS}`")]
    NoTracefs(io::Error),
    #[error("tracefs at {TRACEFS}, which holds the tracepoints' ids and layouts, is not readable by this user: grant CAP_DAC_READ_SEARCH, or run netwatch as root")]
    TracefsUnreadable,
    #[error(
        "this kernel has no sock:inet_sock_set_state tracepoint (it needs Linux 4.16 or later)"
    )]
    NoTracepoint,
    #[error("the sock:inet_sock_set_state tracepoint has an unexpected layout ({0}); this kernel is not supported")]
    Layout(String),
}

/// The capabilities loading and attaching the programs needs, by bit number.
const NEEDED_CAPABILITIES: [(u32, &str); 2] = [(39, "CAP_BPF"), (38, "CAP_PERFMON")];

/// Loading the programs needs CAP_BPF and CAP_PERFMON: root's, or a
/// service's. Without either, the error says root; with only one, it names
/// the one missing.
pub(super) fn check_capabilities() -> Result<(), PrerequisiteError> {
    let effective = own_effective_capabilities();
    let missing: Vec<&str> = NEEDED_CAPABILITIES
        .iter()
        .filter(|(bit, _)| effective & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    match missing.len() {
        0 => Ok(()),
        n if n == NEEDED_CAPABILITIES.len() => Err(PrerequisiteError::NotRoot),
        _ => Err(PrerequisiteError::MissingCapability(missing.join(" and "))),
    }
}

/// CAP_SYS_PTRACE: reading another user's /proc/PID/exe needs it.
const CAP_SYS_PTRACE: u32 = 19;

/// Whether this process may read every process's /proc/PID/exe.
pub(super) fn reads_every_exe() -> bool {
    own_effective_capabilities() & (1 << CAP_SYS_PTRACE) != 0
}

/// This process's effective capability set (0 if it cannot be read).
fn own_effective_capabilities() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    effective_capabilities(&status)
}

/// The effective capability set of a /proc/PID/status text (0 if absent).
fn effective_capabilities(status: &str) -> u64 {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0)
}

/// Mounts tracefs when it is missing (which needs root).
pub(super) fn ensure_tracefs() -> Result<(), PrerequisiteError> {
    let events = Path::new(TRACEFS).join("events");
    match std::fs::metadata(&events) {
        Ok(meta) if meta.is_dir() => return tracepoint_present(&events),
        Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
            return Err(PrerequisiteError::TracefsUnreadable)
        }
        _ => {}
    }
    let target = c"/sys/kernel/tracing";
    // SAFETY: every pointer is a valid NUL-terminated string; data may be null.
    let ret = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(PrerequisiteError::NoTracefs(io::Error::last_os_error()));
    }
    tracepoint_present(&events)
}

fn tracepoint_present(events: &Path) -> Result<(), PrerequisiteError> {
    if events.join("sock/inet_sock_set_state").is_dir() {
        Ok(())
    } else {
        Err(PrerequisiteError::NoTracepoint)
    }
}

/// Compares the tracepoint's format file with the offsets the program reads.
pub(super) fn check_layout(format: &Path) -> Result<(), PrerequisiteError> {
    let text = std::fs::read_to_string(format).map_err(|err| {
        PrerequisiteError::Layout(format!("cannot read {}: {err}", format.display()))
    })?;
    layout_mismatch(&text).map_or(Ok(()), |mismatch| Err(PrerequisiteError::Layout(mismatch)))
}

/// The first field of inet_sock_set_state whose offset or size differs from netwatch-common's.
fn layout_mismatch(format: &str) -> Option<String> {
    fields_mismatch(format, &tracepoint::FIELDS)
}

/// The first of `fields` (name, offset, size) whose offset or size in a
/// tracepoint's format file differs, if any.
pub(super) fn fields_mismatch(format: &str, fields: &[(&str, usize, usize)]) -> Option<String> {
    for &(name, offset, size) in fields {
        let found = format.lines().find_map(|line| {
            let (declaration, rest) = line.trim().strip_prefix("field:")?.split_once(';')?;
            let field = declaration.rsplit([' ', '*']).next()?;
            let field = field.split('[').next()?;
            (field == name).then_some(rest)
        });
        let Some(rest) = found else {
            return Some(format!("field {name} is missing"));
        };
        let expected = format!("offset:{offset};\tsize:{size};");
        if !rest.trim().starts_with(&expected) {
            return Some(format!(
                "field {name} is at {}, expected {expected}",
                rest.trim()
            ));
        }
    }
    None
}

/// Older kernels charge BPF maps to RLIMIT_MEMLOCK.
pub(super) fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit; failure only matters on old kernels.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT_6_18: &str = "name: inet_sock_set_state
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;
";

    #[test]
    fn the_effective_capabilities_are_read_from_the_status() {
        let status = "Name:\tnetwatch\nCapInh:\t0000000000000000\nCapEff:\t000000c000000000\n";
        let effective = effective_capabilities(status);
        assert!(NEEDED_CAPABILITIES
            .iter()
            .all(|(bit, _)| effective & (1 << bit) != 0));
        assert_eq!(effective_capabilities("Name:\tx\n"), 0);
        // Root has every capability; an ordinary user none of them.
        assert_eq!(check_capabilities().is_ok(), crate::root_tests::is_root());
    }

    #[test]
    fn the_documented_layout_matches() {
        assert_eq!(layout_mismatch(FORMAT_6_18), None);
    }

    #[test]
    fn a_moved_or_missing_field_is_reported() {
        let moved = FORMAT_6_18.replace("offset:24;\tsize:2", "offset:26;\tsize:2");
        assert!(layout_mismatch(&moved).unwrap().contains("sport"));
        let missing = FORMAT_6_18.replace("saddr_v6", "other");
        assert!(layout_mismatch(&missing)
            .unwrap()
            .contains("saddr_v6 is missing"));
    }

    #[test]
    fn this_kernel_has_the_expected_layout() {
        if !crate::root_tests::runs_as_root("this_kernel_has_the_expected_layout") {
            return;
        }
        let format = Path::new(TRACEFS).join(FORMAT);
        if !format.exists() {
            ensure_tracefs().expect("tests run as root and can mount tracefs");
        }
        check_layout(&format).expect("the running kernel's layout matches");
    }
}
