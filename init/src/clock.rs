//! The boot clock: CLOCK_BOOTTIME counts from kernel start and keeps counting across
//! switch_root, so stage 1 and stage 2 report times on the same axis.

use nix::time::{clock_gettime, ClockId};

/// Milliseconds since the kernel started; 0 if the clock cannot be read.
pub fn boot_ms() -> u64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
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
}
