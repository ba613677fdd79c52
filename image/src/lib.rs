//! Disk image writing for Cloister, all in userspace on plain files: the GPT layout, the ESP
//! with a UKI, the root XFS from a protofile, its LUKS2 encryption into the image, the final assembly
//! and the build manifest. Invariant: nothing here mounts, opens a loop or device-mapper device,
//! or needs root.
#![forbid(unsafe_code)]

pub mod assemble;
mod direct;
pub use cloister_bmap as bmap;
pub mod esp;
pub mod gpt;
pub mod layout;
pub mod luks;
pub mod manifest;
pub mod uki;
pub mod xfs;

pub use assemble::{AssembleError, ImageSummary, ImageWriter};
pub use bmap::{read_bmap, write_bmap, Bmap, BmapError, BmapRange};
pub use esp::{write_esp, EspError};
pub use gpt::{write_gpt, GptWriteError};
pub use layout::{Layout, LayoutError, LayoutUuids, PartPlan};
pub use luks::{
    encrypt, format as format_luks, Header as LuksHeader, KdfParams, LuksError, LuksInfo, Partition,
    PbkdfInfo, LUKS_RESERVE_BYTES,
};
pub use luks::{warmup_header, WARMUP_HEADER_BYTES};
pub use manifest::Manifest;
pub use uki::{build_uki, UkiError, UkiSections, DEFAULT_STUB};
pub use xfs::{mkfs_xfs, write_protofile, ProtoReport, XfsError};
