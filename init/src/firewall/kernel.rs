//! The rulesets in the kernel: [`apply`] replaces the appliance's tables in one atomic batch and
//! [`read_back`] dumps what is live, decoded independently of how it was written.

use super::expr::Expr;
use super::model::Ruleset;
use super::nfnl::{self, Attrs, Batch, NfnlError};

const TABLE_NAME: u16 = 1;
const CHAIN_TABLE: u16 = 1;
const CHAIN_NAME: u16 = 3;
const CHAIN_HOOK: u16 = 4;
const CHAIN_POLICY: u16 = 5;
const CHAIN_TYPE: u16 = 7;
const HOOK_NUM: u16 = 1;
const HOOK_PRIORITY: u16 = 2;
/// `NFTA_HOOK_DEV` (one device, as written) and `NFTA_HOOK_DEVS` (the list of
/// `NFTA_DEVICE_NAME`s that kernels since 5.5 dump).
const HOOK_DEV: u16 = 3;
const HOOK_DEVS: u16 = 4;
const DEVICE_NAME: u16 = 1;
const RULE_TABLE: u16 = 1;
const RULE_CHAIN: u16 = 2;
const RULE_EXPRESSIONS: u16 = 4;
/// Every chain is a filter chain at the filter priority.
pub const CHAIN_KIND: &str = "filter";
pub const PRIORITY: i32 = 0;

/// Live state: every table, and the chains of ours with their rules in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// `(family, name)` of every table in this network namespace.
    pub tables: Vec<(u8, String)>,
    pub chains: Vec<LiveChain>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveChain {
    pub family: u8,
    pub table: String,
    pub name: String,
    pub hook: Option<u32>,
    pub priority: Option<i32>,
    pub policy: Option<i32>,
    pub kind: Option<String>,
    /// The devices a netdev chain is bound to; empty for inet chains.
    pub devices: Vec<String>,
    pub rules: Vec<Vec<Expr>>,
    /// Packets each rule's counters counted (0 for a rule without one), for `status`; never
    /// compared.
    pub counted: Vec<u64>,
}

/// Deletes any table of ours and creates each ruleset, all in one transaction: the kernel never
/// shows a moment without the old tables or the new ones, and a refused message leaves the old
/// ones in place.
pub fn apply(rulesets: &[Ruleset]) -> Result<(), NfnlError> {
    let mut batch = Batch::new();
    for rs in rulesets {
        add_ruleset(&mut batch, rs);
    }
    batch.send()
}

fn add_ruleset(batch: &mut Batch, rs: &Ruleset) {
    let family = rs.family;
    let table = || {
        let mut a = Attrs::default();
        a.string(TABLE_NAME, &rs.table);
        a
    };
    let (t, f) = (&rs.table, family);
    // Adding an existing table is not an error, so the delete that follows always has one.
    batch.add(nfnl::NFT_MSG_NEWTABLE, nfnl::NLM_F_CREATE, f, table(), format!("add table {t} ({f})"));
    batch.add(nfnl::NFT_MSG_DELTABLE, 0, f, table(), format!("delete old table {t} ({f})"));
    batch.add(nfnl::NFT_MSG_NEWTABLE, nfnl::NLM_F_CREATE, f, table(), format!("create table {t} ({f})"));
    for chain in &rs.chains {
        let mut a = Attrs::default();
        a.string(CHAIN_TABLE, &rs.table).string(CHAIN_NAME, chain.name);
        a.nest(CHAIN_HOOK).be32(HOOK_NUM, chain.hook.number()).be32(HOOK_PRIORITY, PRIORITY as u32);
        if let Some(dev) = chain.hook.device() {
            a.string(HOOK_DEV, dev);
        }
        a.end();
        a.be32(CHAIN_POLICY, chain.policy.code() as u32).string(CHAIN_TYPE, CHAIN_KIND);
        batch.add(nfnl::NFT_MSG_NEWCHAIN, nfnl::NLM_F_CREATE, family, a, format!("chain {}", chain.name));
    }
    for chain in &rs.chains {
        for rule in &chain.rules {
            let mut a = Attrs::default();
            a.string(RULE_TABLE, &rs.table).string(RULE_CHAIN, chain.name).nest(RULE_EXPRESSIONS);
            for e in rule.lower() {
                e.encode(&mut a);
            }
            a.end();
            let flags = nfnl::NLM_F_CREATE | nfnl::NLM_F_APPEND;
            batch.add(nfnl::NFT_MSG_NEWRULE, flags, family, a, format!("{}: {rule}", chain.name));
        }
    }
}

