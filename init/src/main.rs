//! `cloister-init`: PID 1 of the appliance. As `/init` in the initramfs it runs stage 1 (unlock
//! the LUKS2 root, mount it, switch_root); on the root it runs as `/usr/lib/cloister/init
//! --stage2`; at shutdown stage 2 pivots back into a copy of the initramfs kept in /run and runs
//! `/init --shutdown` there to unmount and close the root. PID 1 must never exit or panic: errors are values, and the panic hook (the last
//! resort) writes to the consoles and powers off.
// `unsafe` is denied everywhere but `sys.rs`, which allows it for one call.
#![deny(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod accounts;
mod admin_totp;
mod chat;
mod chatclient;
mod clock;
mod cmdline;
mod console;
mod console_login;
mod control;
mod disk_keys;
mod firewall;
mod gpt;
mod grow;
mod guard;
mod handover;
mod input;
mod ioctl;
mod kill_switch;
mod kmod;
mod landlock_rules;
mod memory;
mod mounts;
mod netns;
mod network;
mod passphrase;
mod passwd;
mod power;
mod prefetch;
mod root;
mod sandbox;
mod sessions;
mod shutdown;
mod stage1;
mod stage2;
mod supervisor;
mod sys;
mod system;
mod totp;
mod unlock;

use std::time::Duration;

fn main() {
    std::panic::set_hook(Box::new(|info| {
        let consoles = console::Consoles::open(&cmdline::Cmdline::read());
        consoles.line(&format!("{} panic: {info}", cloister_proto::marker::FATAL));
        // On a host (not PID 1 of an appliance) the guard refuses and the process aborts as usual.
        if guard::check("power off after panic").is_ok() {
            power::halt_after(Duration::from_secs(10), &consoles);
        }
    }));
    let args: Vec<String> = std::env::args().collect();
    // The links of a service's launch chain run as ordinary children of PID 1.
    if let Some(link @ (sandbox::LAUNCH_ARG | sandbox::NS_INIT_ARG | sandbox::EXEC_ARG)) =
        args.get(1).map(String::as_str)
    {
        sandbox::run_link(link, args.get(2).map(String::as_str));
    }
    // Host tests apply the ruleset inside a namespace they made; the firewall's own guard
    // refuses the host's namespace.
    if let Some(mode @ (firewall::APPLY_ARG | firewall::VERIFY_ARG | firewall::APPLY_CHAT_ARG)) =
        args.get(1).map(String::as_str)
    {
        firewall::run_mode(mode, args.get(2), args.get(3));
    }
    // A chat user's password change: a child of PID 1 (session socket `passwd`).
    if args.get(1).map(String::as_str) == Some(passwd::PASSWD_ARG) {
        passwd::run_mode(args.get(2));
    }
    // The admin tools' account changes: a child of PID 1 (control socket `user …`, `admin …`).
    if args.get(1).map(String::as_str) == Some(accounts::ACCOUNTS_ARG) {
        accounts::run_mode();
    }
    // The admin login on a console: a supervised child of PID 1, one per console.
    if args.get(1).map(String::as_str) == Some(console_login::CONSOLE_ARG) {
        console_login::run_mode(args.get(2));
    }
    // Disk passphrase changes: a child of PID 1 (control socket `disk passphrase …`).
    if args.get(1).map(String::as_str) == Some(disk_keys::DISK_ARG) {
        disk_keys::run_mode();
    }
    // Host tests run stage 2's firewall and network steps inside a namespace they made; both
    // guards refuse the host's namespace.
    if args.get(1).map(String::as_str) == Some(network::UP_ARG) {
        network::run_mode(args.get(2));
    }
    // The fill of a grown root's new area: a supervised child of PID 1.
    if args.get(1).map(String::as_str) == Some(grow::fill::FILL_ARG) {
        grow::fill::run_mode();
    }
    // The DHCP client: a supervised child of PID 1, never PID 1 itself.
    if args.get(1).map(String::as_str) == Some(network::client::DHCP_ARG) {
        network::client::run_mode(args.get(2));
    }
    // Every stage mounts over /dev, /proc… and ends in a power off: never as an ordinary process
    // on a developer's host. (/proc is not mounted yet, so the appliance flag is checked later,
    // by stage 1 right after its mounts and by every machine-global action.)
    if std::process::id() != 1 {
        eprintln!("cloister-init: refusing to run: not pid 1");
        std::process::exit(2);
    }
    match args.get(1).map(String::as_str) {
        Some(cloister_proto::STAGE2_ARG) => stage2::run(),
        Some(cloister_proto::SUPERVISE_ARG) => stage2::supervise_only(args.get(2), args.get(3)),
        Some(shutdown::SHUTDOWN_ARG) => shutdown::run(args.get(2).map(String::as_str)),
        _ => stage1::run(),
    }
}
