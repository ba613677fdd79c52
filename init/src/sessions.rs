//! The session socket (`/run/cloister/sessions/socket`): each login of a chat user holds one
//! connection from its restricted shell for as long as the login lasts. Only members of the
//! plan's chat group may connect (SO_PEERCRED); a second `hello` from a uid that already holds
//! a session gets `busy`, and since the kernel closes the connection when the shell dies,
//! however it dies, the lock can never go stale. Requests are single lines (protocol in
//! `init/shell`'s crate docs and ARCHITECTURE.md); descriptors arrive with SCM_RIGHTS.
//! Everything is non-blocking: PID 1 serves it from its poll loop.
//!
//! The second factor is PID 1's to check: `hello` answers `code` when the account has TOTP
//! (`totp.rs`) and `enrol` when the policy wants one it lacks, and the connection holds no
//! session, and may ask for nothing, until `code` (or `totp-confirm`, when enrolling) passes.
//! Three wrong codes end the connection.

use std::io::{ErrorKind, IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cloister_plan::ChatClient;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::socket::{getsockopt, recvmsg, sockopt::PeerCredentials, ControlMessageOwned, MsgFlags};
use nix::unistd::Pid;
use zeroize::{Zeroize, Zeroizing};

use cloister_proto::session::{is_valid_lang, is_valid_term};

use crate::chatclient;
use crate::supervisor::Lines;
use crate::totp;

/// Longest request line; a longer one ends the connection.
const MAX_LINE: usize = 1024;
/// Connections at once (each is one login).
const MAX_SESSIONS: usize = 256;
/// Wrong second-factor codes a login may type before its connection is closed.
pub const MAX_WRONG_CODES: u8 = 3;

pub struct Sessions {
    listener: UnixListener,
    gid: u32,
    conns: Vec<Conn>,
    chat: ChatContext,
}

/// What starting the chat client needs besides the request.
#[derive(Debug, Clone, Default)]
pub struct ChatContext {
    /// `None`: the image has no chat client, and `chat` says so.
    pub client: Option<ChatClient>,
    pub passwd: PathBuf,
    /// Where the per-user client configs are written.
    pub config_dir: PathBuf,
    /// The chat namespace: the client never runs anywhere else.
    pub netns: PathBuf,
    pub new_root: PathBuf,
    pub hostname: String,
    /// The second factors; `None`: logins need none (tests of other things).
    pub totp: Option<totp::Store>,
    /// Accounts without a second factor must enrol one before anything else.
    pub require_totp: bool,
}

/// A running chat client: its launch chain (whose ns-init's death takes the client's whole
/// pid namespace with it) and that chain's status pipe.
struct Running {
    job: Job,
    /// `ok` went out: the client is up and owns the terminal.
    started: bool,
}

/// Where a connection's login stands.
enum Login {
    /// No `hello` yet, or it was answered `busy`.
    Out,
    /// `hello` was answered `code`: a code must pass first.
    Code { enrolment: totp::Enrolment, wrong: u8 },
    /// `hello` was answered `enrol`: a second factor must be set up first.
    Enrol,
    /// This connection is the uid's session.
    In,
}

struct Conn {
    stream: UnixStream,
    uid: u32,
    buf: Vec<u8>,
    login: Login,
    /// A secret offered by `totp-new`, kept until `totp-confirm` proves the app has it.
    offered: Option<totp::Secret>,
    /// Told why it ends: dropped once the answer is out.
    closing: bool,
    /// Descriptors that came with the bytes in `buf`, for the request they belong to.
    fds: Vec<OwnedFd>,
    chat: Option<Running>,
    /// After `passwd`: the two lines that follow are secrets, collected here, never parsed.
    secrets: Option<Vec<Zeroizing<String>>>,
    /// A running password change.
    passwd: Option<Job>,
}

/// A child of PID 1 working for a session, with a pipe it reports on; SIGKILLed with its
/// process group if the session ends first. `pid` is `None` once reaped (it may be reused).
struct Job {
    pid: Option<Pid>,
    out: Lines,
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = killpg(pid, Signal::SIGKILL);
        }
    }
}

