//! `[onion]` and `[chat]`: the onion service that is the appliance's only way in, and the chat
//! accounts an image is built with. The builder turns them into tor's and sshd's configuration
//! and the account databases; this module checks what needs no image.

use cloister_plan::accounts::{self as accounts_rules, check_admin_key, check_login_name};
use serde::{Deserialize, Serialize};

/// `[onion]`: tor's onion service in front of sshd, with its denial-of-service defences.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OnionConfig {
    /// The onion service's virtual port for SSH (what `ssh -p` names).
    pub ssh_port: u16,
    /// Streams one rendezvous circuit may open before tor closes the circuit.
    pub max_streams: u32,
    /// Proof-of-work at the introduction points (tor's `HiddenServicePoWDefensesEnabled`).
    pub pow_defenses: bool,
    /// Introduction requests per second the introduction points let through, and the burst.
    pub intro_rate_per_sec: u32,
    pub intro_burst_per_sec: u32,
    /// Client authorisation: only holders of these x25519 keys can even find the service.
    /// Each is `descriptor:x25519:<52 base32 characters>`, as tor's `.auth` files hold them.
    pub authorized_clients: Vec<String>,
}

impl Default for OnionConfig {
    fn default() -> Self {
        Self {
            ssh_port: 22,
            max_streams: 4,
            pow_defenses: true,
            intro_rate_per_sec: 25,
            intro_burst_per_sec: 200,
            authorized_clients: Vec::new(),
        }
    }
}

/// `[chat]`: accounts created in the image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    pub users: Vec<ChatUser>,
    /// Users without a second factor (TOTP, set up with `totp` in their shell) must set one
    /// up at their next login before anything else.
    pub require_totp: bool,
}

/// One chat account: its login name and the crypt(3) hash of its password (never the password).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatUser {
    pub name: String,
    pub password_hash: String,
}

/// Most chat accounts an image may declare (uids 2001..).
pub const MAX_CHAT_USERS: usize = 500;

/// `[admin]`: the appliance's administrators. They log in over the onion service with their SSH
/// key only, and their login shell is the admin CLI. On the appliance's own console they log in
/// with a console password (never accepted over the network), then the admin CLI runs there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub accounts: Vec<AdminAccount>,
    /// Seconds an interactive admin session may wait at its prompt before it ends.
    pub idle_timeout_secs: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { accounts: Vec::new(), idle_timeout_secs: accounts_rules::DEFAULT_ADMIN_IDLE_SECS }
    }
}

/// One admin: a login name, an SSH public key line (`ssh-ed25519 AAAA... comment`) and, for
/// the console, the crypt(3) hash of a console password (or none: no console login until the
/// admin sets one with `console-password` over the onion service).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminAccount {
    pub name: String,
    pub ssh_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_password_hash: Option<String>,
}

/// Most admin accounts an image may declare.
pub const MAX_ADMINS: usize = 64;

impl AdminConfig {
    /// Checks names (also against the chat users': one namespace of logins) and keys.
    pub fn validate(&self, chat: &ChatConfig) -> Result<(), (String, String)> {
        if !accounts_rules::ADMIN_IDLE_SECS.contains(&self.idle_timeout_secs) {
            let r = accounts_rules::ADMIN_IDLE_SECS;
            return Err((
                "admin.idle_timeout_secs".into(),
                format!("{} is outside {}..={}", self.idle_timeout_secs, r.start(), r.end()),
            ));
        }
        let bad = |why: String| Err(("admin.accounts".to_string(), why));
        if self.accounts.len() > MAX_ADMINS {
            return bad(format!("{} accounts; at most {MAX_ADMINS}", self.accounts.len()));
        }
        for (i, a) in self.accounts.iter().enumerate() {
            if let Err(why) = check_login_name(&a.name) {
                return bad(format!("entry {}: {why}", i + 1));
            }
            if self.accounts[..i].iter().any(|o| o.name == a.name) {
                return bad(format!("entry {}: {:?} is listed twice", i + 1, a.name));
            }
            if chat.users.iter().any(|u| u.name == a.name) {
                return bad(format!("entry {}: {:?} is also a chat user", i + 1, a.name));
            }
            if let Err(why) = check_admin_key(&a.ssh_key) {
                return bad(format!("entry {} ({}): ssh_key: {why}", i + 1, a.name));
            }
            if a.console_password_hash.as_deref().is_some_and(|h| !is_crypt_hash(h)) {
                return bad(format!(
                    "entry {} ({}): console_password_hash must be a crypt(3) hash starting with $y$, \
                     $6$ or $5$ (e.g. from `mkpasswd -m yescrypt`), never the password",
                    i + 1,
                    a.name
                ));
            }
        }
        Ok(())
    }
}

impl OnionConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, why: String| Err((format!("onion.{key}"), why));
        if self.ssh_port == 0 {
            return bad("ssh_port", "0 is outside 1..=65535".into());
        }
        if !(1..=65535).contains(&self.max_streams) {
            return bad("max_streams", format!("{} is outside 1..=65535", self.max_streams));
        }
        if self.intro_rate_per_sec == 0 || self.intro_burst_per_sec < self.intro_rate_per_sec {
            return bad(
                "intro_burst_per_sec",
                format!(
                    "the burst ({}) must be at least the rate ({}), and the rate above 0",
                    self.intro_burst_per_sec, self.intro_rate_per_sec
                ),
            );
        }
        if let Some(k) = self.authorized_clients.iter().find(|k| !is_client_auth_key(k)) {
            return bad(
                "authorized_clients",
                format!("{k:?} is not descriptor:x25519:<52 base32 characters>"),
            );
        }
        Ok(())
    }
}

