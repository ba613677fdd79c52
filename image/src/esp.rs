//! The EFI System Partition: a FAT file system written straight into its byte range of the
//! image file with mtools (`mformat`/`mmd`/`mcopy -i FILE@@OFFSET`). The host kernel has no
//! vfat and nothing is mounted. Not the `fatfs` crate: its latest release (0.3.6) writes LFN
//! entries in front of every directory's `.` and `..` and a wrong `..` cluster on FAT32, which
//! `fsck.fat` reports as corruption (fixed only in its unreleased master).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// FAT32 is what UEFI firmware must read; below this, FAT32 cannot reach its minimum cluster
/// count, so mformat picks FAT16/FAT12.
const FAT32_MIN_BYTES: u64 = 64 * 1024 * 1024;
const SECTOR: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum EspError {
    #[error("esp range {offset}+{size} must be whole MiB")]
    BadRange { offset: u64, size: u64 },
    #[error("esp destination {0:?} is not a relative path of plain names")]
    BadDest(String),
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("run {tool} on {image}: {source}; install mtools")]
    Spawn { tool: &'static str, image: PathBuf, source: io::Error },
    #[error("{tool} {what} on {image} failed: {stderr}")]
    Tool { tool: &'static str, what: String, image: PathBuf, stderr: String },
}

/// Formats `size` bytes at `offset` of `image` (label "ESP") and copies each `(dest, source)`
/// in, `dest` like `EFI/BOOT/BOOTX64.EFI`, creating directories as needed.
pub fn write_esp(image: &Path, offset: u64, size: u64, files: &[(&str, &Path)]) -> Result<(), EspError> {
    const MIB: u64 = 1024 * 1024;
    if !offset.is_multiple_of(MIB) || !size.is_multiple_of(MIB) || size == 0 {
        return Err(EspError::BadRange { offset, size });
    }
    let mut target = image.as_os_str().to_owned();
    target.push(format!("@@{offset}"));
    let fat = Fat { image, target };
    // 64 heads x 32 sectors = 1 MiB cylinders, so whole-MiB ranges have no partial cylinder.
    let mut args: Vec<OsString> = ["-T".into(), (size / SECTOR).to_string().into()].into();
    args.extend(["-h", "64", "-s", "32", "-v", "ESP"].map(OsString::from));
    if size >= FAT32_MIN_BYTES {
        args.push("-F".into());
    }
    args.push("::".into());
    fat.run("mformat", "format".into(), args)?;
    let mut made = BTreeSet::new();
    for (dest, source) in files {
        let parts = split_dest(dest)?;
        for depth in 1..parts.len() {
            let dir = format!("::/{}", parts[..depth].join("/"));
            if made.insert(dir.clone()) {
                fat.run("mmd", dir.clone(), vec![dir.into()])?;
            }
        }
        std::fs::metadata(source).map_err(|e| EspError::Read { path: source.into(), source: e })?;
        let to = format!("::/{dest}");
        fat.run("mcopy", to.clone(), vec!["-D".into(), "o".into(), source.into(), to.into()])?;
    }
    Ok(())
}

fn split_dest(dest: &str) -> Result<Vec<&str>, EspError> {
    let parts: Vec<&str> = dest.split('/').collect();
    if parts.iter().any(|p| p.is_empty() || *p == "." || *p == ".." || p.starts_with('-')) {
        return Err(EspError::BadDest(dest.to_owned()));
    }
    Ok(parts)
}

struct Fat<'a> {
    image: &'a Path,
    target: OsString,
}

impl Fat<'_> {
    fn run(&self, tool: &'static str, what: String, args: Vec<OsString>) -> Result<(), EspError> {
        let output = Command::new(tool)
            .arg("-i")
            .arg(&self.target)
            .args(args)
            // mtools otherwise refuses images whose geometry it finds odd.
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .map_err(|source| EspError::Spawn { tool, image: self.image.into(), source })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
            return Err(EspError::Tool { tool, what, image: self.image.into(), stderr });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{Read, Seek, SeekFrom};
    use std::process::Command;

    const MIB: u64 = 1024 * 1024;

    fn extract(image: &mut File, offset: u64, size: u64, to: &Path) {
        let mut buf = vec![0u8; size as usize];
        image.seek(SeekFrom::Start(offset)).unwrap();
        image.read_exact(&mut buf).unwrap();
        std::fs::write(to, buf).unwrap();
    }

    fn tool(cmd: &str, args: &[&str]) -> std::process::Output {
        let out = Command::new(cmd).args(args).env("MTOOLS_SKIP_CHECK", "1").output().unwrap();
        assert!(
            out.status.success(),
            "{cmd} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn round_trip(esp_mib: u64, expect_fat: &str) {
        let dir = tempfile::tempdir().unwrap();
        let img_path = dir.path().join("disk.img");
        let mut image =
            File::options().read(true).write(true).create(true).truncate(true).open(&img_path).unwrap();
        image.set_len((esp_mib + 2) * MIB).unwrap();
        let boot = dir.path().join("boot.efi");
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&boot, &payload).unwrap();
        let note = dir.path().join("note");
        std::fs::write(&note, b"hello esp\n").unwrap();
        write_esp(
            &img_path,
            MIB,
            esp_mib * MIB,
            &[("EFI/BOOT/BOOTX64.EFI", &boot), ("EFI/cloister/note.txt", &note)],
        )
        .unwrap();

        let esp = dir.path().join("esp.img");
        extract(&mut image, MIB, esp_mib * MIB, &esp);
        let esp_s = esp.to_str().unwrap();
        tool("fsck.fat", &["-n", esp_s]);
        let boot = std::fs::read(&esp).unwrap();
        let (at, label) = if expect_fat == "FAT32" { (82, b"FAT32   ") } else { (54, b"FAT16   ") };
        assert_eq!(&boot[at..at + 8], label);
        let listing = tool("mdir", &["-i", esp_s, "::/EFI/BOOT"]);
        assert!(String::from_utf8_lossy(&listing.stdout).contains("BOOTX64"), "{listing:?}");
        let got = tool("mtype", &["-i", esp_s, "::/EFI/BOOT/BOOTX64.EFI"]).stdout;
        assert_eq!(got, payload);
        let got = tool("mtype", &["-i", esp_s, "::/EFI/cloister/note.txt"]).stdout;
        assert_eq!(got, b"hello esp\n");
        let label = tool("mlabel", &["-i", esp_s, "-s", "::"]);
        assert!(String::from_utf8_lossy(&label.stdout).contains("ESP"), "{label:?}");
        // Nothing outside the ESP's range was touched.
        let mut head = vec![0u8; MIB as usize];
        image.seek(SeekFrom::Start(0)).unwrap();
        image.read_exact(&mut head).unwrap();
        assert!(head.iter().all(|&b| b == 0));
    }

    #[test]
    fn fat32_esp_passes_fsck_and_holds_the_files() {
        round_trip(64, "FAT32");
    }

    #[test]
    fn small_esp_uses_a_smaller_fat() {
        round_trip(16, "FAT16");
    }

    #[test]
    fn bad_destination_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i");
        let image = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        image.set_len(16 * MIB).unwrap();
        let err = write_esp(&path, 0, 16 * MIB, &[("EFI/../x", Path::new("/etc/hostname"))]).unwrap_err();
        assert!(matches!(err, EspError::BadDest(_)), "{err}");
    }
}
