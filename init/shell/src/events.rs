//! Waiting: one `poll` over the terminal, the session socket and a signalfd, with a deadline.
//!
//! Signals go through a signalfd rather than handlers: the handled signals are blocked and read
//! as ordinary events, so there is no async-signal-safety to get right, no `unsafe` (installing a
//! handler is `unsafe` in nix) and no EINTR in the middle of a write. SIGTSTP is in the same set
//! and simply drained, which is how the shell ignores it.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// Signals that end the session.
const ENDING: [Signal; 4] = [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT, Signal::SIGQUIT];

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("block signals: {source}")]
    Block { source: Errno },
    #[error("create signalfd: {source}")]
    SignalFd { source: Errno },
    #[error("read signalfd: {source}")]
    ReadSignal { source: Errno },
    #[error("poll: {source}")]
    Poll { source: Errno },
}

/// What ended a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// One of SIGHUP, SIGTERM, SIGINT, SIGQUIT arrived.
    Signal(Signal),
    /// The session socket is readable (data, end of stream or error).
    Server,
    /// The terminal is readable (data, end of file or hang-up).
    Terminal,
    /// The deadline passed.
    Timeout,
    /// SIGWINCH: the terminal changed size (only the chat client cares).
    Resize,
}

pub struct Events {
    signals: SignalFd,
}

impl Events {
    /// Blocks the handled signals and opens the signalfd that reports them.
    pub fn new() -> Result<Self, EventsError> {
        let mut mask = SigSet::empty();
        for signal in ENDING {
            mask.add(signal);
        }
        mask.add(Signal::SIGTSTP);
        mask.add(Signal::SIGWINCH);
        mask.thread_block().map_err(|source| EventsError::Block { source })?;
        let flags = SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC;
        let signals =
            SignalFd::with_flags(&mask, flags).map_err(|source| EventsError::SignalFd { source })?;
        Ok(Events { signals })
    }

    /// Waits until a signal, the server, the terminal (if given) or the deadline. Signals win
    /// over input, and the server over the terminal, when several are ready at once.
    pub fn wait(
        &self,
        terminal: Option<BorrowedFd<'_>>,
        server: BorrowedFd<'_>,
        deadline: Option<Instant>,
    ) -> Result<Wake, EventsError> {
        loop {
            if let Some(wake) = self.pending_signal()? {
                return Ok(wake);
            }
            let timeout = match deadline {
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => poll_timeout(left),
                    _ => return Ok(Wake::Timeout),
                },
                None => PollTimeout::NONE,
            };
            let mut fds = vec![
                PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
                PollFd::new(server, PollFlags::POLLIN),
            ];
            if let Some(terminal) = terminal {
                fds.push(PollFd::new(terminal, PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(source) => return Err(EventsError::Poll { source }),
            }
            let ready = |fd: &PollFd| fd.revents().is_some_and(|revents| !revents.is_empty());
            if ready(&fds[0]) {
                continue;
            }
            if ready(&fds[1]) {
                return Ok(Wake::Server);
            }
            if fds.get(2).is_some_and(ready) {
                return Ok(Wake::Terminal);
            }
        }
    }

    /// The next ending signal or resize already delivered; SIGTSTP is consumed and ignored.
    fn pending_signal(&self) -> Result<Option<Wake>, EventsError> {
        while let Some(info) =
            self.signals.read_signal().map_err(|source| EventsError::ReadSignal { source })?
        {
            let signal = i32::try_from(info.ssi_signo).ok().and_then(|n| Signal::try_from(n).ok());
            match signal {
                Some(Signal::SIGWINCH) => return Ok(Some(Wake::Resize)),
                Some(signal) if ENDING.contains(&signal) => return Ok(Some(Wake::Signal(signal))),
                _ => {}
            }
        }
        Ok(None)
    }
}

/// Rounded up so that a wait never ends a hair before its deadline and spins.
fn poll_timeout(left: Duration) -> PollTimeout {
    let millis = left.as_millis().saturating_add(1).min(i32::MAX as u128);
    PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX)
}
