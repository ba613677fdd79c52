//! `passwd` for chat users, PID 1's side: a child process (`cloister-init --passwd <uid>`),
//! because hashing is slow on purpose and file edits are risky work. It reads the current and
//! the new password from stdin (one line each), checks the current one against `/etc/shadow`,
//! checks the new one, and replaces the hash with a yescrypt one (Debian's default, which sshd
//! checks through libxcrypt) by writing a new shadow file and renaming it over the old. It
//! prints one line for the user and exits 0 (changed), 1 (refused: the line says why) or 2
//! (failed). No password is ever logged or left in a file but as its hash.

use std::io::{BufRead, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use cloister_proto::session::{check_new_password, NewPasswordProblem};
use yescrypt::{PasswordHasher, PasswordVerifier};
use zeroize::Zeroizing;

pub const PASSWD_ARG: &str = "--passwd";
const MAX_LINE: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PasswdError {
    #[error("the current password is wrong")]
    WrongPassword,
    #[error(transparent)]
    Rule(#[from] NewPasswordProblem),
    #[error("no such chat user")]
    NoUser,
    #[error("the account database cannot be changed: {0}")]
    Database(String),
}

impl PasswdError {
    /// Refusals the user can fix say why; the rest is a failure of the appliance.
    fn exit_code(&self) -> i32 {
        match self {
            PasswdError::NoUser | PasswdError::Database(_) => 2,
            _ => 1,
        }
    }
}

/// Whether `password` matches a crypt hash as sshd would check it: yescrypt (`$y$`) or
/// SHA-crypt (`$5$`, `$6$`); anything else (locked `!`, `*`, other schemes) never matches.
pub fn verify(password: &str, hash: &str) -> bool {
    if hash.starts_with("$y$") {
        yescrypt::Yescrypt::default().verify_password(password.as_bytes(), hash).is_ok()
    } else if hash.starts_with("$6$") || hash.starts_with("$5$") {
        sha_crypt::ShaCrypt::SHA512.verify_password(password.as_bytes(), hash).is_ok()
    } else {
        false
    }
}

/// A new yescrypt hash with a fresh salt.
pub fn hash(password: &str) -> Result<String, PasswdError> {
    let hashed = yescrypt::Yescrypt::default()
        .hash_password(password.as_bytes())
        .map_err(|e| PasswdError::Database(format!("hashing: {e}")))?;
    Ok(hashed.as_str().to_owned())
}

/// The hash field of `name` in shadow text.
pub fn shadow_hash<'a>(shadow: &'a str, name: &str) -> Option<&'a str> {
    shadow.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(name)).then(|| f.next()).flatten()
    })
}

/// `shadow` with `name`'s hash replaced and its last-change day set to `today`; every other
/// line byte for byte as it was.
pub fn replace_hash(shadow: &str, name: &str, new_hash: &str, today: u64) -> Result<String, PasswdError> {
    edit_line(shadow, name, |fields| {
        if fields.len() >= 3 {
            fields[1] = new_hash.to_owned();
            fields[2] = today.to_string();
        }
    })
    .ok_or(PasswdError::NoUser)
}

/// `text` (passwd or shadow) with the first line of account `name` passed through `edit` as
/// its `:`-separated fields; every other byte as it was. `None` when `name` has no line.
pub fn edit_line(text: &str, name: &str, edit: impl FnOnce(&mut Vec<String>)) -> Option<String> {
    let mut edit = Some(edit);
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.split_inclusive('\n') {
        let body = line.strip_suffix('\n').unwrap_or(line);
        match (body.split(':').next() == Some(name)).then(|| edit.take()).flatten() {
            Some(edit) => {
                let mut fields: Vec<String> = body.split(':').map(str::to_owned).collect();
                edit(&mut fields);
                out.push_str(&fields.join(":"));
                out.push_str(&line[body.len()..]);
            }
            None => out.push_str(line),
        }
    }
    edit.is_none().then_some(out)
}

/// The login name of `uid` in passwd text.
fn login_of(passwd: &str, uid: u32) -> Option<&str> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 3 && f[2].parse::<u32>().ok() == Some(uid)).then_some(f[0])
    })
}

/// Changes the password of `uid` in the account files under `etc`.
pub fn change(etc: &Path, uid: u32, current: &str, new: &str, today: u64) -> Result<(), PasswdError> {
    let db = |e: std::io::Error| PasswdError::Database(e.to_string());
    let passwd = std::fs::read_to_string(etc.join("passwd")).map_err(db)?;
    let name = login_of(&passwd, uid).ok_or(PasswdError::NoUser)?;
    let shadow_path = etc.join("shadow");
    let shadow = Zeroizing::new(std::fs::read_to_string(&shadow_path).map_err(db)?);
    let old = shadow_hash(&shadow, name).ok_or(PasswdError::NoUser)?;
    if !verify(current, old) {
        return Err(PasswdError::WrongPassword);
    }
    check_new_password(current, new)?;
    let text = replace_hash(&shadow, name, &hash(new)?, today)?;
    write_replacing(&shadow_path, &text, 0o640).map_err(db)
}

/// Writes `text` next to `path` with its owner and mode (root's and `new_mode` for a file that
/// does not exist yet), syncs, and renames it over `path`, then syncs the directory: a power cut
/// leaves the old file or the new one, never half of either.
pub(crate) fn write_replacing(path: &Path, text: &str, new_mode: u32) -> std::io::Result<()> {
    let (uid, gid, mode) = match std::fs::metadata(path) {
        Ok(meta) => (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, 0, new_mode),
        Err(e) => return Err(e),
    };
    let fresh = path.with_extension("cloister-new");
    let _ = std::fs::remove_file(&fresh);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&fresh)?;
    std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&fresh, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Days since 1970 by the system clock, as shadow counts them.
