//! Types and constants shared by the eBPF programs and the netwatch loader.
//!
//! Everything here crosses the kernel boundary byte for byte: each struct is
//! `#[repr(C)]`, ordered large to small, with explicit padding.
#![no_std]

/// Name of the ring buffer map that carries [`KernelEvent`]s to user space.
pub const EVENTS_MAP: &str = "EVENTS";
/// Name of the per-CPU array counting events the ring buffer refused: slot
/// [`DROPPED_TRANSITIONS`] and [`DROPPED_RECOVERIES`] for transitions,
/// [`DROPPED_OWNER_EVENTS`] for the rest.
pub const DROPS_MAP: &str = "DROPS";
/// Slot of `DROPS_MAP` counting transitions the ring buffer refused to the transition program.
pub const DROPPED_TRANSITIONS: u32 = 0;
/// Slot of `DROPS_MAP` counting owner and exec events the ring buffer refused.
pub const DROPPED_OWNER_EVENTS: u32 = 1;
/// Slot of `DROPS_MAP` counting transitions the recovery program could not
/// send: calls the kernel skipped, lost to a full ring buffer (so that user
/// space counts each of them once, not also as a skip not recovered).
pub const DROPPED_RECOVERIES: u32 = 2;
/// Name of the per-CPU array (one `u64` slot) counting calls of the recovery program.
pub const FIRED_MAP: &str = "FIRED";
/// Name of the array (one `u32` slot) that user space sets to 1 when it
/// stops: the transition programs then neither send nor count anything,
/// so that its last drain and count describe the same transitions.
pub const STOPPING_MAP: &str = "STOPPING";
/// Name of the raw tracepoint program on `inet_sock_set_state` that
/// forwards every transition, reading the socket at offsets from the
/// kernel's BTF.
pub const TRANSITION_PROGRAM: &str = "transition";
/// Name of the tracepoint program that takes its place on a kernel without
/// BTF: it reads the tracepoint's record (and needs tracefs).
pub const TRANSITION_TRACEPOINT_PROGRAM: &str = "inet_sock_set_state";
/// Name of the second raw tracepoint program on the same tracepoint. It has
/// its own recursion guard, so it runs when the kernel skips the transition
/// program (nested call on one CPU), and then forwards the transition itself.
pub const RECOVERY_PROGRAM: &str = "recover_state";
/// Raw tracepoint programs on `sock_send_length` and `sock_recv_length`:
/// they run in the caller's context, notice when a process other than the
/// socket's owner uses it (a handoff), and count the bytes each TCP
/// socket's application sent and received.
pub const SENT_PROGRAM: &str = "socket_sent";
pub const RECEIVED_PROGRAM: &str = "socket_received";
/// Tracepoint program on `syscalls:sys_exit_accept4` and `sys_exit_accept`:
/// the accepting process becomes the owner of the socket accept returns.
pub const ACCEPT_PROGRAM: &str = "accept_exit";
/// Raw tracepoint program on `sys_exit` (every system call) that does the
/// same where tracefs, which gives the syscall tracepoints' ids, is closed.
pub const SYSCALL_EXIT_PROGRAM: &str = "syscall_exit";
/// Globals of `SYSCALL_EXIT_PROGRAM`: the syscall numbers of accept() and accept4().
pub const ACCEPT_SYSCALL_NUMBERS: [&str; 2] = ["SYS_ACCEPT", "SYS_ACCEPT4"];
/// Raw tracepoint program on `sched_process_exec`: a process's new name.
pub const EXEC_PROGRAM: &str = "process_exec";
/// Name of the LRU hash of [`SocketEntry`] per socket (by kernel address).
pub const SOCKETS_MAP: &str = "SOCKETS";
/// Sockets the kernel keeps an owner and byte counts for at most: the least
/// recently used entry is evicted beyond that (a socket whose close was
/// missed cannot leak).
pub const SOCKETS_MAP_ENTRIES: u32 = 1 << 17;
/// Global set to 1 by the loader when `SOCK_OFFSETS`, `FILE_OFFSETS` and
/// `TASK_OFFSETS` are set: the programs then read each socket's uid,
/// network namespace and owner.
pub const SOCK_LAYOUT_KNOWN: &str = "SOCK_LAYOUT_KNOWN";
/// Global set to 1 by the loader when the byte-counting programs are
/// attached: only then do transitions take counts from `SOCKETS_MAP`.
pub const COUNTS_BYTES: &str = "COUNTS_BYTES";
/// Global set by the loader to the number of possible CPUs: a change to
/// CLOSE looks for the socket's bytes in the `OWNER_CACHE_MAP` slots of
/// the first [`BYTES_MAX_CPUS`] of them.
pub const NR_CPUS: &str = "NR_CPUS";
/// The most CPUs whose cached bytes a change to CLOSE collects (a bound the
/// verifier needs). On a host with more, bytes counted on the others reach
/// the record only if the slot is reused before the socket closes.
pub const BYTES_MAX_CPUS: u32 = 1024;

