//! The machine steps of stage 2, before the firewall and the services: runtime mounts (/tmp,
//! /dev/shm, /dev/pts, /run/cloister), hardening sysctls, the generic hostname, the UTC check,
//! the clock floor at the image's build time and the random seed kept in the state directory.
//! Also the [`Steps`] recorder that times and logs each step for the console and the control
//! socket's `status`.
//!
//! Every step that changes the whole machine takes a [`guard::Appliance`] token, which only
//! [`guard::check`] makes (PID 1 with `cloister.appliance` on the kernel command line): on a
//! developer's host these functions cannot even be called. The parts worth testing take their
//! paths as parameters (a `/proc/sys` root, a state directory, an urandom path) so unit tests
//! run them against temporary directories.

use std::fmt::{self, Display};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use nix::sys::statvfs::{statvfs, FsFlags};
use nix::time::{clock_settime, ClockId};
use serde::Serialize;
use zeroize::Zeroizing;

use crate::guard::{self, Appliance, GuardError};
use crate::mounts;

/// Where the kernel's sysctls live.
pub const PROC_SYS: &str = "/proc/sys";
/// The kernel's urandom device: writes mix into the pool without crediting entropy.
pub const URANDOM: &str = "/dev/urandom";
/// The seed's file name inside the state directory.
pub const SEED_FILE: &str = "random-seed";
/// 4096 bits: more than the pool ever needs, small enough to read in one go.
pub const SEED_SIZE: usize = 512;
/// The only zone names `/etc/localtime` and `/etc/timezone` may carry.
const UTC_NAMES: [&str; 2] = ["UTC", "Etc/UTC"];
/// The TZ string a UTC zone file ends with (the TZif footer).
const UTC_FOOTER: &str = "UTC0";

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error(transparent)]
    Refused(#[from] GuardError),
    #[error("mkdir {path}: {source}")]
    Mkdir { path: PathBuf, source: std::io::Error },
    #[error("chmod {path}: {source}")]
    Chmod { path: PathBuf, source: std::io::Error },
    #[error("read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("mount {fstype} on {target}: {source}")]
    Mount { fstype: &'static str, target: &'static str, source: nix::Error },
    #[error("statvfs {path}: {source}")]
    Statvfs { path: &'static str, source: nix::Error },
    #[error("remount {target} nosuid,nodev: {source}")]
    Remount { target: &'static str, source: nix::Error },
    #[error("sysctl {key}: {source}")]
    SysctlWrite { key: &'static str, source: std::io::Error },
    #[error("sysctl {key}: wrote {wanted}, reads back {got}")]
    SysctlMismatch { key: &'static str, wanted: &'static str, got: String },
    #[error("hostname {0:?}: expected 1 to 63 of a-z, 0-9 and inner -")]
    BadHostname(String),
    #[error("sethostname {name}: {source}")]
    Hostname { name: String, source: nix::Error },
    #[error("{path}: zone {zone}, not UTC")]
    NotUtc { path: PathBuf, zone: String },
    #[error("clock_gettime(CLOCK_REALTIME): {0}")]
    ClockRead(nix::Error),
    #[error("clock_settime(CLOCK_REALTIME): {0}")]
    ClockSet(nix::Error),
    #[error("mix seed into {path}: {source}")]
    SeedMix { path: PathBuf, source: std::io::Error },
    #[error("getrandom for a new seed: {0}")]
    SeedRandom(getrandom::Error),
    #[error("read fresh seed from {path}: {source}")]
    SeedRead { path: PathBuf, source: std::io::Error },
    #[error("write seed {path}: {source}")]
    SeedWrite { path: PathBuf, source: std::io::Error },
}

// ---------------------------------------------------------------------------------------------
// The step recorder.

/// One finished step, as the control socket's `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepRecord {
    pub name: String,
    pub ok: bool,
    pub ms: u64,
}

/// Runs named steps, prints `step <name>: ok (<ms> ms)` or `step <name>: failed: <error>`
/// (stage 1's format) and keeps a record of each.
pub struct Steps<'a> {
    say: Box<dyn Fn(&str) + 'a>,
    records: Vec<StepRecord>,
}

impl<'a> Steps<'a> {
    /// `say` writes one line (stage 2 passes `|l| consoles.line(l)`).
    pub fn new(say: impl Fn(&str) + 'a) -> Self {
        Steps { say: Box::new(say), records: Vec::new() }
    }

    pub fn run<T, E: Display>(&mut self, name: &str, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let start = Instant::now();
        let result = f();
        let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        match &result {
            Ok(_) => self.say(&format!("step {name}: ok ({ms} ms)")),
            Err(e) => self.say(&format!("step {name}: failed: {e}")),
        }
        self.records.push(StepRecord { name: name.to_owned(), ok: result.is_ok(), ms });
        result
    }

    pub fn say(&self, line: &str) {
        (self.say)(line)
    }

    pub fn records(&self) -> &[StepRecord] {
        &self.records
    }
}

/// The step that stopped the machine steps, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepFailed {
    pub step: &'static str,
    pub error: String,
}

