//! The image's block map, `disk.img.bmap`: which 4 KiB blocks of the sparse image hold data,
//! with a SHA256 per range, in bmaptool's XML format version 2.0 (so `bmaptool copy` can flash
//! our images too). Data ranges come from the file system's own extent map (`SEEK_DATA` /
//! `SEEK_HOLE`), not from scanning for zeros: a hole is what the assembly never wrote.
//!
//! `cargo xtask flash` reads the map with [`read_bmap`]. This is a crate of its own, with no
//! native library, because xtask must build on a bare machine: it depends on this crate, never
//! on cloister-image (which links libcryptsetup and OpenSSL).
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// bmaptool's default, and the page size: the granularity at which holes are worth keeping.
pub const BLOCK_SIZE: u64 = 4096;
const VERSION: &str = "2.0";
const HASH_CHUNK: usize = 1024 * 1024;
/// The placeholder the file checksum is computed over (bmaptool's rule).
const ZERO_SUM: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One run of mapped blocks, `first..=last`, with the SHA256 of its bytes in the image (the
/// last block is cut at the image's end when the size is not a multiple of the block size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BmapRange {
    pub first: u64,
    pub last: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bmap {
    pub image_size: u64,
    pub block_size: u64,
    pub blocks_count: u64,
    pub mapped_blocks: u64,
    /// Sorted, disjoint, not adjacent.
    pub ranges: Vec<BmapRange>,
}

#[derive(Debug, thiserror::Error)]
pub enum BmapError {
    #[error("read image {path}: {source}")]
    ReadImage { path: PathBuf, source: io::Error },
    #[error("write block map {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("read block map {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("block map {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl Bmap {
    /// Byte offset and length of a range in the image.
    pub fn byte_span(&self, r: &BmapRange) -> (u64, u64) {
        let start = r.first * self.block_size;
        let end = ((r.last + 1) * self.block_size).min(self.image_size);
        (start, end - start)
    }

    pub fn mapped_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| self.byte_span(r).1).sum()
    }

    /// The byte spans of the image's extent that no range covers, in order.
    pub fn unmapped_spans(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = 0;
        for r in &self.ranges {
            let (start, len) = self.byte_span(r);
            if start > at {
                out.push((at, start - at));
            }
            at = start + len;
        }
        if self.image_size > at {
            out.push((at, self.image_size - at));
        }
        out
    }

    /// The XML text, with its `BmapFileChecksum` filled in.
    pub fn to_xml(&self) -> String {
        let text = self.xml_with_sum(ZERO_SUM);
        let sum = format!("{:x}", Sha256::digest(text.as_bytes()));
        self.xml_with_sum(&sum)
    }

    fn xml_with_sum(&self, sum: &str) -> String {
        let mut s = String::new();
        let pct = if self.blocks_count == 0 {
            0.0
        } else {
            100.0 * self.mapped_blocks as f64 / self.blocks_count as f64
        };
        let _ = write!(
            s,
            "<?xml version=\"1.0\" ?>\n\
             <!-- Block map of a Cloister disk image: the blocks that hold data, with a SHA256 per\n     \
             range. Written by cloister-image; readable by bmaptool (`bmaptool copy`). -->\n\
             <bmap version=\"{VERSION}\">\n    \
             <!-- Image size in bytes: {:.1} MiB -->\n    \
             <ImageSize> {} </ImageSize>\n    \
             <BlockSize> {} </BlockSize>\n    \
             <BlocksCount> {} </BlocksCount>\n    \
             <!-- Mapped: {:.1}% -->\n    \
             <MappedBlocksCount> {} </MappedBlocksCount>\n    \
             <ChecksumType> sha256 </ChecksumType>\n    \
             <BmapFileChecksum> {sum} </BmapFileChecksum>\n    \
             <BlockMap>\n",
            self.image_size as f64 / 1048576.0,
            self.image_size,
            self.block_size,
            self.blocks_count,
            pct,
            self.mapped_blocks,
        );
        for r in &self.ranges {
            let span =
                if r.first == r.last { r.first.to_string() } else { format!("{}-{}", r.first, r.last) };
            let _ = writeln!(s, "        <Range chksum=\"{}\"> {span} </Range>", r.sha256);
        }
        s.push_str("    </BlockMap>\n</bmap>\n");
        s
    }
}

