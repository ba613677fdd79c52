//! The unified kernel image: systemd-stub with .osrel, .cmdline, .linux and .initrd sections
//! added by host `objcopy`, at addresses computed from the stub's own PE headers so that no
//! section overlaps another (objcopy does not check).

use std::path::{Path, PathBuf};
use std::process::Command;

use goblin::pe::PE;

/// Where Debian's systemd-boot-efi package puts the stub.
pub const DEFAULT_STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";
const PAGE: u64 = 4096;

pub struct UkiSections<'a> {
    pub osrel: &'a [u8],
    pub cmdline: &'a str,
    pub linux: &'a Path,
    pub initrd: &'a Path,
}

#[derive(Debug, thiserror::Error)]
pub enum UkiError {
    #[error("systemd-stub not found at {0}; install systemd-boot-efi")]
    StubMissing(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("parse pe headers of {path}: {source}")]
    Parse { path: PathBuf, source: goblin::error::Error },
    #[error("{0}: not a pe image with an optional header")]
    NotPe(PathBuf),
    #[error("run objcopy for {out}: {source}; install binutils")]
    Spawn { out: PathBuf, source: std::io::Error },
    #[error("objcopy failed for {out}: {stderr}")]
    Objcopy { out: PathBuf, stderr: String },
}

/// Writes `out` = `stub` + the four sections, in the order .osrel, .cmdline, .linux, .initrd.
pub fn build_uki(stub: &Path, sections: &UkiSections, out: &Path) -> Result<(), UkiError> {
    if !stub.is_file() {
        return Err(UkiError::StubMissing(stub.into()));
    }
    let (mut next, align) = stub_end(stub)?;
    let osrel = Scratch::write(out, "osrel", sections.osrel)?;
    let cmdline = Scratch::write(out, "cmdline", sections.cmdline.as_bytes())?;
    let inputs = [
        (".osrel", osrel.0.as_path()),
        (".cmdline", cmdline.0.as_path()),
        (".linux", sections.linux),
        (".initrd", sections.initrd),
    ];
    let mut cmd = Command::new("objcopy");
    for (name, file) in inputs {
        let len = std::fs::metadata(file).map_err(|source| UkiError::Io { path: file.into(), source })?.len();
        let vma = next.next_multiple_of(align);
        cmd.arg("--add-section").arg(format!("{name}={}", file.display()));
        cmd.arg("--change-section-vma").arg(format!("{name}={vma:#x}"));
        next = vma + len;
    }
    cmd.arg(stub).arg(out);
    let output = cmd.output().map_err(|source| UkiError::Spawn { out: out.into(), source })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        return Err(UkiError::Objcopy { out: out.into(), stderr });
    }
    Ok(())
}

/// The first free virtual address after the stub's sections (image base included, as objcopy
/// takes VMAs) and the alignment new sections need: at least a page, more if the stub says so.
fn stub_end(stub: &Path) -> Result<(u64, u64), UkiError> {
    let bytes = std::fs::read(stub).map_err(|source| UkiError::Io { path: stub.into(), source })?;
    let pe = PE::parse(&bytes).map_err(|source| UkiError::Parse { path: stub.into(), source })?;
    let opt = pe.header.optional_header.ok_or_else(|| UkiError::NotPe(stub.into()))?;
    let align = u64::from(opt.windows_fields.section_alignment).max(PAGE);
    let end = pe
        .sections
        .iter()
        .map(|s| u64::from(s.virtual_address) + u64::from(s.virtual_size.max(s.size_of_raw_data)))
        .max()
        .unwrap_or(0);
    Ok((opt.windows_fields.image_base + end, align))
}

/// A small input file next to the output, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn write(out: &Path, what: &str, contents: &[u8]) -> Result<Self, UkiError> {
        let mut name = out.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".{what}.tmp-{}", std::process::id()));
        let path = out.with_file_name(name);
        std::fs::write(&path, contents).map_err(|source| UkiError::Io { path: path.clone(), source })?;
        Ok(Self(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, size, vma) of every section, from objdump.
    fn sections(path: &Path) -> Vec<(String, u64, u64)> {
        let out = Command::new("objdump").arg("-h").arg(path).output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let idx_ok = f.first().is_some_and(|i| i.parse::<u32>().is_ok());
                (idx_ok && f.len() >= 4).then(|| {
                    let hex = |s: &str| u64::from_str_radix(s, 16).unwrap();
                    (f[1].to_owned(), hex(f[2]), hex(f[3]))
                })
            })
            .collect()
    }

    #[test]
    fn sections_are_added_in_order_without_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let linux = dir.path().join("vmlinuz");
        let initrd = dir.path().join("initrd");
        std::fs::write(&linux, vec![0xAB; 123_457]).unwrap();
        std::fs::write(&initrd, vec![0xCD; 70_001]).unwrap();
        let osrel = b"ID=cloister\nVERSION_ID=1\n";
        let cmdline = "console=ttyS0 quiet cloister.test=1";
        let out = dir.path().join("uki.efi");
        let s = UkiSections { osrel, cmdline, linux: &linux, initrd: &initrd };
        build_uki(Path::new(DEFAULT_STUB), &s, &out).unwrap();

        let mut all = sections(&out);
        let added: Vec<_> = all
            .iter()
            .filter(|(n, _, _)| {
                n.starts_with(".osrel")
                    || n.starts_with(".cmdline")
                    || n.starts_with(".linux")
                    || n.starts_with(".initrd")
            })
            .cloned()
            .collect();
        let names: Vec<&str> = added.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, [".osrel", ".cmdline", ".linux", ".initrd"]);
        let sizes: Vec<u64> = added.iter().map(|(_, s, _)| *s).collect();
        assert_eq!(sizes, [osrel.len() as u64, cmdline.len() as u64, 123_457, 70_001]);
        all.sort_by_key(|(_, _, vma)| *vma);
        for pair in all.windows(2) {
            let ((a, a_size, a_vma), (b, _, b_vma)) = (&pair[0], &pair[1]);
            assert!(a_vma + a_size <= *b_vma, "{a} overlaps {b}: {all:?}");
        }
        for (name, _, vma) in &added {
            assert_eq!(vma % PAGE, 0, "{name} at {vma:#x}");
        }
        // No scratch inputs left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);

        let extracted = dir.path().join("cmdline.bin");
        let st = Command::new("objcopy")
            .args(["-O", "binary", "--only-section=.cmdline"])
            .arg(&out)
            .arg(&extracted)
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(std::fs::read(&extracted).unwrap(), cmdline.as_bytes());
    }

    #[test]
    fn missing_stub_names_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let s = UkiSections { osrel: b"", cmdline: "", linux: dir.path(), initrd: dir.path() };
        let err = build_uki(&dir.path().join("nope.stub"), &s, &dir.path().join("o")).unwrap_err();
        assert!(err.to_string().contains("install systemd-boot-efi"), "{err}");
    }
}
