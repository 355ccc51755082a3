//! Helpers shared by the FUSE tests: a store in a temp directory, mounting that fails
//! loudly, and small syscall wrappers.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use castore::{Digest, Store};
use layerfs::{Mount, MountOptions};

/// A temp directory with a store in it.
pub(crate) struct Env {
    pub(crate) tmp: tempfile::TempDir,
    pub(crate) store: Arc<Store>,
}

impl Env {
    pub(crate) fn new(prefix: &str) -> Env {
        let tmp = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in("/var/tmp")
            .expect("temp dir");
        let store = Arc::new(Store::open(tmp.path().join("store")).expect("open store"));
        Env { tmp, store }
    }

    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// Imports a directory (or tar, or OCI layout) as image `name`.
    pub(crate) fn import(&self, src: &Path, name: &str) -> Digest {
        self.store
            .import_image(src, Some(name), &Default::default())
            .unwrap_or_else(|e| panic!("import {}: {e}", src.display()))
            .image
            .expect("image digest")
    }

    /// Mounts `image` at `self.path(at)`; panics (never skips) if FUSE is unavailable.
    pub(crate) fn mount(&self, image: Digest, at: &str, read_only: bool) -> Mount {
        let mp = self.path(at);
        std::fs::create_dir_all(&mp).expect("mountpoint");
        let opts = MountOptions {
            read_only,
            scratch_dir: self.path(&format!("{at}.scratch")),
        };
        layerfs::mount(self.store.clone(), image, &mp, opts).unwrap_or_else(|e| {
            panic!(
                "cannot mount a FUSE filesystem at {} ({e}); these tests need root and \
                 /dev/fuse and must not be skipped",
                mp.display()
            )
        })
    }
}

pub(crate) fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL")
}

/// The errno of a failed `std::io` call.
pub(crate) fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.expect_err("expected an error")
        .raw_os_error()
        .expect("an OS error")
}

/// `renameat2` with flags; returns errno (0 on success).
pub(crate) fn rename2(from: &Path, to: &Path, flags: u32) -> i32 {
    let (a, b) = (cstr(from), cstr(to));
    // SAFETY: both paths are valid NUL-terminated strings for the call's duration.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

pub(crate) use tests::tide::sh;
