//! Power cuts in the middle of a disk passphrase change, for real: the test image boots, the
//! admin logs in on its console and starts `disk passphrase add`, and QEMU is quit through QMP
//! (the power gone, nothing flushed by the guest) at a few chosen moments of the change: at
//! once (before anything is written), and once the boot's write log shows the first and the
//! fifth write to the LUKS2 metadata area (the new keyslot's area, then the two header
//! copies; the log learns of writes at each flush, so the cuts fall where the guest flushed).
//! Each time the disk must open with the old passphrase or the new one. (Every cut point of such a change is covered by the
//! onion chat test's replay of its write log; this is the smoke test of that claim.)

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cloister_proto::marker;
use cloister_qemu::{Firmware, Vm, VmConfig};
use cloister_tests::console::{answer, log_in, BANNER, PROMPT, TO_ANSWER};
use cloister_tests::writelog::WriteLog;
use cloister_tests::*;

const TO_UNLOCK: Duration = Duration::from_secs(240);
/// Cut once the log holds this many writes to the metadata area (the log learns of writes at
/// each flush, and QEMU ends a little later: the cut falls at or after that write).
const CUTS_AT_WRITE: [usize; 3] = [0, 1, 5];
/// The change runs the KDF several times over under TCG.
const TO_CHANGE: Duration = Duration::from_secs(240);
/// The LUKS2 metadata area of the test image.
const METADATA_BYTES: u64 = 16 << 20;
const ADMIN: &str = "ops";

#[test]
fn a_power_cut_during_a_passphrase_change_leaves_the_old_or_the_new() -> Result<()> {
    let Some(e2e) = E2e::from_env("power_cut") else { return Ok(()) };
    let images = e2e.image.parent().context("image directory")?;
    let console = std::fs::read_to_string(images.join(format!("console-{ADMIN}")))?;
    let old = e2e.passphrase()?;
    for (i, writes) in CUTS_AT_WRITE.iter().enumerate() {
        let dir = e2e.scratch(&format!("power-cut-{i}"))?;
        let said = timed(&format!("power cut at write {writes} of `disk passphrase add`"), || {
            cut_during_add(&e2e, &dir, console.trim_end(), &old, *writes)
        })?;
        eprintln!("power cut {}: {said}", i + 1);
        std::fs::remove_dir_all(dir)?;
    }
    Ok(())
}

/// One boot, cut once `writes` writes of the change reached the metadata area; returns what
/// the disk opens with.
fn cut_during_add(
    e2e: &E2e,
    dir: &std::path::Path,
    console: &str,
    old: &str,
    writes: usize,
) -> Result<String> {
    let disk = dir.join("disk.img");
    sparse_copy(&e2e.image, &disk)?;
    let root = partitions(&disk)?.get(1).context("no root partition")?.clone();
    let area = root.start * 512..root.start * 512 + METADATA_BYTES;
    let log = dir.join("writes.log");
    let config =
        VmConfig { cpus: 1, write_log: Some(log.clone()), ..VmConfig::new(&disk, Firmware::find()?, dir) };
    let vm = Vm::start(config)?;
    vm.wait_for(marker::PASSPHRASE_PROMPT, TO_UNLOCK)?;
    vm.type_line(old)?;
    // No network here: tor never gets ready, the console's login does.
    vm.wait_for(BANNER, TO_UNLOCK)?;
    log_in(&vm, ADMIN, console)?;
    let new = format!("cut-{}", token()?);
    answer(&vm, PROMPT, "disk passphrase add")?;
    answer(&vm, "current disk passphrase: ", old)?;
    answer(&vm, "new disk passphrase: ", &new)?;
    answer(&vm, "new disk passphrase again: ", &new)?;
    let confirmed = Instant::now();
    let seen = || WriteLog::open(&log).map(|l| l.touching(&area).len()).unwrap_or(0);
    while seen() < writes && confirmed.elapsed() < TO_CHANGE {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The power goes: QEMU ends at once, the guest flushes nothing more.
    let _ = vm.qmp("quit", serde_json::json!({}));
    vm.wait_exit(TO_ANSWER)?;
    let cut_at = confirmed.elapsed();
    ensure!(seen() >= writes, "the change never wrote {writes} times to the header area");
    let header = dir.join("root.luks");
    extract_partition(&disk, &root, &header)?;
    let (opens_old, opens_new) = (luks_accepts(&header, old)?, luks_accepts(&header, &new)?);
    ensure!(opens_old || opens_new, "after a cut {cut_at:?} into the change the disk opens with neither");
    let header_writes = seen();
    let done = vm.console_text().contains("each opens with it");
    Ok(format!(
        "cut {cut_at:?} after the confirmation, {header_writes} writes to the metadata area before it, \
         change reported done: {done}; opens with the old: {opens_old}, with the new: {opens_new}"
    ))
}
