//! The firewall steps of stage 2 (`firewall`, then `uplink-firewall` once the uplink is
//! known): nf_tables programmed over nfnetlink with no `nft` binary. It owns the rulesets
//! generated from the plan ([`model`]), the kernel's expressions ([`expr`]),
//! the wire ([`nfnl`]), applying and reading back ([`kernel`]) and the comparison ([`verify`]).
//! Fail closed: any error or difference is an error, and stage 2 then starts no service.

mod expr;
mod kernel;
mod model;
mod nfnl;
mod verify;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use cloister_plan::{ChatFirewallPlan, FirewallPlan, Plan};

use crate::cmdline::Cmdline;

/// Hidden argv modes for host tests, run inside a test's network namespace: apply the plan's
/// rulesets and verify them, or only verify what is live against them. With a device after the
/// plan, both tables as the `uplink-firewall` step has them; without, the `firewall` step's.
pub const APPLY_ARG: &str = "--firewall-apply";
pub const VERIFY_ARG: &str = "--firewall-verify";
/// `--firewall-apply-chat <plan.json> <pinned namespace>`: the chat namespace's ruleset, applied
/// from outside as PID 1 does it.
pub const APPLY_CHAT_ARG: &str = "--firewall-apply-chat";

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("refusing to program the host's firewall: this is the host's network namespace and the kernel command line lacks {}", cloister_proto::CMDLINE_APPLIANCE)]
    HostNamespace,
    #[error("cannot compare network namespaces: {path}: {source}")]
    Namespace { path: &'static str, source: std::io::Error },
    #[error("apply: {0}")]
    Apply(nfnl::NfnlError),
    #[error("read back: {0}")]
    ReadBack(nfnl::NfnlError),
    #[error("live ruleset differs from the intended one: {}", .0.join("; "))]
    Mismatch(Vec<String>),
    #[error("enter or leave a network namespace: {0}")]
    Enter(nix::Error),
}

/// How long the two kernel round trips took.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub apply: Duration,
    pub read_back: Duration,
}

/// `apply 3.1 ms, read back 0.9 ms`: the console line after each firewall step.
impl std::fmt::Display for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        write!(f, "apply {:.1} ms, read back {:.1} ms", ms(self.apply), ms(self.read_back))
    }
}

/// Where `ip netns` pins named namespaces.
const NAMED_NETNS_DIR: &str = "/run/netns";

/// Where this process's network namespace stands, for the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Netns {
    /// Not PID 1's: a namespace some test or service made.
    Other,
    /// PID 1's: the machine's own.
    Pid1s,
    /// PID 1's namespace cannot be read (a container without ptrace rights) and ours is not a
    /// named one either: assume the machine's own.
    Unknown,
    /// PID 1's cannot be read, but ours is pinned under /run/netns by `ip netns`.
    Named,
}

/// The pure decision of the host-safety guard: a batch may go to the machine's own namespace
/// only on an appliance.
fn may_program(netns: Netns, cmdline: &Cmdline) -> bool {
    match netns {
        Netns::Other | Netns::Named => true,
        Netns::Pid1s | Netns::Unknown => cmdline.is_appliance(),
    }
}

fn current_netns() -> Result<Netns, FirewallError> {
    let id = |path: &Path| std::fs::metadata(path).map(|m| (m.dev(), m.ino()));
    let own = id(Path::new("/proc/self/ns/net"))
        .map_err(|source| FirewallError::Namespace { path: "/proc/self/ns/net", source })?;
    if let Ok(pid1) = id(Path::new("/proc/1/ns/net")) {
        return Ok(if pid1 == own { Netns::Pid1s } else { Netns::Other });
    }
    let named = std::fs::read_dir(NAMED_NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| id(&entry.path()).is_ok_and(|pinned| pinned == own));
    Ok(if named { Netns::Named } else { Netns::Unknown })
}

/// Asked before every batch.
fn guard() -> Result<(), FirewallError> {
    if may_program(current_netns()?, &Cmdline::read()) {
        Ok(())
    } else {
        Err(FirewallError::HostNamespace)
    }
}

