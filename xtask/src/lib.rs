//! What the xtask binary shares with netwatch's integration tests: the
//! loopback load generator, and the BPF programs of a process.

pub mod bpf_programs;
pub mod loopback;
