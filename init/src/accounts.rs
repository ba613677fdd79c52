//! The admin tools' account changes, PID 1's side: a child process (`cloister-init --accounts`),
//! because hashing is slow on purpose, editing the account files and removing a home are risky
//! work, and removing a user waits for its processes to die. It reads one [`Change`] as a JSON
//! line on stdin (and, for `user-add` with a chosen password, that password on the next line),
//! prints one JSON object, and exits 0 (done), 1 (refused: the object's `error` says why) or 2
//! (failed). Each file is replaced whole (temporary file, fsync, rename): a power cut leaves
//! either version. Passwords are never printed but the one generated for a new user, once.

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cloister_plan::accounts::{check_admin_key, check_login_name, AccountKind, AccountsPlan};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::passwd;

pub const ACCOUNTS_ARG: &str = "--accounts";
/// How long a removal waits for the account's processes to die after SIGKILL.
const KILL_PATIENCE: Duration = Duration::from_secs(5);
/// Characters of generated passwords: no look-alikes (0/o, 1/l/i), no symbols to hunt for.
const PASSWORD_ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
/// 5 groups of 4 from 31 characters: 99 bits.
const PASSWORD_GROUPS: usize = 5;

/// One request of the admin tools, as PID 1 hands it to the child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Change {
    UserList,
    /// `chosen`: the password follows on the next line; otherwise one is generated.
    UserAdd {
        name: String,
        chosen: bool,
    },
    UserRemove {
        name: String,
    },
    UserLock {
        name: String,
    },
    UserUnlock {
        name: String,
    },
    /// Days since 1970 as shadow counts them; `None`: never.
    UserExpire {
        name: String,
        day: Option<u64>,
    },
    /// Drops the user's second factor (a lost phone): the next login needs the password only,
    /// or enrols anew when the policy requires one.
    UserResetTotp {
        name: String,
    },
    AdminList,
    AdminAdd {
        name: String,
        key: String,
    },
    AdminRemove {
        name: String,
    },
    AdminResetTotp {
        name: String,
    },
    /// Sets the admin's console password (the next line): PID 1 names the admin who asked.
    AdminConsolePassword {
        name: String,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccountError {
    #[error("{0}")]
    Refused(String),
    #[error("the account database cannot be changed: {0}")]
    Database(String),
}

use AccountError::{Database, Refused};

fn db_err(what: &str) -> impl Fn(std::io::Error) -> AccountError + '_ {
    move |e| Database(format!("{what}: {e}"))
}

/// The account files and directories one change works on.
pub struct Db<'a> {
    pub etc: PathBuf,
    pub plan: &'a AccountsPlan,
    /// Per-user chat client configs PID 1 wrote (`irssi-<uid>.conf`), removed with the user.
    pub client_configs: PathBuf,
    /// Second factors, dropped with their account.
    pub totp: crate::totp::Store,
    pub today: u64,
    /// Ends the processes of a uid ([`kill_uid`]; tests pass one that touches nothing).
    pub kill: fn(u32) -> Result<usize, String>,
}

/// One line of /etc/passwd.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    name: String,
    uid: u32,
    gid: u32,
}

fn entries(passwd: &str) -> Vec<Entry> {
    passwd
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let (uid, gid) = (f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?);
            Some(Entry { name: f[0].to_string(), uid, gid })
        })
        .collect()
}

