//! Running QEMU: [`Vm`] for tests (captured console, QMP, killed with its owner) and
//! [`run_interactive`] for people (terminal attached).
//!
//! Start order: QEMU creates the QMP socket (`wait=off`) soon after exec and never blocks on it, while
//! the serial console is a pair of pipes that exist before QEMU runs, so no output is lost and there
//! is no connect race. QMP is connected lazily on first use, retrying until the socket appears.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::console::{self, ConsoleBuffer, Found};
use crate::qmp::Qmp;
use crate::{resolve_accel, sys, Accelerator, Console, Error, Result, VmConfig, QEMU};

/// Set to `1` to copy a captured console to stderr as it arrives.
pub const ECHO_ENV: &str = "CLOISTER_VM_ECHO";
/// Printed by [`run_interactive`] before QEMU takes the terminal.
pub const INTERACTIVE_HINT: &str = "Ctrl-A X quits QEMU; Ctrl-A C toggles the monitor";
/// How long QMP may take to appear after QEMU starts (it is among QEMU's first actions).
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);

/// A running VM with a captured serial console. QEMU runs in its own process group and is killed
/// (the whole group) when the `Vm` is dropped or when the thread that started it dies.
pub struct Vm {
    child: Mutex<Child>,
    pid: u32,
    accel: Accelerator,
    config: VmConfig,
    console: ConsoleBuffer,
    cursor: Mutex<usize>,
    stdin: Mutex<ChildStdin>,
    qmp: Mutex<Option<Qmp>>,
    reader: Option<JoinHandle<()>>,
    started: Instant,
}

impl Vm {
    /// Starts QEMU and returns at once; the guest boots in the background.
    ///
    /// `config.console` must be [`Console::Captured`]. QEMU gets SIGKILL when the calling *thread*
    /// exits (PR_SET_PDEATHSIG follows threads), so start and drop the VM on the same long-lived thread.
    pub fn start(config: VmConfig) -> Result<Vm> {
        let config = config.absolute()?;
        if config.console != Console::Captured {
            return Err(Error::NotCaptured);
        }
        if let Some(path) = &config.write_log {
            // A snapshot overlay would take the writes before they reach the logging layer.
            if config.snapshot {
                return Err(Error::LogWithSnapshot);
            }
            create(path)?;
        }
        let accel = resolve_accel(config.accel);
        prepare_work_dir(&config)?;
        let log = create(&config.console_log_path())?;
        let qemu_log = create(&config.qemu_log_path())?;
        let mut cmd = command(&config, accel);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(qemu_log);
        // Its own group, so Drop can kill QEMU and anything it forked in one call.
        cmd.process_group(0);
        let mut child = spawn(&mut cmd)?;
        let started = Instant::now();
        let pid = child.id();
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let source = std::io::Error::other("console pipes missing");
            return Err(Error::Spawn { program: QEMU.into(), source });
        };
        let console = ConsoleBuffer::default();
        let echo = std::env::var(ECHO_ENV).is_ok_and(|v| v == "1");
        let reader = Some(console.spawn_reader(stdout, log, echo));
        Ok(Vm {
            child: Mutex::new(child),
            pid,
            accel,
            config,
            console,
            cursor: Mutex::new(0),
            stdin: Mutex::new(stdin),
            qmp: Mutex::new(None),
            reader,
            started,
        })
    }

    /// Waits for a new occurrence of `needle` (after the previous match, so the same prompt can be
    /// awaited twice) and returns its whole line. Matching sees the console as a terminal would show
    /// it: escape sequences and control characters other than newline and tab are removed first.
    /// A timeout error quotes the last 40 lines.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String> {
        let mut cursor = lock(&self.cursor);
        match self.console.wait_for(needle.as_bytes(), &mut cursor, timeout) {
            Found::Line(line) => Ok(line),
            Found::TimedOut => {
                Err(Error::WaitFor { needle: needle.into(), timeout, tail: self.console.tail() })
            }
            Found::Closed => Err(Error::ConsoleClosed {
                needle: needle.into(),
                tail: self.console.tail(),
                qemu_log: std::fs::read(self.config.qemu_log_path())
                    .map(|b| console::tail(&b, 10))
                    .unwrap_or_default(),
            }),
        }
    }

    /// Types `text` followed by Enter (a carriage return, as a serial terminal sends it).
    pub fn type_line(&self, text: &str) -> Result<()> {
        let mut line = Vec::with_capacity(text.len() + 1);
        line.extend_from_slice(text.as_bytes());
        line.push(b'\r');
        self.type_raw(&line)
    }

    /// Sends bytes to the serial console as they are.
    pub fn type_raw(&self, bytes: &[u8]) -> Result<()> {
        let mut stdin = lock(&self.stdin);
        stdin.write_all(bytes).and_then(|()| stdin.flush()).map_err(|source| Error::ConsoleWrite { source })
    }

    /// Runs a QMP command (`args` null for none) and returns its `return` value.
    pub fn qmp(&self, command: &str, args: Value) -> Result<Value> {
        let mut slot = lock(&self.qmp);
        let qmp = match slot.as_mut() {
            Some(qmp) => qmp,
            None => slot.insert(Qmp::connect(&self.config.qmp_path(), QMP_CONNECT_TIMEOUT)?),
        };
        let result = qmp.execute(command, args);
        if matches!(result, Err(Error::QmpIo { .. } | Error::QmpProtocol { .. })) {
            // The stream may be out of step now; the next command starts a fresh connection.
            *slot = None;
        }
        result
    }

    /// Presses the ACPI power button (QMP `system_powerdown`); the guest decides what to do.
    pub fn power_button(&self) -> Result<()> {
        self.qmp("system_powerdown", Value::Null).map(drop)
    }

    /// Waits for QEMU to exit on its own.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(Error::ExitTimeout { pid: self.pid, timeout });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Kills QEMU's process group with SIGKILL and reaps QEMU; harmless if it already exited.
    pub fn kill(&self) -> Result<ExitStatus> {
        let mut child = lock(&self.child);
        if let Some(status) = child.try_wait().map_err(|source| Error::Wait { pid: self.pid, source })? {
            return Ok(status);
        }
        match killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(source) => return Err(Error::Kill { pid: self.pid, source }),
        }
        child.wait().map_err(|source| Error::Wait { pid: self.pid, source })
    }

    fn try_wait(&self) -> Result<Option<ExitStatus>> {
        lock(&self.child).try_wait().map_err(|source| Error::Wait { pid: self.pid, source })
    }

    /// Everything the console printed so far, escape sequences included.
    pub fn console_text(&self) -> String {
        self.console.raw_text()
    }

    /// Time since QEMU was spawned.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// QEMU's process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The accelerator this VM actually runs with.
    pub fn accelerator(&self) -> Accelerator {
        self.accel
    }

    /// True when running under TCG (slow: the caller may want a cheaper KDF or longer timeouts).
    pub fn is_tcg(&self) -> bool {
        self.accel.is_tcg()
    }

    /// The configuration the VM was started with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Nothing useful can be done with a failure here; the process group is gone or unkillable.
        let _ = self.kill();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Runs QEMU on the caller's terminal (`-serial mon:stdio`) until it exits, whatever
