//! Hygiene checks run as ordinary tests (rust-analyzer's idea): every invariant of the house
//! style that a machine can check is a test, so CI checks nothing a local `cargo test` skips.

use std::path::{Path, PathBuf};

use crate::build::workspace_root;

/// The only files allowed to hold `unsafe` code, each a small module named for what it wraps.
/// (This file is exempt: it only names the keyword.)
const UNSAFE_MODULES: &[&str] = &["qemu/src/sys.rs", "init/src/sys.rs", "init/src/ioctl.rs"];

fn rust_files() -> Vec<PathBuf> {
    let root = workspace_root();
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if name == "target" || name.to_string_lossy().starts_with('.') {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    assert!(out.len() > 20, "found only {} .rs files under {}", out.len(), root.display());
    out
}

fn rel(path: &Path) -> String {
    path.strip_prefix(workspace_root()).unwrap_or(path).to_string_lossy().into_owned()
}

#[test]
fn every_rust_file_says_what_it_owns() {
    let missing: Vec<String> = rust_files()
        .into_iter()
        .filter(|p| !std::fs::read_to_string(p).unwrap_or_default().starts_with("//!"))
        .map(|p| rel(&p))
        .collect();
    assert!(missing.is_empty(), "files without a leading //! doc comment: {missing:#?}");
}

#[test]
fn unsafe_lives_only_in_named_modules_and_says_why() {
    let mut problems = Vec::new();
    for path in rust_files().into_iter().filter(|p| !p.ends_with("xtask/src/tidy.rs")) {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if !(code.contains("unsafe {") || code.contains("unsafe extern") || code.contains("unsafe fn")) {
                continue;
            }
            let name = rel(&path);
            if !UNSAFE_MODULES.contains(&name.as_str()) {
                problems.push(format!("{name}:{}: unsafe outside the named unsafe modules", i + 1));
            }
            let before = &lines[i.saturating_sub(4)..i];
            let said = |l: &&str| l.contains("SAFETY:") || l.contains("# Safety");
            if !before.iter().chain(std::iter::once(line)).any(said) {
                problems.push(format!("{name}:{}: unsafe without a // SAFETY: comment above it", i + 1));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
