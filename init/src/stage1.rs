//! Stage 1, PID 1 in the initramfs: a fixed list of named boot steps from the API mounts to the
//! exec of stage 2 on the unlocked root. Each step prints `step <name>: ok (<ms> ms)`; the first
//! failure prints `cloister: fatal: <step>: <error>` and powers off after a delay.

use std::convert::Infallible;
use std::fmt::Display;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cloister_proto::{
    marker, LUKS_WARMUP_HEADER, MODULES_DISK_LIST, MODULES_UNLOCK_LIST, ROOT_MAPPING, STAGE2_ARG, STAGE2_PATH,
};

use crate::cmdline::Cmdline;
use crate::console::Consoles;
use crate::handover::Handover;
use crate::unlock::{Luks, UnlockError};
use crate::{clock, kmod, mounts, passphrase, power, root};

/// How long to wait for the root partition to appear.
const ROOT_TIMEOUT: Duration = Duration::from_secs(30);
const ROOT_POLL: Duration = Duration::from_millis(100);
/// How long a fatal message stays on screen before the power goes.
const FATAL_DELAY: Duration = Duration::from_secs(10);

/// The step that failed and why, as one console line.
pub struct Fatal {
    step: &'static str,
    error: String,
}

fn step<T, E: Display>(
    c: &Consoles,
    name: &'static str,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, Fatal> {
    step_from(c, name, Instant::now(), f)
}

