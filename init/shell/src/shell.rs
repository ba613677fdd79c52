//! The command loop: prompt, one bounded line, one of `help`, `chat`, `passwd`, `totp`,
//! `exit`/`quit`; the second factor's code before it when PID 1 asks for one; and how each way
//! of ending the session is reported (message and exit status).

use std::io::{self, Stdout, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use zeroize::Zeroizing;

use crate::events::{Events, EventsError, Wake};
use crate::input::{Line, LineReader, MAX_TERMINAL_LINE};
use crate::session::{Reply, Session, SessionError, DEFAULT_SOCKET};
use crate::terminal::{discard_pending_input, TerminalError, TerminalReader, TermiosGuard};
use crate::validate::{check_new_password, sanitise_word};

pub const PROMPT: &str = "chat> ";
const HELP: &str = "\
help    show this list
chat    open the chat (irssi); leave it with /quit
passwd  change your password
totp    turn on two-factor login: every login then asks for a code from an app
exit    end the session (also quit or Ctrl-D)
";
const COMMANDS: [&str; 6] = ["help", "chat", "passwd", "totp", "exit", "quit"];
const DEFAULT_IDLE: Duration = Duration::from_secs(15 * 60);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// irssi starts in a fresh sandbox; under emulation that takes a while.
const CHAT_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Password hashing on the server side is deliberately slow.
const PASSWD_TIMEOUT: Duration = Duration::from_secs(60);
/// A code is checked and a secret made at once.
const CODE_TIMEOUT: Duration = Duration::from_secs(10);
/// Codes a login or an enrolment may try; PID 1 closes a login's connection after as many.
const CODE_TRIES: usize = 3;
/// Digits a code has; anything else is refused before it is sent.
const CODE_DIGITS: usize = 6;

/// What the shell runs with: production always uses the defaults.
#[derive(Debug, Clone)]
pub struct Options {
    pub socket: PathBuf,
    pub idle: Duration,
    pub term: String,
    pub lang: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            socket: PathBuf::from(DEFAULT_SOCKET),
            idle: DEFAULT_IDLE,
            term: crate::validate::FALLBACK_TERM.to_string(),
            lang: crate::validate::FALLBACK_LANG.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error(transparent)]
    Events(#[from] EventsError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Terminal(#[from] TerminalError),
    #[error("read terminal: {source}")]
    Read { source: io::Error },
    #[error("write terminal: {source}")]
    Write { source: io::Error },
    #[error("unexpected reply to {request}: {reply:?}")]
    UnexpectedReply { request: &'static str, reply: Reply },
}

/// How a session ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// `exit`, `quit` or end of input.
    User,
    Idle,
    Signal(Signal),
    /// PID 1 closed the connection (or sent something it should not have).
    ServiceClosed,
    Busy,
    Unavailable,
    Refused(String),
    /// The second factor's code was wrong too many times.
    WrongCodes,
    /// The account must have a second factor and none was set up.
    NotEnrolled,
}

impl End {
    fn message(&self) -> Option<String> {
        let text = match self {
            End::User => "bye",
            End::Idle => "idle timeout",
            End::Signal(Signal::SIGHUP) => return None,
            End::Signal(_) => "session terminated",
            End::ServiceClosed => "the chat service closed the session",
            End::Busy => "you are already logged in elsewhere",
            End::Unavailable => "the chat service is not available",
            End::Refused(text) => return Some(format!("the chat service refused the session: {text}")),
            End::WrongCodes => "too many wrong codes",
            End::NotEnrolled => "this account needs two-factor login; log in again to set it up",
        };
        Some(text.to_string())
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            End::User | End::Idle | End::Signal(Signal::SIGHUP | Signal::SIGTERM) => 0,
            End::Signal(signal) => 128u8.saturating_add(*signal as u8),
            End::ServiceClosed
            | End::Busy
            | End::Unavailable
            | End::Refused(_)
            | End::WrongCodes
            | End::NotEnrolled => 1,
        }
    }
}

