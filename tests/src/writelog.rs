//! QEMU's `blklogwrites` log of every write a guest made to its disk (dm-log-writes' format:
//! a super block, then per request one entry sector followed by the written data), replayed on
//! the host. Replaying a prefix of the log onto the disk as it was before the boot gives the
//! disk as a power cut after that request would have left it, so one boot shows every cut
//! point. Only a region of interest (a LUKS header area, say) is replayed: the rest of the disk
//! does not decide whether it opens.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

const MAGIC: u64 = 0x006a_7366_7773_6872; // "rhswfsj"
const VERSION: u64 = 1;
const FLUSH: u64 = 1 << 0;
const FUA: u64 = 1 << 1;
const DISCARD: u64 = 1 << 2;
const MARK: u64 = 1 << 3;

/// One logged request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Where on the guest's disk, in bytes.
    pub disk: Range<u64>,
    pub kind: Kind,
    /// Where its data starts in the log file (writes only).
    log_offset: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Write,
    Discard,
    Flush,
}

/// The entries of a log, in the order QEMU completed them, up to the last flush it recorded in
/// the super block (a log read while the VM runs may end in a half-written entry).
#[derive(Debug)]
pub struct WriteLog {
    file: File,
    pub entries: Vec<Entry>,
}

impl WriteLog {
    pub fn open(path: &Path) -> Result<WriteLog> {
        let mut file = File::open(path).with_context(|| format!("open {}", path.display()))?;
        let mut sb = [0u8; 28];
        file.read_exact(&mut sb).with_context(|| format!("{}: no super block", path.display()))?;
        let word = |at: usize| u64::from_le_bytes(sb[at..at + 8].try_into().unwrap_or_default());
        ensure!(word(0) == MAGIC, "{}: not a blklogwrites log (magic {:#x})", path.display(), word(0));
        ensure!(word(8) == VERSION, "{}: log version {}", path.display(), word(8));
        let count = word(16);
        let sector = u64::from(u32::from_le_bytes(sb[24..28].try_into().unwrap_or_default()));
        ensure!(sector.is_power_of_two() && sector >= 32, "{}: log sector size {sector}", path.display());
        let length = file.metadata()?.len();
        let mut entries = Vec::new();
        let mut at = sector;
        for index in 0..count {
            let mut head = [0u8; 32];
            file.seek(SeekFrom::Start(at))?;
            file.read_exact(&mut head).with_context(|| format!("entry {index} at {at}: cut short"))?;
            let field = |i: usize| u64::from_le_bytes(head[i * 8..i * 8 + 8].try_into().unwrap_or_default());
            let (start, sectors, flags) = (field(0) * sector, field(1) * sector, field(2));
            ensure!(flags & !(FLUSH | FUA | DISCARD | MARK) == 0, "entry {index}: flags {flags:#x}");
            let kind = match flags {
                f if f & DISCARD != 0 => Kind::Discard,
                f if f & FLUSH != 0 && sectors == 0 => Kind::Flush,
                _ => Kind::Write,
            };
            let log_offset = at + sector;
            at = log_offset + if kind == Kind::Write { sectors } else { 0 };
            if at > length {
                bail!("entry {index}: its data runs past the end of the log");
            }
            entries.push(Entry { disk: start..start + sectors, kind, log_offset });
        }
        Ok(WriteLog { file, entries })
    }

    /// The data `entry` wrote (empty for a discard or a flush).
    pub fn data(&mut self, entry: &Entry) -> Result<Vec<u8>> {
        if entry.kind != Kind::Write {
            return Ok(Vec::new());
        }
        let mut data = vec![0u8; usize::try_from(entry.disk.end - entry.disk.start)?];
        self.file.seek(SeekFrom::Start(entry.log_offset))?;
        self.file.read_exact(&mut data)?;
        Ok(data)
    }

    /// The entries that change bytes in `region` of the disk.
    pub fn touching(&self, region: &Range<u64>) -> Vec<Entry> {
        self.entries
            .iter()
            .filter(|e| e.kind != Kind::Flush && e.disk.start < region.end && region.start < e.disk.end)
            .cloned()
            .collect()
    }
}

/// `region` of the disk, as a buffer that entries are applied to one by one.
#[derive(Clone)]
pub struct Replay {
    region: Range<u64>,
    pub bytes: Vec<u8>,
}

impl Replay {
    /// Starts from `region` of `disk` (the image as it was before the logged boot).
    pub fn from_disk(disk: &Path, region: Range<u64>) -> Result<Replay> {
        let mut bytes = vec![0u8; usize::try_from(region.end - region.start)?];
        let mut file = File::open(disk).with_context(|| format!("open {}", disk.display()))?;
        file.seek(SeekFrom::Start(region.start))?;
        file.read_exact(&mut bytes).with_context(|| format!("read {:?} of {}", region, disk.display()))?;
        Ok(Replay { region, bytes })
    }

