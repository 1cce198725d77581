//! What the xtask binary shares with netwatch's integration tests: the
//! loopback load generator, the BPF programs of a process, running a
//! program with only some capabilities, and CPU affinity.

pub mod bpf_programs;
pub mod cpus;
pub mod least_privilege;
pub mod loopback;
