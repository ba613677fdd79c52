//! The last phase: one image file from the layout, the ESP contents and the root partition.
//! Written under a temporary name in the output directory and renamed into place only when
//! complete and synced, so an output path never holds a partial image.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::direct::{self, AlignedBuf};
use crate::esp::{write_esp, EspError};
use crate::gpt::{write_gpt, GptWriteError};
use crate::layout::Layout;
use crate::luks::Partition;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    /// The block map beside the image: `cargo xtask flash` and `bmaptool copy` write only its
    /// data ranges and check each one's SHA256.
    pub bmap: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("create image {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("write image {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Gpt(#[from] GptWriteError),
    #[error("esp of {path}: {source}")]
    Esp { path: PathBuf, source: EspError },
    #[error(transparent)]
    Bmap(#[from] cloister_bmap::BmapError),
}

/// An image being written: made with its partition table and the root's space reserved, then
/// the ESP ([`ImageWriter::write_esp`]) and the root partition (see [`crate::luks::encrypt`])
/// are filled before [`ImageWriter::finish`]. Dropped unfinished, it leaves nothing behind.
pub struct ImageWriter {
    tmp: TempOut,
    file: File,
    out: PathBuf,
    bytes: u64,
    root: (u64, u64),
    esp: (u64, u64),
}

impl ImageWriter {
    /// Creates `<out>.tmp-<pid>` of the layout's size (sparse: holes stay holes), reserves the
    /// root partition's space (`fallocate`: a full disk fails here, before a build's minutes of
    /// work) and writes the partition table.
    pub fn create(out: &Path, layout: &Layout) -> Result<Self, AssembleError> {
        let tmp = TempOut::new(out);
        let write_err = |source| AssembleError::Write { path: out.into(), source };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp.0)
            .map_err(|source| AssembleError::Create { path: out.into(), source })?;
        file.set_len(layout.disk_bytes).map_err(write_err)?;
        let root = (layout.root.offset_bytes(), layout.root.size_bytes());
        crate::luks::reserve(&file, root.0, root.1).map_err(write_err)?;
        write_gpt(&mut file, out, layout)?;
        let esp = (layout.esp.offset_bytes(), layout.esp.size_bytes());
        Ok(Self { tmp, file, out: out.into(), bytes: layout.disk_bytes, root, esp })
    }

    /// Formats the ESP with `esp_files` in it.
    pub fn write_esp(&self, esp_files: &[(&str, &Path)]) -> Result<(), AssembleError> {
        write_esp(&self.tmp.0, self.esp.0, self.esp.1, esp_files)
            .map_err(|source| AssembleError::Esp { path: self.out.clone(), source })
    }

    /// The root partition's place in the image.
    pub fn root_partition(&self) -> Partition<'_> {
        Partition { file: &self.file, path: &self.out, offset: self.root.0, bytes: self.root.1 }
    }

    /// Syncs, hashes, renames onto the output path and writes `<out>.sha256` and the block map
    /// `<out>.bmap` beside it. The sync runs beside one read of the image that feeds both
    /// hashes (the whole image; each data range for the map).
    pub fn finish(self) -> Result<ImageSummary, AssembleError> {
        let write_err = |source| AssembleError::Write { path: self.out.clone(), source };
        let (synced, hashed) = std::thread::scope(|s| {
            let synced = s.spawn(|| self.file.sync_all());
            let hashed = hash_and_map(&self.file);
            (join(synced), hashed)
        });
        synced.map_err(write_err)?;
        let (sha256, bmap) = hashed.map_err(write_err)?;
        let Self { tmp, file, out, bytes, .. } = self;
        drop(file);
        tmp.commit(&out)?;
        write_checksum(&out, &sha256)?;
        let bmap_path = sibling(&out, ".bmap");
        cloister_bmap::save_bmap(&bmap, &bmap_path)?;
        Ok(ImageSummary { path: out, bytes, sha256, bmap: bmap_path })
    }
}

fn join<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// `<out><suffix>` in the same directory.
fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    out.with_file_name(name)
}

