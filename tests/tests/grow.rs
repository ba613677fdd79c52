//! First-boot growth under QEMU (TCG), three boots of one disk: the test image copied onto a
//! 4 GiB file whose remaining 3 GiB hold "old stick contents" (a pattern).
//! 1. Stage 1 grows the GPT (backup moved to the end), the partition and the dm-crypt mapping;
//!    stage 2's fill starts writing ciphertext over the new area; the power is cut (QEMU
//!    killed) once the fill said 20 %. QEMU logs every write of this boot.
//! 2. Stage 1 has nothing to grow; the fill resumes from its record, no earlier than 20 %,
//!    finishes, and XFS grows online; the old and new sizes are on the console.
//! 3. Nothing to do at all: no partition change, no fill started.
//!
//! Then on the host: a second disk with a partition of the root's type is byte for byte as
//! before; util-linux verifies the GPT; no sector of the grown partition still holds the old
//! pattern; the root decrypts offline to a clean XFS of the grown size whose files (all but
//! the appliance's own state under /var/lib) have the contents the build gave them; and every
//! power-cut point of the first boot's growth leaves a valid GPT and LUKS2 header
//! (`grow/powercut.rs`).

#[path = "grow/powercut.rs"]
mod powercut;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cloister_proto::{marker, service_event};
use cloister_qemu::{Firmware, Vm, VmConfig};
use cloister_tests::*;

const TO_PROMPT: Duration = Duration::from_secs(180);
const TO_GROWN: Duration = Duration::from_secs(180);
/// The whole fill under TCG, with room for a slow shared machine.
const TO_FILLED: Duration = Duration::from_secs(1200);
const TO_POWER_OFF: Duration = Duration::from_secs(120);
const DISK_BYTES: u64 = 4 << 30;
const MIB: u64 = 1 << 20;
/// The LUKS2 header the build reserves in front of the encrypted data.
const LUKS_OFFSET: u64 = 16 * MIB;
/// What the disk held before the image: every 512-byte sector starts with it.
const OLD: &[u8; 16] = b"OLD-STICK-DATA!\n";

fn vm_config(image: &Path, work: &Path, other: &Path) -> Result<VmConfig> {
    // One vCPU, as the boot tests: they share a 2-core machine.
    Ok(VmConfig {
        cpus: 1,
        extra_drives: vec![other.to_path_buf()],
        ..VmConfig::new(image, Firmware::find()?, work)
    })
}

/// A 64 MiB disk with one partition of the root's type filled with a pattern.
fn other_disk(path: &Path) -> Result<Vec<u8>> {
    let mut bytes: Vec<u8> = (0..64 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(path, &bytes)?;
    let script = format!("label: gpt\nstart=2048, size=65536, type={ROOT_X86_64_TYPE}\n");
    run_with_input(Command::new("sfdisk").arg("--quiet").arg(path), script.as_bytes())?;
    bytes = std::fs::read(path)?;
    Ok(bytes)
}

/// Extends `disk` from `from` to [`DISK_BYTES`] with the old-contents pattern.
fn old_contents(disk: &Path, from: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(disk)?;
    let chunk: Vec<u8> = OLD.iter().copied().cycle().take(4 * MIB as usize).collect();
    let mut at = from;
    while at < DISK_BYTES {
        let n = (DISK_BYTES - at).min(chunk.len() as u64) as usize;
        f.write_all_at(&chunk[..n], at)?;
        at += n as u64;
    }
    Ok(f.sync_all()?)
}

/// Sectors of `range` of `disk` that still start with the old pattern.
fn old_sectors(disk: &Path, range: std::ops::Range<u64>) -> Result<u64> {
    let f = std::fs::File::open(disk)?;
    let mut buf = vec![0u8; 4 * MIB as usize];
    let (mut at, mut found) = (range.start, 0);
    while at < range.end {
        let n = (range.end - at).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], at)?;
        found += buf[..n].chunks(512).filter(|s| s.starts_with(OLD)).count() as u64;
        at += n as u64;
    }
    Ok(found)
}

/// Starts a VM, types the passphrase and returns it with stage 1's grow line once stage 2 has
/// armed the power button.
fn boot_to_grow_line(config: VmConfig, passphrase: &str) -> Result<(Vm, String)> {
    let vm = Vm::start(config)?;
    vm.wait_for(marker::PASSPHRASE_PROMPT, TO_PROMPT)?;
    vm.type_line(passphrase)?;
    let line = vm.wait_for("cloister: grow: ", TO_GROWN)?;
    eprintln!("stage 1: {line}");
    // Stage 2 arms it early: waited for here, before later waits move the cursor past it.
    vm.wait_for(marker::POWER_BUTTON_ARMED, TO_GROWN)?;
    Ok((vm, line))
}

