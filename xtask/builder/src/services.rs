//! The service plan: `[services]` of the config resolved against the staging tree into the
//! `cloister_plan::Plan` that PID 1 runs, and written into the image with the identity files
//! that must agree with it (hostname, no local time zone). Here live the checks that need the
//! image: accounts, executables and mount points. Each failure names `services.<name>.<key>`.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use cloister_config::{Config, ServiceConfig};
use cloister_plan::{FirewallPlan, Mounts, Plan, Service, PLAN_PATH, STATE_DIR};
use cloister_rootfs::tree::{Kind, Node, Tree};
use cloister_rootfs::users::{parse_group, parse_passwd, GroupEntry, PasswdEntry};

/// The hostname every appliance and every namespace carries: it tells nobody anything.
pub const HOSTNAME: &str = "localhost";
/// Symlinks followed per lookup before giving up, as the kernel's MAXSYMLINKS.
const MAX_SYMLINKS: u32 = 40;

/// Resolves, writes the plan and the identity files: what the rootfs phase calls. A test
/// image's hooks go into the plan here, after every check.
pub fn install(config: &Config, tree: &mut Tree, test: &crate::phases::TestHooks) -> Result<Plan> {
    let mut plan = resolve(config, tree, build_time_unix()?)?;
    plan.firewall.test_break_verify = test.break_firewall_check;
    write_plan(tree, &plan)?;
    Ok(plan)
}

/// `SOURCE_DATE_EPOCH` when set (reproducible builds), else now.
pub fn build_time_unix() -> Result<u64> {
    build_time_from(std::env::var_os("SOURCE_DATE_EPOCH"))
}

