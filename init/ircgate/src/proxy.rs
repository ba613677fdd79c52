//! Sockets, threads and bounds: accepts chat clients, opens one upstream connection to ngircd
//! per client, and runs each direction of that pair through [`crate::filter`].
//!
//! One thread per direction per client, blocking std I/O: at most `max_clients` × 2 small
//! threads (64 KiB stacks), no unsafe, no runtime, and back-pressure for free (a slow reader
//! blocks only its own pair). A poll loop would need per-socket partial-write buffers for the same
//! result. Nothing here logs what users say: only counts and connection errors go to stderr.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use crate::filter::{self, ClientAction, Config, Session, CLIENT_LINE_MAX, SERVER_LINE_MAX};
use crate::lines::{Item, LineReader};

/// How long a connect to ngircd may take before the client is told it is unavailable.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer that reads nothing for this long is dropped rather than holding a thread forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
const THREAD_STACK: usize = 64 * 1024;
/// Draining a refused client happens on the accept thread: keep it short.
const ACCEPT_DRAIN: Duration = Duration::from_millis(20);
/// Draining on a client's own thread may wait for the rest of what it sent.
const CLIENT_DRAIN: Duration = Duration::from_millis(500);

/// Settings of a running gate.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub upstream: SocketAddr,
    pub max_clients: usize,
    pub filter: Config,
}

/// Accepts clients forever; returns only if accepting fails for good.
pub fn serve(listener: TcpListener, cfg: ProxyConfig) -> io::Result<()> {
    let cfg = Arc::new(cfg);
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let client = match stream {
            Ok(client) => client,
            // Per-connection failures (ECONNABORTED, EMFILE) must not end the service.
            Err(err) => {
                eprintln!("cloister-ircgate: accept: {err}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let Some(slot) = Slot::take(&active, cfg.max_clients) else {
            refuse(client, b"ERROR :too many connections\r\n", ACCEPT_DRAIN);
            eprintln!("cloister-ircgate: refused a client: {} connected", cfg.max_clients);
            continue;
        };
        let cfg = Arc::clone(&cfg);
        let spawned =
            thread::Builder::new().stack_size(THREAD_STACK).spawn(move || run_client(client, &cfg, slot));
        if let Err(err) = spawned {
            eprintln!("cloister-ircgate: spawn client thread: {err}");
        }
    }
    Ok(())
}

/// One counted client place, given back on drop whatever way the client's threads end.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(active: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        active.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Slot(Arc::clone(active)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sends a last line and closes. Closing a socket with unread input makes the kernel send a
/// reset that can discard our last line, so the input is drained first (briefly: never more than
/// `drain` of waiting, 64 KiB of data).
fn refuse(mut client: TcpStream, line: &[u8], drain: Duration) {
    let _ = client.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = client.write_all(line);
    let _ = client.shutdown(Shutdown::Write);
    let _ = client.set_read_timeout(Some(drain));
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        match client.read(&mut sink) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
}

/// Both sockets of one client, and what the server direction learned for the client direction.
struct Pair {
    client_out: Mutex<TcpStream>,
    session: Mutex<Session>,
    client: TcpStream,
    upstream: TcpStream,
}

impl Pair {
    fn send_client(&self, line: &[u8]) -> io::Result<()> {
        lock(&self.client_out).write_all(line)
    }

    /// Ends both connections, which also wakes the other direction's blocked read.
    fn close(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.upstream.shutdown(Shutdown::Both);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere (panic = abort in release) cannot leave these in a broken state.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn run_client(client: TcpStream, cfg: &ProxyConfig, slot: Slot) {
    let upstream = match TcpStream::connect_timeout(&cfg.upstream, UPSTREAM_CONNECT_TIMEOUT) {
        Ok(upstream) => upstream,
        Err(err) => {
            eprintln!("cloister-ircgate: connect upstream {}: {err}", cfg.upstream);
            refuse(client, b"ERROR :chat server unavailable\r\n", CLIENT_DRAIN);
            return;
        }
    };
    if let Err(err) = start_pair(client, upstream, cfg) {
        eprintln!("cloister-ircgate: set up client connection: {err}");
    }
    drop(slot);
}

fn start_pair(client: TcpStream, upstream: TcpStream, cfg: &ProxyConfig) -> io::Result<()> {
    for stream in [&client, &upstream] {
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    }
    let pair = Arc::new(Pair {
        client_out: Mutex::new(client.try_clone()?),
        session: Mutex::new(Session::default()),
        client,
        upstream,
    });
    let down = {
        let pair = Arc::clone(&pair);
        let filter = cfg.filter.clone();
        thread::Builder::new().stack_size(THREAD_STACK).spawn(move || server_to_client(&pair, &filter))?
    };
    client_to_server(&pair, &cfg.filter);
    pair.close();
    let _ = down.join();
    Ok(())
}

fn client_to_server(pair: &Pair, cfg: &Config) {
    let (Ok(input), Ok(mut upstream)) = (pair.client.try_clone(), pair.upstream.try_clone()) else {
        return;
    };
    let mut reader = LineReader::new(input, CLIENT_LINE_MAX);
    loop {
        let line = match reader.next_item() {
            Ok(Some(Item::Line(line))) => line,
            Ok(Some(Item::TooLong)) => {
                if let Ok(client) = pair.client.try_clone() {
                    // Held so that no server line follows the ERROR.
                    let _guard = lock(&pair.client_out);
                    refuse(client, b"ERROR :line too long\r\n", CLIENT_DRAIN);
                }
                return;
            }
            Ok(None) | Err(_) => return,
        };
        let action = filter::filter_client(&line, cfg, &lock(&pair.session));
        let sent = match action {
            ClientAction::Forward(out) => upstream.write_all(&out),
            ClientAction::Reply(lines) => lines.iter().try_for_each(|l| pair.send_client(l)),
            ClientAction::Drop => Ok(()),
        };
        if sent.is_err() {
            return;
        }
    }
}

fn server_to_client(pair: &Pair, cfg: &Config) {
    let Ok(input) = pair.upstream.try_clone() else { return };
    let mut reader = LineReader::new(input, SERVER_LINE_MAX);
    loop {
        let line = match reader.next_item() {
            Ok(Some(Item::Line(line))) => line,
            // ngircd never sends such a line; dropping it whole is safer than cutting it.
            Ok(Some(Item::TooLong)) => continue,
            Ok(None) | Err(_) => break,
        };
        let out = filter::filter_server(&line, cfg, &mut lock(&pair.session));
        if out.iter().try_for_each(|l| pair.send_client(l)).is_err() {
            break;
        }
    }
    pair.close();
}
