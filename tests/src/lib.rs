//! Shared helpers for the end-to-end tests: the environment `cargo xtask test` sets, and
//! independent host tools (sfdisk, dd, cryptsetup, xfs_repair) wrapped so that a failing tool
//! fails the test with its own output. Nothing here reaches into a guest: tests see the disk
//! image file, the serial console and QMP only.
#![forbid(unsafe_code)]

pub mod capture;
pub mod console;
pub mod hsdesc;
pub mod onion;
pub mod qr;
pub mod rawframe;
pub mod tools;
pub mod torctl;
pub mod tornet;
pub mod writelog;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

/// What `cargo xtask test` hands the tests. `None` when run outside it (plain `cargo test`).
pub struct E2e {
    pub image: PathBuf,
    pub passphrase_file: PathBuf,
    pub work: PathBuf,
    pub builder: PathBuf,
    pub init: PathBuf,
    pub xtask: PathBuf,
    /// The package cache the test image was built with (warm), owned by nobody.
    pub cache: PathBuf,
    /// The test image built again with `--test-break-firewall-check`, when the run's filter
    /// selects the test that boots it (`CLOISTER_TEST_IMAGE_FAIL_CLOSED`).
    pub fail_closed_image: Option<PathBuf>,
    /// A production image (default config, no test option, `passphrase` beside it), when the
    /// run's filter selects the test that opens it (`CLOISTER_TEST_IMAGE_PRODUCTION`).
    pub production_image: Option<PathBuf>,
}

impl E2e {
    /// Reads the environment; prints why and returns `None` when the suite is not enabled.
    pub fn from_env(test: &str) -> Option<Self> {
        if std::env::var_os("CLOISTER_E2E").is_none() {
            eprintln!("{test}: not run: set up by `cargo xtask test` (CLOISTER_E2E is unset)");
            return None;
        }
        let var = |k: &str| std::env::var_os(k).map(PathBuf::from).unwrap_or_default();
        let me = Self {
            image: var("CLOISTER_TEST_IMAGE"),
            passphrase_file: var("CLOISTER_TEST_PASSPHRASE_FILE"),
            work: var("CLOISTER_TEST_WORK"),
            builder: var("CLOISTER_BUILDER_BIN"),
            init: var("CLOISTER_INIT_BIN"),
            xtask: var("CLOISTER_XTASK_BIN"),
            cache: var("CLOISTER_TEST_CACHE"),
            fail_closed_image: std::env::var_os("CLOISTER_TEST_IMAGE_FAIL_CLOSED").map(PathBuf::from),
            production_image: std::env::var_os("CLOISTER_TEST_IMAGE_PRODUCTION").map(PathBuf::from),
        };
        // With CLOISTER_E2E set, a missing path is a broken harness, not a reason to skip.
        assert!(me.image.is_file(), "CLOISTER_TEST_IMAGE {} is not a file", me.image.display());
        Some(me)
    }

    pub fn passphrase(&self) -> Result<String> {
        read_passphrase(&self.passphrase_file)
    }

    /// A fresh directory for one test's files, below the run's work directory.
    pub fn scratch(&self, name: &str) -> Result<PathBuf> {
        let dir = self.work.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    pub fn manifest(&self) -> Result<serde_json::Value> {
        let path = manifest_path(&self.image);
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
    }
}

/// What the supervisor's host-integration tests need: a built `cloister-init` and root, no
/// disk image. `None` when run outside `cargo xtask test` (plain `cargo test`).
pub struct Host {
    pub init: PathBuf,
}

impl Host {
    /// Reads `CLOISTER_INIT_BIN`; prints why and returns `None` when it is unset.
    pub fn from_env(test: &str) -> Option<Self> {
        let Some(init) = std::env::var_os("CLOISTER_INIT_BIN").map(PathBuf::from) else {
            // Inside `cargo xtask test` the variable is always set: its absence is a broken harness.
            assert!(
                std::env::var_os("CLOISTER_E2E").is_none(),
                "CLOISTER_E2E is set but CLOISTER_INIT_BIN is not"
            );
            eprintln!(
                "{test}: not run: set CLOISTER_INIT_BIN to a built cloister-init (`cargo xtask test` does)"
            );
            return None;
        };
        assert!(init.is_file(), "CLOISTER_INIT_BIN {} is not a file", init.display());
        assert!(nix::unistd::geteuid().is_root(), "{test}: the supervisor's host tests need root");
        Some(Self { init })
    }
}

/// A passphrase file as the builder reads it: the whole file minus one trailing newline.
pub fn read_passphrase(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text.strip_suffix('\n').unwrap_or(&text).to_string())
}

pub fn manifest_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".manifest.json");
    PathBuf::from(s)
}

/// Runs a command; fails with its stderr when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}):\n{}{}", out.status, stdout(&out), String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

/// Runs a command with `input` on stdin and returns its output whatever the exit status.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input)?;
    }
    Ok(child.wait_with_output()?)
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One partition as `sfdisk --json` reports it.
#[derive(Debug, Clone)]
pub struct Partition {
    pub start: u64,
    pub size: u64,
    pub type_guid: String,
    pub uuid: String,
}

pub const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
pub const ROOT_X86_64_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";

