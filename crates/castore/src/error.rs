//! The store's error type. Every variant names what it is about (a path, a digest, an
//! archive entry), so a one-line rendering is enough for a user to act on.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::Digest;

/// The kinds of stored objects, for error messages and fsck reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    /// A chunk of file or volume bytes.
    Chunk,
    /// A multi-chunk file's segment list.
    Blob,
    /// A directory.
    Tree,
    /// A layer record.
    Layer,
    /// An image record.
    Image,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Chunk => "chunk",
            ObjectKind::Blob => "blob",
            ObjectKind::Tree => "tree",
            ObjectKind::Layer => "layer",
            ObjectKind::Image => "image",
        })
    }
}

/// Everything that can go wrong in castore.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process holds the store.
    #[error("store {path} is in use by another process{}", holder.as_deref().map(|h| format!(" ({h})")).unwrap_or_default())]
    InUse {
        /// The store directory.
        path: PathBuf,
        /// Who holds it, as recorded in the lock file.
        holder: Option<String>,
    },
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("open", "read", ...).
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// RocksDB reported an error.
    #[error("database: {0}")]
    Db(String),
    /// Stored bytes do not hash to their name: never returned as data.
    #[error("{kind} {digest} is corrupt: stored bytes do not match the digest")]
    Corrupt {
        /// The object's kind.
        kind: ObjectKind,
        /// Its name.
        digest: Digest,
    },
    /// A referenced object is not in the store.
    #[error("{kind} {digest} is missing from the store")]
    Missing {
        /// The object's kind.
        kind: ObjectKind,
        /// Its name.
        digest: Digest,
    },
    /// An object's bytes hash correctly but do not decode (a bug or a foreign store).
    #[error("{kind} {digest} cannot be decoded")]
    Undecodable {
        /// The object's kind.
        kind: ObjectKind,
        /// Its name.
        digest: Digest,
    },
    /// An input archive or directory entry was refused.
    #[error("{source_name}: entry {entry:?}: {reason}")]
    BadEntry {
        /// The archive or directory being imported.
        source_name: String,
        /// The entry's path as written in the input.
        entry: String,
        /// Why it was refused.
        reason: String,
    },
    /// An input is not in a format we read, or is damaged outside any one entry.
    #[error("{source_name}: {reason}")]
    BadInput {
        /// The input.
        source_name: String,
        /// What is wrong.
        reason: String,
    },
    /// No image or layer has this name.
    #[error("no such {what}: {name}")]
    NotFound {
        /// "image", "layer", ...
        what: &'static str,
        /// The name asked for.
        name: String,
    },
    /// A `name:tag` reference is malformed.
    #[error("invalid image name {name:?}: {reason}")]
    BadName {
        /// What was given.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A volume operation failed (names the volume or snapshot).
    #[error(transparent)]
    Volume(#[from] crate::volume::VolumeError),
    /// The chunk tier could not do what was asked (names the tier, what was being done
    /// and the object's key).
    #[error("tier {url}: {op} {key}: {message}")]
    Tier {
        /// The tier, as configured (`s3://BUCKET/PREFIX`, a directory).
        url: String,
        /// "get", "put".
        op: &'static str,
        /// The object's key in the tier (`chunks/HEX`, `refs/NAME:TAG`, ...).
        key: String,
        /// What the tier said.
        message: String,
    },
    /// The operation was refused because of its target's state.
    #[error("{0}")]
    Refused(String),
    /// An error with what was being done when it happened.
    #[error("{context}: {source}")]
    Context {
        /// What was being done, naming the object ("exporting usr/bin/dpkg").
        context: String,
        /// The underlying error.
        #[source]
        source: Box<Error>,
    },
}

/// Shorthand for castore results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps the error with what was being done.
    pub fn context(self, context: impl Into<String>) -> Error {
        Error::Context {
            context: context.into(),
            source: Box::new(self),
        }
    }

    /// The innermost error, skipping context wrappers.
    pub fn root(&self) -> &Error {
        match self {
            Error::Context { source, .. } => source.root(),
            e => e,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

impl From<rocksdb::Error> for Error {
    fn from(e: rocksdb::Error) -> Error {
        Error::Db(e.into_string())
    }
}

/// Adds context to results.
pub trait ResultExt<T> {
    /// Wraps an error with a lazily built description of what was being done.
    fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|e| e.context(f()))
    }
}
