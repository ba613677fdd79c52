//! Shared libraries inside the image: resolves an ELF's interpreter and `DT_NEEDED` entries the
//! way ld.so would if a root directory were `/` (never falling back to the build host's files),
//! checks a whole tree for unresolved libraries, and reads glibc symbol versions.

use std::collections::{BTreeSet, VecDeque};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use goblin::elf::header::{ET_DYN, ET_EXEC};
use goblin::elf::Elf;

/// Where ld.so looks after `DT_RUNPATH`/`DT_RPATH` on Debian amd64 (its multiarch
/// `ld.so.conf` entries, then the built-in defaults).
pub const DEFAULT_LIB_DIRS: &[&str] =
    &["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib64", "usr/lib", "lib"];

/// Symlinks resolved while looking up one path before giving up, like the kernel's limit.
const MAX_SYMLINKS: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parse ELF {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{binary} needs {soname}, which is not in {root}")]
    Missing { root: PathBuf, binary: PathBuf, soname: String },
    #[error("too many levels of symbolic links resolving {path} in {root}")]
    SymlinkLoop { root: PathBuf, path: PathBuf },
}

/// One unresolved reference found by [`check_tree`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// A `DT_NEEDED` soname found in none of the search directories.
    Library { elf: PathBuf, soname: String },
    /// The `PT_INTERP` program interpreter does not exist in the tree.
    Interpreter { elf: PathBuf, path: String },
    /// A file with the ELF magic that could not be read or parsed.
    Unreadable { elf: PathBuf, reason: String },
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missing::Library { elf, soname } => write!(f, "{}: library {soname} not found", elf.display()),
            Missing::Interpreter { elf, path } => {
                write!(f, "{}: interpreter {path} not found", elf.display())
            }
            Missing::Unreadable { elf, reason } => write!(f, "{}: unreadable ELF: {reason}", elf.display()),
        }
    }
}

/// What ld.so needs from one object.
struct Deps {
    machine: u16,
    interp: Option<String>,
    needed: Vec<String>,
    /// `DT_RUNPATH`, or `DT_RPATH` when there is no runpath (ld.so ignores RPATH then).
    search: Vec<String>,
}

fn read_file(path: &Path) -> Result<Vec<u8>, ElfError> {
    std::fs::read(path).map_err(|source| ElfError::Read { path: path.to_owned(), source })
}

