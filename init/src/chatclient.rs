//! The chat client's sandbox, described for the launch chain: what `chat` on the session socket
//! starts on the user's terminal. PID 1 builds it (the restricted shell has no privileges and
//! the kernel gives unprivileged users no namespaces): irssi as the user's own uid in the chat
//! network namespace (loopback only), in a root view holding only irssi, its libraries,
//! terminfo, its help and themes, a read-only config written here and the user's home; no
//! capabilities, `no_new_privs`, a small RLIMIT_NPROC, landlock allowing only irssi to run.
//!
//! The config points irssi at the IRC gateway with nick, user and real name all the login,
//! never autosaves, answers no CTCP (they are ignored, and the version reply is empty), accepts
//! no DCC, and logs nothing unless the user asks, into the home only.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cloister_plan::{ChatClient, Mounts, Namespaces, NetNs, Readiness, Restart, Rlimits, Service};

/// Processes of the user's uid, counted by the kernel at fork: sshd's session process, the
/// shell and irssi, with room for irssi's own helper threads; not enough for a fork bomb.
const NPROC: u64 = 16;
const NOFILE: u64 = 256;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// A chat user as the account database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// The user with `uid` in `passwd` text, when it is one of ours: a plain login name and a home
/// directly under `homes` (nothing else ever gets into a config file or a mount).
pub fn find_user(passwd: &str, uid: u32, homes: &Path) -> Option<ChatUser> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        let [name, _, u, g, _, home, _] = f.as_slice() else { return None };
        if u.parse::<u32>().ok()? != uid || !plain_login(name) {
            return None;
        }
        let home = PathBuf::from(home);
        let gid = g.parse().ok()?;
        (home.parent() == Some(homes) && home.file_name()? == *name).then(|| ChatUser {
            name: (*name).to_owned(),
            uid,
            gid,
            home,
        })
    })
}

/// The login name of `uid` in passwd text, if it is a plain one (safe in a URI or a message).
pub fn login_name(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut f = line.split(':');
        let (name, uid_field) = (f.next()?, f.nth(1)?);
        (uid_field.parse::<u32>().ok()? == uid && plain_login(name)).then(|| name.to_owned())
    })
}

fn plain_login(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name.len() <= 32
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// irssi's configuration for `user`.
pub fn irssi_config(user: &ChatUser, client: &ChatClient) -> String {
    let n = &user.name;
    let (host, port) = (client.server.ip(), client.server.port());
    let mut c = String::new();
    let _ = writeln!(
        c,
        "servers = (\n  {{ address = \"{host}\"; chatnet = \"cloister\"; port = \"{port}\"; \
         use_tls = \"no\"; autoconnect = \"yes\"; }}\n);"
    );
    c.push_str("chatnets = { cloister = { type = \"IRC\"; }; };\n");
    let _ = writeln!(
        c,
        "settings = {{\n  core = {{ real_name = \"{n}\"; user_name = \"{n}\"; nick = \"{n}\"; \
         settings_autosave = \"no\"; log_create_mode = \"600\"; }};"
    );
    c.push_str(
        "  \"irc/core\" = { ctcp_version_reply = \"\"; ctcp_userinfo_reply = \"\"; \
         alternate_nick = \"\"; };\n",
    );
    c.push_str(
        "  \"irc/dcc\" = { dcc_autoget = \"no\"; dcc_autochat_masks = \"\"; dcc_autoresume = \"no\"; \
         dcc_autorename = \"no\"; };\n",
    );
    // No recoding: its fallback (CP1252) would need iconv modules the view does not hold.
    c.push_str(
        "  \"fe-common/core\" = { autolog = \"no\"; recode = \"no\"; recode_fallback = \"UTF-8\"; };\n};\n",
    );
    // CTCP requests (VERSION, TIME, PING, CLIENTINFO, USERINFO) and DCC offers are dropped
    // before irssi answers them; ngircd scrubs them already, this holds if that ever changes.
    c.push_str("ignores = ( { mask = \"*\"; level = \"CTCPS DCC\"; } );\n");
    c
}

/// Writes `user`'s config under `dir` (root-owned, world-readable: it holds no secret) and
/// returns its path.
pub fn write_config(dir: &Path, user: &ChatUser, client: &ChatClient) -> Result<PathBuf, ClientError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ClientError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(io(dir))?;
    let path = dir.join(format!("irssi-{}.conf", user.uid));
    std::fs::write(&path, irssi_config(user, client)).map_err(io(&path))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).map_err(io(&path))?;
    Ok(path)
}

/// The home must exist and be the user's alone (users added after the build get one here).
pub fn ensure_home(user: &ChatUser) -> Result<(), ClientError> {
    let io = |source| ClientError::Io { path: user.home.clone(), source };
    if !user.home.is_dir() {
        std::fs::create_dir_all(&user.home).map_err(io)?;
    }
    std::os::unix::fs::chown(&user.home, Some(user.uid), Some(user.gid)).map_err(io)?;
    std::fs::set_permissions(&user.home, std::fs::Permissions::from_mode(0o700)).map_err(io)
}

