//! `cloister.toml`: what an image contains, how it is locked and which services it runs. Every
//! key is optional: the embedded default (`default.toml`, the same values as [`Config::default`])
//! fills the gaps, so a build without any config file works. Unknown keys and bad values are
//! errors that name the file, the line and the key.
#![forbid(unsafe_code)]

pub mod caps;
pub mod chat;
pub mod services;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use chat::{AdminAccount, AdminConfig, ChatConfig, ChatUser, OnionConfig};
pub use services::{ServiceConfig, Services};

/// The embedded default config, shown to users and checked against [`Config::default`].
pub const DEFAULT_TOML: &str = include_str!("../default.toml");

/// Smallest XFS that mkfs.xfs accepts, plus the 16 MiB LUKS2 header.
pub const MIN_ROOT_MIB: u64 = 300 + 16;
/// One MiB for the GPT at each end and alignment.
const GPT_OVERHEAD_MIB: u64 = 2;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub image: ImageConfig,
    pub packages: PackagesConfig,
    pub kdf: KdfConfig,
    pub boot: BootConfig,
    pub system: SystemConfig,
    pub firewall: FirewallConfig,
    pub network: NetworkConfig,
    pub onion: OnionConfig,
    pub chat: ChatConfig,
    pub admin: AdminConfig,
    /// Enabled services only, shipped ones first; see [`services::merge`].
    pub services: Services,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SystemConfig {
    /// Uids besides root that may use PID 1's control socket.
    pub admin_uids: Vec<u32>,
}

/// `[firewall]`: the only traffic that may leave is tor's, to these ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FirewallConfig {
    /// The account tor runs as, resolved to a uid against the image's passwd.
    pub tor_user: String,
    /// TCP ports tor may connect to.
    pub relay_ports: Vec<u16>,
    /// The uplink interface's name, or "auto".
    pub uplink: String,
    pub allow_ipv6: bool,
    pub dhcp: bool,
}

impl Default for FirewallConfig {
    fn default() -> Self {
        let plan = cloister_plan::FirewallPlan::default();
        Self {
            tor_user: "debian-tor".into(),
            relay_ports: plan.relay_ports,
            uplink: plan.uplink,
            allow_ipv6: plan.allow_ipv6,
            dhcp: plan.dhcp,
        }
    }
}

impl FirewallConfig {
    /// Checks what needs no image; returns the dotted key and the reason.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, why: String| Err((format!("firewall.{key}"), why));
        if self.tor_user.is_empty() {
            return bad("tor_user", "must name the account tor runs as".into());
        }
        let ports = &self.relay_ports;
        if ports.is_empty() {
            return bad("relay_ports", "needs at least one port, or tor can reach no relay".into());
        }
        if ports.contains(&0) {
            return bad("relay_ports", "0 is outside 1..=65535".into());
        }
        if ports.contains(&53) {
            return bad("relay_ports", "53 is DNS, which never leaves the appliance".into());
        }
        if let Some((i, p)) = ports.iter().enumerate().find(|(i, p)| ports[..*i].contains(p)) {
            return bad("relay_ports", format!("{p} is listed twice (entry {})", i + 1));
        }
        if self.uplink != cloister_plan::UPLINK_AUTO && !is_interface_name(&self.uplink) {
            return bad(
                "uplink",
                format!(
                    "{:?} is not \"auto\" or an interface name (1-15 characters, no '/', ':' or space)",
                    self.uplink
                ),
            );
        }
        Ok(())
    }
}

/// `[network]`: how the uplink gets its IPv4 address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// "dhcp" or "static".
    pub mode: String,
    /// Static mode only: the address, its prefix length and the default gateway.
    pub address: Option<String>,
    pub prefix: Option<u8>,
    pub gateway: Option<String>,
    pub randomize_mac: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        let plan = cloister_plan::NetworkPlan::default();
        Self {
            mode: "dhcp".into(),
            address: None,
            prefix: None,
            gateway: None,
            randomize_mac: plan.randomize_mac,
        }
    }
}

