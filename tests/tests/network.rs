//! Host integration tests of the DHCP client: `cloister-init --dhcp` runs in a client network
//! namespace against busybox `udhcpd` in a peer namespace, over a veth pair created directly
//! between the two (`ip netns add cloister-net-<pid>-<n>-{c,s}`); nothing is made in the
//! host's namespace, both namespaces go in a guard's Drop, and only namespace-local sysctls are
//! set (the client's rp_filter = 1, as on the appliance). A packet capture in the server's
//! namespace (AF_PACKET, from a thread that joined it) checks what the client sends. They need
//! root, busybox and `CLOISTER_INIT_BIN`.

use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cloister_tests::{Host, KillOnDrop, TestNetns};
use nix::sys::socket::{recv, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};

const SERVER: &str = "10.77.0.1";

/// Client and server namespaces joined by a veth pair, udhcpd serving the server's end.
struct Lab {
    client: TestNetns,
    server: TestNetns,
    client_if: String,
    mac: [u8; 6],
    _dir: tempfile::TempDir,
    _udhcpd: KillOnDrop,
}

impl Lab {
    fn new(lease_s: u32) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let (pid, n) = (std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        let server = TestNetns::new(format!("cloister-net-{pid}-{n}-s"))?;
        let client = TestNetns::new(format!("cloister-net-{pid}-{n}-c"))?;
        let (cif, sif) = (format!("cnc{}x{n}", pid % 100_000), format!("cns{}x{n}", pid % 100_000));
        server.exec(&[
            "ip",
            "link",
            "add",
            &sif,
            "type",
            "veth",
            "peer",
            "name",
            &cif,
            "netns",
            &client.name,
        ])?;
        server.exec(&["ip", "addr", "add", &format!("{SERVER}/24"), "dev", &sif])?;
        server.exec(&["ip", "link", "set", &sif, "up"])?;
        // As on the appliance (system.rs hardening): strict reverse-path filtering.
        client.exec(&["sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=1"])?;
        client.exec(&["ip", "link", "set", &cif, "up"])?;
        let link = client.json(&["ip", "-j", "link", "show", "dev", &cif])?;
        let mac = parse_mac(link[0]["address"].as_str().context("no MAC address")?)?;
        let dir = tempfile::tempdir()?;
        let conf = dir.path().join("udhcpd.conf");
        let d = dir.path().display();
        std::fs::write(
            &conf,
            format!(
                "start 10.77.0.100\nend 10.77.0.120\ninterface {sif}\nlease_file {d}/leases\npidfile {d}/pid\n\
                 min_lease {lease_s}\nopt subnet 255.255.255.0\nopt router {SERVER}\nopt lease {lease_s}\n"
            ),
        )?;
        std::fs::write(dir.path().join("leases"), b"")?;
        let udhcpd = server
            .cmd(&["busybox", "udhcpd", "-f", &conf.to_string_lossy()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start udhcpd")?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self { client, server, client_if: cif, mac, _dir: dir, _udhcpd: KillOnDrop(udhcpd) })
    }

    /// Starts our client in the client namespace; its stdout lines arrive on the receiver.
    fn start_client(&self, init: &Path) -> Result<(KillOnDrop, mpsc::Receiver<String>)> {
        self.client.ensure_not_host()?;
        let args = serde_json::json!({"interface": self.client_if, "mac": self.mac}).to_string();
        let mut child = self
            .client
            .cmd(&[&init.to_string_lossy(), "--dhcp", &args])
            .stdout(Stdio::piped())
            .spawn()
            .context("start the dhcp client")?;
        let out = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                eprintln!("client: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok((KillOnDrop(child), rx))
    }
}

fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = text.split(':').map(|h| u8::from_str_radix(h, 16)).collect::<Result<_, _>>()?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("bad MAC {text}"))
}

fn wait_line(rx: &mpsc::Receiver<String>, prefix: &str, limit: Duration) -> Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with(prefix) => return Ok(line),
            Ok(_) => {}
            Err(_) => bail!("no line starting {prefix:?} within {} s", limit.as_secs()),
        }
    }
}

/// DHCP requests (UDP to port 67) seen in a namespace, captured by a thread that joined it.
struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<Vec<Vec<u8>>>>>,
}

