//! The eBPF programs live in `main.rs`; this stub lets the crate be a dependency.
#![no_std]
