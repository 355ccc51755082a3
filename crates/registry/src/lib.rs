//! An OCI distribution client: pulls container images from registries (Docker Hub's
//! protocol, as the CNCF distribution registry, GHCR, ECR and Harbor speak it) into a
//! castore [`Store`](castore::Store), as if they had been imported from a layout.
//!
//! - [`Reference`], `HOST[:PORT]/REPO[:TAG][@sha256:HEX]`.
//! - [`Client`], the HTTP side: token auth (the `WWW-Authenticate: Bearer` challenge
//!   answered at the token service, with Basic credentials when given), Basic auth, blob
//!   reads that resume with `Range` after a broken connection, uploads (for tests and
//!   mirrors).
//! - [`pull`] resolves a tag to this machine's manifest (through an image index),
//!   verifies every document against its digest, and hands castore the config and the
//!   layer blobs; layers the store already holds by `diff_id` are not downloaded.

mod auth;
mod client;
mod pull;
mod reference;
pub mod testing;

pub use auth::{Credentials, credentials_from_file, default_auth_file};
pub use client::{Client, ClientOptions, Manifest, media};
pub use pull::{PullReport, PullRequest, pull, pull_request, resolve};
pub use reference::{Reference, names_registry};

/// What can go wrong talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The reference does not parse.
    #[error("bad image reference {reference:?}: {reason}")]
    BadReference {
        /// As given.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// The registry could not be reached or the connection broke.
    #[error("registry {registry}: {what}: {}", chain(source))]
    Http {
        /// The registry host.
        registry: String,
        /// The request (`GET /v2/...`).
        what: String,
        /// The transport's error.
        source: reqwest::Error,
    },
    /// The registry answered with an error status.
    #[error("registry {registry}: {what}: {status}{detail}")]
    Status {
        /// The registry host.
        registry: String,
        /// The request.
        what: String,
        /// The HTTP status.
        status: reqwest::StatusCode,
        /// The registry's own error codes and messages, `: CODE: message`, or "".
        detail: String,
    },
    /// Credentials are needed or were refused.
    #[error("registry {registry}: {reason}")]
    Auth {
        /// The registry host.
        registry: String,
        /// What happened.
        reason: String,
    },
    /// The registry served something wrong: a document that does not match its digest,
    /// a manifest we cannot use, a blob of the wrong size.
    #[error("registry {registry}: {reason}")]
    Bad {
        /// The registry host.
        registry: String,
        /// What is wrong.
        reason: String,
    },
    /// The store refused or failed the import.
    #[error(transparent)]
    Store(#[from] castore::Error),
    /// A local file (an auth file) could not be read.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// An error and its causes, `outer: inner: innermost` (reqwest's own text leaves out
/// why a connection failed).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = c.source();
    }
    out
}