/// The kernel struct members netwatch's programs read, each by a global the
/// loader sets to its byte offset from the running kernel's BTF: listed
/// once, here, as (global: struct, member path). It hands the list to
/// `$callback`: this crate makes from it the tables the loader reads
/// (`SOCK_OFFSETS`, ...), the eBPF crate the globals it declares.
#[macro_export]
macro_rules! kernel_offset_tables {
    ($callback:ident) => {
        $callback! {
            /// Globals of the socket programs: byte offsets of `struct sock` fields,
            /// taken from the running kernel's BTF at load time, as (global, struct,
            /// member path).
            SOCK_OFFSETS {
                SK_PROTOCOL: "sock", "sk_protocol";
                SKC_FAMILY: "sock_common", "skc_family";
                SKC_DADDR: "sock_common", "skc_daddr";
                SKC_RCV_SADDR: "sock_common", "skc_rcv_saddr";
                SKC_DPORT: "sock_common", "skc_dport";
                SKC_V6_DADDR: "sock_common", "skc_v6_daddr";
                SKC_V6_RCV_SADDR: "sock_common", "skc_v6_rcv_saddr";
                INET_SPORT: "inet_sock", "inet_sport";
                SK_UID: "sock", "sk_uid";
                SKC_NET: "sock_common", "skc_net.net";
                NET_NS_INUM: "net", "ns.inum";
                SKC_STATE: "sock_common", "skc_state";
                SK_ERR: "sock", "sk_err";
            }
            /// Globals of the owner programs: where a task's process name, start
            /// time and command line are, and the way from a task's fd to its socket.
            TASK_OFFSETS {
                TASK_GROUP_LEADER: "task_struct", "group_leader";
                TASK_COMM: "task_struct", "comm";
                TASK_START_TIME: "task_struct", "start_time";
                TASK_FLAGS: "task_struct", "flags";
                TASK_FILES: "task_struct", "files";
                FILES_FDT: "files_struct", "fdt";
                FDTABLE_MAX_FDS: "fdtable", "max_fds";
                FDTABLE_FD: "fdtable", "fd";
                SOCKET_SK: "socket", "sk";
                TASK_MM: "task_struct", "mm";
                MM_ARG_START: "mm_struct", "arg_start";
                MM_ARG_END: "mm_struct", "arg_end";
            }
            /// Globals of the iterator (and of the accept program, which also finds a
            /// socket from a file): byte offsets taken from the kernel's BTF.
            FILE_OFFSETS {
                TASK_TGID: "task_struct", "tgid";
                FILE_F_INODE: "file", "f_inode";
                FILE_PRIVATE_DATA: "file", "private_data";
                INODE_I_MODE: "inode", "i_mode";
                INODE_I_INO: "inode", "i_ino";
            }
            /// Globals of the tcp iterator: the fields /proc/net/tcp prints, and
            /// the counters `ss -ti` adds (bytes, round trip, retransmissions), as
            /// (global, struct, member path). `SOCK_OFFSETS` give the addresses and
            /// the namespace, `FILE_OFFSETS` the inode number.
            TCP_OFFSETS {
                SKC_NUM: "sock_common", "skc_num";
                TW_SUBSTATE: "inet_timewait_sock", "tw_substate";
                TCP_RCV_NXT: "tcp_sock", "rcv_nxt";
                TCP_COPIED_SEQ: "tcp_sock", "copied_seq";
                TCP_WRITE_SEQ: "tcp_sock", "write_seq";
                TCP_SND_UNA: "tcp_sock", "snd_una";
                SK_ACK_BACKLOG: "sock", "sk_ack_backlog";
                SK_SOCKET: "sock", "sk_socket";
                SOCKET_ALLOC_VFS_INODE: "socket_alloc", "vfs_inode";
                TCP_SRTT_US: "tcp_sock", "srtt_us";
                TCP_TOTAL_RETRANS: "tcp_sock", "total_retrans";
                TCP_BYTES_ACKED: "tcp_sock", "bytes_acked";
                TCP_BYTES_RECEIVED: "tcp_sock", "bytes_received";
            }
        }
    };
}

