//! The last phase: one image file from the layout, the ESP contents and the encrypted root
//! partition. Written under a temporary name in the output directory and renamed into place
//! only when complete and synced, so an output path never holds a partial image.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::esp::{write_esp, EspError};
use crate::gpt::{write_gpt, GptWriteError};
use crate::layout::Layout;

const CHUNK: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("create image {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("write image {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("root file {path} is {size} bytes, the root partition only {partition}")]
    RootTooLarge { path: PathBuf, size: u64, partition: u64 },
    #[error(transparent)]
    Gpt(#[from] GptWriteError),
    #[error("esp of {path}: {source}")]
    Esp { path: PathBuf, source: EspError },
}

/// Writes the image to `out` (and `<out>.sha256`). `progress` gets (bytes done, bytes total)
/// while the root partition is copied.
pub fn assemble(
    out: &Path,
    layout: &Layout,
    esp_files: &[(&str, &Path)],
    root_file: &Path,
    progress: Option<&mut dyn FnMut(u64, u64)>,
) -> Result<ImageSummary, AssembleError> {
    let tmp = TempOut::new(out);
    let write_err = |source| AssembleError::Write { path: out.into(), source };
    let mut image = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp.0)
        .map_err(|source| AssembleError::Create { path: out.into(), source })?;
    // Holes stay holes: only GPT, ESP and non-zero root chunks are written.
    image.set_len(layout.disk_bytes).map_err(write_err)?;
    write_gpt(&mut image, out, layout)?;
    write_esp(&tmp.0, layout.esp.offset_bytes(), layout.esp.size_bytes(), esp_files)
        .map_err(|source| AssembleError::Esp { path: out.into(), source })?;
    copy_root(&mut image, out, layout, root_file, progress)?;
    image.sync_all().map_err(write_err)?;
    let sha256 = hash(&mut image).map_err(write_err)?;
    drop(image);
    tmp.commit(out)?;
    write_checksum(out, &sha256)?;
    Ok(ImageSummary { path: out.into(), bytes: layout.disk_bytes, sha256 })
}

fn copy_root(
    image: &mut File,
    out: &Path,
    layout: &Layout,
    root_file: &Path,
    mut progress: Option<&mut dyn FnMut(u64, u64)>,
) -> Result<(), AssembleError> {
    let read_err = |source| AssembleError::Read { path: root_file.into(), source };
    let write_err = |source| AssembleError::Write { path: out.into(), source };
    let mut root = File::open(root_file).map_err(read_err)?;
    let total = root.metadata().map_err(read_err)?.len();
    let partition = layout.root.size_bytes();
    if total > partition {
        return Err(AssembleError::RootTooLarge { path: root_file.into(), size: total, partition });
    }
    image.seek(SeekFrom::Start(layout.root.offset_bytes())).map_err(write_err)?;
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < total {
        let n = fill(&mut root, &mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|&b| b == 0) {
            image.seek(SeekFrom::Current(n as i64)).map_err(write_err)?;
        } else {
            image.write_all(&buf[..n]).map_err(write_err)?;
        }
        done += n as u64;
        if let Some(p) = progress.as_mut() {
            p(done, total);
        }
    }
    Ok(())
}

/// Reads until `buf` is full or the input ends.
fn fill(input: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn hash(image: &mut File) -> io::Result<String> {
    image.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = fill(image, &mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
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