/// Like [`step`], timed from `start` (the API mounts happen before any console is open).
fn step_from<T, E: Display>(
    c: &Consoles,
    name: &'static str,
    start: Instant,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, Fatal> {
    match f() {
        Ok(v) => {
            c.line(&format!("step {name}: ok ({} ms)", start.elapsed().as_millis()));
            Ok(v)
        }
        Err(e) => Err(Fatal { step: name, error: e.to_string() }),
    }
}

pub fn run() -> ! {
    // libdevmapper must make /dev/mapper nodes itself: there is no udev in the initramfs.
    std::env::set_var("DM_DISABLE_UDEV", "1");
    let mut consoles = Consoles::stderr_only();
    let Err(fatal) = boot(&mut consoles);
    consoles.line(&format!("{} {}: {}", marker::FATAL, fatal.step, fatal.error));
    power::halt_after(FATAL_DELAY, &consoles)
}

fn boot(consoles: &mut Consoles) -> Result<Infallible, Fatal> {
    let start = Instant::now();
    let mounted = mounts::mount_api();
    let cmdline = Cmdline::read();
    *consoles = Consoles::open(&cmdline);
    let c: &Consoles = consoles;
    c.line(marker::STAGE1_STARTED);
    c.line(&format!("cloister: boot clock {} ms", clock::boot_ms()));
    step_from(c, "mount-api", start, || mounted)?;
    step(c, "appliance", || crate::guard::check("boot"))?;

    // libcryptsetup locks LUKS2 metadata under it, the warm-up's header's too.
    step(c, "lock-dir", || mounts::make_dir(crate::unlock::LOCK_DIR, 0o700))?;
    // libcryptsetup's first header load in a process does one-time work (its crypto backend,
    // the metadata code, TCG's translation of all of it): done now on a disk-less header,
    // beside the disk drivers, it is not in the root's header load after them.
    let warmup = Warmup::start();
    // dm-crypt, its cipher and XFS are not needed to find the disk: they load on their own
    // thread, beside the disk drivers and then while the prompt waits for a person to type
    // (xfs.ko alone takes over a second under emulation).
    let mut unlock_modules = Background::start(MODULES_UNLOCK_LIST);
    let (found, mut leftover) = step(c, "modules", || load_disk_groups(c, &cmdline))?;
    let dev = match found {
        Some(dev) => dev,
        None => step(c, "find-root", || find_root(c, &cmdline))?,
    };
    // The shutdown root's copy of the initramfs needs nothing but /run: it is made while the
    // prompt waits (and the KDF runs) instead of after the unlock, where it held up stage 2 by
    // ~150 ms under emulation. The step's time is what the boot still waited for it.
    let saving = std::thread::Builder::new().name("save-initramfs".into()).spawn(save_initramfs_timed);
    let pass = step(c, "unlock", || unlock(c, &dev, warmup, &mut unlock_modules))?;
    leftover.finish(c);
    // Prints its own step line, with the time waited.
    unlock_modules
        .finish(c, Need::Mount)
        .map_err(|e| Fatal { step: Need::Mount.step(), error: e.to_string() })?;
    let mapped = PathBuf::from(format!("/dev/mapper/{ROOT_MAPPING}"));
    step(c, "mount-root", || mounts::mount_root(&mapped, "xfs"))?;
    // Before the handover's read-ahead: its few reads (the GPT, the fill record on the root)
    // would otherwise queue behind megabytes of stage 2's files.
    grow_root(c, &cmdline, &dev, &pass);
    drop(pass);
    // Before the handover's fork: the copy's thread must be done (the fork wants this process
    // alone on its one thread), and so must the copy before anything of the initramfs goes.
    let saved = step(c, "save-initramfs", || match saving {
        Ok(thread) => thread.join().unwrap_or(Err(mounts::MountError::ThreadPanicked)),
        // No thread to be had: copy now.
        Err(_) => save_initramfs_timed(),
    });
    match saved {
        Ok((bytes, took)) => c.line(&format!(
            "cloister: initramfs saved for shutdown ({} KiB in {} ms)",
            bytes / 1024,
            took.as_millis()
        )),
        // Without this copy shutdown still works, it just cannot close the mapping: not fatal.
        Err(e) => c.line(&format!("cloister: {}: {}", e.step, e.error)),
    }
    let handover = step(c, "handover", || {
        Ok::<_, Infallible>(Handover::start(c, std::path::Path::new(mounts::SYSROOT), STAGE2_PATH))
    })?;
    c.line(&format!("{} {STAGE2_PATH} at {} ms since boot", marker::SWITCHING, clock::boot_ms()));
    step(c, "switch-root", || mounts::switch_root(STAGE2_PATH, &[STAGE2_ARG], handover))
}

/// The bytes copied for the shutdown root and how long the copy took.
fn save_initramfs_timed() -> Result<(u64, Duration), mounts::MountError> {
    let t = Instant::now();
    mounts::save_initramfs().map(|bytes| (bytes, t.elapsed()))
}

type Passphrase = zeroize::Zeroizing<Vec<u8>>;

/// First-boot growth; a failure is reported and the boot goes on with the root as it is.
fn grow_root(c: &Consoles, cmdline: &Cmdline, dev: &std::path::Path, pass: &[u8]) {
    let Ok(spec) = cmdline.root() else { return };
    let root = crate::grow::Root {
        partition: dev,
        partuuid: &spec.partuuid,
        mapping: ROOT_MAPPING,
        mountpoint: std::path::Path::new(mounts::SYSROOT),
    };
    match step(c, "grow", || crate::grow::run(&root, pass)) {
        Ok(grown) => c.line(&grown.to_string()),
        Err(e) => c.line(&format!("{} {}", marker::GROW_FAILED, e.error)),
    }
}

/// After each group of disk drivers has loaded, its disks get this long to show up.
const GROUP_SETTLE: Duration = Duration::from_millis(400);
const GROUP_POLL: Duration = Duration::from_millis(20);

/// Loads the disk driver groups in the build's order (virtio, then native controllers, then
/// USB), skipping groups for hardware the PCI bus does not have, until the root partition
/// appears; the needed `input` groups after that load on a thread beside the prompt (a USB
/// keyboard still needs them) instead of holding up the boot, and the other groups not at all.
/// Without a root by the last group, the skipped groups load too (a device the PCI classes did
/// not predict) and `find-root` waits.
fn load_disk_groups(c: &Consoles, cmdline: &Cmdline) -> Result<(Option<PathBuf>, Leftover), kmod::KmodError> {
    let dir = kmod::modules_dir()?;
    let text = std::fs::read_to_string(MODULES_DISK_LIST)
        .map_err(|source| kmod::KmodError::Read { path: MODULES_DISK_LIST.into(), source })?;
    let groups = kmod::parse_groups(&text);
    let devices = kmod::pci_devices(std::path::Path::new("/sys/bus/pci/devices"));
    let needed = |g: &kmod::Group| devices.as_ref().is_none_or(|d| g.serves(d));
    let (wanted, skipped): (Vec<&kmod::Group>, Vec<&kmod::Group>) = groups.iter().partition(|g| needed(g));
    let names = |gs: &[&kmod::Group]| gs.iter().map(|g| g.name.as_str()).collect::<Vec<_>>().join(", ");
    c.line(&format!(
        "cloister: disk drivers: {} (skipped, no such device: {})",
        names(&wanted),
        names(&skipped)
    ));
    // A bad root= is reported by find-root; here it only means "load every group".
    let partuuid = cmdline.root().ok().map(|spec| spec.partuuid);
    for (i, group) in wanted.iter().enumerate() {
        load_group(c, &dir, group);
        let Some(uuid) = &partuuid else { continue };
        if let Ok(dev) = root::wait_for(&root::Paths::default(), uuid, GROUP_SETTLE, GROUP_POLL) {
            c.line(&format!("cloister: root is {} (after the {} drivers)", dev.display(), group.name));
            // Only keyboards can still need a driver; the others would just compete with the
            // unlock modules (and the KDF) for the CPUs.
            let rest: Vec<String> =
                wanted[i + 1..].iter().filter(|g| g.input).flat_map(|g| g.modules.clone()).collect();
            return Ok((Some(dev), Leftover::start(dir, rest)));
        }
    }
    for group in skipped {
        load_group(c, &dir, group);
    }
    Ok((None, Leftover::default()))
}

fn load_group(c: &Consoles, dir: &std::path::Path, group: &kmod::Group) {
    let rels: Vec<&str> = group.modules.iter().map(String::as_str).collect();
    for m in kmod::load_paths(dir, &rels, None).messages {
        c.line(&m);
    }
}

/// Disk and keyboard drivers still loading once the root was found.
#[derive(Default)]
struct Leftover {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<kmod::ListLoad>>,
}

impl Leftover {
    fn start(dir: PathBuf, rels: Vec<String>) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let rels: Vec<&str> = rels.iter().map(String::as_str).collect();
            kmod::load_paths(&dir, &rels, Some(&flag))
        });
        Self { stop, handle: Some(handle) }
    }

    /// Stops after the module loading now (the root is open: nothing more is needed) and
    /// prints what the thread said.
    fn finish(&mut self, c: &Consoles) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(load) = self.handle.take().and_then(|h| h.join().ok()) {
            for m in &load.messages {
                c.line(m);
            }
        }
    }
}

