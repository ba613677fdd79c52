//! `cloister-ircgate`: the filtering IRC proxy between the chat's irssi sessions and ngircd.
//! Parses the command line, binds only where told, and hands the listener to [`proxy::serve`].
#![forbid(unsafe_code)]

mod filter;
mod lines;
mod proxy;

use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;

use filter::Config;
use proxy::ProxyConfig;

const USAGE: &str = "usage: cloister-ircgate --listen ADDR:PORT --upstream ADDR:PORT --server-name NAME \
                     [--max-clients N]";
const DEFAULT_MAX_CLIENTS: usize = 64;

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}\n{USAGE}")]
    Usage(String),
    #[error("bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("read listening address: {0}")]
    LocalAddr(std::io::Error),
    #[error("accept on {addr}: {source}")]
    Serve { addr: SocketAddr, source: std::io::Error },
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cloister-ircgate: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Error> {
    let args = Args::parse(std::env::args().skip(1))?;
    let listener =
        TcpListener::bind(args.listen).map_err(|source| Error::Bind { addr: args.listen, source })?;
    // Port 0 is allowed (tests): say which port we got.
    let addr = listener.local_addr().map_err(Error::LocalAddr)?;
    eprintln!(
        "cloister-ircgate: listening on {addr}, upstream {}, at most {} clients",
        args.upstream, args.max_clients
    );
    let cfg = ProxyConfig {
        upstream: args.upstream,
        max_clients: args.max_clients,
        filter: Config { server_name: args.server_name },
    };
    proxy::serve(listener, cfg).map_err(|source| Error::Serve { addr, source })
}

struct Args {
    listen: SocketAddr,
    upstream: SocketAddr,
    server_name: String,
    max_clients: usize,
}

impl Args {
    fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, Error> {
        let (mut listen, mut upstream, mut server_name, mut max_clients) = (None, None, None, None);
        while let Some(flag) = argv.next() {
            let mut value = || argv.next().ok_or_else(|| Error::Usage(format!("{flag} needs a value")));
            match flag.as_str() {
                "--listen" => listen = Some(parse_value(&flag, &value()?)?),
                "--upstream" => upstream = Some(parse_value(&flag, &value()?)?),
                "--server-name" => server_name = Some(server_name_value(value()?)?),
                "--max-clients" => max_clients = Some(parse_value(&flag, &value()?)?),
                "--help" | "-h" => return Err(Error::Usage("help".into())),
                other => return Err(Error::Usage(format!("unknown argument {other}"))),
            }
        }
        let missing = |flag: &str| Error::Usage(format!("{flag} is required"));
        Ok(Args {
            listen: listen.ok_or_else(|| missing("--listen"))?,
            upstream: upstream.ok_or_else(|| missing("--upstream"))?,
            server_name: server_name.ok_or_else(|| missing("--server-name"))?,
            max_clients: match max_clients.unwrap_or(DEFAULT_MAX_CLIENTS) {
                0 => return Err(Error::Usage("--max-clients must be at least 1".into())),
                n => n,
            },
        })
    }
}

fn parse_value<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, Error> {
    value.parse().map_err(|_| Error::Usage(format!("{flag}: invalid value {value:?}")))
}

/// The name goes into IRC lines as a prefix and a parameter: one printable token, no ':' first.
fn server_name_value(name: String) -> Result<String, Error> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(':')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b));
    if ok {
        Ok(name)
    } else {
        Err(Error::Usage(format!("--server-name: invalid name {name:?}")))
    }
}
