//! Unpacking a .deb into the staging [`Tree`] without dpkg and without maintainer scripts, safely
//! for hostile input: every path is resolved inside the tree (symlinks included, as the image
//! will see them), and nothing is ever written outside the staging directory or through a host
//! symlink.
//!
//! Debian 12 has merged /usr: [`merged_usr`] creates `bin -> usr/bin` and friends, and because
//! paths resolve through the tree's symlinks, a package's `./lib/…` lands in `usr/lib/…`.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use serde::Serialize;

use crate::tree::{normalize, Kind, Node, Tree, TreeError};

/// Symlinks followed while resolving one path, as the kernel's limit.
const MAX_LINK_HOPS: usize = 40;
/// Merged-/usr top-level links of Debian 12.
pub const MERGED_USR: &[(&str, &str)] =
    &[("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")];

#[derive(Debug, thiserror::Error)]
pub enum DebError {
    #[error("cannot read {deb}: {source}")]
    Read { deb: PathBuf, source: io::Error },
    #[error("{deb}: member {member} uses an unsupported compression (xz, gz or none only)")]
    UnsupportedCompression { deb: PathBuf, member: String },
    #[error("{deb}: no {member} member")]
    MissingMember { deb: PathBuf, member: &'static str },
    #[error("{deb}: control file lacks {field}")]
    BadControl { deb: PathBuf, field: &'static str },
    #[error("{deb}: {sha256:?} is not a sha256 to key the unpack cache with")]
    BadCacheKey { deb: PathBuf, sha256: String },
    #[error("{deb}: refusing entry {entry:?}: {reason}")]
    Unsafe { deb: PathBuf, entry: PathBuf, reason: &'static str },
    #[error(
        "{deb}: hard link {entry:?} points at {target:?}, which is not a regular file unpacked before it"
    )]
    HardLinkTarget { deb: PathBuf, entry: PathBuf, target: PathBuf },
    #[error("{deb}: entry {entry:?}: {source}")]
    Tree { deb: PathBuf, entry: PathBuf, source: TreeError },
    #[error("{deb}: writing {path}: {source}")]
    Write { deb: PathBuf, path: PathBuf, source: io::Error },
}

/// What the package's control file says, for the image manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DebInfo {
    pub package: String,
    pub version: String,
    pub architecture: String,
    /// Raw `Depends` field, empty when absent.
    pub depends: String,
    /// Entries of data.tar recorded in the tree.
    pub entries: usize,
}

/// Creates Debian 12's merged-/usr layout: `bin`, `sbin`, `lib`, `lib64` as symlinks into `usr`.
pub fn merged_usr(tree: &mut Tree) -> Result<(), TreeError> {
    for (link, target) in MERGED_USR {
        tree.mkdir_p(Path::new(target))?;
        tree.insert(link, Node::symlink(target))?;
    }
    Ok(())
}

/// Unpacks `deb`'s data.tar into `tree` and returns its control fields.
pub fn unpack(deb: &Path, tree: &mut Tree) -> Result<DebInfo, DebError> {
    unpack_from(deb, tree, None)
}

/// Like [`unpack`], but keeps the decompressed data.tar in `cache_dir` under the .deb's SHA256,
/// so a warm build reads plain tar instead of decompressing xz again. Keyed by content, the
/// cached file can never go stale. The same safety checks apply: the cached tar is as
/// untrusted as the .deb it came from.
pub fn unpack_cached(
    deb: &Path,
    sha256: &str,
    cache_dir: &Path,
    tree: &mut Tree,
) -> Result<DebInfo, DebError> {
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(DebError::BadCacheKey { deb: deb.to_owned(), sha256: sha256.to_owned() });
    }
    unpack_from(deb, tree, Some(&cache_dir.join(format!("{sha256}.data.tar"))))
}

