//! End to end under QEMU (TCG): one VM per image variant, many scenarios per boot.
//!
//! Boot 1, the test image: the prompt appears; a wrong passphrase is refused and asked again;
//! the right one unlocks and stage 2 prints the unlock line; the ACPI power button powers off
//! cleanly; the disk afterwards decrypts offline to a clean XFS.
//! Boot 2, the same image with the root partition's PARTUUID changed: stage 1 reports that no
//! root was found and lists the disks it saw, without a kernel panic.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Result};
use cloister_proto::marker;
use cloister_qemu::{Accel, Console, Firmware, Network, Vm, VmConfig};
use cloister_tests::*;

/// OVMF + UKI + kernel under TCG reach init in 15–21 s here; leave room for a loaded machine.
const TO_STAGE1: Duration = Duration::from_secs(180);
const TO_UNLOCK: Duration = Duration::from_secs(180);
const TO_POWER_OFF: Duration = Duration::from_secs(120);

fn vm_config(image: &Path, work: &Path) -> Result<VmConfig> {
    Ok(VmConfig {
        image: image.to_path_buf(),
        firmware: Firmware::find()?,
        memory_mib: 1024,
        accel: Accel::Auto,
        cpus: 1,
        network: Network::None,
        console: Console::Captured,
        work_dir: work.to_path_buf(),
        extra_drives: Vec::new(),
        snapshot: false,
    })
}

#[test]
fn unlock_with_retry_then_power_button_leaves_clean_xfs() -> Result<()> {
    let Some(e2e) = E2e::from_env("boot") else { return Ok(()) };
    let dir = e2e.scratch("boot-unlock")?;
    let disk = dir.join("disk.img");
    sparse_copy(&e2e.image, &disk)?;
    let passphrase = e2e.passphrase()?;
    let vm = Vm::start(vm_config(&disk, &dir)?)?;

    timed("stage 1 starts", || vm.wait_for(marker::STAGE1_STARTED, TO_STAGE1).map(drop).map_err(Into::into))?;
    timed("passphrase prompt", || {
        vm.wait_for(marker::PASSPHRASE_PROMPT, TO_STAGE1).map(drop).map_err(Into::into)
    })?;
    timed("wrong passphrase refused and asked again", || {
        vm.type_line("definitely-not-the-passphrase")?;
        vm.wait_for(marker::WRONG_PASSPHRASE, TO_UNLOCK)?;
        vm.wait_for(marker::PASSPHRASE_PROMPT, TO_UNLOCK)?;
        Ok(())
    })?;
    let line = timed("right passphrase unlocks", || {
        vm.type_line(&passphrase)?;
        Ok(vm.wait_for(marker::UNLOCKED, TO_UNLOCK)?)
    })?;
    let ms = cloister_proto::parse_unlocked_ms(&line);
    eprintln!("unlock line: {line:?} (guest ms since boot: {ms:?})");
    ensure!(ms.is_some(), "unlock line without a time: {line:?}");
    ensure!(!vm.console_text().contains(&passphrase), "the passphrase was echoed on the console");

    timed("power button powers off cleanly", || {
        vm.wait_for(marker::POWER_BUTTON_ARMED, TO_UNLOCK)?;
        vm.power_button()?;
        vm.wait_for(marker::POWER_OFF, TO_POWER_OFF)?;
        let status = vm.wait_exit(TO_POWER_OFF)?;
        ensure!(status.success(), "qemu exited with {status}");
        Ok(())
    })?;
    let console = vm.console_text();
    ensure!(!console.contains("Kernel panic"), "kernel panic on the console");
    drop(vm);

    timed("disk is clean XFS after power-off", || {
        let parts = partitions(&disk)?;
        let root = dir.join("root.img");
        extract_partition(&disk, &parts[1], &root)?;
        decrypt_offline(&root, &dir.join("header"), &passphrase)?;
        xfs_clean(&root)
    })?;
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn missing_root_partition_is_reported_with_the_disks_seen() -> Result<()> {
    let Some(e2e) = E2e::from_env("no-root") else { return Ok(()) };
    let dir = e2e.scratch("boot-no-root")?;
    let disk = dir.join("disk.img");
    sparse_copy(&e2e.image, &disk)?;
    // The UKI still names the old PARTUUID; no partition carries it any more.
    run(Command::new("sfdisk")
        .arg("--part-uuid")
        .arg(&disk)
        .arg("2")
        .arg("11111111-2222-4333-8444-555555555555"))?;
    let vm = Vm::start(vm_config(&disk, &dir)?)?;
    let line = timed("no root reported", || Ok(vm.wait_for(marker::NO_ROOT, Duration::from_secs(300))?))?;
    eprintln!("{line}");
    // The listing follows the marker line by line: wait for the partition, not just the disk.
    let listed = timed("disks listed", || {
        Ok(vm.wait_for("11111111-2222-4333-8444-555555555555", Duration::from_secs(30))?)
    })?;
    ensure!(listed.contains("vda2"), "the listing names the partition without its device: {listed:?}");
    let console = vm.console_text();
    ensure!(!console.contains("Kernel panic"), "kernel panic instead of a message");
    ensure!(!console.contains(marker::PASSPHRASE_PROMPT), "asked for a passphrase without a root");
    drop(vm);
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
