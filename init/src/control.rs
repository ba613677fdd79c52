//! The control socket's protocol: one request line in (plus its secret lines: a chosen password
//! after `user add <name> --password`, passphrases after `disk passphrase …`), one JSON object
//! out, then close. Only root, the plan's admin uids and
//! the admin group may use it (SO_PEERCRED, checked by the supervisor). Adding a command is one
//! variant here and one arm in `Supervisor::answer`; account changes are [`Change`]s that a
//! child process carries out (`accounts.rs`).

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::accounts::Change;
use crate::admin_totp::TotpRequest;
use crate::disk_keys::DiskChange;

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
    /// Chat users and admin accounts: done by a child, answered when it ends.
    Account(Change),
    /// The onion address and sshd's host key fingerprint, with their QR codes.
    Identity,
    /// The caller's second factor: the only requests an enrolled admin may send before a code.
    Totp(TotpRequest),
    /// Disk passphrases: done by a child, answered when it ends.
    Disk(DiskChange),
    /// The kill switch, confirmed with [`cloister_proto::KILL_PHRASE`].
    KillSystem,
}

impl Request {
    /// Secret lines that follow this request's line (a chosen password, passphrases).
    pub fn secret_lines(&self) -> usize {
        match self {
            Request::Account(Change::UserAdd { chosen: true, .. } | Change::AdminConsolePassword { .. }) => 1,
            Request::Disk(change) => change.secret_lines(),
            _ => 0,
        }
    }
}

pub fn parse(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_string())?;
    if text.chars().any(char::is_control) {
        return Err("request has control characters".into());
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    let request = match words[..] {
        ["status"] => Request::Status,
        ["log"] => Request::Log,
        ["poweroff"] => Request::PowerOff,
        ["reboot"] => Request::Reboot,
        ["identity"] => Request::Identity,
        ["restart", name] => Request::Restart(name.to_string()),
        ["user", ..] => Request::Account(parse_user(&words[1..])?),
        ["admin", ..] => Request::Account(parse_admin(&words[1..])?),
        ["totp", ..] => Request::Totp(parse_totp(&words[1..])?),
        // The caller's own: PID 1 fills in the name from the peer's credentials.
        ["console-password"] => Request::Account(Change::AdminConsolePassword { name: String::new() }),
        ["disk", "passphrase", "add"] => Request::Disk(DiskChange::PassphraseAdd),
        ["disk", "passphrase", "remove"] => Request::Disk(DiskChange::PassphraseRemove),
        ["disk", ..] => return Err("disk takes: passphrase add | passphrase remove".into()),
        ["kill-system", ..] if words[1..].join(" ") == cloister_proto::KILL_PHRASE => Request::KillSystem,
        ["kill-system", ..] => {
            return Err(format!("kill-system must be confirmed: kill-system {}", cloister_proto::KILL_PHRASE))
        }
        [cmd, ..] if ["status", "log", "poweroff", "reboot", "restart", "identity"].contains(&cmd) => {
            return Err(format!("wrong number of words for {cmd}"))
        }
        [cmd, ..] => return Err(format!("unknown request {:?}", truncate(cmd, 32))),
        [] => return Err("empty request".into()),
    };
    Ok(request)
}

/// `user list | add <name> [--password] | remove|lock|unlock <name> | expire <name> <date|never>`
fn parse_user(words: &[&str]) -> Result<Change, String> {
    let name = |n: &str| n.to_string();
    Ok(match words {
        ["list"] => Change::UserList,
        ["add", n] => Change::UserAdd { name: name(n), chosen: false },
        ["add", n, "--password"] => Change::UserAdd { name: name(n), chosen: true },
        ["remove", n] => Change::UserRemove { name: name(n) },
        ["lock", n] => Change::UserLock { name: name(n) },
        ["unlock", n] => Change::UserUnlock { name: name(n) },
        ["reset-totp", n] => Change::UserResetTotp { name: name(n) },
        ["expire", n, "never"] => Change::UserExpire { name: name(n), day: None },
        ["expire", n, date] => {
            Change::UserExpire { name: name(n), day: Some(cloister_plan::accounts::parse_date(date)?) }
        }
        _ => {
            return Err("user takes: list | add <name> [--password] | remove <name> | lock <name> | \
                        unlock <name> | expire <name> <YYYY-MM-DD|never> | reset-totp <name>"
                .into())
        }
    })
}