fn build_time_from(source_date_epoch: Option<OsString>) -> Result<u64> {
    if let Some(v) = source_date_epoch {
        let text = v.to_string_lossy();
        return text.trim().parse().with_context(|| format!("SOURCE_DATE_EPOCH {text:?} is not a number"));
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    Ok(now.context("the build host's clock is before 1970")?.as_secs())
}

/// The plan for `config`'s services in start order. Creates the writable state directories
/// under `/var/lib/cloister` that the tree lacks, owned by their service.
pub fn resolve(config: &Config, tree: &mut Tree, build_time_unix: u64) -> Result<Plan> {
    let accounts = Accounts::read(tree)?;
    let mut services = Vec::new();
    for name in start_order(config)? {
        let Some(sc) = config.services.get(name) else { continue };
        services.push(resolve_service(name, sc, &accounts, tree)?);
    }
    Ok(Plan {
        hostname: HOSTNAME.into(),
        build_time_unix,
        admin_uids: config.system.admin_uids.clone(),
        services,
        firewall: firewall_plan(config, &accounts)?,
        network: network_plan(config)?,
        chat: chat_plan(config, &accounts, tree)?,
    })
}

/// The onion chat's pieces for PID 1, when the image runs sshd; the chat client when the
/// image also carries irssi and the IRC gateway it connects to.
fn chat_plan(config: &Config, acc: &Accounts, tree: &Tree) -> Result<Option<cloister_plan::ChatPlan>> {
    let Some(gid) = config.services.get("sshd").and_then(|_| acc.gid(crate::chat::CHAT_GROUP.0)) else {
        return Ok(None);
    };
    // The gateway's readiness address is where it listens.
    let gateway = config.services.get("ircgate").filter(|g| g.enabled).and_then(|g| match g.ready.0 {
        cloister_plan::Readiness::Tcp(addr) => Some(addr),
        _ => None,
    });
    let client = match gateway {
        Some(server) => crate::chat::client_plan(tree, server)?,
        None => None,
    };
    Ok(Some(cloister_plan::ChatPlan {
        gid,
        ssh_host_key: crate::chat::SSH_HOST_KEY.into(),
        onion_hostname: crate::chat::ONION_HOSTNAME.into(),
        client,
        firewall: chat_firewall(config, acc, gid),
        accounts: Some(crate::chat::accounts_plan(config)),
        require_totp: config.chat.require_totp,
    }))
}

/// The chat namespace's firewall, when it has the gateway and the IRC server: their ports are
/// where their readiness checks connect, the gateway's uid is its service user's.
fn chat_firewall(config: &Config, acc: &Accounts, chat_gid: u32) -> Option<cloister_plan::ChatFirewallPlan> {
    let port = |name: &str| {
        let svc = config.services.get(name).filter(|s| s.enabled)?;
        match svc.ready.0 {
            cloister_plan::Readiness::Tcp(addr) => Some(addr.port()),
            _ => None,
        }
    };
    let gateway_user = config.services.get("ircgate")?.user.as_deref()?;
    Some(cloister_plan::ChatFirewallPlan {
        gateway_uid: acc.user(gateway_user)?.uid,
        gateway_port: port("ircgate")?,
        server_port: port("ngircd")?,
        chat_gid,
    })
}

/// `[network]` in the plan's form (already checked when the config was read; checked again
/// here for configs built in code).
fn network_plan(config: &Config) -> Result<cloister_plan::NetworkPlan> {
    config.network.to_plan().map_err(|(key, why)| anyhow::anyhow!("{key}: {why}"))
}

/// `[firewall]` with the tor user resolved to its uid in the image.
fn firewall_plan(config: &Config, acc: &Accounts) -> Result<FirewallPlan> {
    let fw = &config.firewall;
    let tor = acc
        .user(&fw.tor_user)
        .with_context(|| format!("firewall.tor_user: no user {:?} in the image", fw.tor_user))?;
    Ok(FirewallPlan {
        tor_uid: Some(tor.uid),
        relay_ports: fw.relay_ports.clone(),
        uplink: fw.uplink.clone(),
        allow_ipv6: fw.allow_ipv6,
        // A static address needs no DHCP hole in the firewall, whatever `firewall.dhcp` says.
        dhcp: fw.dhcp && config.network.mode == "dhcp",
        // Only the builder's test option sets it (`install`), never the config.
        test_break_verify: false,
    })
}

/// Writes `/etc/cloister/plan.json` and `/etc/hostname`, and removes `/etc/localtime` and
/// `/etc/timezone`: without them glibc uses UTC, and the image tells no place.
pub fn write_plan(tree: &mut Tree, plan: &Plan) -> Result<()> {
    put(tree, PLAN_PATH, format!("{}\n", plan.to_json()).as_bytes())?;
    put(tree, "/etc/hostname", format!("{}\n", plan.hostname).as_bytes())?;
    tree.remove(Path::new("etc/localtime"));
    tree.remove(Path::new("etc/timezone"));
    Ok(())
}

/// Services in start order: each after everything it names in `after`; among services free to
/// start, config order.
fn start_order(config: &Config) -> Result<Vec<&str>> {
    let mut placed: Vec<&str> = Vec::new();
    while placed.len() < config.services.len() {
        let next = config.services.iter().find(|(name, s)| {
            !placed.contains(&name.as_str()) && s.after.iter().all(|d| placed.contains(&d.as_str()))
        });
        // The config crate refuses cycles and unknown names; this is the belt to its braces.
        let Some((name, _)) = next else { bail!("services: the `after` graph has a cycle") };
        placed.push(name);
    }
    Ok(placed)
}

fn resolve_service(name: &str, sc: &ServiceConfig, acc: &Accounts, tree: &mut Tree) -> Result<Service> {
    let key = |k: &str| format!("services.{name}.{k}");
    let user_name = sc.user.as_deref().with_context(|| format!("{}: missing", key("user")))?;
    let user = acc
        .user(user_name)
        .with_context(|| format!("{}: no user {user_name:?} in the image", key("user")))?;
    let gid = match &sc.group {
        Some(g) => acc.gid(g).with_context(|| format!("{}: no group {g:?} in the image", key("group")))?,
        None => user.gid,
    };
    let groups = sc
        .groups
        .iter()
        .map(|g| acc.gid(g).with_context(|| format!("{}: no group {g:?} in the image", key("groups"))))
        .collect::<Result<Vec<u32>>>()?;
    let who = Who { name: user_name, uid: user.uid, gid, groups: &groups };
    let exec = sc.exec.clone().with_context(|| format!("{}: missing", key("exec")))?;
    check_exec(tree, &exec, &who).map_err(|why| anyhow::anyhow!("{}: {why}", key("exec")))?;
    for p in &sc.writable {
        writable(tree, p, &who).map_err(|why| anyhow::anyhow!("{}: {why}", key("writable")))?;
    }
    for p in &sc.tmpfs {
        tmpfs(tree, p).map_err(|why| anyhow::anyhow!("{}: {why}", key("tmpfs")))?;
    }
    workdir(tree, sc).map_err(|why| anyhow::anyhow!("{}: {why}", key("workdir")))?;
    Ok(Service {
        name: name.into(),
        exec,
        args: sc.args.clone(),
        uid: user.uid,
        gid,
        groups,
        env: sc.env_pairs(),
        workdir: sc.workdir.clone(),
        namespaces: sc.plan_namespaces(),
        mounts: Mounts {
            writable: sc.writable.clone(),
            tmpfs: sc.tmpfs.clone(),
            read_only: sc.read_only.clone(),
            devpts: sc.devpts,
            ..Mounts::default()
        },
        caps_bounding: sc.caps_bounding.clone(),
        caps_ambient: sc.caps_ambient.clone(),
        no_new_privs: sc.no_new_privs,
        rlimits: sc.rlimits.to_plan(),
        after: sc.after.clone(),
        ready: sc.ready.0.clone(),
        restart: sc.restart,
        terminal: None,
    })
}

/// The ids a service runs with, for permission checks and for owning what the build creates.
struct Who<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    groups: &'a [u32],
}

