//! Host integration tests of the PID 1 supervisor: `cloister-init --supervise` runs as PID 1 of a
//! fresh pid and mount namespace (`unshare`) with `probe` services, and the tests judge it by its
//! console lines, the files the probes write, its control socket and `/proc` seen from the host.
//! Each test starts the supervisor in its own process group under a parent-death signal and ends
//! by checking that no process it started is left. They need root and `CLOISTER_INIT_BIN`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cloister_plan::{Mounts, Namespaces, Plan, Readiness, Restart, Rlimits, Service};
use cloister_proto::service_event;
use cloister_tests::Host;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_probe");
const NOBODY: u32 = 65534;
const HOSTNAME: &str = "cloister-test";
/// No wait in these tests lasts longer.
const BOUND: Duration = Duration::from_secs(30);
/// Scheduling noise allowed on lower bounds of measured delays.
const SLACK: Duration = Duration::from_millis(50);
const CAP_NET_BIND_SERVICE: u64 = 1 << 10;

// ---------------------------------------------------------------------------------------------
// Harness

/// One test's directory (below the target directory, not /tmp: services get an empty /tmp) and
/// the plan's building blocks. The directory's path is the tag every process of the test carries.
struct Scratch {
    dir: tempfile::TempDir,
    init: PathBuf,
}

impl Scratch {
    fn new(host: Host) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("sup-").tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
        // Services run as nobody and write their logs, reports and pid files here.
        std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY))?;
        Ok(Self { dir, init: host.init })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn tag(&self) -> String {
        self.path().display().to_string()
    }

    fn file(&self, name: &str) -> String {
        self.path().join(name).display().to_string()
    }

    fn control_socket(&self) -> PathBuf {
        self.path().join("run").join(cloister_plan::CONTROL_SOCKET)
    }

    /// A probe service as nobody in the `chat` netns with every namespace, no capabilities and
    /// fast restarts; tests change what they are about.
    fn service(&self, name: &str, args: &[&str]) -> Service {
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.extend(["--tag".into(), self.tag()]);
        let probe_dir = Path::new(PROBE).parent().map(Path::to_path_buf).unwrap_or_default();
        Service {
            name: name.into(),
            exec: PROBE.into(),
            args,
            uid: NOBODY,
            gid: NOBODY,
            groups: vec![],
            env: vec![("PATH".into(), "/usr/bin:/bin".into()), ("PROBE_NAME".into(), name.into())],
            workdir: "/".into(),
            namespaces: Namespaces::default(),
            mounts: Mounts {
                writable: vec![self.path().into()],
                tmpfs: vec![],
                read_only: vec![probe_dir],
                ..Mounts::default()
            },
            caps_bounding: vec![],
            caps_ambient: vec![],
            no_new_privs: true,
            rlimits: Rlimits::default(),
            after: vec![],
            ready: Readiness::Started,
            restart: Restart {
                initial_delay_ms: 100,
                max_delay_ms: 1000,
                max_exits: 5,
                window_ms: 60_000,
                stable_ms: 30_000,
                ready_timeout_ms: 10_000,
                stop_grace_ms: 1000,
            },
            terminal: None,
        }
    }

    fn start(&self, services: Vec<Service>) -> Result<Supervisor> {
        let plan = Plan {
            hostname: HOSTNAME.into(),
            build_time_unix: 1_700_000_000,
            admin_uids: vec![],
            services,
            firewall: Default::default(),
            network: Default::default(),
            chat: None,
        };
        Supervisor::start(self, &plan)
    }
}

#[derive(Clone, Debug)]
struct Line {
    at: Instant,
    text: String,
}

#[derive(Default)]
struct Console {
    lines: Vec<Line>,
    /// Streams (stdout, stderr) that reached end of file.
    closed: usize,
}

type Shared = Arc<(Mutex<Console>, Condvar)>;

/// The supervisor as PID 1 of its own namespaces, its stdout and stderr read line by line.
struct Supervisor {
    child: Option<Child>,
    console: Shared,
    tag: String,
    control: PathBuf,
}

