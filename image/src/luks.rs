//! Offline LUKS2 encryption of a plain file holding the root XFS into a partition of the image
//! being written, in userspace (no device-mapper, no AF_ALG, no root). The header takes the
//! partition's first 16 MiB; make the XFS [`LUKS_RESERVE_BYTES`] smaller than the partition and
//! it fills the data segment exactly, so the first boot has nothing to grow on a disk of the
//! image's size. The data pass is ours (AES-256-XTS through OpenSSL's EVP, the same libcrypto
//! libcryptsetup uses here, with dm-crypt's plain64 IVs); the header and keyslot are
//! libcryptsetup's.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;

use libcryptsetup_rs::consts::flags::{CryptPbkdf, CryptVolumeKey};
use libcryptsetup_rs::consts::vals::{CryptKdf, CryptLogLevel, EncryptionFormat, KeyslotsSize, MetadataSize};
use libcryptsetup_rs::{
    CryptDevice, CryptInit, CryptParamsLuks2, CryptParamsLuks2Ref, CryptPbkdfType, Either, LibcryptErr,
};
use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;
use openssl::error::ErrorStack;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::direct::{self, AlignedBuf};

/// How much smaller than its partition a filesystem must be: the size of the LUKS2 header.
pub const LUKS_RESERVE_BYTES: u64 = HEADER_BYTES;
const HEADER_BYTES: u64 = 16 * 1024 * 1024;
const SECTOR_BYTES: u32 = 4096;
const SECTOR: usize = SECTOR_BYTES as usize;
const CIPHER: (&str, &str) = ("aes", "xts-plain64");
const KEY_BYTES: usize = 64;
const KEYSLOT: u32 = 0;
/// What a worker takes from the shared counter at a time, and the unit of progress.
const CHUNK_BYTES: u64 = 8 * 1024 * 1024;
/// Two workers on two cores, each writing its whole chunk with one direct write. Direct writes
/// into the fallocated (unwritten) range still take turns on the inode lock, where ext4 marks
/// the extents written, so more workers only wait: for the default 1.5 GiB root, 2, 3, 4 and
/// 6 workers took 0.55-0.62, 0.81-0.84, 0.68-0.71 and 0.67-0.75 s.
const THREADS: usize = 2;
/// What a thread reads and encrypts in one go within its chunk: small enough to stay in the
/// CPU cache between the copy in and the cipher. Measured on tmpfs here:
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
    #[error(
        "{path}: a partition of {size} bytes must be a multiple of 4096 and larger than the 16 MiB header"
    )]
    BadSize { path: PathBuf, size: u64 },
    #[error("{path}: {size} bytes do not fit the {room}-byte data segment (or are not a multiple of 4096)")]
    PlainTooLarge { path: PathBuf, size: u64, room: u64 },
    #[error(
        "libcryptsetup lowered the argon2id cost to {got} (the config asks {asked}): on a machine \
         without swap it allows at most half of the free memory ({free} free now); an image must not \
         unlock more cheaply than configured, so none was written. Free memory (or add swap) and \
         build again"
    )]
    KdfLowered { asked: String, got: String, free: String },
    #[error("aes-xts on {path}: {source}")]
    Cipher { path: PathBuf, source: ErrorStack },
    #[error("luks {step} on {path}: {source}")]
    Crypt { step: &'static str, path: PathBuf, source: LibcryptErr },
}

/// Where a LUKS2 partition is written: `bytes` of `file` from `offset` (`path` names the file in
/// messages). The data segment is `bytes` minus the 16 MiB header.
#[derive(Clone, Copy)]
pub struct Partition<'a> {
    pub file: &'a File,
    pub path: &'a Path,
    pub offset: u64,
    pub bytes: u64,
}

/// A LUKS2 header for a partition of a given size: a fresh volume key, the header and keyslot
/// libcryptsetup made for it, and what the header says. Made first, written by [`encrypt`].
pub struct Header {
    key: Zeroizing<[u8; KEY_BYTES]>,
    bytes: Vec<u8>,
    info: LuksInfo,
    partition_bytes: u64,
}

