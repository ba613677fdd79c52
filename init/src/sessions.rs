//! The session socket (`/run/cloister/sessions/socket`): each login of a chat user holds one
//! connection from its restricted shell for as long as the login lasts. Only members of the
//! plan's chat group may connect (SO_PEERCRED); a second `hello` from a uid that already holds
//! a session gets `busy`, and since the kernel closes the connection when the shell dies,
//! however it dies, the lock can never go stale. Requests are single lines (protocol in
//! `init/shell`'s crate docs and ARCHITECTURE.md); descriptors arrive with SCM_RIGHTS.
//! Everything is non-blocking: PID 1 serves it from its poll loop.

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

/// Longest request line; a longer one ends the connection.
const MAX_LINE: usize = 1024;
/// Connections at once (each is one login).
const MAX_SESSIONS: usize = 256;

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
}

/// A running chat client: its launch chain (whose ns-init's death takes the client's whole
/// pid namespace with it) and that chain's status pipe.
struct Running {
    job: Job,
    /// `ok` went out: the client is up and owns the terminal.
    started: bool,
}

struct Conn {
    stream: UnixStream,
    uid: u32,
    buf: Vec<u8>,
    /// Said `hello` and got `ok`: this connection is the uid's session.
    holds: bool,
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
                    Ok(Request::Hello) => Some(hello(&conns, i, note)),
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
                    conns[i].holds |= answer == "ok";
                    conns[i].send(&answer);
                }
            }
            conns[i].check_started();
        }
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
        self.conns.iter().filter(|c| c.holds).map(|c| c.uid).collect()
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
                    holds: false,
                    fds: Vec::new(),
                    chat: None,
                    secrets: None,
                    passwd: None,
                });
            }
        }
    }
}

/// `ok` unless another connection of the same uid holds the session.
fn hello(conns: &[Conn], i: usize, note: &mut dyn FnMut(&str)) -> String {
    let uid = conns[i].uid;
    if conns.iter().enumerate().any(|(j, c)| j != i && c.uid == uid && c.holds) {
        note(&format!("cloister: session: uid {uid} is already logged in"));
        return "busy".into();
    }
    "ok".into()
}

/// Starts the password change with the two lines that followed `passwd`; the answer comes
/// when the child exits ([`Sessions::on_exit`]), or now if it cannot start.
fn start_passwd(conn: &mut Conn, note: &mut dyn FnMut(&str)) -> Option<String> {
    let secrets = conn.secrets.take().unwrap_or_default();
    if !conn.holds {
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
    if !conn.holds {
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
    match crate::supervisor::spawn_on_terminal(&svc, &ctx.netns, &ctx.new_root, &ctx.hostname, fds) {
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
