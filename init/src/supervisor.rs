//! The service manager inside PID 1: starts the plan's services in order once their
//! dependencies are ready, captures their output, restarts them with exponential backoff, gives
//! up on crash loops while the rest keeps running, answers the control socket, and stops
//! everything in reverse order. Everything risky about a start (namespaces, mounts, privileges)
//! happens in the launch chain's own processes (`sandbox`), never here.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::signalfd::SignalFd;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde_json::json;
use zeroize::Zeroizing;

use cloister_plan::{NetNs, Plan, Service};
use cloister_proto::{marker, service_event};

use crate::accounts::{Change, ACCOUNTS_ARG};
use crate::admin_totp::{Gate as AdminTotp, TotpRequest};
use crate::control::{self, Client, Progress, Request};
use crate::disk_keys::{DiskChange, DISK_ARG};
use crate::input;
use crate::sandbox::{self, Launch};
use crate::sessions::{ChatContext, Sessions};
use crate::system::StepRecord;

/// Lines kept in memory for `log` (nothing goes to disk).
const JOURNAL_LINES: usize = 2000;
/// Longest line kept from a service; the rest of a longer one starts a new line.
const MAX_LINE: usize = 1024;
/// An account change's child is stopped after this (removing waits for processes to die,
/// hashing takes a moment, a home may be large).
const ACCOUNT_CHANGE_DEADLINE: Duration = Duration::from_secs(60);
/// A disk passphrase change checks and adds with the image's KDF, several times over.
const DISK_CHANGE_DEADLINE: Duration = Duration::from_secs(300);

/// Why the main loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    PowerOff,
    /// Destroy the disk's keys and power off at once (`kill_switch.rs`).
    KillSwitch,
    Reboot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Starting,
    Ready,
    Backoff,
    Failed,
    Stopping,
    Stopped,
    /// A direct unit that finished its work (exit 0): not restarted.
    Done,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Starting => "starting",
            State::Ready => "ready",
            State::Backoff => "backoff",
            State::Failed => "failed",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Done => "done",
        }
    }
}

struct Unit {
    svc: Service,
    /// Started by PID 1 itself (`cloister-init <args>`), not through the launch chain: work on
    /// the appliance's own disk that no sandbox could confine (the grow fill). Ready once
    /// started; exit 0 means its work is done.
    direct: bool,
    state: State,
    pid: Option<Pid>,
    log: Option<Lines>,
    status: Option<Lines>,
    started: Instant,
    restarts: u32,
    exits: VecDeque<Instant>,
    delay_ms: u64,
    due: Option<Instant>,
    restart_now: bool,
}

pub struct Supervisor<'a> {
    plan: Plan,
    run_dir: PathBuf,
    say: &'a dyn Fn(&str),
    units: Vec<Unit>,
    journal: VecDeque<String>,
    born: Instant,
    settled_said: bool,
    steps: Vec<StepRecord>,
    control: Option<UnixListener>,
    clients: Vec<Client>,
    chat_netns: PathBuf,
    /// Why the chat namespace (or its firewall) is not there: its services cannot start.
    chat_netns_failed: Option<String>,
    kmsg: Option<File>,
    network: Option<Box<dyn Fn() -> serde_json::Value + 'a>>,
    firewall: Option<Box<dyn Fn() -> serde_json::Value + 'a>>,
    grow: Option<Box<dyn Fn() -> serde_json::Value + 'a>>,
    /// The onion address, once shown on the console.
    onion: Option<String>,
    /// sshd's host key fingerprint, shown on the console after unlock.
    host_key: Option<String>,
    /// The restricted shells' session socket, when the plan has chat users.
    sessions: Option<Sessions>,
    /// Admins' second factor on the control socket.
    admin_totp: AdminTotp,
}

impl<'a> Supervisor<'a> {
    /// Prepares the run directory (control socket, the `chat` namespace, the root-view mount
    /// point). A part that fails is logged; services that need it then fail to start.
    pub fn new(plan: Plan, run_dir: &Path, say: &'a dyn Fn(&str), steps: Vec<StepRecord>) -> Self {
        let units = plan.services.iter().map(|svc| Unit::new(svc.clone())).collect();
        let mut sup = Self {
            plan,
            run_dir: run_dir.to_path_buf(),
            say,
            units,
            journal: VecDeque::new(),
            born: Instant::now(),
            settled_said: false,
            steps,
            control: None,
            clients: Vec::new(),
            chat_netns: run_dir.join("netns").join(NetNs::Chat.name()),
            chat_netns_failed: None,
            kmsg: None,
            network: None,
            firewall: None,
            grow: None,
            onion: None,
            host_key: None,
            sessions: None,
            admin_totp: AdminTotp::new(crate::totp::Store::new(cloister_plan::accounts::TOTP_DIR)),
        };
        if let Err(e) = std::fs::create_dir_all(run_dir.join("root")) {
            sup.note(&format!("cloister: {}: {e}", run_dir.join("root").display()));
        }
        let chat_netns = crate::netns::create(&sup.chat_netns).map_err(|e| e.to_string()).and_then(|()| {
            match sup.plan.chat.as_ref().and_then(|c| c.firewall.as_ref()) {
                Some(fw) => {
                    crate::firewall::apply_chat_namespace(&sup.chat_netns, fw).map_err(|e| e.to_string())
                }
                None => Ok(()),
            }
        });
        if let Err(e) = &chat_netns {
            // Fail closed: nothing runs in a chat namespace that is missing or unguarded.
            sup.note(&format!("cloister: chat network namespace: {e}; nothing will run in it"));
            sup.chat_netns_failed = Some(e.clone());
        }
        if let Some(chat) = &sup.plan.chat {
            let context = ChatContext {
                client: chat.client.clone().filter(|_| chat_netns.is_ok()),
                passwd: "/etc/passwd".into(),
                config_dir: run_dir.join("chat"),
                netns: sup.chat_netns.clone(),
                new_root: run_dir.join("root"),
                hostname: sup.plan.hostname.clone(),
                totp: Some(crate::totp::Store::new(cloister_plan::accounts::TOTP_DIR)),
                require_totp: chat.require_totp,
            };
            match Sessions::open(&run_dir.join("sessions"), chat.gid, context) {
                Ok(s) => sup.sessions = Some(s),
                Err(e) => sup.note(&format!("cloister: session socket: {e}")),
            }
        }
        let admin_gid = sup.admin_gid();
        match bind_control(&run_dir.join(cloister_plan::CONTROL_SOCKET), admin_gid) {
            Ok(l) => sup.control = Some(l),
            Err(e) => sup.note(&format!("cloister: control socket: {e}")),
        }
        sup
    }