impl NetworkConfig {
    /// The plan's form, or the dotted key and the reason it is refused.
    pub fn to_plan(&self) -> Result<cloister_plan::NetworkPlan, (String, String)> {
        use cloister_plan::{NetworkMode, NetworkPlan, StaticIpv4};
        let bad = |key: &str, why: String| Err((format!("network.{key}"), why));
        let mode = match self.mode.as_str() {
            "dhcp" => {
                for (key, set) in [
                    ("address", self.address.is_some()),
                    ("prefix", self.prefix.is_some()),
                    ("gateway", self.gateway.is_some()),
                ] {
                    if set {
                        return bad(key, "only for mode = \"static\"".into());
                    }
                }
                NetworkMode::Dhcp
            }
            "static" => {
                let address = host_address(self.address.as_deref())
                    .map_err(|why| ("network.address".to_string(), why))?;
                let prefix = match self.prefix {
                    Some(p @ 1..=32) => p,
                    Some(p) => return bad("prefix", format!("{p} is outside 1..=32")),
                    None => return bad("prefix", "required with mode = \"static\"".into()),
                };
                let gateway = host_address(self.gateway.as_deref())
                    .map_err(|why| ("network.gateway".to_string(), why))?;
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                if prefix < 32 && u32::from(gateway) & mask != u32::from(address) & mask {
                    return bad("gateway", format!("{gateway} is outside {address}/{prefix}"));
                }
                if gateway == address {
                    return bad("gateway", format!("{gateway} is the appliance's own address"));
                }
                NetworkMode::Static(StaticIpv4 { address, prefix, gateway })
            }
            other => return bad("mode", format!("{other:?} is not \"dhcp\" or \"static\"")),
        };
        Ok(NetworkPlan { mode, randomize_mac: self.randomize_mac })
    }
}

/// A unicast IPv4 address a host may hold.
fn host_address(text: Option<&str>) -> Result<std::net::Ipv4Addr, String> {
    let text = text.ok_or("required with mode = \"static\"")?;
    let a: std::net::Ipv4Addr = text.parse().map_err(|_| format!("{text:?} is not an IPv4 address"))?;
    if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
        return Err(format!("{a} is not a unicast host address"));
    }
    Ok(a)
}

/// What the kernel accepts as a network interface name (`dev_valid_name`).
pub fn is_interface_name(name: &str) -> bool {
    (1..16).contains(&name.len())
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageConfig {
    pub size_mib: u64,
    pub esp_size_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PackagesConfig {
    pub include: Vec<String>,
    pub extra: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KdfConfig {
    pub memory_mib: u32,
    /// Fixed argon2id passes; 0 = benchmark the build host for `time_ms` instead.
    pub iterations: u32,
    pub time_ms: u32,
    pub parallel: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BootConfig {
    pub consoles: Vec<String>,
    pub cmdline_extra: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            image: ImageConfig::default(),
            packages: PackagesConfig::default(),
            kdf: KdfConfig::default(),
            boot: BootConfig::default(),
            system: SystemConfig::default(),
            firewall: FirewallConfig::default(),
            network: NetworkConfig::default(),
            onion: OnionConfig::default(),
            chat: ChatConfig::default(),
            admin: AdminConfig::default(),
            services: services::default_services(),
        }
    }
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self { size_mib: 1536, esp_size_mib: 128 }
    }
}

impl Default for PackagesConfig {
    fn default() -> Self {
        let include = ["linux-image-amd64", "tor", "openssh-server", "ngircd", "irssi", "ncurses-base"];
        Self { include: include.map(String::from).to_vec(), extra: Vec::new() }
    }
}

impl Default for KdfConfig {
    fn default() -> Self {
        Self { memory_mib: 512, iterations: 6, time_ms: 2000, parallel: 4 }
    }
}

impl Default for BootConfig {
    fn default() -> Self {
        Self { consoles: vec!["tty1".into(), "ttyS0,115200".into()], cmdline_extra: Vec::new() }
    }
}

impl PackagesConfig {
    /// Every package to install, `include` first, without duplicates.
    pub fn all(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for name in self.include.iter().chain(&self.extra) {
            if !out.contains(name) {
                out.push(name.clone());
            }
        }
        out
    }
}

impl BootConfig {
    /// Device names of the consoles (`ttyS0,115200` → `ttyS0`), in command line order.
    pub fn console_devices(&self) -> Vec<&str> {
        self.consoles.iter().map(|c| c.split(',').next().unwrap_or(c)).collect()
    }
}

/// A config that could not be used, with where it went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(Located),
}

