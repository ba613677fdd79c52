//! The ioctls PID 1 needs, behind safe functions: for first-boot growth the size of a block
//! device, resizing a partition in the kernel's table (BLKPG), and reading and growing an XFS
//! data section; for the kill switch BLKDISCARD. The structures are `#[repr(C)]` copies of `<linux/blkpg.h>` and xfsprogs'
//! `<xfs/xfs_fs.h>` (package xfslibs-dev); a unit test compiles a C program against those headers
//! and compares sizes, offsets and request numbers, so a drift fails the build's tests rather
//! than a user's first boot.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;

/// `struct blkpg_partition`.
#[repr(C)]
pub struct BlkpgPartition {
    pub start: i64,
    pub length: i64,
    pub pno: i32,
    pub devname: [u8; 64],
    pub volname: [u8; 64],
}

/// `struct blkpg_ioctl_arg`.
#[repr(C)]
pub struct BlkpgIoctlArg {
    pub op: i32,
    pub flags: i32,
    pub datalen: i32,
    pub data: *mut BlkpgPartition,
}

pub const BLKPG_RESIZE_PARTITION: i32 = 3;

/// `struct xfs_fsop_geom_v1` (XFS_IOC_FSGEOMETRY_V1: every kernel answers it).
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct XfsFsopGeomV1 {
    pub blocksize: u32,
    pub rtextsize: u32,
    pub agblocks: u32,
    pub agcount: u32,
    pub logblocks: u32,
    pub sectsize: u32,
    pub inodesize: u32,
    pub imaxpct: u32,
    pub datablocks: u64,
    pub rtblocks: u64,
    pub rtextents: u64,
    pub logstart: u64,
    pub uuid: [u8; 16],
    pub sunit: u32,
    pub swidth: u32,
    pub version: i32,
    pub flags: u32,
    pub logsectsize: u32,
    pub rtsectsize: u32,
    pub dirblocksize: u32,
}

/// `struct xfs_growfs_data`.
#[repr(C)]
pub struct XfsGrowfsData {
    pub newblocks: u64,
    pub imaxpct: u32,
}

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_write_ptr_bad!(blkpg, nix::request_code_none!(0x12, 105), BlkpgIoctlArg);
nix::ioctl_read!(xfs_fsgeometry_v1, b'X', 100, XfsFsopGeomV1);
nix::ioctl_write_ptr!(xfs_growfsdata, b'X', 110, XfsGrowfsData);
nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);

/// The size in bytes of the block device open as `dev`.
pub fn device_bytes(dev: &File) -> nix::Result<u64> {
    let mut bytes = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live local.
    unsafe { blkgetsize64(dev.as_raw_fd(), &mut bytes) }?;
    Ok(bytes)
}

/// Discards `length` bytes from `start` of the block device open as `dev` (BLKDISCARD).
pub fn discard(dev: &File, start: u64, length: u64) -> nix::Result<()> {
    let range = [start, length];
    // SAFETY: BLKDISCARD reads two u64 (start, length) through the pointer, a live local.
    unsafe { blkdiscard(dev.as_raw_fd(), &range) }.map(drop)
}

/// Tells the kernel that partition `pno` of `disk` now spans `length` bytes from `start`.
/// The kernel refuses a change of start or an overlap, so this can only grow in place.
pub fn resize_partition(disk: &File, pno: i32, start: u64, length: u64) -> nix::Result<()> {
    let to_i64 = |v: u64| i64::try_from(v).map_err(|_| nix::errno::Errno::EOVERFLOW);
    let mut part = BlkpgPartition {
        start: to_i64(start)?,
        length: to_i64(length)?,
        pno,
        devname: [0; 64],
        volname: [0; 64],
    };
    let arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as i32,
        data: &mut part,
    };
    // SAFETY: the kernel reads `arg` and the `datalen` bytes `arg.data` points at; both are
    // live locals of the layout <linux/blkpg.h> declares (checked by a test) for the call.
    unsafe { blkpg(disk.as_raw_fd(), &arg) }.map(drop)
}

/// The geometry of the XFS mounted where `dir` (any file or directory on it) lives.
pub fn xfs_geometry(dir: &File) -> nix::Result<XfsFsopGeomV1> {
    let mut geom = XfsFsopGeomV1::default();
    // SAFETY: the kernel writes one `struct xfs_fsop_geom_v1` (same layout, checked by a test)
    // into the live local.
    unsafe { xfs_fsgeometry_v1(dir.as_raw_fd(), &mut geom) }?;
    Ok(geom)
}

/// Grows the mounted XFS's data section to `newblocks` file system blocks, online.
pub fn xfs_grow_data(dir: &File, newblocks: u64, imaxpct: u32) -> nix::Result<()> {
    let arg = XfsGrowfsData { newblocks, imaxpct };
    // SAFETY: the kernel only reads one `struct xfs_growfs_data` (layout checked by a test)
    // from the live local.
    unsafe { xfs_growfsdata(dir.as_raw_fd(), &arg) }.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use std::process::Command;

    const PROBE: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <linux/fs.h>
#include <linux/blkpg.h>
#include <xfs/xfs.h>
int main(void) {
    printf("%zu %zu %zu %zu\n", sizeof(struct blkpg_partition), sizeof(struct blkpg_ioctl_arg),
        offsetof(struct blkpg_ioctl_arg, data), offsetof(struct blkpg_partition, pno));
    printf("%zu %zu %zu %zu\n", sizeof(struct xfs_fsop_geom_v1), offsetof(struct xfs_fsop_geom_v1, datablocks),
        offsetof(struct xfs_fsop_geom_v1, dirblocksize), sizeof(struct xfs_growfs_data));
    printf("%lu %lu %lu %lu %d\n", (unsigned long)BLKGETSIZE64, (unsigned long)BLKPG,
        (unsigned long)XFS_IOC_FSGEOMETRY_V1, (unsigned long)XFS_IOC_FSGROWFSDATA, BLKPG_RESIZE_PARTITION);
    return 0;
}
"#;

    /// Our copies against the real headers, compiled by the host's C compiler.
    #[test]
    fn layouts_and_request_numbers_match_the_headers() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("probe.c");
        let bin = dir.path().join("probe");
        std::fs::write(&src, PROBE).unwrap();
        let cc = Command::new("cc").arg(&src).arg("-o").arg(&bin).output().unwrap();
        assert!(cc.status.success(), "{}", String::from_utf8_lossy(&cc.stderr));
        let out = String::from_utf8(Command::new(&bin).output().unwrap().stdout).unwrap();
        let ours = format!(
            "{} {} {} {}\n{} {} {} {}\n{} {} {} {} {}\n",
            size_of::<BlkpgPartition>(),
            size_of::<BlkpgIoctlArg>(),
            offset_of!(BlkpgIoctlArg, data),
            offset_of!(BlkpgPartition, pno),
            size_of::<XfsFsopGeomV1>(),
            offset_of!(XfsFsopGeomV1, datablocks),
            offset_of!(XfsFsopGeomV1, dirblocksize),
            size_of::<XfsGrowfsData>(),
            nix::request_code_read!(0x12, 114, size_of::<usize>()),
            nix::request_code_none!(0x12, 105),
            nix::request_code_read!(b'X', 100, size_of::<XfsFsopGeomV1>()),
            nix::request_code_write!(b'X', 110, size_of::<XfsGrowfsData>()),
            BLKPG_RESIZE_PARTITION,
        );
        assert_eq!(out, ours);
    }

    #[test]
    fn device_bytes_refuses_a_regular_file() {
        let f = tempfile::tempfile().unwrap();
        assert!(device_bytes(&f).is_err());
    }
}
