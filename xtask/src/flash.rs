//! `cargo xtask flash`: writes `disk.img` to a USB stick, the one command here that can destroy
//! a user's data. The target must pass every check in [`target`]; the user types its name to
//! confirm; then the block map's data ranges are written with O_DIRECT while the image's bytes
//! are checked against the block map's SHA256 on another thread ([`write`]), the rest of the
//! image's extent is zeroed (a stick's old contents never survive inside a partition), the
//! device is flushed, and everything is read back bypassing the page cache ([`verify`]): the
//! data compared with the image, the zeroed gaps sampled. The written bytes equal `disk.img`;
//! the backup GPT moves to the end of the stick at first boot, not here.

mod target;
mod verify;
mod write;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustix::fs::OFlags;

use crate::build;
use cloister_bmap::{read_bmap, Bmap};

/// With this set (tests), anything but a whole loop device `/dev/loopN` is refused, whatever
/// the other checks say.
pub const TEST_ONLY_LOOP: &str = "CLOISTER_FLASH_TEST_ONLY_LOOP";
/// One O_DIRECT request: large, so that a stick (and the kernel) see few, long writes.
const CHUNK: usize = 8 * 1024 * 1024;
/// O_DIRECT needs buffers aligned to the logical block size; 4096 covers every disk.
const ALIGN: usize = 4096;

#[derive(clap::Args, Debug, Clone)]
pub struct FlashArgs {
    /// The whole disk to overwrite, e.g. /dev/sdb (never a partition such as /dev/sdb1).
    #[arg(long)]
    pub device: PathBuf,
    /// Image to write (default: what `cargo xtask build-image` wrote); `<image>.bmap` must exist.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Do not ask for the device name (for scripts that name the device explicitly).
    #[arg(long)]
    pub yes: bool,
    /// Run every check and show what would be written, without opening the device for writing.
    #[arg(long)]
    pub dry_run: bool,
    /// Allow a disk that is neither removable nor on USB (an internal or virtual disk).
    #[arg(long)]
    pub allow_fixed: bool,
}

/// What one flash did, for the benchmark.
#[derive(Debug, Default, Clone, Copy)]
pub struct FlashReport {
    pub data_bytes: u64,
    /// Unmapped bytes zeroed by the device itself (`FALLOC_FL_ZERO_RANGE`, i.e. write-zeroes).
    pub zeroed_by_device: u64,
    /// Unmapped bytes we wrote as zeros because the device cannot zero a range.
    pub zeros_written: u64,
    pub write_secs: f64,
    /// Time the hasher spent, beside the writes.
    pub hash_secs: f64,
    pub verify_secs: f64,
    /// Blocks of the zeroed gaps read back and found zero.
    pub gap_samples: u64,
}

pub fn flash(args: &FlashArgs) -> Result<()> {
    flash_image(args).map(|_| ())
}

