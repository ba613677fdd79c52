//! Offline LUKS2 encryption of a plain file that already holds the root XFS, in userspace (no
//! device-mapper, no AF_ALG, no root). The header takes the first 16 MiB and the data shifts by
//! that much, so the file's last 16 MiB must be free on entry (make the XFS
//! [`LUKS_RESERVE_BYTES`] smaller than the file): the XFS then fills the data segment exactly,
//! and the first boot has nothing to grow on a disk of the image's size. The data pass is ours (AES-256-XTS through OpenSSL's EVP, the same
//! libcrypto libcryptsetup uses here, with dm-crypt's plain64 IVs); the header and keyslot are
//! libcryptsetup's.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use libcryptsetup_rs::consts::flags::{CryptPbkdf, CryptVolumeKey};
use libcryptsetup_rs::consts::vals::{CryptKdf, EncryptionFormat};
use libcryptsetup_rs::{
    CryptDevice, CryptInit, CryptParamsLuks2, CryptParamsLuks2Ref, CryptPbkdfType, Either, LibcryptErr,
};
use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;
use openssl::error::ErrorStack;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::Zeroizing;

/// Free space the caller leaves at the end of the file: the size of the LUKS2 header.
pub const LUKS_RESERVE_BYTES: u64 = HEADER_BYTES;
const HEADER_BYTES: u64 = 16 * 1024 * 1024;
const SECTOR_BYTES: u32 = 4096;
const SECTOR: usize = SECTOR_BYTES as usize;
const CIPHER: (&str, &str) = ("aes", "xts-plain64");
const KEY_BYTES: usize = 64;
const KEYSLOT: u32 = 0;
/// The most one thread reads, encrypts and writes at a time. Two of them make a round, which
/// must not exceed the shift (see [`rounds`]).
const CHUNK_BYTES: u64 = 8 * 1024 * 1024;
const THREADS: usize = 2;
/// What a thread reads, encrypts and writes in one go within its chunk: small enough to stay in
/// the CPU cache between the copy in, the cipher and the copy out. Measured on tmpfs here:
/// 64 KiB pieces read 4-5 times faster than 128 KiB or more.
const PIECE_BYTES: u64 = 64 * 1024;

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
    #[error("aes-xts on {path}: {source}")]
    Cipher { path: PathBuf, source: ErrorStack },
    #[error("luks {step} on {path}: {source}")]
    Crypt { step: &'static str, path: PathBuf, source: LibcryptErr },
}

/// Encrypts `image` in place with one keyslot (slot 0) for `passphrase`; `progress` gets
/// (bytes done, bytes total) while the data is rewritten.
///
/// Not resumable: an interrupted run leaves the file half shifted, which is fine for a build
/// intermediate that the next build makes again (cryptsetup's own datashift journal fsyncs every
/// step to survive power loss, and that cost most of its time).
pub fn encrypt_in_place(
    image: &Path,
    passphrase: &[u8],
    kdf: &KdfParams,
    mut progress: Option<&mut dyn FnMut(u64, u64)>,
) -> Result<LuksInfo, LuksError> {
    let io_err = |source| LuksError::Io { path: image.into(), source };
    let file = OpenOptions::new().read(true).write(true).open(image).map_err(io_err)?;
    let size = file.metadata().map_err(io_err)?.len();
    if !size.is_multiple_of(u64::from(SECTOR_BYTES)) || size <= LUKS_RESERVE_BYTES {
        return Err(LuksError::BadSize { path: image.into(), size });
    }
    let key = volume_key()?;
    let mut report = |done, total| {
        if let Some(p) = progress.as_mut() {
            p(done, total);
        }
    };
    let data_bytes = size - HEADER_BYTES;
    report(0, data_bytes);
    shift_and_encrypt(&file, image, data_bytes, &key, &mut report)?;
    // libcryptsetup's format wipes the header area too, but the old start of the XFS must not
    // survive there whatever a library version decides.
    file.write_all_at(&vec![0u8; HEADER_BYTES as usize], 0).map_err(io_err)?;
    report(data_bytes, data_bytes);
    drop(file);
    write_header(image, &key, passphrase, kdf)
}

/// A fresh volume key; it only ever leaves this process encrypted in the keyslot.
fn volume_key() -> Result<Zeroizing<[u8; KEY_BYTES]>, LuksError> {
    let mut key = Zeroizing::new([0u8; KEY_BYTES]);
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(key.as_mut_slice()))
        .map_err(|source| LuksError::Io { path: "/dev/urandom".into(), source })?;
    Ok(key)
}

