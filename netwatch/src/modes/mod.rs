//! What a user runs: `snapshot`, and on the engine `watch` (the stream),
//! `audit` (connection records) and `verify` (the table against /proc).
//! Each mode declares its own records. `generate` writes the man pages and
//! completions, for packagers.

pub mod audit;
pub mod generate;
pub mod snapshot_command;
pub mod top;
pub mod verify;
pub mod watch;
