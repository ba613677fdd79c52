//! The launch chain that puts one service into its own namespaces, without `unsafe` and without
//! doing anything risky inside PID 1. PID 1 only spawns `cloister-init --launch`; each link is
//! a fresh process of this same binary:
//!
//! 1. **launch** (outside): unshares mount/pid/ipc/uts, makes mount events private, joins the
//!    named network namespace, spawns the ns-init, forwards SIGTERM/SIGINT, exits as it does.
//! 2. **ns-init** (PID 1 of the new pid namespace): builds the service's root view and pivots
//!    into it, sets the hostname, spawns the exec link, reports readiness to PID 1 on a pipe,
//!    reaps orphans, forwards signals; when the service exits it exits too, and the kernel kills
//!    whatever is left in the namespace.
//! 3. **exec**: rlimits, capability bounding set, groups/gid/uid, ambient capabilities,
//!    `no_new_privs`, clean environment, working directory, then `execve` of the service.
//!
//! A failing step prints `<link> <service>: <step>: <error>` on stderr (which PID 1 logs as the
//! service's output) and exits 127.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use caps::{CapSet, Capability, CapsHashSet};
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{Gid, Pid, Uid};
use serde::{Deserialize, Serialize};

use cloister_plan::{Readiness, Service};

pub const LAUNCH_ARG: &str = "--launch";
pub const NS_INIT_ARG: &str = "--ns-init";
pub const EXEC_ARG: &str = "--exec";

/// What ns-init writes on the status pipe: one line.
pub const STATUS_READY: &str = "ready";
pub const STATUS_NOT_READY: &str = "not-ready";

/// Everything a link needs, passed as one JSON argument from link to link.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Launch {
    pub service: Service,
    /// The pinned network namespace to join; `None` stays in the launcher's.
    pub netns: Option<PathBuf>,
    /// An empty directory (on a tmpfs PID 1 owns) where ns-init assembles the root view.
    pub new_root: PathBuf,
    pub hostname: String,
    /// Inherited write end of the status pipe to PID 1.
    pub status_fd: RawFd,
    /// Runs on a user's terminal (the chat client): stdin is passed down the chain, SIGWINCH
    /// is forwarded like SIGTERM, and the program starts in a session of its own.
    #[serde(default)]
    pub terminal: bool,
}

impl Launch {
    /// The description PID 1 hands the launcher; the status pipe's number is filled in when
    /// the pipe exists.
    pub fn new(
        svc: &Service,
        netns: Option<PathBuf>,
        new_root: &Path,
        hostname: &str,
        terminal: bool,
    ) -> Self {
        Launch {
            service: svc.clone(),
            netns,
            new_root: new_root.to_path_buf(),
            hostname: hostname.to_string(),
            status_fd: -1,
            terminal,
        }
    }
}

/// Signals each link passes on to the next.
fn forwarded(launch: &Launch) -> &'static [Signal] {
    if launch.terminal {
        &[Signal::SIGTERM, Signal::SIGINT, Signal::SIGWINCH]
    } else {
        &[Signal::SIGTERM, Signal::SIGINT]
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{step}: {detail}")]
pub struct StepError {
    step: &'static str,
    detail: String,
}

fn err<E: std::fmt::Display>(step: &'static str) -> impl Fn(E) -> StepError {
    move |e| StepError { step, detail: e.to_string() }
}

/// Runs one link of the chain from its argv; never returns.
pub fn run_link(link: &str, json: Option<&str>) -> ! {
    let parsed = json
        .ok_or_else(|| StepError { step: "arguments", detail: "missing launch description".into() })
        .and_then(|j| serde_json::from_str::<Launch>(j).map_err(err("arguments")));
    let result = parsed.and_then(|launch| match link {
        LAUNCH_ARG => launch_link(&launch),
        NS_INIT_ARG => ns_init_link(&launch),
        _ => exec_link(&launch),
    });
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cloister-init {link}: {e}");
            127
        }
    };
    std::process::exit(code)
}

