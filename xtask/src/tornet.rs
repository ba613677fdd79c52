//! The private Tor network of a test run, driven through the test crate's `tornet` binary: keys
//! are made before the test image is built (the image's tor must know the authorities), and the
//! network runs once, in the background, while the tests run. It lives in a network namespace
//! of its own with no route out; `tornet` refuses any node whose torrc is not a test network's.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::build;

/// The network's directory (keys, node data, logs) and the torrc lines for the appliance.
pub struct Prepared {
    pub dir: PathBuf,
    pub appliance_torrc: PathBuf,
    bin: PathBuf,
}

/// Builds the `tornet` binary and makes (or keeps) the network's keys.
pub fn prepare() -> Result<Prepared> {
    build::cargo(&["build", "--package", "cloister-tests", "--bin", "tornet", "--bin", "socks_connect"])?;
    let bin = build::target_dir().join("debug").join("tornet");
    // Outside the test image's directory: that one is handed to an unprivileged user, and tor
    // refuses data directories that root does not own.
    let dir = build::target_dir().join("tornet");
    let status = Command::new(&bin)
        .arg("prepare")
        .arg(&dir)
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !status.success() {
        bail!("tornet prepare failed: {status}");
    }
    let appliance_torrc = dir.join("appliance-torrc");
    if !appliance_torrc.is_file() {
        bail!("tornet prepare wrote no {}", appliance_torrc.display());
    }
    Ok(Prepared { dir, appliance_torrc, bin })
}

/// The running network; `stop` (or dropping it) ends every node and removes its namespace.
pub struct Running(Option<Child>);

impl Running {
    pub fn start(p: &Prepared) -> Result<Self> {
        let log = std::fs::File::create(p.dir.join("run.log"))?;
        let child = Command::new(&p.bin)
            .arg("run")
            .arg(&p.dir)
            // Closing our end of stdin tells it to stop, even if xtask dies.
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start the private Tor network")?;
        eprintln!("xtask: private Tor network starting (log {})", p.dir.join("run.log").display());
        Ok(Self(Some(child)))
    }

    pub fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        if let Some(mut child) = self.0.take() {
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.end();
    }
}
