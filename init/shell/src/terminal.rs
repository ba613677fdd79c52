//! The user's terminal: unbuffered reads from fd 0, and termios changes that are undone on every
//! exit path (a guard restores the saved settings when dropped).

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};

use nix::errno::Errno;
use nix::sys::termios::{self, FlushArg, LocalFlags, SetArg, Termios};

#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    #[error("read terminal settings: {source}")]
    GetAttr { source: Errno },
    #[error("change terminal settings: {source}")]
    SetAttr { source: Errno },
}

/// Reads fd 0 directly: std's `Stdin` would buffer beyond the bound and hide input from `poll`.
pub struct TerminalReader;

impl Read for TerminalReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match nix::unistd::read(io::stdin().as_fd(), buf) {
            Ok(count) => Ok(count),
            // A hung-up terminal reads as EIO: for the shell that is the end of input.
            Err(Errno::EIO) => Ok(0),
            Err(errno) => Err(io::Error::from(errno)),
        }
    }
}

/// Restores the terminal settings it saved when dropped.
pub struct TermiosGuard<'fd> {
    fd: BorrowedFd<'fd>,
    saved: Termios,
}

impl<'fd> TermiosGuard<'fd> {
    /// Saves the current settings, to be restored as they are now (used around `chat`, so that
    /// a sandboxed program killed in raw mode leaves a usable terminal).
    pub fn save(fd: BorrowedFd<'fd>) -> Result<Self, TerminalError> {
        let saved = termios::tcgetattr(fd).map_err(|source| TerminalError::GetAttr { source })?;
        Ok(TermiosGuard { fd, saved })
    }

    /// Turns echo off (the Enter key still echoes a newline) until the guard is dropped.
    pub fn echo_off(fd: BorrowedFd<'fd>) -> Result<Self, TerminalError> {
        let guard = Self::save(fd)?;
        let mut quiet = guard.saved.clone();
        quiet.local_flags.remove(LocalFlags::ECHO | LocalFlags::ECHOE | LocalFlags::ECHOK);
        quiet.local_flags.insert(LocalFlags::ECHONL);
        termios::tcsetattr(fd, SetArg::TCSAFLUSH, &quiet)
            .map_err(|source| TerminalError::SetAttr { source })?;
        Ok(guard)
    }
}

impl Drop for TermiosGuard<'_> {
    fn drop(&mut self) {
        // Nothing better to do if this fails: the terminal is most likely gone.
        let _ = termios::tcsetattr(self.fd, SetArg::TCSANOW, &self.saved);
    }
}

/// Drops input typed while another program owned the terminal, so it is not run as commands.
pub fn discard_pending_input(fd: BorrowedFd<'_>) {
    let _ = termios::tcflush(fd, FlushArg::TCIFLUSH);
}
