//! Finding the root partition: the block device whose GPT unique GUID equals the
//! `cloister.root=PARTUUID=` value. Disks appear asynchronously after their driver loads, so
//! stage 1 polls sysfs until the partition shows up or a timeout passes.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::gpt;

/// Where to look: sysfs block class and the device directory. Tests point these at a fake tree.
pub struct Paths {
    pub class_block: PathBuf,
    pub dev: PathBuf,
}

impl Default for Paths {
    fn default() -> Paths {
        Paths { class_block: PathBuf::from("/sys/class/block"), dev: PathBuf::from("/dev") }
    }
}

/// One block device seen during the scan, for the NO_ROOT report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub name: String,
    pub bytes: u64,
    pub partuuid: Option<String>,
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = self.bytes >> 20;
        match &self.partuuid {
            Some(u) => write!(f, "{} {} MiB PARTUUID={u}", self.name, mib),
            None => write!(f, "{} {} MiB", self.name, mib),
        }
    }
}

fn read_trim(path: &Path) -> Option<String> {
    Some(std::fs::read_to_string(path).ok()?.trim().to_owned())
}

/// Devices we never read a partition table from: reading a CD drive can block for seconds.
fn skip_disk(name: &str) -> bool {
    ["loop", "ram", "sr", "dm-", "zram", "md"].iter().any(|p| name.starts_with(p))
}

/// Reads the PARTUUIDs of a disk, keyed by partition number; None when it has no GPT.
fn disk_partuuids(paths: &Paths, disk: &str) -> Option<Vec<gpt::Entry>> {
    let sector: u64 =
        read_trim(&paths.class_block.join(disk).join("queue/logical_block_size"))?.parse().ok()?;
    let mut f = File::open(paths.dev.join(disk)).ok()?;
    let mut head = vec![0u8; sector as usize];
    f.seek(SeekFrom::Start(sector)).ok()?;
    f.read_exact(&mut head).ok()?;
    let header = gpt::parse_header(&head).ok()?;
    let mut array = vec![0u8; header.array_bytes()];
    f.seek(SeekFrom::Start(header.entries_lba.checked_mul(sector)?)).ok()?;
    f.read_exact(&mut array).ok()?;
    Some(gpt::parse_entries(&header, &array))
}

fn size_bytes(dir: &Path) -> u64 {
    read_trim(&dir.join("size")).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) * 512
}

/// Every disk and partition now visible, with the PARTUUID of each GPT partition.
pub fn scan(paths: &Paths) -> Vec<Seen> {
    let mut disks: Vec<String> = std::fs::read_dir(&paths.class_block)
        .map(|rd| rd.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned())).collect())
        .unwrap_or_default();
    disks.retain(|d| !paths.class_block.join(d).join("partition").exists());
    disks.sort();
    let mut seen = Vec::new();
    for disk in disks {
        let dir = paths.class_block.join(&disk);
        seen.push(Seen { name: disk.clone(), bytes: size_bytes(&dir), partuuid: None });
        let entries = if skip_disk(&disk) { None } else { disk_partuuids(paths, &disk) };
        let mut parts: Vec<(u32, String)> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(|e| {
                    let name = e.ok()?.file_name().to_string_lossy().into_owned();
                    let number = read_trim(&dir.join(&name).join("partition"))?.parse().ok()?;
                    Some((number, name))
                })
                .collect()
            })
            .unwrap_or_default();
        parts.sort();
        for (number, name) in parts {
            let partuuid = entries.as_ref().and_then(|es| es.iter().find(|e| e.number == number));
            let bytes = size_bytes(&dir.join(&name));
            seen.push(Seen { name, bytes, partuuid: partuuid.map(|e| e.partuuid.clone()) });
        }
    }
    seen
}

/// The device node of the partition with this PARTUUID (lowercase), if visible now.
pub fn find(paths: &Paths, partuuid: &str) -> Result<PathBuf, Vec<Seen>> {
    let seen = scan(paths);
    match seen.iter().find(|s| s.partuuid.as_deref() == Some(partuuid)) {
        Some(s) => Ok(paths.dev.join(&s.name)),
        None => Err(seen),
    }
}

/// Polls [`find`] every `every` until `timeout`; on timeout returns what the last scan saw.
pub fn wait_for(
    paths: &Paths,
    partuuid: &str,
    timeout: Duration,
    every: Duration,
) -> Result<PathBuf, Vec<Seen>> {
    let start = Instant::now();
    loop {
        match find(paths, partuuid) {
            Ok(dev) => return Ok(dev),
            Err(seen) if start.elapsed() >= timeout => return Err(seen),
            Err(_) => std::thread::sleep(every),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_tree(root: &Path) -> Paths {
        let paths = Paths { class_block: root.join("sys/class/block"), dev: root.join("dev") };
        let vda = paths.class_block.join("vda");
        std::fs::create_dir_all(vda.join("queue")).unwrap();
        std::fs::create_dir_all(vda.join("vda1")).unwrap();
        std::fs::create_dir_all(&paths.dev).unwrap();
        std::fs::write(vda.join("queue/logical_block_size"), "512\n").unwrap();
        std::fs::write(vda.join("size"), "16384\n").unwrap();
        std::fs::write(vda.join("vda1/partition"), "1\n").unwrap();
        std::fs::write(vda.join("vda1/size"), "4096\n").unwrap();
        std::os::unix::fs::symlink("vda/vda1", paths.class_block.join("vda1")).unwrap();
        let img = paths.dev.join("vda");
        std::fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
        let script = "label: gpt\nstart=2048, size=4096, type=L, uuid=12345678-9ABC-4DEF-8123-456789ABCDEF\n";
        crate::gpt::tests::sfdisk(&img, script);
        paths
    }

    #[test]
    fn finds_partition_by_partuuid_in_a_fake_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let paths = fake_tree(dir.path());
        assert_eq!(find(&paths, "12345678-9abc-4def-8123-456789abcdef"), Ok(paths.dev.join("vda1")));
    }

    #[test]
    fn timeout_reports_what_was_seen() {
        let dir = tempfile::tempdir().unwrap();
        let paths = fake_tree(dir.path());
        let seen = wait_for(&paths, "00000000-0000-4000-8000-000000000000", Duration::ZERO, Duration::ZERO)
            .unwrap_err();
        let lines: Vec<String> = seen.iter().map(ToString::to_string).collect();
        assert_eq!(lines, vec!["vda 8 MiB", "vda1 2 MiB PARTUUID=12345678-9abc-4def-8123-456789abcdef"]);
    }
}
