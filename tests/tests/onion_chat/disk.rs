//! Disk passphrases through the admin CLI on the same VM: refusals change nothing; a passphrase
//! is added, the image's own is removed, and the last one cannot be; the test then checks the
//! image on the host with cryptsetup: the new passphrase opens it, the old does not. Last, the
//! kill switch: the VM powers off with no LUKS header left in the image, and the next boot of
//! that image says it found none.
//!
//! Power cuts: the VM's every write is logged (`VmConfig::write_log`); replaying the log's
//! writes into the LUKS2 metadata area one at a time onto the header as built gives the header
//! every cut point of the changes would have left, and each must open with the old or the new
//! passphrase. Writes to the two header copies (binary header and JSON) are also cut inside,
//! one 4 KiB block at a time: that is where a torn write could leave a header that parses
//! wrong. A torn keyslot-area write needs no check of its own: a new keyslot's area is written
//! before any header names it, and a removed one is wiped (in ~40 passes) while the other
//! keyslot still opens.

use cloister_tests::writelog::{Replay, WriteLog};

use super::*;

/// The LUKS2 metadata area of the test image (both headers and the keyslots): the data
/// segment starts right after it.
const METADATA_BYTES: u64 = 16 << 20;
/// A write torn inside: the device wrote this much of it at a time (a 4096-byte-sector disk's
/// unit; 512-byte tearing inside a 4 KiB header block would be caught by its checksum alike).
const TORN_UNIT: u64 = 4096;

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

/// Every cut point of the passphrase changes this boot made (the writes in `log` that reach
/// the root's LUKS2 metadata area, replayed onto `pristine`'s, the image before the boot):
/// each leaves a header that opens with `old` or `new`. The last one must be what `disk`
/// holds now. Returns a summary line.
pub fn every_cut_point_opens(
    log: &Path,
    pristine: &Path,
    disk: &Path,
    dir: &Path,
    old: &str,
    new: &str,
) -> Result<String> {
    let root = partitions(pristine)?.get(1).context("no root partition")?.clone();
    let region = root.start * 512..root.start * 512 + METADATA_BYTES;
    let mut writes = WriteLog::open(log)?;
    let touching = writes.touching(&region);
    ensure!(!touching.is_empty(), "no write of this boot reached the LUKS2 metadata area");
    let mut replay = Replay::from_disk(pristine, region.clone())?;
    // The binary header's hdr_size (big-endian at offset 8): each copy, binary part and JSON.
    let hdr_size = u64::from_be_bytes(replay.bytes[8..16].try_into()?);
    ensure!((4096..=4 << 20).contains(&hdr_size), "a LUKS2 header size of {hdr_size}");
    let headers = region.start..region.start + 2 * hdr_size;
    let cut = dir.join("cut.luks");
    let (mut points, mut with_new) = (0usize, 0usize);
    // The passphrase that opened the last cut point is tried first: most points open with it.
    let mut likely = [old, new];
    for (i, entry) in touching.iter().enumerate() {
        let data = writes.data(entry)?;
        let len = entry.disk.end - entry.disk.start;
        let in_headers = entry.disk.start < headers.end && headers.start < entry.disk.end;
        let torn = if in_headers { TORN_UNIT } else { len };
        let cuts = (1..).map(|k| k * torn).take_while(|c| *c < len).chain([len]);
        for upto in cuts {
            replay.apply(entry, &data, Some(upto));
            // The header area and 1 MiB of data segment: cryptsetup checks the device's size.
            let mut bytes = replay.bytes.clone();
            bytes.resize(bytes.len() + (1 << 20), 0);
            std::fs::write(&cut, &bytes)?;
            points += 1;
            let opened = if luks_accepts(&cut, likely[0])? {
                Some(likely[0])
            } else if luks_accepts(&cut, likely[1])? {
                likely.swap(0, 1);
                Some(likely[0])
            } else {
                None
            };
            let Some(opened) = opened else {
                bail!(
                    "a power cut after {upto} of {len} bytes of write {} of {} (disk offset {:#x}) leaves a \
                     header that opens with neither passphrase",
                    i + 1,
                    touching.len(),
                    entry.disk.start
                );
            };
            with_new += usize::from(opened == new);
        }
    }
    std::fs::remove_file(&cut)?;
    let mut now = vec![0u8; replay.bytes.len()];
    let mut file = std::fs::File::open(disk)?;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(region.start))?;
    std::io::Read::read_exact(&mut file, &mut now)?;
    ensure!(now == replay.bytes, "the replayed log does not end in the header the disk holds");
    Ok(format!(
        "{points} cut points in {} writes to the LUKS2 metadata area: each opens ({with_new} with the new passphrase)",
        touching.len()
    ))
}