/// Walks the .deb's members once: control is parsed; data.tar is unpacked as it streams, or,
/// with `cached_tar`, stored there decompressed (unless already there) and unpacked from it.
fn unpack_from(deb: &Path, tree: &mut Tree, cached_tar: Option<&Path>) -> Result<DebInfo, DebError> {
    let read = |source| DebError::Read { deb: deb.to_owned(), source };
    let missing_data = || DebError::MissingMember { deb: deb.to_owned(), member: "data.tar" };
    let file = fs::File::open(deb).map_err(read)?;
    let mut ar = ar::Archive::new(io::BufReader::new(file));
    let mut control = None;
    let mut entries = None;
    while let Some(member) = ar.next_entry() {
        let member = member.map_err(read)?;
        let name = String::from_utf8_lossy(member.header().identifier()).into_owned();
        if let Some(kind) = name.strip_prefix("control.tar") {
            control = Some(read_control(decompress(deb, &name, kind, member)?, deb)?);
        } else if let Some(kind) = name.strip_prefix("data.tar") {
            let data = decompress(deb, &name, kind, member)?;
            match cached_tar {
                None => entries = Some(Unpacker { deb, tree: &mut *tree }.all(&mut tar::Archive::new(data))?),
                Some(path) if !path.is_file() => store_decompressed(data, path).map_err(read)?,
                Some(_) => {}
            }
        }
    }
    if let Some(path) = cached_tar {
        let data = fs::File::open(path).map_err(|_| missing_data())?;
        let mut archive = tar::Archive::new(io::BufReader::with_capacity(1 << 20, data));
        entries = Some(Unpacker { deb, tree }.all(&mut archive)?);
    }
    let mut info = control.ok_or(DebError::MissingMember { deb: deb.to_owned(), member: "control.tar" })?;
    info.entries = entries.ok_or_else(missing_data)?;
    Ok(info)
}

/// Writes `r` to `out` through a temporary file, so an interrupted build never leaves a
/// truncated tar that a later build would trust.
fn store_decompressed(mut r: impl Read, out: &Path) -> io::Result<()> {
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = out.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        io::copy(&mut r, &mut f)?;
        f.sync_all()?;
        fs::rename(&tmp, out)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn decompress<'a>(
    deb: &Path,
    name: &str,
    kind: &str,
    r: impl Read + 'a,
) -> Result<Box<dyn Read + 'a>, DebError> {
    match kind {
        ".xz" => Ok(Box::new(xz2::read::XzDecoder::new(r))),
        ".gz" => Ok(Box::new(flate2::read::GzDecoder::new(r))),
        "" => Ok(Box::new(r)),
        _ => Err(DebError::UnsupportedCompression { deb: deb.to_owned(), member: name.to_owned() }),
    }
}

fn read_control(r: impl Read, deb: &Path) -> Result<DebInfo, DebError> {
    let read = |source| DebError::Read { deb: deb.to_owned(), source };
    let mut archive = tar::Archive::new(r);
    for entry in archive.entries().map_err(read)? {
        let mut entry = entry.map_err(read)?;
        if normalize(&bytes_path(&entry.path_bytes())).ok().as_deref() != Some(Path::new("control")) {
            continue;
        }
        let mut text = String::new();
        entry.read_to_string(&mut text).map_err(read)?;
        return parse_control(&text, deb);
    }
    Err(DebError::MissingMember { deb: deb.to_owned(), member: "control" })
}

/// Parses the fields we record from a binary package's control file.
pub fn parse_control(text: &str, deb: &Path) -> Result<DebInfo, DebError> {
    let field = |name: &'static str| -> Option<String> {
        let mut lines = text.lines();
        let first = lines.find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })?;
        let cont = lines.take_while(|l| l.starts_with([' ', '\t'])).map(str::trim);
        Some(std::iter::once(first.as_str()).chain(cont).collect::<Vec<_>>().join(" ").trim().to_owned())
    };
    let need = |name| field(name).ok_or(DebError::BadControl { deb: deb.to_owned(), field: name });
    Ok(DebInfo {
        package: need("Package")?,
        version: need("Version")?,
        architecture: need("Architecture")?,
        depends: field("Depends").unwrap_or_default(),
        entries: 0,
    })
}

fn bytes_path(b: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(b))
}

struct Unpacker<'a> {
    deb: &'a Path,
    tree: &'a mut Tree,
}

