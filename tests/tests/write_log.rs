//! The write log reader (`cloister_tests::writelog`) against the log QEMU itself writes: a VM
//! held before its firmware runs gets writes through QEMU's own `qemu-io` (HMP), and the log
//! read back on the host holds exactly those writes, with their data, in order.

use anyhow::{ensure, Result};
use cloister_qemu::{Firmware, Vm, VmConfig};
use cloister_tests::writelog::{Kind, Replay, WriteLog};
use cloister_tests::Host;
use serde_json::json;

#[test]
fn the_reader_reads_what_qemus_blklogwrites_wrote() -> Result<()> {
    let Some(_host) = Host::from_env("write_log") else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)?.set_len(8 << 20)?;
    let log = dir.path().join("writes.log");
    let config =
        VmConfig { write_log: Some(log.clone()), ..VmConfig::new(&disk, Firmware::find()?, dir.path()) };
    let vm = Vm::start(config)?;
    // Paused at once: OVMF never gets to touch the disk, only our writes reach the log.
    vm.qmp("stop", json!({}))?;
    let before = WriteLog::open(&log).map(|l| l.entries.len()).unwrap_or(0);
    for line in [
        "qemu-io disk0 \"write -P 0xab 4096 8k\"",
        "qemu-io disk0 flush",
        "qemu-io disk0 \"write -P 0xcd 0 512\"",
        "qemu-io disk0 flush",
    ] {
        vm.qmp("human-monitor-command", json!({ "command-line": line }))?;
    }
    vm.kill()?;
    let mut wl = WriteLog::open(&log)?;
    let ours: Vec<_> = wl.entries[before..].to_vec();
    let kinds: Vec<Kind> = ours.iter().map(|e| e.kind).collect();
    ensure!(kinds == [Kind::Write, Kind::Flush, Kind::Write, Kind::Flush], "entries: {ours:?}");
    ensure!(ours[0].disk == (4096..12288) && ours[2].disk == (0..512), "ranges: {ours:?}");
    let mut replay = Replay::from_disk(&disk, 0..16384)?;
    replay.bytes.fill(0);
    for entry in &ours {
        let data = wl.data(entry)?;
        replay.apply(entry, &data, None);
    }
    ensure!(replay.bytes == std::fs::read(&disk)?[..16384], "the replay differs from the disk QEMU wrote");
    ensure!(
        replay.bytes[..512].iter().all(|b| *b == 0xcd)
            && replay.bytes[4096..12288].iter().all(|b| *b == 0xab)
    );
    Ok(())
}
