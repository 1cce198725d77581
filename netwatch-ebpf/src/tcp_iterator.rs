//! The tcp iterator: every TCP socket of a network namespace, as
//! /proc/net/tcp and tcp6 list them, with each socket's kernel address.

// What the programs share: maps, kernel offsets, reading and sending.
use crate::*;

/// Set by the loader for a baseline: only what a live table keeps (no
/// TIME_WAIT or request sockets, no queue sizes).
#[no_mangle]
static TABLE_ONLY: u32 = 0;

/// Set by the loader for `top`'s refreshes: each connection's counters too.
#[no_mangle]
static WITH_COUNTERS: u32 = 0;

/// Writes one `TcpSocketRecord` per socket to the iterator's seq file. The
/// kernel walks the namespace's listening and established hashes (those of
/// the task that opened the iterator) and shows each full socket under its
/// lock, skipping the ones unhashed meanwhile.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn tcp_sockets(ctx: *mut c_void) -> i32 {
    let ctx = ctx.cast::<u64>();
    // SAFETY: the kernel passes a `struct bpf_iter__tcp`: meta, sk_common
    // and uid, 8 bytes apart.
    let (meta, sk, uid) = unsafe { (*ctx, *ctx.add(1), *ctx.add(2) as u32) };
    if meta == 0 || sk == 0 {
        return 0;
    }
    let Ok(Some(record)) = tcp_socket(sk, uid) else {
        return 0;
    };
    write_record(meta, &record);
    0
}

/// The record of socket `sk` (any of the three kinds), `None` when it is
/// left out. `uid` is the one the kernel computed as /proc does.
fn tcp_socket(sk: u64, uid: u32) -> Result<Option<TcpSocketRecord>, i64> {
    let head = read_head(sk)?;
    let [state] = in_head(&head, &SKC_STATE);
    let mini = state == tcp_state::TIME_WAIT || state == tcp_state::NEW_SYN_RECV;
    // SAFETY: the loader set the global; volatile keeps its initial 0 from being folded.
    let table_only = unsafe { core::ptr::read_volatile(&TABLE_ONLY) } != 0;
    if mini && table_only {
        return Ok(None);
    }
    let (family, saddr, daddr) = addresses(sk, &head)?;
    let (shown_state, tx_queue, rx_queue, inode) = match state {
        tcp_state::TIME_WAIT => (read_kernel(sk, &TW_SUBSTATE)?, 0, 0, 0),
        tcp_state::NEW_SYN_RECV => (tcp_state::SYN_RECV, 0, 0, 0),
        _ if table_only => (state, 0, 0, socket_inode(sk)?),
        _ => {
            let (tx_queue, rx_queue) = queues(sk, state)?;
            (state, tx_queue, rx_queue, socket_inode(sk)?)
        }
    };
    // SAFETY: as TABLE_ONLY.
    let with_counters = unsafe { core::ptr::read_volatile(&WITH_COUNTERS) } != 0;
    let counters = match state {
        _ if !with_counters => TcpCounters::default(),
        tcp_state::TIME_WAIT | tcp_state::NEW_SYN_RECV | tcp_state::LISTEN => {
            TcpCounters::default()
        }
        _ => tcp_counters(sk)?,
    };
    Ok(Some(TcpSocketRecord {
        skaddr: sk,
        inode,
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        read_ns: unsafe { bpf_ktime_get_ns() },
        bytes_acked: counters.bytes_acked,
        bytes_received: counters.bytes_received,
        saddr,
        daddr,
        uid,
        tx_queue,
        rx_queue,
        sport: u16::from_ne_bytes(in_head(&head, &SKC_NUM)),
        dport: u16::from_be_bytes(in_head(&head, &SKC_DPORT)),
        family,
        state: shown_state,
        timewait: u8::from(state == tcp_state::TIME_WAIT),
        rtt_us: counters.rtt_us,
        retransmits: counters.retransmits,
        _pad: [0; 4],
    }))
}

/// What the kernel counts of a connection, as `ss -ti` shows it.
#[derive(Default)]
struct TcpCounters {
    bytes_acked: u64,
    bytes_received: u64,
    rtt_us: u32,
    retransmits: u32,
}

/// A connection's counters: `tcp_sock.srtt_us` holds the smoothed round
/// trip times 8.
fn tcp_counters(sk: u64) -> Result<TcpCounters, i64> {
    Ok(TcpCounters {
        bytes_acked: read_kernel(sk, &TCP_BYTES_ACKED)?,
        bytes_received: read_kernel(sk, &TCP_BYTES_RECEIVED)?,
        rtt_us: read_kernel::<u32>(sk, &TCP_SRTT_US)? >> 3,
        retransmits: read_kernel(sk, &TCP_TOTAL_RETRANS)?,
    })
}

/// A full socket's send and receive queues as /proc prints them: unacked
/// bytes, and unread bytes (a listener's accept backlog instead).
fn queues(sk: u64, state: u8) -> Result<(u32, u32), i64> {
    let tx_queue =
        read_kernel::<u32>(sk, &TCP_WRITE_SEQ)?.wrapping_sub(read_kernel::<u32>(sk, &TCP_SND_UNA)?);
    let rx_queue = if state == tcp_state::LISTEN {
        read_kernel::<u32>(sk, &SK_ACK_BACKLOG)?
    } else {
        let unread = read_kernel::<u32>(sk, &TCP_RCV_NXT)?
            .wrapping_sub(read_kernel::<u32>(sk, &TCP_COPIED_SEQ)?) as i32;
        unread.max(0) as u32
    };
    Ok((tx_queue, rx_queue))
}

/// The inode number of the socket's file, as `sock_i_ino` gives it: 0 once
/// the socket is orphaned (closed by its last process).
fn socket_inode(sk: u64) -> Result<u64, i64> {
    let socket: u64 = read_kernel(sk, &SK_SOCKET)?;
    if socket == 0 {
        return Ok(0);
    }
    // The socket and its inode are allocated together (`struct socket_alloc`,
    // the socket first).
    let inode = socket + u64::from(loaded(&SOCKET_ALLOC_VFS_INODE));
    read_kernel(inode, &INODE_I_INO)
}
