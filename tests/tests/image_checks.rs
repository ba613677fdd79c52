//! The built test image, checked by tools that share no code with our writer: util-linux
//! (sfdisk), dosfstools/mtools, binutils (objdump/objcopy), cryptsetup, xfsprogs and the host
//! kernel's own XFS driver (read-only loop mount of an offline-decrypted copy).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use cloister_tests::*;

fn setup(name: &str) -> Option<E2e> {
    E2e::from_env(name)
}

#[test]
fn gpt_has_esp_and_discoverable_root_aligned_with_backup_header() -> Result<()> {
    let Some(e2e) = setup("gpt") else { return Ok(()) };
    let json = sfdisk_json(&e2e.image)?;
    ensure!(json["partitiontable"]["label"] == "gpt", "not a GPT: {json}");
    let parts = partitions(&e2e.image)?;
    ensure!(parts.len() == 2, "expected ESP + root, got {parts:?}");
    ensure!(parts[0].type_guid == ESP_TYPE, "first partition is not an ESP: {:?}", parts[0]);
    ensure!(parts[1].type_guid == ROOT_X86_64_TYPE, "second is not an x86-64 root: {:?}", parts[1]);
    for p in &parts {
        ensure!(p.start % 2048 == 0, "partition not 1 MiB aligned: {p:?}");
    }
    let disk_sectors = std::fs::metadata(&e2e.image)?.len() / 512;
    let root_end = parts[1].start + parts[1].size;
    ensure!(
        root_end <= disk_sectors - 33,
        "root overlaps the backup GPT: ends at {root_end} of {disk_sectors}"
    );
    // --verify reads the backup header at the end of the disk too.
    let out = run(Command::new("sfdisk").arg("--verify").arg(&e2e.image))?;
    let text = stdout(&out);
    ensure!(text.contains("No errors detected"), "sfdisk --verify: {text}");
    let manifest = e2e.manifest()?;
    let want = manifest["partitions"][1]["uuid"].as_str().unwrap_or_default().to_uppercase();
    ensure!(want == parts[1].uuid, "manifest root uuid {want} != partition uuid {}", parts[1].uuid);
    Ok(())
}

