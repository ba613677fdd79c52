//! nf_tables expressions as the kernel stores them: what a rule is made of on the wire. The
//! firewall writes them and decodes the kernel's dump strictly: an attribute or expression we
//! did not write comes back as [`Expr::Unknown`], so verification cannot overlook it.

use std::fmt;

use super::nfnl::{parse_attrs, Attrs, NfnlError};

/// `NFT_REG_VERDICT` and `NFT_REG_1` (a 16-byte register).
pub const REG_VERDICT: u32 = 0;
pub const REG_1: u32 = 1;
pub const CMP_EQ: u32 = 0;
pub const CMP_NEQ: u32 = 1;
/// `NFT_PAYLOAD_LL_HEADER` and `NFT_PAYLOAD_TRANSPORT_HEADER`.
pub const BASE_LINK: u32 = 0;
pub const BASE_TRANSPORT: u32 = 2;
/// `NFT_CT_STATE`.
pub const CT_STATE: u32 = 0;
/// `NFT_LOGLEVEL_WARNING`, the kernel's default: written explicitly so the dump matches.
pub const LOG_LEVEL_WARNING: u32 = 4;
/// `NF_DROP`, `NF_ACCEPT`.
pub const NF_DROP: i32 = 0;
pub const NF_ACCEPT: i32 = 1;

const EXPR_NAME: u16 = 1;
const EXPR_DATA: u16 = 2;
const DATA_VALUE: u16 = 1;
const DATA_VERDICT: u16 = 2;
const VERDICT_CODE: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Meta {
        key: u32,
        dreg: u32,
    },
    Cmp {
        sreg: u32,
        op: u32,
        data: Vec<u8>,
    },
    Payload {
        dreg: u32,
        base: u32,
        offset: u32,
        len: u32,
    },
    Ct {
        dreg: u32,
        key: u32,
    },
    /// `(reg & mask) ^ xor` (`NFT_BITWISE_BOOL`).
    Bitwise {
        sreg: u32,
        dreg: u32,
        len: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// Values are not compared: they count traffic.
    Counter,
    /// Packets (`NFT_LIMIT_PKTS`) per `unit` seconds.
    Limit {
        rate: u64,
        unit: u64,
        burst: u32,
    },
    /// To the kernel log (not nflog), at `level`.
    Log {
        prefix: String,
        level: u32,
    },
    Verdict(i32),
    /// Anything the firewall never writes, described for the error message.
    Unknown(String),
}

impl Expr {
    /// Appends this expression as one `NFTA_LIST_ELEM` of a rule's expression list.
    pub fn encode(&self, a: &mut Attrs) {
        a.nest(1).string(EXPR_NAME, self.name()).nest(EXPR_DATA);
        match self {
            Expr::Meta { key, dreg } => {
                a.be32(1, *dreg).be32(2, *key);
            }
            Expr::Cmp { sreg, op, data } => {
                a.be32(1, *sreg).be32(2, *op).nest(3).bytes(DATA_VALUE, data).end();
            }
            Expr::Payload { dreg, base, offset, len } => {
                a.be32(1, *dreg).be32(2, *base).be32(3, *offset).be32(4, *len);
            }
            Expr::Ct { dreg, key } => {
                a.be32(1, *dreg).be32(2, *key);
            }
            Expr::Bitwise { sreg, dreg, len, mask, xor } => {
                a.be32(1, *sreg).be32(2, *dreg).be32(3, *len);
                a.nest(4).bytes(DATA_VALUE, mask).end().nest(5).bytes(DATA_VALUE, xor).end();
            }
            Expr::Counter => {
                a.be64(1, 0).be64(2, 0);
            }
            Expr::Limit { rate, unit, burst } => {
                a.be64(1, *rate).be64(2, *unit).be32(3, *burst).be32(4, 0).be32(5, 0);
            }
            Expr::Log { prefix, level } => {
                a.string(2, prefix).be32(5, *level);
            }
            Expr::Verdict(code) => {
                a.be32(1, REG_VERDICT)
                    .nest(2)
                    .nest(DATA_VERDICT)
                    .be32(VERDICT_CODE, *code as u32)
                    .end()
                    .end();
            }
            Expr::Unknown(_) => {}
        }
        a.end().end();
    }