/// Link 1: new namespaces, then the ns-init as their first process.
fn launch_link(launch: &Launch) -> Result<i32, StepError> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(err("parent death signal"))?;
    let ns = &launch.service.namespaces;
    let mut flags = CloneFlags::empty();
    for (on, flag) in [
        (ns.mount, CloneFlags::CLONE_NEWNS),
        (ns.pid, CloneFlags::CLONE_NEWPID),
        (ns.ipc, CloneFlags::CLONE_NEWIPC),
        (ns.uts, CloneFlags::CLONE_NEWUTS),
    ] {
        if on {
            flags |= flag;
        }
    }
    unshare(flags).map_err(err("unshare"))?;
    if ns.mount {
        // Nothing the service mounts may ever show up outside, nor the other way round.
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
            .map_err(err("make mounts private"))?;
    }
    if let Some(pin) = &launch.netns {
        crate::netns::enter(pin).map_err(err("join network namespace"))?;
    }
    let signals = block_signals(forwarded(launch))?;
    let child = next_link(Path::new("/proc/self/exe"), NS_INIT_ARG, launch)?;
    supervise_child(child, &signals, forwarded(launch), None)
}

/// Link 2: PID 1 of the service's namespaces.
fn ns_init_link(launch: &Launch) -> Result<i32, StepError> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(err("parent death signal"))?;
    let svc = &launch.service;
    // Opened before the root changes: the exec link runs from this binary wherever it lives.
    let exe = File::open("/proc/self/exe").map_err(err("open own executable"))?;
    let status = owned_inherited(launch.status_fd)?;
    if svc.namespaces.mount {
        enter_root_view(svc, &launch.new_root)?;
    }
    if svc.namespaces.uts {
        nix::unistd::sethostname(&launch.hostname).map_err(err("hostname"))?;
    }
    let signals = block_signals(forwarded(launch))?;
    let exe_path = PathBuf::from(format!("/proc/self/fd/{}", exe.as_raw_fd()));
    let child = next_link(&exe_path, EXEC_ARG, launch)?;
    drop(exe);
    let readiness = ReadyWatch::new(&svc.ready, svc.restart.ready_timeout_ms, status);
    supervise_child(child, &signals, forwarded(launch), Some(readiness))
}

