//! The GPT half of first-boot growth, on any `File` (a disk, or an image file in tests): read and
//! check a GPT, plan the move of the backup to the disk's end and the growth of the root entry,
//! and write it in an order that survives a power cut.
//!
//! Write order, and why a cut at any point is safe:
//! 1. the new backup (entries, then header) at the disk's end, then sync. This area lies beyond
//!    the old last usable LBA, so no partition owns it; the primary still describes the old
//!    layout and still points at the old backup, which is untouched: both old headers stay valid.
//! 2. the primary header and its entries up to the root's entry as one write starting at LBA 1,
//!    then sync. Before it the old primary is valid; after it the new one is. If a cut tears this
//!    write, the primary's CRCs fail and the new backup at the disk's last LBA (valid, and the
//!    partition in it is the grown one) is what UEFI and util-linux read; the next boot's
//!    [`read`] falls back to it and step 2 rewrites the primary from it. (Linux itself ignores
//!    a bad primary unless booted with `gpt`: on a USB stick, whose flash page holds LBA 1 and 2
//!    together, the torn write is not expected in practice.)
//! 3. hygiene: the old backup header is zeroed (it now lies inside the grown partition, so a
//!    recovery tool must not find it) and the protective MBR is made to cover the disk. Neither
//!    matters for validity.
//!
//! The root entry's last LBA only ever grows: the plan takes the larger of the old and the new.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::gpt::format_guid;

