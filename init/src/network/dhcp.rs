//! The DHCPv4 client's wire format and timing, free of I/O: the requests it sends (with
//! nothing identifying in them), the replies it accepts, the lease they make, the
//! retransmission backoff, and UDP payloads picked out of raw IPv4 packets.
//!
//! What a request carries: op, htype/hlen, a random xid, the BROADCAST flag (replies come
//! broadcast, so nothing depends on receiving unicast before an address exists), ciaddr while
//! renewing, chaddr = the (random) MAC address as RFC 2131 requires, and the options message
//! type (53), requested address (50) and server identifier (54) where the RFC requires them,
//! and a parameter request list (55) of subnet mask, router and lease time only. No host name
//! (12), no vendor class (60), no client identifier (61), no secs.

use std::net::Ipv4Addr;
use std::time::Duration;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};

pub const CLIENT_PORT: u16 = 68;
pub const SERVER_PORT: u16 = 67;

/// The only parameters we ask for.
pub const REQUESTED: [OptionCode; 3] =
    [OptionCode::SubnetMask, OptionCode::Router, OptionCode::AddressLeaseTime];

#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("encode {0:?}: {1}")]
    Encode(Kind, dhcproto::error::EncodeError),
    #[error("ack from {server} has no lease time")]
    NoLeaseTime { server: Ipv4Addr },
    #[error("ack from {server} offers unusable address {address}")]
    BadAddress { server: Ipv4Addr, address: Ipv4Addr },
}

/// Which request to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Discover,
    /// REQUEST answering an offer (SELECTING).
    Select {
        server: Ipv4Addr,
        address: Ipv4Addr,
    },
    /// REQUEST for the lease we hold, to its server (RENEWING) or to anyone (REBINDING).
    Extend {
        address: Ipv4Addr,
    },
}

/// A request's bytes.
pub fn request(kind: Kind, xid: u32, mac: [u8; 6]) -> Result<Vec<u8>, DhcpError> {
    let ciaddr = match kind {
        Kind::Extend { address } => address,
        _ => Ipv4Addr::UNSPECIFIED,
    };
    let zero = Ipv4Addr::UNSPECIFIED;
    let mut msg = Message::new_with_id(xid, ciaddr, zero, zero, zero, &mac);
    msg.set_opcode(Opcode::BootRequest);
    msg.set_flags(Flags::default().set_broadcast());
    let opts = msg.opts_mut();
    let mtype = match kind {
        Kind::Discover => MessageType::Discover,
        _ => MessageType::Request,
    };
    opts.insert(DhcpOption::MessageType(mtype));
    if let Kind::Select { server, address } = kind {
        opts.insert(DhcpOption::RequestedIpAddress(address));
        opts.insert(DhcpOption::ServerIdentifier(server));
    }
    opts.insert(DhcpOption::ParameterRequestList(REQUESTED.to_vec()));
    msg.to_vec().map_err(|e| DhcpError::Encode(kind, e))
}

/// A server's reply to one of our requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub kind: MessageType,
    pub address: Ipv4Addr,
    pub server: Option<Ipv4Addr>,
    pub mask: Option<Ipv4Addr>,
    pub router: Option<Ipv4Addr>,
    pub lease_s: Option<u32>,
    pub t1_s: Option<u32>,
    pub t2_s: Option<u32>,
}

/// Decodes `bytes` if they are a reply to our transaction `xid` for `mac`; anything else
/// (other clients' traffic, requests, garbage) is `None`.
pub fn parse_reply(bytes: &[u8], xid: u32, mac: [u8; 6]) -> Option<Reply> {
    let msg = Message::decode(&mut Decoder::new(bytes)).ok()?;
    if msg.opcode() != Opcode::BootReply || msg.xid() != xid || msg.chaddr().get(..6) != Some(&mac[..]) {
        return None;
    }
    let opts = msg.opts();
    let kind = opts.msg_type()?;
    let ip = |code| match opts.get(code) {
        Some(DhcpOption::ServerIdentifier(a) | DhcpOption::SubnetMask(a)) => Some(*a),
        Some(DhcpOption::Router(list)) => list.first().copied(),
        _ => None,
    };
    let secs = |code| match opts.get(code) {
        Some(DhcpOption::AddressLeaseTime(s) | DhcpOption::Renewal(s) | DhcpOption::Rebinding(s)) => Some(*s),
        _ => None,
    };
    Some(Reply {
        kind,
        address: msg.yiaddr(),
        server: ip(OptionCode::ServerIdentifier)
            .or_else(|| Some(msg.siaddr()).filter(|a| !a.is_unspecified())),
        mask: ip(OptionCode::SubnetMask),
        router: ip(OptionCode::Router),
        lease_s: secs(OptionCode::AddressLeaseTime),
        t1_s: secs(OptionCode::Renewal),
        t2_s: secs(OptionCode::Rebinding),
    })
}

