//! The few strings that both sides of the console agree on: what PID 1 prints and what the
//! tests and the build wait for or write. One crate without dependencies, so that the appliance,
//! the builder and the test harness cannot drift apart.
#![forbid(unsafe_code)]

/// Kernel command line key naming the root partition: `cloister.root=PARTUUID=<uuid>`.
pub const CMDLINE_ROOT: &str = "cloister.root";
/// Kernel command line flag that marks a real appliance boot. Steps that change the whole
/// machine (sysctls, clock, power off) refuse to run without it, so a test on a host is safe.
pub const CMDLINE_APPLIANCE: &str = "cloister.appliance";

/// Name of the dm-crypt mapping of the root (`/dev/mapper/<name>`).
pub const ROOT_MAPPING: &str = "cloister-root";

/// Where stage 1 is installed inside the initramfs.
pub const STAGE1_PATH: &str = "/init";
/// Where the same binary lives on the root filesystem; stage 1 execs it as stage 2.
pub const STAGE2_PATH: &str = "/usr/lib/cloister/init";
/// Kernel modules stage 1 loads before it looks for the root disk (storage controllers, USB
/// keyboards): one path per line relative to `/lib/modules/<kver>/`, in load order.
pub const MODULES_DISK_LIST: &str = "/etc/cloister/modules";
/// Modules needed only once the passphrase is known (dm-crypt, its cipher, XFS), same format;
/// stage 1 loads them while the passphrase prompt waits.
pub const MODULES_UNLOCK_LIST: &str = "/etc/cloister/modules.unlock";

/// argv[1] that selects stage 2.
pub const STAGE2_ARG: &str = "--stage2";

/// Console lines, each printed whole on one line.
pub mod marker {
    /// First line stage 1 prints.
    pub const STAGE1_STARTED: &str = "cloister: stage1 started";
    /// Printed (without newline) before reading the passphrase; followed by the disk name and ": ".
    pub const PASSPHRASE_PROMPT: &str = "Passphrase for ";
    /// Printed when a passphrase did not open the root; the prompt follows again.
    pub const WRONG_PASSPHRASE: &str = "cloister: wrong passphrase";
    /// Printed by stage 2 once it runs from the unlocked root:
    /// `cloister: root unlocked and mounted (<n> ms since boot)`.
    pub const UNLOCKED: &str = "cloister: root unlocked and mounted";
    /// Printed when no partition carries the root's PARTUUID; the disks seen follow.
    pub const NO_ROOT: &str = "cloister: no root partition found";
    /// Printed by stage 2 once the ACPI power button is watched: a press before this line is
    /// lost (the button driver is not loaded yet), so tests wait for it before pressing.
    pub const POWER_BUTTON_ARMED: &str = "cloister: power button armed";
    /// Printed when an orderly shutdown starts.
    pub const SHUTDOWN: &str = "cloister: shutting down";
    /// Last line before the power is cut after an orderly shutdown.
    pub const POWER_OFF: &str = "cloister: power off";
    /// Prefix of a fatal stage error; the step name and the error follow.
    pub const FATAL: &str = "cloister: fatal:";
}

/// Formats the unlock line exactly as the tests expect it.
pub fn unlocked_line(ms_since_boot: u64) -> String {
    format!("{} ({ms_since_boot} ms since boot)", marker::UNLOCKED)
}

/// Parses the number of milliseconds out of an unlock line, if it is one.
pub fn parse_unlocked_ms(line: &str) -> Option<u64> {
    let rest = line.split(marker::UNLOCKED).nth(1)?;
    let inner = rest.trim().strip_prefix('(')?.strip_suffix(" ms since boot)")?;
    inner.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlocked_line_round_trips() {
        assert_eq!(parse_unlocked_ms(&unlocked_line(1234)), Some(1234));
        assert_eq!(parse_unlocked_ms("noise cloister: root unlocked and mounted (7 ms since boot)"), Some(7));
        assert_eq!(parse_unlocked_ms("cloister: root unlocked and mounted"), None);
    }
}