/// Each table of `kernel_offset_tables` as an array of (global, struct,
/// member path).
macro_rules! offset_arrays {
    ($($(#[$doc:meta])* $table:ident { $($global:ident: $struct:literal, $member:literal;)* })*) => {
        $(
            $(#[$doc])*
            pub const $table: [(&str, &str, &str); [$(stringify!($global)),*].len()] =
                [$((stringify!($global), $struct, $member)),*];
        )*
    };
}

kernel_offset_tables!(offset_arrays);

/// Global of `SYSCALL_EXIT_PROGRAM`: where `struct pt_regs` holds the
/// number of the system call (an architecture's own member; none declared
/// elsewhere, and that program then stays out).
#[cfg(target_arch = "x86_64")]
pub const SYSCALL_OFFSETS: [(&str, &str, &str); 1] = [("PT_REGS_SYSCALL_NR", "pt_regs", "orig_ax")];
#[cfg(target_arch = "aarch64")]
pub const SYSCALL_OFFSETS: [(&str, &str, &str); 1] =
    [("PT_REGS_SYSCALL_NR", "pt_regs", "syscallno")];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub const SYSCALL_OFFSETS: [(&str, &str, &str); 0] = [];

/// Name of the task_file iterator that lists socket fds (root's fast fd walk).
pub const SOCKET_FDS_PROGRAM: &str = "socket_fds";

/// What the iterator writes for each socket fd of each process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketFd {
    /// The socket's inode number, as /proc/net/tcp shows it.
    pub inode: u64,
    /// The process (thread group) holding the fd.
    pub tgid: u32,
    /// The fd number, or `SOCKET_FD_UNREADABLE`.
    pub fd: u32,
}

/// The `fd` of a record that says the iterator could not read an fd of
/// process `tgid`: the listing is incomplete.
pub const SOCKET_FD_UNREADABLE: u32 = u32::MAX;

#[cfg(feature = "user")]
// SAFETY: `SocketFd` is `repr(C)`, `Copy`, without padding; any bit pattern is valid.
unsafe impl aya::Pod for SocketFd {}

/// Name of the tcp iterator that lists every TCP socket of a network
/// namespace (root's fast read of /proc/net/tcp and tcp6).
pub const TCP_SOCKETS_PROGRAM: &str = "tcp_sockets";

/// Global set to 1 by the loader when the tcp iterator is to list only what
/// a live table keeps: no TIME_WAIT or request sockets, and no queue sizes.
pub const TABLE_ONLY: &str = "TABLE_ONLY";

/// Global set to 1 by the loader when the tcp iterator is to read each
/// connection's counters too (bytes, round trip, retransmissions; `top`'s
/// refreshes): 0 in every other record.
pub const WITH_COUNTERS: &str = "WITH_COUNTERS";

/// Bytes at the start of `struct sock_common` that the tcp iterator reads at
/// once: the fields it takes from there (`SOCK_COMMON_HEAD_FIELDS`) must
/// lie within them, as they do in every kernel since 2.6 (the loader checks).
pub const SOCK_COMMON_HEAD: usize = 24;

/// The globals of the fields the tcp iterator takes from the head of
/// `struct sock_common`, with their sizes.
pub const SOCK_COMMON_HEAD_FIELDS: [(&str, usize); 6] = [
    ("SKC_DADDR", 4),
    ("SKC_RCV_SADDR", 4),
    ("SKC_DPORT", 2),
    ("SKC_NUM", 2),
    ("SKC_FAMILY", 2),
    ("SKC_STATE", 1),
];

/// What the tcp iterator writes for each socket: the fields of its
/// /proc/net/tcp (or tcp6) line, and its kernel address. Its network
/// namespace is the one the iterator was opened in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocketRecord {
    /// Kernel address of the socket, as transitions carry it (`skaddr`).
    pub skaddr: u64,
    /// The socket's inode number (0: no file, as for orphaned sockets).
    pub inode: u64,
    /// `bpf_ktime_get_ns()` when the iterator read it, under the socket's
    /// lock for a full socket: transitions stamped before are in what it read.
    pub read_ns: u64,
    /// Bytes the peer acknowledged (`tcp_sock.bytes_acked`, `ss -ti`'s
    /// `bytes_acked:`), with `WITH_COUNTERS`; 0 for a listener or a mini socket.
    pub bytes_acked: u64,
    /// Bytes received in order (`tcp_sock.bytes_received`, `ss -ti`'s
    /// `bytes_received:`), with `WITH_COUNTERS`; 0 for a listener or a mini socket.
    pub bytes_received: u64,
    /// Local address; an IPv4 address fills the first 4 bytes.
    pub saddr: [u8; 16],
    /// Remote address; an IPv4 address fills the first 4 bytes.
    pub daddr: [u8; 16],
    /// As /proc prints it (0 for TIME_WAIT, the listener's for a request).
    pub uid: u32,
    pub tx_queue: u32,
    pub rx_queue: u32,
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// As /proc prints it: a TIME_WAIT socket's substate, SYN_RECV for a request.
    pub state: u8,
    /// 1 for a TIME_WAIT mini socket (/proc's timer 3).
    pub timewait: u8,
    /// The smoothed round-trip time in microseconds, as `ss -ti` shows it
    /// (`tcp_sock.srtt_us` / 8), with `WITH_COUNTERS`; 0 for a listener, a
    /// mini socket, or a connection that has not measured one yet.
    pub rtt_us: u32,
    /// Segments retransmitted over the connection's life
    /// (`tcp_sock.total_retrans`, the total after `retrans:` in `ss -ti`),
    /// with `WITH_COUNTERS`.
    pub retransmits: u32,
    /// Explicit padding to a multiple of 8 bytes.
    pub _pad: [u8; 4],
}

#[cfg(feature = "user")]
// SAFETY: `TcpSocketRecord` is `repr(C)`, `Copy`, without implicit padding; any bit pattern is valid.
unsafe impl aya::Pod for TcpSocketRecord {}

/// `IPPROTO_TCP`: the tracepoint also fires for SCTP and MPTCP sockets.
pub const IPPROTO_TCP: u16 = 6;
/// `AF_INET`.
pub const AF_INET: u16 = 2;
/// `AF_INET6`.
pub const AF_INET6: u16 = 10;

/// Field offsets of `sock:inet_sock_set_state`, a stable tracepoint ABI.
///
/// The loader checks them against
/// `/sys/kernel/tracing/events/sock/inet_sock_set_state/format` before attaching.
pub mod tracepoint {
    /// `const void *skaddr`
    pub const SKADDR: usize = 8;
    /// `int oldstate`
    pub const OLDSTATE: usize = 16;
    /// `int newstate`
    pub const NEWSTATE: usize = 20;
    /// `__u16 sport`
    pub const SPORT: usize = 24;
    /// `__u16 dport`
    pub const DPORT: usize = 26;
    /// `__u16 family`
    pub const FAMILY: usize = 28;
    /// `__u16 protocol`
    pub const PROTOCOL: usize = 30;
    /// `__u8 saddr[4]`
    pub const SADDR: usize = 32;
    /// `__u8 daddr[4]`
    pub const DADDR: usize = 36;
    /// `__u8 saddr_v6[16]`
    pub const SADDR_V6: usize = 40;
    /// `__u8 daddr_v6[16]`
    pub const DADDR_V6: usize = 56;

    /// Every field as (name, offset, size), for checking the format file.
    pub const FIELDS: [(&str, usize, usize); 11] = [
        ("skaddr", SKADDR, 8),
        ("oldstate", OLDSTATE, 4),
        ("newstate", NEWSTATE, 4),
        ("sport", SPORT, 2),
        ("dport", DPORT, 2),
        ("family", FAMILY, 2),
        ("protocol", PROTOCOL, 2),
        ("saddr", SADDR, 4),
        ("daddr", DADDR, 4),
        ("saddr_v6", SADDR_V6, 16),
        ("daddr_v6", DADDR_V6, 16),
    ];
}

/// Bytes the application sent and received on one socket: what a change to
/// CLOSE carries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteCounts {
    pub sent: u64,
    pub received: u64,
}

