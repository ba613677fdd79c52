//! The admin entry on the appliance's own console (its serial line here), on the same VM: a
//! wrong password and control characters are refused with a delay; the right console password
//! gives the admin CLI, where the admin enrols a second factor from the QR code drawn on the
//! console; the next console login then needs password and code; a console password changed
//! over the onion service replaces the old one; a session left at the prompt, or at a
//! command's password question, ends after the image's idle timeout; PID 1's log holds a
//! line for each login, refusal and logout, and
//! nothing that was typed.

use cloister_qemu::Vm;
use cloister_tests::console::{answer, log_in, log_in_again, BANNER, CODE, NAME, PROMPT, TO_ANSWER};

use super::totp::App;
use super::*;

pub fn console_admin_entry(vm: &Vm, ssh: &Ssh) -> Result<()> {
    let password = std::fs::read_to_string(ssh.images.join(format!("console-{}", admin::ADMIN)))?;
    let password = password.trim_end();
    // The banner went out at boot; Enter asks again at once.
    log_in(vm, admin::ADMIN, "not the console password")?;
    vm.wait_for("login refused", TO_ANSWER)?;
    vm.wait_for(BANNER, TO_ANSWER)?;
    vm.type_line("")?;
    answer(vm, NAME, "\u{1b}[2Jops")?;
    vm.wait_for("invalid characters", TO_ANSWER)?;
    // Over the network the console password is no password at all.
    let out = ssh.password_login_as_admin(password)?;
    ensure!(
        !out.status.success() && !stdout(&out).contains("up "),
        "the console password logged in over ssh"
    );

    log_in_again(vm, admin::ADMIN, password)?;
    vm.wait_for(PROMPT, TO_ANSWER)?;
    vm.type_line("totp enrol")?;
    vm.wait_for("code from the app: ", TO_ANSWER)?;
    let mut app = App::from_enrolment(&vm.console_text(), admin::ADMIN)?;
    vm.type_line(&app.next_code()?)?;
    vm.wait_for("two-factor login is on", TO_ANSWER)?;
    vm.wait_for(PROMPT, TO_ANSWER)?;
    vm.type_line("exit")?;
    vm.wait_for(&format!("{} logged out", admin::ADMIN), TO_ANSWER)?;

    log_in_again(vm, admin::ADMIN, password)?;
    answer(vm, CODE, "000000")?;
    vm.wait_for("wrong code", TO_ANSWER)?;
    answer(vm, CODE, &app.next_code()?)?;
    answer(vm, PROMPT, "admin list")?;
    vm.wait_for("CONSOLE", TO_ANSWER)?;
    // The admin's own second factor goes again: the scenarios after this one log in by key only.
    answer(vm, PROMPT, &format!("admin reset-totp {}", admin::ADMIN))?;
    let shown = vm.console_text();
    let row = shown.rsplit("CONSOLE").next().and_then(|after| after.lines().find(|l| l.starts_with("ops ")));
    let columns: Vec<&str> = row.unwrap_or_default().split_whitespace().collect();
    // NAME UID LOCKED EXPIRES TOTP CONSOLE ONLINE: a second factor and a console password.
    ensure!(columns.get(4..6) == Some(&["yes", "yes"][..]), "admin list on the console: {row:?}");
    vm.wait_for("second factor removed", TO_ANSWER)?;
    answer(vm, PROMPT, "exit")?;
    vm.wait_for(&format!("{} logged out", admin::ADMIN), TO_ANSWER)?;

    let changed = format!("console-{}", token()?);
    let out = ssh.run(admin::ADMIN, &[], &["console-password"], &format!("{changed}\n{changed}\n"))?;
    ensure!(
        out.status.success() && stdout(&out).contains("console password set for ops"),
        "console-password: {}",
        both(&out)
    );
    log_in_again(vm, admin::ADMIN, password)?;
    vm.wait_for("login refused", TO_ANSWER)?;
    log_in_again(vm, admin::ADMIN, &changed)?;
    answer(vm, PROMPT, "status")?;
    vm.wait_for("console-ttyS0", TO_ANSWER)?;
    answer(vm, PROMPT, "exit")?;
    vm.wait_for(&format!("{} logged out", admin::ADMIN), TO_ANSWER)?;

    idle_session_ends(vm, &changed)?;
    audit_lines_in_the_log(ssh, &[password, &changed, "not the console password"])
}

/// The test image's idle timeout (`[admin] idle_timeout_secs` of cargo xtask test's config).
const IDLE: Duration = Duration::from_secs(20);

fn idle_session_ends(vm: &Vm, password: &str) -> Result<()> {
    log_in_again(vm, admin::ADMIN, password)?;
    vm.wait_for(PROMPT, TO_ANSWER)?;
    let shown = Instant::now();
    vm.wait_for(&format!("idle for {} s: logged out", IDLE.as_secs()), IDLE + TO_ANSWER)?;
    // Not before its time (the prompt was seen a little after it was shown: some slack).
    ensure!(shown.elapsed() + Duration::from_secs(5) >= IDLE, "idle after {:?}", shown.elapsed());
    vm.wait_for(&format!("{} logged out", admin::ADMIN), TO_ANSWER)?;
    vm.wait_for(BANNER, TO_ANSWER)?;
    // A question left unanswered ends the session too, and the command is not done. (The
    // banner above was this login's: press Enter, as after a banner seen long ago.)
    log_in(vm, admin::ADMIN, password)?;
    answer(vm, PROMPT, "console-password")?;
    vm.wait_for("password for the console: ", TO_ANSWER)?;
    let asked = Instant::now();
    vm.wait_for(
        &format!("idle for {} s: logged out; the command was not done", IDLE.as_secs()),
        IDLE + TO_ANSWER,
    )?;
    ensure!(asked.elapsed() + Duration::from_secs(5) >= IDLE, "idle after {:?}", asked.elapsed());
    vm.wait_for(&format!("{} logged out", admin::ADMIN), TO_ANSWER)?;
    vm.wait_for(BANNER, TO_ANSWER)?;
    Ok(())
}

/// The console service's lines in PID 1's log: who logged in and out where, that a login was
/// refused, and none of what was typed.
fn audit_lines_in_the_log(ssh: &Ssh, typed: &[&str]) -> Result<()> {
    let log = ssh.admin(&["log"])?;
    for line in [
        format!("console-ttyS0: {} logged in on /dev/ttyS0", admin::ADMIN),
        format!("console-ttyS0: {} logged out on /dev/ttyS0", admin::ADMIN),
        "console-ttyS0: a login was refused on /dev/ttyS0".to_string(),
    ] {
        ensure!(log.contains(&line), "no {line:?} in the log:\n{}", tail(&log));
    }
    for secret in typed {
        ensure!(!log.contains(secret), "the log holds what was typed at the console");
    }
    Ok(())
}
