//! Bad input to the build: each is a clear error, a non-zero exit and no output left behind.
//! These run the real `cloister-build` and `xtask` binaries that `cargo xtask test` built.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};
use cloister_tests::*;

/// Runs the builder with a passphrase file and the given extra arguments, output in `dir`.
fn build(e2e: &E2e, dir: &Path, extra: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(&e2e.builder);
    cmd.arg("--init-bin").arg(&e2e.init).arg("--output").arg(dir.join("disk.img")).args(extra);
    Ok(cmd.output()?)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Nothing but the inputs the test itself put there may remain in `dir`.
fn assert_no_output(dir: &Path, inputs: &[&str]) -> Result<()> {
    let left: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| !inputs.iter().any(|i| p.file_name().is_some_and(|n| n == *i)))
        .collect();
    ensure!(left.is_empty(), "partial output left behind: {left:?}");
    Ok(())
}

fn passphrase_file(dir: &Path, content: &str) -> Result<String> {
    let p = dir.join("pass");
    std::fs::write(&p, content)?;
    Ok(p.display().to_string())
}

#[test]
fn unknown_config_key_names_file_line_and_key() -> Result<()> {
    let Some(e2e) = E2e::from_env("bad-key") else { return Ok(()) };
    let dir = e2e.scratch("bad-key")?;
    std::fs::write(dir.join("c.toml"), "[image]\nsize_mib = 1024\ncolour = \"blue\"\n")?;
    let pass = passphrase_file(&dir, "secret\n")?;
    let out = build(
        &e2e,
        &dir,
        &["--config", &dir.join("c.toml").display().to_string(), "--passphrase-file", &pass],
    )?;
    let err = stderr(&out);
    ensure!(!out.status.success(), "accepted an unknown key");
    ensure!(err.contains("c.toml:3: image.colour"), "error does not name file:line: key: {err}");
    assert_no_output(&dir, &["c.toml", "pass"])
}

#[test]
fn bad_value_names_the_key() -> Result<()> {
    let Some(e2e) = E2e::from_env("bad-value") else { return Ok(()) };
    let dir = e2e.scratch("bad-value")?;
    std::fs::write(dir.join("c.toml"), "[kdf]\nmemory_mib = -5\n")?;
    let pass = passphrase_file(&dir, "secret\n")?;
    let out = build(
        &e2e,
        &dir,
        &["--config", &dir.join("c.toml").display().to_string(), "--passphrase-file", &pass],
    )?;
    let err = stderr(&out);
    ensure!(!out.status.success(), "accepted a negative memory size");
    ensure!(err.contains("c.toml:2: kdf.memory_mib"), "error does not name the key: {err}");
    assert_no_output(&dir, &["c.toml", "pass"])
}

#[test]
fn empty_passphrase_is_refused() -> Result<()> {
    let Some(e2e) = E2e::from_env("empty-pass") else { return Ok(()) };
    let dir = e2e.scratch("empty-pass")?;
    let pass = passphrase_file(&dir, "\n")?;
    let out = build(&e2e, &dir, &["--passphrase-file", &pass])?;
    ensure!(!out.status.success(), "accepted an empty passphrase");
    ensure!(stderr(&out).contains("passphrase is empty"), "{}", stderr(&out));
    assert_no_output(&dir, &["pass"])
}

#[test]
fn mismatched_confirmation_is_refused() -> Result<()> {
    let Some(e2e) = E2e::from_env("mismatch") else { return Ok(()) };
    let dir = e2e.scratch("mismatch")?;
    // `script` gives the builder a terminal, as a person typing would have. The answers are
    // typed after a pause, as a person would after seeing the prompt: text typed before the
    // prompt turns echo off is echoed by the terminal itself, whatever the program does.
    let cmdline = format!(
        "{} --init-bin {} --output {}",
        e2e.builder.display(),
        e2e.init.display(),
        dir.join("disk.img").display()
    );
    let typist = "sleep 2; printf 'first-answer\\n'; sleep 2; printf 'second-answer\\n'; sleep 2";
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("({typist}) | script -qec \"$0\" /dev/null"))
        .arg(&cmdline)
        .output()?;
    let all = format!("{}{}", stdout(&out), stderr(&out));
    ensure!(!out.status.success(), "accepted two different passphrases: {all}");
    ensure!(all.contains("the two passphrases differ"), "{all}");
    ensure!(
        !all.contains("first-answer") && !all.contains("second-answer"),
        "a passphrase was echoed: {all}"
    );
    assert_no_output(&dir, &[])
}

