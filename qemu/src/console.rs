//! The captured serial console: a reader thread copies every byte QEMU writes into a shared buffer and
//! `console.log`; waiters search the buffer from their cursor, so the same text can be awaited twice.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Lines of console output quoted in a timeout error.
pub(crate) const TAIL_LINES: usize = 40;

#[derive(Default)]
struct State {
    /// Every byte as QEMU wrote it.
    raw: Vec<u8>,
    /// `raw` as a reader sees it on screen: the text waiters search.
    text: Vec<u8>,
    cleaner: Cleaner,
    /// QEMU closed its end: nothing more will come.
    closed: bool,
}

/// What a wait found.
pub(crate) enum Found {
    /// The whole line holding the match.
    Line(String),
    TimedOut,
    Closed,
}

/// The console buffer shared between the reader thread and the [`crate::Vm`].
#[derive(Default, Clone)]
pub(crate) struct ConsoleBuffer {
    shared: Arc<(Mutex<State>, Condvar)>,
}

impl ConsoleBuffer {
    /// Starts the thread that drains `source` (QEMU's stdout) until end of file.
    pub(crate) fn spawn_reader(
        &self,
        mut source: impl Read + Send + 'static,
        mut log: File,
        echo: bool,
    ) -> JoinHandle<()> {
        let console = self.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            // A read error ends the console like EOF: QEMU is gone or unreachable either way.
            while let Ok(n @ 1..) = source.read(&mut chunk) {
                // Logging is best effort: a full disk must not stop the test from seeing the console.
                let _ = log.write_all(&chunk[..n]);
                if echo {
                    let _ = std::io::stderr().write_all(&chunk[..n]);
                }
                console.push(&chunk[..n]);
            }
            console.close();
        })
    }

    pub(crate) fn push(&self, bytes: &[u8]) {
        let mut state = self.lock();
        let State { raw, text, cleaner, .. } = &mut *state;
        raw.extend_from_slice(bytes);
        cleaner.feed(bytes, text);
        drop(state);
        self.shared.1.notify_all();
    }

    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.shared.1.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a waiter panicked; the bytes are still valid.
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn raw_text(&self) -> String {
        String::from_utf8_lossy(&self.lock().raw).into_owned()
    }

    pub(crate) fn tail(&self) -> String {
        tail_lines(&self.lock().text, TAIL_LINES)
    }

    /// Waits for `needle` in the cleaned text at or after `*cursor`; on success moves the cursor past
    /// the match and returns the match's line once it is complete (or output pauses).
    pub(crate) fn wait_for(&self, needle: &[u8], cursor: &mut usize, timeout: Duration) -> Found {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(at) = find(&state.text, needle, *cursor) {
                *cursor = at + needle.len();
                let state = self.settle_line(state, *cursor);
                return Found::Line(line_around(&state.text, at, needle.len()));
            }
            if state.closed {
                return Found::Closed;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Found::TimedOut;
            }
            state = self.wait(state, left);
        }
    }

    /// Gives the rest of a matched line a moment to arrive: until its newline, a 100 ms pause in the
    /// output (a prompt has no newline), or one second.
    fn settle_line<'a>(&'a self, mut state: MutexGuard<'a, State>, from: usize) -> MutexGuard<'a, State> {
        let deadline = Instant::now() + Duration::from_secs(1);
        while !state.closed && !state.text[from..].contains(&b'\n') && Instant::now() < deadline {
            let before = state.raw.len();
            state = self.wait(state, Duration::from_millis(100));
            if state.raw.len() == before {
                break;
            }
        }
        state
    }

    fn wait<'a>(&'a self, state: MutexGuard<'a, State>, limit: Duration) -> MutexGuard<'a, State> {
        self.shared.1.wait_timeout(state, limit).unwrap_or_else(|e| e.into_inner()).0
    }
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let rest = haystack.get(from..)?;
    if needle.is_empty() {
        return Some(from);
    }
    rest.windows(needle.len()).position(|w| w == needle).map(|p| p + from)
}

