//! The admin CLI: the login shell of admin accounts (sshd lets them in by key only) and a thin
//! client of PID 1's control socket, which checks the caller's credentials and does the work.
//!
//! `ssh ops@<x>.onion user list` runs one command (sshd starts `cloister-admin -c 'user list'`);
//! a plain `ssh ops@<x>.onion` gets a prompt (`admin> `) until `exit` or end of input. Lines
//! are words; nothing is ever handed to a shell, and no process is started. Exit status in
//! command mode: 0 done, 1 refused or failed, 2 usage.
//!
//! An admin with two-factor login (`totp enrol`) is asked for a code first, in both modes: on
//! the terminal (3 tries), or as the first line of stdin when there is none
//! (`echo 123456 | ssh ops@<x>.onion user list`). PID 1 keeps the pass for this process only.
//!
//! On a terminal, a session that waits longer than its idle timeout ends, at the prompt or at
//! a command's question (a password, a code, a confirmation; the command is then not done)
//! (`CLOISTER_ADMIN_IDLE_SECS`, which sshd's `SetEnv` and the console service set from
//! `[admin] idle_timeout_secs`; 15 minutes without it).
//!
//! Test-only option, only as the first arguments: `--control-socket PATH` (sshd passes a user's
//! command only after `-c`, so a user cannot inject it).
#![forbid(unsafe_code)]

mod format;

use std::io::{BufRead, IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use zeroize::Zeroizing;

/// Longest line accepted (an admin key with its comment fits).
const MAX_LINE: usize = 2048;
/// PID 1 answers an account change when its child ends (at most a minute).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(90);
/// ... and a disk passphrase change (the KDF runs several times) within five.
const DISK_ANSWER_TIMEOUT: Duration = Duration::from_secs(330);

const HELP: &str = "\
commands:
  show                                the onion address and ssh host key, as text and QR codes
  status [--json]                     services, memory, firewall, network, grow fill, uptime
                                      (--json: PID 1's answer as it is)
  log                                 the newest lines of the appliance's log
  user list                           chat users, locked, expiry, second factor, logged in
  user add <name>                     add a chat user with a generated password (shown once)
  user add <name> --password          ... with a password you type (twice)
  user remove <name>                  end its sessions at once, remove it and its home
  user lock <name> | unlock <name>    locking also ends its sessions
  user expire <name> <YYYY-MM-DD|never>
  user reset-totp <name>              drop its second factor (a lost phone)
  admin list
  admin add <name> <ssh-ed25519 key>  an admin who logs in with that key
  admin remove <name>                 never the last one
  admin reset-totp <name>             drop an admin's second factor
  totp enrol                          two-factor login for your account: scan, type a code back
  console-password                    set your password for the appliance's own console (twice)
  disk passphrase add                 current passphrase, then a new one twice (or 3 lines on stdin)
  disk passphrase remove              never the last one of a disk
  kill-system                         destroy the disk's keys and power off (asks twice)
  restart <service>
  poweroff | reboot
  help | exit";

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut socket = Path::new(cloister_plan::RUN_DIR).join(cloister_plan::CONTROL_SOCKET);
    if args.first().map(String::as_str) == Some("--control-socket") && args.len() >= 2 {
        socket = PathBuf::from(args.remove(1));
        args.remove(0);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if matches!(args[..], [] | ["-c", _]) {
        if let Err(e) = second_factor(&socket) {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
    let code = match args[..] {
        [] => interactive(&socket),
        ["-c", command] => match run(&socket, command) {
            Ok(text) => {
                println!("{text}");
                0
            }
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        },
        _ => {
            eprintln!("usage: cloister-admin [-c '<command>']; type help for the commands");
            2
        }
    };
    std::process::exit(code)
}

/// Digits of a TOTP code; anything else is refused here and never sent.
const CODE_DIGITS: usize = 6;
const CODE_TRIES: usize = 3;

/// When this admin has two-factor login and this process has not passed it: a code from the
/// terminal (up to three) or from the first line of stdin.
fn second_factor(socket: &Path) -> Result<(), String> {
    // A PID 1 that cannot say leaves the decision to each request's own refusal.
    let Ok(status) = request(socket, "totp status", None) else { return Ok(()) };
    if status["enrolled"] != Value::Bool(true) || status["passed"] == Value::Bool(true) {
        return Ok(());
    }
    send_codes(socket, "verification code: ", "totp code").map_err(|e| format!("{e}; log in again"))
}

/// Codes read with `prompt` (up to three on a terminal, one from stdin), each sent as
/// `<request> <code>`, until PID 1 takes one.
fn send_codes(socket: &Path, prompt: &str, request_words: &str) -> Result<(), String> {
    let tries = if std::io::stdin().is_terminal() { CODE_TRIES } else { 1 };
    for _ in 0..tries {
        let code = match read_code(prompt) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("{e}");
                continue;
            }
        };
        match request(socket, &format!("{request_words} {code}"), None) {
            Ok(_) => return Ok(()),
            Err(e) if e.starts_with("too many") => return Err(e),
            Err(e) => eprintln!("{e}"),
        }
    }
    Err("no valid code".into())
}

/// One code: prompted on the terminal (on stderr: stdout is the command's), or the next line
/// of stdin. Spaces are dropped, as apps show `123 456`.
fn read_code(prompt: &str) -> Result<String, String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("{prompt}");
        let _ = std::io::stderr().flush();
    }
    let line = answer_line()?.ok_or("no code given")?;
    let code: String = line.chars().filter(|c| *c != ' ').collect();
    if code.len() != CODE_DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("a code is the {CODE_DIGITS} digits the app shows"));
    }
    Ok(code)
}

