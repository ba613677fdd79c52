//! A minimal GPT reader: the unique GUID (PARTUUID) of each partition of a disk. The kernel does
//! not put PARTUUID in sysfs on 6.1 and the initramfs has no blkid, so we read the primary
//! header and entry array ourselves. Pure parsing over byte slices.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GptError {
    #[error("no gpt signature")]
    NoSignature,
    #[error("gpt header too short")]
    Short,
    #[error("gpt entry array of {count} entries of {size} bytes is unreasonable")]
    BadArray { count: u32, size: u32 },
}

/// Where the entries are, from the header at LBA 1.
#[derive(Debug, PartialEq, Eq)]
pub struct Header {
    pub entries_lba: u64,
    pub count: u32,
    pub entry_size: u32,
}

impl Header {
    pub fn array_bytes(&self) -> usize {
        self.count as usize * self.entry_size as usize
    }
}

/// One used partition entry; `number` counts from 1 like the kernel's `partition` file.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    pub number: u32,
    pub partuuid: String,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Parses the header sector (LBA 1).
pub fn parse_header(sector: &[u8]) -> Result<Header, GptError> {
    if sector.len() < 92 {
        return Err(GptError::Short);
    }
    if &sector[0..8] != b"EFI PART" {
        return Err(GptError::NoSignature);
    }
    let header =
        Header { entries_lba: le_u64(sector, 72), count: le_u32(sector, 80), entry_size: le_u32(sector, 84) };
    if header.entry_size < 128 || header.count > 1024 || header.array_bytes() > 1 << 20 {
        return Err(GptError::BadArray { count: header.count, size: header.entry_size });
    }
    Ok(header)
}

/// GUIDs are stored mixed-endian: the first three fields little-endian.
pub fn format_guid(g: &[u8]) -> String {
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        g[3], g[2], g[1], g[0], g[5], g[4], g[7], g[6], g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]
    )
}

/// The used entries (type GUID not all zero) of an entry array.
pub fn parse_entries(header: &Header, array: &[u8]) -> Vec<Entry> {
    let size = header.entry_size as usize;
    array
        .chunks_exact(size)
        .take(header.count as usize)
        .zip(1u32..)
        .filter(|(e, _)| e[0..16].iter().any(|&b| b != 0))
        .map(|(e, number)| Entry { number, partuuid: format_guid(&e[16..32]) })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use std::path::Path;
    use std::process::{Command, Stdio};

    /// Writes a partition table into `img` with util-linux's sfdisk (an independent writer).
    pub(crate) fn sfdisk(img: &Path, script: &str) {
        let mut child = Command::new("sfdisk")
            .arg("--quiet")
            .arg(img)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
    }

    #[test]
    fn guid_bytes_are_mixed_endian() {
        let raw =
            [0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4];
        assert_eq!(format_guid(&raw), "0fc63daf-8483-4772-8e79-3d69d8477de4");
    }

    #[test]
    fn non_gpt_sector_is_refused() {
        assert_eq!(parse_header(&[0u8; 512]), Err(GptError::NoSignature));
        assert_eq!(parse_header(b"EFI PART"), Err(GptError::Short));
    }

    /// Round trip through sfdisk: the uuids we read are the ones sfdisk wrote.
    #[test]
    fn reads_partuuids_written_by_sfdisk() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
        let script = "label: gpt\n\
            start=2048, size=4096, type=U, uuid=11111111-2222-4333-8444-555555555555\n\
            start=6144, size=4096, type=L, uuid=AAAAAAAA-BBBB-4CCC-8DDD-EEEEEEEEEEEE\n";
        sfdisk(&img, script);

        let bytes = std::fs::read(&img).unwrap();
        let header = parse_header(&bytes[512..1024]).unwrap();
        assert_eq!(header, Header { entries_lba: 2, count: 128, entry_size: 128 });
        let start = header.entries_lba as usize * 512;
        let entries = parse_entries(&header, &bytes[start..start + header.array_bytes()]);
        assert_eq!(
            entries,
            vec![
                Entry { number: 1, partuuid: "11111111-2222-4333-8444-555555555555".into() },
                Entry { number: 2, partuuid: "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee".into() },
            ]
        );
    }
}