/// The launch chain's description of irssi for `user` on a terminal of `term` and `lang`
/// (both checked by the session socket's parser).
pub fn service(user: &ChatUser, client: &ChatClient, config: &Path, term: &str, lang: &str) -> Service {
    let home = user.home.display().to_string();
    Service {
        name: format!("chat-{}", user.name),
        exec: client.exec.clone(),
        args: vec![format!("--config={}", config.display()), format!("--home={home}")],
        uid: user.uid,
        gid: user.gid,
        groups: Vec::new(),
        env: vec![
            ("HOME".into(), home.clone()),
            ("USER".into(), user.name.clone()),
            ("LOGNAME".into(), user.name.clone()),
            ("TERM".into(), term.into()),
            ("LANG".into(), lang.into()),
        ],
        workdir: user.home.clone(),
        namespaces: Namespaces { mount: true, pid: true, ipc: true, uts: true, net: NetNs::Chat },
        mounts: Mounts {
            writable: vec![user.home.clone()],
            tmpfs: Vec::new(),
            read_only: vec![config.to_path_buf()],
            devpts: false,
            only: Some(client.files.clone()),
            executables: client.executables.clone(),
        },
        caps_bounding: Vec::new(),
        caps_ambient: Vec::new(),
        no_new_privs: true,
        rlimits: Rlimits { nproc: Some(NPROC), nofile: Some(NOFILE), address_space: None, core: Some(0) },
        after: Vec::new(),
        ready: Readiness::Started,
        restart: Restart::default(),
        terminal: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> ChatClient {
        ChatClient {
            exec: "/usr/bin/irssi".into(),
            files: vec!["/usr/bin/irssi".into()],
            executables: vec!["/usr/bin/irssi".into()],
            homes: "/var/lib/cloister/home".into(),
            server: "127.0.0.1:6667".parse().unwrap(),
        }
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        alice:x:2001:2000::/var/lib/cloister/home/alice:/usr/lib/cloister/shell\n\
        evil\"x:x:2002:2000::/var/lib/cloister/home/evil\"x:/usr/lib/cloister/shell\n\
        bob:x:2003:2000::/tmp/bob:/usr/lib/cloister/shell\n";

    #[test]
    fn only_plain_logins_with_their_home_under_homes_are_chat_users() {
        let homes = Path::new("/var/lib/cloister/home");
        let alice = find_user(PASSWD, 2001, homes).unwrap();
        assert_eq!(alice.name, "alice");
        assert_eq!((alice.uid, alice.gid), (2001, 2000));
        assert_eq!(alice.home, Path::new("/var/lib/cloister/home/alice"));
        assert_eq!(find_user(PASSWD, 2002, homes), None, "a quote in the name");
        assert_eq!(find_user(PASSWD, 2003, homes), None, "home elsewhere");
        assert_eq!(find_user(PASSWD, 0, homes), None);
        assert_eq!(find_user(PASSWD, 4242, homes), None);
    }

    #[test]
    fn config_names_the_user_and_gateway_and_turns_off_replies() {
        let alice = find_user(PASSWD, 2001, Path::new("/var/lib/cloister/home")).unwrap();
        let c = irssi_config(&alice, &client());
        assert!(c.contains("address = \"127.0.0.1\"; chatnet = \"cloister\"; port = \"6667\""), "{c}");
        assert!(c.contains("nick = \"alice\""), "{c}");
        assert!(c.contains("settings_autosave = \"no\""), "{c}");
        assert!(c.contains("ctcp_version_reply = \"\""), "{c}");
        assert!(c.contains("dcc_autoget = \"no\""), "{c}");
        assert!(c.contains("level = \"CTCPS DCC\""), "{c}");
        // Balanced braces and parentheses: irssi's parser gives up on the whole file otherwise.
        assert_eq!(c.matches('{').count(), c.matches('}').count());
        assert_eq!(c.matches('(').count(), c.matches(')').count());
    }

    #[test]
    fn the_sandbox_has_no_privileges_and_only_the_client() {
        let alice = find_user(PASSWD, 2001, Path::new("/var/lib/cloister/home")).unwrap();
        let svc =
            service(&alice, &client(), Path::new("/run/cloister/chat/irssi-2001.conf"), "xterm", "C.UTF-8");
        assert_eq!((svc.uid, svc.gid), (2001, 2000));
        assert!(svc.groups.is_empty() && svc.caps_bounding.is_empty() && svc.caps_ambient.is_empty());
        assert!(svc.no_new_privs);
        assert_eq!(svc.namespaces.net, NetNs::Chat);
        assert_eq!(svc.mounts.only.as_deref(), Some(&client().files[..]));
        assert_eq!(svc.mounts.writable, vec![alice.home.clone()]);
        assert_eq!(svc.mounts.executables, client().executables);
        assert_eq!(svc.rlimits.nproc, Some(NPROC));
        assert!(svc.env.contains(&("TERM".into(), "xterm".into())));
        assert!(svc.args.contains(&"--home=/var/lib/cloister/home/alice".to_string()));
    }
}
