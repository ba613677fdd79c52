//! The staging tree: file contents on disk under a directory the build user owns, and the
//! metadata the image must have (owner, mode, device numbers) in memory. The build never runs as
//! root, so it cannot chown or mknod; like fakeroot, it records what it cannot apply, and the
//! XFS protofile writer reads both halves.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// What a path in the image is. Regular files keep their contents in the staging directory at
/// the same relative path; everything else lives only here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    /// Target as written in the package (absolute targets resolve inside the image).
    Symlink(PathBuf),
    CharDev {
        major: u32,
        minor: u32,
    },
    BlockDev {
        major: u32,
        minor: u32,
    },
    Fifo,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits including setuid (0o4000), setgid (0o2000) and sticky (0o1000).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Node {
    pub fn dir(mode: u32) -> Self {
        Self { kind: Kind::Dir, mode, uid: 0, gid: 0 }
    }
    pub fn file(mode: u32) -> Self {
        Self { kind: Kind::File, mode, uid: 0, gid: 0 }
    }
    pub fn symlink(target: impl Into<PathBuf>) -> Self {
        Self { kind: Kind::Symlink(target.into()), mode: 0o777, uid: 0, gid: 0 }
    }
    pub fn owned(mut self, uid: u32, gid: u32) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("path {0:?} is not a plain relative path inside the image")]
    BadPath(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0:?} is not a directory in the image")]
    NotADir(PathBuf),
}

/// A root filesystem being assembled. Keys are relative paths without `.` or `..` (the root
/// itself is the empty path and always exists as a directory).
#[derive(Debug, Clone)]
pub struct Tree {
    staging: PathBuf,
    nodes: BTreeMap<PathBuf, Node>,
}

impl Tree {
    /// Starts an empty tree whose file contents go below `staging` (created if missing).
    pub fn new(staging: impl Into<PathBuf>) -> Result<Self, TreeError> {
        let staging = staging.into();
        std::fs::create_dir_all(&staging)
            .map_err(|source| TreeError::Io { path: staging.clone(), source })?;
        let mut nodes = BTreeMap::new();
        nodes.insert(PathBuf::new(), Node::dir(0o755));
        Ok(Self { staging, nodes })
    }

    /// The directory holding the file contents.
    pub fn staging(&self) -> &Path {
        &self.staging
    }

    /// Where the contents of `rel` live on the build host.
    pub fn host_path(&self, rel: &Path) -> PathBuf {
        self.staging.join(rel)
    }

    pub fn get(&self, rel: &Path) -> Option<&Node> {
        self.nodes.get(rel)
    }

    pub fn get_mut(&mut self, rel: &Path) -> Option<&mut Node> {
        self.nodes.get_mut(rel)
    }

    /// Every entry in path order: a directory always comes before what it contains.
    pub fn iter(&self) -> impl Iterator<Item = (&Path, &Node)> {
        self.nodes.iter().map(|(p, n)| (p.as_path(), n))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }

    /// The direct children of directory `rel`, sorted by name.
    pub fn children<'a>(&'a self, rel: &'a Path) -> impl Iterator<Item = (&'a Path, &'a Node)> + 'a {
        self.nodes
            .range::<Path, _>((std::ops::Bound::Excluded(rel), std::ops::Bound::Unbounded))
            .take_while(move |(p, _)| p.starts_with(rel))
            .filter(move |(p, _)| p.parent() == Some(rel))
            .map(|(p, n)| (p.as_path(), n))
    }

