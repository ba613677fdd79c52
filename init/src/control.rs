//! The control socket's protocol: one request line in, one JSON object out, then close. Only
//! root and the plan's admin uids may use it (SO_PEERCRED, checked by the supervisor). Adding a
//! command is one variant here and one arm in `Supervisor::answer`.

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Longest request accepted; anything longer is refused unread.
pub const MAX_REQUEST: usize = 1024;
/// A client that has not sent its line by then is dropped.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Status,
    /// The newest lines of the in-memory log.
    Log,
    Restart(String),
    PowerOff,
    Reboot,
}

pub fn parse(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_string())?;
    let mut words = text.split_whitespace();
    let request = match (words.next(), words.next()) {
        (Some("status"), None) => Request::Status,
        (Some("log"), None) => Request::Log,
        (Some("poweroff"), None) => Request::PowerOff,
        (Some("reboot"), None) => Request::Reboot,
        (Some("restart"), Some(name)) => Request::Restart(name.to_string()),
        (Some(cmd), _) => return Err(format!("unknown request {:?}", truncate(cmd, 32))),
        (None, _) => return Err("empty request".into()),
    };
    match words.next() {
        None => Ok(request),
        Some(_) => Err("too many words".into()),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A connected client whose request line is still arriving.
pub struct Client {
    pub stream: UnixStream,
    pub uid: Option<u32>,
    buf: Vec<u8>,
    deadline: Instant,
}

/// What reading from a client gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    Pending,
    Line(Vec<u8>),
    /// Closed early, too long, or too slow: drop it (with this reason to answer, if any).
    Drop(Option<String>),
}

impl Client {
    pub fn new(stream: UnixStream, uid: Option<u32>) -> Self {
        Self { stream, uid, buf: Vec::new(), deadline: Instant::now() + CLIENT_DEADLINE }
    }

    pub fn expired(&self, now: Instant) -> bool {
        now >= self.deadline
    }

    /// Reads what is there without blocking (the stream is non-blocking).
    pub fn read(&mut self) -> Progress {
        let mut chunk = [0u8; 512];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Progress::Drop(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Progress::Pending,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Progress::Drop(None),
            }
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                return Progress::Line(self.buf[..end].to_vec());
            }
            if self.buf.len() > MAX_REQUEST {
                return Progress::Drop(Some("request too long".into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn parses_every_request() {
        assert_eq!(parse(b"status"), Ok(Request::Status));
        assert_eq!(parse(b" log "), Ok(Request::Log));
        assert_eq!(parse(b"restart ngircd"), Ok(Request::Restart("ngircd".into())));
        assert_eq!(parse(b"poweroff"), Ok(Request::PowerOff));
        assert_eq!(parse(b"reboot"), Ok(Request::Reboot));
    }

    #[test]
    fn refuses_malformed_requests() {
        for bad in [&b""[..], b"   ", b"restart", b"status now", b"\xff\xfe", b"rm -rf /", b"restart a b"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let long = "x".repeat(5000);
        assert!(parse(long.as_bytes()).unwrap_err().len() < 80);
    }

    #[test]
    fn client_gets_a_line_and_refuses_floods() {
        let (mut a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut c = Client::new(b, Some(0));
        assert_eq!(c.read(), Progress::Pending);
        a.write_all(b"stat").unwrap();
        assert_eq!(c.read(), Progress::Pending);
        a.write_all(b"us\n").unwrap();
        assert_eq!(c.read(), Progress::Line(b"status".to_vec()));

        let (mut a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut c = Client::new(b, Some(0));
        a.write_all(&vec![b'x'; MAX_REQUEST + 10]).unwrap();
        assert!(matches!(c.read(), Progress::Drop(Some(_))));

        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut c = Client::new(b, Some(0));
        drop(a);
        assert_eq!(c.read(), Progress::Drop(None));
    }
}
