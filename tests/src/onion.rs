//! The harness of the boots that reach the appliance through its onion service, shared by the
//! end-to-end test (`tests/onion_chat.rs`) and the benchmark (`src/bin/onion_bench.rs`): the
//! private Tor network's namespace and SOCKS port (`cargo xtask test` and `cargo xtask bench`
//! run it, `CLOISTER_TORNET_DIR`), a tap on its bridge with busybox udhcpd for the appliance's
//! lease, and OpenSSH's client through the network's tor client to the `.onion`, either run to
//! its end ([`Ssh::run`]) or as a terminal typed into key by key ([`Terminal`]).
//!
//! Every tor and ssh client runs inside that namespace, which has no route out: a bare
//! `ssh x.onion` on the host would ask the host's resolver. Taps and child processes made here
//! are removed and killed on drop.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::{run, stdout, tornet, KillOnDrop};

/// The passphrase prompt and the unlock under TCG with the test KDF.
pub const TO_UNLOCK: Duration = Duration::from_secs(240);
/// The network bootstraps while other tests run; this bounds the wait if it has not yet.
pub const TO_NETWORK: Duration = Duration::from_secs(600);
/// From unlock to the onion address on the console: the services start, tor makes its keys.
pub const TO_ONION: Duration = Duration::from_secs(600);
/// First login: the appliance's tor must bootstrap under TCG and publish its descriptor.
pub const TO_FIRST_LOGIN: Duration = Duration::from_secs(900);

/// The test image's admin account (`xtask/src/test.rs`), which logs in by key only.
pub const ADMIN: &str = "ops";

/// The private network's namespace and its tor client's SOCKS address (inside it).
pub struct Net {
    pub netns: String,
    pub socks: String,
}

/// The network's namespace and SOCKS address once `tornet run` says it is ready.
pub fn wait_network(dir: &Path) -> Result<Net> {
    let deadline = Instant::now() + TO_NETWORK;
    while !dir.join("ready").exists() {
        ensure!(Instant::now() < deadline, "the private Tor network in {} was not ready", dir.display());
        std::thread::sleep(Duration::from_secs(2));
    }
    let netns = std::fs::read_to_string(dir.join("netns"))?.trim().to_string();
    ensure!(netns.starts_with("cloister-"), "unexpected namespace name {netns:?}");
    Ok(Net { netns, socks: format!("127.0.0.1:{}", tornet::SOCKS_PORT) })
}

pub fn netns_run(netns: &str, argv: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(["netns", "exec", netns]).args(argv))
}

/// A tap in the network's namespace, on its bridge and up, for QEMU's NIC; deleted on drop
/// (the namespace is shared by the whole run, so the tap must not outlive its boot).
pub struct Tap {
    netns: String,
    name: String,
}

impl Tap {
    pub fn add(net: &Net, name: &str) -> Result<Self> {
        netns_run(&net.netns, &["ip", "tuntap", "add", "dev", name, "mode", "tap"])?;
        // From here on the guard removes it, also when the next step fails.
        let tap = Self { netns: net.netns.clone(), name: name.into() };
        netns_run(&net.netns, &["ip", "link", "set", name, "master", tornet::BRIDGE, "up"])?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ =
            Command::new("ip").args(["netns", "exec", &self.netns, "ip", "link", "del", &self.name]).status();
    }
}

