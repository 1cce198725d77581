//! The task_file iterator: every process's socket fds, in one pass.

// What the programs share: maps, kernel offsets, reading and sending.
use crate::*;

/// Lists the socket fds of every process: one `SocketFd` per socket fd,
/// written to the iterator's seq file. Threads that share their leader's
/// files are skipped by the kernel's task_file iterator.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn socket_fds(ctx: *mut c_void) -> i32 {
    let ctx = ctx.cast::<u64>();
    // SAFETY: the kernel passes a `struct bpf_iter__task_file`: meta, task,
    // fd and file, 8 bytes apart.
    let (meta, task, fd, file) = unsafe { (*ctx, *ctx.add(1), *ctx.add(2) as u32, *ctx.add(3)) };
    if meta == 0 || task == 0 || file == 0 {
        return 0;
    }
    // An fd the program cannot read leaves a marker, so that user space
    // knows the listing is incomplete rather than taking it as whole.
    let record = socket_fd(task, fd, file).unwrap_or_else(|_| {
        Some(SocketFd {
            inode: 0,
            tgid: read_kernel(task, &TASK_TGID).unwrap_or(0),
            fd: SOCKET_FD_UNREADABLE,
        })
    });
    let Some(record) = record else {
        return 0;
    };
    write_record(meta, &record);
    0
}

/// The record of fd `fd` of `task`, if `file` is a socket.
fn socket_fd(task: u64, fd: u32, file: u64) -> Result<Option<SocketFd>, i64> {
    let inode: u64 = read_kernel(file, &FILE_F_INODE)?;
    if inode == 0 || read_kernel::<u16>(inode, &INODE_I_MODE)? & S_IFMT != S_IFSOCK {
        return Ok(None);
    }
    Ok(Some(SocketFd {
        inode: read_kernel(inode, &INODE_I_INO)?,
        tgid: read_kernel(task, &TASK_TGID)?,
        fd,
    }))
}
