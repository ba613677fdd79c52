//! The root file system: a [`Tree`] rendered as an xfsprogs protofile, and `mkfs.xfs -p` run on
//! a plain file. This is how ownership, device nodes and setuid bits reach the image without
//! root: mkfs.xfs writes them from the protofile, nothing is chowned or mknod'ed on the host.

use std::fmt::Write as _;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cloister_rootfs::tree::{Kind, Node, Tree};
use uuid::Uuid;

/// XFS refuses smaller data sections (outside its own test-suite mode).
pub const XFS_MIN_BYTES: u64 = 300 * 1024 * 1024;
/// Sector size matching the LUKS2 sector size: the kernel refuses an XFS whose sectors are
/// smaller than the logical blocks of the dm-crypt device it sits on.
const SECTOR_BYTES: u64 = 4096;
const LABEL_MAX: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum XfsError {
    #[error("{path:?} cannot go into an xfs protofile: its {what} {why}")]
    Unrepresentable { path: PathBuf, what: &'static str, why: &'static str },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("xfs size {size} for {path} must be a multiple of 4096 and at least 300 MiB")]
    BadSize { path: PathBuf, size: u64 },
    #[error("xfs label {0:?} must be at most 12 bytes without spaces")]
    BadLabel(String),
    #[error("run mkfs.xfs on {path}: {source}; install xfsprogs")]
    Spawn { path: PathBuf, source: io::Error },
    #[error("mkfs.xfs on {path} failed: {stderr}")]
    Mkfs { path: PathBuf, stderr: String },
    #[error("xfs_db on {path} failed to restore modes: {stderr}")]
    RestoreModes { path: PathBuf, stderr: String },
}

/// What the protofile could not say. The lead's docs list these; PID 1 fixes them up.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProtoReport {
    /// Paths whose sticky bit (0o1000) was dropped: the protofile has no syntax for it.
    pub sticky_dropped: Vec<PathBuf>,
}

/// Writes the protofile for `tree` to `out`. Regular files refer to their staging copies.
pub fn write_protofile(tree: &Tree, out: &Path) -> Result<ProtoReport, XfsError> {
    let mut report = ProtoReport::default();
    let root = Path::new("");
    let root_node = tree.get(root).cloned().unwrap_or_else(|| Node::dir(0o755));
    let mut text = String::from("cloister\n0 0\n");
    text.push_str(&mode_field(root, &root_node, &mut report));
    let _ = writeln!(text, " {} {}", root_node.uid, root_node.gid);
    write_dir(tree, root, 1, &mut text, &mut report)?;
    text.push_str("$\n");
    std::fs::write(out, text).map_err(|source| XfsError::Io { path: out.into(), source })?;
    Ok(report)
}

fn write_dir(
    tree: &Tree,
    dir: &Path,
    depth: usize,
    text: &mut String,
    report: &mut ProtoReport,
) -> Result<(), XfsError> {
    for (path, node) in tree.children(dir) {
        let name = path.file_name().map(|n| n.as_bytes()).unwrap_or_default();
        let name = token(path, name, "name")?;
        let indent = " ".repeat(depth);
        let mode = mode_field(path, node, report);
        let _ = write!(text, "{indent}{name} {mode} {} {}", node.uid, node.gid);
        match &node.kind {
            Kind::File => {
                let host = tree.host_path(path);
                let _ = writeln!(text, " {}", token(path, host.as_os_str().as_bytes(), "staging path")?);
            }
            Kind::Symlink(target) => {
                let _ = writeln!(text, " {}", token(path, target.as_os_str().as_bytes(), "symlink target")?);
            }
            Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => {
                let _ = writeln!(text, " {major} {minor}");
            }
            Kind::Fifo => text.push('\n'),
            Kind::Dir => {
                text.push('\n');
                write_dir(tree, path, depth + 1, text, report)?;
                let _ = writeln!(text, "{indent}$");
            }
        }
    }
    Ok(())
}

/// A protofile token: whitespace separates tokens, `:` starts a comment, a lone `$` ends a
/// directory, and the parser reads bytes, so anything else passes through.
fn token<'a>(path: &Path, bytes: &'a [u8], what: &'static str) -> Result<&'a str, XfsError> {
    let bad = |why| XfsError::Unrepresentable { path: path.into(), what, why };
    let s = std::str::from_utf8(bytes).map_err(|_| bad("is not utf-8"))?;
    if s.is_empty() || s == "$" {
        return Err(bad("is empty or \"$\""));
    }
    if s.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err(bad("contains whitespace"));
    }
    if s.contains(':') {
        return Err(bad("contains ':'"));
    }
    Ok(s)
}

