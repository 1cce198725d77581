//! For the unit tests that need root (loading programs, mounting, reading
//! what only root may): as an ordinary user they say so on one line and
//! pass, as root (`cargo xtask test`, CI) they run.

/// Whether the tests run as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether `test` may run; when not as root, says on stderr that it is skipped.
pub fn runs_as_root(test: &str) -> bool {
    if !is_root() {
        eprintln!("{test}: skipped, it needs root (cargo xtask test runs it as root)");
    }
    is_root()
}
