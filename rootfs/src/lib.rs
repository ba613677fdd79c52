//! Build side: turns a list of Debian packages into a staging tree (the future root
//! filesystem) and an initramfs, without root and without running any package's scripts.
//!
//! Phases, each in its own module: [`apt`] resolves and fetches with the host's apt in a private
//! state directory, [`deb`] unpacks into a [`tree::Tree`], [`users`] writes what maintainer
//! scripts would have, [`modules`] computes kernel module closures, [`elf`] finds the shared
//! libraries a binary needs inside the tree, [`initramfs`] writes the cpio archive.
#![forbid(unsafe_code)]

pub mod apt;
pub mod deb;
pub mod elf;
pub mod initramfs;
pub mod modules;
pub mod tree;
pub mod users;
