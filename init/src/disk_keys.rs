//! Disk passphrases, PID 1's side: a child process (`cloister-init --disk`), because the KDF is
//! slow on purpose and a keyslot change is risky work. It reads one [`DiskChange`] as a JSON
//! line on stdin, then its secret lines (add: the current and the new passphrase; remove: the
//! passphrase to remove), prints one JSON object and exits 0 (done), 1 (refused: `error` says
//! why, nothing changed) or 2 (failed).
//!
//! Every LUKS container the appliance opened is checked before any is changed: a wrong current
//! passphrase, or a removal that would leave a container without a passphrase, refuses the
//! whole change. New keyslots take the KDF (type, iterations, memory, threads) of the keyslot
//! the current passphrase opened, which is what the image was built with: no benchmark runs on
//! the appliance. An added passphrase is proved by opening each container again from a freshly
//! read header before the answer says it worked. libcryptsetup writes LUKS2's two header copies
//! one after the other with a sequence number, so a power cut leaves the old header or the new
//! one: the disk opens with the old passphrases, or with the old and the new.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use libcryptsetup_rs::consts::flags::CryptPbkdf;
use libcryptsetup_rs::consts::vals::{EncryptionFormat, KeyslotInfo};
use libcryptsetup_rs::CryptKeyslotHandle;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::unlock::Luks;

pub const DISK_ARG: &str = "--disk";

/// One change of the disk passphrases, as PID 1 hands it to the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DiskChange {
    PassphraseAdd,
    PassphraseRemove,
}

