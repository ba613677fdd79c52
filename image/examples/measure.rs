//! Times the root-partition phases (protofile + mkfs.xfs, LUKS2 encryption into a partition file
//! with a weak KDF, and the encryption's data pass alone) for a partition of the size given in
//! MiB (default 900),
//! in the directory given (default a temp dir under /var/tmp).
//! `cargo run --release -p cloister-image --example measure -- 900 DIR`.

use std::path::PathBuf;
use std::time::Instant;

use cloister_image::{
    encrypt, format_luks, mkfs_xfs, write_protofile, KdfParams, Partition, LUKS_RESERVE_BYTES,
};
use cloister_rootfs::tree::{Node, Tree};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(900);
    let dir = PathBuf::from(
        args.next().unwrap_or_else(|| format!("/var/tmp/cloister-measure-{}", std::process::id())),
    );
    std::fs::create_dir_all(&dir)?;
    let mut tree = Tree::new(dir.join("staging"))?;
    tree.write_file("etc/hostname", b"cloister\n", Node::file(0o644))?;
    let bytes = mib * 1024 * 1024;
    let plain = dir.join("root.xfs");
    std::fs::File::create(&plain)?.set_len(bytes - LUKS_RESERVE_BYTES)?;
    let img = dir.join("root.part");
    let out = std::fs::File::create(&img)?;
    out.set_len(bytes)?;

    let t = Instant::now();
    write_protofile(&tree, &dir.join("proto"))?;
    mkfs_xfs(&dir.join("proto"), &plain, bytes - LUKS_RESERVE_BYTES, "root", None)?;
    let mkfs = t.elapsed().as_secs_f64();

    let kdf = KdfParams { memory_kib: 32 * 1024, time_ms: 100, iterations: Some(4), parallel: 1 };
    // The data pass alone, first to last progress report, as the builder's bench measures it.
    let mut span: Option<(Instant, Instant)> = None;
    let mut report = |_: u64, _: u64| {
        let now = Instant::now();
        span = Some((span.map_or(now, |(first, _)| first), now));
    };
    let t = Instant::now();
    let partition = Partition { file: &out, path: &img, offset: 0, bytes };
    let header = format_luks(&dir, bytes, b"measure", &kdf)?;
    encrypt(&plain, partition, &header, Some(&mut report))?;
    let luks = t.elapsed().as_secs_f64();
    let pass = span.map_or(0.0, |(first, last)| (last - first).as_secs_f64());
    let data_mb = (bytes - LUKS_RESERVE_BYTES) as f64 / 1e6;
    println!(
        "size {mib} MiB: mkfs {mkfs:.3} s, luks {luks:.3} s, data pass {pass:.3} s = {:.0} MB/s",
        data_mb / pass
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
