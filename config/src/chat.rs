//! `[onion]` and `[chat]`: the onion service that is the appliance's only way in, and the chat
//! accounts an image is built with. The builder turns them into tor's and sshd's configuration
//! and the account databases; this module checks what needs no image.

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
}

/// One chat account: its login name and the crypt(3) hash of its password (never the password).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatUser {
    pub name: String,
    pub password_hash: String,
}

/// Names no chat account may take: they would read as the system speaking.
pub const RESERVED_NAMES: &[&str] = &[
    "root",
    "admin",
    "administrator",
    "chat",
    "cloister",
    "irc",
    "ircd",
    "nobody",
    "operator",
    "sshd",
    "tor",
];

/// Most chat accounts an image may declare (uids 2001..).
pub const MAX_CHAT_USERS: usize = 500;

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
            if let Err(why) = check_chat_name(&u.name) {
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

/// A login name: `[a-z][a-z0-9_-]{0,31}`, not reserved.
pub fn check_chat_name(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let well_formed = (1..=32).contains(&name.len())
        && bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !well_formed {
        return Err(format!("{name:?} is not a name like [a-z][a-z0-9_-]{{0,31}}"));
    }
    if RESERVED_NAMES.contains(&name) || name.starts_with("cloister") {
        return Err(format!("{name:?} is reserved"));
    }
    Ok(())
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
    fn names_follow_the_pattern_and_avoid_reserved_ones() {
        for ok in ["alice", "b0b", "x", "a_b-c"] {
            assert_eq!(check_chat_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "Alice", "1bob", "bob smith", "bob:x", "a".repeat(33).as_str(), "root", "cloister-x"]
        {
            assert!(check_chat_name(bad).is_err(), "{bad}");
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
        let ok = ChatConfig { users: vec![user("alice", HASH), user("bob", HASH)] };
        assert_eq!(ok.validate(), Ok(()));
        let twice = ChatConfig { users: vec![user("alice", HASH), user("alice", HASH)] };
        assert!(twice.validate().unwrap_err().1.contains("entry 2: \"alice\" is listed twice"));
        let plain = ChatConfig { users: vec![user("alice", "correct horse battery staple")] };
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