/// An address we may use, and when to renew and rebind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub server: Ipv4Addr,
    pub lease_s: u32,
    pub t1_s: u32,
    pub t2_s: u32,
}

impl Lease {
    /// The lease an ACK grants; T1 and T2 default to 1/2 and 7/8 of it (RFC 2131 4.4.5) and
    /// are kept in order.
    pub fn from_ack(ack: &Reply, server: Ipv4Addr) -> Result<Self, DhcpError> {
        let lease_s = ack.lease_s.ok_or(DhcpError::NoLeaseTime { server })?;
        let a = ack.address;
        if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
            return Err(DhcpError::BadAddress { server, address: a });
        }
        let prefix = ack.mask.map_or_else(|| classful_prefix(a), |m| u32::from(m).leading_ones() as u8);
        let t2_s = ack.t2_s.unwrap_or(lease_s / 8 * 7 + lease_s % 8 * 7 / 8).min(lease_s);
        let t1_s = ack.t1_s.unwrap_or(lease_s / 2).min(t2_s);
        Ok(Self {
            address: a,
            prefix,
            router: ack.router,
            server: ack.server.unwrap_or(server),
            lease_s,
            t1_s,
            t2_s,
        })
    }
}

/// RFC 1122's fallback when the server sends no mask.
fn classful_prefix(a: Ipv4Addr) -> u8 {
    match a.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    }
}

/// Retransmission delays: `initial` doubling up to `max`, each moved by a jitter of at most
/// one second either way (RFC 2131 4.1), never below `initial / 2`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait after `attempt` (0 = the first transmission); `jitter` in -1000..=1000 ms.
    pub fn delay(&self, attempt: u32, jitter_ms: i64) -> Duration {
        let base = self.initial.saturating_mul(1u32 << attempt.min(16)).min(self.max);
        let ms = i64::try_from(base.as_millis()).unwrap_or(i64::MAX);
        let floor = i64::try_from(self.initial.as_millis() / 2).unwrap_or(0);
        Duration::from_millis(u64::try_from((ms + jitter_ms.clamp(-1000, 1000)).max(floor)).unwrap_or(0))
    }
}