    /// What `status` shows under "network", asked afresh on every request.
    pub fn set_network_status(&mut self, network: Box<dyn Fn() -> serde_json::Value + 'a>) {
        self.network = Some(network);
    }

    /// What `status` shows under "firewall", asked afresh (a read-back) on every request.
    pub fn set_firewall_status(&mut self, firewall: Box<dyn Fn() -> serde_json::Value + 'a>) {
        self.firewall = Some(firewall);
    }

    /// Adds a unit PID 1 starts directly (see `Unit::direct`), after the plan's services.
    pub fn add_direct(&mut self, svc: Service) {
        let mut unit = Unit::new(svc);
        unit.direct = true;
        self.units.push(unit);
    }

    /// What `status` shows under "grow", asked afresh on every request.
    pub fn set_grow_status(&mut self, grow: Box<dyn Fn() -> serde_json::Value + 'a>) {
        self.grow = Some(grow);
    }

    /// Also keep kernel messages in the journal (the appliance's own, not a host's).
    pub fn watch_kernel_log(&mut self) {
        self.kmsg = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(OFlag::O_NONBLOCK.bits())
            .open("/dev/kmsg")
            .ok();
    }

    /// Runs services until a shutdown request: SIGTERM/SIGINT/SIGPWR on `signals`, a power
    /// button press on `buttons`, or `poweroff`/`reboot` on the control socket.
    pub fn run(&mut self, signals: &SignalFd, buttons: &[File]) -> Outcome {
        // A child that ended before the signalfd existed (stage 1's handover child can end
        // before stage 2 blocks SIGCHLD) sent a SIGCHLD nobody received: reap it now.
        self.reap();
        loop {
            self.start_due();
            let timeout = self.next_timeout();
            let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
            for b in buttons {
                fds.push(PollFd::new(b.as_fd(), PollFlags::POLLIN));
            }
            self.add_fds(&mut fds);
            match poll(&mut fds, PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX)) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    self.note(&format!("cloister: poll: {e}; shutting down"));
                    return Outcome::PowerOff;
                }
            }
            let ready: Vec<bool> = fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect();
            drop(fds);
            if let Some(outcome) = self.handle_signals(signals) {
                return outcome;
            }
            if self.pressed(buttons, &ready[1..=buttons.len()]) {
                self.note("cloister: power button pressed");
                return Outcome::PowerOff;
            }
            self.drain_outputs();
            let listener_ready = self.control.is_some() && ready.get(1 + buttons.len()) == Some(&true);
            if let Some(outcome) = self.serve_control(listener_ready) {
                return outcome;
            }
            self.serve_sessions();
        }
    }

    fn serve_sessions(&mut self) {
        self.with_sessions(|sessions, note| sessions.serve(note));
    }

    /// Runs `f` on the session socket, if there is one, and logs what it noted.
    fn with_sessions(&mut self, f: impl FnOnce(&mut Sessions, &mut dyn FnMut(&str))) {
        let Some(sessions) = self.sessions.as_mut() else { return };
        let mut notes = Vec::new();
        f(sessions, &mut |line| notes.push(line.to_owned()));
        for line in notes {
            self.note(&line);
        }
    }

    fn pressed(&self, buttons: &[File], ready: &[bool]) -> bool {
        let mut buf = [0u8; input::EVENT_SIZE * 16];
        buttons
            .iter()
            .zip(ready)
            .any(|(mut b, r)| *r && b.read(&mut buf).is_ok_and(|n| input::has_power_press(&buf[..n])))
    }

    fn handle_signals(&mut self, signals: &SignalFd) -> Option<Outcome> {
        while let Ok(Some(info)) = signals.read_signal() {
            let signo = i32::try_from(info.ssi_signo).ok().and_then(|n| Signal::try_from(n).ok());
            match signo {
                Some(Signal::SIGCHLD) => self.reap(),
                Some(sig) => {
                    self.note(&format!("cloister: {} received", sig.as_str()));
                    return Some(Outcome::PowerOff);
                }
                None => {}
            }
        }
        None
    }

    /// Registers every descriptor worth waking for after the signalfd and buttons.
    /// The control listener, when there is one, comes first.
    fn add_fds<'f>(&'f self, fds: &mut Vec<PollFd<'f>>) {
        if let Some(l) = &self.control {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
        for c in &self.clients {
            match &c.job {
                Some(job) => fds.push(PollFd::new(job.fd(), PollFlags::POLLIN)),
                None => fds.push(PollFd::new(c.stream.as_fd(), PollFlags::POLLIN)),
            }
        }
        for u in &self.units {
            for lines in [&u.log, &u.status].into_iter().flatten() {
                fds.push(PollFd::new(lines.file.as_fd(), PollFlags::POLLIN));
            }
        }
        if let Some(k) = &self.kmsg {
            fds.push(PollFd::new(k.as_fd(), PollFlags::POLLIN));
        }
        for fd in self.sessions.iter().flat_map(Sessions::fds) {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
        }
    }

    /// Milliseconds until the next timer (backoff, client deadline), at most one second.
    fn next_timeout(&self) -> u64 {
        let now = Instant::now();
        let mut wait = Duration::from_secs(1);
        for due in self.units.iter().filter_map(|u| u.due) {
            wait = wait.min(due.saturating_duration_since(now));
        }
        if !self.clients.is_empty() {
            wait = wait.min(Duration::from_millis(200));
        }
        u64::try_from(wait.as_millis()).unwrap_or(1000)
    }

    /// Logs a line to the consoles and the journal.
    fn note(&mut self, line: &str) {
        (self.say)(line);
        self.remember(line.to_string());
    }

    fn remember(&mut self, line: String) {
        if self.journal.len() >= JOURNAL_LINES {
            self.journal.pop_front();
        }
        self.journal.push_back(line);
    }

    fn event(&mut self, i: usize, event: &str) {
        let line = service_event::line(&self.units[i].svc.name, event);
        self.note(&line);
    }

    // ---- starting ----

    /// Starts every waiting service whose dependencies are ready, and every backoff that is due.
    fn start_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.units.len() {
            let unit = &self.units[i];
            let startable = match unit.state {
                State::Waiting => self.deps_ready(i),
                State::Backoff => unit.due.is_some_and(|d| d <= now) && self.deps_ready(i),
                _ => false,
            };
            if startable {
                self.start(i);
            } else if unit.state == State::Waiting {
                if let Some(dep) = self.failed_dep(i) {
                    self.units[i].state = State::Failed;
                    self.event(i, &format!("{} dependency {dep} failed", service_event::FAILED));
                }
            }
        }
        self.report_settled();
    }

    /// Once, when no service is still on its way up for the first time: the all-ready line
    /// (if they all are) and PID 1's memory, which the benchmark reads.
    fn report_settled(&mut self) {
        let first_start_pending =
            |u: &Unit| matches!(u.state, State::Waiting | State::Starting) && u.restarts == 0;
        if self.settled_said || self.units.iter().any(first_start_pending) {
            return;
        }
        self.settled_said = true;
        let ms = self.born.elapsed().as_millis();
        // No services (a fail-closed step held them) is not "all ready".
        if !self.units.is_empty() && self.units.iter().all(|u| matches!(u.state, State::Ready | State::Done))
        {
            self.note(&format!("{} ({ms} ms in stage 2)", marker::ALL_READY));
        }
        if let Some(kib) = own_rss_kib() {
            self.note(&format!("{} {kib} KiB", marker::PID1_RSS));
        }
    }

    /// Shows sshd's host key fingerprint on the console, as text and as a QR code, and keeps
    /// it for the control socket's `identity`.
    pub fn show_host_key(&mut self, key: crate::chat::HostKey) {
        self.note(&key.line());
        self.show_qr(&key.fingerprint);
        self.host_key = Some(key.fingerprint);
    }

    fn show_qr(&mut self, text: &str) {
        for line in cloister_qr::lines(text) {
            self.note(&line);
        }
    }

    /// Shows the onion address once tor has written it (tor's readiness is that file).
    fn announce_onion(&mut self) {
        let Some(chat) = self.plan.chat.as_ref().filter(|_| self.onion.is_none()) else { return };
        match crate::chat::onion_address(&chat.onion_hostname) {
            Ok(Some(addr)) => {
                self.note(&format!("{} {addr}", marker::ONION_ADDRESS));
                self.show_qr(&addr);
                self.onion = Some(addr);
            }
            Ok(None) => {}
            Err(e) => self.note(&format!("cloister: onion address: {e}")),
        }
    }

    fn deps_ready(&self, i: usize) -> bool {
        self.units[i].svc.after.iter().all(|dep| self.unit(dep).is_none_or(|u| u.state == State::Ready))
    }

    fn failed_dep(&self, i: usize) -> Option<String> {
        self.units[i]
            .svc
            .after
            .iter()
            .find(|d| self.unit(d).is_some_and(|u| u.state == State::Failed))
            .cloned()
    }

    fn unit(&self, name: &str) -> Option<&Unit> {
        self.units.iter().find(|u| u.svc.name == name)
    }

    fn start(&mut self, i: usize) {
        if self.units[i].direct {
            return self.start_direct(i);
        }
        let netns = match (self.units[i].svc.namespaces.net, &self.chat_netns_failed) {
            (NetNs::Host, _) => None,
            (NetNs::Chat, None) => Some(self.chat_netns.clone()),
            (NetNs::Chat, Some(why)) => {
                let event = format!("{} cannot start: chat network namespace: {why}", service_event::FAILED);
                self.event(i, &event);
                self.units[i].state = State::Failed;
                return;
            }
        };
        let root = self.run_dir.join("root");
        let svc = &self.units[i].svc;
        let spawned = match &svc.terminal {
            Some(tty) => open_terminal(tty)
                .and_then(|fds| spawn_on_console(svc, netns, &root, &self.plan.hostname, fds))
                .map(|(pid, log, status)| (pid, Some(log), status)),
            None => spawn(svc, netns, &root, &self.plan.hostname)
                .map(|(pid, log, status)| (pid, Some(log), status)),
        };
        match spawned {
            Ok((pid, log, status)) => {
                let unit = &mut self.units[i];
                unit.pid = Some(pid);
                unit.log = log;
                unit.status = Some(status);
                unit.state = State::Starting;
                unit.started = Instant::now();
                unit.due = None;
                self.event(i, &format!("{} (pid {pid})", service_event::STARTED));
            }
            Err(e) => {
                self.event(i, &format!("{} cannot start: {e}", service_event::FAILED));
                self.units[i].state = State::Failed;
            }
        }
    }

    fn start_direct(&mut self, i: usize) {
        match spawn_direct(&self.units[i].svc) {
            Ok((pid, log)) => {
                let unit = &mut self.units[i];
                unit.pid = Some(pid);
                unit.log = Some(log);
                unit.status = None;
                unit.state = State::Ready;
                unit.started = Instant::now();
                unit.due = None;
                self.event(i, &format!("{} (pid {pid})", service_event::STARTED));
                let stage = self.born.elapsed().as_millis();
                self.event(i, &format!("{} (0 ms, {stage} ms in stage 2)", service_event::READY));
            }
            Err(e) => {
                self.event(i, &format!("{} cannot start: {e}", service_event::FAILED));
                self.units[i].state = State::Failed;
            }
        }
    }

    // ---- output, readiness, exits ----

    fn drain_outputs(&mut self) {
        for i in 0..self.units.len() {
            let name = self.units[i].svc.name.clone();
            let lines = self.units[i].log.as_mut().map(Lines::take).unwrap_or_default();
            for line in lines {
                let line = format!("{name}: {line}");
                (self.say)(&line);
                self.remember(line);
            }
            let verdicts = self.units[i].status.as_mut().map(Lines::take).unwrap_or_default();
            for v in verdicts {
                self.on_status(i, &v);
            }
        }
        let kernel = self.kmsg.as_mut().map(read_kmsg).unwrap_or_default();
        for line in kernel {
            self.remember(format!("kernel: {line}"));
        }
    }

    fn on_status(&mut self, i: usize, verdict: &str) {
        let unit = &mut self.units[i];
        if unit.state != State::Starting {
            return;
        }
        if verdict == sandbox::STATUS_READY {
            unit.state = State::Ready;
            let ms = unit.started.elapsed().as_millis();
            let stage = self.born.elapsed().as_millis();
            self.event(i, &format!("{} ({ms} ms, {stage} ms in stage 2)", service_event::READY));
            self.announce_onion();
        } else {
            let ms = unit.svc.restart.ready_timeout_ms;
            if let Some(pid) = unit.pid {
                let _ = killpg(pid, Signal::SIGKILL);
            }
            self.note(&format!(
                "cloister: service {} not ready after {ms} ms; killed",
                self.units[i].svc.name
            ));
        }
    }

    /// Reaps every exited child; a service's exit goes through its restart policy.
    fn reap(&mut self) {
        loop {
            let (pid, code, how) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, code, exit_text(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    (pid, 128 + sig as i32, format!("killed by {}", sig.as_str()))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            if let Some(i) = self.units.iter().position(|u| u.pid == Some(pid)) {
                self.on_exit(i, code, &how);
            } else if !self.on_account_change_exit(pid, code) {
                self.with_sessions(|sessions, note| {
                    sessions.on_exit(pid, code, note);
                });
            }
        }
    }

    fn on_exit(&mut self, i: usize, code: i32, how: &str) {
        self.flush_unit_output(i);
        let now = Instant::now();
        let unit = &mut self.units[i];
        unit.pid = None;
        unit.log = None;
        unit.status = None;
        if unit.state == State::Stopping {
            unit.state = State::Stopped;
            self.event(i, &format!("{} ({how})", service_event::STOPPED));
            return;
        }
        if unit.direct && code == 0 && !unit.restart_now {
            unit.state = State::Done;
            self.event(i, &format!("{} ({how})", service_event::DONE));
            return;
        }
        let policy = unit.svc.restart;
        if std::mem::take(&mut unit.restart_now) {
            unit.delay_ms = policy.initial_delay_ms;
            unit.state = State::Backoff;
            unit.due = Some(now);
            self.event(i, &format!("{} ({how}); restart in 0 ms", service_event::EXITED));
            return;
        }
        unit.exits.push_back(now);
        let window = Duration::from_millis(policy.window_ms);
        while unit.exits.front().is_some_and(|t| now.duration_since(*t) > window) {
            unit.exits.pop_front();
        }
        if unit.exits.len() >= policy.max_exits as usize {
            unit.state = State::Failed;
            let n = unit.exits.len();
            let event = format!(
                "{} crash loop ({n} exits within {} s; last {how})",
                service_event::FAILED,
                window.as_secs()
            );
            self.event(i, &event);
            return;
        }
        if now.duration_since(unit.started) >= Duration::from_millis(policy.stable_ms) || unit.delay_ms == 0 {
            unit.delay_ms = policy.initial_delay_ms;
        }
        let delay = unit.delay_ms;
        unit.delay_ms = (delay.saturating_mul(2)).min(policy.max_delay_ms);
        unit.restarts += 1;
        unit.state = State::Backoff;
        unit.due = Some(now + Duration::from_millis(delay));
        self.event(i, &format!("{} ({how}); restart in {delay} ms", service_event::EXITED));
    }

    fn flush_unit_output(&mut self, i: usize) {
        let name = self.units[i].svc.name.clone();
        if let Some(log) = self.units[i].log.as_mut() {
            let mut lines = log.take();
            lines.extend(log.rest());
            for line in lines {
                let line = format!("{name}: {line}");
                (self.say)(&line);
                self.remember(line);
            }
        }
    }

    // ---- control socket ----

    /// Accepts new clients when the listener woke us, and reads every client (non-blocking).
    fn serve_control(&mut self, listener_ready: bool) -> Option<Outcome> {
        if listener_ready {
            self.accept();
        }
        let now = Instant::now();
        let mut outcome = None;
        let mut keep = Vec::new();
        for mut client in std::mem::take(&mut self.clients) {
            if let Some(job) = client.job.as_mut() {
                job.drain();
                if client.expired(now) {
                    self.note("cloister: control: an account change took too long; stopped");
                    reply(&mut client, &json!({"ok": false, "error": "the change took too long"}));
                } else {
                    keep.push(client);
                }
                continue;
            }
            match client.read() {
                Progress::Pending if !client.expired(now) => keep.push(client),
                Progress::Pending | Progress::Drop(None) => {}
                Progress::Drop(Some(why)) => reply(&mut client, &json!({"ok": false, "error": why})),
                Progress::Line(line) => {
                    let (done, shutdown) = self.answer(&mut client, &line);
                    outcome = outcome.or(shutdown);
                    if !done {
                        keep.push(client);
                    }
                }
            }
        }
        self.clients.extend(keep);
        outcome
    }

    fn accept(&mut self) {
        let Some(listener) = &self.control else { return };
        while let Ok((stream, _)) = listener.accept() {
            if self.clients.len() >= 16 || stream.set_nonblocking(true).is_err() {
                continue;
            }
            let cred = getsockopt(&stream, PeerCredentials).ok();
            let (uid, gid, pid) = (cred.map(|c| c.uid()), cred.map(|c| c.gid()), cred.map(|c| c.pid()));
            self.clients.push(Client::new(stream, uid, gid, pid));
        }
    }

    /// The admin group's gid, when the image has admin accounts.
    fn admin_gid(&self) -> Option<u32> {
        self.plan.chat.as_ref().and_then(|c| c.accounts.as_ref()).map(|a| a.admin.gid)
    }

    /// Root, the plan's admin uids and the admin group.
    fn is_admin(&self, client: &Client) -> bool {
        client.uid.is_some_and(|u| u == 0 || self.plan.admin_uids.contains(&u))
            || client.gid.is_some_and(|g| Some(g) == self.admin_gid())
    }

    /// Answers one line; returns whether the client is done with (or still waits for a secret
    /// line or an account change), and a shutdown it asked for.
    fn answer(&mut self, client: &mut Client, line: &[u8]) -> (bool, Option<Outcome>) {
        if !self.is_admin(client) {
            let who = client.uid.map_or("unknown".to_string(), |u| u.to_string());
            self.note(&format!("cloister: control: refused uid {who}"));
            reply(client, &json!({"ok": false, "error": "permission denied"}));
            return (true, None);
        }
        if let Some((request, mut secrets)) = client.awaiting_secrets.take() {
            secrets.push(Zeroizing::new(line.to_vec()));
            if secrets.len() < request.secret_lines() {
                client.awaiting_secrets = Some((request, secrets));
                return (false, None);
            }
            return (self.start_job(client, &request, &secrets), None);
        }
        let request = match control::parse(line).and_then(|r| own_account(r, client.uid)) {
            Ok(r) => r,
            Err(e) => {
                reply(client, &json!({"ok": false, "error": e}));
                return (true, None);
            }
        };
        if let Request::Totp(totp) = &request {
            self.answer_totp(client, totp);
            return (true, None);
        }
        let uid = client.uid.unwrap_or(u32::MAX);
        if let Err(why) = self.admin_totp.admits(uid, client.pid.and_then(crate::admin_totp::Process::of)) {
            self.note(&format!("cloister: control: uid {uid}: refused without its second factor"));
            reply(client, &json!({"ok": false, "error": why}));
            return (true, None);
        }
        if request.secret_lines() > 0 {
            client.awaiting_secrets = Some((request, Vec::new()));
            return (false, None);
        }
        match request {
            Request::Status => reply(client, &self.status()),
            Request::Log => {
                let lines: Vec<&String> = self.journal.iter().rev().take(200).rev().collect();
                reply(client, &json!({"ok": true, "lines": lines}));
            }
            Request::Restart(name) => {
                let answer = self.request_restart(&name);
                reply(client, &answer);
            }
            Request::Account(_) | Request::Disk(_) => return (self.start_job(client, &request, &[]), None),
            Request::Identity => reply(client, &self.identity()),
            // Answered above, before the gate.
            Request::Totp(_) => {}
            Request::KillSystem => {
                reply(client, &json!({"ok": true}));
                self.note(&format!("cloister: control: uid {uid}: kill switch"));
                return (true, Some(Outcome::KillSwitch));
            }
            Request::PowerOff | Request::Reboot => {
                reply(client, &json!({"ok": true}));
                self.note(&format!(
                    "cloister: control: {}",
                    if request == Request::Reboot { "reboot" } else { "poweroff" }
                ));
                return (
                    true,
                    Some(if request == Request::Reboot { Outcome::Reboot } else { Outcome::PowerOff }),
                );
            }
        }
        (true, None)
    }

    /// `totp …`: the caller's own second factor, answered at once.
    fn answer_totp(&mut self, client: &mut Client, totp: &TotpRequest) {
        let uid = client.uid.unwrap_or(u32::MAX);
        let process = client.pid.and_then(crate::admin_totp::Process::of);
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let name = crate::chatclient::login_name(&passwd, uid);
        let answer = self.admin_totp.answer(uid, name.as_deref(), process, totp);
        if let (TotpRequest::Code(_) | TotpRequest::Confirm(_), Some(why)) = (totp, answer["error"].as_str())
        {
            self.note(&format!("cloister: control: uid {uid}: second factor: {why}"));
        }
        reply(client, &answer);
    }

    /// Hands an account or disk change (with its secret lines) to a child; the client waits
    /// for its answer. Returns whether the client is done (the child could not start).
    fn start_job(&mut self, client: &mut Client, request: &Request, secrets: &[Zeroizing<Vec<u8>>]) -> bool {
        let who = client.uid.map_or("unknown".to_string(), |u| u.to_string());
        let (mode, change, deadline) = match request {
            Request::Account(change) => (ACCOUNTS_ARG, serde_json::to_vec(change), ACCOUNT_CHANGE_DEADLINE),
            Request::Disk(change) => (DISK_ARG, serde_json::to_vec(change), DISK_CHANGE_DEADLINE),
            _ => return true,
        };
        // One JSON line, then the secret lines.
        let mut input = Zeroizing::new(change.unwrap_or_default());
        input.push(b'\n');
        for secret in secrets {
            input.extend_from_slice(secret);
            input.push(b'\n');
        }
        match crate::accounts::Job::start(mode, &input) {
            Ok(job) => {
                // What was asked, never a secret: names and dates only.
                self.note(&format!("cloister: control: uid {who}: {}", describe(request)));
                client.job = Some(job);
                client.extend_deadline(Instant::now() + deadline);
                false
            }
            Err(e) => {
                self.note(&format!("cloister: control: {}: {e}", describe(request)));
                reply(client, &json!({"ok": false, "error": "the change could not start"}));
                true
            }
        }
    }

    /// The control client whose account change just ended gets the child's answer, with the
    /// users who are logged in marked in a list. Returns whether `pid` was such a child.
    fn on_account_change_exit(&mut self, pid: Pid, code: i32) -> bool {
        let Some(i) = self.clients.iter().position(|c| c.job.as_ref().is_some_and(|j| j.pid == Some(pid)))
        else {
            return false;
        };
        let mut client = self.clients.remove(i);
        let Some(job) = client.job.take() else { return true };
        let mut answer = job.answer(code);
        let online = self.sessions.as_ref().map(Sessions::logged_in).unwrap_or_default();
        if let Some(accounts) = answer.get_mut("accounts").and_then(|a| a.as_array_mut()) {
            for a in accounts {
                let uid = a.get("uid").and_then(|u| u.as_u64()).and_then(|u| u32::try_from(u).ok());
                a["logged_in"] = json!(uid.is_some_and(|u| online.contains(&u)));
            }
        }
        if let Some(error) = answer.get("error").and_then(|e| e.as_str()) {
            self.note(&format!("cloister: control: refused: {error}"));
        }
        reply(&mut client, &answer);
        true
    }

    fn request_restart(&mut self, name: &str) -> serde_json::Value {
        let Some(i) = self.units.iter().position(|u| u.svc.name == name) else {
            return json!({"ok": false, "error": format!("no service {name:?}")});
        };
        self.note(&format!("cloister: control: restart {name}"));
        let unit = &mut self.units[i];
        match unit.pid {
            Some(pid) => {
                unit.restart_now = true;
                let _ = kill(pid, Signal::SIGTERM);
            }
            None => {
                unit.exits.clear();
                unit.delay_ms = unit.svc.restart.initial_delay_ms;
                unit.state = State::Backoff;
                unit.due = Some(Instant::now());
            }
        }
        json!({"ok": true})
    }

    /// What users check before they connect, as text and as QR code lines.
    fn identity(&self) -> serde_json::Value {
        let with_qr =
            |text: &Option<String>| text.as_ref().map(|t| json!({ "text": t, "qr": cloister_qr::lines(t) }));
        json!({
            "ok": true,
            "onion_address": with_qr(&self.onion),
            "ssh_host_key": with_qr(&self.host_key),
        })
    }

    fn status(&self) -> serde_json::Value {
        let procs = crate::memory::processes(Path::new("/proc"));
        let services: Vec<serde_json::Value> = self
            .units
            .iter()
            .map(|u| {
                json!({
                    "name": u.svc.name,
                    "state": u.state.name(),
                    "pid": u.pid.map(|p| p.as_raw()),
                    "restarts": u.restarts,
                    "memory": u.pid.map(|p| crate::memory::tree(&procs, p.as_raw()).to_json()),
                })
            })
            .collect();
        json!({
            "ok": true,
            "uptime_ms": u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX),
            "steps": self.steps,
            "services": services,
            "firewall": self.firewall.as_ref().map(|f| f()),
            "network": self.network.as_ref().map(|f| f()),
            "memory": crate::memory::status(&procs),
            "grow": self.grow.as_ref().map(|f| f()),
        })
    }

    // ---- stopping ----

    /// Stops every service in reverse start order: SIGTERM, its grace period, then SIGKILL to
    /// the whole launch chain (whose ns-init takes its pid namespace with it).
    pub fn stop_all(&mut self) {
        self.clients.clear();
        if let Some(sessions) = self.sessions.as_mut() {
            sessions.stop_all();
        }
        for i in (0..self.units.len()).rev() {
            self.stop(i);
        }
    }

    fn stop(&mut self, i: usize) {
        let Some(pid) = self.units[i].pid else {
            self.units[i].state = State::Stopped;
            return;
        };
        self.units[i].state = State::Stopping;
        let _ = kill(pid, Signal::SIGTERM);
        let grace = Duration::from_millis(self.units[i].svc.restart.stop_grace_ms);
        if !self.wait_exit(i, grace) {
            let _ = killpg(pid, Signal::SIGKILL);
            if !self.wait_exit(i, Duration::from_secs(2)) {
                let name = self.units[i].svc.name.clone();
                self.note(&format!("cloister: service {name} survived SIGKILL"));
            }
        }
    }

    fn wait_exit(&mut self, i: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.units[i].pid.is_some() {
            if Instant::now() >= deadline {
                return false;
            }
            self.reap();
            self.drain_outputs();
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Unit {
    fn new(svc: Service) -> Self {
        Self {
            delay_ms: svc.restart.initial_delay_ms,
            svc,
            direct: false,
            state: State::Waiting,
            pid: None,
            log: None,
            status: None,
            started: Instant::now(),
            restarts: 0,
            exits: VecDeque::new(),
            due: None,
            restart_now: false,
        }
    }
}

/// This process's resident set, from /proc/self/status.
fn own_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn exit_text(code: i32) -> String {
    if code > 128 {
        format!("killed by signal {}", code - 128)
    } else {
        format!("exit code {code}")
    }
}

fn reply(client: &mut Client, value: &serde_json::Value) {
    let _ = client.stream.set_nonblocking(false);
    let _ = client.stream.set_write_timeout(Some(Duration::from_millis(500)));
    let _ = writeln!(client.stream, "{value}");
}

/// A request about the caller's own account gets the caller's login name (from SO_PEERCRED's
/// uid, never from the request): one must be an admin account for it.
fn own_account(request: Request, uid: Option<u32>) -> Result<Request, String> {
    let Request::Account(Change::AdminConsolePassword { .. }) = request else { return Ok(request) };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let name = uid.and_then(|uid| crate::chatclient::login_name(&passwd, uid).filter(|_| uid != 0));
    let name = name.ok_or("console-password sets an admin account's own console password")?;
    Ok(Request::Account(Change::AdminConsolePassword { name }))
}

/// What a control request says in the log: the change and its account's name, nothing else.
fn describe(request: &Request) -> String {
    let change = match request {
        Request::Account(change) => change,
        Request::Disk(DiskChange::PassphraseAdd) => return "disk passphrase add".into(),
        Request::Disk(DiskChange::PassphraseRemove) => return "disk passphrase remove".into(),
        _ => return "request".into(),
    };
    match change {
        Change::UserList => "user list".into(),
        Change::AdminList => "admin list".into(),
        Change::UserAdd { name, .. } => format!("user add {name}"),
        Change::UserRemove { name } => format!("user remove {name}"),
        Change::UserLock { name } => format!("user lock {name}"),
        Change::UserUnlock { name } => format!("user unlock {name}"),
        Change::UserResetTotp { name } => format!("user reset-totp {name}"),
        Change::AdminResetTotp { name } => format!("admin reset-totp {name}"),
        Change::UserExpire { name, day } => {
            let when = day.map_or("never".into(), cloister_plan::accounts::format_date);
            format!("user expire {name} {when}")
        }
        Change::AdminAdd { name, .. } => format!("admin add {name}"),
        Change::AdminRemove { name } => format!("admin remove {name}"),
        Change::AdminConsolePassword { name } => format!("console-password {name}"),
    }
}

/// The control socket in its own directory: with an admin group, root's and that group's only
/// (0750), so that no one else even reaches the socket; without, 0755 and the peer's
/// credentials alone decide.
fn bind_control(path: &Path, admin_gid: Option<u32>) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::os::unix::fs::chown(dir, Some(0).filter(|_| admin_gid.is_some()), admin_gid)?;
        let mode = if admin_gid.is_some() { 0o750 } else { 0o755 };
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    // Whoever reaches it may connect; SO_PEERCRED decides who may ask. Services cannot even
    // see /run/cloister from their own mount namespace, except sshd, for the admin CLI.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// Starts the launch chain for `svc`: its own process group, output and status on pipes.
fn spawn(
    svc: &Service,
    netns: Option<PathBuf>,
    new_root: &Path,
    hostname: &str,
) -> Result<(Pid, Lines, Lines), String> {
    let (log_r, log_w) = std::io::pipe().map_err(io("output pipe"))?;
    let log_w2 = log_w.try_clone().map_err(io("output pipe"))?;
    let launch = Launch::new(svc, netns, new_root, hostname, false);
    let (pid, status) = spawn_chain(launch, [Stdio::null(), Stdio::from(log_w), Stdio::from(log_w2)])?;
    Ok((pid, Lines::new(File::from(std::os::fd::OwnedFd::from(log_r)))?, status))
}

/// Starts a direct unit: `svc.exec` with `svc.args`, in PID 1's namespaces, a process group of
/// its own, an empty environment, stdin empty, stdout and stderr on one pipe.
fn spawn_direct(svc: &Service) -> Result<(Pid, Lines), String> {
    let (log_r, log_w) = std::io::pipe().map_err(io("output pipe"))?;
    let log_w2 = log_w.try_clone().map_err(io("output pipe"))?;
    let child = Command::new(&svc.exec)
        .args(&svc.args)
        .stdin(Stdio::null())
        .stdout(log_w)
        .stderr(log_w2)
        .env_clear()
        .process_group(0)
        .spawn()
        .map_err(io("spawn"))?;
    let pid = Pid::from_raw(i32::try_from(child.id()).map_err(|e| e.to_string())?);
    Ok((pid, Lines::new(File::from(std::os::fd::OwnedFd::from(log_r)))?))
}

/// Starts the launch chain for `svc` on a terminal (`fds`: its stdin, stdout, stderr): a
/// user's, or a console; returns the launcher's pid (also its process group) and its status
/// pipe.
pub fn spawn_on_terminal(
    svc: &Service,
    netns: Option<PathBuf>,
    new_root: &Path,
    hostname: &str,
    fds: [std::os::fd::OwnedFd; 3],
) -> Result<(Pid, Lines), String> {
    let launch = Launch::new(svc, netns, new_root, hostname, true);
    spawn_chain(launch, fds.map(Stdio::from))
}

/// A supervised service on a console: stdin and stdout the terminal, stderr PID 1's log (the
/// console services' audit lines); returns its pid, its log and its status pipe.
fn spawn_on_console(
    svc: &Service,
    netns: Option<PathBuf>,
    new_root: &Path,
    hostname: &str,
    [stdin, stdout]: [std::os::fd::OwnedFd; 2],
) -> Result<(Pid, Lines, Lines), String> {
    let launch = Launch::new(svc, netns, new_root, hostname, true);
    let (log_r, log_w) = std::io::pipe().map_err(io("output pipe"))?;
    let (pid, status) = spawn_chain(launch, [Stdio::from(stdin), Stdio::from(stdout), Stdio::from(log_w)])?;
    Ok((pid, Lines::new(File::from(std::os::fd::OwnedFd::from(log_r)))?, status))
}

/// A console opened twice, for a service's stdin and stdout (its stderr is PID 1's log, so a
/// service on a terminal can still leave lines there); never PID 1's controlling terminal.
fn open_terminal(tty: &Path) -> Result<[std::os::fd::OwnedFd; 2], String> {
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NOCTTY)
            .open(tty)
            .map(std::os::fd::OwnedFd::from)
            .map_err(|e| format!("{}: {e}", tty.display()))
    };
    Ok([open()?, open()?])
}