/// `totp enrol`: a fresh secret as a QR code and as text; it counts once a code of it is
/// typed back.
fn enrol(socket: &Path) -> Result<String, String> {
    let offer = request(socket, "totp enrol", None)?;
    println!("{}", format::secret(&offer));
    send_codes(socket, "code from the app: ", "totp confirm")
        .map(|()| "two-factor login is on: every login asks for a code from the app".to_string())
        .map_err(|e| format!("{e}: two-factor login not changed"))
}

/// The prompt loop; a refused command is reported and the loop goes on.
fn interactive(socket: &Path) -> i32 {
    println!("cloister admin; type help for the commands");
    let idle = session_idle();
    loop {
        print!("admin> ");
        let _ = std::io::stdout().flush();
        if !input_within(&std::io::stdin(), idle) {
            println!("\n{}", idle_message(idle));
            return 0;
        }
        // Locked per line: a command may read stdin itself (a code, a password), and stdin's
        // lock is not reentrant; its buffer is shared, so nothing read ahead is lost.
        let line = match read_bounded_line(&mut std::io::stdin().lock()) {
            Ok(Some(line)) => line,
            Ok(None) => return 0,
            Err(e) => {
                println!("error: {e}");
                continue;
            }
        };
        if matches!(line.trim(), "exit" | "quit") {
            println!("bye");
            return 0;
        }
        match run(socket, &line) {
            Ok(text) if text.is_empty() => {}
            Ok(text) => println!("{text}"),
            Err(e) => println!("error: {e}"),
        }
    }
}

/// This session's idle timeout: at the prompt, and for every answer a command asks for.
fn session_idle() -> Duration {
    idle_timeout(std::env::var(cloister_plan::accounts::ADMIN_IDLE_ENV).ok().as_deref())
}

fn idle_message(idle: Duration) -> String {
    format!("idle for {} s: logged out", idle.as_secs())
}

/// A command's question left unanswered for the idle timeout ends the session as the prompt
/// does: otherwise whoever finds the terminal later could answer it (a password for a user,
/// the kill switch's phrase) and get the prompt back. Nothing was sent to PID 1 yet, so the
/// command did not happen; the exit status says so.
fn log_out_idle(idle: Duration) -> ! {
    eprintln!("\n{}; the command was not done", idle_message(idle));
    std::process::exit(1)
}