impl Db<'_> {
    pub fn apply(&self, change: &Change, password: Option<&str>) -> Result<Value, AccountError> {
        let (chat, admin) = (&self.plan.chat, &self.plan.admin);
        match change {
            Change::UserList => self.list(chat),
            Change::AdminList => self.list(admin),
            Change::UserAdd { name, chosen } => self.add_user(name, chosen.then_some(password).flatten()),
            Change::UserRemove { name } => self.remove(chat, name),
            Change::AdminRemove { name } => self.remove_admin(name),
            Change::UserLock { name } => self.set_locked(name, true),
            Change::UserUnlock { name } => self.set_locked(name, false),
            Change::UserExpire { name, day } => self.set_expiry(name, *day),
            Change::UserResetTotp { name } => self.reset_totp(chat, name),
            Change::AdminResetTotp { name } => self.reset_totp(admin, name),
            Change::AdminAdd { name, key } => self.add_admin(name, key),
            Change::AdminConsolePassword { name } => {
                self.set_console_password(name, password.unwrap_or_default())
            }
        }
    }

    fn console_path(&self) -> PathBuf {
        self.etc.join(cloister_plan::accounts::CONSOLE_PASSWORDS.trim_start_matches("/etc/"))
    }

    /// Replaces (or adds) `name`'s console password line: the file is root's only.
    fn set_console_password(&self, name: &str, password: &str) -> Result<Value, AccountError> {
        self.find(&self.plan.admin, name)?;
        cloister_proto::session::check_new_password("", password).map_err(|e| Refused(e.to_string()))?;
        let hash = passwd::hash(password).map_err(|e| Database(e.to_string()))?;
        let old = Zeroizing::new(read_if_there(&self.console_path())?);
        let mut text = Zeroizing::new(without_line(&old, name));
        text.push_str(&format!("{name}:{hash}\n"));
        if let Some(dir) = self.console_path().parent() {
            std::fs::create_dir_all(dir).map_err(db_err("console password directory"))?;
        }
        passwd::write_replacing(&self.console_path(), &text, 0o600)
            .map_err(db_err("writing console passwords"))?;
        Ok(json!({ "name": name }))
    }

    fn passwd_path(&self) -> PathBuf {
        self.etc.join("passwd")
    }

    fn shadow_path(&self) -> PathBuf {
        self.etc.join("shadow")
    }

    fn read(&self) -> Result<(String, Zeroizing<String>), AccountError> {
        let passwd = std::fs::read_to_string(self.passwd_path()).map_err(db_err("reading passwd"))?;
        let shadow = std::fs::read_to_string(self.shadow_path()).map_err(db_err("reading shadow"))?;
        Ok((passwd, Zeroizing::new(shadow)))
    }

    /// The account `name` of `kind`, or why there is none.
    fn find(&self, kind: &AccountKind, name: &str) -> Result<Entry, AccountError> {
        check_login_name(name).map_err(Refused)?;
        let (passwd, _) = self.read()?;
        entries(&passwd)
            .into_iter()
            .find(|e| e.name == name && e.gid == kind.gid && kind.owns_uid(e.uid))
            .ok_or_else(|| Refused(format!("no {} account {name:?}", kind_name(self.plan, kind))))
    }

    fn list(&self, kind: &AccountKind) -> Result<Value, AccountError> {
        let (passwd, shadow) = self.read()?;
        let console = Zeroizing::new(read_if_there(&self.console_path())?);
        let has_console = |name: &str| console.lines().any(|l| l.split(':').next() == Some(name));
        let accounts: Vec<Value> = entries(&passwd)
            .into_iter()
            .filter(|e| e.gid == kind.gid && kind.owns_uid(e.uid))
            .map(|e| {
                let fields = shadow_fields(&shadow, &e.name);
                let locked = fields.get(1).is_none_or(|h| h.starts_with('!'));
                let expires = fields.get(7).and_then(|d| d.parse::<u64>().ok());
                let mut account = json!({
                    "name": e.name,
                    "uid": e.uid,
                    "locked": locked,
                    "expires": expires.map(cloister_plan::accounts::format_date),
                    "totp": self.totp.load(e.uid).map(|t| t.is_some()).unwrap_or(true),
                });
                if kind == &self.plan.admin {
                    account["console"] = Value::Bool(has_console(&e.name));
                }
                account
            })
            .collect();
        Ok(json!({ "accounts": accounts }))
    }

    fn add_user(&self, name: &str, chosen: Option<&str>) -> Result<Value, AccountError> {
        let generated = match chosen {
            Some(p) => {
                cloister_proto::session::check_new_password("", p).map_err(|e| Refused(e.to_string()))?;
                None
            }
            None => Some(generate_password()?),
        };
        let password = chosen.or(generated.as_deref().map(|s| s.as_str())).unwrap_or_default();
        let hash = passwd::hash(password).map_err(|e| Database(e.to_string()))?;
        let uid = self.add(&self.plan.chat, name, &hash)?;
        let mut answer = json!({ "name": name, "uid": uid });
        if let Some(p) = &generated {
            answer["password"] = Value::String(p.to_string());
        }
        Ok(answer)
    }

    fn add_admin(&self, name: &str, key: &str) -> Result<Value, AccountError> {
        let line = check_admin_key(key).map_err(Refused)?;
        check_login_name(name).map_err(Refused)?;
        // The key first: an account without one cannot log in, a key without an account is
        // never read.
        let keys = &self.plan.admin_keys;
        std::fs::create_dir_all(keys).map_err(db_err("key directory"))?;
        passwd::write_replacing(&keys.join(name), &format!("{line}\n"), 0o644)
            .map_err(db_err("writing the key file"))?;
        let uid = self.add(&self.plan.admin, name, "*")?;
        Ok(json!({ "name": name, "uid": uid }))
    }

    /// Adds `name` with `hash` to shadow, then passwd, then makes its home; returns its uid.
    fn add(&self, kind: &AccountKind, name: &str, hash: &str) -> Result<u32, AccountError> {
        check_login_name(name).map_err(Refused)?;
        let (passwd, shadow) = self.read()?;
        let all = entries(&passwd);
        if all.iter().any(|e| e.name == name) {
            return Err(Refused(format!("{name:?} already exists")));
        }
        let uid = (kind.first_uid..=kind.last_uid)
            .find(|u| all.iter().all(|e| e.uid != *u))
            .ok_or_else(|| Refused("no free uid left for this kind of account".into()))?;
        // A second factor of an earlier account with this uid (an interrupted removal) is not
        // the new account's.
        self.totp.remove(uid).map_err(Database)?;
        // A shadow line without a passwd line is what an interrupted add or remove leaves:
        // it belongs to nobody, so it is replaced.
        let mut shadow_text = without_line(&shadow, name);
        shadow_text.push_str(&format!("{name}:{hash}:{}:0:99999:7:::\n", self.today));
        passwd::write_replacing(&self.shadow_path(), &shadow_text, 0o640)
            .map_err(db_err("writing shadow"))?;
        let home = kind.homes.join(name);
        let line = format!("{name}:x:{uid}:{}::{}:{}\n", kind.gid, home.display(), kind.shell.display());
        let mut passwd_text = passwd.clone();
        if !passwd_text.is_empty() && !passwd_text.ends_with('\n') {
            passwd_text.push('\n');
        }
        passwd_text.push_str(&line);
        passwd::write_replacing(&self.passwd_path(), &passwd_text, 0o644)
            .map_err(db_err("writing passwd"))?;
        fresh_home(&home, uid, kind.gid)?;
        Ok(uid)
    }

    fn remove_admin(&self, name: &str) -> Result<Value, AccountError> {
        let admin = &self.plan.admin;
        let entry = self.find(admin, name)?;
        let (passwd, _) = self.read()?;
        let admins = entries(&passwd).iter().filter(|e| e.gid == admin.gid && admin.owns_uid(e.uid)).count();
        if admins <= 1 {
            return Err(Refused(format!("{name:?} is the last admin; add another one first")));
        }
        let answer = self.remove(admin, &entry.name)?;
        remove_if_there(&self.plan.admin_keys.join(name))?;
        let console = Zeroizing::new(read_if_there(&self.console_path())?);
        if console.lines().any(|l| l.split(':').next() == Some(name)) {
            passwd::write_replacing(&self.console_path(), &without_line(&console, name), 0o600)
                .map_err(db_err("writing console passwords"))?;
        }
        Ok(answer)
    }

    /// Locks the account (no new login), kills every process of its uid and waits until they
    /// are gone, then removes it from passwd and shadow, and its home.
    fn remove(&self, kind: &AccountKind, name: &str) -> Result<Value, AccountError> {
        let entry = self.find(kind, name)?;
        self.edit_shadow(name, |f| lock_field(f, true))?;
        let killed = (self.kill)(entry.uid).map_err(Database)?;
        let (passwd, shadow) = self.read()?;
        passwd::write_replacing(&self.passwd_path(), &without_line(&passwd, name), 0o644)
            .map_err(db_err("writing passwd"))?;
        passwd::write_replacing(&self.shadow_path(), &without_line(&shadow, name), 0o640)
            .map_err(db_err("writing shadow"))?;
        remove_tree(&kind.homes.join(name))?;
        remove_if_there(&self.client_configs.join(format!("irssi-{}.conf", entry.uid)))?;
        self.totp.remove(entry.uid).map_err(Database)?;
        Ok(json!({ "name": name, "uid": entry.uid, "processes_killed": killed }))
    }

    fn reset_totp(&self, kind: &AccountKind, name: &str) -> Result<Value, AccountError> {
        let entry = self.find(kind, name)?;
        let dropped = self.totp.remove(entry.uid).map_err(Database)?;
        Ok(json!({ "name": name, "had_totp": dropped }))
    }

    /// Locking also ends the user's sessions: a locked account chats no more.
    fn set_locked(&self, name: &str, locked: bool) -> Result<Value, AccountError> {
        let entry = self.find(&self.plan.chat, name)?;
        self.edit_shadow(name, |f| lock_field(f, locked))?;
        let killed = if locked { (self.kill)(entry.uid).map_err(Database)? } else { 0 };
        Ok(json!({ "name": name, "locked": locked, "processes_killed": killed }))
    }

    fn set_expiry(&self, name: &str, day: Option<u64>) -> Result<Value, AccountError> {
        self.find(&self.plan.chat, name)?;
        self.edit_shadow(name, |f| {
            while f.len() < 9 {
                f.push(String::new());
            }
            f[7] = day.map(|d| d.to_string()).unwrap_or_default();
        })?;
        Ok(json!({ "name": name, "expires": day.map(cloister_plan::accounts::format_date) }))
    }

    /// Rewrites `name`'s shadow line through `edit` on its fields.
    fn edit_shadow(&self, name: &str, edit: impl FnOnce(&mut Vec<String>)) -> Result<(), AccountError> {
        let (_, shadow) = self.read()?;
        let out = passwd::edit_line(&shadow, name, edit)
            .map(Zeroizing::new)
            .ok_or_else(|| Database(format!("{name:?} has no shadow entry")))?;
        passwd::write_replacing(&self.shadow_path(), &out, 0o640).map_err(db_err("writing shadow"))
    }
}