/// `totp status | code <digits> | enrol | confirm <digits>`
fn parse_totp(words: &[&str]) -> Result<TotpRequest, String> {
    Ok(match words {
        ["status"] => TotpRequest::Status,
        ["code", code] => TotpRequest::Code(code.to_string()),
        ["enrol"] => TotpRequest::Enrol,
        ["confirm", code] => TotpRequest::Confirm(code.to_string()),
        _ => return Err("totp takes: status | code <digits> | enrol | confirm <digits>".into()),
    })
}

/// `admin list | add <name> <ssh public key> | remove <name> | reset-totp <name>`
fn parse_admin(words: &[&str]) -> Result<Change, String> {
    Ok(match words {
        ["list"] => Change::AdminList,
        ["reset-totp", n] => Change::AdminResetTotp { name: n.to_string() },
        ["add", n, key @ ..] if !key.is_empty() => {
            Change::AdminAdd { name: n.to_string(), key: key.join(" ") }
        }
        ["remove", n] => Change::AdminRemove { name: n.to_string() },
        _ => {
            return Err(
                "admin takes: list | add <name> <ssh public key> | remove <name> | reset-totp <name>".into()
            )
        }
    })
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A connected client whose request is still arriving or being carried out.
pub struct Client {
    pub stream: UnixStream,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The peer's pid in PID 1's namespace, for the admins' second factor.
    pub pid: Option<i32>,
    /// May hold a secret line: wiped when the client goes.
    buf: Zeroizing<Vec<u8>>,
    deadline: Instant,
    /// A request whose secret lines have not all arrived yet, and those that have.
    pub awaiting_secrets: Option<(Request, Vec<Zeroizing<Vec<u8>>>)>,
    /// The child carrying out an account change; the answer goes out when it ends.
    pub job: Option<crate::accounts::Job>,
}

/// What reading from a client gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    Pending,
    Line(Zeroizing<Vec<u8>>),
    /// Closed early, too long, or too slow: drop it (with this reason to answer, if any).
    Drop(Option<String>),
}

impl Client {
    pub fn new(stream: UnixStream, uid: Option<u32>, gid: Option<u32>, pid: Option<i32>) -> Self {
        Self {
            stream,
            uid,
            gid,
            pid,
            buf: Zeroizing::new(Vec::new()),
            deadline: Instant::now() + CLIENT_DEADLINE,
            awaiting_secrets: None,
            job: None,
        }
    }

    pub fn expired(&self, now: Instant) -> bool {
        now >= self.deadline
    }

    /// Gives a running account change until `deadline` to finish.
    pub fn extend_deadline(&mut self, deadline: Instant) {
        self.deadline = deadline;
    }