/// The next line of stdin, waiting at most the idle timeout when stdin is a terminal.
fn answer_line() -> Result<Option<String>, String> {
    let idle = session_idle();
    if !input_within(&std::io::stdin(), idle) {
        log_out_idle(idle);
    }
    read_bounded_line(&mut std::io::stdin().lock())
}

/// The idle timeout from the environment's value, within the config's bounds (a value out of
/// them, or none, is the default: the variable comes from our own sshd and console service).
fn idle_timeout(value: Option<&str>) -> Duration {
    use cloister_plan::accounts::{ADMIN_IDLE_SECS, DEFAULT_ADMIN_IDLE_SECS};
    let secs = value.and_then(|v| v.parse().ok()).filter(|s| ADMIN_IDLE_SECS.contains(s));
    Duration::from_secs(secs.unwrap_or(DEFAULT_ADMIN_IDLE_SECS))
}

/// Whether input arrives on a terminal stdin within `idle` (always, when stdin is not a
/// terminal: piped commands are read to their end). On a terminal in canonical mode a read
/// takes one line, so nothing typed can wait unseen in stdin's buffer while this polls.
fn input_within(input: &(impl AsFd + IsTerminal), idle: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    if !input.is_terminal() {
        return true;
    }
    let deadline = std::time::Instant::now() + idle;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = PollTimeout::try_from(left.as_millis().clamp(1, i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(input.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            // Whole milliseconds, rounded down: a poll may end a little before the deadline.
            Ok(0) if left.is_zero() => return false,
            Ok(0) => continue,
            Ok(_) => return true,
            // A signal: poll again for what is left.
            Err(nix::errno::Errno::EINTR) if !left.is_zero() => continue,
            // Cannot wait: let the read below say what is wrong.
            Err(_) => return true,
        }
    }
}

/// One line of at most [`MAX_LINE`] bytes (a longer one is read to its end and refused);
/// `None` at the end of input.
fn read_bounded_line(input: &mut impl BufRead) -> Result<Option<String>, String> {
    let mut buf = Vec::new();
    let n =
        input.by_ref().take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf).map_err(|e| e.to_string())?;
    if n == 0 {
        return Ok(None);
    }
    if !buf.ends_with(b"\n") && buf.len() > MAX_LINE {
        skip_line(input);
        return Err(format!("line too long (at most {MAX_LINE} bytes)"));
    }
    let text = String::from_utf8(buf).map_err(|_| "the line is not UTF-8".to_string())?;
    Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()))
}

/// Drops input up to and including the next newline, without keeping it.
fn skip_line(input: &mut impl BufRead) {
    loop {
        let Ok(chunk) = input.fill_buf() else { return };
        if chunk.is_empty() {
            return;
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => return input.consume(i + 1),
            None => {
                let n = chunk.len();
                input.consume(n);
            }
        }
    }
}