/// Checks, confirms, writes and verifies; `None` after a dry run.
pub fn flash_image(args: &FlashArgs) -> Result<Option<FlashReport>> {
    let image_path = args.image.clone().unwrap_or_else(build::default_image);
    let (image, bmap, bmap_path) = open_image(&image_path)?;
    let target = target::inspect(&args.device, bmap.image_size, args.allow_fixed)?;
    if std::env::var_os(TEST_ONLY_LOOP).is_some() && !is_whole_loop(&target.name) {
        bail!(
            "refusing {}: {TEST_ONLY_LOOP} is set and {} is not a loop device",
            args.device.display(),
            target.name
        );
    }
    if bmap.image_size % target.logical_block != 0 {
        bail!(
            "image size {} is not a multiple of {}'s {}-byte blocks",
            bmap.image_size,
            target.name,
            target.logical_block
        );
    }
    show(&target, &image_path, &bmap_path, &bmap);
    if args.dry_run {
        println!("dry run: every check passed; nothing was written");
        return Ok(None);
    }
    if !args.yes {
        confirm(&target)?;
    }
    let identity = file_identity(&image, &image_path)?;
    let mut report = FlashReport::default();
    let t = Instant::now();
    report.hash_secs = write::write_all(&target, &image, &image_path, &bmap, &mut report)?.as_secs_f64();
    report.write_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let verified = verify::verify(&target, &image, &bmap)?;
    report.verify_secs = t.elapsed().as_secs_f64();
    report.gap_samples = verified.gap_samples;
    // The read-back compared the device with the image file: it must still be the file whose
    // bytes were checked against the block map.
    if file_identity(&image, &image_path)? != identity {
        bail!("{} changed while it was being written; flash it again", image_path.display());
    }
    eprintln!(
        "flash: {} written and verified: {} bytes of data in {:.1} s ({} bytes zeroed by the device, \
         {} written as zeros), read back in {:.1} s ({} blocks of the zeroed gaps sampled)",
        target.dev.display(),
        report.data_bytes,
        report.write_secs,
        report.zeroed_by_device,
        report.zeros_written,
        report.verify_secs,
        report.gap_samples
    );
    Ok(Some(report))
}

/// Inode, size and modification and change times: a rewrite of the file changes one of them.
fn file_identity(image: &File, path: &Path) -> Result<(u64, u64, u64, i64, i64, i64, i64)> {
    let m = image.metadata().with_context(|| format!("cannot stat {}", path.display()))?;
    Ok((m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()))
}

fn is_whole_loop(name: &str) -> bool {
    name.strip_prefix("loop").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn open_image(image: &Path) -> Result<(File, Bmap, PathBuf)> {
    let mut bmap_path = image.as_os_str().to_owned();
    bmap_path.push(".bmap");
    let bmap_path = PathBuf::from(bmap_path);
    let file = File::open(image).with_context(|| {
        format!("cannot open image {}; build one with `cargo xtask build-image`", image.display())
    })?;
    let bmap = read_bmap(&bmap_path)?;
    let len = file.metadata().with_context(|| format!("cannot stat {}", image.display()))?.len();
    if len != bmap.image_size {
        bail!(
            "block map {} describes a {}-byte image but {} has {len} bytes; rebuild the image",
            bmap_path.display(),
            bmap.image_size,
            image.display()
        );
    }
    Ok((file, bmap, bmap_path))
}

fn show(target: &target::Target, image: &Path, bmap_path: &Path, bmap: &Bmap) {
    println!("target:");
    for (k, v) in &target.info {
        println!("  {k:10} {v}");
    }
    println!(
        "checks passed: a whole disk; no mounted file system, swap or device-mapper user on it; \
         {} bytes >= the image's {}; removable, on USB, or --allow-fixed",
        target.size, bmap.image_size
    );
    let gaps = bmap.unmapped_spans();
    println!(
        "plan: write {} bytes of data in {} ranges from {} (map {}), zero {} bytes in {} ranges, \
         flush, read back and check the {} data bytes and samples of the zeros; bytes past {} \
         stay as they are",
        bmap.mapped_bytes(),
        bmap.ranges.len(),
        image.display(),
        bmap_path.display(),
        gaps.iter().map(|g| g.1).sum::<u64>(),
        gaps.len(),
        bmap.mapped_bytes(),
        bmap.image_size,
    );
}

fn confirm(target: &target::Target) -> Result<()> {
    eprint!(
        "Everything on {} will be destroyed. Type its name ({}) to continue: ",
        target.dev.display(),
        target.name
    );
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).context("cannot read the confirmation")?;
    let answer = answer.trim();
    if answer != target.name && Path::new(answer) != target.dev {
        bail!("cancelled: the answer did not match {}; nothing was written", target.name);
    }
    Ok(())
}

/// A buffer whose start is aligned for O_DIRECT, without `unsafe`: over-allocate and slice.
struct Aligned {
    buf: Vec<u8>,
    start: usize,
}