/// `file:line: key: message`, the shape editors and humans both jump to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub file: String,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl Config {
    /// Reads `path`, or returns the embedded default when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else { return Ok(Self::default()) };
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, &path.display().to_string()).map_err(ConfigError::Invalid)
    }

    /// Parses and validates `text`; `file` only names the source in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, Located> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            let key = e.span().and_then(|s| key_at(text, s.start));
            Located { file: file.into(), line, key, message: first_line(e.message()) }
        })?;
        // Without `[services]` serde filled in the shipped services; merging them again is a no-op.
        config.services = services::merge(services::default_services(), config.services);
        config.validate().map_err(|(key, message)| Located {
            file: file.into(),
            line: line_of_key(text, &key),
            key: Some(key),
            message,
        })?;
        Ok(config)
    }

    /// Checks values that serde's types cannot express. Returns the dotted key and the reason.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, why: String| Err((key.to_string(), why));
        let img = &self.image;
        if !(64..=4096).contains(&img.esp_size_mib) {
            return bad("image.esp_size_mib", format!("{} is outside 64..=4096", img.esp_size_mib));
        }
        let min = img.esp_size_mib + MIN_ROOT_MIB + GPT_OVERHEAD_MIB;
        if img.size_mib < min || img.size_mib > 1024 * 1024 {
            return bad(
                "image.size_mib",
                format!("{} is outside {min}..=1048576 (ESP + 316 MiB root + GPT)", img.size_mib),
            );
        }
        if self.packages.include.is_empty() {
            return bad("packages.include", "must name at least the kernel package".into());
        }
        for (key, list) in
            [("packages.include", &self.packages.include), ("packages.extra", &self.packages.extra)]
        {
            if let Some(name) = list.iter().find(|n| !is_debian_package_name(n)) {
                return bad(key, format!("{name:?} is not a Debian package name"));
            }
        }
        let kdf = &self.kdf;
        if !(1..=4096).contains(&kdf.memory_mib) {
            return bad("kdf.memory_mib", format!("{} is outside 1..=4096", kdf.memory_mib));
        }
        if kdf.iterations != 0 && !(4..=1000).contains(&kdf.iterations) {
            return bad(
                "kdf.iterations",
                format!("{} is outside 4..=1000 (or 0 to benchmark)", kdf.iterations),
            );
        }
        if !(1..=60_000).contains(&kdf.time_ms) {
            return bad("kdf.time_ms", format!("{} is outside 1..=60000", kdf.time_ms));
        }
        if !(1..=16).contains(&kdf.parallel) {
            return bad("kdf.parallel", format!("{} is outside 1..=16", kdf.parallel));
        }
        if self.boot.consoles.is_empty() {
            return bad("boot.consoles", "needs at least one console for the passphrase prompt".into());
        }
        if let Some(c) = self.boot.consoles.iter().find(|c| !is_console(c)) {
            return bad("boot.consoles", format!("{c:?} is not a console like tty1 or ttyS0,115200"));
        }
        if let Some(w) = self.boot.cmdline_extra.iter().find(|w| !is_cmdline_word(w)) {
            return bad("boot.cmdline_extra", format!("{w:?} is not one command line word"));
        }
        let uids = &self.system.admin_uids;
        if let Some((i, uid)) = uids.iter().enumerate().find(|(i, u)| uids[..*i].contains(u)) {
            return bad("system.admin_uids", format!("{uid} is listed twice (entry {})", i + 1));
        }
        self.firewall.validate()?;
        self.network.to_plan()?;
        self.onion.validate()?;
        self.chat.validate()?;
        self.admin.validate(&self.chat)?;
        services::validate(&self.services)
    }
}

