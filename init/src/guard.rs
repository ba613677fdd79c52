//! The host-safety guard: every action that changes the whole machine (power off, reboot,
//! killing all processes, Ctrl-Alt-Del policy) asks here first. It allows them only when we are
//! PID 1 and the kernel command line says `cloister.appliance`, so running this binary or its
//! tests on a developer's machine can never power it off.

use crate::cmdline::Cmdline;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuardError {
    #[error("refusing {action}: not pid 1 (pid {pid})")]
    NotPid1 { action: &'static str, pid: u32 },
    #[error("refusing {action}: kernel command line lacks {}", cloister_proto::CMDLINE_APPLIANCE)]
    NotAppliance { action: &'static str },
}

/// Proof that machine-global actions are allowed; only [`check`] makes one.
#[derive(Debug, Clone, Copy)]
pub struct Appliance(());

/// The pure decision, separate so tests can cover every case.
pub fn decide(action: &'static str, cmdline: &Cmdline, pid: u32) -> Result<Appliance, GuardError> {
    if pid != 1 {
        return Err(GuardError::NotPid1 { action, pid });
    }
    if !cmdline.is_appliance() {
        return Err(GuardError::NotAppliance { action });
    }
    Ok(Appliance(()))
}

/// Checks this process and the running kernel's command line.
pub fn check(action: &'static str) -> Result<Appliance, GuardError> {
    decide(action, &Cmdline::read(), std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_only_pid1_on_an_appliance() {
        let appliance = Cmdline::parse("console=ttyS0 cloister.appliance");
        let host = Cmdline::parse("BOOT_IMAGE=/vmlinuz root=/dev/sda1");
        assert!(decide("power off", &appliance, 1).is_ok());
        assert_eq!(
            decide("power off", &appliance, 4242).err(),
            Some(GuardError::NotPid1 { action: "power off", pid: 4242 })
        );
        assert_eq!(
            decide("power off", &host, 1).err(),
            Some(GuardError::NotAppliance { action: "power off" })
        );
    }

    #[test]
    fn refuses_on_this_host() {
        // The test runner is never PID 1, so the real check must refuse whatever the cmdline.
        assert!(matches!(check("power off"), Err(GuardError::NotPid1 { .. })));
        assert!(crate::power::power_off().is_err());
        assert!(crate::power::kill_all(nix::sys::signal::Signal::SIGTERM).is_err());
    }
}
