//! `tornet`: the private Tor network of the tests as a long-running process, so that
//! `cargo xtask test` can start it once per run and let it bootstrap while other tests run.
//!
//! `tornet prepare DIR`: fetch the tool kit, make the authority keys (kept if present), the
//! torrcs and `DIR/appliance-torrc`.
//! `tornet run DIR`: start the network in a fresh namespace `cloister-tornet-<pid>`; writes
//! `DIR/netns` (its name) once started and `DIR/ready` (seconds to bootstrap) once ready; runs
//! until SIGTERM, SIGINT or end of stdin, then stops every tor, deletes the namespace and
//! removes both files.
//!
//! The kit comes from `CLOISTER_TOOLS_CACHE` (default `~/.cache/cloister-test-tools`).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cloister_tests::tools::{self, ToolKit};
use cloister_tests::tornet::{self, TorNet};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const READY_TIMEOUT: Duration = Duration::from_secs(600);

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tornet: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, dir) = match args.as_slice() {
        [cmd, dir] => (cmd.as_str(), PathBuf::from(dir)),
        _ => bail!("usage: tornet prepare DIR | tornet run DIR"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    match cmd {
        "prepare" => {
            let p = tornet::prepare(&dir, &kit()?)?;
            println!("{}", p.appliance_torrc.display());
            Ok(())
        }
        "run" => run(&dir),
        _ => bail!("unknown command {cmd:?}: usage: tornet prepare DIR | tornet run DIR"),
    }
}

fn kit() -> Result<ToolKit> {
    let cache = tools::default_cache();
    let t = Instant::now();
    let kit = tools::fetch_tools(&cache, &cache.join("kit"), &["tor"])?;
    eprintln!("tornet: tool kit ready in {:.1} s ({})", t.elapsed().as_secs_f64(), kit.root.display());
    Ok(kit)
}

fn run(dir: &Path) -> Result<()> {
    let (netns_file, ready_file) = (dir.join("netns"), dir.join("ready"));
    reap_stale(&netns_file)?;
    let _ = std::fs::remove_file(&ready_file);
    let kit = kit()?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("installing a signal handler")?;
    }
    // End of stdin means the parent is gone: stop as for a signal.
    let on_eof = Arc::clone(&stop);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        on_eof.store(true, Ordering::SeqCst);
    });
    let name = format!("cloister-tornet-{}", std::process::id());
    let result = serve(dir, &kit, &name, &stop);
    let _ = std::fs::remove_file(&netns_file);
    let _ = std::fs::remove_file(&ready_file);
    result
}

/// A previous `tornet run` killed with SIGKILL could not stop its tors: kill what is still in
/// the namespace it recorded and delete that namespace. Fails when that run is still alive.
fn reap_stale(netns_file: &Path) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(netns_file) else { return Ok(()) };
    let name = text.trim();
    let Some(owner) = name.strip_prefix("cloister-tornet-") else { return Ok(()) };
    let comm = std::fs::read_to_string(format!("/proc/{owner}/comm")).unwrap_or_default();
    if comm.trim() == "tornet" {
        bail!("tornet {owner} still runs the network in {}", netns_file.display());
    }
    if !Path::new("/run/netns").join(name).exists() {
        return Ok(());
    }
    eprintln!("tornet: removing the stale namespace {name}");
    for pid in netns_pids(name) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    std::thread::sleep(Duration::from_millis(200));
    cloister_tests::run(Command::new("ip").args(["netns", "delete", name]))?;
    Ok(())
}

fn netns_pids(name: &str) -> Vec<i32> {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Runs the network until `stop`; the network (processes, namespace) goes when this returns.
fn serve(dir: &Path, kit: &ToolKit, name: &str, stop: &AtomicBool) -> Result<()> {
    let mut net = TorNet::start(dir, kit, name)?;
    std::fs::write(dir.join("netns"), format!("{name}\n"))?;
    eprintln!("tornet: started in namespace {name}");
    let took = match net.wait_ready_or_stop(READY_TIMEOUT, stop) {
        Ok(took) => took,
        // Asked to stop while bootstrapping: a normal end.
        Err(_) if stop.load(Ordering::SeqCst) => return Ok(()),
        Err(e) => return Err(e),
    };
    std::fs::write(dir.join("ready"), format!("{:.1}\n", took.as_secs_f64()))?;
    eprintln!("tornet: ready after {:.1} s, {} MiB resident", took.as_secs_f64(), net.rss_kib() >> 10);
    // A dead node is reported once; the rest of the network keeps serving.
    let mut reported = false;
    while !stop.load(Ordering::SeqCst) {
        if let (Err(e), false) = (net.check_alive(), reported) {
            eprintln!("tornet: {e:#}");
            reported = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("tornet: stopping");
    Ok(())
}
