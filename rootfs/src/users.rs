//! The account databases and identity files that maintainer scripts would have written (none
//! run): `/etc/{passwd,group,shadow,gshadow}` from base-passwd's master files plus the system
//! users of our packages, with fixed ids so builds are reproducible; `/etc/hostname`, an empty
//! `/etc/machine-id`, `/etc/hosts`, and the state directories those postinsts create.

use std::fs;
use std::path::{Path, PathBuf};

use crate::tree::{Kind, Node, Tree, TreeError};

const PASSWD_MASTER: &str = "usr/share/base-passwd/passwd.master";
const GROUP_MASTER: &str = "usr/share/base-passwd/group.master";
const NOLOGIN: &str = "/usr/sbin/nologin";

/// Used when base-passwd is not in the tree: the accounts the image cannot do without.
const BUILTIN_PASSWD: &str = "root:*:0:0:root:/root:/bin/sh\n\
    irc:*:39:39:ircd:/run/ircd:/usr/sbin/nologin\n\
    nobody:*:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const BUILTIN_GROUP: &str = "root:*:0:\nirc:*:39:\nshadow:*:42:\nnogroup:*:65534:\n";

/// Our packages' system users, as their postinsts would create them, with fixed ids from the
/// dynamic system range (100-999). `(name, uid, own group?, home, gecos)`; without an own group
/// the user's primary group is nogroup, as `adduser --system` without `--group` does.
const OUR_USERS: &[(&str, u32, bool, &str, &str)] = &[
    // tor's postinst: adduser --system --group --home /var/lib/tor debian-tor
    ("debian-tor", 101, true, "/var/lib/tor", ""),
    // openssh-server's postinst: privilege separation user, no group of its own.
    ("sshd", 102, false, "/run/sshd", ""),
];

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{file}: malformed line {line:?}")]
    Malformed { file: &'static str, line: String },
    #[error("account {name} with id {id} clashes with an existing account")]
    Clash { name: String, id: u32 },
    #[error("group {group} for user {user} does not exist")]
    NoGroup { user: String, group: String },
    #[error("writing {path:?} into the tree: {source}")]
    Tree { path: PathBuf, source: TreeError },
    #[error("{path:?} is a directory in the image")]
    IsDir { path: PathBuf },
    #[error("removing {path}: {source}")]
    Remove { path: PathBuf, source: std::io::Error },
}

/// A system account to create: a locked password and a nologin shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemUser {
    pub name: String,
    pub uid: u32,
    /// `None`: a group of the same name and id; `Some(g)`: the existing group `g`.
    pub primary_group: Option<String>,
    pub home: String,
    pub gecos: String,
    /// Supplementary groups (must exist).
    pub groups: Vec<String>,
    /// A crypt(3) hash for a login account; `None` locks the password (`!`).
    pub password_hash: Option<String>,
    /// `None`: nologin.
    pub shell: Option<String>,
}

