//! `cargo xtask build-image`: checks host packages, compiles the pipeline and PID 1, then hands
//! every argument to `cloister-build`, which owns the build's options and phases.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::host;

/// The two binaries a build needs, compiled in release mode.
pub struct Binaries {
    pub builder: PathBuf,
    pub init: PathBuf,
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

/// Where `build-image` writes unless told otherwise; `run` and the tests look there too.
pub fn default_image() -> PathBuf {
    target_dir().join("cloister").join("disk.img")
}

/// Runs cargo from the workspace root with the given arguments.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("cannot run {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}

/// Our binaries the image carries besides PID 1 (the builder reads them beside `--init-bin`).
pub const COMPANIONS: &[&str] = &["cloister-shell", "cloister-bridge", "cloister-ircgate", "cloister-admin"];

pub fn compile_pipeline() -> Result<Binaries> {
    host::ensure(&[host::BUILD])?;
    let mut args = vec!["build", "--release", "--package", "cloister-init", "--package", "cloister-build"];
    for bin in COMPANIONS {
        args.extend(["--package", bin]);
    }
    cargo(&args)?;
    let release = target_dir().join("release");
    Ok(Binaries { builder: release.join("cloister-build"), init: release.join("cloister-init") })
}

pub fn build_image(args: &[String]) -> Result<()> {
    let bins = compile_pipeline()?;
    let status = Command::new(&bins.builder)
        .arg("--init-bin")
        .arg(&bins.init)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {}", bins.builder.display()))?;
    if !status.success() {
        bail!("image build failed");
    }
    Ok(())
}
