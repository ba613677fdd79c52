//! Bounded IRC line framing: splits a byte stream into lines the way ngircd 26.1 does (CR LF, a
//! lone CR and a lone LF each end a line; empty lines are skipped), so the gate and ngircd never
//! disagree on where one command ends and the next begins, and no line grows past a limit.

use std::io::{self, Read};

/// One item read from a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    /// A line without its terminator, at most `max` bytes.
    Line(Vec<u8>),
    /// A line longer than `max`; the reader skips the rest of it on the next call.
    TooLong,
}

/// Splits a stream into bounded lines; keeps at most `max` bytes of a pending line.
pub struct LineReader<R> {
    inner: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    line: Vec<u8>,
    max: usize,
    skipping: bool,
}

impl<R: Read> LineReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        LineReader {
            inner,
            buf: vec![0; 4096].into_boxed_slice(),
            start: 0,
            end: 0,
            line: Vec::new(),
            max,
            skipping: false,
        }
    }

    /// The next line, `TooLong`, or `None` at end of stream (a partial last line is discarded:
    /// ngircd would not run it either).
    pub fn next_item(&mut self) -> io::Result<Option<Item>> {
        loop {
            if self.start == self.end {
                let n = self.inner.read(&mut self.buf)?;
                if n == 0 {
                    return Ok(None);
                }
                self.start = 0;
                self.end = n;
            }
            if let Some(item) = self.scan() {
                return Ok(Some(item));
            }
        }
    }

    /// Consumes buffered bytes until a line is complete or the buffer is empty.
    fn scan(&mut self) -> Option<Item> {
        while self.start < self.end {
            let byte = self.buf[self.start];
            self.start += 1;
            if byte == b'\r' || byte == b'\n' {
                let was_skipping = std::mem::replace(&mut self.skipping, false);
                if !was_skipping && !self.line.is_empty() {
                    return Some(Item::Line(std::mem::take(&mut self.line)));
                }
                continue;
            }
            if self.skipping {
                continue;
            }
            if self.line.len() == self.max {
                self.line.clear();
                self.skipping = true;
                return Some(Item::TooLong);
            }
            self.line.push(byte);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(input: &[u8], max: usize) -> Vec<Item> {
        let mut reader = LineReader::new(input, max);
        let mut out = Vec::new();
        while let Some(item) = reader.next_item().unwrap() {
            out.push(item);
        }
        out
    }

    fn line(s: &str) -> Item {
        Item::Line(s.as_bytes().to_vec())
    }

    #[test]
    fn crlf_cr_and_lf_each_end_a_line_like_ngircd() {
        assert_eq!(items(b"A\r\nB\rC\nD\r\n", 10), vec![line("A"), line("B"), line("C"), line("D")]);
    }

    #[test]
    fn empty_lines_are_skipped() {
        assert_eq!(items(b"\r\n\r\nA\r\n\n", 10), vec![line("A")]);
    }

    #[test]
    fn a_line_of_exactly_max_bytes_passes() {
        assert_eq!(items(b"12345\r\n", 5), vec![line("12345")]);
    }

    #[test]
    fn a_longer_line_is_reported_once_and_skipped() {
        assert_eq!(items(b"123456789\r\nok\r\n", 5), vec![Item::TooLong, line("ok")]);
    }

    #[test]
    fn partial_last_line_is_not_returned() {
        assert_eq!(items(b"A\r\nPART", 10), vec![line("A")]);
    }

    #[test]
    fn lines_split_across_reads_are_joined() {
        let chained = (&b"PRIV"[..]).chain(&b"MSG x :hi\r\n"[..]);
        let mut reader = LineReader::new(chained, 100);
        assert_eq!(reader.next_item().unwrap(), Some(line("PRIVMSG x :hi")));
        assert_eq!(reader.next_item().unwrap(), None);
    }
}
