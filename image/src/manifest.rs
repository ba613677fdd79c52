//! The build manifest: what went into an image and how it was made, written next to it as JSON
//! so a user (or a test) can check an image without opening it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::layout::PartPlan;
use crate::luks::{KdfParams, LuksInfo};

pub const MANIFEST_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub build: BuildOptions,
    pub kernel_version: String,
    pub cmdline: String,
    pub partitions: Vec<PartitionEntry>,
    pub luks: LuksInfo,
    pub packages: Vec<PackageEntry>,
    pub image: ArtifactEntry,
    pub initramfs_bytes: u64,
    /// Kernel modules stage 1 loads, in load order.
    pub initramfs_modules: Vec<String>,
    pub uki_bytes: u64,
    /// RAM a target needs to unlock the root: the KDF's memory plus room for kernel and
    /// initramfs.
    pub min_ram_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildOptions {
    /// Test-only relaxations (weak KDF, test torrc lines...) are in this image.
    pub test_options: bool,
    pub kdf: KdfParams,
    /// Free-form switches the build was run with, for the record.
    pub flags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionEntry {
    pub name: String,
    pub type_guid: Uuid,
    pub uuid: Uuid,
    pub start_bytes: u64,
    pub size_bytes: u64,
}

impl From<&PartPlan> for PartitionEntry {
    fn from(p: &PartPlan) -> Self {
        Self {
            name: p.name.clone(),
            type_guid: p.type_guid,
            uuid: p.part_uuid,
            start_bytes: p.offset_bytes(),
            size_bytes: p.size_bytes(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageEntry {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactEntry {
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("serialise manifest: {0}")]
    Json(serde_json::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl Manifest {
    /// Pretty JSON with a final newline.
    pub fn write_json(&self, path: &Path) -> Result<(), ManifestError> {
        let mut text = serde_json::to_string_pretty(self).map_err(ManifestError::Json)?;
        text.push('\n');
        std::fs::write(path, text).map_err(|source| ManifestError::Io { path: path.into(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Layout, LayoutUuids};
    use crate::luks::PbkdfInfo;

    #[test]
    fn manifest_round_trips_through_json() {
        let layout = Layout::plan(470, 64, LayoutUuids::random()).unwrap();
        let kdf = KdfParams { memory_kib: 32768, time_ms: 100, iterations: Some(4), parallel: 1 };
        let m = Manifest {
            format_version: MANIFEST_FORMAT,
            build: BuildOptions { test_options: true, kdf, flags: vec!["--test".into()] },
            kernel_version: "6.1.0-56-amd64".into(),
            cmdline: "console=ttyS0".into(),
            partitions: vec![(&layout.esp).into(), (&layout.root).into()],
            luks: LuksInfo {
                uuid: Uuid::new_v4(),
                data_offset_bytes: 16 << 20,
                cipher: "aes-xts-plain64".into(),
                key_bits: 512,
                sector_size: 4096,
                pbkdf: PbkdfInfo { kind: "argon2id".into(), iterations: 4, memory_kib: 32768, parallel: 1 },
            },
            packages: vec![PackageEntry {
                name: "tor".into(),
                version: "0.4.9".into(),
                sha256: "ab".repeat(32),
            }],
            image: ArtifactEntry { bytes: layout.disk_bytes, sha256: "cd".repeat(32) },
            initramfs_bytes: 1,
            initramfs_modules: vec!["dm_crypt".into()],
            uki_bytes: 2,
            min_ram_mib: 288,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        m.write_json(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["luks"]["pbkdf"]["type"], "argon2id");
        assert_eq!(value["partitions"][1]["start_bytes"], layout.root.offset_bytes());
        assert_eq!(serde_json::from_str::<Manifest>(&text).unwrap(), m);
    }
}
