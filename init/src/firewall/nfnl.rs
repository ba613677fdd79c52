//! nfnetlink for nf_tables, by hand: attribute (TLV) writing and parsing, one atomic batch
//! (`NFNL_MSG_BATCH_BEGIN` .. `END`) sent and acknowledged, and dumps of tables, chains and
//! rules. Only what the firewall uses; the numbers are the kernel's uapi
//! (`linux/netfilter/nfnetlink.h`, `nf_tables.h`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
pub const NFT_MSG_NEWTABLE: u16 = 0;
pub const NFT_MSG_GETTABLE: u16 = 1;
pub const NFT_MSG_DELTABLE: u16 = 2;
pub const NFT_MSG_NEWCHAIN: u16 = 3;
pub const NFT_MSG_GETCHAIN: u16 = 4;
pub const NFT_MSG_NEWRULE: u16 = 6;
pub const NFT_MSG_GETRULE: u16 = 7;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const HEADER_LEN: usize = 16;
const NFGEN_LEN: usize = 4;
/// How long the kernel may take to answer before we call it an error rather than hang PID 1.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NfnlError {
    #[error("netlink socket: {0}")]
    Socket(nix::Error),
    #[error("netlink send: {0}")]
    Send(nix::Error),
    #[error("netlink receive: {0}")]
    Recv(nix::Error),
    #[error("kernel refused message {seq} of the batch ({what}): {errno}")]
    Refused { seq: u32, what: String, errno: nix::Error },
    #[error("kernel refused the {what} dump: {errno}")]
    DumpRefused { what: &'static str, errno: nix::Error },
    #[error("the {0} dump was interrupted by a concurrent change")]
    DumpInterrupted(&'static str),
    #[error("malformed netlink reply: {0}")]
    Malformed(&'static str),
}

/// Netlink attributes being written: `nest` opens a nested one, `end` closes it.
#[derive(Default)]
pub struct Attrs {
    buf: Vec<u8>,
    open: Vec<usize>,
}

impl Attrs {
    pub fn bytes(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    /// A string with its terminating NUL, as the kernel's `nla_put_string` writes it.
    pub fn string(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.bytes(kind, &data)
    }

    pub fn be32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.bytes(kind, &v.to_be_bytes())
    }

    pub fn be64(&mut self, kind: u16, v: u64) -> &mut Self {
        self.bytes(kind, &v.to_be_bytes())
    }

    pub fn nest(&mut self, kind: u16) -> &mut Self {
        self.open.push(self.buf.len());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub fn end(&mut self) -> &mut Self {
        if let Some(start) = self.open.pop() {
            let len = u16::try_from(self.buf.len() - start).unwrap_or(u16::MAX);
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// One netlink message: header, nfgenmsg (family, version 0, resource id) and attributes.
fn message(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: &[u8]) -> Vec<u8> {
    let len = u32::try_from(HEADER_LEN + NFGEN_LEN + attrs.len()).unwrap_or(u32::MAX);
    let mut m = Vec::with_capacity(len as usize);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, 0]);
    m.extend_from_slice(&res_id.to_be_bytes());
    m.extend_from_slice(attrs);
    m
}

fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// An atomic transaction: the kernel applies all of its messages or none.
pub struct Batch {
    buf: Vec<u8>,
    /// What each message does, by sequence number, to name the one the kernel refuses.
    what: Vec<String>,
}

impl Batch {
    pub fn new() -> Self {
        let begin = message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, 0, NFNL_SUBSYS_NFTABLES, &[]);
        Self { buf: begin, what: vec!["batch begin".into()] }
    }

    /// Adds one nf_tables command; every command is acknowledged.
    pub fn add(&mut self, msg: u16, flags: u16, family: u8, attrs: Attrs, what: String) {
        let seq = u32::try_from(self.what.len()).unwrap_or(u32::MAX);
        let flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        self.buf.extend(message(nft_type(msg), flags, seq, family, 0, &attrs.into_bytes()));
        self.what.push(what);
    }

    /// Sends the batch and waits for every command's acknowledgement; the first refusal wins.
    pub fn send(mut self) -> Result<(), NfnlError> {
        let last = u32::try_from(self.what.len() - 1).unwrap_or(u32::MAX);
        let end_seq = last + 1;
        self.buf.extend(message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, end_seq, 0, NFNL_SUBSYS_NFTABLES, &[]));
        let sock = open()?;
        send(sock.as_raw_fd(), &self.buf, MsgFlags::empty()).map_err(NfnlError::Send)?;
        let mut first_error = None;
        let mut acked = 0u32;
        let mut buf = vec![0u8; 1 << 16];
        while acked < last {
            let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(NfnlError::Recv)?;
            for msg in Messages::new(&buf[..n]) {
                let msg = msg?;
                if msg.kind != NLMSG_ERROR {
                    continue;
                }
                let code = error_code(msg.payload)?;
                acked = acked.max(msg.seq);
                if code != 0 && first_error.is_none() {
                    let what = self.what.get(msg.seq as usize).cloned().unwrap_or_default();
                    let errno = nix::Error::from_raw(-code);
                    first_error = Some(NfnlError::Refused { seq: msg.seq, what, errno });
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

fn open() -> Result<OwnedFd, NfnlError> {
    let sock =
        socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkNetFilter)
            .map_err(NfnlError::Socket)?;
    bind(sock.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(NfnlError::Socket)?;
    let timeout = TimeVal::new(RECV_TIMEOUT.as_secs() as _, 0);
    setsockopt(&sock, sockopt::ReceiveTimeout, &timeout).map_err(NfnlError::Socket)?;
    Ok(sock)
}

fn error_code(payload: &[u8]) -> Result<i32, NfnlError> {
    let b = payload.get(..4).ok_or(NfnlError::Malformed("short error message"))?;
    Ok(i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// Dumps every object of one kind (`NFT_MSG_GET*`) in every family: each one's family and
/// attributes.
pub fn dump(msg: u16, what: &'static str) -> Result<Vec<(u8, Vec<u8>)>, NfnlError> {
    let sock = open()?;
    let req = message(nft_type(msg), NLM_F_REQUEST | NLM_F_DUMP, 1, 0, 0, &[]);
    send(sock.as_raw_fd(), &req, MsgFlags::empty()).map_err(NfnlError::Send)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(NfnlError::Recv)?;
        if n == 0 {
            return Err(NfnlError::Malformed("dump ended without NLMSG_DONE"));
        }
        for msg in Messages::new(&buf[..n]) {
            let msg = msg?;
            if msg.flags & NLM_F_DUMP_INTR != 0 {
                return Err(NfnlError::DumpInterrupted(what));
            }
            match msg.kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let code = error_code(msg.payload)?;
                    if code != 0 {
                        return Err(NfnlError::DumpRefused { what, errno: nix::Error::from_raw(-code) });
                    }
                }
                _ => {
                    let p = msg.payload;
                    let family = *p.first().ok_or(NfnlError::Malformed("no nfgenmsg"))?;
                    out.push((family, p.get(NFGEN_LEN..).unwrap_or_default().to_vec()));
                }
            }
        }
    }
}

pub struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// The netlink messages in one datagram.
struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Messages<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { rest: buf }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, NfnlError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.len() < HEADER_LEN {
            return None;
        }
        let h = self.rest;
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if len < HEADER_LEN || len > h.len() {
            self.rest = &[];
            return Some(Err(NfnlError::Malformed("bad message length")));
        }
        let msg = Message {
            kind: u16::from_ne_bytes([h[4], h[5]]),
            flags: u16::from_ne_bytes([h[6], h[7]]),
            seq: u32::from_ne_bytes([h[8], h[9], h[10], h[11]]),
            payload: &h[HEADER_LEN..len],
        };
        self.rest = h.get(align(len)..).unwrap_or_default();
        Some(Ok(msg))
    }
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// The attributes at one level: `(type without flags, payload)`.
pub fn parse_attrs(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, NfnlError> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return Err(NfnlError::Malformed("bad attribute length"));
        }
        out.push((kind, &buf[4..len]));
        buf = buf.get(align(len)..).unwrap_or_default();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_nesting_and_padding() {
        let mut a = Attrs::default();
        a.string(1, "cloister").nest(4).be32(1, 3).bytes(2, &[1, 2, 3]).end().be64(9, 7);
        let bytes = a.into_bytes();
        assert_eq!(bytes.len() % 4, 0);
        let top = parse_attrs(&bytes).unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0], (1, &b"cloister\0"[..]));
        let inner = parse_attrs(top[1].1).unwrap();
        assert_eq!(inner, vec![(1, &3u32.to_be_bytes()[..]), (2, &[1u8, 2, 3][..])]);
        assert_eq!(top[2], (9, &7u64.to_be_bytes()[..]));
    }

    #[test]
    fn truncated_attributes_are_malformed() {
        assert!(parse_attrs(&[12, 0, 1, 0, 0]).is_err());
    }
}