/// Runs one command line; the text to show, or why it failed.
fn run(socket: &Path, line: &str) -> Result<String, String> {
    if line.chars().any(char::is_control) || line.len() > MAX_LINE {
        return Err("control characters or an overlong line; type help for the commands".into());
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    match words[..] {
        [] => Ok(String::new()),
        ["help"] => Ok(HELP.into()),
        ["user", "add", name, "--password"] => {
            let password = ask_new_password(name)?;
            let answer = request(socket, &format!("user add {name} --password"), Some(&password))?;
            Ok(format::added(&answer))
        }
        ["show"] => Ok(format::identity(&request(socket, "identity", None)?)),
        // For scripts (the benchmark): PID 1's answer as it came.
        ["status", "--json"] => Ok(request(socket, "status", None)?.to_string()),
        ["console-password"] => {
            let password = ask_new_password("the console")?;
            Ok(format::answer(&words, &request(socket, "console-password", Some(&password))?))
        }
        ["kill-system"] => kill_system(socket),
        ["disk", "passphrase", "add"] => {
            let current = ask_secret("current disk passphrase: ")?;
            let new = ask_secret("new disk passphrase: ")?;
            if *new != *ask_secret("new disk passphrase again: ")? {
                return Err("the two new passphrases differ; nothing changed".into());
            }
            cloister_proto::disk::check_new_passphrase(&current, &new)?;
            let secrets = [current.as_str(), new.as_str()];
            let answer = request_waiting(socket, &words.join(" "), &secrets, DISK_ANSWER_TIMEOUT)?;
            Ok(format::answer(&words, &answer))
        }
        ["disk", "passphrase", "remove"] => {
            let passphrase = ask_secret("disk passphrase to remove: ")?;
            let answer =
                request_waiting(socket, &words.join(" "), &[passphrase.as_str()], DISK_ANSWER_TIMEOUT)?;
            Ok(format::answer(&words, &answer))
        }
        ["totp", "enrol"] => enrol(socket),
        ["status" | "log" | "poweroff" | "reboot"] | ["restart", _] | ["user" | "admin", ..] => {
            let answer = request(socket, &words.join(" "), None)?;
            Ok(format::answer(&words, &answer))
        }
        _ => Err(format!("unknown command: {}; type help for the commands", words[0])),
    }
}

/// Two confirmations, the second the whole phrase; then the request. The appliance powers off
/// before it can say more than that it started.
fn kill_system(socket: &Path) -> Result<String, String> {
    println!(
        "kill-system destroys the disk's encryption keys: everything on this appliance (chats, \
         accounts, keys, its onion address) is lost for good, and it powers off at once."
    );
    let not_done = |why: &str| Err(format!("{why}; nothing happened"));
    if ask_line("type yes to go on: ")?.trim() != "yes" {
        return not_done("not confirmed");
    }
    let phrase = cloister_proto::KILL_PHRASE;
    if ask_line(&format!("type \"{phrase}\" to destroy it: "))?.trim() != phrase {
        return not_done("the phrase does not match");
    }
    request(socket, &format!("kill-system {phrase}"), None)?;
    Ok("the appliance is destroying its keys and powers off".into())
}

/// One answer: a prompt, then a line of stdin.
fn ask_line(prompt: &str) -> Result<String, String> {
    print!("{prompt}");
    let _ = std::io::stdout().flush();
    answer_line()?.ok_or_else(|| "no answer".to_string())
}

/// A secret typed without echo on the terminal (the controlling one under `ssh -t`, else a
/// terminal stdin), or the next line of stdin when there is none.
fn ask_secret(prompt: &str) -> Result<Zeroizing<String>, String> {
    let idle = session_idle();
    let typed = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/tty") {
        Ok(tty) => {
            let mut prompt_to = &tty;
            secret_from_terminal(&tty, &mut prompt_to, prompt, idle, || {
                read_bounded_line(&mut std::io::BufReader::new(&tty))
            })
        }
        // On the appliance's console the CLI has a terminal on stdin but no controlling one
        // (no /dev/tty), and may not open the console anew (it is root's).
        Err(_) if std::io::stdin().is_terminal() => {
            let stdin = std::io::stdin();
            secret_from_terminal(&stdin, &mut std::io::stderr(), prompt, idle, || {
                read_bounded_line(&mut stdin.lock())
            })
        }
        Err(_) => Secret::Typed(read_bounded_line(&mut std::io::stdin().lock())),
    };
    match typed {
        Secret::Typed(line) => line?.map(Zeroizing::new).ok_or_else(|| "no input for a secret".to_string()),
        Secret::Idle => log_out_idle(idle),
    }
}

/// What a secret's prompt got.
enum Secret {
    Typed(Result<Option<String>, String>),
    /// Nothing for the idle timeout.
    Idle,
}