impl Display for StepFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step, self.error)
    }
}

/// A step whose failure stops the boot before any service starts.
fn must<T, E: Display>(
    steps: &mut Steps,
    step: &'static str,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, StepFailed> {
    steps.run(step, f).map_err(|e| StepFailed { step, error: e.to_string() })
}

/// Every machine step of stage 2 in order: `appliance` (the guard), `mount-runtime`,
/// `sysctls`, `hostname`, then `utc`, `clock` and `random-seed`. The first four fail closed (the
/// caller must hold the services, as for the firewall); the last three only log, since a wrong
/// zone, an early clock or a missing seed weaken the appliance less than not booting.
pub fn machine_steps(
    steps: &mut Steps,
    hostname: &str,
    build_time_unix: u64,
    state_dir: &Path,
) -> Result<(), StepFailed> {
    let token = must(steps, "appliance", || guard::check("machine steps"))?;
    let runtime = must(steps, "mount-runtime", || mount_runtime(token))?;
    steps.say(&format!("cloister: {runtime}"));
    let sysctls = must(steps, "sysctls", || harden_sysctls(token))?;
    steps.say(&format!("cloister: sysctls: {sysctls}"));
    must(steps, "hostname", || set_hostname(token, hostname))?;
    let _ = steps.run("utc", || check_utc(Path::new("/")));
    if let Ok(moved) = steps.run("clock", || clock_floor(token, build_time_unix)) {
        steps.say(&clock_line(moved, build_time_unix));
    }
    if let Ok(seed) = steps.run("random-seed", || restore_seed(token, state_dir)) {
        steps.say(&format!("cloister: random seed: {seed}"));
    }
    Ok(())
}

fn clock_line(moved: Option<Duration>, build_time_unix: u64) -> String {
    match moved {
        Some(d) => {
            format!("cloister: clock was {} s before the build time; set to {build_time_unix}", d.as_secs())
        }
        None => "cloister: clock is not before the build time".to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Runtime mounts.

struct RuntimeMount {
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: &'static str,
}

/// Mounted unless something is already mounted there. Nothing here needs exec or device nodes
/// except the pty filesystem (device nodes by nature); gid 5 is Debian's fixed `tty` group.
fn runtime_mounts() -> [RuntimeMount; 3] {
    let nsd = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    [
        RuntimeMount { target: "/tmp", fstype: "tmpfs", flags: nsd | MsFlags::MS_NOEXEC, data: "mode=1777" },
        RuntimeMount {
            target: "/dev/shm",
            fstype: "tmpfs",
            flags: nsd | MsFlags::MS_NOEXEC,
            data: "mode=1777",
        },
        RuntimeMount {
            target: "/dev/pts",
            fstype: "devpts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: "newinstance,ptmxmode=0666,mode=0620,gid=5",
        },
    ]
}

/// What [`mount_runtime`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RuntimeMounts {
    pub mounted: Vec<&'static str>,
    pub already: Vec<&'static str>,
    pub run_remounted: bool,
}

impl Display for RuntimeMounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[&str]| if v.is_empty() { "none".to_owned() } else { v.join(" ") };
        write!(f, "mounted {}; already mounted {}", list(&self.mounted), list(&self.already))?;
        if self.run_remounted {
            write!(f, "; /run remounted nosuid,nodev")?;
        }
        write!(f, "; {} is 0700", cloister_plan::RUN_DIR)
    }
}

