//! The build as a list of named phases, run in order, each timed and printed:
//! packages → rootfs → initramfs → uki → xfs → luks → image.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cloister_config::Config;
use cloister_image::layout::{Layout, LayoutUuids};
use cloister_image::luks::{KdfParams, LUKS_RESERVE_BYTES};
use cloister_rootfs::apt::{AptRoot, FetchedDeb};

use crate::progress::Progress;
use crate::secret::Secret;
use crate::{initrd, rootfs_phase, Args};

/// How long package lists stay fresh before `apt-get update` runs again.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Everything decided before the first phase runs.
pub struct Plan {
    pub config: Config,
    pub output: PathBuf,
    pub init_bin: PathBuf,
    pub cache_dir: PathBuf,
    pub mirror: Option<String>,
    pub refresh: bool,
    pub keep_work: bool,
    pub list_files: Option<PathBuf>,
    pub kdf: KdfParams,
    /// Human-readable list of test-only settings in force; empty for a production image.
    pub test_options: Vec<String>,
    /// What test-only options put into the image.
    pub test: TestHooks,
}

/// Test-only settings that change what goes into the image; each one is also listed in
/// [`Plan::test_options`], so the manifest says so. All off for a production image.
#[derive(Debug, Default)]
pub struct TestHooks {
    /// torrc lines of a private Tor network.
    pub tor_network: Option<String>,
    /// The plan's firewall gets `test_break_verify`: PID 1's read-back comparison fails.
    pub break_firewall_check: bool,
}

impl Plan {
    pub fn new(args: &Args, config: Config, output: PathBuf, init_bin: PathBuf) -> Result<Self> {
        let mut test_options = Vec::new();
        let mut kdf = KdfParams {
            memory_kib: config.kdf.memory_mib * 1024,
            time_ms: config.kdf.time_ms,
            iterations: (config.kdf.iterations != 0).then_some(config.kdf.iterations),
            parallel: config.kdf.parallel,
        };
        if let Some(mib) = args.kdf_memory_mib {
            kdf.memory_kib = mib.max(1) * 1024;
            test_options.push(format!("kdf memory lowered to {mib} MiB"));
        }
        if let Some(ms) = args.kdf_time_ms {
            kdf.time_ms = ms;
            kdf.iterations = None;
            test_options.push(format!("kdf benchmarked for {ms} ms"));
        }
        if let Some(it) = args.kdf_iterations {
            kdf.iterations = Some(it);
            kdf.parallel = 1;
            test_options.push(format!("kdf fixed at {it} iterations, 1 lane"));
        }
        let test_tor_network = match &args.test_tor_network {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --test-tor-network {}", path.display()))?;
                test_options.push("tor joins a private test network, never the real one".into());
                Some(text)
            }
            None => None,
        };
        if args.test_break_firewall_check {
            test_options
                .push("firewall check fails on purpose: no service starts, the uplink stays down".into());
        }
        let cache_dir = match &args.cache_dir {
            Some(dir) => dir.clone(),
            None => default_cache_dir()?,
        };
        Ok(Self {
            config,
            output,
            init_bin,
            cache_dir,
            mirror: args.mirror.clone(),
            refresh: args.refresh,
            keep_work: args.keep_work,
            list_files: args.list_files.clone(),
            kdf,
            test_options,
            test: TestHooks {
                tor_network: test_tor_network,
                break_firewall_check: args.test_break_firewall_check,
            },
        })
    }
}

/// argon2id's memory plus what the kernel and the unpacked initramfs need around it.
fn min_ram_mib(kdf: &KdfParams) -> u64 {
    u64::from(kdf.memory_kib / 1024) + 256
}

fn default_cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("cloister"));
    }
    let home =
        std::env::var_os("HOME").context("neither XDG_CACHE_HOME nor HOME is set; pass --cache-dir")?;
    Ok(PathBuf::from(home).join(".cache").join("cloister"))
}

/// The build's scratch space: staging tree, initramfs, UKI and the plain root XFS.
///
/// On tmpfs when it has room to spare, else beside the output. This machine's disk needs
/// 13 s of kernel time for `tar -x` of the packages where tmpfs needs 1.3 s. Nothing in here
/// is secret: packaged files, the plain XFS made of them, and the scratch LUKS2 header (its
/// keyslot holds the volume key wrapped by the passphrase). Removed when the build ends unless
/// --keep-work.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    /// Room a build needs besides the plain root XFS (staging tree, initramfs, UKI).
    const STAGING_BYTES: u64 = 1 << 30;
    /// tmpfs must keep this much free after the build, so the build never starves the host.
    const HEADROOM: u64 = 2 << 30;

    fn create(output: &Path, root_bytes: u64, keep: bool) -> Result<Self> {
        let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let dir_name = format!(".{name}.work-{}", std::process::id());
        let shm = Path::new("/dev/shm");
        let needed = root_bytes + Self::STAGING_BYTES + Self::HEADROOM;
        let roomy = nix::sys::statvfs::statvfs(shm)
            .map(|st| st.blocks_available() * st.fragment_size() > needed)
            .unwrap_or(false);
        let parent = match output.parent().filter(|p| !p.as_os_str().is_empty()) {
            _ if roomy => shm,
            Some(p) => p,
            None => Path::new("."),
        };
        let path = parent.join(dir_name);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create work directory {}", path.display()))?;
        Ok(Self { path, keep })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("work directory kept: {}", self.path.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("warning: cannot remove work directory {}: {e}", self.path.display());
        }
    }
}

