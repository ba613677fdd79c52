//! Which device `cargo xtask flash` may write, decided from sysfs and procfs alone: a whole
//! disk, not holding any mounted file system or swap (through partitions, device-mapper, LUKS,
//! LVM and RAID stacks), not held by another driver, large enough, and removable or on USB
//! unless the user says otherwise. Every refusal names the device and the reason.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A device that passed every check, with what the user is shown before confirming.
#[derive(Debug)]
pub struct Target {
    pub dev: PathBuf,
    pub name: String,
    pub size: u64,
    pub logical_block: u64,
    pub info: Vec<(&'static str, String)>,
}

/// Runs every check on `path` for an image of `image_size` bytes.
pub fn inspect(path: &Path, image_size: u64, allow_fixed: bool) -> Result<Target> {
    let shown = path.display();
    let meta = std::fs::metadata(path).with_context(|| format!("refusing {shown}: cannot stat it"))?;
    if !meta.file_type().is_block_device() {
        bail!("refusing {shown}: not a block device ({})", kind(&meta));
    }
    let sys = sys_dir(meta.rdev()).with_context(|| format!("refusing {shown}: not in /sys/dev/block"))?;
    let name = file_name(&sys);
    let dev = PathBuf::from("/dev").join(&name);
    if sys.join("partition").exists() {
        let disk = sys.parent().map(file_name).unwrap_or_default();
        bail!("refusing {shown}: {name} is a partition, not a whole disk (the disk is /dev/{disk})");
    }
    if let Some(users) = busy_disks()?.get(&name) {
        let what = if users.iter().any(|u| u == "/") { "holds the running system" } else { "holds" };
        bail!("refusing {shown}: {name} {what}: mounted file systems or swap: {}", users.join(", "));
    }
    if let Some(holder) = holder_of(&sys) {
        bail!("refusing {shown}: {name} is in use by {holder} (device-mapper, LVM or RAID)");
    }
    let size = read_u64(&sys.join("size"))? * 512;
    if size < image_size {
        bail!("refusing {shown}: {name} has {} bytes, the image needs {image_size}", size);
    }
    if read_u64(&sys.join("ro"))? != 0 {
        bail!("refusing {shown}: {name} is read-only");
    }
    let removable = read_u64(&sys.join("removable"))? == 1;
    let usb = real_path(&sys).contains("/usb");
    if !removable && !usb && !allow_fixed {
        bail!(
            "refusing {shown}: {name} is neither removable nor on USB (an internal disk?); \
             pass --allow-fixed if you really mean it"
        );
    }
    let logical_block = read_u64(&sys.join("queue/logical_block_size")).unwrap_or(512).max(512);
    let info = describe(&sys, &name, size);
    Ok(Target { dev, name, size, logical_block, info })
}

fn kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else {
        "not a device"
    }
}

fn sys_dir(rdev: u64) -> Result<PathBuf> {
    let link = format!("/sys/dev/block/{}:{}", rustix::fs::major(rdev), rustix::fs::minor(rdev));
    std::fs::canonicalize(&link).with_context(|| format!("cannot resolve {link}"))
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn real_path(p: &Path) -> String {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.into()).to_string_lossy().into_owned()
}

fn read_u64(p: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    text.trim().parse().with_context(|| format!("{} is not a number: {text:?}", p.display()))
}

fn read_trim(p: &Path) -> Option<String> {
    let s = std::fs::read_to_string(p).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// Whole disk (and every block device on the way down) -> what uses it: each mount point and
/// swap area, followed from the device it lives on through partitions and `slaves/` links
/// (dm-crypt, LVM, RAID) down to the disks underneath.
pub fn busy_disks() -> Result<BTreeMap<String, Vec<String>>> {
    let mut users: Vec<(u64, String)> = Vec::new();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("cannot read mountinfo")?;
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let (Some(devno), Some(point)) = (f.get(2), f.get(4)) else { continue };
        let point = unescape(point);
        if let Some((maj, min)) = devno.split_once(':') {
            if let (Ok(maj), Ok(min)) = (maj.parse(), min.parse()) {
                users.push((rustix::fs::makedev(maj, min) as u64, point.clone()));
            }
        }
        // Multi-device file systems (btrfs) report an anonymous st_dev: also follow the source.
        let source = f.iter().skip_while(|x| **x != "-").nth(2).map(|s| unescape(s));
        if let Some(rdev) =
            source.and_then(|s| std::fs::metadata(s).ok()).filter(|m| m.file_type().is_block_device())
        {
            users.push((rdev.rdev(), point));
        }
    }
    let swaps = std::fs::read_to_string("/proc/swaps").context("cannot read /proc/swaps")?;
    for line in swaps.lines().skip(1) {
        let Some(file) = line.split_whitespace().next().map(unescape) else { continue };
        if let Ok(m) = std::fs::metadata(&file) {
            let dev = if m.file_type().is_block_device() { m.rdev() } else { m.dev() };
            users.push((dev, format!("swap {file}")));
        }
    }
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (dev, user) in users {
        let Ok(sys) = sys_dir(dev) else { continue };
        let mut names = Vec::new();
        below(&sys, &mut names, 0);
        for n in names {
            let list = out.entry(n).or_default();
            if !list.contains(&user) {
                list.push(user.clone());
            }
        }
    }
    Ok(out)
}

