//! The owner programs: the first send or receive on an accepted socket
//! names its first owner (or, with the opt-in accept hook, accept() names
//! the accepting process), a send or a receive by another process hands
//! the socket over (and, for audit, counts its bytes), exec() renames a
//! process.

// What the programs share: maps, kernel offsets, reading and sending.
use crate::*;

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn socket_sent(ctx: RawTracePointContext) -> i32 {
    socket_used(&ctx, Counted::Sent);
    0
}

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn socket_received(ctx: RawTracePointContext) -> i32 {
    let flags: i32 = ctx.arg(2);
    // Data peeked at is not consumed: not counted, but the peeker uses the socket.
    let counted = if flags & MSG_PEEK == 0 {
        Counted::Received
    } else {
        Counted::Nothing
    };
    socket_used(&ctx, counted);
    0
}

/// Which byte count a send or receive adds to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Counted {
    Sent,
    Received,
    Nothing,
}

impl Counted {
    /// The count in `bytes` this call adds to.
    #[inline(always)]
    fn of(self, bytes: *mut ByteCounts) -> Option<*mut u64> {
        match self {
            // SAFETY: a field of the counts `bytes` points at.
            Counted::Sent => Some(unsafe { &raw mut (*bytes).sent }),
            Counted::Received => Some(unsafe { &raw mut (*bytes).received }),
            Counted::Nothing => None,
        }
    }
}

/// Adds `added` bytes to a count, atomically: another CPU may take it at
/// the same time.
#[inline(always)]
fn add_bytes(bytes: *mut ByteCounts, counted: Counted, added: u64) {
    if added == 0 {
        return;
    }
    if let Some(count) = counted.of(bytes) {
        // SAFETY: the count lives while the program runs; the add is one instruction.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, added) };
    }
}

/// The bytes a send or receive moved: its result when positive.
#[inline(always)]
fn moved(ret: i32) -> u64 {
    u64::try_from(ret).unwrap_or(0)
}

/// A process sent or received on a socket (arguments: sk, ret, flags), in
/// its own context. When it is not the owner the kernel map names, it
/// becomes the owner and user space hears of it: fork after accept, an fd
/// passed over a unix socket, a pre-fork pool. With bytes counted (audit),
/// a positive result is counted too.
///
/// This runs on every sendmsg and recvmsg of the host, so the common case,
/// the owner again, must be cheap: a hit in this CPU's cache of confirmed
/// (socket, thread) pairs: one helper call, no hash lookup. Audit adds the
/// bytes to the slot, and a change to CLOSE collects them from the CPUs
/// the socket's entry names (`take_cached_bytes`). Inlined into both
/// programs, so that a hit makes no BPF-to-BPF call either.
#[inline(always)]
fn socket_used(ctx: &RawTracePointContext, counted: Counted) {
    let (sk, ret): (u64, i32) = (ctx.arg(0), ctx.arg(1));
    let pid_tgid = bpf_get_current_pid_tgid();
    let epoch = owner_epoch();
    let Some(slot) = OWNER_CACHE.get_ptr_mut(owner_cache_slot(sk)) else {
        return;
    };
    // SAFETY: this CPU's slot: other CPUs only exchange its key and counts atomically.
    let hit = unsafe { (*slot).sk == sk && (*slot).pid_tgid == pid_tgid && (*slot).epoch == epoch };
    if hit {
        if counts_bytes() {
            // SAFETY: as above.
            add_bytes(unsafe { &raw mut (*slot).bytes }, counted, moved(ret));
        }
        return;
    }
    socket_used_uncached(sk, pid_tgid, epoch, ret, counted);
}

