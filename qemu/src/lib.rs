//! Boot harness for Cloister images under QEMU: finds OVMF, picks KVM or TCG, builds the QEMU command
//! line (q35, virtio disk, no network unless a tap is given), and drives a running VM through its
//! serial console and QMP. `cargo xtask run` uses [`run_interactive`]; the end-to-end tests use [`Vm`].
//!
//! Invariant: QEMU never gets its default user-mode network; a VM has no NIC unless the caller asks
//! for a tap inside a network namespace.
// `sys` is the one module allowed to hold `unsafe`; it opts back in with `allow`.
#![deny(unsafe_code)]

mod accel;
mod config;
mod console;
mod error;
mod firmware;
mod qmp;
mod sys;
mod vm;

pub use accel::{resolve_accel, Accel, Accelerator};
pub use config::{Console, Network, VmConfig, QEMU};
pub use error::Error;
pub use firmware::Firmware;
pub use vm::{run_interactive, Vm, ECHO_ENV, INTERACTIVE_HINT};

/// Result of this crate's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
