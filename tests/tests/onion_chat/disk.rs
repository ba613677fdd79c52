//! Disk passphrases through the admin CLI on the same VM: refusals change nothing; a passphrase
//! is added, the image's own is removed, and the last one cannot be; the test then checks the
//! image on the host with cryptsetup: the new passphrase opens it, the old does not. Last, the
//! kill switch: the VM powers off with no LUKS header left in the image, and the next boot of
//! that image says it found none.

use super::*;

/// Adds a passphrase, removes `old` (the image's), and is refused removing the new one, the
/// last. Returns the new passphrase.
pub fn disk_passphrases(ssh: &Ssh, old: &str) -> Result<String> {
    let new = format!("disk-{}", token()?);
    let disk =
        |command: &str, input: String| ssh.run(admin::ADMIN, &[], &["disk", "passphrase", command], &input);
    for (input, says) in [
        (format!("not the passphrase\n{new}\n{new}\n"), "the current passphrase does not open"),
        (format!("{old}\n{new}\n{new}x\n"), "the two new passphrases differ"),
        (format!("{old}\nshort\nshort\n"), "at least 12 characters"),
        (format!("{old}\n{new}\n"), "no input for a secret"),
    ] {
        let out = disk("add", input)?;
        ensure!(
            !out.status.success() && both(&out).contains(says),
            "add, expecting {says:?}: {}",
            both(&out)
        );
    }
    let out = disk("add", format!("{old}\n{new}\n{new}\n"))?;
    ensure!(out.status.success() && stdout(&out).contains("each opens with it"), "add: {}", both(&out));
    let out = disk("remove", format!("{old}\n"))?;
    ensure!(out.status.success() && stdout(&out).contains("removed from 1"), "remove: {}", both(&out));
    let out = disk("remove", format!("{new}\n"))?;
    ensure!(
        !out.status.success() && both(&out).contains("last passphrase"),
        "the last passphrase was not kept: {}",
        both(&out)
    );
    let out = disk("remove", "never a passphrase here\n".into())?;
    ensure!(!out.status.success() && both(&out).contains("does not open"), "remove: {}", both(&out));
    Ok(new)
}

/// The root container of `disk` (a running VM's, whose header writes reach the file at once)
/// opens with `new` and not with `old`.
pub fn image_opens_with(disk: &Path, dir: &Path, new: &str, old: &str) -> Result<()> {
    let parts = partitions(disk)?;
    let root = dir.join("root.luks");
    extract_partition(disk, parts.get(1).context("no root partition")?, &root)?;
    ensure!(luks_accepts(&root, new)?, "the added passphrase does not open the image");
    ensure!(!luks_accepts(&root, old)?, "the removed passphrase still opens the image");
    std::fs::remove_file(root)?;
    Ok(())
}

/// Where LUKS2 may keep a header in its metadata area: the primary at 0, the secondary at one
/// of the others.
const HEADER_OFFSETS: [u64; 10] =
    [0, 0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000];

/// `kill-system` with both confirmations from stdin: the console reports the keys destroyed
/// and the VM powers off; the time from the confirmation to the VM's exit is printed.
pub fn kill_switch(ssh: &Ssh, vm: &cloister_qemu::Vm) -> Result<()> {
    let confirmed = Instant::now();
    // The connection may end before the CLI prints anything: the appliance is going away.
    let out = ssh.run(admin::ADMIN, &[], &["kill-system"], "yes\ndestroy this appliance\n")?;
    eprintln!("kill-system said: {}", both(&out).trim());
    let line = vm.wait_for(marker::KILL_SWITCH_DONE, Duration::from_secs(120))?;
    vm.wait_exit(Duration::from_secs(60))?;
    eprintln!(
        "kill switch: {} s from the confirmation to power off; {line}",
        confirmed.elapsed().as_secs_f64()
    );
    ensure!(line.contains("no LUKS magic left"), "the headers were not destroyed: {line}");
    ensure!(line.contains("volume key wiped"), "the volume key was not wiped: {line}");
    Ok(())
}

/// After the kill switch: no LUKS magic where a header may be, `cryptsetup luksDump` finds
/// nothing, and a boot of the image stops saying no LUKS header was found.
pub fn nothing_left_to_open(disk: &Path, dir: &Path) -> Result<()> {
    let parts = partitions(disk)?;
    let root = parts.get(1).context("no root partition")?;
    let mut image = std::fs::File::open(disk)?;
    for at in HEADER_OFFSETS {
        let mut head = [0u8; 6];
        std::io::Seek::seek(&mut image, std::io::SeekFrom::Start(root.start * 512 + at))?;
        std::io::Read::read_exact(&mut image, &mut head)?;
        for magic in [b"LUKS\xba\xbe", b"SKUL\xba\xbe"] {
            ensure!(&head != magic, "LUKS magic left at offset {at} of the root partition");
        }
    }
    let copy = dir.join("root.luks");
    extract_partition(disk, root, &copy)?;
    let dump = Command::new("cryptsetup").arg("luksDump").arg(&copy).output()?;
    ensure!(!dump.status.success(), "luksDump still reads a header: {}", stdout(&dump));
    std::fs::remove_file(&copy)?;
    let vm =
        cloister_qemu::Vm::start(cloister_qemu::VmConfig::new(disk, cloister_qemu::Firmware::find()?, dir))?;
    let said = vm.wait_for(marker::NO_LUKS_HEADER, Duration::from_secs(240))?;
    eprintln!("the next boot: {said}");
    Ok(())
}
