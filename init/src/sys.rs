//! The init crate's `unsafe` besides the ioctls: restoring the default SIGPIPE disposition
//! before a service is exec'd (the Rust runtime ignores SIGPIPE at startup, and `execve` keeps
//! ignored signals, so without this every service would inherit "ignore SIGPIPE"), taking
//! ownership of descriptors that arrived with SCM_RIGHTS, and the two priority calls of the
//! background fill (`ioprio_set`, `setpriority`), which neither nix nor std wraps.
#![allow(unsafe_code)]

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::{signal, SigHandler, Signal};

/// Sets SIGPIPE back to its default action (terminate).
pub fn default_sigpipe() -> nix::Result<()> {
    // SAFETY: installing SIG_DFL installs no Rust handler, so no handler can run code that is not
    // async-signal-safe; this process is single-threaded and about to execve.
    unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }.map(drop)
}

/// Owns a descriptor the kernel has just installed from an SCM_RIGHTS message.
pub fn own_received_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: `recvmsg` installed `fd` in this process for this message alone; no other owner
    // exists, so closing it on drop cannot close anything someone else uses.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `IOPRIO_WHO_PROCESS`, `IOPRIO_CLASS_IDLE` and the class shift of `<linux/ioprio.h>`.
const IOPRIO_WHO_PROCESS: libc::c_int = 1;
pub const IOPRIO_CLASS_IDLE: libc::c_int = 3;
const IOPRIO_CLASS_SHIFT: libc::c_int = 13;

/// Puts the calling thread into the idle I/O class: the block layer serves its requests only
/// when no one else's are waiting (where the disk's scheduler honours classes).
pub fn idle_io_priority() -> nix::Result<()> {
    let prio = IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT;
    // SAFETY: ioprio_set takes three integers and reads or writes no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, prio) };
    Errno::result(r).map(drop)
}

/// The calling thread's I/O priority class (`IOPRIO_CLASS_*`).
#[cfg(test)]
pub fn io_priority_class() -> nix::Result<libc::c_int> {
    // SAFETY: ioprio_get takes two integers and reads or writes no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0) };
    Errno::result(r).map(|prio| (prio as libc::c_int) >> IOPRIO_CLASS_SHIFT)
}

/// Nice 19 for the calling thread: the CPU it spends is everyone else's leftovers.
pub fn lowest_cpu_priority() -> nix::Result<()> {
    // SAFETY: setpriority takes three integers and reads or writes no memory of ours.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    Errno::result(r).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a thread of its own: the priorities stick to the thread that set them.
    #[test]
    fn idle_io_priority_reads_back() {
        let class = std::thread::spawn(|| {
            idle_io_priority().unwrap();
            lowest_cpu_priority().unwrap();
            io_priority_class().unwrap()
        });
        assert_eq!(class.join().unwrap(), IOPRIO_CLASS_IDLE);
    }
}
