//! Intended against live: what PID 1 meant to apply, in the shape the kernel reports it, and
//! every difference said in words. Any difference keeps the services from starting.

use super::kernel::{Live, LiveChain, CHAIN_KIND, PRIORITY};
use super::model::{Ruleset, FAMILY_INET};

/// The live state that `rulesets` should produce when they are the only tables.
pub fn expected(rulesets: &[Ruleset]) -> Live {
    Live {
        tables: rulesets.iter().map(|rs| (rs.family, rs.table.clone())).collect(),
        chains: rulesets
            .iter()
            .flat_map(|rs| {
                rs.chains.iter().map(|c| LiveChain {
                    family: rs.family,
                    table: rs.table.clone(),
                    name: c.name.into(),
                    hook: Some(c.hook.number()),
                    priority: Some(PRIORITY),
                    policy: Some(c.policy.code()),
                    kind: Some(CHAIN_KIND.into()),
                    devices: c.hook.device().map(String::from).into_iter().collect(),
                    rules: c.rules.iter().map(|r| r.lower()).collect(),
                    counted: vec![0; c.rules.len()],
                })
            })
            .collect(),
    }
}

/// How a chain is named in a difference: the inet table's chains by name alone (the main
/// table), others with their family and table.
fn label(c: &LiveChain) -> String {
    if c.family == FAMILY_INET {
        c.name.clone()
    } else {
        format!("{} {} {}", family_name(c.family), c.table, c.name)
    }
}

fn family_name(family: u8) -> String {
    match family {
        1 => "inet".into(),
        2 => "ip".into(),
        3 => "arp".into(),
        5 => "netdev".into(),
        7 => "bridge".into(),
        10 => "ip6".into(),
        other => format!("family {other}"),
    }
}

/// Every way `live` differs from what `rulesets` mean, in order; empty when they agree.
pub fn differences(rulesets: &[Ruleset], live: &Live) -> Vec<String> {
    let want = expected(rulesets);
    let intended: Vec<_> = rulesets.iter().flat_map(|rs| rs.chains.iter()).collect();
    let mut out = Vec::new();
    for t in &live.tables {
        if !want.tables.contains(t) {
            out.push(format!("unexpected table {} (family {})", t.1, t.0));
        }
    }
    for t in &want.tables {
        if !live.tables.contains(t) {
            out.push(format!("table {} (family {}) is missing", t.1, t.0));
        }
    }
    let same = |a: &LiveChain, b: &LiveChain| a.family == b.family && a.table == b.table && a.name == b.name;
    for c in &live.chains {
        if !want.chains.iter().any(|w| same(w, c)) {
            out.push(format!("unexpected chain {}", label(c)));
        }
    }
    for (w, intended) in want.chains.iter().zip(intended) {
        let name = label(w);
        let Some(c) = live.chains.iter().find(|c| same(c, w)) else {
            out.push(format!("chain {name} is missing"));
            continue;
        };
        let head = |c: &LiveChain| (c.hook, c.priority, c.policy, c.kind.clone());
        if head(c) != head(w) {
            out.push(format!(
                "chain {name}: hook/priority/policy/type {:?}, intended {:?}",
                head(c),
                head(w)
            ));
        }
        if c.devices != w.devices {
            out.push(format!("chain {name}: devices {:?}, intended {:?}", c.devices, w.devices));
        }
        for (i, want_rule) in w.rules.iter().enumerate() {
            match c.rules.get(i) {
                None => out.push(format!("chain {name} rule {}: missing: {}", i + 1, intended.rules[i])),
                Some(live_rule) if live_rule != want_rule => out.push(format!(
                    "chain {name} rule {}: live {}, intended {} ({})",
                    i + 1,
                    show(live_rule),
                    intended.rules[i],
                    show(want_rule)
                )),
                Some(_) => {}
            }
        }
        for (i, extra) in c.rules.iter().enumerate().skip(w.rules.len()) {
            out.push(format!("chain {name} rule {}: unexpected {}", i + 1, show(extra)));
        }
    }
    out
}

fn show(exprs: &[super::expr::Expr]) -> String {
    exprs.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::super::expr::Expr;
    use super::super::model::ruleset;
    use super::*;
    use cloister_plan::FirewallPlan;

    fn rs() -> Vec<Ruleset> {
        vec![ruleset(&FirewallPlan { tor_uid: Some(101), ..FirewallPlan::default() })]
    }

    #[test]
    fn the_expected_state_has_no_differences() {
        let rs = rs();
        assert_eq!(differences(&rs, &expected(&rs)), Vec::<String>::new());
    }

    #[test]
    fn every_kind_of_change_is_reported() {
        let rs = rs();
        let mut live = expected(&rs);
        live.tables.push((2, "filter".into()));
        live.chains[1].policy = Some(1);
        let out = live.chains.iter_mut().find(|c| c.name == "output").unwrap();
        // tor may now reach 8080 instead of 9030, and an accept-all rule was appended.
        let n = out.rules.len();
        out.rules[n - 2][6] = Expr::Cmp { sreg: 1, op: 0, data: 8080u16.to_be_bytes().to_vec() };
        out.rules.push(vec![Expr::Verdict(1)]);
        live.chains.retain(|c| c.name != "input");
        let d = differences(&rs, &live);
        assert_eq!(d.len(), 5, "{d:#?}");
        assert_eq!(d[0], "unexpected table filter (family 2)");
        assert_eq!(d[1], "chain input is missing");
        assert!(
            d[2].starts_with("chain forward: hook/priority/policy/type (Some(2), Some(0), Some(1)"),
            "{}",
            d[2]
        );
        assert!(d[3].starts_with("chain output rule 13: live ") && d[3].contains("0x1f90"), "{}", d[3]);
        assert!(d[3].contains("intended meta skuid 101 meta l4proto tcp tcp dport 9030 accept"), "{}", d[3]);
        assert_eq!(d[4], "chain output rule 15: unexpected [immediate accept]");
    }

    #[test]
    fn a_missing_rule_is_named() {
        let rs = rs();
        let mut live = expected(&rs);
        live.chains[0].rules.pop();
        let d = differences(&rs, &live);
        assert_eq!(d.len(), 1);
        assert!(d[0].starts_with("chain input rule 6: missing: counter limit rate"), "{}", d[0]);
    }

    #[test]
    fn the_egress_chain_is_checked_with_its_device() {
        let plan = FirewallPlan { tor_uid: Some(101), ..FirewallPlan::default() };
        let both = super::super::model::rulesets(&plan, Some("eth0"));
        let mut live = expected(&both);
        assert_eq!(differences(&both, &live), Vec::<String>::new());
        let egress = live.chains.iter_mut().find(|c| c.name == "egress").unwrap();
        egress.devices.push("eth1".into());
        egress.rules.remove(0);
        let d = differences(&both, &live);
        assert_eq!(d[0], "chain netdev cloister egress: devices [\"eth0\", \"eth1\"], intended [\"eth0\"]");
        assert!(d[1].starts_with("chain netdev cloister egress rule 1: live "), "{d:#?}");
        // The inet table alone is not what the uplink's step meant: the egress table is missing.
        let inet_only = expected(&both[..1]);
        let d = differences(&both, &inet_only);
        assert_eq!(d[0], "table cloister (family 5) is missing", "{d:#?}");
        assert_eq!(d[1], "chain netdev cloister egress is missing", "{d:#?}");
    }
}
