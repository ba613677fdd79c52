//! The ruleset as data: what the firewall means, generated from the plan without touching the
//! kernel ([`ruleset`]: the `inet` table; [`egress_ruleset`]: the `netdev` table on the uplink;
//! [`rulesets`]: what is meant to be live, before and after the uplink is known), and lowered to
//! the expressions the kernel stores ([`Rule::lower`]).

use std::fmt;

use cloister_plan::{ChatFirewallPlan, FirewallPlan, UPLINK_AUTO};

use super::expr::{self, Expr, BASE_LINK, BASE_TRANSPORT, CMP_EQ, CMP_NEQ, CT_STATE, REG_1};

/// The appliance's table name, in each family it has one in.
pub const TABLE: &str = "cloister";
/// `NFPROTO_INET`: one table for IPv4 and IPv6.
pub const FAMILY_INET: u8 = 1;
/// `NFPROTO_NETDEV`: the uplink's own table, whose egress hook sees every frame the device
/// sends, packet sockets' too.
pub const FAMILY_NETDEV: u8 = 5;
/// Log prefix of the test-only rule that a plan with `test_break_verify` expects but never
/// applies (see [`intended`]).
pub const TEST_BREAK_PREFIX: &str = "cloister-test-break-verify: ";
/// Log prefix of dropped DNS queries.
pub const DNS_PREFIX: &str = "cloister-dns: ";
/// Ten log lines a minute at most per rule, in bursts of five: a flood cannot fill the journal.
pub const LOG_LIMIT: Limit = Limit { per_minute: 10, burst: 5 };
/// `IFNAMSIZ`: interface names are compared as 16 zero-padded bytes, as `nft` writes them.
const IFNAMSIZ: usize = 16;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const NFPROTO_IPV6: u8 = 10;
/// Ethertypes (`ETH_P_*`).
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// Where an Ethernet header holds its ethertype.
const ETHERTYPE_OFFSET: u32 = 12;
const META_PROTOCOL: u32 = 1;
const META_IIFNAME: u32 = 6;
const META_OIFNAME: u32 = 7;
const META_SKUID: u32 = 10;
const META_SKGID: u32 = 11;
const META_NFPROTO: u32 = 15;
const META_L4PROTO: u32 = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// `NFPROTO_*`: [`FAMILY_INET`] or [`FAMILY_NETDEV`].
    pub family: u8,
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

/// Base chain hooks; every chain is `type filter priority 0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hook {
    Input,
    Forward,
    Output,
    /// The netdev family's egress hook on the named device.
    Egress(String),
}

impl Hook {
    /// `NF_INET_*` or `NF_NETDEV_*`.
    pub fn number(&self) -> u32 {
        match self {
            Hook::Input => 1,
            Hook::Forward => 2,
            Hook::Output => 3,
            Hook::Egress(_) => 1,
        }
    }

    /// The device a netdev chain is bound to.
    pub fn device(&self) -> Option<&str> {
        match self {
            Hook::Egress(dev) => Some(dev),
            _ => None,
        }
    }
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
    /// `meta protocol`: the ethertype the kernel gave the packet (`skb->protocol`), which
    /// decides how the netdev family parses it.
    Protocol(u16),
    /// The ethertype in the frame's own Ethernet header: what the wire will show. A packet
    /// socket may claim one `skb->protocol` and write another header, so netdev rules check
    /// both.
    EtherType(u16),
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
            Match::Protocol(t) => out.extend([meta(META_PROTOCOL), eq(t.to_be_bytes().to_vec())]),
            Match::EtherType(t) => out.extend([
                Expr::Payload { dreg: REG_1, base: BASE_LINK, offset: ETHERTYPE_OFFSET, len: 2 },
                eq(t.to_be_bytes().to_vec()),
            ]),
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
        family: FAMILY_INET,
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
        family: FAMILY_INET,
        table: TABLE.into(),
        chains: vec![Chain { name: "output", hook: Hook::Output, policy: Accept, rules: output }],
    }
}

/// The uplink's `netdev` table: one chain on its egress hook, policy drop, letting out only
/// ARP, the DHCP client's requests (udp 68 -> 67, when the plan has DHCP) and TCP to the relay
/// ports (when a tor uid may leave at all; over IPv6 too only when the plan allows IPv6);
/// everything else is counted and dropped. The `inet` table already decides which process may
/// send what; this one sits below every socket, so a raw or packet socket (which the inet
/// hooks never see) can send nothing the inet table would have refused by kind: no DNS, no
/// NTP, no IPv6, no frame of another ethertype.
pub fn egress_ruleset(plan: &FirewallPlan, device: &str) -> Ruleset {
    use Match::*;
    use Verdict::*;
    let ip = |ethertype| [Protocol(ethertype), EtherType(ethertype)];
    let mut rules = vec![Rule::new(vec![EtherType(ETH_P_ARP)]).then(Accept)];
    if plan.dhcp {
        let m = ip(ETH_P_IP).into_iter().chain([Udp, Sport(68), Dport(67)]).collect();
        rules.push(Rule::new(m).then(Accept));
    }
    let families: &[u16] = if plan.allow_ipv6 { &[ETH_P_IP, ETH_P_IPV6] } else { &[ETH_P_IP] };
    if plan.tor_uid.is_some() {
        for &ethertype in families {
            for &port in &plan.relay_ports {
                let m = ip(ethertype).into_iter().chain([Tcp, Dport(port)]).collect();
                rules.push(Rule::new(m).then(Accept));
            }
        }
    }
    rules.push(Rule::default().counted().then(Drop));
    Ruleset {
        family: FAMILY_NETDEV,
        table: TABLE.into(),
        chains: vec![Chain { name: "egress", hook: Hook::Egress(device.into()), policy: Drop, rules }],
    }
}

