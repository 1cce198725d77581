//! netwatch: a TCP connection monitor. A /proc snapshot (`snapshot`) is kept
//! current by eBPF programs on TCP state changes (`kernel`, `source`,
//! `table`, `monitor`), for a live stream (`watch`), connection records
//! (`audit`) and a check of the table against /proc (`verify`).

pub mod audit;
pub mod cli;
mod kernel;
mod ledger;
mod metrics;
pub mod model;
mod monitor;
mod output;
mod sink;
mod snapshot;
pub mod snapshot_command;
mod source;
mod table;
pub mod verify;
pub mod watch;