impl Header {
    pub fn info(&self) -> &LuksInfo {
        &self.info
    }
}

/// Makes the header (the KDF's seconds) for a partition of `partition_bytes`, with one keyslot
/// (slot 0) for `passphrase`, in a scratch file under `scratch_dir`.
///
/// A build makes it before anything else: libcryptsetup caps argon2id memory at half of the
/// free RAM on a machine without swap (see [`check_kdf`]), and a build's own work (the staging
/// tree and the plain XFS on tmpfs, the page cache it fills) leaves less free RAM later.
pub fn format(
    scratch_dir: &Path,
    partition_bytes: u64,
    passphrase: &[u8],
    kdf: &KdfParams,
) -> Result<Header, LuksError> {
    let sector = u64::from(SECTOR_BYTES);
    if !partition_bytes.is_multiple_of(sector) || partition_bytes <= HEADER_BYTES {
        return Err(LuksError::BadSize { path: scratch_dir.into(), size: partition_bytes });
    }
    let key = volume_key()?;
    let (bytes, info) = header_bytes(scratch_dir, partition_bytes, &key, passphrase, kdf)?;
    check_kdf(kdf, &info.pbkdf)?;
    Ok(Header { key, bytes, info, partition_bytes })
}

/// Writes `into` as the LUKS2 partition `header` was made for, its data segment holding the
/// filesystem image `plain` encrypted. `plain` may be shorter than the data segment
/// ([`LUKS_RESERVE_BYTES`] smaller than the partition fills it exactly); whatever it does not
/// cover is encrypted zeros, so free space looks like the rest. `progress` gets (bytes done,
/// bytes total) of the data segment.
///
/// Encrypting while writing the final image (instead of in place in a work file and copying that
/// afterwards) writes the ciphertext once, and leaves the plain file sparse: its holes are
/// never read, only zeros encrypted. The partition is allocated first (`fallocate`), so a full
/// disk fails here, before any work, rather than halfway through.
pub fn encrypt(
    plain: &Path,
    into: Partition<'_>,
    header: &Header,
    mut progress: Option<&mut dyn FnMut(u64, u64)>,
) -> Result<LuksInfo, LuksError> {
    let io_err = |source| LuksError::Io { path: plain.into(), source };
    let source = File::open(plain).map_err(io_err)?;
    let plain_bytes = source.metadata().map_err(io_err)?.len();
    let sector = u64::from(SECTOR_BYTES);
    if into.bytes != header.partition_bytes || !into.offset.is_multiple_of(sector) {
        return Err(LuksError::BadSize { path: into.path.into(), size: into.bytes });
    }
    let data_bytes = into.bytes - HEADER_BYTES;
    if !plain_bytes.is_multiple_of(sector) || plain_bytes > data_bytes {
        return Err(LuksError::PlainTooLarge { path: plain.into(), size: plain_bytes, room: data_bytes });
    }
    allocate(into)?;
    let mut report = |done, total| {
        if let Some(p) = progress.as_mut() {
            p(done, total);
        }
    };
    report(0, data_bytes);
    let data = Partition { offset: into.offset + HEADER_BYTES, bytes: data_bytes, ..into };
    encrypt_data(&source, plain, plain_bytes, data, &header.key, &mut report)?;
    into.file
        .write_all_at(&header.bytes, into.offset)
        .map_err(|source| LuksError::Io { path: into.path.into(), source })?;
    Ok(header.info.clone())
}

/// Allocates `part` in its file, so that running out of space is an error up front.
fn allocate(part: Partition<'_>) -> Result<(), LuksError> {
    reserve(part.file, part.offset, part.bytes)
        .map_err(|source| LuksError::Io { path: part.path.into(), source })
}

