//! Accounts on the appliance: the rules for login names, admin SSH keys and expiry dates that
//! the build (for `cloister.toml`) and PID 1 (for the admin tools at run time) both apply, and
//! the plan's [`AccountsPlan`]: where accounts live and which ids they take.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where PID 1's account tools find and put accounts, resolved by the builder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountsPlan {
    pub chat: AccountKind,
    pub admin: AccountKind,
    /// Admins' SSH public keys: `<dir>/<login>`, one key, root-owned (sshd's
    /// `AuthorizedKeysFile` for the admin group).
    pub admin_keys: PathBuf,
    /// Seconds an interactive admin session waits at its prompt before it ends.
    #[serde(default = "default_admin_idle_secs")]
    pub admin_idle_secs: u64,
}

/// An interactive admin session idle for 15 minutes ends (the chat shell's limit too).
pub const DEFAULT_ADMIN_IDLE_SECS: u64 = 900;

/// What the config may choose for the admin idle timeout.
pub const ADMIN_IDLE_SECS: std::ops::RangeInclusive<u64> = 10..=86_400;

/// The environment variable that carries the idle timeout to the admin CLI: set by sshd
/// (`SetEnv`, which a client cannot override) and by the console service.
pub const ADMIN_IDLE_ENV: &str = "CLOISTER_ADMIN_IDLE_SECS";

fn default_admin_idle_secs() -> u64 {
    DEFAULT_ADMIN_IDLE_SECS
}

/// One kind of account: its primary group, its uid range, its login shell and its homes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountKind {
    pub gid: u32,
    /// Uids are taken from `first_uid..=last_uid`, the lowest free one first.
    pub first_uid: u32,
    pub last_uid: u32,
    pub shell: PathBuf,
    /// Homes are `<homes>/<login>`, 0700, owned by the account.
    pub homes: PathBuf,
}

impl AccountKind {
    pub fn owns_uid(&self, uid: u32) -> bool {
        (self.first_uid..=self.last_uid).contains(&uid)
    }
}

/// Chat accounts' ids: the group, then uids above it.
pub const CHAT_GID: u32 = 2000;
pub const CHAT_UIDS: (u32, u32) = (2001, 2999);
/// Admin accounts' ids.
pub const ADMIN_GID: u32 = 3000;
pub const ADMIN_UIDS: (u32, u32) = (3001, 3999);
/// The admins' group: sshd lets it in by key only; PID 1's control socket admits it.
pub const ADMIN_GROUP: &str = "cloister-admin";
pub const CHAT_GROUP: &str = "chat";
/// Second factors (TOTP secrets), one file per uid, root's only (`init/src/totp.rs`).
pub const TOTP_DIR: &str = "/var/lib/cloister/totp";
/// Admins' console passwords, `<login>:<crypt hash>` a line, root's only (0600): apart from
/// /etc/shadow, so that nothing that reads shadow (sshd) could ever take them.
pub const CONSOLE_PASSWORDS: &str = "/etc/cloister/console-passwords";
/// The control socket's directory: root and the admin group only (0750).
pub const ADMIN_SOCKET_DIR: &str = "/run/cloister/admin";

/// Names no account may take: they would read as the system speaking.
pub const RESERVED_NAMES: &[&str] = &[
    "root",
    "admin",
    "administrator",
    "chat",
    "cloister",
    "irc",
    "ircd",
    "nobody",
    "operator",
    "sshd",
    "tor",
];

/// A login name: `[a-z][a-z0-9_-]{0,31}`, not reserved, not starting with `cloister`.
pub fn check_login_name(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let well_formed = (1..=32).contains(&name.len())
        && bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !well_formed {
        return Err(format!("{:?} is not a name like [a-z][a-z0-9_-]{{0,31}}", shorten(name)));
    }
    if RESERVED_NAMES.contains(&name) || name.starts_with("cloister") {
        return Err(format!("{name:?} is reserved"));
    }
    Ok(())
}

/// Key types an admin may use: Ed25519, in a file or on a security key.
pub const ADMIN_KEY_TYPES: &[&str] = &["ssh-ed25519", "sk-ssh-ed25519@openssh.com"];