/// The unlock modules (`modules.unlock`: dm-crypt, its cipher, XFS), each group of the list on
/// a thread of its own, all started before the disk drivers: xfs.ko alone takes over a second
/// to link under emulation, and on its own thread it waits behind nothing. A group whose CPU
/// flag this CPU lacks is not loaded at all. [`Background::finish`] waits for what a [`Need`]
/// needs, once.
struct Background {
    list: &'static str,
    started: Instant,
    /// The groups not waited for yet.
    loads: Vec<GroupLoad>,
    /// Why no group loads (unreadable list), for the first [`Background::finish`].
    error: Option<kmod::KmodError>,
    skipped: Vec<String>,
    finished: Vec<Need>,
}

/// What a wait for [`Background`] is for: mapping the unlocked root (dm-crypt and its cipher),
/// or mounting it (also the `mount` groups: XFS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Map,
    Mount,
}

impl Need {
    fn step(self) -> &'static str {
        match self {
            Need::Map => "unlock-modules",
            Need::Mount => "mount-modules",
        }
    }

    fn waits_for(self, group: &GroupLoad) -> bool {
        self == Need::Mount || !group.mount
    }
}

/// One group loading on its own thread; the thread returns what it said and how long it took.
struct GroupLoad {
    name: String,
    mount: bool,
    handle: std::thread::JoinHandle<(kmod::ListLoad, u128)>,
}