fn parse_deps(path: &Path, bytes: &[u8]) -> Result<Deps, ElfError> {
    let elf =
        Elf::parse(bytes).map_err(|e| ElfError::Parse { path: path.to_owned(), message: e.to_string() })?;
    let paths = if elf.runpaths.is_empty() { &elf.rpaths } else { &elf.runpaths };
    Ok(Deps {
        machine: elf.header.e_machine,
        interp: elf.interpreter.map(str::to_owned),
        needed: elf.libraries.iter().map(|s| (*s).to_owned()).collect(),
        search: paths
            .iter()
            .flat_map(|p| p.split(':'))
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

/// The result of looking a path up inside a root: the symlinks passed on the way (including
/// directory links such as `lib64 -> usr/lib64`) and the final path, all relative to the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub links: Vec<PathBuf>,
    pub target: PathBuf,
}

/// Resolves `path` inside `root` as if `root` were `/`: absolute link targets start again at
/// `root` and `..` stops at it, so nothing outside `root` is ever looked at. `Ok(None)` when a
/// component does not exist.
pub fn resolve_in_root(root: &Path, path: &Path) -> Result<Option<Resolved>, ElfError> {
    let mut pending: VecDeque<PathBuf> = components(path);
    let mut cur = PathBuf::new();
    let mut links = Vec::new();
    let mut followed = 0;
    while let Some(part) = pending.pop_front() {
        if part.as_os_str() == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&part);
        let host = root.join(&next);
        let Ok(meta) = std::fs::symlink_metadata(&host) else { return Ok(None) };
        if !meta.file_type().is_symlink() {
            cur = next;
            continue;
        }
        followed += 1;
        if followed > MAX_SYMLINKS {
            return Err(ElfError::SymlinkLoop { root: root.to_owned(), path: path.to_owned() });
        }
        let target =
            std::fs::read_link(&host).map_err(|source| ElfError::Read { path: host.clone(), source })?;
        if target.is_absolute() {
            cur = PathBuf::new();
        }
        for c in components(&target).into_iter().rev() {
            pending.push_front(c);
        }
        if !links.contains(&next) {
            links.push(next);
        }
    }
    Ok(Some(Resolved { links, target: cur }))
}

/// `a/./b/../c` as plain names and `..`, without the root or `.`.
fn components(path: &Path) -> VecDeque<PathBuf> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(PathBuf::from(n)),
            Component::ParentDir => Some(PathBuf::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// The ELF machine of a regular file at `host`, if it is one; ld.so skips libraries of
/// another architecture found first on the path (`/usr/lib32` and the like).
fn elf_machine(host: &Path) -> Option<u16> {
    let mut head = [0u8; 64];
    let mut f = std::fs::File::open(host).ok()?;
    f.read_exact(&mut head).ok()?;
    let header = Elf::parse_header(&head).ok()?;
    Some(header.e_machine)
}

/// Finds `soname` for an object whose directory (in the root) is `origin` (`None` for an object
/// outside the root, whose `$ORIGIN` entries cannot point into it).
fn find_library(
    root: &Path,
    deps: &Deps,
    origin: Option<&Path>,
    soname: &str,
) -> Result<Option<Resolved>, ElfError> {
    if soname.contains('/') {
        return resolve_in_root(root, Path::new(soname));
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    for entry in &deps.search {
        if entry.contains("$ORIGIN") || entry.contains("${ORIGIN}") {
            let Some(origin) = origin else { continue };
            let o = Path::new("/").join(origin).to_string_lossy().into_owned();
            dirs.push(PathBuf::from(entry.replace("${ORIGIN}", &o).replace("$ORIGIN", &o)));
        } else {
            dirs.push(PathBuf::from(entry));
        }
    }
    dirs.extend(DEFAULT_LIB_DIRS.iter().map(PathBuf::from));
    for dir in dirs {
        let Some(found) = resolve_in_root(root, &dir.join(soname))? else { continue };
        let host = root.join(&found.target);
        if host.is_file() && elf_machine(&host) == Some(deps.machine) {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// Collects the interpreter and libraries of one object (at `binary`, for messages) into
/// `out` and queues the newly found libraries.
fn add_deps(
    root: &Path,
    binary: &Path,
    deps: &Deps,
    origin: Option<&Path>,
    out: &mut BTreeSet<PathBuf>,
    queue: &mut VecDeque<PathBuf>,
) -> Result<(), ElfError> {
    let missing = |soname: &str| ElfError::Missing {
        root: root.to_owned(),
        binary: binary.to_owned(),
        soname: soname.to_owned(),
    };
    let mut found = Vec::new();
    if let Some(interp) = &deps.interp {
        found.push(resolve_in_root(root, Path::new(interp))?.ok_or_else(|| missing(interp))?);
    }
    for soname in &deps.needed {
        found.push(find_library(root, deps, origin, soname)?.ok_or_else(|| missing(soname))?);
    }
    for r in found {
        out.extend(r.links);
        if out.insert(r.target.clone()) {
            queue.push_back(r.target);
        }
    }
    Ok(())
}

fn closure_from(
    root: &Path,
    queue: &mut VecDeque<PathBuf>,
    out: &mut BTreeSet<PathBuf>,
) -> Result<(), ElfError> {
    while let Some(rel) = queue.pop_front() {
        let host = root.join(&rel);
        let deps = parse_deps(&host, &read_file(&host)?)?;
        add_deps(root, &rel, &deps, rel.parent(), out, queue)?;
    }
    Ok(())
}

/// Every path inside `root` that loading `elf_rel` (relative to `root`) needs: the interpreter
/// and the libraries, transitively, with the symlinks on the way to each (soname links,
/// `lib64 -> usr/lib64`) as well as the real files. Sorted, relative to `root`, without
/// `elf_rel` itself.
pub fn needed_closure(root: &Path, elf_rel: &Path) -> Result<Vec<PathBuf>, ElfError> {
    let start = resolve_in_root(root, elf_rel)?.ok_or_else(|| ElfError::Read {
        path: root.join(elf_rel),
        source: std::io::ErrorKind::NotFound.into(),
    })?;
    let mut out = BTreeSet::new();
    let mut queue = VecDeque::new();
    let host = root.join(&start.target);
    let deps = parse_deps(&host, &read_file(&host)?)?;
    add_deps(root, elf_rel, &deps, start.target.parent(), &mut out, &mut queue)?;
    closure_from(root, &mut queue, &mut out)?;
    out.remove(&start.target);
    Ok(out.into_iter().collect())
}

/// Like [`needed_closure`] for an ELF file outside `root` (a freshly built binary that will be
/// copied in): its libraries must all come from `root`. `$ORIGIN` entries of that binary are
/// ignored, since its final place is not known here.
pub fn needed_closure_for_file(root: &Path, host_elf: &Path) -> Result<Vec<PathBuf>, ElfError> {
    let deps = parse_deps(host_elf, &read_file(host_elf)?)?;
    let mut out = BTreeSet::new();
    let mut queue = VecDeque::new();
    add_deps(root, host_elf, &deps, None, &mut out, &mut queue)?;
    closure_from(root, &mut queue, &mut out)?;
    Ok(out.into_iter().collect())
}

/// The ELF type of a regular file, or `None` when it is not an ELF file. Reads only the header.
fn elf_type(host: &Path) -> Result<Option<u16>, String> {
    let mut head = [0u8; 64];
    let mut f = std::fs::File::open(host).map_err(|e| e.to_string())?;
    let n = f.read(&mut head).map_err(|e| e.to_string())?;
    if n < 4 || &head[..4] != b"\x7fELF" {
        return Ok(None);
    }
    let header = Elf::parse_header(&head[..n]).map_err(|e| e.to_string())?;
    Ok(Some(header.e_type))
}

/// Checks every regular ELF executable or shared object among `paths` (relative to `root`;
/// other files, and relocatable objects such as kernel modules, are skipped): its interpreter
/// and each `DT_NEEDED` must resolve inside `root`. Returns everything unresolved.
pub fn check_tree<'a>(root: &Path, paths: impl IntoIterator<Item = &'a Path>) -> Vec<Missing> {
    let mut missing = Vec::new();
    for rel in paths {
        let host = root.join(rel);
        let is_file = std::fs::symlink_metadata(&host).map(|m| m.is_file()).unwrap_or(false);
        if !is_file {
            continue;
        }
        let unreadable = |reason: String| Missing::Unreadable { elf: rel.to_owned(), reason };
        match elf_type(&host) {
            Ok(Some(ET_EXEC | ET_DYN)) => {}
            Ok(_) => continue,
            Err(reason) => {
                missing.push(unreadable(reason));
                continue;
            }
        }
        match read_file(&host).and_then(|bytes| parse_deps(&host, &bytes)) {
            Ok(deps) => check_one(root, rel, &deps, &mut missing),
            Err(e) => missing.push(unreadable(e.to_string())),
        }
    }
    missing
}

fn check_one(root: &Path, rel: &Path, deps: &Deps, missing: &mut Vec<Missing>) {
    let elf = || rel.to_owned();
    if let Some(interp) = &deps.interp {
        if !matches!(resolve_in_root(root, Path::new(interp)), Ok(Some(r)) if root.join(&r.target).is_file())
        {
            missing.push(Missing::Interpreter { elf: elf(), path: interp.clone() });
        }
    }
    for soname in &deps.needed {
        if !matches!(find_library(root, deps, rel.parent(), soname), Ok(Some(_))) {
            missing.push(Missing::Library { elf: elf(), soname: soname.clone() });
        }
    }
}

/// The `GLIBC_*` symbol versions an ELF file requires (from its `.gnu.version_r`).
pub fn glibc_versions_needed(elf: &Path) -> Result<BTreeSet<String>, ElfError> {
    let bytes = read_file(elf)?;
    let parsed =
        Elf::parse(&bytes).map_err(|e| ElfError::Parse { path: elf.to_owned(), message: e.to_string() })?;
    let mut out = BTreeSet::new();
    if let Some(verneed) = &parsed.verneed {
        for need in verneed.iter() {
            for aux in need.iter() {
                if let Some(name) = parsed.dynstrtab.get_at(aux.vna_name).filter(|n| n.starts_with("GLIBC_"))
                {
                    out.insert(name.to_owned());
                }
            }
        }
    }
    Ok(out)
}

/// The `GLIBC_*` versions a C library (`libc.so.6`) defines (from its `.gnu.version_d`).
pub fn glibc_versions_provided(libc: &Path) -> Result<BTreeSet<String>, ElfError> {
    let bytes = read_file(libc)?;
    let parsed =
        Elf::parse(&bytes).map_err(|e| ElfError::Parse { path: libc.to_owned(), message: e.to_string() })?;
    let mut out = BTreeSet::new();
    if let Some(verdef) = &parsed.verdef {
        for def in verdef.iter() {
            // The first aux entry is the version's own name; later ones name its parents.
            if let Some(name) = def.iter().next().and_then(|aux| parsed.dynstrtab.get_at(aux.vda_name)) {
                if name.starts_with("GLIBC_") {
                    out.insert(name.to_owned());
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(paths: &[PathBuf]) -> Vec<String> {
        paths.iter().map(|p| p.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn host_ls_resolves_libc_and_libselinux_with_links() {
        let closure = needed_closure(Path::new("/"), Path::new("usr/bin/ls")).unwrap();
        let names = strs(&closure);
        for want in ["libc.so.6", "libselinux.so.1", "libpcre2-8.so.0", "ld-linux-x86-64.so.2"] {
            assert!(names.iter().any(|n| n.ends_with(&format!("/{want}"))), "{want} missing from {names:?}");
        }
        assert!(names.iter().all(|n| !n.starts_with('/')), "relative paths only: {names:?}");
        // The interpreter path goes through the lib64 link, which must be listed too.
        let lib64 = std::fs::symlink_metadata("/lib64").unwrap().file_type().is_symlink();
        assert_eq!(names.contains(&"lib64".to_owned()), lib64, "{names:?}");
        assert!(!names.contains(&"usr/bin/ls".to_owned()));
    }

    #[test]
    fn host_file_outside_root_uses_root_libs() {
        let closure = needed_closure_for_file(Path::new("/"), Path::new("/usr/bin/ls")).unwrap();
        assert_eq!(closure, needed_closure(Path::new("/"), Path::new("usr/bin/ls")).unwrap());
    }

    /// A fake root with ls, its interpreter and libc (as a soname link to the real file), but
    /// not libselinux.
    fn partial_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::fs::create_dir_all(r.join("usr/lib/x86_64-linux-gnu")).unwrap();
        std::fs::create_dir_all(r.join("usr/lib64")).unwrap();
        std::os::unix::fs::symlink("usr/lib", r.join("lib")).unwrap();
        std::os::unix::fs::symlink("usr/lib64", r.join("lib64")).unwrap();
        std::fs::copy("/usr/bin/ls", r.join("usr/bin/ls")).unwrap();
        let libc = std::fs::canonicalize("/lib/x86_64-linux-gnu/libc.so.6").unwrap();
        std::fs::copy(&libc, r.join("usr/lib/x86_64-linux-gnu/libc-real.so")).unwrap();
        std::os::unix::fs::symlink("libc-real.so", r.join("usr/lib/x86_64-linux-gnu/libc.so.6")).unwrap();
        let ld = std::fs::canonicalize("/lib64/ld-linux-x86-64.so.2").unwrap();
        std::fs::copy(&ld, r.join("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")).unwrap();
        std::os::unix::fs::symlink(
            "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            r.join("usr/lib64/ld-linux-x86-64.so.2"),
        )
        .unwrap();
        dir
    }

    #[test]
    fn missing_library_names_binary_and_soname() {
        let root = partial_root();
        let err = needed_closure(root.path(), Path::new("usr/bin/ls")).unwrap_err();
        match &err {
            ElfError::Missing { binary, soname, .. } => {
                assert_eq!(binary, Path::new("usr/bin/ls"));
                assert_eq!(soname, "libselinux.so.1");
            }
            other => panic!("unexpected {other}"),
        }
        let report = check_tree(
            root.path(),
            [Path::new("usr/bin/ls"), Path::new("usr/lib/x86_64-linux-gnu/libc-real.so")],
        );
        assert_eq!(
            report,
            [Missing::Library { elf: PathBuf::from("usr/bin/ls"), soname: "libselinux.so.1".into() }]
        );
    }

    #[test]
    fn check_tree_skips_non_elf_and_relocatable_objects() {
        let root = partial_root();
        let r = root.path();
        std::fs::write(r.join("usr/bin/script"), "#!/bin/sh\n").unwrap();
        // An ET_REL object (what kernel modules are) whose bytes would not parse as a program.
        let mut rel = std::fs::read(r.join("usr/lib/x86_64-linux-gnu/libc-real.so")).unwrap()[..64].to_vec();
        rel[16] = 1;
        std::fs::write(r.join("usr/lib/x86_64-linux-gnu/mod.ko"), &rel).unwrap();
        let paths =
            ["usr/bin/script", "usr/lib/x86_64-linux-gnu/mod.ko", "lib64", "usr/lib64/ld-linux-x86-64.so.2"];
        assert_eq!(check_tree(r, paths.iter().map(Path::new)), []);
        // A truncated program is reported, not skipped.
        rel[16] = 3;
        std::fs::write(r.join("usr/bin/broken"), &rel).unwrap();
        let report = check_tree(r, [Path::new("usr/bin/broken")]);
        assert!(matches!(report.as_slice(), [Missing::Unreadable { .. }]), "{report:?}");
    }

    #[test]
    fn symlinks_never_leave_the_root() {
        let root = partial_root();
        let r = root.path();
        // Followed on the host, this relative link would reach the host's libselinux.
        let escape = "../../../../../../../../../../lib/x86_64-linux-gnu/libselinux.so.1";
        std::os::unix::fs::symlink(escape, r.join("usr/lib64/libselinux.so.1")).unwrap();
        assert!(r.join("usr/lib64").join(escape).exists(), "the test needs the host library");
        assert_eq!(resolve_in_root(r, Path::new("usr/lib64/libselinux.so.1")).unwrap(), None);
        // `..` stops at the root, so the same climb lands on the root's own files.
        let climb = "../../../../../../../../../../lib/x86_64-linux-gnu/libc.so.6";
        std::os::unix::fs::symlink(climb, r.join("usr/lib64/climb")).unwrap();
        let found = resolve_in_root(r, Path::new("usr/lib64/climb")).unwrap().unwrap();
        assert_eq!(found.target, PathBuf::from("usr/lib/x86_64-linux-gnu/libc-real.so"));
        assert_eq!(strs(&found.links), ["usr/lib64/climb", "lib", "usr/lib/x86_64-linux-gnu/libc.so.6"]);
        let err = needed_closure(r, Path::new("usr/bin/ls")).unwrap_err();
        assert!(matches!(&err, ElfError::Missing { soname, .. } if soname == "libselinux.so.1"), "{err}");
        // An absolute link to the host's library restarts at the root and is not found either.
        std::os::unix::fs::symlink("/usr/lib/x86_64-linux-gnu/libselinux.so.1", r.join("abs")).unwrap();
        let abs = resolve_in_root(r, Path::new("abs")).unwrap();
        assert!(abs.is_none(), "{abs:?}");
        // Absolute targets restart at the root: lib64/ld... -> /lib/... -> usr/lib/...
        let ld = resolve_in_root(r, Path::new("/lib64/ld-linux-x86-64.so.2")).unwrap().unwrap();
        assert_eq!(ld.target, PathBuf::from("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"));
        assert_eq!(strs(&ld.links), ["lib64", "usr/lib64/ld-linux-x86-64.so.2", "lib"]);
        std::os::unix::fs::symlink("loop", r.join("loop")).unwrap();
        assert!(matches!(resolve_in_root(r, Path::new("loop")), Err(ElfError::SymlinkLoop { .. })));
    }

    #[test]
    fn host_ls_glibc_versions_are_provided_by_host_libc() {
        let needed = glibc_versions_needed(Path::new("/usr/bin/ls")).unwrap();
        let provided = glibc_versions_provided(Path::new("/lib/x86_64-linux-gnu/libc.so.6")).unwrap();
        assert!(needed.contains("GLIBC_2.2.5"), "{needed:?}");
        assert!(provided.contains("GLIBC_2.36") && provided.contains("GLIBC_2.2.5"), "{provided:?}");
        assert!(!provided.contains("GLIBC_2.99"));
        assert!(needed.is_subset(&provided), "{:?}", needed.difference(&provided).collect::<Vec<_>>());
    }
}
