//! What the xtask binary shares with netwatch's integration tests: the
//! loopback load generator, the BPF programs of a process, running a
//! program with only some capabilities, CPU affinity, and the real servers
//! they run.

pub mod bpf_programs;
pub mod cpus;
pub mod least_privilege;
pub mod loopback;
pub mod servers;