/// The line of cleaned `text` holding `text[at..at + len]`.
fn line_around(text: &[u8], at: usize, len: usize) -> String {
    let start = text[..at].iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let end = text[at + len..].iter().position(|&b| b == b'\n').map_or(text.len(), |p| at + len + p);
    String::from_utf8_lossy(&text[start..end]).into_owned()
}

/// The last `lines` lines of cleaned text.
fn tail_lines(text: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The last `lines` lines of raw terminal output, cleaned for quoting in an error message.
pub(crate) fn tail(raw: &[u8], lines: usize) -> String {
    let mut text = Vec::new();
    Cleaner::default().feed(raw, &mut text);
    tail_lines(&text, lines)
}

/// Strips terminal escape sequences (firmware paints colours and moves the cursor between every
/// echoed key) and control characters other than newline and tab. Works on a stream: a sequence may
/// be split across reads.
#[derive(Default)]
struct Cleaner {
    state: Escape,
}

#[derive(Default, Clone, Copy)]
enum Escape {
    #[default]
    None,
    /// After ESC.
    Start,
    /// Inside `ESC [`, up to a final byte in `@..=~`.
    Csi,
    /// Inside `ESC ]`, up to BEL or ESC.
    Osc,
}

impl Cleaner {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        for &b in bytes {
            self.state = match (self.state, b) {
                (_, 0x1b) => Escape::Start,
                (Escape::Start, b'[') => Escape::Csi,
                (Escape::Start, b']') => Escape::Osc,
                (Escape::Start, _) => Escape::None,
                (Escape::Csi, 0x40..=0x7e) => Escape::None,
                (Escape::Csi, _) => Escape::Csi,
                (Escape::Osc, 0x07) => Escape::None,
                (Escape::Osc, _) => Escape::Osc,
                (Escape::None, b'\n' | b'\t') | (Escape::None, 0x20..=0x7e | 0x80..) => {
                    out.push(b);
                    Escape::None
                }
                (Escape::None, _) => Escape::None,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_text_twice_needs_two_occurrences() {
        let console = ConsoleBuffer::default();
        console.push(b"boot\nlogin: ");
        let mut cursor = 0;
        let short = Duration::from_millis(50);
        assert!(matches!(console.wait_for(b"login:", &mut cursor, short), Found::Line(l) if l == "login: "));
        assert!(matches!(console.wait_for(b"login:", &mut cursor, short), Found::TimedOut));
        console.push(b"\nwrong\nlogin: ");
        assert!(matches!(console.wait_for(b"login:", &mut cursor, short), Found::Line(_)));
    }

    #[test]
    fn a_waiter_wakes_on_new_output_and_on_close() {
        let console = ConsoleBuffer::default();
        let writer = console.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            writer.push(b"abc cloister: ready\r\nnext");
            writer.close();
        });
        let mut cursor = 0;
        match console.wait_for(b"ready", &mut cursor, Duration::from_secs(10)) {
            Found::Line(line) => assert_eq!(line, "abc cloister: ready"),
            _ => panic!("not found"),
        }
        t.join().unwrap();
        assert!(matches!(console.wait_for(b"never", &mut cursor, Duration::from_secs(10)), Found::Closed));
    }

    #[test]
    fn escapes_are_removed_from_lines_and_tails() {
        // As OVMF's shell echoes "echo hi": a cursor move around every key.
        let raw = b"\x1b[2J\x1b[01;01H\x1b[1m\x1b[33mShell> \x1b[0m\x1b[08;08He\x1b[08;09Hc\x1b[08;10Hh\x1b[08;11Ho \x1b[08;13Hhi\r\nhi\r\n";
        let console = ConsoleBuffer::default();
        // Split inside an escape sequence, as two reads may.
        console.push(&raw[..30]);
        console.push(&raw[30..]);
        let mut cursor = 0;
        match console.wait_for(b"echo hi", &mut cursor, Duration::ZERO) {
            Found::Line(line) => assert_eq!(line, "Shell> echo hi"),
            _ => panic!("echo not found in {:?}", console.tail()),
        }
        let many: Vec<u8> = (0..100).flat_map(|i| format!("line {i}\r\n").into_bytes()).collect();
        let t = tail(&many, 40);
        assert!(t.starts_with("line 60\n") && t.ends_with("line 99"), "{t}");
    }
}
