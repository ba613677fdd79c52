//! Host integration tests of the firewall: `cloister-init --firewall-apply` programs nf_tables
//! inside network namespaces these tests create (`ip netns add cloister-fw-<pid>-<n>`), never
//! in the host's; each namespace is deleted by a guard's Drop, and no host sysctl is touched.
//! They compare our ruleset with the same policy written independently in nft syntax, send
//! traffic over a veth pair to a peer namespace, and show that a changed live ruleset fails
//! verification. They need root, `nft`, `setpriv`, busybox and `CLOISTER_INIT_BIN`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cloister_plan::{FirewallPlan, Plan};
use cloister_tests::{stdout, Host, KillOnDrop, TestNetns};
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_probe");
const TOR_UID: u32 = 4242;
const NOBODY: u32 = 65534;

/// The appliance's policy written by hand in nft syntax: the reference our code must match.
const REFERENCE_NFT: &str = r#"
table inet cloister {
    chain input {
        type filter hook input priority filter; policy drop;
        iifname "lo" accept
        meta nfproto ipv6 counter drop
        ct state invalid drop
        ct state established,related accept
        udp sport 67 udp dport 68 accept
        counter limit rate 10/minute burst 5 packets log prefix "cloister-drop-in: "
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        counter limit rate 10/minute burst 5 packets log prefix "cloister-drop-fwd: "
    }
    chain output {
        type filter hook output priority filter; policy drop;
        oifname "lo" accept
        meta nfproto ipv6 counter drop
        ct state invalid drop
        ct state established,related accept
        udp sport 68 udp dport 67 accept
        udp dport 53 counter limit rate 10/minute burst 5 packets log prefix "cloister-dns: "
        udp dport 53 drop
        tcp dport 53 counter limit rate 10/minute burst 5 packets log prefix "cloister-dns: "
        tcp dport 53 drop
        meta skuid 4242 tcp dport 80 accept
        meta skuid 4242 tcp dport 443 accept
        meta skuid 4242 tcp dport 9001 accept
        meta skuid 4242 tcp dport 9030 accept
        counter limit rate 10/minute burst 5 packets log prefix "cloister-drop-out: "
    }
}
"#;

/// The chat namespace's policy, by hand (gateway uid 4343, chat group 2000).
const CHAT_REFERENCE_NFT: &str = r#"
table inet cloister {
    chain output {
        type filter hook output priority filter; policy accept;
        ct state established,related accept
        meta skuid 4343 tcp dport 6668 accept
        meta skuid 0 tcp dport 6668 accept
        tcp dport 6668 counter drop
        meta skgid 2000 tcp dport 6667 accept
        meta skgid 2000 counter drop
    }
}
"#;
const GATEWAY_UID: u32 = 4343;
const CHAT_GID: u32 = 2000;

/// A fresh namespace named after this process and `tag`.
fn netns(tag: &str) -> Result<TestNetns> {
    static N: AtomicU32 = AtomicU32::new(0);
    TestNetns::new(format!("cloister-fw-{}-{}-{tag}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)))
}

/// Our code applies and verifies `plan` in `ns`.
fn apply(ns: &TestNetns, init: &Path, plan: &Path) -> Result<String> {
    let out = ns.exec(&[&init.to_string_lossy(), "--firewall-apply", &plan.to_string_lossy()])?;
    Ok(stdout(&out))
}

fn ruleset_json(ns: &TestNetns) -> Result<Value> {
    ns.json(&["nft", "-j", "list", "ruleset"])
}

struct Scratch {
    _dir: tempfile::TempDir,
    plan: PathBuf,
}

fn plan_file() -> Result<Scratch> {
    plan_file_with(None)
}

fn plan_file_with(chat: Option<cloister_plan::ChatPlan>) -> Result<Scratch> {
    let dir = tempfile::tempdir()?;
    let plan = Plan {
        hostname: "localhost".into(),
        build_time_unix: 1,
        admin_uids: vec![],
        services: vec![],
        firewall: FirewallPlan { tor_uid: Some(TOR_UID), ..FirewallPlan::default() },
        network: Default::default(),
        chat,
    };
    let path = dir.path().join("plan.json");
    std::fs::write(&path, plan.to_json())?;
    Ok(Scratch { _dir: dir, plan: path })
}

/// nft's JSON without what differs between two loads of one policy: handles and metadata.
fn normalise(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "handle" && k.as_str() != "metainfo")
                .map(|(k, v)| (k.clone(), normalise(v)))
                .collect(),
        ),
        Value::Array(a) => {
            Value::Array(a.iter().filter(|e| e.get("metainfo").is_none()).map(normalise).collect())
        }
        other => other.clone(),
    }
}

