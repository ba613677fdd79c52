//! End-to-end tests of the built shell on a real pseudo-terminal, against a fake PID 1 session
//! server (a unix listener in a temporary directory).

use std::fs::File;
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::pty::openpty;
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::unistd::Pid;

const WAIT: Duration = Duration::from_secs(10);
const GOOD_ENV: [(&str, &str); 2] = [("TERM", "xterm-256color"), ("LANG", "en_US.UTF-8")];

/// The master side of the shell's terminal, with everything the shell wrote so far.
struct Term {
    master: File,
    output: Arc<(Mutex<Vec<u8>>, Condvar)>,
    cursor: usize,
    slave_path: PathBuf,
}

impl Term {
    fn send(&mut self, text: &[u8]) {
        self.master.write_all(text).unwrap();
    }

    /// Waits for `needle` after what was already matched; returns the text up to its end.
    fn expect(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        let (lock, ready) = &*self.output;
        let mut output = lock.lock().unwrap();
        loop {
            let seen = String::from_utf8_lossy(&output[self.cursor..]).into_owned();
            if let Some(at) = seen.find(needle) {
                let upto = self.cursor + seen[..at + needle.len()].len();
                let text = String::from_utf8_lossy(&output[self.cursor..upto]).into_owned();
                self.cursor = upto;
                return text;
            }
            let left = deadline.checked_duration_since(Instant::now());
            let Some(left) = left else { panic!("no {needle:?} in output:\n{seen}") };
            output = ready.wait_timeout(output, left).unwrap().0;
        }
    }

    fn all_output(&self) -> String {
        String::from_utf8_lossy(&self.output.0.lock().unwrap()).into_owned()
    }
}

/// Starts the shell with `args` and exactly `env`, as session leader with the pty as its
/// controlling terminal (util-linux `setsid -c`; setsid execs in place since the child is not a
/// process group leader, so the child's pid is the shell's).
fn spawn(args: &[&str], env: &[(&str, &str)]) -> (Child, Term) {
    let pty = openpty(None, None).unwrap();
    let slave_path = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd())).unwrap();
    let child = {
        let mut command = Command::new("setsid");
        command.arg("-c").arg(env!("CARGO_BIN_EXE_cloister-shell")).args(args).env_clear();
        command.envs(env.iter().copied());
        let stdio = |fd: &OwnedFd| Stdio::from(fd.try_clone().unwrap());
        command.stdin(stdio(&pty.slave)).stdout(stdio(&pty.slave)).stderr(stdio(&pty.slave));
        command.spawn().unwrap()
    };
    drop(pty.slave);
    let master = File::from(pty.master);
    let output = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
    let mut reader = master.try_clone().unwrap();
    let shared = Arc::clone(&output);
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // EIO once the last slave fd is closed: the shell is gone.
        while let Ok(count @ 1..) = reader.read(&mut buf) {
            let (lock, ready) = &*shared;
            lock.lock().unwrap().extend_from_slice(&buf[..count]);
            ready.notify_all();
        }
    });
    (child, Term { master, output, cursor: 0, slave_path })
}

fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("shell did not exit");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A fake PID 1: one connection, handled by `script` on its own thread; the script's result
/// comes back through the receiver.
struct Fake {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn fake<T: Send + 'static>(script: impl FnOnce(UnixStream) -> T + Send + 'static) -> (Fake, Receiver<T>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("socket");
    let listener = UnixListener::bind(&path).unwrap();
    let (done, result) = mpsc::channel();
    thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let _ = done.send(script(stream));
    });
    (Fake { _dir: dir, path }, result)
}

fn socket_args(path: &Path) -> Vec<String> {
    vec!["--session-socket".into(), path.to_str().unwrap().into()]
}

/// One line, read a byte at a time so that nothing after it is consumed.
fn read_line(stream: &mut UnixStream) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8];
    loop {
        match stream.read(&mut byte).unwrap() {
            0 => return None,
            _ if byte[0] == b'\n' => return Some(String::from_utf8(line).unwrap()),
            _ => line.push(byte[0]),
        }
    }
}

