//! A private Tor network for tests: 3 directory authorities, 5 relays and 1 client (the
//! "hs-v3-min" shape of Tor's own test tool, chutney), each with its own address on a bridge
//! `tornet0` inside a network namespace the harness creates. Nothing here can reach the real
//! Tor network: every tor runs in that namespace (which has no route out), and [`check_torrc`]
//! refuses, before any spawn, a configuration that is not a testing network whose authorities
//! are all on the private subnet.
//!
//! Addresses on 10.77.0.0/24: `.1` is the bridge's own address, `.11`–`.19` are the nodes, the
//! rest of `.1`–`.99` is kept for more nodes; `.100` and up are for appliance VMs (DHCP, added
//! later on the same bridge). Every node listens on ORPort 9001 and DirPort 9030, ports the
//! appliance's firewall lets out.
//!
//! Authority keys are made once per directory by [`prepare`] and kept: a test image carries
//! `appliance-torrc` (the authorities' identities) and must find the same network in later runs.

use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::tools::ToolKit;
use crate::{run, stdout, KillOnDrop, TestNetns};

/// The private network; authorities outside it are refused.
pub const SUBNET: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 0);
pub const SUBNET_PREFIX: u8 = 24;
/// The bridge in the namespace; VM taps are added to it.
pub const BRIDGE: &str = "tornet0";
/// The bridge's own address (a DHCP server for VMs would use it).
pub const BRIDGE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const OR_PORT: u16 = 9001;
pub const DIR_PORT: u16 = 9030;
/// The client's SOCKS port, on 127.0.0.1 inside the namespace.
pub const SOCKS_PORT: u16 = 9050;
const AUTHORITIES: u8 = 3;
const RELAYS: u8 = 5;
/// Host part of the first node's address; nodes follow in order.
const FIRST_HOST: u8 = 11;

/// Options every node of a testing network needs (measured to bootstrap in under a minute).
const TESTING_OPTIONS: &str = "\
TestingTorNetwork 1
ClientUseIPv6 0
PathsNeededToBuildCircuits 0.67
TestingDirAuthVoteExit *
TestingDirAuthVoteHSDir *
TestingDirAuthVoteGuard *
V3AuthNIntervalsValid 2
TestingMinExitFlagThreshold 0
AssumeReachable 1
";

/// Voting every 20 s instead of every hour: the first consensus comes within a minute.
const AUTHORITY_OPTIONS: &str = "\
AuthoritativeDirectory 1
V3AuthoritativeDirectory 1
V3AuthVotingInterval 20
V3AuthVoteDelay 4
V3AuthDistDelay 4
TestingV3AuthInitialVotingInterval 20
TestingV3AuthInitialVoteDelay 4
TestingV3AuthInitialDistDelay 4
ExitPolicy reject *:*
";

/// Relays exit to the private network only: there is nothing else to reach.
const RELAY_OPTIONS: &str = "\
ExitRelay 1
ExitPolicyRejectPrivate 0
ExitPolicy accept 10.77.0.0/24:*
ExitPolicy reject *:*
";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuardError {
    #[error("torrc does not set TestingTorNetwork 1")]
    NotTesting,
    #[error("torrc names no DirAuthority: tor would use the public authorities")]
    NoAuthorities,
    #[error("torrc line {line:?} has no IPv4 address:port")]
    NoAddress { line: String },
    #[error("torrc line {line:?} points outside the private network 10.77.0.0/24")]
    OutsideNetwork { line: String },
    #[error("torrc line {line:?} is not allowed in a test network")]
    Forbidden { line: String },
}

/// Refuses a configuration that could reach the real Tor network: it must be a testing network
/// (`TestingTorNetwork 1`) with at least one `DirAuthority`, and every authority or fallback
/// directory must be on 10.77.0.0/24. Includes and bridges are refused outright.
pub fn check_torrc(text: &str) -> Result<(), GuardError> {
    let (mut testing, mut authorities) = (false, 0);
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (key, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let key = key.to_ascii_lowercase();
        match key.as_str() {
            "testingtornetwork" => testing = value.trim() == "1",
            "dirauthority" | "alternatedirauthority" | "alternatebridgeauthority" | "fallbackdir" => {
                let addr = directory_address(value)
                    .ok_or_else(|| GuardError::NoAddress { line: line.to_owned() })?;
                if !in_subnet(*addr.ip()) {
                    return Err(GuardError::OutsideNetwork { line: line.to_owned() });
                }
                authorities += usize::from(key == "dirauthority");
            }
            "%include" | "bridge" | "usebridges" | "clienttransportplugin" => {
                return Err(GuardError::Forbidden { line: line.to_owned() })
            }
            _ => {}
        }
    }
    if !testing {
        return Err(GuardError::NotTesting);
    }
    if authorities == 0 {
        return Err(GuardError::NoAuthorities);
    }
    Ok(())
}

