//! The background fill of the grown area, and the XFS growth that waits for it. After stage 1
//! grew the partition and the dm-crypt mapping, the mapping's new tail still holds whatever the
//! stick held before (a flasher writes only the image): readable as plaintext by anyone with
//! the stick, and telling which blocks the appliance later writes. Zeros written through the
//! mapping reach the stick as ciphertext, so PID 1 runs `cloister-init --grow-fill`, a child at
//! idle I/O and CPU priority, that writes them from the end of the XFS data section to the end
//! of the mapping, and grows XFS over the area only once it is filled.
//!
//! Why a power cut at any point is harmless:
//! - XFS never touches the mapping beyond its data section until it grows, so the fill writes
//!   where nothing lives, and writing a range twice leaves the same ciphertext.
//! - Progress is recorded in [`STATE_FILE`] under the state directory only after the device was
//!   synced up to that offset (data first, then the record, which is replaced whole: temporary
//!   file, fsync, rename, fsync of the directory). A cut loses at most the bytes since the last
//!   record, which the next boot writes again.
//! - The record says "filled" before XFS grows and "done" after; growfs itself is one XFS
//!   transaction. A missing or unreadable record means "start at the XFS end": a redo.
//!
//! Each boot compares XFS, mapping and record ([`plan`]) and does only what is left, so the
//! fill resumes after a reboot and a finished disk has nothing to do.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::fcntl::OFlag;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use serde::{Deserialize, Serialize};
use serde_json::json;

use cloister_plan::{Readiness, Restart, Service, STATE_DIR};
use cloister_proto::{marker, ROOT_MAPPING};

use super::GrowError;
use crate::ioctl;

/// `cloister-init --grow-fill`: the child PID 1 supervises as [`SERVICE`].
pub const FILL_ARG: &str = "--grow-fill";
/// Its name among the services (`status`, `restart grow-fill`, console prefix).
pub const SERVICE: &str = "grow-fill";
/// The progress record, in the state directory of the root it describes.
pub const STATE_FILE: &str = "grow-fill.json";
/// One write: large enough for a USB stick to stream, small enough to stop promptly.
const CHUNK: usize = 4 << 20;
/// Sync the device and record progress this often: what a power cut can cost again.
const CHECKPOINT: u64 = 64 << 20;
/// O_DIRECT alignment, and the sector size of the image's LUKS2 and XFS.
const ALIGN: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error("open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("size of {path}: {source}")]
    Size { path: PathBuf, source: nix::Error },
    #[error("xfs geometry of {path}: {source}")]
    Geometry { path: PathBuf, source: nix::Error },
    #[error("{what} {value} is not a multiple of {ALIGN}")]
    Unaligned { what: &'static str, value: u64 },
    #[error("write at offset {offset}: {source}")]
    Write { offset: u64, source: std::io::Error },
    #[error("sync the mapping at offset {offset}: {source}")]
    Sync { offset: u64, source: std::io::Error },
    #[error("record the progress in {path}: {source}")]
    Record { path: PathBuf, source: std::io::Error },
    #[error("stop signals: {0}")]
    Signals(nix::Error),
    #[error(transparent)]
    Grow(#[from] GrowError),
    #[error("refusing to run: {0}")]
    Guard(String),
}

/// The record: `[from, filled_to)` of the mapping holds ciphertext written by the fill (or was
/// already XFS); `end` is the mapping's size the fill aims at; `done` once XFS grew over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub from: u64,
    pub filled_to: u64,
    pub end: u64,
    pub done: bool,
}

/// What is left, from the XFS data section's end, the mapping's size and the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    Nothing,
    /// Write `resume..end`; the fill as a whole started at `from` (for progress).
    Fill {
        from: u64,
        resume: u64,
        end: u64,
    },
    /// Filled to `end` already; XFS still has to grow over `from..end`.
    Grow {
        from: u64,
        end: u64,
    },
}