/// busybox udhcpd on the network's bridge: addresses above the nodes', no router (the relays
/// are on the link, and nothing else exists).
pub fn start_udhcpd(netns: &str, dir: &Path) -> Result<KillOnDrop> {
    let conf = dir.join("udhcpd.conf");
    let d = dir.display();
    std::fs::write(
        &conf,
        format!(
            "start 10.77.0.100\nend 10.77.0.120\ninterface tornet0\nlease_file {d}/leases\n\
             pidfile {d}/udhcpd.pid\nopt subnet 255.255.255.0\nopt lease 600\n"
        ),
    )?;
    std::fs::write(dir.join("leases"), b"")?;
    let child = Command::new("ip")
        .args(["netns", "exec", netns, "busybox", "udhcpd", "-f"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start udhcpd")?;
    Ok(KillOnDrop(child))
}

/// What a terminal showed: the bytes, and when each read of them arrived, so that the moment a
/// text first showed is known without polling for it.
#[derive(Default)]
struct Screen {
    bytes: Vec<u8>,
    /// (end offset in `bytes`, arrival) per read, in order.
    reads: Vec<(usize, Instant)>,
}

impl Screen {
    fn push(&mut self, bytes: &[u8], at: Instant) {
        self.bytes.extend_from_slice(bytes);
        self.reads.push((self.bytes.len(), at));
    }

    fn seen_at(&self, needle: &str, mark: usize) -> Option<Instant> {
        // `windows(0)` would panic; an empty text says nothing anyway.
        if needle.is_empty() {
            return None;
        }
        let from = mark.min(self.bytes.len());
        let at = self.bytes[from..].windows(needle.len()).position(|w| w == needle.as_bytes())?;
        let end = from + at + needle.len();
        self.reads.iter().find(|(e, _)| *e >= end).map(|(_, t)| *t)
    }
}

/// An interactive ssh session whose output is collected by a thread, for typing into irssi.
pub struct Terminal {
    child: std::process::Child,
    stdin: Mutex<std::process::ChildStdin>,
    screen: Arc<Mutex<Screen>>,
    user: String,
}

impl Terminal {
    pub fn open(ssh: &Ssh, user: &str) -> Result<Self> {
        let mut child = ssh
            .command(user, &["-tt"], &[])?
            .env("TERM", "xterm")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let screen = Arc::new(Mutex::new(Screen::default()));
        for mut from in [
            Box::new(child.stdout.take().context("stdout")?) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().context("stderr")?),
        ] {
            let to = screen.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let at = Instant::now();
                    to.lock().map(|mut s| s.push(&buf[..n], at)).ok();
                }
            });
        }
        Ok(Self { child, stdin: Mutex::new(stdin), screen, user: user.into() })
    }

    /// Types `text`; returns when its last byte was written (the moment a message is sent, for
    /// latencies).
    pub fn send(&self, text: &str) -> Result<Instant> {
        let mut stdin = self.stdin.lock().map_err(|_| anyhow::anyhow!("stdin lock"))?;
        let mut last = Instant::now();
        // Typed a little at a time, as a person would: irssi reads keys, not lines.
        for chunk in text.as_bytes().chunks(16) {
            stdin.write_all(chunk)?;
            stdin.flush()?;
            last = Instant::now();
            std::thread::sleep(Duration::from_millis(30));
        }
        Ok(last)
    }

    pub fn len(&self) -> usize {
        self.screen.lock().map(|s| s.bytes.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything after byte `mark`, escape sequences and all.
    pub fn text_since(&self, mark: usize) -> String {
        self.screen
            .lock()
            .map(|s| String::from_utf8_lossy(&s.bytes[mark.min(s.bytes.len())..]).into_owned())
            .unwrap_or_default()
    }

    /// When `needle` first showed completely after byte `mark`: the arrival of the read that
    /// brought its last byte.
    pub fn seen_at(&self, needle: &str, mark: usize) -> Option<Instant> {
        self.screen.lock().ok()?.seen_at(needle, mark)
    }

    /// Whether the ssh client has ended (a login refused, a connection lost).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let start = 0;
        loop {
            if self.text_since(start).contains(needle) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let text = self.text_since(0);
                let tail: String =
                    text.chars().rev().take(2000).collect::<Vec<_>>().into_iter().rev().collect();
                bail!("{}: {needle:?} did not appear within {timeout:?}; last output:\n{tail:?}", self.user);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Terminal output without its escape sequences (CSI and the two-byte ones), for reading.
pub fn plain(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                match chars.next() {
                    Some('[') => while chars.next().is_some_and(|c| !c.is_ascii_alphabetic() && c != '~') {},
                    // Character set designations: one more byte.
                    Some('(' | ')') => {
                        chars.next();
                    }
                    _ => {}
                }
            }
            '\r' => {}
            c if c.is_control() && c != '\n' => {}
            c => out.push(c),
        }
    }
    out
}