/// The rules of `chain` in nft's JSON, in order.
fn rules<'a>(ruleset: &'a Value, chain: &str) -> Vec<&'a Value> {
    let items = ruleset["nftables"].as_array().map(Vec::as_slice).unwrap_or_default();
    items.iter().filter_map(|i| i.get("rule")).filter(|r| r["chain"] == chain).collect()
}

/// Packets counted by the first rule of `chain` whose JSON contains all of `needles`.
fn counter(ns: &TestNetns, chain: &str, needles: &[&str]) -> Result<u64> {
    let rs = ruleset_json(ns)?;
    for rule in rules(&rs, chain) {
        let text = rule.to_string();
        if needles.iter().all(|n| text.contains(n)) {
            let expr = rule["expr"].as_array().context("rule without expr")?;
            let c = expr.iter().find_map(|e| e.get("counter")).context("rule without counter")?;
            return c["packets"].as_u64().context("counter without packets");
        }
    }
    bail!("no rule in {chain} with {needles:?}")
}

#[test]
fn firewall_matches_the_reference_nft_policy() -> Result<()> {
    let Some(host) = Host::from_env("firewall-reference") else { return Ok(()) };
    let s = plan_file()?;
    let ours = netns("ours")?;
    let reference = netns("ref")?;
    let start = Instant::now();
    let said = apply(&ours, &host.init, &s.plan)?;
    eprintln!("firewall-reference: {} ({} ms with process start)", said.trim(), start.elapsed().as_millis());
    ensure!(said.starts_with("firewall: applied and verified"), "{said}");
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("reference.nft");
    std::fs::write(&file, REFERENCE_NFT)?;
    reference.ensure_not_host()?;
    reference.exec(&["nft", "-f", &file.to_string_lossy()])?;
    let (a, b) = (normalise(&ruleset_json(&ours)?), normalise(&ruleset_json(&reference)?));
    ensure!(a == b, "ours:\n{a:#}\nreference:\n{b:#}");
    // Applying again replaces the table atomically instead of adding a second copy.
    apply(&ours, &host.init, &s.plan)?;
    ensure!(normalise(&ruleset_json(&ours)?) == b, "a second apply changed the ruleset");
    Ok(())
}

