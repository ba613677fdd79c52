//! The onion chat's configuration, written where the packages read it: tor's torrc (from
//! `[onion]` and `[firewall]`), sshd_config, ngircd.conf, the accounts (our services' system
//! users, the `chat` group and the chat users of `[chat]` with their homes) and our own
//! binaries beside PID 1. Each file is a pure function of the config, tested as text.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cloister_config::Config;
use cloister_plan::accounts;
use cloister_rootfs::elf;
use cloister_rootfs::tree::{Kind, Node, Tree};
use cloister_rootfs::users::{Accounts, SystemUser};

/// The chat users' primary group: PID 1's session socket and sshd's `AllowGroups` admit it.
pub const CHAT_GROUP: (&str, u32) = (accounts::CHAT_GROUP, accounts::CHAT_GID);
/// Chat users get uids from here on, in config order.
const FIRST_CHAT_UID: u32 = accounts::CHAT_UIDS.0;
/// The admins' primary group: sshd lets it in by key, PID 1's control socket admits it.
pub const ADMIN_GROUP: (&str, u32) = (accounts::ADMIN_GROUP, accounts::ADMIN_GID);
const FIRST_ADMIN_UID: u32 = accounts::ADMIN_UIDS.0;
/// `<dir>/<login>` holds an admin's one SSH key, root's and world-readable, as sshd wants it.
pub const ADMIN_KEYS: &str = "/etc/cloister/admin-keys";
pub const ADMIN_HOMES: &str = "/var/lib/cloister/admin";
const ADMIN_SHELL: &str = "/usr/lib/cloister/admin";
/// Our helpers' system users, each with a group of its own.
const SYSTEM_USERS: &[(&str, u32)] = &[("cloister-bridge", 110), ("cloister-ircgate", 111)];
/// Our binaries besides PID 1: (file name in the build's output directory, path in the image).
pub const COMPANIONS: &[(&str, &str)] = &[
    ("cloister-shell", "/usr/lib/cloister/shell"),
    ("cloister-bridge", "/usr/lib/cloister/bridge"),
    ("cloister-ircgate", "/usr/lib/cloister/ircgate"),
    ("cloister-admin", ADMIN_SHELL),
];
const SHELL: &str = "/usr/lib/cloister/shell";
pub const HOMES: &str = "/var/lib/cloister/home";
/// The chat client, when the package list brings it.
const IRSSI: &str = "usr/bin/irssi";
/// Data the client reads besides its libraries. Not its modules directory: that holds the perl
/// interpreter's glue (`/load perl`, `/script`) and the IRC proxy, which a chat user must not load.
const CLIENT_DATA: &[&str] = &[
    "usr/share/terminfo",
    "usr/lib/terminfo",
    "etc/terminfo",
    "usr/share/irssi/help",
    "usr/share/irssi/themes",
];
pub const TORRC: &str = "/etc/cloister/torrc";
const TOR_DATA: &str = "/var/lib/cloister/tor";
const ONION_DIR: &str = "/var/lib/cloister/tor/onion-ssh";
pub const ONION_HOSTNAME: &str = "/var/lib/cloister/tor/onion-ssh/hostname";
const BRIDGE_SOCKET: &str = "/var/lib/cloister/bridge/ssh.sock";
pub const SSH_HOST_KEY: &str = "/var/lib/cloister/ssh/ssh_host_ed25519_key";
/// Lines only a private test network may use; a production torrc never holds one.
pub const TEST_NETWORK_KEYS: &[&str] = &["TestingTorNetwork", "DirAuthority", "AlternateDirAuthority"];

