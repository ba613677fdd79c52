//! The kernel command line as PID 1 reads it: which consoles to talk on, where the root is, and
//! whether this is a real appliance boot. Pure parsing; reading `/proc/cmdline` is the caller's.

use std::path::PathBuf;

use cloister_proto::{CMDLINE_APPLIANCE, CMDLINE_ROOT};

/// Where the kernel command line lives.
pub const PROC_CMDLINE: &str = "/proc/cmdline";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("{CMDLINE_ROOT}= is missing from the kernel command line")]
    MissingRoot,
    #[error("{CMDLINE_ROOT}={0}: expected PARTUUID=<uuid>")]
    NotPartuuid(String),
    #[error("{CMDLINE_ROOT}={0}: not a uuid")]
    BadUuid(String),
}

/// The words of a kernel command line, in order.
#[derive(Debug, Clone, Default)]
pub struct Cmdline {
    words: Vec<String>,
}

/// The root partition named on the command line; the uuid is lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSpec {
    pub partuuid: String,
}

impl Cmdline {
    pub fn parse(text: &str) -> Cmdline {
        Cmdline { words: text.split_whitespace().map(str::to_owned).collect() }
    }

    /// Reads `/proc/cmdline`; an unreadable file counts as empty, which disables every
    /// machine-global action (the safe side).
    pub fn read() -> Cmdline {
        Cmdline::parse(&std::fs::read_to_string(PROC_CMDLINE).unwrap_or_default())
    }

    /// All values of `key=`, in order (the kernel lets later ones win, we keep them all).
    pub fn values<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.words.iter().filter_map(move |w| w.strip_prefix(key)?.strip_prefix('='))
    }

    pub fn has_flag(&self, flag: &str) -> bool {
        self.words.iter().any(|w| w == flag || w.strip_prefix(flag).is_some_and(|r| r.starts_with('=')))
    }

    pub fn is_appliance(&self) -> bool {
        self.has_flag(CMDLINE_APPLIANCE)
    }

    /// Device nodes of every `console=`, options after the comma dropped, duplicates removed;
    /// `/dev/console` when none is named. Names that are not plain device names are ignored.
    pub fn consoles(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = Vec::new();
        for value in self.values("console") {
            let name = value.split(',').next().unwrap_or_default();
            let plain = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            let path = PathBuf::from(format!("/dev/{name}"));
            if plain && !out.contains(&path) {
                out.push(path);
            }
        }
        if out.is_empty() {
            out.push(PathBuf::from("/dev/console"));
        }
        out
    }

    /// The last `cloister.root=` value, which must be `PARTUUID=<uuid>`.
    pub fn root(&self) -> Result<RootSpec, CmdlineError> {
        let value = self.values(CMDLINE_ROOT).last().ok_or(CmdlineError::MissingRoot)?;
        let uuid =
            value.strip_prefix("PARTUUID=").ok_or_else(|| CmdlineError::NotPartuuid(value.to_owned()))?;
        if !is_uuid(uuid) {
            return Err(CmdlineError::BadUuid(value.to_owned()));
        }
        Ok(RootSpec { partuuid: uuid.to_ascii_lowercase() })
    }
}

/// `8-4-4-4-12` hex digits.
pub fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    groups.len() == lens.len()
        && groups.iter().zip(lens).all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consoles_drop_options_and_duplicates() {
        let c = Cmdline::parse("quiet console=ttyS0,115200n8 console=tty1 console=ttyS0 root=x\n");
        assert_eq!(c.consoles(), vec![PathBuf::from("/dev/ttyS0"), PathBuf::from("/dev/tty1")]);
    }

    #[test]
    fn consoles_default_to_dev_console() {
        assert_eq!(Cmdline::parse("quiet").consoles(), vec![PathBuf::from("/dev/console")]);
        assert_eq!(Cmdline::parse("console=../x console=").consoles(), vec![PathBuf::from("/dev/console")]);
    }

    #[test]
    fn root_partuuid_is_parsed_and_lowercased() {
        let c = Cmdline::parse("console=ttyS0 cloister.root=PARTUUID=0FC63DAF-8483-4772-8E79-3D69D8477DE4");
        assert_eq!(c.root(), Ok(RootSpec { partuuid: "0fc63daf-8483-4772-8e79-3d69d8477de4".into() }));
    }

    #[test]
    fn root_errors_name_the_problem() {
        assert_eq!(Cmdline::parse("root=/dev/sda").root(), Err(CmdlineError::MissingRoot));
        assert_eq!(
            Cmdline::parse("cloister.root=/dev/vda2").root(),
            Err(CmdlineError::NotPartuuid("/dev/vda2".into()))
        );
        assert_eq!(
            Cmdline::parse("cloister.root=PARTUUID=1234").root(),
            Err(CmdlineError::BadUuid("PARTUUID=1234".into()))
        );
    }

    #[test]
    fn appliance_flag_is_a_whole_word() {
        assert!(Cmdline::parse("a cloister.appliance b").is_appliance());
        assert!(Cmdline::parse("cloister.appliance=1").is_appliance());
        assert!(!Cmdline::parse("cloister.appliancex nocloister.appliance").is_appliance());
    }
}