/// Debian policy 5.6.1: lowercase letters, digits, `+ - .`, at least two characters, starting
/// with a letter or digit.
pub fn is_debian_package_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() >= 2
        && chars.next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

fn is_console(spec: &str) -> bool {
    let (dev, opts) = spec.split_once(',').unwrap_or((spec, ""));
    let numbered = |prefix: &str| {
        dev.strip_prefix(prefix)
            .is_some_and(|n| !n.is_empty() && n.len() <= 3 && n.bytes().all(|b| b.is_ascii_digit()))
    };
    (numbered("ttyS") || numbered("tty") || numbered("hvc"))
        && opts.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn is_cmdline_word(word: &str) -> bool {
    !word.is_empty() && word.bytes().all(|b| b.is_ascii_graphic() && b != b'"')
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or(message).trim().to_string()
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// The dotted key whose line holds `offset`: `[table]` header above plus `key =` on the line.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let line_no = line_of(text, offset);
    let mut table = String::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = unquote_dotted(name);
        }
        if i + 1 == line_no {
            let key = line.split_once('=').map(|(k, _)| unquote_dotted(k));
            return match key {
                Some(k) if table.is_empty() => Some(k),
                Some(k) => Some(format!("{table}.{k}")),
                None if !table.is_empty() => Some(table),
                None => None,
            };
        }
    }
    None
}

/// The line where a dotted key is set, or else where its closest enclosing key or table is
/// (`services.a.restart.max_exits` in an inline table points at `restart = {...}`).
fn line_of_key(text: &str, dotted: &str) -> Option<usize> {
    let mut want = dotted;
    loop {
        if let Some(line) = line_setting(text, want) {
            return Some(line);
        }
        want = want.rsplit_once('.')?.0;
    }
}

/// The line that sets exactly `dotted`, as `key = ...` under a table or as a `[table]` header.
fn line_setting(text: &str, dotted: &str) -> Option<usize> {
    let mut table = String::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        let full = if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = unquote_dotted(name);
            table.clone()
        } else if let Some((k, _)) = line.split_once('=') {
            let k = unquote_dotted(k);
            if table.is_empty() {
                k
            } else {
                format!("{table}.{k}")
            }
        } else {
            continue;
        };
        if full == dotted {
            return Some(i + 1);
        }
    }
    None
}

