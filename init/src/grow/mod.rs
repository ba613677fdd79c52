//! First-boot growth of the root to the whole disk. Stage 1, once the root is unlocked and
//! mounted, grows the GPT on the root's disk (only that disk: the one the kernel says holds the
//! partition whose PARTUUID the command line names), then the kernel's idea of the partition
//! (BLKPG) and the open dm-crypt mapping (libcryptsetup). The mounted XFS grows later, in stage
//! 2, once [`fill`] has written ciphertext over the mapping's new area (see there why).
//! Each layer is compared with the one below it on every boot, so a boot cut short anywhere
//! finishes the job on the next boot, and a grown disk finds nothing to do.

pub mod fill;
mod table;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use libcryptsetup_rs::consts::flags::CryptActivate;
use libcryptsetup_rs::{CryptInit, LibcryptErr};

use crate::ioctl;

#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    #[error("{path}: {source}")]
    Sysfs { path: PathBuf, source: std::io::Error },
    #[error("{path}: unexpected contents {text:?}")]
    SysfsValue { path: PathBuf, text: String },
    #[error("open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("size of {path}: {source}")]
    Size { path: PathBuf, source: nix::Error },
    #[error("{disk}: {source}")]
    Table { disk: PathBuf, source: table::TableError },
    #[error("resize partition {number} of {disk} in the kernel: {source}")]
    Blkpg { disk: PathBuf, number: u32, source: nix::Error },
    #[error("load the volume key of {name} for resizing: {source}")]
    CryptKey { name: &'static str, source: LibcryptErr },
    #[error("resize dm-crypt mapping {name}: {source}")]
    CryptResize { name: &'static str, source: LibcryptErr },
    #[error("what is left to fill: {0}")]
    Fill(Box<fill::FillError>),
    #[error("xfs geometry of {path}: {source}")]
    XfsGeometry { path: PathBuf, source: nix::Error },
    #[error("grow xfs at {path} to {blocks} blocks: {source}")]
    XfsGrow { path: PathBuf, blocks: u64, source: nix::Error },
}

/// What the root is made of, as stage 1 knows it.
pub struct Root<'a> {
    /// The partition, e.g. `/dev/vda2`.
    pub partition: &'a Path,
    /// Its PARTUUID from the command line: the GPT entry must carry it.
    pub partuuid: &'a str,
    /// The dm-crypt mapping's name (`/dev/mapper/<name>`).
    pub mapping: &'static str,
    /// Where the XFS on the mapping is mounted.
    pub mountpoint: &'a Path,
}

/// What changed and what is left, for the console line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Grown {
    /// The partition's bytes before and after, when the GPT changed.
    pub partition: Option<(u64, u64)>,
    /// Bytes stage 2 still has to fill before XFS grows (0: only the growth is left); `None`
    /// when XFS already spans the mapping.
    pub to_fill: Option<u64>,
}

impl std::fmt::Display for Grown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.partition.is_none() && self.to_fill.is_none() {
            return f.write_str(cloister_proto::marker::GROW_NOTHING);
        }
        // A boot that finishes an interrupted grow may have only the upper layers left to do.
        let partition = match self.partition {
            Some((p0, p1)) => format!("{p0} -> {p1} bytes"),
            None => "unchanged".into(),
        };
        let rest = match self.to_fill {
            Some(n) => format!("{n} bytes to fill, then xfs grows"),
            None => "xfs unchanged".into(),
        };
        write!(f, "{} {partition}; {rest}", cloister_proto::marker::GROW)
    }
}

fn sysfs(path: PathBuf) -> Result<String, GrowError> {
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text.trim().to_owned()),
        Err(source) => Err(GrowError::Sysfs { path, source }),
    }
}

fn sysfs_u64(path: PathBuf) -> Result<u64, GrowError> {
    let text = sysfs(path.clone())?;
    text.parse().map_err(|_| GrowError::SysfsValue { path, text })
}

/// The kernel's view of a partition: its disk, number and size.
struct KernelPart {
    disk: PathBuf,
    sysfs_disk: PathBuf,
    number: u32,
    bytes: u64,
}

/// Finds the disk through sysfs: `/sys/class/block/<part>` resolves into its disk's directory.
fn kernel_part(partition: &Path) -> Result<KernelPart, GrowError> {
    let name = partition.file_name().unwrap_or_default();
    let link = Path::new("/sys/class/block").join(name);
    let dir =
        std::fs::canonicalize(&link).map_err(|source| GrowError::Sysfs { path: link.clone(), source })?;
    let number = sysfs_u64(dir.join("partition"))? as u32;
    let bytes = sysfs_u64(dir.join("size"))? * 512;
    let sysfs_disk = dir.parent().map(Path::to_owned).unwrap_or_default();
    let disk = Path::new("/dev").join(sysfs_disk.file_name().unwrap_or_default());
    Ok(KernelPart { disk, sysfs_disk, number, bytes })
}

fn open_rw(path: &Path) -> Result<File, GrowError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| GrowError::Open { path: path.to_owned(), source })
}

