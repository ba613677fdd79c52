//! Kernel modules: runs the host's `depmod` on the staging root (the Debian kernel package ships
//! no `modules.dep`), records what it wrote in the [`Tree`], and computes the load-ordered set of
//! module files an initramfs must carry to reach the root device, the way `modprobe` would
//! resolve names, aliases, dependencies and soft dependencies.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::tree::{Node, Tree, TreeError};

/// What the initramfs loads so PID 1 can see the root disk on virtio, SATA/AHCI, NVMe or USB
/// storage and read a passphrase from a USB keyboard, in groups that stage 1 loads in this
/// order until the root partition shows up (the rest then load beside the prompt): virtio
/// first (VMs; `virtio_pci` binds before any virtio disk appears), then native controllers,
/// then USB, whose enumeration is the slowest. Order within a group matters to the kernel only
/// through dependencies, which [`ModuleIndex::closure`] adds.
///
/// Each group names the PCI devices it serves (`v<vendor>` or `c<class prefix>`, hex, as in
/// sysfs): stage 1 skips a group when no such device exists, e.g. the whole USB stack on a VM
/// without a USB controller. A group with no match is always loaded. Once the root is found,
/// stage 1 still loads the later groups marked `input` (USB: a keyboard), and no others.
pub const DISK_MODULE_GROUPS: &[ModuleGroup] = &[
    ModuleGroup { name: "virtio", words: &["v1af4"], modules: &["virtio_pci", "virtio_blk"] },
    ModuleGroup {
        name: "native",
        words: &["c01", "v1af4"],
        modules: &["virtio_scsi", "sd_mod", "ahci", "nvme"],
    },
    ModuleGroup {
        name: "usb",
        words: &["c0c03", "input"],
        modules: &[
            "xhci_pci",
            "ehci_pci",
            "ohci_pci",
            "uhci_hcd",
            "usb_storage",
            "uas",
            "usbhid",
            "hid_generic",
        ],
    },
];

/// One group of a modules list: written as `# group <name> <words...>` and then its modules'
/// closure (see `kmod::GROUP_MARK` in init for what stage 1 makes of the words).
#[derive(Debug, Clone, Copy)]
pub struct ModuleGroup {
    pub name: &'static str,
    /// PCI matches (`v<vendor id>`, `c<class code prefix>`, lowercase hex without `0x`),
    /// `cpu:<flag>` (a /proc/cpuinfo flag the modules need) and `input`.
    pub words: &'static [&'static str],
    pub modules: &'static [&'static str],
}

/// What the initramfs loads to unlock the root with dm-crypt (aes-xts-plain64) and mount its
/// XFS; not needed to find the disk, so stage 1 loads them while it looks for the disk and the
/// passphrase prompt waits, each group on a thread of its own: xfs.ko alone takes over a second
/// to link under emulation, so it waits behind nothing. Each group is a whole closure (a module
/// in two is loaded by whichever thread comes first; the other waits for it and gets EEXIST).
/// Crypto is named by module, not by alias: `crypto-aes` would also pull in `padlock_aes`
/// (VIA CPUs only), `aes_generic`, `cbc` and `sha256_generic` are built in, and dm-crypt with
/// aes-xts-plain64 needs no hash (LUKS key slots are opened in userspace). `aesni_intel` fails
/// to load on CPUs without AES-NI (QEMU's older CPU models; TCG's `max` emulates it), after
/// 0.3 s of linking under emulation: its group says `cpu:aes` and stage 1 does not try it
/// there; the built-in `aes_generic` serves. XFS is `mount`: the mapping need not wait for it.
pub const UNLOCK_MODULE_GROUPS: &[ModuleGroup] = &[
    ModuleGroup { name: "xfs", words: &["mount"], modules: &["xfs", "crc32c_intel"] },
    ModuleGroup { name: "dm-crypt", words: &[], modules: &["dm_mod", "dm_crypt", "xts"] },
    ModuleGroup { name: "aesni", words: &["cpu:aes"], modules: &["aesni_intel"] },
];