    /// Applies the first `upto` bytes of an entry's data (all of it for `None`); a discard
    /// reads back as zeros, as on QEMU's sparse raw files. Returns the bytes changed.
    pub fn apply(&mut self, entry: &Entry, data: &[u8], upto: Option<u64>) -> u64 {
        let len = entry.disk.end - entry.disk.start;
        let end = entry.disk.start + upto.map_or(len, |u| u.min(len));
        let (from, to) = (entry.disk.start.max(self.region.start), end.min(self.region.end));
        if from >= to {
            return 0;
        }
        let dst = (from - self.region.start) as usize..(to - self.region.start) as usize;
        match entry.kind {
            Kind::Write => {
                let src = (from - entry.disk.start) as usize..(to - entry.disk.start) as usize;
                self.bytes[dst].copy_from_slice(&data[src]);
            }
            Kind::Discard => self.bytes[dst].fill(0),
            Kind::Flush => return 0,
        }
        to - from
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A log as QEMU writes it: super block, then entry sectors each followed by their data.
    fn log(entries: &[(u64, u64, u64, &[u8])], recorded: u64) -> Vec<u8> {
        let mut out = vec![0u8; 512];
        out[..8].copy_from_slice(&MAGIC.to_le_bytes());
        out[8..16].copy_from_slice(&VERSION.to_le_bytes());
        out[16..24].copy_from_slice(&recorded.to_le_bytes());
        out[24..28].copy_from_slice(&512u32.to_le_bytes());
        for (sector, sectors, flags, data) in entries {
            let mut head = vec![0u8; 512];
            head[..8].copy_from_slice(&sector.to_le_bytes());
            head[8..16].copy_from_slice(&sectors.to_le_bytes());
            head[16..24].copy_from_slice(&flags.to_le_bytes());
            out.extend(head);
            out.extend_from_slice(data);
        }
        out
    }

    #[test]
    fn entries_replay_in_order_and_only_inside_the_region() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (vec![0xaa; 1024], vec![0xbb; 512]);
        let bytes = log(&[(2, 2, 0, &a), (0, 0, FLUSH, &[]), (3, 1, FUA, &b), (1, 2, DISCARD, &[])], 4);
        let path = dir.path().join("log");
        File::create(&path).unwrap().write_all(&bytes).unwrap();
        let disk = dir.path().join("disk");
        std::fs::write(&disk, vec![0x11; 8 * 512]).unwrap();

        let mut wl = WriteLog::open(&path).unwrap();
        let kinds: Vec<Kind> = wl.entries.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [Kind::Write, Kind::Flush, Kind::Write, Kind::Discard]);
        assert_eq!(wl.entries[0].disk, 1024..2048);
        let region = 512..2048;
        let touching = wl.touching(&region);
        assert_eq!(touching.len(), 3, "the flush changes nothing");
        let mut replay = Replay::from_disk(&disk, region).unwrap();
        let first = wl.data(&touching[0]).unwrap();
        assert_eq!(replay.apply(&touching[0], &first, Some(512)), 512, "a torn write: its first sector");
        assert_eq!(&replay.bytes[512..1024], &[0xaa; 512][..]);
        assert_eq!(&replay.bytes[1024..], &[0x11; 512][..]);
        replay.apply(&touching[0], &first, None);
        let second = wl.data(&touching[1]).unwrap();
        replay.apply(&touching[1], &second, None);
        assert_eq!(&replay.bytes[1024..], &[0xbb; 512][..]);
        replay.apply(&touching[2], &[], None);
        assert_eq!(&replay.bytes[..], &[&[0u8; 1024][..], &[0xbb; 512][..]].concat()[..]);
    }

    /// Entries past the super block's count are a log still being written: left out.
    #[test]
    fn only_recorded_entries_count_and_a_short_log_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let data = vec![1u8; 512];
        std::fs::write(&path, log(&[(0, 1, 0, &data), (1, 1, 0, &data)], 1)).unwrap();
        assert_eq!(WriteLog::open(&path).unwrap().entries.len(), 1);
        let mut short = log(&[(0, 1, 0, &data)], 1);
        short.truncate(short.len() - 100);
        std::fs::write(&path, short).unwrap();
        assert!(WriteLog::open(&path).is_err());
        std::fs::write(&path, vec![0u8; 512]).unwrap();
        assert!(WriteLog::open(&path).unwrap_err().to_string().contains("not a blklogwrites log"));
    }
}
