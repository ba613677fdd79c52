//! `[services.<name>]`: the services PID 1 runs, as the user writes them. This module owns their
//! shape, their defaults, how a user's tables merge over the shipped ones, and every check that
//! needs no image (names, paths, capabilities, limits, the `after` graph). What needs the image
//! (users, executables, mount points) is checked when the builder resolves them into a
//! `cloister_plan::Plan`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cloister_plan::{NetNs, Readiness};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::caps::CAPABILITIES;

/// Services by name, in the order the config lists them (shipped ones first).
pub type Services = IndexMap<String, ServiceConfig>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// `false` drops the service (a shipped one included).
    pub enabled: bool,
    /// Required when enabled; optional so that `enabled = false` alone is a whole table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exec: Option<PathBuf>,
    pub args: Vec<String>,
    /// Required when enabled: no service runs as root by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `None`: the user's primary group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub groups: Vec<String>,
    /// `KEY=VALUE`, the whole environment, in order.
    pub env: Vec<String>,
    pub workdir: PathBuf,
    pub netns: NetNs,
    pub namespaces: NamespacesConfig,
    pub writable: Vec<PathBuf>,
    pub tmpfs: Vec<PathBuf>,
    pub read_only: Vec<PathBuf>,
    /// A private devpts instance on /dev/pts and /dev/ptmx, for a service that hands out
    /// terminals (sshd).
    pub devpts: bool,
    pub caps_bounding: Vec<String>,
    pub caps_ambient: Vec<String>,
    pub no_new_privs: bool,
    pub rlimits: RlimitsConfig,
    pub after: Vec<String>,
    pub ready: Ready,
    pub restart: RestartConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespacesConfig {
    pub mount: bool,
    pub pid: bool,
    pub ipc: bool,
    pub uts: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RlimitsConfig {
    /// `None` keeps the inherited limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nproc: Option<u64>,
    pub nofile: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_space_mib: Option<u64>,
    pub core: u64,
}

/// The plan's own type: every field is optional in the file (`#[serde(default)]` there).
pub type RestartConfig = cloister_plan::Restart;

/// Readiness as written: `started`, `tcp:127.0.0.1:6667`, `unix:/path` or `file:/path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ready(pub Readiness);

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            exec: None,
            args: Vec::new(),
            user: None,
            group: None,
            groups: Vec::new(),
            env: Vec::new(),
            workdir: PathBuf::from("/"),
            netns: NetNs::Chat,
            namespaces: NamespacesConfig::default(),
            writable: Vec::new(),
            tmpfs: Vec::new(),
            read_only: Vec::new(),
            devpts: false,
            caps_bounding: Vec::new(),
            caps_ambient: Vec::new(),
            no_new_privs: true,
            rlimits: RlimitsConfig::default(),
            after: Vec::new(),
            ready: Ready(Readiness::Started),
            restart: RestartConfig::default(),
        }
    }
}

impl Default for NamespacesConfig {
    fn default() -> Self {
        Self { mount: true, pid: true, ipc: true, uts: true }
    }
}

impl Default for RlimitsConfig {
    fn default() -> Self {
        Self { nproc: None, nofile: 1024, address_space_mib: None, core: 0 }
    }
}

impl RlimitsConfig {
    /// Largest `address_space_mib`; keeps the byte count far from overflowing.
    pub const MAX_ADDRESS_SPACE_MIB: u64 = 1 << 30;

    pub fn to_plan(self) -> cloister_plan::Rlimits {
        cloister_plan::Rlimits {
            nproc: self.nproc,
            nofile: Some(self.nofile),
            address_space: self.address_space_mib.map(|m| m.min(Self::MAX_ADDRESS_SPACE_MIB) << 20),
            core: Some(self.core),
        }
    }
}

impl ServiceConfig {
    /// The plan's namespaces: the four booleans plus the named network namespace.
    pub fn plan_namespaces(&self) -> cloister_plan::Namespaces {
        let n = self.namespaces;
        cloister_plan::Namespaces { mount: n.mount, pid: n.pid, ipc: n.ipc, uts: n.uts, net: self.netns }
    }

