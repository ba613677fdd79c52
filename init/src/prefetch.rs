//! Starts reading stage 2's program and libraries from the unlocked root before stage 1 execs
//! it. Left to page faults, the exec reads them through dm-crypt a few pages at a time, each
//! read a round trip through the disk and the cipher (about a second under emulation);
//! `POSIX_FADV_WILLNEED` queues them at once. Only the pages stage 1 itself touched are queued
//! (its page table says which: `/proc/self/pagemap`): stage 2 starts the same way, through the
//! same loader, relocations and runtime, and the 13.5 MiB of whole files took longer to read
//! and decrypt than the exec waited before its first line. Stage 1 opens the files; the child
//! it hands over to (see `handover`) queues them beside the exec.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};

const PAGE: u64 = 4096;
/// `/proc/<pid>/pagemap`: bit 63 "present in RAM", bit 62 "swapped".
const PAGEMAP_IN_USE: u64 = 3 << 62;

/// Stage 2's program and libraries, opened and not read yet, each with the byte ranges to read.
#[derive(Default)]
pub struct Stage2Files {
    files: Vec<(File, Vec<Range<u64>>)>,
    /// The bytes of the ranges.
    pub bytes: u64,
    /// The files' whole size.
    pub file_bytes: u64,
}

impl Stage2Files {
    /// Opens `program` under `root` and, under `root` too, every file this process has mapped:
    /// stage 2 is the same program as stage 1 (this process's own executable) with the same
    /// libraries (both come from the image's own packages), so what stage 1 maps is what stage
    /// 2's loader will open. The program comes first: its pages are the exec's first. Best
    /// effort: a missing file is only read later, on demand; where the page table cannot be
    /// read, whole files are queued.
    pub fn open(root: &Path, program: &str) -> Self {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let exe = std::fs::read_link("/proc/self/exe").ok();
        let pagemap = File::open("/proc/self/pagemap").ok();
        let mut touched = touched_pages(&mappings(&maps), pagemap.as_ref());
        let program = PathBuf::from(program);
        if let Some(pages) = exe.and_then(|exe| touched.remove(&exe)) {
            touched.insert(program.clone(), pages);
        }
        let first = touched.remove_entry(&program);
        let mut opened = Stage2Files::default();
        for (path, pages) in first.into_iter().chain(touched) {
            let Ok(rel) = path.strip_prefix("/") else { continue };
            let Ok(f) = File::open(root.join(rel)) else { continue };
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let ranges = match pages {
                Some(pages) => byte_ranges(&pages, len),
                None => std::iter::once(0..len).collect(),
            };
            opened.bytes += ranges.iter().map(|r| r.end - r.start).sum::<u64>();
            opened.file_bytes += len;
            opened.files.push((f, ranges));
        }
        opened
    }

    pub fn count(&self) -> usize {
        self.files.len()
    }

    /// Queues every range for reading (`POSIX_FADV_WILLNEED`) and closes the files; returns how
    /// many files were queued. A range that cannot be advised is read on demand.
    pub fn read_ahead(self) -> usize {
        let advise = |f: &File, r: &Range<u64>| {
            let (Ok(at), Ok(len)) = (i64::try_from(r.start), i64::try_from(r.end - r.start)) else {
                return false;
            };
            posix_fadvise(f, at, len, PosixFadviseAdvice::POSIX_FADV_WILLNEED).is_ok()
        };
        self.files.iter().filter(|(f, ranges)| ranges.iter().all(|r| advise(f, r))).count()
    }
}

/// One line of `/proc/<pid>/maps` that maps a file.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    path: PathBuf,
    start: u64,
    end: u64,
    /// Where in the file the mapping starts, in bytes.
    offset: u64,
}

/// The file mappings of a `/proc/<pid>/maps` text; pseudo entries (`[heap]`, `[vdso]`) and
/// deleted files are left out.
fn mappings(maps: &str) -> Vec<Mapping> {
    maps.lines()
        .filter_map(|line| {
            // address perms offset dev inode path
            let mut fields = line.splitn(6, ' ');
            let (start, end) = fields.next()?.split_once('-')?;
            let offset = fields.nth(1)?;
            let path = fields.nth(2)?.trim_start();
            if !path.starts_with('/') || path.ends_with(" (deleted)") {
                return None;
            }
            let hex = |v: &str| u64::from_str_radix(v, 16).ok();
            Some(Mapping {
                path: PathBuf::from(path),
                start: hex(start)?,
                end: hex(end)?,
                offset: hex(offset)?,
            })
        })
        .collect()
}

