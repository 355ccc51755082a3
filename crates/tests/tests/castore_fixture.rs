//! Import and export of a small tree with every entry kind, through the real `tide`.

use tests::fixture;
use tests::fstree::assert_same;
use tests::tide::{Tide, sh};

fn setup() -> (tempfile::TempDir, Tide) {
    let tmp = tempfile::Builder::new()
        .prefix("tide-fixture")
        .tempdir_in("/var/tmp")
        .unwrap();
    fixture::build(&tmp.path().join("src"));
    let tide = Tide::new(tmp.path().join("store"));
    (tmp, tide)
}

#[test]
fn directory_round_trip_keeps_everything() {
    let (tmp, tide) = setup();
    let src = tmp.path().join("src");
    let r = tide.json(&[
        "image",
        "import",
        src.to_str().unwrap(),
        "--name",
        "fixture:1",
    ]);
    assert_eq!(r["name"], "fixture:1");
    assert!(r["new_chunks"].as_u64().unwrap() > 10, "{r}");
    let out = tmp.path().join("out");
    tide.ok(&[
        "image",
        "export",
        "fixture:1",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_same(&src, &out);
    // Holes stay holes: the 8 MiB sparse file keeps using about 64 KiB.
    let md = std::fs::metadata(out.join("usr/sparse")).unwrap();
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&md) * 512 < 1 << 20,
        "sparse file was filled"
    );
}

#[test]
fn tar_export_reimport_and_compressed_tars_agree() {
    let (tmp, tide) = setup();
    let src = tmp.path().join("src");
    let p = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    tide.ok(&["image", "import", &p("src"), "--name", "fixture:dir"]);
    tide.ok(&["image", "export", "fixture:dir", "--to", &p("our.tar")]);
    // GNU tar reads our tar, and what it unpacks is the source.
    sh(&format!(
        "mkdir {0} && tar --xattrs --xattrs-include='*' --numeric-owner -xpf {1} -C {0}",
        p("gnu-x"),
        p("our.tar")
    ));
    assert_same(&src, &tmp.path().join("gnu-x"));
    // A tar written by GNU tar (POSIX format keeps nanoseconds), plain, gzip and zstd.
    sh(&format!(
        "cd {} && tar --format=posix --xattrs --xattrs-include='*' --numeric-owner -cpf {} . && gzip -k {1} && zstd -q -k {1}",
        src.display(),
        p("gnu.tar")
    ));
    let mut digests = Vec::new();
    for (file, name) in [
        ("gnu.tar", "fixture:tar"),
        ("gnu.tar.gz", "fixture:gz"),
        ("gnu.tar.zst", "fixture:zst"),
    ] {
        let r = tide.json(&["image", "import", &p(file), "--name", name]);
        digests.push(r["image"].as_str().unwrap().to_string());
        let out = p(&format!("out-{}", name.replace(':', "-")));
        tide.ok(&["image", "export", name, "--to", &out]);
        assert_same(&src, std::path::Path::new(&out));
    }
    // Same uncompressed tar, same layer diff_id, same image: compression does not matter.
    assert_eq!(digests[0], digests[1]);
    assert_eq!(digests[0], digests[2]);
}

#[test]
fn layers_listing_inspect_rm_gc_and_fsck() {
    let (tmp, tide) = setup();
    let p = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    let r = tide.json(&["layer", "import", &p("src")]);
    let layer = r["layers"][0].as_str().unwrap().to_string();
    let ls = tide.json(&["layer", "ls"]);
    assert_eq!(ls[0]["digest"], layer.as_str());
    tide.ok(&["layer", "export", &layer, "--to", &p("layer-out")]);
    assert_same(&tmp.path().join("src"), &tmp.path().join("layer-out"));

    tide.ok(&["image", "import", &p("src"), "--name", "one:a"]);
    let img = tide.json(&["image", "inspect", "one:a"]);
    assert_eq!(
        img["layers"][0]["digest"],
        layer.as_str(),
        "same tree, same layer"
    );
    assert_eq!(tide.json(&["image", "ls"]).as_array().unwrap().len(), 1);

    // Nothing is garbage while referenced.
    let gc = tide.json(&["gc"]);
    assert_eq!(gc["chunks"], 0, "{gc}");
    tide.ok(&["layer", "rm", &layer]);
    tide.ok(&["image", "rm", "one:a"]);
    let stats_before = tide.json(&["stats"]);
    assert!(stats_before["chunks"].as_u64().unwrap() > 0);
    let gc = tide.json(&["gc"]);
    assert_eq!(gc["chunks"], stats_before["chunks"], "{gc}");
    let stats = tide.json(&["stats"]);
    assert_eq!(stats["chunks"], 0);
    assert_eq!(stats["stored_bytes"], 0);
    // The space comes back on disk too, not only in the index.
    let (disk_before, stored_before, disk_after) = (
        stats_before["disk_bytes"].as_u64().unwrap(),
        stats_before["stored_bytes"].as_u64().unwrap(),
        stats["disk_bytes"].as_u64().unwrap(),
    );
    assert!(
        disk_after + stored_before * 9 / 10 < disk_before,
        "disk {disk_before} -> {disk_after} after freeing {stored_before} stored bytes"
    );
    let fsck = tide.json(&["fsck"]);
    assert_eq!(fsck["problems"].as_array().unwrap().len(), 0, "{fsck}");
    // Importing again after GC stores everything anew and exports intact.
    tide.ok(&["image", "import", &p("src"), "--name", "one:b"]);
    tide.ok(&["image", "export", "one:b", "--to", &p("again")]);
    assert_same(&tmp.path().join("src"), &tmp.path().join("again"));
}

#[test]
fn a_store_held_by_another_process_is_in_use() {
    let (tmp, tide) = setup();
    let store = castore::Store::open(&tide.store).unwrap();
    let err = tide.fails(&["stats"]);
    assert!(err.contains("in use by another process"), "{err}");
    assert!(
        err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    drop(store);
    tide.ok(&["stats"]);
    drop(tmp);
}

#[test]
fn errors_are_one_line_with_nonzero_exit() {
    let (tmp, tide) = setup();
    let err = tide.fails(&[
        "image",
        "export",
        "nope:1",
        "--to",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("no such image: nope:1"), "{err}");
    let err = tide.fails(&[
        "image",
        "import",
        tmp.path().join("src").to_str().unwrap(),
        "--name",
        "Bad Name",
    ]);
    assert!(err.contains("invalid image name"), "{err}");
    let err = tide.fails(&["image", "import", "/nonexistent/path", "--name", "a:b"]);
    assert!(err.contains("/nonexistent/path"), "{err}");
}
