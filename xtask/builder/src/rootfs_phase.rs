//! Phase `rootfs`: the verified .debs unpacked into a staging tree, plus what maintainer scripts
//! would have written (accounts, modules.dep), plus our PID 1 and its service plan. The tree is
//! then checked: every ELF's libraries must resolve inside it, and our init must not need a newer
//! glibc than the image's.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use cloister_config::Config;
use cloister_rootfs::apt::FetchedDeb;
use cloister_rootfs::deb;
use cloister_rootfs::tree::{Kind, Node, Tree};
use cloister_rootfs::{elf, modules, users};
use sha2::{Digest, Sha256};

use crate::progress::Progress;

/// The staging tree and what later phases read from it.
pub struct Rootfs {
    pub tree: Tree,
    pub kernel_version: String,
    /// The kernel image on the build host (inside the staging directory).
    pub kernel_image: PathBuf,
}

/// Directories PID 1 mounts over or needs; packages do not all ship them.
const MOUNT_POINTS: &[(&str, u32)] = &[
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("run", 0o755),
    ("tmp", 0o1777),
    // Traversable, not listable: services reach their own 0700 state directories below it.
    ("var/lib/cloister", 0o711),
];

pub fn build(
    staging: &Path,
    debs: &[FetchedDeb],
    init_bin: &Path,
    tar_cache: &Path,
    config: &Config,
    test: &crate::phases::TestHooks,
) -> Result<Rootfs> {
    let mut tree = Tree::new(staging)?;
    deb::merged_usr(&mut tree)?;
    let mut bar = Progress::new("unpack", debs.len() as u64, false);
    for (i, fetched) in debs.iter().enumerate() {
        bar.set(i as u64, &fetched.spec.name);
        deb::unpack_cached(&fetched.path, &fetched.spec.sha256, tar_cache, &mut tree)
            .with_context(|| format!("unpacking {}", fetched.spec.name))?;
    }
    bar.finish();
    prune_documentation(&mut tree);
    let (groups, extra_users) = crate::chat::accounts(config);
    let accounts =
        users::write_system_accounts(&mut tree, &groups, &extra_users).context("writing system accounts")?;
    for (dir, mode) in MOUNT_POINTS {
        tree.mkdir_p(Path::new(dir))?;
        if let Some(node) = tree.get_mut(Path::new(dir)) {
            node.mode = *mode;
        }
    }
    let bin_dir = init_bin.parent().unwrap_or(Path::new("."));
    crate::chat::install(config, &mut tree, &accounts, bin_dir, test.tor_network.as_deref())
        .context("writing the onion chat's configuration")?;
    // PID 1's binary first: the chat client's view needs its libraries (services::install).
    install_init(&mut tree, init_bin)?;
    crate::services::install(config, &mut tree, test).context("resolving services")?;
    let kernel_version = modules::find_kernel_version(staging)?;
    modules::run_depmod(staging, &kernel_version)?;
    modules::record_depmod_outputs(&mut tree, &kernel_version)?;
    write_ld_so_cache(&mut tree)?;
    let kernel_image = staging.join(format!("boot/vmlinuz-{kernel_version}"));
    if !kernel_image.is_file() {
        bail!("kernel image {} missing from the kernel package", kernel_image.display());
    }
    check_libraries(&tree, init_bin)?;
    Ok(Rootfs { tree, kernel_version, kernel_image })
}

/// Manuals and documentation have no reader on an appliance without a shell, and some names
/// (Perl's `File::Find.3pm.gz`) cannot go into an XFS protofile. Like the `path-exclude` rules of
/// minimal Debian images, drop them but keep each package's copyright file.
fn prune_documentation(tree: &mut Tree) {
    for dir in ["usr/share/man", "usr/share/info", "usr/share/lintian", "usr/share/linda"] {
        tree.remove(Path::new(dir));
    }
    let docs: Vec<PathBuf> = tree
        .iter()
        .filter(|(p, n)| {
            p.starts_with("usr/share/doc")
                && n.kind != Kind::Dir
                && p.file_name() != Some("copyright".as_ref())
        })
        .map(|(p, _)| p.to_path_buf())
        .collect();
    for p in docs {
        tree.remove(&p);
    }
}