/// `[-dbcpl][u-][g-]NNN`: type, setuid, setgid, permission bits.
fn mode_field(path: &Path, node: &Node, report: &mut ProtoReport) -> String {
    let kind = match node.kind {
        Kind::File => '-',
        Kind::Dir => 'd',
        Kind::BlockDev { .. } => 'b',
        Kind::CharDev { .. } => 'c',
        Kind::Fifo => 'p',
        Kind::Symlink(_) => 'l',
    };
    if node.mode & 0o1000 != 0 {
        report.sticky_dropped.push(path.into());
    }
    let suid = if node.mode & 0o4000 != 0 { 'u' } else { '-' };
    let sgid = if node.mode & 0o2000 != 0 { 'g' } else { '-' };
    format!("{kind}{suid}{sgid}{:03o}", node.mode & 0o777)
}

/// Makes an XFS of `size_bytes` at the start of `image_file` (created or grown to at least that
/// size; a larger file keeps its tail, which the LUKS step needs) from `proto`.
pub fn mkfs_xfs(
    proto: &Path,
    image_file: &Path,
    size_bytes: u64,
    label: &str,
    uuid: Option<Uuid>,
) -> Result<(), XfsError> {
    if size_bytes < XFS_MIN_BYTES || !size_bytes.is_multiple_of(SECTOR_BYTES) {
        return Err(XfsError::BadSize { path: image_file.into(), size: size_bytes });
    }
    if label.len() > LABEL_MAX || label.contains(char::is_whitespace) {
        return Err(XfsError::BadLabel(label.into()));
    }
    ensure_len(image_file, size_bytes)?;
    let mut last = String::new();
    for agcount in AG_COUNTS {
        let mut cmd = Command::new("mkfs.xfs");
        cmd.args(["-q", "-f", "-s", "size=4096", "-L", label]);
        if let Some(uuid) = uuid {
            cmd.arg("-m").arg(format!("uuid={uuid}"));
        }
        let data = match agcount {
            Some(n) => format!("size={size_bytes},agcount={n}"),
            None => format!("size={size_bytes}"),
        };
        cmd.arg("-p").arg(proto).arg("-d").arg(data).arg(image_file);
        let output = cmd.output().map_err(|source| XfsError::Spawn { path: image_file.into(), source })?;
        if output.status.success() {
            return Ok(());
        }
        last = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if !last.contains("No space left on device") {
            break;
        }
    }
    Err(XfsError::Mkfs { path: image_file.into(), stderr: last })
}

/// Allocation group counts to try: mkfs.xfs's own choice first. xfsprogs 6.1 fills a
/// protofile's tree allocation group by allocation group and can fail with ENOSPC ("directory
/// createname error") on some geometries although the tree fits with room to spare (seen: a
/// 586 MiB tree in an 879 MiB file system with 4 groups, while 863 and 895 MiB worked); another
/// group count lays the groups out differently.
const AG_COUNTS: [Option<u32>; 3] = [None, Some(2), Some(8)];

/// Writes the full modes of `paths` (as the tree has them) into the unmounted filesystem with
/// `xfs_db -x`: the protofile cannot express the sticky bit, and a world-writable `/tmp` without
/// it would let any user remove another's files. No mount, no root.
pub fn restore_modes(image_file: &Path, tree: &Tree, paths: &[PathBuf]) -> Result<(), XfsError> {
    let mut cmd = Command::new("xfs_db");
    cmd.arg("-x");
    for rel in paths {
        let Some(node) = tree.get(rel) else { continue };
        let type_bits = match node.kind {
            Kind::Dir => 0o040000,
            Kind::File => 0o100000,
            _ => continue,
        };
        cmd.arg("-c").arg(format!("path /{}", rel.display()));
        cmd.arg("-c").arg(format!("write core.mode 0{:o}", type_bits | (node.mode & 0o7777)));
    }
    cmd.arg(image_file);
    let output = cmd.output().map_err(|source| XfsError::Spawn { path: image_file.into(), source })?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() || !stderr.trim().is_empty() {
        return Err(XfsError::RestoreModes { path: image_file.into(), stderr });
    }
    Ok(())
}

