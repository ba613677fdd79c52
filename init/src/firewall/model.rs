//! The ruleset as data: what the firewall means, generated from the plan by [`ruleset`] without
//! touching the kernel, and lowered to the expressions the kernel stores ([`Rule::lower`]).

use std::fmt;

use cloister_plan::{ChatFirewallPlan, FirewallPlan, UPLINK_AUTO};

use super::expr::{self, Expr, BASE_TRANSPORT, CMP_EQ, CMP_NEQ, CT_STATE, REG_1};

/// The one table the appliance has.
pub const TABLE: &str = "cloister";
/// `NFPROTO_INET`: one table for IPv4 and IPv6.
pub const FAMILY_INET: u8 = 1;
/// Log prefix of dropped DNS queries.
pub const DNS_PREFIX: &str = "cloister-dns: ";
/// Ten log lines a minute at most per rule, in bursts of five: a flood cannot fill the journal.
pub const LOG_LIMIT: Limit = Limit { per_minute: 10, burst: 5 };
/// `IFNAMSIZ`: interface names are compared as 16 zero-padded bytes, as `nft` writes them.
const IFNAMSIZ: usize = 16;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const NFPROTO_IPV6: u8 = 10;
const META_IIFNAME: u32 = 6;
const META_OIFNAME: u32 = 7;
const META_SKUID: u32 = 10;
const META_SKGID: u32 = 11;
const META_NFPROTO: u32 = 15;
const META_L4PROTO: u32 = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub table: String,
    pub chains: Vec<Chain>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: &'static str,
    pub hook: Hook,
    pub policy: Verdict,
    pub rules: Vec<Rule>,
}

/// Base chain hooks, as `NF_INET_*` numbers; every chain is `type filter priority 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Input = 1,
    Forward = 2,
    Output = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
}

/// Matches, then an optional counter, rate-limited log line and verdict, in that order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub counter: bool,
    pub log: Option<Log>,
    pub verdict: Option<Verdict>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    Iifname(String),
    Oifname(String),
    Ipv6,
    /// Any of these conntrack states.
    CtState(Vec<ConnState>),
    Skuid(u32),
    Skgid(u32),
    /// `meta l4proto`; the port matches below need it before them.
    Tcp,
    Udp,
    Sport(u16),
    Dport(u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    Invalid = 1,
    Established = 2,
    Related = 4,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    pub prefix: String,
    pub limit: Limit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub per_minute: u64,
    pub burst: u32,
}

impl Rule {
    fn new(matches: Vec<Match>) -> Self {
        Self { matches, ..Self::default() }
    }

    fn then(mut self, v: Verdict) -> Self {
        self.verdict = Some(v);
        self
    }

    fn counted(mut self) -> Self {
        self.counter = true;
        self
    }

    fn logged(mut self, prefix: &str) -> Self {
        self.log = Some(Log { prefix: prefix.into(), limit: LOG_LIMIT });
        self
    }

    /// The kernel's expressions for this rule, in the order `nft` would write them.
    pub fn lower(&self) -> Vec<Expr> {
        let mut out = Vec::new();
        for m in &self.matches {
            m.lower(&mut out);
        }
        if self.counter {
            out.push(Expr::Counter);
        }
        if let Some(log) = &self.log {
            out.push(Expr::Limit { rate: log.limit.per_minute, unit: 60, burst: log.limit.burst });
            out.push(Expr::Log { prefix: log.prefix.clone(), level: expr::LOG_LEVEL_WARNING });
        }
        if let Some(v) = self.verdict {
            out.push(Expr::Verdict(v.code()));
        }
        out
    }
}