/// `services."irc" . user` → `services.irc.user` (simple keys only; enough to find a line).
fn unquote_dotted(key: &str) -> String {
    key.split('.').map(|p| p.trim().trim_matches('"')).collect::<Vec<_>>().join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> Located {
        match Config::parse(text, "c.toml") {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn embedded_default_matches_code_default() {
        assert_eq!(Config::parse(DEFAULT_TOML, "default.toml"), Ok(Config::default()));
    }

    #[test]
    fn empty_file_and_missing_file_are_the_default() {
        assert_eq!(Config::parse("", "c.toml"), Ok(Config::default()));
        assert_eq!(Config::load(None).ok(), Some(Config::default()));
    }

    #[test]
    fn partial_tables_keep_other_defaults() {
        let c = Config::parse("[image]\nsize_mib = 2048\n", "c.toml").unwrap();
        assert_eq!(c.image.size_mib, 2048);
        assert_eq!(c.image.esp_size_mib, 128);
        assert_eq!(c.kdf, KdfConfig::default());
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = err("[image]\nsize_mib = 2048\nsize_gib = 2\n");
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("size_gib"), "{e}");
        assert!(e.to_string().starts_with("c.toml:3: image.size_gib: "), "{e}");
    }

    #[test]
    fn unknown_table_is_an_error() {
        let e = err("[imgae]\nsize_mib = 1\n");
        assert_eq!(e.line, Some(1));
        assert!(e.message.contains("imgae"), "{e}");
    }

    #[test]
    fn bad_type_names_the_key() {
        let e = err("[kdf]\nmemory_mib = \"lots\"\n");
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("kdf.memory_mib")), "{e}");
    }

    #[test]
    fn out_of_range_values_name_the_key() {
        let cases = [
            ("[image]\nsize_mib = 100\n", 2, "image.size_mib"),
            ("[image]\nesp_size_mib = 8\n", 2, "image.esp_size_mib"),
            ("[kdf]\n\nmemory_mib = 0\n", 3, "kdf.memory_mib"),
            ("[kdf]\nparallel = 99\n", 2, "kdf.parallel"),
            ("[kdf]\niterations = 2\n", 2, "kdf.iterations"),
            ("[packages]\nextra = [\"Bad Name\"]\n", 2, "packages.extra"),
            ("[boot]\nconsoles = [\"/dev/sda\"]\n", 2, "boot.consoles"),
            ("[boot]\ncmdline_extra = [\"a b\"]\n", 2, "boot.cmdline_extra"),
            ("[firewall]\nrelay_ports = []\n", 2, "firewall.relay_ports"),
            ("[firewall]\nrelay_ports = [0]\n", 2, "firewall.relay_ports"),
            ("[firewall]\nrelay_ports = [443, 53]\n", 2, "firewall.relay_ports"),
            ("[firewall]\nrelay_ports = [443, 443]\n", 2, "firewall.relay_ports"),
            ("[firewall]\nrelay_ports = [70000]\n", 2, "firewall.relay_ports"),
            ("[firewall]\nuplink = \"eth0/1\"\n", 2, "firewall.uplink"),
            ("[firewall]\nuplink = \"\"\n", 2, "firewall.uplink"),
            ("[network]\nmode = \"ppp\"\n", 2, "network.mode"),
            ("[network]\naddress = \"10.0.0.2\"\n", 2, "network.address"),
            ("[network]\nmode = \"static\"\naddress = \"10.0.0.256\"\nprefix = 24\ngateway = \"10.0.0.1\"\n", 3, "network.address"),
            ("[network]\nmode = \"static\"\naddress = \"10.0.0.2\"\nprefix = 33\ngateway = \"10.0.0.1\"\n", 4, "network.prefix"),
            ("[network]\nmode = \"static\"\naddress = \"10.0.0.2\"\nprefix = 24\ngateway = \"10.0.1.1\"\n", 5, "network.gateway"),
            ("[network]\nmode = \"static\"\naddress = \"10.0.0.2\"\nprefix = 24\n", 1, "network.gateway"),
            ("[firewall]\n\ntor_user = \"\"\n", 3, "firewall.tor_user"),
        ];
        for (text, line, key) in cases {
            let e = err(text);
            assert_eq!((e.line, e.key.as_deref()), (Some(line), Some(key)), "{text:?}: {e}");
        }
    }

    #[test]
    fn missing_file_is_a_read_error_naming_the_path() {
        let e = Config::load(Some(Path::new("/nonexistent/cloister.toml"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/cloister.toml"), "{e}");
    }

    #[test]
    fn package_list_is_deduplicated_in_order() {
        let c =
            PackagesConfig { include: vec!["a1".into(), "b2".into()], extra: vec!["b2".into(), "c3".into()] };
        assert_eq!(c.all(), ["a1", "b2", "c3"]);
    }

    #[test]
    fn console_devices_strip_options() {
        assert_eq!(BootConfig::default().console_devices(), ["tty1", "ttyS0"]);
    }
}
