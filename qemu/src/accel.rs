//! Choice between KVM and TCG: "auto" trusts KVM only when the device opens and the CPU advertises
//! hardware virtualisation, because a `/dev/kvm` on a CPU without vmx/svm accepts `accel=kvm` and then
//! crashes OVMF ("KVM internal error").

use std::fs::OpenOptions;
use std::path::Path;

/// The accelerator the caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM when it demonstrably works here, TCG otherwise.
    #[default]
    Auto,
    /// KVM, unchecked: the caller insists.
    Kvm,
    /// QEMU's software emulator: always works, about an order of magnitude slower.
    Tcg,
}

/// The accelerator a VM actually runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accelerator {
    /// True under TCG, where key derivation tuned for real hardware takes many times longer; the
    /// caller decides whether to warn or to pick a cheaper KDF.
    pub fn is_tcg(self) -> bool {
        self == Accelerator::Tcg
    }

    /// The value of QEMU's `-machine accel=`.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}

/// Resolves `Auto` by probing this host's `/dev/kvm` and `/proc/cpuinfo`.
pub fn resolve_accel(requested: Accel) -> Accelerator {
    resolve_with(requested, Path::new("/dev/kvm"), Path::new("/proc/cpuinfo"))
}

pub(crate) fn resolve_with(requested: Accel, kvm_dev: &Path, cpuinfo: &Path) -> Accelerator {
    match requested {
        Accel::Kvm => Accelerator::Kvm,
        Accel::Tcg => Accelerator::Tcg,
        Accel::Auto if kvm_usable(kvm_dev) && cpu_has_virt(cpuinfo) => Accelerator::Kvm,
        Accel::Auto => Accelerator::Tcg,
    }
}

fn kvm_usable(kvm_dev: &Path) -> bool {
    OpenOptions::new().read(true).write(true).open(kvm_dev).is_ok()
}

fn cpu_has_virt(cpuinfo: &Path) -> bool {
    std::fs::read_to_string(cpuinfo).is_ok_and(|text| flags_have_virt(&text))
}

/// True when a `flags` line of cpuinfo lists `vmx` (Intel) or `svm` (AMD) as a whole word.
fn flags_have_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(key, _)| key.trim() == "flags")
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_VIRT: &str = "processor\t: 0\nflags\t\t: fpu vme de pse sse2 hypervisor\nvmx flags\t: vnmi\n";
    const INTEL: &str = "processor\t: 0\nflags\t\t: fpu vme vmx sse2\n";
    const AMD: &str = "processor\t: 0\nflags\t\t: fpu svm sse2\n";

    fn host(cpuinfo: &str, with_dev: bool) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        if with_dev {
            std::fs::write(&dev, b"").unwrap();
        }
        let info = dir.path().join("cpuinfo");
        std::fs::write(&info, cpuinfo).unwrap();
        (dir, dev, info)
    }

    #[test]
    fn auto_needs_both_device_and_cpu_flag() {
        let cases = [
            (INTEL, true, Accelerator::Kvm),
            (AMD, true, Accelerator::Kvm),
            (NO_VIRT, true, Accelerator::Tcg),
            (INTEL, false, Accelerator::Tcg),
            ("flags\t: fpu vmxnet\n", true, Accelerator::Tcg),
        ];
        for (cpuinfo, with_dev, expect) in cases {
            let (_dir, dev, info) = host(cpuinfo, with_dev);
            assert_eq!(resolve_with(Accel::Auto, &dev, &info), expect, "{cpuinfo:?} dev={with_dev}");
        }
    }

    #[test]
    fn explicit_choices_are_kept() {
        let (_dir, dev, info) = host(NO_VIRT, false);
        assert_eq!(resolve_with(Accel::Kvm, &dev, &info), Accelerator::Kvm);
        let (_dir, dev, info) = host(INTEL, true);
        assert_eq!(resolve_with(Accel::Tcg, &dev, &info), Accelerator::Tcg);
    }

    #[test]
    fn missing_cpuinfo_means_tcg() {
        let (dir, dev, _info) = host(INTEL, true);
        assert_eq!(resolve_with(Accel::Auto, &dev, &dir.path().join("absent")), Accelerator::Tcg);
    }
}