impl ByteCounts {
    /// These counts and `other`'s together.
    pub const fn plus(self, other: ByteCounts) -> ByteCounts {
        ByteCounts {
            sent: self.sent + other.sent,
            received: self.received + other.received,
        }
    }
}

/// What the kernel keeps per socket (the value of `SOCKETS_MAP`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketEntry {
    /// Counted only while audit counts bytes; more may wait in the
    /// [`CachedOwner`] slots of the CPUs in `cpus`.
    pub bytes: ByteCounts,
    /// CPUs whose `OWNER_CACHE_MAP` slot may hold bytes of this socket: bit
    /// `cpu % 64` (audit only).
    pub cpus: u64,
    /// Thread group id of the process that last connected, accepted, sent or
    /// received on the socket (0: none seen yet, as for a socket just
    /// accepted by the kernel).
    pub owner: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
// SAFETY: `SocketEntry` is `repr(C)`, `Copy`, without implicit padding; any bit pattern is valid.
unsafe impl aya::Pod for SocketEntry {}

/// Name of the per-CPU array of [`CachedOwner`] slots: the send and receive
/// programs' cache of owners confirmed on that CPU, and (audit) the bytes
/// counted there since.
pub const OWNER_CACHE_MAP: &str = "OWNER_CACHE";
/// Slots of `OWNER_CACHE_MAP` on each CPU.
pub const OWNER_CACHE_SLOTS: u32 = 64;