/// An admin's SSH public key as one `authorized_keys` line would hold it: `<type> <base64>
/// [comment]`, no options (no `command=`, no `from=`), the type one of [`ADMIN_KEY_TYPES`] and
/// the same type named inside the key blob, printable ASCII only. Returns the line to store,
/// with single spaces.
pub fn check_admin_key(key: &str) -> Result<String, String> {
    if key.len() > 600 || key.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
        return Err("an SSH public key is one line of printable ASCII (at most 600 characters)".into());
    }
    let mut words = key.split_whitespace();
    let (Some(kind), Some(blob)) = (words.next(), words.next()) else {
        return Err("an SSH public key reads `ssh-ed25519 AAAA... [comment]`".into());
    };
    if !ADMIN_KEY_TYPES.contains(&kind) {
        return Err(format!("key type {:?} is not accepted; use one of {ADMIN_KEY_TYPES:?}", shorten(kind)));
    }
    let decoded = data_encoding::BASE64
        .decode(blob.as_bytes())
        .map_err(|_| "the key's second word is not base64".to_string())?;
    if blob_key_type(&decoded) != Some(kind.as_bytes()) {
        return Err(format!("the key's data does not hold a {kind} key"));
    }
    let comment: Vec<&str> = words.collect();
    let mut line = format!("{kind} {blob}");
    if !comment.is_empty() {
        line.push(' ');
        line.push_str(&comment.join(" "));
    }
    Ok(line)
}

/// The first string of an SSH wire-format key: a 4-byte big-endian length, then the type.
fn blob_key_type(blob: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    blob.get(4..4usize.checked_add(len)?)
}

/// `YYYY-MM-DD` (proleptic Gregorian, UTC) as days since 1970-01-01, as shadow(5) counts.
pub fn parse_date(text: &str) -> Result<u64, String> {
    let bad = || format!("{:?} is not a date like 2027-01-31", shorten(text));
    let parts: Vec<&str> = text.split('-').collect();
    let [y, m, d] = parts[..] else { return Err(bad()) };
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    if !(digits(y, 4) && digits(m, 2) && digits(d, 2)) {
        return Err(bad());
    }
    let (y, m, d): (i64, u32, u32) =
        (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?, d.parse().map_err(|_| bad())?);
    if y < 1970 || !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
        return Err(bad());
    }
    u64::try_from(days_from_civil(y, m, d)).map_err(|_| bad())
}

/// Days since 1970-01-01 as `YYYY-MM-DD`.
pub fn format_date(days: u64) -> String {
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(i64::MAX / 2));
    format!("{y:04}-{m:02}-{d:02}")
}

fn days_in_month(y: i64, m: u32) -> u32 {
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    match m {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's algorithms (public domain, "chrono-Compatible Low-Level Date Algorithms"):
// eras of 400 years, years starting in March so that the leap day comes last.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// At most 40 characters of what a user typed, for an error message.
fn shorten(text: &str) -> String {
    text.chars().take(40).map(|c| if c.is_control() { '?' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ssh-keygen -t ed25519` output (a key made for this test only).
    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqUUNcrpcdDksXxNuda4QJg6P8JCz80b+4wMV18Iwt ops@laptop";

    #[test]
    fn names_follow_the_pattern_and_avoid_reserved_ones() {
        for ok in ["alice", "b0b", "x", "a_b-c"] {
            assert_eq!(check_login_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "Alice", "1bob", "bob smith", "bob:x", "a".repeat(33).as_str(), "root", "cloister-x"]
        {
            assert!(check_login_name(bad).is_err(), "{bad}");
        }
        assert!(check_login_name("\u{1b}[2Jx").unwrap_err().contains("?[2Jx"));
    }

    #[test]
    fn admin_keys_are_ed25519_lines_without_options() {
        assert_eq!(check_admin_key(ED25519).as_deref(), Ok(ED25519));
        let spaced = ED25519.replace(' ', "   ");
        assert_eq!(check_admin_key(&spaced).as_deref(), Ok(ED25519));
        let bare = ED25519.rsplit_once(' ').unwrap().0;
        assert_eq!(check_admin_key(bare).as_deref(), Ok(bare));
        for bad in [
            "",
            "ssh-ed25519",
            &format!("command=\"/bin/sh\" {ED25519}"),
            &ED25519.replace("ssh-ed25519 ", "ssh-rsa "),
            &ED25519.replace("AAAAC3", "AAAAB3"),
            &ED25519.replace("AAAA", "!!!!"),
            &format!("{ED25519}\nssh-ed25519 AAAA"),
            &format!("{ED25519} \u{7}"),
        ] {
            assert!(check_admin_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dates_round_trip_and_refuse_nonsense() {
        assert_eq!(parse_date("1970-01-01"), Ok(0));
        assert_eq!(parse_date("2000-03-01"), Ok(11_017));
        assert_eq!(parse_date("2026-11-23"), Ok(20_780));
        for days in [0, 59, 60, 365, 11_016, 11_017, 20_780, 50_000] {
            assert_eq!(parse_date(&format_date(days)), Ok(days), "{days}");
        }
        assert_eq!(parse_date("2024-02-29"), Ok(19_782));
        for bad in ["2023-02-29", "2026-13-01", "2026-00-10", "1969-12-31", "26-11-23", "2026-1-1", "x", ""] {
            assert!(parse_date(bad).is_err(), "{bad}");
        }
    }
}
