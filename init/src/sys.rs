//! The init crate's `unsafe` besides the ioctls: restoring the default SIGPIPE disposition
//! before a service is exec'd (the Rust runtime ignores SIGPIPE at startup, and `execve` keeps
//! ignored signals, so without this every service would inherit "ignore SIGPIPE"), taking
//! ownership of descriptors that arrived with SCM_RIGHTS, the two priority calls of the
//! background fill (`ioprio_set`, `setpriority`), which neither nix nor std wraps, and the fork
//! of stage 1's handover child (`fork`, `_exit`).
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

/// How many threads this process has, from `/proc/self/status`.
pub fn thread_count() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok())
}

/// Forks a child that runs `child` and ends with its exit code (`_exit`: no atexit handlers,
/// no destructors of this process's frames run twice). `Ok(None)` if this process has more
/// than one thread: a thread that does not exist in the child could hold a lock the child
/// needs.
pub fn fork_single_threaded(child: impl FnOnce() -> i32) -> nix::Result<Option<nix::unistd::Pid>> {
    if thread_count() != Some(1) {
        return Ok(None);
    }
    // SAFETY: this process has one thread (checked just above; only this thread could have
    // started another since), so the child's copy of memory holds no lock or state half-changed
    // by a thread that is missing there; it may allocate and use files like any program.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(Some(child)),
        nix::unistd::ForkResult::Child => {
            let code = child();
            // SAFETY: `_exit` ends the process at once and reads or writes no memory of ours.
            unsafe { libc::_exit(code) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harness runs each test on a thread of its own, beside its main thread: a fork here
    /// must be refused, and the child's work not run. (The fork itself runs at every test boot:
    /// the e2e tests wait for the handover child's line.)
    #[test]
    fn fork_is_refused_beside_other_threads() {
        assert!(thread_count().unwrap() >= 2);
        let mut ran = false;
        assert_eq!(
            fork_single_threaded(|| {
                ran = true;
                0
            })
            .unwrap(),
            None
        );
        assert!(!ran);
    }

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