/// The data-segment bytes `[0, data_bytes)`, read from file offset 0 and written encrypted at
/// [`HEADER_BYTES`], from the end backwards, one round of [`THREADS`] chunks at a time.
fn shift_and_encrypt(
    file: &File,
    path: &Path,
    data_bytes: u64,
    key: &[u8; KEY_BYTES],
    report: &mut dyn FnMut(u64, u64),
) -> Result<(), LuksError> {
    let mut workers = (0..THREADS).map(|_| Worker::new(key, path)).collect::<Result<Vec<_>, _>>()?;
    for round in rounds(data_bytes) {
        // Leaving the scope joins both threads: that join is the barrier between rounds.
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = workers
                .iter_mut()
                .zip(round.clone())
                .map(|(worker, chunk)| s.spawn(move || worker.run(file, path, chunk)))
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        for result in results {
            result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        }
        report(data_bytes - round[THREADS - 1].start, data_bytes);
    }
    Ok(())
}

/// The chunks of `[0, data_bytes)`, highest first, in rounds of [`THREADS`] adjacent chunks of
/// at most [`CHUNK_BYTES`] each, all 4096-aligned (a chunk may be empty in the last round).
///
/// Why no plaintext is overwritten before it is read: a chunk `[a, b)` is read at `[a, b)` and
/// written at `[a + H, b + H)`, H = [`HEADER_BYTES`] = 16 MiB. A round spans one window
/// `[lo, hi)` with `hi - lo <= THREADS * CHUNK_BYTES = 16 MiB = H`, so all of its writes land in
/// `[lo + H, hi + H)`, at or above `hi`: never on bytes this round reads (all below `hi`), nor on
/// bytes later rounds read (all below `lo`). They do land on what earlier rounds read, which is
/// why a round starts only once the previous one has finished (the barrier). The top round writes
/// up to `data_bytes + H`, the end of the file. The argument is about the window, so the order in
/// which the threads work through their chunks (in [`PIECE_BYTES`] pieces) does not matter.
fn rounds(data_bytes: u64) -> impl Iterator<Item = [Range<u64>; THREADS]> {
    let window = THREADS as u64 * CHUNK_BYTES;
    const _: () = assert!(THREADS as u64 * CHUNK_BYTES <= HEADER_BYTES);
    let mut hi = data_bytes;
    std::iter::from_fn(move || {
        if hi == 0 {
            return None;
        }
        let lo = hi.saturating_sub(window);
        let mid = lo + (hi - lo) / 2 / u64::from(SECTOR_BYTES) * u64::from(SECTOR_BYTES);
        let round = [mid..hi, lo..mid];
        hi = lo;
        Some(round)
    })
}

/// One thread's cipher context (keyed once, re-initialised with a new IV per sector) and buffer.
struct Worker {
    ctx: CipherCtx,
    buf: Zeroizing<Vec<u8>>,
}

impl Worker {
    fn new(key: &[u8; KEY_BYTES], path: &Path) -> Result<Self, LuksError> {
        let cipher_err = |source| LuksError::Cipher { path: path.into(), source };
        let mut ctx = CipherCtx::new().map_err(cipher_err)?;
        ctx.encrypt_init(Some(Cipher::aes_256_xts()), Some(key), None).map_err(cipher_err)?;
        Ok(Self { ctx, buf: Zeroizing::new(vec![0u8; PIECE_BYTES as usize]) })
    }

    fn run(&mut self, file: &File, path: &Path, chunk: Range<u64>) -> Result<(), LuksError> {
        let io_err = |source| LuksError::Io { path: path.into(), source };
        let mut hi = chunk.end;
        while hi > chunk.start {
            let lo = hi.saturating_sub(PIECE_BYTES).max(chunk.start);
            let buf = &mut self.buf[..(hi - lo) as usize];
            file.read_exact_at(buf, lo).map_err(io_err)?;
            for (offset, sector) in (lo..).step_by(SECTOR).zip(buf.chunks_exact_mut(SECTOR)) {
                encrypt_sector(&mut self.ctx, offset, sector)
                    .map_err(|source| LuksError::Cipher { path: path.into(), source })?;
            }
            file.write_all_at(buf, lo + HEADER_BYTES).map_err(io_err)?;
            hi = lo;
        }
        Ok(())
    }
}

/// dm-crypt's plain64 IV: the sector's offset in the data segment counted in 512-byte units
/// even with 4096-byte sectors (LUKS2 never sets dm-crypt's `iv_large_sectors`), 64-bit
/// little-endian, zero-padded to the 16-byte XTS tweak.
fn plain64_iv(offset: u64) -> [u8; 16] {
    let mut iv = [0u8; 16];
    iv[..8].copy_from_slice(&(offset / 512).to_le_bytes());
    iv
}