    /// `env` split at the first `=` (validated entries always have one).
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .filter_map(|e| e.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

impl TryFrom<String> for Ready {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let expected = "expected \"started\", \"tcp:127.0.0.1:6667\", \"unix:/path\" or \"file:/path\"";
        if text == "started" {
            return Ok(Ready(Readiness::Started));
        }
        if let Some(addr) = text.strip_prefix("tcp:") {
            let addr: SocketAddr =
                addr.parse().map_err(|_| format!("{addr:?} is not an address like 127.0.0.1:6667"))?;
            if addr.port() == 0 {
                return Err(format!("{addr}: port 0 is not a port one can connect to"));
            }
            return Ok(Ready(Readiness::Tcp(addr)));
        }
        if let Some(path) = text.strip_prefix("unix:") {
            check_path(Path::new(path))?;
            return Ok(Ready(Readiness::Unix(path.into())));
        }
        if let Some(path) = text.strip_prefix("file:") {
            check_path(Path::new(path))?;
            return Ok(Ready(Readiness::File(path.into())));
        }
        Err(format!("{text:?}: {expected}"))
    }
}

impl From<Ready> for String {
    fn from(r: Ready) -> String {
        match r.0 {
            Readiness::Started => "started".into(),
            Readiness::Tcp(addr) => format!("tcp:{addr}"),
            Readiness::Unix(p) => format!("unix:{}", p.display()),
            Readiness::File(p) => format!("file:{}", p.display()),
        }
    }
}

/// The services an image gets without a config; `default.toml` shows the same. Start order
/// follows `after`: ngircd, ircgate, sshd, bridge, tor (tor publishes the onion service last,
/// once everything behind it answers).
pub fn default_services() -> Services {
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let paths = |v: &[&str]| v.iter().map(PathBuf::from).collect::<Vec<_>>();
    let tcp = |port| Ready(Readiness::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
    let ngircd = ServiceConfig {
        exec: Some("/usr/sbin/ngircd".into()),
        args: strings(&["--nodaemon", "--config", "/etc/ngircd/ngircd.conf"]),
        user: Some("irc".into()),
        ready: tcp(6668),
        ..ServiceConfig::default()
    };
    let ircgate = ServiceConfig {
        exec: Some("/usr/lib/cloister/ircgate".into()),
        args: strings(&[
            "--listen",
            "127.0.0.1:6667",
            "--upstream",
            "127.0.0.1:6668",
            "--server-name",
            "irc.cloister",
        ]),
        user: Some("cloister-ircgate".into()),
        after: strings(&["ngircd"]),
        ready: tcp(6667),
        ..ServiceConfig::default()
    };
    let sshd = ServiceConfig {
        exec: Some("/usr/sbin/sshd".into()),
        args: strings(&["-D", "-e", "-f", "/etc/ssh/sshd_config"]),
        user: Some("root".into()),
        tmpfs: paths(&["/run/sshd"]),
        read_only: paths(&["/run/cloister/sessions", "/run/cloister/admin"]),
        devpts: true,
        // CAP_AUDIT_WRITE: Debian's sshd (built with Linux audit) ends a session whose login
        // record the kernel refuses.
        caps_bounding: strings(&[
            "CAP_AUDIT_WRITE",
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_FOWNER",
            "CAP_KILL",
            "CAP_NET_BIND_SERVICE",
            "CAP_SETGID",
            "CAP_SETUID",
            "CAP_SYS_CHROOT",
        ]),
        after: strings(&["ircgate"]),
        ready: tcp(22),
        ..ServiceConfig::default()
    };
    let bridge = ServiceConfig {
        exec: Some("/usr/lib/cloister/bridge".into()),
        args: strings(&["--listen", "/var/lib/cloister/bridge/ssh.sock", "--connect", "127.0.0.1:22"]),
        user: Some("cloister-bridge".into()),
        writable: paths(&["/var/lib/cloister/bridge"]),
        after: strings(&["sshd"]),
        ready: Ready(Readiness::Unix("/var/lib/cloister/bridge/ssh.sock".into())),
        ..ServiceConfig::default()
    };
    let tor = ServiceConfig {
        exec: Some("/usr/bin/tor".into()),
        args: strings(&["-f", "/etc/cloister/torrc", "--defaults-torrc", "/dev/null"]),
        user: Some("debian-tor".into()),
        groups: strings(&["cloister-bridge"]),
        netns: NetNs::Host,
        writable: paths(&["/var/lib/cloister/tor"]),
        rlimits: RlimitsConfig { nofile: 8192, ..RlimitsConfig::default() },
        after: strings(&["bridge"]),
        ready: Ready(Readiness::File("/var/lib/cloister/tor/onion-ssh/hostname".into())),
        ..ServiceConfig::default()
    };
    [("ngircd", ngircd), ("ircgate", ircgate), ("sshd", sshd), ("bridge", bridge), ("tor", tor)]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s))
        .collect()
}

