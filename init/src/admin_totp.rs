//! The admins' second factor on the control socket. Each request there is its own connection,
//! so a passed code is remembered for the *process* that sent it, the admin CLI of one login:
//! its pid (SO_PEERCRED, in PID 1's namespace) and its start time, so that a reused pid is
//! not mistaken for it. An admin with a TOTP secret (the same store as chat users', `totp.rs`)
//! gets nothing from the socket until that process has sent `totp code <digits>`; three wrong
//! codes and that process is refused for good. Root (the console) needs no code.
//!
//! `totp enrol` offers a fresh secret (the URI with its QR code) to the asking process, and
//! `totp confirm <digits>` stores it once a code of it passes; from then on the admin's every
//! login asks for a code. Entries of processes that are gone are dropped as requests come.

use serde_json::{json, Value};

use crate::sessions::MAX_WRONG_CODES;
use crate::totp::{self, Store, Verdict};

/// One admin CLI process: its pid and its start time in clock ticks since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Process {
    pub pid: i32,
    pub start: u64,
}

impl Process {
    /// The process `pid` now, as `/proc` describes it; `None` when it is gone.
    pub fn of(pid: i32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name, in parentheses, may hold spaces: fields count from its end.
        let after_name = &stat[stat.rfind(')')? + 1..];
        let start = after_name.split_whitespace().nth(19)?.parse().ok()?;
        Some(Process { pid, start })
    }

    fn alive(&self) -> bool {
        Process::of(self.pid) == Some(*self)
    }
}

/// What the control socket asks of the gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TotpRequest {
    /// Whether the caller has a second factor and whether its process passed a code.
    Status,
    Code(String),
    Enrol,
    Confirm(String),
}

pub struct Gate {
    store: Store,
    /// Processes that passed a code.
    passed: Vec<Process>,
    /// Wrong codes per process.
    wrong: Vec<(Process, u8)>,
    /// A secret offered to a process and the uid it is for, until confirmed.
    offered: Vec<(Process, u32, totp::Secret)>,
}

impl Gate {
    pub fn new(store: Store) -> Self {
        Gate { store, passed: Vec::new(), wrong: Vec::new(), offered: Vec::new() }
    }

    /// `Ok` when `uid`'s request from `process` may go on; otherwise the error to answer.
    pub fn admits(&mut self, uid: u32, process: Option<Process>) -> Result<(), String> {
        if uid == 0 {
            return Ok(());
        }
        match self.store.load(uid) {
            Ok(None) => Ok(()),
            Ok(Some(_)) if process.is_some_and(|p| self.passed.contains(&p)) => Ok(()),
            Ok(Some(_)) => Err("this admin has two-factor login: send `totp code <digits>` first".into()),
            Err(e) => Err(e),
        }
    }

    /// Answers a `totp` request of `uid` (login `name`) from `process`.
    pub fn answer(
        &mut self,
        uid: u32,
        name: Option<&str>,
        process: Option<Process>,
        request: &TotpRequest,
    ) -> Value {
        self.forget_the_gone();
        let Some(process) = process else {
            return refusal("the calling process cannot be identified");
        };
        match request {
            TotpRequest::Status => match self.store.load(uid) {
                Ok(enrolment) => json!({
                    "ok": true,
                    "enrolled": enrolment.is_some(),
                    "passed": uid == 0 || enrolment.is_none() || self.passed.contains(&process),
                }),
                Err(e) => refusal(&e),
            },
            TotpRequest::Code(code) => self.login_code(uid, process, code),
            TotpRequest::Enrol => self.offer(uid, name, process),
            TotpRequest::Confirm(code) => self.confirm(uid, process, code),
        }
    }

    fn login_code(&mut self, uid: u32, process: Process, code: &str) -> Value {
        let wrong = self.wrong.iter().find(|(p, _)| *p == process).map_or(0, |(_, n)| *n);
        if wrong >= MAX_WRONG_CODES {
            return refusal("too many wrong codes; log in again");
        }
        let mut enrolment = match self.store.load(uid) {
            Ok(Some(enrolment)) => enrolment,
            Ok(None) => return refusal("this admin has no second factor"),
            Err(e) => return refusal(&e),
        };
        let why = match self.store.check_login(uid, &mut enrolment, code) {
            Err(e) => return refusal(&e),
            Ok(Verdict::Accepted { .. }) => {
                self.passed.push(process);
                return json!({"ok": true});
            }
            Ok(Verdict::Reused) => "that code was used already; wait for the next one",
            Ok(Verdict::Wrong) => "wrong code",
        };
        self.wrong.retain(|(p, _)| *p != process);
        self.wrong.push((process, wrong + 1));
        if wrong + 1 >= MAX_WRONG_CODES {
            return refusal("too many wrong codes");
        }
        refusal(why)
    }

