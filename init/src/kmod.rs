//! Loading kernel modules without modprobe: stage 1 follows the lists the build wrote
//! (`/etc/cloister/modules` and `modules.unlock`, already in dependency order); stage 2
//! resolves a few names through the root's `modules.dep` (made by depmod at build time).

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};

#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    #[error("uname: {0}")]
    Uname(nix::Error),
    #[error("read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("finit_module {path}: {source}")]
    Load { path: PathBuf, source: nix::Error },
    #[error("module {0} is not in modules.dep (built in?)")]
    NotInDep(String),
}

/// How one module load ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    Now,
    Already,
}

/// `/lib/modules/<uname -r>`.
pub fn modules_dir() -> Result<PathBuf, KmodError> {
    let uts = nix::sys::utsname::uname().map_err(KmodError::Uname)?;
    Ok(Path::new("/lib/modules").join(uts.release()))
}

/// The relative paths in a modules list: blank lines and `#` comments are skipped.
pub fn parse_list(text: &str) -> Vec<&str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect()
}

/// Loads one module file; EEXIST (already loaded, or loaded meanwhile by another thread: the
/// kernel makes a second load wait for the first) counts as success. `async_probe` is a
/// parameter every module accepts: drivers probe their devices in the background, so a slow
/// controller (AHCI scanning its ports) does not hold up the next load; stage 1 polls for the
/// root disk anyway.
pub fn load(path: &Path) -> Result<Loaded, KmodError> {
    let file = File::open(path).map_err(|source| KmodError::Open { path: path.to_owned(), source })?;
    match finit_module(&file, c"async_probe", ModuleInitFlags::empty()) {
        Ok(()) => Ok(Loaded::Now),
        Err(Errno::EEXIST) => Ok(Loaded::Already),
        Err(source) => Err(KmodError::Load { path: path.to_owned(), source }),
    }
}

/// What loading a list gave: how many modules loaded, and a console line for each one that was
/// skipped (absent hardware: ENODEV) or slow. Returned rather than printed, so a load on another
/// thread never writes over the passphrase prompt.
#[derive(Debug, Default)]
pub struct ListLoad {
    pub loaded: usize,
    pub messages: Vec<String>,
}

/// Loads every module of the list in order; a module that fails is noted and skipped.
pub fn load_list(dir: &Path, list: &str) -> ListLoad {
    let mut out = ListLoad::default();
    for rel in parse_list(list) {
        let started = std::time::Instant::now();
        match load(&dir.join(rel)) {
            Ok(_) => out.loaded += 1,
            Err(e) => out.messages.push(format!("cloister: module skipped: {e}")),
        }
        // Boot time is a budget: name what spends it (under emulation some modules take seconds).
        let ms = started.elapsed().as_millis();
        if ms >= SLOW_MODULE_MS {
            out.messages.push(format!("cloister: module {} took {ms} ms", module_name(rel)));
        }
    }
    out
}

/// Module loads at least this slow are named on the console.
const SLOW_MODULE_MS: u128 = 100;

/// Reads a modules list file (see [`parse_list`]) and loads it.
pub fn load_list_file(list_path: &str) -> Result<ListLoad, KmodError> {
    let dir = modules_dir()?;
    let list = std::fs::read_to_string(list_path)
        .map_err(|source| KmodError::Read { path: list_path.into(), source })?;
    Ok(load_list(&dir, &list))
}

/// A module's name as the kernel sees it: file stem, `-` folded to `_`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// From `modules.dep` text, the files to load for `name`, dependencies first.
pub fn resolve<'a>(dep: &'a str, name: &str) -> Option<Vec<&'a str>> {
    let want = name.replace('-', "_");
    for line in dep.lines() {
        let Some((module, deps)) = line.split_once(':') else { continue };
        if module_name(module) == want {
            // depmod lists a module's dependencies so that the last one must load first.
            let mut order: Vec<&str> = deps.split_whitespace().rev().collect();
            order.push(module.trim());
            return Some(order);
        }
    }
    None
}

/// Loads `name` and its dependencies through `<dir>/modules.dep`.
pub fn load_by_name(dir: &Path, name: &str) -> Result<(), KmodError> {
    let dep_path = dir.join("modules.dep");
    let dep =
        std::fs::read_to_string(&dep_path).map_err(|source| KmodError::Read { path: dep_path, source })?;
    let files = resolve(&dep, name).ok_or_else(|| KmodError::NotInDep(name.to_owned()))?;
    for rel in files {
        load(&dir.join(rel))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_skips_blanks_and_comments() {
        let text = "# made by the build\nkernel/drivers/md/dm-mod.ko\n\n  kernel/fs/xfs/xfs.ko  \n";
        assert_eq!(parse_list(text), vec!["kernel/drivers/md/dm-mod.ko", "kernel/fs/xfs/xfs.ko"]);
    }

    #[test]
    fn names_fold_dashes_and_suffixes() {
        assert_eq!(module_name("kernel/drivers/md/dm-crypt.ko"), "dm_crypt");
        assert_eq!(module_name("kernel/drivers/input/evdev.ko.xz"), "evdev");
    }

    #[test]
    fn resolve_puts_dependencies_first() {
        let dep = "kernel/drivers/acpi/button.ko:\n\
                   kernel/fs/xfs/xfs.ko: kernel/lib/libcrc32c.ko kernel/crypto/crc32c_generic.ko\n";
        assert_eq!(resolve(dep, "button"), Some(vec!["kernel/drivers/acpi/button.ko"]));
        assert_eq!(
            resolve(dep, "xfs"),
            Some(vec!["kernel/crypto/crc32c_generic.ko", "kernel/lib/libcrc32c.ko", "kernel/fs/xfs/xfs.ko"])
        );
        assert_eq!(resolve(dep, "evdev"), None);
    }

    #[test]
    fn load_reports_the_missing_file() {
        let err = load(Path::new("/nonexistent/x.ko")).unwrap_err();
        assert!(err.to_string().starts_with("open /nonexistent/x.ko:"), "{err}");
    }
}
