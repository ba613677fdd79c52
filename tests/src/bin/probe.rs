//! `probe`: the test service the supervisor's host-integration tests run inside its sandbox. Each
//! mode does one observable thing (reports what it sees, listens, crashes, leaves an orphan, logs
//! SIGTERM, ignores SIGTERM, asks the control socket) and prints one hello line to stdout first, so
//! the supervisor's `<name>: <line>` capture can be checked. Every mode ends by itself after
//! [`LIFETIME`], so a broken supervisor cannot leave a probe running for ever.
//!
//! Usage: `probe <mode> <args>... [--tag <text>]`. The tag is ignored: tests put their scratch
//! directory there so that they can find every process they started in `/proc/*/cmdline`.
//! The service's name for log lines comes from `PROBE_NAME` (default `probe`).
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::resource::{getrlimit, Resource};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use serde_json::{json, Value};

/// No probe outlives this, whatever the supervisor does.
const LIFETIME: Duration = Duration::from_secs(600);

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--tag") {
        args.drain(i..(i + 2).min(args.len()));
    }
    let Some(mode) = args.first().cloned() else {
        eprintln!("usage: probe <report|listen|crash|orphan|term|stubborn|control> <args>...");
        return ExitCode::from(2);
    };
    match run(&mode, &args[1..]) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("probe {mode}: {e}");
            ExitCode::from(2)
        }
    }
}

type Res<T> = Result<T, String>;

fn run(mode: &str, args: &[String]) -> Res<u8> {
    // Modes that handle signals set their mask before anything else, so that every thread
    // inherits it and the hello line means "ready for SIGTERM".
    if matches!(mode, "term" | "stubborn") {
        block(&[Signal::SIGTERM])?;
    }
    if !mode.starts_with("orphan-") {
        println!("probe {mode} hello (pid {})", std::process::id());
    }
    // A hard deadline for every mode, whatever the main thread is blocked in.
    std::thread::spawn(|| {
        std::thread::sleep(LIFETIME);
        std::process::exit(0);
    });
    let arg = |i: usize| args.get(i).map(String::as_str).ok_or_else(|| format!("{mode}: missing argument"));
    match mode {
        "report" => report(Path::new(arg(0)?), args.iter().any(|a| a == "--exit")),
        "listen" => listen(arg(0)?, option(args, "--after-ms")?.unwrap_or(0), flag_value(args, "--log")),
        "crash" => {
            let code: u8 = arg(0)?.parse().map_err(|e| format!("crash code: {e}"))?;
            eprintln!("probe crash {code}");
            Ok(code)
        }
        "orphan" => orphan(arg(0)?, option(args, "--sleep-ms")?.unwrap_or(1500)),
        "orphan-middle" => orphan_middle(arg(0)?, arg(1)?),
        "orphan-sleeper" => orphan_sleeper(Path::new(arg(0)?), arg(1)?),
        "term" => term(Path::new(arg(0)?)),
        "stubborn" => linger(),
        "control" => control(Path::new(arg(0)?), &args[1..].join(" ")),
        other => Err(format!("unknown mode {other}")),
    }
}

fn flag_value(args: &[String], flag: &str) -> Option<PathBuf> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).map(PathBuf::from)
}

fn option(args: &[String], flag: &str) -> Res<Option<u64>> {
    flag_value(args, flag)
        .map(|v| v.to_string_lossy().parse().map_err(|e| format!("{flag}: {e}")))
        .transpose()
}

fn name() -> String {
    std::env::var("PROBE_NAME").unwrap_or_else(|_| "probe".into())
}

