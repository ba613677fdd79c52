//! The service plan: what stage 2 of PID 1 runs, resolved at build time from `cloister.toml`
//! against the image's own passwd, group and files. Users' names became numeric ids, paths are
//! absolute and checked to exist in the image, and the `after` graph is known to be acyclic, so
//! PID 1 trusts the plan's shape and only fails on what the running system can break.
//!
//! The builder writes it as JSON to [`PLAN_PATH`]; the sandbox launcher gets one [`Service`] as a
//! JSON argument.
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod accounts;

/// Where the plan lives on the root filesystem.
pub const PLAN_PATH: &str = "/etc/cloister/plan.json";
/// The one directory that holds all state the appliance learns at run time.
pub const STATE_DIR: &str = "/var/lib/cloister";
/// Runtime directory of PID 1 (control socket, named network namespaces).
pub const RUN_DIR: &str = "/run/cloister";
/// The control socket's path inside the run directory: in a directory of its own, which
/// sshd's namespace binds for the admin CLI.
pub const CONTROL_SOCKET: &str = "admin/control";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The hostname every namespace sees: generic, the same on every appliance.
    pub hostname: String,
    /// Seconds since the epoch when the image was built: the clock never starts earlier.
    pub build_time_unix: u64,
    /// Uids allowed on the control socket besides root.
    pub admin_uids: Vec<u32>,
    /// In start order: every service comes after all services it names in `after`.
    pub services: Vec<Service>,
    /// What the firewall lets through; plans written before it existed get the default.
    #[serde(default)]
    pub firewall: FirewallPlan,
    /// How the uplink gets its address; plans written before it existed get the default.
    #[serde(default)]
    pub network: NetworkPlan,
    /// The onion chat's pieces PID 1 looks after; `None` when the image has no sshd.
    #[serde(default)]
    pub chat: Option<ChatPlan>,
}

/// What PID 1 does for the onion chat besides running its services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatPlan {
    /// The chat users' group: only its members may use the session socket.
    pub gid: u32,
    /// sshd's ed25519 host key, made on first boot if missing (root, 0600).
    pub ssh_host_key: PathBuf,
    /// tor's `hostname` file of the onion service, shown on the console once it exists.
    pub onion_hostname: PathBuf,
    /// The IRC client `chat` starts, when the image carries one.
    #[serde(default)]
    pub client: Option<ChatClient>,
    /// The chat namespace's own firewall, when the image has the IRC gateway and server.
    #[serde(default)]
    pub firewall: Option<ChatFirewallPlan>,
    /// Chat and admin accounts, for the admin tools; `None`: accounts are fixed at build time.
    #[serde(default)]
    pub accounts: Option<accounts::AccountsPlan>,
    /// Chat users without a second factor (TOTP) must enrol one at their next login.
    #[serde(default)]
    pub require_totp: bool,
}

/// Who may connect where inside the `chat` network namespace: only the gateway's uid (and root,
/// whose readiness checks connect) to the IRC server's port; chat users' processes (their
/// group) only to the gateway's port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatFirewallPlan {
    pub gateway_uid: u32,
    pub gateway_port: u16,
    pub server_port: u16,
    pub chat_gid: u32,
}

/// What PID 1 needs to start a chat user's IRC client (irssi) in its sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatClient {
    pub exec: PathBuf,
    /// Everything the client's root view holds besides the user's home: the program, its
    /// libraries (with the symlinks leading to them), terminfo and irssi's help and themes.
    pub files: Vec<PathBuf>,
    /// The files it may execute: the program and its ELF interpreter.
    pub executables: Vec<PathBuf>,
    /// Chat users' homes are `<homes>/<login>`.
    pub homes: PathBuf,
    /// Where it connects: the IRC gateway in the chat namespace.
    pub server: SocketAddr,
}

/// PID 1's socket for the restricted shell (one connection per login session).
pub const SESSION_DIR: &str = "/run/cloister/sessions";
pub const SESSION_SOCKET: &str = "/run/cloister/sessions/socket";

/// The uplink's configuration, checked at build time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkPlan {
    pub mode: NetworkMode,
    /// A fresh locally administered MAC address on every boot, set before the link comes up.
    pub randomize_mac: bool,
}

impl Default for NetworkPlan {
    fn default() -> Self {
        Self { mode: NetworkMode::Dhcp, randomize_mac: true }
    }
}

/// DHCPv4 by PID 1's own client, or a fixed address and default route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum NetworkMode {
    Dhcp,
    Static(StaticIpv4),
}

