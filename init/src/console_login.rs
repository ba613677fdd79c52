//! The admin entry on the appliance's own consoles (screen and serial line): there is no login
//! program and no shell, so PID 1 runs this, one supervised service per console
//! (`cloister-init --console-login`). It asks for an admin's name and console password (no
//! echo), checks the password against `/etc/cloister/console-passwords` (root's only, apart
//! from shadow: sshd never reads it, so it is never a network password), and runs the admin
//! CLI on the console as that admin: the CLI asks for the second factor itself when the admin
//! enrolled one, exactly as over the onion service. When the CLI ends, the console asks again.
//!
//! The service runs as root with only CAP_SETUID and CAP_SETGID, in the loopback-only `chat`
//! network namespace, in a read-only view of the root with the control socket's directory;
//! the CLI runs as the admin, with no capabilities. Wrong answers cost a growing delay, the
//! same for unknown names and for names without a console password. The CLI ends a session
//! left idle at its prompt (`[admin] idle_timeout_secs`), so a console walked away from does
//! not stay logged in.
//!
//! Stdin and stdout are the console; stderr is PID 1's log, where each login, refusal (never
//! with what was typed) and logout leaves a line.
//!
//! The console is nobody's controlling terminal: when a session leader with a controlling
//! terminal exits, the kernel hangs that terminal up for every process holding it, PID 1's
//! console output included. So there are no keyboard signals (Ctrl-C is a refused character)
//! and no job control; the CLI turns echo off on its stdin for secrets.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cloister_plan::accounts::{
    AccountKind, AccountsPlan, ADMIN_IDLE_ENV, ADMIN_SOCKET_DIR, CONSOLE_PASSWORDS,
};
use cloister_plan::{Mounts, Namespaces, NetNs, Readiness, Restart, Rlimits, Service};
use nix::sys::termios::{self, FlushArg, InputFlags, LocalFlags, OutputFlags, SetArg};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::passwd;

pub const CONSOLE_ARG: &str = "--console-login";
/// Longest answer read; a longer line is refused whole.
const MAX_ANSWER: usize = 256;
/// The delay after the first wrong answer; it doubles with each further one, up to the cap.
const FIRST_DELAY: Duration = Duration::from_secs(2);
const MAX_DELAY: Duration = Duration::from_secs(60);

/// What the service is told: its console and what makes an account an admin's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleArgs {
    pub tty: PathBuf,
    pub admin: AccountKind,
    /// The admin CLI's idle timeout at its prompt.
    pub idle_secs: u64,
}

/// One console service per console of the kernel command line (the kernel's catch-all
/// `/dev/console` left out: it is one of the others).
pub fn services(consoles: &[PathBuf], accounts: &AccountsPlan, exe: &Path) -> Vec<Service> {
    consoles
        .iter()
        .filter(|tty| tty.as_path() != Path::new("/dev/console"))
        .map(|tty| service(tty, accounts, exe))
        .collect()
}

fn service(tty: &Path, accounts: &AccountsPlan, exe: &Path) -> Service {
    let name = tty.file_name().map_or("console".into(), |n| n.to_string_lossy().into_owned());
    let args = ConsoleArgs {
        tty: tty.to_path_buf(),
        admin: accounts.admin.clone(),
        idle_secs: accounts.admin_idle_secs,
    };
    let caps: Vec<String> = ["CAP_SETUID", "CAP_SETGID"].iter().map(|c| c.to_string()).collect();
    Service {
        name: format!("console-{name}"),
        exec: exe.to_path_buf(),
        args: vec![CONSOLE_ARG.into(), serde_json::to_string(&args).unwrap_or_default()],
        uid: 0,
        gid: 0,
        groups: Vec::new(),
        env: vec![("TERM".into(), terminal_type(&name).into())],
        workdir: "/".into(),
        namespaces: Namespaces { mount: true, pid: true, ipc: true, uts: true, net: NetNs::Chat },
        mounts: Mounts { read_only: vec![ADMIN_SOCKET_DIR.into()], ..Mounts::default() },
        caps_bounding: caps,
        caps_ambient: Vec::new(),
        no_new_privs: true,
        rlimits: Rlimits { nproc: None, nofile: Some(64), address_space: None, core: Some(0) },
        after: Vec::new(),
        ready: Readiness::Started,
        restart: Restart::default(),
        terminal: Some(tty.to_path_buf()),
    }
}