fn kind_name<'a>(plan: &AccountsPlan, kind: &AccountKind) -> &'a str {
    if kind == &plan.admin {
        "admin"
    } else {
        "chat"
    }
}

/// `name`'s shadow fields (empty when it has no line).
fn shadow_fields(shadow: &str, name: &str) -> Vec<String> {
    shadow
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f[0] == name)
        .map(|f| f.into_iter().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// `!` before the hash locks a password in the way sshd without PAM refuses the account.
fn lock_field(fields: &mut [String], locked: bool) {
    if let Some(hash) = fields.get_mut(1) {
        let bare = hash.trim_start_matches('!').to_string();
        *hash = if locked { format!("!{bare}") } else { bare };
    }
}

/// `text` without the line of account `name`.
fn without_line(text: &str, name: &str) -> String {
    text.lines().filter(|l| l.split(':').next() != Some(name)).map(|l| format!("{l}\n")).collect()
}

/// A fresh, empty home: whatever an earlier account of that name left there goes first.
fn fresh_home(home: &Path, uid: u32, gid: u32) -> Result<(), AccountError> {
    remove_tree(home)?;
    let make = || -> std::io::Result<()> {
        if let Some(parent) = home.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::create_dir(home)?;
        std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700))?;
        std::os::unix::fs::chown(home, Some(uid), Some(gid))
    };
    make().map_err(db_err("making the home"))
}

