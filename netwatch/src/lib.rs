//! netwatch: a TCP connection monitor. A /proc snapshot (`snapshot`) is kept
//! current by eBPF programs on TCP state changes (`ebpf`, `table`,
//! `monitor`), for a live stream (`watch`), connection records (`audit`) and
//! a check of the table against /proc (`verify`).

pub mod audit;
pub mod btf;
pub mod cli;
pub mod ebpf;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod output;
pub mod sink;
pub mod snapshot;
pub mod snapshot_command;
pub mod table;
pub mod verify;
pub mod watch;