/// The screen's virtual terminals are the kernel's `linux`; anything else is a serial line.
fn terminal_type(tty: &str) -> &'static str {
    let vt = tty.strip_prefix("tty").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if vt {
        "linux"
    } else {
        "vt220"
    }
}

/// An admin the console may run the CLI for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// `name`'s passwd entry when it is an admin account of `kind` (its group, its uid range and
/// the admin CLI as shell).
pub fn find_admin(passwd: &str, kind: &AccountKind, name: &str) -> Option<Admin> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        let [n, _, uid, gid, _, home, shell] = f.as_slice() else { return None };
        let (uid, gid) = (uid.parse().ok()?, gid.parse().ok()?);
        (*n == name && gid == kind.gid && kind.owns_uid(uid) && Path::new(shell) == kind.shell)
            .then(|| Admin { name: name.to_owned(), uid, gid, home: PathBuf::from(home) })
    })
}

/// The console password hash of `name` in the console password file's text.
pub fn console_hash<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.split_once(':').filter(|(n, _)| *n == name).map(|(_, h)| h))
}

/// Whether `password` logs `name` in: an admin with a console password that matches. Every
/// answer costs one hash check, so the time taken tells nothing about the name.
pub fn authenticate(
    passwd: &str,
    console: &str,
    kind: &AccountKind,
    name: &str,
    password: &str,
) -> Option<Admin> {
    let admin = find_admin(passwd, kind, name);
    let hash = console_hash(console, name).filter(|_| admin.is_some());
    let matched = match hash {
        Some(hash) => passwd::verify(password, hash),
        None => {
            // The cost of a real check, spent on a hash nobody's password matches.
            let _ = passwd::hash(password);
            false
        }
    };
    admin.filter(|_| matched)
}

/// How long to wait after `failures` wrong answers in a row.
fn delay(failures: u32) -> Duration {
    let doubled = FIRST_DELAY.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    doubled.min(MAX_DELAY)
}

/// What one answer was.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Line(Zeroizing<String>),
    /// Too long, not UTF-8, or with control characters: refused whole.
    Invalid,
    /// The terminal hung up.
    Closed,
}

/// Reads one line from `input` (a terminal in canonical mode hands over a line per read).
fn read_answer(input: &mut impl Read) -> Answer {
    let mut line = Zeroizing::new(Vec::with_capacity(MAX_ANSWER));
    let mut chunk = Zeroizing::new([0u8; 128]);
    let mut overlong = false;
    loop {
        let n = match input.read(&mut chunk[..]) {
            Ok(0) | Err(_) => return Answer::Closed,
            Ok(n) => n,
        };
        let end = chunk[..n].iter().position(|&b| b == b'\n');
        let part = &chunk[..end.unwrap_or(n)];
        if line.len() + part.len() > MAX_ANSWER {
            overlong = true;
        } else {
            line.extend_from_slice(part);
        }
        if end.is_some() {
            break;
        }
    }
    let text = std::str::from_utf8(&line).ok().map(|t| t.strip_suffix('\r').unwrap_or(t));
    match text.filter(|t| !overlong && !t.chars().any(char::is_control)) {
        Some(t) => Answer::Line(Zeroizing::new(t.to_owned())),
        None => Answer::Invalid,
    }
}

/// `cloister-init --console-login <json>`: the console's login loop, for ever.
pub fn run_mode(arg: Option<&String>) -> ! {
    let args = match arg.map(|a| serde_json::from_str::<ConsoleArgs>(a)) {
        Some(Ok(args)) => args,
        _ => {
            eprintln!("usage: cloister-init {CONSOLE_ARG} <json>");
            std::process::exit(2)
        }
    };
    let tty = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => File::from(fd),
        Err(e) => {
            eprintln!("cloister: console: no terminal: {e}");
            std::process::exit(2)
        }
    };
    let console = Console { tty, name: args.tty.display().to_string(), idle_secs: args.idle_secs };
    let mut failures = 0u32;
    loop {
        match console.login(&args.admin) {
            Ok(Some(admin)) => {
                failures = 0;
                // Stderr is PID 1's log, not the console: these lines are the audit trail.
                eprintln!("{} logged in on {}", admin.name, console.name);
                console.session(&admin, &args.admin.shell);
            }
            Ok(None) => {
                failures += 1;
                // Not the name: a password typed one line too early would land in the log.
                eprintln!("a login was refused on {} ({failures} in a row)", console.name);
                console.say("login refused");
                std::thread::sleep(delay(failures));
            }
            Err(Closed) => std::thread::sleep(Duration::from_secs(1)),
        }
        // Whatever was typed meanwhile is not an answer to the next question.
        let _ = termios::tcflush(console.tty.as_fd(), FlushArg::TCIFLUSH);
    }
}

