//! The last phase: one image file from the layout, the ESP contents and the root partition.
//! Written under a temporary name in the output directory and renamed into place only when
//! complete and synced, so an output path never holds a partial image.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::esp::{write_esp, EspError};
use crate::gpt::{write_gpt, GptWriteError};
use crate::layout::Layout;
use crate::luks::Partition;

const CHUNK: usize = 1024 * 1024;

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
    /// `<out>.bmap` beside it. The sync and the two hashing passes (the whole image; each data
    /// range for the map) run side by side: each alone takes about as long as the others.
    pub fn finish(self) -> Result<ImageSummary, AssembleError> {
        let write_err = |source| AssembleError::Write { path: self.out.clone(), source };
        let (synced, sha256, bmap) = std::thread::scope(|s| {
            let synced = s.spawn(|| self.file.sync_all());
            let sha256 = s.spawn(|| hash(&self.file));
            let bmap = cloister_bmap::map_image(&self.file);
            (join(synced), join(sha256), bmap)
        });
        synced.map_err(write_err)?;
        let sha256 = sha256.map_err(write_err)?;
        let bmap = bmap.map_err(write_err)?;
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

fn hash(image: &File) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0;
    loop {
        let n = match image.read_at(&mut buf, at) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => r?,
        };
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hex::encode(hasher.finalize()))
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