/// A static IPv4 configuration: the gateway lies inside `address/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticIpv4 {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

/// The firewall's inputs, resolved at build time: the one uid that may leave the machine and
/// where to. Everything else is dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FirewallPlan {
    /// The tor user's uid; `None`: no process may open a connection to the outside.
    pub tor_uid: Option<u32>,
    /// TCP ports tor may connect to (its `ReachableAddresses`).
    pub relay_ports: Vec<u16>,
    /// The uplink interface's name, or [`UPLINK_AUTO`]: any interface but loopback.
    pub uplink: String,
    /// IPv6 on the uplink: dropped unless set.
    pub allow_ipv6: bool,
    /// Accept the DHCPv4 client's traffic (udp 68 -> 67 out, 67 -> 68 in) on the uplink.
    pub dhcp: bool,
    /// Test images only (`cloister-build --test-break-firewall-check`, recorded in the
    /// manifest): PID 1 expects one rule more than it applies, so the read-back comparison
    /// fails and the image must fail closed. Absent from production plans.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub test_break_verify: bool,
}

/// [`FirewallPlan::uplink`] when the uplink is whichever interface the network finds.
pub const UPLINK_AUTO: &str = "auto";
/// Tor's usual relay ports: OR and directory ports on the common and the classic numbers.
pub const DEFAULT_RELAY_PORTS: [u16; 4] = [80, 443, 9001, 9030];

impl Default for FirewallPlan {
    fn default() -> Self {
        Self {
            tor_uid: None,
            relay_ports: DEFAULT_RELAY_PORTS.to_vec(),
            uplink: UPLINK_AUTO.into(),
            allow_ipv6: false,
            dhcp: true,
            test_break_verify: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    /// Absolute path of the executable inside the image.
    pub exec: PathBuf,
    /// argv[1..].
    pub args: Vec<String>,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// The whole environment the service gets, in order.
    pub env: Vec<(String, String)>,
    pub workdir: PathBuf,
    pub namespaces: Namespaces,
    pub mounts: Mounts,
    /// Capability names as in capabilities(7) (`CAP_NET_BIND_SERVICE`).
    pub caps_bounding: Vec<String>,
    pub caps_ambient: Vec<String>,
    pub no_new_privs: bool,
    pub rlimits: Rlimits,
    /// Services that must be ready before this one starts.
    pub after: Vec<String>,
    pub ready: Readiness,
    pub restart: Restart,
    /// Runs with this terminal as its stdin and stdout (stderr stays the journal's pipe):
    /// PID 1's own console login for admins. Services from the config never have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespaces {
    pub mount: bool,
    pub pid: bool,
    pub ipc: bool,
    pub uts: bool,
    pub net: NetNs,
}

/// Which network namespace a service runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetNs {
    /// The machine's own: where the uplink is (only tor belongs here).
    Host,
    /// Loopback only, shared by the chat services.
    Chat,
}

impl NetNs {
    pub fn name(self) -> &'static str {
        match self {
            NetNs::Host => "host",
            NetNs::Chat => "chat",
        }
    }
}

/// The service's view of the file system when `namespaces.mount` is set: the root file system
/// read-only, a fresh /proc, a minimal /dev, empty tmpfs on /tmp and /run, and these on top.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mounts {
    /// Bound read-write at the same path.
    pub writable: Vec<PathBuf>,
    /// Empty tmpfs mounted here (directories that exist in the image).
    pub tmpfs: Vec<PathBuf>,
    /// Bound read-only at the same path: things not on the root file system (tests, mostly).
    pub read_only: Vec<PathBuf>,
    /// A private devpts instance (/dev/pts, /dev/ptmx): the service allocates terminals.
    #[serde(default)]
    pub devpts: bool,
    /// When set, the root view is an empty tmpfs holding only these paths of the root file
    /// system (read-only, with the symlinks that lead to them) instead of the whole of it, and
    /// no /tmp or /run: the chat client's sandbox, which has nothing else to run or read.
    #[serde(default)]
    pub only: Option<Vec<PathBuf>>,
    /// When non-empty, a landlock ruleset (where the kernel has landlock) lets the service
    /// execute only these files and change files only under `writable` and /dev.
    #[serde(default)]
    pub executables: Vec<PathBuf>,
}

/// `None` keeps the inherited limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimits {
    pub nproc: Option<u64>,
    pub nofile: Option<u64>,
    pub address_space: Option<u64>,
    pub core: Option<u64>,
}