/// The slot of `OWNER_CACHE_MAP` a socket (its kernel address) takes.
pub const fn owner_cache_slot(sk: u64) -> u32 {
    // Fibonacci hashing: socket addresses differ in their middle bits.
    (sk.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as u32 % OWNER_CACHE_SLOTS
}

/// Set in a [`CachedOwner`]'s `sk` once a change to CLOSE has taken the
/// slot's bytes: socket addresses are aligned, so bit 0 is free.
pub const OWNER_CACHE_TAKEN: u64 = 1;

/// One slot of `OWNER_CACHE_MAP`: thread `pid_tgid` was found to be the
/// owner of socket `sk` while no owner was written anywhere (`epoch`), and
/// (audit) the bytes counted on this CPU since, not yet added to the
/// socket's [`SocketEntry`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedOwner {
    /// The socket, [`OWNER_CACHE_TAKEN`] set when its CLOSE took the bytes,
    /// or 0 for none.
    pub sk: u64,
    pub pid_tgid: u64,
    pub epoch: u64,
    pub bytes: ByteCounts,
}

#[cfg(feature = "user")]
// SAFETY: `CachedOwner` is `repr(C)`, `Copy`, without implicit padding; any bit pattern is valid.
unsafe impl aya::Pod for CachedOwner {}

