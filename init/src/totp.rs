//! The second login factor: TOTP as every authenticator app computes it (RFC 6238: HMAC-SHA1,
//! 6 digits, 30-second steps), a code accepted one step early or late for clock drift, and
//! never twice: the step of the last accepted code is kept, and only a later step passes.
//!
//! Each enrolled account has one file in the store (`/var/lib/cloister/totp/<uid>` on the
//! encrypted root; directory 0700, files 0600, root's): `secret <base32>` and `last <step>`.
//! Nothing else on the appliance reads it: the session and control sockets ask PID 1, which
//! checks codes here. A secret leaves PID 1 once, as the enrolment's `otpauth://` URI.

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use data_encoding::BASE32_NOPAD;
use totp_rs::{Algorithm, Builder};
use zeroize::Zeroizing;

/// RFC 4226 recommends 160 bits; every app takes them.
const SECRET_BYTES: usize = 20;
const DIGITS: u8 = 6;
const STEP_SECS: u64 = 30;
/// What the authenticator app shows above the account's codes.
const ISSUER: &str = "Cloister";

/// A TOTP secret; wiped when dropped.
pub struct Secret(Zeroizing<[u8; SECRET_BYTES]>);

/// How a code compared with an account's secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Right, and from a step later than the last accepted one: that step is now used up.
    Accepted {
        step: u64,
    },
    /// Right, but its step (or a later one) was accepted before.
    Reused,
    Wrong,
}

impl Secret {
    pub fn generate() -> Result<Self, String> {
        let mut bytes = Zeroizing::new([0u8; SECRET_BYTES]);
        getrandom::fill(&mut bytes[..]).map_err(|e| format!("random: {e}"))?;
        Ok(Secret(bytes))
    }

    fn from_base32(text: &str) -> Option<Self> {
        let decoded = Zeroizing::new(BASE32_NOPAD.decode(text.as_bytes()).ok()?);
        let mut bytes = Zeroizing::new([0u8; SECRET_BYTES]);
        (decoded.len() == SECRET_BYTES).then(|| {
            bytes.copy_from_slice(&decoded);
            Secret(bytes)
        })
    }

    fn base32(&self) -> Zeroizing<String> {
        Zeroizing::new(BASE32_NOPAD.encode(&self.0[..]))
    }

    /// What an authenticator app scans to enrol: `account` is a login name (letters, digits,
    /// `-` and `_`: nothing to escape). SHA1, 6 digits and 30 s are the key URI format's
    /// defaults, and apps take the issuer from the label's prefix: all left out, so that the
    /// QR code of a name of up to 16 characters fits an 80x24 terminal.
    pub fn uri(&self, account: &str) -> Zeroizing<String> {
        Zeroizing::new(format!("otpauth://totp/{ISSUER}:{account}?secret={}", self.base32().as_str()))
    }

    /// The step `code` belongs to, if it is this secret's code within one step of `now`.
    fn step_of(&self, code: &str, now: u64) -> Option<u64> {
        if code.len() != usize::from(DIGITS) || !code.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let totp = Builder::new()
            .with_algorithm(Algorithm::SHA1)
            .with_digits(DIGITS)
            .with_skew(1)
            .with_step_duration(STEP_SECS)
            .with_secret(*self.0)
            .build()
            .ok()?;
        totp.check(code, now)
    }

    /// `code` judged at `now` against the last step accepted (`None`: none yet).
    pub fn judge(&self, code: &str, now: u64, last_step: Option<u64>) -> Verdict {
        match self.step_of(code, now) {
            None => Verdict::Wrong,
            Some(step) if last_step.is_some_and(|last| step <= last) => Verdict::Reused,
            Some(step) => Verdict::Accepted { step },
        }
    }
}

/// An enrolled account: its secret and the step of the last code it logged in with.
pub struct Enrolment {
    pub secret: Secret,
    pub last_step: Option<u64>,
}

/// Seconds since 1970 by the system clock.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The enrolments, one file per uid.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Store { dir: dir.into() }
    }

    fn path(&self, uid: u32) -> PathBuf {
        self.dir.join(uid.to_string())
    }

    /// `None`: the account has no second factor. A file that does not parse is an error, so
    /// that a damaged store locks the account out instead of dropping its second factor.
    pub fn load(&self, uid: u32) -> Result<Option<Enrolment>, String> {
        let text = match std::fs::read_to_string(self.path(uid)) {
            Ok(text) => Zeroizing::new(text),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("read the second factor of uid {uid}: {e}")),
        };
        parse(&text).map(Some).ok_or_else(|| format!("the second factor of uid {uid} is damaged"))
    }

    /// Replaces the account's file whole (a power cut leaves the old or the new one).
    pub fn save(&self, uid: u32, enrolment: &Enrolment) -> Result<(), String> {
        let fail = |e: std::io::Error| format!("save the second factor of uid {uid}: {e}");
        std::fs::create_dir_all(&self.dir).map_err(fail)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
        let mut text = Zeroizing::new(format!("secret {}\n", enrolment.secret.base32().as_str()));
        if let Some(step) = enrolment.last_step {
            text.push_str(&format!("last {step}\n"));
        }
        crate::passwd::write_replacing(&self.path(uid), &text, 0o600).map_err(fail)
    }

    /// Drops the account's second factor (the account is removed, or its admin reset it).
    pub fn remove(&self, uid: u32) -> Result<bool, String> {
        match std::fs::remove_file(self.path(uid)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(format!("remove the second factor of uid {uid}: {e}")),
        }
    }

    /// Checks a login code of an enrolled account and, when it passes, records its step.
    pub fn check_login(&self, uid: u32, enrolment: &mut Enrolment, code: &str) -> Result<Verdict, String> {
        let verdict = enrolment.secret.judge(code, now(), enrolment.last_step);
        if let Verdict::Accepted { step } = verdict {
            enrolment.last_step = Some(step);
            self.save(uid, enrolment)?;
        }
        Ok(verdict)
    }
}

