//! A complete small image from a tiny tree, checked only with independent tools: sfdisk for the
//! table, fsck.fat/mtools for the ESP, objdump for the UKI, cryptsetup for the root partition.

mod common;

use std::path::Path;

use cloister_image::{
    build_uki, encrypt, format_luks, AssembleError, ImageWriter, Layout, LayoutUuids, LuksError, UkiSections,
    DEFAULT_STUB,
};
use common::*;

/// One test for both, because both call libcryptsetup: without its `mutex` feature the crate
/// panics when a second thread of the process (another test) calls it.
#[test]
fn full_image_passes_independent_checks_and_a_failed_one_leaves_nothing() {
    full_image_passes_independent_checks();
    failure_leaves_no_partial_output();
}

fn full_image_passes_independent_checks() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::plan(470, 64, LayoutUuids::random()).unwrap();
    let root = xfs_file(dir.path(), layout.root.size_bytes());

    let (linux, initrd, uki) =
        (dir.path().join("linux"), dir.path().join("initrd"), dir.path().join("uki.efi"));
    std::fs::write(&linux, vec![0x4c; 200_000]).unwrap();
    std::fs::write(&initrd, vec![0x49; 100_000]).unwrap();
    let sections =
        UkiSections { osrel: b"ID=cloister\n", cmdline: "console=ttyS0", linux: &linux, initrd: &initrd };
    build_uki(Path::new(DEFAULT_STUB), &sections, &uki).unwrap();

    let out = dir.path().join("cloister.img");
    let mut seen = 0u64;
    let mut progress = |done: u64, _total: u64| seen = done;
    let writer = ImageWriter::create(&out, &layout).unwrap();
    writer.write_esp(&[("EFI/BOOT/BOOTX64.EFI", &uki)]).unwrap();
    let header = format_luks(dir.path(), layout.root.size_bytes(), PASS, &WEAK_KDF).unwrap();
    let luks = encrypt(&root, writer.root_partition(), &header, Some(&mut progress)).unwrap();
    assert!(!out.exists(), "no image under the output name before it is finished");
    let summary = writer.finish().unwrap();
    assert_eq!(seen, layout.root.size_bytes() - 16 * MIB, "progress covers the data segment");
    assert_eq!(summary.bytes, std::fs::metadata(&out).unwrap().len());
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!names.iter().any(|n| n.to_string_lossy().contains(".tmp-")), "{names:?}");

    // The block map made while the image was synced is the one its final file gives.
    assert_eq!(summary.bmap, dir.path().join("cloister.img.bmap"));
    let again = cloister_image::write_bmap(&out, &dir.path().join("again.bmap")).unwrap();
    assert_eq!(cloister_image::read_bmap(&summary.bmap).unwrap(), again);
    assert!(again.mapped_bytes() > layout.root.size_bytes() - 16 * MIB, "the ciphertext is mapped");
    std::fs::remove_file(dir.path().join("again.bmap")).unwrap();

    let sum_line = std::fs::read_to_string(dir.path().join("cloister.img.sha256")).unwrap();
    assert_eq!(sum_line, format!("{}  cloister.img\n", summary.sha256));
    let check = std::process::Command::new("sha256sum")
        .args(["-c", "--status", "cloister.img.sha256"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(check.success(), "sha256sum -c disagrees with {}", summary.sha256);

    check_table(&out, &layout);
    check_esp(dir.path(), &out, &layout, &uki);
    check_root(dir.path(), &out, &layout, &luks.uuid.to_string());
}

fn check_table(out: &Path, layout: &Layout) {
    let json: serde_json::Value =
        serde_json::from_str(&ok("sfdisk", &["--json", out.to_str().unwrap()], None)).unwrap();
    let parts = json["partitiontable"]["partitions"].as_array().unwrap().clone();
    assert_eq!(json["partitiontable"]["label"], "gpt");
    assert_eq!(parts.len(), 2);
    for (p, plan) in parts.iter().zip([&layout.esp, &layout.root]) {
        assert_eq!(p["start"].as_u64().unwrap() % 2048, 0, "1 MiB aligned");
        assert_eq!(p["start"], plan.first_lba);
        assert_eq!(p["type"].as_str().unwrap().to_lowercase(), plan.type_guid.to_string());
        assert_eq!(p["uuid"].as_str().unwrap().to_lowercase(), plan.part_uuid.to_string());
    }
    assert_eq!(parts[0]["type"].as_str().unwrap(), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
    assert_eq!(parts[1]["type"].as_str().unwrap(), "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709");
    let verify = ok("sfdisk", &["--verify", out.to_str().unwrap()], None);
    assert!(verify.contains("No errors detected"), "{verify}");
}

fn check_esp(dir: &Path, out: &Path, layout: &Layout, uki: &Path) {
    let esp = dir.join("esp.part");
    extract(out, layout.esp.offset_bytes(), layout.esp.size_bytes(), &esp);
    let esp_s = esp.to_str().unwrap();
    ok("fsck.fat", &["-n", esp_s], None);
    let copied = dir.join("BOOTX64.EFI");
    ok("mcopy", &["-i", esp_s, "::/EFI/BOOT/BOOTX64.EFI", copied.to_str().unwrap()], None);
    assert_eq!(std::fs::read(&copied).unwrap(), std::fs::read(uki).unwrap());
    let heads = ok("objdump", &["-h", copied.to_str().unwrap()], None);
    for s in [".osrel", ".cmdline", ".linux", ".initrd"] {
        assert!(heads.contains(s), "{s} missing:\n{heads}");
    }
}

fn check_root(dir: &Path, out: &Path, layout: &Layout, luks_uuid: &str) {
    let part = dir.join("root.part");
    extract(out, layout.root.offset_bytes(), layout.root.size_bytes(), &part);
    let part_s = part.to_str().unwrap();
    let dump = ok("cryptsetup", &["luksDump", part_s], None);
    assert!(dump.contains(luks_uuid) && dump.contains("argon2id") && dump.contains("sector: 4096"), "{dump}");
    let test = |pass: &[u8]| {
        run("cryptsetup", &["open", "--test-passphrase", "--key-file", "-", part_s], Some(pass))
    };
    assert!(test(PASS).status.success());
    assert!(!test(b"nope").status.success());
}

#[test]
fn output_under_a_missing_directory_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::plan(40, 16, LayoutUuids::random()).unwrap();
    let out = dir.path().join("missing/cloister.img");
    let err = ImageWriter::create(&out, &layout).err().unwrap();
    assert!(matches!(err, AssembleError::Create { .. }), "{err}");
    assert!(err.to_string().contains(out.to_str().unwrap()), "{err}");
}

fn failure_leaves_no_partial_output() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::plan(40, 16, LayoutUuids::random()).unwrap();
    let root = dir.path().join("root");
    std::fs::File::create(&root).unwrap().set_len(layout.root.size_bytes()).unwrap();
    let out = dir.path().join("cloister.img");
    let header = format_luks(dir.path(), layout.root.size_bytes(), PASS, &WEAK_KDF).unwrap();
    let writer = ImageWriter::create(&out, &layout).unwrap();
    let err = encrypt(&root, writer.root_partition(), &header, None).unwrap_err();
    assert!(matches!(err, LuksError::PlainTooLarge { .. }), "{err}");
    drop(writer);
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["root"], "only the input is left");
}
