//! The init crate's only `unsafe`: restoring the default SIGPIPE disposition before a service is
//! exec'd. The Rust runtime ignores SIGPIPE at startup, and `execve` keeps ignored signals, so
//! without this every service would inherit "ignore SIGPIPE" from our exec link.
#![allow(unsafe_code)]

use nix::sys::signal::{signal, SigHandler, Signal};

/// Sets SIGPIPE back to its default action (terminate).
pub fn default_sigpipe() -> nix::Result<()> {
    // SAFETY: installing SIG_DFL installs no Rust handler, so no handler can run code that is not
    // async-signal-safe; this process is single-threaded and about to execve.
    unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }.map(drop)
}
