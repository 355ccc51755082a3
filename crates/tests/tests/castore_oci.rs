//! OCI image layouts and `docker save` archives with several layers: whiteouts and opaque
//! directories are kept in the layer and applied when the image is exported.

use std::collections::BTreeMap;
use std::path::Path;

use tests::tide::{Tide, sh};

/// Relative path → content ("DIR" for directories) of everything below `root`.
fn listing(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, rel: &str, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(root.join(rel)).unwrap() {
            let e = e.unwrap();
            let name = format!("{rel}{}", e.file_name().to_string_lossy());
            if e.file_type().unwrap().is_dir() {
                out.insert(name.clone(), "DIR".into());
                walk(root, &format!("{name}/"), out);
            } else {
                out.insert(
                    name,
                    String::from_utf8_lossy(&std::fs::read(e.path()).unwrap()).into_owned(),
                );
            }
        }
    }
    walk(root, "", &mut out);
    out
}

fn layers(tmp: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    sh(&format!(
        r#"cd {0} && mkdir -p l1/a l1/b l2/a l2/b &&
        echo one > l1/a/1 && echo two > l1/a/2 && echo x > l1/b/x && echo old > l1/c &&
        touch l2/a/.wh.1 l2/b/.wh..wh..opq && echo y > l2/b/y && echo new > l2/c && echo d > l2/d &&
        tar -C l1 -cf l1.tar . && tar -C l2 -cf l2.tar ."#,
        tmp.display()
    ));
    (tmp.join("l1.tar"), tmp.join("l2.tar"))
}

fn expected() -> BTreeMap<String, String> {
    [
        ("a", "DIR"),
        ("a/2", "two\n"),
        ("b", "DIR"),
        ("b/y", "y\n"),
        ("c", "new\n"),
        ("d", "d\n"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect()
}

fn config(diff_ids: &[castore::Digest]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": castore::host_arch(), "os": "linux",
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin", "LANG=C.UTF-8"], "Entrypoint": ["/bin/app"], "Cmd": ["--serve"], "WorkingDir": "/srv", "User": "1000:1000", "Labels": {"tier": "framework"}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids.iter().map(|d| d.to_string()).collect::<Vec<_>>()}
    }))
    .unwrap()
}

#[test]
fn oci_layout_with_whiteouts_merges_on_export() {
    let tmp = tempfile::Builder::new()
        .prefix("tide-oci")
        .tempdir_in("/var/tmp")
        .unwrap();
    let (l1, l2) = layers(tmp.path());
    let oci = tmp.path().join("oci");
    std::fs::create_dir_all(oci.join("blobs/sha256")).unwrap();
    let put = |bytes: &[u8]| {
        let d = castore::Digest::of(bytes);
        std::fs::write(oci.join("blobs/sha256").join(d.to_hex()), bytes).unwrap();
        d
    };
    // One layer gzip-compressed, one zstd: both are OCI media types.
    sh(&format!(
        "gzip -k {} && zstd -q -k {}",
        l1.display(),
        l2.display()
    ));
    let b1 = std::fs::read(tmp.path().join("l1.tar.gz")).unwrap();
    let b2 = std::fs::read(tmp.path().join("l2.tar.zst")).unwrap();
    let (d1, d2) = (put(&b1), put(&b2));
    let diff_ids = [
        castore::Digest::of(&std::fs::read(&l1).unwrap()),
        castore::Digest::of(&std::fs::read(&l2).unwrap()),
    ];
    let cfg = config(&diff_ids);
    let c = put(&cfg);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c.to_string(), "size": cfg.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d1.to_string(), "size": b1.len()},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": d2.to_string(), "size": b2.len()}
        ]
    });
    let m = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": m.to_string(), "size": 1, "annotations": {"org.opencontainers.image.ref.name": "app:v1"}}]});
    std::fs::write(oci.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(oci.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();

    let tide = Tide::new(tmp.path().join("store"));
    // The name comes from the layout's annotation.
    let r = tide.json(&["image", "import", oci.to_str().unwrap()]);
    assert_eq!(r["name"], "app:v1");
    let info = tide.json(&["image", "inspect", "app:v1"]);
    assert_eq!(info["layers"].as_array().unwrap().len(), 2);
    assert_eq!(
        info["layers"][1]["diff_id"],
        diff_ids[1].to_string().as_str()
    );
    assert_eq!(info["entrypoint"][0], "/bin/app");
    assert_eq!(info["workdir"], "/srv");
    assert_eq!(info["user"], "1000:1000");
    assert_eq!(info["env"][1], "LANG=C.UTF-8");
    let out = tmp.path().join("out");
    tide.ok(&["image", "export", "app:v1", "--to", out.to_str().unwrap()]);
    assert_eq!(listing(&out), expected());
    // The upper layer alone keeps its whiteout and opaque marker as OCI entries.
    let l2_out = tmp.path().join("l2-out");
    tide.ok(&[
        "layer",
        "export",
        info["layers"][1]["digest"].as_str().unwrap(),
        "--to",
        l2_out.to_str().unwrap(),
    ]);
    let l = listing(&l2_out);
    assert!(
        l.contains_key("a/.wh.1") && l.contains_key("b/.wh..wh..opq"),
        "{l:?}"
    );
    // Exported as a tar, the merged image is what GNU tar sees.
    let t = tmp.path().join("merged.tar");
    tide.ok(&["image", "export", "app:v1", "--to", t.to_str().unwrap()]);
    let names = sh(&format!("tar -tf {} | sort", t.display()));
    assert!(
        names.lines().any(|l| l == "a/2") && !names.contains("a/1") && !names.contains("b/x"),
        "{names}"
    );
}

#[test]
fn docker_save_archive_imports_with_its_repo_tag() {
    let tmp = tempfile::Builder::new()
        .prefix("tide-docker")
        .tempdir_in("/var/tmp")
        .unwrap();
    let (l1, l2) = layers(tmp.path());
    let d = tmp.path().join("save");
    std::fs::create_dir_all(d.join("aaa")).unwrap();
    std::fs::create_dir_all(d.join("bbb")).unwrap();
    std::fs::copy(&l1, d.join("aaa/layer.tar")).unwrap();
    std::fs::copy(&l2, d.join("bbb/layer.tar")).unwrap();
    let diff_ids = [
        castore::Digest::of(&std::fs::read(&l1).unwrap()),
        castore::Digest::of(&std::fs::read(&l2).unwrap()),
    ];
    std::fs::write(d.join("cfg.json"), config(&diff_ids)).unwrap();
    std::fs::write(
        d.join("manifest.json"),
        br#"[{"Config":"cfg.json","RepoTags":["library/app:v2"],"Layers":["aaa/layer.tar","bbb/layer.tar"]}]"#,
    )
    .unwrap();
    sh(&format!(
        "cd {} && tar -cf ../saved.tar manifest.json cfg.json aaa bbb",
        d.display()
    ));
    let tide = Tide::new(tmp.path().join("store"));
    let r = tide.json(&[
        "image",
        "import",
        tmp.path().join("saved.tar").to_str().unwrap(),
    ]);
    assert_eq!(r["name"], "library/app:v2");
    let out = tmp.path().join("out");
    tide.ok(&[
        "image",
        "export",
        "library/app:v2",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_eq!(listing(&out), expected());
    // --name overrides the archive's tag.
    let r = tide.json(&[
        "image",
        "import",
        tmp.path().join("saved.tar").to_str().unwrap(),
        "--name",
        "mine:1",
    ]);
    assert_eq!(r["name"], "mine:1");
    assert_eq!(r["new_chunks"], 0);
}