/// The users our packages need (tor, openssh-server); ngircd runs as base-passwd's `irc`.
pub fn package_users() -> Vec<SystemUser> {
    OUR_USERS
        .iter()
        .map(|&(name, uid, own, home, gecos)| SystemUser {
            name: name.to_owned(),
            uid,
            primary_group: (!own).then(|| "nogroup".to_owned()),
            home: home.to_owned(),
            gecos: gecos.to_owned(),
            groups: Vec::new(),
            password_hash: None,
            shell: None,
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub password: String,
    pub uid: u32,
    pub gid: u32,
    pub gecos: String,
    pub home: String,
    pub shell: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub password: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// The accounts written into the image, for looking up ids by name.
#[derive(Debug, Clone, Default)]
pub struct Accounts {
    pub users: Vec<PasswdEntry>,
    pub groups: Vec<GroupEntry>,
}

impl Accounts {
    pub fn user(&self, name: &str) -> Option<&PasswdEntry> {
        self.users.iter().find(|u| u.name == name)
    }
    pub fn uid(&self, name: &str) -> Option<u32> {
        self.user(name).map(|u| u.uid)
    }
    pub fn gid(&self, group: &str) -> Option<u32> {
        self.groups.iter().find(|g| g.name == group).map(|g| g.gid)
    }

    fn add(&mut self, u: &SystemUser) -> Result<(), UsersError> {
        let clash = |name: &str, id| UsersError::Clash { name: name.to_owned(), id };
        if let Some(existing) = self.user(&u.name) {
            return if existing.uid == u.uid { Ok(()) } else { Err(clash(&u.name, u.uid)) };
        }
        if self.users.iter().any(|e| e.uid == u.uid) {
            return Err(clash(&u.name, u.uid));
        }
        let gid = match &u.primary_group {
            Some(g) => {
                self.gid(g).ok_or_else(|| UsersError::NoGroup { user: u.name.clone(), group: g.clone() })?
            }
            None => {
                if self.groups.iter().any(|g| g.name == u.name || g.gid == u.uid) {
                    return Err(clash(&u.name, u.uid));
                }
                self.groups.push(GroupEntry {
                    name: u.name.clone(),
                    password: "!".into(),
                    gid: u.uid,
                    members: vec![],
                });
                u.uid
            }
        };
        for extra in &u.groups {
            let g = self.groups.iter_mut().find(|g| g.name == *extra);
            let g = g.ok_or_else(|| UsersError::NoGroup { user: u.name.clone(), group: extra.clone() })?;
            g.members.push(u.name.clone());
        }
        self.users.push(PasswdEntry {
            name: u.name.clone(),
            password: u.password_hash.clone().unwrap_or_else(|| "!".into()),
            uid: u.uid,
            gid,
            gecos: u.gecos.clone(),
            home: u.home.clone(),
            shell: u.shell.clone().unwrap_or_else(|| NOLOGIN.into()),
        });
        Ok(())
    }

    /// A group without a user of its name (e.g. the chat users' primary group).
    fn add_group(&mut self, name: &str, gid: u32) -> Result<(), UsersError> {
        match self.groups.iter().find(|g| g.name == name || g.gid == gid) {
            Some(g) if g.name == name && g.gid == gid => Ok(()),
            Some(_) => Err(UsersError::Clash { name: name.to_owned(), id: gid }),
            None => {
                self.groups.push(GroupEntry {
                    name: name.into(),
                    password: "!".into(),
                    gid,
                    members: vec![],
                });
                Ok(())
            }
        }
    }

    pub fn passwd(&self) -> String {
        let line = |u: &PasswdEntry| {
            format!("{}:x:{}:{}:{}:{}:{}\n", u.name, u.uid, u.gid, u.gecos, u.home, u.shell)
        };
        self.users.iter().map(line).collect()
    }
    pub fn shadow(&self) -> String {
        // Empty aging fields: no date goes into the image, so builds stay reproducible.
        self.users.iter().map(|u| format!("{}:{}:::::::\n", u.name, u.password)).collect()
    }
    pub fn group(&self) -> String {
        self.groups.iter().map(|g| format!("{}:x:{}:{}\n", g.name, g.gid, g.members.join(","))).collect()
    }
    pub fn gshadow(&self) -> String {
        self.groups.iter().map(|g| format!("{}:{}::{}\n", g.name, g.password, g.members.join(","))).collect()
    }
}

/// Writes the account databases (base-passwd's masters, or a built-in minimum, plus
/// [`package_users`], the `groups` and the `extra` users), the identity files and the
/// postinst-made directories.
pub fn write_system_accounts(
    tree: &mut Tree,
    groups: &[(&str, u32)],
    extra: &[SystemUser],
) -> Result<Accounts, UsersError> {
    let mut acc = base_accounts(tree)?;
    for (name, gid) in groups {
        acc.add_group(name, *gid)?;
    }
    for u in package_users().iter().chain(extra) {
        acc.add(u)?;
    }
    let shadow = acc.gid("shadow").unwrap_or(0);
    put(tree, "etc/passwd", acc.passwd().as_bytes(), Node::file(0o644))?;
    put(tree, "etc/group", acc.group().as_bytes(), Node::file(0o644))?;
    put(tree, "etc/shadow", acc.shadow().as_bytes(), Node::file(0o640).owned(0, shadow))?;
    put(tree, "etc/gshadow", acc.gshadow().as_bytes(), Node::file(0o640).owned(0, shadow))?;
    // Generic on purpose: the hostname leaks into logs and protocols.
    put(tree, "etc/hostname", b"localhost\n", Node::file(0o644))?;
    put(tree, "etc/hosts", b"127.0.0.1\tlocalhost\n::1\tlocalhost\n", Node::file(0o644))?;
    // Empty: systemd-less, and a fixed id would make every appliance look alike.
    put(tree, "etc/machine-id", b"", Node::file(0o444))?;
    if let (Some(uid), Some(gid)) = (acc.uid("debian-tor"), acc.gid("debian-tor")) {
        let p = Path::new("var/lib/tor");
        tree.insert(p, Node::dir(0o700).owned(uid, gid))
            .map_err(|source| UsersError::Tree { path: p.into(), source })?;
    }
    Ok(acc)
}

fn base_accounts(tree: &Tree) -> Result<Accounts, UsersError> {
    let read = |rel: &str, builtin: &'static str| -> Result<String, UsersError> {
        let node = tree.get(Path::new(rel));
        if !matches!(node.map(|n| &n.kind), Some(Kind::File)) {
            return Ok(builtin.to_owned());
        }
        let path = tree.host_path(Path::new(rel));
        fs::read_to_string(&path).map_err(|source| UsersError::Read { path, source })
    };
    Ok(Accounts {
        users: parse_passwd(&read(PASSWD_MASTER, BUILTIN_PASSWD)?)?,
        groups: parse_group(&read(GROUP_MASTER, BUILTIN_GROUP)?)?,
    })
}

fn records(text: &str) -> impl Iterator<Item = (&str, Vec<&str>)> {
    text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).map(|l| (l, l.split(':').collect()))
}

pub fn parse_passwd(text: &str) -> Result<Vec<PasswdEntry>, UsersError> {
    records(text)
        .map(|(line, f)| {
            let bad = || UsersError::Malformed { file: "passwd", line: line.to_owned() };
            let [name, password, uid, gid, gecos, home, shell] = f[..] else { return Err(bad()) };
            Ok(PasswdEntry {
                name: name.into(),
                password: password.into(),
                uid: uid.parse().map_err(|_| bad())?,
                gid: gid.parse().map_err(|_| bad())?,
                gecos: gecos.into(),
                home: home.into(),
                shell: shell.into(),
            })
        })
        .collect()
}

pub fn parse_group(text: &str) -> Result<Vec<GroupEntry>, UsersError> {
    records(text)
        .map(|(line, f)| {
            let bad = || UsersError::Malformed { file: "group", line: line.to_owned() };
            let [name, password, gid, members] = f[..] else { return Err(bad()) };
            Ok(GroupEntry {
                name: name.into(),
                password: password.into(),
                gid: gid.parse().map_err(|_| bad())?,
                members: members.split(',').filter(|m| !m.is_empty()).map(str::to_owned).collect(),
            })
        })
        .collect()
}

/// Writes a regular file, first removing whatever non-directory was there (a package's symlink
/// must not redirect the write, in the image or on the build host).
fn put(tree: &mut Tree, rel: &str, contents: &[u8], node: Node) -> Result<(), UsersError> {
    let path = PathBuf::from(rel);
    if matches!(tree.get(&path).map(|n| &n.kind), Some(Kind::Dir)) {
        return Err(UsersError::IsDir { path });
    }
    let host = tree.host_path(&path);
    if fs::symlink_metadata(&host).is_ok_and(|m| !m.is_dir()) {
        fs::remove_file(&host).map_err(|source| UsersError::Remove { path: host.clone(), source })?;
    }
    tree.write_file(&path, contents, node).map_err(|source| UsersError::Tree { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn tree() -> (tempfile::TempDir, Tree) {
        let dir = tempfile::tempdir().unwrap();
        let t = Tree::new(dir.path().join("stage")).unwrap();
        (dir, t)
    }

    fn read(t: &Tree, rel: &str) -> String {
        fs::read_to_string(t.host_path(Path::new(rel))).unwrap()
    }

    /// Every line has `n` fields and the ids in field 2 are unique.
    fn check_db(text: &str, n: usize) {
        let mut names = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for line in text.lines() {
            let f: Vec<_> = line.split(':').collect();
            assert_eq!(f.len(), n, "{line}");
            assert!(names.insert(f[0].to_owned()), "duplicate name in {line}");
            // Field 2 is the id in passwd and group (empty in shadow and gshadow).
            if let Ok(id) = f[2].parse::<u32>() {
                assert!(ids.insert(id), "duplicate id in {line}");
            }
        }
    }

    #[test]
    fn builtin_accounts_with_package_users() {
        let (_d, mut t) = tree();
        let acc = write_system_accounts(&mut t, &[], &[]).unwrap();
        let passwd = read(&t, "etc/passwd");
        check_db(&passwd, 7);
        check_db(&read(&t, "etc/group"), 4);
        check_db(&read(&t, "etc/shadow"), 9);
        check_db(&read(&t, "etc/gshadow"), 4);
        assert!(passwd.contains("debian-tor:x:101:101::/var/lib/tor:/usr/sbin/nologin\n"), "{passwd}");
        assert!(passwd.contains("sshd:x:102:65534::/run/sshd:/usr/sbin/nologin\n"), "{passwd}");
        assert!(read(&t, "etc/shadow").contains("debian-tor:!:::::::\n"));
        assert_eq!((acc.uid("irc"), acc.gid("irc")), (Some(39), Some(39)));
        assert_eq!(
            (acc.uid("debian-tor"), acc.gid("debian-tor"), acc.gid("shadow")),
            (Some(101), Some(101), Some(42))
        );
        assert_eq!(acc.uid("nosuch"), None);
        for f in ["etc/shadow", "etc/gshadow"] {
            let n = t.get(Path::new(f)).unwrap();
            assert_eq!((n.mode, n.uid, n.gid), (0o640, 0, 42), "{f}");
        }
        assert_eq!(t.get(Path::new("etc/passwd")).unwrap().mode, 0o644);
        let tor = t.get(Path::new("var/lib/tor")).unwrap();
        assert_eq!((&tor.kind, tor.mode, tor.uid, tor.gid), (&Kind::Dir, 0o700, 101, 101));
        assert_eq!(read(&t, "etc/hostname"), "localhost\n");
        assert_eq!(read(&t, "etc/machine-id"), "");
        // Every password is locked.
        for line in read(&t, "etc/shadow").lines() {
            let pw = line.split(':').nth(1).unwrap();
            assert!(pw == "*" || pw == "!", "{line}");
        }
    }

    #[test]
    fn base_passwd_masters_are_used_and_extra_users_added() {
        let (_d, mut t) = tree();
        let host = |f| fs::read("/usr/share/base-passwd/".to_owned() + f).unwrap();
        t.write_file(PASSWD_MASTER, &host("passwd.master"), Node::file(0o644)).unwrap();
        t.write_file(GROUP_MASTER, &host("group.master"), Node::file(0o644)).unwrap();
        let chat = SystemUser {
            name: "cloister-chat".into(),
            uid: 110,
            primary_group: None,
            home: "/nonexistent".into(),
            gecos: "".into(),
            groups: vec!["debian-tor".into()],
            password_hash: None,
            shell: None,
        };
        let alice = SystemUser {
            name: "alice".into(),
            uid: 2001,
            primary_group: Some("chat".into()),
            home: "/var/lib/cloister/home/alice".into(),
            gecos: "".into(),
            groups: vec![],
            password_hash: Some("$6$salt$hash".into()),
            shell: Some("/usr/lib/cloister/shell".into()),
        };
        let acc = write_system_accounts(&mut t, &[("chat", 2000)], &[chat, alice]).unwrap();
        assert!(read(&t, "etc/passwd")
            .contains("alice:x:2001:2000::/var/lib/cloister/home/alice:/usr/lib/cloister/shell\n"));
        assert!(read(&t, "etc/shadow").contains("alice:$6$salt$hash:::::::\n"));
        assert!(read(&t, "etc/group").contains("chat:x:2000:\n"));
        check_db(&read(&t, "etc/passwd"), 7);
        check_db(&read(&t, "etc/group"), 4);
        assert_eq!(acc.uid("www-data"), Some(33));
        assert_eq!(acc.gid("plugdev"), Some(46));
        assert_eq!(acc.uid("cloister-chat"), Some(110));
        assert!(read(&t, "etc/group").contains("debian-tor:x:101:cloister-chat\n"));
        assert!(read(&t, "etc/passwd").starts_with("root:x:0:0:root:/root:/bin/bash\n"));
        // The files round-trip; the real passwords live in the shadow files only.
        let mut users = acc.users.clone();
        users.iter_mut().for_each(|u| u.password = "x".into());
        assert_eq!(parse_passwd(&read(&t, "etc/passwd")).unwrap(), users);
        let mut groups = acc.groups.clone();
        groups.iter_mut().for_each(|g| g.password = "x".into());
        assert_eq!(parse_group(&read(&t, "etc/group")).unwrap(), groups);
    }

    #[test]
    fn clashing_ids_and_missing_groups_are_refused() {
        let (_d, mut t) = tree();
        let mut u = package_users()[0].clone();
        u.name = "other".into();
        let r = write_system_accounts(&mut t, &[], &[u.clone()]);
        assert!(matches!(r, Err(UsersError::Clash { id: 101, .. })), "{r:?}");
        u.uid = 120;
        u.primary_group = Some("missing".into());
        assert!(matches!(write_system_accounts(&mut t, &[], &[u]), Err(UsersError::NoGroup { .. })));
    }

    #[test]
    fn malformed_lines_are_reported() {
        assert!(parse_passwd("root:x:0:0:root:/root\n").is_err());
        assert!(parse_group("root:x:zero:\n").is_err());
        assert_eq!(parse_group("# c\n\nadm:*:4:a,b\n").unwrap()[0].members, ["a", "b"]);
    }

    #[test]
    fn symlinked_etc_passwd_is_replaced_not_followed() {
        let (d, mut t) = tree();
        let victim = d.path().join("victim");
        fs::write(&victim, "safe").unwrap();
        t.insert("etc/passwd", Node::symlink(&victim)).unwrap();
        write_system_accounts(&mut t, &[], &[]).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "safe");
        assert_eq!(t.get(Path::new("etc/passwd")).unwrap().kind, Kind::File);
    }
}
