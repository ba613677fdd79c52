//! Starts reading stage 2's program and libraries from the unlocked root before stage 1 execs
//! it. Left to page faults, the exec reads them through dm-crypt a few pages at a time, each
//! read a round trip through the disk and the cipher (about a second under emulation);
//! `POSIX_FADV_WILLNEED` queues each file whole at once. Stage 1 opens the files; the child it
//! hands over to (see `handover`) queues them beside the exec.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};

/// Stage 2's program and libraries, opened and not read yet.
#[derive(Default)]
pub struct Stage2Files {
    files: Vec<std::fs::File>,
    pub bytes: u64,
}

impl Stage2Files {
    /// Opens `program` under `root` and, under `root` too, every file this process has mapped:
    /// stage 2 is the same program as stage 1 with the same libraries (both come from the
    /// image's own packages), so what stage 1 maps is what stage 2's loader will open. The
    /// program comes first: its pages are the exec's first. Best effort: a file that is missing
    /// is only read later, on demand.
    pub fn open(root: &Path, program: &str) -> Self {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let mapped = mapped_files(&maps);
        let program = PathBuf::from(program);
        let in_order = std::iter::once(&program).chain(mapped.iter().filter(|f| **f != program));
        let mut opened = Stage2Files { files: Vec::new(), bytes: 0 };
        for file in in_order {
            let Ok(rel) = file.strip_prefix("/") else { continue };
            let Ok(f) = std::fs::File::open(root.join(rel)) else { continue };
            opened.bytes += f.metadata().map(|m| m.len()).unwrap_or(0);
            opened.files.push(f);
        }
        opened
    }

    pub fn count(&self) -> usize {
        self.files.len()
    }

    /// Queues every file whole for reading (`POSIX_FADV_WILLNEED`) and closes it; returns how
    /// many were queued. A file that cannot be advised is read on demand.
    pub fn read_ahead(self) -> usize {
        // Length 0 means "to the end of the file".
        let queued =
            |f: &std::fs::File| posix_fadvise(f, 0, 0, PosixFadviseAdvice::POSIX_FADV_WILLNEED).is_ok();
        self.files.iter().filter(|f| queued(f)).count()
    }
}

/// The absolute paths of the files mapped in a `/proc/<pid>/maps` text, each once; pseudo
/// entries (`[heap]`, `[vdso]`) and deleted files are left out.
fn mapped_files(maps: &str) -> BTreeSet<PathBuf> {
    maps.lines()
        .filter_map(|line| {
            // address perms offset dev inode path
            let path = line.splitn(6, ' ').nth(5)?.trim_start();
            (path.starts_with('/') && !path.ends_with(" (deleted)")).then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_give_each_mapped_file_once_and_nothing_else() {
        let maps = "\
55d0c0a00000-55d0c0a3f000 r--p 00000000 00:02 12   /init
55d0c0a3f000-55d0c0d00000 r-xp 0003f000 00:02 12   /init
7f1e2c000000-7f1e2c021000 rw-p 00000000 00:00 0 
7f1e2d400000-7f1e2d4a0000 r--p 00000000 00:02 40   /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7f1e2d4a0000-7f1e2d600000 r-xp 000a0000 00:02 40   /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7f1e2d700000-7f1e2d710000 r--p 00000000 00:02 41   /run/old file (deleted)
7f1e2d800000-7f1e2d810000 r--p 00000000 00:02 42   /usr/lib/x86_64-linux-gnu/lib with space.so
7ffd6a1b6000-7ffd6a1d7000 rw-p 00000000 00:00 0    [stack]
7ffd6a1f2000-7ffd6a1f4000 r-xp 00000000 00:00 0    [vdso]
";
        let files: Vec<_> = mapped_files(maps).into_iter().collect();
        let want: Vec<PathBuf> = [
            "/init",
            "/usr/lib/x86_64-linux-gnu/lib with space.so",
            "/usr/lib/x86_64-linux-gnu/libcrypto.so.3",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(files, want);
    }

    #[test]
    fn this_process_maps_its_own_program() {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        assert!(mapped_files(&maps).contains(&exe), "{exe:?} not in the maps");
    }

    #[test]
    fn the_program_comes_first_and_the_mapped_files_are_opened_under_the_root() {
        let root = tempfile::tempdir().unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let inside = root.path().join(exe.strip_prefix("/").unwrap());
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        std::fs::write(&inside, vec![7u8; 10_000]).unwrap();
        std::fs::create_dir_all(root.path().join("sbin")).unwrap();
        std::fs::write(root.path().join("sbin/stage2"), vec![1u8; 5_000]).unwrap();
        let opened = Stage2Files::open(root.path(), "/sbin/stage2");
        // Libraries this test maps are not under the temporary root, so only these two count.
        assert_eq!((opened.count(), opened.bytes), (2, 15_000));
        assert_eq!(opened.files[0].metadata().unwrap().len(), 5_000, "the program is not first");
        assert_eq!(opened.read_ahead(), 2);
    }
}