fn parse(text: &str) -> Option<Enrolment> {
    let (mut secret, mut last_step) = (None, None);
    for line in text.lines() {
        match line.split_once(' ')? {
            ("secret", value) if secret.is_none() => secret = Some(Secret::from_base32(value)?),
            ("last", value) if last_step.is_none() => last_step = Some(value.parse().ok()?),
            _ => return None,
        }
    }
    Some(Enrolment { secret: secret?, last_step })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// RFC 6238's SHA1 secret and its published 8-digit codes, cut to the 6 digits apps show.
    fn rfc_secret() -> Secret {
        let mut bytes = Zeroizing::new([0u8; SECRET_BYTES]);
        bytes.copy_from_slice(b"12345678901234567890");
        Secret(bytes)
    }

    #[test]
    fn codes_match_rfc_6238() {
        let secret = rfc_secret();
        for (time, code) in [(59, "287082"), (1_111_111_109, "081804"), (1_234_567_890, "005924")] {
            assert_eq!(secret.step_of(code, time), Some(time / STEP_SECS), "{time}");
        }
    }

    #[test]
    fn one_step_of_drift_either_way_and_no_more() {
        let secret = rfc_secret();
        let code = "081804"; // step 37037036
        let at = 1_111_111_109;
        assert!(matches!(secret.judge(code, at + 30, None), Verdict::Accepted { .. }));
        assert!(matches!(secret.judge(code, at - 30, None), Verdict::Accepted { .. }));
        assert_eq!(secret.judge(code, at + 61, None), Verdict::Wrong);
        assert_eq!(secret.judge(code, at - 61, None), Verdict::Wrong);
    }

    #[test]
    fn a_step_is_accepted_once() {
        let secret = rfc_secret();
        let at = 1_111_111_109;
        let Verdict::Accepted { step } = secret.judge("081804", at, None) else { panic!() };
        assert_eq!(secret.judge("081804", at, Some(step)), Verdict::Reused);
        assert_eq!(secret.judge("081804", at, Some(step + 1)), Verdict::Reused);
        assert!(matches!(secret.judge("081804", at, Some(step - 1)), Verdict::Accepted { .. }));
    }

    #[test]
    fn malformed_codes_are_wrong() {
        let secret = rfc_secret();
        for bad in ["", "08180", "0818045", "08180a", "+81804", " 81804", "٠٨١٨٠٤"] {
            assert_eq!(secret.judge(bad, 1_111_111_109, None), Verdict::Wrong, "{bad:?}");
        }
    }

    #[test]
    fn the_store_keeps_the_secret_and_the_last_step() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("totp"));
        assert!(store.load(2001).unwrap().is_none());
        let secret = Secret::generate().unwrap();
        let uri = secret.uri("alice");
        store.save(2001, &Enrolment { secret, last_step: None }).unwrap();
        let mut loaded = store.load(2001).unwrap().unwrap();
        assert_eq!(loaded.secret.uri("alice").as_str(), uri.as_str());
        assert_eq!(loaded.last_step, None);
        loaded.last_step = Some(42);
        store.save(2001, &loaded).unwrap();
        assert_eq!(store.load(2001).unwrap().unwrap().last_step, Some(42));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("totp")), 0o700);
        assert_eq!(mode(&dir.path().join("totp/2001")), 0o600);
        assert!(store.remove(2001).unwrap());
        assert!(!store.remove(2001).unwrap());
        assert!(store.load(2001).unwrap().is_none());
    }

    #[test]
    fn a_damaged_file_is_an_error_not_an_empty_enrolment() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        for bad in ["", "secret\n", "secret AAAA\n", "secret x y\n", "last 3\n", "secret A\nsecret B\n"] {
            std::fs::write(dir.path().join("7"), bad).unwrap();
            assert!(store.load(7).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_uri_is_what_apps_scan() {
        let uri = rfc_secret().uri("alice");
        assert_eq!(uri.as_str(), "otpauth://totp/Cloister:alice?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
        // Version 5 at level M, 23 lines: an 80x24 terminal shows it whole.
        let rows = cloister_qr::lines(rfc_secret().uri(&"a".repeat(16)).as_str());
        assert_eq!(rows.len(), 23);
    }
}
