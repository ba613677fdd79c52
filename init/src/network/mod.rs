//! The uplink, after the firewall: the `network` step of stage 2 (loopback up, find the uplink,
//! a random MAC address, IPv6 off, link up, a static address if configured), the DHCPv4 client
//! that PID 1 supervises as a built-in service ([`client`], wire format in [`dhcp`]), the
//! rtnetlink requests both make ([`rtnl`]) and the `network` part of the control socket's
//! `status`. No resolver is configured anywhere: nothing on the appliance resolves names.

pub mod client;
pub mod dhcp;
pub mod rtnl;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cloister_plan::{
    FirewallPlan, Mounts, Namespaces, NetNs, NetworkMode, NetworkPlan, Readiness, Restart, Rlimits, Service,
    UPLINK_AUTO,
};
use serde_json::json;

use rtnl::{Addr, Link, Rtnl, RtnlError};

/// How long "auto" waits for a network interface to appear (its driver may still be probing).
const FIND_WAIT: Duration = Duration::from_secs(3);
/// NIC drivers tried before looking: the virtual machines' and the common physical ones.
const NIC_MODULES: [&str; 3] = ["virtio_net", "e1000", "e1000e"];
/// The built-in DHCP client service's name (its lines read `dhcp: …`).
pub const DHCP_SERVICE: &str = "dhcp";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    Rtnl(#[from] RtnlError),
    #[error("loopback: {0}")]
    Loopback(crate::netns::NetnsError),
    #[error("getrandom for a MAC address: {0}")]
    Random(getrandom::Error),
    #[error("sysctl {path}: {source}")]
    Sysctl { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Refused(String),
}

/// The uplink as the step left it, for `status` and the DHCP client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub randomized: bool,
    pub mode: NetworkMode,
}

/// The `uplink` step: loopback up, the NIC drivers loaded, the uplink found and held down.
/// `Ok(None)` when there is no interface at all (the appliance then simply has no network).
/// The `uplink-firewall` step follows (`firewall::uplink_step`), then the `network` step
/// ([`up_step`]); nothing brings the link up before that firewall is verified.
pub fn find_step(fw: &FirewallPlan, say: &dyn Fn(&str)) -> Result<Option<Link>, NetworkError> {
    guard().map_err(NetworkError::Refused)?;
    if let Ok(dir) = crate::kmod::modules_dir() {
        for name in NIC_MODULES {
            let _ = crate::kmod::load_by_name(&dir, name);
        }
    }
    hold_uplink(fw, say)
}

/// [`find_step`] without loading modules (a host's are not ours to load).
fn hold_uplink(fw: &FirewallPlan, say: &dyn Fn(&str)) -> Result<Option<Link>, NetworkError> {
    guard().map_err(NetworkError::Refused)?;
    crate::netns::loopback_up().map_err(NetworkError::Loopback)?;
    let mut rtnl = Rtnl::open()?;
    let Some(link) = find_uplink(&mut rtnl, &fw.uplink, FIND_WAIT)? else {
        say(&format!("cloister: network: no interface {}; no network", describe(&fw.uplink)));
        return Ok(None);
    };
    // Down whatever came before (firmware, a driver that brings its link up): the uplink's
    // firewall goes in first.
    rtnl.set_up(&link, false)?;
    Ok(Some(link))
}

/// The `network` step, behind the uplink's verified firewall: a random MAC address, IPv6 off,
/// link up, a static address if configured. Anything that fails before the link is up leaves
/// it down.
pub fn up_step(link: Link, net: &NetworkPlan, fw: &FirewallPlan) -> Result<Uplink, NetworkError> {
    guard().map_err(NetworkError::Refused)?;
    let mut rtnl = Rtnl::open()?;
    bring_up(&mut rtnl, link, net, fw.allow_ipv6, Path::new(crate::system::PROC_SYS))
}

fn describe(uplink: &str) -> String {
    if uplink == UPLINK_AUTO {
        "with a MAC address".into()
    } else {
        format!("named {uplink}")
    }
}

