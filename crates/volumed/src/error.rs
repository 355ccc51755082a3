//! The daemon's typed errors and their one conversion into `capnp::Error`.

use std::path::PathBuf;

/// Why an RPC call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The store refused or failed (not found, corrupt, bad archive, ...).
    #[error(transparent)]
    Store(#[from] castore::Error),
    /// A registry pull failed (the registry's answer, auth, or the store's refusal).
    #[error(transparent)]
    Registry(#[from] registry::Error),
    /// layerfs could not mount or unmount.
    #[error(transparent)]
    Mount(#[from] layerfs::Error),
    /// A request carried an argument the daemon cannot use.
    #[error("{0}")]
    BadRequest(String),
    /// No mount of this daemon at that path.
    #[error("nothing mounted by volumed at {0}")]
    NotMounted(PathBuf),
    /// The mountpoint already holds one of this daemon's mounts.
    #[error("{0} is already a volumed mount")]
    AlreadyMounted(PathBuf),
    /// The daemon is shutting down and takes no new mounts.
    #[error("volumed is shutting down")]
    ShuttingDown,
    /// A read-write-once volume is attached by someone else.
    #[error("volume {volume} is in use by {holder}")]
    InUse {
        /// The volume.
        volume: String,
        /// Who holds it.
        holder: String,
    },
    /// A file of the daemon's own could not be read or written.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// A worker thread died (a bug); the daemon keeps serving.
    #[error("internal error: worker failed: {0}")]
    Worker(String),
}

/// The one place daemon errors become wire errors: a `failed` exception whose reason is
/// the error's one-line message (its causes included).
impl From<Error> for capnp::Error {
    fn from(e: Error) -> capnp::Error {
        capnp::Error::failed(e.to_string())
    }
}

impl From<castore::VolumeError> for Error {
    fn from(e: castore::VolumeError) -> Error {
        Error::Store(e.into())
    }
}