    fn name(&self) -> &'static str {
        match self {
            Expr::Meta { .. } => "meta",
            Expr::Cmp { .. } => "cmp",
            Expr::Payload { .. } => "payload",
            Expr::Ct { .. } => "ct",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Counter => "counter",
            Expr::Limit { .. } => "limit",
            Expr::Log { .. } => "log",
            Expr::Verdict(_) => "immediate",
            Expr::Unknown(_) => "unknown",
        }
    }

    /// Decodes one `NFTA_LIST_ELEM` of a dumped rule.
    pub fn decode(elem: &[u8]) -> Result<Expr, NfnlError> {
        let attrs = parse_attrs(elem)?;
        let name = attrs.iter().find(|(k, _)| *k == EXPR_NAME).map(|(_, v)| string(v)).unwrap_or_default();
        let data = attrs.iter().find(|(k, _)| *k == EXPR_DATA).map(|(_, v)| *v).unwrap_or_default();
        let fields = parse_attrs(data)?;
        Ok(decode_fields(&name, &fields).unwrap_or_else(|| Expr::Unknown(describe(&name, &fields))))
    }
}

/// `None` when an attribute is missing, extra or not what the firewall writes.
fn decode_fields(name: &str, f: &[(u16, &[u8])]) -> Option<Expr> {
    let get = |kind: u16| f.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v);
    let u32_of = |kind: u16| get(kind).and_then(be32);
    let u64_of = |kind: u16| get(kind).and_then(be64);
    let only = |kinds: &[u16]| f.iter().all(|(k, _)| kinds.contains(k));
    let value = |kind: u16| get(kind).and_then(|v| nested(v, DATA_VALUE));
    match name {
        "meta" if only(&[1, 2]) => Some(Expr::Meta { dreg: u32_of(1)?, key: u32_of(2)? }),
        "cmp" if only(&[1, 2, 3]) => Some(Expr::Cmp { sreg: u32_of(1)?, op: u32_of(2)?, data: value(3)? }),
        "payload" if only(&[1, 2, 3, 4]) => {
            Some(Expr::Payload { dreg: u32_of(1)?, base: u32_of(2)?, offset: u32_of(3)?, len: u32_of(4)? })
        }
        "ct" if only(&[1, 2]) => Some(Expr::Ct { dreg: u32_of(1)?, key: u32_of(2)? }),
        // NFTA_BITWISE_OP (6) is dumped by newer kernels; only the boolean form (0) is ours.
        "bitwise" if only(&[1, 2, 3, 4, 5, 6]) && u32_of(6).unwrap_or(0) == 0 => Some(Expr::Bitwise {
            sreg: u32_of(1)?,
            dreg: u32_of(2)?,
            len: u32_of(3)?,
            mask: value(4)?,
            xor: value(5)?,
        }),
        "counter" if only(&[1, 2, 3]) => Some(Expr::Counter),
        "limit" if only(&[1, 2, 3, 4, 5, 6]) && u32_of(4)? == 0 && u32_of(5)? == 0 => {
            Some(Expr::Limit { rate: u64_of(1)?, unit: u64_of(2)?, burst: u32_of(3)? })
        }
        "log" if only(&[2, 5]) => Some(Expr::Log { prefix: string(get(2)?), level: u32_of(5)? }),
        "immediate" if only(&[1, 2]) && u32_of(1)? == REG_VERDICT => {
            let verdict = parse_attrs(get(2)?).ok()?;
            let [(DATA_VERDICT, v)] = verdict.as_slice() else { return None };
            let code = parse_attrs(v).ok()?;
            let [(VERDICT_CODE, c)] = code.as_slice() else { return None };
            Some(Expr::Verdict(be32(c)? as i32))
        }
        _ => None,
    }
}

/// The packets a dumped `counter` expression counted; `None` for any other expression.
pub fn counter_packets(elem: &[u8]) -> Option<u64> {
    let attrs = parse_attrs(elem).ok()?;
    let name = attrs.iter().find(|(k, _)| *k == EXPR_NAME).map(|(_, v)| string(v))?;
    if name != "counter" {
        return None;
    }
    let data = attrs.iter().find(|(k, _)| *k == EXPR_DATA).map(|(_, v)| *v)?;
    let fields = parse_attrs(data).ok()?;
    // NFTA_COUNTER_PACKETS
    fields.iter().find(|(k, _)| *k == 2).and_then(|(_, v)| be64(v))
}