impl Work {
    /// Bytes still to write, for stage 1's line; `None` when nothing at all is left.
    pub fn to_fill(self) -> Option<u64> {
        match self {
            Work::Nothing => None,
            Work::Fill { resume, end, .. } => Some(end - resume),
            Work::Grow { .. } => Some(0),
        }
    }
}

/// Decides what is left. A record counts only if it can be true of this disk: it started no
/// later than the XFS end (XFS never shrinks) and aimed no further than the mapping reaches
/// (a record from a bigger disk is not this one's).
pub fn plan(xfs_end: u64, mapping: u64, state: Option<&State>) -> Work {
    if xfs_end >= mapping {
        return Work::Nothing;
    }
    let state = state.filter(|s| s.from <= s.filled_to && s.filled_to <= s.end && s.end <= mapping);
    let (from, resume) = match state {
        // XFS grew as far as it would (it leaves out a last group too small for its headers).
        Some(s) if s.done && s.end == mapping => return Work::Nothing,
        // The disk grew again since (the image copied to a bigger stick): the new tail only.
        Some(s) if s.done => (s.end.max(xfs_end), s.end.max(xfs_end)),
        Some(s) if s.from <= xfs_end => (s.from, s.filled_to.max(xfs_end)),
        _ => (xfs_end, xfs_end),
    };
    if resume >= mapping {
        Work::Grow { from, end: mapping }
    } else {
        Work::Fill { from, resume, end: mapping }
    }
}

/// The record, or `None` when there is none or it cannot be read: then the fill starts over,
/// which costs time but is never wrong.
pub fn load(path: &Path) -> Option<State> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

fn save(path: &Path, state: &State) -> Result<(), FillError> {
    let text = serde_json::to_string(state).unwrap_or_default() + "\n";
    crate::passwd::write_replacing(path, &text, 0o600)
        .map_err(|source| FillError::Record { path: path.to_owned(), source })
}

/// What stage 1 and stage 2 look at: the mounted XFS's data end, the mapping's size and the
/// record under `root` (the root file system's mount point: `/sysroot` or `/`).
pub fn work_at(root: &Path) -> Result<Work, FillError> {
    let (xfs_end, _) = xfs_end(root)?;
    let mapping = mapping_path();
    let f = File::open(&mapping).map_err(|source| FillError::Open { path: mapping.clone(), source })?;
    let bytes = ioctl::device_bytes(&f).map_err(|source| FillError::Size { path: mapping, source })?;
    Ok(plan(xfs_end, bytes, load(&state_path(root)).as_ref()))
}

pub fn state_path(root: &Path) -> PathBuf {
    root.join(STATE_DIR.trim_start_matches('/')).join(STATE_FILE)
}

fn mapping_path() -> PathBuf {
    Path::new("/dev/mapper").join(ROOT_MAPPING)
}

/// The XFS data section's end in bytes, and its block count.
fn xfs_end(root: &Path) -> Result<(u64, u64), FillError> {
    let dir = File::open(root).map_err(|source| FillError::Open { path: root.to_owned(), source })?;
    let g =
        ioctl::xfs_geometry(&dir).map_err(|source| FillError::Geometry { path: root.to_owned(), source })?;
    Ok((g.datablocks * u64::from(g.blocksize), g.datablocks))
}