/// Link 3: become the service.
fn exec_link(launch: &Launch) -> Result<i32, StepError> {
    let svc = &launch.service;
    if launch.terminal {
        // No controlling terminal: the user's terminal stays the shell's, and nothing here can
        // signal the shell's process group through it.
        nix::unistd::setsid().map_err(err("setsid"))?;
    }
    set_rlimits(svc)?;
    let keep: CapsHashSet = parse_caps(&svc.caps_bounding)?;
    let ambient: CapsHashSet = parse_caps(&svc.caps_ambient)?;
    for cap in caps::all().difference(&keep) {
        caps::drop(None, CapSet::Bounding, *cap).map_err(err("drop bounding capability"))?;
    }
    if !ambient.is_empty() {
        nix::sys::prctl::set_keepcaps(true).map_err(err("keep capabilities"))?;
    }
    let gids: Vec<Gid> = svc.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    nix::unistd::setgroups(&gids).map_err(err("setgroups"))?;
    let gid = Gid::from_raw(svc.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(err("setresgid"))?;
    let uid = Uid::from_raw(svc.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(err("setresuid"))?;
    if !ambient.is_empty() {
        caps::set(None, CapSet::Inheritable, &ambient).map_err(err("inheritable capabilities"))?;
        for cap in &ambient {
            caps::raise(None, CapSet::Ambient, *cap).map_err(err("ambient capability"))?;
        }
    }
    if svc.no_new_privs {
        nix::sys::prctl::set_no_new_privs().map_err(err("no_new_privs"))?;
    }
    nix::unistd::chdir(&svc.workdir).map_err(err("working directory"))?;
    if !svc.mounts.executables.is_empty() {
        crate::landlock_rules::restrict(&svc.mounts.executables, &svc.mounts.writable)
            .map_err(err("landlock"))?;
    }
    // The launch chain blocks signals for its signalfds, and masks survive execve: the service
    // starts with none blocked and SIGPIPE at its default, like a child of any init.
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(err("unblock signals"))?;
    crate::sys::default_sigpipe().map_err(err("default SIGPIPE"))?;
    let program = cstring(svc.exec.as_os_str().as_encoded_bytes())?;
    let mut argv = vec![program.clone()];
    for a in &svc.args {
        argv.push(cstring(a.as_bytes())?);
    }
    let env: Vec<CString> =
        svc.env.iter().map(|(k, v)| cstring(format!("{k}={v}").as_bytes())).collect::<Result<_, _>>()?;
    let Err(e) = nix::unistd::execve(&program, &argv, &env);
    Err(StepError { step: "execve", detail: format!("{}: {e}", svc.exec.display()) })
}

fn cstring(bytes: &[u8]) -> Result<CString, StepError> {
    CString::new(bytes).map_err(err("argument with a NUL byte"))
}

fn parse_caps(names: &[String]) -> Result<CapsHashSet, StepError> {
    names.iter().map(|n| n.parse::<Capability>().map_err(err("capability name"))).collect()
}

fn set_rlimits(svc: &Service) -> Result<(), StepError> {
    let r = &svc.rlimits;
    for (limit, resource) in [
        (r.nproc, Resource::RLIMIT_NPROC),
        (r.nofile, Resource::RLIMIT_NOFILE),
        (r.address_space, Resource::RLIMIT_AS),
        (r.core, Resource::RLIMIT_CORE),
    ] {
        if let Some(value) = limit {
            setrlimit(resource, value, value).map_err(err("rlimit"))?;
        }
    }
    Ok(())
}

/// Takes over an inherited descriptor without `unsafe`: reopening `/proc/self/fd/<n>` gives an
/// independent, owned (close-on-exec) descriptor of the same pipe, and the number is closed.
fn owned_inherited(fd: RawFd) -> Result<File, StepError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{fd}"))
        .map_err(|e| StepError { step: "status fd", detail: format!("fd {fd}: {e}") })?;
    nix::unistd::close(fd).map_err(err("close inherited status fd"))?;
    Ok(file)
}

/// Spawns the next link with the same description, stdout and stderr inherited.
fn next_link(exe: &Path, arg: &str, launch: &Launch) -> Result<Child, StepError> {
    let json = serde_json::to_string(launch).map_err(err("describe launch"))?;
    Command::new(exe)
        .arg(arg)
        .arg(json)
        .stdin(if launch.terminal { Stdio::inherit() } else { Stdio::null() })
        .env_clear()
        .spawn()
        .map_err(err("spawn next link"))
}

/// Blocks `forwarded` and SIGCHLD and returns a signalfd for them.
fn block_signals(forwarded: &[Signal]) -> Result<SignalFd, StepError> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    for s in forwarded {
        set.add(*s);
    }
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None).map_err(err("block signals"))?;
    SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK).map_err(err("signalfd"))
}

/// Waits for `child`, forwarding the `forwarded` signals to it and reaping every other process
/// that ends up ours (orphans, in a pid namespace); returns the exit code to pass on.
fn supervise_child(
    child: Child,
    signals: &SignalFd,
    forwarded: &[Signal],
    mut readiness: Option<ReadyWatch>,
) -> Result<i32, StepError> {
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    loop {
        let timeout = if readiness.as_ref().is_some_and(|r| r.pending()) { 50u16 } else { 1000 };
        let mut fds = [PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(timeout)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(err("poll")(e)),
        }
        while let Ok(Some(info)) = signals.read_signal() {
            let signo = i32::try_from(info.ssi_signo).ok().and_then(|n| Signal::try_from(n).ok());
            if let Some(sig) = signo.filter(|s| forwarded.contains(s)) {
                let _ = kill(pid, sig);
            }
        }
        if let Some(code) = reap_until(pid) {
            return Ok(code);
        }
        if let Some(r) = readiness.as_mut() {
            r.check();
        }
    }
}

/// Reaps what has exited; the exit code once `main` is among them (128 + signal if killed).
fn reap_until(main: Pid) -> Option<i32> {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(p, code)) if p == main => return Some(code),
            Ok(WaitStatus::Signaled(p, sig, _)) if p == main => return Some(128 + sig as i32),
            Ok(WaitStatus::StillAlive) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Watches for the service's readiness from inside its namespaces and tells PID 1 once.