impl Supervisor {
    fn start(scratch: &Scratch, plan: &Plan) -> Result<Self> {
        let plan_path = scratch.path().join("plan.json");
        std::fs::write(&plan_path, plan.to_json())?;
        let run_dir = scratch.path().join("run");
        std::fs::create_dir_all(&run_dir)?;
        let mut cmd = Command::new("setpriv");
        // The parent-death signal follows this thread: a test that dies takes the supervisor
        // with it. `--kill-child` hands it on to the namespace's PID 1, and the death of that
        // ends every process in the namespace, services' nested namespaces included.
        cmd.args(["--pdeathsig", "KILL", "--", "unshare", "--pid", "--fork", "--mount"])
            .args(["--propagation", "private", "--kill-child"])
            .arg(&scratch.init)
            .arg(cloister_proto::SUPERVISE_ARG)
            .arg(&plan_path)
            .arg(&run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().context("cannot run setpriv/unshare")?;
        let console: Shared = Arc::default();
        let out = child.stdout.take().context("no stdout")?;
        let err = child.stderr.take().context("no stderr")?;
        read_lines(out, console.clone());
        read_lines(err, console.clone());
        Ok(Self { child: Some(child), console, tag: scratch.tag(), control: scratch.control_socket() })
    }

    fn lines(&self) -> Vec<Line> {
        self.console.0.lock().map(|c| c.lines.clone()).unwrap_or_default()
    }

    /// The first `count` lines matching `pred`, with their index, waiting up to [`BOUND`].
    fn wait_count(
        &self,
        what: &str,
        count: usize,
        pred: impl Fn(&str) -> bool,
    ) -> Result<Vec<(usize, Line)>> {
        let deadline = Instant::now() + BOUND;
        let (lock, cvar) = &*self.console;
        let mut console = lock.lock().map_err(|_| anyhow::anyhow!("console lock poisoned"))?;
        loop {
            let found: Vec<(usize, Line)> = console
                .lines
                .iter()
                .cloned()
                .enumerate()
                .filter(|(_, l)| pred(&l.text))
                .take(count)
                .collect();
            if found.len() == count {
                return Ok(found);
            }
            let now = Instant::now();
            if now >= deadline || console.closed == 2 {
                let tail: Vec<&str> =
                    console.lines.iter().rev().take(30).rev().map(|l| l.text.as_str()).collect();
                bail!(
                    "no {what} (found {} of {count}) within {BOUND:?}; console ends:\n{}",
                    found.len(),
                    tail.join("\n")
                );
            }
            console = cvar.wait_timeout(console, deadline - now).map_err(|_| anyhow::anyhow!("poisoned"))?.0;
        }
    }

    fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> Result<(usize, Line)> {
        Ok(self.wait_count(what, 1, pred)?.remove(0))
    }

    /// Waits for `cloister: service <name> <event>...`.
    fn event(&self, name: &str, event: &str) -> Result<(usize, Line)> {
        self.wait_line(&format!("`{name} {event}`"), |l| is_event(l, name, event))
    }

    /// The `<name> <event>` lines so far, without waiting.
    fn events(&self, name: &str, event: &str) -> Vec<(usize, Line)> {
        self.lines().into_iter().enumerate().filter(|(_, l)| is_event(&l.text, name, event)).collect()
    }

    fn leader(&self) -> Result<i32> {
        Ok(self.child.as_ref().context("supervisor already gone")?.id() as i32)
    }

    /// The supervisor's host pid: the one child of `unshare`.
    fn pid(&self) -> Result<i32> {
        let leader = self.leader()?;
        let deadline = Instant::now() + BOUND;
        loop {
            if let Some(pid) = all_pids().into_iter().find(|p| ppid(*p) == Some(leader)) {
                return Ok(pid);
            }
            ensure!(Instant::now() < deadline, "unshare ({leader}) has no child");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        let child = self.child.as_mut().context("supervisor already gone")?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            ensure!(Instant::now() < deadline, "the supervisor did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until both output streams are closed, so that every line is in.
    fn wait_closed(&self) -> Result<()> {
        let deadline = Instant::now() + BOUND;
        while self.console.0.lock().map(|c| c.closed).unwrap_or(2) < 2 {
            ensure!(Instant::now() < deadline, "supervisor output still open");
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn control(&self, request: &str) -> Result<Value> {
        let text = request_raw(&self.control, format!("{request}\n").as_bytes())?;
        serde_json::from_str(text.trim()).with_context(|| format!("`{request}` answered non-JSON {text:?}"))
    }

    /// Kills the whole group and checks that no process of the test is left.
    fn finish(mut self) -> Result<()> {
        self.kill();
        wait_gone(&self.tag, Duration::from_secs(10))
    }

    /// Leaves the supervisor running for a test of what happens when its starter dies.
    fn abandon(mut self) -> Result<i32> {
        let leader = self.leader()?;
        std::mem::forget(self.child.take());
        Ok(leader)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.kill();
        // Shown by the test runner only when the test fails.
        eprintln!("--- supervisor console ---");
        for line in self.lines() {
            eprintln!("{}", line.text);
        }
    }
}

fn read_lines(stream: impl Read + Send + 'static, console: Shared) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(text) = line else { break };
            if let Ok(mut c) = console.0.lock() {
                c.lines.push(Line { at: Instant::now(), text });
            }
            console.1.notify_all();
        }
        if let Ok(mut c) = console.0.lock() {
            c.closed += 1;
        }
        console.1.notify_all();
    });
}

fn is_event(line: &str, name: &str, event: &str) -> bool {
    service_event::parse(line).is_some_and(|(n, rest)| n == name && rest.starts_with(event))
}

/// The first number after `marker` in `line`: `started (pid 7)` -> 7 with marker `(pid `.
fn number_after(line: &str, marker: &str) -> Result<u64> {
    let rest =
        &line[line.find(marker).with_context(|| format!("no {marker:?} in {line:?}"))? + marker.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().with_context(|| format!("no number after {marker:?} in {line:?}"))
}

/// Sends raw bytes to the control socket and returns what comes back before it closes. A
/// reset counts as a close (the supervisor may refuse a request unread); silence does not.
fn request_raw(socket: &Path, bytes: &[u8]) -> Result<String> {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, TimedOut, WouldBlock};
    let mut stream =
        UnixStream::connect(socket).with_context(|| format!("cannot connect to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    match stream.write_all(bytes) {
        Err(e) if matches!(e.kind(), BrokenPipe | ConnectionReset) => {}
        other => other.context("cannot send the request")?,
    }
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Err(e) if matches!(e.kind(), WouldBlock | TimedOut) => bail!("no answer within 10 s"),
        Err(e) if e.kind() != ConnectionReset => return Err(e).context("cannot read the answer"),
        _ => {}
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

fn ppid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; the fields after its last ')' do not.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

fn status_field(pid: i32, key: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| Some(l.strip_prefix(key)?.strip_prefix(':')?.trim().to_string()))
}

/// The pid of `pid` in its innermost pid namespace.
fn inner_pid(pid: i32) -> Option<i32> {
    status_field(pid, "NSpid")?.split_whitespace().last()?.parse().ok()
}

/// Processes whose command line contains `tag` (with their command line).
fn tagged(tag: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|p| *p != me)
        .filter_map(|p| {
            let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(tag).then_some((p, cmdline))
        })
        .collect()
}

fn wait_gone(tag: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let left = tagged(tag);
        if left.is_empty() {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "processes left {within:?} after the test ended: {left:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_file(path: &str) -> Result<String> {
    let deadline = Instant::now() + BOUND;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return Ok(text);
        }
        ensure!(Instant::now() < deadline, "{path} did not appear within {BOUND:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `<name> <what> <unix ms>` lines of a probe log.
fn log_entries(path: &str) -> Result<Vec<(String, String, u128)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            ensure!(f.len() == 3, "bad log line {l:?}");
            Ok((f[0].to_string(), f[1].to_string(), f[2].parse()?))
        })
        .collect()
}

fn hex_field(report: &Value, key: &str) -> Result<u64> {
    let text = report[key].as_str().with_context(|| format!("no {key} in {report}"))?;
    Ok(u64::from_str_radix(text, 16)?)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn a_service_starts_only_after_those_it_names_are_ready() -> Result<()> {
    let Some(host) = Host::from_env("supervisor-order") else { return Ok(()) };
    let s = Scratch::new(host)?;
    let log = s.file("order.log");
    let mut a = s.service("a", &["listen", "127.0.0.1:7001", "--after-ms", "500", "--log", &log]);
    a.ready = Readiness::Tcp("127.0.0.1:7001".parse()?);
    let mut b = s.service("b", &["listen", "127.0.0.1:7002", "--log", &log]);
    b.after = vec!["a".into()];
    b.ready = Readiness::Tcp("127.0.0.1:7002".parse()?);
    let sup = s.start(vec![a, b])?;

    sup.event("b", "ready")?;
    let (a_started, a_start) = sup.event("a", "started")?;
    let (a_ready, a_ready_line) = sup.event("a", "ready")?;
    let (b_started, b_start) = sup.event("b", "started")?;
    ensure!(a_started < a_ready && a_ready < b_started, "b started before a was ready");
    let waited = b_start.at - a_start.at;
    ensure!(waited + SLACK >= Duration::from_millis(500), "b started {waited:?} after a, before a listened");
    let a_ms = number_after(&a_ready_line.text, "(")?;
    ensure!(a_ms >= 500, "a reported ready after {a_ms} ms but listens only after 500 ms");
    sup.wait_line("a's captured hello", |l| l.starts_with("a: probe listen hello"))?;
    sup.wait_line("b's captured hello", |l| l.starts_with("b: probe listen hello"))?;

    let entries = log_entries(&log)?;
    let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    ensure!(names == ["a", "b"], "listen log order {names:?}");
    ensure!(entries[1].2 >= entries[0].2, "b listened before a: {entries:?}");
    sup.finish()
}

#[test]
fn crash_loop_backs_off_then_gives_up_while_others_run() -> Result<()> {
    let Some(host) = Host::from_env("supervisor-restart") else { return Ok(()) };
    let s = Scratch::new(host)?;
    let mut keeper = s.service("k", &["listen", "127.0.0.1:7003"]);
    keeper.ready = Readiness::Tcp("127.0.0.1:7003".parse()?);
    let mut crasher = s.service("c", &["crash", "3"]);
    crasher.restart.max_exits = 6;
    let sup = s.start(vec![keeper, crasher])?;

    sup.event("c", "failed:")?;
    let starts = sup.events("c", "started");
    let exits = sup.events("c", "exited");
    ensure!(starts.len() == 6, "{} starts of c before it was given up (max_exits 6)", starts.len());
    ensure!(exits.len() >= 5, "only {} exit lines for c", exits.len());
    for (_, exit) in &exits {
        ensure!(exit.text.contains('3'), "exit line does not show code 3: {}", exit.text);
    }
    let delays: Vec<(usize, Line, u64)> = exits
        .iter()
        .filter_map(|(i, l)| Some((*i, l.clone(), number_after(&l.text, "restart in ").ok()?)))
        .collect();
    let millis: Vec<u64> = delays.iter().map(|d| d.2).collect();
    ensure!(
        millis == [100, 200, 400, 800, 1000],
        "restart delays {millis:?}, want doubling from 100 up to 1000"
    );
    for (i, exit, ms) in &delays {
        let (_, next) =
            starts.iter().find(|(j, _)| j > i).with_context(|| format!("no start after {}", exit.text))?;
        let waited = next.at - exit.at;
        ensure!(
            waited + SLACK >= Duration::from_millis(*ms),
            "restarted after {waited:?}, announced {ms} ms"
        );
    }
    sup.wait_line("c's captured stderr", |l| l.starts_with("c: probe crash 3"))?;

    std::thread::sleep(Duration::from_millis(1500));
    ensure!(sup.events("c", "started").len() == 6, "c was started again after it was given up");
    ensure!(sup.events("k", "exited").is_empty(), "k exited during c's crash loop");
    let status = sup.control("status")?;
    let state = |name: &str| {
        status["services"]
            .as_array()
            .and_then(|v| v.iter().find(|s| s["name"] == name))
            .map(|s| s["state"].clone())
    };
    ensure!(state("k") == Some("ready".into()), "k is not ready: {status}");
    ensure!(state("c") == Some("failed".into()), "c is not failed: {status}");
    sup.finish()
}

/// The chat client's kind of view: a root holding only the listed files (the probe and its
/// libraries, `true` for a program it may see but not run) and its writable directory.
#[test]
fn a_service_with_an_only_view_sees_and_runs_nothing_else() -> Result<()> {
    let Some(host) = Host::from_env("supervisor-only-view") else { return Ok(()) };
    let s = Scratch::new(host)?;
    let out = s.file("bare.json");
    let mut bare = s.service("bare", &["report", &out]);
    let root = Path::new("/");
    let abs = |rel: &PathBuf| root.join(rel);
    let mut files: Vec<PathBuf> = vec![PROBE.into(), "/usr/bin/true".into()];
    // The launch chain's exec link (cloister-init) runs inside the view too.
    let init = PathBuf::from(std::env::var_os("CLOISTER_INIT_BIN").context("CLOISTER_INIT_BIN")?);
    for elf in [Path::new(PROBE), Path::new("/usr/bin/true"), &init] {
        files.extend(cloister_rootfs::elf::needed_closure_for_file(root, elf)?.iter().map(abs));
    }
    let loader = std::fs::canonicalize("/lib64/ld-linux-x86-64.so.2")?;
    bare.mounts.read_only.clear();
    bare.mounts.only = Some(files);
    bare.mounts.executables = vec![PROBE.into(), loader];
    let sup = s.start(vec![bare])?;
    let report: Value = serde_json::from_str(&wait_file(&out)?)?;
    drop(sup);
    eprintln!("only-view report: {report}");
    ensure!(report["sh_exists"] == false, "/bin/sh is visible: {report}");
    let top = PROBE.trim_start_matches('/').split('/').next().unwrap_or("");
    for name in report["root_entries"].as_array().context("root_entries")? {
        let name = name.as_str().unwrap_or("");
        let expected = ["dev", "proc", "usr", "lib", "lib64", "bin", top].contains(&name);
        ensure!(expected, "unexpected /{name} in the view: {}", report["root_entries"]);
    }
    // EROFS: the view's own tmpfs is read-only once built.
    ensure!(report["root_write_errno"] == 30, "writing / gave errno {}", report["root_write_errno"]);
    if landlock_available() {
        ensure!(report["true_ran"] == false, "a program outside `executables` ran");
    } else {
        eprintln!("this kernel has no landlock: only the view keeps programs out");
    }
    Ok(())
}

/// Whether this kernel enforces landlock: a ruleset restricts only the thread that applies it,
/// so a short-lived thread tries one and takes it with it.
fn landlock_available() -> bool {
    use landlock::{Access, AccessFs, Ruleset, RulesetAttr, RulesetStatus, ABI};
    std::thread::spawn(|| {
        let status = Ruleset::default()
            .handle_access(AccessFs::from_all(ABI::V1))
            .and_then(|r| r.create())
            .and_then(|r| r.restrict_self());
        status.is_ok_and(|s| s.ruleset != RulesetStatus::NotEnforced)
    })
    .join()
    .unwrap_or(false)
}

#[test]
fn a_service_sees_only_its_sandbox() -> Result<()> {
    let Some(host) = Host::from_env("supervisor-isolation") else { return Ok(()) };
    let s = Scratch::new(host)?;
    let (iso_out, capped_out) = (s.file("iso.json"), s.file("capped.json"));
    let mut iso = s.service("iso", &["report", &iso_out]);
    iso.env.push(("LANG".into(), "C.UTF-8".into()));
    iso.workdir = s.path().into();
    iso.rlimits = Rlimits { nproc: Some(512), nofile: Some(256), address_space: None, core: Some(0) };
    let caps = vec!["CAP_NET_BIND_SERVICE".to_string()];
    let mut capped = s.service("capped", &["report", &capped_out]);
    (capped.caps_bounding, capped.caps_ambient) = (caps.clone(), caps.clone());
    // The capability must work, not just show: a privileged port, as nobody.
    let mut binder = s.service("binder", &["listen", "127.0.0.1:80"]);
    (binder.caps_bounding, binder.caps_ambient) = (caps.clone(), caps);
    binder.ready = Readiness::Tcp("127.0.0.1:80".parse()?);
    // The probe's own Rust runtime ignores SIGPIPE, so a C program shows what a service inherits.
    let mut sigs = s.service("sigs", &[]);
    sigs.exec = "/bin/grep".into();
    sigs.args = vec!["^Sig".into(), "/proc/self/status".into()];
    let env = iso.env.clone();
    let sup = s.start(vec![iso, capped, binder, sigs])?;

    let report: Value = serde_json::from_str(&wait_file(&iso_out)?)?;
    eprintln!("iso report: {report}");
    ensure!(report["pid"] == 2 && report["ppid"] == 1, "not pid 2 under the namespace's init: {report}");
    ensure!(report["pids"] == serde_json::json!([1, 2]), "other processes visible: {}", report["pids"]);
    for key in ["uid", "gid", "euid", "egid"] {
        ensure!(report[key] == NOBODY, "{key} is {}", report[key]);
    }
    ensure!(report["groups"] == serde_json::json!([]), "supplementary groups {}", report["groups"]);
    for key in ["cap_eff", "cap_prm", "cap_inh", "cap_amb", "cap_bnd"] {
        ensure!(hex_field(&report, key)? == 0, "{key} is {}", report[key]);
    }
    ensure!(report["no_new_privs"] == "1", "NoNewPrivs {}", report["no_new_privs"]);
    // A service starts with default signal handling: nothing blocked (else SIGTERM never comes)
    // and no standard signal ignored (PID 1's runtime ignores SIGPIPE; exec keeps that).
    ensure!(hex_field(&report, "sig_blk")? == 0, "signals blocked: SigBlk {}", report["sig_blk"]);
    let (_, ignored) = sup.wait_line("grep's SigIgn line", |l| l.starts_with("sigs: SigIgn:"))?;
    let ignored = ignored.text;
    let mask = u64::from_str_radix(ignored.rsplit('\t').next().unwrap_or("").trim(), 16)?;
    ensure!(mask & 0x7fff_ffff == 0, "standard signals ignored in a service: {ignored:?}");
    ensure!(
        report["root_write_errno"] == 30,
        "creating a file in / gave errno {} (want EROFS)",
        report["root_write_errno"]
    );
    ensure!(report["interfaces"] == serde_json::json!(["lo"]), "interfaces {}", report["interfaces"]);
    ensure!(report["hostname"] == HOSTNAME, "hostname {}", report["hostname"]);
    let want_env: Vec<Value> = env.iter().map(|(k, v)| serde_json::json!([k, v])).collect();
    ensure!(report["env"] == Value::Array(want_env), "environment {}", report["env"]);
    ensure!(report["cwd"] == s.tag(), "cwd {}", report["cwd"]);
    ensure!(report["rlimit_core"] == serde_json::json!([0, 0]), "RLIMIT_CORE {}", report["rlimit_core"]);
    ensure!(
        report["rlimit_nofile"] == serde_json::json!([256, 256]),
        "RLIMIT_NOFILE {}",
        report["rlimit_nofile"]
    );
    ensure!(
        report["rlimit_nproc"] == serde_json::json!([512, 512]),
        "RLIMIT_NPROC {}",
        report["rlimit_nproc"]
    );

    let capped: Value = serde_json::from_str(&wait_file(&capped_out)?)?;
    eprintln!("capped report: {capped}");
    ensure!(capped["uid"] == NOBODY, "capped runs as uid {}", capped["uid"]);
    for key in ["cap_eff", "cap_prm", "cap_amb", "cap_bnd"] {
        ensure!(hex_field(&capped, key)? == CAP_NET_BIND_SERVICE, "capped {key} is {}", capped[key]);
    }
    ensure!(capped["no_new_privs"] == "1", "capped NoNewPrivs {}", capped["no_new_privs"]);
    sup.event("binder", "ready")?;
    sup.finish()
}

#[test]
fn double_forked_orphans_are_reaped() -> Result<()> {
    let Some(host) = Host::from_env("supervisor-orphans") else { return Ok(()) };
    let s = Scratch::new(host)?;
    let pidfile = s.file("orphan.pid");
    let sup = s.start(vec![s.service("o", &["orphan", &pidfile, "--sleep-ms", "2000"])])?;

    let inner: i32 = wait_file(&pidfile)?.trim().parse()?;
    ensure!(inner > 2, "the orphan has pid {inner} in the service's namespace");
    let (host_pid, cmdline) = tagged(&s.tag())
        .into_iter()
        .find(|(p, c)| c.contains("orphan-sleeper") && inner_pid(*p) == Some(inner))
        .context("the orphan is not visible from the host")?;
    eprintln!("orphan: host pid {host_pid}: {cmdline}");
    let parent = ppid(host_pid).context("orphan vanished before its sleep ended")?;
    ensure!(inner_pid(parent) == Some(1), "the orphan's parent {parent} is not the namespace's init");

    // Its sleep ends after 2 s; then nothing may be left of it, not even a zombie.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Some(state) = status_field(host_pid, "State") {
        ensure!(Instant::now() < deadline, "orphan {host_pid} still there 10 s later, state {state}");
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(sup.events("o", "exited").is_empty(), "the orphan's parent service exited");
    sup.finish()
}

#[test]
fn sigterm_stops_services_in_reverse_order_and_kills_the_stubborn() -> Result<()> {
    let Some(host) = Host::from_env("supervisor-sigterm") else { return Ok(()) };
    let s = Scratch::new(host)?;
    let log = s.file("stop.log");
    let stubborn = s.service("s", &["stubborn"]);
    // Leaves SIGTERM to its default action, as most daemons' main loops effectively do.
    let plain = s.service("p", &["listen", "127.0.0.1:7009"]);
    let a = s.service("a", &["term", &log]);
    let mut b = s.service("b", &["term", &log]);
    b.after = vec!["a".into()];
    let mut c = s.service("c", &["term", &log]);
    c.after = vec!["b".into()];
    let grace = Duration::from_millis(stubborn.restart.stop_grace_ms);
    let mut sup = s.start(vec![stubborn, plain, a, b, c])?;
    for name in ["s", "p", "a", "b", "c"] {
        // The hello line comes after the probe set up its signal mask.
        sup.wait_line(&format!("{name}'s hello"), |l| l.starts_with(&format!("{name}: probe ")))?;
    }

    let t0 = Instant::now();
    kill(Pid::from_raw(sup.pid()?), Signal::SIGTERM)?;
    let status = sup.wait_exit(grace + Duration::from_secs(2))?;
    let took = t0.elapsed();
    ensure!(status.success(), "the supervisor ended with {status} after SIGTERM");
    sup.wait_closed()?;

    let stopped: Vec<(usize, Line)> = ["c", "b", "a", "p", "s"]
        .iter()
        .map(|n| {
            sup.events(n, "stopped").into_iter().next().with_context(|| format!("no `{n} stopped` line"))
        })
        .collect::<Result<_>>()?;
    ensure!(stopped.windows(2).all(|w| w[0].0 < w[1].0), "stopped lines out of order c, b, a, p, s");
    for (_, line) in &stopped[..3] {
        ensure!(
            !line.text.to_lowercase().contains("kill"),
            "a service that obeys SIGTERM was killed: {}",
            line.text
        );
    }
    let plain = stopped[3].1.text.to_lowercase();
    ensure!(
        plain.contains("signal 15") || plain.contains("sigterm"),
        "the plain service did not end by SIGTERM: {plain}"
    );
    let last = &stopped[4].1;
    let how = last.text.to_lowercase();
    ensure!(
        how.contains("sigkill") || how.contains("signal 9"),
        "the stubborn service was not SIGKILLed: {}",
        last.text
    );
    ensure!(
        last.at - t0 + SLACK >= grace,
        "the stubborn service was killed before its grace ({:?})",
        last.at - t0
    );

    let entries = log_entries(&log)?;
    let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    ensure!(names == ["c", "b", "a"], "services logged stopping in order {names:?}");
    // Each takes 200 ms to stop; the next is only asked once the previous one is gone.
    ensure!(entries.windows(2).all(|w| w[1].2 >= w[0].2 + 150), "stops overlapped: {entries:?}");
    eprintln!("shutdown took {took:?}");
    sup.finish()
}

#[test]
fn control_socket_answers_admins_refuses_others_and_survives_garbage() -> Result<()> {
    let Some(host) = Host::from_env("supervisor-control") else { return Ok(()) };
    let s = Scratch::new(host)?;
    let mut a = s.service("a", &["listen", "127.0.0.1:7001"]);
    a.ready = Readiness::Tcp("127.0.0.1:7001".parse()?);
    let sup = s.start(vec![a])?;
    let (_, started) = sup.event("a", "started")?;
    sup.event("a", "ready")?;
    let first_pid = number_after(&started.text, "(pid ")?;

    let status = sup.control("status")?;
    ensure!(status["ok"] == true && status["uptime_ms"].is_u64(), "status: {status}");
    let services = status["services"].as_array().context("no services in status")?;
    ensure!(services.len() == 1 && services[0]["name"] == "a", "services: {status}");
    ensure!(services[0]["state"] == "ready" && services[0]["pid"] == first_pid, "a in status: {status}");

    let log = sup.control("log")?;
    let journal = log["lines"].as_array().context("no lines in the log answer")?;
    ensure!(
        journal.iter().any(|l| l == "a: probe listening on 127.0.0.1:7001"),
        "a's output not in the log: {log}"
    );

    let answer = sup.control("restart a")?;
    ensure!(answer["ok"] == true, "restart a: {answer}");
    let (_, again) = sup.wait_count("a second `a started`", 2, |l| is_event(l, "a", "started"))?.remove(1);
    let second_pid = number_after(&again.text, "(pid ")?;
    ensure!(second_pid != first_pid, "restart kept pid {first_pid}");
    sup.wait_count("a second `a ready`", 2, |l| is_event(l, "a", "ready"))?;

    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "--", PROBE, "control"])
        .arg(s.control_socket())
        .args(["status", "--tag", &s.tag()])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "control as nobody: {text}{}", String::from_utf8_lossy(&out.stderr));
    let answer: Value = serde_json::from_str(text.lines().last().unwrap_or_default())?;
    ensure!(answer["ok"] == false && answer["error"] == "permission denied", "nobody got {answer}");
    sup.wait_line("the refusal on the console", |l| l.contains("cloister: control: refused uid 65534"))?;

