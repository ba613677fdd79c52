//! Where OVMF lives on the common distributions, and the pairing of its code image with the matching
//! variable-store template (a 4 MiB code image needs the 4 MiB store).

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Known (code, vars) pairs, relative to `/`; first match wins, so 4 MiB builds come first.
const LAYOUTS: &[(&str, &str)] = &[
    // Debian, Ubuntu
    ("usr/share/OVMF/OVMF_CODE_4M.fd", "usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("usr/share/OVMF/OVMF_CODE.fd", "usr/share/OVMF/OVMF_VARS.fd"),
    // Fedora, RHEL
    ("usr/share/edk2/ovmf/OVMF_CODE.fd", "usr/share/edk2/ovmf/OVMF_VARS.fd"),
    // Arch
    ("usr/share/edk2/x64/OVMF_CODE.4m.fd", "usr/share/edk2/x64/OVMF_VARS.4m.fd"),
    ("usr/share/edk2/x64/OVMF_CODE.fd", "usr/share/edk2/x64/OVMF_VARS.fd"),
    ("usr/share/edk2-ovmf/x64/OVMF_CODE.fd", "usr/share/edk2-ovmf/x64/OVMF_VARS.fd"),
    // Gentoo
    ("usr/share/edk2-ovmf/OVMF_CODE.fd", "usr/share/edk2-ovmf/OVMF_VARS.fd"),
    // openSUSE
    ("usr/share/qemu/ovmf-x86_64-code.bin", "usr/share/qemu/ovmf-x86_64-vars.bin"),
];

/// An OVMF build: a read-only code image and the template each VM copies its variable store from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firmware {
    /// The firmware code, mapped read-only as pflash unit 0.
    pub code: PathBuf,
    /// The pristine variable store; never written, each VM gets a copy in its work dir.
    pub vars_template: PathBuf,
}

impl Firmware {
    /// Finds OVMF in the distributions' usual places.
    pub fn find() -> Result<Firmware> {
        Self::find_under(Path::new("/"))
    }

    /// Same as [`Firmware::find`], with the layouts taken relative to `root`.
    pub fn find_under(root: &Path) -> Result<Firmware> {
        LAYOUTS
            .iter()
            .map(|(code, vars)| Firmware { code: root.join(code), vars_template: root.join(vars) })
            .find(|fw| fw.code.is_file() && fw.vars_template.is_file())
            .ok_or(Error::FirmwareNotFound)
    }

    /// Firmware given by its code image (`--firmware PATH`); the variable store is the file beside it
    /// whose name has `VARS` (or `vars`) where the code image has `CODE` (or `code`).
    pub fn from_code(code: &Path) -> Result<Firmware> {
        let name = code.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let vars_name = name.replace("CODE", "VARS").replace("code", "vars");
        let vars_template = code.with_file_name(&vars_name);
        if !code.is_file() {
            return Err(Error::FirmwareCode { path: code.to_path_buf() });
        }
        if vars_name == name || !vars_template.is_file() {
            return Err(Error::FirmwareVars { code: code.to_path_buf(), expected: vars_template });
        }
        Ok(Firmware { code: code.to_path_buf(), vars_template })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(root: &Path, rel: &str) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"fw").unwrap();
    }

    #[test]
    fn finds_each_distribution_layout() {
        for (code, vars) in LAYOUTS {
            let root = tempfile::tempdir().unwrap();
            touch(root.path(), code);
            touch(root.path(), vars);
            let fw = Firmware::find_under(root.path()).unwrap();
            assert_eq!(fw.code, root.path().join(code));
            assert_eq!(fw.vars_template, root.path().join(vars));
        }
    }

    #[test]
    fn prefers_4m_and_never_mixes_sizes() {
        let root = tempfile::tempdir().unwrap();
        // A 4M code image without its 4M store must not be paired with the 2M store.
        touch(root.path(), "usr/share/OVMF/OVMF_CODE_4M.fd");
        touch(root.path(), "usr/share/OVMF/OVMF_CODE.fd");
        touch(root.path(), "usr/share/OVMF/OVMF_VARS.fd");
        let fw = Firmware::find_under(root.path()).unwrap();
        assert_eq!(fw.code, root.path().join("usr/share/OVMF/OVMF_CODE.fd"));
        touch(root.path(), "usr/share/OVMF/OVMF_VARS_4M.fd");
        let fw = Firmware::find_under(root.path()).unwrap();
        assert_eq!(fw.vars_template, root.path().join("usr/share/OVMF/OVMF_VARS_4M.fd"));
    }

    #[test]
    fn missing_firmware_says_how_to_fix_it() {
        let root = tempfile::tempdir().unwrap();
        let err = Firmware::find_under(root.path()).unwrap_err();
        assert_eq!(err.to_string(), "OVMF firmware not found; install ovmf or pass --firmware PATH");
    }

    #[test]
    fn from_code_pairs_the_store_beside_it() {
        let root = tempfile::tempdir().unwrap();
        touch(root.path(), "OVMF_CODE_4M.fd");
        touch(root.path(), "OVMF_VARS_4M.fd");
        touch(root.path(), "ovmf-x86_64-code.bin");
        let fw = Firmware::from_code(&root.path().join("OVMF_CODE_4M.fd")).unwrap();
        assert_eq!(fw.vars_template, root.path().join("OVMF_VARS_4M.fd"));
        let err = Firmware::from_code(&root.path().join("ovmf-x86_64-code.bin")).unwrap_err();
        assert!(err.to_string().contains("ovmf-x86_64-vars.bin"), "{err}");
        assert!(Firmware::from_code(&root.path().join("absent.fd")).is_err());
    }
}
