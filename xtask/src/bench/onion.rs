//! The onion chat's part of `cargo xtask bench`: the test image and the private Tor network,
//! built and started by the same code as `cargo xtask test` (`test::TestImage`,
//! `tornet::prepare`, `tornet::Running`), and `onion_bench` (`tests/src/bin/onion_bench.rs`)
//! run with the end-to-end tests' environment; its figures become rows next to the issue's
//! targets. The figures are kept as JSON in `target/bench/onion.json`.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{row, Row};
use crate::{build, test, tornet};

/// The line `onion_bench` prints its figures on.
const FIGURES: &str = "onion-bench: figures ";
/// Total memory of the appliance's processes with 10 users chatting (issue 7).
const MEMORY_TARGET_MIB: f64 = 256.0;

pub fn onion_rows(rows: &mut Vec<Row>, bins: &build::Binaries, reuse: bool) -> Result<()> {
    let prepared = tornet::prepare()?;
    build::cargo(&["build", "--package", "cloister-tests", "--bin", "onion_bench"])?;
    let image = test::TestImage::build(bins, reuse, &prepared)?;
    let network = tornet::Running::start(&prepared)?;
    let env = image.env(bins, &prepared)?;
    let bench = build::target_dir().join("debug").join("onion_bench");
    let out = Command::new(&bench)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", bench.display()));
    network.stop();
    let out = out?;
    if !out.status.success() {
        bail!("onion_bench failed: {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line =
        text.lines().find_map(|l| l.strip_prefix(FIGURES)).context("onion_bench printed no figures")?;
    let figures: Value = serde_json::from_str(line).context("onion_bench's figures are not JSON")?;
    let file = build::target_dir().join("bench").join("onion.json");
    std::fs::create_dir_all(file.parent().context("no bench dir")?)?;
    std::fs::write(&file, serde_json::to_string_pretty(&figures)?)?;
    eprintln!("xtask: onion figures in {}", file.display());
    figure_rows(rows, &figures);
    Ok(())
}

/// The programs the issue names, and the appliance's own, as the kernel names them (`comm`:
/// the file name, at most 15 bytes). Ours are installed without their crate prefix
/// (`/usr/lib/cloister/shell`, …: the builder's `COMPANIONS`), so their `comm` is that name.
const PROGRAMS: &[(&str, &str)] = &[
    ("tor", "tor"),
    ("sshd", "sshd"),
    ("ngircd", "ngircd"),
    ("irssi", "irssi"),
    ("ircgate", "ircgate"),
    ("bridge", "bridge"),
    ("shell", "shell"),
    ("admin CLI", "admin"),
];

fn figure_rows(rows: &mut Vec<Row>, f: &Value) {
    let b = &f["boot"];
    let s = |v: &Value| v.as_f64().map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
    let cpus = format!("TCG, {} vCPU, {} MiB", f["vcpus"], f["memory_mib"]);
    rows.push(row(
        format!("onion: wall s from QEMU start to prompt / unlock / onion address ({cpus})"),
        format!("{} / {} / {} s", s(&b["prompt_s"]), s(&b["unlocked_s"]), s(&b["onion_address_s"])),
        "",
    ));
    rows.push(row(
        "onion: wall s to first login through the onion / to first chat",
        format!(
            "{} / {} s ({} login attempts)",
            s(&b["first_login_s"]),
            s(&b["first_chat_s"]),
            b["login_attempts"]
        ),
        "",
    ));
    let adds = numbers(&f["user_add_s"]);
    rows.push(row(
        format!("onion: admin CLI `user add` over the onion (median of {})", adds.len()),
        format!("{} s", s(&median(&adds).into())),
        "",
    ));
    let sessions = &f["sessions"];
    let spread = |k: &str| {
        let v = numbers(&sessions[k]);
        format!("{}/{}", s(&median(&v).into()), s(&v.iter().copied().fold(f64::NAN, f64::max).into()))
    };
    let users = &f["chat"]["users"];
    rows.push(row(
        format!("onion: {users} users at once, s to prompt / chat / join (median/max)"),
        format!("{} / {} / {} s", spread("login_s"), spread("chat_s"), spread("join_s")),
        "",
    ));
    let c = &f["chat"];
    rows.push(row(
        format!("onion: {users} users chatting, deliveries ({} messages)", c["messages"]),
        format!("{} / {}", c["delivered"], c["expected"]),
        "all",
    ));
    let ms = |v: &Value| v.as_f64().map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into());
    let l = &c["latency_ms"];
    rows.push(row(
        "onion: message latency through the onion, p50 / p95 / max",
        format!("{} / {} / {} ms", ms(&l["p50"]), ms(&l["p95"]), ms(&l["max"])),
        "",
    ));
    memory_rows(rows, &f["memory"]["one_user"], &f["memory"]["ten_users"], users);
}

/// RSS and PSS per program with one user in chat and with ten; the total against the target.
fn memory_rows(rows: &mut Vec<Row>, one: &Value, ten: &Value, users: &Value) {
    let mib =
        |v: &Value| v.as_u64().map(|k| format!("{:.1}", k as f64 / 1024.0)).unwrap_or_else(|| "-".into());
    let pair = |m: &Value| format!("{} / {}", mib(&m["rss_kib"]), mib(&m["pss_kib"]));
    let program = |m: &Value, comm: &str| m["programs"][comm].clone();
    // PID 1's program name also covers the launch chains and ns-inits (the same binary).
    let chains = |m: &Value| {
        let (init, pid1) = (&m["programs"]["init"], &m["pid1"]);
        let less = |k: &str| init[k].as_u64().zip(pid1[k].as_u64()).map(|(a, b)| a.saturating_sub(b));
        serde_json::json!({ "rss_kib": less("rss_kib"), "pss_kib": less("pss_kib"), "processes": init["processes"].as_u64().map(|n| n.saturating_sub(1)) })
    };
    let mut named: Vec<(String, Value, Value)> = PROGRAMS
        .iter()
        .map(|(name, comm)| (name.to_string(), program(one, comm), program(ten, comm)))
        .collect();
    named.push(("PID 1".into(), one["pid1"].clone(), ten["pid1"].clone()));
    named.push(("launch chains (init)".into(), chains(one), chains(ten)));
    for (name, a, b) in named {
        rows.push(row(
            format!("onion: memory {name}, MiB RSS / PSS (1 user → {users} users, processes)"),
            format!("{} → {} ({} → {})", pair(&a), pair(&b), count(&a), count(&b)),
            "",
        ));
    }
    let (t1, t10) = (&one["total"], &ten["total"]);
    rows.push(row(
        format!("onion: memory total PSS, {users} users (shared pages split among their users)"),
        format!(
            "{} MiB in {} processes (1 user: {} MiB)",
            mib(&t10["pss_kib"]),
            t10["processes"],
            mib(&t1["pss_kib"])
        ),
        "≤ 256 MiB",
    ));
    let within = t10["pss_kib"].as_u64().map(|k| k as f64 / 1024.0 <= MEMORY_TARGET_MIB);
    rows.push(row(
        format!("onion: memory total RSS, {users} users (shared pages counted in each process)"),
        format!(
            "{} MiB (1 user: {} MiB); PSS {}",
            mib(&t10["rss_kib"]),
            mib(&t1["rss_kib"]),
            match within {
                Some(true) => "within the target",
                Some(false) => "OVER the target",
                None => "unknown",
            }
        ),
        "",
    ));
}

fn count(m: &Value) -> String {
    m["processes"].as_u64().map(|n| n.to_string()).unwrap_or_else(|| "0".into())
}

fn numbers(v: &Value) -> Vec<f64> {
    v.as_array().into_iter().flatten().filter_map(Value::as_f64).collect()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn memory(tor_rss: u64, total_pss: u64) -> Value {
        json!({
            "total": {"processes": 40, "rss_kib": 300 * 1024, "pss_kib": total_pss},
            "programs": {
                "tor": {"processes": 1, "rss_kib": tor_rss, "pss_kib": tor_rss - 1024},
                "init": {"processes": 12, "rss_kib": 36 * 1024, "pss_kib": 12 * 1024},
            },
            "pid1": {"processes": 1, "rss_kib": 6 * 1024, "pss_kib": 4 * 1024},
        })
    }

    #[test]
    fn figures_become_rows_with_the_memory_target() {
        let f = json!({
            "vcpus": 1, "memory_mib": 1024,
            "boot": {"prompt_s": 9.0, "unlocked_s": 14.2, "onion_address_s": 40.0,
                     "first_login_s": 95.5, "first_chat_s": 99.0, "login_attempts": 2},
            "user_add_s": [3.0, 5.0, 4.0],
            "sessions": {"login_s": [10.0, 30.0, 20.0], "chat_s": [12.0, 32.0, 22.0], "join_s": [13.0, 33.0, 23.0]},
            "chat": {"users": 10, "messages": 50, "expected": 450, "delivered": 449,
                     "latency_ms": {"p50": 800.4, "p95": 1900.0, "max": 2500.0}},
            "memory": {"one_user": memory(40 * 1024, 100 * 1024), "ten_users": memory(50 * 1024, 200 * 1024)},
        });
        let mut rows = Vec::new();
        figure_rows(&mut rows, &f);
        let find =
            |what: &str| rows.iter().find(|r| r.what.contains(what)).map(|r| (r.value.as_str(), r.target));
        assert_eq!(find("first login").unwrap().0, "95.5 / 99.0 s (2 login attempts)");
        assert_eq!(find("user add").unwrap().0, "4.0 s");
        assert_eq!(find("at once").unwrap().0, "20.0/30.0 / 22.0/32.0 / 23.0/33.0 s");
        assert_eq!(find("deliveries").unwrap(), ("449 / 450", "all"));
        assert_eq!(find("p50").unwrap().0, "800 / 1900 / 2500 ms");
        assert_eq!(find("memory tor").unwrap().0, "40.0 / 39.0 → 50.0 / 49.0 (1 → 1)");
        assert_eq!(find("memory PID 1").unwrap().0, "6.0 / 4.0 → 6.0 / 4.0 (1 → 1)");
        assert_eq!(find("launch chains").unwrap().0, "30.0 / 8.0 → 30.0 / 8.0 (11 → 11)");
        assert_eq!(find("memory ngircd").unwrap().0, "- / - → - / - (0 → 0)");
        assert_eq!(
            find("total PSS").unwrap(),
            ("200.0 MiB in 40 processes (1 user: 100.0 MiB)", "≤ 256 MiB")
        );
        assert!(find("total RSS").unwrap().0.ends_with("PSS within the target"));
    }
}