/// Mounts /tmp, /dev/shm and /dev/pts where nothing is mounted yet, makes sure /run (moved in
/// by stage 1) is nosuid,nodev and creates PID 1's own run directory, mode 0700.
pub fn mount_runtime(_: Appliance) -> Result<RuntimeMounts, SystemError> {
    let info = std::fs::read_to_string(mounts::MOUNTINFO)
        .map_err(|source| SystemError::Read { path: mounts::MOUNTINFO.into(), source })?;
    let present = mounts::mount_points(&info);
    let mut done = RuntimeMounts::default();
    for m in runtime_mounts() {
        if present.iter().any(|p| p == Path::new(m.target)) {
            done.already.push(m.target);
            continue;
        }
        make_dir(Path::new(m.target), 0o755)?;
        mount(Some(m.fstype), m.target, Some(m.fstype), m.flags, Some(m.data))
            .map_err(|source| SystemError::Mount { fstype: m.fstype, target: m.target, source })?;
        done.mounted.push(m.target);
    }
    done.run_remounted = harden_run()?;
    private_dir(Path::new(cloister_plan::RUN_DIR))?;
    Ok(done)
}

/// Remounts /run nosuid,nodev unless it already is; true if it had to.
fn harden_run() -> Result<bool, SystemError> {
    let path = "/run";
    let flags = statvfs(path).map_err(|source| SystemError::Statvfs { path, source })?.flags();
    if flags.contains(FsFlags::ST_NOSUID | FsFlags::ST_NODEV) {
        return Ok(false);
    }
    let flags = MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(None::<&str>, path, None::<&str>, flags, None::<&str>)
        .map_err(|source| SystemError::Remount { target: path, source })?;
    Ok(true)
}

fn make_dir(path: &Path, mode: u32) -> Result<(), SystemError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|source| SystemError::Mkdir { path: path.to_owned(), source })
}

/// Creates `path` mode 0700, or brings an existing directory back to 0700.
fn private_dir(path: &Path) -> Result<(), SystemError> {
    make_dir(path, 0o700)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .map_err(|source| SystemError::Chmod { path: path.to_owned(), source })
}

// ---------------------------------------------------------------------------------------------
// Sysctls.

/// Hardening sysctls, in the order they are written. Keys a kernel lacks (a module not loaded,
/// an older kernel, a Debian-only knob) are skipped. Several are one-way until reboot
/// (`kexec_load_disabled`, `unprivileged_bpf_disabled=1`): set them once, at boot.
pub const HARDENING: &[(&str, &str)] = &[
    // Kernel pointers and the kernel log say where the kernel is in memory.
    ("kernel.kptr_restrict", "2"),
    ("kernel.dmesg_restrict", "1"),
    // Only CAP_SYS_PTRACE may attach: services cannot inspect each other even under one uid.
    ("kernel.yama.ptrace_scope", "2"),
    ("fs.protected_symlinks", "1"),
    ("fs.protected_hardlinks", "1"),
    ("fs.protected_fifos", "2"),
    ("fs.protected_regular", "2"),
    // No core dumps of set-uid or capability-raised processes.
    ("fs.suid_dumpable", "0"),
    ("kernel.unprivileged_bpf_disabled", "1"),
    ("net.core.bpf_jit_harden", "2"),
    ("kernel.kexec_load_disabled", "1"),
    ("kernel.sysrq", "0"),
    ("kernel.perf_event_paranoid", "3"),
    ("dev.tty.ldisc_autoload", "0"),
    // Debian's switch for unprivileged user namespaces; our sandbox makes namespaces as root.
    ("kernel.unprivileged_userns_clone", "0"),
    // New network namespaces (the `chat` one) start from these ipv4/ipv6 conf values rather than
    // the kernel defaults.
    ("net.core.devconf_inherit_init_net", "1"),
    ("net.ipv4.conf.all.rp_filter", "1"),
    ("net.ipv4.conf.default.rp_filter", "1"),
    ("net.ipv4.conf.all.accept_redirects", "0"),
    ("net.ipv4.conf.default.accept_redirects", "0"),
    ("net.ipv4.conf.all.send_redirects", "0"),
    ("net.ipv4.conf.default.send_redirects", "0"),
    ("net.ipv4.conf.all.accept_source_route", "0"),
    ("net.ipv4.conf.default.accept_source_route", "0"),
    // TCP timestamps reveal the uptime.
    ("net.ipv4.tcp_timestamps", "0"),
    ("net.ipv4.icmp_echo_ignore_all", "1"),
    ("net.ipv6.conf.all.disable_ipv6", "1"),
    ("net.ipv6.conf.default.disable_ipv6", "1"),
];

/// How a sysctl table went.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SysctlSummary {
    pub set: usize,
    /// Keys this kernel does not have.
    pub skipped: Vec<&'static str>,
}

impl Display for SysctlSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} set, {} skipped", self.set, self.skipped.len())?;
        if !self.skipped.is_empty() {
            write!(f, " (absent: {})", self.skipped.join(" "))?;
        }
        Ok(())
    }
}