/// Removes a home (a symlink itself, never what it points to).
fn remove_tree(path: &Path) -> Result<(), AccountError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Database(format!("{}: {e}", path.display()))),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).map_err(db_err("removing the home")),
        Ok(_) => remove_if_there(path),
    }
}

/// A file's text, empty when it does not exist.
fn read_if_there(path: &Path) -> Result<String, AccountError> {
    match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        other => other.map_err(|e| Database(format!("reading {}: {e}", path.display()))),
    }
}

fn remove_if_there(path: &Path) -> Result<(), AccountError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Database(format!("removing {}: {e}", path.display())))
        }
        _ => Ok(()),
    }
}

/// SIGKILLs every process whose real, effective, saved or file-system uid is `uid` (sshd's
/// session processes, the shell, the chat client in its sandbox) until none is left; returns
/// how many it signalled. Zombies are dead already and only wait for their parent.
pub fn kill_uid(uid: u32) -> Result<usize, String> {
    if uid == 0 {
        return Err("refusing to kill root's processes".into());
    }
    let deadline = std::time::Instant::now() + KILL_PATIENCE;
    let mut signalled = std::collections::BTreeSet::new();
    loop {
        let alive = processes_of(uid);
        if alive.is_empty() {
            return Ok(signalled.len());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("{} processes of uid {uid} survived SIGKILL", alive.len()));
        }
        for pid in alive {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            signalled.insert(pid);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Live (not zombie) processes with `uid` among their uids, from /proc.
fn processes_of(uid: u32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
            let zombie = status.lines().any(|l| l.starts_with("State:") && l.contains('Z'));
            let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"));
            !zombie && uids.is_some_and(|u| u.split_whitespace().any(|w| w.parse() == Ok(uid)))
        })
        .collect()
}

