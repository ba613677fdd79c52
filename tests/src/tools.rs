//! Test-only tools that the host must not install: Debian packages (tor and what it needs) are
//! resolved and fetched with the project's own private apt root into a cache directory, then
//! unpacked (no maintainer scripts, no system service) into a kit directory whose programs run
//! with `LD_LIBRARY_PATH` pointing at the kit's libraries. Installing Debian's `tor` on the host
//! would start a system tor that dials the public network; a kit only runs when a test runs it.
//!
//! The host's glibc is used: `libc6` is never unpacked (host and kit are both Debian 12), so the
//! library path cannot shadow the host's `libc.so.6` or `ld.so`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use cloister_rootfs::apt::{AptRoot, FetchedDeb};
use cloister_rootfs::deb;
use cloister_rootfs::tree::Tree;

/// Packages the host already provides and that must not be on the kit's library path.
const HOST_PROVIDED: &[&str] = &["libc6", "libc-bin"];
/// How long fetched package lists stay fresh (as the image builder).
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Library directories of the unpacked packages (merged /usr: `lib` is `usr/lib`).
const LIB_DIRS: &[&str] = &["usr/lib/x86_64-linux-gnu", "usr/lib"];
/// Records which .debs the unpacked kit came from.
const STAMP: &str = "kit.stamp";

/// An unpacked set of packages: `root` is the kit's `/`.
#[derive(Debug, Clone)]
pub struct ToolKit {
    pub root: PathBuf,
}

/// The default cache: `$CLOISTER_TOOLS_CACHE`, else `$XDG_CACHE_HOME/cloister-test-tools`, else
/// `~/.cache/cloister-test-tools`.
pub fn default_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("CLOISTER_TOOLS_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root")).join(".cache")
    });
    base.join("cloister-test-tools")
}

/// Resolves `packages` and their dependencies with apt (cache under `cache`), fetches what is
/// missing, and unpacks them into `dest/root` unless `dest` already holds exactly those .debs.
pub fn fetch_tools(cache: &Path, dest: &Path, packages: &[&str]) -> Result<ToolKit> {
    let apt = AptRoot::prepare(cache, None).context("preparing the private apt root")?;
    apt.update(LISTS_MAX_AGE, false).context("apt-get update")?;
    let names: Vec<String> = packages.iter().map(|p| p.to_string()).collect();
    let specs = apt.resolve(&names).with_context(|| format!("resolving {packages:?}"))?;
    let fetched = apt.fetch(&specs, &mut |_| {}).context("fetching the tool packages")?;
    let fetched: Vec<FetchedDeb> =
        fetched.into_iter().filter(|f| !HOST_PROVIDED.contains(&f.spec.name.as_str())).collect();
    let stamp = stamp_text(&fetched);
    let kit = ToolKit { root: dest.join("root") };
    let stamp_path = dest.join(STAMP);
    if kit.root.is_dir() && std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str()) {
        return Ok(kit);
    }
    unpack_all(&fetched, &cache.join("data-tars"), &kit.root)?;
    std::fs::write(&stamp_path, stamp).with_context(|| format!("writing {}", stamp_path.display()))?;
    Ok(kit)
}

/// One line per package: name, version, sha256 (the fetch order is sorted by name).
fn stamp_text(fetched: &[FetchedDeb]) -> String {
    fetched.iter().map(|f| format!("{} {} {}\n", f.spec.name, f.spec.version, f.spec.sha256)).collect()
}

/// Unpacks every .deb into a fresh `root` (a stale or half-written kit is removed first).
fn unpack_all(fetched: &[FetchedDeb], tar_cache: &Path, root: &Path) -> Result<()> {
    if root.exists() {
        std::fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))?;
    }
    let mut tree = Tree::new(root)?;
    deb::merged_usr(&mut tree)?;
    for f in fetched {
        deb::unpack_cached(&f.path, &f.spec.sha256, tar_cache, &mut tree)
            .with_context(|| format!("unpacking {}", f.spec.name))?;
    }
    Ok(())
}

impl ToolKit {
    /// Absolute path of `program` inside the kit (`tor` -> `<root>/usr/bin/tor`).
    pub fn program(&self, program: &str) -> PathBuf {
        ["usr/bin", "usr/sbin"]
            .iter()
            .map(|d| self.root.join(d).join(program))
            .find(|p| p.is_file())
            .unwrap_or_else(|| self.root.join("usr/bin").join(program))
    }

    /// The `LD_LIBRARY_PATH` value naming the kit's library directories.
    pub fn library_path(&self) -> String {
        LIB_DIRS.iter().map(|d| self.root.join(d).display().to_string()).collect::<Vec<_>>().join(":")
    }

    /// `program` from the kit with its library path, in the current network namespace. Only
    /// for tools that never touch the network (tor-gencert).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.program(program));
        c.env("LD_LIBRARY_PATH", self.library_path());
        c
    }

    /// `ip netns exec NAME env LD_LIBRARY_PATH=… <kit>/usr/bin/PROGRAM ARGS…`: the library path
    /// is set after `ip` so that `ip` itself keeps the host's libraries.
    pub fn netns_command(&self, netns: &str, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", netns, "env"])
            .arg(format!("LD_LIBRARY_PATH={}", self.library_path()))
            .arg(self.program(program))
            .args(args);
        c
    }
}