pub(crate) fn today() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map(|d| d.as_secs() / 86_400).unwrap_or(0)
}

/// `cloister-init --passwd <uid>`: two lines on stdin, one line out, exit 0/1/2.
pub fn run_mode(uid: Option<&String>) -> ! {
    let Some(uid) = uid.and_then(|u| u.parse::<u32>().ok()) else {
        eprintln!("usage: cloister-init {PASSWD_ARG} <uid>");
        std::process::exit(2)
    };
    let mut input = std::io::Read::take(std::io::stdin().lock(), 2 * MAX_LINE as u64 + 2);
    let mut read = || -> Option<Zeroizing<String>> {
        let mut line = Zeroizing::new(String::new());
        input.read_line(&mut line).ok().filter(|n| *n > 0)?;
        Some(Zeroizing::new(line.strip_suffix('\n').unwrap_or(&line).to_owned()))
    };
    let (Some(current), Some(new)) = (read(), read()) else {
        println!("error the request was incomplete");
        std::process::exit(2)
    };
    match change(Path::new("/etc"), uid, &current, &new, today()) {
        Ok(()) => {
            println!("ok");
            std::process::exit(0)
        }
        Err(e) => {
            println!("error {e}");
            std::process::exit(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `openssl passwd -6 -salt saltsalt 'correct horse battery'`, as the test images hash.
    const SHA512: &str =
        "$6$saltsalt$G9wFFnnUFCPffgjGaIp8t6onbqx3zGbMIn93ecLfBFGJpBV3/0HPLZ17qYbjb.WJDtXbmuMlQ9NnvzVms5ZXj.";

    #[test]
    fn sha512_crypt_hashes_from_openssl_verify() {
        assert!(verify("correct horse battery", SHA512));
        assert!(!verify("correct horse batterY", SHA512));
        for locked in ["!", "*", "", "!$6$x$y", "$1$abc$def"] {
            assert!(!verify("", locked), "{locked}");
        }
    }

    #[test]
    fn new_hashes_are_yescrypt_and_verify() {
        let h = hash("a long enough password").unwrap();
        assert!(h.starts_with("$y$"), "{h}");
        assert!(verify("a long enough password", &h));
        assert!(!verify("a long enough passworD", &h));
        assert_ne!(h, hash("a long enough password").unwrap(), "salts must differ");
    }

    #[test]
    fn only_the_users_line_changes() {
        let shadow = "root:*:19000:0:99999:7:::\nalice:$6$a$b:19000:0:99999:7:::\nbob:$6$c$d:19001::::::\n";
        let out = replace_hash(shadow, "alice", "$y$new", 20000).unwrap();
        assert_eq!(
            out,
            "root:*:19000:0:99999:7:::\nalice:$y$new:20000:0:99999:7:::\nbob:$6$c$d:19001::::::\n"
        );
        assert_eq!(replace_hash(shadow, "carol", "$y$x", 1), Err(PasswdError::NoUser));
        assert_eq!(shadow_hash(shadow, "bob"), Some("$6$c$d"));
        assert_eq!(shadow_hash(shadow, "bo"), None);
    }

    #[test]
    fn new_passwords_are_checked() {
        use NewPasswordProblem::*;
        assert_eq!(check_new_password("old password 1", "short"), Err(TooShort));
        assert_eq!(check_new_password("same password 1", "same password 1"), Err(SameAsCurrent));
        assert_eq!(check_new_password("old password 1", "bell\u{7} in here!"), Err(ControlCharacters));
        assert_eq!(check_new_password("old password 1", "a new password here"), Ok(()));
        let short = change(Path::new("/nonexistent"), 1, "x", "y", 0);
        assert!(matches!(short, Err(PasswdError::Database(_))), "{short:?}");
    }

    /// The whole change on files in a temporary `etc`: wrong current password changes nothing,
    /// the right one replaces the hash, keeps the mode, and the new password verifies.
    #[test]
    fn change_rewrites_shadow_in_place_of_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path();
        std::fs::write(etc.join("passwd"), "root:x:0:0::/root:/bin/sh\nalice:x:2001:2000::/h:/s\n").unwrap();
        let shadow = format!("root:*:1:0:99999:7:::\nalice:{SHA512}:1:0:99999:7:::\n");
        std::fs::write(etc.join("shadow"), &shadow).unwrap();
        std::fs::set_permissions(etc.join("shadow"), std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = change(etc, 2001, "wrong password!!", "a brand new password", 5).unwrap_err();
        assert_eq!(err, PasswdError::WrongPassword);
        assert_eq!(std::fs::read_to_string(etc.join("shadow")).unwrap(), shadow);
        change(etc, 2001, "correct horse battery", "a brand new password", 5).unwrap();
        let after = std::fs::read_to_string(etc.join("shadow")).unwrap();
        let h = shadow_hash(&after, "alice").unwrap();
        assert!(verify("a brand new password", h) && !verify("correct horse battery", h));
        assert!(after.starts_with("root:*:1:0:99999:7:::\n"));
        let mode = std::fs::metadata(etc.join("shadow")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert!(!etc.join("shadow.cloister-new").exists());
        assert_eq!(change(etc, 4242, "x", "y", 5), Err(PasswdError::NoUser));
    }
}
