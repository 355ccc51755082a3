//! layerfs: presents an image's layers plus a writable scratch layer as one root.
//!
//! `overlay` is the model (OCI whiteouts, opaque directories, copy-up, no FUSE types);
//! `fuse` adapts it to the kernel through `fuser`. It knows nothing of volumes'
//! lifecycle or scheduling.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use castore::{Digest, Store};

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Refuse every write (EROFS); no scratch layer is used.
    pub read_only: bool,
    /// Directory for this mount's scratch layer (created; emptied on unmount).
    pub scratch_dir: PathBuf,
}

/// Why a mount failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store could not provide the image.
    #[error(transparent)]
    Store(#[from] castore::Error),
    /// The kernel refused the mount or another OS call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A live mount; dropping it unmounts.
#[derive(Debug)]
pub struct Mount {
    mountpoint: PathBuf,
}

impl Mount {
    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Bytes used by the scratch layer.
    pub fn scratch_bytes(&self) -> u64 {
        0
    }

    /// Unmounts and discards the scratch layer.
    pub fn unmount(self) -> Result<(), Error> {
        Ok(())
    }
}

/// Mounts `image` from `store` at `mountpoint` through FUSE.
pub fn mount(store: Arc<Store>, image: Digest, mountpoint: &Path, opts: MountOptions) -> Result<Mount, Error> {
    let _ = (store, image, opts);
    Err(Error::Io {
        op: "mount",
        path: mountpoint.to_path_buf(),
        source: std::io::Error::other("layerfs mount is not implemented yet"),
    })
}
