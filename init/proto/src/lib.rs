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

/// What an admin types to confirm the kill switch (the admin CLI's second confirmation, and the
/// words the control socket's `kill-system` request must carry).
pub const KILL_PHRASE: &str = "destroy this appliance";

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

/// A LUKS2 header for no disk (no keyslot, its key thrown away at build time) that stage 1
/// loads while the disk drivers probe, so that the root's header loads fast: a process's first
/// load does libcryptsetup's one-time work.
pub const LUKS_WARMUP_HEADER: &str = "/etc/cloister/warmup.luks2";

/// argv[1] that selects stage 2.
pub const STAGE2_ARG: &str = "--stage2";

/// Console lines, each printed whole on one line.
pub mod marker {
    /// First line stage 1 prints.
    pub const STAGE1_STARTED: &str = "cloister: stage1 started";
    /// Printed (without newline) before reading the passphrase; followed by the disk name and ": ".
    pub const PASSPHRASE_PROMPT: &str = "Passphrase for ";
    /// Printed once a passphrase was read: `cloister: passphrase read after <n> ms` (from the
    /// prompt: the typist's time, which the boot bench does not count as ours).
    pub const PASSPHRASE_READ: &str = "cloister: passphrase read after";
    /// Printed after each attempt to open the root with a passphrase:
    /// `cloister: key slot tried in <n> ms` (the KDF; the mapping is made after it).
    pub const KEY_SLOT_TRIED: &str = "cloister: key slot tried in";
    /// Stage 1's last line: `cloister: switching to <stage 2> at <n> ms since boot`.
    pub const SWITCHING: &str = "cloister: switching to";
    /// Stage 1 forked the child that reads stage 2's files ahead and empties the initramfs.
    pub const HANDED_OVER: &str = "cloister: handed over to pid";
    /// That child's last line: `… files queued in <ms> ms; initramfs emptied in <ms> ms`.
    pub const HANDOVER_DONE: &str = "cloister: handover: ";
    /// Stage 1 loaded the warm-up LUKS2 header before the root's.
    pub const LUKS_WARMED: &str = "cloister: LUKS code warmed up in";
    /// Stage 2's reading of the kernel log: `… <ms> ms; initramfs unpacked from <ms> to <ms> ms`.
    pub const KERNEL_RAN_INIT: &str = "cloister: kernel ran /init at";
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
    /// Last line before a restart after an orderly shutdown.
    pub const REBOOT: &str = "cloister: reboot";
    /// Prefix of a fatal stage error; the step name and the error follow.
    pub const FATAL: &str = "cloister: fatal:";
    /// The kill switch finished; the line goes on with what it did and its time.
    pub const KILL_SWITCH_DONE: &str = "cloister: kill switch: keys destroyed";
    /// Stage 1 found no LUKS header where the root should be (after the kill switch, say).
    pub const NO_LUKS_HEADER: &str = "cloister: no LUKS header on";
    /// Printed once every service of the plan is ready:
    /// `cloister: all services ready (<n> ms in stage 2)`.
    pub const ALL_READY: &str = "cloister: all services ready";
    /// Printed once no service is on its way up for the first time any more (after
    /// [`ALL_READY`] if they all are): `cloister: pid 1 rss <n> KiB`.
    pub const PID1_RSS: &str = "cloister: pid 1 rss";
    /// Printed by stage 1 when first-boot growth changed something or has work left:
    /// `cloister: grow: root partition <old> -> <new> bytes; <n> bytes to fill, then xfs grows`
    /// (`unchanged` for a partition an earlier boot grew).
    pub const GROW: &str = "cloister: grow: root partition";
    /// Printed by stage 1 when the root already fills its disk and nothing is left to fill.
    pub const GROW_NOTHING: &str = "cloister: grow: nothing to do";
    /// Stage 2's fill of the grown area starts: `cloister: grow: filling <a>..<b> (<n> bytes)
    /// with ciphertext`, after `cloister: grow: resuming the fill at <offset>` when an earlier
    /// boot got that far.
    pub const GROW_FILLING: &str = "cloister: grow: filling";
    pub const GROW_RESUMING: &str = "cloister: grow: resuming the fill at";
    /// Each tenth of the fill, once on disk: `cloister: grow: filled <p>% (<offset> of <end>)`.
    pub const GROW_FILLED: &str = "cloister: grow: filled";
    /// The fill is done and XFS grew online:
    /// `cloister: grow: xfs <old> -> <new> blocks (<n> bytes filled in <s> s)`.
    pub const GROW_XFS: &str = "cloister: grow: xfs";
    /// Printed by stage 1 when growth failed; the boot goes on: `cloister: grow: failed: <why>`.
    pub const GROW_FAILED: &str = "cloister: grow: failed:";
    /// Printed instead of starting services when the firewall step failed.
    pub const SERVICES_HELD: &str = "cloister: services not started";
    /// `cloister: ssh host key SHA256:<base64>[ (new)]`, before the services start.
    pub const SSH_HOST_KEY: &str = "cloister: ssh host key";
    /// `cloister: onion address <56 base32 characters>.onion`, once tor has made it.
    pub const ONION_ADDRESS: &str = "cloister: onion address";
}

/// Argument that runs the supervisor outside an appliance (as PID 1 of a test's pid namespace):
/// `--supervise <plan.json> <run-dir>`. No machine-global step runs in this mode.
pub const SUPERVISE_ARG: &str = "--supervise";

