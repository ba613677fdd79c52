//! Loading kernel modules without modprobe: stage 1 follows the lists the build wrote
//! (`/etc/cloister/modules` and `modules.unlock`, in groups, each already in dependency order); stage 2
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

/// Prefix of the line that starts a group in a modules list: `# group <name> [<word>...]`, each
/// word one of
/// - `v<vendor>` or `c<class prefix>` (PCI, hex): the group serves such devices (no PCI word:
///   any machine);
/// - `cpu:<flag>`: the modules need this CPU feature (a `/proc/cpuinfo` flag) and fail to load
///   without it, after the kernel has spent the time to link them (`aesni_intel` without
///   AES-NI: 0.3 s under emulation);
/// - `input`: the group drives keyboards too, so stage 1 still loads it once the root is found;
/// - `mount`: only mounting the unlocked root needs the group (XFS), not mapping it, so stage 1
///   waits for it just before the mount instead of before the mapping.
pub const GROUP_MARK: &str = "# group ";

/// One group of a modules list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Group {
    pub name: String,
    /// PCI matches; empty: the group is needed on any machine.
    pub pci: Vec<String>,
    /// CPU flags every module of the group needs.
    pub cpu: Vec<String>,
    /// Whether keyboards may need the group.
    pub input: bool,
    /// Whether only the mount of the unlocked root needs the group.
    pub mount: bool,
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

    /// The first CPU flag the group needs that `flags` lacks.
    pub fn missing_cpu_flag(&self, flags: &[&str]) -> Option<&str> {
        self.cpu.iter().map(String::as_str).find(|f| !flags.contains(f))
    }
}

/// A list split at its `# group` lines; modules before the first mark form a group named "".
/// Empty groups are dropped.
pub fn parse_groups(text: &str) -> Vec<Group> {
    let mut groups = vec![Group::default()];
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix(GROUP_MARK) {
            let mut words = rest.split_whitespace();
            let mut group = Group { name: words.next().unwrap_or_default().to_string(), ..Group::default() };
            for word in words {
                if let Some(flag) = word.strip_prefix("cpu:") {
                    group.cpu.push(flag.to_string());
                } else if word == "input" {
                    group.input = true;
                } else if word == "mount" {
                    group.mount = true;
                } else {
                    group.pci.push(word.to_string());
                }
            }
            groups.push(group);
        } else if !line.is_empty() && !line.starts_with('#') {
            if let Some(last) = groups.last_mut() {
                last.modules.push(line.to_string());
            }
        }
    }
    groups.retain(|g| !g.modules.is_empty());
    groups
}

/// The flags of the first processor in `/proc/cpuinfo` text (x86: `flags : fpu vme ...`).
pub fn cpu_flags(cpuinfo: &str) -> Vec<&str> {
    cpuinfo
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == "flags").then_some(value)
        })
        .map(|v| v.split_whitespace().collect())
        .unwrap_or_default()
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

/// Loads `rels` in order, noting failures (a module that fails is skipped) and slow loads;
/// stops early once `stop` is set.
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
        let groups = parse_groups(text);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].modules, ["kernel/drivers/md/dm-mod.ko", "kernel/fs/xfs/xfs.ko"]);
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
        assert!(!groups[1].input && groups[1].cpu.is_empty());
        assert_eq!(parse_groups("x.ko\n")[0].modules, ["x.ko"]);
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
    fn group_words_say_pci_cpu_and_input() {
        let groups = parse_groups("# group usb c0c03 input\na.ko\n# group aesni cpu:aes cpu:avx\nb.ko\n");
        assert_eq!((groups[0].pci.as_slice(), groups[0].input), (&["c0c03".to_string()][..], true));
        assert_eq!(groups[1].cpu, ["aes", "avx"]);
        assert!(groups[1].pci.is_empty(), "cpu words are no PCI matches");
        assert_eq!(groups[1].missing_cpu_flag(&["fpu", "aes", "avx"]), None);
        assert_eq!(groups[1].missing_cpu_flag(&["fpu", "aes"]), Some("avx"));
        assert_eq!(groups[0].missing_cpu_flag(&[]), None);
        assert!(!groups[0].mount && !groups[1].mount);
        let xfs = &parse_groups("# group xfs mount\nxfs.ko\n")[0];
        assert!(xfs.mount && xfs.pci.is_empty(), "mount is no PCI match");
    }

    #[test]
    fn cpu_flags_come_from_the_first_processor() {
        let info = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse4_2 aes\n\n\
                    processor\t: 1\nflags\t\t: fpu\n";
        assert_eq!(cpu_flags(info), ["fpu", "sse4_2", "aes"]);
        assert!(cpu_flags("processor\t: 0\n").is_empty());
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