#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("cannot run depmod on {root}: {source}")]
    DepmodSpawn { root: PathBuf, source: std::io::Error },
    #[error("depmod on {root} failed ({status}): {stderr}")]
    Depmod { root: PathBuf, status: std::process::ExitStatus, stderr: String },
    #[error("read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("no kernel modules directory under {0}")]
    NoKernel(PathBuf),
    #[error("several kernels under {dir}: {}", found.join(", "))]
    SeveralKernels { dir: PathBuf, found: Vec<String> },
    #[error("{path}:{line}: cannot parse {text:?}")]
    Parse { path: PathBuf, line: usize, text: String },
    #[error("kernel module or alias {0:?} not found")]
    Unknown(String),
    #[error("record depmod output: {0}")]
    Tree(#[from] TreeError),
}

/// One loadable module: its normalised name (`dm_crypt`) and its path relative to
/// `lib/modules/<kver>/` (`kernel/drivers/md/dm-crypt.ko`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ModulePath {
    pub name: String,
    pub rel: PathBuf,
}

/// The modules directory of `kver` relative to a root: `usr/lib/modules/<kver>` when the root
/// has merged /usr with a real directory there, else `lib/modules/<kver>`.
pub fn modules_dir_rel(root: &Path, kver: &str) -> PathBuf {
    let merged = Path::new("usr/lib/modules").join(kver);
    match std::fs::symlink_metadata(root.join(&merged)) {
        Ok(m) if m.is_dir() => merged,
        _ => Path::new("lib/modules").join(kver),
    }
}

