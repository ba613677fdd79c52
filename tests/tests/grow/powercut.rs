//! Power cuts during the first boot's growth, replayed on the host: QEMU logged every write the
//! guest made to its disk (`VmConfig::write_log`); replaying the log's writes that touch the GPT
//! areas (primary, the old backup at the image's end, the new one at the disk's end) and the
//! LUKS2 header area onto those areas as they were before the boot gives every state a power
//! cut could leave them in: each prefix of the writes, each write torn after every sector, and,
//! because a disk's cache may keep any of the writes since the last flush and lose the others,
//! every subset of the writes between two flushes on top of everything before them. At each
//! state util-linux must read a GPT (not the protective MBR's fallback) whose root partition has
//! the old or the new size and the root's PARTUUID, and `cryptsetup` must read the LUKS2 header
//! and open a keyslot with the passphrase. No device-mapper needed.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use cloister_tests::writelog::{Entry, Kind, Replay, WriteLog};
use cloister_tests::*;
use sha2::{Digest, Sha256};

const SECTOR: u64 = 512;
/// A write longer than this many sectors inside the areas is torn at 4 KiB steps instead.
const FINE_TEAR_SECTORS: u64 = 256;
/// Subsets are tried for a flush interval with at most this many writes in the areas.
const MAX_SUBSET_WRITES: usize = 10;

/// One area of the disk, as it was before the boot and as the replay has made it.
struct Area {
    name: &'static str,
    range: Range<u64>,
    replay: Replay,
    writes: usize,
}

/// The areas, read from the disk before the logged boot.
pub struct Areas {
    gpt: Vec<Area>,
    luks: Area,
}

/// What every cut must show.
pub struct Expect<'a> {
    pub old_sectors: u64,
    pub new_sectors: u64,
    pub root_uuid: &'a str,
    pub passphrase: &'a str,
}