impl Who<'_> {
    /// Whether `node` grants this user `bit` (1 = x), as the kernel decides without capabilities.
    fn may(&self, node: &Node, bit: u32) -> bool {
        let shift = if node.uid == self.uid {
            6
        } else if node.gid == self.gid || self.groups.contains(&node.gid) {
            3
        } else {
            0
        };
        // Root without capabilities still gets execute if anyone has it (DAC override aside).
        let mask = if self.uid == 0 { 0o111 } else { bit << shift };
        node.mode & mask != 0
    }
}

fn check_exec(tree: &Tree, path: &Path, who: &Who) -> Result<(), String> {
    let (rel, node) =
        lookup(tree, path)?.ok_or_else(|| format!("{} does not exist in the image", path.display()))?;
    if node.kind != Kind::File {
        return Err(format!("{} is not a regular file in the image (/{})", path.display(), rel.display()));
    }
    if !who.may(node, 1) {
        return Err(format!(
            "{} is not executable by {} (mode {:04o} {}:{})",
            path.display(),
            who.name,
            node.mode & 0o7777,
            node.uid,
            node.gid
        ));
    }
    Ok(())
}

/// An existing path, or one under the state directory, which is created for the service.
fn writable(tree: &mut Tree, path: &Path, who: &Who) -> Result<(), String> {
    let state = Path::new(STATE_DIR);
    if path == state {
        return Err(format!("{STATE_DIR} as a whole would hand the service every other service's state"));
    }
    if lookup(tree, path)?.is_some() {
        return Ok(());
    }
    let Ok(below) = path.strip_prefix(state) else {
        return Err(format!(
            "{} does not exist in the image (the build creates only paths under {STATE_DIR})",
            path.display()
        ));
    };
    let mut rel = rel_path(state);
    for part in below.components() {
        rel.push(part);
        match tree.get(&rel).map(|n| &n.kind) {
            Some(Kind::Dir) => {}
            Some(_) => return Err(format!("/{} is in the way and is not a directory", rel.display())),
            None => tree
                .insert(&rel, Node::dir(0o700).owned(who.uid, who.gid))
                .map_err(|e| format!("cannot create /{}: {e}", rel.display()))?,
        }
    }
    Ok(())
}

