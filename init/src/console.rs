//! Talking on the consoles: every line PID 1 prints goes to every console named by `console=`
//! (or `/dev/console`), so whichever screen or serial line the user watches shows it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::cmdline::Cmdline;

/// The open console devices. Consoles that cannot be opened are left out; with none open,
/// lines go to stderr (the kernel's `/dev/console` if the initramfs has one).
pub struct Consoles {
    ttys: Vec<(PathBuf, File)>,
}

impl Consoles {
    pub fn open(cmdline: &Cmdline) -> Consoles {
        let ttys = cmdline.consoles().into_iter().filter_map(|p| Some((p.clone(), open_tty(&p)?))).collect();
        Consoles { ttys }
    }

    /// No console yet (before /dev is mounted): stderr only.
    pub fn stderr_only() -> Consoles {
        Consoles { ttys: Vec::new() }
    }

    pub fn ttys(&self) -> &[(PathBuf, File)] {
        &self.ttys
    }

    /// Writes one whole line to every console; a console that fails is skipped.
    pub fn line(&self, text: &str) {
        self.write_all(format!("{text}\n").as_bytes());
    }

    /// Writes raw text (a prompt) without adding a newline.
    pub fn write_all(&self, bytes: &[u8]) {
        if self.ttys.is_empty() {
            let _ = std::io::stderr().write_all(bytes);
            return;
        }
        for (path, tty) in &self.ttys {
            let mut w: &File = tty;
            if w.write_all(bytes).is_err() {
                // A hung-up terminal (its session ended) takes no more writes through this
                // handle; a new one works.
                if let Some(mut fresh) = open_tty(path) {
                    let _ = fresh.write_all(bytes);
                }
            }
        }
    }
}

impl Consoles {
    /// Waits until every console has sent what we wrote: the power-off would otherwise cut the
    /// last lines off in the UART's buffer.
    pub fn drain(&self) {
        for (_, tty) in &self.ttys {
            let _ = nix::sys::termios::tcdrain(tty.as_fd());
        }
    }
}

/// Opens a tty without making it our controlling terminal: keyboard signals (Ctrl-C) must not
/// reach PID 1 through the console.
fn open_tty(path: &Path) -> Option<File> {
    OpenOptions::new().read(true).write(true).custom_flags(nix::libc::O_NOCTTY).open(path).ok()
}