/// `user`'s tables replace the shipped ones of the same name as a whole; disabled ones go.
pub fn merge(defaults: Services, user: Services) -> Services {
    let mut out = defaults;
    for (name, service) in user {
        // An existing key keeps its place: a replaced shipped service starts where it did.
        out.insert(name, service);
    }
    out.retain(|_, s| s.enabled);
    out
}

/// A key (`services.<name>.<key>`) and why its value is refused.
pub type Refusal = (String, String);

/// Checks every enabled service, then the `after` graph.
pub fn validate(services: &Services) -> Result<(), Refusal> {
    for (name, s) in services {
        let key = |k: &str| format!("services.{name}.{k}");
        if !is_service_name(name) {
            return Err((
                format!("services.{name}"),
                format!("{name:?} is not a name like [a-z][a-z0-9-]{{0,31}}"),
            ));
        }
        check_service(s).map_err(|(k, why)| (key(k), why))?;
        for dep in &s.after {
            if !services.contains_key(dep) {
                return Err((key("after"), format!("no enabled service {dep:?}")));
            }
        }
    }
    if let Some(cycle) = find_cycle(services) {
        let first = &cycle[0];
        return Err((
            format!("services.{first}.after"),
            format!("dependency cycle {} (each waits for the next)", cycle.join(" -> ")),
        ));
    }
    Ok(())
}

/// One service's values; returns the key below `services.<name>` and the reason.
fn check_service(s: &ServiceConfig) -> Result<(), (&'static str, String)> {
    let exec = s.exec.as_deref().ok_or(("exec", "missing: an enabled service needs an executable".into()))?;
    check_path(exec).map_err(|e| ("exec", e))?;
    if let Some(a) = s.args.iter().find(|a| a.contains('\0')) {
        return Err(("args", format!("{a:?} contains a NUL byte")));
    }
    let user = s.user.as_deref().ok_or(("user", "missing: name the account it runs as".into()))?;
    check_account(user).map_err(|e| ("user", e))?;
    if let Some(g) = &s.group {
        check_account(g).map_err(|e| ("group", e))?;
    }
    s.groups.iter().try_for_each(|g| check_account(g)).map_err(|e| ("groups", e))?;
    first_duplicate(&s.groups).map_or(Ok(()), |d| Err(("groups", format!("{d:?} is listed twice"))))?;
    check_env(&s.env).map_err(|e| ("env", e))?;
    check_path(&s.workdir).map_err(|e| ("workdir", e))?;
    check_mounts(s)?;
    check_caps(s)?;
    check_rlimits(&s.rlimits)?;
    check_restart(&s.restart)?;
    first_duplicate(&s.after).map_or(Ok(()), |d| Err(("after", format!("{d:?} is listed twice"))))?;
    Ok(())
}