/// The other side of [`check_torrc`]: what a production image's torrc must not say (any line
/// of a test network, a client or control port) and must say (the proof-of-work defence).
/// Returns every problem, each naming its line; empty means clean. Keys are compared as tor
/// does, ignoring case.
pub fn production_torrc_problems(text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut pow = false;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (key, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let (key, value) = (key.to_ascii_lowercase(), value.trim());
        match key.as_str() {
            "testingtornetwork"
            | "dirauthority"
            | "alternatedirauthority"
            | "alternatebridgeauthority"
            | "%include" => problems.push(format!("{line:?} belongs to a test network")),
            k if k.starts_with("testing") => problems.push(format!("{line:?} belongs to a test network")),
            "socksport" | "controlport" | "controlsocket" | "dnsport" | "transport" | "natdport"
            | "httptunnelport"
                if value != "0" =>
            {
                problems.push(format!("{line:?} opens a port"))
            }
            "hiddenservicepowdefensesenabled" => pow = value == "1",
            _ => {}
        }
    }
    if !pow {
        problems.push("no HiddenServicePoWDefensesEnabled 1".into());
    }
    problems
}

/// The one `a.b.c.d:port` word of a directory line (flags and `key=value` words are skipped).
fn directory_address(value: &str) -> Option<SocketAddrV4> {
    let mut found = value.split_whitespace().filter_map(|w| w.parse::<SocketAddrV4>().ok());
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

pub fn in_subnet(ip: Ipv4Addr) -> bool {
    u32::from(ip) >> (32 - SUBNET_PREFIX) == u32::from(SUBNET) >> (32 - SUBNET_PREFIX)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Authority,
    Relay,
    Client,
}

/// One node of the network and where its files live.
#[derive(Debug, Clone)]
pub struct Node {
    pub nick: String,
    pub role: Role,
    pub addr: Ipv4Addr,
}

/// The fixed shape: authorities first, then relays, then the client.
pub fn nodes() -> Vec<Node> {
    let mut out = Vec::new();
    let roles = (0..AUTHORITIES)
        .map(|i| (Role::Authority, format!("auth{i}")))
        .chain((0..RELAYS).map(|i| (Role::Relay, format!("relay{i}"))))
        .chain(std::iter::once((Role::Client, "client".to_owned())));
    for (i, (role, nick)) in roles.enumerate() {
        let host = FIRST_HOST + u8::try_from(i).unwrap_or(u8::MAX);
        out.push(Node { nick, role, addr: Ipv4Addr::new(10, 77, 0, host) });
    }
    out
}

/// A directory authority's identities, as every torrc names it.
#[derive(Debug, Clone)]
pub struct Authority {
    pub nick: String,
    pub addr: Ipv4Addr,
    /// SHA1 of the v3 authority identity key (from its certificate).
    pub v3ident: String,
    /// The relay identity fingerprint.
    pub fingerprint: String,
}

impl Authority {
    pub fn dir_authority_line(&self) -> String {
        format!(
            "DirAuthority {} orport={OR_PORT} no-v2 v3ident={} {}:{DIR_PORT} {}",
            self.nick, self.v3ident, self.addr, self.fingerprint
        )
    }
}

/// What [`prepare`] left in its directory.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub dir: PathBuf,
    pub authorities: Vec<Authority>,
    /// The lines an appliance's tor needs to join this network.
    pub appliance_torrc: PathBuf,
}

impl Prepared {
    pub fn node_dir(&self, nick: &str) -> PathBuf {
        node_dir(&self.dir, nick)
    }

    pub fn dir_authority_lines(&self) -> String {
        self.authorities.iter().map(|a| a.dir_authority_line() + "\n").collect()
    }

