//! The owner's cgroup (v2), and the systemd unit and container its path
//! names, in audit records and the stream's JSON, and the `--unit` and
//! `--container` filters: processes moved into cgroups this test makes,
//! one named like a systemd service, one like a Docker container's scope.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::cmdline::{conns_on, Connector};
use crate::support::Watch;

/// Where cgroup2 is mounted (/sys/fs/cgroup/unified on a hybrid hierarchy).
fn cgroup2_root() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("readable");
    mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let point = mount.split_whitespace().nth(4)?;
            (fs.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(point))
        })
        .expect("cgroup2 is mounted")
}

/// A cgroup this test made, removed when dropped (once its processes left).
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn make(root: &Path, name: &str) -> TestCgroup {
        let dir = root.join(name);
        std::fs::create_dir(&dir).expect("root makes a cgroup");
        TestCgroup(dir)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn records_name_the_owners_cgroup_unit_and_container_and_filter_by_them() {
    let root = cgroup2_root();
    let unit = format!("netwatch-test-{}.service", std::process::id());
    let container = format!("{:016x}", u64::from(std::process::id())).repeat(4);
    let scope = format!("docker-{container}.scope");
    let service_cgroup = TestCgroup::make(&root, &unit);
    let container_cgroup = TestCgroup::make(&root, &scope);

    let mut stream = Watch::start(&["--unit", &unit]);
    let mut audit = Watch::spawn(&["audit", "--container", &container[..12]]);
    let mut in_service = Connector::spawn_in_cgroup(&service_cgroup.0);
    let mut in_container = Connector::spawn_in_cgroup(&container_cgroup.0);
    in_service.connect();
    in_container.connect();
    let (service_port, container_port) = (in_service.port, in_container.port);
    let on = |port: u16| move |r: &Value| r["local_port"] == port || r["remote_port"] == port;
    stream.wait_until(|records| records.iter().filter(|r| on(service_port)(r)).count() >= 6);
    audit.wait_until(|records| conns_on(records, container_port).len() == 2);
    in_service.exit();
    in_container.exit();
    let streamed = stream.stop().records;
    let audited = audit.stop().records;

    let transitions: Vec<&Value> = streamed.iter().filter(|r| r["type"] == "state").collect();
    assert!(transitions.iter().any(|r| on(service_port)(r)));
    for record in transitions {
        assert_eq!(
            record["unit"],
            unit.as_str(),
            "--unit lets only its unit through: {record}"
        );
        assert_eq!(record["cgroup"], format!("/{unit}"), "{record}");
        assert_eq!(record["container"], Value::Null, "{record}");
    }
    let socket_records: Vec<&Value> = audited
        .iter()
        .filter(|r| r["type"] == "conn" || r["type"] == "listen")
        .collect();
    assert_eq!(conns_on(&audited, container_port).len(), 2);
    for record in socket_records {
        assert_eq!(
            record["container"],
            container.as_str(),
            "--container lets only its container through: {record}"
        );
        assert_eq!(record["unit"], scope.as_str(), "{record}");
        assert_eq!(record["cgroup"], format!("/{scope}"), "{record}");
    }
}
