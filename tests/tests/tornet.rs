//! The private Tor network harness: the torrc guard that keeps every tor of the tests off the
//! real network, and an end-to-end run on the host: the network (3 authorities, 5 relays, a
//! client) and one extra onion service start in a namespace the test creates
//! (`cloister-tornet-t<pid>`, deleted by a guard's Drop), and a random token goes through the
//! client's SOCKS port to `<addr>.onion:22`, which tor forwards to a unix-socket echo server
//! the test runs. Under `cargo xtask test` (`CLOISTER_TORNET_DIR` set) the onion service joins
//! the run's network instead of starting a second one. The end-to-end test needs root and
//! `CLOISTER_INIT_BIN` (as the other host tests, it runs under `cargo xtask test`); the tor
//! packages come from the test tool cache (`CLOISTER_TOOLS_CACHE`, default
//! `~/.cache/cloister-test-tools`), never from the host.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cloister_tests::tools::{default_cache, fetch_tools};
use cloister_tests::tornet::{check_torrc, prepare, GuardError, TorNet};
use cloister_tests::{Host, KillOnDrop};

const SOCKS_CONNECT: &str = env!("CARGO_BIN_EXE_socks_connect");
/// The onion service node's name (a tor nickname: 1-19 letters and digits); its files go to
/// `<network dir>/nodes/<name>`.
const ONION_NICK: &str = "onionecho";
const AUTH: &str = "DirAuthority a orport=9001 no-v2 v3ident=0123456789ABCDEF0123456789ABCDEF01234567 \
                    10.77.0.11:9030 0123456789ABCDEF0123456789ABCDEF01234567";
/// Bootstrap measured at ≈ 22 s; generous for a loaded 2-core machine.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Onion service descriptors take a while to reach the HSDirs after bootstrap.
const ONION_TIMEOUT: Duration = Duration::from_secs(300);
/// One connection attempt: circuit building through a fresh network takes seconds.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);
/// The DoS defences the appliance's torrc turns on by default (`[onion]` in config): the test
/// proves they let consecutive connections through, which the appliance's users rely on.
const APPLIANCE_DEFENCES: &str = "\
HiddenServiceMaxStreams 4
HiddenServiceMaxStreamsCloseCircuit 1
HiddenServiceEnableIntroDoSDefense 1
HiddenServiceEnableIntroDoSRatePerSec 25
HiddenServiceEnableIntroDoSBurstPerSec 200
HiddenServicePoWDefensesEnabled 1
";
/// Connections after the first one: a login after a logout must not need the retry loop.
const FOLLOW_UPS: usize = 3;
/// Connections held open at once, each with its own `socks_connect --isolate` key: more than
/// `HiddenServiceMaxStreams` allows one circuit.
const ISOLATED: usize = 6;

#[test]
fn guard_accepts_a_private_testing_network() {
    assert_eq!(check_torrc(&format!("TestingTorNetwork 1\n{AUTH}\n")), Ok(()));
    assert_eq!(check_torrc(&format!("# comment\n  testingtornetwork 1\n{AUTH}\n{AUTH}\n")), Ok(()));
}

#[test]
fn guard_refuses_a_torrc_without_testing_network() {
    assert_eq!(check_torrc(&format!("{AUTH}\n")), Err(GuardError::NotTesting));
    assert_eq!(check_torrc(&format!("TestingTorNetwork 0\n{AUTH}\n")), Err(GuardError::NotTesting));
    assert_eq!(
        check_torrc(&format!("TestingTorNetwork 1\n{AUTH}\nTestingTorNetwork 0\n")),
        Err(GuardError::NotTesting)
    );
    assert_eq!(check_torrc(&format!("#TestingTorNetwork 1\n{AUTH}\n")), Err(GuardError::NotTesting));
}

#[test]
fn guard_refuses_a_torrc_without_authorities() {
    assert_eq!(check_torrc("TestingTorNetwork 1\nSocksPort 9050\n"), Err(GuardError::NoAuthorities));
    let commented = format!("TestingTorNetwork 1\n# {AUTH}\n");
    assert_eq!(check_torrc(&commented), Err(GuardError::NoAuthorities));
}

