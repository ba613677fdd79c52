//! The init crate's `unsafe` besides the ioctls: restoring the default SIGPIPE disposition
//! before a service is exec'd (the Rust runtime ignores SIGPIPE at startup, and `execve` keeps
//! ignored signals, so without this every service would inherit "ignore SIGPIPE"), and taking
//! ownership of descriptors that arrived with SCM_RIGHTS.
#![allow(unsafe_code)]

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

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
