//! `cloister-init --dhcp <json>`: the DHCPv4 client, a child of PID 1 (a supervised service),
//! never PID 1 itself. It acquires a lease, applies it over rtnetlink (the lease time becomes
//! the address's kernel lifetime), renews at T1 by unicast, rebinds at T2 by broadcast, and
//! starts over when the lease is gone. It releases nothing on shutdown: a RELEASE would tell
//! the network that we were here.
//!
//! Sockets: requests go out through a plain UDP socket (bound to 0.0.0.0:68 on the uplink with
//! SO_BINDTODEVICE and SO_BROADCAST: the kernel builds the headers, and the firewall sees it
//! as the DHCP traffic it allows). Replies are read from that socket and from an `AF_PACKET`
//! datagram socket on the uplink: before the link has an address, the hardened
//! `rp_filter = 1` drops the server's broadcast replies as martians before any UDP socket sees
//! them. That socket is why the client needs CAP_NET_RAW, and it drops CAP_NET_RAW and
//! CAP_NET_BIND_SERVICE as soon as both sockets are open: from then on it holds only
//! CAP_NET_ADMIN (addresses and routes).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use caps::{CapSet, Capability};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    bind, recv, recvfrom, sendto, setsockopt, socket, sockopt, AddressFamily, LinkAddr, MsgFlags, SockFlag,
    SockProtocol, SockType, SockaddrIn,
};
use serde::{Deserialize, Serialize};

use super::dhcp::{self, Backoff, Kind, Lease, Reply};
use super::rtnl::{Addr, Rtnl};
use dhcproto::v4::MessageType;

pub const DHCP_ARG: &str = "--dhcp";
/// IPv4's EtherType (the packet socket reports it in network byte order).
const ETH_P_IP: u16 = 0x0800;

/// Retransmissions while acquiring: 2, 4, 8, 16, 16… s.
const ACQUIRE: Backoff = Backoff { initial: Duration::from_secs(2), max: Duration::from_secs(16) };
/// Give up acquiring after this long and exit: the supervisor restarts us with its backoff.
const ACQUIRE_LIMIT: Duration = Duration::from_secs(120);
/// Shortest wait between retransmissions while renewing or rebinding.
const EXTEND_MIN: Duration = Duration::from_secs(2);