/// What the replay saw, for the test's log.
#[derive(Debug, Default)]
pub struct Summary {
    pub writes: Vec<(&'static str, usize)>,
    pub cut_points: usize,
    /// Writes in the areas per flush interval that had any, in log order.
    pub per_flush_interval: Vec<usize>,
    pub subset_states: usize,
    pub gpt_states: usize,
    pub old_size_states: usize,
    pub new_size_states: usize,
    pub verify_clean_states: usize,
    pub luks_states: usize,
}

impl Areas {
    /// `gpt`: the named GPT areas; `luks`: the LUKS2 header area.
    pub fn snapshot(disk: &Path, gpt: &[(&'static str, Range<u64>)], luks: Range<u64>) -> Result<Areas> {
        let area = |name, range: Range<u64>| -> Result<Area> {
            Ok(Area { name, replay: Replay::from_disk(disk, range.clone())?, range, writes: 0 })
        };
        Ok(Areas {
            gpt: gpt.iter().map(|(n, r)| area(n, r.clone())).collect::<Result<_>>()?,
            luks: area("luks2 header", luks)?,
        })
    }

    fn all(&mut self) -> impl Iterator<Item = &mut Area> {
        self.gpt.iter_mut().chain(std::iter::once(&mut self.luks))
    }

    fn apply(&mut self, entry: &Entry, data: &[u8], upto: Option<u64>) {
        for area in self.all() {
            area.replay.apply(entry, data, upto);
        }
    }

    /// A copy of the replayed bytes, to try a subset of writes on.
    fn clone_state(&self) -> Areas {
        let copy =
            |a: &Area| Area { name: a.name, range: a.range.clone(), replay: a.replay.clone(), writes: 0 };
        Areas { gpt: self.gpt.iter().map(copy).collect(), luks: copy(&self.luks) }
    }
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Replays `log` over `areas` and checks every cut point; `work` holds the scratch disk.
pub fn check_every_cut(
    mut areas: Areas,
    log: &Path,
    disk_bytes: u64,
    work: &Path,
    expect: &Expect,
) -> Result<Summary> {
    let mut wl = WriteLog::open(log)?;
    let ranges: Vec<Range<u64>> = areas.all().map(|a| a.range.clone()).collect();
    // The writes in the areas, grouped by the flushes between them.
    let mut intervals: Vec<Vec<Entry>> = vec![Vec::new()];
    for e in &wl.entries {
        match e.kind {
            Kind::Flush => intervals.push(Vec::new()),
            _ if ranges.iter().any(|r| overlaps(&e.disk, r)) => {
                intervals.last_mut().into_iter().for_each(|i| i.push(e.clone()))
            }
            _ => {}
        }
    }
    intervals.retain(|i| !i.is_empty());
    for area in areas.all() {
        area.writes = intervals.iter().flatten().filter(|e| overlaps(&e.disk, &area.range)).count();
    }
    let mut checker = Checker::new(work, disk_bytes, expect)?;
    let mut summary = Summary::default();
    checker.check(&mut areas, &mut summary).context("before the first write")?;
    for (k, interval) in intervals.iter().enumerate() {
        summary.per_flush_interval.push(interval.len());
        let data: Vec<Vec<u8>> = interval.iter().map(|e| wl.data(e)).collect::<Result<_>>()?;
        // Any subset of this interval's writes, on top of all earlier intervals.
        if (2..=MAX_SUBSET_WRITES).contains(&interval.len()) {
            for mask in 1..(1u32 << interval.len()) - 1 {
                let mut state = areas.clone_state();
                for (i, (entry, data)) in interval.iter().zip(&data).enumerate() {
                    if mask & (1 << i) != 0 {
                        state.apply(entry, data, None);
                    }
                }
                summary.subset_states += 1;
                let at = format!("flush interval {k}: writes {mask:#b} of {} persisted", interval.len());
                checker.check(&mut state, &mut summary).with_context(|| at.clone())?;
            }
        }
        // In order: each write torn after each sector that lands in an area, then whole.
        for (n, (entry, data)) in interval.iter().zip(&data).enumerate() {
            let len = entry.disk.end - entry.disk.start;
            let inside: Vec<u64> = (1..len / SECTOR)
                .map(|s| s * SECTOR)
                .filter(|t| {
                    let sector = entry.disk.start + t - SECTOR..entry.disk.start + t;
                    ranges.iter().any(|r| overlaps(&sector, r))
                })
                .collect();
            let step = if inside.len() as u64 > FINE_TEAR_SECTORS { 8 } else { 1 };
            let tears = inside.iter().copied().filter(|t| (t / SECTOR).is_multiple_of(step)).map(Some);
            for upto in tears.chain(std::iter::once(None)) {
                areas.apply(entry, data, upto);
                let at = format!(
                    "flush interval {k}, write {n} ({:?} at {}), torn at {upto:?}",
                    entry.kind, entry.disk.start
                );
                checker.check(&mut areas, &mut summary).with_context(|| at.clone())?;
            }
        }
    }
    summary.writes = areas.all().map(|a| (a.name, a.writes)).collect();
    ensure!(summary.old_size_states > 0, "no cut point showed the old table: {summary:?}");
    // The state after the whole log, checked again whether or not it was seen before.
    checker.seen_gpt.clear();
    let mut last = Summary::default();
    checker.check(&mut areas, &mut last).context("after the whole log")?;
    ensure!(checker.last_was_new, "after the whole log the root is not at its new size: {summary:?}");
    ensure!(checker.last_verify_clean, "after the whole log sfdisk --verify is not clean");
    Ok(summary)
}

/// A sparse disk of the real size holding the replayed GPT areas, and a file of the header area.
struct Checker<'a> {
    disk: PathBuf,
    disk_file: File,
    header: PathBuf,
    expect: &'a Expect<'a>,
    seen_gpt: HashSet<Vec<u8>>,
    seen_luks: HashSet<Vec<u8>>,
    last_was_new: bool,
    last_verify_clean: bool,
}

impl<'a> Checker<'a> {
    fn new(work: &Path, disk_bytes: u64, expect: &'a Expect<'a>) -> Result<Self> {
        let disk = work.join("cut.img");
        let disk_file = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&disk)?;
        disk_file.set_len(disk_bytes)?;
        Ok(Self {
            disk,
            disk_file,
            header: work.join("cut-luks2-header.img"),
            expect,
            seen_gpt: HashSet::new(),
            seen_luks: HashSet::new(),
            last_was_new: false,
            last_verify_clean: false,
        })
    }

    fn check(&mut self, areas: &mut Areas, summary: &mut Summary) -> Result<()> {
        summary.cut_points += 1;
        let mut gpt_hash = Sha256::new();
        for a in &areas.gpt {
            gpt_hash.update(&a.replay.bytes);
        }
        if self.seen_gpt.insert(gpt_hash.finalize().to_vec()) {
            for a in &areas.gpt {
                self.disk_file.write_all_at(&a.replay.bytes, a.range.start)?;
            }
            self.check_gpt(summary)?;
        }
        let luks_hash = Sha256::digest(&areas.luks.replay.bytes).to_vec();
        if self.seen_luks.insert(luks_hash) {
            std::fs::write(&self.header, &areas.luks.replay.bytes)?;
            self.check_luks(summary)?;
        }
        Ok(())
    }

    fn check_gpt(&mut self, summary: &mut Summary) -> Result<()> {
        summary.gpt_states += 1;
        let json = sfdisk_json(&self.disk)?;
        let table = &json["partitiontable"];
        // With no valid GPT left, sfdisk falls back to the protective MBR and says "dos".
        ensure!(table["label"] == "gpt", "no valid gpt: sfdisk reads {table}");
        let root = &table["partitions"][1];
        let uuid = root["uuid"].as_str().unwrap_or_default().to_uppercase();
        ensure!(uuid == self.expect.root_uuid, "root partition uuid {uuid}");
        let size = root["size"].as_u64().context("root size")?;
        self.last_was_new = size == self.expect.new_sectors;
        if size == self.expect.old_sectors {
            summary.old_size_states += 1;
        } else if self.last_was_new {
            summary.new_size_states += 1;
        } else {
            anyhow::bail!(
                "root partition of {size} sectors, neither {} nor {}",
                self.expect.old_sectors,
                self.expect.new_sectors
            );
        }
        // --verify exits 0 whatever it finds; its text says. Before the move it rightly says
        // that the backup is not at the end.
        let out = Command::new("sfdisk").arg("--verify").arg(&self.disk).output()?;
        let text = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
        self.last_verify_clean = text.contains("No errors detected");
        if self.last_verify_clean {
            summary.verify_clean_states += 1;
        }
        Ok(())
    }

    fn check_luks(&mut self, summary: &mut Summary) -> Result<()> {
        summary.luks_states += 1;
        let dump = run(Command::new("cryptsetup").arg("luksDump").arg(&self.header))?;
        ensure!(stdout(&dump).contains("Version:") && stdout(&dump).contains("Keyslots:"), "luksDump");
        ensure!(
            luks_accepts(&self.header, self.expect.passphrase)?,
            "the passphrase no longer opens the header"
        );
        Ok(())
    }
}