#[test]
fn guard_refuses_authorities_outside_the_private_network() {
    for addr in ["10.77.1.11:9030", "128.31.0.39:9131", "127.0.0.1:9030", "10.78.0.11:9030"] {
        let line = AUTH.replace("10.77.0.11:9030", addr);
        let torrc = format!("TestingTorNetwork 1\n{AUTH}\n{line}\n");
        assert_eq!(check_torrc(&torrc), Err(GuardError::OutsideNetwork { line }), "{addr}");
    }
    let fallback = "FallbackDir 193.23.244.244:80 orport=443 id=7BE683E65D48141321C5ED92F075C55364AC7123";
    let torrc = format!("TestingTorNetwork 1\n{AUTH}\n{fallback}\n");
    assert_eq!(check_torrc(&torrc), Err(GuardError::OutsideNetwork { line: fallback.to_owned() }));
    let hostname = AUTH.replace("10.77.0.11:9030", "moria.invalid:9030");
    let torrc = format!("TestingTorNetwork 1\n{hostname}\n");
    assert_eq!(check_torrc(&torrc), Err(GuardError::NoAddress { line: hostname }));
    let include = format!("TestingTorNetwork 1\n{AUTH}\n%include /etc/tor/torrc\n");
    assert!(matches!(check_torrc(&include), Err(GuardError::Forbidden { .. })));
}

#[test]
fn onion_service_echoes_through_the_private_network() -> Result<()> {
    let Some(_host) = Host::from_env("tornet-onion-echo") else { return Ok(()) };
    let dir = tempfile::Builder::new().prefix("cloister-tornet-").tempdir()?;
    let result = onion_echo(dir.path());
    if result.is_err() {
        eprintln!("tornet: logs kept in {}", dir.keep().display());
    }
    result
}

fn onion_echo(dir: &Path) -> Result<()> {
    let cache = default_cache();
    let t = Instant::now();
    let kit = fetch_tools(&cache, &cache.join("kit"), &["tor"])?;
    eprintln!("tornet: kit in {:.1} s ({})", t.elapsed().as_secs_f64(), cache.display());
    let sock = dir.join("echo.sock");
    spawn_echo_server(&sock)?;
    let mut net = match std::env::var_os("CLOISTER_TORNET_DIR") {
        // Under `cargo xtask test` the run's network is already up: a second one would only
        // compete with it for the two cores.
        Some(shared) => TorNet::attach(Path::new(&shared), &kit, READY_TIMEOUT)?,
        None => {
            let t = Instant::now();
            prepare(dir, &kit)?;
            eprintln!("tornet: prepared (new keys) in {:.1} s", t.elapsed().as_secs_f64());
            TorNet::start(dir, &kit, &format!("cloister-tornet-t{}", std::process::id()))?
        }
    };
    let appliance = std::fs::read_to_string(&net.prepared().appliance_torrc)?;
    check_torrc(&appliance).context("appliance-torrc")?;
    assert_eq!(appliance.matches("\nDirAuthority ").count(), 3, "{appliance}");
    let target = format!("unix:{}", sock.display());
    let hostname = net.add_onion_service_with(ONION_NICK, 22, &target, APPLIANCE_DEFENCES)?;
    let ready = net.wait_ready(READY_TIMEOUT)?;
    let nodes_rss: u64 = rss_of(&net, |nick| nick != ONION_NICK);
    eprintln!(
        "tornet: ready after {:.1} s; our nodes use {} MiB resident",
        ready.as_secs_f64(),
        nodes_rss >> 10
    );

    let onion = read_hostname(&hostname, &mut net)?;
    let token = random_token()?;
    let t = Instant::now();
    let mut attempts = 0;
    let last_error = loop {
        attempts += 1;
        match echo_once(&net, dir, &onion, &token) {
            Ok(reply) => {
                assert_eq!(reply, token, "the echo server's reply");
                break None;
            }
            Err(e) if t.elapsed() < ONION_TIMEOUT => {
                eprintln!("tornet: attempt {attempts}: {e:#}");
                net.check_alive()?;
                std::thread::sleep(Duration::from_secs(3));
            }
            Err(e) => break Some(e),
        }
    };
    if let Some(e) = last_error {
        bail!("no echo through {onion} after {attempts} attempts in {ONION_TIMEOUT:?}: {e:#}");
    }
    eprintln!(
        "tornet: onion echo worked after {:.1} s more ({attempts} attempts), {:.1} s after start; \
         all tor processes: {} MiB resident",
        t.elapsed().as_secs_f64(),
        ready.as_secs_f64() + t.elapsed().as_secs_f64(),
        net.rss_kib() >> 10
    );
    for n in 1..=FOLLOW_UPS {
        let t = Instant::now();
        let token = random_token()?;
        let reply =
            echo_once(&net, dir, &onion, &token).with_context(|| format!("follow-up connection {n}"))?;
        assert_eq!(reply, token, "the echo server's reply to follow-up {n}");
        eprintln!("tornet: follow-up connection {n} echoed in {:.1} s", t.elapsed().as_secs_f64());
    }
    isolated_connections_outnumber_the_stream_limit(&net, &onion)
}

