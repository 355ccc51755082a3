//! schema: Tidedge's Cap'n Proto interfaces (`capnp/*.capnp`) and the code `capnpc`
//! generates from them at build time. Nothing else lives here, and it depends on no other
//! crate of the workspace.
