//! Bounded line reading from the terminal or from the session socket: whatever arrives, a line
//! never holds more than its bound in memory, and a line is either clean printable ASCII or rejected
//! as a whole.
//!
//! The reader works in two steps so that the caller can `poll` between them: `next_buffered` hands
//! out lines already read, `fill` performs exactly one `read`. It never blocks on its own, so a
//! signal or the idle timeout is never stuck behind a half-typed line.

use std::io::{self, Read};

use zeroize::Zeroize;

/// The longest command or password line, without its line end.
pub const MAX_TERMINAL_LINE: usize = 256;

/// Bytes taken from the source in one `read`; also the reader's only other buffer.
const CHUNK: usize = 512;

/// One line of input, or the reason it was rejected.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line of printable ASCII (tab allowed), its line end (`\n` or `\r\n`) removed.
    Text(String),
    /// The line was longer than the bound; all of it was dropped.
    TooLong,
    /// The line held a control character, DEL or a non-ASCII byte; all of it was dropped.
    Invalid,
    /// The source ended. An unterminated last line is dropped rather than acted on.
    Eof,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reject {
    TooLong,
    Invalid,
}

/// A line reader over any `Read` whose memory use does not depend on its input.
pub struct LineReader<R> {
    inner: R,
    max: usize,
    chunk: [u8; CHUNK],
    start: usize,
    end: usize,
    line: Vec<u8>,
    reject: Option<Reject>,
    eof: bool,
}

impl<R: Read> LineReader<R> {
    /// A reader whose lines hold at most `max` bytes (plus a final `\r` that is removed).
    pub fn new(inner: R, max: usize) -> Self {
        LineReader {
            inner,
            max,
            chunk: [0; CHUNK],
            start: 0,
            end: 0,
            line: Vec::with_capacity(max + 1),
            reject: None,
            eof: false,
        }
    }

    /// The source, for polling it or writing to it.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The next line among the bytes already read, without reading more.
    pub fn next_buffered(&mut self) -> Option<Line> {
        while self.start < self.end {
            let byte = self.chunk[self.start];
            self.start += 1;
            if byte == b'\n' {
                return Some(self.finish());
            }
            self.push(byte);
        }
        if self.eof {
            self.discard();
            return Some(Line::Eof);
        }
        None
    }

    /// Reads once from the source (retrying only on EINTR) and returns how many bytes came; 0
    /// means the source ended. Does nothing while unprocessed bytes remain.
    pub fn fill(&mut self) -> io::Result<usize> {
        if self.start < self.end || self.eof {
            return Ok(0);
        }
        // Passwords pass through this buffer: wipe what was processed before reusing it.
        self.chunk.zeroize();
        self.start = 0;
        self.end = 0;
        let count = loop {
            match self.inner.read(&mut self.chunk) {
                Ok(count) => break count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            }
        };
        self.end = count;
        self.eof = count == 0;
        Ok(count)
    }

    /// Blocks until a whole line (or the end) is read; for sources that need no polling.
    #[cfg(test)]
    pub fn read_line(&mut self) -> io::Result<Line> {
        loop {
            if let Some(line) = self.next_buffered() {
                return Ok(line);
            }
            self.fill()?;
        }
    }

    fn push(&mut self, byte: u8) {
        if self.reject.is_some() {
            return;
        }
        if !allowed(byte) {
            self.reject_line(Reject::Invalid);
            return;
        }
        // One byte past the bound is room for the `\r` of a `\r\n` line end.
        let full = self.line.len() > self.max || (self.line.len() == self.max && byte != b'\r');
        if full {
            self.reject_line(Reject::TooLong);
            return;
        }
        self.line.push(byte);
    }

    fn reject_line(&mut self, reject: Reject) {
        self.reject = Some(reject);
        self.discard();
    }

    fn finish(&mut self) -> Line {
        if let Some(reject) = self.reject.take() {
            self.discard();
            return match reject {
                Reject::TooLong => Line::TooLong,
                Reject::Invalid => Line::Invalid,
            };
        }
        if self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        if self.line.len() > self.max {
            self.discard();
            return Line::TooLong;
        }
        // Every byte is ASCII (checked by `allowed`), so each maps to one char.
        let text = self.line.iter().map(|&byte| char::from(byte)).collect();
        self.discard();
        Line::Text(text)
    }

    fn discard(&mut self) {
        self.line.as_mut_slice().zeroize();
        self.line.clear();
    }
}