impl Unpacker<'_> {
    fn all(&mut self, archive: &mut tar::Archive<impl Read>) -> Result<usize, DebError> {
        let mut count = 0;
        let read = |source| DebError::Read { deb: self.deb.to_owned(), source };
        for entry in archive.entries().map_err(read)? {
            let entry = entry.map_err(|source| DebError::Read { deb: self.deb.to_owned(), source })?;
            if self.one(entry)? {
                count += 1;
            }
        }
        Ok(count)
    }

    fn refuse(&self, entry: &Path, reason: &'static str) -> DebError {
        DebError::Unsafe { deb: self.deb.to_owned(), entry: entry.to_owned(), reason }
    }

    fn tree_err(&self, entry: &Path) -> impl Fn(TreeError) -> DebError {
        let (deb, entry) = (self.deb.to_owned(), entry.to_owned());
        move |source| DebError::Tree { deb: deb.clone(), entry: entry.clone(), source }
    }

    /// Records one tar entry; false for the archive's root entry (`./`).
    fn one(&mut self, mut entry: tar::Entry<impl Read>) -> Result<bool, DebError> {
        let raw = bytes_path(&entry.path_bytes());
        let rel = self.archive_path(&raw)?;
        if rel.as_os_str().is_empty() {
            return Ok(false);
        }
        let h = entry.header();
        let mode = h.mode().map_err(|source| DebError::Read { deb: self.deb.to_owned(), source })? & 0o7777;
        let uid = h.uid().unwrap_or(0) as u32;
        let gid = h.gid().unwrap_or(0) as u32;
        let link = h.link_name_bytes().map(|b| bytes_path(&b));
        use tar::EntryType as T;
        match (h.entry_type(), link) {
            (T::Directory, _) => self.dir(&raw, &rel, Node::dir(mode).owned(uid, gid))?,
            (T::Regular | T::Continuous, _) => {
                let dst = self.place(&raw, &rel)?;
                let node = Node::file(mode).owned(uid, gid);
                self.write(&raw, &dst, node, &mut entry)?;
            }
            (T::Symlink, Some(target)) => self.symlink(&raw, &rel, &target)?,
            (T::Link, Some(target)) => {
                self.hardlink(&raw, &rel, &target, Node::file(mode).owned(uid, gid))?
            }
            (T::Char | T::Block | T::Fifo, _) => {
                return Err(self.refuse(&raw, "device nodes and fifos are not unpacked"))
            }
            _ => return Err(self.refuse(&raw, "unsupported tar entry type")),
        }
        Ok(true)
    }

    /// `./a/b` or `a/b` -> `a/b`; anything absolute or with `..` is refused.
    fn archive_path(&self, raw: &Path) -> Result<PathBuf, DebError> {
        let mut out = PathBuf::new();
        for c in raw.components() {
            match c {
                Component::CurDir => {}
                Component::Normal(n) => out.push(n),
                Component::RootDir => return Err(self.refuse(raw, "absolute path")),
                Component::ParentDir => return Err(self.refuse(raw, "parent directory component")),
                Component::Prefix(_) => return Err(self.refuse(raw, "not a unix path")),
            }
        }
        Ok(out)
    }

    /// Where `rel` lands once its parent directories are resolved inside the tree.
    fn place(&self, raw: &Path, rel: &Path) -> Result<PathBuf, DebError> {
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            return Err(self.refuse(raw, "no file name"));
        };
        let parent = resolve(self.tree, parent, true).map_err(|r| self.refuse(raw, r))?;
        Ok(parent.join(name))
    }

    fn dir(&mut self, raw: &Path, rel: &Path, node: Node) -> Result<(), DebError> {
        // A directory over a symlink keeps the symlink (as dpkg does): `./lib/` is `usr/lib`.
        let dst = resolve(self.tree, rel, true).map_err(|r| self.refuse(raw, r))?;
        match self.tree.get(&dst).map(|n| &n.kind) {
            Some(Kind::Dir) | None => {}
            Some(_) => return Err(self.refuse(raw, "directory would replace a non-directory")),
        }
        self.check_host(raw, &dst, true)?;
        self.tree.insert(&dst, node).map_err(self.tree_err(raw))
    }

    fn symlink(&mut self, raw: &Path, rel: &Path, target: &Path) -> Result<(), DebError> {
        let dst = self.place(raw, rel)?;
        if escapes(dst.parent().unwrap_or(Path::new("")), target) {
            return Err(self.refuse(raw, "symlink target escapes the image"));
        }
        self.replaceable(raw, &dst)?;
        self.check_host(raw, &dst, false)?;
        self.tree.insert(&dst, Node::symlink(target)).map_err(self.tree_err(raw))
    }

    fn hardlink(&mut self, raw: &Path, rel: &Path, target: &Path, node: Node) -> Result<(), DebError> {
        let link_rel =
            self.archive_path(target).map_err(|_| self.refuse(raw, "hard link target outside the image"))?;
        let src = self.place(raw, &link_rel)?;
        let bad = || DebError::HardLinkTarget {
            deb: self.deb.to_owned(),
            entry: raw.to_owned(),
            target: target.to_owned(),
        };
        if !matches!(self.tree.get(&src).map(|n| &n.kind), Some(Kind::File)) {
            return Err(bad());
        }
        let dst = self.place(raw, rel)?;
        self.check_host(raw, &src, true)?;
        let src_host = self.tree.host_path(&src);
        if !fs::symlink_metadata(&src_host).is_ok_and(|m| m.is_file()) {
            return Err(bad());
        }
        let mut contents = fs::File::open(src_host).map_err(|_| bad())?;
        self.write(raw, &dst, node, &mut contents)
    }

    fn write(
        &mut self,
        raw: &Path,
        dst: &Path,
        node: Node,
        contents: &mut impl Read,
    ) -> Result<(), DebError> {
        self.replaceable(raw, dst)?;
        let host_mode = (node.mode & 0o755) | 0o600;
        self.check_host(raw, dst, false)?;
        self.tree.insert(dst, node).map_err(self.tree_err(raw))?;
        let host = self.tree.host_path(dst);
        let werr = |source| DebError::Write { deb: self.deb.to_owned(), path: host.clone(), source };
        // create_new never follows a symlink left at the destination; setuid bits stay in the
        // tree's metadata only, never on the build host.
        let mut f =
            fs::OpenOptions::new().write(true).create_new(true).mode(host_mode).open(&host).map_err(werr)?;
        io::copy(contents, &mut f).map_err(werr)?;
        Ok(())
    }

    /// A file or symlink may replace a file or symlink, never a directory.
    fn replaceable(&self, raw: &Path, dst: &Path) -> Result<(), DebError> {
        match self.tree.get(dst).map(|n| &n.kind) {
            Some(Kind::Dir) => Err(self.refuse(raw, "would replace a directory")),
            _ => Ok(()),
        }
    }

    /// Checks on the host that every ancestor of `dst` is a real directory inside the staging
    /// directory, and (unless `keep_last`) clears a leftover non-directory at `dst` itself.
    fn check_host(&self, raw: &Path, dst: &Path, keep_last: bool) -> Result<(), DebError> {
        let mut cur = self.tree.staging().to_owned();
        let parts: Vec<_> = dst.components().collect();
        for (i, c) in parts.iter().enumerate() {
            cur.push(c);
            let Ok(meta) = fs::symlink_metadata(&cur) else { return Ok(()) };
            let last = i + 1 == parts.len();
            if !last && !meta.is_dir() {
                return Err(self.refuse(raw, "a parent on the build host is not a directory"));
            }
            if last && !keep_last && !meta.is_dir() {
                fs::remove_file(&cur).map_err(|source| DebError::Write {
                    deb: self.deb.to_owned(),
                    path: cur.clone(),
                    source,
                })?;
            }
        }
        Ok(())
    }
}

