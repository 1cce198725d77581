//! aya's loader, without aya's own parse of the kernel's BTF.
//!
//! aya 0.14's `EbpfLoader::new()` reads and parses /sys/kernel/btf/vmlinux
//! (about 25 ms and 20 MiB here), even when `btf(None)` follows. netwatch
//! needs none of it: its programs have no CO-RE relocations, and `btf`
//! finds the offsets and attach points they need in one parse of its own.
//! So the loader is made on a short-lived thread in a private mount
//! namespace where /sys/kernel/btf is empty: aya finds no BTF there and
//! parses nothing. Where that namespace cannot be made (without
//! CAP_SYS_ADMIN), aya parses as it always does.

use std::io;

use aya::EbpfLoader;
use rustix::mount::{mount, mount_change, MountFlags, MountPropagationFlags};
use rustix::thread::UnshareFlags;

/// Where the kernel's BTF files are.
const KERNEL_BTF_DIR: &str = "/sys/kernel/btf";

/// An `EbpfLoader` with no kernel BTF, made without parsing it where possible.
pub fn ebpf_loader() -> EbpfLoader<'static> {
    let made = std::thread::spawn(|| {
        if let Err(err) = hide_kernel_btf() {
            log::debug!("aya parses the kernel's BTF: its directory cannot be hidden ({err})");
        }
        EbpfLoader::new()
    })
    .join();
    let mut loader = made.unwrap_or_else(|_| EbpfLoader::new());
    loader.btf(None);
    loader
}

/// Gives the calling thread a mount namespace of its own in which
/// /sys/kernel/btf is an empty directory. Nothing mounted there reaches the
/// host's namespace: the new namespace's mounts are made private first.
fn hide_kernel_btf() -> io::Result<()> {
    // SAFETY: a new mount namespace (and the fs context it implies) for
    // this thread only; unlike FILES, it changes no fd another thread uses.
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNS) }?;
    mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )?;
    mount(
        "none",
        KERNEL_BTF_DIR,
        "tmpfs",
        MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        None,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hiding_the_kernel_btf_leaves_the_host_and_other_threads_alone() {
        if !crate::root_tests::runs_as_root(
            "hiding_the_kernel_btf_leaves_the_host_and_other_threads_alone",
        ) {
            return;
        }
        let hidden = std::thread::spawn(|| {
            hide_kernel_btf().expect("root can make a mount namespace");
            std::fs::read_dir(KERNEL_BTF_DIR).unwrap().count()
        })
        .join()
        .unwrap();
        assert_eq!(hidden, 0, "the thread sees an empty directory");
        assert!(std::path::Path::new("/sys/kernel/btf/vmlinux").exists());
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(" /sys/kernel/btf "), "{mounts}");
    }
}