/// `socket_used` when this CPU's slot does not confirm the caller: finds
/// (or makes) the socket's entry, hands the socket over if the caller is
/// not its owner, and otherwise confirms the caller in the slot (audit
/// first moves the slot's bytes to the entry of the socket they belong to).
fn socket_used_uncached(sk: u64, pid_tgid: u64, epoch: u64, ret: i32, counted: Counted) {
    // Found again rather than passed: BPF calls pass at most five arguments.
    let Some(slot) = OWNER_CACHE.get_ptr_mut(owner_cache_slot(sk)) else {
        return;
    };
    let counting = counts_bytes();
    let tgid = (pid_tgid >> 32) as u32;
    // The map holds TCP sockets only: a socket found there needs no
    // protocol check.
    // Without an entry (a socket from before netwatch started, or one the
    // LRU map evicted), the caller takes it over from whoever the table says.
    let (entry, inserted) = match SOCKETS.get_ptr_mut(sk) {
        Some(entry) => (entry, false),
        None => {
            if read_kernel::<u16>(sk, &SK_PROTOCOL) != Ok(IPPROTO_TCP) || in_kernel_thread() {
                return;
            }
            // Another CPU may insert first: BPF_NOEXIST then leaves its entry.
            let _ = SOCKETS.insert(sk, SocketEntry::default(), 1);
            match SOCKETS.get_ptr_mut(sk) {
                Some(entry) => (entry, true),
                None => return,
            }
        }
    };
    // SAFETY: the map value lives while the program runs.
    unsafe {
        if (*entry).owner != tgid {
            if in_kernel_thread() {
                return;
            }
            // An accepted socket no process has used yet (see `mark_unowned`).
            let kind = if (*entry).owner == 0 && !inserted {
                event_kind::FIRST_IO
            } else {
                event_kind::HANDOFF
            };
            (*entry).owner = tgid;
            owners_changed();
            send_owner(sk, kind);
        } else {
            if counting {
                flush_cached_bytes(slot);
                note_cpu(entry);
            }
            // Confirmed under the epoch read before the lookup: any owner
            // written since has moved the epoch on, and the slot no longer
            // matches. The key goes last: a collector on another CPU looks
            // at it alone (audit emptied the slot above, bytes included).
            (*slot).pid_tgid = pid_tgid;
            (*slot).epoch = epoch;
            (*slot).sk = sk;
        }
        if counting {
            add_bytes(&raw mut (*entry).bytes, counted, moved(ret));
        }
    }
}

/// Marks this CPU in the entry's `cpus`: its slot may hold the socket's bytes.
fn note_cpu(entry: *mut SocketEntry) {
    // SAFETY: bpf_get_smp_processor_id has no preconditions.
    let bit = 1u64 << (unsafe { bpf_get_smp_processor_id() } % 64);
    // SAFETY: the map value lives while the program runs; the or is one instruction.
    unsafe {
        if (*entry).cpus & bit == 0 {
            atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*entry).cpus, bit);
        }
    }
}

/// Empties this CPU's slot (before it is keyed anew): the bytes it counted
/// go to the entry of the socket they belong to, taken or not by a CLOSE
/// (bytes counted after a socket's CLOSE are handed over when its address
/// is used again, as for a socket whose close was not traced).
fn flush_cached_bytes(slot: *mut CachedOwner) {
    // SAFETY: this CPU's slot; each exchange is one instruction, and a
    // collector on another CPU exchanges the same fields.
    let (sk, bytes) = unsafe {
        let sk = atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(&raw mut (*slot).sk, 0);
        (sk & !OWNER_CACHE_TAKEN, take_counts(&raw mut (*slot).bytes))
    };
    if bytes == ByteCounts::default() {
        return;
    }
    if let Some(entry) = SOCKETS.get_ptr_mut(sk) {
        // SAFETY: the map value lives while the program runs.
        let counts = unsafe { &raw mut (*entry).bytes };
        add_bytes(counts, Counted::Sent, bytes.sent);
        add_bytes(counts, Counted::Received, bytes.received);
    }
}

/// Takes the counts, leaving zero: each by one atomic exchange.
#[inline(always)]
pub(crate) fn take_counts(bytes: *mut ByteCounts) -> ByteCounts {
    // SAFETY: the counts live while the program runs; each exchange is one instruction.
    unsafe {
        ByteCounts {
            sent: atomic_xchg::<u64, { AtomicOrdering::Relaxed }>(&raw mut (*bytes).sent, 0),
            received: atomic_xchg::<u64, { AtomicOrdering::Relaxed }>(
                &raw mut (*bytes).received,
                0,
            ),
        }
    }
}