    // A client that connects and says nothing must not block everyone else.
    let idle = UnixStream::connect(s.control_socket())?;
    for bad in ["bogus\n", "restart\n", "restart nosuch\n", "status extra words\n"] {
        let answer = sup.control(bad.trim_end())?;
        ensure!(answer["ok"] == false, "{bad:?} answered {answer}");
    }
    let _ = request_raw(&s.control_socket(), b"\xff\xfe\0\x01garbage\n");
    let mut long = vec![b'x'; 100 * 1024];
    long.push(b'\n');
    match request_raw(&s.control_socket(), &long) {
        Err(e) if e.to_string().contains("no answer") => {
            bail!("a 100 KiB line got no answer nor close: {e:#}")
        }
        _ => {}
    }
    {
        let mut half = UnixStream::connect(s.control_socket())?;
        half.write_all(b"sta")?;
    }
    let status = sup.control("status")?;
    ensure!(status["ok"] == true, "status after garbage: {status}");
    ensure!(status["services"][0]["pid"] == second_pid, "a changed after garbage: {status}");
    drop(idle);
    sup.finish()
}

#[test]
fn poweroff_request_stops_everything_and_leaves_the_host_alone() -> Result<()> {
    let Some(host) = Host::from_env("supervisor-poweroff") else { return Ok(()) };
    let s = Scratch::new(host)?;
    let log = s.file("stop.log");
    let svc = s.service("a", &["term", &log]);
    let grace = Duration::from_millis(svc.restart.stop_grace_ms);
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    let mut sup = s.start(vec![svc])?;
    sup.event("a", "ready")?;
    sup.wait_line("a's hello", |l| l.starts_with("a: probe term hello"))?;

    // Safe even if the guard failed: reboot(2) in a child pid namespace only ends its init.
    let answer = sup.control("poweroff")?;
    ensure!(answer["ok"] == true, "poweroff: {answer}");
    let status = sup.wait_exit(grace + Duration::from_secs(2))?;
    ensure!(status.success(), "the supervisor ended with {status} after poweroff");
    sup.wait_closed()?;
    ensure!(!sup.events("a", "stopped").is_empty(), "a was not stopped");
    ensure!(log_entries(&log)?.len() == 1, "a did not get SIGTERM");
    let shutdown = cloister_proto::marker::SHUTDOWN;
    ensure!(sup.lines().iter().any(|l| l.text.starts_with(shutdown)), "no `{shutdown}` line");
    let after = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    ensure!(after == hostname, "the host's hostname changed from {hostname:?} to {after:?}");
    sup.finish()
}