/// Groups and users to add to the image's account databases.
pub fn accounts(config: &Config) -> (Vec<(&'static str, u32)>, Vec<SystemUser>) {
    let system = SYSTEM_USERS.iter().map(|&(name, uid)| SystemUser {
        name: name.into(),
        uid,
        primary_group: None,
        home: "/nonexistent".into(),
        gecos: String::new(),
        groups: Vec::new(),
        password_hash: None,
        shell: None,
    });
    let chat = config.chat.users.iter().zip(FIRST_CHAT_UID..).map(|(u, uid)| SystemUser {
        name: u.name.clone(),
        uid,
        primary_group: Some(CHAT_GROUP.0.into()),
        home: format!("{HOMES}/{}", u.name),
        gecos: String::new(),
        groups: Vec::new(),
        password_hash: Some(u.password_hash.clone()),
        shell: Some(SHELL.into()),
    });
    let admins = config.admin.accounts.iter().zip(FIRST_ADMIN_UID..).map(|(a, uid)| SystemUser {
        name: a.name.clone(),
        uid,
        primary_group: Some(ADMIN_GROUP.0.into()),
        home: format!("{ADMIN_HOMES}/{}", a.name),
        gecos: String::new(),
        groups: Vec::new(),
        // `*`, not `!`: without PAM, sshd refuses a `!`-locked account even its key.
        password_hash: Some("*".into()),
        shell: Some(ADMIN_SHELL.into()),
    });
    (vec![CHAT_GROUP, ADMIN_GROUP], system.chain(chat).chain(admins).collect())
}

/// Where PID 1's admin tools put accounts: the same ids, shells and homes as the build's.
pub fn accounts_plan(config: &Config) -> accounts::AccountsPlan {
    accounts::AccountsPlan {
        chat: accounts::AccountKind {
            gid: CHAT_GROUP.1,
            first_uid: accounts::CHAT_UIDS.0,
            last_uid: accounts::CHAT_UIDS.1,
            shell: SHELL.into(),
            homes: HOMES.into(),
        },
        admin: accounts::AccountKind {
            gid: ADMIN_GROUP.1,
            first_uid: accounts::ADMIN_UIDS.0,
            last_uid: accounts::ADMIN_UIDS.1,
            shell: ADMIN_SHELL.into(),
            homes: ADMIN_HOMES.into(),
        },
        admin_keys: ADMIN_KEYS.into(),
        admin_idle_secs: config.admin.idle_timeout_secs,
    }
}

/// Writes the configuration files, the onion service's client keys, the chat users' homes and
/// our binaries from `bin_dir`.
pub fn install(
    config: &Config,
    tree: &mut Tree,
    acc: &Accounts,
    bin_dir: &Path,
    test_network: Option<&str>,
) -> Result<()> {
    let write = |tree: &mut Tree, path: &str, text: String| -> Result<()> {
        let rel = path.trim_start_matches('/');
        tree.remove(Path::new(rel));
        tree.write_file(rel, text.as_bytes(), Node::file(0o644)).with_context(|| format!("writing {path}"))
    };
    write(tree, TORRC, torrc(config, test_network)?)?;
    write(tree, "/etc/ssh/sshd_config", sshd_config(config.admin.idle_timeout_secs))?;
    write(tree, "/etc/ngircd/ngircd.conf", ngircd_conf())?;
    authorized_clients(config, tree, acc)?;
    let homes = Path::new(HOMES.trim_start_matches('/'));
    tree.mkdir_p(homes)?;
    if let Some(node) = tree.get_mut(homes) {
        node.mode = 0o711;
    }
    for (u, uid) in config.chat.users.iter().zip(FIRST_CHAT_UID..) {
        tree.insert(homes.join(&u.name), Node::dir(0o700).owned(uid, CHAT_GROUP.1))?;
    }
    admin_accounts(config, tree)?;
    for (file, path) in COMPANIONS {
        let from = bin_dir.join(file);
        let bytes = std::fs::read(&from)
            .with_context(|| format!("cannot read {} (built with the workspace)", from.display()))?;
        tree.write_file(path.trim_start_matches('/'), &bytes, Node::file(0o755))?;
    }
    Ok(())
}

/// Each admin's key file (root's, 0644, in a root-owned 0755 directory: sshd's `StrictModes`)
/// and home (0700, the admin's).
fn admin_accounts(config: &Config, tree: &mut Tree) -> Result<()> {
    for dir in [ADMIN_KEYS, ADMIN_HOMES] {
        let rel = Path::new(dir.trim_start_matches('/'));
        tree.mkdir_p(rel)?;
        if let Some(node) = tree.get_mut(rel) {
            (node.mode, node.uid, node.gid) = (0o755, 0, 0);
        }
    }
    let console: String = config
        .admin
        .accounts
        .iter()
        .filter_map(|a| Some(format!("{}:{}\n", a.name, a.console_password_hash.as_deref()?)))
        .collect();
    let rel = accounts::CONSOLE_PASSWORDS.trim_start_matches('/');
    tree.remove(Path::new(rel));
    tree.write_file(rel, console.as_bytes(), Node::file(0o600))?;
    for (a, uid) in config.admin.accounts.iter().zip(FIRST_ADMIN_UID..) {
        let key = accounts::check_admin_key(&a.ssh_key)
            .map_err(|why| anyhow::anyhow!("admin.accounts: {}: {why}", a.name))?;
        let keys = Path::new(ADMIN_KEYS.trim_start_matches('/')).join(&a.name);
        tree.write_file(&keys, format!("{key}\n").as_bytes(), Node::file(0o644))?;
        let home = Path::new(ADMIN_HOMES.trim_start_matches('/')).join(&a.name);
        tree.insert(home, Node::dir(0o700).owned(uid, ADMIN_GROUP.1))?;
    }
    Ok(())
}

/// tor reads client authorisation keys from `authorized_clients/*.auth` in the service's
/// directory; the build makes that directory (tor adds its own keys on first boot).
fn authorized_clients(config: &Config, tree: &mut Tree, acc: &Accounts) -> Result<()> {
    let tor = &config.firewall.tor_user;
    let (uid, gid) = acc
        .user(tor)
        .map(|u| (u.uid, u.gid))
        .with_context(|| format!("firewall.tor_user: no user {tor:?} in the image"))?;
    let mut dir = std::path::PathBuf::new();
    for part in [TOR_DATA, ONION_DIR, &format!("{ONION_DIR}/authorized_clients")] {
        dir = Path::new(part.trim_start_matches('/')).to_path_buf();
        if tree.get(&dir).is_none() {
            tree.mkdir_p(&dir)?;
        }
        if let Some(node) = tree.get_mut(&dir) {
            (node.mode, node.uid, node.gid) = (0o700, uid, gid);
        }
    }
    for (i, key) in config.onion.authorized_clients.iter().enumerate() {
        let file = dir.join(format!("client-{}.auth", i + 1));
        tree.write_file(&file, format!("{key}\n").as_bytes(), Node::file(0o600).owned(uid, gid))?;
    }
    Ok(())
}

/// tor as a client that reaches only the firewall's relay ports, with one onion service whose
/// port leads to the bridge's unix socket. No SOCKS, DNS, transparent or control port: nothing
/// on the appliance uses tor as a client. `test_network`: a private network's lines (tests).
pub fn torrc(config: &Config, test_network: Option<&str>) -> Result<String> {
    let onion = &config.onion;
    let reachable: Vec<String> =
        config.firewall.relay_ports.iter().map(|p| format!("accept *:{p}")).collect();
    let mut t = String::from("# Written by cloister-build from cloister.toml ([onion], [firewall]).\n");
    let mut line = |l: String| {
        t.push_str(&l);
        t.push('\n');
    };
    for l in [
        format!("DataDirectory {TOR_DATA}"),
        "SocksPort 0".into(),
        "ControlPort 0".into(),
        "DNSPort 0".into(),
        "TransPort 0".into(),
        "ClientOnly 1".into(),
        "Sandbox 1".into(),
        "AvoidDiskWrites 1".into(),
        "SafeLogging 1".into(),
        "Log notice stderr".into(),
        // The firewall lets tor out to these ports only; asking for others would just time out.
        format!("ReachableAddresses {}, reject *:*", reachable.join(", ")),
        format!("ClientUseIPv6 {}", u8::from(config.firewall.allow_ipv6)),
        format!("HiddenServiceDir {ONION_DIR}"),
        "HiddenServiceVersion 3".into(),
        format!("HiddenServicePort {} unix:{BRIDGE_SOCKET}", onion.ssh_port),
        format!("HiddenServiceMaxStreams {}", onion.max_streams),
        "HiddenServiceMaxStreamsCloseCircuit 1".into(),
        "HiddenServiceEnableIntroDoSDefense 1".into(),
        format!("HiddenServiceEnableIntroDoSRatePerSec {}", onion.intro_rate_per_sec),
        format!("HiddenServiceEnableIntroDoSBurstPerSec {}", onion.intro_burst_per_sec),
        format!("HiddenServicePoWDefensesEnabled {}", u8::from(onion.pow_defenses)),
    ] {
        line(l);
    }
    let mut text = t;
    if let Some(bad) = test_network_lines(&text).next() {
        bail!("torrc: {bad:?} belongs to a private test network only");
    }
    if let Some(net) = test_network {
        if !net.lines().any(|l| l.split_whitespace().eq(["TestingTorNetwork", "1"])) {
            bail!("test network torrc lines lack `TestingTorNetwork 1`");
        }
        text.push_str("# TEST IMAGE ONLY: a private Tor network (cloister-build --test-tor-network).\n");
        text.push_str(net.trim_end());
        text.push('\n');
    }
    Ok(text)
}

/// The lines of `torrc` that only a private test network may carry.
pub fn test_network_lines(torrc: &str) -> impl Iterator<Item = &str> {
    torrc.lines().filter(|l| {
        let key = l.split_whitespace().next().unwrap_or("");
        TEST_NETWORK_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key)) || key.starts_with("Testing")
    })
}