/// `cloister-init <mode> <args>` as a child in a process group of its own, `input` on its
/// stdin (which is then closed), stderr discarded; returns its pid and the read end of its
/// stdout. For work PID 1 must not do itself: slow hashing, edits of account files.
pub fn spawn_helper(mode: &str, args: &[&str], input: &[u8]) -> Result<(Pid, std::os::fd::OwnedFd), String> {
    let mut child = Command::new("/proc/self/exe")
        .arg(mode)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .env_clear()
        .process_group(0)
        .spawn()
        .map_err(io("spawn helper"))?;
    let pid = Pid::from_raw(i32::try_from(child.id()).map_err(|e| e.to_string())?);
    // A request is at most a few KiB: it fits a pipe's buffer, so the write cannot block.
    let written = child.stdin.take().map(|mut stdin| stdin.write_all(input));
    match (written, child.stdout.take()) {
        (Some(Ok(())), Some(out)) => Ok((pid, std::os::fd::OwnedFd::from(out))),
        _ => {
            let _ = killpg(pid, Signal::SIGKILL);
            Err("could not pass the request to the helper".into())
        }
    }
}

/// The launcher of `launch` in a process group of its own, with `stdio`; the status pipe is
/// made here and its write end passed by number.
fn spawn_chain(mut launch: Launch, stdio: [Stdio; 3]) -> Result<(Pid, Lines), String> {
    let (status_r, status_w) = std::io::pipe().map_err(io("status pipe"))?;
    // The launcher inherits the status pipe by number; PID 1 is single-threaded, so no other
    // spawn can grab it before it is closed below.
    fcntl(status_w.as_fd(), FcntlArg::F_SETFD(FdFlag::empty())).map_err(|e| format!("status pipe: {e}"))?;
    launch.status_fd = status_w.as_raw_fd();
    let json = serde_json::to_string(&launch).map_err(|e| format!("describe: {e}"))?;
    let [stdin, stdout, stderr] = stdio;
    let child = Command::new("/proc/self/exe")
        .arg(sandbox::LAUNCH_ARG)
        .arg(json)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr)
        .env_clear()
        .process_group(0)
        .spawn()
        .map_err(io("spawn launcher"))?;
    drop(status_w);
    let pid = Pid::from_raw(i32::try_from(child.id()).map_err(|e| e.to_string())?);
    Ok((pid, Lines::new(File::from(std::os::fd::OwnedFd::from(status_r)))?))
}