fn install_init(tree: &mut Tree, init_bin: &Path) -> Result<()> {
    let bytes = std::fs::read(init_bin).with_context(|| format!("cannot read {}", init_bin.display()))?;
    tree.write_file(cloister_proto::STAGE2_PATH, &bytes, Node::file(0o755))?;
    Ok(())
}

/// What libc-bin's trigger would do: `/etc/ld.so.cache`, written by the image's own static
/// ldconfig inside the staging tree. `chroot` needs root, so it runs in a user namespace where
/// we are root (as mmdebstrap's unshare mode does). Hosts that forbid user namespaces get a
/// warning instead: the loader then searches its default directories, which hold everything.
fn write_ld_so_cache(tree: &mut Tree) -> Result<()> {
    let root = tree.staging().to_path_buf();
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "chroot"])
        .arg(&root)
        .arg("/sbin/ldconfig")
        .output()
        .context("cannot run unshare (util-linux)")?;
    if !out.status.success() {
        eprintln!(
            "warning: no ld.so.cache ({}); the loader will search its default directories",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return Ok(());
    }
    tree.insert("etc/ld.so.cache", Node::file(0o644))?;
    Ok(())
}

/// Fails the build when any binary in the image would not load: a library missing from the
/// image, or our init built against a newer glibc than the image carries.
fn check_libraries(tree: &Tree, init_bin: &Path) -> Result<()> {
    let root = tree.staging();
    let files: Vec<&Path> = tree.iter().filter(|(_, n)| n.kind == Kind::File).map(|(p, _)| p).collect();
    let missing = elf::check_tree(root, files);
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().take(20).map(ToString::to_string).collect();
        bail!("{} unresolved libraries in the root:\n  {}", missing.len(), list.join("\n  "));
    }
    let libc = root.join("usr/lib/x86_64-linux-gnu/libc.so.6");
    let provided = elf::glibc_versions_provided(&libc)?;
    let dir = init_bin.parent().unwrap_or(Path::new("."));
    let ours = crate::chat::COMPANIONS.iter().map(|(file, _)| dir.join(file));
    for bin in std::iter::once(init_bin.to_path_buf()).chain(ours) {
        let needed = elf::glibc_versions_needed(&bin)?;
        let newer: Vec<&String> = needed.difference(&provided).collect();
        if !newer.is_empty() {
            bail!("{} needs {newer:?}, which the image's glibc does not provide", bin.display());
        }
    }
    Ok(())
}

/// One JSON object per entry, for tests that compare the built filesystem with the tree.
pub fn write_listing(tree: &Tree, out: &Path) -> Result<()> {
    let file = std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut w = std::io::BufWriter::new(file);
    for (rel, node) in tree.iter() {
        let mut entry = serde_json::json!({
            "path": rel.to_string_lossy(),
            "mode": node.mode & 0o7777,
            "uid": node.uid,
            "gid": node.gid,
        });
        let (kind, extra) = match &node.kind {
            Kind::Dir => ("dir", None),
            Kind::File => ("file", Some(("sha256", sha256_of(&tree.host_path(rel))?))),
            Kind::Symlink(t) => ("symlink", Some(("target", t.to_string_lossy().into_owned()))),
            Kind::CharDev { .. } => ("chardev", None),
            Kind::BlockDev { .. } => ("blockdev", None),
            Kind::Fifo => ("fifo", None),
        };
        entry["kind"] = kind.into();
        if let Some((k, v)) = extra {
            entry[k] = v.into();
        }
        writeln!(w, "{entry}")?;
    }
    w.flush()?;
    Ok(())
}

fn sha256_of(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}
