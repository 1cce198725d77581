//! Integration tests on the real kernel: real loopback sockets, opened by
//! child processes whose pids the tests know, checked against what the
//! netwatch binary reports. The stream tests load eBPF and need root.

mod audit;
mod cgroups;
mod cmdline;
mod failures;
mod generate;
mod kernel_btf;
mod metrics;
mod owners;
mod peer;
mod snapshot;
mod stream;
mod support;
mod syslog;
mod top;
mod verify;

/// The body of every peer child process (see `peer`): not a test, so ignored
/// unless `Peer::spawn` runs this binary with `--ignored --exact peer_process`.
#[test]
#[ignore = "runs only as a child process of the other tests"]
fn peer_process() {
    peer::serve_commands();
}
