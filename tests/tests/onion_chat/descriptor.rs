//! What the appliance's tor really published: the descriptor the private network's client tor
//! fetched for the onion address (asked over its control socket, `tornet::ClientControl`),
//! opened with the address alone (`cloister_tests::hsdesc`). The torrc's
//! `HiddenServicePoWDefensesEnabled 1` must show as a `pow-params v1` line in the inner layer:
//! clients only solve puzzles a descriptor announces.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use cloister_tests::hsdesc;
use cloister_tests::torctl::Control;
use cloister_tests::tornet::ClientControl;

/// The client holds the descriptor after the first login; if it was dropped or fetched before
/// the service added its puzzle parameters, it is fetched again for at most this long.
const TO_REFETCH: Duration = Duration::from_secs(180);

/// Returns a line for the log: seed, suggested effort, expiry, introduction points.
pub fn descriptor_announces_proof_of_work(net_dir: &Path, onion: &str) -> Result<String> {
    let paths = ClientControl::of(net_dir);
    let mut ctl = Control::connect(&paths.socket, &paths.cookie)?;
    let id = onion.strip_suffix(".onion").unwrap_or(onion);
    let key = format!("hs/client/desc/id/{id}");
    let deadline = Instant::now() + TO_REFETCH;
    let mut last = String::from("no descriptor in the client's cache");
    loop {
        if let Some(descriptor) = ctl.getinfo(&key)? {
            // A wrong key or a damaged document fails here, at a MAC: never a silent miss.
            let inner = hsdesc::inner_layer(&descriptor, onion)?;
            if let Some(pow) = hsdesc::pow_params(&inner)? {
                let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
                let left = pow.expires_unix - i64::try_from(now)?;
                ensure!(left > 0, "the published seed expired {} s ago", -left);
                let intro = hsdesc::intro_points(&inner);
                ensure!(intro > 0, "the descriptor lists no introduction point:\n{inner}");
                let revision = hsdesc::parse_outer(&descriptor)?.revision;
                let seed: String = pow.seed[..4].iter().map(|b| format!("{b:02x}")).collect();
                return Ok(format!(
                    "pow-params v1: seed {seed}…, suggested effort {}, expires in {} min; \
                     {intro} introduction points; revision {revision}",
                    pow.suggested_effort,
                    left / 60
                ));
            }
            // Everything but the introduction points, to say what the layer held instead.
            last = inner
                .lines()
                .take_while(|l| !l.starts_with("introduction-point "))
                .collect::<Vec<_>>()
                .join("\n");
        }
        if Instant::now() > deadline {
            bail!(
                "no pow-params in the descriptor of {onion} after {TO_REFETCH:?}; its inner layer:\n{last}"
            );
        }
        ctl.hsfetch(id).context("asking the client to fetch the descriptor again")?;
        std::thread::sleep(Duration::from_secs(5));
    }
}
