//! `onion_bench`: the onion chat's benchmark, run by `cargo xtask bench onion` with the
//! environment `cargo xtask test` gives the end-to-end tests (the test image, its passphrase,
//! the private Tor network's directory). It boots the test image on a tap in the network's
//! namespace, as the end-to-end test does, and measures through the onion service only:
//!
//! - wall time from QEMU's start to the passphrase prompt (typed at once), the unlock, the onion
//!   address on the console, the first login through the onion (the shell's prompt on the
//!   terminal) and the first `chat` (irssi registered with the server);
//! - the admin CLI's `user add` over the onion, which makes 8 users beside alice and bob;
//! - 10 users logging in at once (each through circuits of its own, as people with their own
//!   tor), joining one channel and each sending a few messages with a unique token: for every
//!   (sender, receiver) pair, when the token showed on the receiver's terminal;
//! - the appliance's memory per program and in total (`status --json` through the admin CLI)
//!   with one user in chat and with the ten.
//!
//! Progress goes to stderr; the figures go to stdout as one line, `onion-bench: figures
//! <json>`, which `cargo xtask bench` prints as a table next to its targets. Nothing here
//! judges a figure: targets belong to the bench's table.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cloister_proto::marker;
use cloister_qemu::{Firmware, Network, Vm, VmConfig};
use cloister_tests::onion::{
    plain, start_udhcpd, tail, wait_network, word_after, Net, Ssh, Tap, Terminal, TO_FIRST_LOGIN, TO_ONION,
    TO_UNLOCK,
};
use cloister_tests::{sparse_copy, timed, token, E2e};
use serde_json::{json, Value};

