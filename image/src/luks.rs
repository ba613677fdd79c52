//! Offline, in-place LUKS2 encryption of a plain file that already holds the root XFS, through
//! libcryptsetup's userspace storage path (no device-mapper, no AF_ALG, no root). It mirrors
//! `cryptsetup reencrypt --encrypt --reduce-device-size 32M`: the header takes the first
//! 16 MiB, the data shifts by that much, and the file's last 32 MiB must be free on entry
//! (make the XFS [`LUKS_RESERVE_BYTES`] smaller than the file).

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use libcryptsetup_rs::consts::flags::{CryptPbkdf, CryptReencrypt, CryptVolumeKey};
use libcryptsetup_rs::consts::vals::{
    CryptKdf, CryptReencryptDirectionInfo, CryptReencryptModeInfo, EncryptionFormat,
};
use libcryptsetup_rs::{
    CryptDevice, CryptInit, CryptParamsLuks2, CryptParamsLuks2Ref, CryptParamsReencrypt, CryptPbkdfType,
    Either, LibcryptErr,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ffi::cryptsetup::run_reencrypt;

/// Free space the caller leaves at the end of the file; half of it becomes the LUKS2 header.
pub const LUKS_RESERVE_BYTES: u64 = 32 * 1024 * 1024;
const HEADER_BYTES: u64 = LUKS_RESERVE_BYTES / 2;
const SECTOR_BYTES: u32 = 4096;
const CIPHER: (&str, &str) = ("aes", "xts-plain64");
const KEY_BYTES: usize = 64;
const KEYSLOT: u32 = 0;

/// Argon2id cost. `iterations: Some(n)` pins the cost (no benchmark: reproducible, and cheap in
/// tests); `None` lets libcryptsetup benchmark for `time_ms` on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub time_ms: u32,
    pub iterations: Option<u32>,
    pub parallel: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PbkdfInfo {
    #[serde(rename = "type")]
    pub kind: String,
    pub iterations: u32,
    pub memory_kib: u32,
    pub parallel: u32,
}

/// What the finished header says, read back from the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LuksInfo {
    pub uuid: Uuid,
    pub data_offset_bytes: u64,
    /// e.g. `aes-xts-plain64`.
    pub cipher: String,
    pub key_bits: u32,
    pub sector_size: u32,
    pub pbkdf: PbkdfInfo,
}

#[derive(Debug, thiserror::Error)]
pub enum LuksError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: size {size} must be a multiple of 4096 and larger than the 32 MiB reserve")]
    BadSize { path: PathBuf, size: u64 },
    #[error("luks {step} on {path}: {source}")]
    Crypt { step: &'static str, path: PathBuf, source: LibcryptErr },
}

/// Encrypts `image` in place with one keyslot (slot 0) for `passphrase`; `progress` gets
/// (bytes done, bytes total) while the data is rewritten.
///
/// The reencryption itself runs on a throwaway keyslot with a random passphrase and a cheap
/// KDF: it needs the passphrase twice (initialise, resume), and with the production KDF each
/// derivation costs seconds. The user's keyslot is added once at the end, with `kdf`, and the
/// throwaway one is destroyed (libcryptsetup wipes its key material).
pub fn encrypt_in_place(
    image: &Path,
    passphrase: &[u8],
    kdf: &KdfParams,
    progress: Option<&mut dyn FnMut(u64, u64)>,
) -> Result<LuksInfo, LuksError> {
    let size = std::fs::metadata(image).map_err(|source| LuksError::Io { path: image.into(), source })?.len();
    if !size.is_multiple_of(u64::from(SECTOR_BYTES)) || size <= LUKS_RESERVE_BYTES {
        return Err(LuksError::BadSize { path: image.into(), size });
    }
    let step = |step| move |source| LuksError::Crypt { step, path: image.into(), source };
    let temp =
        TempPassphrase::new().map_err(|source| LuksError::Io { path: "/dev/urandom".into(), source })?;
    {
        let header = TempHeader::create(image)?;
        init_reencryption(&header.0, image, &temp.0, &CHEAP_KDF).map_err(step("initialise"))?;
        let mut dev = CryptInit::init(image).map_err(step("open"))?;
        dev.backup_handle()
            .header_restore(Some(EncryptionFormat::Luks2), &header.0)
            .map_err(step("restore header"))?;
    }
    let mut dev = open(image, &CHEAP_KDF).map_err(step("open"))?;
    dev.reencrypt_handle()
        .reencrypt_init_by_passphrase(None, &temp.0, None, Some(TEMP_KEYSLOT), Some(CIPHER), params(resume()))
        .map_err(step("resume reencryption"))?;
    run_reencrypt(&mut dev, progress).map_err(step("reencrypt"))?;
    dev.settings_handle().set_pbkdf_type(&pbkdf(kdf)).map_err(step("set kdf"))?;
    dev.keyslot_handle()
        .add_by_passphrase(Some(KEYSLOT), &temp.0, passphrase)
        .map_err(step("add the passphrase keyslot"))?;
    dev.keyslot_handle().destroy(TEMP_KEYSLOT).map_err(step("destroy the temporary keyslot"))?;
    read_info(&mut dev).map_err(step("read header"))
}

/// The throwaway keyslot's cost: the reencryption needs some keyslot, not a strong one.
const CHEAP_KDF: KdfParams = KdfParams { memory_kib: 32, time_ms: 1, iterations: Some(4), parallel: 1 };
const TEMP_KEYSLOT: u32 = 1;

/// 32 random bytes, hex-encoded, zeroed on drop.
struct TempPassphrase(Vec<u8>);