/// A directory in the image, or one below /run or /tmp, which every service gets as a fresh
/// tmpfs of its own (the sandbox makes the mount point there).
fn tmpfs(tree: &Tree, path: &Path) -> Result<(), String> {
    if path.starts_with("/run") && path != Path::new("/run")
        || path.starts_with("/tmp") && path != Path::new("/tmp")
    {
        return Ok(());
    }
    match lookup(tree, path)? {
        Some((_, node)) if node.kind == Kind::Dir => Ok(()),
        Some(_) => Err(format!("{} is not a directory in the image", path.display())),
        None => Err(format!(
            "{} does not exist in the image (a tmpfs needs a directory to mount on)",
            path.display()
        )),
    }
}

fn workdir(tree: &Tree, sc: &ServiceConfig) -> Result<(), String> {
    let dir = &sc.workdir;
    if sc.writable.iter().chain(&sc.tmpfs).any(|m| dir.starts_with(m)) {
        return Ok(());
    }
    match lookup(tree, dir)? {
        Some((_, node)) if node.kind == Kind::Dir => Ok(()),
        Some(_) => Err(format!("{} is not a directory in the image", dir.display())),
        None => {
            Err(format!("{} does not exist in the image, nor inside a writable or tmpfs path", dir.display()))
        }
    }
}

/// Finds `path` in the tree following symlinks as the kernel would with the image as root
/// (absolute targets restart at the image's root, `..` stops there). `None`: nothing there.
fn lookup<'t>(tree: &'t Tree, path: &Path) -> Result<Option<(PathBuf, &'t Node)>, String> {
    let mut todo: VecDeque<OsString> = VecDeque::new();
    push_front(&mut todo, path);
    let mut cur = PathBuf::new();
    let mut hops = 0;
    while let Some(part) = todo.pop_front() {
        if part == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&part);
        let Some(node) = tree.get(&next) else { return Ok(None) };
        match &node.kind {
            Kind::Symlink(target) => {
                hops += 1;
                if hops > MAX_SYMLINKS {
                    return Err(format!("{}: too many levels of symlinks in the image", path.display()));
                }
                if target.is_absolute() {
                    cur = PathBuf::new();
                }
                push_front(&mut todo, target);
            }
            Kind::Dir => cur = next,
            _ if todo.is_empty() => cur = next,
            // A file in the middle of a path: ENOTDIR, nothing there.
            _ => return Ok(None),
        }
    }
    Ok(tree.get(&cur).map(|node| (cur.clone(), node)))
}

