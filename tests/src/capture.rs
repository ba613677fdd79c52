//! Packet capture in a test's network namespace: a thread joins the namespace, opens an
//! AF_PACKET socket for every frame there, and collects them until told to stop. Used to judge
//! what the appliance sends on its uplink (a tap the test made), never on a host interface.

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::socket::{recv, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};

use crate::tornet;

pub const ETH_ARP: u16 = 0x0806;
pub const ETH_IPV4: u16 = 0x0800;
/// What [`classify`] calls tor's connections to the private test network's relays.
pub const TOR_TO_TEST_RELAY: &str = "tcp to a relay of the private test network";

/// Bytes kept of each frame's payload: the IP and transport headers the judges read.
const KEPT: usize = 128;

/// One Ethernet frame (its payload cut to the headers), with when it was seen.
pub struct Frame {
    pub at: Duration,
    pub src: [u8; 6],
    pub ethertype: u16,
    pub payload: Vec<u8>,
}

/// Every frame on the interfaces of a namespace but loopback, captured by a thread that joined
/// it.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<Vec<Frame>>>>,
}

impl Capture {
    /// Starts capturing in the namespace pinned at `/run/netns/<netns>`, which must not be
    /// this process's own.
    pub fn start(netns: &str) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let path = Path::new("/run/netns").join(netns);
        let pinned = std::fs::metadata(&path)?;
        let own = std::fs::metadata("/proc/self/ns/net")?;
        anyhow::ensure!(
            (pinned.dev(), pinned.ino()) != (own.dev(), own.ino()),
            "{netns} is our own namespace"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::spawn(move || -> Result<Vec<Frame>> {
            // Only this thread moves into the namespace; the socket belongs to it.
            let file = std::fs::File::open(&path)?;
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            let sock =
                socket(AddressFamily::Packet, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::EthAll)?;
            let _ = ready_tx.send(());
            let started = Instant::now();
            let mut frames = Vec::new();
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::SeqCst) {
                match recv(sock.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                    // Loopback frames (all-zero source) are the namespace's own traffic.
                    Ok(n) if n >= 14 && buf[6..12] != [0; 6] => frames.push(Frame {
                        at: started.elapsed(),
                        src: buf[6..12].try_into()?,
                        ethertype: u16::from_be_bytes([buf[12], buf[13]]),
                        payload: buf[14..n.min(14 + KEPT)].to_vec(),
                    }),
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            Ok(frames)
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).context("capture did not start")?;
        Ok(Self { stop, thread: Some(thread) })
    }

    pub fn finish(mut self) -> Result<Vec<Frame>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().context("joined twice")?.join().map_err(|_| anyhow::anyhow!("capture panicked"))?
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The MAC of the first link in `ip -j link show` output.
pub fn mac_of(link: &serde_json::Value) -> Result<[u8; 6]> {
    let text = link[0]["address"].as_str().context("no MAC address")?;
    let bytes: Vec<u8> = text.split(':').map(|h| u8::from_str_radix(h, 16)).collect::<Result<_, _>>()?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("bad MAC {text}"))
}

/// What a frame is, in the words the judges compare: `arp`, `dhcp`, `dns`, `ntp`,
/// [`TOR_TO_TEST_RELAY`] (TCP to an OR or directory port of a node of the private network), or
/// a description of anything else.
pub fn classify(f: &Frame) -> String {
    match f.ethertype {
        ETH_ARP => "arp".into(),
        ETH_IPV4 => {
            let ip = &f.payload;
            let proto = ip.get(9).copied().unwrap_or(0);
            let ihl = usize::from(ip.first().copied().unwrap_or(0) & 0x0f) * 4;
            let port = |at: usize| ip.get(ihl + at..ihl + at + 2).map(|p| u16::from_be_bytes([p[0], p[1]]));
            let dst = ip.get(16..20).map(|d| std::net::Ipv4Addr::new(d[0], d[1], d[2], d[3]));
            let relay_port = |p: Option<u16>| p == Some(tornet::OR_PORT) || p == Some(tornet::DIR_PORT);
            match (proto, port(0), port(2)) {
                (17, Some(68), Some(67)) => "dhcp".into(),
                (6, _, d) if relay_port(d) && dst.is_some_and(tornet::in_subnet) => TOR_TO_TEST_RELAY.into(),
                (17, _, Some(53)) | (6, _, Some(53)) => "dns".into(),
                (17, _, Some(123)) => "ntp".into(),
                (p, s, d) => format!("ipv4 proto {p} {s:?} -> {d:?} to {dst:?}"),
            }
        }
        other => format!("ethertype {other:#06x}"),
    }
}

/// The MAC that sent the first DHCP request: the appliance's, whatever it randomised to.
pub fn dhcp_client_mac(frames: &[Frame]) -> Option<[u8; 6]> {
    frames.iter().find(|f| classify(f) == "dhcp").map(|f| f.src)
}
