//! What the xtask binary shares with netwatch's integration tests: the
//! loopback load generator.

pub mod loopback;