#[test]
fn esp_is_clean_fat_with_a_uki_naming_the_root_partition() -> Result<()> {
    let Some(e2e) = setup("esp") else { return Ok(()) };
    let dir = e2e.scratch("esp")?;
    let parts = partitions(&e2e.image)?;
    let esp = dir.join("esp.img");
    extract_partition(&e2e.image, &parts[0], &esp)?;
    run(Command::new("fsck.fat").arg("-n").arg(&esp))?;
    let uki = dir.join("BOOTX64.EFI");
    run(Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(&esp)
        .arg("::/EFI/BOOT/BOOTX64.EFI")
        .arg(&uki))?;
    let headers = stdout(&run(Command::new("objdump").arg("-h").arg(&uki))?);
    for section in [".osrel", ".cmdline", ".linux", ".initrd"] {
        ensure!(headers.contains(section), "UKI lacks {section}:\n{headers}");
    }
    let cmdline_file = dir.join("cmdline");
    run(Command::new("objcopy")
        .args(["-O", "binary", "--only-section=.cmdline"])
        .arg(&uki)
        .arg(&cmdline_file))?;
    let cmdline = std::fs::read_to_string(&cmdline_file)?;
    check_initramfs_libraries(&uki, &dir)?;
    let want = format!("{}=PARTUUID={}", cloister_proto::CMDLINE_ROOT, parts[1].uuid.to_lowercase());
    ensure!(cmdline.contains(&want), "cmdline {cmdline:?} does not name {want}");
    ensure!(cmdline.split_whitespace().any(|w| w == cloister_proto::CMDLINE_APPLIANCE), "{cmdline:?}");
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn root_is_luks2_argon2id_aes_xts_512_and_only_the_right_passphrase_opens_it() -> Result<()> {
    let Some(e2e) = setup("luks") else { return Ok(()) };
    let dir = e2e.scratch("luks")?;
    let parts = partitions(&e2e.image)?;
    let root = dir.join("root.img");
    extract_partition(&e2e.image, &parts[1], &root)?;
    let dump = stdout(&run(Command::new("cryptsetup").arg("luksDump").arg(&root))?);
    let version = dump.lines().find_map(|l| l.strip_prefix("Version:")).map(str::trim);
    ensure!(version == Some("2"), "not LUKS2: {version:?}");
    for want in ["argon2id", "aes-xts-plain64", "512 bits", "sector: 4096"] {
        ensure!(dump.contains(want), "luksDump lacks {want:?}:\n{dump}");
    }
    let slots: Vec<&str> = dump.lines().filter(|l| l.trim_end().ends_with(": luks2")).collect();
    ensure!(slots == ["  0: luks2"], "expected only keyslot 0, got {slots:?}");
    ensure!(luks_accepts(&root, &e2e.passphrase()?)?, "the build's passphrase does not open the root");
    ensure!(!luks_accepts(&root, "not the passphrase")?, "a wrong passphrase opened the root");
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn decrypted_root_is_clean_xfs_holding_exactly_the_staging_tree() -> Result<()> {
    let Some(e2e) = setup("xfs") else { return Ok(()) };
    let dir = e2e.scratch("xfs")?;
    let parts = partitions(&e2e.image)?;
    let root = dir.join("root.img");
    extract_partition(&e2e.image, &parts[1], &root)?;
    decrypt_offline(&root, &dir.join("header"), &e2e.passphrase()?)?;
    xfs_clean(&root)?;
    let listing = files_listing(&e2e)?;
    let mount = LoopMount::read_only(&root, &dir.join("mnt"))?;
    let mismatches = compare_tree(mount.path(), &listing)?;
    let missing = unresolved_libraries(mount.path())?;
    let ld_cache = ld_so_cache_lists(&mount.path().join("etc/ld.so.cache"), "libcryptsetup.so.12");
    let sshd = sshd_as_configured(mount.path(), &dir);
    drop(mount);
    sshd?;
    let ld_cache = ld_cache?;
    ensure!(
        ld_cache.contains("=> /lib/x86_64-linux-gnu/libcryptsetup.so.12")
            || ld_cache.contains("=> /usr/lib/x86_64-linux-gnu/libcryptsetup.so.12"),
        "ld.so.cache does not map libcryptsetup to an image path: {ld_cache}"
    );
    ensure!(missing.is_empty(), "unresolved libraries in the root: {missing:#?}");
    ensure!(
        mismatches.is_empty(),
        "{} differences, first: {:#?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(10)]
    );
    ensure!(listing.len() > 1000, "suspiciously small root: {} entries", listing.len());
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// The production image `cargo xtask test` builds as `cargo xtask build-image` would (default
/// config, no option but the passphrase file): its manifest records no test option and the
/// default config's KDF, its LUKS header says the same, and in its root, decrypted offline like
/// the test image's, the torrc tor is started with (named by the plan's tor service) and
/// Debian's /etc/tor/torrc carry no test-network line and no client or control port, and the
/// former keeps the proof-of-work defence.
#[test]
fn production_image_has_no_test_network_and_records_no_test_option() -> Result<()> {
    let Some(e2e) = setup("production") else { return Ok(()) };
    // With CLOISTER_E2E set and this test selected, xtask built the image.
    let image = e2e.production_image.clone().context("CLOISTER_TEST_IMAGE_PRODUCTION is not set")?;
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(manifest_path(&image))?)?;
    let build = &manifest["build"];
    ensure!(
        build["test_options"] == false && build["flags"] == serde_json::json!([]),
        "the production image's manifest records test options: {build}"
    );
    // The default config's cost, not the test KDF's (64 MiB, 4 passes). Lanes are not compared:
    // libcryptsetup caps them at the build host's CPUs. It may also lower the memory on a host
    // without swap; the builder refuses that (`luks::check_kdf`), so the cost here is exact.
    let kdf = cloister_config::Config::default().kdf;
    let pbkdf = &manifest["luks"]["pbkdf"];
    let memory = pbkdf["memory_kib"].as_u64().context("the manifest has no KDF memory")?;
    let configured = u64::from(kdf.memory_mib) * 1024;
    ensure!(
        pbkdf["type"] == "argon2id" && pbkdf["iterations"] == kdf.iterations && memory == configured,
        "the manifest's KDF {pbkdf} is not the default config's {kdf:?}"
    );
    let dir = e2e.scratch("production")?;
    let parts = partitions(&image)?;
    let root = dir.join("root.img");
    extract_partition(&image, &parts[1], &root)?;
    let dump = stdout(&run(Command::new("cryptsetup").arg("luksDump").arg(&root))?);
    let field = |name: &str| dump.lines().find_map(|l| l.trim().strip_prefix(name)).map(str::trim);
    ensure!(field("PBKDF:") == Some("argon2id"), "luksDump:\n{dump}");
    let memory = memory.to_string();
    ensure!(field("Memory:") == Some(memory.as_str()), "luksDump: not the manifest's {memory} KiB:\n{dump}");
    let passphrase = read_passphrase(&image.with_file_name("passphrase"))?;
    timed("production root decrypted offline", || decrypt_offline(&root, &dir.join("header"), &passphrase))?;
    let mount = LoopMount::read_only(&root, &dir.join("mnt"))?;
    let checked = production_torrcs_are_clean(mount.path());
    drop(mount);
    eprintln!("{}", checked?);
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// The torrc the plan's tor service reads (`-f`, with `--defaults-torrc /dev/null`, so nothing
/// else is read) and Debian's own, checked by `tornet::production_torrc_problems`; the latter
/// only for test-network lines and ports (tor is never told to read it).
fn production_torrcs_are_clean(root: &Path) -> Result<String> {
    let plan_path = root.join(cloister_plan::PLAN_PATH.trim_start_matches('/'));
    let plan = cloister_plan::Plan::load(&plan_path)?;
    let tor = plan.services.iter().find(|s| s.name == "tor").context("the plan has no tor service")?;
    let arg = |flag: &str| tor.args.windows(2).find(|w| w[0] == flag).map(|w| w[1].as_str());
    ensure!(arg("--defaults-torrc") == Some("/dev/null"), "tor reads a defaults torrc: {:?}", tor.args);
    let torrc = arg("-f").context("the tor service names no torrc")?;
    let mut said = Vec::new();
    for (path, whole) in [(torrc, true), ("/etc/tor/torrc", false)] {
        let file = root.join(path.trim_start_matches('/'));
        if !whole && !file.exists() {
            continue;
        }
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {path} in the image"))?;
        let mut problems = cloister_tests::tornet::production_torrc_problems(&text);
        if !whole {
            problems.retain(|p| !p.starts_with("no HiddenServicePoWDefensesEnabled"));
        }
        ensure!(problems.is_empty(), "{path} in the production image: {problems:#?}\n{text}");
        said.push(format!("{path}: {} lines, clean", text.lines().count()));
    }
    Ok(said.join("; "))
}

/// The image's own sshd (Debian's) reading the image's own sshd_config, for a chat user and for
/// an admin (`sshd -T -C`, chrooted into the decrypted root, in a mount namespace of its own
/// with a throw-away host key): what the appliance's sshd really does, whatever the file says.
/// The forwardings a client cannot see refused (the agent's above all) are checked here.
fn sshd_as_configured(root: &Path, dir: &Path) -> Result<()> {
    let key = dir.join("hostkey");
    run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key))?;
    let effective = |who: &str| -> Result<BTreeMap<String, String>> {
        let script = format!(
            "set -e; mount -t tmpfs none {r}/run; mkdir -p {r}/run/sshd; mount -t tmpfs none {r}/tmp; \
             mount -t tmpfs none {r}/dev; touch {r}/dev/null; mount --bind /dev/null {r}/dev/null; \
             cp {k} {r}/tmp/hostkey; exec chroot {r} /usr/sbin/sshd -T -f /etc/ssh/sshd_config \
             -h /tmp/hostkey -C user={who},host=x.onion,addr=127.0.0.1",
            r = root.display(),
            k = key.display()
        );
        let out =
            run(Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]))?;
        ensure!(out.status.success(), "sshd -T for {who}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(stdout(&out)
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect())
    };
    let want = |config: &BTreeMap<String, String>, who: &str, pairs: &[(&str, &str)]| -> Result<()> {
        for (key, value) in pairs {
            let got = config.get(*key).map(String::as_str);
            ensure!(got == Some(*value), "sshd -T for {who}: {key} is {got:?}, not {value:?}");
        }
        Ok(())
    };
    let chat = effective("bob")?;
    want(
        &chat,
        "bob",
        &[
            ("allowagentforwarding", "no"),
            ("allowtcpforwarding", "no"),
            ("allowstreamlocalforwarding", "no"),
            ("disableforwarding", "yes"),
            ("x11forwarding", "no"),
            ("permittunnel", "no"),
            ("permitopen", "none"),
            ("permitlisten", "none"),
            ("gatewayports", "no"),
            ("permituserenvironment", "no"),
            ("permituserrc", "no"),
            ("permitrootlogin", "no"),
            ("usepam", "no"),
            ("maxauthtries", "3"),
            ("maxsessions", "1"),
            ("logingracetime", "30"),
            ("printmotd", "no"),
            ("printlastlog", "no"),
            ("versionaddendum", "none"),
            ("usedns", "no"),
            ("listenaddress", "127.0.0.1:22"),
            ("ciphers", "chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,aes128-gcm@openssh.com"),
        ],
    )?;
    ensure!(!chat.contains_key("subsystem"), "sshd offers a subsystem: {:?}", chat.get("subsystem"));
    let admin = effective("ops")?;
    want(
        &admin,
        "ops",
        &[
            ("authenticationmethods", "publickey"),
            ("passwordauthentication", "no"),
            ("pubkeyauthentication", "yes"),
            ("allowagentforwarding", "no"),
            ("disableforwarding", "yes"),
        ],
    )?;
    Ok(())
}

