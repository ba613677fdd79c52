//! The client side of the session socket protocol (see the design of issue 7): connecting,
//! `hello`, `chat` with the terminal passed by SCM_RIGHTS, `passwd`, and parsing the replies.
//!
//! The connection is the per-user lock: it stays open for the whole login, and PID 1 ends the
//! session when it closes, however the shell dies.

use std::io::{self, IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};

use crate::input::{Line, LineReader};
use crate::validate::sanitise_text;

/// Where PID 1 listens.
pub const DEFAULT_SOCKET: &str = "/run/cloister/sessions/socket";
/// The longest line either side may send, per the protocol.
const MAX_MESSAGE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connect to {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("send {request} request: {source}")]
    Send { request: &'static str, source: io::Error },
    #[error("pass the terminal with the chat request: {source}")]
    SendFds { source: Errno },
    #[error("receive reply: {source}")]
    Receive { source: io::Error },
    #[error("the chat service closed the connection")]
    Closed,
    #[error("reply from the chat service is too long or not plain ascii")]
    BadReply,
    #[error("unexpected reply from the chat service: {line}")]
    Unexpected { line: String },
    #[error("no reply from the chat service to {request}")]
    NoReply { request: &'static str },
}

/// One reply line from PID 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Busy,
    /// `error <text>`, the text sanitised for display.
    Error(String),
    /// `exited <code>`: the chat program ended.
    Exited(i32),
    /// To `hello`: the account has a second factor; a code must pass first.
    CodeWanted,
    /// To `hello`: the account must set up a second factor first.
    EnrolWanted,
    /// To `totp-new`: the `otpauth://` URI of a fresh secret.
    Secret(String),
}

pub struct Session {
    reader: LineReader<UnixStream>,
}

impl Session {
    pub fn connect(path: &Path) -> Result<Self, SessionError> {
        let stream = UnixStream::connect(path)
            .map_err(|source| SessionError::Connect { path: path.to_path_buf(), source })?;
        Ok(Session { reader: LineReader::new(stream, MAX_MESSAGE) })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.reader.get_ref().as_fd()
    }

    pub fn send_hello(&mut self) -> Result<(), SessionError> {
        self.send("hello", b"hello\n")
    }

    /// `chat TERM=.. LANG=..` with the three terminal fds attached. The caller validated both
    /// values, so the line cannot carry anything but the two fields.
    pub fn send_chat(
        &mut self,
        term: &str,
        lang: &str,
        fds: [BorrowedFd<'_>; 3],
    ) -> Result<(), SessionError> {
        let line = format!("chat TERM={term} LANG={lang}\n");
        let raw = fds.map(|fd| fd.as_raw_fd());
        let rights = [ControlMessage::ScmRights(&raw)];
        let socket = self.reader.get_ref().as_raw_fd();
        let sent = loop {
            let iov = [IoSlice::new(line.as_bytes())];
            match sendmsg::<UnixAddr>(socket, &iov, &rights, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(sent) => break sent,
                Err(Errno::EINTR) => continue,
                Err(source) => return Err(SessionError::SendFds { source }),
            }
        };
        // The fds went with the first byte; a short send only leaves plain bytes to write.
        self.send("chat", &line.as_bytes()[sent..])
    }

    /// `passwd`, then the current and the new password, one line each.
    pub fn send_passwd(&mut self, current: &str, new: &str) -> Result<(), SessionError> {
        let message = zeroize::Zeroizing::new(format!("passwd\n{current}\n{new}\n"));
        self.send("passwd", message.as_bytes())
    }

    /// `code <digits>` (at login) or `totp-confirm <digits>` (enrolling); the caller checked
    /// that `code` is digits only.
    pub fn send_code(&mut self, enrolling: bool, code: &str) -> Result<(), SessionError> {
        let (request, verb) = if enrolling { ("totp-confirm", "totp-confirm") } else { ("code", "code") };
        self.send(request, format!("{verb} {code}\n").as_bytes())
    }

    pub fn send_totp_new(&mut self) -> Result<(), SessionError> {
        self.send("totp-new", b"totp-new\n")
    }

    /// The next reply among the bytes already received, without reading.
    pub fn next_reply(&mut self) -> Option<Result<Reply, SessionError>> {
        self.reader.next_buffered().map(parse_reply)
    }

    /// Reads once from the socket; call when `poll` says it is readable.
    pub fn fill(&mut self) -> Result<(), SessionError> {
        self.reader.fill().map(drop).map_err(|source| SessionError::Receive { source })
    }

    /// `winch`: the terminal changed size while the chat client runs. PID 1 does not answer.
    pub fn send_winch(&mut self) -> Result<(), SessionError> {
        self.send("winch", b"winch\n")
    }

    fn send(&mut self, request: &'static str, bytes: &[u8]) -> Result<(), SessionError> {
        let mut stream = self.reader.get_ref();
        stream.write_all(bytes).map_err(|source| SessionError::Send { request, source })
    }
}

fn parse_reply(line: Line) -> Result<Reply, SessionError> {
    let text = match line {
        Line::Text(text) => text,
        Line::Eof => return Err(SessionError::Closed),
        Line::TooLong | Line::Invalid => return Err(SessionError::BadReply),
    };
    match text.as_str() {
        "ok" => return Ok(Reply::Ok),
        "busy" => return Ok(Reply::Busy),
        "code" => return Ok(Reply::CodeWanted),
        "enrol" => return Ok(Reply::EnrolWanted),
        _ => {}
    }
    if let Some(uri) = text.strip_prefix("secret ") {
        if uri.starts_with("otpauth://totp/") && uri.bytes().all(|b| b.is_ascii_graphic()) {
            return Ok(Reply::Secret(uri.to_string()));
        }
    }
    if let Some(message) = text.strip_prefix("error ") {
        return Ok(Reply::Error(sanitise_text(message)));
    }
    let code = text.strip_prefix("exited ").and_then(|code| code.parse::<i32>().ok());
    code.map(Reply::Exited).ok_or_else(|| SessionError::Unexpected { line: sanitise_text(&text) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Reply, SessionError> {
        parse_reply(Line::Text(text.to_string()))
    }

    #[test]
    fn replies_parse() {
        assert_eq!(parse("ok").unwrap(), Reply::Ok);
        assert_eq!(parse("busy").unwrap(), Reply::Busy);
        assert_eq!(parse("error no irssi\there").unwrap(), Reply::Error("no irssi?here".into()));
        assert_eq!(parse("exited 0").unwrap(), Reply::Exited(0));
        assert_eq!(parse("exited -9").unwrap(), Reply::Exited(-9));
        assert_eq!(parse("code").unwrap(), Reply::CodeWanted);
        assert_eq!(parse("enrol").unwrap(), Reply::EnrolWanted);
        assert_eq!(
            parse("secret otpauth://totp/Cloister:a?secret=AB").unwrap(),
            Reply::Secret("otpauth://totp/Cloister:a?secret=AB".into())
        );
    }

    #[test]
    fn odd_replies_are_errors() {
        for odd in [
            "",
            "OK",
            "ok ",
            "exited",
            "exited x",
            "exited 99999999999",
            "bye",
            "secret",
            "secret https://example.invalid/",
            "secret otpauth://totp/a b",
        ] {
            assert!(matches!(parse(odd), Err(SessionError::Unexpected { .. })), "{odd:?}");
        }
        assert!(matches!(parse_reply(Line::Eof), Err(SessionError::Closed)));
        assert!(matches!(parse_reply(Line::TooLong), Err(SessionError::BadReply)));
        assert!(matches!(parse_reply(Line::Invalid), Err(SessionError::BadReply)));
    }
}
