//! The restricted login shell of chat users: chat, passwd, help, exit.
//!
//! sshd starts it as `-cloister-shell` (no arguments) for an interactive login, or as
//! `cloister-shell -c <command>` when the client asked for a command. Anything but an interactive
//! session on a terminal is refused with `this account is for chat only` and status 1: no user
//! input is ever run, exec'd or handed to a shell.
//!
//! Test-only options, accepted only as the first arguments and with nothing after them:
//! `--session-socket PATH` and `--idle-timeout-secs N`. A user cannot inject them: sshd passes a
//! user's command only after `-c`, so `argv[1]` is `-c` whenever the user chose any argument, and
//! `-c` is refused. (User-controlled environment is off in sshd, and only TERM and LANG are read.)
//!
//! Only TERM and LANG are read from the environment (validated, with fallbacks), plus the mere
//! presence of SSH_ORIGINAL_COMMAND (a forced command was requested: refused). Nothing from the
//! environment is passed on: the shell starts no process.
//!
//! What a session looks like (messages end in a newline; the terminal turns it into CRLF):
//!
//! | situation | output | exit |
//! |---|---|---|
//! | any argument but the test options, stdin or stdout not a tty, SSH_ORIGINAL_COMMAND set | stderr `this account is for chat only`, the socket is never touched | 1 |
//! | socket missing, refusing, or no reply to `hello` within 10 s | stderr `the chat service is not available` | 1 |
//! | `busy` | stderr `you are already logged in elsewhere` | 1 |
//! | `error <text>` to `hello` | stderr `the chat service refused the session: <text>` | 1 |
//! | `ok` | `type help for the commands`, then the prompt `chat> ` | |
//! | `exit`, `quit`, Ctrl-D | `bye` | 0 |
//! | no input for 15 minutes | `idle timeout` | 0 |
//! | SIGTERM / SIGINT / SIGQUIT | `session terminated` | 0 / 130 / 131 |
//! | SIGHUP | nothing | 0 |
//! | PID 1 closes the connection or says anything unasked | stderr `the chat service closed the session` | 1 |
//! | protocol or system error | stderr `cloister-shell: <error>` | 1 |
#![forbid(unsafe_code)]

mod events;
mod input;
mod session;
mod shell;
mod terminal;
mod validate;

use std::env;
use std::ffi::OsString;
use std::io::{self, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use shell::Options;

fn main() -> ExitCode {
    let Some(mut options) = parse_args(env::args_os().skip(1)) else {
        return refuse();
    };
    let forced_command = env::var_os("SSH_ORIGINAL_COMMAND").is_some();
    if forced_command || !io::stdin().is_terminal() || !io::stdout().is_terminal() {
        return refuse();
    }
    // Passwords pass through this process: no core dumps, no ptrace by the same uid.
    let _ = nix::sys::prctl::set_dumpable(false);
    options.term = validate::term(env::var_os("TERM").as_deref()).to_string();
    options.lang = validate::lang(env::var_os("LANG").as_deref()).to_string();
    ExitCode::from(shell::run(options))
}

fn refuse() -> ExitCode {
    eprintln!("this account is for chat only");
    ExitCode::from(1)
}

/// `None` for anything but the test-only options; that includes every `-c` invocation.
fn parse_args(mut args: impl Iterator<Item = OsString>) -> Option<Options> {
    let mut options = Options::default();
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--session-socket") => options.socket = PathBuf::from(args.next()?),
            Some("--idle-timeout-secs") => {
                options.idle = Duration::from_secs(args.next()?.to_str()?.parse().ok()?);
            }
            _ => return None,
        }
    }
    Some(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Option<Options> {
        parse_args(args.iter().map(OsString::from))
    }

    #[test]
    fn no_arguments_is_the_interactive_session() {
        let options = parse(&[]).unwrap();
        assert_eq!(options.socket, PathBuf::from("/run/cloister/sessions/socket"));
        assert_eq!(options.idle, Duration::from_secs(900));
    }

    #[test]
    fn test_options_are_accepted_only_alone() {
        let options = parse(&["--session-socket", "/tmp/s", "--idle-timeout-secs", "3"]).unwrap();
        assert_eq!(options.socket, PathBuf::from("/tmp/s"));
        assert_eq!(options.idle, Duration::from_secs(3));
        for refused in [
            &["-c", "id"][..],
            &["-c"],
            &["--session-socket", "/tmp/s", "-c", "id"],
            &["-c", "--session-socket /tmp/s"],
            &["--session-socket"],
            &["--idle-timeout-secs", "x"],
            &["--idle-timeout-secs", "-1"],
            &["-l"],
            &["chat"],
        ] {
            assert!(parse(refused).is_none(), "{refused:?}");
        }
    }
}