/// Printable ASCII, tab, and CR (which ends a `\r\n` line or counts as blank space).
fn allowed(byte: u8) -> bool {
    byte == b'\t' || byte == b'\r' || (0x20..0x7f).contains(&byte)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source that returns its data in reads of at most `step` bytes, counting the bytes.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        step: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let count = buf.len().min(self.step).min(self.data.len() - self.pos);
            buf[..count].copy_from_slice(&self.data[self.pos..self.pos + count]);
            self.pos += count;
            Ok(count)
        }
    }

    fn lines(input: &[u8], step: usize) -> Vec<Line> {
        let mut reader = LineReader::new(Trickle { data: input.to_vec(), pos: 0, step }, MAX_TERMINAL_LINE);
        let mut out = Vec::new();
        loop {
            let line = reader.read_line().unwrap();
            let end = line == Line::Eof;
            out.push(line);
            if end {
                return out;
            }
        }
    }

    fn text(s: &str) -> Line {
        Line::Text(s.to_string())
    }

    #[test]
    fn splits_lines_across_reads_of_any_size() {
        for step in [1, 3, 512, 4096] {
            assert_eq!(lines(b"help\nchat\n\n", step), vec![text("help"), text("chat"), text(""), Line::Eof]);
        }
    }

    #[test]
    fn crlf_line_end_is_removed_and_bare_cr_kept() {
        assert_eq!(lines(b"help\r\na\rb\n", 7), vec![text("help"), text("a\rb"), Line::Eof]);
    }

    #[test]
    fn line_at_the_bound_is_kept_one_past_is_dropped() {
        let mut input = vec![b'a'; 256];
        input.extend_from_slice(b"\r\n");
        input.extend(vec![b'b'; 257]);
        input.extend_from_slice(b"\nhelp\n");
        let got = lines(&input, 100);
        assert_eq!(got, vec![text(&"a".repeat(256)), Line::TooLong, text("help"), Line::Eof]);
    }

    #[test]
    fn cr_cannot_smuggle_an_extra_byte() {
        let mut input = vec![b'a'; 256];
        input.extend_from_slice(b"\r\r\n");
        assert_eq!(lines(&input, 512), vec![Line::TooLong, Line::Eof]);
    }

    #[test]
    fn megabyte_line_is_dropped_without_growing_the_buffer() {
        let mut input = vec![b'x'; 1 << 20];
        input.extend_from_slice(b"\nhelp\n");
        let mut reader = LineReader::new(Trickle { data: input, pos: 0, step: 4096 }, MAX_TERMINAL_LINE);
        assert_eq!(reader.read_line().unwrap(), Line::TooLong);
        assert!(reader.line.capacity() <= MAX_TERMINAL_LINE + 1, "capacity {}", reader.line.capacity());
        assert_eq!(reader.read_line().unwrap(), text("help"));
    }

    #[test]
    fn control_characters_del_and_non_ascii_reject_the_whole_line() {
        for bad in [&b"he\x1b[2Jlp\n"[..], b"a\x00b\n", b"\x7f\n", "caf\u{e9}\n".as_bytes(), b"x\x08\n"] {
            let mut input = bad.to_vec();
            input.extend_from_slice(b"help\n");
            assert_eq!(lines(&input, 2), vec![Line::Invalid, text("help"), Line::Eof], "{bad:?}");
        }
    }

    #[test]
    fn tab_is_allowed() {
        assert_eq!(lines(b"a\tb\n", 512), vec![text("a\tb"), Line::Eof]);
    }

    #[test]
    fn invalid_then_long_line_reports_the_first_problem() {
        let mut input = b"\x01".to_vec();
        input.extend(vec![b'a'; 1000]);
        input.push(b'\n');
        assert_eq!(lines(&input, 64), vec![Line::Invalid, Line::Eof]);
    }

    #[test]
    fn unterminated_last_line_is_dropped_at_eof() {
        assert_eq!(lines(b"help\npass", 3), vec![text("help"), Line::Eof]);
        assert_eq!(lines(b"", 3), vec![Line::Eof]);
    }

    #[test]
    fn eof_is_sticky() {
        let mut reader = LineReader::new(Trickle { data: Vec::new(), pos: 0, step: 1 }, 8);
        assert_eq!(reader.read_line().unwrap(), Line::Eof);
        assert_eq!(reader.read_line().unwrap(), Line::Eof);
    }

    #[test]
    fn fill_reads_once_and_next_buffered_never_reads() {
        let mut reader = LineReader::new(Trickle { data: b"ab\ncd\n".to_vec(), pos: 0, step: 4 }, 8);
        assert_eq!(reader.next_buffered(), None);
        assert_eq!(reader.fill().unwrap(), 4);
        assert_eq!(reader.next_buffered(), Some(text("ab")));
        assert_eq!(reader.next_buffered(), None);
        assert_eq!(reader.fill().unwrap(), 2);
        assert_eq!(reader.next_buffered(), Some(text("cd")));
    }
}
