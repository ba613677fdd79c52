//! The rtnetlink requests of the network step and the DHCP client: list links, set a link's
//! MAC address and state, replace an IPv4 address (with the lease as its kernel lifetime) and
//! the default route, and read a link's IPv4 addresses back. One request at a time, each
//! acknowledged or answered before the next.

use std::net::Ipv4Addr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, CacheInfo};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// An address lifetime the kernel never expires.
pub const FOREVER: u32 = u32::MAX;
/// The main routing table.
const RT_TABLE_MAIN: u8 = 254;

#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    #[error("rtnetlink socket: {0}")]
    Socket(std::io::Error),
    #[error("{op}: send: {source}")]
    Send { op: String, source: std::io::Error },
    #[error("{op}: receive: {source}")]
    Recv { op: String, source: std::io::Error },
    #[error("{op}: decode reply: {detail}")]
    Decode { op: String, detail: String },
    #[error("{op}: {source}")]
    Kernel { op: String, source: std::io::Error },
}

/// A network interface as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The hardware address, for Ethernet-like links.
    pub mac: Option<[u8; 6]>,
    pub loopback: bool,
}

/// One IPv4 address on a link, with its remaining valid lifetime (`None`: forever).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub valid_s: Option<u32>,
}

pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> Result<Self, RtnlError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(RtnlError::Socket)?;
        socket.bind_auto().map_err(RtnlError::Socket)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(RtnlError::Socket)?;
        Ok(Self { socket, seq: 0 })
    }

    /// Every link in this network namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, RtnlError> {
        let replies = self.dump("list links", RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_of(&l)),
                _ => None,
            })
            .collect())
    }

    pub fn set_mac(&mut self, link: &Link, mac: [u8; 6]) -> Result<(), RtnlError> {
        let mut msg = LinkMessage::default();
        msg.header.index = link.index;
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        self.ack(&format!("set the MAC address of {}", link.name), RouteNetlinkMessage::SetLink(msg), 0)
    }

    pub fn set_up(&mut self, link: &Link, up: bool) -> Result<(), RtnlError> {
        let mut msg = LinkMessage::default();
        msg.header.index = link.index;
        msg.header.flags = if up { LinkFlags::Up } else { LinkFlags::empty() };
        msg.header.change_mask = LinkFlags::Up;
        let op = format!("set {} {}", link.name, if up { "up" } else { "down" });
        self.ack(&op, RouteNetlinkMessage::SetLink(msg), 0)
    }

    /// Adds or updates `address/prefix` on `index`; the kernel removes it once `valid_s` has
    /// passed without a renewal (so an expired lease stops being used even if we are gone).
    pub fn replace_address(&mut self, index: u32, a: Addr) -> Result<(), RtnlError> {
        let mut msg = address_message(index, a.address, a.prefix);
        let valid = a.valid_s.unwrap_or(FOREVER);
        msg.attributes.push(AddressAttribute::Broadcast(broadcast(a.address, a.prefix)));
        let mut lifetime = CacheInfo::default();
        lifetime.ifa_preferred = valid;
        lifetime.ifa_valid = valid;
        msg.attributes.push(AddressAttribute::CacheInfo(lifetime));
        let op = format!("add address {}/{}", a.address, a.prefix);
        self.ack(&op, RouteNetlinkMessage::NewAddress(msg), NLM_F_CREATE | NLM_F_REPLACE)
    }

    pub fn delete_address(&mut self, index: u32, address: Ipv4Addr, prefix: u8) -> Result<(), RtnlError> {
        let msg = address_message(index, address, prefix);
        self.ack(&format!("delete address {address}/{prefix}"), RouteNetlinkMessage::DelAddress(msg), 0)
    }

    /// `ip route replace default via <gateway> dev <index>`.
    pub fn replace_default_route(
        &mut self,
        index: u32,
        gateway: Ipv4Addr,
        dhcp: bool,
    ) -> Result<(), RtnlError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.table = RT_TABLE_MAIN;
        msg.header.protocol = if dhcp { RouteProtocol::Dhcp } else { RouteProtocol::Static };
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unicast;
        msg.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        msg.attributes.push(RouteAttribute::Oif(index));
        let op = format!("default route via {gateway}");
        self.ack(&op, RouteNetlinkMessage::NewRoute(msg), NLM_F_CREATE | NLM_F_REPLACE)
    }

    /// The IPv4 addresses on `index`.
    pub fn addresses(&mut self, index: u32) -> Result<Vec<Addr>, RtnlError> {
        let mut query = AddressMessage::default();
        query.header.family = AddressFamily::Inet;
        let replies = self.dump("list addresses", RouteNetlinkMessage::GetAddress(query))?;
        let mut out = Vec::new();
        for reply in replies {
            let RouteNetlinkMessage::NewAddress(m) = reply else { continue };
            if m.header.index != index {
                continue;
            }
            let mut addr = None;
            let mut valid_s = None;
            for attr in &m.attributes {
                match attr {
                    AddressAttribute::Local(std::net::IpAddr::V4(a)) => addr = Some(*a),
                    AddressAttribute::Address(std::net::IpAddr::V4(a)) if addr.is_none() => addr = Some(*a),
                    AddressAttribute::CacheInfo(c) if c.ifa_valid != FOREVER => valid_s = Some(c.ifa_valid),
                    _ => {}
                }
            }
            if let Some(address) = addr {
                out.push(Addr { address, prefix: m.header.prefix_len, valid_s });
            }
        }
        Ok(out)
    }

    fn send(&mut self, op: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<u32, RtnlError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(|source| RtnlError::Send { op: op.into(), source })?;
        Ok(self.seq)
    }

    /// Sends a change and waits for the kernel's acknowledgement.
    fn ack(&mut self, op: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<(), RtnlError> {
        let seq = self.send(op, msg, NLM_F_ACK | flags)?;
        let mut done = false;
        self.receive(op, seq, &mut |payload| match payload {
            NetlinkPayload::Error(e) => {
                done = true;
                match e.code {
                    Some(_) => Err(RtnlError::Kernel { op: op.into(), source: e.to_io() }),
                    None => Ok(true),
                }
            }
            _ => Ok(false),
        })?;
        Ok(())
    }

    fn dump(&mut self, op: &str, msg: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, RtnlError> {
        let seq = self.send(op, msg, NLM_F_DUMP)?;
        let mut out = Vec::new();
        self.receive(op, seq, &mut |payload| match payload {
            NetlinkPayload::InnerMessage(m) => {
                out.push(m);
                Ok(false)
            }
            NetlinkPayload::Done(_) => Ok(true),
            NetlinkPayload::Error(e) if e.code.is_some() => {
                Err(RtnlError::Kernel { op: op.into(), source: e.to_io() })
            }
            _ => Ok(false),
        })?;
        Ok(out)
    }

    /// Feeds the replies to `seq` to `each` until it says the answer is complete.
    fn receive(
        &mut self,
        op: &str,
        seq: u32,
        each: &mut dyn FnMut(NetlinkPayload<RouteNetlinkMessage>) -> Result<bool, RtnlError>,
    ) -> Result<(), RtnlError> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self
                .socket
                .recv(&mut &mut buf[..], 0)
                .map_err(|source| RtnlError::Recv { op: op.into(), source })?;
            let mut offset = 0;
            while offset < n {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..n])
                    .map_err(|e| RtnlError::Decode { op: op.into(), detail: e.to_string() })?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += len;
                if msg.header.sequence_number == seq && each(msg.payload)? {
                    return Ok(());
                }
            }
        }
    }
}