/// Non-blocking line splitter over a pipe.
pub struct Lines {
    file: File,
    buf: Vec<u8>,
}

impl Lines {
    pub fn new(file: File) -> Result<Self, String> {
        let flags = fcntl(file.as_fd(), FcntlArg::F_GETFL).map_err(|e| e.to_string())?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(file.as_fd(), FcntlArg::F_SETFL(flags)).map_err(|e| e.to_string())?;
        Ok(Self { file, buf: Vec::new() })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Complete lines available now, printable (control characters replaced).
    pub fn take(&mut self) -> Vec<String> {
        let mut chunk = [0u8; 4096];
        loop {
            match self.file.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
            if self.buf.len() > 64 * 1024 {
                break;
            }
        }
        let mut out = Vec::new();
        while let Some(end) =
            self.buf.iter().position(|&b| b == b'\n').or((self.buf.len() >= MAX_LINE).then_some(MAX_LINE))
        {
            let line: Vec<u8> = self.buf.drain(..end.min(self.buf.len())).collect();
            if self.buf.first() == Some(&b'\n') {
                self.buf.remove(0);
            }
            // sshd -e ends its lines with CRLF; the CR is line ending, not content.
            out.push(printable(line.strip_suffix(b"\r").unwrap_or(&line)));
        }
        out
    }

    /// An unterminated last line.
    pub fn rest(&mut self) -> Option<String> {
        (!self.buf.is_empty()).then(|| printable(&std::mem::take(&mut self.buf)))
    }
}

/// A service cannot drive the console with escape sequences.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
        .collect()
}