/// Unpacks the UKI's initramfs with cpio and resolves every ELF's interpreter and DT_NEEDED
/// inside it: stage 1 must not need anything the archive lacks.
fn check_initramfs_libraries(uki: &Path, dir: &Path) -> Result<()> {
    let initrd = dir.join("initrd.cpio.lz4");
    run(Command::new("objcopy").args(["-O", "binary", "--only-section=.initrd"]).arg(uki).arg(&initrd))?;
    let root = dir.join("initramfs");
    std::fs::create_dir_all(&root)?;
    run(Command::new("sh").current_dir(&root).arg("-c").arg(format!(
        "lz4 -dc {} | cpio -idm --quiet --no-absolute-filenames --nonmatching 'dev/*'",
        initrd.display()
    )))?;
    ensure!(root.join("init").is_file(), "initramfs has no /init");
    let missing = unresolved_libraries(&root)?;
    ensure!(missing.is_empty(), "unresolved libraries in the initramfs: {missing:#?}");
    let list = |p: &str| std::fs::read_to_string(root.join(p.trim_start_matches('/')));
    let disk = list(cloister_proto::MODULES_DISK_LIST)?;
    let unlock = list(cloister_proto::MODULES_UNLOCK_LIST)?;
    for (text, m) in
        [(&disk, "virtio_blk.ko"), (&disk, "nvme.ko"), (&unlock, "dm-crypt.ko"), (&unlock, "xfs.ko")]
    {
        ensure!(text.lines().any(|l| l.ends_with(m)), "module lists lack {m}:\n{disk}\n--\n{unlock}");
    }
    ensure!(disk.contains("# group virtio v1af4\n"), "the disk list has no virtio group:\n{disk}");
    // Keyboards still load once the root is found; AES-NI only where the CPU has it.
    ensure!(disk.contains("# group usb c0c03 input\n"), "the USB group is not marked input:\n{disk}");
    ensure!(unlock.contains("# group aesni cpu:aes\n"), "aesni_intel not gated by the CPU:\n{unlock}");
    check_warmup_header(&root.join(cloister_proto::LUKS_WARMUP_HEADER.trim_start_matches('/')))?;
    for line in disk.lines().chain(unlock.lines()).filter(|l| !l.starts_with('#')) {
        ensure!(
            root.join("lib/modules").read_dir()?.flatten().any(|k| k.path().join(line).is_file()),
            "{line} listed, not in the initramfs"
        );
    }
    Ok(())
}

