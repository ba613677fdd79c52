//! The last stage: PID 1 running from the initramfs copy in /run after stage 2 pivoted out of
//! the root (`/init --shutdown`). With nothing left running on the root it unmounts it, closes
//! the dm-crypt mapping so the disk is left consistent, and powers off.

use std::time::Instant;

use cloister_proto::{marker, ROOT_MAPPING};

use crate::cmdline::Cmdline;
use crate::console::Consoles;
use crate::{mounts, power, unlock};

/// argv[1] that selects this stage; only this binary passes it to itself.
pub const SHUTDOWN_ARG: &str = "--shutdown";

/// `/init --shutdown [poweroff|reboot]`.
pub fn run(how: Option<&str>) -> ! {
    let moved = mounts::take_api_mounts();
    let consoles = Consoles::open(&Cmdline::read());
    let say = |s: &str| consoles.line(s);
    for r in [moved, mounts::make_dir(unlock::LOCK_DIR, 0o700)] {
        if let Err(e) = r {
            say(&format!("cloister: {e}"));
        }
    }
    let step = |name: &str, r: Result<(), String>, start: Instant| match r {
        Ok(()) => say(&format!("step {name}: ok ({} ms)", start.elapsed().as_millis())),
        Err(e) => say(&format!("cloister: {name}: {e}")),
    };
    let start = Instant::now();
    let unmounted = mounts::unmount_old_root().map_err(|e| e.to_string());
    let ok = unmounted.is_ok();
    step("unmount-root", unmounted, start);
    if ok {
        let start = Instant::now();
        step("close-root", unlock::deactivate(ROOT_MAPPING).map_err(|e| e.to_string()), start);
    }
    nix::unistd::sync();
    let ending = power::Ending::from_arg(how);
    say(if ending == power::Ending::Reboot { marker::REBOOT } else { marker::POWER_OFF });
    power::end(ending, &consoles)
}