/// One request, parsed.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Hello,
    Chat {
        term: String,
        lang: String,
    },
    /// The terminal changed size: pass SIGWINCH to the client. No answer.
    Winch,
    Passwd,
    /// The second factor's code at login.
    Code(String),
    /// Enrolment: a fresh secret, as an `otpauth://` URI for the app.
    TotpNew,
    /// Enrolment: the app's first code proves it holds the offered secret.
    TotpConfirm(String),
}

impl Sessions {
    /// Makes `dir` (0755, so that sshd's namespace can bind it) and the socket (0666: the peer's
    /// credentials decide) inside it.
    pub fn open(dir: &Path, gid: u32, chat: ChatContext) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        let path = dir.join("socket");
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        listener.set_nonblocking(true)?;
        Ok(Self { listener, gid, conns: Vec::new(), chat })
    }

    pub fn fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        let chats = self.conns.iter().filter_map(|c| c.chat.as_ref()).map(|r| r.job.out.fd());
        std::iter::once(self.listener.as_fd()).chain(self.conns.iter().map(|c| c.stream.as_fd())).chain(chats)
    }

    /// Accepts, reads and answers whatever is there now; `note` logs refusals and sessions.
    pub fn serve(&mut self, note: &mut dyn FnMut(&str)) {
        self.accept(note);
        let mut conns = std::mem::take(&mut self.conns);
        conns.retain_mut(|c| match c.receive() {
            Ok(open) => open,
            Err(e) => {
                note(&format!("cloister: session of uid {}: {e}", c.uid));
                false
            }
        });
        for i in 0..conns.len() {
            while let Some(line) = conns[i].take_line() {
                if let Some(secrets) = conns[i].secrets.as_mut() {
                    secrets.push(Zeroizing::new(line));
                    if secrets.len() == 2 {
                        let answer = start_passwd(&mut conns[i], note);
                        conns[i].wipe_consumed();
                        if let Some(answer) = answer {
                            conns[i].send(&answer);
                        }
                    }
                    continue;
                }
                let answer = match parse(&line) {
                    Ok(Request::Hello) => Some(hello(&self.chat, &mut conns, i, note)),
                    Ok(Request::Code(code)) => Some(login_code(&self.chat, &mut conns, i, &code, note)),
                    Ok(Request::TotpNew) => Some(offer_secret(&self.chat, &mut conns[i], note)),
                    Ok(Request::TotpConfirm(code)) => {
                        Some(confirm_secret(&self.chat, &mut conns, i, &code, note))
                    }
                    Ok(Request::Chat { term, lang }) => {
                        start_chat(&self.chat, &mut conns[i], &term, &lang, note)
                    }
                    Ok(Request::Winch) => {
                        if let Some(pid) = conns[i].chat.as_ref().and_then(|r| r.job.pid) {
                            let _ = kill(pid, Signal::SIGWINCH);
                        }
                        None
                    }
                    Ok(Request::Passwd) => {
                        conns[i].secrets = Some(Vec::new());
                        None
                    }
                    Err(why) => Some(format!("error {why}")),
                };
                conns[i].fds.clear();
                if let Some(answer) = answer {
                    conns[i].send(&answer);
                }
                if conns[i].closing {
                    break;
                }
            }
            conns[i].check_started();
        }
        conns.retain(|c| !c.closing);
        let before = conns.len();
        conns.retain(|c| c.buf.len() <= MAX_LINE);
        if conns.len() < before {
            note("cloister: session: request line too long; connection closed");
        }
        self.conns = conns;
    }

    /// A child of PID 1 ended: when it is a chat client's launcher, its session learns
    /// `exited <code>` (or that the client never started). Returns whether it was one.
    pub fn on_exit(&mut self, pid: Pid, code: i32, note: &mut dyn FnMut(&str)) -> bool {
        let is_job = |c: &&mut Conn| c.passwd.as_ref().is_some_and(|j| j.pid == Some(pid));
        if let Some(conn) = self.conns.iter_mut().find(is_job) {
            let Some(mut job) = conn.passwd.take() else { return false };
            // Reaped: never signal that pid again.
            job.pid = None;
            let said = job.out.take().into_iter().chain(job.out.rest()).next().unwrap_or_default();
            let answer = match (code, said.as_str()) {
                (0, "ok") => "ok".to_string(),
                (1, text) if text.starts_with("error ") => text.to_string(),
                _ => "error the password cannot be changed now".to_string(),
            };
            let outcome = if code == 0 { "changed" } else { "not changed" };
            note(&format!("cloister: password of uid {} {outcome}", conn.uid));
            conn.send(&answer);
            return true;
        }
        let Some(conn) =
            self.conns.iter_mut().find(|c| c.chat.as_ref().is_some_and(|r| r.job.pid == Some(pid)))
        else {
            return false;
        };
        let Some(mut running) = conn.chat.take() else { return false };
        running.job.pid = None;
        if running.started {
            conn.send(&format!("exited {code}"));
        } else {
            note(&format!("cloister: chat client of uid {} did not start (exit code {code})", conn.uid));
            conn.send("error the chat client could not start");
        }
        true
    }

    /// The uids holding a session now.
    pub fn logged_in(&self) -> Vec<u32> {
        self.conns.iter().filter(|c| c.holds()).map(|c| c.uid).collect()
    }

    /// Kills every running chat client and password change (shutdown; a change is either
    /// renamed into place or not, never half written).
    pub fn stop_all(&mut self) {
        for c in &mut self.conns {
            c.chat = None;
            c.passwd = None;
        }
    }

    fn accept(&mut self, note: &mut dyn FnMut(&str)) {
        while let Ok((stream, _)) = self.listener.accept() {
            let Ok(cred) = getsockopt(&stream, PeerCredentials) else { continue };
            if cred.gid() != self.gid || self.conns.len() >= MAX_SESSIONS {
                note(&format!("cloister: session: refused uid {} gid {}", cred.uid(), cred.gid()));
                continue;
            }
            if stream.set_nonblocking(true).is_ok() {
                let uid = cred.uid();
                self.conns.push(Conn {
                    stream,
                    uid,
                    buf: Vec::new(),
                    login: Login::Out,
                    offered: None,
                    closing: false,
                    fds: Vec::new(),
                    chat: None,
                    secrets: None,
                    passwd: None,
                });
            }
        }
    }
}

