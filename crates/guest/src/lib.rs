//! guest: what runs inside a Tidedge VM, and the host-side pieces that package it.
//!
//! - [`manifest`]: a listing of every entry of a tree (type, mode, owner, size, mtime,
//!   link count, device, content digest, xattrs), one line each, the same function in
//!   the guest (over the overlay root it mounted) and on the host (over the store's
//!   view of the same image), so the two can be compared line by line.
//! - [`initramfs`]: a deterministic `newc` cpio writer for the initramfs the project
//!   builds (the guest's init, its tools and kernel modules).
//! - [`control`]: the JSON-lines protocol between the guest's init and the host, over
//!   a virtio-serial port (config in, lifecycle events and the app's output out).
//! - the binaries `tide-manifest` and `tide-init` (PID 1), linked statically
//!   (`scripts/build-guest`) to run in a guest with nothing beside them but busybox (for
//!   the tests' scripts) and the kernel modules.
//!
//! This crate knows no host crate (store, NBD, scheduler): it depends on libc, sha2 and
//! serde.

pub mod control;
pub mod initramfs;
pub mod manifest;
