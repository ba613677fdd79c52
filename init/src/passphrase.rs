//! Asking for the passphrase: the prompt goes to every console, echo is switched off on each,
//! and the first console to deliver a whole line wins. The bytes live in zeroizing buffers.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg, Termios};
use zeroize::Zeroizing;

use crate::console::Consoles;

/// Longest passphrase accepted, in bytes (without the newline).
pub const MAX_LEN: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("no console to read a passphrase from")]
    NoConsole,
    #[error("poll consoles: {0}")]
    Poll(nix::Error),
}

/// Delay after the n-th wrong passphrase (n from 1): 1 s, 2 s, 4 s … capped at 30 s.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(5);
    Duration::from_secs((1u64 << exp).min(30))
}

/// Echo off on a console for as long as this lives; restores the old settings on drop.
struct NoEcho<'a> {
    tty: &'a File,
    saved: Option<Termios>,
}

impl<'a> NoEcho<'a> {
    fn new(tty: &'a File) -> NoEcho<'a> {
        let saved = tcgetattr(tty.as_fd()).ok();
        if let Some(old) = &saved {
            let mut t = old.clone();
            t.local_flags.remove(LocalFlags::ECHO | LocalFlags::ECHOE | LocalFlags::ECHOK);
            t.local_flags.insert(LocalFlags::ICANON);
            let _ = tcsetattr(tty.as_fd(), SetArg::TCSAFLUSH, &t);
        }
        NoEcho { tty, saved }
    }
}

impl Drop for NoEcho<'_> {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            let _ = tcsetattr(self.tty.as_fd(), SetArg::TCSANOW, t);
        }
    }
}

/// What feeding bytes into a line buffer produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Fed {
    More,
    Line,
    TooLong,
}

/// Appends `input` to `buf` up to the first newline; the newline (and any CR) is dropped.
pub fn feed(buf: &mut Zeroizing<Vec<u8>>, input: &[u8]) -> Fed {
    for &b in input {
        match b {
            b'\n' | b'\r' => return Fed::Line,
            _ if buf.len() >= MAX_LEN => return Fed::TooLong,
            _ => buf.push(b),
        }
    }
    Fed::More
}

/// Prompts on every console until one delivers a non-empty line of at most [`MAX_LEN`] bytes.
pub fn ask(consoles: &Consoles, disk: &str) -> Result<Zeroizing<Vec<u8>>, AskError> {
    let ttys: Vec<&File> = consoles.ttys().iter().map(|(_, f)| f).collect();
    if ttys.is_empty() {
        return Err(AskError::NoConsole);
    }
    loop {
        let guards: Vec<NoEcho> = ttys.iter().map(|t| NoEcho::new(t)).collect();
        consoles.write_all(format!("{}{disk}: ", cloister_proto::marker::PASSPHRASE_PROMPT).as_bytes());
        let line = read_first_line(&ttys);
        drop(guards);
        // Echo was off, so the user's Enter did not move the cursor.
        consoles.write_all(b"\n");
        match line? {
            Some(pass) if !pass.is_empty() => return Ok(pass),
            Some(_) => {}
            None => consoles.line(&format!("cloister: passphrase longer than {MAX_LEN} bytes")),
        }
    }
}

/// Waits for a whole line on any tty. `Ok(None)` means the line was too long.
fn read_first_line(ttys: &[&File]) -> Result<Option<Zeroizing<Vec<u8>>>, AskError> {
    let mut bufs: Vec<Zeroizing<Vec<u8>>> = ttys.iter().map(|_| Zeroizing::new(Vec::new())).collect();
    let mut chunk = Zeroizing::new([0u8; 256]);
    loop {
        let mut fds: Vec<PollFd> = ttys.iter().map(|t| PollFd::new(t.as_fd(), PollFlags::POLLIN)).collect();
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(AskError::Poll(e)),
        }
        let ready: Vec<bool> =
            fds.iter().map(|f| f.revents().is_some_and(|r| r.contains(PollFlags::POLLIN))).collect();
        for (i, tty) in ttys.iter().enumerate().filter(|(i, _)| ready[*i]) {
            let mut r: &File = tty;
            let n = match r.read(&mut chunk[..]) {
                Ok(n) => n,
                Err(_) => continue,
            };
            match feed(&mut bufs[i], &chunk[..n]) {
                Fed::More => {}
                Fed::Line => return Ok(Some(std::mem::take(&mut bufs[i]))),
                Fed::TooLong => return Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps_at_30s() {
        let secs: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(u32::MAX).as_secs(), 30);
    }

    #[test]
    fn feed_stops_at_newline_and_limits_length() {
        let mut buf = Zeroizing::new(Vec::new());
        assert_eq!(feed(&mut buf, b"hunter"), Fed::More);
        assert_eq!(feed(&mut buf, b"2\r\nrest"), Fed::Line);
        assert_eq!(buf.as_slice(), b"hunter2");

        let mut long = Zeroizing::new(Vec::new());
        assert_eq!(feed(&mut long, &[b'a'; MAX_LEN]), Fed::More);
        assert_eq!(feed(&mut long, b"\n"), Fed::Line);
        let mut too_long = Zeroizing::new(Vec::new());
        assert_eq!(feed(&mut too_long, &[b'a'; MAX_LEN + 1]), Fed::TooLong);
    }
}