/// The supervised child's description. PID 1 starts it directly, not through the launch chain:
/// it must open the root's dm-crypt device and grow the mounted root (CAP_SYS_ADMIN), which
/// no sandbox view of the file system could take away from it anyway. Only the name, the
/// arguments and the restart policy are used.
pub fn service() -> Service {
    Service {
        name: SERVICE.into(),
        exec: cloister_proto::STAGE2_PATH.into(),
        args: vec![FILL_ARG.into()],
        uid: 0,
        gid: 0,
        groups: Vec::new(),
        env: Vec::new(),
        workdir: "/".into(),
        namespaces: Default::default(),
        mounts: Default::default(),
        caps_bounding: Vec::new(),
        caps_ambient: Vec::new(),
        no_new_privs: false,
        rlimits: cloister_plan::Rlimits { nproc: None, nofile: None, address_space: None, core: Some(0) },
        after: Vec::new(),
        ready: Readiness::Started,
        // An I/O error is worth a few tries, minutes apart; then `failed` in status, the rest
        // of the appliance unaffected and the disk as safe as before (XFS has not grown).
        restart: Restart {
            initial_delay_ms: 10_000,
            max_delay_ms: 300_000,
            max_exits: 5,
            window_ms: 3_600_000,
            stable_ms: 600_000,
            ready_timeout_ms: 10_000,
            stop_grace_ms: 10_000,
        },
        terminal: None,
    }
}

/// The `grow` object of the control socket's `status`, from the record.
pub fn status(root: &Path) -> serde_json::Value {
    match load(&state_path(root)) {
        None => json!(null),
        Some(s) => {
            let total = s.end.saturating_sub(s.from).max(1);
            let percent = (s.filled_to.saturating_sub(s.from) as f64 * 100.0 / total as f64).min(100.0);
            json!({
                "state": if s.done { "done" } else if s.filled_to >= s.end { "filled" } else { "filling" },
                "from": s.from,
                "filled_to": s.filled_to,
                "end": s.end,
                "percent": (percent * 10.0).round() / 10.0,
            })
        }
    }
}

/// Why [`fill`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// Everything up to the end is on disk and recorded.
    All,
    /// Asked to stop; this much is on disk and recorded.
    Stopped(u64),
}

/// Writes zeros to `dev` over `resume..end`, `chunk` bytes at a time (`dev` may be opened with
/// O_DIRECT: the buffer and every offset are 4096-aligned). Every `every` bytes and at the end
/// it syncs `dev` and only then records the progress in `record`; `stop` is asked between
/// chunks and ends the fill at the next record. `progress` hears every recorded offset.
pub fn fill(
    dev: &File,
    record: &Path,
    (from, resume, end): (u64, u64, u64),
    (chunk, every): (usize, u64),
    stop: &mut dyn FnMut() -> bool,
    progress: &mut dyn FnMut(u64),
) -> Result<Filled, FillError> {
    for (what, value) in [("start", resume), ("end", end), ("chunk", chunk as u64)] {
        if value % ALIGN != 0 {
            return Err(FillError::Unaligned { what, value });
        }
    }
    let mut buf = Aligned::zeroed(chunk);
    let zeros = buf.get(chunk);
    let mut at = resume;
    let mut since = 0u64;
    while at < end {
        let n = (end - at).min(chunk as u64) as usize;
        dev.write_all_at(&zeros[..n], at).map_err(|source| FillError::Write { offset: at, source })?;
        at += n as u64;
        since += n as u64;
        let stopping = stop();
        if since >= every || at == end || stopping {
            // Data first, then the record that vouches for it.
            dev.sync_data().map_err(|source| FillError::Sync { offset: at, source })?;
            save(record, &State { from, filled_to: at, end, done: false })?;
            progress(at);
            since = 0;
            if stopping && at < end {
                return Ok(Filled::Stopped(at));
            }
        }
    }
    Ok(Filled::All)
}

/// A zeroed buffer whose start is 4096-aligned for O_DIRECT, without `unsafe`.
struct Aligned {
    buf: Vec<u8>,
    start: usize,
}

impl Aligned {
    fn zeroed(len: usize) -> Self {
        let buf = vec![0u8; len + ALIGN as usize];
        let start = buf.as_ptr().align_offset(ALIGN as usize);
        Self { buf, start }
    }

    fn get(&mut self, len: usize) -> &[u8] {
        &self.buf[self.start..self.start + len]
    }
}