/// The header stage 1 loads first must be of the root's shape and open nothing: no keyslot.
fn check_warmup_header(header: &Path) -> Result<()> {
    let dump = stdout(&run(Command::new("cryptsetup").arg("luksDump").arg(header))?);
    for want in
        ["Version:       \t2", "cipher: aes-xts-plain64", "sector: 4096 [bytes]", "Keyslots:\nTokens:"]
    {
        ensure!(dump.contains(want), "warm-up header: no {want:?} in its luksDump:\n{dump}");
    }
    Ok(())
}

/// Every unresolved interpreter or library of every ELF file below `root`.
fn unresolved_libraries(root: &Path) -> Result<Vec<String>> {
    let mut files = Vec::new();
    for rel in entries_below(root)? {
        if std::fs::symlink_metadata(root.join(&rel))?.is_file() {
            files.push(rel);
        }
    }
    ensure!(!files.is_empty(), "no files under {}", root.display());
    let missing = cloister_rootfs::elf::check_tree(root, files.iter().map(|p| p.as_path()));
    Ok(missing.iter().map(ToString::to_string).collect())
}

/// Every entry below `root`, relative to it, without following symlinks.
fn entries_below(root: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![std::path::PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(root.join(&rel))? {
            let entry = entry?;
            let child = rel.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                stack.push(child.clone());
            }
            out.push(child);
        }
    }
    Ok(out)
}

