//! The kill switch: destroy every LUKS container's keys and power off at once, without the
//! orderly shutdown. PID 1 does it itself, after locking all its memory (`mlockall`: its code,
//! its libraries and its data are pulled in while the root still reads fine, so nothing has to
//! come from the root it is destroying), in this order for each container:
//!
//! 1. overwrite the whole LUKS2 metadata area (both headers and every keyslot: everything before
//!    the data offset) with CSPRNG bytes, [`PASSES`] times, each pass flushed to the device;
//! 2. discard that area (on flash, overwriting alone is no erasure: the controller may keep
//!    the old pages; discard asks it to drop them, and nothing more can be done from here);
//! 3. read every offset where a LUKS2 header may be back from the device, past the page cache,
//!    and check that no `LUKS\xba\xbe`/`SKUL\xba\xbe` magic is left;
//! 4. suspend the mapping, which makes the kernel wipe the volume key from its memory.
//!
//! Then the power goes off (no sync: the mapping is suspended, and the data is gone anyway).
//! Each step's outcome and the total time go to the console.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cloister_proto::{marker, ROOT_MAPPING};
use libcryptsetup_rs::CryptInit;
use nix::sys::mman::{mlockall, MlockAllFlags};

/// Overwrites of the metadata area.
const PASSES: usize = 3;
/// The metadata area when the header cannot say (LUKS2's default, and what our images use).
const DEFAULT_METADATA_BYTES: u64 = 16 << 20;
/// Where LUKS2 puts a header: the primary at 0, the secondary at one of these.
const HEADER_OFFSETS: [u64; 10] =
    [0, 0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000];
const MAGICS: [&[u8; 6]; 2] = [b"LUKS\xba\xbe", b"SKUL\xba\xbe"];
const CHUNK: usize = 1 << 20;

/// Destroys the keys and powers off; `say` goes to the consoles.
pub fn run(say: &dyn Fn(&str)) -> ! {
    let start = Instant::now();
    say("cloister: kill switch: destroying the disk's keys now");
    if let Err(e) = mlockall(MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE) {
        say(&format!("cloister: kill switch: mlockall: {e} (going on)"));
    }
    // What is dirty now is written while the root still works: nothing waits on it later.
    nix::unistd::sync();
    // Opened while the header is still there: libcryptsetup reads it to know the device.
    let mapping = CryptInit::init_by_name_and_header(ROOT_MAPPING, None);
    let mut outcomes = Vec::new();
    match root_container() {
        Ok((device, metadata_bytes)) => {
            let outcome = destroy(&device, metadata_bytes);
            let what = match &outcome {
                Ok(()) => format!(
                    "{}: {metadata_bytes} bytes overwritten {PASSES} times, no LUKS magic left",
                    device.display()
                ),
                Err(e) => format!("{}: {e}", device.display()),
            };
            outcomes.push(what);
        }
        Err(e) => outcomes.push(format!("the root's container: {e}")),
    }
    let suspended = mapping.and_then(|mut m| m.context_handle().suspend(ROOT_MAPPING));
    let key = match suspended {
        Ok(()) => "volume key wiped".to_string(),
        Err(e) => format!("suspend {ROOT_MAPPING}: {e}"),
    };
    say(&format!(
        "{} in {} ms: {}; {key}; powering off",
        marker::KILL_SWITCH_DONE,
        start.elapsed().as_millis(),
        outcomes.join("; ")
    ));
    power_off_at_once(say)
}

/// The device under the root mapping and the size of its LUKS metadata, read while it exists.
fn root_container() -> Result<(PathBuf, u64), String> {
    let device = crate::unlock::device_of(ROOT_MAPPING).map_err(|e| e.to_string())?;
    let bytes = crate::unlock::Luks::open(&device)
        .ok()
        .map(|mut luks| luks.device().status_handle().get_data_offset() * 512)
        .filter(|b| *b > 0)
        .unwrap_or(DEFAULT_METADATA_BYTES);
    Ok((device, bytes))
}