    /// A fresh secret for the admin's app; an enrolled admin's process must have passed a
    /// code first (the gate saw to that before this request came).
    fn offer(&mut self, uid: u32, name: Option<&str>, process: Process) -> Value {
        if uid == 0 {
            return refusal("root needs no second factor: it is the console");
        }
        let Some(name) = name else { return refusal("this account has no plain login name") };
        let secret = match totp::Secret::generate() {
            Ok(secret) => secret,
            Err(e) => return refusal(&format!("a second factor cannot be made now: {e}")),
        };
        let uri = secret.uri(name);
        let answer = json!({"ok": true, "uri": uri.as_str(), "qr": cloister_qr::lines(&uri)});
        self.offered.retain(|(p, _, _)| *p != process);
        self.offered.push((process, uid, secret));
        answer
    }

    fn confirm(&mut self, uid: u32, process: Process, code: &str) -> Value {
        let Some(i) = self.offered.iter().position(|(p, u, _)| *p == process && *u == uid) else {
            return refusal("ask for a secret first: totp enrol");
        };
        let Verdict::Accepted { step } = self.offered[i].2.judge(code, totp::now(), None) else {
            return refusal("wrong code");
        };
        let (_, _, secret) = self.offered.remove(i);
        if let Err(e) = self.store.save(uid, &totp::Enrolment { secret, last_step: Some(step) }) {
            return refusal(&e);
        }
        self.passed.push(process);
        json!({"ok": true})
    }

    fn forget_the_gone(&mut self) {
        self.passed.retain(Process::alive);
        self.wrong.retain(|(p, _)| p.alive());
        self.offered.retain(|(p, _, _)| p.alive());
    }
}

fn refusal(why: &str) -> Value {
    json!({"ok": false, "error": why})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app_code(uri: &str, at: u64) -> String {
        let secret = uri.split("secret=").nth(1).unwrap();
        let bytes: [u8; 20] =
            data_encoding::BASE32_NOPAD.decode(secret.as_bytes()).unwrap().try_into().unwrap();
        totp_rs::Builder::new().with_secret(bytes).build().unwrap().generate(at).to_string()
    }

    #[test]
    fn this_process_is_found_with_its_start_time() {
        let me = Process::of(std::process::id() as i32).unwrap();
        assert!(me.alive());
        assert!(!Process { start: me.start + 1, ..me }.alive(), "a reused pid passed for the old process");
        assert_eq!(Process::of(i32::MAX), None);
    }

    /// Enrolment passes this process; another process of the same admin must send a code, and
    /// after three wrong ones it is refused even the right one.
    #[test]
    fn an_enrolled_admin_needs_a_code_per_process() {
        let dir = tempfile::tempdir().unwrap();
        let mut gate = Gate::new(Store::new(dir.path()));
        let me = Process::of(std::process::id() as i32);
        assert_eq!(gate.admits(3001, me), Ok(()));
        let status = gate.answer(3001, Some("ops"), me, &TotpRequest::Status);
        assert_eq!(status, json!({"ok": true, "enrolled": false, "passed": true}));
        let offer = gate.answer(3001, Some("ops"), me, &TotpRequest::Enrol);
        let uri = offer["uri"].as_str().unwrap().to_string();
        assert!(uri.starts_with("otpauth://totp/Cloister:ops?secret="));
        assert!(offer["qr"].as_array().unwrap().len() > 10);
        let now = totp::now();
        let wrong = TotpRequest::Confirm(app_code(&uri, now - 3600));
        assert_eq!(gate.answer(3001, Some("ops"), me, &wrong)["error"], "wrong code");
        let right = TotpRequest::Confirm(app_code(&uri, now));
        assert_eq!(gate.answer(3001, Some("ops"), me, &right), json!({"ok": true}));
        assert_eq!(gate.admits(3001, me), Ok(()));

        // A child of ours stands for the admin's next login.
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let other = Process::of(child.id() as i32);
        assert!(gate.admits(3001, other).unwrap_err().contains("totp code"));
        assert_eq!(gate.admits(0, other), Ok(()));
        let used = TotpRequest::Code(app_code(&uri, now));
        assert!(gate.answer(3001, None, other, &used)["error"].as_str().unwrap().contains("used already"));
        let stale = TotpRequest::Code(app_code(&uri, now - 3600));
        assert_eq!(gate.answer(3001, None, other, &stale)["error"], "wrong code");
        assert_eq!(gate.answer(3001, None, other, &stale)["error"], "too many wrong codes");
        let next = TotpRequest::Code(app_code(&uri, now + 30));
        assert_eq!(gate.answer(3001, None, other, &next)["error"], "too many wrong codes; log in again");
        assert!(gate.admits(3001, other).is_err());
        child.kill().unwrap();
        child.wait().unwrap();
        // Gone: its entries go with the next request, and a new process starts afresh.
        let _ = gate.answer(3001, None, me, &TotpRequest::Status);
        assert!(gate.wrong.is_empty());
    }
}