impl Match {
    fn lower(&self, out: &mut Vec<Expr>) {
        let meta = |key| Expr::Meta { key, dreg: REG_1 };
        let eq = |data: Vec<u8>| Expr::Cmp { sreg: REG_1, op: CMP_EQ, data };
        let port = |offset| Expr::Payload { dreg: REG_1, base: BASE_TRANSPORT, offset, len: 2 };
        match self {
            Match::Iifname(name) => out.extend([meta(META_IIFNAME), eq(ifname(name))]),
            Match::Oifname(name) => out.extend([meta(META_OIFNAME), eq(ifname(name))]),
            Match::Ipv6 => out.extend([meta(META_NFPROTO), eq(vec![NFPROTO_IPV6])]),
            Match::Skuid(uid) => out.extend([meta(META_SKUID), eq(uid.to_ne_bytes().to_vec())]),
            Match::Skgid(gid) => out.extend([meta(META_SKGID), eq(gid.to_ne_bytes().to_vec())]),
            Match::Tcp => out.extend([meta(META_L4PROTO), eq(vec![IPPROTO_TCP])]),
            Match::Udp => out.extend([meta(META_L4PROTO), eq(vec![IPPROTO_UDP])]),
            Match::Sport(p) => out.extend([port(0), eq(p.to_be_bytes().to_vec())]),
            Match::Dport(p) => out.extend([port(2), eq(p.to_be_bytes().to_vec())]),
            Match::CtState(states) => {
                // ct state is a host-endian bit mask; "any of" is (state & mask) != 0.
                let mask: u32 = states.iter().map(|s| *s as u32).fold(0, |a, b| a | b);
                out.extend([
                    Expr::Ct { dreg: REG_1, key: CT_STATE },
                    Expr::Bitwise {
                        sreg: REG_1,
                        dreg: REG_1,
                        len: 4,
                        mask: mask.to_ne_bytes().to_vec(),
                        xor: vec![0; 4],
                    },
                    Expr::Cmp { sreg: REG_1, op: CMP_NEQ, data: vec![0; 4] },
                ]);
            }
        }
    }
}

fn ifname(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.resize(IFNAMSIZ, 0);
    v
}

impl Verdict {
    pub fn code(self) -> i32 {
        match self {
            Verdict::Accept => expr::NF_ACCEPT,
            Verdict::Drop => expr::NF_DROP,
        }
    }
}

/// The appliance's ruleset: everything is dropped but loopback, replies, the DHCP client on
/// the uplink and tor's connections to relay ports. DNS is counted, logged and dropped before
/// anything could accept it; IPv6 is dropped unless the plan allows it.
pub fn ruleset(plan: &FirewallPlan) -> Ruleset {
    use Match::*;
    use Verdict::*;
    let uplink = (plan.uplink != UPLINK_AUTO).then_some(plan.uplink.as_str());
    let on = |dir: fn(String) -> Match| uplink.map(|u| dir(u.to_string())).into_iter();
    let mut input = vec![Rule::new(vec![Iifname("lo".into())]).then(Accept)];
    let mut output = vec![Rule::new(vec![Oifname("lo".into())]).then(Accept)];
    if !plan.allow_ipv6 {
        input.push(Rule::new(vec![Ipv6]).counted().then(Drop));
        output.push(Rule::new(vec![Ipv6]).counted().then(Drop));
    }
    for chain in [&mut input, &mut output] {
        chain.push(Rule::new(vec![CtState(vec![ConnState::Invalid])]).then(Drop));
        chain.push(Rule::new(vec![CtState(vec![ConnState::Established, ConnState::Related])]).then(Accept));
    }
    if plan.dhcp {
        let dhcp = |dir: fn(String) -> Match, from: u16, to: u16| {
            Rule::new(on(dir).chain([Udp, Sport(from), Dport(to)]).collect()).then(Accept)
        };
        input.push(dhcp(Iifname, 67, 68));
        output.push(dhcp(Oifname, 68, 67));
    }
    // The log rule gives no verdict (over its rate limit it stops matching), so the drop
    // rule after it catches every query, logged or not, before tor's accepts.
    for l4 in [Udp, Tcp] {
        output.push(Rule::new(vec![l4.clone(), Dport(53)]).counted().logged(DNS_PREFIX));
        output.push(Rule::new(vec![l4, Dport(53)]).then(Drop));
    }
    if let Some(uid) = plan.tor_uid {
        for &port in &plan.relay_ports {
            output.push(Rule::new(vec![Skuid(uid), Tcp, Dport(port)]).then(Accept));
        }
    }
    // No verdict: the chain's drop policy drops what the log line reports.
    input.push(Rule::default().counted().logged("cloister-drop-in: "));
    output.push(Rule::default().counted().logged("cloister-drop-out: "));
    let forward = vec![Rule::default().counted().logged("cloister-drop-fwd: ")];
    let chain = |name, hook, rules| Chain { name, hook, policy: Drop, rules };
    Ruleset {
        table: TABLE.into(),
        chains: vec![
            chain("input", Hook::Input, input),
            chain("forward", Hook::Forward, forward),
            chain("output", Hook::Output, output),
        ],
    }
}

