//! Real data: Debian roots made by debootstrap (cached between runs by make-roots.sh).

use tests::fstree::assert_same;
use tests::roots::debian_root;
use tests::tide::{Tide, sh};

fn store() -> (tempfile::TempDir, Tide) {
    let tmp = tempfile::Builder::new()
        .prefix("tide-debian")
        .tempdir_in("/var/tmp")
        .unwrap();
    let tide = Tide::new(tmp.path().join("store"));
    (tmp, tide)
}

#[test]
fn debian_root_round_trips_through_dir_and_tar() {
    let root = debian_root("minbase");
    let (tmp, tide) = store();
    let p = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    let r = tide.json(&[
        "image",
        "import",
        root.to_str().unwrap(),
        "--name",
        "debian:minbase",
    ]);
    assert!(r["files"].as_u64().unwrap() > 3000, "{r}");
    tide.ok(&["image", "export", "debian:minbase", "--to", &p("out")]);
    assert_same(&root, &tmp.path().join("out"));
    // Through our tar, read back by us and by GNU tar.
    tide.ok(&["image", "export", "debian:minbase", "--to", &p("root.tar")]);
    tide.ok(&[
        "image",
        "import",
        &p("root.tar"),
        "--name",
        "debian:fromtar",
    ]);
    tide.ok(&["image", "export", "debian:fromtar", "--to", &p("out2")]);
    assert_same(&root, &tmp.path().join("out2"));
    sh(&format!(
        "mkdir {0} && tar --xattrs --xattrs-include='*' --numeric-owner -xpf {1} -C {0}",
        p("gnu"),
        p("root.tar")
    ));
    assert_same(&root, &tmp.path().join("gnu"));
    let fsck = tide.json(&["fsck"]);
    assert_eq!(fsck["problems"].as_array().unwrap().len(), 0, "{fsck}");
}

#[test]
fn same_root_twice_stores_no_new_chunk() {
    let root = debian_root("minbase");
    let (_tmp, tide) = store();
    let first = tide.json(&["image", "import", root.to_str().unwrap(), "--name", "a:1"]);
    assert!(first["new_chunks"].as_u64().unwrap() > 1000, "{first}");
    let before = tide.json(&["stats"]);
    let second = tide.json(&["image", "import", root.to_str().unwrap(), "--name", "a:2"]);
    assert_eq!(second["new_chunks"], 0, "{second}");
    assert_eq!(second["new_stored_bytes"], 0, "{second}");
    assert_eq!(second["image"], first["image"], "same tree, same image");
    let after = tide.json(&["stats"]);
    assert_eq!(before["chunks"], after["chunks"]);
    assert_eq!(before["stored_bytes"], after["stored_bytes"]);
}

#[test]
fn three_roots_sharing_a_base_store_far_less_than_their_sum() {
    let (_tmp, tide) = store();
    let mut logical = 0u64;
    for name in ["minbase", "python3", "flask"] {
        let root = debian_root(name);
        let r = tide.json(&[
            "image",
            "import",
            root.to_str().unwrap(),
            "--name",
            &format!("deb:{name}"),
        ]);
        logical += r["logical_bytes"].as_u64().unwrap();
    }
    let s = tide.json(&["stats"]);
    let unique = s["unique_bytes"].as_u64().unwrap();
    let stored = s["stored_bytes"].as_u64().unwrap();
    assert_eq!(s["logical_bytes"].as_u64().unwrap(), logical);
    // The bigger roots contain the smaller ones: the distinct bytes are little more than
    // the biggest root, and compression halves them again.
    assert!(
        unique * 10 < logical * 6,
        "unique {unique} of logical {logical}"
    );
    assert!(stored < unique, "stored {stored} unique {unique}");
    assert!(s["dedup_ratio"].as_f64().unwrap() > 1.6, "{s}");
}
