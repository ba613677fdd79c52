//! Stage 2, PID 1 on the unlocked root: announce the unlock, arm the power button and signals,
//! reap children, and on a shutdown request stop everything and power off cleanly.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use cloister_proto::marker;

use crate::cmdline::Cmdline;
use crate::console::Consoles;
use crate::{clock, input, kmod, mounts, power};

/// How long processes get between SIGTERM and SIGKILL at shutdown.
const GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
enum SignalError {
    #[error("block signals: {0}")]
    Mask(nix::Error),
    #[error("signalfd: {0}")]
    Signalfd(nix::Error),
}

pub fn run() -> ! {
    let consoles = Consoles::open(&Cmdline::read());
    consoles.line(&cloister_proto::unlocked_line(clock::boot_ms()));
    let say = |s: &str| consoles.line(s);
    match signal_fd() {
        Ok(sfd) => {
            if let Err(e) = power::disable_ctrl_alt_del() {
                say(&format!("cloister: {e}"));
            }
            let buttons = open_power_buttons(&say);
            wait_for_shutdown(&sfd, &buttons, &say);
        }
        // Without signals we cannot be stopped cleanly; keep the root consistent and stop now.
        Err(e) => say(&format!("{} stage2: {e}", marker::FATAL)),
    }
    shutdown(&consoles)
}

fn signal_fd() -> Result<SignalFd, SignalError> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGPWR, Signal::SIGCHLD] {
        set.add(s);
    }
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None).map_err(SignalError::Mask)?;
    SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK).map_err(SignalError::Signalfd)
}

/// Loads the ACPI button and evdev drivers and opens every "Power Button" event device.
fn open_power_buttons(say: &dyn Fn(&str)) -> Vec<File> {
    match kmod::modules_dir() {
        Ok(dir) => {
            for name in ["button", "evdev"] {
                if let Err(e) = kmod::load_by_name(&dir, name) {
                    say(&format!("cloister: module {name}: {e}"));
                }
            }
        }
        Err(e) => say(&format!("cloister: {e}")),
    }
    // evdev makes its nodes as the driver binds, which can lag the module load a little.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut paths = Vec::new();
    while paths.is_empty() && Instant::now() < deadline {
        paths = input::power_buttons(Path::new("/sys/class/input"), Path::new("/dev/input"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let files: Vec<File> = paths.iter().filter_map(|p| File::open(p).ok()).collect();
    say(&format!("{} ({} device(s))", marker::POWER_BUTTON_ARMED, files.len()));
    files
}

/// Reaps every exited child without blocking.
fn reap() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Runs the main loop until a shutdown request: SIGTERM, SIGINT (Ctrl-Alt-Del), SIGPWR or
/// a power button press. SIGCHLD reaps.
fn wait_for_shutdown(sfd: &SignalFd, buttons: &[File], say: &dyn Fn(&str)) {
    let mut buf = [0u8; input::EVENT_SIZE * 16];
    loop {
        let mut fds = vec![PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
        fds.extend(buttons.iter().map(|b| PollFd::new(b.as_fd(), PollFlags::POLLIN)));
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                say(&format!("cloister: poll: {e}; shutting down"));
                return;
            }
        }
        let ready: Vec<bool> =
            fds.iter().map(|f| f.revents().is_some_and(|r| r.intersects(PollFlags::POLLIN))).collect();
        if ready[0] {
            while let Ok(Some(info)) = sfd.read_signal() {
                if info.ssi_signo == Signal::SIGCHLD as u32 {
                    reap();
                } else {
                    let name = i32::try_from(info.ssi_signo).ok().and_then(|n| Signal::try_from(n).ok());
                    say(&format!("cloister: {} received", name.map_or("signal", |s| s.as_str())));
                    return;
                }
            }
        }
        for (i, mut b) in buttons.iter().enumerate() {
            if ready[i + 1] && b.read(&mut buf).is_ok_and(|n| input::has_power_press(&buf[..n])) {
                say("cloister: power button pressed");
                return;
            }
        }
    }
}

/// Stops every process, makes the root read-only and cuts the power. Never returns.
fn shutdown(consoles: &Consoles) -> ! {
    let say = |s: &str| consoles.line(s);
    say(marker::SHUTDOWN);
    if let Err(e) = power::kill_all(Signal::SIGTERM) {
        say(&format!("cloister: {e}"));
    }
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline {
        reap();
        if waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) == Err(Errno::ECHILD) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Err(e) = power::kill_all(Signal::SIGKILL) {
        say(&format!("cloister: {e}"));
    }
    reap();
    nix::unistd::sync();
    match mounts::remount_root_ro() {
        Ok(()) => say("cloister: root is read-only"),
        Err(e) => say(&format!("cloister: {e}")),
    }
    nix::unistd::sync();
    let shutdown_init = format!("{}{}", mounts::SHUTDOWN_ROOT, cloister_proto::STAGE1_PATH);
    if Path::new(&shutdown_init).exists() {
        consoles.drain();
        let Err(e) =
            mounts::pivot_to_shutdown_root(cloister_proto::STAGE1_PATH, &[crate::shutdown::SHUTDOWN_ARG]);
        say(&format!("cloister: {e}"));
    }
    say(marker::POWER_OFF);
    power::halt_after(Duration::ZERO, consoles)
}
