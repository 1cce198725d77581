//! Which CPUs the calling thread runs on.

use std::io;

/// The CPUs the calling thread may run on.
pub fn allowed() -> io::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is valid; the call fills it for this thread.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: reads within the set.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Runs the calling thread (and the threads it starts) on `cpus` only.
pub fn run_on(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: CPU_SET writes within the set (it ignores CPUs beyond it).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: sets the calling thread's affinity from a valid cpu_set_t.
    if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::other(format!(
            "running on CPUs {cpus:?} only failed: {}",
            io::Error::last_os_error()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_runs_where_it_is_put_and_back() {
        let allowed = allowed().unwrap();
        assert!(!allowed.is_empty());
        run_on(&allowed[..1]).unwrap();
        assert_eq!(super::allowed().unwrap(), allowed[..1]);
        run_on(&allowed).unwrap();
        assert_eq!(super::allowed().unwrap(), allowed);
    }
}