/// Applies the plan's rulesets in one batch, reads them back and compares: the `inet` table
/// alone while `uplink` is `None` (the `firewall` step), else the `inet` table naming the
/// uplink and the uplink's egress table (the `uplink-firewall` step), the old tables staying
/// live until the new ones are in.
pub fn apply_and_verify(plan: &FirewallPlan, uplink: Option<&str>) -> Result<Timing, FirewallError> {
    let rulesets = model::rulesets(plan, uplink);
    guard()?;
    let start = Instant::now();
    kernel::apply(&rulesets).map_err(FirewallError::Apply)?;
    let applied = Instant::now();
    let live = kernel::read_back(&names(&rulesets)).map_err(FirewallError::ReadBack)?;
    let timing = Timing { apply: applied - start, read_back: applied.elapsed() };
    check(&model::intended(plan, &rulesets), &live)?;
    Ok(timing)
}

fn names(rulesets: &[model::Ruleset]) -> Vec<(u8, &str)> {
    rulesets.iter().map(|rs| (rs.family, rs.table.as_str())).collect()
}

/// Applies the `chat` namespace's ruleset inside the namespace pinned at `pin` and verifies it
/// there. The caller (PID 1, single-threaded) enters that namespace and always comes back. The
/// guard: `pin` must be a namespace other than the one we are in, which a test's or the
/// machine's own never is.
pub fn apply_chat_namespace(pin: &Path, plan: &ChatFirewallPlan) -> Result<(), FirewallError> {
    use nix::sched::{setns, CloneFlags};
    use std::os::fd::AsFd;
    let open = |path: &'static str| {
        std::fs::File::open(path).map_err(|source| FirewallError::Namespace { path, source })
    };
    let own = open("/proc/self/ns/net")?;
    let target = std::fs::File::open(pin)
        .map_err(|source| FirewallError::Namespace { path: "chat namespace", source })?;
    let id = |f: &std::fs::File| f.metadata().map(|m| (m.dev(), m.ino()));
    let same = id(&own).ok().is_some_and(|o| id(&target).is_ok_and(|t| t == o));
    if same {
        return Err(FirewallError::HostNamespace);
    }
    let rs = [model::chat_ruleset(plan)];
    setns(target.as_fd(), CloneFlags::CLONE_NEWNET).map_err(FirewallError::Enter)?;
    let result = kernel::apply(&rs)
        .map_err(FirewallError::Apply)
        .and_then(|()| kernel::read_back(&names(&rs)).map_err(FirewallError::ReadBack))
        .and_then(|live| check(&rs, &live));
    let back = setns(own.as_fd(), CloneFlags::CLONE_NEWNET).map_err(FirewallError::Enter);
    result.and(back)
}

/// Compares what is live with the plan's rulesets (as [`apply_and_verify`] would have applied
/// them), changing nothing.
pub fn verify_live(plan: &FirewallPlan, uplink: Option<&str>) -> Result<(), FirewallError> {
    let rulesets = model::rulesets(plan, uplink);
    let live = kernel::read_back(&names(&rulesets)).map_err(FirewallError::ReadBack)?;
    check(&model::intended(plan, &rulesets), &live)
}

fn check(rulesets: &[model::Ruleset], live: &kernel::Live) -> Result<(), FirewallError> {
    let diff = verify::differences(rulesets, live);
    if diff.is_empty() {
        Ok(())
    } else {
        Err(FirewallError::Mismatch(diff))
    }
}

/// The `firewall` object of the control socket's `status`, read afresh: whether the live
/// rulesets are still exactly the intended ones (a change made behind PID 1's back shows here),
/// which tables and uplink they are, and the packets each chain counted on its way to a drop.
pub fn status(plan: &FirewallPlan, uplink: Option<&str>) -> serde_json::Value {
    use serde_json::json;
    let rulesets = model::rulesets(plan, uplink);
    let tables: Vec<String> = rulesets
        .iter()
        .map(|rs| format!("{} {}", if rs.family == model::FAMILY_INET { "inet" } else { "netdev" }, rs.table))
        .collect();
    let live = match kernel::read_back(&names(&rulesets)) {
        Ok(live) => live,
        Err(e) => return json!({"state": format!("read back: {e}"), "tables": tables}),
    };
    let diff = verify::differences(&model::intended(plan, &rulesets), &live);
    let state =
        if diff.is_empty() { "verified".to_string() } else { format!("differs: {}", diff.join("; ")) };
    let dropped: serde_json::Map<String, serde_json::Value> =
        live.chains.iter().map(|c| (c.name.clone(), json!(c.counted.iter().sum::<u64>()))).collect();
    json!({
        "state": state,
        "tables": tables,
        "uplink": uplink,
        "egress": uplink.map(|dev| json!({"device": dev})),
        "dropped_packets": dropped,
    })
}