fn power_off(vm: &Vm) -> Result<()> {
    vm.power_button()?;
    vm.wait_for(marker::POWER_OFF, TO_POWER_OFF)?;
    let status = vm.wait_exit(TO_POWER_OFF)?;
    ensure!(status.success(), "qemu exited with {status}");
    Ok(())
}

/// Every number in `line` after `marker`, in order.
fn numbers(line: &str, marker: &str) -> Result<Vec<u64>> {
    let rest = line.split(marker).nth(1).with_context(|| format!("no {marker:?} in {line:?}"))?;
    Ok(rest.split(|c: char| !c.is_ascii_digit()).filter_map(|s| s.parse().ok()).collect())
}

/// The root partition of `image` decrypted offline into `dir/name`, and its XFS mounted
/// read-only at `dir/name.mnt` (dropped: unmounted and detached).
fn open_root(
    image: &Path,
    part: &Partition,
    dir: &Path,
    name: &str,
    pass: &str,
) -> Result<(PathBuf, MountedXfs)> {
    let root = dir.join(name);
    extract_partition(image, part, &root)?;
    decrypt_offline(&root, &dir.join(format!("{name}.header")), pass)?;
    xfs_clean(&root)?;
    let mounted = MountedXfs::new(&root, &dir.join(format!("{name}.mnt")))?;
    Ok((root, mounted))
}