/// `config.console` says. QEMU stays in the terminal's foreground process group, since a background
/// group cannot read the terminal, but still dies with the calling thread.
pub fn run_interactive(config: VmConfig) -> Result<ExitStatus> {
    let mut config = config.absolute()?;
    config.console = Console::Stdio;
    let accel = resolve_accel(config.accel);
    prepare_work_dir(&config)?;
    let mut cmd = command(&config, accel);
    eprintln!("{INTERACTIVE_HINT}");
    let mut child = spawn(&mut cmd)?;
    let pid = child.id();
    child.wait().map_err(|source| Error::Wait { pid, source })
}

/// A fresh variable store and no stale socket from an earlier run in the same dir.
fn prepare_work_dir(config: &VmConfig) -> Result<()> {
    let dir = &config.work_dir;
    std::fs::create_dir_all(dir).map_err(|source| Error::WorkDir { path: dir.clone(), source })?;
    let (from, to) = (&config.firmware.vars_template, config.vars_path());
    let copy_err = |source| Error::CopyVars { from: from.clone(), to: to.clone(), source };
    // Remove first: a copy onto a read-only leftover would fail, and fs::copy keeps the template's
    // mode, which is read-only on some distributions while QEMU must write the store.
    match std::fs::remove_file(&to) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(copy_err(e)),
    }
    std::fs::copy(from, &to).map_err(copy_err)?;
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).map_err(copy_err)?;
    let _ = std::fs::remove_file(config.qmp_path());
    Ok(())
}

fn command(config: &VmConfig, accel: Accelerator) -> Command {
    let argv = config.command_line(accel);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).current_dir(&config.work_dir);
    sys::kill_child_with_parent(&mut cmd);
    cmd
}

fn spawn(cmd: &mut Command) -> Result<Child> {
    cmd.spawn()
        .map_err(|source| Error::Spawn { program: cmd.get_program().to_string_lossy().into_owned(), source })
}

fn create(path: &std::path::Path) -> Result<File> {
    File::create(path).map_err(|source| Error::Log { path: path.to_path_buf(), source })
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_vm_can_be_shared_between_threads() {
        // A test may read the console on one thread while another drives QMP.
        fn shareable<T: Send + Sync>() {}
        shareable::<super::Vm>();
    }
}