/// Modules the ruleset needs (with their dependencies from modules.dep). Loaded here by
/// `finit_module` because the kernel's own autoload runs `/sbin/modprobe` once per missing
/// expression, each a fresh process: 2.4 s of a TCG boot.
const MODULES: [&str; 5] = ["nf_tables", "nft_ct", "nft_limit", "nft_log", "nf_log_syslog"];

/// Stage 2's firewall step; an error holds every service back. A module that fails to load is
/// not an error by itself: if the ruleset then cannot be applied or read back, that is.
pub fn firewall_step(plan: &FirewallPlan) -> Result<Timing, String> {
    if let Ok(dir) = crate::kmod::modules_dir() {
        for name in MODULES {
            let _ = crate::kmod::load_by_name(&dir, name);
        }
    }
    apply_and_verify(plan, None).map_err(|e| e.to_string())
}

/// Stage 2's `uplink-firewall` step, once the uplink is found and while it is still down: the
/// `inet` table again, now naming the uplink, and the uplink's egress table, in one batch,
/// read back and compared. An error keeps the uplink down and holds every service back.
pub fn uplink_step(plan: &FirewallPlan, uplink: &str) -> Result<Timing, String> {
    apply_and_verify(plan, Some(uplink)).map_err(|e| e.to_string())
}

/// `--firewall-apply|--firewall-verify <plan.json> [uplink]` in the current network namespace
/// (or `--firewall-apply-chat <plan.json> <pin>` in the pinned one); prints the outcome and
/// exits 0 on success, 1 on failure, 2 on bad usage.
pub fn run_mode(mode: &str, plan: Option<&String>, extra: Option<&String>) -> ! {
    let Some(path) = plan else {
        eprintln!("usage: cloister-init {mode} <plan.json> [uplink]");
        std::process::exit(2)
    };
    let plan = match Plan::load(Path::new(path)) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("cloister-init: {e}");
            std::process::exit(2)
        }
    };
    let uplink = extra.map(String::as_str);
    let result = if mode == APPLY_CHAT_ARG {
        match (plan.chat.as_ref().and_then(|c| c.firewall.as_ref()), extra) {
            (Some(fw), Some(pin)) => apply_chat_namespace(Path::new(pin), fw)
                .map(|()| "firewall: chat namespace applied and verified".into()),
            _ => {
                eprintln!("usage: cloister-init {mode} <plan.json with chat.firewall> <pinned namespace>");
                std::process::exit(2)
            }
        }
    } else if mode == APPLY_ARG {
        apply_and_verify(&plan.firewall, uplink).map(|t| {
            format!(
                "firewall: applied and verified (apply {} us, read back {} us)",
                t.apply.as_micros(),
                t.read_back.as_micros()
            )
        })
    } else {
        verify_live(&plan.firewall, uplink).map(|()| "firewall: verified".to_string())
    };
    match result {
        Ok(line) => {
            println!("{line}");
            std::process::exit(0)
        }
        Err(e) => {
            println!("firewall: {e}");
            std::process::exit(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_refuses_the_host_namespace_without_the_appliance_flag() {
        let host = Cmdline::parse("BOOT_IMAGE=/vmlinuz root=/dev/sda1");
        let appliance = Cmdline::parse("console=ttyS0 cloister.appliance");
        assert!(!may_program(Netns::Pid1s, &host));
        assert!(!may_program(Netns::Unknown, &host));
        assert!(may_program(Netns::Pid1s, &appliance));
        assert!(may_program(Netns::Other, &host));
        assert!(may_program(Netns::Named, &host));
    }

    #[test]
    fn this_test_process_may_not_program_its_namespace() {
        // The unit tests run in the host's namespace (as PID 1's): the real guard must refuse,
        // unless this host itself was booted as an appliance.
        if !Cmdline::read().is_appliance() && guard().is_err() {
            assert!(matches!(
                apply_and_verify(&FirewallPlan::default(), None),
                Err(FirewallError::HostNamespace)
            ));
        }
    }
}