/// Writes [`HARDENING`] into the running kernel.
pub fn harden_sysctls(_: Appliance) -> Result<SysctlSummary, SystemError> {
    write_sysctls(Path::new(PROC_SYS), HARDENING)
}

/// `net.ipv4.conf.all.rp_filter` -> `<proc_sys>/net/ipv4/conf/all/rp_filter`.
pub fn sysctl_path(proc_sys: &Path, key: &str) -> PathBuf {
    key.split('.').fold(proc_sys.to_path_buf(), |p, part| p.join(part))
}

/// Writes each key that exists under `proc_sys` and reads it back. Goes through the whole table
/// even after a failure (as much hardening as possible), then returns the first failure.
pub fn write_sysctls(
    proc_sys: &Path,
    table: &[(&'static str, &'static str)],
) -> Result<SysctlSummary, SystemError> {
    let mut summary = SysctlSummary::default();
    let mut first_error = None;
    for &(key, value) in table {
        match write_sysctl(&sysctl_path(proc_sys, key), key, value) {
            Ok(true) => summary.set += 1,
            Ok(false) => summary.skipped.push(key),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(summary),
    }
}

/// False if the key does not exist. Never creates a file.
fn write_sysctl(path: &Path, key: &'static str, value: &'static str) -> Result<bool, SystemError> {
    let write = |source| SystemError::SysctlWrite { key, source };
    let mut file = match OpenOptions::new().write(true).truncate(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(write(e)),
    };
    file.write_all(format!("{value}\n").as_bytes()).map_err(write)?;
    drop(file);
    // A knob may accept a write and keep its old value (yama's ptrace_scope never goes down).
    let got = std::fs::read_to_string(path).map_err(write)?;
    if got.trim() != value {
        return Err(SystemError::SysctlMismatch { key, wanted: value, got: got.trim().to_owned() });
    }
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// Hostname.

/// 1 to 63 characters of `a-z`, `0-9` and `-`, not starting or ending with `-`.
pub fn check_hostname(name: &str) -> Result<(), SystemError> {
    let ok_chars = name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if (1..=63).contains(&name.len()) && ok_chars && !name.starts_with('-') && !name.ends_with('-') {
        Ok(())
    } else {
        Err(SystemError::BadHostname(name.to_owned()))
    }
}

/// Sets the UTS hostname and resets the NIS domain name to the kernel's `(none)`, so nothing
/// but the generic name from the plan is ever visible.
pub fn set_hostname(_: Appliance, name: &str) -> Result<(), SystemError> {
    check_hostname(name)?;
    nix::unistd::sethostname(name)
        .map_err(|source| SystemError::Hostname { name: name.to_owned(), source })?;
    // nix has no setdomainname; the sysctl file is the same call.
    write_sysctl(&sysctl_path(Path::new(PROC_SYS), "kernel.domainname"), "kernel.domainname", "(none)")
        .map(drop)
}

// ---------------------------------------------------------------------------------------------
// UTC.

/// Fails if `<root>/etc/localtime` exists and is not UTC (a link to another zone, or a zone
/// file whose TZ footer is not `UTC0`), or `<root>/etc/timezone` names another zone. The kernel
/// keeps UTC and services get a clean environment, so these files are the only way in.
pub fn check_utc(root: &Path) -> Result<(), SystemError> {
    let localtime = root.join("etc/localtime");
    if let Some(zone) = localtime_zone(&localtime)? {
        if !UTC_NAMES.contains(&zone.as_str()) && zone != UTC_FOOTER {
            return Err(SystemError::NotUtc { path: localtime, zone });
        }
    }
    let timezone = root.join("etc/timezone");
    match std::fs::read_to_string(&timezone) {
        Ok(text) if text.trim().is_empty() || UTC_NAMES.contains(&text.trim()) => Ok(()),
        Ok(text) => Err(SystemError::NotUtc { path: timezone, zone: text.trim().to_owned() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SystemError::Read { path: timezone, source }),
    }
}

/// The zone `/etc/localtime` names: a link's name below `zoneinfo/`, or a zone file's TZ footer.
fn localtime_zone(path: &Path) -> Result<Option<String>, SystemError> {
    let read = |source| SystemError::Read { path: path.to_owned(), source };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read(e)),
    };
    if meta.is_symlink() {
        let target = std::fs::read_link(path).map_err(read)?.to_string_lossy().into_owned();
        let zone = target.split_once("zoneinfo/").map_or(target.as_str(), |(_, z)| z);
        return Ok(Some(zone.to_owned()));
    }
    let bytes = std::fs::read(path).map_err(read)?;
    Ok(Some(tzif_footer(&bytes).unwrap_or("no TZ footer").to_owned()))
}

/// The POSIX TZ string at the end of a version 2+ TZif file (`UTC0` for UTC).
pub fn tzif_footer(bytes: &[u8]) -> Option<&str> {
    if !bytes.starts_with(b"TZif") || bytes.get(4).is_none_or(|v| *v < b'2') {
        return None;
    }
    let body = bytes.strip_suffix(b"\n")?;
    let start = body.iter().rposition(|b| *b == b'\n')? + 1;
    std::str::from_utf8(&body[start..]).ok()
}

// ---------------------------------------------------------------------------------------------
// Clock.

/// How far the clock must move forward to reach `floor`, if it is behind.
pub fn clock_adjustment(now: Duration, floor: Duration) -> Option<Duration> {
    floor.checked_sub(now).filter(|d| !d.is_zero())
}

/// Moves CLOCK_REALTIME forward to the build time if it is earlier (no RTC, a flat CMOS
/// battery): certificates and Tor consensus checks need a plausible date. Returns the jump.
pub fn clock_floor(_: Appliance, build_time_unix: u64) -> Result<Option<Duration>, SystemError> {
    let now = crate::clock::realtime().map_err(SystemError::ClockRead)?;
    let floor = Duration::from_secs(build_time_unix);
    let Some(jump) = clock_adjustment(now, floor) else { return Ok(None) };
    clock_settime(ClockId::CLOCK_REALTIME, floor.into()).map_err(SystemError::ClockSet)?;
    Ok(Some(jump))
}

// ---------------------------------------------------------------------------------------------
// Random seed.

/// What [`restore_seed`] did.
#[derive(Debug, PartialEq, Eq)]
pub struct SeedOutcome {
    /// Bytes of the old seed mixed into the pool; None if there was no seed (first boot).
    pub mixed: Option<usize>,
    /// Bytes of the new seed now on disk.
    pub saved: usize,
}

impl Display for SeedOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.mixed {
            Some(n) => write!(f, "mixed {n} bytes (not credited)")?,
            None => write!(f, "none saved yet")?,
        }
        write!(f, "; replaced with {} fresh bytes", self.saved)
    }
}