/// GPT "EFI PART" signature.
const SIGNATURE: &[u8; 8] = b"EFI PART";
/// Partitions end on a 1 MiB boundary, as the build lays them out.
const ALIGN_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("read {what} at lba {lba}: {source}")]
    Read { what: &'static str, lba: u64, source: std::io::Error },
    #[error("write {what} at lba {lba}: {source}")]
    Write { what: &'static str, lba: u64, source: std::io::Error },
    #[error("sync after writing {0}: {1}")]
    Sync(&'static str, std::io::Error),
    #[error("neither the primary gpt nor the backup at lba {0} is valid")]
    NoValidGpt(u64),
    #[error("no gpt entry has partuuid {0}")]
    NoEntry(String),
    #[error("partition {0} is not the last one: cannot grow it")]
    NotLast(u32),
    #[error("disk of {0} sectors is smaller than its gpt says")]
    DiskShrank(u64),
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// A GPT as read from one of its two copies: the header sector and the whole entry array.
#[derive(Debug, Clone)]
pub struct Gpt {
    pub sector: u64,
    header: Vec<u8>,
    entries: Vec<u8>,
    /// Read from the backup because the primary was damaged: the primary must be rewritten.
    from_backup: bool,
}

impl Gpt {
    pub fn alternate_lba(&self) -> u64 {
        le64(&self.header, 32)
    }
    pub fn last_usable(&self) -> u64 {
        le64(&self.header, 48)
    }
    fn my_lba(&self) -> u64 {
        le64(&self.header, 24)
    }
    fn entries_lba(&self) -> u64 {
        le64(&self.header, 72)
    }
    fn entry_size(&self) -> usize {
        le32(&self.header, 84) as usize
    }
    fn entry_sectors(&self) -> u64 {
        (self.entries.len() as u64).div_ceil(self.sector)
    }
    fn entry(&self, i: usize) -> &[u8] {
        &self.entries[i * self.entry_size()..(i + 1) * self.entry_size()]
    }
    fn count(&self) -> usize {
        self.entries.len() / self.entry_size()
    }

    /// The header with new placement and its CRCs recomputed.
    fn header_for(&self, my_lba: u64, alt_lba: u64, last_usable: u64, entries_lba: u64) -> Vec<u8> {
        let mut h = self.header.clone();
        put64(&mut h, 24, my_lba);
        put64(&mut h, 32, alt_lba);
        put64(&mut h, 48, last_usable);
        put64(&mut h, 72, entries_lba);
        put32(&mut h, 88, crc32fast::hash(&self.entries));
        seal(&mut h);
        h
    }
}

/// Sets the header CRC over `header_size` bytes, computed with the CRC field zeroed.
fn seal(h: &mut [u8]) {
    let size = le32(h, 12) as usize;
    put32(h, 16, 0);
    let crc = crc32fast::hash(&h[..size]);
    put32(h, 16, crc);
}

fn read_at(f: &File, what: &'static str, lba: u64, sector: u64, len: usize) -> Result<Vec<u8>, TableError> {
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, lba * sector).map_err(|source| TableError::Read { what, lba, source })?;
    Ok(buf)
}

fn write_at(f: &File, what: &'static str, lba: u64, sector: u64, buf: &[u8]) -> Result<(), TableError> {
    f.write_all_at(buf, lba * sector).map_err(|source| TableError::Write { what, lba, source })
}

/// Reads the header at `lba` and its entries; None unless the signature, both CRCs, the header's
/// own LBA and the array's size are right.
fn read_copy(f: &File, lba: u64, sector: u64) -> Result<Option<Gpt>, TableError> {
    let mut header = read_at(f, "gpt header", lba, sector, sector as usize)?;
    let size = le32(&header, 12) as usize;
    if &header[..8] != SIGNATURE || size < 92 || size > header.len() || le64(&header, 24) != lba {
        return Ok(None);
    }
    let crc = le32(&header, 16);
    put32(&mut header, 16, 0);
    if crc32fast::hash(&header[..size]) != crc {
        return Ok(None);
    }
    put32(&mut header, 16, crc);
    let (count, esize) = (le32(&header, 80) as usize, le32(&header, 84) as usize);
    if !(128..=4096).contains(&esize) || count == 0 || count * esize > 1 << 20 {
        return Ok(None);
    }
    let entries = read_at(f, "gpt entries", le64(&header, 72), sector, count * esize)?;
    if crc32fast::hash(&entries) != le32(&header, 88) {
        return Ok(None);
    }
    Ok(Some(Gpt { sector, header, entries, from_backup: false }))
}

/// The primary GPT, or when it is damaged (a torn write) the backup at the disk's last LBA,
/// turned into the primary's shape so that [`apply`] rewrites the primary from it.
pub fn read(f: &File, sector: u64, disk_sectors: u64) -> Result<Gpt, TableError> {
    if let Some(gpt) = read_copy(f, 1, sector)? {
        return Ok(gpt);
    }
    let last = disk_sectors.saturating_sub(1);
    let mut backup = read_copy(f, last, sector)?.ok_or(TableError::NoValidGpt(last))?;
    backup.header = backup.header_for(1, last, backup.last_usable(), 2);
    backup.from_backup = true;
    Ok(backup)
}

/// What growing changes, in LBAs of `Gpt::sector` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Index into the entry array (partition number - 1).
    pub index: usize,
    pub first_lba: u64,
    pub old_last: u64,
    pub new_last: u64,
    pub old_alternate: u64,
    pub new_alternate: u64,
    pub new_last_usable: u64,
}

impl Plan {
    pub fn old_bytes(&self, sector: u64) -> u64 {
        (self.old_last + 1 - self.first_lba) * sector
    }
    pub fn new_bytes(&self, sector: u64) -> u64 {
        (self.new_last + 1 - self.first_lba) * sector
    }
}

/// The plan for a disk of `disk_sectors`, or None when the GPT already spans it and the entry
/// `partuuid` already ends at the last aligned usable LBA.
pub fn plan(gpt: &Gpt, disk_sectors: u64, partuuid: &str) -> Result<Option<Plan>, TableError> {
    let used = |e: &[u8]| e[..16].iter().any(|&b| b != 0);
    let index = (0..gpt.count())
        .find(|&i| used(gpt.entry(i)) && format_guid(&gpt.entry(i)[16..32]).eq_ignore_ascii_case(partuuid))
        .ok_or_else(|| TableError::NoEntry(partuuid.to_owned()))?;
    let entry = gpt.entry(index);
    let (first_lba, old_last) = (le64(entry, 32), le64(entry, 40));
    let later =
        (0..gpt.count()).any(|i| i != index && used(gpt.entry(i)) && le64(gpt.entry(i), 32) > first_lba);
    let new_alternate = disk_sectors.saturating_sub(1);
    let new_last_usable = new_alternate.saturating_sub(gpt.entry_sectors() + 1);
    if new_last_usable < gpt.last_usable() || new_last_usable < old_last {
        return Err(TableError::DiskShrank(disk_sectors));
    }
    let align = (ALIGN_BYTES / gpt.sector).max(1);
    let new_last = ((new_last_usable + 1) / align * align).saturating_sub(1).max(old_last);
    if new_last > old_last && later {
        return Err(TableError::NotLast(index as u32 + 1));
    }
    let moved =
        gpt.from_backup || gpt.alternate_lba() != new_alternate || gpt.last_usable() != new_last_usable;
    if new_last == old_last && !moved {
        return Ok(None);
    }
    Ok(Some(Plan {
        index,
        first_lba,
        old_last,
        new_last,
        old_alternate: gpt.alternate_lba(),
        new_alternate,
        new_last_usable,
    }))
}

/// Writes `plan` in the order the module documentation argues for; returns the new GPT.
pub fn apply(f: &File, gpt: &Gpt, plan: &Plan) -> Result<Gpt, TableError> {
    let s = gpt.sector;
    let mut new = gpt.clone();
    new.from_backup = false;
    let at = plan.index * gpt.entry_size();
    put64(&mut new.entries[at..], 40, plan.new_last);
    // 1. The backup, entries first, so that its header never describes entries not yet written.
    let backup_entries = plan.new_alternate - gpt.entry_sectors();
    let backup = new.header_for(plan.new_alternate, 1, plan.new_last_usable, backup_entries);
    write_at(f, "backup gpt entries", backup_entries, s, &new.entries)?;
    write_at(f, "backup gpt header", plan.new_alternate, s, &backup)?;
    f.sync_data().map_err(|e| TableError::Sync("the backup gpt", e))?;
    // 2. The primary: header and entries through the root's entry in one write from LBA 1.
    new.header = new.header_for(1, plan.new_alternate, plan.new_last_usable, gpt.entries_lba());
    let mut primary = new.header.clone();
    if gpt.entries_lba() == 2 {
        let through = (at + gpt.entry_size()).div_ceil(s as usize) * s as usize;
        primary.extend_from_slice(&new.entries[..through]);
        write_at(f, "primary gpt", 1, s, &primary)?;
    } else {
        write_at(f, "primary gpt entries", gpt.entries_lba(), s, &new.entries)?;
        write_at(f, "primary gpt header", 1, s, &primary)?;
    }
    f.sync_data().map_err(|e| TableError::Sync("the primary gpt", e))?;
    tidy(f, gpt, plan)?;
    Ok(new)
}

/// Step 3: zero the old backup header (inside the grown partition now) and let the protective
/// MBR cover the whole disk.
fn tidy(f: &File, gpt: &Gpt, plan: &Plan) -> Result<(), TableError> {
    let s = gpt.sector;
    if plan.old_alternate != plan.new_alternate && plan.old_alternate > gpt.my_lba() {
        write_at(f, "old backup gpt header", plan.old_alternate, s, &vec![0u8; s as usize])?;
    }
    let mut mbr = read_at(f, "protective mbr", 0, s, 512)?;
    if mbr[510..512] == [0x55, 0xaa] && mbr[446 + 4] == 0xee {
        let sectors = u32::try_from(plan.new_alternate).unwrap_or(u32::MAX);
        put32(&mut mbr, 446 + 12, sectors);
        write_at(f, "protective mbr", 0, s, &mbr)?;
    }
    f.sync_data().map_err(|e| TableError::Sync("the protective mbr", e))
}

#[cfg(test)]
mod tests;
