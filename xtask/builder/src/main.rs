//! `cloister-build`: the image pipeline, run by `cargo xtask build-image` after the host
//! packages are in place. It composes `cloister-rootfs` and `cloister-image` in named phases:
//! packages → rootfs → initramfs → uki → xfs → luks → image. Each phase prints its duration.
//! Nothing here needs root: everything is written as plain files in a work directory, and the
//! final image appears atomically (temporary file, fsync, rename).
#![forbid(unsafe_code)]

mod chat;
mod initrd;
mod manifest;
mod phases;
mod progress;
mod rootfs_phase;
mod secret;
mod services;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use cloister_config::Config;

/// Build a Cloister disk image.
#[derive(Parser, Debug)]
#[command(name = "cargo xtask build-image")]
pub struct Args {
    /// cloister.toml to read; without it the embedded default applies.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output image path; `.sha256` and `.manifest.json` go beside it.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Read the passphrase from this file (one trailing newline stripped) instead of prompting.
    #[arg(long)]
    pub passphrase_file: Option<PathBuf>,
    /// argon2id memory in MiB (test images only: lowers the config's value).
    #[arg(long)]
    pub kdf_memory_mib: Option<u32>,
    /// argon2id time per passphrase check in ms (test images only).
    #[arg(long)]
    pub kdf_time_ms: Option<u32>,
    /// Fixed argon2id iterations instead of a benchmark (test images only: fast and repeatable).
    #[arg(long)]
    pub kdf_iterations: Option<u32>,
    /// A Debian mirror URL to use instead of the host's apt sources.
    #[arg(long)]
    pub mirror: Option<String>,
    /// Refresh the package lists even if they are recent.
    #[arg(long)]
    pub refresh: bool,
    /// Cache for package lists and .debs (default $XDG_CACHE_HOME/cloister).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Keep the work directory (staging tree, initramfs, UKI) after a successful build.
    #[arg(long)]
    pub keep_work: bool,
    /// torrc lines that make the appliance's tor join a private test network (test images only:
    /// must contain `TestingTorNetwork 1`; recorded in the manifest).
    #[arg(long)]
    pub test_tor_network: Option<PathBuf>,
    /// Make PID 1's firewall check fail on purpose (test images only: the plan expects one
    /// rule more than PID 1 applies, so the image must boot with no service and no network;
    /// recorded in the manifest).
    #[arg(long)]
    pub test_break_firewall_check: bool,
    /// The appliance's PID 1 binary (xtask passes its fresh release build); our other binaries
    /// (shell, bridge, ircgate) are taken from the same directory.
    #[arg(long)]
    pub init_bin: Option<PathBuf>,
    /// Write one JSON line per file of the root (path, kind, mode, owner, target, sha256) for tests.
    #[arg(long)]
    pub list_files: Option<PathBuf>,
    /// Output path when --output is absent (set by xtask to the workspace's target dir).
    #[arg(long, hide = true)]
    pub default_output: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nERROR: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    add_sbin_to_path();
    let config = Config::load(args.config.as_deref())?;
    let output = output_path(args)?;
    let init_bin = init_binary(args)?;
    let plan = phases::Plan::new(args, config, output, init_bin)?;
    // Ask first: a typo should not cost a full build.
    let passphrase = match &args.passphrase_file {
        Some(path) => secret::from_file(path)?,
        None => secret::prompt()?,
    };
    let summary = phases::run_all(&plan, &passphrase)?;
    summary.print(started.elapsed());
    Ok(())
}

/// mkfs.xfs and depmod live in /usr/sbin, which an unprivileged user's PATH often lacks.
fn add_sbin_to_path() {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut dirs: Vec<&str> = path.split(':').filter(|d| !d.is_empty()).collect();
    for extra in ["/usr/sbin", "/sbin"] {
        if !dirs.contains(&extra) {
            dirs.push(extra);
        }
    }
    // SAFETY-free: std::env::set_var is safe in edition 2021 and runs before any thread starts.
    std::env::set_var("PATH", dirs.join(":"));
}

fn output_path(args: &Args) -> Result<PathBuf> {
    let out = match (&args.output, &args.default_output) {
        (Some(p), _) => p.clone(),
        (None, Some(p)) => p.clone(),
        (None, None) => PathBuf::from("target/cloister/disk.img"),
    };
    if out.file_name().is_none() || out.is_dir() {
        bail!("output {} must be a file path", out.display());
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create output directory {}", parent.display()))?;
    probe_writable(parent)?;
    Ok(out)
}

/// Fails early on an unwritable output directory instead of after minutes of building.
fn probe_writable(dir: &Path) -> Result<()> {
    let probe = dir.join(format!(".cloister-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("output directory {} is not writable", dir.display()))?;
    std::fs::remove_file(&probe).with_context(|| format!("cannot remove {}", probe.display()))?;
    Ok(())
}

fn init_binary(args: &Args) -> Result<PathBuf> {
    let path = match &args.init_bin {
        Some(p) => p.clone(),
        None => {
            std::env::current_exe().context("cannot find this executable")?.with_file_name("cloister-init")
        }
    };
    if !path.is_file() {
        bail!(
            "PID 1 binary {} not found; build it with `cargo build --release -p cloister-init`",
            path.display()
        );
    }
    Ok(path)
}