/// How a client authenticates: chat users by password, the admin by key.
#[derive(Clone, Copy)]
pub enum Auth {
    Password,
    Key,
}

/// OpenSSH's client for one boot: where its files live and which onion service it reaches.
pub struct Ssh<'a> {
    pub net: &'a Net,
    /// The boot's scratch directory: known_hosts, password files, askpass scripts.
    pub dir: &'a Path,
    pub onion: &'a str,
    /// The test image's directory, where `chat-<user>` holds each test password.
    pub images: &'a Path,
    /// The `socks_connect` binary, ssh's `ProxyCommand`.
    pub socks_connect: &'a Path,
    /// Each user's connections on circuits of their own (SOCKS username = the login, which
    /// tor's `IsolateSOCKSAuth` keeps apart), as when every person runs their own tor. Without
    /// it every connection shares one rendezvous circuit, whose stream limit
    /// (`HiddenServiceMaxStreams`, which closes the circuit) a few sessions reach.
    pub isolate: bool,
}

impl Ssh<'_> {
    /// `ssh` inside the network's namespace, through its tor client, trusting only its own
    /// known_hosts file and typing the password from the user's file (askpass).
    /// `options` go before the destination and `remote` (a command for sshd) after it: ssh takes
    /// its first non-option word as the host.
    pub fn command(&self, user: &str, options: &[&str], remote: &[&str]) -> Result<Command> {
        let auth = if user == ADMIN { Auth::Key } else { Auth::Password };
        self.command_with(user, auth, options, remote)
    }

    pub fn command_with(&self, user: &str, auth: Auth, options: &[&str], remote: &[&str]) -> Result<Command> {
        let mut tail = vec![format!("{user}@{}", self.onion)];
        tail.extend(remote.iter().map(|r| r.to_string()));
        self.client("ssh", user, auth, options, &tail)
    }

    /// The admin CLI runs `command` (`ssh ops@x.onion user list`); its output, if it succeeded.
    pub fn admin(&self, command: &[&str]) -> Result<String> {
        let out = self.admin_output(command)?;
        ensure!(out.status.success(), "admin {command:?} failed: {}", both(&out));
        Ok(stdout(&out))
    }

    pub fn admin_output(&self, command: &[&str]) -> Result<Output> {
        self.run(ADMIN, &[], command, "")
    }

    /// Whether `user` gets the chat shell with its current password.
    pub fn logs_in(&self, user: &str) -> Result<bool> {
        Ok(both(&self.session(user, "exit\n")?).contains("bye"))
    }

    /// The admin account tried with `password`: sshd offers admins keys only.
    pub fn password_login_as_admin(&self, password: &str) -> Result<Output> {
        std::fs::write(self.password_file(ADMIN), format!("{password}\n"))?;
        let child = self
            .command_with(ADMIN, Auth::Password, &[], &["status"])?
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        finish(child, "", Duration::from_secs(300))
    }

    /// Where the password the next login of `user` types is kept (0600, the scratch directory).
    pub fn password_file(&self, user: &str) -> PathBuf {
        self.dir.join(format!("password-{user}"))
    }

    /// `scp` of `remote` (a path on the appliance) to `local`, with the same options as ssh.
    pub fn scp(&self, user: &str, remote: &str, local: &Path) -> Result<Output> {
        let tail = [format!("{user}@{}:{remote}", self.onion), local.display().to_string()];
        let child = self
            .client("scp", user, Auth::Password, &[], &tail)?
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        finish(child, "", Duration::from_secs(300))
    }

    /// OpenSSH's `program` (ssh, scp) inside the network's namespace with the test's options,
    /// then `options` and `tail`.
    pub fn client(
        &self,
        program: &str,
        user: &str,
        auth: Auth,
        options: &[&str],
        tail: &[String],
    ) -> Result<Command> {
        let askpass = self.dir.join(format!("askpass-{user}"));
        if matches!(auth, Auth::Password) && !askpass.exists() {
            // The script reads the user's current password from a copy the test may replace
            // (or has written already, for a user the test made).
            let pw = self.password_file(user);
            if !pw.exists() {
                std::fs::copy(self.images.join(format!("chat-{user}")), &pw)?;
            }
            std::fs::write(&askpass, format!("#!/bin/sh\ncat '{}'\n", pw.display()))?;
            std::os::unix::fs::PermissionsExt::set_mode(
                &mut std::fs::metadata(&askpass)?.permissions(),
                0o700,
            );
            std::fs::set_permissions(&askpass, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        }
        let isolate = if self.isolate { format!("--isolate {user} ") } else { String::new() };
        let proxy = format!("{} {isolate}{} %h %p", self.socks_connect.display(), self.net.socks);
        let known = self.dir.join("known_hosts");
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.net.netns, program, "-F", "/dev/null"]);
        let auth_options = match auth {
            Auth::Password => vec![
                "PreferredAuthentications=password".to_string(),
                "PubkeyAuthentication=no".into(),
                "NumberOfPasswordPrompts=1".into(),
            ],
            Auth::Key => vec![
                "PreferredAuthentications=publickey".to_string(),
                format!("IdentityFile={}", self.admin_key()?.display()),
                "IdentitiesOnly=yes".into(),
                "PasswordAuthentication=no".into(),
                "BatchMode=yes".into(),
            ],
        };
        let common = [
            format!("ProxyCommand={proxy}"),
            format!("UserKnownHostsFile={}", known.display()),
            "StrictHostKeyChecking=accept-new".into(),
            "CheckHostIP=no".into(),
            "ConnectTimeout=120".into(),
            "ServerAliveInterval=30".into(),
        ];
        for o in common.into_iter().chain(auth_options) {
            c.arg("-o").arg(o);
        }
        // ssh keeps the first value it is given: a caller's LogLevel must come first.
        if !options.iter().any(|o| o.starts_with("LogLevel=")) {
            c.args(["-o", "LogLevel=ERROR"]);
        }
        c.args(options).args(tail);
        c.env("SSH_ASKPASS", &askpass).env("SSH_ASKPASS_REQUIRE", "force").env("DISPLAY", ":0");
        c.env_remove("SSH_AUTH_SOCK");
        Ok(c)
    }

    /// The admin's private key, copied from the test image's directory (0600, ssh insists).
    pub fn admin_key(&self) -> Result<PathBuf> {
        let key = self.dir.join("admin-key");
        if !key.exists() {
            std::fs::copy(self.images.join("admin-key"), &key)?;
            std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        }
        Ok(key)
    }

    pub fn run(&self, user: &str, options: &[&str], remote: &[&str], input: &str) -> Result<Output> {
        let child = self
            .command(user, options, remote)?
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        finish(child, input, Duration::from_secs(300))
    }

    /// An interactive session (a remote terminal) fed `input`.
    pub fn session(&self, user: &str, input: &str) -> Result<Output> {
        self.run(user, &["-tt"], &[], input)
    }

    pub fn spawn_session(&self, user: &str) -> Result<std::process::Child> {
        Ok(self
            .command(user, &["-tt"], &[])?
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?)
    }

    /// Retries until the onion service answers (descriptor published, circuits built).
    pub fn first_login(&self, user: &str) -> Result<String> {
        let started = Instant::now();
        retry_until(TO_FIRST_LOGIN, || {
            let out = self.session(user, "help\nexit\n")?;
            let text = both(&out);
            if text.contains("bye") {
                eprintln!("first login after {:.0} s", started.elapsed().as_secs_f64());
                return Ok(Some(text));
            }
            eprintln!(
                "not yet ({:.0} s): {}",
                started.elapsed().as_secs_f64(),
                text.lines().last().unwrap_or("")
            );
            Ok(None)
        })
    }

    pub fn known_host_fingerprint(&self) -> Result<String> {
        let out = run(Command::new("ssh-keygen")
            .arg("-l")
            .arg("-E")
            .arg("sha256")
            .arg("-f")
            .arg(self.dir.join("known_hosts")))?;
        let text = stdout(&out);
        Ok(text.split_whitespace().nth(1).context("no fingerprint in known_hosts")?.to_string())
    }
}

