//! volumed: the per-host daemon (owns the store, serves mounts and RPC).

fn main() {}