/// Runs the host's `depmod -b <root> <kver>`; it needs no privileges, only write access to the
/// modules directory, and follows the `lib -> usr/lib` link of a merged-/usr root.
pub fn run_depmod(staging_root: &Path, kver: &str) -> Result<(), ModulesError> {
    let out = Command::new("depmod")
        .arg("-b")
        .arg(staging_root)
        .arg(kver)
        .output()
        .map_err(|source| ModulesError::DepmodSpawn { root: staging_root.to_owned(), source })?;
    if !out.status.success() {
        return Err(ModulesError::Depmod {
            root: staging_root.to_owned(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Records the `modules.*` files depmod wrote (those not yet in the tree) as 0644 root files and
/// returns their relative paths.
pub fn record_depmod_outputs(tree: &mut Tree, kver: &str) -> Result<Vec<PathBuf>, ModulesError> {
    let dir = modules_dir_rel(tree.staging(), kver);
    let host = tree.host_path(&dir);
    let read_err = |source| ModulesError::Read { path: host.clone(), source };
    let mut added = Vec::new();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&host).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let is_file = entry.file_type().map_err(read_err)?.is_file();
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_file && name.starts_with("modules.") {
            names.push(name);
        }
    }
    names.sort();
    for name in names {
        let rel = dir.join(name);
        if tree.get(&rel).is_none() {
            tree.insert(&rel, Node::file(0o644))?;
            added.push(rel);
        }
    }
    Ok(added)
}

/// The one kernel version that has a modules directory under `root`.
pub fn find_kernel_version(root: &Path) -> Result<String, ModulesError> {
    let dir = ["usr/lib/modules", "lib/modules"]
        .iter()
        .map(|d| root.join(d))
        .find(|d| d.is_dir())
        .ok_or_else(|| ModulesError::NoKernel(root.to_owned()))?;
    let read_err = |source| ModulesError::Read { path: dir.clone(), source };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        if entry.path().is_dir() {
            found.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    found.sort();
    match found.len() {
        0 => Err(ModulesError::NoKernel(dir)),
        1 => Ok(found.remove(0)),
        _ => Err(ModulesError::SeveralKernels { dir, found }),
    }
}

/// `modprobe` treats `-` and `_` in module names alike.
pub fn normalize_name(name: &str) -> String {
    name.replace('-', "_")
}

/// Like kmod's `alias_normalize`: `-` becomes `_` except inside `[...]` classes.
fn normalize_alias(alias: &str) -> String {
    let mut out = String::with_capacity(alias.len());
    let mut in_class = false;
    for c in alias.chars() {
        match c {
            '[' => in_class = true,
            ']' => in_class = false,
            '-' if !in_class => {
                out.push('_');
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// What `depmod` knows about one kernel's modules.
#[derive(Debug, Default, Clone)]
pub struct ModuleIndex {
    /// Module name -> (path, dependency names in modules.dep order).
    modules: BTreeMap<String, (PathBuf, Vec<String>)>,
    /// Module name -> (pre, post) soft dependencies, as written (names or aliases).
    softdeps: BTreeMap<String, (Vec<String>, Vec<String>)>,
    /// (normalised pattern, module name) in file order.
    aliases: Vec<(String, String)>,
    builtin: BTreeSet<String>,
    /// Normalised aliases of built-in modules (from modules.builtin.modinfo).
    builtin_aliases: Vec<String>,
}

fn module_name_of(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem =
        [".ko.xz", ".ko.zst", ".ko.gz", ".ko"].iter().find_map(|ext| base.strip_suffix(ext)).unwrap_or(base);
    normalize_name(stem)
}

fn read_text(path: &Path) -> Result<String, ModulesError> {
    std::fs::read_to_string(path).map_err(|source| ModulesError::Read { path: path.to_owned(), source })
}

/// Like [`read_text`], but a file that does not exist reads as empty: not every kernel has
/// softdeps or built-in modules.
fn read_optional(path: &Path) -> Result<Vec<u8>, ModulesError> {
    match std::fs::read(path) {
        Ok(v) => Ok(v),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(ModulesError::Read { path: path.to_owned(), source }),
    }
}

impl ModuleIndex {
    /// Reads `modules.dep` (required), `modules.softdep`, `modules.alias`, `modules.builtin`
    /// and `modules.builtin.modinfo` of `kver` under `root`.
    pub fn load(root: &Path, kver: &str) -> Result<Self, ModulesError> {
        let dir = root.join(modules_dir_rel(root, kver));
        let mut index = Self::default();
        let dep = dir.join("modules.dep");
        index.parse_dep(&dep, &read_text(&dep)?)?;
        let soft = dir.join("modules.softdep");
        index.parse_softdep(&soft, &String::from_utf8_lossy(&read_optional(&soft)?))?;
        let alias = dir.join("modules.alias");
        index.parse_alias(&alias, &String::from_utf8_lossy(&read_optional(&alias)?))?;
        let builtin = String::from_utf8_lossy(&read_optional(&dir.join("modules.builtin"))?).into_owned();
        index.builtin = builtin.lines().filter(|l| !l.trim().is_empty()).map(module_name_of).collect();
        index.parse_builtin_modinfo(&read_optional(&dir.join("modules.builtin.modinfo"))?);
        Ok(index)
    }

    fn parse_dep(&mut self, path: &Path, text: &str) -> Result<(), ModulesError> {
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let (module, deps) = line.split_once(':').ok_or_else(|| ModulesError::Parse {
                path: path.to_owned(),
                line: n + 1,
                text: line.to_owned(),
            })?;
            let deps = deps.split_whitespace().map(module_name_of).collect();
            self.modules.insert(module_name_of(module), (PathBuf::from(module.trim()), deps));
        }
        Ok(())
    }

    fn parse_softdep(&mut self, path: &Path, text: &str) -> Result<(), ModulesError> {
        for (n, line) in text.lines().enumerate() {
            let mut words = line.split_whitespace();
            match words.next() {
                None => continue,
                Some(w) if w.starts_with('#') => continue,
                Some("softdep") => {}
                Some(_) => {
                    let text = line.to_owned();
                    return Err(ModulesError::Parse { path: path.to_owned(), line: n + 1, text });
                }
            }
            let Some(module) = words.next() else {
                return Err(ModulesError::Parse {
                    path: path.to_owned(),
                    line: n + 1,
                    text: line.to_owned(),
                });
            };
            let entry = self.softdeps.entry(normalize_name(module)).or_default();
            // Like modprobe: names before any `pre:`/`post:` count as `pre:`.
            let mut post = false;
            for word in words {
                match word {
                    "pre:" => post = false,
                    "post:" => post = true,
                    w if post => entry.1.push(w.to_owned()),
                    w => entry.0.push(w.to_owned()),
                }
            }
        }
        Ok(())
    }

    fn parse_alias(&mut self, path: &Path, text: &str) -> Result<(), ModulesError> {
        for (n, line) in text.lines().enumerate() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [] => {}
                [w, ..] if w.starts_with('#') => {}
                ["alias", pattern, module] => {
                    self.aliases.push((normalize_alias(pattern), normalize_name(module)));
                }
                _ => {
                    let text = line.to_owned();
                    return Err(ModulesError::Parse { path: path.to_owned(), line: n + 1, text });
                }
            }
        }
        Ok(())
    }

    /// `modules.builtin.modinfo` is NUL-separated `module.key=value` records.
    fn parse_builtin_modinfo(&mut self, bytes: &[u8]) {
        for record in bytes.split(|b| *b == 0) {
            let record = String::from_utf8_lossy(record);
            if let Some((_, alias)) = record.split_once(".alias=") {
                self.builtin_aliases.push(normalize_alias(alias));
            }
        }
    }

    /// Loadable module names `name` stands for, as modprobe looks it up: a module name first,
    /// then a built-in module (nothing to load), then aliases of loadable modules, then aliases
    /// of built-in ones. `None` when nothing matches.
    pub fn resolve(&self, name: &str) -> Option<Vec<String>> {
        let module = normalize_name(name);
        if self.modules.contains_key(&module) {
            return Some(vec![module]);
        }
        if self.builtin.contains(&module) {
            return Some(Vec::new());
        }
        let alias = normalize_alias(name);
        let mut found: Vec<String> = Vec::new();
        for (pattern, module) in &self.aliases {
            if fnmatch(pattern.as_bytes(), alias.as_bytes()) && !found.contains(module) {
                found.push(module.clone());
            }
        }
        if !found.is_empty() {
            return Some(found);
        }
        if self.builtin_aliases.iter().any(|p| fnmatch(p.as_bytes(), alias.as_bytes())) {
            return Some(Vec::new());
        }
        None
    }

    /// Every module file needed to load `wanted` (names or aliases), dependencies first, each
    /// once. Soft dependencies that resolve to nothing are skipped, as modprobe does; an unknown
    /// wanted name is an error.
    pub fn closure(&self, wanted: &[&str]) -> Result<Vec<ModulePath>, ModulesError> {
        let mut walk = Walk { index: self, done: HashSet::new(), active: HashSet::new(), out: Vec::new() };
        for name in wanted {
            let modules = self.resolve(name).ok_or_else(|| ModulesError::Unknown((*name).to_owned()))?;
            for module in modules {
                walk.visit(&module);
            }
        }
        Ok(walk.out)
    }

    /// Total size in bytes of the module files of `modules` under `root`.
    pub fn files_size(root: &Path, kver: &str, modules: &[ModulePath]) -> Result<u64, ModulesError> {
        let dir = root.join(modules_dir_rel(root, kver));
        let mut total = 0;
        for m in modules {
            let path = dir.join(&m.rel);
            total += std::fs::metadata(&path).map_err(|source| ModulesError::Read { path, source })?.len();
        }
        Ok(total)
    }
}

struct Walk<'a> {
    index: &'a ModuleIndex,
    done: HashSet<String>,
    /// Modules on the current path: soft dependencies may point back, modprobe breaks such
    /// loops and so do we.
    active: HashSet<String>,
    out: Vec<ModulePath>,
}

impl Walk<'_> {
    fn visit(&mut self, module: &str) {
        if self.done.contains(module) || !self.active.insert(module.to_owned()) {
            return;
        }
        let Some((path, deps)) = self.index.modules.get(module) else {
            self.active.remove(module);
            return;
        };
        let (pre, post) = self.index.softdeps.get(module).cloned().unwrap_or_default();
        self.visit_soft(&pre);
        for dep in deps {
            self.visit(dep);
        }
        self.done.insert(module.to_owned());
        self.out.push(ModulePath { name: module.to_owned(), rel: path.clone() });
        self.active.remove(module);
        self.visit_soft(&post);
    }

    fn visit_soft(&mut self, names: &[String]) {
        for name in names {
            for module in self.index.resolve(name).unwrap_or_default() {
                self.visit(&module);
            }
        }
    }
}

/// fnmatch(3) without flags, which is how kmod matches `modules.alias` patterns: `*`, `?` and
/// `[...]` classes with ranges and `!`/`^` negation.
fn fnmatch(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        let step = match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
                continue;
            }
            Some(b'?') => Some(p + 1),
            Some(b'[') => match_class(pattern, p, text[t]),
            Some(c) if *c == text[t] => Some(p + 1),
            _ => None,
        };
        match (step, star) {
            (Some(next), _) => {
                p = next;
                t += 1;
            }
            (None, Some((sp, st))) => {
                p = sp + 1;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            (None, None) => return false,
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|c| *c == b'*')
}

/// Matches `c` against the class starting at `pattern[open] == b'['`; returns the index after
/// the class when it matches. A class without `]` matches a literal `[`.
fn match_class(pattern: &[u8], open: usize, c: u8) -> Option<usize> {
    let mut i = open + 1;
    let negate = matches!(pattern.get(i), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let lo = *pattern.get(i)?;
        if lo == b']' && !first {
            break;
        }
        first = false;
        if pattern.get(i + 1) == Some(&b'-') && pattern.get(i + 2).is_some_and(|h| *h != b']') {
            let hi = pattern[i + 2];
            matched |= lo <= c && c <= hi;
            i += 3;
        } else {
            matched |= lo == c;
            i += 1;
        }
    }
    (matched != negate).then_some(i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KVER: &str = "6.1.0-test";

    fn fake_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("lib/modules").join(KVER);
        std::fs::create_dir_all(&m).unwrap();
        let dep = "kernel/drivers/md/dm-crypt.ko: kernel/drivers/md/dm-mod.ko\n\
                   kernel/drivers/md/dm-mod.ko:\n\
                   kernel/fs/xfs/xfs.ko: kernel/lib/libcrc32c.ko\n\
                   kernel/lib/libcrc32c.ko:\n\
                   kernel/crypto/crc32c_generic.ko:\n\
                   kernel/arch/x86/crypto/crc32c-intel.ko:\n\
                   kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/drivers/virtio/virtio_ring.ko:\n\
                   kernel/drivers/usb/storage/uas.ko: kernel/drivers/usb/storage/usb-storage.ko\n\
                   kernel/drivers/usb/storage/usb-storage.ko:\n\
                   kernel/drivers/usb/host/ohci-pci.ko:\n\
                   kernel/drivers/usb/host/ehci-pci.ko:\n\
                   kernel/crypto/xts.ko:\n\
                   kernel/crypto/ecb.ko:\n";
        std::fs::write(m.join("modules.dep"), dep).unwrap();
        let soft = "# comment\nsoftdep libcrc32c pre: crc32c\nsoftdep xts pre: ecb\n\
                    softdep ohci_pci pre: ehci_pci post: uas\nsoftdep ecb pre: xts\n";
        std::fs::write(m.join("modules.softdep"), soft).unwrap();
        let alias = "# Aliases extracted from modules themselves.\n\
                     alias crc32c crc32c_intel\nalias crc32c crc32c_generic\n\
                     alias crypto-xts xts\n\
                     alias usb:v13FDp3940d0[0-2]*dc*dsc*dp*ic*isc*ip*in* uas\n\
                     alias virtio:d00000002v* virtio_blk\n";
        std::fs::write(m.join("modules.alias"), alias).unwrap();
        std::fs::write(m.join("modules.builtin"), "kernel/crypto/sha256_generic.ko\n").unwrap();
        std::fs::write(
            m.join("modules.builtin.modinfo"),
            b"sha256_generic.alias=crypto-sha256\0sha256_generic.license=GPL\0",
        )
        .unwrap();
        dir
    }

    fn names(index: &ModuleIndex, wanted: &[&str]) -> Vec<String> {
        index.closure(wanted).unwrap().into_iter().map(|m| m.name).collect()
    }

    #[test]
    fn dependencies_come_first_once() {
        let root = fake_root();
        let index = ModuleIndex::load(root.path(), KVER).unwrap();
        assert_eq!(names(&index, &["dm_crypt", "dm-mod"]), ["dm_mod", "dm_crypt"]);
        assert_eq!(names(&index, &["virtio_blk"]), ["virtio_ring", "virtio", "virtio_blk"]);
        let c = index.closure(&["dm-crypt"]).unwrap();
        assert_eq!(c[1].rel, PathBuf::from("kernel/drivers/md/dm-crypt.ko"));
    }

    #[test]
    fn softdeps_resolve_through_aliases_pre_and_post() {
        let root = fake_root();
        let index = ModuleIndex::load(root.path(), KVER).unwrap();
        // xfs -> libcrc32c, which wants crc32c first: both alias targets, in alias-file order.
        assert_eq!(names(&index, &["xfs"]), ["crc32c_intel", "crc32c_generic", "libcrc32c", "xfs"]);
        assert_eq!(names(&index, &["ohci_pci"]), ["ehci_pci", "ohci_pci", "usb_storage", "uas"]);
        // ecb and xts name each other as soft dependencies: the loop is broken, not followed.
        assert_eq!(names(&index, &["crypto-xts"]), ["ecb", "xts"]);
    }

    #[test]
    fn aliases_match_globs_and_classes() {
        let root = fake_root();
        let index = ModuleIndex::load(root.path(), KVER).unwrap();
        assert_eq!(
            names(&index, &["usb:v13FDp3940d0150dc00dsc00dp00ic08isc06ip50in00"]),
            ["usb_storage", "uas"]
        );
        assert!(index.resolve("usb:v13FDp3940d0350dc00dsc00dp00ic08isc06ip50in00").is_none());
        assert_eq!(names(&index, &["virtio:d00000002v00001AF4"]), ["virtio_ring", "virtio", "virtio_blk"]);
        assert!(index.resolve("crypto_xts").is_some(), "- and _ are alike in aliases too");
    }

    #[test]
    fn builtin_modules_and_aliases_need_no_file() {
        let root = fake_root();
        let index = ModuleIndex::load(root.path(), KVER).unwrap();
        assert_eq!(index.closure(&["sha256_generic", "sha256-generic", "crypto-sha256"]).unwrap(), []);
    }

    #[test]
    fn unknown_name_is_an_error_naming_it() {
        let root = fake_root();
        let index = ModuleIndex::load(root.path(), KVER).unwrap();
        let err = index.closure(&["dm_crypt", "no-such_thing"]).unwrap_err();
        assert!(matches!(&err, ModulesError::Unknown(n) if n == "no-such_thing"), "{err}");
        assert!(err.to_string().contains("no-such_thing"));
    }

    #[test]
    fn fnmatch_cases() {
        let yes = [
            ("a*c", "abbbc"),
            ("a?c", "abc"),
            ("[!x]b", "ab"),
            ("d0[0-2]*", "d01zz"),
            ("*", ""),
            ("a]", "a]"),
        ];
        let no = [("a*c", "abd"), ("[!a]b", "ab"), ("d0[0-2]", "d03"), ("abc", "ab"), ("ab", "abc")];
        for (p, t) in yes {
            assert!(fnmatch(p.as_bytes(), t.as_bytes()), "{p} should match {t}");
        }
        for (p, t) in no {
            assert!(!fnmatch(p.as_bytes(), t.as_bytes()), "{p} should not match {t}");
        }
    }

    #[test]
    fn kernel_version_is_the_only_directory() {
        let root = fake_root();
        assert_eq!(find_kernel_version(root.path()).unwrap(), KVER);
        std::fs::create_dir_all(root.path().join("lib/modules/6.1.0-other")).unwrap();
        let err = find_kernel_version(root.path()).unwrap_err();
        assert!(err.to_string().contains("6.1.0-other") && err.to_string().contains(KVER), "{err}");
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(find_kernel_version(empty.path()), Err(ModulesError::NoKernel(_))));
    }

    /// Assembles a relocatable object that depmod reads like a kernel module: `.modinfo`
    /// strings, exports in `__ksymtab_strings`, and undefined symbols it depends on.
    fn fake_ko(out: &Path, asm: &str) {
        let src = out.with_extension("s");
        std::fs::write(&src, asm).unwrap();
        let st = Command::new("as").arg("-o").arg(out).arg(&src).status().unwrap();
        assert!(st.success());
        std::fs::remove_file(src).unwrap();
    }

    /// The real host depmod on a merged-/usr staging tree (`lib -> usr/lib`) with three
    /// assembled modules: a symbol dependency, a modinfo softdep, a glob alias.
    #[test]
    fn depmod_on_a_merged_usr_tree_is_recorded_and_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let mut tree = Tree::new(dir.path().join("root")).unwrap();
        tree.insert("lib", Node::symlink("usr/lib")).unwrap();
        let mdir = format!("usr/lib/modules/{KVER}");
        tree.mkdir_p(Path::new(&mdir).join("kernel").as_path()).unwrap();
        tree.write_file(
            format!("{mdir}/modules.builtin"),
            b"kernel/crypto/sha256_generic.ko\n",
            Node::file(0o644),
        )
        .unwrap();
        let kdir = tree.host_path(Path::new(&mdir)).join("kernel");
        let info = ".section .modinfo,\"a\"\n.asciz \"license=GPL\"\n";
        fake_ko(
            &kdir.join("fake-a.ko"),
            &format!("{info}.asciz \"alias=fake-alias-[0-3]*\"\n.section __ksymtab_strings,\"a\"\n.asciz \"fake_a_sym\"\n.text\n.globl fake_a_sym\nfake_a_sym:\nret\n"),
        );
        fake_ko(
            &kdir.join("fake_b.ko"),
            &format!("{info}.asciz \"softdep=pre: fake_c\"\n.text\ncall fake_a_sym\n"),
        );
        fake_ko(&kdir.join("fake_c.ko"), &format!("{info}.text\nret\n"));

        run_depmod(tree.staging(), KVER).unwrap();
        let added = record_depmod_outputs(&mut tree, KVER).unwrap();
        let added: Vec<String> = added.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        assert!(added.contains(&format!("{mdir}/modules.dep")), "{added:?}");
        assert!(added.contains(&format!("{mdir}/modules.alias")), "{added:?}");
        assert!(!added.contains(&format!("{mdir}/modules.builtin")), "already recorded");
        assert_eq!(tree.get(Path::new(&format!("{mdir}/modules.dep"))).unwrap(), &Node::file(0o644));
        assert_eq!(find_kernel_version(tree.staging()).unwrap(), KVER);

        let index = ModuleIndex::load(tree.staging(), KVER).unwrap();
        assert_eq!(names(&index, &["fake_b"]), ["fake_c", "fake_a", "fake_b"]);
        assert_eq!(names(&index, &["fake_alias_2x", "sha256_generic"]), ["fake_a"]);
        assert!(index.closure(&["fake-alias-5"]).is_err());
    }
}