/// The `chat` namespace's ruleset. It has loopback only, so only `output` matters, and only
/// for two kinds of connection: the IRC server's port takes new ones from the gateway's uid and
/// root (PID 1's readiness checks) alone, so nothing reaches ngircd unfiltered; chat users'
/// processes (irssi, and sshd's session processes) may open new ones only to the gateway. Our
/// services are otherwise unaffected (policy accept).
pub fn chat_ruleset(plan: &ChatFirewallPlan) -> Ruleset {
    use Match::*;
    use Verdict::*;
    let mut output =
        vec![Rule::new(vec![CtState(vec![ConnState::Established, ConnState::Related])]).then(Accept)];
    for uid in [plan.gateway_uid, 0] {
        output.push(Rule::new(vec![Skuid(uid), Tcp, Dport(plan.server_port)]).then(Accept));
    }
    output.push(Rule::new(vec![Tcp, Dport(plan.server_port)]).counted().then(Drop));
    output.push(Rule::new(vec![Skgid(plan.chat_gid), Tcp, Dport(plan.gateway_port)]).then(Accept));
    output.push(Rule::new(vec![Skgid(plan.chat_gid)]).counted().then(Drop));
    Ruleset {
        table: TABLE.into(),
        chains: vec![Chain { name: "output", hook: Hook::Output, policy: Accept, rules: output }],
    }
}