/// The terminal hung up.
struct Closed;

struct Console {
    tty: File,
    name: String,
    idle_secs: u64,
}

impl Console {
    fn say(&self, text: &str) {
        let mut out: &File = &self.tty;
        let _ = out.write_all(format!("{text}\n").as_bytes());
    }

    fn ask(&self, prompt: &str, echo: bool) -> Result<Answer, Closed> {
        self.set_mode(echo);
        let mut out: &File = &self.tty;
        let _ = out.write_all(prompt.as_bytes());
        let answer = read_answer(&mut &self.tty);
        if !echo {
            let _ = out.write_all(b"\n");
            self.set_mode(true);
        }
        match answer {
            Answer::Closed => Err(Closed),
            a => Ok(a),
        }
    }

    /// One attempt: `Some` admin on the right answers, `None` on wrong ones.
    fn login(&self, kind: &AccountKind) -> Result<Option<Admin>, Closed> {
        self.say(&format!("\ncloister: admin console on {}: press Enter to log in", self.name));
        self.ask("", true)?;
        let Answer::Line(name) = self.ask("admin: ", true)? else {
            self.say("invalid characters or too long");
            return Ok(None);
        };
        let password = match self.ask("console password: ", false)? {
            Answer::Line(p) => p,
            _ => {
                self.say("invalid characters or too long");
                return Ok(None);
            }
        };
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let console = Zeroizing::new(std::fs::read_to_string(CONSOLE_PASSWORDS).unwrap_or_default());
        Ok(authenticate(&passwd, &console, kind, &name, &password))
    }

    /// Runs the admin CLI as `admin` on the console until it ends.
    fn session(&self, admin: &Admin, cli: &Path) {
        self.set_mode(true);
        let home = if admin.home.is_dir() { admin.home.as_path() } else { Path::new("/") };
        let term = std::env::var("TERM").unwrap_or_else(|_| "vt220".into());
        // The CLI talks to the admin on the console; the service's own stderr is PID 1's log.
        let stderr = match self.tty.try_clone() {
            Ok(tty) => Stdio::from(tty),
            Err(e) => return self.say(&format!("cloister: console: {e}")),
        };
        let spawned = Command::new(cli)
            .env_clear()
            .env("TERM", term)
            .env(ADMIN_IDLE_ENV, self.idle_secs.to_string())
            .stderr(stderr)
            .env("HOME", home)
            .env("USER", &admin.name)
            .env("LOGNAME", &admin.name)
            .current_dir(home)
            .uid(admin.uid)
            .gid(admin.gid)
            .spawn();
        match spawned {
            Ok(mut child) => {
                let _ = child.wait();
                eprintln!("{} logged out on {}", admin.name, self.name);
                self.say(&format!("cloister: console: {} logged out", admin.name));
            }
            Err(e) => self.say(&format!("cloister: console: the admin CLI could not start: {e}")),
        }
        self.set_mode(true);
    }

