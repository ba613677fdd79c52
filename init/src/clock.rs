//! The boot clock: CLOCK_BOOTTIME counts from kernel start and keeps counting across
//! switch_root, so stage 1 and stage 2 report times on the same axis. Also reads the wall clock
//! (CLOCK_REALTIME), which stage 2 keeps from starting before the image's build time.

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

#[cfg(test)]
mod tests {
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
