//! The mounts PID 1 makes and moves: the API filesystems at start, the root on /sysroot, the
//! switch into it (emptying the initramfs, or leaving that to the handover child) and the
//! read-only remount at shutdown.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{fstatat, Mode, SFlag};
use nix::sys::statfs::{fstatfs, FsType, TMPFS_MAGIC};
use nix::unistd::{unlinkat, UnlinkatFlags};

use crate::handover::Handover;

/// ramfs (the kernel's rootfs for an initramfs); nix does not name it.
const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);

use crate::guard::{self, GuardError};

/// Where stage 1 mounts the root before switching into it.
pub const SYSROOT: &str = "/sysroot";
/// The copy of the initramfs kept in /run (moved along with /run by switch_root) so that
/// shutdown can leave the root, unmount it and close its dm-crypt mapping.
pub const SHUTDOWN_ROOT: &str = "/run/initramfs";
/// Where the root sits, seen from the shutdown root after pivot_root.
pub const OLDROOT: &str = "/oldroot";
/// Initramfs paths that are not copied: mount points and the (already loaded) modules.
const NOT_SAVED: [&str; 7] =
    ["/dev", "/proc", "/sys", "/run", "/sysroot", "/lib/modules", "/usr/lib/modules"];
/// The API filesystems, moved along into the root.
const API_MOUNTS: [&str; 4] = ["/dev", "/proc", "/sys", "/run"];

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mkdir {path}: {source}")]
    Mkdir { path: PathBuf, source: std::io::Error },
    #[error("mount {target}: {source}")]
    Mount { target: PathBuf, source: nix::Error },
    #[error("move mount {from} to {to}: {source}")]
    Move { from: PathBuf, to: PathBuf, source: nix::Error },
    #[error("statfs /: {0}")]
    Statfs(nix::Error),
    #[error("/ is not an initramfs (ramfs or tmpfs): refusing to empty it")]
    NotInitramfs,
    #[error(transparent)]
    Refused(#[from] GuardError),
    #[error("{op} {path}: {source}")]
    Fs { op: &'static str, path: PathBuf, source: nix::Error },
    #[error("exec {path}: {source}")]
    Exec { path: String, source: nix::Error },
    #[error("copy {from} to {to}: {source}")]
    Copy { from: PathBuf, to: PathBuf, source: std::io::Error },
    #[error("path {0} holds a nul byte")]
    Nul(String),
    #[error("the copying thread panicked")]
    ThreadPanicked,
}

fn mkdir(path: &Path, mode: u32) -> Result<(), MountError> {
    match std::fs::DirBuilder::new().mode(mode).recursive(true).create(path) {
        Ok(()) => Ok(()),
        Err(source) => Err(MountError::Mkdir { path: path.to_owned(), source }),
    }
}

fn mount_fs(fstype: &str, target: &str, flags: MsFlags, data: Option<&str>) -> Result<(), MountError> {
    mkdir(Path::new(target), 0o755)?;
    match mount(Some(fstype), target, Some(fstype), flags, data) {
        // Already there (a kernel that automounts devtmpfs): fine.
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(source) => Err(MountError::Mount { target: target.into(), source }),
    }
}

/// /dev, /proc, /sys and /run, each nosuid,nodev where that makes sense.
pub fn mount_api() -> Result<(), MountError> {
    let nsd = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_fs("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mount_fs("proc", "/proc", nsd | MsFlags::MS_NOEXEC, None)?;
    mount_fs("sysfs", "/sys", nsd | MsFlags::MS_NOEXEC, None)?;
    mount_fs("tmpfs", "/run", nsd, Some("mode=0755"))
}

/// Makes a directory with a given mode (e.g. libcryptsetup's 0700 lock directory).
pub fn make_dir(path: &str, mode: u32) -> Result<(), MountError> {
    mkdir(Path::new(path), mode)
}

/// Mounts the unlocked root read-write on /sysroot.
pub fn mount_root(dev: &Path, fstype: &str) -> Result<(), MountError> {
    mkdir(Path::new(SYSROOT), 0o755)?;
    mount(Some(dev), SYSROOT, Some(fstype), MsFlags::empty(), None::<&str>)
        .map_err(|source| MountError::Mount { target: SYSROOT.into(), source })
}

/// Moves the API mounts into the new root, empties the initramfs unless `handover` left that to
/// its child, makes the new root `/` and execs `program` there. Returns only on failure (and
/// then drops `handover`, whose child stops before it empties anything).
pub fn switch_root(program: &str, args: &[&str], handover: Handover) -> Result<Infallible, MountError> {
    guard::check("switch root")?;
    for m in API_MOUNTS {
        let to = PathBuf::from(format!("{SYSROOT}{m}"));
        mkdir(&to, 0o755)?;
        mount(Some(m), &to, None::<&str>, MsFlags::MS_MOVE, None::<&str>)
            .map_err(|source| MountError::Move { from: m.into(), to, source })?;
    }
    if handover.empty_here {
        free_initramfs()?;
    }
    let fs =
        |op: &'static str, path: &'static str| move |source| MountError::Fs { op, path: path.into(), source };
    nix::unistd::chdir(SYSROOT).map_err(fs("chdir", SYSROOT))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(fs("move mount . to", "/"))?;
    nix::unistd::chroot(".").map_err(fs("chroot", "."))?;
    nix::unistd::chdir("/").map_err(fs("chdir", "/"))?;
    exec(program, args)
}

/// Replaces this process with `program`.
pub fn exec(program: &str, args: &[&str]) -> Result<Infallible, MountError> {
    let cstr = |s: &str| CString::new(s).map_err(|_| MountError::Nul(s.to_owned()));
    let path = cstr(program)?;
    let argv =
        std::iter::once(program).chain(args.iter().copied()).map(cstr).collect::<Result<Vec<_>, _>>()?;
    nix::unistd::execv(&path, &argv).map_err(|source| MountError::Exec { path: program.to_owned(), source })
}

/// Deletes everything on the initramfs (not crossing into other mounts) so its RAM comes back.
fn free_initramfs() -> Result<(), MountError> {
    let (top, dev) = open_initramfs()?;
    remove_children_at(top.as_fd(), dev);
    Ok(())
}

/// The initramfs's top directory (`/` now) and its device. Refuses unless `/` really is a
/// ramfs/tmpfs: emptying any other root would wipe a disk.
pub fn open_initramfs() -> Result<(File, u64), MountError> {
    let fs = |op: &'static str| move |source| MountError::Fs { op, path: "/".into(), source };
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let top = File::from(nix::fcntl::open("/", flags, Mode::empty()).map_err(fs("open"))?);
    let fs_type = fstatfs(&top).map_err(MountError::Statfs)?.filesystem_type();
    if fs_type != RAMFS_MAGIC && fs_type != TMPFS_MAGIC {
        return Err(MountError::NotInitramfs);
    }
    let dev = nix::sys::stat::fstat(&top).map_err(fs("stat"))?.st_dev;
    Ok((top, dev))
}

/// Deletes what is below the directory `dir` on the device `dev` (a mount point inside is left
/// alone). Descriptor-relative, so that it works from outside a root that has since moved: a
/// child empties the initramfs after stage 2's exec. Best effort: a file that cannot be removed
/// only costs RAM.
pub fn remove_children_at(dir: BorrowedFd<'_>, dev: u64) {
    let open = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let Ok(mut listing) = Dir::openat(dir, ".", open, Mode::empty()) else { return };
    // Names first: removing entries while reading the directory could skip some.
    let names: Vec<CString> = listing
        .iter()
        .flatten()
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        .collect();
    for name in names {
        let Ok(st) = fstatat(dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else { continue };
        if st.st_dev != dev {
            continue;
        }
        if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR {
            if let Ok(sub) = openat(dir, name.as_c_str(), open, Mode::empty()) {
                remove_children_at(sub.as_fd(), dev);
            }
            let _ = unlinkat(dir, name.as_c_str(), UnlinkatFlags::RemoveDir);
        } else {
            let _ = unlinkat(dir, name.as_c_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// Copies the initramfs (program, libraries, config; not the modules) to [`SHUTDOWN_ROOT`].
pub fn save_initramfs() -> Result<u64, MountError> {
    mkdir(Path::new(SHUTDOWN_ROOT), 0o700)?;
    copy_tree(Path::new("/"), Path::new(SHUTDOWN_ROOT), &NOT_SAVED)
}

/// Copies files, directories and symlinks under `from` (except the absolute paths in `skip`,
/// given relative to `from`) into `to`; returns the bytes copied.
pub fn copy_tree(from: &Path, to: &Path, skip: &[&str]) -> Result<u64, MountError> {
    let err = |f: &Path, t: &Path| {
        let (f, t) = (f.to_owned(), t.to_owned());
        move |source| MountError::Copy { from: f, to: t, source }
    };
    let mut bytes = 0;
    for entry in std::fs::read_dir(from).map_err(err(from, to))? {
        let src = entry.map_err(err(from, to))?.path();
        let rel = Path::new("/").join(src.strip_prefix(from).unwrap_or(&src));
        if skip.iter().any(|s| rel.starts_with(s)) {
            continue;
        }
        let dst = to.join(src.file_name().unwrap_or_default());
        let meta = std::fs::symlink_metadata(&src).map_err(err(&src, &dst))?;
        if meta.is_symlink() {
            let target = std::fs::read_link(&src).map_err(err(&src, &dst))?;
            std::os::unix::fs::symlink(target, &dst).map_err(err(&src, &dst))?;
        } else if meta.is_dir() {
            mkdir(&dst, meta.mode() & 0o7777)?;
            let sub: Vec<String> = skip
                .iter()
                .filter_map(|s| Some(format!("/{}", Path::new(s).strip_prefix(&rel).ok()?.display())))
                .collect();
            let sub: Vec<&str> = sub.iter().map(String::as_str).filter(|s| *s != "/").collect();
            bytes += copy_tree(&src, &dst, &sub)?;
        } else if meta.is_file() {
            bytes += std::fs::copy(&src, &dst).map_err(err(&src, &dst))?;
        }
    }
    Ok(bytes)
}

/// Leaves the root for the saved initramfs: bind it onto itself (pivot_root needs a mount),
/// pivot with the root going to [`OLDROOT`], and exec `program` there. Returns only on failure.
pub fn pivot_to_shutdown_root(program: &str, args: &[&str]) -> Result<Infallible, MountError> {
    guard::check("pivot to the shutdown root")?;
    let root = SHUTDOWN_ROOT;
    mount(Some(root), root, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|source| MountError::Mount { target: root.into(), source })?;
    for d in ["oldroot", "dev", "proc", "sys", "run"] {
        mkdir(&Path::new(root).join(d), 0o755)?;
    }
    let fs =
        |op: &'static str, path: &'static str| move |source| MountError::Fs { op, path: path.into(), source };
    nix::unistd::chdir(root).map_err(fs("chdir", SHUTDOWN_ROOT))?;
    nix::unistd::pivot_root(".", "oldroot").map_err(fs("pivot_root to", SHUTDOWN_ROOT))?;
    nix::unistd::chroot(".").map_err(fs("chroot", "."))?;
    nix::unistd::chdir("/").map_err(fs("chdir", "/"))?;
    exec(program, args)
}

/// In the shutdown root: brings /dev, /proc and /sys over from the old root.
pub fn take_api_mounts() -> Result<(), MountError> {
    for m in ["/dev", "/proc", "/sys"] {
        let from = PathBuf::from(format!("{OLDROOT}{m}"));
        mkdir(Path::new(m), 0o755)?;
        mount(Some(&from), m, None::<&str>, MsFlags::MS_MOVE, None::<&str>)
            .map_err(|source| MountError::Move { from, to: m.into(), source })?;
    }
    Ok(())
}

/// Unmounts what is left under the old root, then the old root itself; a busy submount is
/// detached, but the root must unmount for real so that its mapping can close.
pub fn unmount_old_root() -> Result<(), MountError> {
    // Deepest first (/oldroot/run/cloister/netns/chat before /oldroot/run, /oldroot/tmp…).
    let mountinfo = std::fs::read_to_string(MOUNTINFO).unwrap_or_default();
    let mut below: Vec<PathBuf> = mount_points(&mountinfo)
        .into_iter()
        .filter(|p| p.starts_with(OLDROOT) && p != Path::new(OLDROOT))
        .collect();
    below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in below {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
    nix::mount::umount(OLDROOT).map_err(|source| MountError::Fs {
        op: "umount",
        path: OLDROOT.into(),
        source,
    })
}

/// Where the kernel lists this process's mounts.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// The mount points named in a mountinfo text (proc(5)), in order, with the kernel's octal
/// escapes (`\040` for a space) decoded.
pub fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo.lines().filter_map(|l| l.split(' ').nth(4)).map(unescape_octal).map(PathBuf::from).collect()
}

fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes.get(i + 1..i + 4).and_then(|d| std::str::from_utf8(d).ok());
        match (bytes[i], code.and_then(|d| u8::from_str_radix(d, 8).ok())) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Remounts `/` read-only so the filesystem is clean when the power goes.
pub fn remount_root_ro() -> Result<(), MountError> {
    let flags = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    mount(None::<&str>, "/", None::<&str>, flags, None::<&str>)
        .map_err(|source| MountError::Mount { target: "/ (read-only)".into(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host's `/` is a disk's file system (here ext4): nothing may be emptied there.
    #[test]
    fn only_a_ramfs_or_tmpfs_root_is_opened_for_emptying() {
        let fs_type = nix::sys::statfs::statfs("/").unwrap().filesystem_type();
        let in_ram = fs_type == RAMFS_MAGIC || fs_type == TMPFS_MAGIC;
        assert_eq!(matches!(open_initramfs(), Err(MountError::NotInitramfs)), !in_ram, "{fs_type:?}");
    }

    #[test]
    fn remove_children_at_empties_a_tree_but_keeps_the_top() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/f"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        let dev = std::fs::metadata(dir.path()).unwrap().dev();
        let top = File::open(dir.path()).unwrap();
        remove_children_at(top.as_fd(), dev);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(std::fs::metadata("/etc/passwd").is_ok());
    }

    #[test]
    fn copy_tree_keeps_links_and_skips_paths() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("lib/modules/6.1")).unwrap();
        std::fs::create_dir_all(src.path().join("lib/x86_64-linux-gnu")).unwrap();
        std::fs::create_dir_all(src.path().join("proc/1")).unwrap();
        std::fs::write(src.path().join("init"), "elf").unwrap();
        std::fs::write(src.path().join("lib/x86_64-linux-gnu/libc.so.6"), "libc").unwrap();
        std::fs::write(src.path().join("lib/modules/6.1/xfs.ko"), "ko").unwrap();
        std::os::unix::fs::symlink("lib", src.path().join("lib64")).unwrap();
        let bytes = copy_tree(src.path(), dst.path(), &["/proc", "/lib/modules"]).unwrap();
        assert_eq!(bytes, 7);
        assert_eq!(
            std::fs::read_to_string(dst.path().join("lib/x86_64-linux-gnu/libc.so.6")).unwrap(),
            "libc"
        );
        assert_eq!(std::fs::read_link(dst.path().join("lib64")).unwrap(), Path::new("lib"));
        assert!(!dst.path().join("proc").exists());
        assert!(dst.path().join("lib").exists() && !dst.path().join("lib/modules").exists());
    }

    #[test]
    fn mount_points_are_read_from_mountinfo() {
        let text = "22 1 0:21 / / rw,relatime shared:1 - xfs /dev/mapper/cloister-root rw\n\
                    23 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs devtmpfs rw,mode=755\n\
                    40 22 0:33 / /mnt/with\\040space rw - tmpfs tmpfs rw\n";
        assert_eq!(
            mount_points(text),
            [Path::new("/"), Path::new("/dev"), Path::new("/mnt/with space")].map(Path::to_path_buf)
        );
        let here = std::fs::read_to_string(MOUNTINFO).unwrap();
        assert!(mount_points(&here).iter().any(|p| p == Path::new("/proc")));
    }

    #[test]
    fn switch_root_is_refused_on_the_host() {
        assert!(matches!(pivot_to_shutdown_root("/bin/true", &[]), Err(MountError::Refused(_))));
        assert!(matches!(
            switch_root("/bin/true", &[], Handover::without_child()),
            Err(MountError::Refused(_))
        ));
    }
}
