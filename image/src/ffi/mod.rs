//! The crate's only unsafe code: C callbacks handed to native libraries.
#![allow(unsafe_code)]

pub(crate) mod cryptsetup;