/// What `cargo xtask bench` looks for on stdout.
const FIGURES: &str = "onion-bench: figures ";
const TAP: &str = "ctap-bench";
/// As the end-to-end test boots it.
const VCPUS: u32 = 1;
/// alice and bob are in the test image; the admin adds the rest.
const IMAGE_USERS: [&str; 2] = ["alice", "bob"];
const USERS: usize = 10;
const CHANNEL: &str = "#bench";
/// Messages each user sends, and the time between two of one user's.
const MESSAGES: usize = 5;
const INTERVAL: Duration = Duration::from_secs(4);
/// Between two users' logins: sshd's `MaxStartups 10:30:60` drops connections beyond ten
/// unauthenticated ones, and a crowd of simultaneous password checks under TCG would outlast
/// `LoginGraceTime`.
const STAGGER: Duration = Duration::from_secs(2);
/// The shell's prompt.
const PROMPT: &str = "chat> ";
/// irssi's welcome once the server registered it.
const WELCOME: &str = "Welcome";
/// One login attempt (the descriptor may not be published yet); the whole wait is bounded by
/// `TO_FIRST_LOGIN`.
const ATTEMPT: Duration = Duration::from_secs(180);
/// After the last message: what has not arrived by then is counted as not delivered.
const TO_DELIVER: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("onion-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let e2e = E2e::from_env("onion-bench").context("run it through `cargo xtask bench onion`")?;
    let net_dir =
        PathBuf::from(std::env::var_os("CLOISTER_TORNET_DIR").context("CLOISTER_TORNET_DIR unset")?);
    let net = timed("private Tor network ready", || wait_network(&net_dir))?;
    let dir = e2e.scratch("onion-bench")?;
    let disk = dir.join("disk.img");
    sparse_copy(&e2e.image, &disk)?;
    let tap = Tap::add(&net, TAP)?;
    let _udhcpd = start_udhcpd(&net.netns, &dir)?;
    let config = VmConfig {
        cpus: VCPUS,
        network: Network::Tap { netns: net.netns.clone(), tap: tap.name().into(), mac: None },
        ..VmConfig::new(&disk, Firmware::find()?, &dir)
    };
    let memory_mib = config.memory_mib;
    let started = Instant::now();
    let vm = Vm::start(config)?;
    let result = measure(&e2e, &vm, started, &net, &dir);
    // What the appliance printed, beside the test runs' logs, to read a disturbed run from.
    std::fs::write(e2e.work.join("onion-bench-console.log"), vm.console_text())?;
    let mut figures = result?;
    figures["vcpus"] = json!(VCPUS);
    figures["memory_mib"] = json!(memory_mib);
    println!("{FIGURES}{figures}");
    drop(vm);
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

fn measure(e2e: &E2e, vm: &Vm, started: Instant, net: &Net, dir: &Path) -> Result<Value> {
    let secs = |at: Instant| at.duration_since(started).as_secs_f64();
    vm.wait_for(marker::PASSPHRASE_PROMPT, TO_UNLOCK)?;
    let prompt = started.elapsed().as_secs_f64();
    vm.type_line(&e2e.passphrase()?)?;
    vm.wait_for(marker::UNLOCKED, TO_UNLOCK)?;
    let unlocked = started.elapsed().as_secs_f64();
    let line = vm.wait_for(marker::ONION_ADDRESS, TO_ONION)?;
    let onion_at = started.elapsed().as_secs_f64();
    let onion = word_after(&line, marker::ONION_ADDRESS)?;
    eprintln!("onion-bench: prompt {prompt:.1} s, unlocked {unlocked:.1} s, onion address {onion_at:.1} s");

    let socks_connect = beside_me("socks_connect")?;
    let images = e2e.image.parent().context("image dir")?;
    let ssh = Ssh { net, dir, onion: &onion, images, socks_connect: &socks_connect, isolate: true };
    let (first, login_at, attempts) = timed("first login through the onion", || first_login(&ssh))?;
    let mark = first.len();
    first.send("chat\n")?;
    let chat_at = seen(&first, WELCOME, mark, Duration::from_secs(120))?;
    eprintln!(
        "onion-bench: first login {:.1} s ({attempts} attempts), first chat {:.1} s",
        secs(login_at),
        secs(chat_at)
    );
    let one_user = timed("memory with one user in chat", || memory(&ssh))?;
    leave(&first)?;
    drop(first);

    let users = timed("8 more users through the admin CLI", || add_users(&ssh))?;
    let names: Vec<String> = IMAGE_USERS.iter().map(|u| u.to_string()).chain(users.names).collect();
    let (sessions, logins) = timed("10 users log in at once and join", || join_all(&ssh, &names))?;
    let chat = timed("10 users chat", || chat(&names, &sessions));
    for (name, t) in names.iter().zip(&sessions) {
        std::fs::write(e2e.work.join(format!("onion-bench-{name}.txt")), plain(&t.text_since(0)))?;
    }
    let chat = chat?;
    let ten_users = timed("memory with ten users in chat", || memory(&ssh))?;
    drop(sessions);
    Ok(json!({
        "boot": {
            "prompt_s": prompt,
            "unlocked_s": unlocked,
            "onion_address_s": onion_at,
            "first_login_s": secs(login_at),
            "first_chat_s": secs(chat_at),
            "login_attempts": attempts,
        },
        "user_add_s": users.seconds,
        "sessions": logins,
        "chat": chat,
        "memory": { "one_user": one_user, "ten_users": ten_users },
    }))
}

/// A binary of this package: cargo puts them all in one directory.
fn beside_me(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find onion_bench's own path")?;
    let path = me.parent().context("onion_bench has no directory")?.join(name);
    ensure!(path.is_file(), "{} is not built", path.display());
    Ok(path)
}

/// Tries alice's login until the onion service answers; returns her terminal at the shell's
/// prompt, when the prompt arrived, and the number of attempts.
fn first_login(ssh: &Ssh) -> Result<(Terminal, Instant, u32)> {
    let deadline = Instant::now() + TO_FIRST_LOGIN;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut t = Terminal::open(ssh, IMAGE_USERS[0])?;
        let until = Instant::now() + ATTEMPT;
        loop {
            if let Some(at) = t.seen_at(PROMPT, 0) {
                return Ok((t, at, attempt));
            }
            if t.exited() || Instant::now() > until {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let said = t.text_since(0);
        eprintln!("onion-bench: login attempt {attempt}: {}", said.lines().last().unwrap_or("no answer"));
        ensure!(Instant::now() < deadline, "no login through the onion within {TO_FIRST_LOGIN:?}");
        drop(t);
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// When `needle` shows on `t` after byte `mark`, polled for at most `timeout`.
fn seen(t: &Terminal, needle: &str, mark: usize, timeout: Duration) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(at) = t.seen_at(needle, mark) {
            return Ok(at);
        }
        ensure!(
            Instant::now() < deadline,
            "{needle:?} did not show within {timeout:?}:\n{}",
            tail(&t.text_since(mark))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Leaves irssi and the shell.
fn leave(t: &Terminal) -> Result<()> {
    t.send("/quit\r")?;
    t.wait_for("chat ended", Duration::from_secs(60))?;
    t.send("exit\n")?;
    t.wait_for("bye", Duration::from_secs(60))
}

/// The `memory` object of PID 1's `status`, through the admin CLI over the onion (whose own
/// session, an sshd and the CLI, is counted too).
fn memory(ssh: &Ssh) -> Result<Value> {
    let text = ssh.admin(&["status", "--json"])?;
    let status: Value =
        serde_json::from_str(text.trim()).with_context(|| format!("status --json: {text}"))?;
    ensure!(status["memory"]["total"]["rss_kib"].is_u64(), "no memory in status: {text}");
    Ok(status["memory"].clone())
}

struct Added {
    names: Vec<String>,
    /// How long each `user add` took, over the onion, the password hashed on the appliance.
    seconds: Vec<f64>,
}

/// user03…user10 by the admin CLI, each generated password kept where the next login reads it.
fn add_users(ssh: &Ssh) -> Result<Added> {
    let mut added = Added { names: Vec::new(), seconds: Vec::new() };
    for n in IMAGE_USERS.len() + 1..=USERS {
        let name = format!("user{n:02}");
        let t = Instant::now();
        let said = ssh.admin(&["user", "add", &name])?;
        added.seconds.push(t.elapsed().as_secs_f64());
        let line = said.lines().find(|l| l.starts_with("initial password")).context("no password shown")?;
        let password = word_after(line, &format!("initial password (shown only now; give it to {name}):"))?;
        std::fs::write(ssh.password_file(&name), format!("{password}\n"))?;
        added.names.push(name);
    }
    Ok(added)
}

/// Every user logs in (staggered), opens `chat` and joins the channel, all at once; returns the
/// terminals in `names`' order and each one's seconds from its ssh start to the prompt, to
/// irssi's welcome and to its join.
fn join_all(ssh: &Ssh, names: &[String]) -> Result<(Vec<Terminal>, Value)> {
    let joined: Vec<Result<(Terminal, [f64; 3])>> = std::thread::scope(|s| {
        let handles: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                s.spawn(move || {
                    std::thread::sleep(STAGGER * u32::try_from(i).unwrap_or(0));
                    join(ssh, name).with_context(|| format!("{name} could not join"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a joining thread panicked"))))
            .collect()
    });
    let mut terminals = Vec::new();
    let mut times = Vec::new();
    for j in joined {
        let (t, s) = j?;
        terminals.push(t);
        times.push(s);
    }
    let column = |k: usize| times.iter().map(|t| t[k]).collect::<Vec<f64>>();
    let logins = json!({ "login_s": column(0), "chat_s": column(1), "join_s": column(2) });
    Ok((terminals, logins))
}

fn join(ssh: &Ssh, name: &str) -> Result<(Terminal, [f64; 3])> {
    let start = Instant::now();
    let since = |at: Instant| at.duration_since(start).as_secs_f64();
    let t = Terminal::open(ssh, name)?;
    let login = seen(&t, PROMPT, 0, ATTEMPT)?;
    let mark = t.len();
    t.send("chat\n")?;
    let welcome = seen(&t, WELCOME, mark, Duration::from_secs(120))?;
    let mark = t.len();
    t.send(&format!("/join {CHANNEL}\r"))?;
    let joined = seen(&t, "has joined", mark, Duration::from_secs(120))?;
    Ok((t, [since(login), since(welcome), since(joined)]))
}

/// One message: who sent which token when.
struct Sent {
    from: usize,
    token: String,
    at: Instant,
}

/// Each user sends `MESSAGES` tokens, one every `INTERVAL`, the users' sends spread evenly over
/// the interval; then every other user's terminal is watched for each token.
fn chat(names: &[String], terminals: &[Terminal]) -> Result<Value> {
    // Everyone's JOIN has been answered; the last joins' lines settle on the others' screens.
    std::thread::sleep(Duration::from_secs(5));
    let marks: Vec<usize> = terminals.iter().map(Terminal::len).collect();
    let begin = Instant::now() + Duration::from_secs(1);
    let sent: Vec<Result<Vec<Sent>>> = std::thread::scope(|s| {
        let handles: Vec<_> = terminals
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let name = &names[i];
                s.spawn(move || {
                    let phase = INTERVAL * u32::try_from(i).unwrap_or(0) / u32::try_from(USERS).unwrap_or(1);
                    let mut out = Vec::new();
                    for m in 0..MESSAGES {
                        let due = begin + phase + INTERVAL * u32::try_from(m).unwrap_or(0);
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                        let token = format!("{name}-{m}-{}", token()?);
                        let at = t.send(&format!("{token}\r"))?;
                        out.push(Sent { from: i, token, at });
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a sending thread panicked"))))
            .collect()
    });
    let mut messages = Vec::new();
    for s in sent {
        messages.extend(s?);
    }
    let expected = messages.len() * (terminals.len() - 1);
    let deliveries = |messages: &[Sent]| {
        let mut latencies = Vec::new();
        for m in messages {
            for (r, t) in terminals.iter().enumerate().filter(|(r, _)| *r != m.from) {
                if let Some(at) = t.seen_at(&m.token, marks[r]) {
                    latencies.push(at.saturating_duration_since(m.at).as_secs_f64() * 1000.0);
                }
            }
        }
        latencies
    };
    let last = messages.iter().map(|m| m.at).max().unwrap_or_else(Instant::now);
    let mut latencies = deliveries(&messages);
    while latencies.len() < expected && last.elapsed() < TO_DELIVER {
        std::thread::sleep(Duration::from_secs(1));
        latencies = deliveries(&messages);
    }
    latencies.sort_by(f64::total_cmp);
    // A few of the missing ones by name, to look for in the terminals' transcripts.
    let missing = messages.iter().flat_map(|m| {
        let unseen = terminals
            .iter()
            .enumerate()
            .filter(|(r, t)| *r != m.from && t.seen_at(&m.token, marks[*r]).is_none());
        unseen.map(|(r, _)| (r, m.token.as_str()))
    });
    for (r, token) in missing.take(10) {
        eprintln!("onion-bench: {} never saw {token}", names[r]);
    }
    eprintln!(
        "onion-bench: {} of {expected} deliveries, p50 {:.0} ms, p95 {:.0} ms",
        latencies.len(),
        percentile(&latencies, 50),
        percentile(&latencies, 95)
    );
    Ok(json!({
        "users": terminals.len(),
        "messages": messages.len(),
        "expected": expected,
        "delivered": latencies.len(),
        "latency_ms": {
            "p50": percentile(&latencies, 50),
            "p95": percentile(&latencies, 95),
            "max": latencies.last().copied().unwrap_or(f64::NAN),
        },
    }))
}

/// Nearest rank of sorted values; NaN when there are none.
fn percentile(sorted: &[f64], p: usize) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 50), 10.0);
        assert_eq!(percentile(&v, 95), 19.0);
        assert_eq!(percentile(&v, 100), 20.0);
        assert_eq!(percentile(&[7.0], 95), 7.0);
        assert!(percentile(&[], 50).is_nan());
    }
}
