//! `cargo xtask test`: every tier in one command, the one CI runs.
//!
//! 1. unit and host-integration tests of every crate (`cargo nextest`, which prints each test's
//!    duration; plain `cargo test` where nextest is missing);
//! 2. a test image built by `cloister-build` as an unprivileged user (when run as root), with a
//!    weak KDF that its manifest records;
//! 3. `cloister-tests`: that image checked by independent tools, the builder's bad-input paths,
//!    and the boots under QEMU, with `CLOISTER_E2E=1` and the paths in the environment. Two more
//!    images are built only when the filter may select their test: the fail-closed variant of
//!    the test image, and a production image (default config, no test option) whose decrypted
//!    root is checked for test-network torrc lines.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::{build, host, tornet};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Only the unit and host-integration tests: no image build, no VM.
    #[arg(long)]
    quick: bool,
    /// Reuse the test image from a previous run if it exists (faster local iteration).
    #[arg(long)]
    reuse_image: bool,
    /// Only run tests whose name contains this (passed to the test runner).
    filter: Option<String>,
}

/// Test images lower the KDF cost so that a TCG boot unlocks in seconds; the manifest says so.
pub const TEST_KDF_ARGS: &[&str] = &["--kdf-memory-mib", "64", "--kdf-iterations", "4"];
/// The uid/gid the test image is built as when xtask runs as root (nobody:nogroup).
const UNPRIVILEGED: &str = "65534";
/// The package cache of those builds, outside any home directory nobody could not enter.
const UNPRIVILEGED_CACHE: &str = "/var/cache/cloister-test-unprivileged";

