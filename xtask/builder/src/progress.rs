//! Progress for the long phases (downloads, unpacking, encryption, writing): a bar on a
//! terminal, and a few plain lines when stderr is a log file (CI) so the log shows motion
//! without thousands of redraws.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    last_line: Instant,
    bytes: bool,
}

impl Progress {
    /// A progress display for `total` units; `bytes` formats them as sizes.
    pub fn new(label: &str, total: u64, bytes: bool) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let template = if bytes {
                "  {prefix:12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
            } else {
                "  {prefix:12} [{bar:30}] {pos}/{len} {msg}"
            };
            let style = ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            let bar = ProgressBar::new(total).with_style(style).with_prefix(label.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self { bar, label: label.into(), total, last_line: Instant::now(), bytes }
    }

    pub fn set(&mut self, done: u64, message: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(message.to_string());
            }
            None if self.last_line.elapsed() >= Duration::from_secs(5) => {
                self.last_line = Instant::now();
                let unit = if self.bytes { " bytes" } else { "" };
                eprintln!("  {}: {done}/{}{unit}", self.label, self.total);
            }
            None => {}
        }
    }

    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