/// `busy` when another connection of the same uid holds the session; otherwise `code` (the
/// account has a second factor), `enrol` (it needs one and has none) or `ok` (logged in).
fn hello(ctx: &ChatContext, conns: &mut [Conn], i: usize, note: &mut dyn FnMut(&str)) -> String {
    if !matches!(conns[i].login, Login::Out) {
        return "error hello was said already".into();
    }
    if let Some(busy) = refuse_second_session(conns, i, note) {
        return busy;
    }
    let uid = conns[i].uid;
    let Some(store) = &ctx.totp else {
        conns[i].login = Login::In;
        return "ok".into();
    };
    match store.load(uid) {
        Ok(Some(enrolment)) => {
            conns[i].login = Login::Code { enrolment, wrong: 0 };
            "code".into()
        }
        Ok(None) if ctx.require_totp => {
            conns[i].login = Login::Enrol;
            "enrol".into()
        }
        Ok(None) => {
            conns[i].login = Login::In;
            "ok".into()
        }
        Err(e) => {
            note(&format!("cloister: session: {e}"));
            "error the second factor cannot be checked now".into()
        }
    }
}

/// `busy` when another connection of connection `i`'s uid holds the session.
fn refuse_second_session(conns: &[Conn], i: usize, note: &mut dyn FnMut(&str)) -> Option<String> {
    let uid = conns[i].uid;
    if conns.iter().enumerate().any(|(j, c)| j != i && c.uid == uid && c.holds()) {
        note(&format!("cloister: session: uid {uid} is already logged in"));
        return Some("busy".into());
    }
    None
}