/// Echo goes off on `terminal` for the answer and comes back whatever happens (a restore
/// guard, so also on an error or an unwinding panic).
fn secret_from_terminal(
    terminal: &(impl AsFd + IsTerminal),
    prompt_to: &mut impl Write,
    prompt: &str,
    idle: Duration,
    read: impl FnOnce() -> Result<Option<String>, String>,
) -> Secret {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let saved = match tcgetattr(terminal) {
        Ok(saved) => saved,
        Err(e) => return Secret::Typed(Err(format!("terminal: {e}"))),
    };
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    if let Err(e) = tcsetattr(terminal, SetArg::TCSAFLUSH, &quiet) {
        return Secret::Typed(Err(format!("terminal: {e}")));
    }
    struct Restore<'a, T: AsFd>(&'a T, nix::sys::termios::Termios);
    impl<T: AsFd> Drop for Restore<'_, T> {
        fn drop(&mut self) {
            let _ = tcsetattr(self.0, SetArg::TCSANOW, &self.1);
        }
    }
    let _restore = Restore(terminal, saved);
    let _ = write!(prompt_to, "{prompt}").and_then(|()| prompt_to.flush());
    let answer = if input_within(terminal, idle) { Secret::Typed(read()) } else { Secret::Idle };
    let _ = writeln!(prompt_to);
    answer
}

/// A chosen password, typed twice without echo on the terminal (or two lines of stdin when
/// there is none), checked by the same rules PID 1 applies.
fn ask_new_password(name: &str) -> Result<Zeroizing<String>, String> {
    let first = ask_secret(&format!("password for {name}: "))?;
    let again = ask_secret("again: ")?;
    if *first != *again {
        return Err("the two passwords differ; nothing changed".into());
    }
    cloister_proto::session::check_new_password("", &first).map_err(|e| e.to_string())?;
    Ok(first)
}

/// Sends one request (and its secret line) and returns PID 1's answer when it says `ok`.
fn request(socket: &Path, line: &str, secret: Option<&str>) -> Result<Value, String> {
    let secrets: Vec<&str> = secret.into_iter().collect();
    request_waiting(socket, line, &secrets, ANSWER_TIMEOUT)
}

