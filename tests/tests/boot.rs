//! End to end under QEMU (TCG): one VM per image variant, many scenarios per boot.
//!
//! Boot 1, the test image: the prompt appears; a wrong passphrase is refused and asked again;
//! the right one unlocks and stage 2 prints the unlock line; the services start in their
//! sandboxes, a crashing one is restarted with backoff and given up on while the others keep
//! running; the ACPI power button stops the services and powers off cleanly; the disk afterwards
//! decrypts offline to a clean XFS.
//! Boot 2, the same image with the root partition's PARTUUID changed: stage 1 reports that no
//! root was found and lists the disks it saw, without a kernel panic.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Result};
use cloister_proto::{marker, service_event};
use cloister_qemu::{Firmware, Vm, VmConfig};
use cloister_tests::*;

/// OVMF + UKI + kernel under TCG reach init in 15–21 s here; leave room for a loaded machine.
const TO_STAGE1: Duration = Duration::from_secs(180);
const TO_UNLOCK: Duration = Duration::from_secs(180);
const TO_POWER_OFF: Duration = Duration::from_secs(120);
const TO_SERVICES: Duration = Duration::from_secs(120);

fn vm_config(image: &Path, work: &Path) -> Result<VmConfig> {
    // One vCPU: the end-to-end tests share a 2-core machine with each other.
    Ok(VmConfig { cpus: 1, ..VmConfig::new(image, Firmware::find()?, work) })
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
    // The XFS fills the data segment the build made, so a disk of the image's size has nothing
    // to grow, even on the first boot.
    ensure!(vm.console_text().contains(marker::GROW_NOTHING), "the first boot grew an unextended image");

    // Armed right after the unlock line: wait here, before later waits move the cursor past it.
    timed("power button armed", || Ok(vm.wait_for(marker::POWER_BUTTON_ARMED, TO_UNLOCK).map(drop)?))?;
    services_start_and_crash_loops_give_up(&vm)?;

    timed("power button stops services and powers off cleanly", || {
        vm.power_button()?;
        vm.wait_for(marker::SHUTDOWN, TO_POWER_OFF)?;
        let stopped = vm.wait_for(&service_event::line("ngircd", service_event::STOPPED), TO_POWER_OFF)?;
        ensure!(!stopped.contains("SIGKILL"), "ngircd ignored SIGTERM: {stopped:?}");
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

/// The test image runs ngircd (readiness: its port accepts) and `crasher`, which exits at once:
/// it is restarted with growing delays, then given up on while ngircd keeps running.
fn services_start_and_crash_loops_give_up(vm: &Vm) -> Result<()> {
    timed("ngircd ready in its sandbox", || {
        vm.wait_for(&service_event::line("ngircd", service_event::READY), TO_SERVICES)?;
        Ok(())
    })?;
    timed("crasher restarted with backoff, then given up", || {
        let failed = service_event::line("crasher", service_event::FAILED);
        let line = vm.wait_for(&failed, TO_SERVICES)?;
        ensure!(line.contains("crash loop"), "gave up for another reason: {line:?}");
        Ok(())
    })?;
    let console = vm.console_text();
    machine_steps_before_services(&console)?;
    stage1_handed_over(&console)?;
    let delays: Vec<u64> = console
        .lines()
        .filter_map(|l| service_event::parse(l))
        .filter(|(name, rest)| *name == "crasher" && rest.starts_with(service_event::EXITED))
        .filter_map(|(_, rest)| rest.rsplit_once("restart in ")?.1.strip_suffix(" ms")?.parse().ok())
        .collect();
    ensure!(delays.len() >= 2, "crasher was not restarted twice before giving up: {delays:?}");
    ensure!(delays.windows(2).all(|w| w[1] > w[0]), "restart delays do not grow: {delays:?}");
    let ngircd_exits = console
        .lines()
        .filter_map(|l| service_event::parse(l))
        .filter(|(name, rest)| *name == "ngircd" && rest.starts_with(service_event::EXITED))
        .count();
    ensure!(ngircd_exits == 0, "ngircd exited while crasher looped");
    Ok(())
}

/// Stage 1 loaded the warm-up header, and its handover child read stage 2's files ahead and
/// emptied the initramfs once stage 2 ran (it prints after the switch).
fn stage1_handed_over(console: &str) -> Result<()> {
    ensure!(console.contains(marker::LUKS_WARMED), "stage 1 did not load the warm-up header");
    ensure!(console.contains(marker::HANDED_OVER), "stage 1 forked no handover child");
    let done = console.lines().find(|l| l.contains(marker::HANDOVER_DONE));
    ensure!(
        done.is_some_and(|l| l.contains("initramfs emptied in")),
        "the handover child did not empty the initramfs: {done:?}"
    );
    let switched = console.find(marker::SWITCHING).unwrap_or(usize::MAX);
    ensure!(
        console.find(marker::HANDOVER_DONE).is_some_and(|at| at > switched),
        "the initramfs was emptied before the switch"
    );
    Ok(())
}

/// Every machine step of stage 2 succeeded, and the firewall step came before any service.
fn machine_steps_before_services(console: &str) -> Result<()> {
    let at = |needle: &str| console.find(needle);
    for step in ["mount-runtime", "sysctls", "hostname", "utc", "clock", "random-seed", "firewall"] {
        ensure!(at(&format!("step {step}: ok (")).is_some(), "stage 2 step {step} did not succeed");
    }
    let firewall = at("step firewall: ok (").unwrap_or(usize::MAX);
    let first_start = at(service_event::PREFIX).unwrap_or(0);
    ensure!(firewall < first_start, "a service started before the firewall step");
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
