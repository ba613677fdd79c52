//! `cargo xtask run`: boots an image in QEMU with the serial console on this terminal and no
//! network at all (a booted image must never reach the real Tor network from a developer's
//! machine by accident).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use cloister_qemu::{Accel, Console, Firmware, Network, VmConfig};

use crate::{build, host};

#[derive(clap::Args)]
pub struct RunArgs {
    /// Image to boot (default: what `cargo xtask build-image` wrote).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Guest RAM in MiB: unlocking needs the KDF's memory plus the kernel's.
    #[arg(long, default_value_t = 2048)]
    memory: u32,
    /// auto uses KVM only when it really works here, else TCG (software emulation).
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelArg,
    /// OVMF code file (OVMF_CODE*.fd) if it is not in a standard place.
    #[arg(long)]
    firmware: Option<PathBuf>,
    /// Boot a throw-away overlay: nothing the guest writes reaches the image.
    #[arg(long)]
    snapshot: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

pub fn run(args: &RunArgs) -> Result<()> {
    host::ensure(&[host::RUN])?;
    let image = args.image.clone().unwrap_or_else(build::default_image);
    if !image.is_file() {
        bail!("image {} not found; build one with `cargo xtask build-image`", image.display());
    }
    let firmware = match &args.firmware {
        Some(code) => Firmware::from_code(code)?,
        None => Firmware::find()?,
    };
    let accel = match args.accel {
        AccelArg::Auto => Accel::Auto,
        AccelArg::Kvm => Accel::Kvm,
        AccelArg::Tcg => Accel::Tcg,
    };
    let resolved = cloister_qemu::resolve_accel(accel);
    if resolved.is_tcg() {
        warn_slow_unlock(&image);
    }
    let work = build::target_dir().join("cloister").join("run");
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let mut cfg = VmConfig::new(&image, firmware, &work);
    cfg.memory_mib = args.memory;
    cfg.accel = accel;
    cfg.network = Network::None;
    cfg.console = Console::Stdio;
    cfg.snapshot = args.snapshot;
    let status = cloister_qemu::run_interactive(cfg)?;
    if !status.success() {
        bail!("qemu exited with {status}");
    }
    Ok(())
}

/// A production KDF (argon2id, 512 MiB) takes about a minute to check one passphrase under TCG.
fn warn_slow_unlock(image: &std::path::Path) {
    let mut manifest = image.as_os_str().to_owned();
    manifest.push(".manifest.json");
    let test_image = std::fs::read_to_string(PathBuf::from(manifest))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .is_some_and(|m| m["build"]["test_options"] == true);
    if !test_image {
        eprintln!(
            "warning: no working KVM here, QEMU emulates the CPU (TCG): checking a passphrase with the \
             production KDF takes a minute or more"
        );
    }
}
