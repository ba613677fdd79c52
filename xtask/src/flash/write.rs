//! The write pass of `cargo xtask flash` as three threads joined by bounded channels, so that
//! reading the image, writing the device and hashing never wait for each other more than the
//! buffers force them to: a reader fills aligned buffers from the image, a writer puts them on
//! the device with O_DIRECT (and zeroes the gaps between data ranges, in offset order), and a
//! hasher checks the image's bytes against the block map's per-range SHA256 beside the writer
//! rather than in its way. Buffers travel reader → writer → hasher → reader, so at most
//! [`DEPTH`] exist; a stage whose neighbour ended stops quietly and the stage that failed says
//! why (a device error with its exact offset).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustix::fs::FallocateFlags;
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use super::{open_device, target::Target, write_at, Aligned, FlashReport, Progress, CHUNK};
use cloister_bmap::Bmap;

/// Buffers in flight: one being read, one being written, one being hashed, one spare.
const DEPTH: usize = 4;

struct Chunk {
    at: u64,
    n: usize,
    buf: Aligned,
    /// Index into the block map's ranges, and whether this chunk ends that range.
    range: usize,
    last: bool,
}

enum Job {
    Data(Chunk),
    Zero { start: u64, len: u64 },
}

/// Writes every data range and zeroes every gap of `bmap`'s extent, then flushes the device.
/// Returns how long the hasher was busy (it runs beside the writes).
pub fn write_all(
    target: &Target,
    image: &File,
    image_path: &Path,
    bmap: &Bmap,
    report: &mut FlashReport,
) -> Result<Duration> {
    let dev = open_device(target, true)?;
    let (free_tx, free_rx) = sync_channel::<Aligned>(DEPTH);
    for _ in 0..DEPTH {
        free_tx.send(Aligned::zeroed(CHUNK)).context("buffer pool")?;
    }
    let (job_tx, job_rx) = sync_channel::<Job>(DEPTH);
    let (hash_tx, hash_rx) = sync_channel::<Chunk>(DEPTH);
    let hash_busy = std::thread::scope(|s| {
        let reader = s.spawn(move || read_jobs(image, image_path, bmap, free_rx, job_tx));
        let hasher = s.spawn(move || hash_chunks(bmap, image_path, target, hash_rx, free_tx));
        let written = write_jobs(&dev, target, bmap.image_size, job_rx, hash_tx, report);
        let read = reader.join().unwrap_or_else(|_| bail!("the image reader panicked"));
        let hashed = hasher.join().unwrap_or_else(|_| bail!("the hasher panicked"));
        written.and(read).and(hashed)
    })?;
    dev.sync_all()
        .with_context(|| format!("flushing {} failed: the stick may be faulty", target.dev.display()))?;
    Ok(hash_busy)
}

/// The reader: data ranges in chunks and the gaps between them, in offset order.
fn read_jobs(
    image: &File,
    image_path: &Path,
    bmap: &Bmap,
    free: Receiver<Aligned>,
    jobs: SyncSender<Job>,
) -> Result<()> {
    let mut gaps = bmap.unmapped_spans().into_iter().peekable();
    for (index, range) in bmap.ranges.iter().enumerate() {
        let (start, len) = bmap.byte_span(range);
        while let Some((start, len)) = gaps.next_if(|g| g.0 < start) {
            if jobs.send(Job::Zero { start, len }).is_err() {
                return Ok(());
            }
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let at = start + done;
            // No buffer coming back: a later stage ended, and says why.
            let Ok(mut buf) = free.recv() else { return Ok(()) };
            image
                .read_exact_at(buf.get(n), at)
                .with_context(|| format!("cannot read {} at {at}", image_path.display()))?;
            done += n as u64;
            let chunk = Chunk { at, n, buf, range: index, last: done == len };
            if jobs.send(Job::Data(chunk)).is_err() {
                return Ok(());
            }
        }
    }
    for (start, len) in gaps {
        if jobs.send(Job::Zero { start, len }).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// The writer: each job in order, with the progress line; written chunks go to the hasher.
fn write_jobs(
    dev: &File,
    target: &Target,
    total: u64,
    jobs: Receiver<Job>,
    hashed: SyncSender<Chunk>,
    report: &mut FlashReport,
) -> Result<()> {
    let mut progress = Progress::new(total);
    let mut zeros = Aligned::zeroed(CHUNK);
    for job in jobs {
        match job {
            Job::Data(mut chunk) => {
                write_at(dev, target, chunk.buf.get(chunk.n), chunk.at)?;
                report.data_bytes += chunk.n as u64;
                progress.add(chunk.n as u64);
                if hashed.send(chunk).is_err() {
                    return Ok(());
                }
            }
            Job::Zero { start, len } => zero(dev, target, (start, len), &mut zeros, report, &mut progress)?,
        }
    }
    progress.finish();
    Ok(())
}

/// The hasher: the image's bytes of each range against its SHA256 in the block map.
fn hash_chunks(
    bmap: &Bmap,
    image_path: &Path,
    target: &Target,
    chunks: Receiver<Chunk>,
    free: SyncSender<Aligned>,
) -> Result<Duration> {
    let mut hasher = Sha256::new();
    let mut busy = Duration::ZERO;
    for mut chunk in chunks {
        let t = Instant::now();
        hasher.update(chunk.buf.get(chunk.n));
        if chunk.last {
            let range = &bmap.ranges[chunk.range];
            if format!("{:x}", hasher.finalize_reset()) != range.sha256 {
                bail!(
                    "{} does not match its block map at offset {} (blocks {}-{}): rebuild the image; \
                     {} now holds a partial image",
                    image_path.display(),
                    bmap.byte_span(range).0,
                    range.first,
                    range.last,
                    target.dev.display()
                );
            }
        }
        busy += t.elapsed();
        // The reader may have finished already: then nobody needs the buffer back.
        let _ = free.send(chunk.buf);
    }
    Ok(busy)
}

/// Zeroes a gap: the device's own write-zeroes when it has one (through fallocate, where the
/// kernel falls back to writing zero pages itself), else our zero buffer.
fn zero(
    dev: &File,
    target: &Target,
    (start, len): (u64, u64),
    zeros: &mut Aligned,
    report: &mut FlashReport,
    progress: &mut Progress,
) -> Result<()> {
    if zero_by_device(dev, target, start, len, progress)? {
        report.zeroed_by_device += len;
        return Ok(());
    }
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        write_at(dev, target, zeros.get(n), start + done)?;
        done += n as u64;
        progress.add(n as u64);
    }
    report.zeros_written += len;
    Ok(())
}

/// `FALLOC_FL_ZERO_RANGE` in chunks (progress moves, and a failure is placed within one
/// chunk); `false` when the device cannot do it at all.
fn zero_by_device(
    dev: &File,
    target: &Target,
    start: u64,
    len: u64,
    progress: &mut Progress,
) -> Result<bool> {
    let flags = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK as u64);
        let at = start + done;
        match rustix::fs::fallocate(dev, flags, at, n) {
            Ok(()) => {}
            Err(Errno::OPNOTSUPP | Errno::INVAL | Errno::NOSYS) if done == 0 => return Ok(false),
            Err(e) => {
                return Err(std::io::Error::from(e)).with_context(|| {
                    format!("zeroing {} failed at offset {at} (a {n}-byte span)", target.dev.display())
                })
            }
        }
        progress.add(n);
        done += n;
    }
    Ok(true)
}