/// A login's second-factor code: `ok` and the session is held, or why not; the third wrong
/// code closes the connection.
fn login_code(
    ctx: &ChatContext,
    conns: &mut [Conn],
    i: usize,
    code: &str,
    note: &mut dyn FnMut(&str),
) -> String {
    let uid = conns[i].uid;
    let (Some(store), Login::Code { enrolment, wrong }) = (&ctx.totp, &mut conns[i].login) else {
        return "error no code was asked for".into();
    };
    let verdict = match store.check_login(uid, enrolment, code) {
        Ok(verdict) => verdict,
        Err(e) => {
            note(&format!("cloister: session: {e}"));
            return "error the second factor cannot be checked now".into();
        }
    };
    let why = match verdict {
        totp::Verdict::Accepted { .. } => {
            if let Some(busy) = refuse_second_session(conns, i, note) {
                conns[i].login = Login::Out;
                return busy;
            }
            conns[i].login = Login::In;
            return "ok".into();
        }
        totp::Verdict::Reused => "that code was used already; wait for the next one",
        totp::Verdict::Wrong => "wrong code",
    };
    *wrong += 1;
    note(&format!("cloister: session: uid {uid}: {why} ({wrong} of {MAX_WRONG_CODES})"));
    if *wrong >= MAX_WRONG_CODES {
        conns[i].closing = true;
        return "error too many wrong codes".into();
    }
    format!("error {why}")
}

/// `secret <otpauth URI>`: a fresh secret for the account's authenticator app, which counts
/// only once `totp-confirm` has shown a code of it.
fn offer_secret(ctx: &ChatContext, conn: &mut Conn, note: &mut dyn FnMut(&str)) -> String {
    if !matches!(conn.login, Login::In | Login::Enrol) {
        return "error say hello first".into();
    }
    if ctx.totp.is_none() {
        return "error two-factor login is not available on this build".into();
    }
    let passwd = std::fs::read_to_string(&ctx.passwd).unwrap_or_default();
    let Some(name) = chatclient::login_name(&passwd, conn.uid) else {
        return "error this account cannot chat".into();
    };
    match totp::Secret::generate() {
        Ok(secret) => {
            let uri = secret.uri(&name);
            conn.offered = Some(secret);
            format!("secret {}", uri.as_str())
        }
        Err(e) => {
            note(&format!("cloister: session: new second factor: {e}"));
            "error a second factor cannot be made now".into()
        }
    }
}

/// `ok` once `code` is a code of the offered secret: it replaces the account's second factor
/// (and, when the login was waiting for one, the session is held).
fn confirm_secret(
    ctx: &ChatContext,
    conns: &mut [Conn],
    i: usize,
    code: &str,
    note: &mut dyn FnMut(&str),
) -> String {
    let uid = conns[i].uid;
    let (Some(store), Some(secret)) = (&ctx.totp, conns[i].offered.as_ref()) else {
        return "error ask for a new secret first".into();
    };
    let totp::Verdict::Accepted { step } = secret.judge(code, totp::now(), None) else {
        return "error wrong code".into();
    };
    if matches!(conns[i].login, Login::Enrol) {
        if let Some(busy) = refuse_second_session(conns, i, note) {
            return busy;
        }
    }
    let Some(secret) = conns[i].offered.take() else { return "error ask for a new secret first".into() };
    if let Err(e) = store.save(uid, &totp::Enrolment { secret, last_step: Some(step) }) {
        note(&format!("cloister: session: {e}"));
        return "error the second factor cannot be saved now".into();
    }
    note(&format!("cloister: session: uid {uid} enrolled a second factor"));
    conns[i].login = Login::In;
    "ok".into()
}

/// Starts the password change with the two lines that followed `passwd`; the answer comes
/// when the child exits ([`Sessions::on_exit`]), or now if it cannot start.
fn start_passwd(conn: &mut Conn, note: &mut dyn FnMut(&str)) -> Option<String> {
    let secrets = conn.secrets.take().unwrap_or_default();
    if !conn.holds() {
        return Some("error say hello first".into());
    }
    if conn.passwd.is_some() {
        return Some("error a password change is already running".into());
    }
    let [current, new] = &secrets[..] else { return Some("error passwd takes two lines".into()) };
    match spawn_passwd(conn.uid, current, new) {
        Ok(job) => {
            conn.passwd = Some(job);
            None
        }
        Err(e) => {
            note(&format!("cloister: password change for uid {}: {e}", conn.uid));
            Some("error the password cannot be changed now".into())
        }
    }
}