/// `fallocate` of `len` bytes from `offset` (on ext4: unwritten extents, no data written); a
/// file system without it is written as it is.
pub(crate) fn reserve(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), offset, len) {
        Ok(()) | Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The keyslot must cost what was asked. Debian's libcryptsetup silently lowers argon2id's
/// memory to half of the free memory on machines without swap (Debian bug 1028250; seen here:
/// 503280, 386896 and 372618 KiB for 524288, with the page cache holding most of the RAM),
/// which would ship an image that is cheaper to attack than its config says. Lanes are not
/// compared: the library caps them at the build machine's CPUs, which changes the derived key
/// but not the cost.
fn check_kdf(asked: &KdfParams, got: &PbkdfInfo) -> Result<(), LuksError> {
    let iterations_ok = asked.iterations.is_none_or(|n| n == got.iterations);
    if got.kind == "argon2id" && got.memory_kib == asked.memory_kib && iterations_ok {
        return Ok(());
    }
    let iterations = asked.iterations.map_or("benchmarked".to_string(), |n| n.to_string());
    let free = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find(|l| l.starts_with("MemFree:")).map(|l| l["MemFree:".len()..].trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    Err(LuksError::KdfLowered {
        asked: format!("argon2id {} KiB x {iterations}", asked.memory_kib),
        got: format!("{} {} KiB x {}", got.kind, got.memory_kib, got.iterations),
        free,
    })
}

/// A fresh volume key; it only ever leaves this process encrypted in the keyslot.
fn volume_key() -> Result<Zeroizing<[u8; KEY_BYTES]>, LuksError> {
    let mut key = Zeroizing::new([0u8; KEY_BYTES]);
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(key.as_mut_slice()))
        .map_err(|source| LuksError::Io { path: "/dev/urandom".into(), source })?;
    Ok(key)
}

/// libcryptsetup formats files, not ranges of one: the header is made in a sparse scratch file
/// of the partition's size in `dir` (so the library sees the real device size) and read back.
/// The scratch file holds no secret in clear (the keyslot is the passphrase-wrapped key) and
/// is removed whatever happens.
fn header_bytes(
    dir: &Path,
    partition_bytes: u64,
    key: &[u8; KEY_BYTES],
    passphrase: &[u8],
    kdf: &KdfParams,
) -> Result<(Vec<u8>, LuksInfo), LuksError> {
    let scratch = Scratch(dir.join(format!(".luks-header-{}", std::process::id())));
    let io_err = |source| LuksError::Io { path: scratch.0.clone(), source };
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(&scratch.0).map_err(io_err)?;
    file.set_len(partition_bytes).map_err(io_err)?;
    let info = write_header(&scratch.0, key, passphrase, kdf)?;
    let mut bytes = vec![0u8; HEADER_BYTES as usize];
    file.read_exact_at(&mut bytes, 0).map_err(io_err)?;
    Ok((bytes, info))
}

/// The size of [`warmup_header`]: both 16 KiB metadata copies and a 4 KiB keyslot area, the
/// least libcryptsetup loads.
pub const WARMUP_HEADER_BYTES: u64 = 2 * 16 * 1024 + 4096;

/// A LUKS2 header of the root's shape (cipher, 4096-byte sectors, a digest) with no keyslot
/// and for no disk, for stage 1 to load while the disk drivers probe. The first header load
/// of a process does most of its work once (the crypto backend, the JSON and metadata code):
/// about 50 ms under QEMU's user-mode TCG for the first, 4 ms for the next. Loading this one
/// first moves that off the boot's path. No passphrase opens anything here: the volume key it
/// was made with is thrown away, and the digest's salt (libcryptsetup's own) makes each copy
/// differ.
pub fn warmup_header(scratch_dir: &Path) -> Result<Vec<u8>, LuksError> {
    let scratch = Scratch(scratch_dir.join(format!(".luks-warmup-{}", std::process::id())));
    let io_err = |source| LuksError::Io { path: scratch.0.clone(), source };
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(&scratch.0).map_err(io_err)?;
    // Past the data offset, so that libcryptsetup does not warn of a device with no room.
    file.set_len(2 * 1024 * 1024).map_err(io_err)?;
    let step = |step: &'static str| {
        let path = scratch.0.clone();
        move |source| LuksError::Crypt { step, path, source }
    };
    // It would print that a 4 KiB keyslot area holds few keyslots: this one is meant to hold none.
    let _quiet = QuietLibcryptsetup::new();
    let mut dev = CryptInit::init(&scratch.0).map_err(step("open"))?;
    dev.settings_handle().metadata_locking(false).map_err(step("disable locking"))?;
    let keyslots = KeyslotsSize::try_from(4096).map_err(step("keyslots size"))?;
    dev.settings_handle()
        .set_metadata_size(MetadataSize::Kb16, keyslots)
        .map_err(step("set metadata size"))?;
    // The digest's cost is the least: nothing ever checks a key against it, and a benchmark
    // would cost the build time.
    let digest = CryptPbkdfType {
        type_: CryptKdf::Pbkdf2,
        hash: Some("sha256".into()),
        time_ms: 0,
        iterations: 1000,
        max_memory_kb: 0,
        parallel_threads: 0,
        flags: CryptPbkdf::NO_BENCHMARK,
    };
    dev.settings_handle().set_pbkdf_type(&digest).map_err(step("set kdf"))?;
    let key = volume_key()?;
    let luks2 = luks2_params();
    let mut luks2_ref: CryptParamsLuks2Ref<'_> = (&luks2).try_into().map_err(step("format"))?;
    dev.context_handle()
        .format(EncryptionFormat::Luks2, CIPHER, None, Either::Left(key.as_slice()), Some(&mut luks2_ref))
        .map_err(step("format"))?;
    drop(dev);
    let mut bytes = vec![0u8; WARMUP_HEADER_BYTES as usize];
    file.read_exact_at(&mut bytes, 0).map_err(io_err)?;
    Ok(bytes)
}

