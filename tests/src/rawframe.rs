//! Raw Ethernet frames sent from inside a test's network namespace through an AF_PACKET socket,
//! as any process holding CAP_NET_RAW could on the appliance: such frames pass no inet hook, so
//! only the uplink's netdev egress table stands between them and the wire.
//!
//! nix has no safe constructor for a `sockaddr_ll`, and this crate has no `unsafe`: the kernel
//! hands one over with every frame it delivers (interface index, ethertype, the sender's MAC).
//! [`RawSocket::learn`] keeps one per ethertype from frames a peer sends to the interface, and
//! [`RawSocket::send`] reuses it, which sets the outgoing packet's `skb->protocol` to that
//! ethertype whatever header the frame itself carries (the spoofing a packet socket allows).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{
    recvfrom, sendto, socket, AddressFamily, LinkAddr, MsgFlags, SockFlag, SockProtocol, SockType,
};

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_ARP: u16 = 0x0806;
pub const ETH_IPV6: u16 = 0x86dd;
/// `PACKET_OUTGOING`: a frame this namespace sent, not one it received.
const PACKET_OUTGOING: u8 = 4;

/// Runs `f` on a thread that joined the namespace pinned at `/run/netns/<netns>` (never this
/// process's own), so that the sockets it opens belong to that namespace.
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    use std::os::unix::fs::MetadataExt;
    let path = Path::new("/run/netns").join(netns);
    let pinned = std::fs::metadata(&path)?;
    let own = std::fs::metadata("/proc/self/ns/net")?;
    anyhow::ensure!((pinned.dev(), pinned.ino()) != (own.dev(), own.ino()), "{netns} is our own namespace");
    std::thread::spawn(move || -> Result<T> {
        let file = std::fs::File::open(&path)?;
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the namespace's thread panicked"))?
}

/// A packet socket for every frame of the namespace it was opened in.
pub struct RawSocket {
    fd: OwnedFd,
    /// One address per ethertype, learnt from frames received on the interface.
    addrs: HashMap<u16, LinkAddr>,
}

impl RawSocket {
    /// Must be called on a thread inside the namespace (see [`in_netns`]).
    pub fn open() -> Result<Self> {
        // Non-blocking, so that [`Self::learn`] keeps its deadline.
        let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
        let fd = socket(AddressFamily::Packet, SockType::Raw, flags, SockProtocol::EthAll)?;
        Ok(Self { fd, addrs: HashMap::new() })
    }

    /// Keeps the address of the first frame of each ethertype in `wanted` that arrives on
    /// `ifindex`, waiting at most `wait` for all of them.
    pub fn learn(&mut self, ifindex: usize, wanted: &[u16], wait: Duration) -> Result<()> {
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 2048];
        while wanted.iter().any(|t| !self.addrs.contains_key(t)) {
            if Instant::now() >= deadline {
                let missing: Vec<String> = wanted
                    .iter()
                    .filter(|t| !self.addrs.contains_key(t))
                    .map(|t| format!("{t:#06x}"))
                    .collect();
                bail!("no frame of ethertype {} arrived on interface {ifindex}", missing.join(", "));
            }
            match recvfrom::<LinkAddr>(self.fd.as_raw_fd(), &mut buf) {
                Ok((_, Some(addr))) if addr.ifindex() == ifindex && addr.pkttype() != PACKET_OUTGOING => {
                    self.addrs.entry(u16::from_be(addr.protocol())).or_insert(addr);
                }
                Ok(_) => {}
                Err(nix::errno::Errno::EAGAIN) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The MAC of the peer whose frame taught the address for `protocol`.
    pub fn peer_mac(&self, protocol: u16) -> Option<[u8; 6]> {
        self.addrs.get(&protocol).and_then(LinkAddr::addr)
    }

    /// Sends `frame` (Ethernet header included) as a packet of ethertype `protocol`: `true`
    /// when the device took it, `false` when a filter on the way dropped it (the kernel then
    /// answers `ENOBUFS`, from the egress hook's `NET_XMIT_DROP`).
    pub fn send(&self, protocol: u16, frame: &[u8]) -> Result<bool> {
        let addr =
            self.addrs.get(&protocol).with_context(|| format!("no address learnt for {protocol:#06x}"))?;
        match sendto(self.fd.as_raw_fd(), frame, addr, MsgFlags::empty()) {
            Ok(n) if n == frame.len() => Ok(true),
            Ok(n) => bail!("sent {n} of {} bytes", frame.len()),
            Err(nix::errno::Errno::ENOBUFS) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// An Ethernet frame: header, then `payload`.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 datagram of `proto` around `l4` (header checksum filled in, no options).
pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + l4.len()).unwrap_or(u16::MAX);
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let sum = checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(l4);
    h
}

/// A UDP header and `data` (checksum 0: none, which IPv4 allows).
pub fn udp(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + data.len()).unwrap_or(u16::MAX);
    let mut u = Vec::new();
    for v in [sport, dport, len, 0] {
        u.extend_from_slice(&v.to_be_bytes());
    }
    u.extend_from_slice(data);
    u
}

/// A TCP SYN without options (its checksum is not filled in: the filters judge headers).
pub fn tcp_syn(sport: u16, dport: u16) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

/// An IPv6 packet of UDP around `l4`, addresses given in full.
pub fn ipv6_udp(src: [u8; 16], dst: [u8; 16], l4: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&u16::try_from(l4.len()).unwrap_or(u16::MAX).to_be_bytes());
    h.extend_from_slice(&[17, 64]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(l4);
    h
}

/// An ARP request: who has `target`, tell `sender_ip` at `sender_mac`.
pub fn arp_request(sender_mac: [u8; 6], sender_ip: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    a.extend_from_slice(&sender_mac);
    a.extend_from_slice(&sender_ip);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target);
    a
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 =
        bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ipv4_header_checksum_is_the_rfc_1071_one() {
        // The worked example of many references: 45 00 00 73 00 00 40 00 40 11 .. c0 a8 00 01 c0 a8 00 c7.
        let mut h = vec![0x45, 0, 0, 0x73, 0, 0, 0x40, 0, 0x40, 0x11, 0, 0, 192, 168, 0, 1, 192, 168, 0, 199];
        assert_eq!(checksum(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(checksum(&h), 0);
        let d = ipv4([10, 0, 0, 1], [10, 0, 0, 2], 17, &udp(1, 2, b"x"));
        assert_eq!(checksum(&d[..20]), 0);
        assert_eq!(u16::from_be_bytes([d[2], d[3]]), 29);
    }
}