#[test]
fn grow_fill_resume_then_nothing_to_do() -> Result<()> {
    let Some(e2e) = E2e::from_env("grow") else { return Ok(()) };
    let dir = e2e.scratch("grow")?;
    let passphrase = e2e.passphrase()?;
    let disk = dir.join("disk.img");
    sparse_copy(&e2e.image, &disk)?;
    let image_bytes = std::fs::metadata(&disk)?.len();
    let before = partitions(&disk)?;
    let root_start = before[1].start * 512;
    let old_end = root_start + before[1].size * 512;
    old_contents(&disk, image_bytes)?;
    let other = dir.join("other.img");
    let other_before = other_disk(&other)?;
    let files_before = timed("the built root's files hashed", || {
        let (_, mounted) = open_root(&e2e.image, &before[1], &dir, "built-root", &passphrase)?;
        file_hashes(&mounted.dir)
    })?;
    let new_bytes = (DISK_BYTES - 33 * 512) / MIB * MIB - root_start;
    let areas = powercut::Areas::snapshot(
        &disk,
        &[
            ("primary gpt", 0..MIB),
            ("old backup gpt", old_end..image_bytes),
            ("new backup gpt", root_start + new_bytes..DISK_BYTES),
        ],
        root_start..root_start + LUKS_OFFSET,
    )?;

    let log = dir.join("boot1.writes");
    let cut_at = timed("first boot grows, fills, and the power is cut at 20 %", || {
        let config = VmConfig { write_log: Some(log.clone()), ..vm_config(&disk, &dir, &other)? };
        let (vm, line) = boot_to_grow_line(config, &passphrase)?;
        let [p0, p1, to_fill] = numbers(&line, marker::GROW)?[..] else {
            anyhow::bail!("expected three numbers in {line:?}")
        };
        ensure!(p0 == before[1].size * 512, "old size {p0} is not the built partition's");
        ensure!(p1 == new_bytes, "new size {p1}, expected {new_bytes} (end at the last aligned lba)");
        ensure!(to_fill == p1 - p0, "{to_fill} bytes to fill, expected the whole new area {}", p1 - p0);
        ensure!(vm.console_text().contains("step grow: ok ("), "no grow step timing");
        let filling = vm.wait_for(marker::GROW_FILLING, TO_GROWN)?;
        eprintln!("{filling}");
        let t = Instant::now();
        let line = vm.wait_for(&format!("{} 20%", marker::GROW_FILLED), TO_FILLED)?;
        let rate = 0.2 * to_fill as f64 / t.elapsed().as_secs_f64() / 1e6;
        eprintln!("{line} (about {rate:.1} MB/s under TCG)");
        let at = numbers(&line, "20% (")?.first().copied().context("no offset")?;
        vm.kill()?;
        Ok(at)
    })?;

    let (x0, x1) = timed("second boot resumes the fill and grows xfs", || {
        let (vm, line) = boot_to_grow_line(vm_config(&disk, &dir, &other)?, &passphrase)?;
        ensure!(line.contains("root partition unchanged"), "the second boot grew again: {line:?}");
        let left = numbers(&line, "unchanged;")?.first().copied().context("no bytes to fill")?;
        let mapping_end = new_bytes - LUKS_OFFSET;
        ensure!(left <= mapping_end - cut_at, "{left} bytes left to fill, but 20 % ({cut_at}) was recorded");
        let resumed = vm.wait_for(marker::GROW_RESUMING, TO_GROWN)?;
        let at = numbers(&resumed, marker::GROW_RESUMING)?.first().copied().context("no offset")?;
        ensure!(at >= cut_at && at == mapping_end - left, "resumed at {at}, recorded {cut_at}, {left} left");
        let t = Instant::now();
        let xfs = vm.wait_for(marker::GROW_XFS, TO_FILLED)?;
        eprintln!("{xfs} ({:.0} s after the resume)", t.elapsed().as_secs_f64());
        let n = numbers(&xfs, marker::GROW_XFS)?;
        power_off(&vm)?;
        ensure!(n.len() >= 2, "no sizes in {xfs:?}");
        Ok((n[0], n[1]))
    })?;
    ensure!(x0 * 4096 == old_end - root_start - LUKS_OFFSET, "xfs was {x0} blocks before growing");
    ensure!(x1 * 4096 <= new_bytes - LUKS_OFFSET, "xfs of {x1} blocks exceeds the mapping");
    ensure!(x1 * 4096 + 2 * MIB >= new_bytes - LUKS_OFFSET, "xfs of {x1} blocks leaves the mapping unused");

    timed("third boot finds nothing to do", || {
        let (vm, line) = boot_to_grow_line(vm_config(&disk, &dir, &other)?, &passphrase)?;
        ensure!(line.contains(marker::GROW_NOTHING), "third boot: {line:?}");
        // Settled: every unit has had its first start, the fill's would have come with them.
        vm.wait_for(marker::PID1_RSS, TO_GROWN)?;
        let fill_started = service_event::line("grow-fill", service_event::STARTED);
        ensure!(!vm.console_text().contains(&fill_started), "the fill started again");
        power_off(&vm)
    })?;

    timed("other disk untouched, gpt verifies, no old contents in the partition", || {
        ensure!(std::fs::read(&other)? == other_before, "the second disk changed");
        let verify = run(Command::new("sfdisk").arg("--verify").arg(&disk))?;
        let text = format!("{}{}", stdout(&verify), String::from_utf8_lossy(&verify.stderr));
        ensure!(text.contains("No errors detected"), "sfdisk --verify: {text}");
        let after = partitions(&disk)?;
        ensure!(after[1].size * 512 == new_bytes && after[1].uuid == before[1].uuid, "root {after:?}");
        ensure!(after[0].size == before[0].size, "the esp changed");
        let left = old_sectors(&disk, old_end..root_start + new_bytes)?;
        ensure!(left == 0, "{left} sectors of the grown partition still hold the old contents");
        Ok(())
    })?;

    timed("root decrypts to a clean xfs of the grown size with the built files intact", || {
        let after = partitions(&disk)?;
        let (root, mounted) = open_root(&disk, &after[1], &dir, "grown-root", &passphrase)?;
        let db = run(Command::new("xfs_db").args(["-r", "-c", "sb 0", "-c", "p dblocks"]).arg(&root))?;
        ensure!(stdout(&db).trim() == format!("dblocks = {x1}"), "xfs_db: {}", stdout(&db));
        let files_after = file_hashes(&mounted.dir)?;
        let mut changed = Vec::new();
        for (path, hash) in &files_before {
            if files_after.get(path) != Some(hash) && !path.starts_with("var/lib") {
                changed.push(path.display().to_string());
            }
        }
        eprintln!("{} files compared", files_before.len());
        ensure!(files_before.len() > 1000, "only {} files in the built root", files_before.len());
        ensure!(changed.is_empty(), "files changed or lost: {changed:?}");
        Ok(())
    })?;

    let summary = timed("every power cut of the first boot's growth leaves a valid gpt and header", || {
        let expect = powercut::Expect {
            old_sectors: before[1].size,
            new_sectors: new_bytes / 512,
            root_uuid: &before[1].uuid,
            passphrase: &passphrase,
        };
        powercut::check_every_cut(areas, &log, DISK_BYTES, &dir, &expect)
    })?;
    eprintln!("power cuts: {summary:?}");
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