/// Drops libcryptsetup's messages while it lives (they would go to stdout; errors still come
/// back as return codes), then restores the library's default.
struct QuietLibcryptsetup;

fn drop_message(_level: CryptLogLevel, _msg: &str, _data: Option<&mut ()>) {}
libcryptsetup_rs::c_logging_callback!(drop_message_c, (), drop_message);

impl QuietLibcryptsetup {
    fn new() -> Self {
        libcryptsetup_rs::set_log_callback::<()>(Some(drop_message_c), None);
        QuietLibcryptsetup
    }
}

impl Drop for QuietLibcryptsetup {
    fn drop(&mut self) {
        libcryptsetup_rs::set_log_callback::<()>(None, None);
    }
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The data segment, in [`CHUNK_BYTES`] chunks that [`THREADS`] workers take in turn from a
/// shared counter (a worker that is slowed down takes fewer); each reports what it finished to
/// this thread, which calls `report`. The first error stops the others at their next chunk.
fn encrypt_data(
    source: &File,
    plain: &Path,
    plain_bytes: u64,
    out: Partition<'_>,
    key: &[u8; KEY_BYTES],
    report: &mut dyn FnMut(u64, u64),
) -> Result<(), LuksError> {
    let mut workers = (0..THREADS).map(|_| Worker::new(key, plain)).collect::<Result<Vec<_>, _>>()?;
    let direct = direct::reopen(out.file, direct::Access::Write);
    let out = Output { part: out, direct: direct.as_ref() };
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<u64>();
    let input = Input { file: source, path: plain, bytes: plain_bytes };
    std::thread::scope(|s| {
        let handles: Vec<_> = workers
            .iter_mut()
            .map(|worker| {
                let (next, failed, done_tx) = (&next, &failed, done_tx.clone());
                s.spawn(move || {
                    let result = worker.run_chunks(&input, out, next, failed, &done_tx);
                    if result.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    result
                })
            })
            .collect();
        drop(done_tx);
        let mut done = 0;
        for bytes in done_rx {
            done += bytes;
            report(done, out.part.bytes);
        }
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
    })
}

/// Where the ciphertext goes: the partition, and the same file opened again for direct writes
/// where the file system allows them (see [`crate::direct`]): a whole chunk goes from the
/// worker's buffer to the device in one write.
#[derive(Clone, Copy)]
struct Output<'a> {
    part: Partition<'a>,
    direct: Option<&'a File>,
}