/// Queues `path`'s parts before what is queued (a symlink's target replaces its name).
fn push_front(todo: &mut VecDeque<OsString>, path: &Path) {
    for c in path.components().rev() {
        match c {
            Component::Normal(n) => todo.push_front(n.to_owned()),
            Component::ParentDir => todo.push_front("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
}

/// `/a/b` → `a/b`, the tree's keys.
fn rel_path(path: &Path) -> PathBuf {
    path.components().filter(|c| matches!(c, Component::Normal(_))).collect()
}

/// The image's accounts, read back from the files the rootfs phase wrote.
struct Accounts {
    users: Vec<PasswdEntry>,
    groups: Vec<GroupEntry>,
}

impl Accounts {
    fn read(tree: &Tree) -> Result<Self> {
        let text = |rel: &str| {
            let host = tree.host_path(Path::new(rel));
            fs::read_to_string(&host).with_context(|| format!("cannot read /{rel} of the image"))
        };
        Ok(Self { users: parse_passwd(&text("etc/passwd")?)?, groups: parse_group(&text("etc/group")?)? })
    }

    fn user(&self, name: &str) -> Option<&PasswdEntry> {
        self.users.iter().find(|u| u.name == name)
    }

    fn gid(&self, name: &str) -> Option<u32> {
        self.groups.iter().find(|g| g.name == name).map(|g| g.gid)
    }
}

/// Writes a root-owned 0644 file, first removing whatever non-directory was there: a package's
/// symlink must not redirect the write, in the image or on the build host.
fn put(tree: &mut Tree, path: &str, contents: &[u8]) -> Result<()> {
    let rel = rel_path(Path::new(path));
    if matches!(tree.get(&rel).map(|n| &n.kind), Some(Kind::Dir)) {
        bail!("{path} is a directory in the image");
    }
    let host = tree.host_path(&rel);
    if fs::symlink_metadata(&host).is_ok_and(|m| !m.is_dir()) {
        fs::remove_file(&host).with_context(|| format!("cannot remove {}", host.display()))?;
    }
    tree.write_file(&rel, contents, Node::file(0o644))
        .with_context(|| format!("cannot write {path} into the image"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree with accounts, merged /usr, ngircd and a few traps.
    fn image() -> (tempfile::TempDir, Tree) {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tree::new(dir.path().join("stage")).unwrap();
        let passwd = "root:x:0:0:root:/root:/bin/sh\nirc:x:39:39:ircd:/run/ircd:/usr/sbin/nologin\n\
                      debian-tor:x:101:101::/var/lib/tor:/usr/sbin/nologin\n\
                      cloister-bridge:x:110:110::/nonexistent:/usr/sbin/nologin\n\
                      cloister-ircgate:x:111:111::/nonexistent:/usr/sbin/nologin\n";
        let group = "root:x:0:\nirc:x:39:\nadm:x:4:\ndebian-tor:x:101:\ncloister-bridge:x:110:debian-tor\n\
                     cloister-ircgate:x:111:\nchat:x:2000:\n";
        for exe in ["usr/sbin/sshd", "usr/bin/tor", "usr/lib/cloister/bridge", "usr/lib/cloister/ircgate"] {
            t.write_file(exe, b"\x7fELF", Node::file(0o755)).unwrap();
        }
        t.write_file("etc/passwd", passwd.as_bytes(), Node::file(0o644)).unwrap();
        t.write_file("etc/group", group.as_bytes(), Node::file(0o644)).unwrap();
        t.insert("sbin", Node::symlink("usr/sbin")).unwrap();
        t.write_file("usr/sbin/ngircd", b"\x7fELF", Node::file(0o755)).unwrap();
        t.write_file("usr/sbin/private", b"\x7fELF", Node::file(0o750)).unwrap();
        t.insert("usr/bin/ngircd-link", Node::symlink("../sbin/ngircd")).unwrap();
        t.insert("usr/bin/loop", Node::symlink("loop")).unwrap();
        t.write_file("etc/ngircd/ngircd.conf", b"", Node::file(0o644)).unwrap();
        t.mkdir_p(Path::new("var/lib/cloister")).unwrap();
        t.get_mut(Path::new("var/lib/cloister")).unwrap().mode = 0o711;
        t.mkdir_p(Path::new("var/cache/web")).unwrap();
        t.mkdir_p(Path::new("run")).unwrap();
        t.insert("etc/localtime", Node::symlink("/usr/share/zoneinfo/Europe/Berlin")).unwrap();
        (dir, t)
    }

    fn config(services: &str) -> Config {
        Config::parse(services, "c.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    fn fails(services: &str) -> String {
        let (_d, mut t) = image();
        match resolve(&config(services), &mut t, 1) {
            Ok(p) => panic!("expected an error, got {}", p.to_json()),
            Err(e) => format!("{e:#}"),
        }
    }

    const WEB: &str = "[services.web]\nexec = \"/sbin/ngircd\"\nuser = \"irc\"\n";

    #[test]
    fn shipped_config_resolves_and_is_written() {
        let (_d, mut t) = image();
        let plan = resolve(&Config::default(), &mut t, 1_700_000_000).unwrap();
        assert_eq!((plan.hostname.as_str(), plan.build_time_unix), ("localhost", 1_700_000_000));
        let n = plan.service("ngircd").unwrap();
        assert_eq!((n.uid, n.gid, n.exec.as_path()), (39, 39, Path::new("/usr/sbin/ngircd")));
        assert_eq!(n.args, ["--nodaemon", "--config", "/etc/ngircd/ngircd.conf"]);
        assert_eq!(n.ready, cloister_plan::Readiness::Tcp("127.0.0.1:6668".parse().unwrap()));
        assert_eq!(n.rlimits, cloister_plan::Rlimits::default());
        let order: Vec<&str> = plan.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(order, ["ngircd", "ircgate", "sshd", "bridge", "tor"]);
        let tor = plan.service("tor").unwrap();
        assert_eq!(
            (tor.uid, tor.groups.as_slice(), tor.namespaces.net),
            (101, &[110][..], cloister_plan::NetNs::Host)
        );
        let chat = plan.chat.as_ref().unwrap();
        assert_eq!((chat.gid, chat.ssh_host_key.as_path()), (2000, Path::new(crate::chat::SSH_HOST_KEY)));
        write_plan(&mut t, &plan).unwrap();
        let back = Plan::load(&t.host_path(Path::new("etc/cloister/plan.json"))).unwrap();
        assert_eq!(back, plan);
        let node = t.get(Path::new("etc/cloister/plan.json")).unwrap();
        assert_eq!((node.mode, node.uid, node.gid), (0o644, 0, 0));
        assert_eq!(fs::read_to_string(t.host_path(Path::new("etc/hostname"))).unwrap(), "localhost\n");
        assert!(t.get(Path::new("etc/localtime")).is_none());
    }

    #[test]
    fn services_come_in_start_order_stable_among_equals() {
        let svc = |n: &str, after: &str| {
            format!("[services.{n}]\nexec = \"/usr/sbin/ngircd\"\nuser = \"irc\"\nafter = [{after}]\n")
        };
        let text =
            [svc("d", "\"b\", \"c\""), svc("b", "\"a\""), svc("c", ""), svc("a", "\"ngircd\"")].concat();
        let (_d, mut t) = image();
        let plan = resolve(&config(&text), &mut t, 1).unwrap();
        let order: Vec<&str> = plan.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(order, ["ngircd", "ircgate", "sshd", "bridge", "tor", "c", "a", "b", "d"]);
    }

    #[test]
    fn every_key_reaches_the_plan() {
        let text = format!(
            r#"{WEB}
group = "adm"
groups = ["debian-tor"]
env = ["A=1", "B=x=y"]
workdir = "/var/lib/cloister/web/sub"
netns = "host"
writable = ["/var/lib/cloister/web/sub"]
tmpfs = ["/var/cache/web"]
read_only = ["/srv/tests"]
caps_bounding = ["CAP_NET_BIND_SERVICE"]
caps_ambient = ["CAP_NET_BIND_SERVICE"]
ready = "file:/run/web/ready"
rlimits = {{ address_space_mib = 64 }}
restart = {{ max_exits = 2 }}
"#
        );
        let (_d, mut t) = image();
        let plan = resolve(&config(&text), &mut t, 1).unwrap();
        let s = plan.service("web").unwrap();
        assert_eq!((s.uid, s.gid, s.groups.as_slice()), (39, 4, &[101][..]));
        assert_eq!(s.env, [("A".into(), "1".into()), ("B".into(), "x=y".into())]);
        assert_eq!(s.namespaces.net, cloister_plan::NetNs::Host);
        assert_eq!(s.mounts.read_only, [PathBuf::from("/srv/tests")]);
        assert_eq!(s.caps_ambient, ["CAP_NET_BIND_SERVICE"]);
        assert_eq!(s.rlimits.address_space, Some(64 << 20));
        assert_eq!(s.restart.max_exits, 2);
        assert_eq!(s.ready, cloister_plan::Readiness::File("/run/web/ready".into()));
        // The state directory was created for the service, every level of it.
        for rel in ["var/lib/cloister/web", "var/lib/cloister/web/sub"] {
            let n = t.get(Path::new(rel)).unwrap();
            assert_eq!((&n.kind, n.mode, n.uid, n.gid), (&Kind::Dir, 0o700, 39, 4), "{rel}");
        }
        assert_eq!(t.get(Path::new("var/lib/cloister")).unwrap().mode, 0o711);
    }

    #[test]
    fn exec_is_found_through_relative_and_absolute_symlinks() {
        let (_d, t) = image();
        for p in ["/sbin/ngircd", "/usr/bin/ngircd-link", "/usr/sbin/ngircd"] {
            let (rel, node) = lookup(&t, Path::new(p)).unwrap().unwrap();
            assert_eq!((rel.as_path(), &node.kind), (Path::new("usr/sbin/ngircd"), &Kind::File), "{p}");
        }
        assert!(lookup(&t, Path::new("/usr/bin/loop")).is_err());
        assert!(lookup(&t, Path::new("/etc/passwd/x")).unwrap().is_none());
    }

    #[test]
    fn missing_binary_names_service_and_key() {
        let e = fails("[services.web]\nexec = \"/usr/sbin/nosuchd\"\nuser = \"irc\"\n");
        assert_eq!(e, "services.web.exec: /usr/sbin/nosuchd does not exist in the image");
        let e = fails("[services.web]\nexec = \"/usr/sbin\"\nuser = \"irc\"\n");
        assert!(e.starts_with("services.web.exec: /usr/sbin is not a regular file"), "{e}");
        let e = fails("[services.web]\nexec = \"/etc/ngircd/ngircd.conf\"\nuser = \"irc\"\n");
        assert!(e.starts_with("services.web.exec: /etc/ngircd/ngircd.conf is not executable by irc"), "{e}");
        let e = fails("[services.web]\nexec = \"/usr/sbin/private\"\nuser = \"irc\"\n");
        assert!(e.contains("not executable by irc (mode 0750 0:0)"), "{e}");
        let e = fails("[services.web]\nexec = \"/usr/bin/loop\"\nuser = \"irc\"\n");
        assert!(e.starts_with("services.web.exec: ") && e.contains("too many levels of symlinks"), "{e}");
    }

    #[test]
    fn firewall_tor_user_is_resolved_or_named_as_the_error() {
        let (_d, mut t) = image();
        let plan = resolve(&Config::default(), &mut t, 1).unwrap();
        assert_eq!(plan.firewall.tor_uid, Some(101));
        assert_eq!(plan.firewall.relay_ports, [80, 443, 9001, 9030]);
        let e = fails("[firewall]\ntor_user = \"nosuchtor\"\n");
        assert_eq!(e, "firewall.tor_user: no user \"nosuchtor\" in the image");
    }

    #[test]
    fn only_the_test_hook_breaks_the_firewall_check_and_production_plans_never_mention_it() {
        let (_d, mut t) = image();
        let plan = install(&Config::default(), &mut t, &crate::phases::TestHooks::default()).unwrap();
        assert!(!plan.firewall.test_break_verify);
        let written = std::fs::read_to_string(t.staging().join(PLAN_PATH.trim_start_matches('/'))).unwrap();
        assert!(!written.contains("test_break_verify"), "{written}");
        let hooks = crate::phases::TestHooks { break_firewall_check: true, ..Default::default() };
        let plan = install(&Config::default(), &mut t, &hooks).unwrap();
        assert!(plan.firewall.test_break_verify);
        let written = std::fs::read_to_string(t.staging().join(PLAN_PATH.trim_start_matches('/'))).unwrap();
        assert!(written.contains("\"test_break_verify\": true"), "{written}");
    }

    #[test]
    fn a_static_network_closes_the_dhcp_hole() {
        let (_d, mut t) = image();
        assert!(resolve(&Config::default(), &mut t, 1).unwrap().firewall.dhcp);
        let text = "[network]\nmode = \"static\"\naddress = \"192.168.1.10\"\nprefix = 24\ngateway = \"192.168.1.1\"\n";
        assert!(!resolve(&config(text), &mut t, 1).unwrap().firewall.dhcp);
    }

    #[test]
    fn root_may_run_what_only_root_may_execute() {
        let (_d, mut t) = image();
        let plan =
            resolve(&config("[services.web]\nexec = \"/usr/sbin/private\"\nuser = \"root\"\n"), &mut t, 1);
        assert_eq!(plan.unwrap().service("web").map(|s| s.uid), Some(0));
    }

    #[test]
    fn unknown_user_and_groups_name_service_and_key() {
        let e = fails("[services.web]\nexec = \"/usr/sbin/ngircd\"\nuser = \"nosuchuser\"\n");
        assert_eq!(e, "services.web.user: no user \"nosuchuser\" in the image");
        let e = fails(&format!("{WEB}group = \"nogrp\"\n"));
        assert_eq!(e, "services.web.group: no group \"nogrp\" in the image");
        let e = fails(&format!("{WEB}groups = [\"adm\", \"nogrp\"]\n"));
        assert_eq!(e, "services.web.groups: no group \"nogrp\" in the image");
    }

    #[test]
    fn impossible_mounts_name_service_and_key() {
        let e = fails(&format!("{WEB}writable = [\"/srv/data\"]\n"));
        assert!(e.starts_with("services.web.writable: /srv/data does not exist in the image"), "{e}");
        let e = fails(&format!("{WEB}writable = [\"/var/lib/cloister\"]\n"));
        assert!(e.starts_with("services.web.writable: /var/lib/cloister as a whole"), "{e}");
        let e = fails(&format!("{WEB}tmpfs = [\"/srv/ngircd\"]\n"));
        assert!(e.starts_with("services.web.tmpfs: /srv/ngircd does not exist in the image"), "{e}");
        let e = fails(&format!("{WEB}tmpfs = [\"/etc/passwd\"]\n"));
        assert_eq!(e, "services.web.tmpfs: /etc/passwd is not a directory in the image");
        let e = fails(&format!("{WEB}workdir = \"/home/irc\"\n"));
        assert!(e.starts_with("services.web.workdir: /home/irc does not exist in the image"), "{e}");
        let e = fails(&format!("{WEB}workdir = \"/etc/passwd\"\n"));
        assert!(e.starts_with("services.web.workdir: /etc/passwd is not a directory"), "{e}");
    }

    #[test]
    fn state_path_blocked_by_a_file_is_impossible() {
        let (_d, mut t) = image();
        t.write_file("var/lib/cloister/web", b"", Node::file(0o600)).unwrap();
        let r = resolve(&config(&format!("{WEB}writable = [\"/var/lib/cloister/web/keys\"]\n")), &mut t, 1);
        let e = format!("{:#}", r.unwrap_err());
        assert!(e.starts_with("services.web.writable: /var/lib/cloister/web is in the way"), "{e}");
    }

    #[test]
    fn existing_state_directories_keep_their_owner() {
        let (_d, mut t) = image();
        t.insert("var/lib/cloister/tor", Node::dir(0o700).owned(101, 101)).unwrap();
        resolve(&config(&format!("{WEB}writable = [\"/var/lib/cloister/tor\"]\n")), &mut t, 1).unwrap();
        assert_eq!(t.get(Path::new("var/lib/cloister/tor")).unwrap().uid, 101);
    }

    #[test]
    fn plan_write_replaces_a_symlink_instead_of_following_it() {
        let (d, mut t) = image();
        let victim = d.path().join("victim");
        fs::write(&victim, "safe").unwrap();
        t.insert("etc/hostname", Node::symlink(&victim)).unwrap();
        let plan = resolve(&Config::default(), &mut t, 1).unwrap();
        write_plan(&mut t, &plan).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "safe");
        assert_eq!(t.get(Path::new("etc/hostname")).unwrap().kind, Kind::File);
    }

    #[test]
    fn build_time_honours_source_date_epoch() {
        assert_eq!(build_time_from(Some("1234567890".into())).unwrap(), 1_234_567_890);
        let e = build_time_from(Some("yesterday".into())).unwrap_err();
        assert!(e.to_string().contains("SOURCE_DATE_EPOCH \"yesterday\""), "{e}");
        assert!(build_time_from(None).unwrap() > 1_700_000_000);
    }
}