/// Mixes the saved seed into the kernel's pool and replaces it at once.
pub fn restore_seed(_: Appliance, state_dir: &Path) -> Result<SeedOutcome, SystemError> {
    restore_seed_into(state_dir, Path::new(URANDOM))
}

/// [`restore_seed`] with the pool's device as a parameter, so tests can use a plain file.
///
/// The seed is written to urandom, which mixes it into the pool WITHOUT crediting entropy (no
/// RNDADDENTROPY ioctl). Crediting would be safe only if the same seed could never be credited
/// twice, and a copied disk, a restored backup or a crash before the replacement below would
/// break that. Uncredited, a reused seed costs nothing: it adds what it has and the kernel
/// still waits for real entropy before calling itself ready.
pub fn restore_seed_into(state_dir: &Path, urandom: &Path) -> Result<SeedOutcome, SystemError> {
    let seed = seed_path(state_dir);
    let old = read_seed(&seed)?;
    let mixed = match &old {
        Some(bytes) => {
            let mix = |source| SystemError::SeedMix { path: urandom.to_owned(), source };
            OpenOptions::new().write(true).open(urandom).map_err(mix)?.write_all(bytes).map_err(mix)?;
            Some(bytes.len())
        }
        None => None,
    };
    // Replace before anything else can fail or crash: the old seed must never be read again.
    // /dev/urandom never blocks (Linux >= 5.18) and already holds the old seed, so its output is
    // at least as unpredictable as that seed; getrandom(2) would wait here for the pool to
    // initialise, 1.5 s under TCG. The shutdown save uses getrandom: by then it is ready.
    let mut fresh = Zeroizing::new(vec![0u8; SEED_SIZE]);
    let urandom_in = Path::new(URANDOM);
    File::open(urandom_in)
        .and_then(|mut f| f.read_exact(&mut fresh))
        .map_err(|source| SystemError::SeedRead { path: urandom_in.to_owned(), source })?;
    // No fsync here: it costs over a second through dm-crypt under TCG, and if the machine dies
    // before writeback the old seed is only mixed in again, never credited, so nothing is lost.
    let saved = replace_seed(state_dir, &fresh, Durability::Lazy)?;
    Ok(SeedOutcome { mixed, saved })
}

