//! The boot clock: CLOCK_BOOTTIME counts from kernel start and keeps counting across
//! switch_root, so stage 1 and stage 2 report times on the same axis. Also reads the wall clock
//! (CLOCK_REALTIME), which stage 2 keeps from starting before the image's build time.

use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use nix::time::{clock_gettime, ClockId};

/// Milliseconds since the kernel started; 0 if the clock cannot be read.
pub fn boot_ms() -> u64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// The wall clock as time since the Unix epoch (zero if the clock says before 1970).
pub fn realtime() -> Result<Duration, nix::Error> {
    let t = clock_gettime(ClockId::CLOCK_REALTIME)?;
    let secs = u64::try_from(t.tv_sec()).unwrap_or(0);
    let nanos = u32::try_from(t.tv_nsec()).unwrap_or(0);
    Ok(Duration::new(secs, nanos))
}

/// The kernel's own log of its last steps before our init, in ms since boot (the printk clock
/// matches the boot clock on a machine that has not slept): when it began to unpack the
/// initramfs, when it freed the archive (unpacked), and when it ran `/init`. Read from
/// `/dev/kmsg` after the fact, so that stage 1 does not pay for it; `None` where the log holds
/// no such line (rotated out, or no /dev/kmsg).
pub fn kernel_milestones() -> Option<String> {
    use std::io::Read;
    let mut kmsg = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open("/dev/kmsg")
        .ok()?;
    let mut records = String::new();
    let mut buf = vec![0u8; 8192];
    // One record per read; the boot's first lines are near the start of the buffer.
    for _ in 0..4096 {
        match kmsg.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => records.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    milestones(&records)
}

fn milestones(records: &str) -> Option<String> {
    let at = |needle: &str| {
        records.lines().find(|l| l.contains(needle)).and_then(|l| {
            let usec: u64 = l.split(';').next()?.split(',').nth(2)?.parse().ok()?;
            Some(usec / 1000)
        })
    };
    let run = at("Run /init as init process")?;
    let unpacking = at("Trying to unpack rootfs image as initramfs");
    let freed = at("Freeing initrd memory");
    let ms = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
    Some(format!(
        "{} {} ms; initramfs unpacked from {} to {} ms",
        cloister_proto::marker::KERNEL_RAN_INIT,
        run,
        ms(unpacking),
        ms(freed)
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn milestones_come_from_the_kernel_records() {
        let records = "6,1,0,-;Linux version 6.1\n\
            6,80,812345,-;Trying to unpack rootfs image as initramfs...\n\
            6,90,1430999,-;Freeing initrd memory: 11904K\n\
            6,120,2950001,-;Run /init as init process\n";
        assert_eq!(
            super::milestones(records).unwrap(),
            format!(
                "{} 2950 ms; initramfs unpacked from 812 to 1430 ms",
                cloister_proto::marker::KERNEL_RAN_INIT
            )
        );
        assert_eq!(super::milestones("6,1,0,-;Linux version 6.1\n"), None);
    }

    #[test]
    fn boot_clock_moves_forward() {
        let a = super::boot_ms();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = super::boot_ms();
        assert!(a > 0 && b >= a + 20, "{a} {b}");
    }

    #[test]
    fn realtime_matches_the_system_clock() {
        let ours = super::realtime().unwrap();
        let std = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        assert!(ours.abs_diff(std) < std::time::Duration::from_secs(1), "{ours:?} {std:?}");
    }
}