/// What should be live in the machine's namespace: before the uplink is known (the `firewall`
/// step) the `inet` table alone, as the plan says; once it is known (the `uplink-firewall`
/// step) the `inet` table with the uplink's name in its DHCP rules and the uplink's egress
/// table, applied together in one batch.
pub fn rulesets(plan: &FirewallPlan, uplink: Option<&str>) -> Vec<Ruleset> {
    match uplink {
        None => vec![ruleset(plan)],
        Some(dev) => {
            let named = FirewallPlan { uplink: dev.into(), ..plan.clone() };
            vec![ruleset(&named), egress_ruleset(plan, dev)]
        }
    }
}

/// What the live rulesets are compared with: `applied` itself, except that a test image's plan
/// (`test_break_verify`, from the builder's `--test-break-firewall-check`) expects one more
/// rule than was applied. The apply, the read-back and the comparison stay the real ones, so a
/// boot of that image shows what any difference does: no service starts, the uplink stays down.
pub fn intended(plan: &FirewallPlan, applied: &[Ruleset]) -> Vec<Ruleset> {
    let mut out = applied.to_vec();
    if plan.test_break_verify {
        let output = out.iter_mut().flat_map(|rs| rs.chains.iter_mut()).find(|c| c.hook == Hook::Output);
        if let Some(chain) = output {
            chain.rules.push(Rule::default().counted().logged(TEST_BREAK_PREFIX));
        }
    }
    out
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
                Match::Protocol(t) => format!("meta protocol {}", ethertype_name(*t)),
                Match::EtherType(t) => format!("ether type {}", ethertype_name(*t)),
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

fn ethertype_name(t: u16) -> String {
    match t {
        ETH_P_IP => "ip".into(),
        ETH_P_ARP => "arp".into(),
        ETH_P_IPV6 => "ip6".into(),
        other => format!("{other:#06x}"),
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
        let names: Vec<_> = rs.chains.iter().map(|c| (c.name, c.hook.clone(), c.policy)).collect();
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
        let names: Vec<_> = rs.chains.iter().map(|c| (c.name, c.hook.clone(), c.policy)).collect();
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
    fn the_egress_table_lets_out_arp_dhcp_and_relay_ports_only() {
        let rs = egress_ruleset(&plan(), "eth0");
        assert_eq!((rs.family, rs.table.as_str()), (FAMILY_NETDEV, "cloister"));
        let names: Vec<_> = rs.chains.iter().map(|c| (c.name, c.hook.clone(), c.policy)).collect();
        assert_eq!(names, [("egress", Hook::Egress("eth0".into()), Verdict::Drop)]);
        let ip = "meta protocol ip ether type ip meta l4proto";
        assert_eq!(
            texts(&rs, "egress"),
            [
                "ether type arp accept".to_string(),
                format!("{ip} udp udp sport 68 udp dport 67 accept"),
                format!("{ip} tcp tcp dport 80 accept"),
                format!("{ip} tcp tcp dport 443 accept"),
                format!("{ip} tcp tcp dport 9001 accept"),
                format!("{ip} tcp tcp dport 9030 accept"),
                "counter drop".into(),
            ]
        );
        // A static address needs no DHCP; no tor, no TCP; IPv6 only when allowed.
        let rs = egress_ruleset(&FirewallPlan { dhcp: false, tor_uid: None, ..plan() }, "eth0");
        assert_eq!(texts(&rs, "egress"), ["ether type arp accept", "counter drop"]);
        let rs = egress_ruleset(&FirewallPlan { allow_ipv6: true, relay_ports: vec![443], ..plan() }, "e");
        let out = texts(&rs, "egress");
        assert!(
            out.contains(&"meta protocol ip6 ether type ip6 meta l4proto tcp tcp dport 443 accept".into())
        );
        assert_eq!(out.len(), 5, "{out:#?}");
        let arp = &rs.chains[0].rules[0].lower();
        assert_eq!(arp[0], Expr::Payload { dreg: REG_1, base: BASE_LINK, offset: 12, len: 2 });
        assert_eq!(arp[1], Expr::Cmp { sreg: REG_1, op: CMP_EQ, data: vec![0x08, 0x06] });
    }

    #[test]
    fn once_the_uplink_is_known_both_tables_name_it() {
        let before = rulesets(&plan(), None);
        assert_eq!(before, [ruleset(&plan())]);
        let after = rulesets(&plan(), Some("enp1s0"));
        assert_eq!(after.len(), 2);
        assert_eq!((after[0].family, after[1].family), (FAMILY_INET, FAMILY_NETDEV));
        assert!(texts(&after[0], "output")
            .contains(&"oifname \"enp1s0\" meta l4proto udp udp sport 68 udp dport 67 accept".into()));
        assert!(texts(&after[0], "input")
            .contains(&"iifname \"enp1s0\" meta l4proto udp udp sport 67 udp dport 68 accept".into()));
        assert_eq!(after[1].chains[0].hook, Hook::Egress("enp1s0".into()));
    }

    #[test]
    fn only_a_test_plan_expects_a_rule_that_is_never_applied() {
        let applied = rulesets(&plan(), None);
        assert_eq!(intended(&plan(), &applied), applied);
        let broken = FirewallPlan { test_break_verify: true, ..plan() };
        let want = intended(&broken, &applied);
        let out = texts(&want[0], "output");
        assert_eq!(out.len(), texts(&applied[0], "output").len() + 1);
        assert!(out.last().unwrap().contains(TEST_BREAK_PREFIX), "{out:#?}");
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
