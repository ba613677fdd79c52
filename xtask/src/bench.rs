//! `cargo xtask bench`: build and boot measurements printed as a table. Targets are printed
//! next to the numbers; nothing here fails on a missed target (timing belongs here, not in
//! tests).
//!
//! - build: cold (empty package cache) and warm wall time per phase of the default image;
//! - encryption throughput as a ratio of `openssl speed -evp aes-256-xts` in the same run, with
//!   the image on tmpfs (the cipher and our pipeline) and on the disk (next to `dd` on that disk);
//! - image and initramfs sizes;
//! - boot under TCG with the test KDF: guest ms and wall s to the unlock line, next to the
//!   same UKI (firmware path, kernel, command line, VM) booting a trivial busybox init instead
//!   of our initramfs (the floor); `cargo xtask bench boot` runs this part alone, with the
//!   warm build of its image;
//! - the onion chat (`cargo xtask bench onion` runs this part alone): the test image booted in
//!   the private Tor network as `cargo xtask test` builds and starts them, measured from
//!   outside by `onion_bench` (`tests/src/bin/onion_bench.rs`): wall time to the first login
//!   and chat through the onion, 10 users chatting (delivered, p50/p95 latency) and the
//!   appliance's memory per program and in total.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cloister_qemu::{Console, Firmware, Vm, VmConfig};
use serde_json::Value;

mod onion;

use crate::{build, host, test};
use onion::onion_rows;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Only this part (`boot`: the test-KDF image built warm and booted against the floor;
    /// `onion`: the onion chat's boot, users and memory; `flash`: the default image flashed to
    /// loop devices against dd); all parts without it.
    #[arg(value_enum)]
    only: Option<Part>,
    /// Skip the cold build (which downloads every package into an empty cache).
    #[arg(long)]
    no_cold: bool,
    /// Skip the boot measurements.
    #[arg(long)]
    no_boot: bool,
    /// Skip the onion chat.
    #[arg(long)]
    no_onion: bool,
    /// Reuse the test image of an earlier `cargo xtask test` or bench if it exists.
    #[arg(long)]
    reuse_image: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Boot,
    Onion,
    Flash,
}

struct Row {
    what: String,
    value: String,
    target: &'static str,
}

fn row(what: impl Into<String>, value: impl Into<String>, target: &'static str) -> Row {
    Row { what: what.into(), value: value.into(), target }
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    host::ensure(&[host::BUILD, host::RUN, host::TEST])?;
    let bins = build::compile_pipeline()?;
    if args.only == Some(Part::Onion) {
        let mut rows = Vec::new();
        onion_rows(&mut rows, &bins, args.reuse_image)?;
        print_table(&rows);
        return Ok(());
    }
    let dir = build::target_dir().join("bench");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let pass = dir.join("passphrase");
    std::fs::write(&pass, "bench-only-passphrase\n")?;
    let mut rows = Vec::new();
    let warm_cache = default_cache()?;
    if args.only == Some(Part::Boot) {
        boot_part(&mut rows, &bins, &dir, &warm_cache, &pass)?;
        // The full bench prints the default image's sizes; alone, the booted image's.
        size_rows(&mut rows, &dir.join("disk.img"))?;
        print_table(&rows);
        return Ok(());
    }

    let cold = if args.no_cold || args.only == Some(Part::Flash) {
        None
    } else {
        Some(timed_build(&bins, &dir, &dir.join("cache-cold"), &pass, &[])?)
    };
    // Prime the shared cache so that "warm" means warm even on a fresh machine.
    timed_build(&bins, &dir, &warm_cache, &pass, &[])?;
    let warm = median_build(&bins, &dir, &warm_cache, &pass)?;
    if args.only == Some(Part::Flash) {
        flash_rows(&mut rows, &dir.join("disk.img"))?;
        print_table(&rows);
        return Ok(());
    }
    rows.push(service_start_row(&bins.init, &dir)?);
    build_rows(&mut rows, cold.as_ref(), &warm);
    size_rows(&mut rows, &dir.join("disk.img"))?;
    flash_rows(&mut rows, &dir.join("disk.img"))?;
    let in_ram = ram_data_pass(&bins, &warm_cache, &pass, &dir.join("disk.img"))?;
    rows.extend(encryption_rows(&warm, in_ram, &dir.join("disk.img"))?);

    if !args.no_boot {
        boot_part(&mut rows, &bins, &dir, &warm_cache, &pass)?;
    }
    if !args.no_onion {
        onion_rows(&mut rows, &bins, args.reuse_image)?;
    }
    print_table(&rows);
    Ok(())
}

