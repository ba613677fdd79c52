//! The appliance's admin console as a person at its serial line uses it: each question awaited
//! on the console before its answer is typed (the console drops what is typed ahead of a
//! question), as `init/src/console_login.rs` asks them.

use std::time::Duration;

use anyhow::Result;
use cloister_qemu::Vm;

/// What the console says when it waits for Enter.
pub const BANNER: &str = "press Enter to log in";
pub const NAME: &str = "admin: ";
pub const PASSWORD: &str = "console password: ";
/// The admin CLI's own questions and prompt.
pub const CODE: &str = "verification code: ";
pub const PROMPT: &str = "admin> ";
/// Room for a yescrypt check and the CLI's start under TCG, and the growing refusal delays.
pub const TO_ANSWER: Duration = Duration::from_secs(90);

/// Types `text` once `question` shows.
pub fn answer(vm: &Vm, question: &str, text: &str) -> Result<()> {
    vm.wait_for(question, TO_ANSWER)?;
    vm.type_line(text)?;
    Ok(())
}

/// Presses Enter (the banner may have gone out long ago) and answers name and password.
pub fn log_in(vm: &Vm, name: &str, password: &str) -> Result<()> {
    vm.type_line("")?;
    answer(vm, NAME, name)?;
    answer(vm, PASSWORD, password)
}

/// [`log_in`] after the console said it waits again (after a refusal or a logout).
pub fn log_in_again(vm: &Vm, name: &str, password: &str) -> Result<()> {
    vm.wait_for(BANNER, TO_ANSWER)?;
    log_in(vm, name, password)
}
