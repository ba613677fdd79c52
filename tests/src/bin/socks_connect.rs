//! `socks_connect [--isolate KEY] PROXY_HOST:PORT DEST_HOST DEST_PORT`: an OpenSSH
//! `ProxyCommand` for the test network. It asks a SOCKS5 proxy (tor's SocksPort) to CONNECT to
//! the destination given as a domain name (address type 3), so nothing is ever resolved locally
//! and `.onion` names reach tor, then copies stdin to the connection and the connection to
//! stdout. Only `.onion` destinations are accepted.
//!
//! `--isolate KEY` authenticates with KEY as username and password (RFC 1929): tor's
//! `IsolateSOCKSAuth` (on by default) never puts streams with different credentials on one
//! circuit, so each KEY gets circuits of its own, as a person running their own tor would.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Generous: building an onion circuit in a fresh test network takes seconds.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("socks_connect: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (isolate, rest) = match args.as_slice() {
        [flag, key, rest @ ..] if flag == "--isolate" => (Some(key.as_str()), rest),
        rest => (None, rest),
    };
    let [proxy, host, port] = rest else {
        bail!("usage: socks_connect [--isolate KEY] PROXY_HOST:PORT DEST_HOST DEST_PORT");
    };
    let port: u16 = port.parse().with_context(|| format!("bad destination port {port:?}"))?;
    // The private network has no exits: any other name would wait in tor until the timeout,
    // and a test has no business asking for one.
    if !host.ends_with(".onion") {
        bail!("refusing {host:?}: the test network reaches only .onion addresses");
    }
    let mut sock = TcpStream::connect(proxy).with_context(|| format!("cannot connect to proxy {proxy}"))?;
    sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    handshake(&mut sock, isolate, host, port)?;
    sock.set_read_timeout(None)?;
    splice(sock)
}

/// SOCKS5 (RFC 1928), without authentication or with `isolate` as username and password,
/// CONNECT to a domain name.
fn handshake(sock: &mut TcpStream, isolate: Option<&str>, host: &str, port: u16) -> Result<()> {
    let len = u8::try_from(host.len()).ok().filter(|l| *l > 0).context("host name must be 1-255 bytes")?;
    let method = if isolate.is_some() { 2 } else { 0 };
    sock.write_all(&[5, 1, method]).context("sending the greeting")?;
    let mut reply = [0u8; 2];
    sock.read_exact(&mut reply).context("reading the method choice")?;
    if reply != [5, method] {
        bail!("proxy refused authentication method {method} (reply {reply:?})");
    }
    if let Some(key) = isolate {
        let k =
            u8::try_from(key.len()).ok().filter(|l| *l > 0).context("--isolate key must be 1-255 bytes")?;
        // RFC 1929: version 1, username, password (the same key twice).
        let mut auth = vec![1, k];
        auth.extend_from_slice(key.as_bytes());
        auth.push(k);
        auth.extend_from_slice(key.as_bytes());
        sock.write_all(&auth).context("sending the username and password")?;
        sock.read_exact(&mut reply).context("reading the authentication status")?;
        if reply != [1, 0] {
            bail!("proxy refused the username and password (reply {reply:?})");
        }
    }
    let mut req = vec![5, 1, 0, 3, len];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    sock.write_all(&req).context("sending CONNECT")?;
    let mut head = [0u8; 4];
    sock.read_exact(&mut head).context("reading the CONNECT reply")?;
    if head[0] != 5 {
        bail!("not a SOCKS5 reply (version {})", head[0]);
    }
    if head[1] != 0 {
        bail!("CONNECT to {host}:{port} failed: {} (code {:#04x})", reply_text(head[1]), head[1]);
    }
    // The bound address, which we do not need, then the port.
    let addr_len = match head[3] {
        1 => 4,
        4 => 16,
        3 => {
            let mut l = [0u8; 1];
            sock.read_exact(&mut l)?;
            usize::from(l[0])
        }
        t => bail!("bad address type {t} in the CONNECT reply"),
    };
    let mut rest = vec![0u8; addr_len + 2];
    sock.read_exact(&mut rest).context("reading the bound address")?;
    Ok(())
}

/// RFC 1928 reply codes, and tor's extended ones for onion services (tor's `ExtendedErrors`).
fn reply_text(code: u8) -> &'static str {
    match code {
        1 => "general SOCKS server failure",
        2 => "connection not allowed by ruleset",
        3 => "network unreachable",
        4 => "host unreachable",
        5 => "connection refused",
        6 => "TTL expired",
        7 => "command not supported",
        8 => "address type not supported",
        0xf0 => "onion service descriptor not found",
        0xf1 => "onion service descriptor is invalid",
        0xf2 => "onion service introduction failed",
        0xf3 => "onion service rendezvous failed",
        0xf4 => "onion service missing client authorization",
        0xf5 => "onion service wrong client authorization",
        0xf6 => "onion service address is invalid",
        0xf7 => "onion service introduction timed out",
        _ => "unknown error",
    }
}

/// stdin -> socket in a thread, socket -> stdout here; ends when the socket closes.
fn splice(sock: TcpStream) -> Result<()> {
    let mut to_sock = sock.try_clone()?;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut to_sock);
        let _ = to_sock.shutdown(Shutdown::Write);
    });
    let mut from = sock;
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 16384];
    loop {
        let n = from.read(&mut buf).context("reading from the proxy")?;
        if n == 0 {
            return Ok(());
        }
        // Flush each chunk: ssh waits for the server's banner before it writes.
        out.write_all(&buf[..n]).and_then(|()| out.flush()).context("writing to stdout")?;
    }
}