/// Maps `image`'s data blocks, hashes each range, and writes the map to `out` (temp file,
/// fsync, rename, directory fsync: `out` never holds a partial map).
pub fn write_bmap(image: &Path, out: &Path) -> Result<Bmap, BmapError> {
    let read_err = |source| BmapError::ReadImage { path: image.into(), source };
    let file = File::open(image).map_err(read_err)?;
    let bmap = map_image(&file).map_err(read_err)?;
    save_bmap(&bmap, out)?;
    Ok(bmap)
}

/// The block map of an open image: its data ranges (`SEEK_DATA`/`SEEK_HOLE`), each hashed.
pub fn map_image(file: &File) -> io::Result<Bmap> {
    let mut mapper = Mapper::new(file)?;
    let mut buf = vec![0u8; HASH_CHUNK];
    for (start, len) in mapper.spans() {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(HASH_CHUNK as u64) as usize;
            file.read_exact_at(&mut buf[..n], start + done)?;
            mapper.feed(start + done, &buf[..n]);
            done += n as u64;
        }
    }
    mapper.finish()
}

/// A block map made from the image's bytes as a caller reads them, so that one read of the
/// image can serve this and other hashes too: [`Mapper::new`] finds the data ranges, each
/// [`Mapper::feed`] hashes what of them it is given (in order, from the start of each range),
/// [`Mapper::finish`] checks that every range was fed whole.
pub struct Mapper {
    image_size: u64,
    blocks: Vec<(u64, u64)>,
    /// The first range of `blocks` not finished yet, and its hash so far.
    next: usize,
    hasher: Sha256,
    hashed: Vec<BmapRange>,
}

impl Mapper {
    pub fn new(file: &File) -> io::Result<Self> {
        let image_size = file.metadata()?.len();
        let blocks = data_blocks(file, image_size)?;
        Ok(Self { image_size, blocks, next: 0, hasher: Sha256::new(), hashed: Vec::new() })
    }

    /// The byte spans (offset, length) that hold data: what [`Mapper::feed`] needs.
    pub fn spans(&self) -> Vec<(u64, u64)> {
        self.blocks.iter().map(|&b| self.span(b)).map(|(start, end)| (start, end - start)).collect()
    }

    fn span(&self, (first, last): (u64, u64)) -> (u64, u64) {
        (first * BLOCK_SIZE, ((last + 1) * BLOCK_SIZE).min(self.image_size))
    }

    /// The image's bytes at `offset`; bytes outside the data ranges are passed over.
    pub fn feed(&mut self, offset: u64, bytes: &[u8]) {
        let end = offset + bytes.len() as u64;
        while let Some(&range) = self.blocks.get(self.next) {
            let (start, stop) = self.span(range);
            if start >= end {
                break;
            }
            let (lo, hi) = (start.max(offset), stop.min(end));
            if lo < hi {
                self.hasher.update(&bytes[(lo - offset) as usize..(hi - offset) as usize]);
            }
            if stop > end {
                break;
            }
            let sha256 = format!("{:x}", std::mem::take(&mut self.hasher).finalize());
            self.hashed.push(BmapRange { first: range.0, last: range.1, sha256 });
            self.next += 1;
        }
    }

    /// The map; an error if the image ended (was fed) before its last data range did.
    pub fn finish(self) -> io::Result<Bmap> {
        if self.next < self.blocks.len() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "image ended inside a data range"));
        }
        let blocks_count = self.image_size.div_ceil(BLOCK_SIZE);
        let mapped_blocks = self.hashed.iter().map(|r| r.last - r.first + 1).sum();
        Ok(Bmap {
            image_size: self.image_size,
            block_size: BLOCK_SIZE,
            blocks_count,
            mapped_blocks,
            ranges: self.hashed,
        })
    }
}

/// Writes `bmap` to `out` (temp file, fsync, rename, directory fsync: `out` never holds a
/// partial map).
pub fn save_bmap(bmap: &Bmap, out: &Path) -> Result<(), BmapError> {
    write_atomically(out, bmap.to_xml().as_bytes())
        .map_err(|source| BmapError::Write { path: out.into(), source })
}

