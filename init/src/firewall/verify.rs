//! Intended against live: what PID 1 meant to apply, in the shape the kernel reports it, and
//! every difference said in words. Any difference keeps the services from starting.

use super::kernel::{Live, LiveChain, CHAIN_KIND, PRIORITY};
use super::model::{Ruleset, FAMILY_INET};

/// The live state that `rs` should produce when it is the only table.
pub fn expected(rs: &Ruleset) -> Live {
    Live {
        tables: vec![(FAMILY_INET, rs.table.clone())],
        chains: rs
            .chains
            .iter()
            .map(|c| LiveChain {
                name: c.name.into(),
                hook: Some(c.hook as u32),
                priority: Some(PRIORITY),
                policy: Some(c.policy.code()),
                kind: Some(CHAIN_KIND.into()),
                rules: c.rules.iter().map(|r| r.lower()).collect(),
            })
            .collect(),
    }
}

/// Every way `live` differs from what `rs` means, in order; empty when they agree.
pub fn differences(rs: &Ruleset, live: &Live) -> Vec<String> {
    let want = expected(rs);
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
    for c in &live.chains {
        if !want.chains.iter().any(|w| w.name == c.name) {
            out.push(format!("unexpected chain {}", c.name));
        }
    }
    for (w, intended) in want.chains.iter().zip(&rs.chains) {
        let Some(c) = live.chains.iter().find(|c| c.name == w.name) else {
            out.push(format!("chain {} is missing", w.name));
            continue;
        };
        let head = |c: &LiveChain| (c.hook, c.priority, c.policy, c.kind.clone());
        if head(c) != head(w) {
            out.push(format!(
                "chain {}: hook/priority/policy/type {:?}, intended {:?}",
                w.name,
                head(c),
                head(w)
            ));
        }
        for (i, want_rule) in w.rules.iter().enumerate() {
            match c.rules.get(i) {
                None => out.push(format!("chain {} rule {}: missing: {}", w.name, i + 1, intended.rules[i])),
                Some(live_rule) if live_rule != want_rule => out.push(format!(
                    "chain {} rule {}: live {}, intended {} ({})",
                    w.name,
                    i + 1,
                    show(live_rule),
                    intended.rules[i],
                    show(want_rule)
                )),
                Some(_) => {}
            }
        }
        for (i, extra) in c.rules.iter().enumerate().skip(w.rules.len()) {
            out.push(format!("chain {} rule {}: unexpected {}", w.name, i + 1, show(extra)));
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

    fn rs() -> Ruleset {
        ruleset(&FirewallPlan { tor_uid: Some(101), ..FirewallPlan::default() })
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
}
