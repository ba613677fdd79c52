//! Stage 2, PID 1 on the unlocked root: announce the unlock, arm the power button and signals,
//! reap children, and on a shutdown request stop everything and power off cleanly.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use cloister_plan::{NetworkMode, Plan, PLAN_PATH, RUN_DIR, STATE_DIR};
use cloister_proto::marker;

use crate::cmdline::Cmdline;
use crate::console::Consoles;
use crate::firewall::firewall_step;
use crate::power::Ending;
use crate::supervisor::{Outcome, Supervisor};
use crate::system::{self, StepRecord, Steps};
use crate::{clock, grow, input, kmod, mounts, network, power};

/// How long processes get between SIGTERM and SIGKILL at shutdown.
const GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
enum SignalError {
    #[error("block signals: {0}")]
    Mask(nix::Error),
    #[error("signalfd: {0}")]
    Signalfd(nix::Error),
}

pub fn run() -> ! {
    let consoles = Consoles::open(&Cmdline::read());
    consoles.line(&cloister_proto::unlocked_line(clock::boot_ms()));
    let say = |s: &str| consoles.line(s);
    let sfd = match signal_fd() {
        Ok(sfd) => sfd,
        // Without signals we cannot be stopped cleanly; keep the root consistent and stop now.
        Err(e) => {
            say(&format!("{} stage2: {e}", marker::FATAL));
            shutdown(&consoles, Ending::PowerOff)
        }
    };
    if let Err(e) = power::disable_ctrl_alt_del() {
        say(&format!("cloister: {e}"));
    }
    let buttons = open_power_buttons(&say);
    let Prepared { plan, steps, uplink, firewall_uplink, host_key } = prepare(&say);
    let firewall_plan = plan.firewall.clone();
    let mut sup = Supervisor::new(plan, Path::new(RUN_DIR), &say, steps);
    sup.set_network_status(Box::new(move || network::status(uplink.as_ref())));
    sup.set_firewall_status(Box::new(move || {
        crate::firewall::status(&firewall_plan, firewall_uplink.as_deref())
    }));
    if let Some(key) = host_key {
        sup.show_host_key(key);
    }
    start_grow_fill(&mut sup, &say);
    if let Some(kernel) = clock::kernel_milestones() {
        say(&kernel);
    }
    sup.watch_kernel_log();
    let ending = match sup.run(&sfd, &buttons) {
        Outcome::PowerOff => Ending::PowerOff,
        Outcome::Reboot => Ending::Reboot,
        Outcome::KillSwitch => crate::kill_switch::run(&say),
    };
    say(marker::SHUTDOWN);
    sup.stop_all();
    match system::save_seed(Path::new(STATE_DIR)) {
        Ok(n) => say(&format!("cloister: random seed saved ({n} bytes)")),
        Err(e) => say(&format!("cloister: random seed not saved: {e}")),
    }
    shutdown(&consoles, ending)
}

/// What stage 2 prepared for the supervisor.
struct Prepared {
    /// Without services when a fail-closed step failed.
    plan: Plan,
    steps: Vec<StepRecord>,
    /// The uplink as the network step left it (up), for `status` and the DHCP client.
    uplink: Option<network::Uplink>,
    /// The uplink the firewall's tables were meant to name, once it was found: what `status`
    /// compares the live tables with.
    firewall_uplink: Option<String>,
    /// sshd's host key.
    host_key: Option<crate::chat::HostKey>,
}

/// The machine steps, then the firewall, then the uplink behind its own firewall; if any
/// fail-closed step fails no service may start, so the plan comes back without services and
/// the console says why.
fn prepare(say: &dyn Fn(&str)) -> Prepared {
    let mut steps = Steps::new(say);
    let held = |mut plan: Plan, steps: &Steps, firewall_uplink, e: &str| {
        say(&format!("{}: {e}", marker::SERVICES_HELD));
        plan.services.clear();
        Prepared { plan, steps: steps.records().to_vec(), uplink: None, firewall_uplink, host_key: None }
    };
    let mut plan = match Plan::load(Path::new(PLAN_PATH)) {
        Ok(plan) => plan,
        Err(e) => return held(empty_plan(), &steps, None, &e.to_string()),
    };
    let machine =
        system::machine_steps(&mut steps, &plan.hostname, plan.build_time_unix, Path::new(STATE_DIR));
    let firewall = machine.map_err(|e| e.to_string()).and_then(|()| {
        steps.run("firewall", || firewall_step(&plan.firewall)).map_err(|e| format!("firewall: {e}"))
    });
    match firewall {
        Ok(t) => say(&format!("cloister: firewall: {t}")),
        Err(e) => return held(plan, &steps, None, &e),
    }
    // Not finding an interface is not fatal: the appliance then has no network.
    let link = steps.run("uplink", || network::find_step(&plan.firewall, say)).ok().flatten();
    let firewall_uplink = link.as_ref().map(|l| l.name.clone());
    let mut uplink = None;
    if let Some(link) = link {
        // Fail closed: the link stays down and nothing starts.
        let name = link.name.clone();
        match steps.run("uplink-firewall", || crate::firewall::uplink_step(&plan.firewall, &name)) {
            Ok(t) => say(&format!("cloister: uplink firewall on {name}: {t}")),
            Err(e) => return held(plan, &steps, firewall_uplink, &format!("uplink-firewall: {e}")),
        }
        // A failure leaves the uplink down; the services start (they have no network).
        uplink = steps.run("network", || network::up_step(link, &plan.network, &plan.firewall)).ok();
    }
    if let Some(up) = uplink.as_ref().filter(|u| u.mode == NetworkMode::Dhcp) {
        plan.services.insert(0, network::dhcp_service(up, Path::new(cloister_proto::STAGE2_PATH)));
    }
    // The admins' way in without a network: a login on every console.
    if let Some(accounts) = plan.chat.as_ref().and_then(|c| c.accounts.as_ref()) {
        let exe = Path::new(cloister_proto::STAGE2_PATH);
        plan.services.extend(crate::console_login::services(&Cmdline::read().consoles(), accounts, exe));
    }
    // Not fatal: without a host key sshd fails alone and says why. The supervisor shows it.
    let host_key = plan.chat.as_ref().and_then(|chat| {
        steps.run("ssh-host-key", || crate::chat::ssh_host_key_step(&chat.ssh_host_key)).ok()
    });
    Prepared { plan, steps: steps.records().to_vec(), uplink, firewall_uplink, host_key }
}

