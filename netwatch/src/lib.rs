//! netwatch: a TCP connection monitor. A /proc snapshot (`snapshot`) is kept
//! current by an eBPF program on TCP state changes (`ebpf`, `table`, `watch`).

pub mod btf;
pub mod cli;
pub mod ebpf;
pub mod output;
pub mod snapshot;
pub mod snapshot_command;
pub mod socket;
pub mod table;
pub mod watch;