/// A password to show once: five groups of four, e.g. `k7mq-...`.
fn generate_password() -> Result<Zeroizing<String>, AccountError> {
    let mut out = Zeroizing::new(String::new());
    let mut byte = [0u8; 1];
    for i in 0..PASSWORD_GROUPS * 4 {
        if i > 0 && i % 4 == 0 {
            out.push('-');
        }
        // Rejection sampling: only bytes below the largest multiple of the alphabet's size.
        let limit = 256 - 256 % PASSWORD_ALPHABET.len();
        loop {
            getrandom::fill(&mut byte).map_err(|e| Database(format!("random: {e}")))?;
            if usize::from(byte[0]) < limit {
                out.push(char::from(PASSWORD_ALPHABET[usize::from(byte[0]) % PASSWORD_ALPHABET.len()]));
                break;
            }
        }
    }
    Ok(out)
}

/// The child carrying out one change for a control client: its pid (`None` once reaped: never
/// signal a reused pid) and what it has printed so far. Dropping it kills the child's group.
pub struct Job {
    pub pid: Option<Pid>,
    out: std::fs::File,
    said: Vec<u8>,
}

/// The most a child may print: a list of every account fits many times over.
const MAX_ANSWER: usize = 1 << 20;

impl Job {
    /// Starts `cloister-init <mode>` (`--accounts`, `--disk`) with `input` on its stdin.
    pub fn start(mode: &str, input: &[u8]) -> Result<Self, String> {
        let (pid, out) = crate::supervisor::spawn_helper(mode, &[], input)?;
        let out = std::fs::File::from(out);
        let flags = nix::fcntl::fcntl(&out, nix::fcntl::FcntlArg::F_GETFL).map_err(|e| e.to_string())?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&out, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(|e| e.to_string())?;
        Ok(Self { pid: Some(pid), out, said: Vec::new() })
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.out)
    }

    /// Reads what the child printed so far (so that it never blocks on a full pipe).
    pub fn drain(&mut self) {
        let mut chunk = [0u8; 4096];
        while self.said.len() <= MAX_ANSWER {
            match std::io::Read::read(&mut self.out, &mut chunk) {
                Ok(0) => break,
                Ok(n) => self.said.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    }

    /// The child's answer once it has exited (reaped: its pid is forgotten).
    pub fn answer(mut self, code: i32) -> Value {
        self.pid = None;
        self.drain();
        match serde_json::from_slice::<Value>(&self.said) {
            Ok(v @ Value::Object(_)) if code <= 2 => v,
            _ => json!({ "ok": false, "error": format!("the change failed (exit code {code})") }),
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
        }
    }
}

/// `cloister-init --accounts`: a [`Change`] (and maybe a password) on stdin, one JSON object out.
pub fn run_mode() -> ! {
    let mut input = std::io::Read::take(std::io::stdin().lock(), 8192);
    let mut first = String::new();
    let mut password = Zeroizing::new(String::new());
    let read = input.read_line(&mut first).and_then(|_| input.read_line(&mut password));
    let change: Result<Change, String> =
        read.map_err(|e| e.to_string()).and_then(|_| serde_json::from_str(&first).map_err(|e| e.to_string()));
    let plan = cloister_plan::Plan::load(Path::new(cloister_plan::PLAN_PATH)).map_err(|e| e.to_string());
    let outcome = match (change, plan) {
        (Err(e), _) => Err(Database(format!("bad request: {e}"))),
        (_, Err(e)) => Err(Database(format!("plan: {e}"))),
        (Ok(change), Ok(plan)) => match plan.chat.and_then(|c| c.accounts) {
            None => Err(Refused("this image has no account tools".into())),
            Some(accounts) => {
                let db = Db {
                    etc: "/etc".into(),
                    plan: &accounts,
                    client_configs: Path::new(cloister_plan::RUN_DIR).join("chat"),
                    totp: crate::totp::Store::new(cloister_plan::accounts::TOTP_DIR),
                    today: passwd::today(),
                    kill: kill_uid,
                };
                let pw = password.strip_suffix('\n').unwrap_or(&password);
                db.apply(&change, Some(pw))
            }
        },
    };
    let (answer, code) = match outcome {
        Ok(mut v) => {
            v["ok"] = Value::Bool(true);
            (v, 0)
        }
        Err(e @ Refused(_)) => (json!({ "ok": false, "error": e.to_string() }), 1),
        Err(e) => (json!({ "ok": false, "error": e.to_string() }), 2),
    };
    println!("{answer}");
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passwd::shadow_hash;
    use cloister_plan::accounts::{ADMIN_GID, CHAT_GID};

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqUUNcrpcdDksXxNuda4QJg6P8JCz80b+4wMV18Iwt ops";

    struct Fixture {
        dir: tempfile::TempDir,
        plan: AccountsPlan,
    }

    impl Fixture {
        /// An `etc` with root, one chat user and one admin, as the build writes them.
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path();
            std::fs::create_dir_all(p.join("etc")).unwrap();
            std::fs::write(
                p.join("etc/passwd"),
                "root:x:0:0:root:/root:/bin/sh\nalice:x:2001:2000::/h/alice:/s\nops:x:3001:3000::/a/ops:/adm\n",
            )
            .unwrap();
            std::fs::write(
                p.join("etc/shadow"),
                "root:*:1:0:99999:7:::\nalice:$6$a$b:1:0:99999:7:::\nops:*:1:0:99999:7:::\n",
            )
            .unwrap();
            let kind = |gid, first, last, homes: &str| AccountKind {
                gid,
                first_uid: first,
                last_uid: last,
                shell: "/s".into(),
                homes: p.join(homes),
            };
            let plan = AccountsPlan {
                chat: kind(CHAT_GID, 2001, 2003, "h"),
                admin: kind(ADMIN_GID, 3001, 3999, "a"),
                admin_keys: p.join("keys"),
                admin_idle_secs: 900,
            };
            Self { dir, plan }
        }

        fn db(&self) -> Db<'_> {
            Db {
                etc: self.dir.path().join("etc"),
                plan: &self.plan,
                client_configs: self.dir.path().join("run"),
                totp: crate::totp::Store::new(self.dir.path().join("totp")),
                today: 20_000,
                // Never signal anything on the machine running the tests.
                kill: |uid| if uid >= 2001 { Ok(0) } else { Err(format!("uid {uid}")) },
            }
        }

        fn file(&self, name: &str) -> String {
            std::fs::read_to_string(self.dir.path().join(name)).unwrap()
        }

        /// An enrolled second factor in the store, as a login leaves it.
        fn enrol(&self, path: &Path) {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, format!("secret {}\nlast 1\n", "A".repeat(32))).unwrap();
        }
    }

    fn user(name: &str) -> String {
        name.to_string()
    }

    #[test]
    fn adding_a_user_generates_a_password_that_verifies() {
        let f = Fixture::new();
        let a = f.db().apply(&Change::UserAdd { name: user("carol"), chosen: false }, None).unwrap();
        assert_eq!(a["uid"], 2002);
        let password = a["password"].as_str().unwrap();
        assert_eq!(password.len(), 24, "{password}");
        assert!(password
            .split('-')
            .all(|g| g.len() == 4 && g.bytes().all(|b| PASSWORD_ALPHABET.contains(&b))));
        let shadow = f.file("etc/shadow");
        assert!(passwd::verify(password, shadow_hash(&shadow, "carol").unwrap()));
        assert!(f
            .file("etc/passwd")
            .ends_with(&format!("carol:x:2002:2000::{}:/s\n", f.plan.chat.homes.join("carol").display())));
        let home = std::fs::metadata(f.plan.chat.homes.join("carol")).unwrap();
        assert_eq!(home.permissions().mode() & 0o777, 0o700);
        // The shadow line carries today as the last change.
        assert!(shadow.contains(":20000:0:99999:7:::\n"));
    }

    #[test]
    fn bad_or_taken_names_and_weak_passwords_change_nothing() {
        let f = Fixture::new();
        let (passwd, shadow) = (f.file("etc/passwd"), f.file("etc/shadow"));
        for (change, pw, says) in [
            (Change::UserAdd { name: user("alice"), chosen: false }, None, "already exists"),
            (Change::UserAdd { name: user("ops"), chosen: false }, None, "already exists"),
            (Change::UserAdd { name: user("root"), chosen: false }, None, "reserved"),
            (Change::UserAdd { name: user("x:0:0"), chosen: false }, None, "not a name"),
            (Change::UserAdd { name: user("carol"), chosen: true }, Some("short"), "at least"),
            (
                Change::UserAdd { name: user("carol"), chosen: true },
                Some("bell \u{7} in a long one"),
                "control",
            ),
            (Change::UserRemove { name: user("ops") }, None, "no chat account"),
            (Change::UserLock { name: user("root") }, None, "reserved"),
            (Change::UserExpire { name: user("nobody2"), day: None }, None, "no chat account"),
            (Change::AdminAdd { name: user("eve"), key: "ssh-rsa AAAA".into() }, None, "key type"),
            (Change::AdminRemove { name: user("ops") }, None, "last admin"),
            (Change::AdminRemove { name: user("alice") }, None, "no admin account"),
        ] {
            let e = f.db().apply(&change, pw).unwrap_err();
            assert!(matches!(&e, Refused(why) if why.contains(says)), "{change:?}: {e}");
        }
        assert_eq!((f.file("etc/passwd"), f.file("etc/shadow")), (passwd, shadow));
    }

    #[test]
    fn uids_run_out_with_a_clear_refusal() {
        let f = Fixture::new();
        for name in ["b", "c"] {
            f.db()
                .apply(&Change::UserAdd { name: user(name), chosen: true }, Some("a long password 1"))
                .unwrap();
        }
        let e = f.db().apply(&Change::UserAdd { name: user("d"), chosen: false }, None).unwrap_err();
        assert_eq!(e, Refused("no free uid left for this kind of account".into()));
    }

    #[test]
    fn lock_expire_and_list() {
        let f = Fixture::new();
        f.db().apply(&Change::UserLock { name: user("alice") }, None).unwrap();
        assert!(f.file("etc/shadow").contains("alice:!$6$a$b:1:"));
        f.db().apply(&Change::UserLock { name: user("alice") }, None).unwrap();
        assert!(f.file("etc/shadow").contains("alice:!$6$a$b:1:"), "locking twice adds one `!`");
        f.db().apply(&Change::UserExpire { name: user("alice"), day: Some(20_780) }, None).unwrap();
        let list = f.db().apply(&Change::UserList, None).unwrap();
        assert_eq!(
            list["accounts"],
            json!([{"name": "alice", "uid": 2001, "locked": true, "expires": "2026-11-23", "totp": false}])
        );
        assert!(f.file("etc/shadow").contains("alice:!$6$a$b:1:0:99999:7::20780:\n"));
        f.db().apply(&Change::UserUnlock { name: user("alice") }, None).unwrap();
        f.db().apply(&Change::UserExpire { name: user("alice"), day: None }, None).unwrap();
        assert!(f.file("etc/shadow").contains("alice:$6$a$b:1:0:99999:7:::\n"));
        let admins = f.db().apply(&Change::AdminList, None).unwrap();
        assert_eq!(admins["accounts"][0]["name"], "ops");
        assert_eq!(admins["accounts"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn removing_takes_the_lines_and_the_home() {
        let f = Fixture::new();
        let added = f.db().apply(&Change::UserAdd { name: user("carol"), chosen: false }, None).unwrap();
        std::fs::write(f.plan.chat.homes.join("carol/.irssi"), "x").unwrap();
        let totp = f.dir.path().join(format!("totp/{}", added["uid"]));
        f.enrol(&totp);
        let gone = f.db().apply(&Change::UserRemove { name: user("carol") }, None).unwrap();
        assert_eq!(gone["processes_killed"], 0);
        assert!(!f.file("etc/passwd").contains("carol") && !f.file("etc/shadow").contains("carol"));
        assert!(!f.plan.chat.homes.join("carol").exists());
        assert!(!totp.exists(), "the second factor outlived its account");
        // The name can be taken again, with a fresh home.
        f.db().apply(&Change::UserAdd { name: user("carol"), chosen: false }, None).unwrap();
        assert_eq!(std::fs::read_dir(f.plan.chat.homes.join("carol")).unwrap().count(), 0);
    }

    /// A lost phone: the admin drops the second factor, and only that.
    #[test]
    fn reset_totp_drops_the_second_factor() {
        let f = Fixture::new();
        let totp = f.dir.path().join("totp/2001");
        f.enrol(&totp);
        let list = f.db().apply(&Change::UserList, None).unwrap();
        assert_eq!(list["accounts"][0]["totp"], true);
        let reset = f.db().apply(&Change::UserResetTotp { name: user("alice") }, None).unwrap();
        assert_eq!(reset, json!({"name": "alice", "had_totp": true}));
        assert!(!totp.exists());
        let again = f.db().apply(&Change::UserResetTotp { name: user("alice") }, None).unwrap();
        assert_eq!(again["had_totp"], false);
        let e = f.db().apply(&Change::UserResetTotp { name: user("ops") }, None).unwrap_err();
        assert_eq!(e, Refused("no chat account \"ops\"".into()));
        assert!(f.file("etc/passwd").contains("alice:"));
    }

    #[test]
    fn admins_come_with_their_key_and_the_last_one_stays() {
        let f = Fixture::new();
        let a =
            f.db().apply(&Change::AdminAdd { name: user("eve"), key: format!("  {KEY}  ") }, None).unwrap();
        assert_eq!(a["uid"], 3002);
        assert_eq!(f.file("keys/eve"), format!("{KEY}\n"));
        assert!(f.file("etc/shadow").contains("eve:*:20000:"), "a key-only account is `*`, not `!`");
        f.db().apply(&Change::AdminRemove { name: user("ops") }, None).unwrap();
        assert!(!f.file("etc/passwd").contains("ops:"));
        let e = f.db().apply(&Change::AdminRemove { name: user("eve") }, None).unwrap_err();
        assert!(e.to_string().contains("last admin"), "{e}");
        assert!(f.dir.path().join("keys/eve").exists());
    }

    /// The console password goes to its own root-only file, never to shadow; it must pass the
    /// password rules, and it leaves with its admin.
    #[test]
    fn console_passwords_are_set_for_admins_only_and_removed_with_them() {
        let f = Fixture::new();
        let shadow = f.file("etc/shadow");
        let set =
            |name: &str, pw: &str| f.db().apply(&Change::AdminConsolePassword { name: user(name) }, Some(pw));
        assert!(
            matches!(set("alice", "a long password 1"), Err(Refused(ref w)) if w.contains("no admin account"))
        );
        assert!(matches!(set("ops", "short"), Err(Refused(ref w)) if w.contains("at least")));
        assert!(!f.dir.path().join("etc/cloister/console-passwords").exists());
        set("ops", "a long password 1").unwrap();
        set("ops", "a longer password 2").unwrap();
        let console = f.file("etc/cloister/console-passwords");
        assert_eq!(console.lines().count(), 1, "{console}");
        let hash = console.strip_prefix("ops:").unwrap().trim_end();
        assert!(passwd::verify("a longer password 2", hash) && !passwd::verify("a long password 1", hash));
        let mode =
            std::fs::metadata(f.dir.path().join("etc/cloister/console-passwords")).unwrap().permissions();
        assert_eq!(mode.mode() & 0o777, 0o600);
        assert_eq!(f.file("etc/shadow"), shadow, "shadow never holds a console password");
        let admins = f.db().apply(&Change::AdminList, None).unwrap();
        assert_eq!(admins["accounts"][0]["console"], true);
        f.db().apply(&Change::AdminAdd { name: user("eve"), key: KEY.into() }, None).unwrap();
        f.db().apply(&Change::AdminRemove { name: user("ops") }, None).unwrap();
        assert_eq!(f.file("etc/cloister/console-passwords"), "");
    }

    #[test]
    fn changes_travel_as_tagged_json() {
        let c = Change::UserExpire { name: user("alice"), day: Some(3) };
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(text, r#"{"op":"user-expire","name":"alice","day":3}"#);
        for bad in
            [r#"{"op":"rm"}"#, r#"{"op":"user-add","name":"x"}"#, r#"{"op":"user-lock","name":"x","y":1}"#]
        {
            assert!(serde_json::from_str::<Change>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn root_is_never_killed() {
        assert!(kill_uid(0).is_err());
    }
}
