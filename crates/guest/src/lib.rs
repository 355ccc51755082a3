//! guest: what runs inside a Tidedge VM, and the host-side pieces that package it.
//!
//! - [`manifest`]: a listing of every entry of a tree (type, mode, owner, size, mtime,
//!   link count, device, content digest, xattrs), one line each, the same function in
//!   the guest (over the overlay root it mounted) and on the host (over the store's
//!   view of the same image), so the two can be compared line by line.
//! - [`initramfs`]: a deterministic `newc` cpio writer for the initramfs the project
//!   builds (the guest's init, its tools and kernel modules).
//! - the binary `tide-manifest`, linked statically (`scripts/build-guest`) to run in a
//!   guest with nothing but busybox beside it.
//!
//! This crate knows no host crate (store, NBD, scheduler): it depends on libc and sha2.

pub mod initramfs;
pub mod manifest;