/// Steps 1 to 3 on one container (see the module's docs).
pub fn destroy(device: &Path, metadata_bytes: u64) -> Result<(), String> {
    let mut dev = OpenOptions::new().read(true).write(true).open(device).map_err(|e| format!("open: {e}"))?;
    let mut chunk = vec![0u8; CHUNK];
    for pass in 1..=PASSES {
        dev.seek(SeekFrom::Start(0)).map_err(|e| format!("seek: {e}"))?;
        let mut left = metadata_bytes;
        while left > 0 {
            let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
            getrandom::fill(&mut chunk[..n]).map_err(|e| format!("random: {e}"))?;
            dev.write_all(&chunk[..n]).map_err(|e| format!("pass {pass}: write: {e}"))?;
            left -= n as u64;
        }
        dev.sync_all().map_err(|e| format!("pass {pass}: flush: {e}"))?;
    }
    // A regular file (tests) or a device without discard: the overwrite is all there is.
    let _ = crate::ioctl::discard(&dev, 0, metadata_bytes);
    dev.sync_all().map_err(|e| format!("flush: {e}"))?;
    check_no_magic(device, metadata_bytes)
}

/// Reads each header offset from the device itself (O_DIRECT: not the page cache's copy).
fn check_no_magic(device: &Path, metadata_bytes: u64) -> Result<(), String> {
    let mut dev = open_direct(device).map_err(|e| format!("open for reading: {e}"))?;
    // O_DIRECT wants an aligned buffer: 4 KiB inside a larger allocation.
    let mut raw = vec![0u8; 8192];
    let offset = raw.as_ptr().align_offset(4096);
    for at in HEADER_OFFSETS.iter().copied().filter(|at| *at < metadata_bytes) {
        let block = &mut raw[offset..offset + 4096];
        dev.seek(SeekFrom::Start(at)).map_err(|e| format!("seek: {e}"))?;
        dev.read_exact(block).map_err(|e| format!("read back at {at}: {e}"))?;
        if MAGICS.iter().any(|m| block.starts_with(*m)) {
            return Err(format!("a LUKS header is still there at offset {at}"));
        }
    }
    Ok(())
}

fn open_direct(device: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).custom_flags(nix::libc::O_DIRECT).open(device).or_else(|_| {
        // tmpfs (tests) has no O_DIRECT; its pages are the file.
        File::open(device)
    })
}

/// Power off with no sync (the root's mapping is suspended: a sync would wait for ever).
fn power_off_at_once(say: &dyn Fn(&str)) -> ! {
    match crate::guard::check("power off") {
        Err(e) => say(&format!("cloister: kill switch: {e}")),
        Ok(_) => {
            let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
            say(&format!("cloister: kill switch: power off: {e}"));
        }
    }
    // Nothing is left to run for: wait for the power to go.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// A LUKS2 container file: after `destroy`, cryptsetup finds no header and the area before
    /// the data offset holds no magic; the data after it is untouched.
    #[test]
    fn destroy_leaves_no_header_behind() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("luks.img");
        std::fs::File::create(&img).unwrap().set_len(32 << 20).unwrap();
        let mut child = Command::new("cryptsetup")
            .args(["luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2"])
            .args(["--pbkdf-force-iterations", "1000", "--key-file", "-"])
            .arg(&img)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"passphrase").unwrap();
        assert!(child.wait().unwrap().success());
        let before = std::fs::read(&img).unwrap();
        assert!(before.starts_with(b"LUKS\xba\xbe") && before[0x4000..].starts_with(b"SKUL\xba\xbe"));
        destroy(&img, DEFAULT_METADATA_BYTES).unwrap();
        let after = std::fs::read(&img).unwrap();
        for at in HEADER_OFFSETS {
            let at = at as usize;
            assert!(!MAGICS.iter().any(|m| after[at..].starts_with(*m)), "magic left at {at}");
        }
        assert_eq!(after[16 << 20..], before[16 << 20..], "data past the metadata was touched");
        let dump = Command::new("cryptsetup").arg("luksDump").arg(&img).output().unwrap();
        assert!(!dump.status.success(), "luksDump still reads a header");
    }
}
