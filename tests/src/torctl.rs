//! A tor control port client, just enough for tests to ask the private network's client tor what
//! it fetched: cookie authentication over a unix socket (no TCP listener anywhere), `GETINFO`
//! with its data replies (control-spec §2.3, dot-escaped lines) and `HSFETCH`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

/// One reply: its final status code, the text of its lines and the data of `+` lines.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
    pub data: Vec<String>,
}

pub struct Control {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Control {
    /// Connects to `socket` and authenticates with the cookie tor wrote to `cookie`.
    pub fn connect(socket: &Path, cookie: &Path) -> Result<Self> {
        let stream =
            UnixStream::connect(socket).with_context(|| format!("connecting to {}", socket.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let writer = stream.try_clone()?;
        let mut me = Self { reader: BufReader::new(stream), writer };
        let cookie = std::fs::read(cookie).with_context(|| format!("reading {}", cookie.display()))?;
        let hex: String = cookie.iter().map(|b| format!("{b:02x}")).collect();
        let reply = me.command(&format!("AUTHENTICATE {hex}"))?;
        ensure!(reply.code == 250, "tor refused the control cookie: {reply:?}");
        Ok(me)
    }

    /// Sends one command line and reads its reply.
    pub fn command(&mut self, line: &str) -> Result<Reply> {
        ensure!(!line.contains(['\r', '\n']), "a control command is one line");
        self.writer.write_all(format!("{line}\r\n").as_bytes())?;
        read_reply(&mut self.reader)
    }

    /// `GETINFO key`'s value (a data reply's text, or a one-line value); `None` when tor answers
    /// that it has nothing for the key (551/552).
    pub fn getinfo(&mut self, key: &str) -> Result<Option<String>> {
        let reply = self.command(&format!("GETINFO {key}"))?;
        match reply.code {
            250 if !reply.data.is_empty() => Ok(Some(reply.data.join("\n") + "\n")),
            250 => {
                let prefix = format!("{key}=");
                let value = reply.lines.iter().find_map(|l| l.strip_prefix(&prefix));
                Ok(Some(value.with_context(|| format!("no {key} in {reply:?}"))?.to_string()))
            }
            551 | 552 => Ok(None),
            _ => bail!("GETINFO {key}: {reply:?}"),
        }
    }

    /// Asks tor to fetch an onion service's descriptor again (it arrives asynchronously).
    pub fn hsfetch(&mut self, service_id: &str) -> Result<()> {
        let reply = self.command(&format!("HSFETCH {service_id}"))?;
        ensure!(reply.code == 250, "HSFETCH {service_id}: {reply:?}");
        Ok(())
    }
}

/// Reads `CCC-text` and `CCC+text` lines (the latter followed by data up to a lone `.`) until
/// the `CCC text` that ends the reply.
pub fn read_reply(r: &mut impl BufRead) -> Result<Reply> {
    let mut reply = Reply::default();
    loop {
        let line = read_line(r)?;
        ensure!(line.len() >= 4 && line.is_char_boundary(3), "malformed control reply line {line:?}");
        let code: u16 = line[..3].parse().with_context(|| format!("control reply line {line:?}"))?;
        let (kind, text) = (line.as_bytes()[3], &line[4..]);
        reply.lines.push(text.to_string());
        match kind {
            b' ' => {
                reply.code = code;
                return Ok(reply);
            }
            b'-' => {}
            b'+' => loop {
                let data = read_line(r)?;
                if data == "." {
                    break;
                }
                // A data line starting with a dot was sent with one more.
                reply.data.push(data.strip_prefix('.').unwrap_or(&data).to_string());
            },
            _ => bail!("malformed control reply line {line:?}"),
        }
    }
}

fn read_line(r: &mut impl BufRead) -> Result<String> {
    let mut line = String::new();
    ensure!(r.read_line(&mut line)? > 0, "tor closed the control connection");
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_reply_is_unescaped_and_ends_at_its_status_line() {
        let text = "250+hs/client/desc/id/x=\r\nhs-descriptor 3\r\n..dot\r\n.\r\n250 OK\r\n552 next\r\n";
        let mut r = std::io::Cursor::new(text.as_bytes());
        let reply = read_reply(&mut r).unwrap();
        assert_eq!(reply.code, 250);
        assert_eq!(reply.data, ["hs-descriptor 3", ".dot"]);
        assert_eq!(read_reply(&mut r).unwrap().code, 552);
    }

    #[test]
    fn mid_reply_lines_are_kept_and_garbage_is_refused() {
        let mut r = std::io::Cursor::new(&b"250-version=0.4.8\r\n250 OK\r\n"[..]);
        assert_eq!(read_reply(&mut r).unwrap().lines, ["version=0.4.8", "OK"]);
        assert!(read_reply(&mut std::io::Cursor::new(&b"hello\r\n"[..])).is_err());
        assert!(read_reply(&mut std::io::Cursor::new(&b""[..])).is_err());
    }
}
