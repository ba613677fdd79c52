//! `cargo xtask <command>`: the project's one entry point for building, booting and testing.
//!
//! `.cargo/config.toml` aliases `xtask` to `run --package xtask --`, so this is a normal binary
//! crate: no Makefile, no shell glue. xtask links no native library on purpose: it checks (and as
//! root installs) the Debian packages the other crates need, and only then asks cargo to build
//! them (`cloister-build`, the image pipeline, and `cloister-init`, the appliance's PID 1).
#![forbid(unsafe_code)]

mod bench;
mod build;
mod flash;
mod host;
mod run;
mod test;
#[cfg(test)]
mod tidy;
mod tornet;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, boot and test Cloister images")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a disk image from cloister.toml (all options: `cargo xtask build-image --help`).
    #[command(disable_help_flag = true)]
    BuildImage {
        /// Passed to cloister-build unchanged.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Boot an image in QEMU with the serial console on this terminal.
    Run(run::RunArgs),
    /// Run every test: unit, host integration, image checks and end to end under QEMU.
    Test(test::TestArgs),
    /// Measure build and boot times, sizes and the onion chat (`bench onion`: that part alone); prints a table.
    Bench(bench::BenchArgs),
    /// Write an image to a USB stick: checks the target, asks to confirm, verifies the copy.
    Flash(flash::FlashArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::BuildImage { args } => build::build_image(&args),
        Cmd::Run(args) => run::run(&args),
        Cmd::Test(args) => test::test(&args),
        Cmd::Bench(args) => bench::bench(&args),
        Cmd::Flash(args) => flash::flash(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