/// Replaces the seed with [`SEED_SIZE`] fresh bytes from getrandom(2): write a temporary file
/// (mode 0600), fsync it, rename it over the seed, fsync the directory. At shutdown too, so
/// the next boot starts from everything the pool gathered in this one.
pub fn save_seed(state_dir: &Path) -> Result<usize, SystemError> {
    let mut fresh = Zeroizing::new(vec![0u8; SEED_SIZE]);
    getrandom::fill(&mut fresh).map_err(SystemError::SeedRandom)?;
    replace_seed(state_dir, &fresh, Durability::Synced)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// On disk before returning (shutdown).
    Synced,
    /// Left to the kernel's writeback (boot).
    Lazy,
}

/// Writes `fresh` as the new seed: temporary file (0600), rename over the seed; with
/// `Synced`, the file and the directory are fsynced too.
fn replace_seed(state_dir: &Path, fresh: &[u8], durability: Durability) -> Result<usize, SystemError> {
    make_dir(state_dir, 0o755)?;
    let seed = seed_path(state_dir);
    let tmp = state_dir.join(format!(".{SEED_FILE}.new"));
    let write = |path: &Path| {
        let path = path.to_owned();
        move |source| SystemError::SeedWrite { path, source }
    };
    // A leftover from a crash may have any mode; start from nothing.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(write(&tmp)(e)),
        _ => {}
    }
    let mut file =
        OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(write(&tmp))?;
    file.write_all(fresh).map_err(write(&tmp))?;
    if durability == Durability::Synced {
        file.sync_all().map_err(write(&tmp))?;
    }
    drop(file);
    std::fs::rename(&tmp, &seed).map_err(write(&seed))?;
    if durability == Durability::Synced {
        File::open(state_dir).and_then(|d| d.sync_all()).map_err(write(state_dir))?;
    }
    Ok(fresh.len())
}

pub fn seed_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SEED_FILE)
}