/// Runs one phase, printing `phase <name>: ok (<s> s)` or its failure, and records the time.
fn phase<T>(
    timings: &mut Vec<(&'static str, f64)>,
    name: &'static str,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    eprintln!("phase {name}: started");
    let t = Instant::now();
    let r = f().with_context(|| format!("phase {name}"));
    let secs = t.elapsed().as_secs_f64();
    match &r {
        Ok(_) => eprintln!("phase {name}: ok ({secs:.1} s)"),
        Err(_) => eprintln!("phase {name}: FAILED ({secs:.1} s)"),
    }
    timings.push((name, secs));
    r
}

pub struct Summary {
    pub image: cloister_image::assemble::ImageSummary,
    pub manifest: PathBuf,
    pub test_options: Vec<String>,
    pub timings: Vec<(&'static str, f64)>,
    pub min_ram_mib: u64,
}

impl Summary {
    pub fn print(&self, total: Duration) {
        let t: Vec<String> = self.timings.iter().map(|(n, s)| format!("\"{n}\":{s:.3}")).collect();
        // One machine-readable line for `cargo xtask bench`.
        println!("cloister-build: timings {{{},\"total\":{:.3}}}", t.join(","), total.as_secs_f64());
        let img = &self.image;
        println!("\nimage:    {}", img.path.display());
        println!("size:     {} MiB", img.bytes >> 20);
        println!("sha256:   {}", img.sha256);
        println!("manifest: {}", self.manifest.display());
        println!("target RAM needed to unlock: at least {} MiB", self.min_ram_mib);
        if !self.test_options.is_empty() {
            println!("TEST IMAGE, not for production: {}", self.test_options.join("; "));
        }
        println!("built in {:.1} s\n", total.as_secs_f64());
        println!("boot it:   cargo xtask run --image {}", img.path.display());
        println!(
            "flash it:  dd if={} of=/dev/sdX bs=4M oflag=direct status=progress  (check sdX twice)",
            img.path.display()
        );
    }
}

pub fn run_all(plan: &Plan, passphrase: &Secret) -> Result<Summary> {
    let mut timings = Vec::new();
    let layout =
        Layout::plan(plan.config.image.size_mib, plan.config.image.esp_size_mib, LayoutUuids::random())?;
    let work = WorkDir::create(&plan.output, layout.root.size_bytes(), plan.keep_work)?;
    // The output's space first (a full disk fails before any work), then the KDF, while the
    // build has not yet filled tmpfs and the page cache: libcryptsetup caps its memory by the
    // free RAM on machines without swap (see `luks::format`).
    let writer =
        phase(&mut timings, "reserve", || Ok(cloister_image::ImageWriter::create(&plan.output, &layout)?))?;
    let header = phase(&mut timings, "kdf", || {
        Ok(cloister_image::luks::format(&work.path, layout.root.size_bytes(), passphrase.bytes(), &plan.kdf)?)
    })?;
    let fetched = phase(&mut timings, "packages", || fetch_packages(plan))?;
    let rootfs = phase(&mut timings, "rootfs", || {
        rootfs_phase::build(
            &work.path.join("staging"),
            &fetched,
            &plan.init_bin,
            &plan.cache_dir.join("data-tars"),
            &plan.config,
            &plan.test,
        )
    })?;
    if let Some(list) = &plan.list_files {
        rootfs_phase::write_listing(&rootfs.tree, list)?;
    }
    let initramfs = work.path.join("initramfs.cpio.lz4");
    let initrd = phase(&mut timings, "initramfs", || initrd::build(&rootfs, &plan.init_bin, &initramfs))?;
    let cmdline = kernel_cmdline(&plan.config, &layout);
    let uki = work.path.join("BOOTX64.EFI");
    phase(&mut timings, "uki", || {
        let sections = cloister_image::uki::UkiSections {
            osrel: OS_RELEASE.as_bytes(),
            cmdline: &cmdline,
            linux: &rootfs.kernel_image,
            initrd: &initramfs,
        };
        Ok(cloister_image::uki::build_uki(Path::new(cloister_image::uki::DEFAULT_STUB), &sections, &uki)?)
    })?;
    // The plain XFS, sparse in the work directory; it is encrypted straight into the image.
    let root_plain = work.path.join("root.xfs");
    let root_bytes = layout.root.size_bytes();
    phase(&mut timings, "xfs", || {
        let proto = work.path.join("protofile");
        let report = cloister_image::xfs::write_protofile(&rootfs.tree, &proto)?;
        let xfs_bytes = root_bytes - LUKS_RESERVE_BYTES;
        let file = std::fs::File::create(&root_plain)
            .with_context(|| format!("cannot create {}", root_plain.display()))?;
        file.set_len(xfs_bytes).with_context(|| format!("cannot size {}", root_plain.display()))?;
        drop(file);
        cloister_image::xfs::mkfs_xfs(&proto, &root_plain, xfs_bytes, "cloister", None)?;
        cloister_image::xfs::restore_modes(&root_plain, &rootfs.tree, &report.sticky_dropped)?;
        Ok(())
    })?;
    phase(&mut timings, "esp", || Ok(writer.write_esp(&[("EFI/BOOT/BOOTX64.EFI", uki.as_path())])?))?;
    let (luks, data_pass) = phase(&mut timings, "luks", || {
        // Progress counts the data segment: the partition less its header.
        let mut bar = Progress::new("encrypt", root_bytes - LUKS_RESERVE_BYTES, true);
        // The data pass alone (first to last progress report), apart from the KDF's seconds,
        // for comparing our throughput with the cipher's.
        let mut pass_span: Option<(Instant, Instant)> = None;
        let mut report = |done: u64, _total: u64| {
            let now = Instant::now();
            pass_span = Some((pass_span.map_or(now, |(first, _)| first), now));
            bar.set(done, "");
        };
        let info =
            cloister_image::luks::encrypt(&root_plain, writer.root_partition(), &header, Some(&mut report))?;
        bar.finish();
        let secs = pass_span.map_or(0.0, |(first, last)| (last - first).as_secs_f64());
        Ok((info, secs))
    })?;
    timings.push(("luks_data_pass", data_pass));
    let image = phase(&mut timings, "image", || Ok(writer.finish()?))?;
    let uki_bytes = std::fs::metadata(&uki).map(|m| m.len()).unwrap_or(0);
    let min_ram_mib = min_ram_mib(&plan.kdf);
    let manifest = crate::manifest::write(&crate::manifest::Inputs {
        plan,
        image: &image,
        layout: &layout,
        cmdline: &cmdline,
        luks: &luks,
        rootfs: &rootfs,
        initrd: &initrd,
        uki_bytes,
        min_ram_mib,
        debs: &fetched,
    })?;
    Ok(Summary { image, manifest, test_options: plan.test_options.clone(), timings, min_ram_mib })
}

/// Packages every image needs whatever the config says: what apt does not add on its own (it
/// starts from an empty dpkg status): the base accounts (base-passwd), /etc/os-release and
/// friends (base-files) and ldconfig for the ld.so cache (libc-bin); and the libraries our PID 1
/// links (libcryptsetup12 and its deps).
const REQUIRED_PACKAGES: &[&str] = &["base-files", "base-passwd", "libc-bin", "libcryptsetup12"];

fn fetch_packages(plan: &Plan) -> Result<Vec<FetchedDeb>> {
    let apt = AptRoot::prepare(&plan.cache_dir, plan.mirror.as_deref())?;
    apt.update(LISTS_MAX_AGE, plan.refresh)?;
    let mut packages: Vec<String> = REQUIRED_PACKAGES.iter().map(|p| p.to_string()).collect();
    packages.extend(plan.config.packages.all());
    let specs = apt.resolve(&packages)?;
    let total: u64 = specs.iter().map(|s| s.size).sum();
    eprintln!("  {} packages, {} MiB", specs.len(), total >> 20);
    let mut bar = Progress::new("download", total, true);
    let fetched = apt.fetch(&specs, &mut |p| bar.set(p.done_bytes, ""))?;
    bar.finish();
    Ok(fetched)
}

/// The .osrel section: what boot menus show. The ESP is not encrypted, so it says no more than
/// that this is Cloister.
const OS_RELEASE: &str = "NAME=Cloister\nID=cloister\nPRETTY_NAME=Cloister\n";

/// Consoles first (the kernel's /dev/console is the last `console=`), then the root's PARTUUID
/// and the appliance marker.
pub fn kernel_cmdline(config: &Config, layout: &Layout) -> String {
    let mut words: Vec<String> = config.boot.consoles.iter().map(|c| format!("console={c}")).collect();
    words.push(format!("{}=PARTUUID={}", cloister_proto::CMDLINE_ROOT, layout.root.part_uuid));
    words.push(cloister_proto::CMDLINE_APPLIANCE.to_string());
    words.push("loglevel=4".into());
    words.extend(config.boot.cmdline_extra.iter().cloned());
    words.join(" ")
}