/// The image's SHA256 and block map from one read of it, in [`READ_BYTES`] blocks read directly
/// into two reused buffers (the image was just written: through the page cache, the read would
/// fill fresh pages again): while two threads hash one block, for the image and for the map,
/// this one reads the next.
fn hash_and_map(image: &File) -> io::Result<(String, cloister_bmap::Bmap)> {
    let size = image.metadata()?.len();
    let mut mapper = cloister_bmap::Mapper::new(image)?;
    let direct = direct::reopen(image, direct::Access::Read);
    let source = Source { buffered: image, direct: direct.as_ref() };
    let mut whole = Sha256::new();
    let (mut cur, mut next) = (AlignedBuf::new(READ_BYTES), AlignedBuf::new(READ_BYTES));
    let mut at = 0;
    let mut filled = source.read(cur.as_mut_slice(), at, size)?;
    while filled > 0 {
        let block = &cur.as_slice()[..filled];
        let following = std::thread::scope(|s| {
            let image_hash = s.spawn(|| whole.update(block));
            let map_hash = s.spawn(|| mapper.feed(at, block));
            let following = source.read(next.as_mut_slice(), at + filled as u64, size);
            join(image_hash);
            join(map_hash);
            following
        })?;
        at += filled as u64;
        filled = following;
        std::mem::swap(&mut cur, &mut next);
    }
    Ok((hex::encode(whole.finalize()), mapper.finish()?))
}

/// What to read a block with and how big one is.
const READ_BYTES: usize = 8 * 1024 * 1024;

/// The image, and the same file opened for direct reads where the file system has them.
struct Source<'a> {
    buffered: &'a File,
    direct: Option<&'a File>,
}

impl Source<'_> {
    /// Fills `buf` from `at`, or up to the image's end (`size`); returns the bytes read.
    fn read(&self, buf: &mut [u8], at: u64, size: u64) -> io::Result<usize> {
        let want = (size.saturating_sub(at)).min(buf.len() as u64) as usize;
        // A direct read asks for whole blocks; past the end the kernel only returns less.
        let asked = want.next_multiple_of(direct::ALIGN).min(buf.len());
        if let (Some(direct), true) = (self.direct, direct::aligned(&buf[..asked], at)) {
            match read_fully(direct, &mut buf[..asked], at) {
                Ok(n) => return Ok(n.min(want)),
                Err(e) if direct::refused(&e) => {}
                Err(e) => return Err(e),
            }
        }
        read_fully(self.buffered, &mut buf[..want], at)
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_fully(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], at + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// `<hex>  <file name>\n`, the format `sha256sum -c` reads, next to the image.
fn write_checksum(out: &Path, sha256: &str) -> Result<(), AssembleError> {
    let mut sum_name = out.file_name().unwrap_or_default().to_os_string();
    let line = format!("{sha256}  {}\n", sum_name.to_string_lossy());
    sum_name.push(".sha256");
    let sum_path = out.with_file_name(sum_name);
    let tmp = TempOut::new(&sum_path);
    std::fs::write(&tmp.0, line).map_err(|source| AssembleError::Write { path: sum_path.clone(), source })?;
    tmp.commit(&sum_path)
}

/// `<out>.tmp-<pid>`, removed unless committed.
struct TempOut(PathBuf, bool);

impl TempOut {
    fn new(out: &Path) -> Self {
        let mut name = out.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".tmp-{}", std::process::id()));
        Self(out.with_file_name(name), false)
    }

    /// Renames onto `out` and syncs the directory so the rename itself survives a crash.
    fn commit(mut self, out: &Path) -> Result<(), AssembleError> {
        let write_err = |source| AssembleError::Write { path: out.into(), source };
        std::fs::rename(&self.0, out).map_err(write_err)?;
        self.1 = true;
        let dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir).and_then(|d| d.sync_all()).map_err(write_err)
    }
}

impl Drop for TempOut {
    fn drop(&mut self) {
        if !self.1 {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