/// Runs a whole session and returns the exit status, after printing how it ended.
pub fn run(options: Options) -> u8 {
    let mut out = Output { stdout: io::stdout(), mid_line: false };
    let (end, code) = match session(options, &mut out) {
        Ok(end) => {
            let code = end.exit_code();
            (end.message(), code)
        }
        Err(error) => (Some(format!("cloister-shell: {error}")), 1),
    };
    if let Some(message) = end {
        // The terminal may be gone by now; there is nobody left to tell.
        let _ = out.finish(&message, code != 0);
    }
    code
}

fn session(options: Options, out: &mut Output) -> Result<End, ShellError> {
    let events = Events::new()?;
    let Ok(mut session) = Session::connect(&options.socket) else {
        return Ok(End::Unavailable);
    };
    if session.send_hello().is_err() {
        return Ok(End::Unavailable);
    }
    let reply = match wait_reply(&events, &mut session, "hello", Some(HELLO_TIMEOUT)) {
        Err(ShellError::Session(SessionError::NoReply { .. })) => return Ok(End::Unavailable),
        reply => reply?,
    };
    let gate = match reply {
        Waited::Reply(gate @ (Reply::Ok | Reply::CodeWanted | Reply::EnrolWanted)) => gate,
        Waited::Reply(Reply::Busy) => return Ok(End::Busy),
        Waited::Reply(Reply::Error(text)) => return Ok(End::Refused(text)),
        Waited::Reply(reply) => return Err(ShellError::UnexpectedReply { request: "hello", reply }),
        Waited::End(End::ServiceClosed) => return Ok(End::Unavailable),
        Waited::End(end) => return Ok(end),
    };
    let input = LineReader::new(TerminalReader, MAX_TERMINAL_LINE);
    let mut shell = Shell { events, session, input, out, options, last_input: Instant::now() };
    let refused = match gate {
        Reply::CodeWanted => shell.login_code()?,
        Reply::EnrolWanted => {
            shell.out.say("this account needs two-factor login: set it up now")?;
            shell.enrol(true)?
        }
        _ => None,
    };
    if let Some(end) = refused {
        return Ok(end);
    }
    shell.out.say("type help for the commands")?;
    shell.command_loop()
}

enum Waited {
    Reply(Reply),
    End(End),
}

/// Waits for PID 1's next line; signals still end the session meanwhile.
fn wait_reply(
    events: &Events,
    session: &mut Session,
    request: &'static str,
    timeout: Option<Duration>,
) -> Result<Waited, ShellError> {
    let deadline = timeout.and_then(|timeout| Instant::now().checked_add(timeout));
    loop {
        match session.next_reply() {
            Some(Ok(reply)) => return Ok(Waited::Reply(reply)),
            Some(Err(SessionError::Closed)) => return Ok(Waited::End(End::ServiceClosed)),
            Some(Err(error)) => return Err(error.into()),
            None => {}
        }
        match events.wait(None, session.fd(), deadline)? {
            Wake::Signal(signal) => return Ok(Waited::End(End::Signal(signal))),
            Wake::Timeout => return Err(SessionError::NoReply { request }.into()),
            // A reset connection is a closed one.
            Wake::Server if session.fill().is_err() => return Ok(Waited::End(End::ServiceClosed)),
            // While the chat client runs, it learns of the new size through PID 1.
            Wake::Resize if request == "chat" => {
                if session.send_winch().is_err() {
                    return Ok(Waited::End(End::ServiceClosed));
                }
            }
            Wake::Server | Wake::Terminal | Wake::Resize => {}
        }
    }
}

/// The terminal's output, remembering whether the cursor sits after a prompt.
struct Output {
    stdout: Stdout,
    mid_line: bool,
}

impl Output {
    fn say(&mut self, text: &str) -> Result<(), ShellError> {
        self.write(&format!("{text}\n"))
    }

    fn prompt(&mut self, text: &str) -> Result<(), ShellError> {
        self.write(text)?;
        self.mid_line = true;
        Ok(())
    }

    fn line_entered(&mut self) {
        self.mid_line = false;
    }

    fn write(&mut self, text: &str) -> Result<(), ShellError> {
        let mut stdout = self.stdout.lock();
        stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
            .map_err(|source| ShellError::Write { source })
    }

    /// The last words, on a line of their own; errors go to stderr.
    fn finish(&mut self, message: &str, error: bool) -> io::Result<()> {
        let start = if self.mid_line { "\n" } else { "" };
        if error {
            self.stdout.flush()?;
            writeln!(io::stderr(), "{start}{message}")
        } else {
            writeln!(self.stdout, "{start}{message}")?;
            self.stdout.flush()
        }
    }
}