/// Feeds `input`, collects stdout and stderr as they come (a remote terminal echoes what it
/// gets: an undrained pipe would stall the whole chain), and waits up to `timeout`.
pub fn finish(mut child: std::process::Child, input: &str, timeout: Duration) -> Result<Output> {
    if let Some(mut stdin) = child.stdin.take() {
        let input = input.as_bytes().to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
            // Kept open briefly so that a remote terminal reads the input before EOF.
            std::thread::sleep(Duration::from_secs(20));
            drop(stdin);
        });
    }
    // A receiver, not a join: the ProxyCommand may hold a pipe open after ssh is gone.
    let drain = |r: Option<Box<dyn Read + Send>>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            let _ = tx.send(buf);
        });
        rx
    };
    let out = drain(child.stdout.take().map(|o| Box::new(o) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|e| Box::new(e) as Box<dyn Read + Send>));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stdout = out.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    let stderr = err.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    let output = Output {
        status: status.unwrap_or_else(|| std::os::unix::process::ExitStatusExt::from_raw(9)),
        stdout,
        stderr,
    };
    match status {
        Some(_) => Ok(output),
        None => bail!("ssh did not finish within {timeout:?}: {}", tail(&both(&output))),
    }
}

/// Calls `attempt` every 5 s until it gives a value, for at most `timeout`.
pub fn retry_until<T>(timeout: Duration, mut attempt: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = attempt()? {
            return Ok(v);
        }
        ensure!(Instant::now() < deadline, "gave up after {timeout:?}");
        std::thread::sleep(Duration::from_secs(5));
    }
}