    /// Canonical lines with CR read as NL, echo as asked, no keyboard signals.
    fn set_mode(&self, echo: bool) {
        let fd = self.tty.as_fd();
        let Ok(mut t) = termios::tcgetattr(fd) else { return };
        t.local_flags |= LocalFlags::ICANON | LocalFlags::ECHOE | LocalFlags::ECHOK;
        t.local_flags.set(LocalFlags::ECHO, echo);
        t.local_flags.remove(LocalFlags::ISIG);
        t.input_flags |= InputFlags::ICRNL;
        t.output_flags |= OutputFlags::OPOST | OutputFlags::ONLCR;
        let _ = termios::tcsetattr(fd, SetArg::TCSANOW, &t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind() -> AccountKind {
        AccountKind {
            gid: 3000,
            first_uid: 3001,
            last_uid: 3999,
            shell: "/usr/lib/cloister/admin".into(),
            homes: "/var/lib/cloister/admin".into(),
        }
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        alice:x:2001:2000::/var/lib/cloister/home/alice:/usr/lib/cloister/shell\n\
        ops:x:3001:3000::/var/lib/cloister/admin/ops:/usr/lib/cloister/admin\n\
        odd:x:3002:3000::/var/lib/cloister/admin/odd:/bin/sh\n";

    #[test]
    fn only_admins_with_a_matching_console_password_log_in() {
        let hash = passwd::hash("the console password").unwrap();
        let alice = passwd::hash("alice's password 1").unwrap();
        let console = format!("ops:{hash}\nalice:{alice}\nodd:{hash}\nroot:{hash}\n");
        let ok = authenticate(PASSWD, &console, &kind(), "ops", "the console password").unwrap();
        assert_eq!(
            (ok.uid, ok.gid, ok.home.as_path()),
            (3001, 3000, Path::new("/var/lib/cloister/admin/ops"))
        );
        for (name, password) in [
            ("ops", "the wrong password"),
            ("ops", ""),
            // A chat user, an account with another shell, root, nobody: never, whatever the file says.
            ("alice", "alice's password 1"),
            ("odd", "the console password"),
            ("root", "the console password"),
            ("eve", "the console password"),
        ] {
            assert_eq!(authenticate(PASSWD, &console, &kind(), name, password), None, "{name}");
        }
        assert_eq!(authenticate(PASSWD, "", &kind(), "ops", "the console password"), None, "no password set");
    }

    #[test]
    fn answers_are_bounded_lines_without_control_characters() {
        let read = |bytes: &[u8]| read_answer(&mut &bytes[..]);
        assert_eq!(read(b"ops\n"), Answer::Line(Zeroizing::new("ops".into())));
        assert_eq!(read(b"ops\r\n"), Answer::Line(Zeroizing::new("ops".into())));
        assert_eq!(read(b"\n"), Answer::Line(Zeroizing::new(String::new())));
        assert_eq!(read(b"\x1b[2Jops\n"), Answer::Invalid);
        assert_eq!(read(b"o\x03ps\n"), Answer::Invalid);
        assert_eq!(read(b"\xff\xfe\n"), Answer::Invalid);
        assert_eq!(read(&[b'a'; 1000]), Answer::Closed, "no newline before the end");
        let mut long = vec![b'a'; 1000];
        long.push(b'\n');
        assert_eq!(read(&long), Answer::Invalid);
        assert_eq!(read(b""), Answer::Closed);
    }

    #[test]
    fn delays_grow_and_stop_growing() {
        let d: Vec<u64> = (1..=8).map(|f| delay(f).as_secs()).collect();
        assert_eq!(d, [2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(delay(u32::MAX), MAX_DELAY);
    }

    #[test]
    fn one_service_per_console_as_root_with_two_capabilities() {
        let plan = AccountsPlan { chat: kind(), admin: kind(), admin_keys: "/k".into(), admin_idle_secs: 20 };
        let consoles: Vec<PathBuf> =
            ["/dev/tty1", "/dev/ttyS0", "/dev/console"].iter().map(PathBuf::from).collect();
        let svcs = services(&consoles, &plan, Path::new("/usr/lib/cloister/init"));
        let names: Vec<&str> = svcs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["console-tty1", "console-ttyS0"]);
        assert_eq!(svcs[0].env, [("TERM".to_string(), "linux".to_string())]);
        assert_eq!(svcs[1].env, [("TERM".to_string(), "vt220".to_string())]);
        let s = &svcs[1];
        assert_eq!((s.uid, s.terminal.as_deref()), (0, Some(Path::new("/dev/ttyS0"))));
        assert_eq!(s.caps_bounding, ["CAP_SETUID", "CAP_SETGID"]);
        assert!(s.caps_ambient.is_empty() && s.no_new_privs);
        assert_eq!(s.namespaces.net, NetNs::Chat);
        let args: ConsoleArgs = serde_json::from_str(&s.args[1]).unwrap();
        assert_eq!((args.admin, args.idle_secs), (kind(), 20));
    }
}
