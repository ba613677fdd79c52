//! The progress callback libcryptsetup calls during reencryption, bridged to a Rust closure.

use std::os::raw::{c_int, c_void};

use libcryptsetup_rs::{CryptDevice, LibcryptErr};

/// Called with (bytes done, bytes total).
pub(crate) type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// libcryptsetup passes `(size, offset, usrptr)`; returning non-zero would abort the run.
///
/// # Safety
/// `usrptr` must be null or the `&mut Progress` that [`run_reencrypt`] hands to libcryptsetup.
unsafe extern "C" fn trampoline(size: u64, offset: u64, usrptr: *mut c_void) -> c_int {
    if usrptr.is_null() {
        return 0;
    }
    // SAFETY: `usrptr` is the `&mut Progress` that `run_reencrypt` passes to `reencrypt2` below;
    // it outlives that call, libcryptsetup only calls back during it, from the calling thread,
    // and nothing else touches the closure meanwhile, so the exclusive borrow is sound.
    let progress = unsafe { &mut *usrptr.cast::<Progress<'_>>() };
    progress(offset, size);
    0
}

/// `crypt_reencrypt_run` with an optional progress closure.
pub(crate) fn run_reencrypt(
    dev: &mut CryptDevice,
    progress: Option<Progress<'_>>,
) -> Result<(), LibcryptErr> {
    match progress {
        Some(mut p) => dev.reencrypt_handle().reencrypt2(Some(trampoline), Some(&mut p)),
        None => dev.reencrypt_handle().reencrypt2::<()>(None, None),
    }
}
