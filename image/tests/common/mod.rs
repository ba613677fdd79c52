//! Helpers shared by the integration tests: a small root tree, running host tools, and reading
//! byte ranges out of images.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use cloister_image::{mkfs_xfs, write_protofile, KdfParams};
use cloister_rootfs::tree::{Kind, Node, Tree};

pub const MIB: u64 = 1024 * 1024;
pub const MARKER: &[u8] = b"cloister-known-content-5b8e2c9a";
pub const PASS: &[u8] = b"correct horse battery staple";
pub const WEAK_KDF: KdfParams =
    KdfParams { memory_kib: 32 * 1024, time_ms: 100, iterations: Some(4), parallel: 1 };

/// A tiny root: a known file, a setuid binary, a device node, a symlink.
pub fn small_tree(dir: &Path) -> Tree {
    let mut t = Tree::new(dir.join("staging")).unwrap();
    let mut known = MARKER.to_vec();
    known.extend(std::iter::repeat_n(b'x', 10_000));
    t.write_file("etc/known", &known, Node::file(0o644)).unwrap();
    t.write_file("usr/bin/tool", b"#!/bin/true\n", Node::file(0o4755)).unwrap();
    t.insert("dev/console", Node { kind: Kind::CharDev { major: 5, minor: 1 }, mode: 0o600, uid: 0, gid: 0 })
        .unwrap();
    t.insert("bin", Node::symlink("usr/bin")).unwrap();
    t
}

/// A plain XFS made from `small_tree`, sized to fill the data segment of a LUKS2 partition of
/// `partition_bytes` (the partition minus the 16 MiB header).
pub fn xfs_file(dir: &Path, partition_bytes: u64) -> std::path::PathBuf {
    let tree = small_tree(dir);
    let proto = dir.join("proto");
    write_protofile(&tree, &proto).unwrap();
    let img = dir.join("root.xfs");
    let xfs_bytes = partition_bytes - cloister_image::LUKS_RESERVE_BYTES;
    File::create(&img).unwrap().set_len(xfs_bytes).unwrap();
    mkfs_xfs(&proto, &img, xfs_bytes, "root", None).unwrap();
    img
}

/// Encrypts `plain` into a new partition file `part` of `bytes`.
pub fn encrypt_to_file(
    plain: &Path,
    part: &Path,
    bytes: u64,
    progress: Option<&mut dyn FnMut(u64, u64)>,
) -> Result<cloister_image::LuksInfo, cloister_image::LuksError> {
    let file = File::create_new(part).unwrap();
    file.set_len(bytes).unwrap();
    let partition = cloister_image::Partition { file: &file, path: part, offset: 0, bytes };
    let dir = part.parent().unwrap();
    let header = cloister_image::format_luks(dir, bytes, PASS, &WEAK_KDF)?;
    cloister_image::encrypt(plain, partition, &header, progress)
}

pub fn run(cmd: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(cmd)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

pub fn ok(cmd: &str, args: &[&str], stdin: Option<&[u8]>) -> String {
    let out = run(cmd, args, stdin);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Copies `len` bytes at `offset` of `from` into a new file `to` (holes stay holes).
pub fn extract(from: &Path, offset: u64, len: u64, to: &Path) {
    let mut src = File::open(from).unwrap();
    let mut dst = File::create(to).unwrap();
    dst.set_len(len).unwrap();
    src.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(MIB) as usize;
        src.read_exact(&mut buf[..n]).unwrap();
        if buf[..n].iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(done)).unwrap();
            dst.write_all(&buf[..n]).unwrap();
        }
        done += n as u64;
    }
}

/// How many `align`-aligned blocks of the file start with `magic` (XFS superblocks are
/// sector-aligned; an unaligned scan of ciphertext would find 4-byte magics by chance).
pub fn aligned_magic_count(path: &Path, magic: &[u8], align: usize) -> usize {
    let mut f = File::open(path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut count = 0;
    loop {
        let n = read_full(&mut f, &mut buf);
        if n == 0 {
            return count;
        }
        count += buf[..n].chunks(align).filter(|c| c.starts_with(magic)).count();
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}