/// The UDP payload of an IPv4 packet (as an `AF_PACKET` datagram socket hands it over) if it
/// is an unfragmented UDP datagram to `port`.
pub fn udp_payload(packet: &[u8], port: u16) -> Option<&[u8]> {
    let first = *packet.first()?;
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < 20 || packet.len() < ihl + 8 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    let fragmented = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0;
    if packet[9] != 17 || fragmented || total > packet.len() || total < ihl + 8 {
        return None;
    }
    let udp = &packet[ihl..total];
    let dst = u16::from_be_bytes([udp[2], udp[3]]);
    let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    (dst == port && (8..=udp.len()).contains(&len)).then(|| &udp[8..len])
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];

    fn decode(bytes: &[u8]) -> Message {
        Message::decode(&mut Decoder::new(bytes)).unwrap()
    }

    #[test]
    fn requests_carry_nothing_identifying() {
        let server = Ipv4Addr::new(10, 9, 0, 1);
        let address = Ipv4Addr::new(10, 9, 0, 50);
        for kind in [Kind::Discover, Kind::Select { server, address }, Kind::Extend { address }] {
            let msg = decode(&request(kind, 0x1234_5678, MAC).unwrap());
            assert_eq!(msg.opcode(), Opcode::BootRequest);
            assert_eq!(msg.xid(), 0x1234_5678);
            assert!(msg.flags().broadcast(), "{kind:?}");
            assert_eq!(msg.chaddr(), MAC);
            assert_eq!(msg.secs(), 0);
            assert!(msg.sname().is_none() && msg.fname().is_none());
            let codes: Vec<u8> = msg.opts().iter().map(|(c, _)| u8::from(*c)).collect();
            for forbidden in [12u8, 60, 61, 81, 77] {
                assert!(!codes.contains(&forbidden), "{kind:?} carries option {forbidden}");
            }
            let Some(DhcpOption::ParameterRequestList(prl)) =
                msg.opts().get(OptionCode::ParameterRequestList)
            else {
                panic!("no parameter request list")
            };
            assert_eq!(prl, &REQUESTED.to_vec());
            let expected: Vec<u8> = match kind {
                Kind::Select { .. } => vec![50, 53, 54, 55],
                _ => vec![53, 55],
            };
            assert_eq!(codes, expected, "{kind:?}");
        }
        let extend = decode(&request(Kind::Extend { address }, 1, MAC).unwrap());
        assert_eq!(extend.ciaddr(), address);
        assert_eq!(extend.opts().msg_type(), Some(MessageType::Request));
    }

    fn reply(xid: u32, mac: [u8; 6], kind: MessageType, lease: Option<u32>) -> Vec<u8> {
        let zero = Ipv4Addr::UNSPECIFIED;
        let mut msg = Message::new_with_id(xid, zero, Ipv4Addr::new(10, 9, 0, 50), zero, zero, &mac);
        msg.set_opcode(Opcode::BootReply);
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 9, 0, 1)));
        opts.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
        opts.insert(DhcpOption::Router(vec![Ipv4Addr::new(10, 9, 0, 1)]));
        if let Some(s) = lease {
            opts.insert(DhcpOption::AddressLeaseTime(s));
        }
        msg.to_vec().unwrap()
    }

    #[test]
    fn replies_to_others_are_ignored_and_ours_make_a_lease() {
        let ack = reply(7, MAC, MessageType::Ack, Some(30));
        assert_eq!(parse_reply(&ack, 8, MAC), None);
        assert_eq!(parse_reply(&ack, 7, [0x02, 0, 0, 0, 0, 1]), None);
        assert_eq!(parse_reply(&request(Kind::Discover, 7, MAC).unwrap(), 7, MAC), None);
        assert_eq!(parse_reply(b"garbage", 7, MAC), None);
        let got = parse_reply(&ack, 7, MAC).unwrap();
        assert_eq!(got.kind, MessageType::Ack);
        let lease = Lease::from_ack(&got, Ipv4Addr::new(10, 9, 0, 1)).unwrap();
        assert_eq!(lease.address, Ipv4Addr::new(10, 9, 0, 50));
        assert_eq!((lease.prefix, lease.lease_s, lease.t1_s, lease.t2_s), (24, 30, 15, 26));
        assert_eq!(lease.router, Some(Ipv4Addr::new(10, 9, 0, 1)));
        let no_time = parse_reply(&reply(7, MAC, MessageType::Ack, None), 7, MAC).unwrap();
        assert!(Lease::from_ack(&no_time, Ipv4Addr::new(10, 9, 0, 1)).is_err());
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_bounded_jitter() {
        let b = Backoff { initial: Duration::from_secs(2), max: Duration::from_secs(16) };
        let ms = |a, j| b.delay(a, j).as_millis();
        assert_eq!(
            [ms(0, 0), ms(1, 0), ms(2, 0), ms(3, 0), ms(4, 0), ms(30, 0)],
            [2000, 4000, 8000, 16000, 16000, 16000]
        );
        assert_eq!(ms(0, 5000), 3000);
        assert_eq!(ms(0, -5000), 1000);
        assert_eq!(ms(2, -700), 7300);
    }

    #[test]
    fn udp_payloads_are_picked_out_of_ipv4() {
        let payload = b"hello";
        let mut packet = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 255, 255, 255, 255];
        packet.extend_from_slice(&67u16.to_be_bytes());
        packet.extend_from_slice(&68u16.to_be_bytes());
        packet.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
        packet.extend_from_slice(&[0, 0]);
        packet.extend_from_slice(payload);
        let total = packet.len() as u16;
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        assert_eq!(udp_payload(&packet, 68), Some(&payload[..]));
        assert_eq!(udp_payload(&packet, 67), None);
        let mut tcp = packet.clone();
        tcp[9] = 6;
        assert_eq!(udp_payload(&tcp, 68), None);
        let mut fragment = packet.clone();
        fragment[6] = 0x20;
        assert_eq!(udp_payload(&fragment, 68), None);
        assert_eq!(udp_payload(&packet[..25], 68), None);
    }
}
