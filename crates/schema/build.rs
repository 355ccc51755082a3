//! Compiles `capnp/*.capnp` with the `capnp` tool (Debian's `capnproto` package).

fn main() {
    println!("cargo:rerun-if-changed=capnp");
    capnpc::CompilerCommand::new()
        .src_prefix("capnp")
        .file("capnp/store.capnp")
        .run()
        .expect("compiling capnp/store.capnp (is the `capnp` tool installed?)");
}
