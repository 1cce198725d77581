//! What the xtask binary shares with netwatch's integration tests: the
//! loopback load generator, the BPF programs of a process, and running a
//! program with only some capabilities.

pub mod bpf_programs;
pub mod least_privilege;
pub mod loopback;
