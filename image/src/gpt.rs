//! Writes the partition table of a [`Layout`]: protective MBR, primary and backup GPT, with the
//! layout's exact LBAs and GUIDs (the `gpt` crate's own allocator is bypassed on purpose, so
//! the table matches the plan byte for byte).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use gpt::disk::LogicalBlockSize;
use gpt::mbr::ProtectiveMBR;
use gpt::partition::Partition;
use gpt::partition_types::{OperatingSystem, Type};

use crate::layout::{Layout, PartPlan};

#[derive(Debug, thiserror::Error)]
pub enum GptWriteError {
    #[error("{path}: image is {actual} bytes, layout expects {expected}")]
    SizeMismatch { path: PathBuf, actual: u64, expected: u64 },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("write protective mbr to {path}: {source}")]
    Mbr { path: PathBuf, source: gpt::mbr::MBRError },
    #[error("write gpt to {path}: {source}")]
    Gpt { path: PathBuf, source: gpt::GptError },
}

/// Writes the tables into `image` (already `layout.disk_bytes` long). `path` only names the
/// file in errors.
pub fn write_gpt(image: &mut File, path: &Path, layout: &Layout) -> Result<(), GptWriteError> {
    let actual = image.metadata().map_err(|source| GptWriteError::Io { path: path.into(), source })?.len();
    if actual != layout.disk_bytes {
        return Err(GptWriteError::SizeMismatch { path: path.into(), actual, expected: layout.disk_bytes });
    }
    let mbr_size = u32::try_from(layout.total_lbas() - 1).unwrap_or(u32::MAX);
    ProtectiveMBR::with_lb_size(mbr_size)
        .overwrite_lba0(image)
        .map_err(|source| GptWriteError::Mbr { path: path.into(), source })?;
    let gpt_err = |source| GptWriteError::Gpt { path: path.into(), source };
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(LogicalBlockSize::Lb512)
        .change_partition_count(true)
        .create_from_device(&mut *image, Some(layout.disk_guid))
        .map_err(gpt_err)?;
    let parts = BTreeMap::from([(1, entry(&layout.esp)), (2, entry(&layout.root))]);
    disk.update_partitions(parts).map_err(gpt_err)?;
    disk.write_inplace().map_err(gpt_err)?;
    image.sync_data().map_err(|source| GptWriteError::Io { path: path.into(), source })
}

fn entry(plan: &PartPlan) -> Partition {
    Partition {
        part_type_guid: Type { guid: plan.type_guid, os: OperatingSystem::None },
        part_guid: plan.part_uuid,
        first_lba: plan.first_lba,
        last_lba: plan.last_lba,
        flags: 0,
        name: plan.name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::LayoutUuids;
    use std::process::Command;
    use uuid::Uuid;

    #[test]
    fn sfdisk_reads_back_the_planned_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let uuids = LayoutUuids {
            disk: Uuid::parse_str("11111111-2222-4333-8444-555555555555").unwrap(),
            esp: Uuid::new_v4(),
            root: Uuid::new_v4(),
        };
        let layout = Layout::plan(100, 32, uuids).unwrap();
        let mut file =
            File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(layout.disk_bytes).unwrap();
        write_gpt(&mut file, &path, &layout).unwrap();

        let out = Command::new("sfdisk").arg("--json").arg(&path).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let table = &json["partitiontable"];
        assert_eq!(table["label"], "gpt");
        assert_eq!(table["id"].as_str().unwrap().to_lowercase(), uuids.disk.to_string());
        assert_eq!(table["firstlba"], 34);
        assert_eq!(table["lastlba"], layout.total_lbas() - 34);
        let parts = table["partitions"].as_array().unwrap();
        assert_eq!(parts.len(), 2);
        for (part, plan) in parts.iter().zip([&layout.esp, &layout.root]) {
            assert_eq!(part["start"], plan.first_lba);
            assert_eq!(part["size"], plan.last_lba + 1 - plan.first_lba);
            assert_eq!(part["type"].as_str().unwrap().to_lowercase(), plan.type_guid.to_string());
            assert_eq!(part["uuid"].as_str().unwrap().to_lowercase(), plan.part_uuid.to_string());
            assert_eq!(part["name"], plan.name.as_str());
        }
        let verify = Command::new("sfdisk").arg("--verify").arg(&path).output().unwrap();
        let text = String::from_utf8_lossy(&verify.stdout);
        assert!(verify.status.success(), "{text}{}", String::from_utf8_lossy(&verify.stderr));
        assert!(text.contains("No errors detected"), "{text}");
    }

    #[test]
    fn wrong_image_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let layout = Layout::plan(64, 16, LayoutUuids::random()).unwrap();
        let mut file =
            File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(layout.disk_bytes - 512).unwrap();
        let err = write_gpt(&mut file, &path, &layout).unwrap_err();
        assert!(matches!(err, GptWriteError::SizeMismatch { .. }), "{err}");
    }
}