impl DiskChange {
    /// Secret lines that follow the request: add takes the current and the new passphrase.
    pub fn secret_lines(self) -> usize {
        match self {
            DiskChange::PassphraseAdd => 2,
            DiskChange::PassphraseRemove => 1,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskKeyError {
    #[error("{0}")]
    Refused(String),
    #[error("the disk passphrases cannot be changed: {0}")]
    Failed(String),
}

use DiskKeyError::{Failed, Refused};

fn open(path: &Path) -> Result<Luks, DiskKeyError> {
    Luks::open(path).map_err(|e| Failed(e.to_string()))
}

fn slot_of(luks: &mut Luks, passphrase: &[u8]) -> Result<Option<u32>, DiskKeyError> {
    luks.slot_of(passphrase).map_err(|e| Failed(e.to_string()))
}

/// The keyslots that hold the volume key.
fn active_slots(keyslots: &mut CryptKeyslotHandle<'_>) -> Result<Vec<u32>, DiskKeyError> {
    let max = CryptKeyslotHandle::max_keyslots(EncryptionFormat::Luks2).map_err(|e| Failed(e.to_string()))?;
    let mut active = Vec::new();
    for slot in 0..max {
        match keyslots.status(slot) {
            Ok(KeyslotInfo::Active | KeyslotInfo::ActiveLast) => active.push(slot),
            Ok(_) => {}
            Err(e) => return Err(Failed(format!("keyslot {slot}: {e}"))),
        }
    }
    Ok(active)
}

/// Adds `new` to every container that `current` opens; refused, with nothing changed, unless
/// `current` opens all of them.
pub fn add(containers: &[PathBuf], current: &str, new: &str) -> Result<Value, DiskKeyError> {
    cloister_proto::disk::check_new_passphrase(current, new).map_err(Refused)?;
    let mut opened = Vec::with_capacity(containers.len());
    for path in containers {
        let mut luks = open(path)?;
        let Some(slot) = slot_of(&mut luks, current.as_bytes())? else {
            return Err(Refused(format!("the current passphrase does not open {}", path.display())));
        };
        if slot_of(&mut luks, new.as_bytes())?.is_some() {
            return Err(Refused(format!("the new passphrase opens {} already", path.display())));
        }
        opened.push((path, luks, slot));
    }
    let mut added = Vec::new();
    for (path, luks, slot) in &mut opened {
        let device = luks.device();
        let shown = path.display().to_string();
        let fail = |what: &'static str| {
            let shown = shown.clone();
            move |e: libcryptsetup_rs::LibcryptErr| Failed(format!("{shown}: {what}: {e}"))
        };
        let mut kdf = device.keyslot_handle().get_pbkdf(*slot).map_err(fail("read the keyslot's kdf"))?;
        kdf.flags |= CryptPbkdf::NO_BENCHMARK;
        kdf.time_ms = 0;
        device.settings_handle().set_pbkdf_type(&kdf).map_err(fail("set the kdf"))?;
        let new_slot = device
            .keyslot_handle()
            .add_by_passphrase(None, current.as_bytes(), new.as_bytes())
            .map_err(fail("add a keyslot"))?;
        added.push(json!({ "container": path.display().to_string(), "keyslot": new_slot }));
    }
    for path in containers {
        if slot_of(&mut open(path)?, new.as_bytes())?.is_none() {
            return Err(Failed(format!(
                "the new passphrase does not open {} after adding it",
                path.display()
            )));
        }
    }
    Ok(json!({ "added": added }))
}

/// Removes `passphrase` from every container; refused, with nothing changed, when it does not
/// open one of them or one would be left without a passphrase.
pub fn remove(containers: &[PathBuf], passphrase: &str) -> Result<Value, DiskKeyError> {
    let mut opened = Vec::with_capacity(containers.len());
    for path in containers {
        let mut luks = open(path)?;
        let Some(slot) = slot_of(&mut luks, passphrase.as_bytes())? else {
            return Err(Refused(format!("that passphrase does not open {}", path.display())));
        };
        if active_slots(&mut luks.device().keyslot_handle())?.len() <= 1 {
            return Err(Refused(format!(
                "that is the last passphrase of {}; add another one first",
                path.display()
            )));
        }
        opened.push((path, luks, slot));
    }
    let mut removed = Vec::new();
    for (path, luks, slot) in &mut opened {
        luks.device()
            .keyslot_handle()
            .destroy(*slot)
            .map_err(|e| Failed(format!("{}: destroy keyslot {slot}: {e}", path.display())))?;
        removed.push(json!({ "container": path.display().to_string(), "keyslot": *slot }));
    }
    for path in containers {
        let mut luks = open(path)?;
        if slot_of(&mut luks, passphrase.as_bytes())?.is_some() {
            return Err(Failed(format!(
                "{} still opens with it (it had more than one keyslot)",
                path.display()
            )));
        }
    }
    Ok(json!({ "removed": removed }))
}

/// The LUKS containers of this boot: the one under the root mapping.
fn containers() -> Result<Vec<PathBuf>, DiskKeyError> {
    let root = crate::unlock::device_of(cloister_proto::ROOT_MAPPING).map_err(|e| Failed(e.to_string()))?;
    Ok(vec![root])
}

/// `cloister-init --disk`: a [`DiskChange`] and its secret lines on stdin, one JSON object out.
pub fn run_mode() -> ! {
    let mut input = std::io::Read::take(std::io::stdin().lock(), 16 * 1024);
    let mut first = String::new();
    let change = input
        .read_line(&mut first)
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_str::<DiskChange>(&first).map_err(|e| e.to_string()));
    let outcome = match change {
        Err(e) => Err(Failed(format!("bad request: {e}"))),
        Ok(change) => read_secrets(&mut input, change.secret_lines()).and_then(|secrets| {
            // libcryptsetup locks metadata under this directory; stage 1's went with its /run.
            crate::mounts::make_dir(crate::unlock::LOCK_DIR, 0o700)
                .map_err(|e| Failed(format!("{}: {e}", crate::unlock::LOCK_DIR)))?;
            let containers = containers()?;
            match (change, &secrets[..]) {
                (DiskChange::PassphraseAdd, [current, new]) => add(&containers, current, new),
                (DiskChange::PassphraseRemove, [passphrase]) => remove(&containers, passphrase),
                _ => Err(Failed("bad request: wrong number of lines".into())),
            }
        }),
    };
    let (answer, code) = match outcome {
        Ok(mut v) => {
            v["ok"] = Value::Bool(true);
            (v, 0)
        }
        Err(e @ Refused(_)) => (json!({ "ok": false, "error": e.to_string() }), 1),
        Err(e) => (json!({ "ok": false, "error": e.to_string() }), 2),
    };
    println!("{answer}");
    std::process::exit(code)
}

fn read_secrets(input: &mut impl BufRead, count: usize) -> Result<Vec<Zeroizing<String>>, DiskKeyError> {
    let mut secrets = Vec::with_capacity(count);
    for _ in 0..count {
        let mut line = Zeroizing::new(String::new());
        input.read_line(&mut line).map_err(|e| Failed(format!("reading a passphrase: {e}")))?;
        let Some(text) = line.strip_suffix('\n') else {
            return Err(Failed("bad request: a passphrase line is missing".into()));
        };
        secrets.push(Zeroizing::new(text.to_string()));
    }
    Ok(secrets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    const FIRST: &str = "the first passphrase";
    const SECOND: &str = "a second passphrase";

    /// A LUKS2 container file with one passphrase and a cheap KDF (no dm: only headers change).
    fn container(dir: &Path, name: &str, passphrase: &str) -> PathBuf {
        let img = dir.join(name);
        std::fs::File::create(&img).unwrap().set_len(32 << 20).unwrap();
        let mut child = Command::new("cryptsetup")
            .args(["luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2"])
            .args(["--pbkdf-force-iterations", "1000", "--key-file", "-"])
            .arg(&img)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(passphrase.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
        img
    }

    fn opens(path: &Path, passphrase: &str) -> bool {
        slot_of(&mut open(path).unwrap(), passphrase.as_bytes()).unwrap().is_some()
    }

    fn header(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()[..16 << 20].to_vec()
    }

    #[test]
    fn an_added_passphrase_opens_every_container_beside_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let disks = [container(dir.path(), "a", FIRST), container(dir.path(), "b", FIRST)];
        let answer = add(&disks, FIRST, SECOND).unwrap();
        assert_eq!(answer["added"].as_array().unwrap().len(), 2);
        for disk in &disks {
            assert!(opens(disk, FIRST) && opens(disk, SECOND));
            let kdf = open(disk).unwrap().device().keyslot_handle().get_pbkdf(1).unwrap();
            assert_eq!(kdf.iterations, 1000, "the new keyslot's kdf is not the image's");
        }
        let again = add(&disks, FIRST, SECOND).unwrap_err();
        assert!(again.to_string().contains("opens") && again.to_string().contains("already"), "{again}");
    }

    /// One container the current passphrase does not open: nothing is changed anywhere.
    #[test]
    fn every_container_is_checked_before_any_changes() {
        let dir = tempfile::tempdir().unwrap();
        let disks = [container(dir.path(), "a", FIRST), container(dir.path(), "b", "something else")];
        let before = [header(&disks[0]), header(&disks[1])];
        let e = add(&disks, FIRST, SECOND).unwrap_err();
        assert!(matches!(e, Refused(ref why) if why.contains("does not open")), "{e}");
        assert_eq!([header(&disks[0]), header(&disks[1])], before);
        let e = remove(&disks, FIRST).unwrap_err();
        assert!(matches!(e, Refused(_)), "{e}");
        assert_eq!([header(&disks[0]), header(&disks[1])], before);
    }

    #[test]
    fn the_last_passphrase_stays() {
        let dir = tempfile::tempdir().unwrap();
        let disks = [container(dir.path(), "a", FIRST)];
        let before = header(&disks[0]);
        let e = remove(&disks, FIRST).unwrap_err();
        assert_eq!(
            e,
            Refused(format!("that is the last passphrase of {}; add another one first", disks[0].display()))
        );
        assert_eq!(header(&disks[0]), before);
        add(&disks, FIRST, SECOND).unwrap();
        remove(&disks, FIRST).unwrap();
        assert!(!opens(&disks[0], FIRST) && opens(&disks[0], SECOND));
        assert!(matches!(remove(&disks, SECOND), Err(Refused(_))));
        assert!(opens(&disks[0], SECOND));
    }

    #[test]
    fn weak_or_malformed_new_passphrases_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let disks = [container(dir.path(), "a", FIRST)];
        for bad in ["short", "twelve\tchars!", FIRST] {
            assert!(matches!(add(&disks, FIRST, bad), Err(Refused(_))), "{bad:?}");
        }
        let mut input: &[u8] = b"one\n";
        assert!(read_secrets(&mut input, 2).is_err(), "a missing line must not pass as empty");
        let mut input: &[u8] = b"one\ntwo\n";
        let got = read_secrets(&mut input, 2).unwrap();
        assert_eq!((got[0].as_str(), got[1].as_str()), ("one", "two"));
    }
}
