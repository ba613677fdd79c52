//! Direct I/O (`O_DIRECT`) beside a file's buffered descriptor. The encryption's writes and the
//! read-back for the image's hashes go between reused buffers of ours and the device instead of
//! through fresh page-cache pages, which are slow to come by on this VM (the host takes free
//! memory back) and which buffered writers of one file fill one at a time (the inode lock).

use std::fs::File;

use zeroize::Zeroizing;

/// What `O_DIRECT` asks of buffers, offsets and lengths: the logical block size of the disks
/// here, and the LUKS sector.
pub const ALIGN: usize = 4096;

#[derive(Clone, Copy)]
pub enum Access {
    Read,
    Write,
}

/// A second descriptor for `file`'s inode with `O_DIRECT`, through `/proc/self/fd`: a new open
/// file description, so the buffered one keeps its flags. `None` where the file system has no
/// direct I/O (tmpfs before Linux 6.6) or /proc is missing: callers go through the page cache.
pub fn reopen(file: &File, access: Access) -> Option<File> {
    use rustix::fs::{Mode, OFlags};
    use std::os::fd::AsRawFd;
    let mode = match access {
        Access::Read => OFlags::RDONLY,
        Access::Write => OFlags::WRONLY,
    };
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let fd = rustix::fs::open(path.as_str(), mode | OFlags::DIRECT | OFlags::CLOEXEC, Mode::empty());
    fd.ok().map(File::from)
}

/// Whether a direct transfer of `buf` at `offset` meets [`ALIGN`].
pub fn aligned(buf: &[u8], offset: u64) -> bool {
    offset.is_multiple_of(ALIGN as u64)
        && buf.len().is_multiple_of(ALIGN)
        && (buf.as_ptr() as usize).is_multiple_of(ALIGN)
}

/// Whether an error is the kernel refusing direct I/O for this file or transfer (then the
/// page cache takes it).
pub fn refused(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
}

/// A buffer of `len` bytes starting at an [`ALIGN`] boundary, wiped when dropped (it may hold
/// plaintext on its way to the cipher).
pub struct AlignedBuf {
    bytes: Zeroizing<Vec<u8>>,
    skip: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let bytes = Zeroizing::new(vec![0u8; len + ALIGN]);
        let skip = bytes.as_ptr().align_offset(ALIGN);
        Self { bytes, skip, len }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[self.skip..self.skip + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes[self.skip..self.skip + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn buffers_start_aligned_and_have_their_length() {
        for len in [ALIGN, 3 * ALIGN, 8 << 20] {
            let mut buf = AlignedBuf::new(len);
            assert_eq!(buf.as_mut_slice().len(), len);
            assert!(aligned(buf.as_slice(), 0));
            assert!(!aligned(buf.as_slice(), 512), "the offset counts too");
            assert!(!aligned(&buf.as_slice()[1..], 0), "so does the address");
        }
    }

    /// Where direct I/O works (ext4, xfs; not tmpfs before 6.6) bytes written through the
    /// second descriptor are what the first reads back; only on tmpfs may there be no second
    /// one.
    #[test]
    fn a_direct_write_reads_back_through_the_buffered_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(4 * ALIGN as u64).unwrap();
        let Some(direct) = reopen(&file, Access::Write) else {
            const TMPFS_MAGIC: u64 = 0x0102_1994;
            let on = rustix::fs::fstatfs(&file).unwrap().f_type as u64;
            assert_eq!(on, TMPFS_MAGIC, "no direct I/O, and not on tmpfs: f_type {on:#x}");
            return;
        };
        let mut buf = AlignedBuf::new(2 * ALIGN);
        buf.as_mut_slice().fill(0xa5);
        direct.write_all_at(buf.as_slice(), ALIGN as u64).unwrap();
        let mut back = vec![0u8; 4 * ALIGN];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back[..ALIGN].iter().all(|&b| b == 0));
        assert!(back[ALIGN..3 * ALIGN].iter().all(|&b| b == 0xa5));
        assert!(back[3 * ALIGN..].iter().all(|&b| b == 0));
        let reader = reopen(&file, Access::Read).expect("read access where write access works");
        let mut again = AlignedBuf::new(4 * ALIGN);
        reader.read_exact_at(again.as_mut_slice(), 0).unwrap();
        assert_eq!(again.as_slice(), &back[..]);
    }
}