struct ReadyWatch {
    how: Readiness,
    deadline: Instant,
    status: Option<File>,
}

impl ReadyWatch {
    fn new(how: &Readiness, timeout_ms: u64, status: File) -> Self {
        Self {
            how: how.clone(),
            deadline: Instant::now() + Duration::from_millis(timeout_ms),
            status: Some(status),
        }
    }

    fn pending(&self) -> bool {
        self.status.is_some()
    }

    fn check(&mut self) {
        let Some(status) = self.status.as_mut() else { return };
        let verdict = if is_ready(&self.how) {
            STATUS_READY
        } else if Instant::now() >= self.deadline {
            STATUS_NOT_READY
        } else {
            return;
        };
        let _ = writeln!(status, "{verdict}");
        self.status = None;
    }
}

fn is_ready(how: &Readiness) -> bool {
    match how {
        Readiness::Started => true,
        Readiness::Tcp(addr) => {
            std::net::TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_ok()
        }
        Readiness::Unix(path) => std::os::unix::net::UnixStream::connect(path).is_ok(),
        Readiness::File(path) => path.exists(),
    }
}

/// Device nodes a service gets in its /dev, bound from the real ones.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Assembles the service's file system view at `new_root` and pivots into it: the root file
/// system read-only (one mount, without anything mounted below it), fresh /proc, a /dev with
/// the harmless nodes only, empty /tmp and /run, the listed tmpfs and binds.
fn enter_root_view(svc: &Service, new_root: &Path) -> Result<(), StepError> {
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    match &svc.mounts.only {
        None => bind(Path::new("/"), new_root, true, hardened)?,
        Some(paths) => {
            mount_fs("tmpfs", new_root, hardened, Some("mode=0755,size=1m"))?;
            for path in paths {
                mirror(new_root, path, 0)?;
            }
            for dir in ["proc", "dev"] {
                std::fs::create_dir_all(new_root.join(dir)).map_err(err("mount point"))?;
            }
        }
    }
    let at = |p: &str| new_root.join(p.trim_start_matches('/'));
    mount_fs("proc", &at("proc"), hardened | MsFlags::MS_NOEXEC, None)?;
    mount_fs("tmpfs", &at("dev"), MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("mode=0755,size=64k"))?;
    for dev in DEVICES {
        let target = at("dev").join(dev);
        File::create(&target).map_err(err("create device mount point"))?;
        bind(&Path::new("/dev").join(dev), &target, false, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC)?;
    }
    for (link, to) in [("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1")] {
        std::os::unix::fs::symlink(to, at("dev").join(link)).map_err(err("dev symlink"))?;
    }
    std::os::unix::fs::symlink("/proc/self/fd/2", at("dev").join("stderr")).map_err(err("dev symlink"))?;
    if svc.mounts.devpts {
        // A new instance: the service sees only the terminals it opened itself. gid 5 is tty.
        std::fs::create_dir(at("dev/pts")).map_err(err("mkdir /dev/pts"))?;
        // Not nodev: the terminals are device nodes on this very mount.
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
        mount_fs("devpts", &at("dev/pts"), flags, Some("newinstance,ptmxmode=0666,mode=0620,gid=5"))?;
        std::os::unix::fs::symlink("pts/ptmx", at("dev/ptmx")).map_err(err("dev symlink"))?;
    }
    let noexec = hardened | MsFlags::MS_NOEXEC;
    if svc.mounts.only.is_none() {
        mount_fs("tmpfs", &at("tmp"), noexec, Some("mode=1777,size=64m"))?;
        mount_fs("tmpfs", &at("run"), noexec, Some("mode=0755,size=16m"))?;
    }
    for path in &svc.mounts.tmpfs {
        let opts = format!("mode=0700,uid={},gid={},size=64m", svc.uid, svc.gid);
        mount_fs("tmpfs", &under(new_root, path, true)?, noexec, Some(&opts))?;
    }
    for path in &svc.mounts.writable {
        bind(path, &under(new_root, path, path.is_dir())?, false, hardened)?;
    }
    for path in &svc.mounts.read_only {
        bind(path, &under(new_root, path, path.is_dir())?, true, hardened)?;
    }
    if svc.mounts.only.is_some() {
        // Every mount point exists now: the tmpfs under them becomes read-only too.
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | hardened;
        mount(None::<&str>, new_root, None::<&str>, flags, None::<&str>)
            .map_err(err("read-only root view"))?;
    }
    pivot_into(new_root)
}