/// TCP state numbers (include/net/tcp_states.h), as the kernel's
/// transitions, its iterators' records and /proc give them.
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;

    /// Whether a transition starts a new socket at its kernel address:
    /// connect() and listen() leave CLOSE, and an accepted socket's first
    /// change leaves its listener's LISTEN for SYN_RECV. The state program
    /// and the socket table both go by it.
    pub const fn opens(old: u8, new: u8) -> bool {
        old == CLOSE || (old == LISTEN && new == SYN_RECV)
    }
}

/// What a [`KernelEvent`] reports (its `kind`).
pub mod event_kind {
    /// A TCP state transition.
    pub const TRANSITION: u8 = 0;
    /// `accept()` returned the socket to the process `tgid`.
    pub const ACCEPT: u8 = 1;
    /// Process `tgid`, not the socket's owner in the kernel's map, sent or
    /// received on it (or the map had no owner for it).
    pub const HANDOFF: u8 = 2;
    /// Process `tgid` called exec(): `comm` is its new name.
    pub const EXEC: u8 = 3;
    /// Process `tgid` was the first to send or receive on an accepted
    /// socket (without the accept hook, the first owner it gets).
    pub const FIRST_IO: u8 = 4;
}

/// Fields of `syscalls:sys_exit_accept4` and `sys_exit_accept`.
pub mod syscall_exit {
    /// `long ret`: the accepted fd, or a negative errno.
    pub const RET: usize = 16;
    /// The fields read, as (name, offset, size), for checking the format files.
    pub const FIELDS: [(&str, usize, usize); 1] = [("ret", RET, 8)];
}

/// One TCP state transition or owner event, as the kernel saw it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelEvent {
    /// `bpf_ktime_get_ns()` at the transition (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Kernel address of the socket: stable for the socket's life, reused after it.
    pub skaddr: u64,
    /// At a change to CLOSE: the bytes the application sent on the socket.
    /// When a socket opens: those of the previous socket at this address,
    /// if it was freed without a traced change to CLOSE.
    pub bytes_sent: u64,
    /// As `bytes_sent`, for the bytes the application received.
    pub bytes_received: u64,
    /// When the process `tgid` started (its `start_time`, CLOCK_MONOTONIC):
    /// with `tgid`, the process's identity across pid reuse. Set for owner
    /// and exec events and for connect and listen transitions; 0 otherwise
    /// or when unknown.
    pub start_ns: u64,
    /// The cgroup (v2) id of the task on the CPU, set as `start_ns` is:
    /// the inode number of its directory in the cgroup2 hierarchy.
    pub cgroup_id: u64,
    /// Local address; an IPv4 address fills the first 4 bytes.
    pub saddr: [u8; 16],
    /// Remote address; an IPv4 address fills the first 4 bytes.
    pub daddr: [u8; 16],
    /// Name of process `tgid` (its group leader's `comm`), set as `start_ns` is.
    pub comm: [u8; 16],
    /// Thread group id of the task on the CPU (for a transition, often not the owner).
    pub tgid: u32,
    /// Inode number of the socket's network namespace (0: unknown).
    pub netns: u32,
    /// The socket's owner uid (`sk_uid`, as /proc/net/tcp shows it); `u32::MAX`: unknown.
    pub uid: u32,
    /// Local port, host byte order.
    pub sport: u16,
    /// Remote port, host byte order.
    pub dport: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Kernel TCP state before the change (`TCP_ESTABLISHED` = 1 ...); for
    /// an owner event, the socket's state.
    pub oldstate: u8,
    /// Kernel TCP state after the change; for an owner event, as `oldstate`.
    pub newstate: u8,
    /// 1 when the recovery program sent it: the tracepoint program was
    /// skipped, or (rarely) this duplicates what it sent.
    pub recovered: u8,
    /// One of [`event_kind`].
    pub kind: u8,
    /// At a change to CLOSE: the error the kernel left on the socket
    /// (`sk_err`: ECONNREFUSED, ETIMEDOUT, ECONNRESET, EHOSTUNREACH, ...),
    /// set before the change by whatever ended the connection; 0 for none,
    /// or where the layout of `struct sock` is unknown.
    pub sk_err: u16,
}

