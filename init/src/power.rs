//! Machine-global actions (power off, kill every process, Ctrl-Alt-Del policy), each behind the
//! host-safety guard, and the "never return" ending PID 1 uses after a fatal error.

use std::convert::Infallible;
use std::time::Duration;

use nix::sys::reboot::{reboot, set_cad_enabled, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::console::Consoles;
use crate::guard::{self, GuardError};

#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error(transparent)]
    Refused(#[from] GuardError),
    #[error("reboot(power off): {0}")]
    PowerOff(nix::Error),
    #[error("reboot(restart): {0}")]
    Restart(nix::Error),
    #[error("reboot(disable ctrl-alt-del): {0}")]
    DisableCad(nix::Error),
    #[error("kill(-1, {signal}): {source}")]
    KillAll { signal: Signal, source: nix::Error },
}

/// Cuts the power. Only returns on failure or refusal.
pub fn power_off() -> Result<Infallible, PowerError> {
    guard::check("power off")?;
    nix::unistd::sync();
    reboot(RebootMode::RB_POWER_OFF).map_err(PowerError::PowerOff)
}

/// Restarts the machine. Only returns on failure or refusal.
pub fn reboot_now() -> Result<Infallible, PowerError> {
    guard::check("reboot")?;
    nix::unistd::sync();
    reboot(RebootMode::RB_AUTOBOOT).map_err(PowerError::Restart)
}

/// How PID 1's life ends after an orderly shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    PowerOff,
    Reboot,
}

impl Ending {
    /// The word passed to `/init --shutdown` in the initramfs copy.
    pub fn arg(self) -> &'static str {
        match self {
            Ending::PowerOff => "poweroff",
            Ending::Reboot => "reboot",
        }
    }

    pub fn from_arg(arg: Option<&str>) -> Self {
        if arg == Some("reboot") {
            Ending::Reboot
        } else {
            Ending::PowerOff
        }
    }
}

/// Like [`halt_after`] without delay, but restarts instead when asked to; a refused or failed
/// reboot still ends in a power off.
pub fn end(ending: Ending, consoles: &Consoles) -> ! {
    if ending == Ending::Reboot {
        consoles.drain();
        let Err(e) = reboot_now();
        consoles.line(&format!("cloister: {e}; powering off instead"));
    }
    halt_after(Duration::ZERO, consoles)
}

/// Makes Ctrl-Alt-Del send SIGINT to PID 1 instead of rebooting at once.
pub fn disable_ctrl_alt_del() -> Result<(), PowerError> {
    guard::check("disable ctrl-alt-del")?;
    set_cad_enabled(false).map_err(PowerError::DisableCad)
}

/// Sends `signal` to every process but ourselves. ESRCH (nobody left) is success.
pub fn kill_all(signal: Signal) -> Result<(), PowerError> {
    guard::check("kill all processes")?;
    match kill(Pid::from_raw(-1), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(source) => Err(PowerError::KillAll { signal, source }),
    }
}

/// The end of the road for PID 1: wait `delay` so the console can be read, then power off. If
/// that is refused (not an appliance) or fails, sleep forever: PID 1 must not exit.
pub fn halt_after(delay: Duration, consoles: &Consoles) -> ! {
    if !delay.is_zero() {
        consoles.line(&format!("cloister: powering off in {} s", delay.as_secs()));
    }
    std::thread::sleep(delay);
    consoles.drain();
    let Err(e) = power_off();
    consoles.line(&format!("cloister: {e}; halting here"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