impl Aligned {
    fn zeroed(len: usize) -> Self {
        let buf = vec![0u8; len + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        Self { buf, start }
    }

    fn get(&mut self, len: usize) -> &mut [u8] {
        &mut self.buf[self.start..self.start + len]
    }
}

fn open_device(target: &target::Target, write: bool) -> Result<File> {
    // O_EXCL on a block device: the kernel refuses it while anything else holds the device
    // (a mount, a dm table, another exclusive opener), a last guard against a race.
    let flags = OFlags::DIRECT | OFlags::EXCL;
    OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(flags.bits() as i32)
        .open(&target.dev)
        .with_context(|| format!("cannot open {} exclusively with O_DIRECT", target.dev.display()))
}

/// Writes `chunk` at `at`; an error names the exact byte offset where the device gave up. A
/// device fails a whole request, so a failed large write is tried again block by block to find
/// the first block it refuses (rewriting blocks of a device that is being overwritten anyway).
fn write_at(dev: &File, target: &target::Target, chunk: &[u8], at: u64) -> Result<()> {
    let Err((off, e)) = write_fully(dev, chunk, at) else { return Ok(()) };
    let block = (target.logical_block as usize).max(ALIGN);
    let first_bad = if chunk.len() > block {
        chunk.chunks(block).enumerate().find_map(|(i, piece)| {
            let piece_at = at + (i * block) as u64;
            write_fully(dev, piece, piece_at).err().map(|(bad, _)| bad)
        })
    } else {
        None
    };
    Err(e).with_context(|| {
        format!(
            "write to {} failed at offset {}: the device is now partly written",
            target.dev.display(),
            first_bad.unwrap_or(off)
        )
    })
}

/// `write_all_at` that says where it stopped.
fn write_fully(dev: &File, chunk: &[u8], at: u64) -> std::result::Result<(), (u64, std::io::Error)> {
    let mut done = 0;
    while done < chunk.len() {
        let off = at + done as u64;
        match dev.write_at(&chunk[done..], off) {
            Ok(0) => return Err((off, std::io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err((off, e)),
        }
    }
    Ok(())
}

/// `written / total, MB/s, ETA` on stderr: in place on a terminal, a line every few seconds
/// otherwise (logs, tests).
struct Progress {
    total: u64,
    done: u64,
    started: Instant,
    shown: Instant,
    tty: bool,
}

impl Progress {
    fn new(total: u64) -> Self {
        let now = Instant::now();
        Self { total, done: 0, started: now, shown: now, tty: std::io::stderr().is_terminal() }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        let every = if self.tty { Duration::from_millis(200) } else { Duration::from_secs(5) };
        if self.shown.elapsed() >= every {
            self.shown = Instant::now();
            self.print();
        }
    }

    fn print(&self) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = self.done as f64 / secs;
        let eta = if rate > 0.0 { (self.total - self.done.min(self.total)) as f64 / rate } else { 0.0 };
        let line = format!(
            "flash: {:.0} / {:.0} MiB  {:.1} MB/s  ETA {:.0} s",
            self.done as f64 / 1048576.0,
            self.total as f64 / 1048576.0,
            rate / 1e6,
            eta
        );
        if self.tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }

    fn finish(&self) {
        self.print();
        if self.tty {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_loop_devices_pass_the_test_gate() {
        assert!(is_whole_loop("loop0"));
        assert!(is_whole_loop("loop12"));
        assert!(!is_whole_loop("loop0p1"));
        assert!(!is_whole_loop("loop"));
        assert!(!is_whole_loop("sda"));
        assert!(!is_whole_loop("nvme0n1"));
    }

    #[test]
    fn aligned_buffers_are_aligned() {
        for _ in 0..8 {
            let mut b = Aligned::zeroed(8192);
            assert_eq!(b.get(4096).as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.get(8192).len(), 8192);
        }
    }
}