/// Grows the GPT, the partition and the mapping where they are smaller than the layer below,
/// and says what stage 2's fill has left. `passphrase` loads the volume key into the kernel
/// keyring, which libcryptsetup needs to reload a LUKS2 mapping's table.
pub fn run(root: &Root, passphrase: &[u8]) -> Result<Grown, GrowError> {
    let part = kernel_part(root.partition)?;
    let (partition, new_bytes) = grow_table(&part, root.partuuid)?;
    if new_bytes > part.bytes {
        let disk = open_rw(&part.disk)?;
        let start =
            sysfs_u64(part.sysfs_disk.join(root.partition.file_name().unwrap_or_default()).join("start"))?;
        ioctl::resize_partition(&disk, part.number as i32, start * 512, new_bytes)
            .map_err(|source| GrowError::Blkpg { disk: part.disk.clone(), number: part.number, source })?;
        resize_mapping(root.mapping, passphrase)?;
    }
    let work = fill::work_at(root.mountpoint).map_err(|e| GrowError::Fill(Box::new(e)))?;
    Ok(Grown { partition, to_fill: work.to_fill() })
}

/// The GPT step; returns the change and the partition's size the GPT now gives.
fn grow_table(part: &KernelPart, partuuid: &str) -> Result<(Option<(u64, u64)>, u64), GrowError> {
    let sector = sysfs_u64(part.sysfs_disk.join("queue/logical_block_size"))?;
    let f = open_rw(&part.disk)?;
    let disk_bytes =
        ioctl::device_bytes(&f).map_err(|source| GrowError::Size { path: part.disk.clone(), source })?;
    let err = |source| GrowError::Table { disk: part.disk.clone(), source };
    let gpt = table::read(&f, sector, disk_bytes / sector).map_err(err)?;
    match table::plan(&gpt, disk_bytes / sector, partuuid).map_err(err)? {
        None => Ok((None, part.bytes)),
        Some(plan) => {
            table::apply(&f, &gpt, &plan).map_err(err)?;
            let (old, new) = (plan.old_bytes(sector), plan.new_bytes(sector));
            Ok(((old != new).then_some((old, new)), new))
        }
    }
}

/// Reloads the mapping over the whole (grown) partition. A LUKS2 mapping's key lives in the
/// kernel keyring, not in its table, so libcryptsetup must be given the key again first (what
/// `cryptsetup resize` asks a passphrase for).
fn resize_mapping(name: &'static str, passphrase: &[u8]) -> Result<(), GrowError> {
    let mut device = CryptInit::init_by_name_and_header(name, None)
        .map_err(|source| GrowError::CryptResize { name, source })?;
    // A mapping whose key is in its table (no keyring in the kernel) resizes without it.
    if device.context_handle().resize(name, 0).is_ok() {
        return Ok(());
    }
    device
        .activate_handle()
        .activate_by_passphrase(None, None, passphrase, CryptActivate::KEYRING_KEY)
        .map_err(|source| GrowError::CryptKey { name, source })?;
    device.context_handle().resize(name, 0).map_err(|source| GrowError::CryptResize { name, source })
}

/// Grows the XFS mounted at `mountpoint` to `bytes` (the mapping's size) when that adds at
/// least one block; the data blocks before and after when it grew.
fn grow_xfs(mountpoint: &Path, bytes: u64) -> Result<Option<(u64, u64)>, GrowError> {
    let path = mountpoint.to_owned();
    let dir = File::open(&path).map_err(|source| GrowError::Open { path: path.clone(), source })?;
    let geometry = |dir: &File| {
        ioctl::xfs_geometry(dir).map_err(|source| GrowError::XfsGeometry { path: path.clone(), source })
    };
    let before = geometry(&dir)?;
    let blocks = bytes / u64::from(before.blocksize.max(1));
    if blocks <= before.datablocks {
        return Ok(None);
    }
    ioctl::xfs_grow_data(&dir, blocks, before.imaxpct).map_err(|source| GrowError::XfsGrow {
        path: path.clone(),
        blocks,
        source,
    })?;
    // XFS may leave out a last allocation group too small to hold its headers.
    let after = geometry(&dir)?;
    Ok((after.datablocks != before.datablocks).then_some((before.datablocks, after.datablocks)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines() {
        assert_eq!(Grown::default().to_string(), "cloister: grow: nothing to do");
        let g = Grown { partition: Some((1 << 30, 4 << 30)), to_fill: Some(3 << 30) };
        assert_eq!(
            g.to_string(),
            "cloister: grow: root partition 1073741824 -> 4294967296 bytes; 3221225472 bytes to fill, \
             then xfs grows"
        );
        let g = Grown { partition: None, to_fill: Some(0) };
        assert_eq!(
            g.to_string(),
            "cloister: grow: root partition unchanged; 0 bytes to fill, then xfs grows"
        );
        let g = Grown { partition: Some((1, 2)), to_fill: None };
        assert_eq!(g.to_string(), "cloister: grow: root partition 1 -> 2 bytes; xfs unchanged");
    }
}
