//! `cloister-bridge`: carries each connection that tor's onion service makes to a unix socket
//! over to sshd on 127.0.0.1 inside the `chat` network namespace. tor lives in the machine's
//! namespace and sshd in one with loopback only; a unix socket is reachable from both (it is a
//! file, not an address), so no TCP port listens where the uplink is.
//!
//! The socket's directory is the bridge's own state directory: the bridge makes it 0750 and the
//! socket 0660, so that only its group (tor is a member) can connect. Connections beyond
//! `--max-connections` are closed at once; each accepted one gets two threads that copy bytes
//! until either side closes.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const USAGE: &str = "usage: cloister-bridge --listen SOCKET --connect ADDRESS:PORT [--max-connections N]";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
enum BridgeError {
    #[error("{0}\n{USAGE}")]
    Usage(String),
    #[error("{path}: {source}")]
    Socket { path: PathBuf, source: std::io::Error },
}

#[derive(Debug, PartialEq, Eq)]
struct Args {
    listen: PathBuf,
    connect: SocketAddr,
    max_connections: usize,
}

fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Args, BridgeError> {
    let (mut listen, mut connect, mut max_connections) = (None, None, 32);
    while let Some(flag) = argv.next() {
        let value = argv.next().ok_or_else(|| BridgeError::Usage(format!("{flag} needs a value")))?;
        match flag.as_str() {
            "--listen" => listen = Some(PathBuf::from(value)),
            "--connect" => {
                connect = Some(
                    value
                        .parse()
                        .map_err(|_| BridgeError::Usage(format!("{value:?} is not ADDRESS:PORT")))?,
                )
            }
            "--max-connections" => {
                max_connections = value.parse().ok().filter(|n| (1..=4096).contains(n)).ok_or_else(|| {
                    BridgeError::Usage(format!("--max-connections {value:?} is outside 1..=4096"))
                })?
            }
            other => return Err(BridgeError::Usage(format!("unknown argument {other:?}"))),
        }
    }
    Ok(Args {
        listen: listen.ok_or_else(|| BridgeError::Usage("--listen is required".into()))?,
        connect: connect.ok_or_else(|| BridgeError::Usage("--connect is required".into()))?,
        max_connections,
    })
}

fn main() -> ExitCode {
    let result = parse_args(std::env::args().skip(1)).and_then(|args| {
        let listener = listen(&args.listen)?;
        eprintln!("listening on {}, forwarding to {}", args.listen.display(), args.connect);
        serve(&listener, args.connect, args.max_connections);
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloister-bridge: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Binds the socket, replacing a stale one from an earlier run (never anything else).
fn listen(path: &Path) -> Result<UnixListener, BridgeError> {
    let fail = |source| BridgeError::Socket { path: path.to_owned(), source };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(fail(std::io::Error::other("exists and is not a socket; not touching it")));
        }
        std::fs::remove_file(path).map_err(fail)?;
    }
    let listener = UnixListener::bind(path).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(fail)?;
    if let Some(dir) = path.parent() {
        let traverse = std::fs::Permissions::from_mode(0o750);
        std::fs::set_permissions(dir, traverse)
            .map_err(|source| BridgeError::Socket { path: dir.to_owned(), source })?;
    }
    Ok(listener)
}

fn serve(listener: &UnixListener, target: SocketAddr, max: usize) {
    let open = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let client = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if open.load(Ordering::SeqCst) >= max {
            eprintln!("refused a connection: {max} already open");
            continue;
        }
        open.fetch_add(1, Ordering::SeqCst);
        let open = Arc::clone(&open);
        let spawned = std::thread::Builder::new().name("conn".into()).spawn(move || {
            if let Err(e) = carry(client, target) {
                eprintln!("connection: {e}");
            }
            open.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            eprintln!("cannot start a thread: {e}");
        }
    }
}

/// Copies both ways until each side has closed its direction.
fn carry(client: UnixStream, target: SocketAddr) -> std::io::Result<()> {
    let server = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)?;
    server.set_nodelay(true)?;
    let (client2, server2) = (client.try_clone()?, server.try_clone()?);
    let upstream = std::thread::Builder::new().name("up".into()).spawn(move || {
        pump(client2, &server2);
        let _ = server2.shutdown(Shutdown::Write);
    })?;
    pump(server, &client);
    let _ = client.shutdown(Shutdown::Write);
    let _ = upstream.join();
    Ok(())
}

fn pump(mut from: impl Read, mut to: impl Write) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn args(v: &[&str]) -> Result<Args, BridgeError> {
        parse_args(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn arguments_are_checked() {
        let a = args(&["--listen", "/s", "--connect", "127.0.0.1:22"]).unwrap();
        assert_eq!(
            a,
            Args { listen: "/s".into(), connect: "127.0.0.1:22".parse().unwrap(), max_connections: 32 }
        );
        assert!(args(&["--listen", "/s"]).is_err());
        assert!(args(&["--listen", "/s", "--connect", "localhost:22"]).is_err());
        assert!(args(&["--listen", "/s", "--connect", "127.0.0.1:22", "--max-connections", "0"]).is_err());
        assert!(args(&["--bogus", "x"]).is_err());
    }

    #[test]
    fn bytes_cross_both_ways_and_the_socket_is_group_only() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("b").join("ssh.sock");
        std::fs::create_dir(sock.parent().unwrap()).unwrap();
        std::fs::write(&sock, b"").unwrap();
        assert!(listen(&sock).is_err(), "a regular file in the way is never removed");
        std::fs::remove_file(&sock).unwrap();
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in echo.incoming().take(2) {
                let mut s = s.unwrap();
                let mut r = s.try_clone().unwrap();
                std::thread::spawn(move || std::io::copy(&mut r, &mut s).map(drop));
            }
        });
        let listener = listen(&sock).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&sock), mode(sock.parent().unwrap())), (0o660, 0o750));
        std::thread::spawn(move || serve(&listener, target, 1));
        let mut c = UnixStream::connect(&sock).unwrap();
        c.write_all(b"SSH-2.0-probe\r\n").unwrap();
        let mut got = [0u8; 15];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"SSH-2.0-probe\r\n");
        // Over the limit: closed without a byte.
        let mut second = UnixStream::connect(&sock).unwrap();
        second.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(second.read(&mut got).unwrap(), 0);
        // The first one still works, and closing it ends its copy.
        c.write_all(b"x").unwrap();
        c.read_exact(&mut got[..1]).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(c.read(&mut got).unwrap(), 0);
    }
}