/// The client's argument.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhcpArgs {
    pub interface: String,
    pub mac: [u8; 6],
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{what}: {source}")]
    Socket { what: &'static str, source: nix::Error },
    #[error("interface {name}: {source}")]
    Interface { name: String, source: nix::Error },
    #[error("drop {cap}: {source}")]
    Caps { cap: Capability, source: caps::errors::CapsError },
    #[error(transparent)]
    Rtnl(#[from] super::rtnl::RtnlError),
    #[error(transparent)]
    Dhcp(#[from] dhcp::DhcpError),
    #[error("getrandom: {0}")]
    Random(getrandom::Error),
    #[error("no lease after {} s", .0.as_secs())]
    NoLease(Duration),
    #[error("{0}")]
    Refused(String),
}

/// Runs the client from its argv; exits only on an error (code 1) or bad usage (2).
pub fn run_mode(json: Option<&String>) -> ! {
    let args = match json.map(|j| serde_json::from_str::<DhcpArgs>(j)) {
        Some(Ok(args)) => args,
        Some(Err(e)) => {
            eprintln!("dhcp: argument: {e}");
            std::process::exit(2)
        }
        None => {
            eprintln!("usage: cloister-init {DHCP_ARG} '{{\"interface\":…,\"mac\":[…]}}'");
            std::process::exit(2)
        }
    };
    let Err(e) = Client::open(&args).and_then(|mut c| c.run());
    println!("dhcp: {e}");
    std::process::exit(1)
}

struct Client {
    mac: [u8; 6],
    index: u32,
    udp: OwnedFd,
    raw: OwnedFd,
    rtnl: Rtnl,
    started: Instant,
    held: Option<Lease>,
}

impl Client {
    fn open(args: &DhcpArgs) -> Result<Self, ClientError> {
        super::guard().map_err(ClientError::Refused)?;
        let index = nix::net::if_::if_nametoindex(args.interface.as_str())
            .map_err(|source| ClientError::Interface { name: args.interface.clone(), source })?;
        let udp = udp_socket(&args.interface)?;
        let raw = socket(
            AddressFamily::Packet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::EthAll,
        )
        .map_err(|source| ClientError::Socket { what: "packet socket", source })?;
        for cap in [Capability::CAP_NET_RAW, Capability::CAP_NET_BIND_SERVICE] {
            for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable, CapSet::Ambient] {
                caps::drop(None, set, cap).map_err(|source| ClientError::Caps { cap, source })?;
            }
        }
        Ok(Self { mac: args.mac, index, udp, raw, rtnl: Rtnl::open()?, started: Instant::now(), held: None })
    }

    fn run(&mut self) -> Result<std::convert::Infallible, ClientError> {
        loop {
            let lease = self.acquire()?;
            self.apply(&lease)?;
            println!(
                "dhcp: lease {}/{} via {} for {} s ({} ms)",
                lease.address,
                lease.prefix,
                lease.router.map_or("none".to_string(), |r| r.to_string()),
                lease.lease_s,
                self.started.elapsed().as_millis()
            );
            self.keep(lease)?;
        }
    }

    /// DISCOVER, OFFER, REQUEST, ACK; a NAK starts over; bounded by [`ACQUIRE_LIMIT`].
    fn acquire(&mut self) -> Result<Lease, ClientError> {
        let deadline = Instant::now() + ACQUIRE_LIMIT;
        loop {
            let xid = random_u32()?;
            let offer = self
                .exchange(Kind::Discover, xid, broadcast(), deadline, |r| r.kind == MessageType::Offer)?
                .ok_or(ClientError::NoLease(ACQUIRE_LIMIT))?;
            let Some(server) = offer.server else { continue };
            let select = Kind::Select { server, address: offer.address };
            let reply = self
                .exchange(select, xid, broadcast(), deadline, |r| {
                    matches!(r.kind, MessageType::Ack | MessageType::Nak)
                })?
                .ok_or(ClientError::NoLease(ACQUIRE_LIMIT))?;
            if reply.kind == MessageType::Ack {
                return Ok(Lease::from_ack(&reply, server)?);
            }
            println!("dhcp: {server} refused {} (nak); starting over", offer.address);
        }
    }

    /// Sleeps to T1, renews with the server until T2, rebinds with anyone until the lease
    /// ends. Returns when the lease is lost (after removing it), so the caller acquires anew.
    fn keep(&mut self, mut lease: Lease) -> Result<(), ClientError> {
        let mut granted = Instant::now();
        loop {
            let secs = |s: u32| granted + Duration::from_secs(u64::from(s));
            self.idle_until(secs(lease.t1_s));
            let xid = random_u32()?;
            let extend = Kind::Extend { address: lease.address };
            let done = |r: &Reply| matches!(r.kind, MessageType::Ack | MessageType::Nak);
            let to_server = SocketAddrV4::new(lease.server, dhcp::SERVER_PORT);
            let mut reply = self.extend(extend, xid, to_server, secs(lease.t2_s), done)?;
            if reply.is_none() {
                reply = self.extend(extend, xid, broadcast(), secs(lease.lease_s), done)?;
            }
            match reply {
                Some(r) if r.kind == MessageType::Ack && r.address == lease.address => {
                    lease = Lease::from_ack(&r, lease.server)?;
                    granted = Instant::now();
                    self.apply(&lease)?;
                    println!("dhcp: renewed {}/{} for {} s", lease.address, lease.prefix, lease.lease_s);
                }
                other => {
                    let why = if other.is_some() { "refused" } else { "expired" };
                    println!("dhcp: lease {} {why}; starting over", lease.address);
                    self.forget(&lease);
                    return Ok(());
                }
            }
        }
    }

    /// Retransmits with [`ACQUIRE`] backoff until an accepted reply or the deadline.
    fn exchange(
        &mut self,
        kind: Kind,
        xid: u32,
        to: SocketAddrV4,
        deadline: Instant,
        accept: impl Fn(&Reply) -> bool,
    ) -> Result<Option<Reply>, ClientError> {
        let packet = dhcp::request(kind, xid, self.mac)?;
        for attempt in 0.. {
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.send(&packet, to);
            let wait = ACQUIRE.delay(attempt, jitter_ms()?);
            if let Some(r) = self.wait_reply(xid, (now + wait).min(deadline), &accept) {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// RFC 2131 4.4.5: retransmit after half the time left, at least [`EXTEND_MIN`].
    fn extend(
        &mut self,
        kind: Kind,
        xid: u32,
        to: SocketAddrV4,
        until: Instant,
        accept: impl Fn(&Reply) -> bool,
    ) -> Result<Option<Reply>, ClientError> {
        let packet = dhcp::request(kind, xid, self.mac)?;
        loop {
            let now = Instant::now();
            if now >= until {
                return Ok(None);
            }
            self.send(&packet, to);
            let wait = (until.saturating_duration_since(now) / 2).max(EXTEND_MIN);
            if let Some(r) = self.wait_reply(xid, (now + wait).min(until), &accept) {
                return Ok(Some(r));
            }
        }
    }

    fn send(&self, packet: &[u8], to: SocketAddrV4) {
        if let Err(e) =
            sendto(self.udp.as_fd().as_raw_fd_compat(), packet, &SockaddrIn::from(to), MsgFlags::empty())
        {
            println!("dhcp: send to {to}: {e}");
        }
    }

    /// Reads both sockets until a reply to `xid` that `accept` takes, or `until`.
    fn wait_reply(&self, xid: u32, until: Instant, accept: &impl Fn(&Reply) -> bool) -> Option<Reply> {
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            let mut fds = [
                PollFd::new(self.udp.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.raw.as_fd(), PollFlags::POLLIN),
            ];
            let _ = poll(&mut fds, PollTimeout::from(ms));
            for payload in self.drain() {
                if let Some(r) = dhcp::parse_reply(&payload, xid, self.mac).filter(|r| accept(r)) {
                    return Some(r);
                }
            }
        }
    }

    /// Every datagram waiting on either socket, as DHCP payloads.
    fn drain(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        let flags = MsgFlags::MSG_DONTWAIT;
        while let Ok(n) = recv(self.udp.as_fd().as_raw_fd_compat(), &mut buf, flags) {
            out.push(buf[..n].to_vec());
        }
        let index = usize::try_from(self.index).unwrap_or(usize::MAX);
        while let Ok((n, from)) = recvfrom::<LinkAddr>(self.raw.as_fd().as_raw_fd_compat(), &mut buf) {
            if from.is_some_and(|f| f.ifindex() == index && u16::from_be(f.protocol()) == ETH_P_IP) {
                if let Some(p) = dhcp::udp_payload(&buf[..n], dhcp::CLIENT_PORT) {
                    out.push(p.to_vec());
                }
            }
        }
        out
    }

    /// Waits, discarding whatever arrives meanwhile.
    fn idle_until(&self, when: Instant) {
        while let Some(left) = when.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
            let ms = u16::try_from(left.as_millis().clamp(1, 60_000)).unwrap_or(u16::MAX);
            let mut fds = [
                PollFd::new(self.udp.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.raw.as_fd(), PollFlags::POLLIN),
            ];
            let _ = poll(&mut fds, PollTimeout::from(ms));
            drop(self.drain());
        }
    }

    fn apply(&mut self, lease: &Lease) -> Result<(), ClientError> {
        if let Some(old) = self.held.filter(|o| o.address != lease.address || o.prefix != lease.prefix) {
            self.forget(&old);
        }
        let addr = Addr { address: lease.address, prefix: lease.prefix, valid_s: Some(lease.lease_s) };
        self.rtnl.replace_address(self.index, addr)?;
        if let Some(router) = lease.router {
            self.rtnl.replace_default_route(self.index, router, true)?;
        }
        self.held = Some(*lease);
        Ok(())
    }

    /// Removes an address we no longer hold (its routes go with it).
    fn forget(&mut self, lease: &Lease) {
        if let Err(e) = self.rtnl.delete_address(self.index, lease.address, lease.prefix) {
            println!("dhcp: {e}");
        }
        self.held = None;
    }
}

fn broadcast() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::BROADCAST, dhcp::SERVER_PORT)
}

fn udp_socket(interface: &str) -> Result<OwnedFd, ClientError> {
    let s = |what| move |source| ClientError::Socket { what, source };
    let fd = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .map_err(s("udp socket"))?;
    setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(interface))
        .map_err(s("SO_BINDTODEVICE"))?;
    setsockopt(&fd, sockopt::Broadcast, &true).map_err(s("SO_BROADCAST"))?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(s("SO_REUSEADDR"))?;
    let any = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, dhcp::CLIENT_PORT));
    bind(fd.as_fd().as_raw_fd_compat(), &any).map_err(s("bind 0.0.0.0:68"))?;
    Ok(fd)
}

fn random_u32() -> Result<u32, ClientError> {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).map_err(ClientError::Random)?;
    Ok(u32::from_ne_bytes(b))
}

/// -1000..=1000 ms.
fn jitter_ms() -> Result<i64, ClientError> {
    Ok(i64::from(random_u32()? % 2001) - 1000)
}

/// nix 0.31 takes raw descriptors in some socket calls and `AsFd` in others.
trait RawCompat {
    fn as_raw_fd_compat(&self) -> std::os::fd::RawFd;
}

impl RawCompat for std::os::fd::BorrowedFd<'_> {
    fn as_raw_fd_compat(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}