enum Input {
    Line(Line),
    End(End),
}

enum Secret {
    Text(Zeroizing<String>),
    Cancelled,
    End(End),
}

/// A second-factor code as typed.
enum Code {
    Digits(String),
    /// An empty line.
    Empty,
    /// Not a code (said so already).
    Malformed,
    End(End),
}

struct Shell<'out> {
    events: Events,
    session: Session,
    input: LineReader<TerminalReader>,
    out: &'out mut Output,
    options: Options,
    last_input: Instant,
}

impl Shell<'_> {
    fn command_loop(&mut self) -> Result<End, ShellError> {
        loop {
            self.out.prompt(PROMPT)?;
            let text = match self.next_input()? {
                Input::End(end) => return Ok(end),
                Input::Line(Line::Eof) => return Ok(End::User),
                Input::Line(Line::TooLong) => {
                    self.out.say("line too long")?;
                    continue;
                }
                Input::Line(Line::Invalid) => {
                    self.out.say("invalid characters")?;
                    continue;
                }
                Input::Line(Line::Text(text)) => text,
            };
            if let Some(end) = self.command(&text)? {
                return Ok(end);
            }
        }
    }

    fn command(&mut self, line: &str) -> Result<Option<End>, ShellError> {
        let mut words = line.split_ascii_whitespace();
        let Some(command) = words.next() else { return Ok(None) };
        if words.next().is_some() && COMMANDS.contains(&command) {
            self.out.say(&format!("{command} takes no arguments"))?;
            return Ok(None);
        }
        match command {
            "help" => self.out.write(HELP).map(|()| None),
            "chat" => self.chat(),
            "passwd" => self.passwd(),
            "totp" => self.enrol(false),
            "exit" | "quit" => Ok(Some(End::User)),
            other => {
                self.out.say(&format!("unknown command: {}; type help", sanitise_word(other)))?;
                Ok(None)
            }
        }
    }

    /// The next terminal line, unless a signal, the idle timeout or PID 1 ends the session first.
    fn next_input(&mut self) -> Result<Input, ShellError> {
        loop {
            if let Some(line) = self.input.next_buffered() {
                if line != Line::Eof {
                    self.out.line_entered();
                }
                return Ok(Input::Line(line));
            }
            let deadline = self.last_input.checked_add(self.options.idle);
            match self.events.wait(Some(io::stdin().as_fd()), self.session.fd(), deadline)? {
                Wake::Signal(signal) => return Ok(Input::End(End::Signal(signal))),
                Wake::Timeout => return Ok(Input::End(End::Idle)),
                // PID 1 says nothing unasked: anything (or its closing) means the session is over.
                Wake::Server => return Ok(Input::End(End::ServiceClosed)),
                Wake::Resize => {}
                Wake::Terminal => {
                    if self.input.fill().map_err(|source| ShellError::Read { source })? > 0 {
                        self.last_input = Instant::now();
                    }
                }
            }
        }
    }

    fn chat(&mut self) -> Result<Option<End>, ShellError> {
        let (stdin, stdout, stderr) = (io::stdin(), io::stdout(), io::stderr());
        let fds = [stdin.as_fd(), stdout.as_fd(), stderr.as_fd()];
        let restore = TermiosGuard::save(stdin.as_fd())?;
        if self.session.send_chat(&self.options.term, &self.options.lang, fds).is_err() {
            return Ok(Some(End::ServiceClosed));
        }
        match wait_reply(&self.events, &mut self.session, "chat", Some(CHAT_START_TIMEOUT))? {
            Waited::End(end) => return Ok(Some(end)),
            Waited::Reply(Reply::Ok) => {}
            Waited::Reply(Reply::Error(text)) => {
                self.out.say(&format!("chat could not start: {text}"))?;
                return Ok(None);
            }
            Waited::Reply(reply) => return Err(ShellError::UnexpectedReply { request: "chat", reply }),
        }
        // irssi owns the terminal now: the shell reads nothing from it until `exited`.
        let code = match wait_reply(&self.events, &mut self.session, "chat", None)? {
            Waited::End(end) => return Ok(Some(end)),
            Waited::Reply(Reply::Exited(code)) => code,
            Waited::Reply(reply) => return Err(ShellError::UnexpectedReply { request: "chat", reply }),
        };
        drop(restore);
        discard_pending_input(stdin.as_fd());
        self.last_input = Instant::now();
        self.out.mid_line = false;
        match code {
            0 => self.out.say("chat ended")?,
            code => self.out.say(&format!("chat ended (status {code})"))?,
        }
        Ok(None)
    }

    fn passwd(&mut self) -> Result<Option<End>, ShellError> {
        let stdin = io::stdin();
        let quiet = TermiosGuard::echo_off(stdin.as_fd())?;
        let mut answers = Vec::with_capacity(3);
        for prompt in ["current password: ", "new password: ", "new password again: "] {
            match self.read_secret(prompt)? {
                Secret::Text(text) => answers.push(text),
                Secret::Cancelled => return Ok(None),
                Secret::End(end) => return Ok(Some(end)),
            }
        }
        drop(quiet);
        let [current, new, again] = &answers[..] else { return Ok(None) };
        if let Err(error) = check_new_password(current, new, again) {
            self.out.say(&format!("password not changed: {error}"))?;
            return Ok(None);
        }
        if self.session.send_passwd(current, new).is_err() {
            return Ok(Some(End::ServiceClosed));
        }
        drop(answers);
        self.out.say("changing password...")?;
        match wait_reply(&self.events, &mut self.session, "passwd", Some(PASSWD_TIMEOUT))? {
            Waited::End(end) => Ok(Some(end)),
            Waited::Reply(Reply::Ok) => self.out.say("password changed").map(|()| None),
            Waited::Reply(Reply::Error(text)) => {
                self.out.say(&format!("password not changed: {text}")).map(|()| None)
            }
            Waited::Reply(reply) => Err(ShellError::UnexpectedReply { request: "passwd", reply }),
        }
    }

    /// The login's second factor: up to [`CODE_TRIES`] codes; `None` once one passed.
    fn login_code(&mut self) -> Result<Option<End>, ShellError> {
        for _ in 0..CODE_TRIES {
            let code = match self.read_code("verification code: ")? {
                Code::Digits(code) => code,
                Code::Empty | Code::Malformed => continue,
                Code::End(end) => return Ok(Some(end)),
            };
            if self.session.send_code(false, &code).is_err() {
                return Ok(Some(End::ServiceClosed));
            }
            match wait_reply(&self.events, &mut self.session, "code", Some(CODE_TIMEOUT))? {
                Waited::End(end) => return Ok(Some(end)),
                Waited::Reply(Reply::Ok) => return Ok(None),
                Waited::Reply(Reply::Busy) => return Ok(Some(End::Busy)),
                Waited::Reply(Reply::Error(text)) if text == "too many wrong codes" => break,
                Waited::Reply(Reply::Error(text)) => self.out.say(&text)?,
                Waited::Reply(reply) => return Err(ShellError::UnexpectedReply { request: "code", reply }),
            }
        }
        Ok(Some(End::WrongCodes))
    }

    /// `totp`: a fresh secret from PID 1, shown as a QR code and as text; it takes effect once
    /// a code of it is typed back. `required`: the login waits on it, and ends without one.
    fn enrol(&mut self, required: bool) -> Result<Option<End>, ShellError> {
        let not_enrolled = if required { Some(End::NotEnrolled) } else { None };
        if self.session.send_totp_new().is_err() {
            return Ok(Some(End::ServiceClosed));
        }
        let uri = match wait_reply(&self.events, &mut self.session, "totp-new", Some(CODE_TIMEOUT))? {
            Waited::End(end) => return Ok(Some(end)),
            Waited::Reply(Reply::Secret(uri)) => Zeroizing::new(uri),
            Waited::Reply(Reply::Error(text)) => {
                self.out.say(&format!("two-factor login cannot be set up: {text}"))?;
                return Ok(not_enrolled);
            }
            Waited::Reply(reply) => return Err(ShellError::UnexpectedReply { request: "totp-new", reply }),
        };
        self.show_secret(&uri)?;
        for _ in 0..CODE_TRIES {
            let code = match self.read_code("code from the app (empty line: cancel): ")? {
                Code::Digits(code) => code,
                Code::Empty => break,
                Code::Malformed => continue,
                Code::End(end) => return Ok(Some(end)),
            };
            if self.session.send_code(true, &code).is_err() {
                return Ok(Some(End::ServiceClosed));
            }
            match wait_reply(&self.events, &mut self.session, "totp-confirm", Some(CODE_TIMEOUT))? {
                Waited::End(end) => return Ok(Some(end)),
                Waited::Reply(Reply::Ok) => {
                    self.out.say("two-factor login is on: every login asks for a code from the app")?;
                    return Ok(None);
                }
                Waited::Reply(Reply::Busy) => return Ok(Some(End::Busy)),
                Waited::Reply(Reply::Error(text)) => self.out.say(&text)?,
                Waited::Reply(reply) => {
                    return Err(ShellError::UnexpectedReply { request: "totp-confirm", reply })
                }
            }
        }
        self.out.say("two-factor login not changed")?;
        Ok(not_enrolled)
    }

    /// The secret as a QR code for the app, and as grouped text for typing it in by hand.
    fn show_secret(&mut self, uri: &str) -> Result<(), ShellError> {
        let key = uri.split("secret=").nth(1).and_then(|rest| rest.split('&').next()).unwrap_or("");
        let grouped: Vec<String> =
            key.as_bytes().chunks(4).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
        let mut text = Zeroizing::new(String::from("scan this QR code with your authenticator app:\n"));
        for line in cloister_qr::lines(uri) {
            text.push_str(&line);
            text.push('\n');
        }
        text.push_str(&format!("or type this key into it: {}\n", grouped.join(" ")));
        self.out.write(&text)
    }

    /// One code from the terminal: spaces are dropped (apps show `123 456`); anything but
    /// [`CODE_DIGITS`] digits is refused here and never sent.
    fn read_code(&mut self, prompt: &str) -> Result<Code, ShellError> {
        self.out.prompt(prompt)?;
        let typed = match self.next_input()? {
            Input::End(end) => return Ok(Code::End(end)),
            Input::Line(Line::Eof) => return Ok(Code::End(End::User)),
            Input::Line(Line::Text(text)) => text,
            Input::Line(Line::TooLong | Line::Invalid) => String::from("x"),
        };
        let code: String = typed.chars().filter(|c| *c != ' ').collect();
        if code.is_empty() {
            return Ok(Code::Empty);
        }
        if code.len() != CODE_DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
            self.out.say(&format!("a code is the {CODE_DIGITS} digits the app shows"))?;
            return Ok(Code::Malformed);
        }
        Ok(Code::Digits(code))
    }

    fn read_secret(&mut self, prompt: &str) -> Result<Secret, ShellError> {
        self.out.prompt(prompt)?;
        let message = match self.next_input()? {
            Input::End(end) => return Ok(Secret::End(end)),
            Input::Line(Line::Eof) => return Ok(Secret::End(End::User)),
            Input::Line(Line::Text(text)) => return Ok(Secret::Text(Zeroizing::new(text))),
            Input::Line(Line::TooLong) => "line too long",
            Input::Line(Line::Invalid) => "invalid characters",
        };
        self.out.say(message)?;
        self.out.say("password not changed")?;
        Ok(Secret::Cancelled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(End::User.exit_code(), 0);
        assert_eq!(End::Idle.exit_code(), 0);
        assert_eq!(End::Signal(Signal::SIGHUP).exit_code(), 0);
        assert_eq!(End::Signal(Signal::SIGTERM).exit_code(), 0);
        assert_eq!(End::Signal(Signal::SIGINT).exit_code(), 130);
        assert_eq!(End::Signal(Signal::SIGQUIT).exit_code(), 131);
        assert_eq!(End::Busy.exit_code(), 1);
        assert_eq!(End::Unavailable.exit_code(), 1);
        assert_eq!(End::ServiceClosed.exit_code(), 1);
    }

    #[test]
    fn hangup_ends_silently() {
        assert_eq!(End::Signal(Signal::SIGHUP).message(), None);
        assert_eq!(End::Busy.message().as_deref(), Some("you are already logged in elsewhere"));
    }
}