impl Output<'_> {
    /// Writes `buf` at `offset` in the partition: directly when it can, else through the page
    /// cache.
    fn write(&self, buf: &[u8], offset: u64) -> Result<(), LuksError> {
        let at = self.part.offset + offset;
        let io_err = |source| LuksError::Io { path: self.part.path.into(), source };
        if let (Some(direct), true) = (self.direct, direct::aligned(buf, at)) {
            match direct.write_all_at(buf, at) {
                Ok(()) => return Ok(()),
                Err(e) if direct::refused(&e) => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        self.part.file.write_all_at(buf, at).map_err(io_err)
    }
}

/// The plain filesystem image, read with `pread(2)` where it has data.
#[derive(Clone, Copy)]
struct Input<'a> {
    file: &'a File,
    path: &'a Path,
    bytes: u64,
}

impl Input<'_> {
    /// The first byte at or after `from` that may hold data: holes (and everything past the end)
    /// read as zeros, so only this far is known zero without reading.
    fn next_data(&self, from: u64) -> Result<u64, LuksError> {
        if from >= self.bytes {
            return Ok(u64::MAX);
        }
        match rustix::fs::seek(self.file, rustix::fs::SeekFrom::Data(from)) {
            Ok(at) => Ok(at),
            // No data after `from`.
            Err(rustix::io::Errno::NXIO) => Ok(u64::MAX),
            // A file system without SEEK_DATA: everything may be data.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => Ok(from),
            Err(e) => Err(LuksError::Io { path: self.path.into(), source: e.into() }),
        }
    }

    /// `buf` gets the plaintext at `offset`: read where the file may have data, zeros elsewhere.
    fn fill(&self, buf: &mut [u8], offset: u64, next_data: u64) -> Result<(), LuksError> {
        let end = offset + buf.len() as u64;
        if next_data >= end {
            buf.fill(0);
            return Ok(());
        }
        let readable = (self.bytes.min(end) - offset) as usize;
        self.file
            .read_exact_at(&mut buf[..readable], offset)
            .map_err(|source| LuksError::Io { path: self.path.into(), source })?;
        buf[readable..].fill(0);
        Ok(())
    }
}

/// One thread's cipher context (keyed once, re-initialised with a new IV per sector) and a
/// buffer for a whole chunk.
struct Worker {
    ctx: CipherCtx,
    buf: AlignedBuf,
}

impl Worker {
    fn new(key: &[u8; KEY_BYTES], path: &Path) -> Result<Self, LuksError> {
        let cipher_err = |source| LuksError::Cipher { path: path.into(), source };
        let mut ctx = CipherCtx::new().map_err(cipher_err)?;
        ctx.encrypt_init(Some(Cipher::aes_256_xts()), Some(key), None).map_err(cipher_err)?;
        Ok(Self { ctx, buf: AlignedBuf::new(CHUNK_BYTES as usize) })
    }

    fn run_chunks(
        &mut self,
        input: &Input<'_>,
        out: Output<'_>,
        next: &AtomicU64,
        failed: &AtomicBool,
        done: &Sender<u64>,
    ) -> Result<(), LuksError> {
        while !failed.load(Ordering::Relaxed) {
            let start = next.fetch_add(CHUNK_BYTES, Ordering::Relaxed);
            if start >= out.part.bytes {
                break;
            }
            let chunk = start..(start + CHUNK_BYTES).min(out.part.bytes);
            let len = chunk.end - chunk.start;
            self.run(input, out, chunk)?;
            // The receiver only goes away once every worker has ended.
            let _ = done.send(len);
        }
        Ok(())
    }

