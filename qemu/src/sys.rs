//! The crate's only `unsafe`: a `pre_exec` hook that ties QEMU's life to the thread that spawns it.
#![allow(unsafe_code)]

use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::prctl;
use nix::sys::signal::Signal;
use nix::unistd::getppid;

/// Makes the kernel send SIGKILL to the spawned process when the thread that spawned it exits
/// (PR_SET_PDEATHSIG), so a crashed or killed test never leaves a VM running.
///
/// The signal follows the spawning *thread*, not the process: spawn from a thread that outlives the VM.
pub(crate) fn kill_child_with_parent(cmd: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe calls are
    // allowed: prctl(2), getppid(2) and _exit(2) are raw syscalls that neither allocate nor take locks,
    // and `parent` is a plain integer copied into the closure before the fork.
    unsafe {
        cmd.pre_exec(move || {
            prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // The parent may have died between fork and prctl; the signal would then never come.
            if getppid() != parent {
                return Err(std::io::Error::other("parent exited before qemu started"));
            }
            Ok(())
        });
    }
}