fn check_mounts(s: &ServiceConfig) -> Result<(), (&'static str, String)> {
    if s.devpts && !s.namespaces.mount {
        return Err(("devpts", "needs namespaces.mount = true (there is nothing to mount into)".into()));
    }
    let lists = [("writable", &s.writable), ("tmpfs", &s.tmpfs), ("read_only", &s.read_only)];
    let mut seen = HashSet::new();
    for (key, list) in lists {
        if !list.is_empty() && !s.namespaces.mount {
            return Err((key, "needs namespaces.mount = true (there is nothing to mount into)".into()));
        }
        for p in list {
            check_path(p).map_err(|e| (key, e))?;
            if p == Path::new("/") {
                return Err((key, "\"/\" would replace the read-only root".into()));
            }
            if !seen.insert(p) {
                return Err((key, format!("{} is mounted twice", p.display())));
            }
        }
    }
    Ok(())
}

fn check_caps(s: &ServiceConfig) -> Result<(), (&'static str, String)> {
    for (key, list) in [("caps_bounding", &s.caps_bounding), ("caps_ambient", &s.caps_ambient)] {
        if let Some(c) = list.iter().find(|c| !CAPABILITIES.contains(&c.as_str())) {
            return Err((
                key,
                format!("{c:?} is not a capability of capabilities(7) like CAP_NET_BIND_SERVICE"),
            ));
        }
        if let Some(d) = first_duplicate(list) {
            return Err((key, format!("{d:?} is listed twice")));
        }
    }
    if let Some(c) = s.caps_ambient.iter().find(|c| !s.caps_bounding.contains(c)) {
        return Err(("caps_ambient", format!("{c} is not in caps_bounding (ambient is a subset of it)")));
    }
    Ok(())
}

fn check_rlimits(r: &RlimitsConfig) -> Result<(), (&'static str, String)> {
    let range = |key: &'static str, v: u64, lo: u64, hi: u64| {
        if (lo..=hi).contains(&v) {
            Ok(())
        } else {
            Err((key, format!("{v} is outside {lo}..={hi}")))
        }
    };
    if let Some(n) = r.nproc {
        range("rlimits.nproc", n, 1, 4_194_304)?;
    }
    // The kernel's default fs.nr_open caps RLIMIT_NOFILE.
    range("rlimits.nofile", r.nofile, 1, 1_048_576)?;
    if let Some(m) = r.address_space_mib {
        range("rlimits.address_space_mib", m, 16, RlimitsConfig::MAX_ADDRESS_SPACE_MIB)?;
    }
    Ok(())
}

fn check_restart(r: &RestartConfig) -> Result<(), (&'static str, String)> {
    let at_least = |key: &'static str, v: u64, lo: u64| {
        if v >= lo {
            Ok(())
        } else {
            Err((key, format!("{v} is below {lo}")))
        }
    };
    at_least("restart.initial_delay_ms", r.initial_delay_ms, 1)?;
    at_least("restart.max_delay_ms", r.max_delay_ms, r.initial_delay_ms)?;
    at_least("restart.max_exits", u64::from(r.max_exits), 1)?;
    at_least("restart.window_ms", r.window_ms, 1)?;
    at_least("restart.ready_timeout_ms", r.ready_timeout_ms, 1)?;
    // Shutdown waits this long per service: keep power-off bounded.
    if r.stop_grace_ms > 300_000 {
        return Err(("restart.stop_grace_ms", format!("{} is above 300000", r.stop_grace_ms)));
    }
    Ok(())
}

fn check_env(env: &[String]) -> Result<(), String> {
    let mut keys = HashSet::new();
    for entry in env {
        let Some((k, v)) = entry.split_once('=') else {
            return Err(format!("{entry:?} is not KEY=VALUE"));
        };
        let mut chars = k.chars();
        let name_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !name_ok {
            return Err(format!("{k:?} is not a variable name like [A-Za-z_][A-Za-z0-9_]*"));
        }
        if v.contains('\0') {
            return Err(format!("the value of {k} contains a NUL byte"));
        }
        if !keys.insert(k) {
            return Err(format!("{k} is set twice"));
        }
    }
    Ok(())
}