fn hello(stream: &mut UnixStream) {
    assert_eq!(read_line(stream).as_deref(), Some("hello"));
    stream.write_all(b"ok\n").unwrap();
}

/// Every line until the shell closes the connection.
fn lines_until_close(stream: &mut UnixStream) -> Vec<String> {
    std::iter::from_fn(|| read_line(stream)).collect()
}

/// A line and the fds that came with it.
fn recv_with_fds(stream: &UnixStream) -> (String, Vec<RawFd>) {
    let (mut line, mut fds) = (Vec::new(), Vec::new());
    while !line.ends_with(b"\n") {
        let mut buf = [0u8; 1024];
        let mut space = nix::cmsg_space!([RawFd; 8]);
        let count = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let flags = MsgFlags::MSG_CMSG_CLOEXEC;
            let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), flags).unwrap();
            for cmsg in msg.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(received) = cmsg {
                    fds.extend(received);
                }
            }
            msg.bytes
        };
        assert!(count > 0, "connection closed mid-line");
        line.extend_from_slice(&buf[..count]);
    }
    line.pop();
    (String::from_utf8(line).unwrap(), fds)
}

fn start(env: &[(&str, &str)], args: &[String]) -> (Child, Term) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (child, mut term) = spawn(&args, env);
    term.expect("chat> ");
    (child, term)
}

#[test]
fn help_and_exit() {
    let (fake, result) = fake(|mut s| {
        hello(&mut s);
        lines_until_close(&mut s)
    });
    let (mut child, mut term) = start(&GOOD_ENV, &socket_args(&fake.path));
    term.send(b"help\n");
    let help = term.expect("chat> ");
    for command in ["help ", "chat ", "passwd ", "exit "] {
        assert!(help.lines().any(|line| line.starts_with(command)), "{command:?} missing in {help}");
    }
    term.send(b"help me\n");
    term.expect("help takes no arguments");
    term.send(b"exit\n");
    term.expect("bye");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    assert_eq!(result.recv_timeout(WAIT).unwrap(), Vec::<String>::new());
}