#[test]
fn unwritable_output_path_fails_before_building() -> Result<()> {
    let Some(e2e) = E2e::from_env("unwritable") else { return Ok(()) };
    let dir = e2e.scratch("unwritable")?;
    let pass = passphrase_file(&dir, "secret\n")?;
    // /proc refuses new files even to root.
    let mut cmd = Command::new(&e2e.builder);
    cmd.arg("--init-bin").arg(&e2e.init).args([
        "--output",
        "/proc/cloister-test/disk.img",
        "--passphrase-file",
        &pass,
    ]);
    let out = cmd.output()?;
    ensure!(!out.status.success(), "wrote into /proc?");
    ensure!(stderr(&out).contains("/proc/cloister-test"), "error does not name the path: {}", stderr(&out));
    Ok(())
}

#[test]
fn missing_host_package_is_named_with_the_apt_line() -> Result<()> {
    let Some(e2e) = E2e::from_env("missing-package") else { return Ok(()) };
    // Simulated: the host keeps its packages; xtask only pretends xfsprogs is absent.
    let out = Command::new(&e2e.xtask)
        .arg("build-image")
        .env("CLOISTER_SIMULATE_MISSING_PACKAGES", "xfsprogs")
        .output()?;
    let err = stderr(&out);
    ensure!(!out.status.success(), "build went on without xfsprogs");
    ensure!(err.contains("xfsprogs") && err.contains("apt-get install"), "{err}");
    Ok(())
}

#[test]
fn full_output_filesystem_is_a_clear_error_and_leaves_nothing() -> Result<()> {
    let Some(e2e) = E2e::from_env("full") else { return Ok(()) };
    let dir = e2e.scratch("full")?;
    let pass = dir.join("pass");
    std::fs::write(&pass, "secret\n")?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::fs::set_permissions(&pass, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let bins = copy_build_bins(&e2e, &dir)?;
    // A 64 MiB tmpfs in a mount namespace of this test's own: the host's mounts never change,
    // and the filesystem vanishes with the namespace. The build runs as nobody, like the test
    // image's, with the same warm package cache, and fills the tmpfs while unpacking.
    let small = dir.join("small");
    std::fs::create_dir_all(&small)?;
    let script = format!(
        "mount -t tmpfs -o size=64m,mode=1777 cloister-full-test {small} && \
         setpriv --reuid 65534 --regid 65534 --clear-groups -- {bin} --init-bin {init} \
           --cache-dir {cache} --output {small}/disk.img --passphrase-file {pass}; \
         echo \"exit=$?\"; echo \"left=$(ls -A {small})\"",
        small = small.display(),
        bin = bins.join("cloister-build").display(),
        init = bins.join("cloister-init").display(),
        cache = e2e.cache.display(),
        pass = pass.display(),
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()?;
    let text = format!("{}{}", stdout(&out), stderr(&out));
    ensure!(text.contains("exit=1"), "the build did not fail on a full filesystem:\n{text}");
    ensure!(text.contains("No space left on device"), "the error does not say the disk is full:\n{text}");
    ensure!(
        text.contains("left=\n") || text.trim_end().ends_with("left="),
        "partial output left behind:\n{text}"
    );
    Ok(())
}

/// The builder, PID 1 and its companion binaries (which the build copies from PID 1's
/// directory) in `dir/bin`, where nobody can read them.
fn copy_build_bins(e2e: &E2e, dir: &Path) -> Result<PathBuf> {
    let bins = dir.join("bin");
    std::fs::create_dir_all(&bins)?;
    std::fs::copy(&e2e.builder, bins.join("cloister-build"))?;
    let from = e2e.init.parent().context("PID 1 binary has no directory")?;
    for name in ["cloister-init", "cloister-shell", "cloister-bridge", "cloister-ircgate", "cloister-admin"] {
        std::fs::copy(from.join(name), bins.join(name)).with_context(|| format!("copying {name}"))?;
    }
    Ok(bins)
}

/// Runs the builder as nobody (as `cargo xtask test` builds the test image) on `config`, with the
/// warm package cache, so that it gets as far as resolving the services against the real image
/// tree. Returns the exit status's success and everything it printed; checks that nothing is
/// left in its output directory.
fn build_with_services(e2e: &E2e, name: &str, config: &str) -> Result<(bool, String)> {
    use std::os::unix::fs::PermissionsExt;
    let dir = e2e.scratch(name)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let bins = copy_build_bins(e2e, &dir)?;
    let conf = dir.join("c.toml");
    std::fs::write(&conf, config)?;
    let pass = dir.join("pass");
    std::fs::write(&pass, "secret\n")?;
    for f in [&conf, &pass] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644))?;
    }
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir)?;
    std::os::unix::fs::chown(&out_dir, Some(65534), Some(65534))?;
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "--"])
        .arg(bins.join("cloister-build"))
        .arg("--init-bin")
        .arg(bins.join("cloister-init"))
        .arg("--cache-dir")
        .arg(&e2e.cache)
        .arg("--config")
        .arg(&conf)
        .arg("--output")
        .arg(out_dir.join("disk.img"))
        .arg("--passphrase-file")
        .arg(&pass)
        .env("HOME", &out_dir)
        .output()?;
    assert_no_output(&out_dir, &[])?;
    Ok((out.status.success(), format!("{}{}", stdout(&out), stderr(&out))))
}

