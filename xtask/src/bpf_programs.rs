//! The BPF programs a process holds, as bpftool describes them: the
//! benchmarks read their counters, and so do the tests (several netwatch
//! processes may run at once, each with programs of the same names).

use std::collections::HashSet;
use std::process::Command;

/// What `bpftool prog show --json` says of each BPF program a process holds.
pub fn programs_of(pid: u32) -> Vec<serde_json::Value> {
    let Ok(output) = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
    else {
        return Vec::new();
    };
    let Ok(serde_json::Value::Array(programs)) = serde_json::from_slice(&output.stdout) else {
        return Vec::new();
    };
    let ids = bpf_prog_ids_of(pid);
    programs
        .into_iter()
        .filter(|prog| prog["id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .collect()
}

/// Ids of the BPF programs among a process's fds (from /proc/PID/fdinfo).
fn bpf_prog_ids_of(pid: u32) -> HashSet<u64> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return HashSet::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect()
}
