//! PID 1's part in the onion chat beyond running its services: sshd's host key made on first
//! boot (by OpenSSH's own `ssh-keygen`, in a child process), and the onion address and host key
//! fingerprint announced on the console so that users can check what they connect to.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cloister_proto::marker;

const SSH_KEYGEN: &str = "/usr/bin/ssh-keygen";

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("ssh-keygen {what}: {detail}")]
    Keygen { what: &'static str, detail: String },
    #[error("{path}: {detail}")]
    Onion { path: PathBuf, detail: String },
}

/// sshd's host key as users check it: its SHA256 fingerprint, and whether this boot made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKey {
    pub fingerprint: String,
    pub made: bool,
}

impl HostKey {
    /// The console line (`cloister: ssh host key SHA256:… [(new)]`).
    pub fn line(&self) -> String {
        format!("{} {}{}", marker::SSH_HOST_KEY, self.fingerprint, if self.made { " (new)" } else { "" })
    }
}

/// Makes the ed25519 host key at `key` unless it exists; returns its fingerprint.
/// The new key appears only complete: generated under a temporary name, then renamed.
pub fn ssh_host_key_step(key: &Path) -> Result<HostKey, ChatError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ChatError::Io { path, source }
    };
    let public = key.with_extension("pub");
    let made = if key.is_file() && public.is_file() {
        false
    } else {
        let dir = key.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(dir, Some(0), Some(0)).map_err(io(dir))?;
        }
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io(dir))?;
        let fresh = dir.join(".new_host_key");
        for stale in [fresh.clone(), fresh.with_extension("pub")] {
            let _ = std::fs::remove_file(stale);
        }
        keygen(&["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"], &fresh, "generate")?;
        std::fs::rename(fresh.with_extension("pub"), &public).map_err(io(&public))?;
        std::fs::rename(&fresh, key).map_err(io(key))?;
        true
    };
    let fingerprint = keygen(&["-l", "-E", "sha256", "-f"], &public, "fingerprint")?;
    let fingerprint = fingerprint.split_whitespace().nth(1).unwrap_or("?").to_owned();
    Ok(HostKey { fingerprint, made })
}

fn keygen(args: &[&str], file: &Path, what: &'static str) -> Result<String, ChatError> {
    let out = Command::new(SSH_KEYGEN)
        .args(args)
        .arg(file)
        .stdin(Stdio::null())
        .env_clear()
        .output()
        .map_err(|e| ChatError::Keygen { what, detail: e.to_string() })?;
    if !out.status.success() {
        let detail = format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        return Err(ChatError::Keygen { what, detail });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The onion address from tor's `hostname` file, once tor has written it.
pub fn onion_address(hostname_file: &Path) -> Result<Option<String>, ChatError> {
    let text = match std::fs::read_to_string(hostname_file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ChatError::Io { path: hostname_file.to_owned(), source }),
    };
    let addr = text.trim();
    let valid = addr.strip_suffix(".onion").is_some_and(|b| {
        b.len() == 56 && b.bytes().all(|c| c.is_ascii_lowercase() || (b'2'..=b'7').contains(&c))
    });
    if !valid {
        return Err(ChatError::Onion {
            path: hostname_file.to_owned(),
            detail: "not a v3 onion address".into(),
        });
    }
    Ok(Some(addr.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onion_addresses_are_checked_before_they_are_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hostname");
        assert!(onion_address(&file).unwrap().is_none());
        let good = format!("{}.onion", "a2".repeat(28));
        std::fs::write(&file, format!("{good}\n")).unwrap();
        assert_eq!(onion_address(&file).unwrap(), Some(good));
        std::fs::write(&file, "\x1b[2Jevil.onion\n").unwrap();
        assert!(onion_address(&file).is_err());
    }

    #[test]
    fn host_key_is_made_once_and_kept() {
        // openssh-client is one of the test host packages (xtask/src/host.rs).
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("ssh").join("ssh_host_ed25519_key");
        let first = ssh_host_key_step(&key).unwrap();
        assert!(first.made && first.fingerprint.starts_with("SHA256:"), "{first:?}");
        assert!(first.line().ends_with(" (new)"), "{}", first.line());
        let again = ssh_host_key_step(&key).unwrap();
        assert_eq!(again, HostKey { made: false, ..first });
        let mode = std::fs::metadata(&key).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
    }
}
