//! A minimal QMP client: one connection per VM, capabilities negotiated once, commands answered in
//! order while asynchronous events are skipped.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{Error, Result};

/// How long a single command may take to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest socket path `connect` takes directly (sun_path is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

pub(crate) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects, retrying until QEMU has created the socket or `timeout` passes, and leaves the
    /// connection in command mode.
    pub(crate) fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match connect_long(path) {
                Ok(stream) => break stream,
                Err(e) if retryable(&e) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(source) => return Err(Error::QmpConnect { path: path.to_path_buf(), source }),
            }
        };
        let io = |source| Error::QmpConnect { path: path.to_path_buf(), source };
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Qmp { reader: BufReader::new(stream), writer };
        let greeting = qmp.read_message("greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(Error::QmpProtocol { command: "greeting".into(), reply: greeting.to_string() });
        }
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    /// Runs `command`; `args` is sent as `arguments` unless it is null.
    pub(crate) fn execute(&mut self, command: &str, args: Value) -> Result<Value> {
        let request = match args {
            Value::Null => json!({ "execute": command }),
            args => json!({ "execute": command, "arguments": args }),
        };
        let io = |source| Error::QmpIo { command: command.to_string(), source };
        writeln!(self.writer, "{request}").map_err(io)?;
        loop {
            let mut reply = self.read_message(command)?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(value) = reply.get_mut("return") {
                return Ok(value.take());
            }
            let error = reply.get("error").ok_or_else(|| Error::QmpProtocol {
                command: command.to_string(),
                reply: reply.to_string(),
            })?;
            let field = |name: &str| error.get(name).and_then(Value::as_str).unwrap_or_default().to_string();
            return Err(Error::QmpCommand {
                command: command.to_string(),
                class: field("class"),
                desc: field("desc"),
            });
        }
    }

    fn read_message(&mut self, command: &str) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| Error::QmpIo { command: command.into(), source })?;
        if n == 0 {
            let source = std::io::Error::new(ErrorKind::UnexpectedEof, "qemu closed the qmp socket");
            return Err(Error::QmpIo { command: command.into(), source });
        }
        serde_json::from_str(&line).map_err(|_| Error::QmpProtocol { command: command.into(), reply: line })
    }
}

fn retryable(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused)
}

/// Connects to a socket whose path may exceed `sun_path`, by going through the directory's open fd.
fn connect_long(path: &Path) -> std::io::Result<UnixStream> {
    if path.as_os_str().len() <= MAX_SOCKET_PATH {
        return UnixStream::connect(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return UnixStream::connect(path);
    };
    let dir = std::fs::File::open(dir)?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    UnixStream::connect(short)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake QEMU answering one client with the given lines, recording what it received.
    fn fake_qemu(path: &Path, replies: &'static [&'static str]) -> std::thread::JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut out = stream.try_clone().unwrap();
            writeln!(out, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut got = Vec::new();
            let mut reader = BufReader::new(stream);
            for reply in replies {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                got.push(line.trim().to_string());
                writeln!(out, "{reply}").unwrap();
            }
            got
        })
    }

    #[test]
    fn handshake_then_commands_skipping_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let server = fake_qemu(
            &path,
            &[
                r#"{"return": {}}"#,
                "{\"event\": \"POWERDOWN\"}\n{\"return\": {\"running\": true}}",
                r#"{"error": {"class": "GenericError", "desc": "nope"}}"#,
            ],
        );
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let status = qmp.execute("query-status", Value::Null).unwrap();
        assert_eq!(status["running"], true);
        let err = qmp.execute("device_del", json!({"id": "x"})).unwrap_err();
        assert_eq!(err.to_string(), "qmp device_del failed: GenericError: nope");
        let got = server.join().unwrap();
        assert_eq!(got[0], r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(got[2], r#"{"arguments":{"id":"x"},"execute":"device_del"}"#);
    }

    #[test]
    fn long_socket_paths_are_reachable() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join("qmp.sock");
        assert!(path.as_os_str().len() > MAX_SOCKET_PATH);
        // bind() has the same limit, so the fake server binds through the directory's fd too.
        let dirfd = std::fs::File::open(&deep).unwrap();
        let short = PathBuf::from(format!("/proc/self/fd/{}/qmp.sock", dirfd.as_raw_fd()));
        let server = fake_qemu(&short, &[r#"{"return": {}}"#]);
        assert!(Qmp::connect(&path, Duration::from_secs(5)).is_ok());
        server.join().unwrap();
    }
}
