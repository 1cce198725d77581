//! netwatch: a TCP connection monitor. A /proc snapshot (`snapshot`) is kept
//! current by eBPF programs on TCP state changes (`kernel`) through the
//! `engine`, for the `modes`: a live stream (`watch`), connection records
//! (`audit`) and a check of the table against /proc (`verify`).
//!
//! Layers, each using only those listed before it: `model`; `snapshot`
//! (/proc) and `kernel`; `cli`, `metrics`, `syslog` and `sink`; `engine`;
//! `output`; `modes`.

#[cfg(test)]
mod allocations;
pub mod cli;
mod engine;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod kernel;
mod metrics;
pub mod model;
mod modes;
mod output;
#[cfg(test)]
mod root_tests;
mod sink;
mod snapshot;

pub use modes::{audit, generate, snapshot_command, top, verify, watch};
