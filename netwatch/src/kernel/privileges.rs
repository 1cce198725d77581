//! Fewer privileges once the programs are attached: netwatch keeps the
//! capabilities it still uses and sets no_new_privs.

use std::io;

/// What netwatch still uses once attached, by capability number: CAP_BPF
/// and CAP_PERFMON for its maps and the iterators of resyncs and checks,
/// CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH to read other processes' /proc
/// entries (fds, namespaces) where the kernel's iterators cannot.
pub const STILL_USED: [(u32, &str); 4] = [
    (39, "CAP_BPF"),
    (38, "CAP_PERFMON"),
    (19, "CAP_SYS_PTRACE"),
    (2, "CAP_DAC_READ_SEARCH"),
];

/// `_LINUX_CAPABILITY_VERSION_3`: 64 capability bits in two words.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// prctl options (linux/prctl.h).
const PR_SET_NO_NEW_PRIVS: libc::c_int = 38;
const PR_CAP_AMBIENT: libc::c_int = 47;
const PR_CAP_AMBIENT_CLEAR_ALL: libc::c_ulong = 4;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops every capability but those of `STILL_USED` the process has, from
/// the effective, permitted, inheritable and ambient sets, and sets
/// no_new_privs (nothing it runs can gain any). Returns the names of those kept.
pub fn keep_only_what_is_still_used() -> io::Result<Vec<&'static str>> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData for version 3; both live here.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let permitted = u64::from(data[0].permitted) | u64::from(data[1].permitted) << 32;
    let wanted = STILL_USED.iter().fold(0u64, |set, (bit, _)| set | 1 << bit);
    let kept = permitted & wanted;
    for (word, part) in data.iter_mut().enumerate() {
        let bits = (kept >> (32 * word)) as u32;
        *part = CapData {
            effective: bits,
            permitted: bits,
            inheritable: 0,
        };
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: capset reads the header and two CapData, all live here.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(STILL_USED
        .iter()
        .filter(|(bit, _)| kept & 1 << bit != 0)
        .map(|(_, name)| *name)
        .collect())
}
