//! Architecture invariants from ARCHITECTURE.md, checked rather than remembered.

use std::process::Command;

fn deps(package: &str) -> String {
    deps_to_depth(package, None)
}

/// `cargo tree` of `package`'s normal dependencies, to `depth` levels when given.
fn deps_to_depth(package: &str, depth: Option<u32>) -> String {
    let depth = depth.map(|d| d.to_string());
    let o = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "-p",
            package,
        ])
        .args(depth.iter().flat_map(|d| ["--depth", d.as_str()]))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree");
    assert!(
        o.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn castore_knows_nothing_of_fuse_nbd_rpc_or_scheduling() {
    let tree = deps("castore");
    for forbidden in [
        "fuser ", "capnp", "tokio ", "nbd ", "layerfs", "volumed", "sched ", "schema ",
    ] {
        assert!(
            !tree.lines().any(|l| l.starts_with(forbidden)),
            "castore depends on {forbidden}:\n{tree}"
        );
    }
}

#[test]
fn schema_depends_on_no_workspace_crate() {
    let tree = deps("schema");
    for forbidden in [
        "castore ", "layerfs ", "volumed ", "cli ", "sched ", "tokio ",
    ] {
        assert!(
            !tree.lines().any(|l| l.starts_with(forbidden)),
            "schema depends on {forbidden}:\n{tree}"
        );
    }
}

#[test]
fn sched_is_pure_domain_code() {
    // The daemon wraps sched; sched itself does no I/O, RPC or storage.
    let tree = deps("sched");
    for forbidden in [
        "capnp", "tokio ", "rocksdb ", "castore ", "schema ", "fuser ", "layerfs ",
    ] {
        assert!(
            !tree.lines().any(|l| l.starts_with(forbidden)),
            "sched depends on {forbidden}:\n{tree}"
        );
    }
}

#[test]
fn only_castore_names_rocksdb() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut offenders = Vec::new();
    for dir in ["crates"] {
        for entry in walk(&root.join(dir)) {
            let text = std::fs::read_to_string(&entry).unwrap_or_default();
            let rel = entry
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if text.contains(concat!("rocks", "db::"))
                && !rel.starts_with("crates/castore/src/db.rs")
                && !rel.starts_with("crates/castore/src/error.rs")
            {
                offenders.push(rel);
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "RocksDB named outside castore's db seam: {offenders:?}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

#[test]
fn the_nbd_server_knows_nothing_of_the_store_or_volumes() {
    // layerfs's NBD module is protocol only: volumed gives it devices through its
    // `Exports` and `BlockDevice` traits.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut offenders = Vec::new();
    for entry in walk(&root.join("crates/layerfs/src/nbd")) {
        let text = std::fs::read_to_string(&entry).unwrap_or_default();
        for word in ["castore::", "volumed::", "crate::overlay", "fuser::"] {
            if text.contains(word) {
                offenders.push(format!("{}: {word}", entry.display()));
            }
        }
    }
    assert!(offenders.is_empty(), "{offenders:?}");
}

#[test]
fn schedd_stores_through_castore_and_knows_no_host_side_crate() {
    // The scheduler daemon keeps its state through `castore::Kv` and drives hosts only
    // through the `Host` capability: no storage engine, FUSE, NBD or volumed of its own.
    let tree = deps_to_depth("schedd", Some(1));
    assert!(tree.lines().any(|l| l.starts_with("castore ")), "{tree}");
    for forbidden in ["rocksdb ", "volumed ", "layerfs ", "fuser "] {
        assert!(
            !tree.lines().any(|l| l.starts_with(forbidden)),
            "schedd depends on {forbidden}:\n{tree}"
        );
    }
}
