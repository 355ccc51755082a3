//! Corruption: a flipped byte in a stored chunk is reported by digest, never returned.

use tests::tide::Tide;

#[test]
fn flipped_chunk_byte_fails_export_and_fsck_with_the_digest() {
    let tmp = tempfile::Builder::new()
        .prefix("tide-corrupt")
        .tempdir_in("/var/tmp")
        .unwrap();
    let src = tmp.path().join("src");
    tests::fixture::build(&src);
    let tide = Tide::new(tmp.path().join("store"));
    tide.ok(&["image", "import", src.to_str().unwrap(), "--name", "c:1"]);
    // Damage the chunk holding the start of usr/bin/big, through the store's own seam.
    let victim = {
        let store = castore::Store::open(&tide.store).unwrap();
        let img = store.image(&store.resolve_image("c:1").unwrap()).unwrap();
        let layer = store.layer(&img.layers[0]).unwrap();
        let usr = store.tree(&layer.root_tree()).unwrap();
        let castore::Kind::Dir { tree: usr, .. } = usr.get(b"usr").unwrap().kind else {
            panic!()
        };
        let castore::Kind::Dir { tree: bin, .. } =
            store.tree(&usr).unwrap().get(b"bin").unwrap().kind
        else {
            panic!()
        };
        let big = store.tree(&bin).unwrap().get(b"big").unwrap().clone();
        let castore::Kind::File {
            data: castore::FileData::Blob(b),
            ..
        } = big.kind
        else {
            panic!("big is multi-chunk")
        };
        let castore::Segment::Data { chunk, .. } = store.blob(&b).unwrap().segments[0] else {
            panic!()
        };
        castore::testing::corrupt_chunk(&store, &chunk).unwrap();
        chunk
    };
    let err = tide.fails(&[
        "image",
        "export",
        "c:1",
        "--to",
        tmp.path().join("out").to_str().unwrap(),
    ]);
    assert!(
        err.contains(&victim.to_string()),
        "error does not name the digest: {err}"
    );
    assert!(
        err.contains("usr/bin/big"),
        "error does not name the file: {err}"
    );
    assert!(err.contains("corrupt"), "{err}");
    let o = tide.run(&["--json", "fsck"]);
    assert!(!o.status.success(), "fsck passed a corrupt store");
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let problems = report["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p["name"] == victim.to_string().as_str()
                && p["problem"].as_str().unwrap().contains("corrupt")),
        "{report}"
    );
    // Other files still export: the damage is contained to what uses the chunk.
    let keep = tmp.path().join("hostname");
    let store = castore::Store::open(&tide.store).unwrap();
    let img = store.image(&store.resolve_image("c:1").unwrap()).unwrap();
    let layer = store.layer(&img.layers[0]).unwrap();
    let root = store.tree(&layer.root_tree()).unwrap();
    let castore::Kind::Dir { tree: etc, .. } = root.get(b"etc").unwrap().kind else {
        panic!()
    };
    let host = store.tree(&etc).unwrap().get(b"hostname").unwrap().clone();
    let castore::Kind::File { data, .. } = host.kind else {
        panic!()
    };
    let mut out = Vec::new();
    store.read_file(&data, &mut out).unwrap();
    assert_eq!(out, b"tidedge\n");
    drop(keep);
}
