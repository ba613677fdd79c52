//! The block map against bmaptool itself: `bmaptool copy` must accept our `.bmap` (it checks
//! the file checksum and every range's SHA256) and reproduce the image, and our reader must
//! accept what `bmaptool create` writes for the same image.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use cloister_image::bmap::{read_bmap, write_bmap, BLOCK_SIZE};

const MIB: u64 = 1024 * 1024;

/// A sparse 64 MiB GPT disk with scattered data: a partial first block run, a run that ends
/// mid-block, and a single byte near the end.
fn sparse_image(path: &Path) {
    let f = OpenOptions::new().create_new(true).write(true).open(path).unwrap();
    f.set_len(64 * MIB).unwrap();
    drop(f);
    let mut sfdisk = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    sfdisk.stdin.take().unwrap().write_all(b"label: gpt\n,16M\n,\n").unwrap();
    assert!(sfdisk.wait().unwrap().success());
    let f = OpenOptions::new().write(true).open(path).unwrap();
    let pattern: Vec<u8> = (0..3 * MIB + 100).map(|i| (i * 7 % 251) as u8 + 1).collect();
    f.write_all_at(&pattern, 20 * MIB + 512).unwrap();
    f.write_all_at(b"x", 60 * MIB + 4095).unwrap();
    f.sync_all().unwrap();
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bmaptool_copies_the_image_with_our_map_and_checks_every_range() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    sparse_image(&image);
    let map_path = dir.path().join("disk.img.bmap");
    let bmap = write_bmap(&image, &map_path).unwrap();

    assert_eq!(bmap.image_size, 64 * MIB);
    assert_eq!(bmap.block_size, BLOCK_SIZE);
    // GPT at both ends, the data run (widened to whole blocks), the lone byte's block.
    let data_first = 20 * MIB / BLOCK_SIZE;
    let data_last = (20 * MIB + 512 + 3 * MIB + 100 - 1) / BLOCK_SIZE;
    assert!(bmap.ranges.iter().any(|r| r.first == data_first && r.last == data_last), "{:?}", bmap.ranges);
    assert!(bmap.ranges.iter().any(|r| r.first == 60 * MIB / BLOCK_SIZE && r.last == r.first));
    assert_eq!(bmap.ranges[0].first, 0);
    assert_eq!(bmap.ranges.last().unwrap().last, bmap.blocks_count - 1);
    assert!(bmap.mapped_bytes() < 4 * MIB, "mapped {} bytes", bmap.mapped_bytes());
    assert_eq!(read_bmap(&map_path).unwrap(), bmap);
    assert!(!dir.path().read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("tmp")));

    // Junk in the target proves bmaptool wrote (or zeroed) everything that matters.
    let target = dir.path().join("target.img");
    std::fs::write(&target, vec![0xa5u8; (64 * MIB) as usize]).unwrap();
    let log = run(Command::new("bmaptool").arg("copy").arg("--bmap").arg(&map_path).arg(&image).arg(&target));
    assert!(log.contains("synchronizing") || log.contains("copying time"), "{log}");
    run(Command::new("cmp").arg(&image).arg(&target));
}

#[test]
fn bmaptool_refuses_our_map_when_the_image_changed() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    sparse_image(&image);
    let map_path = dir.path().join("disk.img.bmap");
    write_bmap(&image, &map_path).unwrap();
    let f = OpenOptions::new().write(true).open(&image).unwrap();
    f.write_all_at(b"changed", 21 * MIB).unwrap();
    let target = dir.path().join("target.img");
    let out = Command::new("bmaptool")
        .arg("copy")
        .arg("--bmap")
        .arg(&map_path)
        .arg(&image)
        .arg(&target)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("checksum mismatch"));
}

#[test]
fn we_read_what_bmaptool_creates_and_agree_on_the_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    sparse_image(&image);
    let theirs_path = dir.path().join("theirs.bmap");
    run(Command::new("bmaptool").arg("create").arg("-o").arg(&theirs_path).arg(&image));
    let theirs = read_bmap(&theirs_path).unwrap();
    let ours = write_bmap(&image, &dir.path().join("ours.bmap")).unwrap();
    assert_eq!(theirs, ours);
}
