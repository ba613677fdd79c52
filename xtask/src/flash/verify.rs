//! The read-back of `cargo xtask flash`, after the device was flushed and only then (a stick
//! that fakes its capacity wraps late writes onto early blocks: reading each block right after
//! writing it would miss that). Every data range is read with O_DIRECT, so the page cache
//! cannot answer for the device, and compared byte for byte with the image, whose bytes the
//! write pass checked against the block map's SHA256 as it read them: the device matches the
//! map, for the cost of a comparison instead of a second SHA256 pass. The image must be the
//! file it was then (same inode, size, modification and change times), or nothing is claimed.
//! The zeroed gaps are sampled: each gap's first and last block and one block in every MiB must
//! read as zeros. A device reader thread runs ahead of the comparison.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use anyhow::{bail, Context, Result};

use super::{open_device, target::Target, Aligned, CHUNK};
use cloister_bmap::Bmap;

const DEPTH: usize = 3;
/// The sampled block of a gap: O_DIRECT's unit on any disk.
const SAMPLE: u64 = 4096;
/// One sample per this many bytes of gap.
const SAMPLE_EVERY: u64 = 1 << 20;

/// One read of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// `n` bytes at `at` of data range `range`.
    Data { at: u64, n: usize, range: usize },
    /// A block of a gap, which must be zeros.
    Gap { at: u64, n: usize },
}

/// What the read-back covered.
#[derive(Debug, Default, Clone, Copy)]
pub struct Verified {
    pub data_bytes: u64,
    pub gap_samples: u64,
}

/// Every read, in offset order.
fn reads(bmap: &Bmap, block: u64) -> Vec<Read> {
    let mut out = Vec::new();
    for (range, r) in bmap.ranges.iter().enumerate() {
        let (start, len) = bmap.byte_span(r);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK as u64);
            out.push(Read::Data { at: start + done, n: n as usize, range });
            done += n;
        }
    }
    for (start, len) in bmap.unmapped_spans() {
        out.extend(gap_samples(start, len, block));
    }
    out.sort_by_key(|r| match *r {
        Read::Data { at, .. } | Read::Gap { at, .. } => at,
    });
    out
}

/// The sampled blocks of one gap: its first and last block, and one at each MiB inside it,
/// each cut to the gap and aligned to `block` (the device's logical block size).
fn gap_samples(start: u64, len: u64, block: u64) -> Vec<Read> {
    let end = start + len;
    let mut at: Vec<u64> = (start.div_ceil(SAMPLE_EVERY)..end.div_ceil(SAMPLE_EVERY))
        .map(|m| m * SAMPLE_EVERY)
        .filter(|a| *a >= start && *a < end)
        .collect();
    at.push(start);
    at.push(end.saturating_sub(SAMPLE).max(start) / block * block);
    at.sort_unstable();
    at.dedup();
    at.into_iter()
        .filter(|a| *a >= start)
        .map(|a| Read::Gap { at: a, n: (end - a).min(SAMPLE) as usize })
        .filter(|r| matches!(r, Read::Gap { n, .. } if *n > 0))
        .collect()
}

/// Reads everything back and compares; an error names the first differing byte's offset.
pub fn verify(target: &Target, image: &File, bmap: &Bmap) -> Result<Verified> {
    let dev = open_device(target, false)?;
    let plan = reads(bmap, target.logical_block);
    let (free_tx, free_rx) = sync_channel::<Aligned>(DEPTH);
    for _ in 0..DEPTH {
        free_tx.send(Aligned::zeroed(CHUNK)).context("buffer pool")?;
    }
    let (read_tx, read_rx) = sync_channel::<(Read, Aligned)>(DEPTH);
    eprintln!("flash: reading back {} bytes of data and sampling the zeroed gaps", bmap.mapped_bytes());
    std::thread::scope(|s| {
        let plan = &plan;
        let reader = s.spawn(move || read_device(&dev, target, plan, free_rx, read_tx));
        let compared = compare(target, image, bmap, read_rx, free_tx);
        let read = reader.join().unwrap_or_else(|_| bail!("the device reader panicked"));
        // A comparison that failed is the news; a reader that failed ended the comparison.
        match (compared, read) {
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            (Ok(v), Ok(())) => Ok(v),
        }
    })
}