/// Up to [`SEED_SIZE`] bytes of the saved seed; None if there is none (or it is empty).
fn read_seed(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>, SystemError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(SystemError::Read { path: path.to_owned(), source }),
    };
    let mut bytes = Zeroizing::new(Vec::with_capacity(SEED_SIZE));
    file.take(SEED_SIZE as u64)
        .read_to_end(&mut bytes)
        .map_err(|source| SystemError::Read { path: path.to_owned(), source })?;
    Ok(if bytes.is_empty() { None } else { Some(bytes) })
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn steps_are_timed_logged_and_recorded() {
        let lines = RefCell::new(Vec::new());
        let mut steps = Steps::new(|l: &str| lines.borrow_mut().push(l.to_owned()));
        let v = steps.run("first", || {
            std::thread::sleep(Duration::from_millis(30));
            Ok::<_, String>(7)
        });
        let e = steps.run("second", || Err::<(), _>("no disk".to_owned()));
        assert_eq!((v, e), (Ok(7), Err("no disk".to_owned())));
        let records = steps.records().to_vec();
        assert_eq!((records[0].name.as_str(), records[0].ok), ("first", true));
        assert!(records[0].ms >= 30, "{records:?}");
        assert_eq!((records[1].name.as_str(), records[1].ok), ("second", false));
        let json = serde_json::to_string(&records[1]).unwrap();
        assert!(json.starts_with(r#"{"name":"second","ok":false,"ms":"#), "{json}");
        drop(steps);
        let lines = lines.into_inner();
        assert_eq!(lines[0], format!("step first: ok ({} ms)", records[0].ms));
        assert_eq!(lines[1], "step second: failed: no disk");
    }

    /// The guard holds: from a test (not PID 1, no appliance flag) the machine steps stop at the
    /// guard and nothing on this host changes; no other step even runs.
    #[test]
    fn machine_steps_are_refused_on_the_host() {
        let read = |p: &str| std::fs::read_to_string(p).unwrap();
        let before = (read("/proc/sys/kernel/hostname"), read("/proc/sys/kernel/kptr_restrict"));
        let state = tempfile::tempdir().unwrap();
        let lines = RefCell::new(Vec::new());
        let mut steps = Steps::new(|l: &str| lines.borrow_mut().push(l.to_owned()));
        let failed = machine_steps(&mut steps, "cloister", u64::MAX / 4, state.path()).unwrap_err();
        assert_eq!(failed.step, "appliance");
        assert!(failed.error.starts_with("refusing machine steps: not pid 1"), "{failed}");
        let records: Vec<_> = steps.records().iter().map(|r| (r.name.clone(), r.ok)).collect();
        assert_eq!(records, [("appliance".to_owned(), false)]);
        drop(steps);
        assert_eq!(lines.into_inner().len(), 1);
        assert!(matches!(guard::check("sysctls"), Err(GuardError::NotPid1 { .. })));
        assert_eq!(before, (read("/proc/sys/kernel/hostname"), read("/proc/sys/kernel/kptr_restrict")));
        assert!(!seed_path(state.path()).exists());
    }

    /// A fake /proc/sys holding `keys`, each reading `0`.
    fn fake_proc_sys(keys: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for key in keys {
            let path = sysctl_path(dir.path(), key);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "0\n").unwrap();
        }
        dir
    }

    #[test]
    fn sysctls_are_written_and_missing_keys_skipped() {
        let present: Vec<&str> =
            HARDENING.iter().map(|(k, _)| *k).filter(|k| !k.starts_with("kernel.yama")).collect();
        let dir = fake_proc_sys(&present);
        let summary = write_sysctls(dir.path(), HARDENING).unwrap();
        assert_eq!(
            summary,
            SysctlSummary { set: HARDENING.len() - 1, skipped: vec!["kernel.yama.ptrace_scope"] }
        );
        assert_eq!(
            summary.to_string(),
            format!("{} set, 1 skipped (absent: kernel.yama.ptrace_scope)", summary.set)
        );
        let read = |k| std::fs::read_to_string(sysctl_path(dir.path(), k)).unwrap();
        assert_eq!(read("kernel.kptr_restrict"), "2\n");
        assert_eq!(read("net.ipv4.conf.default.rp_filter"), "1\n");
        assert_eq!(read("net.ipv6.conf.all.disable_ipv6"), "1\n");
        assert!(!sysctl_path(dir.path(), "kernel.yama.ptrace_scope").exists(), "a skipped key is created");
    }

    #[test]
    fn a_failed_sysctl_names_its_key_and_the_rest_still_apply() {
        let dir = fake_proc_sys(&["kernel.sysrq", "fs.protected_fifos"]);
        // A directory where the file should be: the write fails as a real one would.
        std::fs::create_dir_all(sysctl_path(dir.path(), "kernel.dmesg_restrict")).unwrap();
        let table = [("kernel.dmesg_restrict", "1"), ("kernel.sysrq", "0"), ("fs.protected_fifos", "2")];
        let err = write_sysctls(dir.path(), &table).unwrap_err();
        assert!(matches!(err, SystemError::SysctlWrite { key: "kernel.dmesg_restrict", .. }), "{err}");
        assert!(err.to_string().starts_with("sysctl kernel.dmesg_restrict: "), "{err}");
        let fifos = std::fs::read_to_string(sysctl_path(dir.path(), "fs.protected_fifos")).unwrap();
        assert_eq!(fifos, "2\n");
    }

    #[test]
    fn hostnames_are_checked() {
        for good in ["cloister", "a", "chat-1", &"x".repeat(63)] {
            assert!(check_hostname(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "Cloister", "a.b", "a b", &"x".repeat(64)] {
            assert!(matches!(check_hostname(bad), Err(SystemError::BadHostname(_))), "{bad}");
        }
    }

    fn root_with(localtime: Option<&[u8]>, timezone: Option<&str>) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        if let Some(bytes) = localtime {
            std::fs::write(root.path().join("etc/localtime"), bytes).unwrap();
        }
        if let Some(text) = timezone {
            std::fs::write(root.path().join("etc/timezone"), text).unwrap();
        }
        root
    }

    #[test]
    fn utc_check_accepts_utc_and_nothing() {
        let utc_file: &[u8] = b"TZif2\0\0\0 header and data \0\nUTC0\n";
        for root in [root_with(None, None), root_with(Some(utc_file), Some("Etc/UTC\n"))] {
            check_utc(root.path()).unwrap();
        }
        let linked = root_with(None, Some("UTC"));
        std::os::unix::fs::symlink("/usr/share/zoneinfo/Etc/UTC", linked.path().join("etc/localtime"))
            .unwrap();
        check_utc(linked.path()).unwrap();
        // The host's own UTC zone file, if tzdata is installed, passes too.
        if let Ok(real) = std::fs::read("/usr/share/zoneinfo/Etc/UTC") {
            assert_eq!(tzif_footer(&real), Some("UTC0"));
        }
    }

    #[test]
    fn utc_check_rejects_other_zones() {
        let paris: &[u8] = b"TZif2\0\0\0 data \0\nCET-1CEST,M3.5.0,M10.5.0/3\n";
        let err = check_utc(root_with(Some(paris), None).path()).unwrap_err();
        assert!(
            err.to_string().ends_with("etc/localtime: zone CET-1CEST,M3.5.0,M10.5.0/3, not UTC"),
            "{err}"
        );
        let err = check_utc(root_with(None, Some("Europe/Berlin\n")).path()).unwrap_err();
        assert!(err.to_string().ends_with("etc/timezone: zone Europe/Berlin, not UTC"), "{err}");
        let linked = root_with(None, None);
        std::os::unix::fs::symlink(
            "../usr/share/zoneinfo/America/New_York",
            linked.path().join("etc/localtime"),
        )
        .unwrap();
        let err = check_utc(linked.path()).unwrap_err();
        assert!(err.to_string().ends_with("zone America/New_York, not UTC"), "{err}");
        let v1 = check_utc(root_with(Some(b"TZif\0\0\0\0"), None).path()).unwrap_err();
        assert!(v1.to_string().ends_with("zone no TZ footer, not UTC"), "{v1}");
    }

    #[test]
    fn clock_moves_only_forward_to_the_floor() {
        let s = Duration::from_secs;
        assert_eq!(clock_adjustment(s(100), s(1_700_000_000)), Some(s(1_699_999_900)));
        assert_eq!(clock_adjustment(s(1_700_000_001), s(1_700_000_000)), None);
        assert_eq!(clock_adjustment(s(1_700_000_000), s(1_700_000_000)), None);
        assert_eq!(clock_line(Some(s(5)), 9), "cloister: clock was 5 s before the build time; set to 9");
    }

    #[test]
    fn seed_is_mixed_then_replaced() {
        let state = tempfile::tempdir().unwrap();
        let pool = state.path().join("fake-urandom");
        std::fs::write(&pool, b"").unwrap();
        // First boot: nothing to mix, a seed appears.
        let first = restore_seed_into(state.path(), &pool).unwrap();
        assert_eq!(first, SeedOutcome { mixed: None, saved: SEED_SIZE });
        assert!(std::fs::read(&pool).unwrap().is_empty());
        let seed = seed_path(state.path());
        let saved = std::fs::read(&seed).unwrap();
        assert_eq!(saved.len(), SEED_SIZE);
        assert_eq!(std::fs::metadata(&seed).unwrap().mode() & 0o7777, 0o600);
        // Next boot: the saved seed goes to the pool and is never left on disk.
        let second = restore_seed_into(state.path(), &pool).unwrap();
        assert_eq!(second.to_string(), "mixed 512 bytes (not credited); replaced with 512 fresh bytes");
        assert_eq!(std::fs::read(&pool).unwrap(), saved);
        let next = std::fs::read(&seed).unwrap();
        assert_eq!(next.len(), SEED_SIZE);
        assert_ne!(next, saved);
        let names: Vec<_> =
            std::fs::read_dir(state.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "a temporary file was left: {names:?}");
    }

    #[test]
    fn save_seed_fixes_a_loose_mode_and_a_stale_temp_file() {
        let state = tempfile::tempdir().unwrap();
        let seed = seed_path(state.path());
        std::fs::write(&seed, b"short").unwrap();
        std::fs::set_permissions(&seed, std::fs::Permissions::from_mode(0o644)).unwrap();
        let stale = state.path().join(format!(".{SEED_FILE}.new"));
        std::fs::write(&stale, b"stale").unwrap();
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(save_seed(state.path()).unwrap(), SEED_SIZE);
        assert_eq!(std::fs::metadata(&seed).unwrap().mode() & 0o7777, 0o600);
        assert_eq!(std::fs::read(&seed).unwrap().len(), SEED_SIZE);
        assert!(!stale.exists());
    }

    #[test]
    fn a_short_seed_is_mixed_as_is_and_an_unwritable_pool_is_an_error() {
        let state = tempfile::tempdir().unwrap();
        std::fs::write(seed_path(state.path()), b"0123456789").unwrap();
        let pool = state.path().join("fake-urandom");
        std::fs::write(&pool, b"").unwrap();
        let outcome = restore_seed_into(state.path(), &pool).unwrap();
        assert_eq!(outcome.mixed, Some(10));
        assert_eq!(std::fs::read(&pool).unwrap(), b"0123456789");
        let err = restore_seed_into(state.path(), &state.path().join("no/such/pool")).unwrap_err();
        assert!(matches!(err, SystemError::SeedMix { .. }), "{err}");
    }
}