/// The test image (test KDF, the tests' config) built into `dir`, then booted against the floor.
fn boot_part(
    rows: &mut Vec<Row>,
    bins: &build::Binaries,
    dir: &Path,
    cache: &Path,
    pass: &Path,
) -> Result<()> {
    let mut kdf = test::TEST_KDF_ARGS.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    kdf.extend([
        "--config".into(),
        build::workspace_root().join("tests/test-image.toml").display().to_string(),
    ]);
    timed_build(bins, dir, cache, pass, &kdf)?;
    boot_rows(rows, dir)
}

fn default_cache() -> Result<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .context("neither XDG_CACHE_HOME nor HOME is set")?;
    Ok(base.join("cloister"))
}

/// Runs the builder and returns its phase timings (seconds) from its machine-readable line.
fn timed_build(
    bins: &build::Binaries,
    dir: &Path,
    cache: &Path,
    pass: &Path,
    extra: &[String],
) -> Result<Value> {
    let out = Command::new(&bins.builder)
        .arg("--init-bin")
        .arg(&bins.init)
        .arg("--cache-dir")
        .arg(cache)
        .arg("--output")
        .arg(dir.join("disk.img"))
        .arg("--passphrase-file")
        .arg(pass)
        .args(extra)
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cloister-build")?;
    if !out.status.success() {
        bail!("bench build failed: {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line =
        text.lines().find_map(|l| l.strip_prefix("cloister-build: timings ")).context("no timings line")?;
    Ok(serde_json::from_str(line)?)
}

/// Warm builds in a row; each phase's median. One build's figures vary by 2x here: this VM's
/// free memory is handed back to its host (virtio-balloon free page reporting), so a phase
/// that touches fresh memory pays the host's page faults, or not, depending on the moment.
const WARM_BUILDS: usize = 3;

fn median_build(bins: &build::Binaries, dir: &Path, cache: &Path, pass: &Path) -> Result<Value> {
    let runs =
        (0..WARM_BUILDS).map(|_| timed_build(bins, dir, cache, pass, &[])).collect::<Result<Vec<_>>>()?;
    let mut median = serde_json::Map::new();
    for key in runs[0].as_object().context("timings are not an object")?.keys() {
        let mut secs: Vec<f64> = runs.iter().filter_map(|r| r[key].as_f64()).collect();
        secs.sort_by(f64::total_cmp);
        if let Some(mid) = secs.get(secs.len() / 2) {
            median.insert(key.clone(), (*mid).into());
        }
    }
    Ok(Value::Object(median))
}

fn build_rows(rows: &mut Vec<Row>, cold: Option<&Value>, warm: &Value) {
    let phases = [
        "reserve",
        "kdf",
        "packages",
        "rootfs",
        "initramfs",
        "uki",
        "xfs",
        "esp",
        "luks",
        "luks_data_pass",
        "image",
        "total",
    ];
    for p in phases {
        let secs = |v: &Value| v[p].as_f64().map(|s| format!("{s:.1} s")).unwrap_or_else(|| "-".into());
        let cold = cold.map(secs).unwrap_or_else(|| "skipped".into());
        let target = if p == "total" { "warm ≤ 20 s" } else { "" };
        rows.push(row(
            format!("build {p} (cold / warm median of {WARM_BUILDS})"),
            format!("{cold} / {}", secs(warm)),
            target,
        ));
    }
}

fn manifest(image: &Path) -> Result<Value> {
    let mut p = image.as_os_str().to_owned();
    p.push(".manifest.json");
    let text = std::fs::read_to_string(PathBuf::from(&p)).with_context(|| format!("cannot read {p:?}"))?;
    Ok(serde_json::from_str(&text)?)
}

fn size_rows(rows: &mut Vec<Row>, image: &Path) -> Result<()> {
    let m = manifest(image)?;
    let mib = |v: &Value| v.as_u64().map(|b| format!("{:.1} MiB", b as f64 / 1048576.0)).unwrap_or_default();
    rows.push(row("image size", mib(&m["image"]["bytes"]), ""));
    rows.push(row("initramfs size (lz4)", mib(&m["initramfs_bytes"]), "≤ 24 MiB"));
    rows.push(row("UKI size", mib(&m["uki_bytes"]), ""));
    Ok(())
}

/// Our offline encryption's throughput over the whole root partition, against OpenSSL's
/// aes-256-xts (the same cipher, same backend library) on this machine, in this run: with the
/// image on tmpfs (`in_ram`, the data pass's median seconds there), where nothing but the
/// cipher and our pipeline sets the pace, and with the image on the disk, next to what the disk
/// takes from `dd` the same way. On this machine's disk the pass runs at the disk's pace
/// (ratio to dd about 1.0), so only the tmpfs row says how fast our encryption is.
fn encryption_rows(warm: &Value, in_ram: Option<f64>, image: &Path) -> Result<Vec<Row>> {
    let m = manifest(image)?;
    // What the data pass rewrites: the partition minus the 16 MiB header it makes room for.
    let bytes = m["partitions"][1]["size_bytes"].as_f64().context("root size")? - 16.0 * 1048576.0;
    let secs = warm["luks_data_pass"].as_f64().filter(|s| *s > 0.0).context("no luks data pass time")?;
    let ours = bytes / secs / 1e6;
    let openssl = openssl_xts_mb_s()?;
    let disk = direct_write_mb_s(image, bytes as u64)?;
    let ram = match in_ram {
        Some(secs) => {
            let ours = bytes / secs / 1e6;
            format!("{ours:.0} MB/s / {openssl:.0} MB/s ({:.2})", ours / openssl)
        }
        None => "- (no tmpfs with room for the image)".into(),
    };
    Ok(vec![
        row(
            format!("encryption: ours / openssl (ratio), image on tmpfs (median of {WARM_BUILDS})"),
            ram,
            "≥ 0.5",
        ),
        row(
            "encryption: ours / openssl (ratio), image on the disk",
            format!("{ours:.0} MB/s / {openssl:.0} MB/s ({:.2})", ours / openssl),
            "",
        ),
        // What the disk under the image takes, for scale: the pass writes its ciphertext the
        // same way, directly into a fallocated range.
        row(
            "encryption: ours on the disk / dd bs=8M oflag=direct into a fallocated file beside it (ratio)",
            format!("{ours:.0} MB/s / {disk:.0} MB/s ({:.2})", ours / disk),
            "",
        ),
    ])
}

/// The data pass's median seconds over warm builds whose image goes to tmpfs (`/dev/shm`), or
/// `None` where there is no tmpfs with room for it. The image is removed afterwards.
fn ram_data_pass(bins: &build::Binaries, cache: &Path, pass: &Path, image: &Path) -> Result<Option<f64>> {
    let shm = Path::new("/dev/shm");
    let need = std::fs::metadata(image)?.len() * 2;
    let is_tmpfs = rustix::fs::statfs(shm).is_ok_and(|f| f.f_type as u64 == TMPFS_MAGIC);
    let room = rustix::fs::statvfs(shm).map(|f| f.f_bavail * f.f_frsize).unwrap_or(0);
    if !is_tmpfs || room < need {
        return Ok(None);
    }
    let dir = ScratchDir(shm.join(format!("cloister-bench-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let mut secs = Vec::new();
    for _ in 0..WARM_BUILDS {
        let timings = timed_build(bins, &dir.0, cache, pass, &[])?;
        secs.push(timings["luks_data_pass"].as_f64().context("no luks data pass time")?);
    }
    Ok(Some(median(secs)))
}

/// `TMPFS_MAGIC` of `<linux/magic.h>`.
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// `dd`'s direct writes of `bytes` zeros into a fallocated file next to `image`, best of two.
fn direct_write_mb_s(image: &Path, bytes: u64) -> Result<f64> {
    const BLOCK: u64 = 8 * 1024 * 1024;
    let blocks = bytes.div_ceil(BLOCK);
    let target = ScratchFile(image.with_file_name(format!("dd-direct-{}", std::process::id())));
    let mut best = f64::MAX;
    for _ in 0..2 {
        let _ = std::fs::remove_file(&target.0);
        run(Command::new("fallocate").args(["-l", &(blocks * BLOCK).to_string()]).arg(&target.0))?;
        let t = Instant::now();
        run(Command::new("dd").arg("if=/dev/zero").arg(format!("of={}", target.0.display())).args([
            "bs=8M",
            &format!("count={blocks}"),
            "oflag=direct",
            "conv=notrunc",
            "status=none",
        ]))?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok((blocks * BLOCK) as f64 / best / 1e6)
}

fn openssl_xts_mb_s() -> Result<f64> {
    let out = Command::new("openssl")
        .args(["speed", "-evp", "aes-256-xts", "-seconds", "2", "-bytes", "1048576"])
        .stderr(Stdio::null())
        .output()
        .context("cannot run openssl")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Last line: "AES-256-XTS  123456.78k" (thousands of bytes per second).
    let last = text.lines().rev().find(|l| l.to_lowercase().contains("xts")).context("no openssl result")?;
    let k = last.split_whitespace().last().and_then(|v| v.trim_end_matches('k').parse::<f64>().ok());
    k.map(|k| k * 1000.0 / 1e6).context("cannot parse openssl output")
}

/// Boots are noisy under TCG on a shared machine (the same boot's guest time varies by a second
/// or more): each figure is the median of this many, and our boots alternate with the floor's
/// so that "our init adds" is the median of differences taken side by side. With 5 the median
/// of the same build moved by 300 ms between runs; 9 take about 8 minutes.
const BOOTS: usize = 9;

/// One boot to the unlock line, in wall seconds and guest milliseconds.
struct BootSample {
    prompt_wall: f64,
    unlock_wall: f64,
    guest_ms: u64,
    /// `cloister: boot clock <ms> ms`, the first thing stage 1 prints.
    stage1_ms: u64,
    /// `cloister: switching to … at <ms> ms since boot`, the last.
    switch_ms: u64,
    /// The typist's time and the KDF's: [`Self::typist_ms`] + [`Self::key_slot_ms`].
    excluded_ms: u64,
    typist_ms: u64,
    key_slot_ms: u64,
    modules_waited_ms: u64,
    /// Waited for the `mount` modules (XFS) after the unlock: counted as ours, like every
    /// step outside the unlock.
    mount_modules_waited_ms: u64,
    /// Stage 2 start to the last service's readiness.
    services_ready_ms: u64,
    /// From the kernel's log (stage 2 prints it): when it ran /init, and how long unpacking the
    /// initramfs took.
    kernel_ran_init_ms: Option<u64>,
    unpack_ms: Option<u64>,
    pid1_rss_kib: u64,
}

/// The VM every bench boot runs in: the harness's defaults (CPUs, memory), TCG as in the tests.
fn bench_vm(image: &Path, work: &Path) -> Result<VmConfig> {
    Ok(VmConfig::new(image, Firmware::find()?, work))
}

fn boot_once(image: &Path, work: &Path) -> Result<BootSample> {
    let mut cfg = bench_vm(image, work)?;
    cfg.console = Console::Captured;
    cfg.snapshot = true;
    let started = Instant::now();
    let vm = Vm::start(cfg)?;
    vm.wait_for(cloister_proto::marker::PASSPHRASE_PROMPT, Duration::from_secs(240))?;
    let prompt_wall = started.elapsed().as_secs_f64();
    vm.type_line("bench-only-passphrase")?;
    let line = vm.wait_for(cloister_proto::marker::UNLOCKED, Duration::from_secs(240))?;
    let unlock_wall = started.elapsed().as_secs_f64();
    let guest_ms = cloister_proto::parse_unlocked_ms(&line).context("unlock line without time")?;
    let console = vm.console_text();
    // Only the wait for the typist and the key slot tries (the KDF) are not ours; stage 1
    // prints both, and the rest of the unlock step (the LUKS header, the modules it waited
    // for) counts.
    let typist_ms = summed_ms(&console, cloister_proto::marker::PASSPHRASE_READ);
    let key_slot_ms = summed_ms(&console, cloister_proto::marker::KEY_SLOT_TRIED);
    let excluded_ms = typist_ms + key_slot_ms;
    let modules_waited_ms = waited_for_modules_ms(&console, "unlock-modules").unwrap_or(0);
    let mount_modules_waited_ms = waited_for_modules_ms(&console, "mount-modules").unwrap_or(0);
    let stage1_ms = console
        .lines()
        .find_map(|l| l.split("cloister: boot clock ").nth(1)?.split_whitespace().next()?.parse().ok())
        .context("stage 1 printed no boot clock")?;
    let switch_ms = console
        .lines()
        .find_map(|l| {
            l.split(cloister_proto::marker::SWITCHING)
                .nth(1)?
                .split(" at ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .context("stage 1 printed no switch")?;
    let rss_line = vm.wait_for(cloister_proto::marker::PID1_RSS, Duration::from_secs(240))?;
    let pid1_rss_kib = rss_line
        .split(cloister_proto::marker::PID1_RSS)
        .nth(1)
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .context("rss line without a number")?;
    let console = vm.console_text();
    let services_ready_ms =
        console.lines().filter_map(stage2_ready_ms).max().context("no service got ready")?;
    let (kernel_ran_init_ms, unpack_ms) = kernel_milestones(&console);
    Ok(BootSample {
        prompt_wall,
        unlock_wall,
        guest_ms,
        stage1_ms,
        switch_ms,
        excluded_ms,
        typist_ms,
        key_slot_ms,
        modules_waited_ms,
        mount_modules_waited_ms,
        services_ready_ms,
        kernel_ran_init_ms,
        unpack_ms,
        pid1_rss_kib,
    })
}

/// `cloister: kernel ran /init at <ms> ms; initramfs unpacked from <a> to <b> ms` → (ms, b - a).
fn kernel_milestones(console: &str) -> (Option<u64>, Option<u64>) {
    let Some(rest) = console.lines().find_map(|l| l.split(cloister_proto::marker::KERNEL_RAN_INIT).nth(1))
    else {
        return (None, None);
    };
    let numbers: Vec<u64> =
        rest.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect();
    let unpack = match numbers[..] {
        [_, from, to, ..] => to.checked_sub(from),
        _ => None,
    };
    (numbers.first().copied(), unpack)
}

/// `cloister: service <name> ready (<n> ms, <m> ms in stage 2)` → m.
fn stage2_ready_ms(line: &str) -> Option<u64> {
    let (_, rest) = cloister_proto::service_event::parse(line)?;
    let inner = rest.strip_prefix(cloister_proto::service_event::READY)?;
    let stage = inner.split(", ").nth(1)?;
    stage.split_whitespace().next()?.parse().ok()
}

fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn boot_rows(rows: &mut Vec<Row>, dir: &Path) -> Result<()> {
    let image = dir.join("disk.img");
    let work = dir.join("vm");
    std::fs::create_dir_all(&work)?;
    // Its own work directory, so that vm/console.log stays the last boot of ours.
    let floor_work = dir.join("floor-vm");
    std::fs::create_dir_all(&floor_work)?;
    let floor = prepare_floor(&image, dir)?;
    let (mut samples, mut floors) = (Vec::new(), Vec::new());
    for i in 0..BOOTS {
        samples.push(boot_once(&image, &work)?);
        // Each boot's console stays for a look at its steps (vm/console.log is the last one's).
        std::fs::copy(work.join("console.log"), dir.join(format!("boot-{i}.console.log")))?;
        floors.push(floor_guest_ms(&floor, &floor_work)?);
    }
    let med = |f: fn(&BootSample) -> u64| median(samples.iter().map(f).collect());
    let adds: Vec<i64> = samples
        .iter()
        .zip(&floors)
        .map(|(b, f)| b.guest_ms as i64 - b.excluded_ms as i64 - *f as i64)
        .collect();
    let floor_ms = median(floors.clone());
    let prompt_wall = median(samples.iter().map(|b| b.prompt_wall).collect());
    let unlock_wall = median(samples.iter().map(|b| b.unlock_wall).collect());
    rows.push(row(
        format!("boot: wall s to prompt / to unlock line (TCG, median of {BOOTS})"),
        format!("{prompt_wall:.1} s / {unlock_wall:.1} s"),
        "",
    ));
    rows.push(row("boot: guest ms at unlock line", format!("{} ms", med(|b| b.guest_ms)), ""));
    rows.push(row(
        "boot: guest ms in passphrase wait / key slot (KDF), not ours",
        format!("{} ms / {} ms", med(|b| b.typist_ms), med(|b| b.key_slot_ms)),
        "",
    ));
    rows.push(row(
        "boot: guest ms waiting for unlock modules",
        format!("{} ms", med(|b| b.modules_waited_ms)),
        "",
    ));
    rows.push(row(
        "boot: guest ms waiting for mount modules (XFS)",
        format!("{} ms", med(|b| b.mount_modules_waited_ms)),
        "",
    ));
    rows.push(row("boot: guest ms of trivial init (floor)", format!("{floor_ms} ms"), ""));
    rows.push(row(
        "boot: guest ms at stage 1 start (kernel + initramfs) / less the floor",
        format!(
            "{} ms / {} ms",
            med(|b| b.stage1_ms),
            median(samples.iter().zip(&floors).map(|(b, f)| b.stage1_ms as i64 - *f as i64).collect())
        ),
        "",
    ));
    let some = |f: fn(&BootSample) -> Option<u64>| {
        let v: Vec<u64> = samples.iter().filter_map(f).collect();
        if v.is_empty() {
            "-".to_string()
        } else {
            format!("{} ms", median(v))
        }
    };
    rows.push(row(
        "boot: guest ms unpacking the initramfs / kernel runs /init / /init's first line less that",
        format!(
            "{} / {} / {}",
            some(|b| b.unpack_ms),
            some(|b| b.kernel_ran_init_ms),
            some(|b| b.kernel_ran_init_ms.and_then(|k| b.stage1_ms.checked_sub(k)))
        ),
        "",
    ));
    // The parts of what our init adds that the kernel's time does not blur.
    rows.push(row(
        "boot: guest ms in stage 1, typist and KDF excluded / stage 2's exec to unlock line",
        format!(
            "{} ms / {} ms",
            med(|b| b.switch_ms.saturating_sub(b.stage1_ms + b.excluded_ms)),
            med(|b| b.guest_ms.saturating_sub(b.switch_ms))
        ),
        "",
    ));
    rows.push(row(
        "stage 2: guest ms to all services ready (no tor yet)",
        format!("{} ms", med(|b| b.services_ready_ms)),
        "",
    ));
    rows.push(row(
        "stage 2: PID 1 RSS once services settled",
        format!("{} KiB", med(|b| b.pid1_rss_kib)),
        "",
    ));
    let spread = |v: &[i64]| format!("{}..{}", v.iter().min().unwrap_or(&0), v.iter().max().unwrap_or(&0));
    rows.push(row(
        "boot: our init adds (KDF excluded; median, range)",
        format!("{} ms ({} ms)", median(adds.clone()), spread(&adds)),
        "≤ 1000 ms",
    ));
    Ok(())
}

/// The sum of `<prefix> <ms> ms` over the lines that hold it (one per passphrase attempt).
fn summed_ms(console: &str, prefix: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(prefix)? + prefix.len()..];
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// `step <unlock|mount>-modules: ok (<ms> ms, <waited> ms of it waited for)` as stage 1 prints
/// it.
fn waited_for_modules_ms(console: &str, step: &str) -> Option<u64> {
    let line = console.lines().find(|l| l.contains(&format!("step {step}: ok (")))?;
    let waited = line.split(", ").nth(1)?;
    waited.split_whitespace().next()?.parse().ok()
}

/// The floor: the image's own UKI (same firmware path, kernel and command line) with its
/// initramfs replaced by a busybox /init that prints the uptime and powers off, on a disk that
/// holds nothing but that ESP, booted in the VM our boots get: what any init costs before it
/// does anything. Under TCG the kernel reaches init 0.5 s later through OVMF and the UKI than by
/// QEMU's direct kernel boot, and a second vCPU changes its time too, so a floor on another
/// path or machine shape would not be our floor. Returns the floor's disk.
fn prepare_floor(image: &Path, dir: &Path) -> Result<PathBuf> {
    let floor = dir.join("floor");
    std::fs::create_dir_all(floor.join("root/bin"))?;
    let esp = floor.join("esp.img");
    let m = manifest(image)?;
    let (start, size) = (&m["partitions"][0]["start_bytes"], &m["partitions"][0]["size_bytes"]);
    let (Some(start), Some(size)) = (start.as_u64(), size.as_u64()) else {
        bail!("manifest without the ESP")
    };
    run(Command::new("dd")
        .arg(format!("if={}", image.display()))
        .arg(format!("of={}", esp.display()))
        .args(["bs=1M", "iflag=skip_bytes,count_bytes", "status=none"])
        .arg(format!("skip={start}"))
        .arg(format!("count={size}")))?;
    let uki = floor.join("uki.efi");
    run(Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(&esp)
        .arg("::/EFI/BOOT/BOOTX64.EFI")
        .arg(&uki))?;
    std::fs::copy("/bin/busybox", floor.join("root/bin/busybox"))
        .context("busybox-static is needed for the floor")?;
    let init = "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n\
                echo \"floor-uptime $(/bin/busybox cut -d' ' -f1 /proc/uptime)\"\n/bin/busybox poweroff -f\n";
    std::fs::create_dir_all(floor.join("root/proc"))?;
    std::fs::write(floor.join("root/init"), init)?;
    run(Command::new("chmod").arg("755").arg(floor.join("root/init")))?;
    let initrd = floor.join("initrd.cpio.gz");
    run(Command::new("sh").arg("-c").arg(format!(
        "cd {} && find . | cpio -o -H newc -R 0:0 --quiet | gzip -1 > {}",
        floor.join("root").display(),
        initrd.display()
    )))?;
    // The new .initrd is smaller than the old one: it fits at the old one's address.
    let vma = section_vma(&uki, ".initrd")?;
    let floor_uki = floor.join("floor.efi");
    run(Command::new("objcopy")
        .args(["--remove-section", ".initrd", "--add-section"])
        .arg(format!(".initrd={}", initrd.display()))
        .args(["--change-section-vma", &format!(".initrd={vma:#x}")])
        .arg(&uki)
        .arg(&floor_uki))?;
    run(Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-o", "-i"])
        .arg(&esp)
        .arg(&floor_uki)
        .arg("::/EFI/BOOT/BOOTX64.EFI"))?;
    // GPT with the ESP where the image has it, then the ESP's bytes.
    let disk = floor.join("disk.img");
    let sectors = |b: u64| b / 512;
    std::fs::File::create(&disk)?.set_len(start + size + (1 << 20))?;
    let mut sfdisk = Command::new("sfdisk")
        .arg("--quiet")
        .arg(&disk)
        .stdin(Stdio::piped())
        .spawn()
        .context("cannot run sfdisk")?;
    let table = format!(
        "label: gpt\nstart={}, size={}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n",
        sectors(start),
        sectors(size)
    );
    std::io::Write::write_all(sfdisk.stdin.as_mut().context("sfdisk stdin")?, table.as_bytes())?;
    drop(sfdisk.stdin.take());
    if !sfdisk.wait()?.success() {
        bail!("sfdisk failed on {}", disk.display());
    }
    run(Command::new("dd")
        .arg(format!("if={}", esp.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=1M", "oflag=seek_bytes", "conv=notrunc", "status=none"])
        .arg(format!("seek={start}")))?;
    Ok(disk)
}

/// A PE section's VMA (image base included, as objcopy takes it), from `objdump -h`.
fn section_vma(file: &Path, name: &str) -> Result<u64> {
    let out = Command::new("objdump").arg("-h").arg(file).output().context("cannot run objdump")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let vma = text.lines().find_map(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        (words.get(1) == Some(&name)).then(|| words.get(3).and_then(|v| u64::from_str_radix(v, 16).ok()))?
    });
    vma.with_context(|| format!("no {name} section in {}", file.display()))
}

/// Boots the floor once and returns the guest ms at its /init.
fn floor_guest_ms(disk: &Path, work: &Path) -> Result<u64> {
    let mut cfg = bench_vm(disk, work)?;
    cfg.snapshot = true;
    let vm = Vm::start(cfg)?;
    let line = vm.wait_for("floor-uptime ", Duration::from_secs(180))?;
    let secs: f64 = line
        .split("floor-uptime ")
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("the floor init printed no uptime: {line}"))?;
    Ok((secs * 1000.0) as u64)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Service start cost on the host: the supervisor (as PID 1 of a pid namespace) restarts a
/// service that exits at once, with no backoff, until its crash-loop limit; the wall time from
/// the first start to the give-up over the number of starts is one start (spawn, namespaces,
/// root view, privileges dropped, exec) plus its exit and reaping.
fn service_start_row(init: &Path, dir: &Path) -> Result<Row> {
    const STARTS: u32 = 40;
    let work = dir.join("start-cost");
    std::fs::create_dir_all(work.join("run"))?;
    let plan = serde_json::json!({
        "hostname": "localhost", "build_time_unix": 0, "admin_uids": [],
        "services": [{
            "name": "once", "exec": "/bin/true", "args": [], "uid": 65534, "gid": 65534, "groups": [],
            "env": [], "workdir": "/",
            "namespaces": {"mount": true, "pid": true, "ipc": true, "uts": true, "net": "chat"},
            "mounts": {"writable": [], "tmpfs": [], "read_only": []},
            "caps_bounding": [], "caps_ambient": [], "no_new_privs": true,
            "rlimits": {"nproc": null, "nofile": 1024, "address_space": null, "core": 0},
            "after": [], "ready": "started",
            "restart": {"initial_delay_ms": 0, "max_delay_ms": 0, "max_exits": STARTS, "window_ms": 600000,
                        "stable_ms": 600000, "ready_timeout_ms": 10000, "stop_grace_ms": 1000}
        }]
    });
    std::fs::write(work.join("plan.json"), plan.to_string())?;
    let mut child = Command::new("unshare")
        .args(["--pid", "--fork", "--mount", "--propagation", "private", "--kill-child"])
        .arg(init)
        .arg(cloister_proto::SUPERVISE_ARG)
        .arg(work.join("plan.json"))
        .arg(work.join("run"))
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the supervisor under unshare")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (mut first, mut last) = (None, None);
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        if first.is_none() && line.contains("started (pid") {
            first = Some(Instant::now());
        }
        if line.contains("failed:") {
            last = Some(Instant::now());
            break;
        }
    }
    // unshare outlives SIGTERM; SIGKILL takes the supervisor with it (--kill-child).
    let _ = child.kill();
    let _ = child.wait();
    let (Some(first), Some(last)) = (first, last) else {
        bail!("the supervisor never gave up on the service")
    };
    let us = last.duration_since(first).as_micros() / u128::from(STARTS - 1);
    Ok(row("stage 2: one service start + exit (host, µs)", format!("{us} µs"), ""))
}

fn print_table(rows: &[Row]) {
    let w0 = rows.iter().map(|r| r.what.chars().count()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.value.chars().count()).max().unwrap_or(0);
    println!("\n{:w0$}  {:w1$}  target", "measure", "value");
    for r in rows {
        println!("{:w0$}  {:w1$}  {}", r.what, r.value, r.target);
    }
}

/// Flash throughput against `dd bs=4M oflag=direct conv=fsync` of the same image to the same
/// device in the same run, best of two each, on two loop devices: over a file in /dev/shm
/// (RAM: the device is faster than one SHA-256 stream, so this shows our CPU ceiling) and over
/// a file on the build directory's disk with the loop's direct I/O on (writes reach the disk,
/// as on a stick; the nearest this machine has to one). Also the bytes flash sends against the
/// image's size. Needs `<image>.bmap` and root.
fn flash_rows(rows: &mut Vec<Row>, image: &Path) -> Result<()> {
    let pid = std::process::id();
    let shm = PathBuf::from(format!("/dev/shm/cloister-flash-bench-{pid}"));
    flash_rows_on(rows, image, &shm, "RAM loop", false)?;
    let disk = image.with_file_name(format!("flash-bench-target-{pid}"));
    flash_rows_on(rows, image, &disk, "disk loop, direct I/O", true)
}

fn flash_rows_on(rows: &mut Vec<Row>, image: &Path, backing: &Path, label: &str, direct: bool) -> Result<()> {
    let size = std::fs::metadata(image).with_context(|| format!("cannot stat {}", image.display()))?.len();
    let backing = ScratchFile(backing.to_path_buf());
    std::fs::File::create(&backing.0)?.set_len(size)?;
    let out = Command::new("losetup")
        .args(["--find", "--show", &format!("--direct-io={}", if direct { "on" } else { "off" })])
        .arg(&backing.0)
        .output()?;
    if !out.status.success() {
        bail!("losetup failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let dev = LoopDev(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    let args = crate::flash::FlashArgs {
        device: dev.0.clone(),
        image: Some(image.into()),
        yes: true,
        dry_run: false,
        allow_fixed: true,
    };
    let (mut ours, mut dd, mut best) = (f64::MAX, f64::MAX, None::<crate::flash::FlashReport>);
    for _ in 0..2 {
        let t = Instant::now();
        run(Command::new("dd")
            .arg(format!("if={}", image.display()))
            .arg(format!("of={}", dev.0.display()))
            .args(["bs=4M", "oflag=direct", "conv=fsync", "status=none"]))?;
        dd = dd.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let report = crate::flash::flash_image(&args)?.context("flash did not write")?;
        let secs = t.elapsed().as_secs_f64();
        if secs < ours || best.is_none() {
            ours = secs;
            best = Some(report);
        }
    }
    let r = best.context("flash did not write")?;
    let mib = |b: u64| b as f64 / 1048576.0;
    rows.push(row(
        format!("flash ({label}): ours (write+verify) / dd bs=4M oflag=direct (ratio)"),
        format!("{ours:.2} s / {dd:.2} s ({:.2})", dd / ours),
        "≥ 0.9",
    ));
    rows.push(row(
        format!("flash ({label}): write phase alone / dd (ratio)"),
        format!("{:.2} s ({:.2})", r.write_secs, dd / r.write_secs),
        "≥ 0.9",
    ));
    rows.push(row(
        format!("flash ({label}): write / SHA256 beside it / read-back (s)"),
        format!("{:.2} s / {:.2} s / {:.2} s", r.write_secs, r.hash_secs, r.verify_secs),
        "",
    ));
    rows.push(row(
        format!(
            "flash ({label}): data written / image (zeroed by device, zeros written; gap blocks read back)"
        ),
        format!(
            "{:.0} / {:.0} MiB ({:.0} MiB, {:.0} MiB; {})",
            mib(r.data_bytes),
            mib(size),
            mib(r.zeroed_by_device),
            mib(r.zeros_written),
            r.gap_samples
        ),
        "",
    ));
    Ok(())
}

/// A bench's scratch directory, removed with what it holds when the bench is done with it.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A bench's scratch file, removed when the bench is done with it.
struct ScratchFile(PathBuf);

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Declared after the file it is over, so it is detached first.
struct LoopDev(PathBuf);

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What stage 1 prints around a wrong and a right passphrase.
    const CONSOLE: &str = "cloister: passphrase read after 40 ms\n\
        step unlock-modules: ok (900 ms, 120 ms of it waited for)\n\
        cloister: key slot tried in 700 ms\n\
        cloister: wrong passphrase\n\
        cloister: passphrase read after 2 ms\n\
        cloister: key slot tried in 650 ms\n\
        step mount-modules: ok (1500 ms, 30 ms of it waited for)\n";

    #[test]
    fn every_attempt_counts_as_not_ours() {
        assert_eq!(summed_ms(CONSOLE, cloister_proto::marker::PASSPHRASE_READ), 42);
        assert_eq!(summed_ms(CONSOLE, cloister_proto::marker::KEY_SLOT_TRIED), 1350);
        assert_eq!(summed_ms("step unlock: ok (3 ms)\n", cloister_proto::marker::KEY_SLOT_TRIED), 0);
    }

    #[test]
    fn kernel_milestones_give_the_run_of_init_and_the_unpack_time() {
        let console = format!(
            "x\n{} 2950 ms; initramfs unpacked from 812 to 1430 ms\n",
            cloister_proto::marker::KERNEL_RAN_INIT
        );
        assert_eq!(kernel_milestones(&console), (Some(2950), Some(618)));
        let unknown = format!(
            "{} 2950 ms; initramfs unpacked from ? to ? ms\n",
            cloister_proto::marker::KERNEL_RAN_INIT
        );
        assert_eq!(kernel_milestones(&unknown), (Some(2950), None));
        assert_eq!(kernel_milestones("nothing\n"), (None, None));
    }

    #[test]
    fn module_waits_are_read_per_step() {
        assert_eq!(waited_for_modules_ms(CONSOLE, "unlock-modules"), Some(120));
        assert_eq!(waited_for_modules_ms(CONSOLE, "mount-modules"), Some(30));
        assert_eq!(waited_for_modules_ms(CONSOLE, "other-modules"), None);
    }
}
