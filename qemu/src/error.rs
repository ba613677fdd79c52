//! The crate's error type: one variant per operation that can fail, naming what it acted on.

use std::path::PathBuf;
use std::time::Duration;

/// Errors from finding firmware, starting QEMU and driving a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("OVMF firmware not found; install ovmf or pass --firmware PATH")]
    FirmwareNotFound,
    #[error("firmware code image {path} not found")]
    FirmwareCode { path: PathBuf },
    #[error("no OVMF variable store for {code}: expected {expected}")]
    FirmwareVars { code: PathBuf, expected: PathBuf },
    #[error("create work dir {path}: {source}")]
    WorkDir { path: PathBuf, source: std::io::Error },
    #[error("copy OVMF variable store {from} to {to}: {source}")]
    CopyVars { from: PathBuf, to: PathBuf, source: std::io::Error },
    #[error("create log {path}: {source}")]
    Log { path: PathBuf, source: std::io::Error },
    #[error("start {program} (is qemu-system-x86 installed?): {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("timed out after {timeout:?} waiting for {needle:?} on the console; last lines:\n{tail}")]
    WaitFor { needle: String, timeout: Duration, tail: String },
    #[error(
        "qemu closed the console before {needle:?} appeared; last lines:\n{tail}\nqemu said:\n{qemu_log}"
    )]
    ConsoleClosed { needle: String, tail: String, qemu_log: String },
    #[error("write to the serial console: {source}")]
    ConsoleWrite { source: std::io::Error },
    #[error("Vm::start needs Console::Captured; use run_interactive for a terminal")]
    NotCaptured,
    #[error("a write log records nothing under snapshot=on; use one or the other")]
    LogWithSnapshot,
    #[error("connect to qmp socket {path}: {source}")]
    QmpConnect { path: PathBuf, source: std::io::Error },
    #[error("qmp {command}: {source}")]
    QmpIo { command: String, source: std::io::Error },
    #[error("qmp {command}: unexpected reply {reply}")]
    QmpProtocol { command: String, reply: String },
    #[error("qmp {command} failed: {class}: {desc}")]
    QmpCommand { command: String, class: String, desc: String },
    #[error("qemu (pid {pid}) still running after {timeout:?}")]
    ExitTimeout { pid: u32, timeout: Duration },
    #[error("wait for qemu (pid {pid}): {source}")]
    Wait { pid: u32, source: std::io::Error },
    #[error("kill qemu process group {pid}: {source}")]
    Kill { pid: u32, source: nix::Error },
}