impl ChatConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |why: String| Err(("chat.users".to_string(), why));
        if self.users.len() > MAX_CHAT_USERS {
            return bad(format!("{} accounts; at most {MAX_CHAT_USERS}", self.users.len()));
        }
        for (i, u) in self.users.iter().enumerate() {
            if let Err(why) = check_login_name(&u.name) {
                return bad(format!("entry {}: {why}", i + 1));
            }
            if self.users[..i].iter().any(|o| o.name == u.name) {
                return bad(format!("entry {}: {:?} is listed twice", i + 1, u.name));
            }
            if !is_crypt_hash(&u.password_hash) {
                return bad(format!(
                    "entry {} ({}): password_hash must be a crypt(3) hash starting with $y$, $6$ or $5$ \
                     (e.g. from `mkpasswd -m yescrypt`), never the password",
                    i + 1,
                    u.name
                ));
            }
        }
        Ok(())
    }
}

/// The shape of a yescrypt, SHA-512 or SHA-256 crypt hash: nothing that could end a shadow field.
pub fn is_crypt_hash(hash: &str) -> bool {
    let known = ["$y$", "$6$", "$5$"].iter().any(|p| hash.starts_with(p));
    let charset = hash.bytes().all(|b| b.is_ascii_alphanumeric() || b"$./=".contains(&b));
    known && charset && hash.len() >= 20 && hash.len() <= 256 && hash.matches('$').count() >= 3
}

fn is_client_auth_key(key: &str) -> bool {
    key.strip_prefix("descriptor:x25519:").is_some_and(|k| {
        k.len() == 52 && k.bytes().all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str =
        "$6$saltsalt$Dfk1Vh9Fo0vrQrVxHYhtwR1kTvbDlV3mYgWWu6fM9sVZFqU8EhqV4yPcAkq9yRjxZtI/T7Nl/UCY0nbgxq3l0.";

    fn user(name: &str, hash: &str) -> ChatUser {
        ChatUser { name: name.into(), password_hash: hash.into() }
    }

    #[test]
    fn admins_need_a_fresh_name_and_an_ed25519_key() {
        const KEY: &str =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqUUNcrpcdDksXxNuda4QJg6P8JCz80b+4wMV18Iwt ops";
        let admin = |name: &str, key: &str| AdminAccount {
            name: name.into(),
            ssh_key: key.into(),
            console_password_hash: None,
        };
        let chat = ChatConfig { users: vec![user("alice", HASH)], ..Default::default() };
        assert_eq!(
            AdminConfig { accounts: vec![admin("ops", KEY)], ..AdminConfig::default() }.validate(&chat),
            Ok(())
        );
        let console = AdminAccount { console_password_hash: Some(HASH.into()), ..admin("ops", KEY) };
        assert_eq!(AdminConfig { accounts: vec![console], ..AdminConfig::default() }.validate(&chat), Ok(()));
        for (accounts, says) in [
            (vec![admin("alice", KEY)], "entry 1: \"alice\" is also a chat user"),
            (vec![admin("ops", KEY), admin("ops", KEY)], "entry 2: \"ops\" is listed twice"),
            (vec![admin("root", KEY)], "reserved"),
            (vec![admin("ops", "ssh-rsa AAAAB3NzaC1yc2E ops")], "entry 1 (ops): ssh_key: key type"),
            (
                vec![AdminAccount {
                    console_password_hash: Some("hunter2hunter2".into()),
                    ..admin("ops", KEY)
                }],
                "entry 1 (ops): console_password_hash must be a crypt(3) hash",
            ),
        ] {
            let (key, why) = AdminConfig { accounts, ..AdminConfig::default() }.validate(&chat).unwrap_err();
            assert_eq!(key, "admin.accounts");
            assert!(why.contains(says), "{why}");
        }
    }

    #[test]
    fn hashes_must_look_like_crypt_and_never_like_a_password() {
        assert!(is_crypt_hash(HASH));
        assert!(is_crypt_hash("$y$j9T$abcdefghijklmnop$0123456789abcdefghijklmnopqrstuvwxyzABCDE"));
        for bad in ["hunter2hunter2hunter2", "$1$md5$xxxxxxxxxxxxxxxxxxxx", "$6$a$b:c$dddddddddddddd", "$6$x"]
        {
            assert!(!is_crypt_hash(bad), "{bad}");
        }
    }

    #[test]
    fn chat_users_are_checked_with_their_entry_number() {
        let ok = ChatConfig { users: vec![user("alice", HASH), user("bob", HASH)], ..Default::default() };
        assert_eq!(ok.validate(), Ok(()));
        let twice =
            ChatConfig { users: vec![user("alice", HASH), user("alice", HASH)], ..Default::default() };
        assert!(twice.validate().unwrap_err().1.contains("entry 2: \"alice\" is listed twice"));
        let plain =
            ChatConfig { users: vec![user("alice", "correct horse battery staple")], ..Default::default() };
        let (key, why) = plain.validate().unwrap_err();
        assert_eq!(key, "chat.users");
        assert!(why.contains("entry 1 (alice): password_hash"), "{why}");
    }

    #[test]
    fn onion_limits_are_checked() {
        assert_eq!(OnionConfig::default().validate(), Ok(()));
        let burst = OnionConfig { intro_burst_per_sec: 1, ..OnionConfig::default() };
        assert_eq!(burst.validate().unwrap_err().0, "onion.intro_burst_per_sec");
        let key = format!("descriptor:x25519:{}", "A".repeat(52));
        let auth = OnionConfig { authorized_clients: vec![key.clone()], ..OnionConfig::default() };
        assert_eq!(auth.validate(), Ok(()));
        let bad = OnionConfig { authorized_clients: vec![key.to_lowercase()], ..OnionConfig::default() };
        assert_eq!(bad.validate().unwrap_err().0, "onion.authorized_clients");
    }
}