#[test]
fn nothing_outlives_the_thread_that_started_it() -> Result<()> {
    let Some(host) = Host::from_env("supervisor-cleanup") else { return Ok(()) };
    let s = Scratch::new(host)?;
    let pidfile = s.file("orphan.pid");
    let services = vec![
        s.service("o", &["orphan", &pidfile, "--sleep-ms", "60000"]),
        s.service("t", &["term", &s.file("stop.log")]),
        s.service("s", &["stubborn"]),
    ];
    // The thread that starts the supervisor ends without stopping it, as a crashed test would.
    let leader = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<i32> {
                let sup = s.start(services)?;
                for name in ["o", "t", "s"] {
                    sup.event(name, "started")?;
                }
                wait_file(&pidfile)?;
                let running = tagged(&s.tag());
                for mode in ["orphan-sleeper", "stubborn", "term"] {
                    ensure!(
                        running.iter().any(|(_, c)| c.contains(mode)),
                        "no {mode} probe running: {running:#?}"
                    );
                }
                sup.abandon()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("starter thread panicked"))?
    })?;
    wait_gone(&s.tag(), Duration::from_secs(10))?;
    match waitpid(Pid::from_raw(leader), None)? {
        WaitStatus::Signaled(_, Signal::SIGKILL, _) => Ok(()),
        other => bail!("the supervisor's leader ended with {other:?}, not by the parent-death signal"),
    }
}