/// The fill of a grown root's new area, when stage 1 grew it and the fill (or the XFS growth
/// after it) is not done: a unit PID 1 starts itself. It runs whatever the firewall said: it
/// touches no network, only the root's own device. `status` shows its record either way.
fn start_grow_fill(sup: &mut Supervisor, say: &dyn Fn(&str)) {
    let root = Path::new("/");
    sup.set_grow_status(Box::new(move || grow::fill::status(root)));
    match grow::fill::work_at(root) {
        Ok(grow::fill::Work::Nothing) => {}
        Ok(_) => sup.add_direct(grow::fill::service()),
        Err(e) => say(&format!("cloister: grow: cannot tell what is left to fill: {e}")),
    }
}

/// `--supervise <plan.json> <run-dir>`: only the supervisor, for tests on a host, as PID 1 of
/// a pid namespace. No machine-global step runs; a shutdown request stops the services and
/// exits 0.
pub fn supervise_only(plan: Option<&String>, run_dir: Option<&String>) -> ! {
    let (Some(plan), Some(run_dir)) = (plan, run_dir) else {
        eprintln!("usage: cloister-init {} <plan.json> <run-dir>", cloister_proto::SUPERVISE_ARG);
        std::process::exit(2)
    };
    let plan = match Plan::load(Path::new(plan)) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("cloister-init: {e}");
            std::process::exit(2)
        }
    };
    let sfd = match signal_fd() {
        Ok(sfd) => sfd,
        Err(e) => {
            eprintln!("cloister-init: {e}");
            std::process::exit(2)
        }
    };
    let say = |s: &str| println!("{s}");
    let mut sup = Supervisor::new(plan, Path::new(run_dir), &say, Vec::new());
    let outcome = sup.run(&sfd, &[]);
    say(&format!("{} ({outcome:?} requested)", marker::SHUTDOWN));
    sup.stop_all();
    say(marker::POWER_OFF);
    std::process::exit(0)
}

fn empty_plan() -> Plan {
    Plan {
        hostname: "localhost".into(),
        build_time_unix: 0,
        admin_uids: Vec::new(),
        services: Vec::new(),
        firewall: Default::default(),
        network: Default::default(),
        chat: None,
    }
}

fn signal_fd() -> Result<SignalFd, SignalError> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGPWR, Signal::SIGCHLD] {
        set.add(s);
    }
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None).map_err(SignalError::Mask)?;
    SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK).map_err(SignalError::Signalfd)
}

/// Loads the ACPI button and evdev drivers and opens every "Power Button" event device.
fn open_power_buttons(say: &dyn Fn(&str)) -> Vec<File> {
    match kmod::modules_dir() {
        Ok(dir) => {
            for name in ["button", "evdev"] {
                if let Err(e) = kmod::load_by_name(&dir, name) {
                    say(&format!("cloister: module {name}: {e}"));
                }
            }
        }
        Err(e) => say(&format!("cloister: {e}")),
    }
    // evdev makes its nodes as the driver binds, which can lag the module load a little.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut paths = Vec::new();
    while paths.is_empty() && Instant::now() < deadline {
        paths = input::power_buttons(Path::new("/sys/class/input"), Path::new("/dev/input"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let files: Vec<File> = paths.iter().filter_map(|p| File::open(p).ok()).collect();
    say(&format!("{} ({} device(s))", marker::POWER_BUTTON_ARMED, files.len()));
    files
}

/// Reaps every exited child without blocking.
fn reap() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Stops every process, makes the root read-only and cuts the power. Never returns.
fn shutdown(consoles: &Consoles, ending: Ending) -> ! {
    let say = |s: &str| consoles.line(s);
    if let Err(e) = power::kill_all(Signal::SIGTERM) {
        say(&format!("cloister: {e}"));
    }
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline {
        reap();
        if waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) == Err(Errno::ECHILD) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Err(e) = power::kill_all(Signal::SIGKILL) {
        say(&format!("cloister: {e}"));
    }
    reap();
    nix::unistd::sync();
    match mounts::remount_root_ro() {
        Ok(()) => say("cloister: root is read-only"),
        Err(e) => say(&format!("cloister: {e}")),
    }
    nix::unistd::sync();
    let shutdown_init = format!("{}{}", mounts::SHUTDOWN_ROOT, cloister_proto::STAGE1_PATH);
    if Path::new(&shutdown_init).exists() {
        consoles.drain();
        let Err(e) = mounts::pivot_to_shutdown_root(
            cloister_proto::STAGE1_PATH,
            &[crate::shutdown::SHUTDOWN_ARG, ending.arg()],
        );
        say(&format!("cloister: {e}"));
    }
    power::end(ending, consoles)
}