/// The partition table read by util-linux, independent of our writer.
pub fn sfdisk_json(image: &Path) -> Result<serde_json::Value> {
    let out = run(Command::new("sfdisk").arg("--json").arg(image))?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

pub fn partitions(image: &Path) -> Result<Vec<Partition>> {
    let json = sfdisk_json(image)?;
    let parts = json["partitiontable"]["partitions"].as_array().context("no partitions in sfdisk output")?;
    parts
        .iter()
        .map(|p| {
            Ok(Partition {
                start: p["start"].as_u64().context("start")?,
                size: p["size"].as_u64().context("size")?,
                type_guid: p["type"].as_str().context("type")?.to_uppercase(),
                uuid: p["uuid"].as_str().context("uuid")?.to_uppercase(),
            })
        })
        .collect()
}

/// Copies a partition's bytes out of an image with dd (sector units of 512 bytes).
pub fn extract_partition(image: &Path, part: &Partition, out: &Path) -> Result<()> {
    run(Command::new("dd")
        .arg(format!("if={}", image.display()))
        .arg(format!("of={}", out.display()))
        .args(["bs=1M", "iflag=skip_bytes,count_bytes", "conv=sparse", "status=none"])
        .arg(format!("skip={}", part.start * 512))
        .arg(format!("count={}", part.size * 512)))?;
    Ok(())
}

/// Checks a passphrase against a LUKS container file without device-mapper.
pub fn luks_accepts(container: &Path, passphrase: &str) -> Result<bool> {
    let out = run_with_input(
        Command::new("cryptsetup").args(["open", "--test-passphrase", "--key-file", "-"]).arg(container),
        passphrase.as_bytes(),
    )?;
    Ok(out.status.success())
}

/// Decrypts a LUKS2 container file in place, offline and in userspace (no dm on the host): the
/// plaintext ends up at offset 0 and the header goes to `header_out`. Works on a copy.
pub fn decrypt_offline(container: &Path, header_out: &Path, passphrase: &str) -> Result<()> {
    let out = run_with_input(
        Command::new("cryptsetup")
            .args(["reencrypt", "--decrypt", "--batch-mode", "--force-offline-reencrypt", "--header"])
            .arg(header_out)
            .args(["--key-file", "-"])
            .arg(container),
        passphrase.as_bytes(),
    )?;
    if !out.status.success() {
        bail!(
            "offline decryption of {} failed: {}",
            container.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `xfs_repair -n`: exit 0 means a clean filesystem (including a clean log).
pub fn xfs_clean(plain: &Path) -> Result<()> {
    run(Command::new("xfs_repair").arg("-n").arg(plain)).map(|_| ())
}

/// A plaintext XFS file mounted read-only through a loop device this test made; unmounted and
/// detached on drop (in that order). `norecovery`: a dirty log is never replayed, nothing is
/// written to the file.
pub struct MountedXfs {
    pub dir: PathBuf,
    loop_dev: String,
}

impl MountedXfs {
    pub fn new(plain: &Path, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let out = run(Command::new("losetup").args(["--find", "--show", "--read-only"]).arg(plain))?;
        let loop_dev = stdout(&out).trim().to_string();
        anyhow::ensure!(loop_dev.starts_with("/dev/loop"), "losetup answered {loop_dev:?}");
        let me = Self { dir: dir.to_owned(), loop_dev };
        run(Command::new("mount").args(["-t", "xfs", "-o", "ro,norecovery", &me.loop_dev]).arg(dir))?;
        Ok(me)
    }
}

impl Drop for MountedXfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.loop_dev).status();
    }
}

/// SHA256 of every regular file under `dir`, by path relative to it (symlinks not followed).
pub fn file_hashes(dir: &Path) -> Result<std::collections::BTreeMap<PathBuf, String>> {
    use sha2::{Digest, Sha256};
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                todo.push(entry.path());
            } else if kind.is_file() {
                let mut hasher = Sha256::new();
                let mut f = std::fs::File::open(entry.path())?;
                std::io::copy(&mut f, &mut hasher)?;
                let rel = entry.path().strip_prefix(dir)?.to_owned();
                out.insert(rel, format!("{:x}", hasher.finalize()));
            }
        }
    }
    Ok(out)
}

/// Makes a sparse copy of `src` (images are mostly zeros before encryption fills them; the copy
/// keeps what is sparse sparse).
pub fn sparse_copy(src: &Path, dst: &Path) -> Result<()> {
    run(Command::new("cp").arg("--sparse=always").arg(src).arg(dst)).map(|_| ())
}

/// Prints a scenario's duration the same way for every test, so logs show where time goes.
pub fn timed<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t = std::time::Instant::now();
    let r = f();
    let status = if r.is_ok() { "ok" } else { "FAILED" };
    eprintln!("scenario {name}: {status} ({:.1} s)", t.elapsed().as_secs_f64());
    r.with_context(|| format!("scenario {name}"))
}

/// A named network namespace a test made (`ip netns add`), loopback up, deleted on drop. Every
/// command run in it first checks that the name does not pin the host's own namespace.
pub struct TestNetns {
    pub name: String,
}

impl TestNetns {
    pub fn new(name: String) -> Result<Self> {
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace pinned under /run/netns must not be the one this test runs in (the host's).
    pub fn ensure_not_host(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let pinned = std::fs::metadata(Path::new("/run/netns").join(&self.name))?;
        let own = std::fs::metadata("/proc/self/ns/net")?;
        anyhow::ensure!(
            (pinned.dev(), pinned.ino()) != (own.dev(), own.ino()),
            "{} is the host's namespace",
            self.name
        );
        Ok(())
    }

    /// `ip netns exec <name> argv…`, not yet run.
    pub fn cmd(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(argv);
        c
    }

    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        self.ensure_not_host()?;
        run(&mut self.cmd(argv))
    }

    pub fn exec_text(&self, argv: &[&str]) -> Result<String> {
        Ok(stdout(&self.exec(argv)?))
    }

    pub fn json(&self, argv: &[&str]) -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(&self.exec(argv)?.stdout)?)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).status();
    }
}

/// A child process killed and reaped on drop.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// 16 random hex characters: a value no earlier run and no other test used.
pub fn token() -> Result<String> {
    let mut bytes = [0u8; 8];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
