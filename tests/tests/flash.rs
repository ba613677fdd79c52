//! Host tests of `cargo xtask flash` on loop devices only: every test makes its own loop devices
//! over files in its own temporary directory (`losetup --find --show`) and detaches them on drop,
//! and runs the flasher with `CLOISTER_FLASH_TEST_ONLY_LOOP=1`, which refuses anything but a
//! whole loop device. The host's own disk is only ever named together with `--dry-run`. The
//! block maps come from `bmaptool create`, an independent writer of the format. They need root
//! and `CLOISTER_XTASK_BIN` (set by `cargo xtask test`).

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cloister_tests::run;

const MIB: u64 = 1024 * 1024;
const TEST_ONLY_LOOP: &str = "CLOISTER_FLASH_TEST_ONLY_LOOP";

/// The xtask binary, or `None` (with the reason printed) outside `cargo xtask test`.
fn xtask(test: &str) -> Option<PathBuf> {
    let Some(bin) = std::env::var_os("CLOISTER_XTASK_BIN").map(PathBuf::from) else {
        assert!(
            std::env::var_os("CLOISTER_E2E").is_none(),
            "CLOISTER_E2E is set but CLOISTER_XTASK_BIN is not"
        );
        eprintln!("{test}: not run: set CLOISTER_XTASK_BIN to a built xtask (`cargo xtask test` does)");
        return None;
    };
    assert!(bin.is_file(), "CLOISTER_XTASK_BIN {} is not a file", bin.display());
    assert!(nix::unistd::geteuid().is_root(), "{test}: loop devices need root");
    Some(bin)
}