#[test]
fn unknown_commands_are_echoed_sanitised() {
    let (fake, _result) = fake(|mut s| {
        hello(&mut s);
        lines_until_close(&mut s)
    });
    let (mut child, mut term) = start(&GOOD_ENV, &socket_args(&fake.path));
    term.send(b"rm -rf /\n");
    term.expect("unknown command: rm; type help");
    term.send(format!("{}\n", "a".repeat(33)).as_bytes());
    term.expect("unknown command: ?; type help");
    term.send(b"\x1b]0;owned\x07x\n");
    term.expect("invalid characters");
    term.send("caf\u{e9}\n".as_bytes());
    term.expect("invalid characters");
    term.send(b"\x01help\n");
    term.expect("invalid characters");
    term.send(b"$(id)\n");
    term.expect("unknown command: $(id); type help");
    term.expect("chat> ");
    term.send(b"quit\n");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn megabyte_line_is_dropped_and_memory_does_not_grow() {
    let (fake, _result) = fake(|mut s| {
        hello(&mut s);
        lines_until_close(&mut s)
    });
    let (mut child, mut term) = start(&GOOD_ENV, &socket_args(&fake.path));
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", child.id())).unwrap();
    assert_eq!(comm.trim(), "cloister-shell");
    let before = rss_kib(child.id());
    let mut writer = term.master.try_clone().unwrap();
    let flood = thread::spawn(move || {
        writer.write_all(&vec![b'x'; 1 << 20]).unwrap();
        writer.write_all(b"\n").unwrap();
    });
    flood.join().unwrap();
    term.expect("line too long");
    let after = rss_kib(child.id());
    assert!(after < before + 256, "rss grew from {before} KiB to {after} KiB");
    term.send(b"help\n");
    term.expect("passwd  change your password");
    term.send(b"exit\n");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

#[test]
fn chat_passes_the_terminal_and_waits_for_irssi() {
    let (fake, result) = fake(|mut s| {
        hello(&mut s);
        let (line, fds) = recv_with_fds(&s);
        let targets: Vec<PathBuf> =
            fds.iter().map(|fd| std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap()).collect();
        s.write_all(b"ok\n").unwrap();
        if let Some(&stdout) = fds.get(1) {
            let mut tty =
                std::fs::OpenOptions::new().write(true).open(format!("/proc/self/fd/{stdout}")).unwrap();
            tty.write_all(b"FAKE-IRSSI\r\n").unwrap();
        }
        for fd in &fds {
            nix::unistd::close(*fd).unwrap();
        }
        s.write_all(b"exited 0\n").unwrap();
        let rest = lines_until_close(&mut s);
        (line, targets, rest)
    });
    let (mut child, mut term) = start(&GOOD_ENV, &socket_args(&fake.path));
    term.send(b"chat\n");
    term.expect("FAKE-IRSSI");
    term.expect("chat ended");
    term.expect("chat> ");
    term.send(b"exit\n");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    let (line, targets, rest) = result.recv_timeout(WAIT).unwrap();
    assert_eq!(line, "chat TERM=xterm-256color LANG=en_US.UTF-8");
    assert_eq!(targets, vec![term.slave_path.clone(); 3]);
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn chat_refused_by_the_service_returns_to_the_prompt() {
    let (fake, _result) = fake(|mut s| {
        hello(&mut s);
        let (line, fds) = recv_with_fds(&s);
        for fd in &fds {
            nix::unistd::close(*fd).unwrap();
        }
        s.write_all(b"error irssi is not installed\n").unwrap();
        (line, lines_until_close(&mut s))
    });
    let (mut child, mut term) = start(&GOOD_ENV, &socket_args(&fake.path));
    term.send(b"chat\n");
    term.expect("chat could not start: irssi is not installed");
    term.expect("chat> ");
    term.send(b"exit\n");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

#[test]
fn hostile_environment_is_not_used() {
    let (fake, result) = fake(|mut s| {
        hello(&mut s);
        let (line, fds) = recv_with_fds(&s);
        for fd in &fds {
            nix::unistd::close(*fd).unwrap();
        }
        s.write_all(b"ok\nexited 3\n").unwrap();
        lines_until_close(&mut s);
        line
    });
    let env = [("LD_PRELOAD", "/nonexistent"), ("FOO", "bar"), ("TERM", "$(evil)"), ("LANG", "../../x")];
    let (mut child, mut term) = start(&env, &socket_args(&fake.path));
    term.send(b"chat\n");
    term.expect("chat ended (status 3)");
    term.expect("chat> ");
    term.send(b"exit\n");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    assert_eq!(result.recv_timeout(WAIT).unwrap(), "chat TERM=vt100 LANG=C.UTF-8");
}

#[test]
fn busy_means_logged_in_elsewhere() {
    let (fake, _result) = fake(|mut s| {
        assert_eq!(read_line(&mut s).as_deref(), Some("hello"));
        s.write_all(b"busy\n").unwrap();
        lines_until_close(&mut s)
    });
    let (mut child, mut term) = spawn(&["--session-socket", fake.path.to_str().unwrap()], &GOOD_ENV);
    term.expect("you are already logged in elsewhere");
    assert_eq!(wait_exit(&mut child).code(), Some(1));
    assert!(!term.all_output().contains("chat> "));
}

#[test]
fn missing_service_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("socket");
    let (mut child, mut term) = spawn(&["--session-socket", path.to_str().unwrap()], &GOOD_ENV);
    term.expect("the chat service is not available");
    assert_eq!(wait_exit(&mut child).code(), Some(1));
}

/// A listener nobody accepts on: after the test, `accept` must find no connection.
fn untouched_listener() -> (tempfile::TempDir, PathBuf, UnixListener) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("socket");
    let listener = UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    (dir, path, listener)
}

#[test]
fn commands_are_refused_without_contacting_the_service() {
    let (_dir, path, listener) = untouched_listener();
    let socket = path.to_str().unwrap();
    for args in [&["-c", "id"][..], &["--session-socket", socket, "-c", "id"], &["-c", "--session-socket"]] {
        let (mut child, mut term) = spawn(args, &GOOD_ENV);
        term.expect("this account is for chat only");
        assert_eq!(wait_exit(&mut child).code(), Some(1), "{args:?}");
    }
    let mut forced = GOOD_ENV.to_vec();
    forced.push(("SSH_ORIGINAL_COMMAND", "id"));
    let (mut child, mut term) = spawn(&["--session-socket", socket], &forced);
    term.expect("this account is for chat only");
    assert_eq!(wait_exit(&mut child).code(), Some(1));
    let err = listener.accept().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
}

#[test]
fn no_terminal_is_refused() {
    let (_dir, path, listener) = untouched_listener();
    let output = Command::new(env!("CARGO_BIN_EXE_cloister-shell"))
        .args(["--session-socket", path.to_str().unwrap()])
        .stdin(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&output.stderr), "this account is for chat only\n");
    assert!(output.stdout.is_empty());
    assert_eq!(listener.accept().unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
}

fn signal_ends_session(signal: Signal, code: i32, message: Option<&str>) {
    let (fake, result) = fake(|mut s| {
        hello(&mut s);
        lines_until_close(&mut s)
    });
    let (mut child, mut term) = start(&GOOD_ENV, &socket_args(&fake.path));
    kill(Pid::from_raw(child.id() as i32), signal).unwrap();
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), Some(code), "{signal}: {status:?}");
    // The connection closing is PID 1's signal that the session is over.
    assert_eq!(result.recv_timeout(WAIT).unwrap(), Vec::<String>::new());
    if let Some(message) = message {
        term.expect(message);
    }
}