/// A path the image can hold: absolute, no empty, `.` or `..` parts, no trailing slash.
pub fn check_path(path: &Path) -> Result<(), String> {
    let Some(text) = path.to_str() else { return Err(format!("{path:?} is not UTF-8")) };
    let Some(rest) = text.strip_prefix('/') else {
        return Err(format!("{text:?} is not an absolute path"));
    };
    if text.contains('\0') {
        return Err(format!("{text:?} contains a NUL byte"));
    }
    if !rest.is_empty() && rest.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(format!("{text:?} is not a normalised path (no empty, . or .. parts, no trailing /)"));
    }
    Ok(())
}

/// `[a-z][a-z0-9-]{0,31}`: safe in console lines, paths and the control protocol.
pub fn is_service_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 32
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Whether `name` can be a passwd/group name at all; whether it exists is the builder's check.
fn check_account(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.$".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not an account name"))
    }
}

fn first_duplicate(list: &[String]) -> Option<&String> {
    let mut seen = HashSet::new();
    list.iter().find(|x| !seen.insert(x.as_str()))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    OnPath,
    Done,
}

/// The first cycle found walking services in config order, as `a -> b -> a`.
fn find_cycle(services: &Services) -> Option<Vec<String>> {
    let mut marks: HashMap<&str, Mark> = HashMap::new();
    let mut path: Vec<&str> = Vec::new();
    services.keys().find_map(|name| visit(name, services, &mut marks, &mut path))
}