/// `cloister-init --grow-fill`: one line per tenth on stdout (PID 1 shows it as the service's
/// output), exit 0 when done or stopped by SIGTERM, 1 on an error (PID 1 restarts it later).
pub fn run_mode() -> ! {
    match child() {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            println!("cloister: grow: fill failed: {e}");
            std::process::exit(1)
        }
    }
}

fn child() -> Result<(), FillError> {
    // It writes to the root's block device: only as PID 1's child on an appliance, never on a
    // developer's host.
    if !crate::cmdline::Cmdline::read().is_appliance() {
        return Err(FillError::Guard(format!(
            "kernel command line lacks {}",
            cloister_proto::CMDLINE_APPLIANCE
        )));
    }
    if nix::unistd::getppid().as_raw() != 1 {
        return Err(FillError::Guard("not a child of pid 1".into()));
    }
    // Below everyone else: the appliance's own I/O and CPU come first.
    if let Err(e) = crate::sys::idle_io_priority() {
        println!("cloister: grow: idle i/o priority: {e}");
    }
    if let Err(e) = crate::sys::lowest_cpu_priority() {
        println!("cloister: grow: nice 19: {e}");
    }
    let signals = stop_signals().map_err(FillError::Signals)?;
    let root = Path::new("/");
    let record = state_path(root);
    let (from, end) = match work_at(root)? {
        Work::Nothing => return Ok(()),
        Work::Grow { from, end } => (from, end),
        Work::Fill { from, resume, end } => {
            if resume > from {
                println!("{} {resume} of {end}", marker::GROW_RESUMING);
            }
            println!(
                "{} {resume}..{end} ({} bytes) with ciphertext, at idle priority",
                marker::GROW_FILLING,
                end - resume
            );
            let path = mapping_path();
            let dev = OpenOptions::new()
                .write(true)
                .custom_flags(OFlag::O_DIRECT.bits())
                .open(&path)
                .map_err(|source| FillError::Open { path, source })?;
            let started = Instant::now();
            let mut tenth = tenths(from, resume, end);
            let mut stop = || signals.read_signal().ok().flatten().is_some();
            let mut progress = |at: u64| {
                let now = tenths(from, at, end);
                if now > tenth {
                    tenth = now;
                    println!("{} {}% ({at} of {end})", marker::GROW_FILLED, now * 10);
                }
            };
            match fill(&dev, &record, (from, resume, end), (CHUNK, CHECKPOINT), &mut stop, &mut progress)? {
                Filled::Stopped(at) => {
                    println!("cloister: grow: fill stopped at {at} of {end}; the next boot resumes it");
                    return Ok(());
                }
                Filled::All => {
                    let secs = started.elapsed().as_secs_f64();
                    println!(
                        "cloister: grow: filled {} bytes in {secs:.1} s ({:.1} MB/s)",
                        end - resume,
                        (end - resume) as f64 / secs.max(1e-3) / 1e6
                    );
                }
            }
            (from, end)
        }
    };
    let grown = super::grow_xfs(root, end)?;
    save(&record, &State { from, filled_to: end, end, done: true })?;
    match grown {
        Some((before, after)) => {
            println!("{} {before} -> {after} blocks ({} bytes filled)", marker::GROW_XFS, end - from)
        }
        None => println!("{} unchanged ({} bytes filled)", marker::GROW_XFS, end - from),
    }
    Ok(())
}

/// How many tenths of `from..end` lie below `at`.
fn tenths(from: u64, at: u64, end: u64) -> u64 {
    (at.saturating_sub(from) as u128 * 10 / u128::from(end.saturating_sub(from).max(1))) as u64
}

/// SIGTERM and SIGINT as a descriptor the fill polls between chunks: PID 1 stops it with
/// SIGTERM at shutdown, and it records its progress before it exits.
fn stop_signals() -> nix::Result<SignalFd> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
}

#[cfg(test)]
mod tests;