fn link_of(l: &LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        name: String::new(),
        mac: None,
        loopback: l.header.link_layer_type == LinkLayerType::Loopback
            || l.header.flags.contains(LinkFlags::Loopback),
    };
    let ether = l.header.link_layer_type == LinkLayerType::Ether;
    for attr in &l.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Address(a) if ether => link.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            _ => {}
        }
    }
    link
}

fn address_message(index: u32, address: Ipv4Addr, prefix: u8) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.prefix_len = prefix;
    msg.header.index = index;
    msg.attributes.push(AddressAttribute::Local(address.into()));
    msg.attributes.push(AddressAttribute::Address(address.into()));
    msg
}

/// The subnet's broadcast address (the address itself for /31 and /32).
pub fn broadcast(address: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    if prefix >= 31 {
        return address;
    }
    let host_bits = u32::MAX >> prefix.min(32);
    Ipv4Addr::from(u32::from(address) | host_bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_fills_the_host_bits() {
        assert_eq!(broadcast(Ipv4Addr::new(10, 1, 2, 3), 24), Ipv4Addr::new(10, 1, 2, 255));
        assert_eq!(broadcast(Ipv4Addr::new(10, 1, 2, 3), 8), Ipv4Addr::new(10, 255, 255, 255));
        assert_eq!(broadcast(Ipv4Addr::new(10, 1, 2, 3), 32), Ipv4Addr::new(10, 1, 2, 3));
    }
}