fn unix_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// Appends one whole line (one write, O_APPEND) so that several services can share a log.
fn log(path: &Path, what: &str) -> Res<()> {
    let line = format!("{} {what} {}\n", name(), unix_ms());
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn block(signals: &[Signal]) -> Res<()> {
    let mut set = SigSet::empty();
    signals.iter().for_each(|s| set.add(*s));
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(|e| format!("sigprocmask: {e}"))
}

fn linger() -> Res<u8> {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Writes `contents` to `path` through a rename, so a reader never sees half of it.
fn write_whole(path: &Path, contents: &str) -> Res<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, contents).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn report(out: &Path, exit: bool) -> Res<u8> {
    write_whole(out, &observe().to_string())?;
    println!("probe report written");
    if exit {
        return Ok(0);
    }
    linger()
}

/// The names in `/`, sorted.
fn root_entries() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// Everything the isolation test checks, as seen from inside the sandbox.
fn observe() -> Value {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        status.lines().find_map(|l| l.strip_prefix(k)?.strip_prefix(':')).map(|v| v.trim().to_string())
    };
    let limit = |r: Resource| getrlimit(r).map(|(s, h)| json!([s, h])).unwrap_or(Value::Null);
    let groups: Vec<u32> =
        nix::unistd::getgroups().map(|g| g.iter().map(|g| g.as_raw()).collect()).unwrap_or_default();
    json!({
        "pid": std::process::id(),
        "ppid": nix::unistd::getppid().as_raw(),
        "uid": nix::unistd::getuid().as_raw(),
        "gid": nix::unistd::getgid().as_raw(),
        "euid": nix::unistd::geteuid().as_raw(),
        "egid": nix::unistd::getegid().as_raw(),
        "groups": groups,
        "cap_eff": field("CapEff"),
        "cap_prm": field("CapPrm"),
        "cap_inh": field("CapInh"),
        "cap_bnd": field("CapBnd"),
        "cap_amb": field("CapAmb"),
        "no_new_privs": field("NoNewPrivs"),
        "sig_blk": field("SigBlk"),
        "sig_ign": field("SigIgn"),
        "root_write_errno": root_write_errno(),
        "root_entries": root_entries(),
        "true_ran": std::process::Command::new("/usr/bin/true").status().is_ok_and(|s| s.success()),
        "sh_exists": Path::new("/bin/sh").exists(),
        "interfaces": interfaces(),
        "hostname": nix::unistd::gethostname().ok().map(|h| h.to_string_lossy().into_owned()),
        "env": std::env::vars_os()
            .map(|(k, v)| json!([k.to_string_lossy(), v.to_string_lossy()]))
            .collect::<Vec<_>>(),
        "cwd": std::env::current_dir().ok().map(|p| p.display().to_string()),
        "pids": visible_pids(),
        "rlimit_nofile": limit(Resource::RLIMIT_NOFILE),
        "rlimit_core": limit(Resource::RLIMIT_CORE),
        "rlimit_nproc": limit(Resource::RLIMIT_NPROC),
    })
}

/// `None` when a file could be created in `/` (and it is removed again).
fn root_write_errno() -> Option<i32> {
    let path = Path::new("/probe-write-test");
    match std::fs::OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(_) => {
            let _ = std::fs::remove_file(path);
            None
        }
        Err(e) => Some(e.raw_os_error().unwrap_or(-1)),
    }
}

fn interfaces() -> Vec<String> {
    let dev = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    dev.lines().skip(2).filter_map(|l| l.split_once(':')).map(|(name, _)| name.trim().to_string()).collect()
}

fn visible_pids() -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    pids.sort_unstable();
    pids
}

fn listen(addr: &str, after_ms: u64, log_file: Option<PathBuf>) -> Res<u8> {
    std::thread::sleep(Duration::from_millis(after_ms));
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    if let Some(path) = log_file {
        log(&path, "listening")?;
    }
    println!("probe listening on {addr}");
    for conn in listener.incoming() {
        drop(conn);
    }
    Ok(0)
}

/// Double fork without `fork`: this process runs a middle child that starts the sleeper and
/// exits at once, so the sleeper is reparented to the init of the service's pid namespace.
fn orphan(pidfile: &str, sleep_ms: u64) -> Res<u8> {
    let me = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let tag: Vec<String> = std::env::args().skip_while(|a| a != "--tag").collect();
    let status = Command::new(&me)
        .args(["orphan-middle", pidfile, &sleep_ms.to_string()])
        .args(&tag)
        .status()
        .map_err(|e| format!("{}: {e}", me.display()))?;
    println!("probe orphan middle exited ({status})");
    linger()
}

fn orphan_middle(pidfile: &str, sleep_ms: &str) -> Res<u8> {
    let me = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let tag: Vec<String> = std::env::args().skip_while(|a| a != "--tag").collect();
    // Deliberately not waited for: that is what makes it an orphan.
    Command::new(&me)
        .args(["orphan-sleeper", pidfile, sleep_ms])
        .args(&tag)
        .spawn()
        .map_err(|e| format!("{}: {e}", me.display()))?;
    Ok(0)
}

fn orphan_sleeper(pidfile: &Path, sleep_ms: &str) -> Res<u8> {
    let ms: u64 = sleep_ms.parse().map_err(|e| format!("sleep ms: {e}"))?;
    write_whole(pidfile, &std::process::id().to_string())?;
    std::thread::sleep(Duration::from_millis(ms));
    Ok(0)
}

/// SIGTERM is blocked (see [`run`]) and taken here synchronously: no handler, no unsafe.
fn term(log_file: &Path) -> Res<u8> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    let sig = set.wait().map_err(|e| format!("sigwait: {e}"))?;
    log(log_file, "stopping")?;
    println!("probe got {sig}, stopping");
    std::thread::sleep(Duration::from_millis(200));
    Ok(0)
}

fn control(socket: &Path, request: &str) -> Res<u8> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("connect {}: {e}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| format!("timeout: {e}"))?;
    stream.write_all(format!("{request}\n").as_bytes()).map_err(|e| format!("send: {e}"))?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| format!("receive: {e}"))?;
    println!("{}", response.trim_end());
    Ok(0)
}