impl Background {
    fn start(list: &'static str) -> Self {
        let started = Instant::now();
        let mut skipped = Vec::new();
        let (loads, error) = match Self::groups(list) {
            Ok((dir, groups)) => (Self::spawn(&dir, groups, &mut skipped), None),
            Err(e) => (Vec::new(), Some(e)),
        };
        Self { list, started, loads, error, skipped, finished: Vec::new() }
    }

    fn groups(list: &str) -> Result<(PathBuf, Vec<kmod::Group>), kmod::KmodError> {
        let dir = kmod::modules_dir()?;
        let text = std::fs::read_to_string(list)
            .map_err(|source| kmod::KmodError::Read { path: list.into(), source })?;
        Ok((dir, kmod::parse_groups(&text)))
    }

    fn spawn(dir: &std::path::Path, groups: Vec<kmod::Group>, skipped: &mut Vec<String>) -> Vec<GroupLoad> {
        // Unreadable: every group loads, as it would on a CPU that has every flag.
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok();
        let flags = cpuinfo.as_deref().map(kmod::cpu_flags);
        let mut loads = Vec::new();
        for group in groups {
            if let Some(flag) = flags.as_deref().and_then(|f| group.missing_cpu_flag(f)) {
                skipped.push(format!("cloister: modules {} skipped: the CPU has no {flag}", group.name));
                continue;
            }
            let dir = dir.to_owned();
            let (name, mount) = (group.name.clone(), group.mount);
            let handle = std::thread::spawn(move || {
                let t = Instant::now();
                // Nothing waits for these before the KDF is done: until then the disk drivers,
                // the LUKS header and the KDF get the CPUs first, and the loads take the rest
                // (the prompt's wait; the CPU a one-lane KDF leaves).
                let demoted = crate::sys::lowest_cpu_priority().err();
                let rels: Vec<&str> = group.modules.iter().map(String::as_str).collect();
                let mut load = kmod::load_paths(&dir, &rels, None);
                load.messages
                    .extend(demoted.map(|e| format!("cloister: modules {}: nice 19: {e}", group.name)));
                (load, t.elapsed().as_millis())
            });
            loads.push(GroupLoad { name, mount, handle });
        }
        loads
    }

    /// Waits for the groups `need` needs (only the first call for each need does), then prints
    /// what they said, how long each group took, how long since the loads began and how long
    /// we had to wait.
    fn finish(&mut self, c: &Consoles, need: Need) -> Result<(), UnlockStepError> {
        if self.finished.contains(&need) {
            return Ok(());
        }
        self.finished.push(need);
        if let Some(e) = self.error.take() {
            return Err(UnlockStepError::Modules(e));
        }
        let waiting = Instant::now();
        for m in self.skipped.drain(..) {
            c.line(&m);
        }
        let (now, later) = std::mem::take(&mut self.loads).into_iter().partition(|l| need.waits_for(l));
        self.loads = later;
        for load in now {
            let (done, ms) = load.handle.join().map_err(|_| UnlockStepError::ModulesThread(self.list))?;
            for m in &done.messages {
                c.line(m);
            }
            c.line(&format!("cloister: modules {}: {} loaded in {ms} ms", load.name, done.loaded));
        }
        c.line(&format!(
            "step {}: ok ({} ms, {} ms of it waited for)",
            need.step(),
            self.started.elapsed().as_millis(),
            waiting.elapsed().as_millis()
        ));
        Ok(())
    }
}

/// The load of [`LUKS_WARMUP_HEADER`] on a thread of its own. Best effort: if it fails, the
/// root's header load does the one-time work itself.
struct Warmup {
    handle: std::io::Result<std::thread::JoinHandle<(Result<(), UnlockError>, Duration)>>,
}

impl Warmup {
    fn start() -> Self {
        let handle = std::thread::Builder::new().name("luks-warmup".into()).spawn(|| {
            let t = Instant::now();
            (crate::unlock::warm_up(std::path::Path::new(LUKS_WARMUP_HEADER)), t.elapsed())
        });
        Warmup { handle }
    }