/// The last 2000 characters, for error messages about long outputs.
pub fn tail(text: &str) -> String {
    let start = text.char_indices().rev().nth(2000).map_or(0, |(i, _)| i);
    text[start..].to_string()
}

/// stdout and stderr together, as a terminal would have shown them.
pub fn both(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The first word after `prefix` in `line`.
pub fn word_after(line: &str, prefix: &str) -> Result<String> {
    let rest = line.split(prefix).nth(1).with_context(|| format!("{prefix:?} not in {line:?}"))?;
    Ok(rest.split_whitespace().next().context("nothing after the marker")?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_drops_escape_sequences_and_carriage_returns() {
        assert_eq!(plain("\u{1b}[1;31mred\u{1b}[0m\r\n\u{1b}(Bok\u{7}"), "red\nok");
    }

    /// A text split over two reads showed when the second arrived; one before the mark is not
    /// seen again.
    #[test]
    fn a_text_shows_when_the_read_with_its_last_byte_arrived() {
        let t0 = Instant::now();
        let (t1, t2) = (t0 + Duration::from_millis(5), t0 + Duration::from_millis(9));
        let mut s = Screen::default();
        s.push(b"<bob> tok", t0);
        s.push(b"en-1\r\n<bob> x", t1);
        s.push(b"y token-2", t2);
        assert_eq!(s.seen_at("token-1", 0), Some(t1));
        assert_eq!(s.seen_at("<bob> x", 0), Some(t1));
        assert_eq!(s.seen_at("token-2", 0), Some(t2));
        assert_eq!(s.seen_at("token-1", 12), None);
        assert_eq!(s.seen_at("token-3", 0), None);
    }

    #[test]
    fn word_after_takes_the_next_word() {
        assert_eq!(word_after("x: onion address abc.onion (v3)", "onion address").unwrap(), "abc.onion");
        assert!(word_after("nothing here", "onion address").is_err());
    }
}
