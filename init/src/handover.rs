//! What stage 1 leaves to a child process when it switches to stage 2: queueing stage 2's
//! program and libraries for reading, and, once stage 2 runs, emptying the initramfs. On stage
//! 1's own path both took ~80 and ~65 ms under TCG; the child does them on the other CPU while
//! stage 1 switches and execs, and while stage 2 starts. Stage 2, PID 1 after the exec, reaps the
//! child like any other.
//!
//! The child learns that the exec happened from a pipe: stage 1 keeps the write end, marked
//! close-on-exec, so the exec closes it and the child reads end of file. If stage 1 fails before
//! the exec, dropping the [`Handover`] kills the child first: the initramfs stage 1 still runs
//! from is never emptied under it.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use cloister_proto::marker;

use crate::console::Consoles;
use crate::mounts;
use crate::prefetch::Stage2Files;

/// How long the child waits for the exec; without it, it leaves the initramfs alone.
const EXEC_WAIT: Duration = Duration::from_secs(60);

/// A child doing stage 1's last work, or (no child could be forked) that work still to do.
pub struct Handover {
    child: Option<Pid>,
    /// Closed by the exec: the child's signal to start emptying the initramfs.
    _exec_signal: Option<OwnedFd>,
    /// The initramfs, when stage 1 must still empty it itself.
    pub empty_here: bool,
}

impl Handover {
    /// Opens stage 2's files under `root` and the initramfs's top directory, then forks the child.
    /// Without a child (a thread still runs, the fork failed, `/` is no initramfs), the files are
    /// queued here and [`Handover::empty_here`] says that `switch_root` must empty the initramfs
    /// (and so check it).
    pub fn start(c: &Consoles, root: &Path, program: &str) -> Handover {
        let files = Stage2Files::open(root, program);
        let (count, kib, of_kib) = (files.count(), files.bytes / 1024, files.file_bytes / 1024);
        match fork_child(c, files) {
            Ok((child, signal)) => {
                c.line(&format!(
                    "{} {child}: reading ahead what stage 1 touched of stage 2's {count} files ({kib} of \
                     {of_kib} KiB), then emptying the initramfs",
                    marker::HANDED_OVER
                ));
                Handover { child: Some(child), _exec_signal: Some(signal), empty_here: false }
            }
            Err((why, files)) => {
                c.line(&format!(
                    "cloister: no handover ({why}): reading ahead {count} files ({kib} of {of_kib} KiB) here"
                ));
                files.read_ahead();
                Handover { child: None, _exec_signal: None, empty_here: true }
            }
        }
    }
}

#[cfg(test)]
impl Handover {
    /// No child: stage 1 does it all itself.
    pub fn without_child() -> Handover {
        Handover { child: None, _exec_signal: None, empty_here: true }
    }
}

impl Drop for Handover {
    /// Only runs if stage 1 did not exec: the child must not empty the initramfs under it.
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            let _ = kill(child, Signal::SIGKILL);
        }
    }
}

/// Forks the child with stage 2's files, the initramfs's top directory and the pipe's read end;
/// returns the child and the pipe's write end. Without a child, the files come back with why.
fn fork_child(c: &Consoles, files: Stage2Files) -> Result<(Pid, OwnedFd), (String, Stage2Files)> {
    let (top, dev) = match mounts::open_initramfs() {
        Ok(opened) => opened,
        Err(e) => return Err((e.to_string(), files)),
    };
    let (exec_read, exec_write) = match nix::unistd::pipe2(OFlag::O_CLOEXEC) {
        Ok(pipe) => pipe,
        Err(e) => return Err((format!("pipe: {e}"), files)),
    };
    let mut parts = Some((files, top, exec_read));
    let mut write_end = Some(exec_write);
    let forked = crate::sys::fork_single_threaded(|| {
        // The child never execs: it closes its copy of the write end itself, or it would wait
        // for its own descriptor.
        drop(write_end.take());
        match parts.take() {
            Some((files, top, exec_read)) => child_main(c, files, &top, dev, &exec_read, EXEC_WAIT),
            None => 1,
        }
    });
    let why = match (forked, write_end) {
        (Ok(Some(child)), Some(signal)) => return Ok((child, signal)),
        (Ok(Some(_)), None) => "the pipe's write end went missing".to_string(),
        (Ok(None), _) => "a thread still runs".to_string(),
        (Err(e), _) => format!("fork: {e}"),
    };
    Err((why, parts.map(|(files, ..)| files).unwrap_or_default()))
}

/// The child: queue the reads, wait for the exec, empty the initramfs, say how long it took.
fn child_main(
    c: &Consoles,
    files: Stage2Files,
    top: &File,
    dev: u64,
    exec_read: &OwnedFd,
    wait: Duration,
) -> i32 {
    let t = Instant::now();
    let queued = files.read_ahead();
    let queued_ms = t.elapsed().as_millis();
    if !exec_happened(exec_read, wait) {
        c.line(&format!("{}stage 2 was not started; the initramfs stays", marker::HANDOVER_DONE));
        return 1;
    }
    let emptying = Instant::now();
    mounts::remove_children_at(top.as_fd(), dev);
    c.line(&format!(
        "{}{queued} files queued in {queued_ms} ms; initramfs emptied in {} ms",
        marker::HANDOVER_DONE,
        emptying.elapsed().as_millis()
    ));
    0
}

/// True once the pipe's write end is closed (the exec), false after `wait`.
fn exec_happened(exec_read: &OwnedFd, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(exec_read.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            // Nothing is ever written: readable or hung up both mean the write end is gone.
            Ok(n) if n > 0 => return true,
            Ok(_) => return false,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn the_child_empties_the_initramfs_only_once_the_exec_closed_the_pipe() {
        let initramfs = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(initramfs.path().join("usr/lib")).unwrap();
        std::fs::write(initramfs.path().join("usr/lib/libx.so"), "x").unwrap();
        std::fs::write(initramfs.path().join("init"), "y").unwrap();
        let top = File::open(initramfs.path()).unwrap();
        let dev = top.metadata().unwrap().dev();
        let c = Consoles::stderr_only();
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        let wait = Duration::from_millis(50);
        // Stage 1 still holds the write end: no exec yet, nothing goes.
        assert_eq!(child_main(&c, Stage2Files::default(), &top, dev, &read, wait), 1);
        assert_eq!(std::fs::read_dir(initramfs.path()).unwrap().count(), 2);
        drop(write);
        assert_eq!(child_main(&c, Stage2Files::default(), &top, dev, &read, wait), 0);
        assert_eq!(std::fs::read_dir(initramfs.path()).unwrap().count(), 0);
    }
}
