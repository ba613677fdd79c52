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