/// The configured interface, or with "auto" the first one with a MAC address (lowest index),
/// waiting up to `wait` for it to appear.
pub fn find_uplink(rtnl: &mut Rtnl, uplink: &str, wait: Duration) -> Result<Option<Link>, RtnlError> {
    let deadline = Instant::now() + wait;
    loop {
        let mut links = rtnl.links()?;
        links.sort_by_key(|l| l.index);
        let found = links
            .into_iter()
            .find(|l| !l.loopback && if uplink == UPLINK_AUTO { l.mac.is_some() } else { l.name == uplink });
        if found.is_some() || Instant::now() >= deadline {
            return Ok(found);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// MAC address, IPv6 sysctls, up, static address: in that order, so the link never shows its
/// real MAC address or speaks IPv6.
pub fn bring_up(
    rtnl: &mut Rtnl,
    link: Link,
    net: &NetworkPlan,
    allow_ipv6: bool,
    proc_sys: &Path,
) -> Result<Uplink, NetworkError> {
    rtnl.set_up(&link, false)?;
    let mut mac = link.mac.unwrap_or_default();
    if net.randomize_mac && link.mac.is_some() {
        mac = random_mac()?;
        rtnl.set_mac(&link, mac)?;
    }
    if !allow_ipv6 {
        ipv6_off(proc_sys, &link.name)?;
    }
    rtnl.set_up(&link, true)?;
    if let NetworkMode::Static(s) = net.mode {
        rtnl.replace_address(link.index, Addr { address: s.address, prefix: s.prefix, valid_s: None })?;
        rtnl.replace_default_route(link.index, s.gateway, false)?;
    }
    Ok(Uplink { name: link.name, index: link.index, mac, randomized: net.randomize_mac, mode: net.mode })
}

/// `disable_ipv6 = 1` and `accept_ra = 0` on the link; a kernel without IPv6 has neither.
fn ipv6_off(proc_sys: &Path, name: &str) -> Result<(), NetworkError> {
    let dir = proc_sys.join("net/ipv6/conf").join(name);
    if !dir.exists() {
        return Ok(());
    }
    for (key, value) in [("disable_ipv6", "1"), ("accept_ra", "0")] {
        let path = dir.join(key);
        std::fs::write(&path, value).map_err(|source| NetworkError::Sysctl { path, source })?;
    }
    Ok(())
}

/// A random unicast, locally administered MAC address (02:xx:…, never a vendor's prefix).
pub fn random_mac() -> Result<[u8; 6], NetworkError> {
    let mut mac = [0u8; 6];
    getrandom::fill(&mut mac).map_err(NetworkError::Random)?;
    Ok(local_unicast(mac))
}

fn local_unicast(mut mac: [u8; 6]) -> [u8; 6] {
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The DHCP client as a service of the plan: in the machine's network namespace (where the
/// uplink is), root with CAP_NET_ADMIN (addresses, routes), CAP_NET_BIND_SERVICE (port 68) and
/// CAP_NET_RAW (the packet socket; see [`client`]) only, the last two dropped once its sockets
/// are open; its own mount, pid, ipc and uts namespaces, `no_new_privs`. It retries forever:
/// each run gives up after two minutes without a lease, and the supervisor starts it again.
pub fn dhcp_service(uplink: &Uplink, exe: &Path) -> Service {
    let args = client::DhcpArgs { interface: uplink.name.clone(), mac: uplink.mac };
    let caps: Vec<String> =
        ["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW"].iter().map(|c| c.to_string()).collect();
    Service {
        name: DHCP_SERVICE.into(),
        exec: exe.to_path_buf(),
        args: vec![client::DHCP_ARG.into(), serde_json::to_string(&args).unwrap_or_default()],
        uid: 0,
        gid: 0,
        groups: Vec::new(),
        env: Vec::new(),
        workdir: "/".into(),
        namespaces: Namespaces { mount: true, pid: true, ipc: true, uts: true, net: NetNs::Host },
        mounts: Mounts::default(),
        caps_bounding: caps.clone(),
        caps_ambient: caps,
        no_new_privs: true,
        rlimits: Rlimits { nproc: None, nofile: Some(64), address_space: None, core: Some(0) },
        after: Vec::new(),
        ready: Readiness::Started,
        restart: Restart { initial_delay_ms: 1000, ..Restart::default() },
        terminal: None,
    }
}

/// The `network` object of `status`: the uplink, its MAC address, its IPv4 address as the
/// kernel has it now and when that ends (the DHCP lease is the address's kernel lifetime).
pub fn status(uplink: Option<&Uplink>) -> serde_json::Value {
    let Some(up) = uplink else {
        return json!({"uplink": null, "lease": "none"});
    };
    let addrs = Rtnl::open().and_then(|mut r| r.addresses(up.index)).unwrap_or_default();
    let first = addrs.first();
    let lease = match (up.mode, first) {
        (NetworkMode::Static(_), _) => json!("static"),
        (NetworkMode::Dhcp, Some(Addr { valid_s: Some(s), .. })) => json!({"expires_in_s": s}),
        (NetworkMode::Dhcp, _) => json!("none"),
    };
    json!({
        "uplink": up.name,
        "mac": mac_text(up.mac),
        "mac_randomized": up.randomized,
        "mode": if matches!(up.mode, NetworkMode::Static(_)) { "static" } else { "dhcp" },
        "address": first.map(|a| format!("{}/{}", a.address, a.prefix)),
        "lease": lease,
    })
}

/// `--network-up <plan.json>`, for host tests in a namespace they made.
pub const UP_ARG: &str = "--network-up";

/// `--network-up <plan.json>`: stage 2 from the `firewall` step to the `network` step in the
/// current network namespace, as PID 1 runs them (the inet table; the uplink found and held
/// down; both tables naming it; MAC, IPv6, up, a static address), but without loading modules
/// (host-global) or starting the DHCP client. Prints each step, then one JSON line with what
/// `status` would show (`firewall`, `network`); exits 0 when every step passed, 1 when one
/// failed (the link then stays down), 2 on bad usage.
pub fn run_mode(plan: Option<&String>) -> ! {
    let Some(path) = plan else {
        eprintln!("usage: cloister-init {UP_ARG} <plan.json>");
        std::process::exit(2)
    };
    let plan = match cloister_plan::Plan::load(Path::new(path)) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("cloister-init: {e}");
            std::process::exit(2)
        }
    };
    let say = |s: &str| println!("{s}");
    let mut steps = crate::system::Steps::new(say);
    let fw = &plan.firewall;
    let timed = |t: crate::firewall::Timing| say(&format!("firewall: {t}"));
    let mut uplink_name = None;
    let mut uplink = None;
    let ok = steps.run("firewall", || crate::firewall::apply_and_verify(fw, None).map(timed)).is_ok()
        && match steps.run("uplink", || hold_uplink(fw, &say)) {
            Ok(Some(link)) => {
                uplink_name = Some(link.name.clone());
                let name = link.name.clone();
                steps
                    .run("uplink-firewall", || crate::firewall::apply_and_verify(fw, Some(&name)).map(timed))
                    .is_ok()
                    && steps
                        .run("network", || up_step(link, &plan.network, fw))
                        .map(|u| uplink = Some(u))
                        .is_ok()
            }
            Ok(None) => true,
            Err(_) => false,
        };
    let status = json!({
        "firewall": crate::firewall::status(fw, uplink_name.as_deref()),
        "network": status(uplink.as_ref()),
    });
    println!("{status}");
    std::process::exit(if ok { 0 } else { 1 })
}

/// Refuses to change the host's own network from a test: the same rule as the firewall's
/// guard (PID 1's namespace only on an appliance).
pub fn guard() -> Result<(), String> {
    let id = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    let own = id("/proc/self/ns/net").map_err(|e| format!("/proc/self/ns/net: {e}"))?;
    // PID 1's namespace may be unreadable (a container); one pinned by `ip netns` is a test's.
    let named = || {
        std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| std::fs::metadata(e.path()).is_ok_and(|m| (m.dev(), m.ino()) == own))
    };
    let machine = id("/proc/1/ns/net").map_or_else(|_| !named(), |pid1| pid1 == own);
    if machine && !crate::cmdline::Cmdline::read().is_appliance() {
        return Err(format!(
            "refusing to change the host's network: this is its own namespace and the kernel command line lacks {}",
            cloister_proto::CMDLINE_APPLIANCE
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_macs_are_local_unicast() {
        assert_eq!(local_unicast([0xff; 6]), [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(local_unicast([0x00; 6])[0], 0x02);
        for _ in 0..64 {
            let mac = random_mac().unwrap();
            assert_eq!(mac[0] & 0x01, 0, "multicast bit set: {}", mac_text(mac));
            assert_eq!(mac[0] & 0x02, 0x02, "not locally administered: {}", mac_text(mac));
        }
        assert_ne!(random_mac().unwrap(), random_mac().unwrap());
        assert_eq!(mac_text([2, 0xab, 0, 1, 2, 3]), "02:ab:00:01:02:03");
    }

    #[test]
    fn ipv6_off_writes_both_keys_and_skips_a_kernel_without_ipv6() {
        let dir = tempfile::tempdir().unwrap();
        ipv6_off(dir.path(), "eth0").unwrap();
        let conf = dir.path().join("net/ipv6/conf/eth0");
        std::fs::create_dir_all(&conf).unwrap();
        ipv6_off(dir.path(), "eth0").unwrap();
        assert_eq!(std::fs::read_to_string(conf.join("disable_ipv6")).unwrap(), "1");
        assert_eq!(std::fs::read_to_string(conf.join("accept_ra")).unwrap(), "0");
    }

    #[test]
    fn the_dhcp_service_holds_only_network_capabilities() {
        let up = Uplink {
            name: "eth0".into(),
            index: 2,
            mac: [2, 0, 0, 0, 0, 1],
            randomized: true,
            mode: NetworkMode::Dhcp,
        };
        let svc = dhcp_service(&up, Path::new("/usr/lib/cloister/init"));
        assert_eq!(svc.args[0], client::DHCP_ARG);
        let args: client::DhcpArgs = serde_json::from_str(&svc.args[1]).unwrap();
        assert_eq!(args, client::DhcpArgs { interface: "eth0".into(), mac: [2, 0, 0, 0, 0, 1] });
        assert_eq!(svc.caps_bounding, ["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW"]);
        assert!(svc.no_new_privs && svc.namespaces.mount && svc.namespaces.pid);
        assert_eq!(svc.namespaces.net, NetNs::Host);
    }

    #[test]
    fn status_without_an_uplink_says_none() {
        assert_eq!(status(None), json!({"uplink": null, "lease": "none"}));
    }

    #[test]
    fn this_test_process_may_not_change_the_host_network() {
        if !crate::cmdline::Cmdline::read().is_appliance() {
            assert!(guard().is_err());
        }
    }
}
