//! The ruleset in the kernel: [`apply`] replaces the `cloister` table in one atomic batch and
//! [`read_back`] dumps what is live, decoded independently of how it was written.

use super::expr::Expr;
use super::model::{Ruleset, FAMILY_INET};
use super::nfnl::{self, Attrs, Batch, NfnlError};

const TABLE_NAME: u16 = 1;
const CHAIN_TABLE: u16 = 1;
const CHAIN_NAME: u16 = 3;
const CHAIN_HOOK: u16 = 4;
const CHAIN_POLICY: u16 = 5;
const CHAIN_TYPE: u16 = 7;
const HOOK_NUM: u16 = 1;
const HOOK_PRIORITY: u16 = 2;
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
    pub name: String,
    pub hook: Option<u32>,
    pub priority: Option<i32>,
    pub policy: Option<i32>,
    pub kind: Option<String>,
    pub rules: Vec<Vec<Expr>>,
}

/// Deletes any table of ours and creates the ruleset, in one transaction: the kernel never
/// shows a moment without a table, and a refused message leaves the old one in place.
pub fn apply(rs: &Ruleset) -> Result<(), NfnlError> {
    let mut batch = Batch::new();
    let table = || {
        let mut a = Attrs::default();
        a.string(TABLE_NAME, &rs.table);
        a
    };
    // Adding an existing table is not an error, so the delete that follows always has one.
    batch.add(nfnl::NFT_MSG_NEWTABLE, nfnl::NLM_F_CREATE, FAMILY_INET, table(), "add table".into());
    batch.add(nfnl::NFT_MSG_DELTABLE, 0, FAMILY_INET, table(), "delete old table".into());
    batch.add(nfnl::NFT_MSG_NEWTABLE, nfnl::NLM_F_CREATE, FAMILY_INET, table(), "create table".into());
    for chain in &rs.chains {
        let mut a = Attrs::default();
        a.string(CHAIN_TABLE, &rs.table).string(CHAIN_NAME, chain.name);
        a.nest(CHAIN_HOOK).be32(HOOK_NUM, chain.hook as u32).be32(HOOK_PRIORITY, PRIORITY as u32).end();
        a.be32(CHAIN_POLICY, chain.policy.code() as u32).string(CHAIN_TYPE, CHAIN_KIND);
        batch.add(
            nfnl::NFT_MSG_NEWCHAIN,
            nfnl::NLM_F_CREATE,
            FAMILY_INET,
            a,
            format!("chain {}", chain.name),
        );
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
            batch.add(nfnl::NFT_MSG_NEWRULE, flags, FAMILY_INET, a, format!("{}: {rule}", chain.name));
        }
    }
    batch.send()
}

/// Dumps tables, then the chains and rules of `table` (family inet).
pub fn read_back(table: &str) -> Result<Live, NfnlError> {
    let mut tables = Vec::new();
    for (family, attrs) in nfnl::dump(nfnl::NFT_MSG_GETTABLE, "table")? {
        let attrs = nfnl::parse_attrs(&attrs)?;
        let name = find(&attrs, TABLE_NAME).map(super::expr::string).unwrap_or_default();
        tables.push((family, name));
    }
    let mut chains = Vec::new();
    for (family, attrs) in nfnl::dump(nfnl::NFT_MSG_GETCHAIN, "chain")? {
        let a = nfnl::parse_attrs(&attrs)?;
        if family != FAMILY_INET || find(&a, CHAIN_TABLE).map(super::expr::string).as_deref() != Some(table) {
            continue;
        }
        let hook = find(&a, CHAIN_HOOK).map(nfnl::parse_attrs).transpose()?.unwrap_or_default();
        chains.push(LiveChain {
            name: find(&a, CHAIN_NAME).map(super::expr::string).unwrap_or_default(),
            hook: find(&hook, HOOK_NUM).and_then(be32),
            priority: find(&hook, HOOK_PRIORITY).and_then(be32).map(|p| p as i32),
            policy: find(&a, CHAIN_POLICY).and_then(be32).map(|p| p as i32),
            kind: find(&a, CHAIN_TYPE).map(super::expr::string),
            rules: Vec::new(),
        });
    }
    for (family, attrs) in nfnl::dump(nfnl::NFT_MSG_GETRULE, "rule")? {
        let a = nfnl::parse_attrs(&attrs)?;
        if family != FAMILY_INET || find(&a, RULE_TABLE).map(super::expr::string).as_deref() != Some(table) {
            continue;
        }
        let chain = find(&a, RULE_CHAIN).map(super::expr::string).unwrap_or_default();
        let exprs = find(&a, RULE_EXPRESSIONS).map(nfnl::parse_attrs).transpose()?.unwrap_or_default();
        let exprs = exprs.iter().map(|(_, e)| Expr::decode(e)).collect::<Result<Vec<_>, _>>()?;
        match chains.iter_mut().find(|c| c.name == chain) {
            Some(c) => c.rules.push(exprs),
            None => return Err(NfnlError::Malformed("a rule of a chain the chain dump did not list")),
        }
    }
    Ok(Live { tables, chains })
}

fn find<'a>(attrs: &[(u16, &'a [u8])], kind: u16) -> Option<&'a [u8]> {
    attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v)
}

fn be32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.try_into().ok()?))
}