/// When a started service counts as ready (its dependents may start).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Readiness {
    /// As soon as it is started.
    Started,
    /// A TCP connection to this address (inside the service's network namespace) is accepted.
    Tcp(SocketAddr),
    /// A connection to this unix socket (inside the service's mount namespace) is accepted.
    Unix(PathBuf),
    /// This path exists (inside the service's mount namespace).
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Restart {
    /// The first restart waits this long; each further one twice as long, up to `max_delay_ms`.
    pub initial_delay_ms: u64,
    pub max_delay_ms: u64,
    /// This many exits within `window_ms` make a crash loop: the service is marked failed.
    pub max_exits: u32,
    pub window_ms: u64,
    /// Running this long resets the delay to `initial_delay_ms`.
    pub stable_ms: u64,
    /// How long the service may take to become ready before it counts as failed to start.
    pub ready_timeout_ms: u64,
    /// Between SIGTERM and SIGKILL when stopping.
    pub stop_grace_ms: u64,
}

impl Default for Restart {
    fn default() -> Self {
        Self {
            initial_delay_ms: 250,
            max_delay_ms: 30_000,
            max_exits: 5,
            window_ms: 60_000,
            stable_ms: 30_000,
            ready_timeout_ms: 60_000,
            stop_grace_ms: 5_000,
        }
    }
}

impl Default for Namespaces {
    fn default() -> Self {
        Self { mount: true, pid: true, ipc: true, uts: true, net: NetNs::Chat }
    }
}

impl Default for Rlimits {
    fn default() -> Self {
        Self { nproc: None, nofile: Some(1024), address_space: None, core: Some(0) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("service {name}: {source}")]
    Service { name: String, source: serde_json::Error },
}

impl Plan {
    pub fn load(path: &Path) -> Result<Self, PlanError> {
        let text = std::fs::read(path).map_err(|source| PlanError::Read { path: path.into(), source })?;
        serde_json::from_slice(&text).map_err(|source| PlanError::Parse { path: path.into(), source })
    }

    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }
}

impl Service {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<Self, PlanError> {
        serde_json::from_str(text).map_err(|source| PlanError::Service { name: "<argument>".into(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Service {
        Service {
            name: "ngircd".into(),
            exec: "/usr/sbin/ngircd".into(),
            args: vec!["--nodaemon".into()],
            uid: 39,
            gid: 39,
            groups: vec![],
            env: vec![("PATH".into(), "/usr/bin".into())],
            workdir: "/".into(),
            namespaces: Namespaces::default(),
            mounts: Mounts::default(),
            caps_bounding: vec![],
            caps_ambient: vec![],
            no_new_privs: true,
            rlimits: Rlimits::default(),
            after: vec![],
            ready: Readiness::Tcp("127.0.0.1:6667".parse().unwrap()),
            restart: Restart::default(),
            terminal: None,
        }
    }

    #[test]
    fn service_round_trips_through_json() {
        let s = sample();
        assert_eq!(Service::from_json(&s.to_json()).unwrap(), s);
    }

    #[test]
    fn plans_without_a_firewall_section_get_the_default() {
        let old = r#"{"hostname":"localhost","build_time_unix":1,"admin_uids":[],"services":[]}"#;
        let plan: Plan = serde_json::from_str(old).unwrap();
        assert_eq!(plan.firewall, FirewallPlan::default());
        assert_eq!(plan.firewall.tor_uid, None);
        assert_eq!(plan.network, NetworkPlan::default());
        assert_eq!(plan.chat, None);
        let back: Plan = serde_json::from_str(&plan.to_json()).unwrap();
        assert_eq!(back, plan);
    }

    #[test]
    fn network_modes_read_as_written() {
        let fixed = NetworkPlan {
            mode: NetworkMode::Static(StaticIpv4 {
                address: Ipv4Addr::new(10, 0, 0, 2),
                prefix: 24,
                gateway: Ipv4Addr::new(10, 0, 0, 1),
            }),
            randomize_mac: false,
        };
        let text = serde_json::to_string(&fixed).unwrap();
        assert!(text.contains(r#""static":{"address":"10.0.0.2""#), "{text}");
        assert_eq!(serde_json::from_str::<NetworkPlan>(&text).unwrap(), fixed);
        let dhcp: NetworkPlan = serde_json::from_str(r#"{"mode":"dhcp"}"#).unwrap();
        assert_eq!(dhcp, NetworkPlan::default());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut v: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        v["surprise"] = 1.into();
        assert!(Service::from_json(&v.to_string()).is_err());
    }
}