/// sshd for chat users (passwords, hashes in /etc/shadow, no PAM; a login shell that refuses
/// commands) and admins (their one Ed25519 key only; the admin CLI as shell, which takes a
/// command), and nothing else: no forwarding, tunnels, subsystems, environment, banner, message
/// of the day or last-login line (which would tell the time zone). `admin_idle_secs` reaches
/// the admin CLI through `SetEnv`, which a client's environment cannot override.
pub fn sshd_config(admin_idle_secs: u64) -> String {
    format!(
        "# Written by cloister-build.\n\
         ListenAddress 127.0.0.1:22\n\
         HostKey {SSH_HOST_KEY}\n\
         PidFile none\n\
         UsePAM no\n\
         AllowGroups {chat} {admin}\n\
         PermitRootLogin no\n\
         PasswordAuthentication yes\n\
         PermitEmptyPasswords no\n\
         KbdInteractiveAuthentication no\n\
         PubkeyAuthentication no\n\
         HostbasedAuthentication no\n\
         AuthorizedKeysFile none\n\
         MaxAuthTries 3\n\
         MaxSessions 1\n\
         MaxStartups 10:30:60\n\
         LoginGraceTime 30\n\
         DisableForwarding yes\n\
         AllowTcpForwarding no\n\
         AllowStreamLocalForwarding no\n\
         AllowAgentForwarding no\n\
         X11Forwarding no\n\
         PermitTunnel no\n\
         PermitListen none\n\
         PermitOpen none\n\
         GatewayPorts no\n\
         PermitUserEnvironment no\n\
         PermitUserRC no\n\
         AcceptEnv LANG\n\
         PrintMotd no\n\
         PrintLastLog no\n\
         Banner none\n\
         DebianBanner no\n\
         VersionAddendum none\n\
         UseDNS no\n\
         StrictModes yes\n\
         Compression no\n\
         ClientAliveInterval 60\n\
         ClientAliveCountMax 3\n\
         LogLevel INFO\n\
         HostKeyAlgorithms ssh-ed25519\n\
         KexAlgorithms sntrup761x25519-sha512@openssh.com,curve25519-sha256,curve25519-sha256@libssh.org\n\
         Ciphers chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,aes128-gcm@openssh.com\n\
         MACs hmac-sha2-512-etm@openssh.com,hmac-sha2-256-etm@openssh.com\n\
         Match Group {admin}\n\
         \tPasswordAuthentication no\n\
         \tPubkeyAuthentication yes\n\
         \tAuthenticationMethods publickey\n\
         \tAuthorizedKeysFile {ADMIN_KEYS}/%u\n\
         \tPubkeyAcceptedAlgorithms {keys}\n\
         \tSetEnv {idle_env}={admin_idle_secs}\n",
        idle_env = accounts::ADMIN_IDLE_ENV,
        chat = CHAT_GROUP.0,
        admin = ADMIN_GROUP.0,
        keys = accounts::ADMIN_KEY_TYPES.join(","),
    )
}

