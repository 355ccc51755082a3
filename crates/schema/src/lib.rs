//! schema: Tidedge's Cap'n Proto interfaces (`capnp/*.capnp`) and the code `capnpc`
//! generates from them at build time. Nothing else lives here, and it depends on no other
//! crate of the workspace: servers and clients convert these wire types to their own
//! domain types at the RPC boundary.
//!
//! `capnp/store.capnp` is the host daemon's (`volumed`) interface: the bootstrap
//! capability `Daemon` hands out `Store` and `Mounts`. The file is self-contained and
//! documented, so clients in other languages (pycapnp) load it directly.
//!
//! `capnp/sched.capnp` is the scheduler's (`sched`) interface, bootstrap `Scheduler`,
//! with the `Host` interface volumed offers it.

/// Path of the `.capnp` files in the source tree, for clients that load them at runtime.
pub const CAPNP_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/capnp");

/// Code generated from `capnp/store.capnp`.
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks
)]
pub mod store_capnp {
    include!(concat!(env!("OUT_DIR"), "/store_capnp.rs"));
}

/// Code generated from `capnp/sched.capnp`.
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks
)]
pub mod sched_capnp {
    include!(concat!(env!("OUT_DIR"), "/sched_capnp.rs"));
}