fn ensure_len(path: &Path, len: u64) -> Result<(), XfsError> {
    let io_err = |source| XfsError::Io { path: path.into(), source };
    let file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(path).map_err(io_err)?;
    if file.metadata().map_err(io_err)?.len() < len {
        file.set_len(len).map_err(io_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn tree(dir: &Path) -> Tree {
        let mut t = Tree::new(dir.join("staging")).unwrap();
        t.write_file("usr/bin/su", b"#!/bin/true\n", Node::file(0o4755)).unwrap();
        t.write_file("home/user/notes.txt", b"unique-content-7d1f\n", Node::file(0o640).owned(1000, 1000))
            .unwrap();
        t.get_mut(Path::new("home/user")).unwrap().uid = 1000;
        t.insert("usr/sbin", Node::dir(0o2750).owned(0, 42)).unwrap();
        t.insert("bin", Node::symlink("usr/bin")).unwrap();
        t.insert(
            "dev/console",
            Node { kind: Kind::CharDev { major: 5, minor: 1 }, mode: 0o600, uid: 0, gid: 5 },
        )
        .unwrap();
        t.insert(
            "dev/vda",
            Node { kind: Kind::BlockDev { major: 254, minor: 0 }, mode: 0o660, uid: 0, gid: 6 },
        )
        .unwrap();
        t.insert("run/initctl", Node { kind: Kind::Fifo, mode: 0o600, uid: 0, gid: 0 }).unwrap();
        t.insert("tmp", Node::dir(0o1777)).unwrap();
        t
    }

    fn db(img: &Path, path: &str) -> String {
        let out = Command::new("xfs_db")
            .arg("-r")
            .args(["-c", &format!("path {path}"), "-c", "print core.mode core.uid core.gid"])
            .arg(img)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn tree_becomes_an_xfs_with_modes_and_owners() {
        let dir = tempfile::tempdir().unwrap();
        let t = tree(dir.path());
        let proto = dir.path().join("proto");
        let report = write_protofile(&t, &proto).unwrap();
        assert_eq!(report.sticky_dropped, [PathBuf::from("tmp")]);
        let img = dir.path().join("root.img");
        let uuid = Uuid::new_v4();
        mkfs_xfs(&proto, &img, XFS_MIN_BYTES, "cloister", Some(uuid)).unwrap();

        let check = |path: &str, mode: &str, uid: u32, gid: u32| {
            let out = db(&img, path);
            let want = format!("core.mode = {mode}\ncore.uid = {uid}\ncore.gid = {gid}\n");
            assert_eq!(out, want, "{path}");
        };
        check("/usr/bin/su", "0104755", 0, 0);
        check("/home/user/notes.txt", "0100640", 1000, 1000);
        check("/home/user", "040755", 1000, 0);
        check("/usr/sbin", "042750", 0, 42);
        check("/bin", "0120777", 0, 0);
        check("/dev/console", "020600", 0, 5);
        check("/dev/vda", "060660", 0, 6);
        check("/run/initctl", "010600", 0, 0);
        check("/tmp", "040777", 0, 0);

        let out = Command::new("xfs_db")
            .arg("-r")
            .args(["-c", "sb 0", "-c", "print uuid fname sectsize"])
            .arg(&img)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&uuid.to_string()), "{text}");
        assert!(text.contains("fname = \"cloister") && text.contains("sectsize = 4096"), "{text}");
        let repair = Command::new("xfs_repair").arg("-n").arg(&img).output().unwrap();
        assert!(repair.status.success(), "{}", String::from_utf8_lossy(&repair.stderr));
    }

    #[test]
    fn unrepresentable_names_are_refused_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["a b", "x:y"] {
            let mut t = Tree::new(dir.path().join("s")).unwrap();
            t.write_file(format!("etc/{bad}"), b"", Node::file(0o644)).unwrap();
            let err = write_protofile(&t, &dir.path().join("proto")).unwrap_err();
            assert!(err.to_string().contains(&format!("etc/{bad}")), "{err}");
        }
        let mut t = Tree::new(dir.path().join("s2")).unwrap();
        t.insert("l", Node::symlink("with space")).unwrap();
        let err = write_protofile(&t, &dir.path().join("proto")).unwrap_err();
        assert!(err.to_string().contains("symlink target contains whitespace"), "{err}");
    }

    #[test]
    fn too_small_size_is_refused_before_mkfs() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            mkfs_xfs(Path::new("/nonexistent"), &dir.path().join("i"), 299 << 20, "x", None).unwrap_err();
        assert!(matches!(err, XfsError::BadSize { .. }), "{err}");
    }
}