/// A loop device over a file, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn new(file: &Path, partscan: bool) -> Result<Self> {
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show"]);
        if partscan {
            cmd.arg("--partscan");
        }
        let out = run(cmd.arg(file))?;
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        ensure!(dev.to_string_lossy().starts_with("/dev/loop"), "losetup printed {dev:?}");
        Ok(Self(dev))
    }

    /// `/dev/loopNpK`, waiting for the kernel to create the node. A kernel built without
    /// partition table parsers (this host's has none) is told the table by `partx`, which
    /// reads it in userspace.
    fn partition(&self, k: u32) -> Result<PathBuf> {
        let p = PathBuf::from(format!("{}p{k}", self.0.display()));
        if !p.exists() {
            run(Command::new("partx").arg("--add").arg(&self.0))?;
        }
        let t = Instant::now();
        while !p.exists() {
            ensure!(t.elapsed() < Duration::from_secs(10), "{} never appeared", p.display());
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(p)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A mount in the host's mount namespace (the flasher must see it), unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn new(args: &[&str], source: &Path, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        run(Command::new("mount").args(args).arg(source).arg(dir))?;
        Ok(Self(dir.into()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// An active swap area, switched off on drop.
struct Swap(PathBuf);

impl Drop for Swap {
    fn drop(&mut self) {
        let _ = Command::new("swapoff").arg(&self.0).status();
    }
}

/// Bytes that are never all zero, different at every offset.
fn pattern(seed: u64, len: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}

/// A sparse GPT disk of `size` bytes with two partitions and patterned data at `(offset, len)`
/// spans, and its block map from `bmaptool create`.
fn sparse_image(dir: &Path, size: u64, data: &[(u64, u64)]) -> Result<PathBuf> {
    let image = dir.join("disk.img");
    OpenOptions::new().create_new(true).write(true).open(&image)?.set_len(size)?;
    sfdisk(&image, "label: gpt\n,16M\n,\n")?;
    let f = OpenOptions::new().write(true).open(&image)?;
    for (i, &(off, len)) in data.iter().enumerate() {
        f.write_all_at(&pattern(i as u64 + 7, len), off)?;
    }
    f.sync_all()?;
    run(Command::new("bmaptool").arg("create").arg("-o").arg(dir.join("disk.img.bmap")).arg(&image))?;
    Ok(image)
}

fn sfdisk(target: &Path, script: &str) -> Result<()> {
    let out = cloister_tests::run_with_input(
        Command::new("sfdisk").args(["-q", "--no-reread", "--no-tell-kernel"]).arg(target),
        script.as_bytes(),
    )?;
    ensure!(out.status.success(), "sfdisk {}: {}", target.display(), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn file_of(dir: &Path, name: &str, size: u64, fill: u8) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, vec![fill; size as usize])?;
    Ok(p)
}

fn flash(xtask: &Path, device: &Path, image: &Path, extra: &[&str]) -> Result<Output> {
    Command::new(xtask)
        .args(["flash", "--device"])
        .arg(device)
        .arg("--image")
        .arg(image)
        .args(extra)
        .env(TEST_ONLY_LOOP, "1")
        .stdin(Stdio::null())
        .output()
        .context("cannot run xtask flash")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Runs a flash that must be refused with `reason`, and checks the device is unchanged.
fn assert_refused(xtask: &Path, device: &Path, image: &Path, extra: &[&str], reason: &str) -> Result<()> {
    let before = head_of(device)?;
    let out = flash(xtask, device, image, extra)?;
    let all = text(&out);
    ensure!(!out.status.success(), "flash to {} was not refused:\n{all}", device.display());
    ensure!(all.contains(reason), "refusal of {} does not say {reason:?}:\n{all}", device.display());
    ensure!(!all.contains("written and verified"), "{all}");
    ensure!(head_of(device)? == before, "{} changed although the flash was refused", device.display());
    Ok(())
}

fn head_of(device: &Path) -> Result<Vec<u8>> {
    let f = std::fs::File::open(device)?;
    let mut buf = vec![0u8; MIB as usize];
    let n = f.read_at(&mut buf, 0)?;
    buf.truncate(n);
    Ok(buf)
}

#[test]
fn flash_writes_a_sparse_gpt_image_to_a_loop_device_byte_for_byte() -> Result<()> {
    let Some(xtask) = xtask("flash_writes_a_sparse_gpt_image") else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let image = sparse_image(dir.path(), 64 * MIB, &[(20 * MIB + 512, 3 * MIB + 100), (60 * MIB + 4095, 1)])?;
    // Old contents everywhere: the unmapped ranges must come out as zeros, the tail past the
    // image must stay as it was.
    let backing = file_of(dir.path(), "stick", 72 * MIB, 0xa5)?;
    let dev = Loop::new(&backing, false)?;
    let out = flash(&xtask, &dev.0, &image, &["--yes", "--allow-fixed"])?;
    let all = text(&out);
    ensure!(out.status.success(), "flash failed:\n{all}");
    for shown in ["transport  loop (backing file", "MB/s", "ETA", "written and verified"] {
        ensure!(all.contains(shown), "output lacks {shown:?}:\n{all}");
    }
    run(Command::new("cmp").arg("-n").arg((64 * MIB).to_string()).arg(&image).arg(&dev.0))?;
    run(Command::new("sfdisk").arg("--verify").arg(&dev.0))?;
    let mut tail = vec![0u8; (8 * MIB) as usize];
    std::fs::File::open(&dev.0)?.read_exact_at(&mut tail, 64 * MIB)?;
    ensure!(tail.iter().all(|&b| b == 0xa5), "bytes past the image were touched");
    Ok(())
}

#[test]
fn flash_refuses_a_regular_file() -> Result<()> {
    let Some(xtask) = xtask("flash_refuses_a_regular_file") else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let image = sparse_image(dir.path(), 64 * MIB, &[(20 * MIB, MIB)])?;
    let target = file_of(dir.path(), "not-a-disk", 64 * MIB, 0x11)?;
    assert_refused(
        &xtask,
        &target,
        &image,
        &["--yes", "--allow-fixed"],
        "not a block device (a regular file)",
    )
}

#[test]
fn flash_refuses_a_too_small_device() -> Result<()> {
    let Some(xtask) = xtask("flash_refuses_a_too_small_device") else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let image = sparse_image(dir.path(), 64 * MIB, &[(20 * MIB, MIB)])?;
    let dev = Loop::new(&file_of(dir.path(), "small", 32 * MIB, 0x22)?, false)?;
    assert_refused(&xtask, &dev.0, &image, &["--yes", "--allow-fixed"], "the image needs 67108864")
}

#[test]
fn flash_refuses_a_partition_and_names_its_disk() -> Result<()> {
    let Some(xtask) = xtask("flash_refuses_a_partition") else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let image = sparse_image(dir.path(), 64 * MIB, &[(20 * MIB, MIB)])?;
    let backing = dir.path().join("disk");
    OpenOptions::new().create_new(true).write(true).open(&backing)?.set_len(256 * MIB)?;
    sfdisk(&backing, "label: gpt\n,200M\n")?;
    let dev = Loop::new(&backing, true)?;
    let part = dev.partition(1)?;
    let reason = format!("is a partition, not a whole disk (the disk is {})", dev.0.display());
    assert_refused(&xtask, &part, &image, &["--yes", "--allow-fixed"], &reason)
}

#[test]
fn flash_refuses_a_disk_with_a_mounted_partition_or_file_system() -> Result<()> {
    let Some(xtask) = xtask("flash_refuses_a_mounted_disk") else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let image = sparse_image(dir.path(), 64 * MIB, &[(20 * MIB, MIB)])?;
    // XFS needs about 300 MB; the backing files stay sparse.
    let backing = dir.path().join("disk");
    OpenOptions::new().create_new(true).write(true).open(&backing)?.set_len(400 * MIB)?;
    sfdisk(&backing, "label: gpt\n,\n")?;
    let parted = Loop::new(&backing, true)?;
    let part = parted.partition(1)?;
    run(Command::new("mkfs.xfs").args(["-q", "-f"]).arg(&part))?;
    let _on_part = Mount::new(&["-t", "xfs"], &part, &dir.path().join("mnt-part"))?;
    let mounted = format!("mounted file systems or swap: {}", dir.path().join("mnt-part").display());
    assert_refused(&xtask, &parted.0, &image, &["--yes", "--allow-fixed"], &mounted)?;

    let whole = dir.path().join("whole");
    OpenOptions::new().create_new(true).write(true).open(&whole)?.set_len(400 * MIB)?;
    let plain = Loop::new(&whole, false)?;
    run(Command::new("mkfs.xfs").args(["-q", "-f"]).arg(&plain.0))?;
    let _on_disk = Mount::new(&["-t", "xfs"], &plain.0, &dir.path().join("mnt-disk"))?;
    let mounted = format!("mounted file systems or swap: {}", dir.path().join("mnt-disk").display());
    assert_refused(&xtask, &plain.0, &image, &["--yes", "--allow-fixed"], &mounted)
}

#[test]
fn flash_refuses_a_disk_in_use_as_swap() -> Result<()> {
    let Some(xtask) = xtask("flash_refuses_swap") else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let image = sparse_image(dir.path(), 64 * MIB, &[(20 * MIB, MIB)])?;
    let dev = Loop::new(&file_of(dir.path(), "swap", 64 * MIB, 0)?, false)?;
    run(Command::new("mkswap").arg(&dev.0))?;
    run(Command::new("swapon").arg(&dev.0))?;
    let _swap = Swap(dev.0.clone());
    let reason = format!("swap {}", dev.0.display());
    assert_refused(&xtask, &dev.0, &image, &["--yes", "--allow-fixed"], &reason)
}

/// The only test that names a real disk, and only ever with `--dry-run` (and the loop-only gate).
#[test]
fn flash_refuses_the_disk_holding_the_running_system() -> Result<()> {
    let Some(xtask) = xtask("flash_refuses_the_host_root_disk") else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let image = sparse_image(dir.path(), 64 * MIB, &[(20 * MIB, MIB)])?;
    let root = root_disk()?;
    let out = flash(&xtask, &root, &image, &["--dry-run", "--yes", "--allow-fixed"])?;
    let all = text(&out);
    ensure!(!out.status.success(), "dry run on the root disk {} was not refused:\n{all}", root.display());
    ensure!(all.contains("holds the running system: mounted file systems or swap: /"), "{all}");
    Ok(())
}

/// The whole disk under `/`, through partitions and `slaves/` (dm, md) down to the first disk.
fn root_disk() -> Result<PathBuf> {
    let dev = std::fs::metadata("/")?.dev();
    let link = format!("/sys/dev/block/{}:{}", nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let mut sys =
        std::fs::canonicalize(&link).with_context(|| format!("/ is not on a block device ({link})"))?;
    loop {
        if sys.join("partition").exists() {
            sys.pop();
        }
        let slave =
            std::fs::read_dir(sys.join("slaves")).ok().and_then(|mut d| d.next()).and_then(|e| e.ok());
        match slave {
            Some(s) => sys = std::fs::canonicalize(Path::new("/sys/class/block").join(s.file_name()))?,
            None => break,
        }
    }
    let name = sys.file_name().context("no name")?;
    Ok(Path::new("/dev").join(name))
}

#[test]
fn flash_reports_the_offset_of_a_write_error_and_fails() -> Result<()> {
    let Some(xtask) = xtask("flash_reports_a_write_error") else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    // Nearly all data, so that the device fills up while our data writes, not the kernel's
    // zeroing, are under way.
    let image = sparse_image(dir.path(), 64 * MIB, &[(MIB, 30 * MIB)])?;
    // 8 MiB of tmpfs under a 64 MiB sparse file: the loop device fails once it is full.
    let _tmpfs =
        Mount::new(&["-t", "tmpfs", "-o", "size=8M"], Path::new("tmpfs"), &dir.path().join("small"))?;
    let backing = dir.path().join("small/stick");
    OpenOptions::new().create_new(true).write(true).open(&backing)?.set_len(64 * MIB)?;
    let dev = Loop::new(&backing, false)?;
    let out = flash(&xtask, &dev.0, &image, &["--yes", "--allow-fixed"])?;
    let all = text(&out);
    ensure!(!out.status.success(), "flash onto a full device succeeded:\n{all}");
    let offset: u64 = all
        .split("failed at offset ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .with_context(|| format!("no offset in:\n{all}"))?;
    // At most 8 MiB fit; the failure lies inside the data range, past the first MiB of it.
    ensure!(
        (2 * MIB..9 * MIB).contains(&offset),
        "offset {offset} is not where the device filled up:\n{all}"
    );
    ensure!(all.contains("write to /dev/loop"), "{all}");
    ensure!(!all.contains("written and verified"), "{all}");
    Ok(())
}

#[test]
fn flash_without_yes_needs_the_device_name_typed() -> Result<()> {
    let Some(xtask) = xtask("flash_needs_the_device_name") else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let image = sparse_image(dir.path(), 64 * MIB, &[(20 * MIB, MIB)])?;
    let dev = Loop::new(&file_of(dir.path(), "stick", 64 * MIB, 0x33)?, false)?;
    let before = head_of(&dev.0)?;
    let answer = |typed: &str| -> Result<Output> {
        cloister_tests::run_with_input(
            Command::new(&xtask)
                .args(["flash", "--allow-fixed", "--device"])
                .arg(&dev.0)
                .arg("--image")
                .arg(&image)
                .env(TEST_ONLY_LOOP, "1"),
            typed.as_bytes(),
        )
    };
    let wrong = answer("loop\n")?;
    ensure!(!wrong.status.success() && text(&wrong).contains("cancelled"), "{}", text(&wrong));
    ensure!(head_of(&dev.0)? == before, "the device changed after a wrong answer");
    let name = dev.0.file_name().context("no name")?.to_string_lossy().into_owned();
    let right = answer(&format!("{name}\n"))?;
    if !right.status.success() {
        bail!("typing {name} did not flash:\n{}", text(&right));
    }
    run(Command::new("cmp").arg(&image).arg(&dev.0))?;
    Ok(())
}

/// An image that no longer matches its block map (changed after the build) is refused by the
/// hasher beside the writes, with the range's offset.
#[test]
fn flash_refuses_an_image_that_does_not_match_its_block_map() -> Result<()> {
    let Some(xtask) = xtask("flash_refuses_a_changed_image") else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let image = sparse_image(dir.path(), 64 * MIB, &[(20 * MIB, 12 * MIB)])?;
    // One byte in the data range, after `bmaptool create` hashed it.
    let f = OpenOptions::new().write(true).open(&image)?;
    f.write_all_at(&[0], 30 * MIB)?;
    drop(f);
    let dev = Loop::new(&file_of(dir.path(), "stick", 64 * MIB, 0x5a)?, false)?;
    let out = flash(&xtask, &dev.0, &image, &["--yes", "--allow-fixed"])?;
    let all = text(&out);
    ensure!(!out.status.success(), "a changed image was flashed:\n{all}");
    ensure!(all.contains("does not match its block map at offset 20971520"), "{all}");
    ensure!(!all.contains("written and verified"), "{all}");
    Ok(())
}