impl TempPassphrase {
    fn new() -> std::io::Result<Self> {
        let mut raw = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
        let pass = hex::encode(raw).into_bytes();
        raw.fill(0);
        Ok(Self(pass))
    }
}

impl Drop for TempPassphrase {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// Formats a detached header for `image`, adds the keyslot and records the reencryption; this
/// already moves the first 16 MiB of data to the end of the file.
fn init_reencryption(header: &Path, image: &Path, pass: &[u8], kdf: &KdfParams) -> Result<(), LibcryptErr> {
    let mut dev = CryptInit::init_with_data_device(Either::Right((header, image)))?;
    // The reencryption lock lives under a root-owned runtime dir; the file is ours alone anyway.
    dev.settings_handle().metadata_locking(false)?;
    dev.settings_handle().set_pbkdf_type(&pbkdf(kdf))?;
    dev.set_data_offset(HEADER_BYTES / 512)?;
    let luks2 = luks2_params();
    let mut luks2_ref: CryptParamsLuks2Ref<'_> = (&luks2).try_into()?;
    dev.context_handle().format(
        EncryptionFormat::Luks2,
        CIPHER,
        None,
        Either::Right(KEY_BYTES),
        Some(&mut luks2_ref),
    )?;
    dev.keyslot_handle().add_by_key(Some(TEMP_KEYSLOT), None, pass, CryptVolumeKey::empty())?;
    let flags = CryptReencrypt::INITIALIZE_ONLY | CryptReencrypt::MOVE_FIRST_SEGMENT;
    dev.reencrypt_handle().reencrypt_init_by_passphrase(
        None,
        pass,
        None,
        Some(TEMP_KEYSLOT),
        Some(CIPHER),
        params(flags),
    )?;
    Ok(())
}

fn resume() -> CryptReencrypt {
    CryptReencrypt::RESUME_ONLY | CryptReencrypt::MOVE_FIRST_SEGMENT
}

/// A context on the encrypted file; every new context needs the KDF again, else keyslot
/// operations fall back to the benchmarked default.
fn open(image: &Path, kdf: &KdfParams) -> Result<CryptDevice, LibcryptErr> {
    let mut dev = CryptInit::init(image)?;
    dev.settings_handle().metadata_locking(false)?;
    dev.context_handle().load::<()>(Some(EncryptionFormat::Luks2), None)?;
    dev.settings_handle().set_pbkdf_type(&pbkdf(kdf))?;
    Ok(dev)
}

fn params(flags: CryptReencrypt) -> CryptParamsReencrypt {
    CryptParamsReencrypt {
        mode: CryptReencryptModeInfo::Encrypt,
        direction: CryptReencryptDirectionInfo::Backward,
        resilience: "datashift".into(),
        hash: "sha256".into(),
        data_shift: HEADER_BYTES / 512,
        max_hotzone_size: 0,
        device_size: 0,
        luks2: Some(luks2_params()),
        flags,
    }
}

fn luks2_params() -> CryptParamsLuks2 {
    CryptParamsLuks2 {
        pbkdf: None,
        integrity: None,
        integrity_params: None,
        data_alignment: 0,
        data_device: None,
        sector_size: SECTOR_BYTES,
        label: None,
        subsystem: None,
    }
}

fn pbkdf(kdf: &KdfParams) -> CryptPbkdfType {
    let (iterations, flags) = match kdf.iterations {
        Some(n) => (n, CryptPbkdf::NO_BENCHMARK),
        None => (0, CryptPbkdf::empty()),
    };
    CryptPbkdfType {
        type_: CryptKdf::Argon2Id,
        hash: None,
        time_ms: kdf.time_ms,
        iterations,
        max_memory_kb: kdf.memory_kib,
        parallel_threads: kdf.parallel,
        flags,
    }
}

fn read_info(dev: &mut CryptDevice) -> Result<LuksInfo, LibcryptErr> {
    let mut status = dev.status_handle();
    let cipher = format!("{}-{}", status.get_cipher()?, status.get_cipher_mode()?);
    let uuid = status.get_uuid()?;
    let data_offset_bytes = status.get_data_offset() * 512;
    let key_bits = u32::try_from(status.get_volume_key_size()).unwrap_or(0) * 8;
    let sector_size = u32::try_from(libcryptsetup_rs::get_sector_size(Some(dev))).unwrap_or(0);
    let kdf = dev.keyslot_handle().get_pbkdf(KEYSLOT)?;
    let kind = match kdf.type_ {
        CryptKdf::Argon2Id => "argon2id",
        CryptKdf::Argon2I => "argon2i",
        CryptKdf::Pbkdf2 => "pbkdf2",
    };
    let pbkdf = PbkdfInfo {
        kind: kind.into(),
        iterations: kdf.iterations,
        memory_kib: kdf.max_memory_kb,
        parallel: kdf.parallel_threads,
    };
    Ok(LuksInfo { uuid, data_offset_bytes, cipher, key_bits, sector_size, pbkdf })
}

/// The detached header used while initialising: 0600 because it holds a keyslot, next to the
/// image so no other file system sees it, removed on every path out.
struct TempHeader(PathBuf);

impl TempHeader {
    fn create(image: &Path) -> Result<Self, LuksError> {
        let mut name = std::ffi::OsString::from(".");
        name.push(image.file_name().unwrap_or_default());
        name.push(format!(".luks-header-{}", std::process::id()));
        let path = image.with_file_name(name);
        let io_err = |source| LuksError::Io { path: path.clone(), source };
        let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(io_err)?;
        let header = Self(path.clone());
        file.set_len(4096).map_err(io_err)?;
        Ok(header)
    }
}

impl Drop for TempHeader {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