#[test]
fn service_with_missing_binary_names_service_and_key() -> Result<()> {
    let Some(e2e) = E2e::from_env("svc-missing-binary") else { return Ok(()) };
    let config = "[services.ghost]\nexec = \"/usr/sbin/no-such-daemon\"\nuser = \"irc\"\n";
    let (ok, text) = build_with_services(&e2e, "svc-missing-binary", config)?;
    ensure!(!ok, "built an image whose service has no executable:\n{text}");
    ensure!(
        text.contains("services.ghost.exec: /usr/sbin/no-such-daemon does not exist in the image"),
        "error does not name the service and key:\n{text}"
    );
    Ok(())
}

#[test]
fn service_with_unknown_user_names_service_and_key() -> Result<()> {
    let Some(e2e) = E2e::from_env("svc-unknown-user") else { return Ok(()) };
    let config = "[services.ghost]\nexec = \"/usr/sbin/ngircd\"\nuser = \"nosuchuser\"\n";
    let (ok, text) = build_with_services(&e2e, "svc-unknown-user", config)?;
    ensure!(!ok, "built an image whose service runs as an unknown user:\n{text}");
    ensure!(
        text.contains("services.ghost.user: no user \"nosuchuser\" in the image"),
        "error does not name the service and key:\n{text}"
    );
    Ok(())
}

#[test]
fn service_with_impossible_mount_names_service_and_key() -> Result<()> {
    let Some(e2e) = E2e::from_env("svc-impossible-mount") else { return Ok(()) };
    // Outside /var/lib/cloister nothing is created for a service: the path must be in the image.
    let config =
        "[services.ghost]\nexec = \"/usr/sbin/ngircd\"\nuser = \"irc\"\nwritable = [\"/srv/ghost-data\"]\n";
    let (ok, text) = build_with_services(&e2e, "svc-impossible-mount", config)?;
    ensure!(!ok, "built an image whose service mounts a path that does not exist:\n{text}");
    ensure!(
        text.contains("services.ghost.writable: /srv/ghost-data does not exist in the image"),
        "error does not name the service and key:\n{text}"
    );
    Ok(())
}

#[test]
fn service_dependency_cycle_names_file_line_service_and_key() -> Result<()> {
    let Some(e2e) = E2e::from_env("svc-cycle") else { return Ok(()) };
    let config = "[services.alpha]\nexec = \"/usr/sbin/ngircd\"\nuser = \"irc\"\nafter = [\"beta\"]\n\n\
                  [services.beta]\nexec = \"/usr/sbin/ngircd\"\nuser = \"irc\"\nafter = [\"alpha\"]\n";
    let (ok, text) = build_with_services(&e2e, "svc-cycle", config)?;
    ensure!(!ok, "built an image with a dependency cycle:\n{text}");
    ensure!(
        text.contains("c.toml:4: services.alpha.after: dependency cycle alpha -> beta -> alpha"),
        "error does not name file:line, the service and key:\n{text}"
    );
    // Refused while reading the config, before any package is touched.
    ensure!(!text.contains("phase packages"), "the cycle was found only after the build started:\n{text}");
    Ok(())
}