/// Makes `path` of the root file system appear at the same place under `new_root` (a tmpfs):
/// each symlink on the way is recreated as it is and followed, a directory or file at the end
/// is bound read-only, a symlink at the end is only recreated (its target is listed on its
/// own). Already present: left alone.
fn mirror(new_root: &Path, path: &Path, depth: usize) -> Result<(), StepError> {
    let fail =
        |e: std::io::Error| StepError { step: "root view", detail: format!("{}: {e}", path.display()) };
    if depth > 40 {
        return Err(fail(std::io::Error::other("too many symlinks")));
    }
    let parts: Vec<_> = path.components().filter(|c| matches!(c, std::path::Component::Normal(_))).collect();
    let mut real = PathBuf::from("/");
    for (k, part) in parts.iter().enumerate() {
        real.push(part);
        let inside = new_root.join(real.strip_prefix("/").unwrap_or(&real));
        let meta = std::fs::symlink_metadata(&real).map_err(fail)?;
        let last = k + 1 == parts.len();
        let present = std::fs::symlink_metadata(&inside).is_ok();
        if meta.is_symlink() {
            let target = std::fs::read_link(&real).map_err(fail)?;
            if !present {
                std::os::unix::fs::symlink(&target, &inside).map_err(fail)?;
            }
            if last {
                return Ok(());
            }
            let base = real.parent().unwrap_or(Path::new("/"));
            let mut rest = lexical(&base.join(target));
            rest.extend(&parts[k + 1..]);
            return mirror(new_root, &rest, depth + 1);
        }
        if !last {
            if !present {
                std::fs::create_dir(&inside).map_err(fail)?;
            }
            continue;
        }
        if present {
            return Ok(());
        }
        if meta.is_dir() {
            std::fs::create_dir(&inside).map_err(fail)?;
        } else {
            File::create(&inside).map_err(fail)?;
        }
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        bind(&real, &inside, true, flags)?;
    }
    Ok(())
}

/// `path` with `.` and `..` resolved by name (paths of the image's own layout, no symlinks).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// `path` inside the new root, made (a directory or an empty file) if it is missing and the
/// place is writable (a tmpfs).
fn under(new_root: &Path, path: &Path, dir: bool) -> Result<PathBuf, StepError> {
    let target = new_root.join(path.strip_prefix("/").unwrap_or(path));
    if !target.exists() {
        if dir {
            std::fs::create_dir_all(&target)
        } else {
            target
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| File::create(&target).map(drop))
        }
        .map_err(|e| StepError { step: "mount point", detail: format!("{}: {e}", path.display()) })?;
    }
    Ok(target)
}

fn bind(from: &Path, to: &Path, read_only: bool, flags: MsFlags) -> Result<(), StepError> {
    let name =
        |e: Errno| StepError { step: "bind", detail: format!("{} on {}: {e}", from.display(), to.display()) };
    mount(Some(from), to, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(name)?;
    let mut again = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags;
    if read_only {
        again |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, to, None::<&str>, again, None::<&str>).map_err(name)
}

fn mount_fs(fstype: &str, at: &Path, flags: MsFlags, data: Option<&str>) -> Result<(), StepError> {
    mount(Some(fstype), at, Some(fstype), flags, data)
        .map_err(|e| StepError { step: "mount", detail: format!("{fstype} on {}: {e}", at.display()) })
}

fn pivot_into(new_root: &Path) -> Result<(), StepError> {
    nix::unistd::chdir(new_root).map_err(err("chdir new root"))?;
    nix::unistd::pivot_root(".", ".").map_err(err("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(err("detach old root"))?;
    nix::unistd::chdir("/").map_err(err("chdir /"))
}