fn visit<'a>(
    name: &'a str,
    services: &'a Services,
    marks: &mut HashMap<&'a str, Mark>,
    path: &mut Vec<&'a str>,
) -> Option<Vec<String>> {
    match marks.get(name) {
        Some(Mark::Done) => return None,
        Some(Mark::OnPath) => {
            let start = path.iter().position(|p| *p == name)?;
            let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
            cycle.push(name.to_string());
            return Some(cycle);
        }
        None => {}
    }
    marks.insert(name, Mark::OnPath);
    path.push(name);
    let deps = services.get(name).map(|s| s.after.as_slice()).unwrap_or_default();
    for dep in deps {
        if let Some((dep, _)) = services.get_key_value(dep.as_str()) {
            if let Some(cycle) = visit(dep, services, marks, path) {
                return Some(cycle);
            }
        }
    }
    path.pop();
    marks.insert(name, Mark::Done);
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Located};

    fn parse(text: &str) -> Result<Config, Located> {
        Config::parse(text, "c.toml")
    }

    fn err(text: &str) -> Located {
        match parse(text) {
            Ok(c) => panic!("expected an error, got {:?}", c.services),
            Err(e) => e,
        }
    }

    const SHIPPED: &[&str] = &["ngircd", "ircgate", "sshd", "bridge", "tor"];
    const IRC: &str = "[services.irc]\nexec = \"/usr/sbin/ngircd\"\nuser = \"irc\"\n";

    #[test]
    fn shipped_services_apply_without_a_services_table() {
        let c = parse("[image]\nsize_mib = 2048\n").unwrap();
        assert_eq!(c.services.keys().collect::<Vec<_>>(), SHIPPED);
        let n = &c.services["ngircd"];
        assert_eq!(n.user.as_deref(), Some("irc"));
        assert_eq!(n.ready.0, Readiness::Tcp("127.0.0.1:6668".parse().unwrap()));
        assert_eq!(c.services["tor"].netns, NetNs::Host);
        // Only tor lives in the machine's network namespace.
        assert!(c.services.iter().all(|(name, s)| (s.netns == NetNs::Host) == (name == "tor")));
        assert_eq!(n.restart, cloister_plan::Restart::default());
    }

    #[test]
    fn minimal_service_gets_every_default() {
        let c = parse(IRC).unwrap();
        assert_eq!(c.services.keys().collect::<Vec<_>>(), [SHIPPED, &["irc"]].concat());
        let s = &c.services["irc"];
        let expected = ServiceConfig {
            exec: Some("/usr/sbin/ngircd".into()),
            user: Some("irc".into()),
            ..ServiceConfig::default()
        };
        assert_eq!(s, &expected);
        assert_eq!(s.workdir, Path::new("/"));
        assert_eq!(s.plan_namespaces(), cloister_plan::Namespaces::default());
        assert_eq!(s.rlimits.to_plan(), cloister_plan::Rlimits::default());
        assert!(s.no_new_privs && s.enabled);
    }

    #[test]
    fn user_table_replaces_the_shipped_one_as_a_whole_and_keeps_its_place() {
        let text = "[services.extra]\nexec = \"/bin/true\"\nuser = \"nobody\"\n\
                    [services.ngircd]\nexec = \"/usr/sbin/ngircd\"\nuser = \"nobody\"\n";
        let c = parse(text).unwrap();
        assert_eq!(c.services.keys().collect::<Vec<_>>(), [SHIPPED, &["extra"]].concat());
        let n = &c.services["ngircd"];
        assert_eq!(n.user.as_deref(), Some("nobody"));
        // Not merged key by key: the shipped args and readiness are gone.
        assert!(n.args.is_empty());
        assert_eq!(n.ready.0, Readiness::Started);
    }

    #[test]
    fn disabled_services_are_dropped() {
        let all_off: String = SHIPPED.iter().map(|n| format!("[services.{n}]\nenabled = false\n")).collect();
        let c = parse(&all_off).unwrap();
        assert!(c.services.is_empty());
        let c = parse(&format!("{all_off}[services.x]\nenabled = false\n")).unwrap();
        assert!(c.services.is_empty());
        // A service others wait for cannot go alone.
        let e = err("[services.ngircd]\nenabled = false\n");
        assert_eq!(e.key.as_deref(), Some("services.ircgate.after"), "{e}");
    }

    #[test]
    fn all_keys_parse_into_their_types() {
        let text = r#"
[services.web]
exec = "/usr/bin/web"
args = ["-v", "--port=80"]
user = "www-data"
group = "www-data"
groups = ["adm"]
env = ["PATH=/usr/bin", "EMPTY=", "EQ=a=b"]
workdir = "/var/lib/cloister/web"
netns = "host"
namespaces = { mount = true, pid = false, ipc = true, uts = false }
writable = ["/var/lib/cloister/web"]
tmpfs = ["/var/cache/web"]
read_only = ["/srv/test"]
caps_bounding = ["CAP_NET_BIND_SERVICE", "CAP_CHOWN"]
caps_ambient = ["CAP_NET_BIND_SERVICE"]
no_new_privs = false
rlimits = { nproc = 64, nofile = 4096, address_space_mib = 512, core = 0 }
after = ["ngircd"]
ready = "unix:/run/web.sock"
restart = { initial_delay_ms = 200, max_exits = 3, window_ms = 60000 }
"#;
        let c = parse(text).unwrap();
        let s = &c.services["web"];
        assert_eq!(s.env_pairs()[2], ("EQ".to_string(), "a=b".to_string()));
        assert_eq!(s.env_pairs()[1], ("EMPTY".to_string(), String::new()));
        assert_eq!(s.netns, NetNs::Host);
        let ns = s.plan_namespaces();
        assert!(ns.mount && !ns.pid && ns.ipc && !ns.uts && ns.net == NetNs::Host);
        let rl = s.rlimits.to_plan();
        assert_eq!(
            (rl.nproc, rl.nofile, rl.address_space, rl.core),
            (Some(64), Some(4096), Some(512 << 20), Some(0))
        );
        assert_eq!(s.ready.0, Readiness::Unix("/run/web.sock".into()));
        let r = s.restart;
        let d = cloister_plan::Restart::default();
        assert_eq!((r.initial_delay_ms, r.max_exits, r.window_ms), (200, 3, 60000));
        assert_eq!(
            (r.max_delay_ms, r.stable_ms, r.stop_grace_ms),
            (d.max_delay_ms, d.stable_ms, d.stop_grace_ms)
        );
        assert!(!s.no_new_privs);
    }

    #[test]
    fn readiness_forms() {
        let ok = |t: &str| Ready::try_from(t.to_string()).unwrap().0;
        assert_eq!(ok("started"), Readiness::Started);
        assert_eq!(ok("tcp:[::1]:22"), Readiness::Tcp("[::1]:22".parse().unwrap()));
        assert_eq!(ok("file:/run/x/ready"), Readiness::File("/run/x/ready".into()));
        for bad in ["tcp:127.0.0.1:0", "tcp:localhost:80", "unix:run/x", "file:/a/../b", "http://x", ""] {
            assert!(Ready::try_from(bad.to_string()).is_err(), "{bad}");
        }
        let back: String = Ready(Readiness::Tcp("127.0.0.1:6667".parse().unwrap())).into();
        assert_eq!(back, "tcp:127.0.0.1:6667");
    }

    #[test]
    fn unknown_service_key_names_file_line_and_key() {
        let e = err(&format!("{IRC}colour = \"blue\"\n"));
        assert!(e.to_string().starts_with("c.toml:4: services.irc.colour: "), "{e}");
    }

    #[test]
    fn bad_readiness_and_netns_name_file_line_and_key() {
        let e = err(&format!("{IRC}ready = \"tcp:127.0.0.1:0\"\n"));
        assert!(e.to_string().starts_with("c.toml:4: services.irc.ready: "), "{e}");
        let e = err(&format!("{IRC}netns = \"world\"\n"));
        assert!(e.to_string().starts_with("c.toml:4: services.irc.netns: "), "{e}");
        let e = err(&format!("{IRC}[services.irc.restart]\nmax_exit = 3\n"));
        assert!(e.to_string().starts_with("c.toml:5: services.irc.restart.max_exit: "), "{e}");
    }

    #[test]
    fn bad_values_name_file_line_and_key() {
        let cases: &[(&str, usize, &str)] = &[
            ("[services.Irc]\nexec = \"/bin/x\"\nuser = \"irc\"\n", 1, "services.Irc"),
            ("[services.irc]\nuser = \"irc\"\n", 1, "services.irc.exec"),
            ("[services.irc]\nexec = \"/bin/x\"\n", 1, "services.irc.user"),
            ("[services.irc]\nexec = \"bin/x\"\nuser = \"irc\"\n", 2, "services.irc.exec"),
            ("[services.irc]\nexec = \"/usr/../bin/x\"\nuser = \"irc\"\n", 2, "services.irc.exec"),
            ("[services.irc]\nexec = \"/bin/x/\"\nuser = \"irc\"\n", 2, "services.irc.exec"),
            ("[services.irc]\nexec = \"/bin/x\"\nuser = \"\"\n", 3, "services.irc.user"),
            ("[services.irc]\nexec = \"/bin/x\"\nuser = \"a:b\"\n", 3, "services.irc.user"),
        ];
        for &(text, line, key) in cases {
            let e = err(text);
            assert_eq!((e.line, e.key.as_deref()), (Some(line), Some(key)), "{text:?}: {e}");
        }
        let with = |extra: &str| format!("{IRC}{extra}\n");
        let cases = [
            ("env = [\"NOVALUE\"]", "env"),
            ("env = [\"1X=a\"]", "env"),
            ("env = [\"A=1\", \"A=2\"]", "env"),
            ("workdir = \"relative\"", "workdir"),
            ("writable = [\"/\"]", "writable"),
            ("tmpfs = [\"/a/./b\"]", "tmpfs"),
            ("read_only = [\"/a\", \"/a\"]", "read_only"),
            ("writable = [\"/a\"]\ntmpfs = [\"/a\"]", "tmpfs"),
            ("writable = [\"/a\"]\nnamespaces = { mount = false }", "writable"),
            ("caps_bounding = [\"CAP_FLY\"]", "caps_bounding"),
            ("caps_bounding = [\"cap_chown\"]", "caps_bounding"),
            ("caps_bounding = [\"CAP_CHOWN\", \"CAP_CHOWN\"]", "caps_bounding"),
            ("caps_ambient = [\"CAP_NET_BIND_SERVICE\"]", "caps_ambient"),
            ("groups = [\"adm\", \"adm\"]", "groups"),
            ("rlimits = { nofile = 0 }", "rlimits.nofile"),
            ("rlimits = { nproc = 0 }", "rlimits.nproc"),
            ("rlimits = { address_space_mib = 1 }", "rlimits.address_space_mib"),
            ("restart = { max_exits = 0 }", "restart.max_exits"),
            ("restart = { initial_delay_ms = 500, max_delay_ms = 100 }", "restart.max_delay_ms"),
            ("restart = { stop_grace_ms = 3600000 }", "restart.stop_grace_ms"),
            ("after = [\"nosuch\"]", "after"),
            ("after = [\"ngircd\", \"ngircd\"]", "after"),
        ];
        for (extra, key) in cases {
            let e = err(&with(extra));
            assert_eq!(e.key.as_deref(), Some(format!("services.irc.{key}").as_str()), "{extra:?}: {e}");
            assert!(e.line.is_some_and(|l| l >= 4), "{extra:?}: no line: {e}");
        }
    }

    #[test]
    fn names_paths_and_env_rules() {
        assert!(is_service_name("a") && is_service_name("tor-2") && is_service_name(&"a".repeat(32)));
        for bad in ["", "2a", "-a", "A", "a_b", "a.b", &"a".repeat(33)] {
            assert!(!is_service_name(bad), "{bad}");
        }
        assert!(check_path(Path::new("/")).is_ok() && check_path(Path::new("/usr/sbin/x")).is_ok());
        for bad in ["", "x", "//x", "/x//y", "/x/", "/./x", "/x/.."] {
            assert!(check_path(Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn dependency_cycle_names_the_service_and_lists_the_cycle() {
        let text = "[services.a]\nexec = \"/bin/a\"\nuser = \"irc\"\nafter = [\"b\"]\n\n\
                    [services.b]\nexec = \"/bin/b\"\nuser = \"irc\"\nafter = [\"c\"]\n\n\
                    [services.c]\nexec = \"/bin/c\"\nuser = \"irc\"\nafter = [\"a\"]\n";
        let e = err(text);
        assert_eq!(
            e.to_string(),
            "c.toml:4: services.a.after: dependency cycle a -> b -> c -> a (each waits for the next)"
        );
        let e = err(&format!("{IRC}after = [\"irc\"]\n"));
        assert!(
            e.to_string().starts_with("c.toml:4: services.irc.after: dependency cycle irc -> irc"),
            "{e}"
        );
    }

    #[test]
    fn a_cycle_off_the_first_service_is_found_and_a_diamond_is_not_a_cycle() {
        let svc = |n: &str, after: &str| {
            format!("[services.{n}]\nexec = \"/bin/{n}\"\nuser = \"irc\"\nafter = [{after}]\n")
        };
        let text = [svc("top", "\"x\""), svc("x", "\"y\""), svc("y", "\"x\"")].concat();
        let e = err(&text);
        assert_eq!(e.key.as_deref(), Some("services.x.after"), "{e}");
        assert!(e.message.contains("x -> y -> x"), "{e}");
        let diamond = [svc("d", "\"b\", \"c\""), svc("b", "\"a\""), svc("c", "\"a\""), svc("a", "")].concat();
        assert!(parse(&diamond).is_ok());
    }

    #[test]
    fn admin_uids_are_checked() {
        assert_eq!(parse("[system]\nadmin_uids = [1000]\n").unwrap().system.admin_uids, [1000]);
        let e = err("[system]\nadmin_uids = [5, 5]\n");
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("system.admin_uids")));
        assert!(err("[system]\nhostname = \"x\"\n").to_string().contains("system.hostname"));
    }
}
