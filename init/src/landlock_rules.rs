//! Landlock for a sandboxed program (the chat client): it may execute only the files it was
//! given (itself and its ELF interpreter), read everything its root view holds, and change
//! files only under its writable directories and /dev. Applied by the exec link after the root
//! view is in place, so the rules name inodes of that view; `no_new_privs` comes with it.
//!
//! Best effort, as the issue asks ("where the kernel has it"): on a kernel without landlock
//! the mount view (which holds nothing else to execute) is the whole barrier, and the returned
//! status says so. The handled rights stop at ABI v3: later ABIs add device-ioctl rights,
//! which would keep the client from the terminal ioctls it needs on its own terminal.

use std::path::PathBuf;

use landlock::{
    make_bitflags, path_beneath_rules, Access, AccessFs, BitFlags, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetError, RulesetStatus, ABI,
};

const ABI_USED: ABI = ABI::V3;

/// How much of the ruleset the running kernel enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforced {
    Fully,
    Partly,
    Not,
}

/// Restricts this process and everything it executes from now on.
pub fn restrict(executables: &[PathBuf], writable: &[PathBuf]) -> Result<Enforced, RulesetError> {
    let read: BitFlags<AccessFs> = make_bitflags!(AccessFs::{ReadFile | ReadDir});
    let execute: BitFlags<AccessFs> = make_bitflags!(AccessFs::{Execute | ReadFile});
    let device: BitFlags<AccessFs> = make_bitflags!(AccessFs::{ReadFile | ReadDir | WriteFile});
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI_USED))?
        .create()?
        .add_rules(path_beneath_rules(["/"], read))?
        .add_rules(path_beneath_rules(["/dev"], device))?
        .add_rules(path_beneath_rules(executables, execute))?
        .add_rules(path_beneath_rules(writable, AccessFs::from_all(ABI_USED) & !AccessFs::Execute))?
        .restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Enforced::Fully,
        RulesetStatus::PartiallyEnforced => Enforced::Partly,
        RulesetStatus::NotEnforced => Enforced::Not,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    /// In a child process (the restriction is for life): `true` may run, `sh` may not, the
    /// writable directory takes a file and its neighbour does not. Skipped where the kernel
    /// lacks landlock, which the child reports.
    #[test]
    fn only_the_given_programs_run_and_only_writable_dirs_change() {
        let dir = tempfile::tempdir().unwrap();
        let (home, other) = (dir.path().join("home"), dir.path().join("other"));
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let me = std::env::current_exe().unwrap();
        let out = Command::new(me)
            .args(["--exact", "landlock_rules::tests::child", "--nocapture", "--test-threads=1"])
            .env("CLOISTER_LANDLOCK_CHILD", dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        if text.contains("landlock: not enforced") {
            eprintln!("landlock is not available on this kernel; the rule test did not run");
            return;
        }
        assert!(text.contains("true ran: true"), "{text}");
        assert!(text.contains("sh ran: false"), "{text}");
        assert!(text.contains("home writable: true"), "{text}");
        assert!(text.contains("other writable: false"), "{text}");
    }

    /// The restricted half of the test above; does nothing unless started by it.
    #[test]
    fn child() {
        let Some(dir) = std::env::var_os("CLOISTER_LANDLOCK_CHILD").map(PathBuf::from) else { return };
        let allowed = [PathBuf::from("/usr/bin/true"), loader()];
        match restrict(&allowed, &[dir.join("home")]).unwrap() {
            Enforced::Not => {
                println!("landlock: not enforced");
                return;
            }
            Enforced::Fully | Enforced::Partly => {}
        }
        let ran = |prog: &str| Command::new(prog).status().is_ok_and(|s| s.success());
        println!("true ran: {}", ran("/usr/bin/true"));
        println!("sh ran: {}", ran("/bin/sh"));
        println!("home writable: {}", std::fs::write(dir.join("home/f"), "x").is_ok());
        println!("other writable: {}", std::fs::write(dir.join("other/f"), "x").is_ok());
    }

    /// The host's ELF interpreter, which the kernel opens for execution with every program.
    fn loader() -> PathBuf {
        std::fs::canonicalize("/lib64/ld-linux-x86-64.so.2").unwrap()
    }
}