/// Dumps every table, then the chains and rules of the tables named in `ours`
/// (`(family, name)`).
pub fn read_back(ours: &[(u8, &str)]) -> Result<Live, NfnlError> {
    let is_ours = |family: u8, table: Option<String>| {
        table.is_some_and(|t| ours.iter().any(|&(f, name)| f == family && name == t))
    };
    let mut tables = Vec::new();
    for (family, attrs) in nfnl::dump(nfnl::NFT_MSG_GETTABLE, "table")? {
        let attrs = nfnl::parse_attrs(&attrs)?;
        let name = find(&attrs, TABLE_NAME).map(super::expr::string).unwrap_or_default();
        tables.push((family, name));
    }
    let mut chains = Vec::new();
    for (family, attrs) in nfnl::dump(nfnl::NFT_MSG_GETCHAIN, "chain")? {
        let a = nfnl::parse_attrs(&attrs)?;
        let table = find(&a, CHAIN_TABLE).map(super::expr::string);
        if !is_ours(family, table.clone()) {
            continue;
        }
        let hook = find(&a, CHAIN_HOOK).map(nfnl::parse_attrs).transpose()?.unwrap_or_default();
        chains.push(LiveChain {
            family,
            table: table.unwrap_or_default(),
            name: find(&a, CHAIN_NAME).map(super::expr::string).unwrap_or_default(),
            hook: find(&hook, HOOK_NUM).and_then(be32),
            priority: find(&hook, HOOK_PRIORITY).and_then(be32).map(|p| p as i32),
            policy: find(&a, CHAIN_POLICY).and_then(be32).map(|p| p as i32),
            kind: find(&a, CHAIN_TYPE).map(super::expr::string),
            devices: devices(&hook)?,
            rules: Vec::new(),
            counted: Vec::new(),
        });
    }
    for (family, attrs) in nfnl::dump(nfnl::NFT_MSG_GETRULE, "rule")? {
        let a = nfnl::parse_attrs(&attrs)?;
        let table = find(&a, RULE_TABLE).map(super::expr::string);
        if !is_ours(family, table.clone()) {
            continue;
        }
        let chain = find(&a, RULE_CHAIN).map(super::expr::string).unwrap_or_default();
        let exprs = find(&a, RULE_EXPRESSIONS).map(nfnl::parse_attrs).transpose()?.unwrap_or_default();
        let packets = exprs.iter().filter_map(|(_, e)| super::expr::counter_packets(e)).sum();
        let exprs = exprs.iter().map(|(_, e)| Expr::decode(e)).collect::<Result<Vec<_>, _>>()?;
        let owner = chains
            .iter_mut()
            .find(|c| c.family == family && Some(&c.table) == table.as_ref() && c.name == chain);
        match owner {
            Some(c) => {
                c.rules.push(exprs);
                c.counted.push(packets);
            }
            None => return Err(NfnlError::Malformed("a rule of a chain the chain dump did not list")),
        }
    }
    Ok(Live { tables, chains })
}

/// Every device a chain's hook names: each `NFTA_DEVICE_NAME` of `NFTA_HOOK_DEVS`, and
/// `NFTA_HOOK_DEV` when it is not among them (a kernel that dumps both names the one device
/// twice), so that no device goes unseen.
fn devices(hook: &[(u16, &[u8])]) -> Result<Vec<String>, NfnlError> {
    let mut out = Vec::new();
    if let Some(list) = find(hook, HOOK_DEVS) {
        for (kind, name) in nfnl::parse_attrs(list)? {
            out.push(if kind == DEVICE_NAME {
                super::expr::string(name)
            } else {
                format!("<attribute {kind}>")
            });
        }
    }
    if let Some(dev) = find(hook, HOOK_DEV).map(super::expr::string) {
        if !out.contains(&dev) {
            out.push(dev);
        }
    }
    Ok(out)
}

fn find<'a>(attrs: &[(u16, &'a [u8])], kind: u16) -> Option<&'a [u8]> {
    attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v)
}

fn be32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.try_into().ok()?))
}
