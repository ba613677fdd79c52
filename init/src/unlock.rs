//! Opening the LUKS2 root with libcryptsetup: load the header once, then try passphrases until
//! one opens a key slot, then activate `/dev/mapper/cloister-root` with the volume key it gave.
//! The two steps are apart so that the KDF needs no device-mapper (stage 1 runs it while
//! dm-crypt and its cipher still load). Wrong passphrases are told apart from real failures so
//! the caller can ask again.

use std::path::{Path, PathBuf};

use libcryptsetup_rs::consts::flags::{CryptActivate, CryptDeactivate};
use libcryptsetup_rs::consts::vals::EncryptionFormat;
use libcryptsetup_rs::{CryptDevice, CryptInit, LibcryptErr};
use zeroize::Zeroizing;

/// Lock directory libcryptsetup insists on.
pub const LOCK_DIR: &str = "/run/cryptsetup";

#[derive(Debug, thiserror::Error)]
pub enum UnlockError {
    #[error("crypt_init {dev}: {source}")]
    Init { dev: PathBuf, source: LibcryptErr },
    #[error("load luks2 header of {dev}: {source}")]
    Load { dev: PathBuf, source: LibcryptErr },
    #[error("crypt_init_by_name {name}: {source}")]
    InitByName { name: &'static str, source: LibcryptErr },
    #[error("deactivate {name}: {source}")]
    Deactivate { name: &'static str, source: LibcryptErr },
    #[error("wrong passphrase")]
    WrongPassphrase,
    #[error("open a key slot of {dev}: {source}")]
    VolumeKey { dev: PathBuf, source: LibcryptErr },
    #[error("activate {dev} as {name}: {source}")]
    Activate { dev: PathBuf, name: &'static str, source: LibcryptErr },
}

/// A LUKS2 device whose header is loaded.
pub struct Luks {
    dev: PathBuf,
    device: CryptDevice,
}

impl Luks {
    pub fn open(dev: &Path) -> Result<Luks, UnlockError> {
        let mut device =
            CryptInit::init(dev).map_err(|source| UnlockError::Init { dev: dev.to_owned(), source })?;
        device
            .context_handle()
            .load::<()>(Some(EncryptionFormat::Luks2), None)
            .map_err(|source| UnlockError::Load { dev: dev.to_owned(), source })?;
        Ok(Luks { dev: dev.to_owned(), device })
    }

    /// The volume key a key slot gives for `passphrase` (the KDF's work; nothing is activated).
    pub fn volume_key(&mut self, passphrase: &[u8]) -> Result<VolumeKey, UnlockError> {
        let size = usize::try_from(self.device.status_handle().get_volume_key_size()).unwrap_or(0);
        let mut key = Zeroizing::new(vec![0u8; size]);
        match self.device.volume_key_handle().get(None, &mut key, Some(passphrase)) {
            Ok((_slot, len)) => {
                key.truncate(len);
                Ok(VolumeKey(key))
            }
            Err(e) if is_wrong_passphrase(&e) => Err(UnlockError::WrongPassphrase),
            Err(source) => Err(UnlockError::VolumeKey { dev: self.dev.clone(), source }),
        }
    }

    /// Activates the mapping `name` with a key [`Luks::volume_key`] gave (libcryptsetup checks
    /// it against the header's digest first).
    pub fn activate(&mut self, name: &'static str, key: &VolumeKey) -> Result<(), UnlockError> {
        self.device
            .activate_handle()
            .activate_by_volume_key(Some(name), Some(&key.0), CryptActivate::empty())
            .map_err(|source| UnlockError::Activate { dev: self.dev.clone(), name, source })
    }

    /// The keyslot `passphrase` opens (checked only: nothing is activated), `None` for none.
    pub fn slot_of(&mut self, passphrase: &[u8]) -> Result<Option<u32>, UnlockError> {
        match self.check(passphrase) {
            Ok(slot) => Ok(Some(slot)),
            Err(UnlockError::WrongPassphrase) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn device(&mut self) -> &mut CryptDevice {
        &mut self.device
    }

    /// Checks `passphrase` against the key slots (no device-mapper needed); returns the slot
    /// that opened.
    fn check(&mut self, passphrase: &[u8]) -> Result<u32, UnlockError> {
        let handle = &mut self.device.activate_handle();
        match handle.activate_by_passphrase(None, None, passphrase, CryptActivate::empty()) {
            Ok(slot) => Ok(slot),
            Err(e) if is_wrong_passphrase(&e) => Err(UnlockError::WrongPassphrase),
            Err(source) => Err(UnlockError::Activate { dev: self.dev.clone(), name: "-", source }),
        }
    }
}

/// Loads a header and lets it go: a process's first load does libcryptsetup's one-time work
/// (the crypto backend, the metadata code), which the next load of any header then skips.
pub fn warm_up(header: &Path) -> Result<(), UnlockError> {
    Luks::open(header).map(drop)
}

/// libcryptsetup answers EPERM when no key slot opens with a passphrase.
fn is_wrong_passphrase(e: &LibcryptErr) -> bool {
    matches!(e, LibcryptErr::IOError(e) if e.raw_os_error() == Some(nix::libc::EPERM))
}

/// A LUKS volume key, wiped when dropped.
pub struct VolumeKey(Zeroizing<Vec<u8>>);

/// The device under the open mapping `name` (the LUKS container it was opened from).
pub fn device_of(name: &'static str) -> Result<PathBuf, UnlockError> {
    let mut device = CryptInit::init_by_name_and_header(name, None)
        .map_err(|source| UnlockError::InitByName { name, source })?;
    let path = device.status_handle().get_device_path().map(Path::to_path_buf);
    path.map_err(|source| UnlockError::InitByName { name, source })
}

/// Removes the mapping `name`; the filesystem on it must be unmounted already.
pub fn deactivate(name: &'static str) -> Result<(), UnlockError> {
    let mut device = CryptInit::init_by_name_and_header(name, None)
        .map_err(|source| UnlockError::InitByName { name, source })?;
    device
        .activate_handle()
        .deactivate(name, CryptDeactivate::empty())
        .map_err(|source| UnlockError::Deactivate { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    /// A wrong passphrase must come back as WrongPassphrase (the retry path), not as a fatal
    /// error. This host has no dm, so only the passphrase check runs here; the QEMU boot covers
    /// the mapping.
    #[test]
    fn wrong_passphrase_is_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("luks.img");
        std::fs::File::create(&img).unwrap().set_len(32 << 20).unwrap();
        let mut child = Command::new("cryptsetup")
            .args(["luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2"])
            .args(["--pbkdf-force-iterations", "1000", "--key-file", "-"])
            .arg(&img)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"right").unwrap();
        assert!(child.wait().unwrap().success());
        let mut luks = Luks::open(&img).unwrap();
        assert!(matches!(luks.check(b"wrong"), Err(UnlockError::WrongPassphrase)));
        assert!(luks.check(b"right").is_ok());
        assert!(matches!(luks.volume_key(b"wrong"), Err(UnlockError::WrongPassphrase)));
        let key = luks.volume_key(b"right").unwrap();
        assert_eq!(key.0.len(), 64, "cryptsetup's default aes-xts-plain64 key is 512 bits");
        let mut again = Luks::open(&img).unwrap();
        let verified = again.device().volume_key_handle().verify(&key.0);
        assert!(verified.is_ok(), "the key is the volume's: {verified:?}");
    }

    #[test]
    fn open_names_the_device_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("plain.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let err = Luks::open(&img).err().unwrap();
        assert!(err.to_string().contains("plain.img"), "{err}");
    }
}
