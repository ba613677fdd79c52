//! Boots the host's OVMF under real QEMU (TCG here) with a blank disk: the firmware falls through to
//! the UEFI shell on the serial console, which is enough to exercise the whole harness without a
//! Cloister image. Needs qemu-system-x86 and ovmf.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cloister_qemu::{Accel, Error, Firmware, Vm, VmConfig};
use serde_json::Value;

/// The machine has two cores: one VM at a time.
static ONE_VM: Mutex<()> = Mutex::new(());
/// OVMF alone takes 5-7 s under TCG; leave room for a loaded machine.
const BOOT: Duration = Duration::from_secs(90);
const CHILD_ENV: &str = "CLOISTER_QEMU_TEST_CHILD";

fn one_vm() -> std::sync::MutexGuard<'static, ()> {
    ONE_VM.lock().unwrap_or_else(|e| e.into_inner())
}

/// A VM with an empty 1 MiB disk, so OVMF finds nothing to boot and starts its shell.
fn blank_vm(dir: &Path) -> VmConfig {
    let image = dir.join("blank.raw");
    std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let mut cfg = VmConfig::new(image, Firmware::find().unwrap(), dir.join("vm"));
    cfg.memory_mib = 256;
    cfg.cpus = 1;
    cfg.accel = Accel::Auto;
    cfg.snapshot = true;
    cfg
}

/// True while `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

fn gone_within(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

#[test]
fn uefi_shell_round_trip_over_serial_and_qmp() {
    let _guard = one_vm();
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::start(blank_vm(dir.path())).unwrap();
    let first = vm.wait_for("BdsDxe", BOOT).unwrap();
    eprintln!("first firmware line after {:?} ({:?}): {first}", vm.elapsed(), vm.accelerator());
    assert!(first.contains("BdsDxe"), "{first}");
    // Escape skips the five-second startup.nsh countdown.
    vm.wait_for("startup.nsh", BOOT).unwrap();
    vm.type_raw(b"\x1b").unwrap();
    vm.wait_for("Shell>", BOOT).unwrap();

    vm.type_line("echo cloister-marker-7").unwrap();
    let typed = vm.wait_for("cloister-marker-7", Duration::from_secs(30)).unwrap();
    assert!(typed.contains("Shell> echo cloister-marker-7"), "{typed:?}");
    let output = vm.wait_for("cloister-marker-7", Duration::from_secs(30)).unwrap();
    assert_eq!(output.trim(), "cloister-marker-7");

    let status = vm.qmp("query-status", Value::Null).unwrap();
    assert_eq!(status["status"], "running", "{status}");
    vm.power_button().unwrap();

    vm.type_line("reset -s").unwrap();
    let exit = vm.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(exit.success(), "{exit:?}");
    let log = std::fs::read_to_string(dir.path().join("vm/console.log")).unwrap();
    assert!(log.contains("cloister-marker-7") && log.contains("Shell>"));
    assert!(dir.path().join("vm/OVMF_VARS.fd").is_file());
}

#[test]
fn wait_for_timeout_quotes_the_console_tail() {
    let _guard = one_vm();
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::start(blank_vm(dir.path())).unwrap();
    vm.wait_for("BdsDxe", BOOT).unwrap();
    let err = vm.wait_for("text-that-never-comes", Duration::from_secs(2)).unwrap_err();
    assert!(matches!(err, Error::WaitFor { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("text-that-never-comes") && msg.contains("BdsDxe"), "{msg}");
    assert!(!msg.contains('\x1b'), "escape sequences belong in console.log, not in errors: {msg:?}");

    vm.qmp("quit", Value::Null).unwrap();
    vm.wait_exit(Duration::from_secs(30)).unwrap();
}

#[test]
fn qemu_failing_to_start_is_reported_with_its_own_words() {
    let _guard = one_vm();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = blank_vm(dir.path());
    cfg.image = dir.path().join("missing.raw");
    let vm = Vm::start(cfg).unwrap();
    let err = vm.wait_for("BdsDxe", BOOT).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::ConsoleClosed { .. }), "{msg}");
    assert!(msg.contains("missing.raw"), "{msg}");
    assert!(!vm.wait_exit(Duration::from_secs(10)).unwrap().success());
}

#[test]
fn dropping_the_vm_kills_qemu() {
    let _guard = one_vm();
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::start(blank_vm(dir.path())).unwrap();
    vm.qmp("query-status", Value::Null).unwrap();
    let pid = vm.pid();
    assert!(alive(pid));
    drop(vm);
    assert!(!alive(pid), "qemu {pid} survived its Vm");
}

/// Re-runs this test binary as a child that starts a VM and is then SIGKILLed, leaving no chance for
/// Drop: only the parent-death signal can take QEMU down.
#[test]
fn qemu_dies_with_the_process_that_started_it() {
    if let Ok(pid_file) = std::env::var(CHILD_ENV) {
        return child_starts_vm_and_waits(Path::new(&pid_file));
    }
    let _guard = one_vm();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("qemu.pid");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "qemu_dies_with_the_process_that_started_it", "--nocapture"])
        .env(CHILD_ENV, &pid_file)
        .spawn()
        .unwrap();
    let qemu = wait_for_pid_file(&pid_file, &mut child, Duration::from_secs(60));
    assert!(alive(qemu), "qemu {qemu} not running in the child");
    child.kill().unwrap();
    child.wait().unwrap();
    let died = gone_within(qemu, Duration::from_secs(5));
    if !died {
        let _ = Command::new("kill").args(["-9", &qemu.to_string()]).status();
    }
    assert!(died, "qemu {qemu} outlived the process that started it");
}

fn child_starts_vm_and_waits(pid_file: &Path) {
    let dir = pid_file.parent().unwrap().join("child");
    std::fs::create_dir(&dir).unwrap();
    let vm = Vm::start(blank_vm(&dir)).unwrap();
    vm.qmp("query-status", Value::Null).unwrap();
    let tmp: PathBuf = pid_file.with_extension("tmp");
    std::fs::write(&tmp, vm.pid().to_string()).unwrap();
    std::fs::rename(&tmp, pid_file).unwrap();
    // The parent kills us long before this ends; the bound keeps a broken parent from leaking a VM.
    std::thread::sleep(Duration::from_secs(60));
}

fn wait_for_pid_file(path: &Path, child: &mut std::process::Child, limit: Duration) -> u32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text.trim().parse().unwrap();
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("child exited ({status}) before starting its vm");
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("child never started its vm");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
