//! The disk passphrase: read once (prompted twice without echo, or from a file), held in memory
//! only, wiped on drop, never printed or written anywhere.

use std::fmt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use zeroize::Zeroizing;

/// Bytes that are overwritten with zeros when dropped and never shown by `Debug`.
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Result<Self> {
        if bytes.is_empty() {
            bail!("the passphrase is empty");
        }
        Ok(Self(Zeroizing::new(bytes)))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Reads a passphrase file: its whole content, minus exactly one trailing newline (`\n` or
/// `\r\n`), so `echo secret > file` works and a passphrase may still end in other whitespace.
pub fn from_file(path: &Path) -> Result<Secret> {
    let mut bytes = Zeroizing::new(
        std::fs::read(path).with_context(|| format!("cannot read passphrase file {}", path.display()))?,
    );
    strip_one_newline(&mut bytes);
    Secret::new(std::mem::take(&mut *bytes)).with_context(|| format!("passphrase file {}", path.display()))
}

fn strip_one_newline(bytes: &mut Vec<u8>) {
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
}

/// Asks twice on the terminal without echo; both answers must match.
pub fn prompt() -> Result<Secret> {
    let first = rpassword::prompt_password("Disk passphrase: ")
        .context("cannot prompt for the passphrase (no terminal?); use --passphrase-file")?;
    let first = Secret::new(Zeroizing::new(first).as_bytes().to_vec())?;
    let second = rpassword::prompt_password("Repeat the passphrase: ")
        .context("cannot prompt for the passphrase (no terminal?); use --passphrase-file")?;
    let second = Secret::new(Zeroizing::new(second).as_bytes().to_vec())?;
    if first.bytes() != second.bytes() {
        bail!("the two passphrases differ");
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_trailing_newline_is_stripped() {
        for (input, want) in [
            (&b"pass\n"[..], &b"pass"[..]),
            (b"pass\r\n", b"pass"),
            (b"pass\n\n", b"pass\n"),
            (b"pass ", b"pass "),
            (b"pass", b"pass"),
        ] {
            let mut v = input.to_vec();
            strip_one_newline(&mut v);
            assert_eq!(v, want, "{input:?}");
        }
    }

    #[test]
    fn empty_passphrase_file_is_refused() {
        let dir = tempfile_dir();
        let p = dir.join("empty");
        std::fs::write(&p, b"\n").unwrap();
        let e = from_file(&p).unwrap_err();
        assert!(format!("{e:#}").contains("empty"), "{e:#}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn debug_never_shows_the_bytes() {
        let s = Secret::new(b"hunter2".to_vec()).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("cloister-secret-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
