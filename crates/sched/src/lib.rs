//! sched: Tidedge's scheduling core, as pure domain types and algorithms.
//!
//! It owns stack files (stacks, services, volumes, variants, warm pools, aliases) and
//! their validation ([`stack`]), the resolved view of stacks and variants: SHARED and
//! UNIQUE services, the env cascade, host names and aliases ([`model`]), and placement:
//! host inventory, filtering, chunk-level layer locality, spread, warm-pool conversion,
//! hypervisor choice, pool replenishment and rescheduling ([`placement`]).
//!
//! It is a library a daemon wraps: it does no I/O, keeps no clock and spawns nothing.
//! It must not depend on Cap'n Proto, RocksDB, tokio or castore: the daemon stores these
//! types (all `serde`) in its KV store and converts them to and from the wire at its
//! edge. How bytes are stored is castore's business; here a layer is a digest and a
//! count of bytes.

pub mod autoscale;
pub mod model;
pub mod placement;
pub mod stack;
pub mod types;