impl Capture {
    fn start(ns: &TestNetns) -> Result<Self> {
        ns.ensure_not_host()?;
        let path = Path::new("/run/netns").join(&ns.name);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::spawn(move || -> Result<Vec<Vec<u8>>> {
            // Only this thread moves into the namespace; the socket belongs to it.
            let file = std::fs::File::open(&path)?;
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            let sock = socket(
                AddressFamily::Packet,
                SockType::Datagram,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::EthAll,
            )?;
            let _ = ready_tx.send(());
            let mut seen = Vec::new();
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::SeqCst) {
                match recv(std::os::fd::AsRawFd::as_raw_fd(&sock), &mut buf, MsgFlags::MSG_DONTWAIT) {
                    Ok(n) => {
                        if let Some(p) = udp_to(&buf[..n], 67) {
                            seen.push(p.to_vec());
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            Ok(seen)
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).context("capture did not start")?;
        Ok(Self { stop, thread: Some(thread) })
    }

    fn finish(mut self) -> Result<Vec<Vec<u8>>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().context("joined twice")?.join().map_err(|_| anyhow::anyhow!("capture panicked"))?
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The UDP payload of an IPv4 datagram to `port`.
fn udp_to(ip: &[u8], port: u16) -> Option<&[u8]> {
    let ihl = usize::from(*ip.first()? & 0x0f) * 4;
    if ip.len() < ihl + 8 || ip[9] != 17 || u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]]) != port {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([ip[ihl + 4], ip[ihl + 5]]));
    ip.get(ihl + 8..ihl + len)
}

/// A BOOTP/DHCP message read by hand (independently of the client's own decoder).
#[derive(Debug)]
struct Dhcp {
    op: u8,
    flags: u16,
    chaddr: [u8; 6],
    options: Vec<(u8, Vec<u8>)>,
}

fn parse_dhcp(p: &[u8]) -> Result<Dhcp> {
    ensure!(p.len() >= 240 && p[236..240] == [99, 130, 83, 99], "not a DHCP message ({} bytes)", p.len());
    let mut options = Vec::new();
    let mut i = 240;
    while i < p.len() {
        match p[i] {
            0 => i += 1,
            255 => break,
            code => {
                let len = usize::from(*p.get(i + 1).context("truncated option")?);
                options.push((code, p.get(i + 2..i + 2 + len).context("truncated option")?.to_vec()));
                i += 2 + len;
            }
        }
    }
    Ok(Dhcp { op: p[0], flags: u16::from_be_bytes([p[10], p[11]]), chaddr: p[28..34].try_into()?, options })
}

impl Dhcp {
    fn option(&self, code: u8) -> Option<&[u8]> {
        self.options.iter().find(|(c, _)| *c == code).map(|(_, v)| v.as_slice())
    }
}

/// The lease in the client's namespace: address/prefix with its valid lifetime, and the
/// default route's gateway.
fn applied(lab: &Lab) -> Result<(String, u64, String)> {
    let addrs = lab.client.json(&["ip", "-j", "-4", "addr", "show", "dev", &lab.client_if])?;
    let info = &addrs[0]["addr_info"][0];
    let addr = format!("{}/{}", info["local"].as_str().context("no address")?, info["prefixlen"]);
    let valid = info["valid_life_time"].as_u64().context("no lifetime")?;
    let routes = lab.client.json(&["ip", "-j", "-4", "route", "show", "default"])?;
    let via = routes[0]["gateway"].as_str().context("no default route")?.to_string();
    Ok((addr, valid, via))
}

#[test]
fn dhcp_lease_is_applied_and_requests_identify_nothing() -> Result<()> {
    let Some(host) = Host::from_env("dhcp_lease_is_applied_and_requests_identify_nothing") else {
        return Ok(());
    };
    let lab = Lab::new(600)?;
    let capture = Capture::start(&lab.server)?;
    let (client, rx) = lab.start_client(&host.init)?;
    let line = wait_line(&rx, "dhcp: lease ", Duration::from_secs(20))?;
    eprintln!("{line}");
    ensure!(line.contains("/24 via 10.77.0.1 for 600 s ("), "{line}");
    let (addr, valid, via) = applied(&lab)?;
    ensure!(addr.starts_with("10.77.0.1") && addr.ends_with("/24") && addr != "10.77.0.1/24", "{addr}");
    ensure!(line.starts_with(&format!("dhcp: lease {addr} ")), "{line} vs {addr}");
    ensure!((590..=600).contains(&valid), "valid lifetime {valid}");
    ensure!(via == SERVER, "default route via {via}");
    drop(client);
    let requests: Vec<Dhcp> = capture.finish()?.iter().map(|p| parse_dhcp(p)).collect::<Result<_>>()?;
    let types: Vec<u8> = requests.iter().filter_map(|d| d.option(53).map(|v| v[0])).collect();
    ensure!(types.contains(&1) && types.contains(&3), "message types {types:?}");
    ensure!(lab.mac[0] & 0x03 == 0x02, "veth MAC not local unicast: {:02x?}", lab.mac);
    for d in &requests {
        ensure!(d.op == 1, "op {}", d.op);
        ensure!(d.flags & 0x8000 != 0, "broadcast flag missing: {d:?}");
        ensure!(d.chaddr == lab.mac, "chaddr {:02x?} is not the interface's {:02x?}", d.chaddr, lab.mac);
        for forbidden in [12u8, 60, 61, 81] {
            ensure!(d.option(forbidden).is_none(), "option {forbidden} sent: {d:?}");
        }
        ensure!(d.option(55) == Some(&[1, 3, 51][..]), "parameter request list {:?}", d.option(55));
    }
    Ok(())
}

#[test]
fn dhcp_lease_is_renewed_at_t1() -> Result<()> {
    let Some(host) = Host::from_env("dhcp_lease_is_renewed_at_t1") else {
        return Ok(());
    };
    let lab = Lab::new(30)?;
    let (_client, rx) = lab.start_client(&host.init)?;
    wait_line(&rx, "dhcp: lease ", Duration::from_secs(20))?;
    let (addr, _, _) = applied(&lab)?;
    let granted = Instant::now();
    let capture = Capture::start(&lab.server)?;
    let line = wait_line(&rx, "dhcp: renewed ", Duration::from_secs(25))?;
    let t1 = granted.elapsed();
    ensure!(line == format!("dhcp: renewed {addr} for 30 s"), "{line}");
    ensure!(t1 >= Duration::from_secs(12) && t1 <= Duration::from_secs(17), "renewed after {t1:?}");
    let (again, valid, _) = applied(&lab)?;
    ensure!(again == addr && valid >= 27, "{again} valid {valid}");
    let requests: Vec<Dhcp> = capture.finish()?.iter().map(|p| parse_dhcp(p)).collect::<Result<_>>()?;
    let renew = requests.iter().find(|d| d.option(53) == Some(&[3][..])).context("no REQUEST captured")?;
    ensure!(
        renew.option(50).is_none() && renew.option(54).is_none(),
        "renewal names server/address: {renew:?}"
    );
    Ok(())
}

/// An appliance namespace whose only link is one end of a veth pair (so `uplink = "auto"` finds
/// it), the other end in a peer namespace at `peer_ip`/24.
struct Uplink {
    app: TestNetns,
    peer: TestNetns,
    link: String,
    peer_link: String,
}

impl Uplink {
    fn new(tag: &str, peer_ip: &str) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let (pid, n) = (std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        let app = TestNetns::new(format!("cloister-net-{pid}-{n}-{tag}a"))?;
        let peer = TestNetns::new(format!("cloister-net-{pid}-{n}-{tag}p"))?;
        let (link, peer_link) = (format!("cua{}x{n}", pid % 100_000), format!("cup{}x{n}", pid % 100_000));
        peer.exec(&[
            "ip", "link", "add", &peer_link, "type", "veth", "peer", "name", &link, "netns", &app.name,
        ])?;
        peer.exec(&["ip", "addr", "add", &format!("{peer_ip}/24"), "dev", &peer_link])?;
        peer.exec(&["ip", "link", "set", &peer_link, "up"])?;
        Ok(Self { app, peer, link, peer_link })
    }

    /// `cloister-init --network-up` with `plan` in the appliance's namespace: its step lines
    /// and the `status` JSON it ends with.
    fn network_up(&self, init: &Path, plan: &cloister_plan::Plan) -> Result<(String, serde_json::Value)> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("plan.json");
        std::fs::write(&file, plan.to_json())?;
        let start = Instant::now();
        let out = self.app.exec(&[&init.to_string_lossy(), "--network-up", &file.to_string_lossy()])?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("{text}({} ms with process start)", start.elapsed().as_millis());
        let last = text.lines().last().context("no output")?;
        Ok((text.clone(), serde_json::from_str(last).with_context(|| format!("not JSON: {last}"))?))
    }
}

fn plan_with(network: cloister_plan::NetworkPlan, dhcp: bool) -> cloister_plan::Plan {
    cloister_plan::Plan {
        hostname: "localhost".into(),
        build_time_unix: 1,
        admin_uids: vec![],
        services: vec![],
        firewall: cloister_plan::FirewallPlan { tor_uid: Some(4242), dhcp, ..Default::default() },
        network,
        chat: None,
    }
}

/// Stage 2's steps from the firewall to the network with a static address, on a live link:
/// the link found by "auto", its MAC replaced by a random local one before it came up, IPv6
/// off, the address and the default route in place, both tables naming it; and from the peer
/// the appliance answers nothing (no ping, no connection to a listening port), while tor's uid
/// reaches a relay port on the peer and its replies come back.
#[test]
fn network_up_gives_a_static_address_behind_both_tables() -> Result<()> {
    let Some(host) = Host::from_env("network_up_gives_a_static_address_behind_both_tables") else {
        return Ok(());
    };
    let lab = Uplink::new("st", "10.79.0.1")?;
    let before = lab.app.json(&["ip", "-j", "link", "show", "dev", &lab.link])?;
    let old_mac = before[0]["address"].as_str().context("no MAC")?.to_string();
    let fixed = cloister_plan::StaticIpv4 {
        address: "10.79.0.2".parse()?,
        prefix: 24,
        gateway: "10.79.0.1".parse()?,
    };
    let network =
        cloister_plan::NetworkPlan { mode: cloister_plan::NetworkMode::Static(fixed), randomize_mac: true };
    let (steps, status) = lab.network_up(&host.init, &plan_with(network, false))?;
    for step in ["firewall", "uplink", "uplink-firewall", "network"] {
        ensure!(steps.contains(&format!("step {step}: ok (")), "step {step} did not pass:\n{steps}");
    }
    let link = lab.app.json(&["ip", "-j", "link", "show", "dev", &lab.link])?;
    let mac = link[0]["address"].as_str().context("no MAC")?.to_string();
    let first = u8::from_str_radix(&mac[..2], 16)?;
    ensure!(mac != old_mac, "the MAC address was not replaced ({mac})");
    ensure!(first & 0x03 == 0x02, "MAC {mac} is not locally administered unicast");
    ensure!(link[0]["flags"].as_array().is_some_and(|f| f.iter().any(|x| x == "UP")), "{link}");
    let (addr, _, via) = applied_on(&lab.app, &lab.link)?;
    ensure!(addr == "10.79.0.2/24" && via == "10.79.0.1", "{addr} via {via}");
    for (key, want) in [("disable_ipv6", "1"), ("accept_ra", "0")] {
        let path = format!("/proc/sys/net/ipv6/conf/{}/{key}", lab.link);
        let got = lab.app.exec_text(&["cat", &path])?;
        ensure!(got.trim() == want, "{key} = {got}");
    }
    let v6 = lab.app.json(&["ip", "-j", "-6", "addr", "show", "dev", &lab.link])?;
    ensure!(
        v6.as_array().is_none_or(|a| a.iter().all(|i| i["addr_info"].as_array().is_none_or(Vec::is_empty))),
        "{v6}"
    );
    // What the control socket's `status` would show.
    ensure!(status["network"]["address"] == "10.79.0.2/24", "{status}");
    ensure!(status["network"]["mode"] == "static" && status["network"]["mac"] == mac.as_str(), "{status}");
    ensure!(status["network"]["mac_randomized"] == true, "{status}");
    ensure!(status["firewall"]["state"] == "verified", "{status}");
    ensure!(status["firewall"]["egress"]["device"] == lab.link.as_str(), "{status}");
    ensure!(
        status["firewall"]["tables"] == serde_json::json!(["inet cloister", "netdev cloister"]),
        "{status}"
    );
    let text = lab.app.exec_text(&["nft", "list", "ruleset"])?;
    ensure!(text.contains(&format!("hook egress device \"{}\"", lab.link)), "{text}");
    ensure!(!text.contains("sport 68"), "a static address needs no DHCP rule:\n{text}");
    // From the peer: nothing answers.
    let probe = env!("CARGO_BIN_EXE_probe");
    let _listener =
        KillOnDrop(lab.app.cmd(&[probe, "listen", "10.79.0.2:2222"]).stdout(Stdio::null()).spawn()?);
    let _relay =
        KillOnDrop(lab.peer.cmd(&[probe, "listen", "10.79.0.1:9001"]).stdout(Stdio::null()).spawn()?);
    std::thread::sleep(Duration::from_millis(300));
    let ping = lab.peer.cmd(&["busybox", "ping", "-c", "1", "-W", "1", "10.79.0.2"]).output()?;
    ensure!(!ping.status.success(), "the appliance answered a ping");
    let nc = |ns: &TestNetns, uid: &str, to: &str, port: &str| -> Result<bool> {
        let out = ns
            .cmd(&[
                "setpriv",
                "--reuid",
                uid,
                "--regid",
                uid,
                "--clear-groups",
                "busybox",
                "nc",
                "-w",
                "2",
                to,
                port,
            ])
            .stdin(Stdio::null())
            .output()?;
        Ok(out.status.success())
    };
    ensure!(!nc(&lab.peer, "0", "10.79.0.2", "2222")?, "the peer reached a port listening on the appliance");
    ensure!(nc(&lab.app, "4242", "10.79.0.1", "9001")?, "tor's uid could not reach a relay port on the peer");
    ensure!(!nc(&lab.app, "65534", "10.79.0.1", "9001")?, "another uid reached the peer");
    let _ = &lab.peer_link;
    Ok(())
}

/// With DHCP and `uplink = "auto"`, the `firewall` step's DHCP rules name no interface (none
/// was known); once the uplink is found they name it, and its egress table lets the client's
/// requests out.
#[test]
fn network_up_with_dhcp_names_the_uplink_it_found() -> Result<()> {
    let Some(host) = Host::from_env("network_up_with_dhcp_names_the_uplink_it_found") else {
        return Ok(());
    };
    let lab = Uplink::new("dh", "10.79.1.1")?;
    let (steps, status) = lab.network_up(&host.init, &plan_with(Default::default(), true))?;
    ensure!(steps.contains("step uplink-firewall: ok ("), "{steps}");
    ensure!(status["firewall"]["state"] == "verified", "{status}");
    ensure!(status["firewall"]["uplink"] == lab.link.as_str(), "{status}");
    ensure!(status["network"]["mode"] == "dhcp" && status["network"]["lease"] == "none", "{status}");
    let text = lab.app.exec_text(&["nft", "list", "ruleset"])?;
    let dhcp_out = format!("oifname \"{}\" udp sport 68 udp dport 67 accept", lab.link);
    let dhcp_in = format!("iifname \"{}\" udp sport 67 udp dport 68 accept", lab.link);
    ensure!(text.contains(&dhcp_out) && text.contains(&dhcp_in), "{text}");
    ensure!(text.contains("meta protocol ip @ll,96,16 0x800 udp sport 68 udp dport 67 accept"), "{text}");
    Ok(())
}

/// The address and default route on `link` in `ns`: address/prefix, valid lifetime, gateway.
fn applied_on(ns: &TestNetns, link: &str) -> Result<(String, u64, String)> {
    let addrs = ns.json(&["ip", "-j", "-4", "addr", "show", "dev", link])?;
    let info = &addrs[0]["addr_info"][0];
    let addr = format!("{}/{}", info["local"].as_str().context("no address")?, info["prefixlen"]);
    let valid = info["valid_life_time"].as_u64().unwrap_or(0);
    let routes = ns.json(&["ip", "-j", "-4", "route", "show", "default"])?;
    let via = routes[0]["gateway"].as_str().context("no default route")?.to_string();
    Ok((addr, valid, via))
}
