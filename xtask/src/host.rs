//! Host packages: what each xtask command needs from Debian, checked with dpkg before any crate
//! that links a native library is compiled. As root the missing ones are installed with apt;
//! otherwise the exact `apt-get install` line is printed and the command stops.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Packages every image build needs: native libraries the crates link against, and the tools
/// the pipeline runs (mkfs.xfs/xfs_db, objcopy, depmod, mtools, systemd-stub).
pub const BUILD: &[&str] = &[
    "libcryptsetup-dev",
    "libssl-dev",
    "libclang-dev",
    "pkg-config",
    "xfsprogs",
    // xfs_fs.h: init's ioctl layouts are checked against it by a unit test.
    "xfslibs-dev",
    "systemd-boot-efi",
    "binutils",
    "kmod",
    "mtools",
];

/// Packages `cargo xtask run` needs on top of [`BUILD`].
pub const RUN: &[&str] = &["qemu-system-x86", "ovmf"];

/// Packages the tests use to check images with independent tools.
pub const TEST: &[&str] = &[
    "cryptsetup-bin",
    "fdisk",
    "dosfstools",
    "cpio",
    "lz4",
    "openssl",
    "busybox-static",
    "nftables",
    "bmap-tools",
    // ssh to the appliance's onion service, and ssh-keygen in PID 1's unit tests.
    "openssh-client",
    // Scans the appliance's address in the onion test while users chat.
    "nmap",
];

/// Test hook: a comma-separated list of packages to treat as missing, so the missing-package
/// path can be tested without ever removing a package from the host. Never auto-installs.
const SIMULATE_MISSING: &str = "CLOISTER_SIMULATE_MISSING_PACKAGES";

/// Makes sure every package in `sets` is installed: installs missing ones as root, else fails
/// with the command line that would install them.
pub fn ensure(sets: &[&[&str]]) -> Result<()> {
    let wanted: Vec<&str> = sets.iter().flat_map(|s| s.iter().copied()).collect();
    let simulated: Vec<String> = std::env::var(SIMULATE_MISSING)
        .map(|v| v.split(',').filter(|s| !s.is_empty()).map(String::from).collect())
        .unwrap_or_default();
    let mut missing = Vec::new();
    for pkg in &wanted {
        if simulated.iter().any(|s| s == pkg) || !is_installed(pkg)? {
            missing.push(*pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let line = format!("apt-get install --no-install-recommends {}", missing.join(" "));
    if !simulated.is_empty() || !is_root() {
        bail!("missing host packages: {}\ninstall them with:\n    sudo {line}", missing.join(", "));
    }
    eprintln!("xtask: installing missing host packages: {}", missing.join(" "));
    run_apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    run_apt(&args)
}

fn run_apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot run apt-get")?;
    if !status.success() {
        bail!("apt-get {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn is_installed(pkg: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .context("cannot run dpkg-query; is this a Debian system?")?;
    Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "install ok installed")
}

pub fn is_root() -> bool {
    // `id -u` keeps xtask free of libc bindings; this runs a handful of times per command.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