    /// Encrypts `chunk` piece by piece into the buffer (each piece stays in the CPU cache from
    /// the copy in to the cipher), then writes it with one call.
    fn run(&mut self, input: &Input<'_>, out: Output<'_>, chunk: Range<u64>) -> Result<(), LuksError> {
        let cipher_err = |source| LuksError::Cipher { path: input.path.into(), source };
        let buf = &mut self.buf.as_mut_slice()[..(chunk.end - chunk.start) as usize];
        let mut data_at = input.next_data(chunk.start)?;
        let mut lo = chunk.start;
        for piece in buf.chunks_mut(PIECE_BYTES as usize) {
            input.fill(piece, lo, data_at)?;
            for (offset, sector) in (lo..).step_by(SECTOR).zip(piece.chunks_exact_mut(SECTOR)) {
                encrypt_sector(&mut self.ctx, offset, sector).map_err(cipher_err)?;
            }
            lo += piece.len() as u64;
            if data_at < lo {
                data_at = input.next_data(lo)?;
            }
        }
        out.write(buf, chunk.start)
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
    /// Not a multiple of the 8 MiB chunk: the last chunk is 12 KiB.
    const PART_BYTES: u64 = 48 * MIB + 12 * 1024;
    const DATA_BYTES: u64 = PART_BYTES - HEADER_BYTES;
    /// A hole in the plain file (never written: it reads as zeros without being stored), and
    /// the plain file ending 1 MiB before the data segment does.
    const HOLE: Range<u64> = 9 * MIB..13 * MIB;
    const PLAIN_BYTES: u64 = DATA_BYTES - MIB;

    /// Sector-distinct content, zeros in [`HOLE`]; as long as the data segment, the last MiB zero.
    fn plaintext() -> Vec<u8> {
        let mut plain = vec![0u8; DATA_BYTES as usize];
        for (i, sector) in plain[..PLAIN_BYTES as usize].chunks_exact_mut(SECTOR).enumerate() {
            if HOLE.contains(&(i as u64 * u64::from(SECTOR_BYTES))) {
                continue;
            }
            for (j, word) in sector.chunks_exact_mut(8).enumerate() {
                word.copy_from_slice(&((i as u64) << 20 | j as u64 | 1 << 63).to_le_bytes());
            }
        }
        plain
    }

    /// `plain` up to [`PLAIN_BYTES`] as a sparse file: the hole is left unwritten.
    fn write_sparse(path: &Path, plain: &[u8]) {
        let file = File::create(path).unwrap();
        file.set_len(PLAIN_BYTES).unwrap();
        file.write_all_at(&plain[..HOLE.start as usize], 0).unwrap();
        file.write_all_at(&plain[HOLE.end as usize..PLAIN_BYTES as usize], HOLE.end).unwrap();
        let hole = rustix::fs::seek(&file, rustix::fs::SeekFrom::Hole(0)).unwrap();
        assert_eq!(hole, HOLE.start, "control: the file system keeps the hole");
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
        let plain_path = dir.path().join("root.xfs");
        write_sparse(&plain_path, &plain);
        // The partition sits 1 MiB into a larger file, as in an image; the bytes around it stay.
        let img = dir.path().join("disk.img");
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&img).unwrap();
        file.write_all_at(&vec![0xa5; (PART_BYTES + 2 * MIB) as usize], 0).unwrap();
        let partition = Partition { file: &file, path: &img, offset: MIB, bytes: PART_BYTES };
        let mut last = (1, 0);
        let header = format(dir.path(), PART_BYTES, PASS, &KDF).unwrap();
        let info =
            encrypt(&plain_path, partition, &header, Some(&mut |done, total| last = (done, total))).unwrap();
        assert_eq!(&info, header.info());
        assert_eq!(last, (DATA_BYTES, DATA_BYTES), "progress ends at the total");
        assert_eq!((info.cipher.as_str(), info.key_bits, info.sector_size), ("aes-xts-plain64", 512, 4096));
        assert_eq!(info.data_offset_bytes, 16 * MIB);
        assert_eq!(
            (info.pbkdf.kind.as_str(), info.pbkdf.iterations, info.pbkdf.memory_kib),
            ("argon2id", 4, 32 * 1024)
        );
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "no scratch header left: {names:?}");
        let mut whole = std::fs::read(&img).unwrap();
        let after = whole.split_off((MIB + PART_BYTES) as usize);
        assert!(after.iter().chain(&whole[..MIB as usize]).all(|&b| b == 0xa5), "outside the partition");
        let part = dir.path().join("root.part");
        std::fs::write(&part, &whole[MIB as usize..]).unwrap();
        header_has_one_keyslot_and_the_layout(&part);
        passphrase_is_checked(&part);
        no_plaintext_block_is_left(&part, &plain);
        cli_decrypts_byte_for_byte(dir.path(), &part, &plain);
        warmup_header_has_the_roots_shape_and_no_keyslot(dir.path());
    }

    fn warmup_header_has_the_roots_shape_and_no_keyslot(dir: &Path) {
        let before = std::fs::read_dir(dir).unwrap().count();
        let bytes = warmup_header(dir).unwrap();
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), before, "a scratch file was left");
        assert_eq!(bytes.len() as u64, WARMUP_HEADER_BYTES);
        let path = dir.join("warmup.luks2");
        std::fs::write(&path, &bytes).unwrap();
        let out = run("cryptsetup", &["luksDump", "--dump-json-metadata", path.to_str().unwrap()], b"");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(meta["keyslots"], serde_json::json!({}), "{meta:#}");
        let segment = &meta["segments"]["0"];
        assert_eq!(
            (segment["encryption"].as_str(), segment["sector_size"].as_u64()),
            (Some("aes-xts-plain64"), Some(4096))
        );
        // What stage 1 does with it: libcryptsetup loads it as it is.
        let mut dev = CryptInit::init(&path).unwrap();
        dev.settings_handle().metadata_locking(false).unwrap();
        dev.context_handle().load::<()>(Some(EncryptionFormat::Luks2), None).unwrap();
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
        let data = DATA_BYTES as usize;
        // Sector by sector, so a failure names the first bad sector instead of printing 32 MiB;
        // the hole and the part past the plain file's end come back as zeros.
        let bad = back[..data].chunks(SECTOR).zip(plain.chunks(SECTOR)).position(|(b, p)| b != p);
        assert_eq!(bad, None, "first sector that decrypts wrong");
    }

    #[test]
    fn a_lowered_kdf_is_refused_and_named() {
        let asked = KdfParams { memory_kib: 524288, time_ms: 2000, iterations: Some(6), parallel: 4 };
        let got = |memory_kib, iterations, parallel| PbkdfInfo {
            kind: "argon2id".into(),
            iterations,
            memory_kib,
            parallel,
        };
        check_kdf(&asked, &got(524288, 6, 4)).unwrap();
        check_kdf(&asked, &got(524288, 6, 2)).expect("lanes capped at the build host's CPUs are fine");
        let err = check_kdf(&asked, &got(503280, 6, 4)).unwrap_err().to_string();
        assert!(err.contains("503280 KiB") && err.contains("524288 KiB") && err.contains("swap"), "{err}");
        assert!(check_kdf(&asked, &got(524288, 4, 4)).is_err(), "fewer passes than pinned");
        let benchmarked = KdfParams { iterations: None, ..asked };
        check_kdf(&benchmarked, &got(524288, 9, 4)).expect("a benchmark picks the passes");
        let pbkdf2 = PbkdfInfo { kind: "pbkdf2".into(), ..got(524288, 6, 4) };
        assert!(check_kdf(&asked, &pbkdf2).is_err(), "another KDF");
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