/// For each mapped file, the file pages this process has in its page table (touched, or mapped
/// around a touch by the kernel's fault-around), or `None` (the whole file) where `pagemap` is
/// missing or does not answer.
fn touched_pages(mappings: &[Mapping], pagemap: Option<&File>) -> BTreeMap<PathBuf, Option<BTreeSet<u64>>> {
    let mut touched: BTreeMap<PathBuf, Option<BTreeSet<u64>>> = BTreeMap::new();
    for m in mappings {
        let entry = touched.entry(m.path.clone()).or_insert_with(|| Some(BTreeSet::new()));
        let Some(pages) = entry else { continue };
        let count = (m.end - m.start) / PAGE;
        let mut words = vec![0u8; (count * 8) as usize];
        match pagemap.map(|p| p.read_exact_at(&mut words, m.start / PAGE * 8)) {
            Some(Ok(())) => {}
            _ => {
                *entry = None;
                continue;
            }
        }
        for (i, word) in words.chunks_exact(8).enumerate() {
            let word = u64::from_le_bytes(word.try_into().unwrap_or_default());
            if word & PAGEMAP_IN_USE != 0 {
                pages.insert(m.offset / PAGE + i as u64);
            }
        }
    }
    touched
}

/// Runs of consecutive pages as byte ranges, clipped to a file of `len` bytes.
fn byte_ranges(pages: &BTreeSet<u64>, len: u64) -> Vec<Range<u64>> {
    let mut ranges: Vec<Range<u64>> = Vec::new();
    for &page in pages {
        let (start, end) = (page * PAGE, ((page + 1) * PAGE).min(len));
        if start >= end {
            continue;
        }
        match ranges.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ => ranges.push(start..end),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_give_file_mappings_with_their_offsets_and_nothing_else() {
        let maps = "\
55d0c0a00000-55d0c0a3f000 r--p 00000000 00:02 12   /init
55d0c0a3f000-55d0c0d00000 r-xp 0003f000 00:02 12   /init
7f1e2c000000-7f1e2c021000 rw-p 00000000 00:00 0 
7f1e2d4a0000-7f1e2d600000 r-xp 000a0000 00:02 40   /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7f1e2d700000-7f1e2d710000 r--p 00000000 00:02 41   /run/old file (deleted)
7f1e2d800000-7f1e2d810000 r--p 00000000 00:02 42   /usr/lib/x86_64-linux-gnu/lib with space.so
7ffd6a1b6000-7ffd6a1d7000 rw-p 00000000 00:00 0    [stack]
7ffd6a1f2000-7ffd6a1f4000 r-xp 00000000 00:00 0    [vdso]
";
        let m = |path: &str, start, end, offset| Mapping { path: path.into(), start, end, offset };
        assert_eq!(
            mappings(maps),
            vec![
                m("/init", 0x55d0c0a00000, 0x55d0c0a3f000, 0),
                m("/init", 0x55d0c0a3f000, 0x55d0c0d00000, 0x3f000),
                m("/usr/lib/x86_64-linux-gnu/libcrypto.so.3", 0x7f1e2d4a0000, 0x7f1e2d600000, 0xa0000),
                m("/usr/lib/x86_64-linux-gnu/lib with space.so", 0x7f1e2d800000, 0x7f1e2d810000, 0),
            ]
        );
    }

    #[test]
    fn runs_of_pages_become_byte_ranges_clipped_to_the_file() {
        let pages: BTreeSet<u64> = [0, 1, 2, 5, 9, 10].into_iter().collect();
        assert_eq!(
            byte_ranges(&pages, 10 * PAGE + 100),
            vec![0..3 * PAGE, 5 * PAGE..6 * PAGE, 9 * PAGE..10 * PAGE + 100]
        );
        assert_eq!(byte_ranges(&[7].into_iter().collect(), 7 * PAGE), Vec::<Range<u64>>::new());
    }

    /// This test's own program has run: some of its pages are in the page table, at most all.
    #[test]
    fn this_process_has_touched_pages_of_its_own_program() {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let touched = touched_pages(&mappings(&maps), Some(&pagemap));
        let pages = touched[&exe].as_ref().expect("pagemap answered");
        let file_pages = std::fs::metadata(&exe).unwrap().len().div_ceil(PAGE);
        assert!(!pages.is_empty() && pages.iter().all(|p| *p < file_pages), "{} pages", pages.len());
        // Without a page table, whole files.
        assert!(touched_pages(&mappings(&maps), None)[&exe].is_none());
    }

    #[test]
    fn the_program_comes_first_and_the_mapped_files_are_opened_under_the_root() {
        let root = tempfile::tempdir().unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let exe_len = std::fs::metadata(&exe).unwrap().len();
        std::fs::create_dir_all(root.path().join("sbin")).unwrap();
        // Stage 2's program is this process's own executable, under another name.
        std::fs::copy(&exe, root.path().join("sbin/stage2")).unwrap();
        let opened = Stage2Files::open(root.path(), "/sbin/stage2");
        // Libraries this test maps are not under the temporary root: only the program counts.
        assert_eq!((opened.count(), opened.file_bytes), (1, exe_len));
        assert!(opened.bytes > 0 && opened.bytes <= exe_len, "{} of {exe_len} bytes", opened.bytes);
        assert_eq!(opened.read_ahead(), 1);
    }
}