/// [`request`] with any number of secret lines, waiting up to `timeout` for the answer.
fn request_waiting(socket: &Path, line: &str, secrets: &[&str], timeout: Duration) -> Result<Value, String> {
    let mut stream = UnixStream::connect(socket)
        .map_err(|e| format!("the control socket is not available ({}): {e}", socket.display()))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let mut out = Zeroizing::new(format!("{line}\n"));
    for secret in secrets {
        out.push_str(secret);
        out.push('\n');
    }
    stream.write_all(out.as_bytes()).map_err(|e| format!("sending the request: {e}"))?;
    let mut text = String::new();
    stream.take(4 << 20).read_to_string(&mut text).map_err(|e| format!("reading the answer: {e}"))?;
    let answer: Value =
        serde_json::from_str(text.trim()).map_err(|_| "the appliance gave no answer".to_string())?;
    if answer["ok"] == Value::Bool(true) {
        Ok(answer)
    } else {
        Err(answer["error"].as_str().unwrap_or("refused").to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A control socket that records the request and answers `answer`.
    fn fake_pid1(answer: &'static str) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = String::new();
            std::io::BufReader::new(s.try_clone().unwrap()).read_line(&mut line).unwrap();
            s.write_all(answer.as_bytes()).unwrap();
            line
        });
        (dir, path, handle)
    }

    #[test]
    fn a_command_becomes_one_request_line() {
        let (_dir, path, pid1) = fake_pid1(r#"{"ok":true,"name":"carol","uid":2002,"password":"abcd-efgh"}"#);
        let text = run(&path, "  user   add carol ").unwrap();
        assert_eq!(pid1.join().unwrap(), "user add carol\n");
        assert!(text.contains("user carol added (uid 2002)") && text.contains("abcd-efgh"), "{text}");
    }

    #[test]
    fn refusals_are_errors_with_pid1s_reason() {
        let (_dir, path, pid1) = fake_pid1(r#"{"ok":false,"error":"\"bob\" already exists"}"#);
        assert_eq!(run(&path, "user add bob"), Err("\"bob\" already exists".into()));
        pid1.join().unwrap();
    }

    #[test]
    fn bad_lines_never_reach_pid1() {
        let nowhere = Path::new("/nonexistent/control");
        for bad in ["rm -rf /", "user add \u{1b}[2J", "sh", "$(id)"] {
            let e = run(nowhere, bad).unwrap_err();
            assert!(e.contains("unknown command") || e.contains("control characters"), "{bad}: {e}");
        }
        assert!(run(nowhere, "help").unwrap().contains("user remove"));
        assert!(run(nowhere, "status").unwrap_err().contains("control socket is not available"));
    }

    #[test]
    fn the_idle_timeout_is_the_environments_within_bounds() {
        let secs = |v| idle_timeout(v).as_secs();
        assert_eq!((secs(Some("20")), secs(Some("86400"))), (20, 86_400));
        for bad in [None, Some(""), Some("9"), Some("86401"), Some("-5"), Some("1e3")] {
            assert_eq!(secs(bad), 900, "{bad:?}");
        }
    }

    #[test]
    fn a_terminal_left_idle_times_out_and_a_typed_line_does_not() {
        let pty = nix::pty::openpty(None, None).unwrap();
        let tty = std::fs::File::from(pty.slave);
        let started = std::time::Instant::now();
        assert!(!input_within(&tty, Duration::from_millis(200)));
        assert!(started.elapsed() >= Duration::from_millis(200));
        // The master stays open: its close would wake the poll with a hang-up instead.
        let mut master = std::fs::File::from(pty.master);
        master.write_all(b"status\n").unwrap();
        assert!(input_within(&tty, Duration::from_secs(5)));
        // A pipe is never idle: piped commands are read to their end.
        let (r, _w) = std::io::pipe().unwrap();
        let r = std::fs::File::from(std::os::fd::OwnedFd::from(r));
        assert!(input_within(&r, Duration::from_millis(1)));
    }

    #[test]
    fn a_secret_prompt_left_idle_gives_up_and_echo_comes_back() {
        use nix::sys::termios::{tcgetattr, LocalFlags};
        let pty = nix::pty::openpty(None, None).unwrap();
        let tty = std::fs::File::from(pty.slave);
        let mut master = std::fs::File::from(pty.master);
        let echo = |t: &std::fs::File| tcgetattr(t).unwrap().local_flags.contains(LocalFlags::ECHO);
        assert!(echo(&tty));
        let mut shown = Vec::new();
        let never = || -> Result<Option<String>, String> { panic!("read without input") };
        let got = secret_from_terminal(&tty, &mut shown, "password: ", Duration::from_millis(200), never);
        assert!(matches!(got, Secret::Idle));
        assert!(echo(&tty), "echo stays off after an idle prompt");
        assert_eq!(shown, b"password: \n");
        // Typed once echo is off: the prompt flushes what was typed ahead of it.
        let seen = tty.try_clone().unwrap();
        let typist = std::thread::spawn(move || {
            for _ in 0..500 {
                if !echo(&seen) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            master.write_all(b"s3cret\n").unwrap();
            master
        });
        let mut echo_while_reading = None;
        let got = secret_from_terminal(&tty, &mut Vec::new(), "again: ", Duration::from_secs(5), || {
            echo_while_reading = Some(echo(&tty));
            read_bounded_line(&mut std::io::BufReader::new(&tty))
        });
        assert!(matches!(got, Secret::Typed(Ok(Some(ref s))) if s == "s3cret"));
        assert_eq!(echo_while_reading, Some(false));
        assert!(echo(&tty));
        drop(typist.join().unwrap());
    }

    #[test]
    fn long_lines_are_refused_and_skipped() {
        let long = format!("{}\nstatus\n", "a".repeat(10 * MAX_LINE));
        let mut input = std::io::Cursor::new(long.into_bytes());
        assert!(read_bounded_line(&mut input).unwrap_err().contains("too long"));
        assert_eq!(read_bounded_line(&mut input).unwrap().as_deref(), Some("status"));
        assert_eq!(read_bounded_line(&mut input).unwrap(), None);
    }
}
