//! Compiles `capnp/*.capnp` with the `capnp` tool (Debian's `capnproto` package).

fn main() {
    println!("cargo:rerun-if-changed=capnp");
    capnpc::CompilerCommand::new()
        .src_prefix("capnp")
        .file("capnp/store.capnp")
        .file("capnp/sched.capnp")
        .run()
        .expect("compiling capnp/*.capnp (is the `capnp` tool installed?)");
}