/// `sys` itself, its disk if it is a partition, and recursively what its `slaves/` name.
fn below(sys: &Path, out: &mut Vec<String>, depth: u32) {
    if depth > 16 {
        return;
    }
    out.push(file_name(sys));
    let disk = if sys.join("partition").exists() { sys.parent().unwrap_or(sys) } else { sys };
    out.push(file_name(disk));
    for dir in [sys, disk] {
        let Ok(slaves) = std::fs::read_dir(dir.join("slaves")) else { continue };
        for s in slaves.flatten() {
            if let Ok(real) = std::fs::canonicalize(Path::new("/sys/class/block").join(s.file_name())) {
                below(&real, out, depth + 1);
            }
        }
    }
}

/// A device-mapper or RAID device built on the disk or one of its partitions.
fn holder_of(sys: &Path) -> Option<String> {
    let mut dirs = vec![sys.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(sys) {
        dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.join("partition").exists()));
    }
    for dir in dirs {
        let Ok(mut holders) = std::fs::read_dir(dir.join("holders")) else { continue };
        if let Some(h) = holders.next().and_then(|h| h.ok()) {
            return Some(format!("{} (on {})", h.file_name().to_string_lossy(), file_name(&dir)));
        }
    }
    None
}

/// mountinfo and /proc/swaps write space, tab, newline and backslash as octal escapes.
fn unescape(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let octal =
            b.get(i + 1..i + 4).and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (b[i], octal) {
            (b'\\', Some(v)) => {
                out.push(v);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Vendor, model, size, serial and transport, as far as sysfs knows them.
fn describe(sys: &Path, name: &str, size: u64) -> Vec<(&'static str, String)> {
    let device = sys.join("device");
    let path = real_path(sys);
    let transport = if name.starts_with("loop") {
        let backing = read_trim(&sys.join("loop/backing_file")).unwrap_or_else(|| "none".into());
        format!("loop (backing file {backing})")
    } else if path.contains("/usb") {
        "usb".into()
    } else if name.starts_with("nvme") {
        "nvme".into()
    } else if name.starts_with("mmcblk") {
        "mmc/sd".into()
    } else if path.contains("/virtio") {
        "virtio".into()
    } else if path.contains("/ata") {
        "sata".into()
    } else {
        "unknown".into()
    };
    let unknown = || "-".to_string();
    vec![
        ("device", format!("/dev/{name}")),
        ("vendor", read_trim(&device.join("vendor")).unwrap_or_else(unknown)),
        ("model", read_trim(&device.join("model")).unwrap_or_else(unknown)),
        (
            "size",
            format!(
                "{size} bytes ({:.2} GB, {:.2} GiB)",
                size as f64 / 1e9,
                size as f64 / (1u64 << 30) as f64
            ),
        ),
        ("serial", serial(&device).unwrap_or_else(unknown)),
        ("transport", transport),
    ]
}

/// NVMe and some SCSI drivers put `serial` on the device; USB sticks have it on an ancestor.
fn serial(device: &Path) -> Option<String> {
    let mut dir = std::fs::canonicalize(device).ok()?;
    for _ in 0..8 {
        if let Some(s) = read_trim(&dir.join("serial")) {
            return Some(s);
        }
        if !dir.pop() {
            break;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/mnt/a\040b\134c"), "/mnt/a b\\c");
        assert_eq!(unescape(r"plain\x"), r"plain\x");
    }

    #[test]
    fn the_root_file_system_is_on_a_busy_disk() {
        let busy = busy_disks().unwrap();
        let root_users: Vec<&String> =
            busy.iter().filter(|(_, u)| u.iter().any(|m| m == "/")).map(|(n, _)| n).collect();
        // The root may be a virtual file system in a container; where it is a block device, its
        // disk must be listed.
        let root = std::fs::metadata("/").unwrap().dev();
        if let Ok(sys) = sys_dir(root) {
            assert!(root_users.contains(&&file_name(&sys)), "{busy:?}");
        }
    }
}