/// ngircd behind ircgate: loopback only, no DNS, ident or PAM, no server links, hostnames
/// cloaked, CTCP scrubbed; limits per IP off because every client comes from ircgate.
pub fn ngircd_conf() -> String {
    "# Written by cloister-build. Chat clients reach this server through ircgate (127.0.0.1:6667).\n\
     [Global]\n\
     \tName = irc.cloister\n\
     \tInfo = cloister\n\
     \tListen = 127.0.0.1\n\
     \tPorts = 6668\n\
     \tMotdPhrase = welcome\n\
     \tPidFile = /tmp/ngircd.pid\n\
     [Limits]\n\
     \tMaxConnections = 128\n\
     \tMaxConnectionsIP = 0\n\
     \tMaxJoins = 16\n\
     \tMaxNickLength = 16\n\
     [Options]\n\
     \tDNS = no\n\
     \tIdent = no\n\
     \tPAM = no\n\
     \tConnectIPv6 = no\n\
     \tMorePrivacy = yes\n\
     \tCloakHost = chat.cloister\n\
     \tScrubCTCP = yes\n\
     \tAllowRemoteOper = no\n\
     \tOperCanUseMode = no\n\
     \tIncludeDir = /nonexistent\n"
        .into()
}

/// The chat client's sandbox contents, or `None` when the image has no irssi: the program, its
/// library closure (resolved in the image, with the symlinks on the way), the data it reads,
/// and the files it may execute (itself and the ELF interpreter).
pub fn client_plan(tree: &Tree, server: std::net::SocketAddr) -> Result<Option<cloister_plan::ChatClient>> {
    if tree.get(Path::new(IRSSI)).is_none() {
        return Ok(None);
    }
    let closure = elf::needed_closure(tree.staging(), Path::new(IRSSI))
        .with_context(|| format!("libraries of /{IRSSI}"))?;
    let abs = |rel: &Path| Path::new("/").join(rel);
    let interpreters = closure.iter().filter(|rel| {
        let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        name.starts_with("ld-linux") && tree.get(rel).is_some_and(|n| n.kind == Kind::File)
    });
    let executables: Vec<PathBuf> =
        std::iter::once(abs(Path::new(IRSSI))).chain(interpreters.map(|r| abs(r))).collect();
    if executables.len() != 2 {
        bail!("/{IRSSI}: expected one ELF interpreter among its libraries, found {:?}", &executables[1..]);
    }
    let mut files: Vec<PathBuf> =
        std::iter::once(abs(Path::new(IRSSI))).chain(closure.iter().map(|r| abs(r))).collect();
    files.extend(CLIENT_DATA.iter().map(Path::new).filter(|rel| tree.get(rel).is_some()).map(abs));
    // The launch chain's last link is PID 1's own binary, started inside the view before it
    // execs irssi: its libraries must be there too. None of them is a program.
    let init = Path::new(cloister_proto::STAGE2_PATH.trim_start_matches('/'));
    if tree.get(init).is_some() {
        let libs = elf::needed_closure(tree.staging(), init).context("libraries of PID 1")?;
        files.extend(libs.iter().map(|r| abs(r)));
    }
    files.sort();
    files.dedup();
    Ok(Some(cloister_plan::ChatClient {
        exec: abs(Path::new(IRSSI)),
        files,
        executables,
        homes: HOMES.into(),
        server,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloister_config::ChatUser;

    #[test]
    fn torrc_matches_the_firewall_and_has_no_client_ports() {
        let mut c = Config::default();
        c.firewall.relay_ports = vec![443, 9001];
        let t = torrc(&c, None).unwrap();
        assert!(t.contains("ReachableAddresses accept *:443, accept *:9001, reject *:*\n"), "{t}");
        for l in ["SocksPort 0\n", "ControlPort 0\n", "Sandbox 1\n", "ClientUseIPv6 0\n"] {
            assert!(t.contains(l), "{l}");
        }
        assert!(t.contains("HiddenServicePort 22 unix:/var/lib/cloister/bridge/ssh.sock\n"));
        assert!(t.contains("HiddenServicePoWDefensesEnabled 1\n"));
        assert_eq!(test_network_lines(&t).count(), 0);
    }

    #[test]
    fn test_network_lines_go_only_into_test_images() {
        let c = Config::default();
        let net = "TestingTorNetwork 1\nDirAuthority a orport=9001 no-v2 v3ident=AA 10.77.0.11:9030 BB\n";
        let t = torrc(&c, Some(net)).unwrap();
        assert_eq!(test_network_lines(&t).count(), 2, "{t}");
        assert!(t.contains("# TEST IMAGE ONLY"));
        let e = torrc(&c, Some("DirAuthority x\n")).unwrap_err().to_string();
        assert!(e.contains("TestingTorNetwork 1"), "{e}");
    }

    #[test]
    fn sshd_allows_chat_users_and_nothing_else() {
        let s = sshd_config(900);
        for l in [
            "UsePAM no",
            "AllowGroups chat cloister-admin",
            "DisableForwarding yes",
            "DebianBanner no",
            "PrintLastLog no",
            "PubkeyAuthentication no",
        ] {
            assert!(s.lines().any(|x| x == l), "{l}");
        }
        // Keys only for admins, and only after every global line (Match runs to the end).
        let admin = s.split_once("Match Group cloister-admin\n").unwrap().1;
        for l in [
            "\tPasswordAuthentication no",
            "\tAuthenticationMethods publickey",
            "\tSetEnv CLOISTER_ADMIN_IDLE_SECS=900",
        ] {
            assert!(admin.lines().any(|x| x == l), "{l}");
        }
        assert!(admin.lines().all(|l| l.starts_with('\t')), "{admin}");
        assert!(!s.contains("Subsystem"), "no sftp or other subsystems");
        assert!(!s.contains("ForceCommand"), "the login shell itself refuses commands");
    }

    #[test]
    fn chat_users_get_uids_in_order_with_the_restricted_shell() {
        let mut c = Config::default();
        for name in ["alice", "bob"] {
            c.chat.users.push(ChatUser { name: name.into(), password_hash: "$6$s$h".into() });
        }
        let (groups, users) = accounts(&c);
        assert_eq!(groups, [("chat", 2000), ("cloister-admin", 3000)]);
        let chat: Vec<_> = users.iter().filter(|u| u.shell.is_some()).collect();
        assert_eq!(
            chat.iter().map(|u| (u.name.as_str(), u.uid)).collect::<Vec<_>>(),
            [("alice", 2001), ("bob", 2002)]
        );
        assert!(chat
            .iter()
            .all(|u| u.shell.as_deref() == Some(SHELL) && u.primary_group.as_deref() == Some("chat")));
        assert!(users.iter().filter(|u| u.shell.is_none()).all(|u| u.password_hash.is_none()));
    }
}