#[test]
fn sigterm_ends_the_session() {
    signal_ends_session(Signal::SIGTERM, 0, Some("session terminated"));
}

#[test]
fn sighup_ends_the_session() {
    signal_ends_session(Signal::SIGHUP, 0, None);
}

#[test]
fn sigint_ends_the_session() {
    signal_ends_session(Signal::SIGINT, 130, Some("session terminated"));
}

#[test]
fn sigtstp_is_ignored() {
    let (fake, _result) = fake(|mut s| {
        hello(&mut s);
        lines_until_close(&mut s)
    });
    let (mut child, mut term) = start(&GOOD_ENV, &socket_args(&fake.path));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTSTP).unwrap();
    term.send(b"\x1a");
    term.send(b"help\n");
    term.expect("passwd  change your password");
    term.send(b"exit\n");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

#[test]
fn sigkill_still_releases_the_lock() {
    let (fake, result) = fake(|mut s| {
        hello(&mut s);
        lines_until_close(&mut s)
    });
    let (mut child, _term) = start(&GOOD_ENV, &socket_args(&fake.path));
    child.kill().unwrap();
    wait_exit(&mut child);
    assert_eq!(result.recv_timeout(WAIT).unwrap(), Vec::<String>::new());
}

#[test]
fn idle_timeout_ends_the_session() {
    let (fake, _result) = fake(|mut s| {
        hello(&mut s);
        lines_until_close(&mut s)
    });
    let mut args = socket_args(&fake.path);
    args.extend(["--idle-timeout-secs".to_string(), "1".to_string()]);
    let started = Instant::now();
    let (mut child, mut term) = start(&GOOD_ENV, &args);
    term.expect("idle timeout");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[test]
fn input_resets_the_idle_timer() {
    let (fake, _result) = fake(|mut s| {
        hello(&mut s);
        lines_until_close(&mut s)
    });
    let mut args = socket_args(&fake.path);
    args.extend(["--idle-timeout-secs".to_string(), "2".to_string()]);
    let (mut child, mut term) = start(&GOOD_ENV, &args);
    for _ in 0..3 {
        thread::sleep(Duration::from_millis(1000));
        term.send(b"\n");
        term.expect("chat> ");
    }
    assert!(child.try_wait().unwrap().is_none(), "ended although input kept coming");
    term.expect("idle timeout");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

#[test]
fn passwd_checks_locally_then_asks_the_service() {
    let (fake, result) = fake(|mut s| {
        hello(&mut s);
        let mut got = Vec::new();
        for reply in [&b"ok\n"[..], b"error wrong password\n"] {
            for _ in 0..3 {
                got.push(read_line(&mut s).unwrap());
            }
            s.write_all(reply).unwrap();
        }
        got.extend(lines_until_close(&mut s));
        got
    });
    let (mut child, mut term) = start(&GOOD_ENV, &socket_args(&fake.path));
    let passwd = |term: &mut Term, current: &str, new: &str, again: &str| {
        term.send(b"passwd\n");
        term.expect("current password: ");
        term.send(format!("{current}\n").as_bytes());
        term.expect("new password: ");
        term.send(format!("{new}\n").as_bytes());
        term.expect("new password again: ");
        term.send(format!("{again}\n").as_bytes());
    };
    passwd(&mut term, "old secret", "short", "short");
    term.expect("password not changed: the new password must have at least 12 characters");
    passwd(&mut term, "old secret", "another long secret", "another long secreT");
    term.expect("password not changed: the two new passwords differ");
    passwd(&mut term, "the old secret", "the old secret", "the old secret");
    term.expect("password not changed: the new password must differ from the current one");
    passwd(&mut term, "old secret", "new long secret", "new long secret");
    term.expect("password changed");
    passwd(&mut term, "bad secret", "new long secret", "new long secret");
    term.expect("password not changed: wrong password");
    term.expect("chat> ");
    // Echo was off: no password ever reached the screen, and echo is back on afterwards.
    let screen = term.all_output();
    assert!(!screen.contains("secret") && !screen.contains("short"), "{screen}");
    term.send(b"echoed-back\n");
    term.expect("unknown command: echoed-back; type help");
    term.send(b"exit\n");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    let got = result.recv_timeout(WAIT).unwrap();
    let want = ["passwd", "old secret", "new long secret", "passwd", "bad secret", "new long secret"];
    assert_eq!(got, want);
}

#[test]
fn service_closing_ends_the_session() {
    let (fake, _result) = fake(|mut s| {
        hello(&mut s);
        thread::sleep(Duration::from_millis(300));
    });
    let (mut child, mut term) = start(&GOOD_ENV, &socket_args(&fake.path));
    term.expect("the chat service closed the session");
    assert_eq!(wait_exit(&mut child).code(), Some(1));
}

#[test]
fn service_refusing_hello_is_reported() {
    let (fake, _result) = fake(|mut s| {
        assert_eq!(read_line(&mut s).as_deref(), Some("hello"));
        s.write_all(b"error not a chat user\n").unwrap();
        lines_until_close(&mut s)
    });
    let (mut child, mut term) = spawn(&["--session-socket", fake.path.to_str().unwrap()], &GOOD_ENV);
    term.expect("the chat service refused the session: not a chat user");
    assert_eq!(wait_exit(&mut child).code(), Some(1));
}

/// PID 1 wants a code: the shell asks before anything else, refuses what is not six digits
/// without sending it, shows PID 1's verdicts, and gets its prompt only once a code passed.
#[test]
fn a_login_code_comes_before_the_prompt() {
    let (fake, result) = fake(|mut s| {
        assert_eq!(read_line(&mut s).as_deref(), Some("hello"));
        s.write_all(b"code\n").unwrap();
        let mut got = vec![read_line(&mut s).unwrap()];
        s.write_all(b"error wrong code\n").unwrap();
        got.push(read_line(&mut s).unwrap());
        s.write_all(b"ok\n").unwrap();
        got.extend(lines_until_close(&mut s));
        got
    });
    let (mut child, mut term) = spawn_shell(&socket_args(&fake.path));
    term.expect("verification code: ");
    term.send(b"12345x\n");
    term.expect("a code is the 6 digits the app shows");
    term.expect("verification code: ");
    term.send(b"111111\n");
    term.expect("wrong code");
    term.expect("verification code: ");
    term.send(b"222 222\n");
    term.expect("type help for the commands");
    term.send(b"exit\n");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    assert_eq!(result.recv_timeout(WAIT).unwrap(), ["code 111111", "code 222222"]);
}

/// Three wrong codes end the login, with PID 1's last word.
#[test]
fn wrong_codes_end_the_login() {
    let (fake, _result) = fake(|mut s| {
        assert_eq!(read_line(&mut s).as_deref(), Some("hello"));
        s.write_all(b"code\n").unwrap();
        for answer in [&b"error wrong code\n"[..], b"error wrong code\n", b"error too many wrong codes\n"] {
            read_line(&mut s).unwrap();
            s.write_all(answer).unwrap();
        }
        lines_until_close(&mut s)
    });
    let (mut child, mut term) = spawn_shell(&socket_args(&fake.path));
    for _ in 0..3 {
        term.expect("verification code: ");
        term.send(b"123456\n");
    }
    term.expect("too many wrong codes");
    assert_eq!(wait_exit(&mut child).code(), Some(1));
    assert!(!term.all_output().contains("chat> "));
}

/// `enrol`: the login shows the secret as a QR code and as text, and goes on once a code of it
/// passed; an empty line instead cancels, and a required enrolment then ends the login.
#[test]
fn a_required_enrolment_shows_the_secret_and_waits_for_a_code() {
    const URI: &str = "otpauth://totp/Cloister:alice?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";
    let (server, result) = fake(|mut s| {
        assert_eq!(read_line(&mut s).as_deref(), Some("hello"));
        s.write_all(b"enrol\n").unwrap();
        let mut got = vec![read_line(&mut s).unwrap()];
        s.write_all(format!("secret {URI}\n").as_bytes()).unwrap();
        got.push(read_line(&mut s).unwrap());
        s.write_all(b"ok\n").unwrap();
        got.extend(lines_until_close(&mut s));
        got
    });
    let (mut child, mut term) = spawn_shell(&socket_args(&server.path));
    term.expect("this account needs two-factor login: set it up now");
    let shown = term.expect("code from the app (empty line: cancel): ");
    assert!(shown.contains("or type this key into it: GEZD GNBV GY3T QOJQ GEZD GNBV GY3T QOJQ"), "{shown}");
    let blocks = shown.lines().filter(|l| l.contains('\u{2588}')).count();
    assert!(blocks >= 20, "no QR code drawn:\n{shown}");
    term.send(b"654321\n");
    term.expect("two-factor login is on");
    term.expect("chat> ");
    term.send(b"exit\n");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    assert_eq!(result.recv_timeout(WAIT).unwrap(), ["totp-new", "totp-confirm 654321"]);
    drop(server);

    let (cancelled, _result) = fake(|mut s| {
        assert_eq!(read_line(&mut s).as_deref(), Some("hello"));
        s.write_all(b"enrol\n").unwrap();
        read_line(&mut s).unwrap();
        s.write_all(format!("secret {URI}\n").as_bytes()).unwrap();
        lines_until_close(&mut s)
    });
    let (mut child, mut term) = spawn_shell(&socket_args(&cancelled.path));
    term.expect("code from the app (empty line: cancel): ");
    term.send(b"\n");
    term.expect("two-factor login not changed");
    term.expect("this account needs two-factor login; log in again to set it up");
    assert_eq!(wait_exit(&mut child).code(), Some(1));
    assert!(!term.all_output().contains("chat> "));
}

/// The shell on a terminal, before its prompt.
fn spawn_shell(args: &[String]) -> (Child, Term) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn(&args, &GOOD_ENV)
}
