//! GPT growth on sparse image files, checked by util-linux's sfdisk (an independent reader).

use super::*;
use std::path::Path;
use std::process::Command;

const ROOT: &str = "11111111-2222-4333-8444-555555555555";
const MIB: u64 = 1 << 20;

/// A 64 MiB image like the build's: an ESP and the root last, then the file extended to `mib`.
fn image(dir: &Path, mib: u64) -> std::path::PathBuf {
    let img = dir.join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(64 * MIB).unwrap();
    let script = format!(
        "label: gpt\nstart=2048, size=16384, type=U\nstart=18432, size=94208, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid={ROOT}\n"
    );
    crate::gpt::tests::sfdisk(&img, &script);
    std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len(mib * MIB).unwrap();
    img
}

fn sfdisk_json(img: &Path) -> serde_json::Value {
    let out = Command::new("sfdisk").arg("--json").arg(img).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn verify(img: &Path) -> (bool, String) {
    let out = Command::new("sfdisk").arg("--verify").arg(img).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && !text.contains("not on the end"), text)
}

fn grow(img: &Path) -> Option<Plan> {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(img).unwrap();
    let sectors = f.metadata().unwrap().len() / 512;
    let gpt = read(&f, 512, sectors).unwrap();
    let plan = plan(&gpt, sectors, ROOT).unwrap()?;
    apply(&f, &gpt, &plan).unwrap();
    Some(plan)
}

#[test]
fn grows_root_and_moves_backup_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 256);
    assert!(!verify(&img).0, "the extended image should have its backup in the middle");
    let plan = grow(&img).unwrap();
    assert_eq!(plan.old_bytes(512), 46 * MIB);
    // 256 MiB minus the backup's 33 sectors, rounded down to a MiB: the root ends at 255 MiB.
    assert_eq!(plan.new_bytes(512), (255 - 9) * MIB);
    let (ok, text) = verify(&img);
    assert!(ok, "sfdisk --verify: {text}");
    let json = sfdisk_json(&img);
    let table = &json["partitiontable"];
    assert_eq!(table["lastlba"], 256 * 2048 - 34);
    let root = &table["partitions"][1];
    assert_eq!(root["start"], 18432);
    assert_eq!(root["size"], (255 - 9) * 2048);
    assert_eq!(root["uuid"].as_str().unwrap().to_lowercase(), ROOT);
    assert_eq!(table["partitions"][0]["size"], 16384, "the esp must not change");
    assert_eq!(grow(&img), None, "a second run must find nothing to do");
}

#[test]
fn disk_that_already_fills_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 256);
    grow(&img).unwrap();
    let before = std::fs::read(&img).unwrap();
    assert_eq!(grow(&img), None);
    assert!(std::fs::read(&img).unwrap() == before, "bytes changed on a disk with nothing to do");
}

#[test]
fn root_that_is_not_last_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(64 * MIB).unwrap();
    crate::gpt::tests::sfdisk(
        &img,
        &format!("label: gpt\nstart=2048, size=4096, uuid={ROOT}\nstart=8192, size=4096\n"),
    );
    std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len(128 * MIB).unwrap();
    let f = std::fs::File::open(&img).unwrap();
    let gpt = read(&f, 512, 128 * 2048).unwrap();
    assert!(matches!(plan(&gpt, 128 * 2048, ROOT), Err(TableError::NotLast(1))));
}

/// The state a cut leaves between steps 1 and 2 (new backup written, primary old) reads as the
/// old layout; a torn step 2 (root entry written, primary header not) reads from the new backup
/// as the grown layout, and the next run repairs the primary.
#[test]
fn power_cut_states_keep_a_valid_gpt_and_the_next_run_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 256);
    let grown = dir.path().join("grown.img");
    std::fs::copy(&img, &grown).unwrap();
    grow(&grown).unwrap();
    let new = std::fs::read(&grown).unwrap();
    let old = std::fs::read(&img).unwrap();
    let tail = (256 * MIB - 33 * 512) as usize;

    let mut cut1 = old.clone();
    cut1[tail..].copy_from_slice(&new[tail..]);
    std::fs::write(&img, &cut1).unwrap();
    assert_eq!(sfdisk_json(&img)["partitiontable"]["partitions"][1]["size"], 94208);

    let mut cut2 = cut1.clone();
    cut2[1024..1536].copy_from_slice(&new[1024..1536]); // the entry sector, not the header
    std::fs::write(&img, &cut2).unwrap();
    assert_eq!(sfdisk_json(&img)["partitiontable"]["partitions"][1]["size"], (255 - 9) * 2048);
    assert!(grow(&img).is_some(), "the damaged primary must be rewritten");
    let (ok, text) = verify(&img);
    assert!(ok, "sfdisk --verify after repair: {text}");
    assert_eq!(grow(&img), None);
}