/// The bytes of socket `sk` that wait in the cache slots of the CPUs its
/// entry names, taken from them. At a change to CLOSE (`reopening` false)
/// each slot of the socket is marked taken, so that bytes counted there
/// later are flushed to the entry, not lost. When the address opens again
/// (`reopening`), the slots and the CPU marks are cleared: the new socket
/// starts from none.
///
/// Another CPU may be adding to its slot meanwhile: its add lands in what
/// is taken here or stays in the slot, never in between (each take is an
/// exchange). A slot its CPU is keying anew (key 0) is left to that CPU,
/// which moves its bytes to the entry, where the caller looks next.
pub(crate) fn take_cached_bytes(sk: u64, entry: *mut SocketEntry, reopening: bool) -> ByteCounts {
    // SAFETY: the map value lives while the program runs; the exchange is one instruction.
    let cpus = unsafe {
        if reopening {
            atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(&raw mut (*entry).cpus, 0)
        } else {
            core::ptr::read_volatile(&raw const (*entry).cpus)
        }
    };
    let mut taken = ByteCounts::default();
    if cpus == 0 {
        return taken;
    }
    let nr_cpus = loaded(&NR_CPUS);
    let index = owner_cache_slot(sk);
    let owner_cache = (&raw const OWNER_CACHE).cast_mut().cast::<c_void>();
    for cpu in 0..BYTES_MAX_CPUS {
        if cpu >= nr_cpus {
            break;
        }
        if cpus & (1 << (cpu % 64)) == 0 {
            continue;
        }
        // SAFETY: the map and key are valid; the helper checks the CPU.
        let slot =
            unsafe { bpf_map_lookup_percpu_elem(owner_cache, (&raw const index).cast(), cpu) }
                .cast::<CachedOwner>();
        if slot.is_null() || !claim_slot(slot, sk, reopening) {
            continue;
        }
        // SAFETY: the slot lives while the program runs.
        taken = taken.plus(take_counts(unsafe { &raw mut (*slot).bytes }));
    }
    taken
}

/// Whether `slot` (another CPU's, maybe) holds bytes of `sk`, and marks it
/// taken (or empties it when `reopening`) if it does.
fn claim_slot(slot: *mut CachedOwner, sk: u64, reopening: bool) -> bool {
    let taken = sk | OWNER_CACHE_TAKEN;
    // SAFETY: the slot lives while the program runs; the exchange is one instruction.
    let (key, _) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            &raw mut (*slot).sk,
            sk,
            if reopening { 0 } else { taken },
        )
    };
    if key == sk {
        return true;
    }
    if key != taken {
        return false;
    }
    !reopening || {
        // SAFETY: as above.
        let (_, emptied) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                &raw mut (*slot).sk,
                taken,
                0,
            )
        };
        emptied
    }
}

/// Per CPU: recently confirmed owners (and audit's bytes counted since), by
/// `owner_cache_slot`. A confirmation stays true until an owner is written
/// (accept, connect, a handoff), which moves the epoch on, because only
/// those change what the map says. A thread id reused by another process
/// holding the same socket, on the same CPU, with no connect or accept on
/// the whole host meanwhile (a full pid wrap), is the one case it misses.
#[map(name = "OWNER_CACHE")]
static OWNER_CACHE: PerCpuArray<CachedOwner> = PerCpuArray::with_max_entries(OWNER_CACHE_SLOTS, 0);

/// Slot 0: how many times an owner was written into `SOCKETS`.
#[map(name = "OWNER_EPOCH")]
static OWNER_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

fn owner_epoch() -> u64 {
    // SAFETY: slot 0 of an array always exists; a plain load.
    OWNER_EPOCH
        .get_ptr(0)
        .map_or(0, |epoch| unsafe { core::ptr::read_volatile(epoch) })
}

/// Called after an owner is written into `SOCKETS`: every cached confirmation is stale.
pub(crate) fn owners_changed() {
    if let Some(epoch) = OWNER_EPOCH.get_ptr_mut(0) {
        // SAFETY: the slot lives while the program runs; the add is atomic across CPUs.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(epoch, 1) };
    }
}

/// The syscall numbers of accept() and accept4() (set by the loader, for
/// `syscall_exit`; the initial values match no system call).
#[no_mangle]
static SYS_ACCEPT: u32 = u32::MAX;
#[no_mangle]
static SYS_ACCEPT4: u32 = u32::MAX;

/// On the way out of accept()/accept4(), in the accepting process: the
/// tracepoints `syscalls:sys_exit_accept4` and `sys_exit_accept`, which
/// fire for these two system calls alone but are known by ids that only
/// tracefs gives. `syscall_exit` does the same where tracefs is closed.
#[tracepoint]
pub fn accept_exit(ctx: TracePointContext) -> u32 {
    // SAFETY: the offset of `ret` in the syscall exit record (checked by the loader).
    let fd: i64 = unsafe { ctx.read_at(syscall_exit::RET) }.unwrap_or(-1);
    accepted(fd);
    0
}