/// `ISOLATED` connections open at once, each with its own isolation key, all still echo once the
/// last has opened. Had they shared one rendezvous circuit, the fifth would have closed it
/// (`HiddenServiceMaxStreams 4`, `...CloseCircuit 1`) and every connection on it: this is how
/// the onion benchmark's 10 users (one tor each, in reality) stay connected together.
fn isolated_connections_outnumber_the_stream_limit(net: &TorNet, onion: &str) -> Result<()> {
    let t = Instant::now();
    let mut held = Vec::new();
    for k in 0..ISOLATED {
        let mut c = Held::open(net, onion, &format!("user{k}"))?;
        c.echo().with_context(|| format!("isolated connection {k}"))?;
        held.push(c);
    }
    for (k, c) in held.iter_mut().enumerate() {
        c.echo().with_context(|| format!("isolated connection {k} after all {ISOLATED} opened"))?;
    }
    eprintln!("tornet: {ISOLATED} isolated connections held at once in {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

/// A connection through `socks_connect --isolate`, kept open; each echo is a fresh token.
struct Held {
    child: KillOnDrop,
    stdin: std::process::ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Held {
    fn open(net: &TorNet, onion: &str, key: &str) -> Result<Self> {
        let socks = net.socks_addr().to_string();
        net.ensure_not_host()?;
        let mut child = KillOnDrop(
            net.cmd(&[SOCKS_CONNECT, "--isolate", key, &socks, onion, "22"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting socks_connect")?,
        );
        let stdin = child.0.stdin.take().context("no stdin")?;
        let stdout = child.0.stdout.take().context("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self { child, stdin, lines })
    }

    fn echo(&mut self) -> Result<()> {
        let token = random_token()?;
        self.stdin.write_all(format!("{token}\n").as_bytes()).context("the connection is closed")?;
        let reply = self.lines.recv_timeout(ATTEMPT_TIMEOUT).map_err(|_| {
            let gone = matches!(self.child.0.try_wait(), Ok(Some(_)));
            anyhow::anyhow!("no echo within {ATTEMPT_TIMEOUT:?} (socks_connect ended: {gone})")
        })?;
        anyhow::ensure!(reply == token, "echoed {reply:?} for {token:?}");
        Ok(())
    }
}

fn rss_of(net: &TorNet, keep: impl Fn(&str) -> bool) -> u64 {
    net.pids()
        .into_iter()
        .filter(|(nick, _)| keep(nick))
        .filter_map(|(_, pid)| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
            line.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// Echoes every connection to `path` back, line by line, until the test process ends.
fn spawn_echo_server(path: &Path) -> Result<()> {
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                if let Ok(mut out) = conn.try_clone() {
                    let _ = std::io::copy(&mut &conn, &mut out);
                }
            });
        }
    });
    Ok(())
}

/// The onion service writes its address once its keys exist (seconds after start).
fn read_hostname(path: &PathBuf, net: &mut TorNet) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            let name = text.trim().to_owned();
            anyhow::ensure!(name.ends_with(".onion") && name.len() == 62, "bad onion address {name:?}");
            return Ok(name);
        }
        net.check_alive()?;
        if Instant::now() > deadline {
            bail!("{} not written within 60 s", path.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn random_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// One connection through the client's SOCKS port, inside the namespace: sends the token and
/// returns the first line that comes back.
fn echo_once(net: &TorNet, dir: &Path, onion: &str, token: &str) -> Result<String> {
    let socks = net.socks_addr().to_string();
    let err_path = dir.join("socks_connect.err");
    net.ensure_not_host()?;
    let mut child = KillOnDrop(
        net.cmd(&[SOCKS_CONNECT, &socks, onion, "22"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err_path)?)
            .spawn()
            .context("starting socks_connect")?,
    );
    let mut stdin = child.0.stdin.take().context("no stdin")?;
    stdin.write_all(format!("{token}\n").as_bytes())?;
    let stdout = child.0.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let r = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(r);
    });
    let reply = rx.recv_timeout(ATTEMPT_TIMEOUT);
    drop(child);
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    match reply {
        Ok(Ok(line)) if !line.is_empty() => Ok(line.trim_end().to_owned()),
        Ok(Ok(_)) => bail!("connection closed without a reply: {}", stderr.trim()),
        Ok(Err(e)) => bail!("reading the reply: {e}: {}", stderr.trim()),
        Err(_) => bail!("no reply within {ATTEMPT_TIMEOUT:?}: {}", stderr.trim()),
    }
}