    /// Records `node` at `rel`, creating missing parent directories (0755 root:root) in the
    /// metadata and on disk. For directories the on-disk directory is created too; for files
    /// the caller writes the contents to [`Tree::host_path`]; symlinks are also created on disk
    /// so host tools (depmod) can follow them inside the staging directory.
    pub fn insert(&mut self, rel: impl AsRef<Path>, node: Node) -> Result<(), TreeError> {
        let rel = normalize(rel.as_ref())?;
        if rel.as_os_str().is_empty() {
            if let Kind::Dir = node.kind {
                self.nodes.insert(rel, node);
                return Ok(());
            }
            return Err(TreeError::BadPath(rel));
        }
        if let Some(parent) = rel.parent() {
            self.mkdir_p(parent)?;
        }
        let host = self.host_path(&rel);
        let io = |source| TreeError::Io { path: host.clone(), source };
        match &node.kind {
            Kind::Dir => std::fs::create_dir_all(&host).map_err(io)?,
            Kind::Symlink(target) => {
                if std::fs::symlink_metadata(&host).is_ok() {
                    std::fs::remove_file(&host).map_err(io)?;
                }
                std::os::unix::fs::symlink(target, &host).map_err(io)?;
            }
            _ => {}
        }
        self.nodes.insert(rel, node);
        Ok(())
    }

    /// Writes a regular file's contents and records it.
    pub fn write_file(
        &mut self,
        rel: impl AsRef<Path>,
        contents: &[u8],
        node: Node,
    ) -> Result<(), TreeError> {
        let rel = normalize(rel.as_ref())?;
        self.insert(&rel, node)?;
        let host = self.host_path(&rel);
        std::fs::write(&host, contents).map_err(|source| TreeError::Io { path: host, source })
    }

    /// Creates `rel` and its parents as directories (0755 root:root) where missing.
    pub fn mkdir_p(&mut self, rel: &Path) -> Result<(), TreeError> {
        let rel = normalize(rel)?;
        let mut cur = PathBuf::new();
        for part in rel.components() {
            cur.push(part);
            match self.nodes.get(&cur).map(|n| &n.kind) {
                Some(Kind::Dir) => continue,
                Some(_) => return Err(TreeError::NotADir(cur)),
                None => {
                    let host = self.host_path(&cur);
                    std::fs::create_dir_all(&host).map_err(|source| TreeError::Io { path: host, source })?;
                    self.nodes.insert(cur.clone(), Node::dir(0o755));
                }
            }
        }
        Ok(())
    }

    /// Removes `rel` and everything below it from the metadata (the staging files stay; they
    /// are simply not part of the image).
    pub fn remove(&mut self, rel: &Path) {
        let doomed: Vec<PathBuf> = self.nodes.keys().filter(|p| p.starts_with(rel)).cloned().collect();
        for p in doomed {
            self.nodes.remove(&p);
        }
    }
}

/// Turns `/a/./b` or `a/b/` into `a/b`; refuses `..` and anything that is not a plain name.
pub fn normalize(path: &Path) -> Result<PathBuf, TreeError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => out.push(name),
            Component::ParentDir | Component::Prefix(_) => return Err(TreeError::BadPath(path.to_owned())),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_creates_parents_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tree::new(dir.path().join("s")).unwrap();
        t.write_file("usr/bin/x", b"hi", Node::file(0o4755)).unwrap();
        let paths: Vec<_> = t.iter().map(|(p, _)| p.to_string_lossy().into_owned()).collect();
        assert_eq!(paths, ["", "usr", "usr/bin", "usr/bin/x"]);
        assert_eq!(std::fs::read(t.host_path(Path::new("usr/bin/x"))).unwrap(), b"hi");
        assert_eq!(t.get(Path::new("usr/bin/x")).unwrap().mode, 0o4755);
        let kids: Vec<_> = t.children(Path::new("usr")).map(|(p, _)| p.to_owned()).collect();
        assert_eq!(kids, [PathBuf::from("usr/bin")]);
        let top: Vec<_> = t.children(Path::new("")).map(|(p, _)| p.to_owned()).collect();
        assert_eq!(top, [PathBuf::from("usr")]);
    }

    #[test]
    fn normalize_refuses_parent_components() {
        assert_eq!(normalize(Path::new("/./a/b/")).unwrap(), PathBuf::from("a/b"));
        assert!(normalize(Path::new("a/../../etc")).is_err());
    }

    #[test]
    fn file_under_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tree::new(dir.path()).unwrap();
        t.write_file("a", b"", Node::file(0o644)).unwrap();
        assert!(matches!(t.write_file("a/b", b"", Node::file(0o644)), Err(TreeError::NotADir(_))));
    }
}
