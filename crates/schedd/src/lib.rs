//! schedd: the scheduler daemon `sched`. It serves `schema`'s `sched.capnp` (bootstrap
//! `Scheduler`) over TCP or a Unix socket, keeps its state in a [`castore::Kv`] at
//! `DATA/state` or in etcd shared by several schedulers of which one leads
//! ([`store`], [`etcd`]), and drives hosts (volumed) through the `Host` capability each one hands
//! it at registration.
//!
//! It owns the daemon side of scheduling: persistence ([`state`]), the operations that
//! call hosts, with rollback and failover ([`daemon`]), and the wire edge ([`wire`],
//! [`rpc`]). Every scheduling decision is `sched`'s (a pure library); every byte stored
//! goes through castore's seam: this crate names neither RocksDB nor any host-side
//! crate (volumed, layerfs).
//!
//! [`testing`] is a fake host (the `Host` interface served in-process) and small client
//! helpers, shared by the integration tests, the CLI's tests and `bench-deploy`.

pub mod autoscale;
pub mod daemon;
pub mod error;
pub mod etcd;
pub mod hostcall;
pub mod net;
pub mod routes;
pub mod rpc;
pub mod server;
pub mod state;
pub mod store;
pub mod testing;
pub mod wire;

/// Logs one line to stderr, prefixed with Unix time in seconds.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {{
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        eprintln!("{}.{:03} sched: {}", now.as_secs(), now.subsec_millis(), format_args!($($arg)*))
    }};
}