/// What the supervisor prints about a service, one whole line each:
/// `cloister: service <name> <event>`.
pub mod service_event {
    pub const PREFIX: &str = "cloister: service ";
    /// `started (pid <n>)`
    pub const STARTED: &str = "started";
    /// `ready (<n> ms, <m> ms in stage 2)`: n since its start, m since the supervisor's
    pub const READY: &str = "ready";
    /// `exited (<how>); restart in <n> ms`
    pub const EXITED: &str = "exited";
    /// `failed: <why>`: given up on (crash loop, never ready); the others keep running.
    pub const FAILED: &str = "failed:";
    /// `stopped (<how>)`
    pub const STOPPED: &str = "stopped";
    /// `done (<how>)`: a unit PID 1 runs for a piece of work (the grow fill) finished it.
    pub const DONE: &str = "done";

    /// `cloister: service <name> <event>`
    pub fn line(name: &str, event: &str) -> String {
        format!("{PREFIX}{name} {event}")
    }

    /// The service name and the rest, if `line` is a service event.
    pub fn parse(line: &str) -> Option<(&str, &str)> {
        let rest = &line[line.find(PREFIX)? + PREFIX.len()..];
        rest.split_once(' ')
    }
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

    #[test]
    fn service_events_round_trip() {
        let line = service_event::line("ngircd", "started (pid 7)");
        assert_eq!(service_event::parse(&format!("[ 1.0] {line}")), Some(("ngircd", "started (pid 7)")));
        assert_eq!(service_event::parse("ngircd: hello"), None);
    }
}

/// Disk passphrases added on a running appliance: the admin CLI checks before it sends, PID 1's
/// child again.
pub mod disk {
    /// The shortest new disk passphrase, in characters.
    pub const MIN_PASSPHRASE_CHARS: usize = 12;

    /// Why a new passphrase is refused, or `Ok`.
    pub fn check_new_passphrase(current: &str, new: &str) -> Result<(), String> {
        if new.chars().any(char::is_control) {
            return Err("the new passphrase contains control characters".into());
        }
        if new.chars().count() < MIN_PASSPHRASE_CHARS {
            return Err(format!("the new passphrase must have at least {MIN_PASSPHRASE_CHARS} characters"));
        }
        if new == current {
            return Err("the new passphrase must differ from the current one".into());
        }
        Ok(())
    }
}

/// Values on the session socket between the restricted shell and PID 1: both check them, so
/// they share one definition.
pub mod session {
    /// The shortest new password, in characters.
    pub const MIN_PASSWORD_CHARS: usize = 12;

    /// Why a new password is refused: the shell checks before it sends, PID 1 again.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum NewPasswordProblem {
        ControlCharacters,
        TooShort,
        SameAsCurrent,
    }

    impl std::fmt::Display for NewPasswordProblem {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Self::ControlCharacters => write!(f, "the new password contains control characters"),
                Self::TooShort => {
                    write!(f, "the new password must have at least {MIN_PASSWORD_CHARS} characters")
                }
                Self::SameAsCurrent => write!(f, "the new password must differ from the current one"),
            }
        }
    }

    impl std::error::Error for NewPasswordProblem {}

    /// The rules a new password meets, checked in this order.
    pub fn check_new_password(current: &str, new: &str) -> Result<(), NewPasswordProblem> {
        if new.chars().any(char::is_control) {
            return Err(NewPasswordProblem::ControlCharacters);
        }
        if new.chars().count() < MIN_PASSWORD_CHARS {
            return Err(NewPasswordProblem::TooShort);
        }
        if new == current {
            return Err(NewPasswordProblem::SameAsCurrent);
        }
        Ok(())
    }

    /// `^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$`
    pub fn is_valid_term(term: &str) -> bool {
        let mut bytes = term.bytes();
        let first_ok = bytes.next().is_some_and(|byte| byte.is_ascii_alphanumeric());
        first_ok
            && term.len() <= 64
            && bytes.all(|byte| byte.is_ascii_alphanumeric() || b".+_-".contains(&byte))
    }

    /// `^[A-Za-z]{1,8}(_[A-Za-z]{2})?(\.[A-Za-z0-9-]{1,16})?(@[A-Za-z0-9]{1,16})?$`, taken apart from
    /// the right so that each part is checked against its own character set.
    pub fn is_valid_lang(lang: &str) -> bool {
        if lang == "C" || lang == "POSIX" {
            return true;
        }
        let (rest, modifier) = split_optional(lang, '@');
        let (rest, codeset) = split_optional(rest, '.');
        let (language, territory) = split_optional(rest, '_');
        let modifier_ok = modifier
            .is_none_or(|m| (1..=16).contains(&m.len()) && m.bytes().all(|b| b.is_ascii_alphanumeric()));
        let codeset_ok = codeset.is_none_or(|c| {
            (1..=16).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
        let territory_ok =
            territory.is_none_or(|t| t.len() == 2 && t.bytes().all(|b| b.is_ascii_alphabetic()));
        let language_ok =
            (1..=8).contains(&language.len()) && language.bytes().all(|b| b.is_ascii_alphabetic());
        modifier_ok && codeset_ok && territory_ok && language_ok
    }

    fn split_optional(value: &str, separator: char) -> (&str, Option<&str>) {
        match value.split_once(separator) {
            Some((head, tail)) => (head, Some(tail)),
            None => (value, None),
        }
    }
}