    /// The start of every torrc: testing options, data, log and the authorities.
    fn common(&self, nick: &str) -> String {
        let d = self.node_dir(nick);
        format!(
            "{TESTING_OPTIONS}Nickname {nick}\nDataDirectory {}\nLog notice file {}\nRunAsDaemon 0\n\
             SafeLogging 0\nShutdownWaitLength 0\n{}",
            d.join("data").display(),
            d.join("notice.log").display(),
            self.dir_authority_lines()
        )
    }

    /// The full torrc of one node of the fixed shape.
    pub fn torrc(&self, node: &Node) -> String {
        let mut t = self.common(&node.nick);
        let ip = node.addr;
        let _ = writeln!(t, "OutboundBindAddress {ip}");
        if node.role == Role::Client {
            // ExtendedErrors: a missing onion descriptor is reported as such, not as "host
            // unreachable".
            let _ = writeln!(t, "SocksPort 127.0.0.1:{SOCKS_PORT} ExtendedErrors");
            // Tests ask it what it fetched (an onion service's descriptor): a unix socket in a
            // directory only root may enter, no TCP control port, and a cookie besides.
            let c = ClientControl::of(&self.dir);
            let _ = write!(
                t,
                "ControlSocket {}\nCookieAuthentication 1\nCookieAuthFile {}\n",
                c.socket.display(),
                c.cookie.display()
            );
            return t;
        }
        let _ = write!(
            t,
            "SocksPort 0\nAddress {ip}\nORPort {ip}:{OR_PORT}\nDirPort {ip}:{DIR_PORT}\nContactInfo {}@test.invalid\n",
            node.nick
        );
        t.push_str(if node.role == Role::Authority { AUTHORITY_OPTIONS } else { RELAY_OPTIONS });
        t
    }

    /// The torrc of an extra onion service node: `HiddenServicePort {port} {target}` (e.g.
    /// `unix:/path/sock`), keys under the node's directory.
    pub fn onion_service_torrc(&self, nick: &str, port: u16, target: &str) -> String {
        let mut t = self.common(nick);
        let hs = self.node_dir(nick).join("hs");
        let _ =
            write!(t, "SocksPort 0\nHiddenServiceDir {}\nHiddenServicePort {port} {target}\n", hs.display());
        t
    }
}

fn node_dir(dir: &Path, nick: &str) -> PathBuf {
    dir.join("nodes").join(nick)
}

/// Where the client's control socket and its cookie live: a directory of the client's own that
/// only its owner may enter (tor refuses a control socket in any other).
pub struct ClientControl {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub cookie: PathBuf,
}

impl ClientControl {
    /// For the network in `dir` (`CLOISTER_TORNET_DIR`).
    pub fn of(dir: &Path) -> Self {
        let d = node_dir(dir, "client").join("control");
        Self { socket: d.join("socket"), cookie: d.join("cookie"), dir: d }
    }