fn describe(name: &str, fields: &[(u16, &[u8])]) -> String {
    let attrs: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={}", hex(v))).collect();
    format!("{name}({})", attrs.join(" "))
}

fn nested(v: &[u8], kind: u16) -> Option<Vec<u8>> {
    let attrs = parse_attrs(v).ok()?;
    match attrs.as_slice() {
        [(k, data)] if *k == kind => Some(data.to_vec()),
        _ => None,
    }
}

fn be32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.try_into().ok()?))
}

fn be64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

pub fn string(v: &[u8]) -> String {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

fn hex(v: &[u8]) -> String {
    v.iter().map(|b| format!("{b:02x}")).collect()
}

/// Close to `nft --debug=netlink`, for error messages.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Meta { key, dreg } => write!(f, "[meta load {key} => reg {dreg}]"),
            Expr::Cmp { sreg, op, data } => {
                let op = if *op == CMP_EQ { "eq" } else { "neq" };
                write!(f, "[cmp {op} reg {sreg} 0x{}]", hex(data))
            }
            Expr::Payload { dreg, base, offset, len } => {
                write!(f, "[payload load {len}b @ base {base} + {offset} => reg {dreg}]")
            }
            Expr::Ct { dreg, key } => write!(f, "[ct load {key} => reg {dreg}]"),
            Expr::Bitwise { sreg, dreg, mask, xor, .. } => {
                write!(f, "[bitwise reg {dreg} = (reg {sreg} & 0x{}) ^ 0x{}]", hex(mask), hex(xor))
            }
            Expr::Counter => write!(f, "[counter]"),
            Expr::Limit { rate, unit, burst } => write!(f, "[limit rate {rate}/{unit}s burst {burst}]"),
            Expr::Log { prefix, level } => write!(f, "[log prefix {prefix:?} level {level}]"),
            Expr::Verdict(NF_ACCEPT) => write!(f, "[immediate accept]"),
            Expr::Verdict(NF_DROP) => write!(f, "[immediate drop]"),
            Expr::Verdict(code) => write!(f, "[immediate verdict {code}]"),
            Expr::Unknown(what) => write!(f, "[{what}]"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(e: Expr) -> Expr {
        let mut a = Attrs::default();
        e.encode(&mut a);
        let bytes = a.into_bytes();
        let elems = parse_attrs(&bytes).unwrap();
        assert_eq!(elems.len(), 1);
        Expr::decode(elems[0].1).unwrap()
    }

    #[test]
    fn every_expression_decodes_to_itself() {
        let all = [
            Expr::Meta { key: 10, dreg: REG_1 },
            Expr::Cmp { sreg: REG_1, op: CMP_NEQ, data: vec![1, 2, 3, 4] },
            Expr::Payload { dreg: REG_1, base: BASE_TRANSPORT, offset: 2, len: 2 },
            Expr::Ct { dreg: REG_1, key: CT_STATE },
            Expr::Bitwise { sreg: 1, dreg: 1, len: 4, mask: vec![6, 0, 0, 0], xor: vec![0; 4] },
            Expr::Counter,
            Expr::Limit { rate: 10, unit: 60, burst: 5 },
            Expr::Log { prefix: "cloister-dns: ".into(), level: LOG_LEVEL_WARNING },
            Expr::Verdict(NF_ACCEPT),
            Expr::Verdict(NF_DROP),
        ];
        for e in all {
            assert_eq!(round_trip(e.clone()), e);
        }
    }

    #[test]
    fn extra_attributes_make_an_unknown_expression() {
        let mut a = Attrs::default();
        a.string(EXPR_NAME, "log").nest(EXPR_DATA).string(2, "x").be32(5, 4).be32(1, 7).end();
        let e = Expr::decode(&a.into_bytes()).unwrap();
        assert!(matches!(&e, Expr::Unknown(d) if d.starts_with("log(")), "{e}");
        let mut a = Attrs::default();
        a.string(EXPR_NAME, "queue").nest(EXPR_DATA).be32(1, 0).end();
        assert_eq!(Expr::decode(&a.into_bytes()).unwrap(), Expr::Unknown("queue(1=00000000)".into()));
    }
}