/// Block ranges (inclusive) that hold data, widened to whole blocks and merged.
fn data_blocks(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{seek, SeekFrom};
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut at = 0;
    while at < size {
        let start = match seek(file, SeekFrom::Data(at)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = match seek(file, SeekFrom::Hole(start)) {
            Ok(e) => e.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(e) => return Err(e.into()),
        };
        if end <= start {
            break;
        }
        let (first, last) = (start / BLOCK_SIZE, (end - 1) / BLOCK_SIZE);
        match out.last_mut() {
            Some(prev) if first <= prev.1 + 1 => prev.1 = prev.1.max(last),
            _ => out.push((first, last)),
        }
        at = end;
    }
    Ok(out)
}

fn write_atomically(out: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    let tmp = out.with_file_name(name);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, out)?;
        let dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads and checks a block map: format 2.x with sha256, the file's own checksum, and ranges
/// that are sorted, disjoint, inside the image and add up to `MappedBlocksCount`.
pub fn read_bmap(path: &Path) -> Result<Bmap, BmapError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| BmapError::Read { path: path.into(), source })?;
    parse(&text).map_err(|reason| BmapError::Invalid { path: path.into(), reason })
}

fn parse(text: &str) -> Result<Bmap, String> {
    let body = strip_comments(text);
    let version = attr(&body, "<bmap", "version").ok_or("no <bmap version=...> element")?;
    if version.split('.').next() != Some("2") {
        return Err(format!("format version {version} is not supported (only 2.x)"));
    }
    let num = |tag: &str| -> Result<u64, String> {
        let v = element(&body, tag).ok_or(format!("no <{tag}>"))?;
        v.parse().map_err(|_| format!("<{tag}> is not a number: {v:?}"))
    };
    let (image_size, block_size) = (num("ImageSize")?, num("BlockSize")?);
    let (blocks_count, mapped_blocks) = (num("BlocksCount")?, num("MappedBlocksCount")?);
    if element(&body, "ChecksumType") != Some("sha256") {
        return Err("checksum type is not sha256".into());
    }
    check_file_sum(text, element(&body, "BmapFileChecksum").ok_or("no <BmapFileChecksum>")?)?;
    if block_size == 0 || block_size % 512 != 0 || blocks_count != image_size.div_ceil(block_size) {
        return Err(format!(
            "block size {block_size} and count {blocks_count} do not fit {image_size} bytes"
        ));
    }
    let ranges = parse_ranges(&body)?;
    let mut next = 0;
    for r in &ranges {
        if r.first < next || r.last < r.first || r.last >= blocks_count {
            return Err(format!("range {}-{} is out of order or outside the image", r.first, r.last));
        }
        next = r.last + 1;
    }
    let sum: u64 = ranges.iter().map(|r| r.last - r.first + 1).sum();
    if sum != mapped_blocks {
        return Err(format!("ranges hold {sum} blocks, MappedBlocksCount says {mapped_blocks}"));
    }
    Ok(Bmap { image_size, block_size, blocks_count, mapped_blocks, ranges })
}

/// bmaptool's rule: SHA256 of the file with the checksum's text replaced by zeros.
fn check_file_sum(text: &str, sum: &str) -> Result<(), String> {
    if sum.len() != 64 || !sum.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("bmap file checksum {sum:?} is not a sha256"));
    }
    let zeroed = text.replacen(sum, ZERO_SUM, 1);
    let actual = format!("{:x}", Sha256::digest(zeroed.as_bytes()));
    if !actual.eq_ignore_ascii_case(sum) {
        return Err(format!("bmap file checksum mismatch: file says {sum}, contents hash to {actual}"));
    }
    Ok(())
}

fn parse_ranges(body: &str) -> Result<Vec<BmapRange>, String> {
    let map = body.split_once("<BlockMap>").ok_or("no <BlockMap>")?.1;
    let map = map.split_once("</BlockMap>").ok_or("no </BlockMap>")?.0;
    let mut out = Vec::new();
    for piece in map.split("<Range").skip(1) {
        let (head, rest) = piece.split_once('>').ok_or("unterminated <Range")?;
        let span = rest.split_once("</Range>").ok_or("unterminated <Range>")?.0.trim();
        let sha256 = attr(&format!("<Range{head}>"), "<Range", "chksum")
            .ok_or(format!("range {span} has no chksum"))?
            .to_ascii_lowercase();
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("range {span}: chksum is not a sha256"));
        }
        let bad = || format!("range {span:?} is not N or N-M");
        let (first, last) = match span.split_once('-') {
            Some((a, b)) => (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?),
            None => {
                let n = span.parse().map_err(|_| bad())?;
                (n, n)
            }
        };
        out.push(BmapRange { first, last, sha256 });
    }
    Ok(out)
}

fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("<!--") {
        out.push_str(&rest[..i]);
        rest = rest[i..].split_once("-->").map(|(_, r)| r).unwrap_or("");
    }
    out.push_str(rest);
    out
}

/// The trimmed text of the first `<tag> ... </tag>`.
fn element<'a>(body: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = body.find(&open)? + open.len();
    let len = body[start..].find(&close)?;
    Some(body[start..start + len].trim())
}

