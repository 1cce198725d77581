//! Cgroup (v2) paths: from the id the kernel gives (the inode number of the
//! cgroup's directory in the cgroup2 mount), or from /proc/PID/cgroup.
//!
//! The cgroup2 mount is found in /proc/self/mountinfo, not assumed at
//! /sys/fs/cgroup: a hybrid hierarchy mounts it at /sys/fs/cgroup/unified.
//! Ids are resolved by walking that tree once, and again when an id is not
//! known yet (a cgroup made since), at most every `REWALK_AFTER`; paths
//! already known stay, so that a cgroup removed before its connections
//! closed still names them.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::model::Cgroup;

/// The least time between two walks of the tree.
const REWALK_AFTER: Duration = Duration::from_millis(100);

/// The cgroups seen so far, by id.
#[derive(Default)]
struct Known {
    cgroups: HashMap<u64, Arc<Cgroup>>,
    walked: Option<Instant>,
}

/// The cgroup with this id, if it exists (or existed) under the cgroup2 mount.
pub fn cgroup_of_id(id: u64) -> Option<Arc<Cgroup>> {
    static KNOWN: OnceLock<Mutex<Known>> = OnceLock::new();
    let root = cgroup2_root()?;
    let mut known = KNOWN.get_or_init(Mutex::default).lock().ok()?;
    if let Some(cgroup) = known.cgroups.get(&id) {
        return Some(cgroup.clone());
    }
    if known.walked.is_some_and(|at| at.elapsed() < REWALK_AFTER) {
        return None;
    }
    known.walked = Some(Instant::now());
    walk(root, root, &mut known.cgroups);
    known.cgroups.get(&id).cloned()
}

/// The cgroup (v2) a /proc/PID/cgroup file names, on its `0::PATH` line.
pub fn cgroup_in_proc_file(contents: &[u8]) -> Option<Arc<Cgroup>> {
    let lines = std::str::from_utf8(contents).ok()?;
    let path = lines.lines().find_map(|line| line.strip_prefix("0::"))?;
    Some(Arc::new(Cgroup::from_path(path)))
}

/// Where cgroup2 is mounted, once per process; `None` where it is not.
fn cgroup2_root() -> Option<&'static Path> {
    static ROOT: OnceLock<Option<PathBuf>> = OnceLock::new();
    ROOT.get_or_init(|| {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        mountinfo.lines().find_map(cgroup2_mount_point)
    })
    .as_deref()
}

/// The mount point of a mountinfo line, if it mounts cgroup2: the fifth
/// field, and the type after the ` - ` separator.
fn cgroup2_mount_point(line: &str) -> Option<PathBuf> {
    let (mount, fs) = line.split_once(" - ")?;
    if fs.split_whitespace().next()? != "cgroup2" {
        return None;
    }
    let point = mount.split_whitespace().nth(4)?;
    // Spaces and the like are octal-escaped (\040).
    Some(PathBuf::from(point.replace("\\040", " ")))
}

/// Adds every cgroup under `dir` (and `dir` itself) by its inode number.
fn walk(root: &Path, dir: &Path, cgroups: &mut HashMap<u64, Arc<Cgroup>>) {
    let Ok(metadata) = std::fs::metadata(dir) else {
        return;
    };
    cgroups.entry(metadata.ino()).or_insert_with(|| {
        let relative = dir.strip_prefix(root).unwrap_or(dir);
        Arc::new(Cgroup::from_path(&format!("/{}", relative.display())))
    });
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            walk(root, &entry.path(), cgroups);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_in_mountinfo() {
        let hybrid = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";
        assert_eq!(
            cgroup2_mount_point(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let v1 = "34 31 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory";
        assert_eq!(cgroup2_mount_point(v1), None);
    }

    #[test]
    fn this_process_has_the_cgroup_its_id_names() {
        let own = std::fs::read("/proc/self/cgroup").expect("readable");
        let Some(own) = cgroup_in_proc_file(&own) else {
            return assert!(cgroup2_root().is_none(), "no 0:: line, yet a cgroup2 mount");
        };
        let root = cgroup2_root().expect("a cgroup2 mount");
        let dir = root.join(own.path.trim_start_matches('/'));
        let id = std::fs::metadata(dir).expect("its directory").ino();
        assert_eq!(cgroup_of_id(id), Some(own));
    }
}