fn encrypt_sector(ctx: &mut CipherCtx, offset: u64, sector: &mut [u8]) -> Result<(), ErrorStack> {
    ctx.encrypt_init(None, None, Some(&plain64_iv(offset)))?;
    // XTS has no padding and no state beyond the sector: one update encrypts it all.
    ctx.cipher_update_inplace(sector, sector.len())?;
    Ok(())
}

/// Formats the LUKS2 header for `key` in front of the (already encrypted) data and adds the
/// passphrase keyslot.
fn write_header(
    image: &Path,
    key: &[u8; KEY_BYTES],
    passphrase: &[u8],
    kdf: &KdfParams,
) -> Result<LuksInfo, LuksError> {
    let step = |step| move |source| LuksError::Crypt { step, path: image.into(), source };
    let mut dev = CryptInit::init(image).map_err(step("open"))?;
    // Locks live under a root-owned runtime dir; the file is ours alone anyway.
    dev.settings_handle().metadata_locking(false).map_err(step("disable locking"))?;
    dev.settings_handle().set_pbkdf_type(&pbkdf(kdf)).map_err(step("set kdf"))?;
    dev.set_data_offset(HEADER_BYTES / 512).map_err(step("set data offset"))?;
    let luks2 = luks2_params();
    let mut luks2_ref: CryptParamsLuks2Ref<'_> = (&luks2).try_into().map_err(step("format"))?;
    dev.context_handle()
        .format(EncryptionFormat::Luks2, CIPHER, None, Either::Left(key.as_slice()), Some(&mut luks2_ref))
        .map_err(step("format"))?;
    dev.keyslot_handle()
        .add_by_key(Some(KEYSLOT), Some(Either::Left(key.as_slice())), passphrase, CryptVolumeKey::empty())
        .map_err(step("add the passphrase keyslot"))?;
    read_info(&mut dev).map_err(step("read header"))
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::io::Write;
    use std::process::{Command, Output, Stdio};

    use sha2::{Digest, Sha256};

    use super::*;

    const MIB: u64 = 1024 * 1024;
    const PASS: &[u8] = b"correct horse battery staple";
    const KDF: KdfParams =
        KdfParams { memory_kib: 32 * 1024, time_ms: 100, iterations: Some(4), parallel: 1 };
    /// Not a multiple of the 16 MiB round: the last round is 12 KiB, split 8 KiB / 4 KiB.
    const FILE_BYTES: u64 = 48 * MIB + 12 * 1024;

    #[test]
    fn rounds_cover_the_data_downwards_and_never_write_over_unread_bytes() {
        for data in [4096, 12 * 1024, 16 * MIB, 16 * MIB + 4096, 100 * MIB + 36 * 1024] {
            let mut next_hi = data;
            for round in rounds(data) {
                let (lo, hi) = (round[THREADS - 1].start, round[0].end);
                assert_eq!(hi, next_hi, "rounds are contiguous, highest first");
                assert_eq!(round[0].start, round[1].end, "the chunks of a round are adjacent");
                for chunk in &round {
                    assert!(chunk.end - chunk.start <= CHUNK_BYTES, "{chunk:?}");
                    assert!(chunk.start.is_multiple_of(4096) && chunk.end.is_multiple_of(4096), "{chunk:?}");
                }
                assert!(lo + HEADER_BYTES >= hi, "round {lo}..{hi} writes over bytes it reads");
                next_hi = lo;
            }
            assert_eq!(next_hi, 0, "rounds reach offset 0 for {data}");
        }
    }

    /// Sector-distinct content over the XFS's place, the free 16 MiB reserve left zero.
    fn plaintext() -> Vec<u8> {
        let mut plain = vec![0u8; FILE_BYTES as usize];
        let used = (FILE_BYTES - LUKS_RESERVE_BYTES) as usize;
        for (i, sector) in plain[..used].chunks_exact_mut(SECTOR).enumerate() {
            for (j, word) in sector.chunks_exact_mut(8).enumerate() {
                word.copy_from_slice(&((i as u64) << 20 | j as u64 | 1 << 63).to_le_bytes());
            }
        }
        plain
    }

    fn run(cmd: &str, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = Command::new(cmd)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    }

    /// One test for everything that calls libcryptsetup: without its `mutex` feature the crate
    /// panics when a second thread of the process (another test) calls it.
    #[test]
    fn encrypts_so_that_the_cryptsetup_cli_agrees() {
        let dir = tempfile::tempdir().unwrap();
        let plain = plaintext();
        let img = dir.path().join("root.img");
        std::fs::write(&img, &plain).unwrap();
        let mut last = (1, 0);
        let info = encrypt_in_place(&img, PASS, &KDF, Some(&mut |done, total| last = (done, total))).unwrap();
        let data = FILE_BYTES - HEADER_BYTES;
        assert_eq!(last, (data, data), "progress ends at the total");
        assert_eq!((info.cipher.as_str(), info.key_bits, info.sector_size), ("aes-xts-plain64", 512, 4096));
        assert_eq!(info.data_offset_bytes, 16 * MIB);
        assert_eq!(
            (info.pbkdf.kind.as_str(), info.pbkdf.iterations, info.pbkdf.memory_kib),
            ("argon2id", 4, 32 * 1024)
        );
        header_has_one_keyslot_and_the_layout(&img);
        passphrase_is_checked(&img);
        no_plaintext_block_is_left(&img, &plain);
        cli_decrypts_byte_for_byte(dir.path(), &img, &plain);
    }

    fn header_has_one_keyslot_and_the_layout(img: &Path) {
        let out = run("cryptsetup", &["luksDump", "--dump-json-metadata", img.to_str().unwrap()], b"");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let slots: Vec<&String> = meta["keyslots"].as_object().unwrap().keys().collect();
        assert_eq!(slots, ["0"], "{meta}");
        assert_eq!(meta["keyslots"]["0"]["kdf"]["type"], "argon2id");
        let segments = meta["segments"].as_object().unwrap();
        assert_eq!(segments.len(), 1, "{meta}");
        let seg = &segments["0"];
        assert_eq!(seg["offset"], "16777216");
        assert_eq!(seg["size"], "dynamic");
        assert_eq!(seg["iv_tweak"], "0");
        assert_eq!(seg["sector_size"], 4096);
        assert_eq!(seg["encryption"], "aes-xts-plain64");
    }

    fn passphrase_is_checked(img: &Path) {
        let img_s = img.to_str().unwrap();
        let test =
            |pass: &[u8]| run("cryptsetup", &["open", "--test-passphrase", "--key-file", "-", img_s], pass);
        assert!(test(PASS).status.success(), "the passphrase opens keyslot 0");
        assert!(!test(b"wrong passphrase").status.success(), "a wrong passphrase is refused");
    }

    fn no_plaintext_block_is_left(img: &Path, plain: &[u8]) {
        let sum = |b: &[u8]| -> [u8; 32] { Sha256::digest(b).into() };
        let sums: HashSet<[u8; 32]> =
            plain.chunks(SECTOR).filter(|b| b.iter().any(|&x| x != 0)).map(sum).collect();
        assert!(sums.len() > 4000, "control: the plaintext has distinct non-zero blocks");
        let file = std::fs::read(img).unwrap();
        let (header, data) = file.split_at(HEADER_BYTES as usize);
        let left = header.chunks(SECTOR).filter(|b| sums.contains(&sum(b))).count();
        assert_eq!(left, 0, "plaintext blocks left in the header area");
        let left = data.chunks(SECTOR).filter(|b| sums.contains(&sum(b))).count();
        assert_eq!(left, 0, "plaintext blocks in the data segment");
    }

    /// Offline decryption with the CLI (no device-mapper) shifts the plaintext back to offset 0.
    fn cli_decrypts_byte_for_byte(dir: &Path, img: &Path, plain: &[u8]) {
        let header = dir.join("detached-header");
        let (img_s, hdr_s) = (img.to_str().unwrap(), header.to_str().unwrap());
        let args = ["reencrypt", "--decrypt", "--batch-mode", "--force-offline-reencrypt", "--header"];
        let out = run("cryptsetup", &[&args[..], &[hdr_s, "--key-file", "-", img_s]].concat(), PASS);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let back = std::fs::read(img).unwrap();
        let data = (FILE_BYTES - HEADER_BYTES) as usize;
        // Sector by sector, so a failure names the first bad sector instead of printing 32 MiB.
        let bad = back[..data].chunks(SECTOR).zip(plain[..data].chunks(SECTOR)).position(|(b, p)| b != p);
        assert_eq!(bad, None, "first sector that decrypts wrong");
    }

    #[test]
    fn plain64_counts_512_byte_units_little_endian() {
        assert_eq!(plain64_iv(0), [0; 16]);
        let iv = plain64_iv(4096 * 3);
        assert_eq!(iv[..8], 24u64.to_le_bytes());
        assert_eq!(iv[8..], [0; 8]);
        assert_eq!(plain64_iv((1 << 40) + 512)[..8], ((1u64 << 31) + 1).to_le_bytes());
    }
}