pub fn test(args: &TestArgs) -> Result<()> {
    host::ensure(&[host::BUILD, host::RUN, host::TEST])?;
    let mut timings: Vec<(&str, f64)> = Vec::new();

    let t = Instant::now();
    run_tests(&["--workspace", "--exclude", "cloister-tests"], args.filter.as_deref(), &[])?;
    timings.push(("unit + host integration", t.elapsed().as_secs_f64()));
    if args.quick {
        return print_timings(&timings);
    }

    let t = Instant::now();
    let bins = build::compile_pipeline()?;
    timings.push(("compile pipeline (release)", t.elapsed().as_secs_f64()));

    let t = Instant::now();
    let tornet = tornet::prepare()?;
    timings.push(("private Tor network keys", t.elapsed().as_secs_f64()));

    let t = Instant::now();
    let image = TestImage::build(&bins, args.reuse_image, &tornet)?;
    timings.push(("test image build (unprivileged)", t.elapsed().as_secs_f64()));
    // Only when its test will run: a second image costs a build.
    let fail_closed = match args.filter.as_deref() {
        Some(f) if !FAIL_CLOSED_TEST.contains(f) => None,
        _ => {
            let t = Instant::now();
            let path = image.fail_closed_variant(&bins, args.reuse_image)?;
            timings.push(("fail-closed image build", t.elapsed().as_secs_f64()));
            Some(path)
        }
    };

    let production = match args.filter.as_deref() {
        Some(f) if !PRODUCTION_TEST.contains(f) => None,
        _ => {
            let t = Instant::now();
            let path = production_image(&bins, args.reuse_image)?;
            timings.push(("production image build", t.elapsed().as_secs_f64()));
            Some(path)
        }
    };

    // Started once for the whole run; it bootstraps while the image checks and boots run.
    let network = tornet::Running::start(&tornet)?;
    let t = Instant::now();
    let mut env = image.env(&bins, &tornet)?;
    if let Some(path) = fail_closed {
        env.push(("CLOISTER_TEST_IMAGE_FAIL_CLOSED", path.display().to_string()));
    }
    if let Some(path) = production {
        env.push(("CLOISTER_TEST_IMAGE_PRODUCTION", path.display().to_string()));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let result = run_tests(&["--package", "cloister-tests"], args.filter.as_deref(), &env);
    timings.push(("image checks + QEMU end to end", t.elapsed().as_secs_f64()));
    network.stop();
    result?;
    print_timings(&timings)
}

fn print_timings(timings: &[(&str, f64)]) -> Result<()> {
    eprintln!("\nxtask test: phase durations");
    for (name, secs) in timings {
        eprintln!("  {name:34} {secs:8.1} s");
    }
    Ok(())
}

fn has_nextest() -> bool {
    Command::new("cargo").args(["nextest", "--version"]).output().is_ok_and(|o| o.status.success())
}

/// Runs a set of tests; nextest prints a `PASS [ 1.234s] name` line per test.
fn run_tests(selection: &[&str], filter: Option<&str>, env: &[(&str, &str)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    if has_nextest() {
        cmd.args([
            "nextest",
            "run",
            "--no-fail-fast",
            "--status-level",
            "all",
            "--final-status-level",
            "slow",
        ]);
        cmd.args(selection);
        if filter.is_some() {
            // A filter picks tests from one of the two phases; the other then has none to run.
            cmd.arg("--no-tests=pass");
        }
        cmd.args(filter);
    } else {
        eprintln!("xtask: cargo-nextest not found; per-test durations come from the tests' own output");
        cmd.arg("test").args(selection).arg("--");
        cmd.args(filter);
        cmd.arg("--nocapture");
    }
    cmd.current_dir(build::workspace_root()).envs(env.iter().copied());
    let status = cmd.status().with_context(|| format!("cannot run {cargo}"))?;
    if !status.success() {
        bail!("tests failed ({})", selection.join(" "));
    }
    Ok(())
}

/// The VM test that boots the image whose firewall check fails on purpose
/// (`tests/tests/vm_network.rs`); its image is built only when a run may select it.
const FAIL_CLOSED_TEST: &str = "firewall_check_failure_holds_every_service_and_the_uplink";

/// The image check that opens a production image (`tests/tests/image_checks.rs`); the image is
/// built only when a run may select it.
const PRODUCTION_TEST: &str = "production_image_has_no_test_network_and_records_no_test_option";

/// What `cargo xtask build-image` makes with no options (the embedded default config, the
/// production KDF, no test hook), except that the passphrase comes from a file: written into
/// `target/production-image/`, `passphrase` beside `disk.img`. Built like the test image (as
/// nobody when run as root, the same warm package cache).
fn production_image(bins: &build::Binaries, reuse: bool) -> Result<PathBuf> {
    let dir = build::target_dir().join("production-image");
    let image = dir.join("disk.img");
    let passphrase = dir.join("passphrase");
    if reuse_or_clear(&dir, reuse, &[&image, &passphrase])? {
        return Ok(image);
    }
    write_private(&passphrase, random_passphrase()?.as_bytes())?;
    let args: Vec<String> = vec![
        "--output".into(),
        image.display().to_string(),
        "--passphrase-file".into(),
        passphrase.display().to_string(),
    ];
    run_builder(bins, &dir, &args)?;
    Ok(image)
}

/// The image the end-to-end tests (and the onion benchmark) boot, with the passphrase file
/// they type from.
pub struct TestImage {
    dir: PathBuf,
    image: PathBuf,
    passphrase_file: PathBuf,
}

impl TestImage {
    pub fn build(bins: &build::Binaries, reuse: bool, tornet: &tornet::Prepared) -> Result<Self> {
        let dir = build::target_dir().join("test-image");
        let image = dir.join("disk.img");
        let passphrase_file = dir.join("passphrase");
        let me = Self { dir: dir.clone(), image: image.clone(), passphrase_file: passphrase_file.clone() };
        if reuse_or_clear(&dir, reuse, &[&image, &passphrase_file])? {
            return Ok(me);
        }
        // A fresh random passphrase per run: it only ever exists in this file, which the tests
        // read and which lives in the test image's own directory.
        write_private(&passphrase_file, random_passphrase()?.as_bytes())?;
        let config = write_test_config(&dir)?;
        let mut args: Vec<String> = vec!["--config".into(), config.display().to_string()];
        args.extend(["--output".into(), image.display().to_string()]);
        args.extend(["--passphrase-file".into(), passphrase_file.display().to_string()]);
        args.extend(["--list-files".into(), dir.join("files.jsonl").display().to_string()]);
        args.extend(TEST_KDF_ARGS.iter().map(|s| s.to_string()));
        // A copy the unprivileged build can read: the network's own directory stays root's.
        let torrc = dir.join("appliance-torrc");
        std::fs::copy(&tornet.appliance_torrc, &torrc).context("copying the test network's torrc lines")?;
        args.extend(["--test-tor-network".into(), torrc.display().to_string()]);
        run_builder(bins, &dir, &args)?;
        Ok(me)
    }

    /// The same image (config, passphrase, private Tor network) built again with
    /// `--test-break-firewall-check`, in a directory of its own. The package cache is warm by
    /// now, so this costs the build's local phases only.
    fn fail_closed_variant(&self, bins: &build::Binaries, reuse: bool) -> Result<PathBuf> {
        let dir = build::target_dir().join("test-image-fail-closed");
        let image = dir.join("disk.img");
        if reuse_or_clear(&dir, reuse, &[&image])? {
            return Ok(image);
        }
        for name in ["test-image.toml", "passphrase", "appliance-torrc"] {
            std::fs::copy(self.dir.join(name), dir.join(name))
                .with_context(|| format!("cannot copy {name} for the fail-closed image"))?;
        }
        let path = |name: &str| dir.join(name).display().to_string();
        let mut args: Vec<String> = vec!["--config".into(), path("test-image.toml")];
        args.extend(["--output".into(), image.display().to_string()]);
        args.extend(["--passphrase-file".into(), path("passphrase")]);
        args.extend(TEST_KDF_ARGS.iter().map(|s| s.to_string()));
        args.extend(["--test-tor-network".into(), path("appliance-torrc")]);
        args.push("--test-break-firewall-check".into());
        run_builder(bins, &dir, &args)?;
        Ok(image)
    }

    /// What the end-to-end tests and the onion benchmark find the image, its files and the
    /// private Tor network by (`cloister_tests::E2e`, `CLOISTER_TORNET_DIR`).
    pub fn env(
        &self,
        bins: &build::Binaries,
        tornet: &tornet::Prepared,
    ) -> Result<Vec<(&'static str, String)>> {
        let xtask = std::env::current_exe().context("cannot find the xtask binary")?;
        Ok(vec![
            ("CLOISTER_E2E", "1".into()),
            ("CLOISTER_TEST_IMAGE", self.image.display().to_string()),
            ("CLOISTER_TEST_PASSPHRASE_FILE", self.passphrase_file.display().to_string()),
            ("CLOISTER_TEST_WORK", self.dir.join("work").display().to_string()),
            ("CLOISTER_BUILDER_BIN", bins.builder.display().to_string()),
            ("CLOISTER_INIT_BIN", bins.init.display().to_string()),
            ("CLOISTER_XTASK_BIN", xtask.display().to_string()),
            ("CLOISTER_TEST_CACHE", UNPRIVILEGED_CACHE.into()),
            ("CLOISTER_TORNET_DIR", tornet.dir.display().to_string()),
        ])
    }
}

/// `true` when `reuse` finds every one of `outputs` (the image first) from an earlier build;
/// otherwise `dir` is made anew, empty, for this one.
fn reuse_or_clear(dir: &Path, reuse: bool, outputs: &[&Path]) -> Result<bool> {
    if reuse && outputs.iter().all(|p| p.is_file()) {
        eprintln!("xtask: reusing {}", outputs.first().map_or(dir, |p| p).display());
        return Ok(true);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(false)
}

/// Chat accounts of the test image; each password is fresh per build and lives only in
/// `chat-<name>` (0600) beside the passphrase file, the image holding just its hash.
pub const CHAT_USERS: &[&str] = &["alice", "bob"];

/// `tests/test-image.toml` plus the chat accounts, written into the test image's directory.
fn write_test_config(dir: &Path) -> Result<PathBuf> {
    let base = build::workspace_root().join("tests").join("test-image.toml");
    let mut text =
        std::fs::read_to_string(&base).with_context(|| format!("cannot read {}", base.display()))?;
    text.push_str("\n# Added by cargo xtask test: fresh passwords, in chat-<name> beside the image.\n[chat]\nusers = [\n");
    for name in CHAT_USERS {
        let password = random_passphrase()?;
        let password = password.trim_end();
        write_private(&dir.join(format!("chat-{name}")), password.as_bytes())?;
        text.push_str(&format!(
            "    {{ name = \"{name}\", password_hash = \"{}\" }},\n",
            crypt_hash(password)?
        ));
    }
    text.push_str("]\n");
    let key = admin_key(dir)?;
    let console = random_passphrase()?;
    let console = console.trim_end();
    write_private(&dir.join(format!("console-{ADMIN}")), console.as_bytes())?;
    text.push_str(&format!(
        "\n# Added by cargo xtask test: an admin whose key is {ADMIN_KEY} and whose console password\n\
         # is console-{ADMIN} beside the image.\n\
         # A short idle timeout, so that the console test can see a session end by it.\n\
         [admin]\nidle_timeout_secs = {IDLE_SECS}\n\
         accounts = [{{ name = \"{ADMIN}\", ssh_key = \"{key}\", console_password_hash = \"{}\" }}]\n",
        crypt_hash(console)?
    ));
    let config = dir.join("test-image.toml");
    std::fs::write(&config, text).with_context(|| format!("cannot write {}", config.display()))?;
    Ok(config)
}

/// The test image's admin account and its private key's file name (in the test image's
/// directory; fresh per build, like the passwords).
pub const ADMIN: &str = "ops";
/// The test image's admin idle timeout: short, so that a test sees a session end by it.
const IDLE_SECS: u64 = 20;
const ADMIN_KEY: &str = "admin-key";

/// Makes the admin's Ed25519 key pair with OpenSSH's ssh-keygen; returns the public line.
fn admin_key(dir: &Path) -> Result<String> {
    let key = dir.join(ADMIN_KEY);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "cloister-test-admin", "-f"])
        .arg(&key)
        .stdin(std::process::Stdio::null())
        .status()
        .context("cannot run ssh-keygen")?;
    if !status.success() {
        bail!("ssh-keygen failed: {status}");
    }
    let public =
        std::fs::read_to_string(key.with_extension("pub")).context("reading the admin's public key")?;
    Ok(public.trim().to_string())
}

/// A SHA-512 crypt(3) hash by OpenSSL (a test host package), the password on stdin.
fn crypt_hash(password: &str) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(["passwd", "-6", "-stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run openssl passwd")?;
    child.stdin.take().context("openssl stdin")?.write_all(format!("{password}\n").as_bytes())?;
    let out = child.wait_with_output()?;
    let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || !hash.starts_with("$6$") {
        bail!("openssl passwd -6 failed: {}", out.status);
    }
    Ok(hash)
}

fn random_passphrase() -> Result<String> {
    use std::io::Read;
    let mut buf = [0u8; 18];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("cannot read /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect::<String>() + "\n")
}

/// Runs the builder as nobody when we are root, proving the build needs no privileges. The
/// binaries are copied into the test directory first: the workspace may sit under a home
/// directory that nobody cannot enter.
fn run_builder(bins: &build::Binaries, dir: &Path, args: &[String]) -> Result<()> {
    let mut cmd = if host::is_root() {
        let bin_dir = dir.join("bin");
        std::fs::create_dir_all(&bin_dir)?;
        let builder = bin_dir.join("cloister-build");
        std::fs::copy(&bins.builder, &builder)?;
        let release = bins.init.parent().unwrap_or(Path::new("."));
        for bin in std::iter::once(&"cloister-init").chain(build::COMPANIONS) {
            std::fs::copy(release.join(bin), bin_dir.join(bin))
                .with_context(|| format!("cannot copy {bin} for the unprivileged build"))?;
        }
        let cache = PathBuf::from(UNPRIVILEGED_CACHE);
        std::fs::create_dir_all(&cache)?;
        chown_nobody(&[dir, &cache])?;
        let mut c = Command::new("setpriv");
        c.args(["--reuid", UNPRIVILEGED, "--regid", UNPRIVILEGED, "--clear-groups", "--"]);
        c.arg(&builder).arg("--cache-dir").arg(&cache);
        c.env("HOME", dir);
        c.args(args);
        c
    } else {
        let mut c = Command::new(&bins.builder);
        c.arg("--init-bin").arg(&bins.init).args(args);
        c
    };
    cmd.current_dir(dir);
    let status = cmd.status().context("cannot run cloister-build")?;
    if !status.success() {
        bail!("test image build failed: {status}");
    }
    Ok(())
}

fn chown_nobody(paths: &[&Path]) -> Result<()> {
    let owner = format!("{UNPRIVILEGED}:{UNPRIVILEGED}");
    let status =
        Command::new("chown").arg("-R").arg(&owner).args(paths).status().context("cannot run chown")?;
    if !status.success() {
        bail!("chown {owner} failed");
    }
    Ok(())
}

fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(contents).with_context(|| format!("cannot write {}", path.display()))
}