/// On the way out of every system call (the raw tracepoint `sys_exit`,
/// attached by name: arguments regs and ret): accept() and accept4() as
/// `accept_exit` sees them, told by the syscall number in `regs`. Only where
/// tracefs cannot be read: it runs on every system call of the host. A
/// 32-bit process's syscall numbers differ; one of them that matches can
/// only name the caller as the owner of a socket it holds.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn syscall_exit(ctx: RawTracePointContext) -> i32 {
    let regs: u64 = ctx.arg(0);
    let Ok(nr) = read_kernel::<u32>(regs, &PT_REGS_SYSCALL_NR) else {
        return 0;
    };
    if nr == loaded(&SYS_ACCEPT4) || nr == loaded(&SYS_ACCEPT) {
        accepted(ctx.arg(1));
    }
    0
}

/// accept() returned `fd` (or a negative errno) to the current process: it
/// owns the socket from now on.
///
/// The socket is found from the returned fd through the task's file table
/// (task->files->fdt->fd[ret]->private_data->sk), at offsets from the
/// kernel's BTF. That is the one way open here: a program on the accept
/// path itself (kprobe or fexit on inet_accept, which would get the socket
/// directly) does not attach on this kernel, and `bpf_sock_from_file` is
/// for tracing programs only. The fd is fresh and the syscall has not
/// returned yet, so no other thread of the process can have closed it in
/// between (a racing close of a guessed fd number would at worst make the
/// lookup fail, which the S_ISSOCK and protocol checks catch).
fn accepted(fd: i64) {
    if fd < 0 {
        return;
    }
    let Ok(sk) = socket_of_fd(fd as u64) else {
        return;
    };
    if read_kernel::<u16>(sk, &SK_PROTOCOL) != Ok(IPPROTO_TCP) {
        return;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    match SOCKETS.get_ptr_mut(sk) {
        // SAFETY: the map value lives while the program runs.
        Some(entry) => unsafe { (*entry).owner = tgid },
        None => {
            let entry = SocketEntry {
                owner: tgid,
                ..SocketEntry::default()
            };
            let _ = SOCKETS.insert(sk, entry, 0);
        }
    }
    owners_changed();
    send_owner(sk, event_kind::ACCEPT);
}

/// The `struct sock` behind file descriptor `fd` of the current task.
fn socket_of_fd(fd: u64) -> Result<u64, i64> {
    // SAFETY: bpf_get_current_task has no preconditions.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read_kernel(task, &TASK_FILES)?;
    let fdt: u64 = read_kernel(files, &FILES_FDT)?;
    let max_fds: u32 = read_kernel(fdt, &FDTABLE_MAX_FDS)?;
    if fd >= u64::from(max_fds) {
        return Err(0);
    }
    let fds: u64 = read_kernel(fdt, &FDTABLE_FD)?;
    // SAFETY: bpf_probe_read_kernel checks the address.
    let file: u64 = unsafe { bpf_probe_read_kernel((fds + fd * 8) as *const u64) }?;
    if file == 0 {
        return Err(0);
    }
    let inode: u64 = read_kernel(file, &FILE_F_INODE)?;
    if inode == 0 || read_kernel::<u16>(inode, &INODE_I_MODE)? & S_IFMT != S_IFSOCK {
        return Err(0);
    }
    let socket: u64 = read_kernel(file, &FILE_PRIVATE_DATA)?;
    read_kernel(socket, &SOCKET_SK)
}

/// A process called exec(): its sockets' owner has a new name.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn process_exec(_ctx: RawTracePointContext) -> i32 {
    let process = current_process();
    let event = KernelEvent {
        kind: event_kind::EXEC,
        ..blank_event(0, process)
    };
    send_naming(event);
    0
}

/// Tells user space that the current process owns socket `sk` now (`kind`:
/// accept or handoff), with the socket's endpoints and state.
fn send_owner(sk: u64, kind: u8) {
    let Ok((family, (saddr, sport), (daddr, dport))) = read_tuple(sk) else {
        count_drop(DROPPED_OWNER_EVENTS);
        return;
    };
    let state = read_kernel::<u8>(sk, &SKC_STATE).unwrap_or(0);
    let (netns, uid) = socket_identity(sk);
    let event = KernelEvent {
        saddr,
        daddr,
        sport,
        dport,
        family,
        netns,
        uid,
        oldstate: state,
        newstate: state,
        kind,
        ..blank_event(sk, current_process())
    };
    send_naming(event);
}
