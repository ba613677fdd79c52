//! Phase `initramfs`: stage 1 of our PID 1, the shared libraries it needs (taken from the
//! image's own packages, never the build host), and the kernel modules needed to reach an
//! encrypted root on virtio, SATA, NVMe or USB storage, in load order.

use std::path::Path;

use anyhow::{Context, Result};
use cloister_rootfs::initramfs::InitramfsBuilder;
use cloister_rootfs::modules::{self, ModuleIndex, ModulePath};
use cloister_rootfs::{deb, elf};

use cloister_proto::{LUKS_WARMUP_HEADER, MODULES_DISK_LIST, MODULES_UNLOCK_LIST};

use crate::rootfs_phase::Rootfs;

pub struct Initrd {
    pub bytes: u64,
    pub modules: Vec<String>,
}

pub fn build(rootfs: &Rootfs, init_bin: &Path, out: &Path) -> Result<Initrd> {
    let root = rootfs.tree.staging();
    let kver = &rootfs.kernel_version;
    let mut ar = InitramfsBuilder::new();
    for (link, target) in deb::MERGED_USR {
        ar.dir(target, 0o755)?;
        ar.symlink(link, *target)?;
    }
    for dir in ["proc", "sys", "dev", "run", "sysroot", "etc/cloister"] {
        ar.dir(dir, 0o755)?;
    }
    ar.base_devices()?;
    ar.file(cloister_proto::STAGE1_PATH.trim_start_matches('/'), init_bin, 0o755)?;
    for rel in elf::needed_closure_for_file(root, init_bin)? {
        ar.copy_from_root(root, &rel).with_context(|| format!("library {}", rel.display()))?;
    }
    let index = ModuleIndex::load(root, kver)?;
    // Both lists are grouped (`# group <name> <words>` lines, see `kmod::parse_groups` in init).
    // The disk list's groups load one after the other: each group's closure without what an
    // earlier group already loads. The unlock list's groups load at once, each on a thread of
    // its own and beside the disk list: each is a whole closure (a module in two is loaded by
    // whichever comes first, the other waits for it and gets EEXIST).
    let mut disk: Vec<ModulePath> = Vec::new();
    let mut disk_text = String::new();
    for group in modules::DISK_MODULE_GROUPS {
        disk_text.push_str(&group_mark(group));
        for m in index.closure(group.modules)? {
            if !disk.contains(&m) {
                disk_text.push_str(&format!("{}\n", m.rel.to_string_lossy()));
                disk.push(m);
            }
        }
    }
    let mut unlock: Vec<ModulePath> = Vec::new();
    let mut unlock_text = String::new();
    for group in modules::UNLOCK_MODULE_GROUPS {
        unlock_text.push_str(&group_mark(group));
        for m in index.closure(group.modules)? {
            unlock_text.push_str(&format!("{}\n", m.rel.to_string_lossy()));
            if !unlock.contains(&m) {
                unlock.push(m);
            }
        }
    }
    let modules_dir = modules::modules_dir_rel(root, kver);
    for m in disk.iter().chain(unlock.iter().filter(|m| !disk.contains(m))) {
        ar.copy_from_root(root, modules_dir.join(&m.rel))?;
    }
    ar.file_bytes(MODULES_DISK_LIST.trim_start_matches('/'), disk_text, 0o644)?;
    ar.file_bytes(MODULES_UNLOCK_LIST.trim_start_matches('/'), unlock_text, 0o644)?;
    let warmup = cloister_image::warmup_header(out.parent().unwrap_or(Path::new(".")))
        .context("LUKS2 warm-up header")?;
    ar.file_bytes(LUKS_WARMUP_HEADER.trim_start_matches('/'), warmup, 0o644)?;
    // systemd's convention for "this is an initramfs"; stage 1 also checks it.
    ar.file_bytes("etc/initrd-release", "NAME=Cloister\nID=cloister\n", 0o644)?;
    let bytes = ar.write(out)?;
    let mut names: Vec<String> = disk.into_iter().map(|m| m.name).collect();
    names.extend(unlock.into_iter().map(|m| m.name).filter(|n| !names.contains(n)).collect::<Vec<_>>());
    Ok(Initrd { bytes, modules: names })
}

fn group_mark(group: &modules::ModuleGroup) -> String {
    format!("# group {} {}\n", group.name, group.words.join(" ")).replace(" \n", "\n")
}
