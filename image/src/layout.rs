//! The disk layout: where the ESP and the root partition start and end on a GPT disk of a given
//! size, and which GUIDs they carry. Pure arithmetic; [`crate::gpt`] writes it.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Logical block size of the image (what QEMU's virtio-blk and sfdisk assume for a file).
pub const LBA_BYTES: u64 = 512;
/// Partition starts are aligned to 1 MiB.
const ALIGN_LBAS: u64 = 1024 * 1024 / LBA_BYTES;
/// Backup GPT: 32 LBAs of entries plus the header in the last LBA.
const BACKUP_GPT_LBAS: u64 = 33;
/// The root partition's size is a multiple of this, so LUKS2 4096-byte sectors tile it.
const ROOT_GRANULE_LBAS: u64 = 4096 / LBA_BYTES;

/// EFI System Partition.
pub const ESP_TYPE: Uuid = uuid::uuid!("C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
/// Discoverable Partitions Specification: "Root Partition (x86-64)".
pub const ROOT_X86_64_TYPE: Uuid = uuid::uuid!("4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709");

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartPlan {
    pub first_lba: u64,
    /// Inclusive, as in the GPT entry.
    pub last_lba: u64,
    pub part_uuid: Uuid,
    pub type_guid: Uuid,
    pub name: String,
}

impl PartPlan {
    pub fn offset_bytes(&self) -> u64 {
        self.first_lba * LBA_BYTES
    }
    pub fn size_bytes(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * LBA_BYTES
    }
}

/// The GUIDs a layout uses; random by default, fixed in tests or for reproducible builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutUuids {
    pub disk: Uuid,
    pub esp: Uuid,
    pub root: Uuid,
}

impl LayoutUuids {
    pub fn random() -> Self {
        Self { disk: Uuid::new_v4(), esp: Uuid::new_v4(), root: Uuid::new_v4() }
    }
}

impl Default for LayoutUuids {
    fn default() -> Self {
        Self::random()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub disk_bytes: u64,
    pub esp: PartPlan,
    pub root: PartPlan,
    pub disk_guid: Uuid,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("esp size must be at least 1 MiB")]
    EspTooSmall,
    #[error("disk of {size_mib} MiB leaves no room for a root partition after a {esp_mib} MiB esp")]
    DiskTooSmall { size_mib: u64, esp_mib: u64 },
    #[error("disk size {size_mib} MiB is too large")]
    DiskTooLarge { size_mib: u64 },
}

impl Layout {
    /// Plans a `size_mib` disk: the ESP at 1 MiB, then the root partition filling the rest up
    /// to the backup GPT, its size rounded down to 4096 bytes.
    pub fn plan(size_mib: u64, esp_size_mib: u64, uuids: LayoutUuids) -> Result<Layout, LayoutError> {
        if esp_size_mib == 0 {
            return Err(LayoutError::EspTooSmall);
        }
        let total_lbas = size_mib.checked_mul(ALIGN_LBAS).ok_or(LayoutError::DiskTooLarge { size_mib })?;
        let esp_first = ALIGN_LBAS;
        let esp_last = esp_first + esp_size_mib * ALIGN_LBAS - 1;
        let root_first = (esp_last + 1).div_ceil(ALIGN_LBAS) * ALIGN_LBAS;
        let last_usable = total_lbas.saturating_sub(BACKUP_GPT_LBAS + 1);
        let too_small = LayoutError::DiskTooSmall { size_mib, esp_mib: esp_size_mib };
        if last_usable < root_first + ALIGN_LBAS {
            return Err(too_small);
        }
        let root_lbas = (last_usable + 1 - root_first) / ROOT_GRANULE_LBAS * ROOT_GRANULE_LBAS;
        let esp = PartPlan {
            first_lba: esp_first,
            last_lba: esp_last,
            part_uuid: uuids.esp,
            type_guid: ESP_TYPE,
            name: "ESP".into(),
        };
        let root = PartPlan {
            first_lba: root_first,
            last_lba: root_first + root_lbas - 1,
            part_uuid: uuids.root,
            type_guid: ROOT_X86_64_TYPE,
            name: "root-x86-64".into(),
        };
        Ok(Layout { disk_bytes: total_lbas * LBA_BYTES, esp, root, disk_guid: uuids.disk })
    }

    pub fn total_lbas(&self) -> u64 {
        self.disk_bytes / LBA_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(size_mib: u64, esp_mib: u64, expect: Result<(u64, u64, u64, u64), LayoutError>) {
        let got = Layout::plan(size_mib, esp_mib, LayoutUuids::random())
            .map(|l| (l.esp.first_lba, l.esp.last_lba, l.root.first_lba, l.root.last_lba));
        assert_eq!(got, expect, "plan({size_mib}, {esp_mib})");
    }

    #[test]
    fn plans_are_aligned_and_fill_the_disk() {
        // 64 MiB: 131072 LBAs, last usable 131038; root length rounded down to 8 LBAs.
        check(64, 16, Ok((2048, 34815, 34816, 34816 + (131039 - 34816) / 8 * 8 - 1)));
        check(1024, 64, Ok((2048, 133119, 133120, 133120 + (2097119 - 133120) / 8 * 8 - 1)));
        check(0, 16, Err(LayoutError::DiskTooSmall { size_mib: 0, esp_mib: 16 }));
        check(18, 16, Err(LayoutError::DiskTooSmall { size_mib: 18, esp_mib: 16 }));
        check(64, 0, Err(LayoutError::EspTooSmall));
    }

    #[test]
    fn partitions_do_not_overlap_and_stay_clear_of_backup_gpt() {
        for (size, esp) in [(19, 16), (100, 1), (470, 64), (4096, 256)] {
            let l = Layout::plan(size, esp, LayoutUuids::random()).unwrap();
            assert_eq!(l.esp.first_lba % ALIGN_LBAS, 0);
            assert_eq!(l.root.first_lba % ALIGN_LBAS, 0);
            assert!(l.esp.last_lba < l.root.first_lba);
            assert!(l.root.last_lba <= l.total_lbas() - 34);
            assert_eq!(l.root.size_bytes() % 4096, 0);
            assert!(l.total_lbas() - 34 - l.root.last_lba < ROOT_GRANULE_LBAS);
            assert_eq!(l.esp.size_bytes(), esp * 1024 * 1024);
        }
    }

    #[test]
    fn uuids_are_taken_as_given() {
        let u = LayoutUuids { disk: Uuid::from_u128(1), esp: Uuid::from_u128(2), root: Uuid::from_u128(3) };
        let l = Layout::plan(64, 16, u).unwrap();
        assert_eq!((l.disk_guid, l.esp.part_uuid, l.root.part_uuid), (u.disk, u.esp, u.root));
        assert_eq!(l.esp.type_guid, ESP_TYPE);
        assert_eq!(l.root.type_guid, ROOT_X86_64_TYPE);
    }
}