    /// The next complete line, reading what is there without blocking (the stream is
    /// non-blocking).
    pub fn read(&mut self) -> Progress {
        let mut chunk = Zeroizing::new([0u8; 512]);
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Zeroizing<Vec<u8>> = Zeroizing::new(self.buf.drain(..=end).collect());
                line.truncate(end);
                return Progress::Line(line);
            }
            if self.buf.len() > MAX_REQUEST {
                return Progress::Drop(Some("request too long".into()));
            }
            match self.stream.read(&mut chunk[..]) {
                Ok(0) => return Progress::Drop(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Progress::Pending,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Progress::Drop(None),
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
        assert_eq!(parse(b"identity"), Ok(Request::Identity));
        assert_eq!(parse(b"totp status"), Ok(Request::Totp(TotpRequest::Status)));
        assert_eq!(parse(b"totp code 123456"), Ok(Request::Totp(TotpRequest::Code("123456".into()))));
        assert_eq!(parse(b"totp enrol"), Ok(Request::Totp(TotpRequest::Enrol)));
        assert_eq!(parse(b"totp confirm 1"), Ok(Request::Totp(TotpRequest::Confirm("1".into()))));
        assert_eq!(
            parse(b"admin reset-totp ops"),
            Ok(Request::Account(Change::AdminResetTotp { name: "ops".into() }))
        );
        assert_eq!(parse(b"user list"), Ok(Request::Account(Change::UserList)));
        let add = parse(b"user add carol --password").unwrap();
        assert_eq!(add, Request::Account(Change::UserAdd { name: "carol".into(), chosen: true }));
        assert_eq!(add.secret_lines(), 1);
        assert_eq!(parse(b"user add carol").unwrap().secret_lines(), 0);
        let disk = parse(b"disk passphrase add").unwrap();
        assert_eq!((disk.clone(), disk.secret_lines()), (Request::Disk(DiskChange::PassphraseAdd), 2));
        assert_eq!(parse(b"disk passphrase remove").unwrap().secret_lines(), 1);
        assert_eq!(parse(b"kill-system destroy  this appliance"), Ok(Request::KillSystem));
        assert_eq!(
            parse(b"user expire carol 2027-01-31"),
            Ok(Request::Account(Change::UserExpire { name: "carol".into(), day: Some(20_849) }))
        );
        assert_eq!(
            parse(b"user expire carol never"),
            Ok(Request::Account(Change::UserExpire { name: "carol".into(), day: None }))
        );
        assert_eq!(
            parse(b"admin add eve ssh-ed25519 AAAA eve@laptop"),
            Ok(Request::Account(Change::AdminAdd {
                name: "eve".into(),
                key: "ssh-ed25519 AAAA eve@laptop".into()
            }))
        );
    }

    #[test]
    fn refuses_malformed_requests() {
        for bad in [
            &b""[..],
            b"   ",
            b"restart",
            b"status now",
            b"\xff\xfe",
            b"rm -rf /",
            b"restart a b",
            b"user",
            b"user add",
            b"user add a b",
            b"user expire carol 2027-02-30",
            b"user expire carol",
            b"admin add eve",
            b"totp",
            b"totp code",
            b"totp code 1 2",
            b"totp off",
            b"disk",
            b"disk passphrase",
            b"disk passphrase add now",
            b"kill-system",
            b"kill-system destroy this",
            b"kill-system destroy this appliance now",
            b"user add \x1b[2Jcarol",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let long = "x".repeat(5000);
        assert!(parse(long.as_bytes()).unwrap_err().len() < 80);
    }

    #[test]
    fn client_gets_a_line_and_refuses_floods() {
        let (mut a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut c = Client::new(b, Some(0), Some(0), None);
        assert_eq!(c.read(), Progress::Pending);
        a.write_all(b"stat").unwrap();
        assert_eq!(c.read(), Progress::Pending);
        a.write_all(b"us\nsecond\nthi").unwrap();
        assert_eq!(c.read(), Progress::Line(Zeroizing::new(b"status".to_vec())));
        // A line that came with the first is there without another read.
        assert_eq!(c.read(), Progress::Line(Zeroizing::new(b"second".to_vec())));
        assert_eq!(c.read(), Progress::Pending);

        let (mut a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut c = Client::new(b, Some(0), Some(0), None);
        a.write_all(&vec![b'x'; MAX_REQUEST + 10]).unwrap();
        assert!(matches!(c.read(), Progress::Drop(Some(_))));

        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut c = Client::new(b, Some(0), Some(0), None);
        drop(a);
        assert_eq!(c.read(), Progress::Drop(None));
    }
}