/// Kernel log records since the last read, message text only.
fn read_kmsg(kmsg: &mut File) -> Vec<String> {
    let mut out = Vec::new();
    let mut record = [0u8; 8192];
    for _ in 0..256 {
        match kmsg.read(&mut record) {
            Ok(n) if n > 0 => {
                let text = String::from_utf8_lossy(&record[..n]);
                let msg = text.split_once(';').map_or(&*text, |(_, m)| m);
                out.push(printable(msg.lines().next().unwrap_or("").as_bytes()));
            }
            Err(e) if e.raw_os_error() == Some(Errno::EPIPE as i32) => continue,
            _ => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_cap_and_sanitise() {
        let (r, mut w) = std::io::pipe().unwrap();
        let mut lines = Lines::new(File::from(std::os::fd::OwnedFd::from(r))).unwrap();
        w.write_all(b"one\ntw").unwrap();
        assert_eq!(lines.take(), ["one"]);
        w.write_all(b"o\x1b[2J\n").unwrap();
        assert_eq!(lines.take(), ["two?[2J"]);
        w.write_all(&vec![b'x'; MAX_LINE + 5]).unwrap();
        let got = lines.take();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].len(), MAX_LINE);
        assert_eq!(lines.rest().as_deref(), Some("xxxxx"));
    }

    #[test]
    fn exit_codes_above_128_name_the_signal() {
        assert_eq!(exit_text(3), "exit code 3");
        assert_eq!(exit_text(137), "killed by signal 9");
    }
}
