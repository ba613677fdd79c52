//! Loading kernel modules without modprobe: stage 1 follows the lists the build wrote
//! (`/etc/cloister/modules` and `modules.unlock`, already in dependency order); stage 2
//! resolves a few names through the root's `modules.dep` (made by depmod at build time).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

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

/// Prefix of the line that starts a group in a modules list:
/// `# group <name> [<pci match>...]`, each match `v<vendor>` or `c<class prefix>` (hex).
pub const GROUP_MARK: &str = "# group ";

/// One group of a modules list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Group {
    pub name: String,
    /// PCI matches; empty: the group is always needed.
    pub pci: Vec<String>,
    pub modules: Vec<String>,
}

impl Group {
    /// Whether any of `devices` (vendor, class as sysfs writes them: `0x1af4`, `0x010601`)
    /// is served by this group.
    pub fn serves(&self, devices: &[(String, String)]) -> bool {
        self.pci.is_empty()
            || devices.iter().any(|(vendor, class)| {
                let (vendor, class) = (vendor.trim_start_matches("0x"), class.trim_start_matches("0x"));
                self.pci.iter().any(|m| match m.split_at(1) {
                    ("v", v) => vendor.eq_ignore_ascii_case(v),
                    ("c", c) => class.to_ascii_lowercase().starts_with(c),
                    _ => false,
                })
            })
    }
}

/// A list split at its `# group` lines; modules before the first mark form a group named "".
/// Empty groups are dropped.
pub fn parse_groups(text: &str) -> Vec<Group> {
    let mut groups = vec![Group::default()];
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix(GROUP_MARK) {
            let mut words = rest.split_whitespace().map(String::from);
            let name = words.next().unwrap_or_default();
            groups.push(Group { name, pci: words.collect(), modules: Vec::new() });
        } else if !line.is_empty() && !line.starts_with('#') {
            if let Some(last) = groups.last_mut() {
                last.modules.push(line.to_string());
            }
        }
    }
    groups.retain(|g| !g.modules.is_empty());
    groups
}

/// Vendor and class of every PCI device, from sysfs; `None` when there is no PCI bus to read
/// (then every group counts as needed).
pub fn pci_devices(bus: &Path) -> Option<Vec<(String, String)>> {
    let entries = std::fs::read_dir(bus).ok()?;
    let read = |p: PathBuf| std::fs::read_to_string(p).map(|s| s.trim().to_string()).ok();
    Some(
        entries
            .flatten()
            .filter_map(|e| Some((read(e.path().join("vendor"))?, read(e.path().join("class"))?)))
            .collect(),
    )
}

/// Loads every module of the list in order; a module that fails is noted and skipped.
pub fn load_list(dir: &Path, list: &str) -> ListLoad {
    load_paths(dir, &parse_list(list), None)
}

/// Loads `rels` in order, noting failures and slow loads; stops early once `stop` is set.
pub fn load_paths(dir: &Path, rels: &[&str], stop: Option<&AtomicBool>) -> ListLoad {
    let mut out = ListLoad::default();
    for &rel in rels {
        if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            break;
        }
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
    fn groups_split_at_marks_and_drop_empty_ones() {
        let text =
            "# made by the build\n# group virtio v1af4\na.ko\nb.ko\n# group empty\n# group usb c0c03\nc.ko\n";
        let groups = parse_groups(text);
        let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["virtio", "usb"]);
        assert_eq!(groups[0].modules, ["a.ko", "b.ko"]);
        assert_eq!(groups[1].pci, ["c0c03"]);
        assert_eq!(parse_groups("x.ko\n")[0].modules, ["x.ko"]);
        // Lists without marks still read as one list.
        assert_eq!(parse_list(text), ["a.ko", "b.ko", "c.ko"]);
    }

    #[test]
    fn groups_serve_matching_pci_devices_only() {
        let group =
            |pci: &[&str]| Group { pci: pci.iter().map(|s| s.to_string()).collect(), ..Group::default() };
        let q35 = vec![("0x8086".to_string(), "0x010601".to_string()), ("0x1af4".into(), "0x010000".into())];
        assert!(group(&["v1af4"]).serves(&q35));
        assert!(group(&["c01"]).serves(&q35));
        assert!(!group(&["c0c03"]).serves(&q35), "no USB controller on this machine");
        assert!(group(&[]).serves(&[]), "a group without matches is always needed");
    }

    #[test]
    fn pci_devices_are_read_from_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("0000:00:1f.2");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("vendor"), "0x8086\n").unwrap();
        std::fs::write(dev.join("class"), "0x010601\n").unwrap();
        assert_eq!(pci_devices(dir.path()), Some(vec![("0x8086".into(), "0x010601".into())]));
        assert_eq!(pci_devices(&dir.path().join("absent")), None);
    }

    #[test]
    fn a_set_stop_flag_loads_nothing() {
        let stop = AtomicBool::new(true);
        let load = load_paths(Path::new("/nonexistent"), &["x.ko"], Some(&stop));
        assert_eq!((load.loaded, load.messages.len()), (0, 0));
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
