//! The scheduler's typed errors and their one conversion into `capnp::Error`.

use sched::model::ModelError;
use sched::placement::PlaceError;
use sched::stack::ParseErrors;

/// Why a scheduler call failed. Every message names its subject and is one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A stack or variant file did not parse or validate (file:line: field: why).
    #[error("{}", one_line(&.0.to_string()))]
    Parse(#[from] ParseErrors),
    /// The catalog refused a change (unknown stack, alias in the way, ...).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// No host can take an instance, or an override is impossible.
    #[error(transparent)]
    Place(#[from] PlaceError),
    /// An instance a deploy did not start because one it depends on failed.
    #[error("{0}")]
    NotStarted(String),
    /// A request carried an argument the scheduler cannot use.
    #[error("{0}")]
    BadRequest(String),
    /// A host refused or failed a call, or is not connected.
    #[error("host {host}: {op}: {reason}")]
    Host {
        /// The host's id.
        host: String,
        /// What was asked of it ("prepare web.shop-0", ...).
        op: String,
        /// Its reason, or what happened to the link.
        reason: String,
    },
    /// A message did not decode (a field missing, text not UTF-8).
    #[error("malformed message: {}", host_reason(.0))]
    Wire(#[from] capnp::Error),
    /// The state store failed.
    #[error("state store: {0}")]
    Store(#[from] castore::Error),
    /// A change sent to a follower; the leader's address, "" while none is elected.
    #[error("{}", not_leader(.0))]
    NotLeader(String),
    /// A change that was made but could not be stored: this scheduler stopped leading.
    #[error("the change was not stored: {0}; this scheduler stepped down, retry with the leader")]
    Lost(String),
    /// A stored record did not decode (a bug or a foreign state directory).
    #[error("state record {key}: {reason}")]
    Record {
        /// The record's key.
        key: String,
        /// Why it did not decode.
        reason: String,
    },
}

fn not_leader(leader: &str) -> String {
    if leader.is_empty() {
        "not the leader, and no leader is elected yet: retry in a few seconds".into()
    } else {
        format!("not the leader: the leader is at {leader}")
    }
}

/// Several messages (a file's parse errors) joined on one line.
fn one_line(s: &str) -> String {
    s.lines().collect::<Vec<_>>().join("; ")
}

/// The one place scheduler errors become wire errors: a `failed` exception whose reason
/// is the error's one-line message.
impl From<Error> for capnp::Error {
    fn from(e: Error) -> capnp::Error {
        capnp::Error::failed(one_line(&e.to_string()))
    }
}

/// A host call's wire error as a reason: capnp-rpc's "remote exception: " prefix is
/// dropped, the host's own message kept.
pub fn host_reason(e: &capnp::Error) -> String {
    let reason = e
        .extra
        .strip_prefix("remote exception: ")
        .unwrap_or(&e.extra);
    match e.kind {
        capnp::ErrorKind::Failed => reason.to_owned(),
        capnp::ErrorKind::Disconnected => format!("disconnected ({reason})"),
        k => format!("{k:?}: {reason}"),
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