/// `cloister-init --passwd <uid>` with both lines on its stdin and its answer on a pipe.
fn spawn_passwd(uid: u32, current: &str, new: &str) -> Result<Job, String> {
    let input = Zeroizing::new(format!("{current}\n{new}\n"));
    let uid = uid.to_string();
    let (pid, out) = crate::supervisor::spawn_helper(crate::passwd::PASSWD_ARG, &[&uid], input.as_bytes())?;
    match Lines::new(std::fs::File::from(out)) {
        Ok(out) => Ok(Job { pid: Some(pid), out }),
        Err(e) => {
            let _ = killpg(pid, Signal::SIGKILL);
            Err(e)
        }
    }
}

/// Starts the chat client on the terminal that came with the request; `None` until it is up
/// (the answer `ok` follows from [`Conn::check_started`]), or the error to answer.
fn start_chat(
    ctx: &ChatContext,
    conn: &mut Conn,
    term: &str,
    lang: &str,
    note: &mut dyn FnMut(&str),
) -> Option<String> {
    let Some(client) = &ctx.client else {
        return Some("error the chat client is not available on this build".into());
    };
    if !conn.holds() {
        return Some("error say hello first".into());
    }
    if conn.chat.is_some() {
        return Some("error the chat is already open".into());
    }
    let Ok(fds) = <[OwnedFd; 3]>::try_from(std::mem::take(&mut conn.fds)) else {
        return Some("error chat needs the terminal (three descriptors)".into());
    };
    let passwd = std::fs::read_to_string(&ctx.passwd).unwrap_or_default();
    let Some(user) = chatclient::find_user(&passwd, conn.uid, &client.homes) else {
        note(&format!("cloister: chat: uid {} is not a chat user", conn.uid));
        return Some("error this account cannot chat".into());
    };
    let prepared = chatclient::ensure_home(&user)
        .and_then(|()| chatclient::write_config(&ctx.config_dir, &user, client));
    let config = match prepared {
        Ok(path) => path,
        Err(e) => {
            note(&format!("cloister: chat for {}: {e}", user.name));
            return Some("error the chat client could not start".into());
        }
    };
    let svc = chatclient::service(&user, client, &config, term, lang);
    match crate::supervisor::spawn_on_terminal(
        &svc,
        Some(ctx.netns.clone()),
        &ctx.new_root,
        &ctx.hostname,
        fds,
    ) {
        Ok((pid, out)) => {
            note(&format!("cloister: chat started for {} (pid {pid})", user.name));
            conn.chat = Some(Running { job: Job { pid: Some(pid), out }, started: false });
            None
        }
        Err(e) => {
            note(&format!("cloister: chat for {}: {e}", user.name));
            Some("error the chat client could not start".into())
        }
    }
}

fn parse(line: &str) -> Result<Request, String> {
    let mut words = line.split(' ');
    match words.next() {
        Some("hello") if words.next().is_none() => Ok(Request::Hello),
        Some("winch") if words.next().is_none() => Ok(Request::Winch),
        Some("passwd") if words.next().is_none() => Ok(Request::Passwd),
        Some("totp-new") if words.next().is_none() => Ok(Request::TotpNew),
        Some(verb @ ("code" | "totp-confirm")) => {
            let (Some(code), None) = (words.next(), words.next()) else {
                return Err(format!("{verb} takes one code"));
            };
            let code = code.to_owned();
            Ok(if verb == "code" { Request::Code(code) } else { Request::TotpConfirm(code) })
        }
        Some("chat") => {
            let (mut term, mut lang) = (None, None);
            for w in words {
                match w.split_once('=') {
                    Some(("TERM", v)) if term.is_none() => term = Some(v.to_owned()),
                    Some(("LANG", v)) if lang.is_none() => lang = Some(v.to_owned()),
                    _ => return Err("chat takes TERM=<term> LANG=<lang>".into()),
                }
            }
            match (term, lang) {
                (Some(term), Some(lang)) if !is_valid_term(&term) || !is_valid_lang(&lang) => {
                    Err("chat: TERM or LANG is not an allowed value".into())
                }
                (Some(term), Some(lang)) => Ok(Request::Chat { term, lang }),
                _ => Err("chat takes TERM=<term> LANG=<lang>".into()),
            }
        }
        _ => Err("unknown request".into()),
    }
}