    /// Makes the directory 0700, with no socket or cookie of an earlier run left in it.
    fn prepare(&self) -> Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))?;
        for stale in [&self.socket, &self.cookie] {
            match fs::remove_file(stale) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", stale.display()))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Makes authority keys (unless `dir` has them already), every node's torrc and
/// `dir/appliance-torrc`. Idempotent: existing keys are kept.
pub fn prepare(dir: &Path, kit: &ToolKit) -> Result<Prepared> {
    let auth_nodes: Vec<Node> = nodes().into_iter().filter(|n| n.role == Role::Authority).collect();
    let saved = dir.join("authorities");
    let authorities = match load_authorities(&saved, dir, &auth_nodes) {
        Some(a) => a,
        None => {
            let a = make_authorities(dir, kit, &auth_nodes)?;
            let text: String = a.iter().map(|a| a.dir_authority_line() + "\n").collect();
            fs::write(&saved, text).with_context(|| format!("writing {}", saved.display()))?;
            a
        }
    };
    let prepared =
        Prepared { dir: dir.to_owned(), authorities, appliance_torrc: dir.join("appliance-torrc") };
    for node in nodes() {
        let d = prepared.node_dir(&node.nick);
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        write_torrc(&d.join("torrc"), &prepared.torrc(&node))?;
    }
    let appliance = format!(
        "# Test only: join the private Tor network of cloister-tests, never the real one.\n\
         TestingTorNetwork 1\nClientUseIPv6 0\nPathsNeededToBuildCircuits 0.67\n{}",
        prepared.dir_authority_lines()
    );
    check_torrc(&appliance)?;
    fs::write(&prepared.appliance_torrc, appliance)
        .with_context(|| format!("writing {}", prepared.appliance_torrc.display()))?;
    Ok(prepared)
}

fn write_torrc(path: &Path, text: &str) -> Result<()> {
    check_torrc(text).with_context(|| format!("refusing {}", path.display()))?;
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Reads the saved `DirAuthority` lines back, when every authority's keys are still there.
fn load_authorities(saved: &Path, dir: &Path, auth_nodes: &[Node]) -> Option<Vec<Authority>> {
    let text = fs::read_to_string(saved).ok()?;
    let mut out = Vec::new();
    for (line, node) in text.lines().zip(auth_nodes) {
        let keys = node_dir(dir, &node.nick).join("data/keys");
        if !keys.join("authority_certificate").is_file() || !keys.join("secret_id_key").is_file() {
            return None;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let v3ident = words.iter().find_map(|w| w.strip_prefix("v3ident="))?;
        let fingerprint = words.last()?;
        out.push(Authority {
            nick: node.nick.clone(),
            addr: node.addr,
            v3ident: v3ident.to_string(),
            fingerprint: fingerprint.to_string(),
        });
    }
    (out.len() == auth_nodes.len()).then_some(out)
}

/// Generates the authorities' keys: tor-gencert for the v3 identity, then tor itself (in a
/// throw-away namespace, like every tor) for the relay identity fingerprint.
fn make_authorities(dir: &Path, kit: &ToolKit, auth_nodes: &[Node]) -> Result<Vec<Authority>> {
    let ns = TestNetns::new(format!("cloister-tornet-prep-{}", std::process::id()))?;
    let mut out = Vec::new();
    for node in auth_nodes {
        let d = node_dir(dir, &node.nick);
        let keys = d.join("data/keys");
        if keys.exists() {
            fs::remove_dir_all(&keys).with_context(|| format!("removing {}", keys.display()))?;
        }
        fs::create_dir_all(&keys).with_context(|| format!("creating {}", keys.display()))?;
        let v3ident = gencert(kit, &keys, node.addr)?;
        let fingerprint = relay_fingerprint(kit, &ns, &d, node)?;
        out.push(Authority { nick: node.nick.clone(), addr: node.addr, v3ident, fingerprint });
    }
    Ok(out)
}

/// Creates the authority identity, signing key and certificate; returns the v3 identity.
fn gencert(kit: &ToolKit, keys: &Path, addr: Ipv4Addr) -> Result<String> {
    let mut cmd = kit.command("tor-gencert");
    cmd.current_dir(keys)
        .args(["--create-identity-key", "--passphrase-fd", "0", "-i", "authority_identity_key"])
        .args(["-s", "authority_signing_key", "-c", "authority_certificate", "-m", "12", "-a"])
        .arg(format!("{addr}:{DIR_PORT}"));
    // An empty passphrase: these keys protect a throw-away test network.
    let out = crate::run_with_input(&mut cmd, b"\n")?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let cert = fs::read_to_string(keys.join("authority_certificate"))?;
    cert.lines()
        .find_map(|l| l.strip_prefix("fingerprint "))
        .map(|f| f.trim().to_owned())
        .context("authority_certificate has no fingerprint line")
}

/// `tor --list-fingerprint` with a placeholder authority (tor needs one to accept a testing
/// network); creates the relay identity key in the node's data directory.
fn relay_fingerprint(kit: &ToolKit, ns: &TestNetns, d: &Path, node: &Node) -> Result<String> {
    let placeholder = format!("DirAuthority placeholder {}:{DIR_PORT} {}", node.addr, "f".repeat(40));
    let torrc = format!(
        "TestingTorNetwork 1\nClientUseIPv6 0\nSocksPort 0\nRunAsDaemon 0\nNickname {}\nDataDirectory {}\n\
         ORPort {}:{OR_PORT}\n{placeholder}\n",
        node.nick,
        d.join("data").display(),
        node.addr
    );
    let path = d.join("keygen.torrc");
    write_torrc(&path, &torrc)?;
    ns.ensure_not_host()?;
    let p = path.display().to_string();
    let out = run(&mut kit.netns_command(
        &ns.name,
        "tor",
        &["--defaults-torrc", "/dev/null", "-f", &p, "--list-fingerprint"],
    ))?;
    let text = stdout(&out);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with(&format!("{} ", node.nick)))
        .with_context(|| format!("no fingerprint in tor's output:\n{text}"))?;
    let fp: String = line.split_whitespace().skip(1).collect();
    anyhow::ensure!(fp.len() == 40 && fp.bytes().all(|b| b.is_ascii_hexdigit()), "bad fingerprint {line:?}");
    Ok(fp)
}

/// A running private network; everything it started dies and its namespace goes on drop.
pub struct TorNet {
    prepared: Prepared,
    kit: ToolKit,
    /// Declared before the namespace: processes die before it is deleted.
    procs: Vec<(String, KillOnDrop)>,
    netns: Namespace,
    started: Instant,
}

/// The network's namespace: ours (deleted with the network) or a `tornet run`'s (left alone).
enum Namespace {
    Owned(TestNetns),
    Shared(String),
}

impl Namespace {
    fn name(&self) -> &str {
        match self {
            Namespace::Owned(ns) => &ns.name,
            Namespace::Shared(name) => name,
        }
    }
}

impl TorNet {
    /// Prepares `dir` (keeping existing keys), creates namespace `netns_name` with the bridge
    /// and addresses, and starts the nine nodes from fresh state.
    pub fn start(dir: &Path, kit: &ToolKit, netns_name: &str) -> Result<TorNet> {
        let prepared = prepare(dir, kit)?;
        let netns = TestNetns::new(netns_name.to_owned())?;
        setup_bridge(&netns)?;
        let netns = Namespace::Owned(netns);
        let mut net =
            TorNet { prepared, kit: kit.clone(), procs: Vec::new(), netns, started: Instant::now() };
        for node in nodes() {
            let torrc = net.prepared.torrc(&node);
            net.spawn(&node.nick, &torrc)?;
        }
        Ok(net)
    }

    /// Joins the network `tornet run DIR` serves, once it is ready: nodes added with
    /// [`TorNet::spawn`] die with the returned value; the network and its namespace stay.
    pub fn attach(dir: &Path, kit: &ToolKit, timeout: Duration) -> Result<TorNet> {
        let name = shared_network(dir, timeout)?;
        let auth_nodes: Vec<Node> = nodes().into_iter().filter(|n| n.role == Role::Authority).collect();
        let authorities = load_authorities(&dir.join("authorities"), dir, &auth_nodes)
            .with_context(|| format!("{} has no authority keys", dir.display()))?;
        let prepared =
            Prepared { dir: dir.to_owned(), authorities, appliance_torrc: dir.join("appliance-torrc") };
        let ready_s: f64 = fs::read_to_string(dir.join("ready"))?.trim().parse().unwrap_or(0.0);
        let started =
            Instant::now().checked_sub(Duration::from_secs_f64(ready_s)).unwrap_or_else(Instant::now);
        let netns = Namespace::Shared(name);
        let net = TorNet { prepared, kit: kit.clone(), procs: Vec::new(), netns, started };
        net.ensure_not_host()?;
        Ok(net)
    }

    /// Checks `torrc` with [`check_torrc`], clears the node's old state (authority keys are
    /// kept), and starts tor in the namespace; it is killed with the network.
    pub fn spawn(&mut self, nick: &str, torrc: &str) -> Result<()> {
        let valid = (1..=19).contains(&nick.len()) && nick.bytes().all(|b| b.is_ascii_alphanumeric());
        anyhow::ensure!(valid, "{nick:?} is not a tor nickname (1-19 letters and digits)");
        check_torrc(torrc).with_context(|| format!("refusing to start {nick}"))?;
        let d = self.prepared.node_dir(nick);
        fs::create_dir_all(&d)?;
        clear_state(&d.join("data"))?;
        if nick == "client" {
            ClientControl::of(&self.prepared.dir).prepare()?;
        }
        let _ = fs::remove_file(d.join("notice.log"));
        let path = d.join("torrc");
        fs::write(&path, torrc).with_context(|| format!("writing {}", path.display()))?;
        let p = path.display().to_string();
        let out = fs::File::create(d.join("stdout.log"))?;
        self.ensure_not_host()?;
        let child = self
            .kit
            .netns_command(self.netns.name(), "tor", &["--defaults-torrc", "/dev/null", "-f", &p])
            // Directory caches compress consensus diffs in worker threads whose malloc arenas
            // keep the memory: one arena cuts the network's resident size from ~590 to ~250 MiB.
            .env("MALLOC_ARENA_MAX", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting tor {nick}"))?;
        self.procs.push((nick.to_owned(), KillOnDrop(child)));
        Ok(())
    }

    /// Starts an onion service node forwarding `port` to `target`; returns the file tor writes
    /// the `.onion` host name to.
    pub fn add_onion_service(&mut self, nick: &str, port: u16, target: &str) -> Result<PathBuf> {
        self.add_onion_service_with(nick, port, target, "")
    }

    /// [`TorNet::add_onion_service`] with more `HiddenService*` lines for the service, e.g. the
    /// appliance's DoS defences, which must not break a private network's onion service.
    pub fn add_onion_service_with(
        &mut self,
        nick: &str,
        port: u16,
        target: &str,
        extra: &str,
    ) -> Result<PathBuf> {
        let torrc = self.prepared.onion_service_torrc(nick, port, target) + extra;
        let hs = self.prepared.node_dir(nick).join("hs");
        if hs.exists() {
            fs::remove_dir_all(&hs)?;
        }
        self.spawn(nick, &torrc)?;
        Ok(hs.join("hostname"))
    }

    /// Waits until the client has bootstrapped and its consensus lists every relay as a running
    /// HSDir (onion services need them all in so small a network); returns the time since start.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        self.wait_ready_or_stop(timeout, &AtomicBool::new(false))
    }

    /// [`TorNet::wait_ready`] that gives up early once `stop` is set.
    pub fn wait_ready_or_stop(&mut self, timeout: Duration, stop: &AtomicBool) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        let client = self.prepared.node_dir("client");
        loop {
            self.check_alive()?;
            let log = fs::read_to_string(client.join("notice.log")).unwrap_or_default();
            let routers = fs::read_to_string(client.join("data/cached-microdesc-consensus"))
                .map(|c| usable_hsdirs(&c))
                .unwrap_or(0);
            if log.contains("Bootstrapped 100%") && routers >= usize::from(AUTHORITIES + RELAYS) {
                return Ok(self.started.elapsed());
            }
            if stop.load(Ordering::SeqCst) {
                bail!("stopped before the network was ready");
            }
            if Instant::now() > deadline {
                bail!(
                    "network not ready after {timeout:?}: {routers} running HSDirs in the client's \
                     consensus; logs in {}",
                    self.prepared.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Fails naming the first node that exited, with the end of its log.
    pub fn check_alive(&mut self) -> Result<()> {
        for (nick, proc) in &mut self.procs {
            if let Some(status) = proc.0.try_wait()? {
                // Configuration errors come before the log file is opened: they go to stdout.
                let d = self.prepared.node_dir(nick);
                let log = [d.join("notice.log"), d.join("stdout.log")]
                    .into_iter()
                    .find(|p| fs::metadata(p).is_ok_and(|m| m.len() > 0))
                    .unwrap_or_else(|| d.join("stdout.log"));
                let text = fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!("tor {nick} exited ({status}); end of {}:\n{}", log.display(), tail.join("\n"));
            }
        }
        Ok(())
    }

    /// The client's SOCKS port, reachable inside [`TorNet::netns`] only.
    pub fn socks_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, SOCKS_PORT))
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn netns(&self) -> &str {
        self.netns.name()
    }

    /// `ip netns exec <namespace> argv…`, not yet run.
    pub fn cmd(&self, argv: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", self.netns.name()]).args(argv);
        c
    }

    /// The namespace pinned under /run/netns must not be the host's (the one we run in).
    pub fn ensure_not_host(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let pinned = fs::metadata(Path::new("/run/netns").join(self.netns.name()))?;
        let own = fs::metadata("/proc/self/ns/net")?;
        anyhow::ensure!(
            (pinned.dev(), pinned.ino()) != (own.dev(), own.ino()),
            "{} is the host's namespace",
            self.netns.name()
        );
        Ok(())
    }

    pub fn prepared(&self) -> &Prepared {
        &self.prepared
    }

    /// Process ids of the tor processes, by nickname.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.procs.iter().map(|(n, p)| (n.clone(), p.0.id())).collect()
    }

    /// Sum of the resident set sizes of the tor processes, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.pids().iter().filter_map(|(_, pid)| vm_rss_kib(*pid)).sum()
    }
}

/// For tests that use the network `tornet run DIR` serves: waits for `DIR/ready` and returns
/// the namespace named in `DIR/netns`.
pub fn shared_network(dir: &Path, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    while !dir.join("ready").is_file() {
        if Instant::now() > deadline {
            bail!("{} did not appear within {timeout:?}", dir.join("ready").display());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let path = dir.join("netns");
    let name = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(name.trim().to_owned())
}

/// Counts routers flagged `Running` and `HSDir` in a consensus document.
pub fn usable_hsdirs(consensus: &str) -> usize {
    consensus
        .lines()
        .filter_map(|l| l.strip_prefix("s "))
        .filter(|flags| {
            let f: Vec<&str> = flags.split_whitespace().collect();
            f.contains(&"Running") && f.contains(&"HSDir")
        })
        .count()
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// Removes a data directory's contents except `keys` (an authority's identity must survive).
fn clear_state(data: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(data) else { return Ok(()) };
    for e in entries {
        let e = e?;
        if e.file_name() == "keys" && e.path().join("authority_certificate").is_file() {
            continue;
        }
        let path = e.path();
        let r = if e.file_type()?.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        r.with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// The bridge with its own address and one address per node.
fn setup_bridge(ns: &TestNetns) -> Result<()> {
    ns.exec(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
    ns.exec(&["ip", "link", "set", BRIDGE, "up"])?;
    let addrs = std::iter::once(BRIDGE_ADDR).chain(nodes().into_iter().map(|n| n.addr));
    for a in addrs {
        ns.exec(&["ip", "addr", "add", &format!("{a}/{SUBNET_PREFIX}"), "dev", BRIDGE])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_have_distinct_addresses_in_the_node_range() {
        let n = nodes();
        assert_eq!(n.len(), 9);
        assert_eq!(n[0].addr, Ipv4Addr::new(10, 77, 0, 11));
        assert_eq!(n[8].addr, Ipv4Addr::new(10, 77, 0, 19));
        assert_eq!(n[8].role, Role::Client);
        assert!(n.iter().all(|x| in_subnet(x.addr) && x.addr.octets()[3] < 100));
    }

    /// Only the client gets a control socket, in its own directory; nobody gets a TCP one.
    #[test]
    fn the_client_alone_has_a_control_socket_with_a_cookie() {
        let dir = Path::new("/nonexistent/tornet");
        let p = Prepared { dir: dir.into(), authorities: Vec::new(), appliance_torrc: dir.join("a") };
        for node in nodes() {
            let t = p.torrc(&node);
            assert!(!t.contains("ControlPort"), "{t}");
            let socket = t.lines().find_map(|l| l.strip_prefix("ControlSocket "));
            if node.role == Role::Client {
                assert_eq!(socket, Some("/nonexistent/tornet/nodes/client/control/socket"));
                assert!(t.contains("CookieAuthentication 1\n"), "{t}");
            } else {
                assert_eq!(socket, None, "{}", node.nick);
            }
        }
    }

    #[test]
    fn a_production_torrc_has_no_test_line_and_no_port_and_keeps_pow() {
        let good =
            "SocksPort 0\nControlPort 0\n# DirAuthority commented out\nHiddenServicePoWDefensesEnabled 1\n";
        assert_eq!(production_torrc_problems(good), Vec::<String>::new());
        let bad = "TestingTorNetwork 1\ndirauthority a 10.77.0.11:9030 F\nTestingV3AuthVotingInterval 20\n\
                   SocksPort 9050\nSOCKSPORT 0\nControlSocket /run/tor/control\nHiddenServicePoWDefensesEnabled 0\n";
        let problems = production_torrc_problems(bad);
        assert_eq!(problems.len(), 6, "{problems:#?}");
        assert!(problems[3].contains("SocksPort 9050"), "{problems:#?}");
        assert_eq!(problems[5], "no HiddenServicePoWDefensesEnabled 1");
    }

    #[test]
    fn hsdir_count_reads_flags() {
        let c = "r a b c\ns Fast HSDir Running Valid\nr d\ns Fast Running\nr e\ns HSDir Valid\n";
        assert_eq!(usable_hsdirs(c), 1);
    }
}