/// PID 1's way in: from outside the namespace, by its pin. Then nft's view against the hand-written
/// policy, and loopback traffic: only the gateway's uid reaches the IRC server's port, the chat
/// group reaches only the gateway, anyone else is unaffected.
#[test]
fn chat_namespace_firewall_keeps_users_on_the_gateway() -> Result<()> {
    let Some(host) = Host::from_env("firewall-chat") else { return Ok(()) };
    let chat = cloister_plan::ChatPlan {
        gid: CHAT_GID,
        ssh_host_key: "/nonexistent".into(),
        onion_hostname: "/nonexistent".into(),
        client: None,
        firewall: Some(cloister_plan::ChatFirewallPlan {
            gateway_uid: GATEWAY_UID,
            gateway_port: 6667,
            server_port: 6668,
            chat_gid: CHAT_GID,
        }),
        accounts: None,
        require_totp: false,
    };
    let s = plan_file_with(Some(chat))?;
    let ns = netns("chat")?;
    let reference = netns("chatref")?;
    let pin = format!("/run/netns/{}", ns.name);
    let out = std::process::Command::new(&host.init)
        .args(["--firewall-apply-chat", &s.plan.to_string_lossy(), &pin])
        .output()?;
    ensure!(out.status.success(), "{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("chat.nft");
    std::fs::write(&file, CHAT_REFERENCE_NFT)?;
    reference.ensure_not_host()?;
    reference.exec(&["nft", "-f", &file.to_string_lossy()])?;
    let (a, b) = (normalise(&ruleset_json(&ns)?), normalise(&ruleset_json(&reference)?));
    ensure!(a == b, "ours:\n{a:#}\nreference:\n{b:#}");
    ns.exec(&["ip", "link", "set", "lo", "up"])?;
    let mut listeners = Vec::new();
    for port in ["6667", "6668", "2222"] {
        let child = ns.cmd(&[PROBE, "listen", &format!("127.0.0.1:{port}")]).stdout(Stdio::null()).spawn()?;
        listeners.push(KillOnDrop(child));
    }
    std::thread::sleep(Duration::from_millis(300));
    let connect = |uid: u32, gid: u32, port: &str| connects_as(&ns, uid, gid, "127.0.0.1", port);
    let user = 5001;
    ensure!(connect(GATEWAY_UID, GATEWAY_UID, "6668")?, "the gateway could not reach the server");
    ensure!(!connect(NOBODY, NOBODY, "6668")?, "another uid reached the server's port");
    ensure!(connect(user, CHAT_GID, "6667")?, "a chat user could not reach the gateway");
    ensure!(!connect(user, CHAT_GID, "6668")?, "a chat user reached the server directly");
    ensure!(!connect(user, CHAT_GID, "2222")?, "a chat user reached another port");
    ensure!(connect(NOBODY, NOBODY, "2222")?, "a service's connection was dropped");
    ensure!(
        counter(&ns, "output", &["skgid", "\"drop\""])? > 0,
        "the chat group's drop counter did not move"
    );
    Ok(())
}

#[test]
fn firewall_lets_only_tor_out_to_relay_ports() -> Result<()> {
    let Some(host) = Host::from_env("firewall-traffic") else { return Ok(()) };
    let s = plan_file()?;
    let app = netns("app")?;
    let peer = netns("peer")?;
    apply(&app, &host.init, &s.plan)?;
    let (va, vp) = (veth("fwa"), veth("fwp"));
    app.exec(&["ip", "link", "add", &va, "type", "veth", "peer", "name", &vp, "netns", &peer.name])?;
    address_pair(&app, &va, &peer, &vp, 7)?;
    let mut listeners = Vec::new();
    for port in ["443", "8080"] {
        let addr = format!("10.199.7.2:{port}");
        let child = peer.cmd(&[PROBE, "listen", &addr]).stdout(Stdio::null()).spawn()?;
        listeners.push(KillOnDrop(child));
    }
    std::thread::sleep(Duration::from_millis(300));
    let connect = |uid: u32, port: &str| connects_as(&app, uid, uid, "10.199.7.2", port);
    ensure!(connect(TOR_UID, "443")?, "the tor uid could not reach an allowed port");
    ensure!(!connect(NOBODY, "443")?, "uid {NOBODY} reached the peer");
    ensure!(!connect(TOR_UID, "8080")?, "the tor uid reached a forbidden port");
    let dns = ["udp", "53", "cloister-dns"];
    let before = counter(&app, "output", &dns)?;
    let query = app.cmd(&["busybox", "nslookup", "example.org", "10.199.7.2"]).output()?;
    ensure!(!query.status.success(), "a DNS query got an answer");
    let after = counter(&app, "output", &dns)?;
    ensure!(after > before, "the DNS counter did not move ({before} -> {after})");
    let v6_before = counter(&app, "output", &["ipv6"])?;
    let ping = app.cmd(&["busybox", "ping", "-6", "-c", "1", "-W", "1", "fd00:199:7::2"]).output()?;
    ensure!(!ping.status.success(), "an IPv6 ping was answered");
    let v6_after = counter(&app, "output", &["ipv6"])?;
    ensure!(v6_after > v6_before, "the IPv6 drop counter did not move ({v6_before} -> {v6_after})");
    Ok(())
}

#[test]
fn firewall_verify_reports_a_changed_live_ruleset() -> Result<()> {
    let Some(host) = Host::from_env("firewall-verify") else { return Ok(()) };
    let s = plan_file()?;
    let ns = netns("verify")?;
    apply(&ns, &host.init, &s.plan)?;
    let init = host.init.to_string_lossy().into_owned();
    let plan = s.plan.to_string_lossy().into_owned();
    ns.exec(&[&init, "--firewall-verify", &plan])?;
    ns.exec(&["nft", "add", "rule", "inet", "cloister", "output", "tcp", "dport", "8080", "accept"])?;
    ns.exec(&["nft", "add", "table", "ip", "sneaky"])?;
    let out = ns.cmd(&[&init, "--firewall-verify", &plan]).output()?;
    let said = stdout(&out);
    ensure!(!out.status.success(), "verify passed a changed ruleset: {said}");
    ensure!(said.contains("live ruleset differs"), "{said}");
    ensure!(said.contains("unexpected table sneaky"), "{said}");
    ensure!(said.contains("chain output rule 15: unexpected"), "{said}");
    Ok(())
}

/// The same policy as [`REFERENCE_NFT`] once the uplink `UPLINK` is known: its name in the
/// DHCP rules, and the uplink's egress table. The link-layer matches are written as raw
/// payloads: nft's `ether type` would add a `meta iiftype` dependency, which has no input
/// device to read at egress and never matches there.
const UPLINK_REFERENCE_NFT: &str = r#"
table inet cloister {
    chain input {
        type filter hook input priority filter; policy drop;
        iifname "lo" accept
        meta nfproto ipv6 counter drop
        ct state invalid drop
        ct state established,related accept
        iifname "UPLINK" udp sport 67 udp dport 68 accept
        counter limit rate 10/minute burst 5 packets log prefix "cloister-drop-in: "
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        counter limit rate 10/minute burst 5 packets log prefix "cloister-drop-fwd: "
    }
    chain output {
        type filter hook output priority filter; policy drop;
        oifname "lo" accept
        meta nfproto ipv6 counter drop
        ct state invalid drop
        ct state established,related accept
        oifname "UPLINK" udp sport 68 udp dport 67 accept
        udp dport 53 counter limit rate 10/minute burst 5 packets log prefix "cloister-dns: "
        udp dport 53 drop
        tcp dport 53 counter limit rate 10/minute burst 5 packets log prefix "cloister-dns: "
        tcp dport 53 drop
        meta skuid 4242 tcp dport 80 accept
        meta skuid 4242 tcp dport 443 accept
        meta skuid 4242 tcp dport 9001 accept
        meta skuid 4242 tcp dport 9030 accept
        counter limit rate 10/minute burst 5 packets log prefix "cloister-drop-out: "
    }
}
table netdev cloister {
    chain egress {
        type filter hook egress device "UPLINK" priority filter; policy drop;
        @ll,96,16 0x0806 accept
        meta protocol ip @ll,96,16 0x0800 udp sport 68 udp dport 67 accept
        meta protocol ip @ll,96,16 0x0800 tcp dport 80 accept
        meta protocol ip @ll,96,16 0x0800 tcp dport 443 accept
        meta protocol ip @ll,96,16 0x0800 tcp dport 9001 accept
        meta protocol ip @ll,96,16 0x0800 tcp dport 9030 accept
        counter drop
    }
}
"#;

/// Whether a TCP connection from `ns` as `uid`/`gid` (no other groups) to `host`:`port` opens.
fn connects_as(ns: &TestNetns, uid: u32, gid: u32, host: &str, port: &str) -> Result<bool> {
    let (uid, gid) = (uid.to_string(), gid.to_string());
    let out = ns
        .cmd(&["setpriv", "--reuid", &uid, "--regid", &gid, "--clear-groups", "busybox", "nc", "-w", "2"])
        .args([host, port])
        .stdin(Stdio::null())
        .output()?;
    Ok(out.status.success())
}

/// Addresses a veth pair and brings it up: `app`'s end is 10.199.`net`.1/24 and
/// fd00:199:`net`::1/64, `peer`'s end .2 and ::2 (no duplicate address detection to wait for).
fn address_pair(app: &TestNetns, va: &str, peer: &TestNetns, vp: &str, net: u8) -> Result<()> {
    for (ns, dev, host) in [(app, va, 1), (peer, vp, 2)] {
        ns.exec(&["ip", "addr", "add", &format!("10.199.{net}.{host}/24"), "dev", dev])?;
        ns.exec(&["ip", "-6", "addr", "add", &format!("fd00:199:{net}::{host}/64"), "dev", dev, "nodad"])?;
        ns.exec(&["ip", "link", "set", dev, "up"])?;
    }
    Ok(())
}

/// A veth name unique to this process and `tag` (at most 15 bytes).
fn veth(tag: &str) -> String {
    format!("{tag}{}", std::process::id() % 100_000)
}

/// `nft list ruleset` with counters' values blanked: the text form, which (unlike nft 1.0.6's
/// JSON) names a netdev chain's device.
fn ruleset_text(ns: &TestNetns) -> Result<String> {
    let text = ns.exec_text(&["nft", "list", "ruleset"])?;
    Ok(text
        .lines()
        .map(|l| match l.find("counter packets ") {
            Some(i) => {
                let rest = &l[i + "counter packets ".len()..];
                let after = rest.split_once(" bytes ").map(|(_, b)| b.split_once(' ').map_or("", |(_, t)| t));
                format!("{}counter {}", &l[..i], after.unwrap_or(""))
            }
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

#[test]
fn uplink_tables_match_the_reference_nft_policy() -> Result<()> {
    let Some(host) = Host::from_env("firewall-uplink-reference") else { return Ok(()) };
    let s = plan_file()?;
    let ours = netns("upours")?;
    let reference = netns("upref")?;
    let dev = veth("fwu");
    for ns in [&ours, &reference] {
        ns.exec(&["ip", "link", "add", &dev, "type", "veth", "peer", "name", &format!("{dev}p")])?;
    }
    let init = host.init.to_string_lossy().into_owned();
    let start = Instant::now();
    let said = stdout(&ours.exec(&[&init, "--firewall-apply", &s.plan.to_string_lossy(), &dev])?);
    eprintln!(
        "firewall-uplink-reference: {} ({} ms with process start)",
        said.trim(),
        start.elapsed().as_millis()
    );
    ensure!(said.starts_with("firewall: applied and verified"), "{said}");
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("reference.nft");
    std::fs::write(&file, UPLINK_REFERENCE_NFT.replace("UPLINK", &dev))?;
    reference.ensure_not_host()?;
    reference.exec(&["nft", "-f", &file.to_string_lossy()])?;
    let (a, b) = (normalise(&ruleset_json(&ours)?), normalise(&ruleset_json(&reference)?));
    ensure!(a == b, "ours:\n{a:#}\nreference:\n{b:#}");
    let (a, b) = (ruleset_text(&ours)?, ruleset_text(&reference)?);
    ensure!(a == b, "ours:\n{a}\nreference:\n{b}");
    ensure!(a.contains(&format!("hook egress device \"{dev}\"")), "{a}");
    // The step's own verification, again and without changing anything.
    ours.exec(&[&init, "--firewall-verify", &s.plan.to_string_lossy(), &dev])?;
    Ok(())
}

/// The second batch (after the uplink is found) replaces the inet table atomically: when the
/// kernel refuses it, the table the `firewall` step verified is still there, whole, and no
/// egress table appeared. The refusal here: a device name longer than `IFNAMSIZ` - 1 (kernel
/// 6.1 also refuses a device that does not exist, newer ones bind the name when it appears).
#[test]
fn a_refused_uplink_batch_leaves_the_verified_table_live() -> Result<()> {
    let Some(host) = Host::from_env("firewall-uplink-refused") else { return Ok(()) };
    let s = plan_file()?;
    let ns = netns("uprefused")?;
    let (init, plan) = (host.init.to_string_lossy().into_owned(), s.plan.to_string_lossy().into_owned());
    apply(&ns, &host.init, &s.plan)?;
    let before = normalise(&ruleset_json(&ns)?);
    let out = ns.cmd(&[&init, "--firewall-apply", &plan, "nosuchdevice01234"]).output()?;
    let said = stdout(&out);
    ensure!(!out.status.success(), "a batch with an egress chain on a missing device was applied: {said}");
    ensure!(said.contains("apply: kernel refused") && said.contains("chain egress"), "{said}");
    ensure!(normalise(&ruleset_json(&ns)?) == before, "the refused batch changed the live ruleset");
    let verified = stdout(&ns.exec(&[&init, "--firewall-verify", &plan])?);
    ensure!(verified.trim() == "firewall: verified", "{verified}");
    Ok(())
}

/// Packet sockets bypass the inet hooks; the egress table does not. From the appliance's
/// namespace (both tables on `va`), raw frames: ARP, DHCP and TCP to a relay port reach the
/// peer; UDP to port 53, TCP to another port, IPv6, and an IPv4 frame passed off as ARP
/// (`skb->protocol` ARP) do not, and the egress counter counts them. Ordinary sockets still
/// work as the inet table says.
#[test]
fn egress_drops_raw_frames_the_inet_table_never_sees() -> Result<()> {
    use cloister_tests::capture::{mac_of, Capture};
    use cloister_tests::rawframe::{self, RawSocket, ETH_ARP, ETH_IPV4, ETH_IPV6};
    let Some(host) = Host::from_env("firewall-egress-raw") else { return Ok(()) };
    let s = plan_file()?;
    let app = netns("rawapp")?;
    let peer = netns("rawpeer")?;
    let (va, vp) = (veth("fwra"), veth("fwrp"));
    app.exec(&["ip", "link", "add", &va, "type", "veth", "peer", "name", &vp, "netns", &peer.name])?;
    let said = stdout(&app.exec(&[
        &host.init.to_string_lossy(),
        "--firewall-apply",
        &s.plan.to_string_lossy(),
        &va,
    ])?);
    ensure!(said.starts_with("firewall: applied and verified"), "{said}");
    address_pair(&app, &va, &peer, &vp, 8)?;
    let link = app.json(&["ip", "-j", "link", "show", "dev", &va])?;
    let va_mac = mac_of(&link)?;
    let ifindex = link[0]["ifindex"].as_u64().context("no ifindex")? as usize;
    let listener = KillOnDrop(peer.cmd(&[PROBE, "listen", "10.199.8.2:443"]).stdout(Stdio::null()).spawn()?);
    std::thread::sleep(Duration::from_millis(300));
    // Through both tables, an ordinary socket: tor's uid reaches a relay port, nobody does not.
    let connect = |uid: u32| connects_as(&app, uid, uid, "10.199.8.2", "443");
    ensure!(connect(TOR_UID)?, "the tor uid could not reach an allowed port through both tables");
    ensure!(!connect(NOBODY)?, "uid {NOBODY} reached the peer");
    drop(listener);
    let egress_before = counter(&app, "egress", &["counter"])?;
    let capture = Capture::start(&peer.name)?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let app_name = app.name.clone();
    let sender = std::thread::spawn(move || {
        rawframe::in_netns(&app_name, move || -> Result<Vec<bool>> {
            let mut sock = RawSocket::open()?;
            let _ = ready_tx.send(());
            sock.learn(ifindex, &[ETH_ARP, ETH_IPV4, ETH_IPV6], Duration::from_secs(10))?;
            let peer_mac = sock.peer_mac(ETH_IPV4).context("no peer MAC")?;
            let (src, dst) = ([10, 199, 8, 1], [10, 199, 8, 2]);
            let v4 = |proto, l4: Vec<u8>| {
                rawframe::ethernet(peer_mac, va_mac, ETH_IPV4, &rawframe::ipv4(src, dst, proto, &l4))
            };
            let mut v6 = [0u8; 16];
            v6[..6].copy_from_slice(&[0xfd, 0, 0x01, 0x99, 0, 8]);
            let (mut v6src, mut v6dst) = (v6, v6);
            v6src[15] = 1;
            v6dst[15] = 2;
            let sends: [(u16, Vec<u8>); 7] = [
                (
                    ETH_ARP,
                    rawframe::ethernet(
                        peer_mac,
                        va_mac,
                        ETH_ARP,
                        &rawframe::arp_request(va_mac, src, [10, 199, 8, 77]),
                    ),
                ),
                (ETH_IPV4, v4(17, rawframe::udp(41001, 53, b"q"))),
                (ETH_IPV4, v4(6, rawframe::tcp_syn(41002, 443))),
                (ETH_IPV4, v4(17, rawframe::udp(68, 67, b"d"))),
                // skb->protocol ARP, an IPv4 header on the wire.
                (ETH_ARP, v4(17, rawframe::udp(41003, 53, b"q"))),
                (
                    ETH_IPV6,
                    rawframe::ethernet(
                        peer_mac,
                        va_mac,
                        ETH_IPV6,
                        &rawframe::ipv6_udp(v6src, v6dst, &rawframe::udp(41004, 53, b"q")),
                    ),
                ),
                (ETH_IPV4, v4(6, rawframe::tcp_syn(41005, 8080))),
            ];
            sends.iter().map(|(protocol, frame)| sock.send(*protocol, frame)).collect::<Result<Vec<bool>>>()
        })
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).context("the raw socket did not open")?;
    // Frames of each ethertype arriving on `va` teach the socket its addresses: ARP and ICMP
    // from an IPv4 ping, a neighbour solicitation from an IPv6 one (neither is answered).
    let _ = peer.cmd(&["busybox", "ping", "-c", "2", "-W", "1", "10.199.8.1"]).output()?;
    let _ = peer.cmd(&["busybox", "ping", "-6", "-c", "1", "-W", "1", "fd00:199:8::1"]).output()?;
    let taken = sender.join().map_err(|_| anyhow::anyhow!("the sender panicked"))??;
    // The sender learns of each drop at once: the egress hook's verdict comes back as ENOBUFS.
    ensure!(taken == [true, false, true, true, false, false, false], "frames the device took: {taken:?}");
    std::thread::sleep(Duration::from_millis(500));
    let frames = capture.finish()?;
    let ours: Vec<_> = frames.iter().filter(|f| f.src == va_mac).collect();
    let udp_or_tcp_port = |f: &&cloister_tests::capture::Frame, proto: u8, sport: u16| {
        let ip = &f.payload;
        let ihl = usize::from(ip.first().copied().unwrap_or(0) & 0x0f) * 4;
        ip.get(9) == Some(&proto) && ip.get(ihl..ihl + 2) == Some(&sport.to_be_bytes()[..])
    };
    let seen_v4 =
        |proto, sport| ours.iter().any(|f| f.ethertype == ETH_IPV4 && udp_or_tcp_port(f, proto, sport));
    let arp_77 =
        ours.iter().any(|f| f.ethertype == ETH_ARP && f.payload.get(24..28) == Some(&[10, 199, 8, 77][..]));
    ensure!(arp_77, "the raw ARP request did not reach the peer");
    ensure!(seen_v4(6, 41002), "a raw TCP SYN to a relay port did not reach the peer");
    ensure!(seen_v4(17, 68), "a raw DHCP request did not reach the peer");
    ensure!(!seen_v4(17, 41001), "a raw UDP datagram to port 53 reached the peer");
    ensure!(!seen_v4(17, 41003), "an IPv4 frame sent as ARP reached the peer");
    ensure!(!seen_v4(6, 41005), "a raw TCP SYN to port 8080 reached the peer");
    ensure!(!ours.iter().any(|f| f.ethertype == ETH_IPV6), "an IPv6 frame reached the peer");
    let egress_after = counter(&app, "egress", &["counter"])?;
    ensure!(
        egress_after >= egress_before + 4,
        "the egress drop counter moved {egress_before} -> {egress_after}, not by the 4 frames dropped"
    );
    Ok(())
}