/// The value of `name="..."` (or single quotes) in the first element that starts with `open`.
fn attr<'a>(body: &'a str, open: &str, name: &str) -> Option<&'a str> {
    let start = body.find(open)?;
    let head = &body[start..start + body[start..].find('>')?];
    let after = &head[head.find(&format!("{name}="))? + name.len() + 1..];
    let quote = after.chars().next().filter(|c| *c == '"' || *c == '\'')?;
    let value = &after[1..];
    Some(&value[..value.find(quote)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sparse file: data at block 0, blocks 5-6 and a short last block, holes between.
    fn sparse_image(dir: &Path) -> File {
        let path = dir.join("img");
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(64 * BLOCK_SIZE + 100).unwrap();
        file.write_all_at(&[1u8; 4096], 0).unwrap();
        file.write_all_at(&[2u8; 6000], 5 * BLOCK_SIZE).unwrap();
        file.write_all_at(&[3u8; 100], 64 * BLOCK_SIZE).unwrap();
        file
    }

    #[test]
    fn a_mapper_fed_the_whole_image_in_odd_pieces_maps_what_map_image_does() {
        let dir = tempfile::tempdir().unwrap();
        let file = sparse_image(dir.path());
        let expected = map_image(&file).unwrap();
        assert!(expected.ranges.len() >= 2, "{:?}", expected.ranges);
        let mut mapper = Mapper::new(&file).unwrap();
        let size = file.metadata().unwrap().len();
        let mut at = 0;
        while at < size {
            let mut piece = vec![0u8; (size - at).min(3000) as usize];
            file.read_exact_at(&mut piece, at).unwrap();
            mapper.feed(at, &piece);
            at += piece.len() as u64;
        }
        let got = mapper.finish().unwrap();
        assert_eq!(got.ranges, expected.ranges);
        assert_eq!((got.mapped_blocks, got.blocks_count), (expected.mapped_blocks, expected.blocks_count));
        let (start, len) = got.byte_span(&got.ranges[0]);
        let mut first = vec![0u8; len as usize];
        file.read_exact_at(&mut first, start).unwrap();
        assert_eq!(got.ranges[0].sha256, format!("{:x}", Sha256::digest(&first)));
    }

    #[test]
    fn a_mapper_not_fed_to_the_end_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = sparse_image(dir.path());
        let mut mapper = Mapper::new(&file).unwrap();
        mapper.feed(0, &[1u8; 4096]);
        assert_eq!(mapper.finish().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn parse_reads_what_to_xml_writes() {
        let bmap = Bmap {
            image_size: 10 * 4096 + 512,
            block_size: 4096,
            blocks_count: 11,
            mapped_blocks: 4,
            ranges: vec![
                BmapRange { first: 0, last: 2, sha256: "ab".repeat(32) },
                BmapRange { first: 10, last: 10, sha256: "cd".repeat(32) },
            ],
        };
        let xml = bmap.to_xml();
        assert_eq!(parse(&xml).unwrap(), bmap);
        assert_eq!(bmap.byte_span(&bmap.ranges[1]), (40960, 512));
        assert_eq!(bmap.unmapped_spans(), vec![(3 * 4096, 7 * 4096)]);
        assert_eq!(bmap.mapped_bytes(), 3 * 4096 + 512);
    }

    #[test]
    fn a_changed_byte_breaks_the_file_checksum() {
        let bmap = Bmap {
            image_size: 8192,
            block_size: 4096,
            blocks_count: 2,
            mapped_blocks: 1,
            ranges: vec![BmapRange { first: 1, last: 1, sha256: "ab".repeat(32) }],
        };
        let xml = bmap.to_xml().replace("> 1 </Range>", "> 0 </Range>");
        let err = parse(&xml).unwrap_err();
        assert!(err.contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn overlapping_or_miscounted_ranges_are_refused() {
        let mut bmap = Bmap {
            image_size: 8 * 4096,
            block_size: 4096,
            blocks_count: 8,
            mapped_blocks: 5,
            ranges: vec![
                BmapRange { first: 0, last: 3, sha256: "ab".repeat(32) },
                BmapRange { first: 3, last: 3, sha256: "ab".repeat(32) },
            ],
        };
        assert!(parse(&bmap.to_xml()).unwrap_err().contains("out of order"));
        bmap.ranges.pop();
        assert!(parse(&bmap.to_xml()).unwrap_err().contains("MappedBlocksCount"));
    }
}
