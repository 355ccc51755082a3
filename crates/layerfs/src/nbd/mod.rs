//! An NBD server (the protocol only): fixed newstyle negotiation with `OPT_GO`,
//! `OPT_INFO`, `OPT_LIST`, structured replies and the `base:allocation` meta context, and
//! a pipelined transmission phase.
//!
//! It knows nothing of volumes: whoever runs it (volumed) implements [`Exports`], which
//! resolves an export name to a [`BlockDevice`]. Every error a device or an export
//! lookup returns is typed ([`DeviceError`], [`ExportError`]) and mapped to the NBD
//! error codes in exactly one place each (`server::errno`, `server::rep_err`).
//!
//! Every byte a client sends is untrusted: a malformed handshake or request gets the
//! protocol's error or a closed connection, never a panic, and never touches other
//! connections. Sizes a client names are bounded ([`ServerConfig`]) before anything is
//! allocated for them.

use std::sync::Arc;

use crate::block::{BlockDevice, BlockSizes, DeviceError, Extent, ZeroFlags};

mod memory;
mod payload;
mod proto;
mod server;

pub use memory::MemoryDevice;
pub use server::{ConnectionError, Event, ListenError, Server, ServerConfig, unix_peer_process};

/// Why an export could not be opened. Mapped to an NBD option error by the server alone.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// No export of that name (`NBD_REP_ERR_UNKNOWN`); the text says which and why, as
    /// the client is shown it (e.g. `no such volume: db`).
    #[error("{0}")]
    NotFound(String),
    /// The export exists but is held by someone else (`NBD_REP_ERR_POLICY`), e.g. a
    /// read-write-once volume attached elsewhere.
    #[error("export {name:?} is in use by {holder}")]
    InUse {
        /// The export.
        name: String,
        /// Who holds it, for the message the client shows.
        holder: String,
    },
    /// Refused by policy for another reason (`NBD_REP_ERR_POLICY`).
    #[error("{0}")]
    Denied(String),
    /// The server is shutting down (`NBD_REP_ERR_SHUTDOWN`).
    #[error("server shutting down")]
    ShuttingDown,
    /// The export could not be opened (`NBD_REP_ERR_UNKNOWN`, "not available").
    #[error(transparent)]
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

/// Why the client asks for an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// `NBD_OPT_INFO` or `NBD_OPT_LIST_META_CONTEXT`: only to describe it. The device is
    /// dropped right after; an access-mode check (such as "one writer") need not count it.
    Query,
    /// `NBD_OPT_GO`/`NBD_OPT_EXPORT_NAME`: to serve it until the connection ends, when
    /// the server drops its last reference (so an attachment may be released in `Drop`).
    Serve,
}

/// An opened export.
#[derive(Clone)]
pub struct Export {
    /// The device behind it.
    pub device: Arc<dyn BlockDevice>,
    /// A description for `NBD_INFO_DESCRIPTION` (absent: none is sent).
    pub description: Option<String>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("size", &self.device.size())
            .field("read_only", &self.device.read_only())
            .field("description", &self.description)
            .finish()
    }
}

/// The exports a server offers. Called on blocking threads; may block.
pub trait Exports: Send + Sync {
    /// The export names for `NBD_OPT_LIST`, each with an optional description. A
    /// server that does not want to reveal names may return an empty list.
    fn list(&self) -> Result<Vec<(String, Option<String>)>, ExportError>;

    /// Opens the export `name` (`""` is the client's default export) for `intent`, on
    /// behalf of `peer` (a description of the client, such as `nbd client pid 1234
    /// (qemu-io)` or `nbd client 127.0.0.1:40312`, for naming who holds an export).
    fn open(&self, name: &str, intent: Intent, peer: &str) -> Result<Export, ExportError>;
}