fn read_device(
    dev: &File,
    target: &Target,
    plan: &[Read],
    free: Receiver<Aligned>,
    out: SyncSender<(Read, Aligned)>,
) -> Result<()> {
    for read in plan {
        let Ok(mut buf) = free.recv() else { return Ok(()) };
        let (Read::Data { at, n, .. } | Read::Gap { at, n }) = *read;
        dev.read_exact_at(buf.get(n), at)
            .with_context(|| format!("read-back of {} failed at offset {at}", target.dev.display()))?;
        if out.send((*read, buf)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

fn compare(
    target: &Target,
    image: &File,
    bmap: &Bmap,
    reads: Receiver<(Read, Aligned)>,
    free: SyncSender<Aligned>,
) -> Result<Verified> {
    let mut mine = Aligned::zeroed(CHUNK);
    let mut done = Verified::default();
    for (read, mut buf) in reads {
        match read {
            Read::Data { at, n, range } => {
                let ours = mine.get(n);
                image.read_exact_at(ours, at).with_context(|| format!("cannot re-read the image at {at}"))?;
                if let Some(i) = first_difference(buf.get(n), ours) {
                    let r = &bmap.ranges[range];
                    bail!(
                        "verify failed: {} differs from the image at offset {} (in blocks {}-{}): \
                         the stick is faulty or was changed while writing",
                        target.dev.display(),
                        at + i as u64,
                        r.first,
                        r.last
                    );
                }
                done.data_bytes += n as u64;
            }
            Read::Gap { at, n } => {
                if let Some(i) = buf.get(n).iter().position(|b| *b != 0) {
                    bail!(
                        "verify failed: {} holds data at offset {} where the image has zeros: \
                         the stick did not keep the zeroing",
                        target.dev.display(),
                        at + i as u64
                    );
                }
                done.gap_samples += 1;
            }
        }
        let _ = free.send(buf);
    }
    Ok(done)
}

/// Where `a` and `b` first differ: compared in 4 KiB blocks (a memcmp each), then bytes.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    let block = a.chunks(4096).zip(b.chunks(4096)).position(|(x, y)| x != y)?;
    let (x, y) = (&a[block * 4096..], &b[block * 4096..]);
    x.iter().zip(y).position(|(p, q)| p != q).map(|i| block * 4096 + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_sampled_at_their_ends_and_every_mib() {
        const MIB: u64 = 1 << 20;
        let at = |v: Vec<Read>| -> Vec<(u64, usize)> {
            v.into_iter().map(|r| if let Read::Gap { at, n } = r { (at, n) } else { (0, 0) }).collect()
        };
        assert_eq!(at(gap_samples(512, 1024, 512)), [(512, 1024)]);
        assert_eq!(
            at(gap_samples(MIB / 2, 2 * MIB, 512)),
            [(MIB / 2, 4096), (MIB, 4096), (2 * MIB, 4096), (MIB / 2 + 2 * MIB - 4096, 4096)]
        );
        assert_eq!(
            at(gap_samples(0, 3 * MIB, 4096)),
            [(0, 4096), (MIB, 4096), (2 * MIB, 4096), (3 * MIB - 4096, 4096)]
        );
    }

    #[test]
    fn first_difference_finds_the_byte() {
        let a = vec![7u8; 3 * 4096 + 10];
        let mut b = a.clone();
        assert_eq!(first_difference(&a, &b), None);
        b[2 * 4096 + 17] = 0;
        assert_eq!(first_difference(&a, &b), Some(2 * 4096 + 17));
        b[5] = 1;
        assert_eq!(first_difference(&a, &b), Some(5));
    }
}
