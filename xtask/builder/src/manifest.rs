//! The manifest beside the image: packages with versions and hashes, kernel, layout, LUKS
//! parameters and build options, test-only ones flagged. It holds nothing secret.

use std::path::PathBuf;

use anyhow::Result;
use cloister_image::assemble::ImageSummary;
use cloister_image::layout::Layout;
use cloister_image::luks::LuksInfo;
use cloister_image::manifest::{
    ArtifactEntry, BuildOptions, Manifest, PackageEntry, PartitionEntry, MANIFEST_FORMAT,
};
use cloister_rootfs::apt::FetchedDeb;

use crate::initrd::Initrd;
use crate::phases::Plan;
use crate::rootfs_phase::Rootfs;

pub struct Inputs<'a> {
    pub plan: &'a Plan,
    pub image: &'a ImageSummary,
    pub layout: &'a Layout,
    pub cmdline: &'a str,
    pub luks: &'a LuksInfo,
    pub rootfs: &'a Rootfs,
    pub initrd: &'a Initrd,
    pub uki_bytes: u64,
    pub min_ram_mib: u64,
    pub debs: &'a [FetchedDeb],
}

/// Writes `<image>.manifest.json` and returns its path.
pub fn write(i: &Inputs) -> Result<PathBuf> {
    let manifest = Manifest {
        format_version: MANIFEST_FORMAT,
        build: BuildOptions {
            test_options: !i.plan.test_options.is_empty(),
            kdf: i.plan.kdf,
            flags: i.plan.test_options.clone(),
        },
        kernel_version: i.rootfs.kernel_version.clone(),
        cmdline: i.cmdline.to_string(),
        partitions: vec![PartitionEntry::from(&i.layout.esp), PartitionEntry::from(&i.layout.root)],
        luks: i.luks.clone(),
        packages: i
            .debs
            .iter()
            .map(|d| PackageEntry {
                name: d.spec.name.clone(),
                version: d.spec.version.clone(),
                sha256: d.spec.sha256.clone(),
            })
            .collect(),
        image: ArtifactEntry { bytes: i.image.bytes, sha256: i.image.sha256.clone() },
        initramfs_bytes: i.initrd.bytes,
        initramfs_modules: i.initrd.modules.clone(),
        uki_bytes: i.uki_bytes,
        min_ram_mib: i.min_ram_mib,
    };
    let mut path = i.image.path.as_os_str().to_owned();
    path.push(".manifest.json");
    let path = PathBuf::from(path);
    manifest.write_json(&path)?;
    Ok(path)
}