/// The entries of an ld.so.cache naming `soname`, as the host's ldconfig prints them: the
/// paths must be the image's own, not the build's staging directory.
fn ld_so_cache_lists(cache: &Path, soname: &str) -> Result<String> {
    let out = run(Command::new("/sbin/ldconfig").arg("-p").arg("-C").arg(cache))?;
    Ok(stdout(&out).lines().filter(|l| l.contains(soname)).collect::<Vec<_>>().join("\n"))
}

/// The builder's `--list-files` output: one JSON object per line.
fn files_listing(e2e: &E2e) -> Result<BTreeMap<String, serde_json::Value>> {
    let path = e2e.image.with_file_name("files.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let p = v["path"].as_str().context("path")?.to_string();
        out.insert(p, v);
    }
    Ok(out)
}

/// Walks the mounted filesystem and compares type, mode, owner, link target and content hash
/// with the listing, both ways.
fn compare_tree(root: &Path, listing: &BTreeMap<String, serde_json::Value>) -> Result<Vec<String>> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = Vec::new();
    let mut diffs = Vec::new();
    for rel_path in entries_below(root)? {
        let host = root.join(&rel_path);
        let rel = rel_path.to_string_lossy().into_owned();
        let meta = std::fs::symlink_metadata(&host)?;
        seen.push(rel.clone());
        let Some(want) = listing.get(&rel) else {
            diffs.push(format!("{rel}: on disk, not in the tree"));
            continue;
        };
        let mode = meta.mode() & 0o7777;
        if want["mode"].as_u64() != Some(u64::from(mode)) && !meta.file_type().is_symlink() {
            diffs.push(format!("{rel}: mode {mode:o}, want {}", want["mode"]));
        }
        if want["uid"].as_u64() != Some(u64::from(meta.uid()))
            || want["gid"].as_u64() != Some(u64::from(meta.gid()))
        {
            diffs.push(format!(
                "{rel}: owner {}:{}, want {}:{}",
                meta.uid(),
                meta.gid(),
                want["uid"],
                want["gid"]
            ));
        }
        let kind = want["kind"].as_str().unwrap_or_default();
        if meta.is_dir() {
            if kind != "dir" {
                diffs.push(format!("{rel}: dir, want {kind}"));
            }
        } else if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&host)?.to_string_lossy().into_owned();
            if kind != "symlink" || want["target"].as_str() != Some(target.as_str()) {
                diffs.push(format!("{rel}: symlink to {target}, want {kind} {}", want["target"]));
            }
        } else if meta.is_file() {
            let hash = sha256_file(&host)?;
            if kind != "file" || want["sha256"].as_str() != Some(hash.as_str()) {
                diffs.push(format!("{rel}: file content differs ({kind})"));
            }
        }
    }
    let seen: std::collections::BTreeSet<_> = seen.into_iter().collect();
    for rel in listing.keys().filter(|k| !k.is_empty() && !seen.contains(*k)) {
        diffs.push(format!("{rel}: in the tree, missing on disk"));
    }
    Ok(diffs)
}

fn sha256_file(path: &Path) -> Result<String> {
    let out = run(Command::new("sha256sum").arg(path))?;
    Ok(stdout(&out).split_whitespace().next().unwrap_or_default().to_string())
}

/// A read-only loop mount that is always undone, even when the test fails.
struct LoopMount {
    dir: std::path::PathBuf,
}

impl LoopMount {
    fn read_only(image: &Path, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let out = Command::new("mount")
            .args(["-t", "xfs", "-o", "ro,norecovery,loop"])
            .arg(image)
            .arg(dir)
            .output()?;
        if !out.status.success() {
            bail!("mount {}: {}", image.display(), String::from_utf8_lossy(&out.stderr));
        }
        Ok(Self { dir: dir.to_path_buf() })
    }
    fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        // `umount` of a loop mount made with -o loop also detaches the loop device.
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}