/// Resolves `rel` inside the tree, following symlinks in every component (and the last one when
/// `follow_last`): absolute targets start at the image root, `..` stops at the root.
pub fn resolve(tree: &Tree, rel: &Path, follow_last: bool) -> Result<PathBuf, &'static str> {
    let mut todo: VecDeque<OsString> = rel.components().map(|c| c.as_os_str().to_owned()).collect();
    let mut cur = PathBuf::new();
    let mut hops = 0;
    while let Some(part) = todo.pop_front() {
        match part.as_bytes() {
            b"/" | b"." => continue,
            b".." => {
                cur.pop();
                continue;
            }
            _ => {}
        }
        let next = cur.join(&part);
        let follow = follow_last || !todo.is_empty();
        match tree.get(&next).map(|n| &n.kind) {
            Some(Kind::Symlink(target)) if follow => {
                hops += 1;
                if hops > MAX_LINK_HOPS {
                    return Err("too many levels of symbolic links");
                }
                if target.is_absolute() {
                    cur = PathBuf::new();
                }
                for c in target.components().rev() {
                    todo.push_front(c.as_os_str().to_owned());
                }
            }
            _ => cur = next,
        }
    }
    Ok(cur)
}

/// True when a relative symlink `target` placed in directory `base` climbs above the root.
fn escapes(base: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth = base.components().count();
    for c in target.components() {
        match c {
            Component::ParentDir if depth == 0 => return true,
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    pub(crate) enum E<'a> {
        Dir(&'a str, u32),
        File(&'a str, &'a [u8], u32, u32, u32),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
        Char(&'a str),
    }

    /// Builds a .deb whose data.tar holds `entries` verbatim (names are written raw into the
    /// header, so hostile paths the tar crate's safe setters refuse are possible).
    pub(crate) fn build_deb(path: &Path, entries: &[E], compression: &str) -> PathBuf {
        let mut data = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            let (name, link, kind, mode, body): (&str, Option<&str>, tar::EntryType, u32, &[u8]) = match e {
                E::Dir(n, m) => (n, None, tar::EntryType::Directory, *m, b""),
                E::File(n, b, m, uid, gid) => {
                    h.set_uid(*uid as u64);
                    h.set_gid(*gid as u64);
                    (n, None, tar::EntryType::Regular, *m, b)
                }
                E::Sym(n, t) => (n, Some(t), tar::EntryType::Symlink, 0o777, b""),
                E::Hard(n, t) => (n, Some(t), tar::EntryType::Link, 0o644, b""),
                E::Char(n) => (n, None, tar::EntryType::Char, 0o600, b""),
            };
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(l) = link {
                gnu.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(body.len() as u64);
            h.set_cksum();
            data.append(&h, body).unwrap();
        }
        let data = data.into_inner().unwrap();
        let mut control = tar::Builder::new(Vec::new());
        let text =
            b"Package: evil\nVersion: 1:1.0-1\nArchitecture: amd64\nDepends: libc6 (>= 2.36),\n libfoo\n";
        let mut h = tar::Header::new_gnu();
        h.set_path("./control").unwrap();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        control.append(&h, &text[..]).unwrap();
        let control = gz(&control.into_inner().unwrap());
        let (data_name, data) = match compression {
            "xz" => ("data.tar.xz", xz(&data)),
            "gz" => ("data.tar.gz", gz(&data)),
            "zst" => ("data.tar.zst", data),
            _ => ("data.tar", data),
        };
        let mut ar = ar::Builder::new(fs::File::create(path).unwrap());
        for (name, body) in
            [("debian-binary", &b"2.0\n"[..]), ("control.tar.gz", &control), (data_name, &data)]
        {
            ar.append(&ar::Header::new(name.as_bytes().to_vec(), body.len() as u64), body).unwrap();
        }
        path.to_owned()
    }

    fn gz(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut e, b).unwrap();
        e.finish().unwrap()
    }

    fn xz(b: &[u8]) -> Vec<u8> {
        let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
        io::Write::write_all(&mut e, b).unwrap();
        e.finish().unwrap()
    }

    /// A scratch dir with `stage/` as the tree; returns the outside dir too.
    fn setup() -> (tempfile::TempDir, Tree) {
        let dir = tempfile::tempdir().unwrap();
        let mut tree = Tree::new(dir.path().join("stage")).unwrap();
        merged_usr(&mut tree).unwrap();
        (dir, tree)
    }

    fn unpack_entries(entries: &[E]) -> (tempfile::TempDir, Tree, Result<DebInfo, DebError>) {
        let (dir, mut tree) = setup();
        let deb = build_deb(&dir.path().join("t.deb"), entries, "gz");
        let r = unpack(&deb, &mut tree);
        (dir, tree, r)
    }

    fn assert_refused(entries: &[E], entry: &str, reason_part: &str) -> tempfile::TempDir {
        let (dir, _tree, r) = unpack_entries(entries);
        match r {
            Err(DebError::Unsafe { entry: e, reason, deb }) => {
                assert_eq!(e, Path::new(entry));
                assert!(reason.contains(reason_part), "{reason}");
                assert!(deb.ends_with("t.deb"));
            }
            other => panic!("expected refusal of {entry}, got {other:?}"),
        }
        dir
    }

    /// Every file below `dir` other than the staging dir and the .deb itself.
    fn outside_files(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| !p.ends_with("stage") && !p.ends_with("t.deb"))
            .collect()
    }

    #[test]
    fn normal_deb_unpacks_with_metadata_and_merged_usr() {
        let (dir, mut tree) = setup();
        let entries = [
            E::Dir("./", 0o755),
            E::Dir("./bin/", 0o755),
            E::File("./bin/su", b"ELF su", 0o4755, 0, 0),
            E::Dir("./etc/", 0o755),
            E::File("./etc/shadow-ish", b"x", 0o640, 0, 42),
            E::Dir("./lib/x86_64-linux-gnu/", 0o755),
            E::File("./lib/x86_64-linux-gnu/libz.so.1.2", b"lib", 0o644, 0, 0),
            E::Sym("./lib/x86_64-linux-gnu/libz.so.1", "libz.so.1.2"),
            E::Sym("./etc/abs", "/usr/share/doc"),
            E::Hard("./usr/bin/su2", "./bin/su"),
            E::Dir("./var/lib/tor/", 0o2700),
        ];
        let deb = build_deb(&dir.path().join("t.deb"), &entries, "xz");
        let info = unpack(&deb, &mut tree).unwrap();
        assert_eq!(
            (info.package.as_str(), info.version.as_str(), info.architecture.as_str()),
            ("evil", "1:1.0-1", "amd64")
        );
        assert_eq!(info.depends, "libc6 (>= 2.36), libfoo");
        assert_eq!(info.entries, entries.len() - 1);
        let su = tree.get(Path::new("usr/bin/su")).unwrap();
        assert_eq!((&su.kind, su.mode, su.uid, su.gid), (&Kind::File, 0o4755, 0, 0));
        assert_eq!(fs::read(tree.host_path(Path::new("usr/bin/su"))).unwrap(), b"ELF su");
        // The setuid bit is never applied on the build host.
        let host_mode = fs::metadata(tree.host_path(Path::new("usr/bin/su"))).unwrap().permissions().mode();
        assert_eq!(host_mode & 0o7000, 0);
        assert_eq!(tree.get(Path::new("etc/shadow-ish")).unwrap().gid, 42);
        assert_eq!(tree.get(Path::new("bin")).unwrap().kind, Kind::Symlink("usr/bin".into()));
        assert!(tree.get(Path::new("bin/su")).is_none());
        assert_eq!(
            tree.get(Path::new("usr/lib/x86_64-linux-gnu/libz.so.1")).unwrap().kind,
            Kind::Symlink("libz.so.1.2".into())
        );
        assert_eq!(tree.get(Path::new("etc/abs")).unwrap().kind, Kind::Symlink("/usr/share/doc".into()));
        assert_eq!(tree.get(Path::new("usr/bin/su2")).unwrap().kind, Kind::File);
        assert_eq!(fs::read(tree.host_path(Path::new("usr/bin/su2"))).unwrap(), b"ELF su");
        assert_eq!(tree.get(Path::new("var/lib/tor")).unwrap().mode, 0o2700);
    }

    #[test]
    fn cached_unpack_gives_the_same_tree_and_keeps_plain_tar() {
        let (dir, mut plain) = setup();
        let entries = [
            E::Dir("./", 0o755),
            E::File("./bin/su", b"ELF su", 0o4755, 0, 0),
            E::Sym("./lib/x86_64-linux-gnu/libz.so.1", "libz.so.1.2"),
            E::Dir("./var/lib/tor/", 0o2700),
        ];
        let deb = build_deb(&dir.path().join("t.deb"), &entries, "xz");
        unpack(&deb, &mut plain).unwrap();
        let cache = dir.path().join("tars");
        let sha = "ab".repeat(32);
        for round in 0..2 {
            let mut cached = Tree::new(dir.path().join(format!("cached{round}"))).unwrap();
            merged_usr(&mut cached).unwrap();
            let info = unpack_cached(&deb, &sha, &cache, &mut cached).unwrap();
            assert_eq!(info.entries, entries.len() - 1);
            let a: Vec<_> = plain.iter().map(|(p, n)| (p.to_owned(), n.clone())).collect();
            let b: Vec<_> = cached.iter().map(|(p, n)| (p.to_owned(), n.clone())).collect();
            assert_eq!(a, b, "round {round}");
        }
        let stored = fs::read(cache.join(format!("{sha}.data.tar"))).unwrap();
        assert_eq!(&stored[257..262], b"ustar", "the cache holds plain tar");
        assert_eq!(fs::read_dir(&cache).unwrap().count(), 1, "no temporary file left");
        let bad = unpack_cached(&deb, "../../etc", &cache, &mut plain).unwrap_err();
        assert!(matches!(bad, DebError::BadCacheKey { .. }), "{bad}");
    }

    #[test]
    fn parent_components_are_refused() {
        let dir = assert_refused(&[E::File("../../etc/x", b"pwned", 0o644, 0, 0)], "../../etc/x", "parent");
        assert!(outside_files(dir.path()).is_empty());
        assert_refused(&[E::File("./usr/../../x", b"", 0o644, 0, 0)], "./usr/../../x", "parent");
    }

    #[test]
    fn absolute_paths_are_refused() {
        assert_refused(
            &[E::File("/etc/passwd", b"root::0:0::/:/bin/sh\n", 0o644, 0, 0)],
            "/etc/passwd",
            "absolute",
        );
    }

    #[test]
    fn escaping_symlink_is_refused_and_nothing_is_written_through_it() {
        let entries = [E::Sym("./evil", "../../.."), E::File("./evil/x", b"pwned", 0o644, 0, 0)];
        let dir = assert_refused(&entries, "./evil", "escapes");
        assert!(outside_files(dir.path()).is_empty());
        let deep = [E::Dir("./a/", 0o755), E::Sym("./a/evil", "../../x")];
        assert_refused(&deep, "./a/evil", "escapes");
    }

    #[test]
    fn absolute_symlink_resolves_inside_the_tree_not_on_the_host() {
        let (dir, mut tree) = setup();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let target = outside.to_str().unwrap();
        let entries = [E::Sym("./evil", target), E::File("./evil/x", b"inside", 0o644, 0, 0)];
        let deb = build_deb(&dir.path().join("t.deb"), &entries, "gz");
        unpack(&deb, &mut tree).unwrap();
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "wrote through a host symlink");
        let inside = normalize(&Path::new(target).join("x")).unwrap();
        assert_eq!(fs::read(tree.host_path(&inside)).unwrap(), b"inside");
        assert_eq!(tree.get(&inside).unwrap().kind, Kind::File);
    }

    #[test]
    fn file_replacing_a_symlink_never_writes_through_it() {
        let (dir, mut tree) = setup();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"safe").unwrap();
        let entries =
            [E::Sym("./etc/link", victim.to_str().unwrap()), E::File("./etc/link", b"pwned", 0o644, 0, 0)];
        let deb = build_deb(&dir.path().join("t.deb"), &entries, "gz");
        unpack(&deb, &mut tree).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"safe");
        assert_eq!(tree.get(Path::new("etc/link")).unwrap().kind, Kind::File);
    }

    #[test]
    fn hardlink_outside_is_refused() {
        assert_refused(&[E::Hard("./x", "/etc/shadow")], "./x", "hard link");
        assert_refused(&[E::Hard("./x", "../../etc/shadow")], "./x", "hard link");
        let (_d, _t, r) = unpack_entries(&[E::Hard("./x", "./missing")]);
        assert!(matches!(r, Err(DebError::HardLinkTarget { .. })), "{r:?}");
    }

    #[test]
    fn device_nodes_are_refused() {
        assert_refused(&[E::Char("./dev/mem")], "./dev/mem", "device");
    }

    #[test]
    fn file_replacing_a_directory_is_refused() {
        let entries = [E::Dir("./etc/", 0o755), E::File("./etc", b"", 0o644, 0, 0)];
        assert_refused(&entries, "./etc", "directory");
        assert_refused(&[E::File("./usr/lib/", b"", 0o644, 0, 0)], "./usr/lib/", "directory");
    }

    #[test]
    fn symlink_loops_are_bounded() {
        let entries = [E::Sym("./a", "b"), E::Sym("./b", "a"), E::File("./a/x", b"", 0o644, 0, 0)];
        assert_refused(&entries, "./a/x", "symbolic links");
    }

    #[test]
    fn zstd_is_reported_as_unsupported() {
        let (dir, mut tree) = setup();
        let deb = build_deb(&dir.path().join("t.deb"), &[E::Dir("./", 0o755)], "zst");
        let r = unpack(&deb, &mut tree);
        assert!(
            matches!(&r, Err(DebError::UnsupportedCompression { member, .. }) if member == "data.tar.zst"),
            "{r:?}"
        );
    }

    #[test]
    fn plain_tar_is_supported() {
        let (dir, mut tree) = setup();
        let deb = build_deb(&dir.path().join("t.deb"), &[E::File("./a", b"1", 0o600, 0, 0)], "none");
        unpack(&deb, &mut tree).unwrap();
        assert_eq!(tree.get(Path::new("a")).unwrap().mode, 0o600);
    }

    #[test]
    fn resolve_clamps_dotdot_at_the_root() {
        let (_dir, mut tree) = setup();
        tree.insert("usr/share/up", Node::symlink("../../../../etc")).unwrap();
        assert_eq!(resolve(&tree, Path::new("usr/share/up/x"), true).unwrap(), Path::new("etc/x"));
        assert_eq!(resolve(&tree, Path::new("lib/modules"), true).unwrap(), Path::new("usr/lib/modules"));
        assert_eq!(resolve(&tree, Path::new("lib"), false).unwrap(), Path::new("lib"));
    }

    #[test]
    fn real_hello_deb_unpacks() {
        let dir = tempfile::tempdir().unwrap();
        let apt = crate::apt::AptRoot::prepare(dir.path(), None).unwrap();
        apt.update(std::time::Duration::from_secs(3600), false).unwrap();
        let specs = apt.resolve(&["hello".to_owned()]).unwrap();
        let hello: Vec<_> = specs.into_iter().filter(|s| s.name == "hello").collect();
        let fetched = apt.fetch(&hello, &mut |_| {}).unwrap();
        let mut tree = Tree::new(dir.path().join("stage")).unwrap();
        merged_usr(&mut tree).unwrap();
        let info = unpack(&fetched[0].path, &mut tree).unwrap();
        assert_eq!(info.package, "hello");
        assert_eq!(info.version, hello[0].version);
        assert!(info.depends.contains("libc6"), "{}", info.depends);
        let bin = tree.get(Path::new("usr/bin/hello")).unwrap();
        assert_eq!((&bin.kind, bin.mode, bin.uid), (&Kind::File, 0o755, 0));
        let elf = fs::read(tree.host_path(Path::new("usr/bin/hello"))).unwrap();
        assert_eq!(&elf[..4], b"\x7fELF");
        assert!(tree.get(Path::new("usr/share/doc/hello/copyright")).is_some());
    }
}