#[cfg(feature = "user")]
// SAFETY: `KernelEvent` is `repr(C)`, `Copy`, has no implicit padding and every bit pattern is valid.
unsafe impl aya::Pod for KernelEvent {}

/// Bytes of a command line a [`KernelEventWithCommandLine`] carries at most.
pub const COMMAND_LINE_BYTES: usize = 256;

/// Processes the kernel remembers having sent the command line of (its
/// LRU map `COMMAND_LINES_SENT`, tgid to start time) at most: each is sent
/// once, and again after an exec.
pub const COMMAND_LINES_SENT_ENTRIES: u32 = 1 << 13;

/// An owner or exec event that names a process (with its start time) for
/// the first time since netwatch started, or after its exec, with its command
/// line read from its memory in its own context: what /proc/PID/cmdline
/// gives, which a process that exits at once no longer shows by the time
/// user space reads /proc. The ring buffer carries it in place of a
/// [`KernelEvent`]; user space tells the two apart by their length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelEventWithCommandLine {
    pub event: KernelEvent,
    /// Bytes of `command_line` read: its arguments, each NUL-terminated,
    /// cut at [`COMMAND_LINE_BYTES`]; the bytes past it are undefined.
    pub length: u32,
    /// Explicit padding to a multiple of 8 bytes.
    pub _pad: [u8; 4],
    pub command_line: [u8; COMMAND_LINE_BYTES],
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, `Copy`, no implicit padding; every bit pattern is valid.
unsafe impl aya::Pod for KernelEventWithCommandLine {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_event_has_no_implicit_padding() {
        let fields = 8 * 6 + 16 * 3 + 4 * 3 + 2 * 3 + 4 + 2;
        assert_eq!(core::mem::size_of::<KernelEvent>(), fields);
        assert_eq!(core::mem::size_of::<KernelEvent>() % 8, 0);
    }

    #[test]
    fn kernel_event_with_command_line_has_no_implicit_padding() {
        assert_eq!(
            core::mem::size_of::<KernelEventWithCommandLine>(),
            core::mem::size_of::<KernelEvent>() + 4 + 4 + COMMAND_LINE_BYTES
        );
    }

    #[test]
    fn tcp_socket_record_has_no_implicit_padding() {
        assert_eq!(
            core::mem::size_of::<TcpSocketRecord>(),
            8 * 5 + 16 * 2 + 4 * 5 + 2 * 3 + 2 + 4
        );
    }

    #[test]
    fn socket_entry_has_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<SocketEntry>(), 8 * 3 + 4 * 2);
        assert_eq!(core::mem::size_of::<CachedOwner>(), 8 * 5);
    }

    #[test]
    fn owner_cache_slots_spread_sockets_allocated_side_by_side() {
        // `struct tcp_sock` objects come from one slab, about 2.3 KiB apart.
        let base = 0xffff_8880_1234_0000_u64;
        let mut used = [false; OWNER_CACHE_SLOTS as usize];
        for i in 0..32 {
            used[owner_cache_slot(base + i * 2304) as usize] = true;
        }
        assert!(used.iter().filter(|&&u| u).count() >= 24);
    }
}