/// nft syntax, for people reading an error.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut words: Vec<String> = Vec::new();
        let mut l4 = "th";
        for m in &self.matches {
            words.push(match m {
                Match::Iifname(n) => format!("iifname {n:?}"),
                Match::Oifname(n) => format!("oifname {n:?}"),
                Match::Ipv6 => "meta nfproto ipv6".into(),
                Match::CtState(s) => {
                    let names: Vec<String> = s.iter().map(|s| format!("{s:?}").to_lowercase()).collect();
                    format!("ct state {}", names.join(","))
                }
                Match::Skuid(uid) => format!("meta skuid {uid}"),
                Match::Skgid(gid) => format!("meta skgid {gid}"),
                Match::Tcp => {
                    l4 = "tcp";
                    "meta l4proto tcp".into()
                }
                Match::Udp => {
                    l4 = "udp";
                    "meta l4proto udp".into()
                }
                Match::Sport(p) => format!("{l4} sport {p}"),
                Match::Dport(p) => format!("{l4} dport {p}"),
            });
        }
        if self.counter {
            words.push("counter".into());
        }
        if let Some(log) = &self.log {
            let Limit { per_minute, burst } = log.limit;
            words.push(format!(
                "limit rate {per_minute}/minute burst {burst} packets log prefix {:?}",
                log.prefix
            ));
        }
        match self.verdict {
            Some(Verdict::Accept) => words.push("accept".into()),
            Some(Verdict::Drop) => words.push("drop".into()),
            None => {}
        }
        write!(f, "{}", words.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> FirewallPlan {
        FirewallPlan { tor_uid: Some(101), ..FirewallPlan::default() }
    }

    fn texts(rs: &Ruleset, chain: &str) -> Vec<String> {
        let c = rs.chains.iter().find(|c| c.name == chain).unwrap();
        c.rules.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn default_plan_gives_the_documented_ruleset() {
        let rs = ruleset(&plan());
        assert_eq!(rs.table, "cloister");
        let names: Vec<_> = rs.chains.iter().map(|c| (c.name, c.hook, c.policy)).collect();
        assert_eq!(
            names,
            [
                ("input", Hook::Input, Verdict::Drop),
                ("forward", Hook::Forward, Verdict::Drop),
                ("output", Hook::Output, Verdict::Drop)
            ]
        );
        let out = texts(&rs, "output");
        let dns = "dport 53 counter limit rate 10/minute burst 5 packets log prefix \"cloister-dns: \"";
        assert_eq!(
            out,
            [
                "oifname \"lo\" accept".to_string(),
                "meta nfproto ipv6 counter drop".into(),
                "ct state invalid drop".into(),
                "ct state established,related accept".into(),
                "meta l4proto udp udp sport 68 udp dport 67 accept".into(),
                format!("meta l4proto udp udp {dns}"),
                "meta l4proto udp udp dport 53 drop".into(),
                format!("meta l4proto tcp tcp {dns}"),
                "meta l4proto tcp tcp dport 53 drop".into(),
                "meta skuid 101 meta l4proto tcp tcp dport 80 accept".into(),
                "meta skuid 101 meta l4proto tcp tcp dport 443 accept".into(),
                "meta skuid 101 meta l4proto tcp tcp dport 9001 accept".into(),
                "meta skuid 101 meta l4proto tcp tcp dport 9030 accept".into(),
                "counter limit rate 10/minute burst 5 packets log prefix \"cloister-drop-out: \"".into(),
            ]
        );
        let input = texts(&rs, "input");
        assert_eq!(input[0], "iifname \"lo\" accept");
        assert_eq!(input[4], "meta l4proto udp udp sport 67 udp dport 68 accept");
        assert_eq!(input.len(), 6);
        assert_eq!(texts(&rs, "forward").len(), 1);
    }

    #[test]
    fn chat_namespace_keeps_users_on_the_gateway_and_the_server_for_it() {
        let plan =
            ChatFirewallPlan { gateway_uid: 111, gateway_port: 6667, server_port: 6668, chat_gid: 2000 };
        let rs = chat_ruleset(&plan);
        assert_eq!(rs.table, "cloister");
        let names: Vec<_> = rs.chains.iter().map(|c| (c.name, c.hook, c.policy)).collect();
        assert_eq!(names, [("output", Hook::Output, Verdict::Accept)]);
        assert_eq!(
            texts(&rs, "output"),
            [
                "ct state established,related accept",
                "meta skuid 111 meta l4proto tcp tcp dport 6668 accept",
                "meta skuid 0 meta l4proto tcp tcp dport 6668 accept",
                "meta l4proto tcp tcp dport 6668 counter drop",
                "meta skgid 2000 meta l4proto tcp tcp dport 6667 accept",
                "meta skgid 2000 counter drop",
            ]
        );
    }

    #[test]
    fn dns_is_dropped_before_tor_could_be_accepted() {
        let rs = ruleset(&FirewallPlan { relay_ports: vec![53, 443], ..plan() });
        let out = texts(&rs, "output");
        let tor = out.iter().position(|r| r.contains("skuid")).unwrap();
        for l4 in ["udp", "tcp"] {
            let drop =
                out.iter().position(|r| r == &format!("meta l4proto {l4} {l4} dport 53 drop")).unwrap();
            assert!(drop < tor, "{out:#?}");
        }
    }

    #[test]
    fn plan_switches_change_the_rules() {
        let rs = ruleset(&FirewallPlan {
            tor_uid: None,
            allow_ipv6: true,
            dhcp: false,
            uplink: "eth0".into(),
            ..plan()
        });
        let out = texts(&rs, "output");
        assert!(!out.iter().any(|r| r.contains("skuid") || r.contains("ipv6") || r.contains("sport 68")));
        let rs = ruleset(&FirewallPlan { uplink: "eth0".into(), relay_ports: vec![9001], ..plan() });
        let out = texts(&rs, "output");
        assert!(out.contains(&"oifname \"eth0\" meta l4proto udp udp sport 68 udp dport 67 accept".into()));
        assert_eq!(out.iter().filter(|r| r.contains("skuid 101")).count(), 1);
        let input = texts(&rs, "input");
        assert!(input.contains(&"iifname \"eth0\" meta l4proto udp udp sport 67 udp dport 68 accept".into()));
    }

    #[test]
    fn lowering_matches_nft_encoding() {
        let rule = Rule::new(vec![Match::Iifname("lo".into())]).then(Verdict::Accept);
        let e = rule.lower();
        assert_eq!(e.len(), 3);
        assert_eq!(
            e[1],
            Expr::Cmp { sreg: REG_1, op: CMP_EQ, data: b"lo\0\0\0\0\0\0\0\0\0\0\0\0\0\0".to_vec() }
        );
        let ct = Rule::new(vec![Match::CtState(vec![ConnState::Established, ConnState::Related])]).lower();
        assert!(matches!(&ct[1], Expr::Bitwise { mask, .. } if mask == &6u32.to_ne_bytes().to_vec()));
        let dport = Rule::new(vec![Match::Tcp, Match::Dport(443)]).lower();
        assert_eq!(dport[3], Expr::Cmp { sreg: REG_1, op: CMP_EQ, data: vec![1, 187] });
    }
}
