//! The appliance's one way in, end to end: the test image boots on a tap bridged into the private
//! Tor network's namespace (started once per run by `cargo xtask test`, `CLOISTER_TORNET_DIR`),
//! takes a lease, publishes its onion service through that network, and a user logs in with
//! OpenSSH's client through the network's tor client: tor -> bridge -> sshd -> restricted shell.
//! Every tor and ssh client runs inside that namespace, which has no route out. The VM boots
//! once and runs every scenario. The harness (network, tap, udhcpd, ssh, terminals) is
//! `cloister_tests::onion`, which the onion benchmark shares.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cloister_proto::marker;
use cloister_qemu::{Firmware, Network, Vm, VmConfig};
use cloister_tests::capture::{self, Capture};
use cloister_tests::onion::*;
use cloister_tests::tornet;
use cloister_tests::*;

#[path = "onion_chat/admin.rs"]
mod admin;
#[path = "onion_chat/console.rs"]
mod console;
#[path = "onion_chat/descriptor.rs"]
mod descriptor;
#[path = "onion_chat/disk.rs"]
mod disk;
#[path = "onion_chat/totp.rs"]
mod totp;

const TAP: &str = "ctap-onion";

#[test]
fn users_log_in_through_the_onion_service_and_get_only_the_chat_shell() -> Result<()> {
    let Some(e2e) = E2e::from_env("onion-chat") else { return Ok(()) };
    let net_dir =
        PathBuf::from(std::env::var_os("CLOISTER_TORNET_DIR").context("CLOISTER_TORNET_DIR unset")?);
    let net = timed("private Tor network ready", || wait_network(&net_dir))?;
    let dir = e2e.scratch("onion-chat")?;
    let disk = dir.join("disk.img");
    sparse_copy(&e2e.image, &disk)?;
    let _tap = Tap::add(&net, TAP)?;
    let _udhcpd = start_udhcpd(&net.netns, &dir)?;
    // Everything the appliance sends, from its first frame to power off, is judged at the end.
    let capture = Capture::start(&net.netns)?;
    let write_log = dir.join("writes.log");
    let config = VmConfig {
        cpus: 1,
        network: Network::Tap { netns: net.netns.clone(), tap: TAP.into(), mac: None },
        write_log: Some(write_log.clone()),
        ..VmConfig::new(&disk, Firmware::find()?, &dir)
    };
    let vm = Vm::start(config)?;
    let chat_log = e2e.work.join("onion-chat-alice.txt");
    let (host_key, onion) = timed("unlock, host key, onion address", || {
        vm.wait_for(marker::PASSPHRASE_PROMPT, TO_UNLOCK)?;
        vm.type_line(&e2e.passphrase()?)?;
        let key = vm.wait_for(marker::SSH_HOST_KEY, TO_UNLOCK)?;
        let onion = vm.wait_for(marker::ONION_ADDRESS, TO_ONION)?;
        Ok((word_after(&key, marker::SSH_HOST_KEY)?, word_after(&onion, marker::ONION_ADDRESS)?))
    })?;
    // Users check both by scanning the console: each QR code says what its line says (the
    // code's lines may still be on their way when its text line has arrived).
    for (marker, value) in [(marker::SSH_HOST_KEY, &host_key), (marker::ONION_ADDRESS, &onion)] {
        let scanned = retry_until(Duration::from_secs(30), || {
            Ok(cloister_tests::qr::after_marker(&vm.console_text(), marker).filter(|s| s == value))
        });
        ensure!(scanned.is_ok(), "the console's QR code after {marker:?} never read {value}");
    }
    let images = e2e.image.parent().context("image dir")?;
    let socks_connect = Path::new(env!("CARGO_BIN_EXE_socks_connect"));
    let ssh = Ssh { net: &net, dir: &dir, onion: &onion, images, socks_connect, isolate: false };
    let first = timed("first login through the onion service", || ssh.first_login("alice"))?;
    ensure!(first.contains("chat    open the chat"), "no help text in:\n{first}");
    let known = ssh.known_host_fingerprint()?;
    ensure!(known == host_key, "host key {known} is not the console's {host_key}");
    let result = timed("the descriptor the client fetched announces proof-of-work", || {
        eprintln!("{}", descriptor::descriptor_announces_proof_of_work(&net_dir, &onion)?);
        Ok(())
    })
    .and_then(|()| scenarios(&ssh, &host_key, &chat_log))
    .and_then(|()| {
        timed("admin console: refusals, password, enrolment, password and code", || {
            console::console_admin_entry(&vm, &ssh)
        })
    })
    .and_then(|()| {
        timed("disk passphrases: refusals, add, remove, never the last", || {
            disk::disk_passphrases(&ssh, &e2e.passphrase()?)
        })
    });
    // Test artifacts beside the other runs' (the scratch directory goes on success): what the
    // appliance printed, to read the timings and refusals from.
    let console_log = e2e.work.join("onion-chat-console.log");
    std::fs::write(&console_log, vm.console_text())?;
    let new_passphrase = result?;
    // The running appliance's header, as written through to the image: checked before the kill
    // switch destroys it.
    timed("the disk opens with the added passphrase only", || {
        disk::image_opens_with(&disk, &dir, &new_passphrase, &e2e.passphrase()?)
    })?;
    timed("every power-cut point of the passphrase changes opens with the old or the new", || {
        let said = disk::every_cut_point_opens(
            &write_log,
            &e2e.image,
            &disk,
            &dir,
            &e2e.passphrase()?,
            &new_passphrase,
        )?;
        eprintln!("{said}");
        Ok(())
    })?;
    let killed = timed("kill switch: keys destroyed, power off", || disk::kill_switch(&ssh, &vm));
    std::fs::write(&console_log, vm.console_text())?;
    killed?;
    drop(vm);
    timed("no LUKS header is left, and the next boot says so", || {
        disk::nothing_left_to_open(&disk, &e2e.scratch("onion-chat-after-kill")?)
    })?;
    let summary = judge_capture(&capture.finish()?)?;
    std::fs::write(e2e.work.join("onion-chat-capture.txt"), &summary)?;
    eprint!("{summary}");
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// From boot to power off, through logins, chat and the scans, the appliance's MAC (the one
/// that asked for a lease) sent ARP, DHCP and tor's TCP to the private network's relays only:
/// no reply to any scan, no DNS, NTP or IPv6. Returns the counts per kind.
fn judge_capture(frames: &[capture::Frame]) -> Result<String> {
    let mac = capture::dhcp_client_mac(frames).context("no DHCP request in the capture")?;
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    let mut first_seen = std::collections::BTreeMap::<String, Duration>::new();
    for f in frames.iter().filter(|f| f.src == mac) {
        let kind = capture::classify(f);
        *counts.entry(kind.clone()).or_default() += 1;
        first_seen.entry(kind).or_insert(f.at);
    }
    let mut summary = format!(
        "{} frames captured, from the appliance ({}):\n",
        frames.len(),
        mac.map(|b| format!("{b:02x}")).join(":")
    );
    for (kind, n) in &counts {
        let at = first_seen.get(kind).map_or(0, Duration::as_millis);
        summary.push_str(&format!("{n:>8}  {kind} (first at {at} ms)\n"));
    }
    let allowed = ["arp", "dhcp", capture::TOR_TO_TEST_RELAY];
    let other: Vec<&String> = counts.keys().filter(|k| !allowed.contains(&k.as_str())).collect();
    ensure!(other.is_empty(), "the appliance sent {other:?}:\n{summary}");
    ensure!(counts.contains_key(capture::TOR_TO_TEST_RELAY), "no tor traffic seen:\n{summary}");
    Ok(summary)
}

/// Everything else on the same VM: each refusal leaves the service working for the next.
/// alice's chat session is kept in `transcript`, escape sequences removed (a test artifact).
fn scenarios(ssh: &Ssh, host_key: &str, transcript: &Path) -> Result<()> {
    timed("two users chat through irssi; the client cannot escape", || two_users_chat(ssh, transcript))?;
    timed("a command instead of the shell is refused", || {
        let out = ssh.run("bob", &[], &["id"], "")?;
        let text = both(&out);
        ensure!(!out.status.success() && text.contains("this account is for chat only"), "{text}");
        ensure!(!text.contains("uid="), "a command ran: {text}");
        Ok(())
    })?;
    timed("port forwarding and subsystems are refused", || {
        let out = ssh.run("bob", &["-W", "127.0.0.1:6667"], &[], "")?;
        ensure!(!out.status.success(), "stdio forwarding worked: {}", both(&out));
        let out = ssh.run("bob", &["-s"], &["sftp"], "")?;
        ensure!(!out.status.success() && !both(&out).contains("uid="), "sftp: {}", both(&out));
        Ok(())
    })?;
    timed("local forwarding opens no channel", || {
        forwarding_is_refused(ssh, ["-L", "127.0.0.1:7002:127.0.0.1:6667"], &[])
    })?;
    timed("dynamic (SOCKS) forwarding opens no channel", || {
        // SOCKS 5: no authentication, then CONNECT 127.0.0.1:6667 (the gateway).
        let socks: [&[u8]; 2] = [&[5, 1, 0], &[5, 1, 0, 1, 127, 0, 0, 1, 0x1a, 0x0b]];
        forwarding_is_refused(ssh, ["-D", "127.0.0.1:7003"], &socks)
    })?;
    timed("remote forwarding is refused", || {
        let opts = ["-o", "ExitOnForwardFailure=yes", "-R", "127.0.0.1:7001:127.0.0.1:22", "-N"];
        let out = ssh.run("bob", &opts, &[], "")?;
        ensure!(!out.status.success(), "-R was accepted: {}", both(&out));
        Ok(())
    })?;
    timed("scp is refused", || {
        let local = ssh.dir.join("scp-passwd");
        let out = ssh.scp("bob", "/etc/passwd", &local)?;
        ensure!(!out.status.success() && !local.exists(), "scp copied a file: {}", both(&out));
        Ok(())
    })?;
    timed("client environment is not passed, the session is unharmed", || {
        let opts = ["-tt", "-o", "SetEnv=LD_PRELOAD=/nonexistent.so BASH_ENV=/tmp/x"];
        let out = ssh.run("bob", &opts, &[], "help\nexit\n")?;
        let text = both(&out);
        ensure!(text.contains("chat    open the chat") && text.contains("bye"), "{text}");
        Ok(())
    })?;
    timed("a 1 MB line and control characters at the prompt", || {
        let long = "a".repeat(1 << 20);
        let input = format!("{long}\n\u{1}\u{2}\u{1b}[2Jid\nhelp\nexit\n");
        let out = ssh.session("bob", &input)?;
        let text = both(&out);
        ensure!(text.contains("line too long"), "no complaint about the long line: {}", tail(&text));
        ensure!(text.contains("invalid characters"), "control characters passed: {}", tail(&text));
        ensure!(text.contains("bye") && !text.contains("uid="), "{}", tail(&text));
        Ok(())
    })?;
    timed("shell metacharacters are words, not commands", || {
        let out = ssh.session("bob", "$(id);id|id`id`\nhelp\nexit\n")?;
        let text = both(&out);
        ensure!(text.contains("unknown command: ") && !text.contains("uid="), "{text}");
        ensure!(text.contains("bye"), "the shell did not survive: {text}");
        Ok(())
    })?;
    timed("passwd changes the password sshd checks", || {
        let pw = ssh.password_file("alice");
        let old = std::fs::read_to_string(&pw)?.trim_end().to_string();
        let new = format!("new-{}", token()?);
        // Each answer only after its prompt: the shell discards typed-ahead input when it
        // turns echo off, so that nothing typed early is ever shown or taken as a password.
        let answers =
            [("current password: ", &old), ("new password: ", &new), ("new password again: ", &new)];
        let said = passwd_dialogue(ssh, "alice", &answers)?;
        ensure!(said.contains("password changed"), "{}", tail(&said));
        ensure!(!said.contains(&new) && !said.contains(&old), "a password was shown on the terminal");
        std::fs::write(&pw, format!("{new}\n"))?;
        let out = ssh.session("alice", "exit\n")?;
        ensure!(both(&out).contains("bye"), "the new password does not log in: {}", both(&out));
        std::fs::write(&pw, format!("{old}\n"))?;
        let out = ssh.session("alice", "exit\n")?;
        ensure!(!both(&out).contains("bye"), "the old password still logs in");
        let wrong = "not the password".to_string();
        let other = "another long password".to_string();
        let answers =
            [("current password: ", &wrong), ("new password: ", &other), ("new password again: ", &other)];
        let said = passwd_dialogue(ssh, "bob", &answers)?;
        ensure!(said.contains("the current password is wrong"), "{}", tail(&said));
        Ok(())
    })?;
    timed("the admin CLI shows the onion address and host key with QR codes", || {
        admin::admin_shows_identity(ssh, ssh.onion, host_key)
    })?;
    timed("the admin CLI's status shows the verified firewall and the uplink", || {
        admin::admin_shows_status(ssh)
    })?;
    timed("the admin adds, locks, expires and removes a chat user over the onion", || {
        admin::admin_manages_chat_users(ssh)
    })?;
    timed("the admin CLI refuses bad input; chat users get no admin CLI", || admin::admin_refusals(ssh))?;
    timed("two-factor login: enrol by QR code, wrong/expired/reused codes fail, reset", || {
        totp::two_factor_login(ssh)
    })?;
    timed("two-factor login for the admin CLI: enrol, codes from stdin, reset", || {
        totp::admin_two_factor_login(ssh)
    })?;
    timed("a second login of the same user is refused while the first is open", || {
        let mut first = ssh.spawn_session("bob")?;
        let stdin = first.stdin.as_mut().context("stdin")?;
        stdin.write_all(b"help\n")?;
        // The first session holds the lock once its help text is back; then try the second.
        let second = retry_until(Duration::from_secs(120), || {
            let out = ssh.session("bob", "exit\n")?;
            let text = both(&out);
            if text.contains("already logged in elsewhere") {
                Ok(Some(text))
            } else {
                Ok(None)
            }
        })?;
        ensure!(second.contains("already logged in elsewhere"), "{second}");
        let _ = first.kill();
        let _ = first.wait();
        Ok(())
    })?;
    Ok(())
}

/// alice and bob open `chat`, join one channel and each sees the other's random token; then
/// alice tries what the sandbox must refuse: /exec, perl, and info commands to the server.
fn two_users_chat(ssh: &Ssh, transcript: &Path) -> Result<()> {
    let alice = Terminal::open(ssh, "alice")?;
    let bob = Terminal::open(ssh, "bob")?;
    let result = chat_and_probe(&alice, &bob, ssh.net);
    std::fs::write(transcript, plain(&alice.text_since(0)))?;
    std::fs::write(transcript.with_extension("raw"), alice.text_since(0))?;
    result
}

fn chat_and_probe(alice: &Terminal, bob: &Terminal, net: &Net) -> Result<()> {
    for t in [alice, bob] {
        t.wait_for("chat> ", Duration::from_secs(120))?;
        t.send("chat\n")?;
        // irssi's status bar once connected to the gateway and registered.
        t.wait_for("Welcome", Duration::from_secs(120))?;
        t.send("/join #cloister\r")?;
        t.wait_for("has joined", Duration::from_secs(60))?;
    }
    // Both are in the channel: the appliance's one real address shows nothing open meanwhile,
    // and the chat still carries the tokens afterwards.
    scan_finds_nothing_open(net)?;
    let (ta, tb) = (format!("alice-{}", token()?), format!("bob-{}", token()?));
    alice.send(&format!("{ta}\r"))?;
    bob.wait_for(&ta, Duration::from_secs(60)).context("bob never saw alice's token")?;
    bob.send(&format!("{tb}\r"))?;
    alice.wait_for(&tb, Duration::from_secs(60)).context("alice never saw bob's token")?;
    let (mark, bob_mark) = (alice.len(), bob.len());
    // libc.so.6 is in the view and executable by its mode (it prints glibc's banner when run):
    // only landlock keeps irssi from running it.
    let probes = [
        "/exec id",
        "/exec -nosh /usr/lib/x86_64-linux-gnu/libc.so.6",
        "/load perl",
        "/script exec print 1",
        "/quote VERSION",
        "/quote INFO",
        "/quote ADMIN",
        "/quote LUSERS",
        "/quote TIME",
        "/ctcp bob VERSION",
        "/ctcp bob TIME",
        // A DCC offer: the CTCP that carries it never reaches bob, and no connection comes.
        "/dcc chat bob",
        // Straight to ngircd, around the gate: the chat namespace's firewall drops it (if it
        // got through, ngircd's own welcome would name it, which the leak check catches).
        "/connect 127.0.0.1 6668",
    ];
    for line in probes {
        alice.send(&format!("{line}\r"))?;
        // Lines that arrive together look like a paste to irssi, which then asks before
        // sending them: one command at a time, as typed.
        std::thread::sleep(Duration::from_secs(1));
    }
    // Server replies and /load's errors go to the status window: show it before the marker.
    alice.send("/window 1\r")?;
    alice.send("/echo cloister-done\r")?;
    alice.wait_for("cloister-done", Duration::from_secs(60))?;
    // Replies, if any, have had the time of the echo's round trip to arrive.
    std::thread::sleep(Duration::from_secs(5));
    let after = alice.text_since(mark);
    // Each refusal said so: no shell for /exec, landlock for a program in the view, the gate for
    // the info commands (421), and no perl module to load.
    for said in ["/bin/sh: No such file", "libc.so.6: Permission denied", "Unknown command"] {
        ensure!(after.contains(said), "{said:?} not shown to alice:\n{}", plain(&after));
    }
    for leak in ["uid=", "ngircd", "Debian", "GNU C Library", "CTCP VERSION reply", "CTCP TIME reply"] {
        ensure!(!after.contains(leak), "{leak:?} came back to alice:\n{after}");
    }
    let bob_saw = bob.text_since(bob_mark);
    for offer in ["CTCP", "DCC"] {
        ensure!(!bob_saw.contains(offer), "alice's {offer} reached bob:\n{}", plain(&bob_saw));
    }
    for t in [alice, bob] {
        t.send("/quit\r")?;
        t.wait_for("chat ended", Duration::from_secs(60))?;
        t.send("exit\n")?;
        t.wait_for("bye", Duration::from_secs(60))?;
    }
    Ok(())
}

/// `ssh -N -L` to the gateway, or `-D` with a SOCKS request for it: ssh listens on its side
/// (inside the test namespace), but every connection to that port is turned away by sshd
/// ("administratively prohibited"), so a client speaking IRC through it gets no welcome.
fn forwarding_is_refused(ssh: &Ssh, forward: [&str; 2], preamble: &[&[u8]]) -> Result<()> {
    // The port ssh listens on: the second field of `-L addr:port:host:port` or `-D addr:port`.
    let port = forward[1].split(':').nth(1).context("a forwarding spec without a port")?;
    // INFO: ssh reports a refused channel ("open failed: administratively prohibited") there.
    let opts = ["-o", "LogLevel=INFO", "-N", forward[0], forward[1]];
    let mut fwd = ssh.command("bob", &opts, &[])?;
    let child = fwd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    let mut fwd = KillOnDrop(child);
    // Read in a thread: the ProxyCommand keeps the pipe open a little after ssh is gone.
    let (tx, said) = std::sync::mpsc::channel();
    let mut err = fwd.0.stderr.take().context("stderr")?;
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut text);
        let _ = tx.send(text);
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let reply = loop {
        let mut nc = Command::new("ip")
            .args(["netns", "exec", &ssh.net.netns, "busybox", "nc", "-w", "5", "127.0.0.1", port])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = nc.stdin.take() {
            // A SOCKS client waits for each answer before its next request; so does this one.
            for (i, step) in preamble.iter().enumerate() {
                let _ = stdin.write_all(step);
                if i + 1 < preamble.len() {
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            let _ = stdin.write_all(b"NICK probe\r\nUSER probe 0 * probe\r\n");
        }
        let out = nc.wait_with_output()?;
        if out.status.success() {
            break stdout(&out);
        }
        if Instant::now() >= deadline {
            let _ = fwd.0.kill();
            let said = said.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
            bail!("ssh {} never listened: {}; ssh said: {said}", forward[0], both(&out));
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    ensure!(!reply.contains(" 001 ") && !reply.contains("Welcome"), "IRC through {}: {reply}", forward[0]);
    let _ = fwd.0.kill();
    let _ = fwd.0.wait();
    let said = said.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    ensure!(said.contains("administratively prohibited"), "ssh did not report a refusal: {said}");
    Ok(())
}

/// nmap from the test namespace against the appliance's lease (learned from the bridge's
/// neighbour table, and checked to be inside the private network before a packet is sent):
/// every TCP port and the 100 usual UDP ports; none may be open.
fn scan_finds_nothing_open(net: &Net) -> Result<()> {
    let neigh = netns_run(&net.netns, &["ip", "-j", "neigh", "show", "dev", "tornet0"])?;
    let entries: serde_json::Value = serde_json::from_slice(&neigh.stdout)?;
    let leased = entries.as_array().into_iter().flatten().filter_map(|e| e["dst"].as_str());
    let ip: std::net::Ipv4Addr = leased
        .filter_map(|a| a.parse::<std::net::Ipv4Addr>().ok())
        .find(|a| tornet::in_subnet(*a) && (100..=120).contains(&a.octets()[3]))
        .context("the appliance's address is not in the bridge's neighbour table")?;
    let target = ip.to_string();
    let started = Instant::now();
    for args in [&["-sS", "-p-"][..], &["-sU", "--top-ports", "100"][..]] {
        let mut argv = vec!["nmap", "-Pn", "-n", "--max-retries", "1", "--min-rate", "2000", "-oG", "-"];
        argv.extend_from_slice(args);
        argv.push(&target);
        let out = netns_run(&net.netns, &argv)?;
        let text = stdout(&out);
        let open: Vec<&str> = text.lines().filter(|l| l.contains("/open/")).collect();
        ensure!(open.is_empty(), "nmap {args:?} found open ports on {target}: {open:?}");
        ensure!(text.contains("Nmap done"), "nmap did not finish: {text}");
    }
    eprintln!(
        "nmap: nothing open on {target} (all TCP, top 100 UDP) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `passwd` at the shell of `user`, answering each prompt once it shows; returns what the
/// terminal showed up to the shell's verdict, after which it logs out.
fn passwd_dialogue(ssh: &Ssh, user: &str, answers: &[(&str, &String)]) -> Result<String> {
    let t = Terminal::open(ssh, user)?;
    t.wait_for("chat> ", Duration::from_secs(120))?;
    t.send("passwd\n")?;
    for (prompt, answer) in answers {
        t.wait_for(prompt, Duration::from_secs(60))?;
        t.send(&format!("{answer}\n"))?;
    }
    let verdict = ["password changed", "password not changed"];
    let deadline = Instant::now() + Duration::from_secs(120);
    while !verdict.iter().any(|v| t.text_since(0).contains(v)) {
        ensure!(Instant::now() < deadline, "{user}: no verdict from passwd: {}", tail(&t.text_since(0)));
        std::thread::sleep(Duration::from_millis(200));
    }
    t.send("exit\n")?;
    t.wait_for("bye", Duration::from_secs(60))?;
    Ok(t.text_since(0))
}
