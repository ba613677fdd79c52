//! First-boot growth under QEMU (TCG), two boots of one disk: the test image copied onto a
//! 4 GiB file grows on the first boot (GPT backup moved to the end, root partition, dm-crypt
//! mapping and XFS grown, sizes on the console) and finds nothing to do on the second. A second
//! disk carrying a partition of the root's type is left byte for byte alone; afterwards util-linux
//! verifies the GPT and the root decrypts offline to a clean XFS.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cloister_proto::marker;
use cloister_qemu::{Firmware, Vm, VmConfig};
use cloister_tests::*;

const TO_PROMPT: Duration = Duration::from_secs(180);
const TO_GROWN: Duration = Duration::from_secs(180);
const TO_POWER_OFF: Duration = Duration::from_secs(120);
const DISK_BYTES: u64 = 4 << 30;
const MIB: u64 = 1 << 20;
/// The LUKS2 header the build reserves in front of the encrypted data.
const LUKS_OFFSET: u64 = 16 * MIB;

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

/// Boots, unlocks and waits for the first grow line; powers off with the button.
fn boot(config: VmConfig, passphrase: &str) -> Result<(String, String)> {
    let vm = Vm::start(config)?;
    vm.wait_for(marker::PASSPHRASE_PROMPT, TO_PROMPT)?;
    vm.type_line(passphrase)?;
    let t = Instant::now();
    let line = vm.wait_for("cloister: grow: ", TO_GROWN)?;
    eprintln!("grow line after {:.1} s: {line}", t.elapsed().as_secs_f64());
    vm.wait_for(marker::POWER_BUTTON_ARMED, TO_GROWN)?;
    vm.power_button()?;
    vm.wait_for(marker::POWER_OFF, TO_POWER_OFF)?;
    let status = vm.wait_exit(TO_POWER_OFF)?;
    ensure!(status.success(), "qemu exited with {status}");
    Ok((line, vm.console_text()))
}

/// `root partition <a> -> <b> bytes; xfs <c> -> <d> blocks` as four numbers.
fn parse_grow(line: &str) -> Result<[u64; 4]> {
    let rest = line.split(marker::GROW).nth(1).context("no grow marker")?;
    let nums: Vec<u64> = rest.split(|c: char| !c.is_ascii_digit()).filter_map(|s| s.parse().ok()).collect();
    nums.try_into().map_err(|n| anyhow::anyhow!("expected four numbers in {line:?}, got {n:?}"))
}

#[test]
fn grow_on_first_boot_then_nothing_to_do() -> Result<()> {
    let Some(e2e) = E2e::from_env("grow") else { return Ok(()) };
    let dir = e2e.scratch("grow")?;
    let disk = dir.join("disk.img");
    sparse_copy(&e2e.image, &disk)?;
    let before = partitions(&disk)?;
    run(Command::new("truncate").arg(format!("--size={DISK_BYTES}")).arg(&disk))?;
    let other = dir.join("other.img");
    let other_before = other_disk(&other)?;
    let passphrase = e2e.passphrase()?;

    let (line, console) = timed("first boot grows", || boot(vm_config(&disk, &dir, &other)?, &passphrase))?;
    let [p0, p1, x0, x1] = parse_grow(&line)?;
    let start = before[1].start * 512;
    ensure!(p0 == before[1].size * 512, "old size {p0} is not the built partition's");
    let expected = (DISK_BYTES - 33 * 512) / MIB * MIB - start;
    ensure!(p1 == expected, "new size {p1}, expected {expected} (partition end at the last aligned lba)");
    ensure!(x1 > x0, "xfs did not grow: {x0} -> {x1}");
    ensure!(x1 * 4096 <= p1 - LUKS_OFFSET, "xfs of {x1} blocks exceeds the mapping");
    ensure!(x1 * 4096 + 2 * MIB >= p1 - LUKS_OFFSET, "xfs of {x1} blocks leaves the mapping's end unused");
    ensure!(console.contains("step grow: ok ("), "no grow step timing");

    let (line2, _) =
        timed("second boot finds nothing", || boot(vm_config(&disk, &dir, &other)?, &passphrase))?;
    ensure!(line2.contains(marker::GROW_NOTHING), "second boot: {line2:?}");

    timed("other disk untouched, gpt verifies, root is clean xfs", || {
        ensure!(std::fs::read(&other)? == other_before, "the second disk changed");
        let verify = run(Command::new("sfdisk").arg("--verify").arg(&disk))?;
        ensure!(!stdout(&verify).contains("not on the end"), "backup gpt not moved: {}", stdout(&verify));
        let after = partitions(&disk)?;
        ensure!(after[1].size * 512 == p1 && after[1].uuid == before[1].uuid, "root partition {after:?}");
        ensure!(after[0].size == before[0].size, "the esp changed");
        let root = dir.join("root.img");
        extract_partition(&disk, &after[1], &root)?;
        decrypt_offline(&root, &dir.join("header"), &passphrase)?;
        xfs_clean(&root)
    })?;
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