impl Conn {
    fn holds(&self) -> bool {
        matches!(self.login, Login::In)
    }

    /// Reads what is there (bytes and descriptors); `Ok(false)` once the peer has closed.
    fn receive(&mut self) -> Result<bool, String> {
        loop {
            let mut chunk = [0u8; 512];
            let mut cmsg = nix::cmsg_space!([RawFd; 3]);
            let mut iov = [IoSliceMut::new(&mut chunk)];
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
            let msg = match recvmsg::<()>(self.stream.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN) => return Ok(true),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.to_string()),
            };
            let n = msg.bytes;
            for c in msg.cmsgs().map_err(|e| e.to_string())? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    self.fds.extend(fds.into_iter().map(crate::sys::own_received_fd));
                }
            }
            if n == 0 {
                return Ok(false);
            }
            self.buf.extend_from_slice(&chunk[..n]);
            if self.buf.len() > MAX_LINE {
                return Ok(true);
            }
        }
    }

    /// Moves what is left of the buffer to fresh memory and zeroes the old, where the bytes of
    /// the lines already taken (secrets, after `passwd`) may still lie beyond its length.
    fn wipe_consumed(&mut self) {
        let mut old = std::mem::take(&mut self.buf);
        self.buf = old.clone();
        old.zeroize();
    }

    /// Answers `ok` once the client's launch chain reports it running.
    fn check_started(&mut self) {
        let Some(running) = self.chat.as_mut() else { return };
        if running.started {
            return;
        }
        if running.job.out.take().iter().any(|v| v == crate::sandbox::STATUS_READY) {
            running.started = true;
            self.send("ok");
        }
    }

    fn take_line(&mut self) -> Option<String> {
        let end = self.buf.iter().position(|&b| b == b'\n')?;
        let line: Vec<u8> = self.buf.drain(..=end).collect();
        Some(String::from_utf8_lossy(&line[..end]).into_owned())
    }

    fn send(&mut self, answer: &str) {
        let _ = self.stream.set_write_timeout(Some(Duration::from_millis(200)));
        let _ = self.stream.write_all(format!("{answer}\n").as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    #[test]
    fn requests_parse_strictly() {
        assert_eq!(parse("hello"), Ok(Request::Hello));
        assert_eq!(parse("passwd"), Ok(Request::Passwd));
        assert_eq!(
            parse("chat TERM=xterm LANG=C.UTF-8"),
            Ok(Request::Chat { term: "xterm".into(), lang: "C.UTF-8".into() })
        );
        assert_eq!(parse("winch"), Ok(Request::Winch));
        assert_eq!(parse("code 123456"), Ok(Request::Code("123456".into())));
        assert_eq!(parse("totp-new"), Ok(Request::TotpNew));
        assert_eq!(parse("totp-confirm 123456"), Ok(Request::TotpConfirm("123456".into())));
        for bad in [
            "",
            "hello x",
            "chat",
            "chat TERM=a",
            "chat TERM=a TERM=b",
            "chat TERM=a LANG=b X=c",
            "chat TERM=$(id) LANG=C",
            "chat TERM=xterm LANG=../../x",
            "winch 1",
            "code",
            "code 1 2",
            "totp-new x",
            "totp-confirm",
            "id",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    /// The group check needs our own gid; the lock is per uid and dies with the connection.
    #[test]
    fn second_hello_of_a_uid_is_busy_until_the_first_closes() {
        let dir = tempfile::tempdir().unwrap();
        let gid = nix::unistd::getegid().as_raw();
        let mut s = Sessions::open(&dir.path().join("sessions"), gid, ChatContext::default()).unwrap();
        let mut notes = Vec::new();
        let mut say = |n: &str| notes.push(n.to_string());
        let path = dir.path().join("sessions/socket");
        let ask = |c: &mut UnixStream, s: &mut Sessions, say: &mut dyn FnMut(&str), line: &str| {
            c.write_all(format!("{line}\n").as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            s.serve(say);
            let mut answer = String::new();
            BufReader::new(c.try_clone().unwrap()).read_line(&mut answer).unwrap();
            answer
        };
        let mut first = UnixStream::connect(&path).unwrap();
        assert_eq!(ask(&mut first, &mut s, &mut say, "hello"), "ok\n");
        let mut second = UnixStream::connect(&path).unwrap();
        assert_eq!(ask(&mut second, &mut s, &mut say, "hello"), "busy\n");
        assert!(ask(&mut second, &mut s, &mut say, "rm -rf /").starts_with("error unknown request"));
        drop(first);
        std::thread::sleep(Duration::from_millis(20));
        s.serve(&mut say);
        assert_eq!(ask(&mut second, &mut s, &mut say, "hello"), "ok\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666);
    }

    /// The two lines after `passwd` are secrets: never parsed as requests (no "unknown request"
    /// echoing them back), and without `hello` first nothing is changed.
    #[test]
    fn lines_after_passwd_are_not_requests() {
        let dir = tempfile::tempdir().unwrap();
        let gid = nix::unistd::getegid().as_raw();
        let mut s = Sessions::open(&dir.path().join("sessions"), gid, ChatContext::default()).unwrap();
        let mut c = UnixStream::connect(dir.path().join("sessions/socket")).unwrap();
        c.write_all(b"passwd\nhello\nrm -rf /\nwinch\nhello\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        s.serve(&mut |_: &str| {});
        c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut r = BufReader::new(c);
        let mut answer = String::new();
        r.read_line(&mut answer).unwrap();
        assert_eq!(answer, "error say hello first\n");
        // After the secrets, lines are requests again and none is lost: `winch` (no answer),
        // then `hello`.
        let mut more = String::new();
        r.read_line(&mut more).unwrap();
        assert_eq!(more, "ok\n");
    }

    /// A session socket whose logins have second factors, for our own uid (`alice`).
    fn with_totp(dir: &Path, require_totp: bool) -> Sessions {
        let passwd = dir.join("passwd");
        let uid = nix::unistd::getuid().as_raw();
        std::fs::write(&passwd, format!("alice:x:{uid}:{uid}::/home/alice:/bin/sh\n")).unwrap();
        let ctx = ChatContext {
            passwd,
            totp: Some(totp::Store::new(dir.join("totp"))),
            require_totp,
            ..ChatContext::default()
        };
        let gid = nix::unistd::getegid().as_raw();
        Sessions::open(&dir.join("sessions"), gid, ctx).unwrap()
    }

    fn ask(c: &UnixStream, s: &mut Sessions, line: &str) -> String {
        // A closed connection: nothing to say, and no answer.
        let _ = (&*c).write_all(format!("{line}\n").as_bytes());
        std::thread::sleep(Duration::from_millis(20));
        s.serve(&mut |_: &str| {});
        c.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut answer = String::new();
        let _ = BufReader::new(c).read_line(&mut answer);
        answer.trim_end().to_string()
    }

    /// The code an authenticator app shows for the secret in `uri` at `at`.
    fn app_code(uri: &str, at: u64) -> String {
        let secret = uri.split("secret=").nth(1).unwrap().split('&').next().unwrap();
        let bytes = data_encoding::BASE32_NOPAD.decode(secret.as_bytes()).unwrap();
        let bytes: [u8; 20] = bytes.try_into().unwrap();
        let app = totp_rs::Builder::new().with_secret(bytes).build().unwrap();
        app.generate(at).to_string()
    }

    /// Enrolment needs a code of the offered secret; from then on `hello` asks for a code and
    /// the session is held only after one passes; a used code and a stale one fail.
    #[test]
    fn a_second_factor_is_enrolled_then_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = with_totp(dir.path(), false);
        let socket = dir.path().join("sessions/socket");
        let first = UnixStream::connect(&socket).unwrap();
        assert_eq!(ask(&first, &mut s, "hello"), "ok");
        assert_eq!(ask(&first, &mut s, "totp-confirm 123456"), "error ask for a new secret first");
        let offer = ask(&first, &mut s, "totp-new");
        let uri = offer.strip_prefix("secret ").unwrap().to_string();
        assert!(uri.starts_with("otpauth://totp/Cloister:alice?secret="), "{uri}");
        let now = totp::now();
        let stale = app_code(&uri, now - 3600);
        assert_eq!(ask(&first, &mut s, &format!("totp-confirm {stale}")), "error wrong code");
        let code = app_code(&uri, now);
        assert_eq!(ask(&first, &mut s, &format!("totp-confirm {code}")), "ok");
        drop(first);

        let second = UnixStream::connect(&socket).unwrap();
        assert_eq!(ask(&second, &mut s, "hello"), "code");
        assert!(s.logged_in().is_empty(), "a session is held before its code");
        assert_eq!(ask(&second, &mut s, "passwd"), "");
        assert_eq!(ask(&second, &mut s, "a\nb"), "error say hello first");
        assert_eq!(
            ask(&second, &mut s, &format!("code {code}")),
            "error that code was used already; wait for the next one"
        );
        let next = app_code(&uri, now + 30);
        assert_eq!(ask(&second, &mut s, &format!("code {next}")), "ok");
        assert_eq!(s.logged_in(), vec![nix::unistd::getuid().as_raw()]);

        let third = UnixStream::connect(&socket).unwrap();
        assert_eq!(ask(&third, &mut s, "hello"), "busy");
        drop(second);
        std::thread::sleep(Duration::from_millis(20));
        s.serve(&mut |_: &str| {});
        assert_eq!(ask(&third, &mut s, "hello"), "code");
        assert_eq!(ask(&third, &mut s, &format!("code {stale}")), "error wrong code");
        assert_eq!(ask(&third, &mut s, "code 12345x"), "error wrong code");
        assert_eq!(ask(&third, &mut s, &format!("code {stale}")), "error too many wrong codes");
        // Closed: the next request gets no answer at all.
        assert_eq!(ask(&third, &mut s, &format!("code {}", app_code(&uri, now + 60))), "");
        assert!(s.logged_in().is_empty());
    }

    /// With the policy on, an account without a second factor gets `enrol` and no session until
    /// it has one.
    #[test]
    fn the_policy_makes_a_login_enrol_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = with_totp(dir.path(), true);
        let c = UnixStream::connect(dir.path().join("sessions/socket")).unwrap();
        assert_eq!(ask(&c, &mut s, "hello"), "enrol");
        assert_eq!(
            ask(&c, &mut s, "chat TERM=xterm LANG=C.UTF-8"),
            "error the chat client is not available on this build"
        );
        assert_eq!(ask(&c, &mut s, "code 123456"), "error no code was asked for");
        assert!(s.logged_in().is_empty());
        let uri = ask(&c, &mut s, "totp-new").strip_prefix("secret ").unwrap().to_string();
        assert_eq!(ask(&c, &mut s, &format!("totp-confirm {}", app_code(&uri, totp::now()))), "ok");
        assert_eq!(s.logged_in().len(), 1);
        let stored = std::fs::read_to_string(dir.path().join("totp").join(nix::unistd::getuid().to_string()));
        assert!(stored.unwrap().starts_with("secret "));
    }

    #[test]
    fn other_groups_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let not_ours = nix::unistd::getegid().as_raw().wrapping_add(4242);
        let mut s = Sessions::open(dir.path(), not_ours, ChatContext::default()).unwrap();
        let mut c = UnixStream::connect(dir.path().join("socket")).unwrap();
        let mut notes = Vec::new();
        s.serve(&mut |n: &str| notes.push(n.to_string()));
        // Already closed: the write fails or the read sees the end, and no answer ever comes.
        let _ = c.write_all(b"hello\n");
        let mut buf = String::new();
        assert!(matches!(BufReader::new(c).read_line(&mut buf), Ok(0) | Err(_)), "{buf:?}");
        assert!(buf.is_empty());
        assert!(notes.iter().any(|n| n.contains("refused uid")), "{notes:?}");
    }
}