    /// Waits for the load (libcryptsetup is used by one thread at a time) and says how it went.
    fn finish(self) -> String {
        let waiting = Instant::now();
        let done = match self.handle {
            Ok(thread) => thread.join().map_err(|_| "its thread stopped abnormally".to_string()),
            Err(e) => Err(format!("no thread: {e}")),
        };
        let waited = waiting.elapsed().as_millis();
        match done {
            Ok((Ok(()), took)) => {
                format!("{} {} ms ({waited} ms waited for)", marker::LUKS_WARMED, took.as_millis())
            }
            Ok((Err(e), _)) => format!("cloister: LUKS warm-up: {e}"),
            Err(e) => format!("cloister: LUKS warm-up: {e}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum FindRootError {
    #[error(transparent)]
    Cmdline(#[from] crate::cmdline::CmdlineError),
    #[error("no partition with PARTUUID={0} after {1} s")]
    NotFound(String, u64),
}

fn find_root(c: &Consoles, cmdline: &Cmdline) -> Result<PathBuf, FindRootError> {
    let spec = cmdline.root()?;
    match root::wait_for(&root::Paths::default(), &spec.partuuid, ROOT_TIMEOUT, ROOT_POLL) {
        Ok(dev) => {
            c.line(&format!("cloister: root is {}", dev.display()));
            Ok(dev)
        }
        Err(seen) => {
            c.line(marker::NO_ROOT);
            for s in seen {
                c.line(&format!("cloister:   {s}"));
            }
            Err(FindRootError::NotFound(spec.partuuid, ROOT_TIMEOUT.as_secs()))
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum UnlockStepError {
    #[error(transparent)]
    Ask(#[from] passphrase::AskError),
    #[error(transparent)]
    Unlock(#[from] UnlockError),
    #[error(transparent)]
    Modules(kmod::KmodError),
    #[error("loading {0} stopped abnormally")]
    ModulesThread(&'static str),
    #[error("no encrypted root was found")]
    NoHeader,
}

/// Asks until a passphrase opens the root; wrong ones cost a growing delay.
/// Returns the passphrase that worked: growing the root needs it once more (see `grow`).
fn unlock(
    c: &Consoles,
    dev: &std::path::Path,
    warmup: Warmup,
    modules: &mut Background,
) -> Result<Passphrase, UnlockStepError> {
    c.line(&warmup.finish());
    let mut luks = match Luks::open(dev) {
        Ok(luks) => luks,
        Err(UnlockError::Load { .. }) => {
            c.line(&format!(
                "{} {}: its keys were destroyed (kill switch), or this is not a Cloister disk",
                marker::NO_LUKS_HEADER,
                dev.display()
            ));
            return Err(UnlockStepError::NoHeader);
        }
        Err(e) => return Err(e.into()),
    };
    let mut failures = 0u32;
    loop {
        c.line(&format!("cloister: asking for the passphrase at {} ms since boot", clock::boot_ms()));
        let asked = Instant::now();
        let pass = passphrase::ask(c, &dev.display().to_string())?;
        c.line(&format!("{} {} ms", marker::PASSPHRASE_READ, asked.elapsed().as_millis()));
        // The KDF needs no module: dm-crypt and its cipher go on loading beside it (one lane
        // leaves a CPU), and only the mapping waits for them.
        let trying = Instant::now();
        let tried = luks.volume_key(&pass);
        c.line(&format!("{} {} ms", marker::KEY_SLOT_TRIED, trying.elapsed().as_millis()));
        match tried {
            Ok(key) => {
                modules.finish(c, Need::Map)?;
                let mapping = Instant::now();
                luks.activate(ROOT_MAPPING, &key)?;
                c.line(&format!("cloister: root mapped in {} ms", mapping.elapsed().as_millis()));
                return Ok(pass);
            }
            Err(UnlockError::WrongPassphrase) => {
                failures = failures.saturating_add(1);
                c.line(marker::WRONG_PASSPHRASE);
                std::thread::sleep(passphrase::backoff(failures));
            }
            Err(e) => return Err(e.into()),
        }
    }
}
