//! `tide image pull REGISTRY/REPO:TAG` against a real registry: Debian's docker-registry
//! (the CNCF distribution registry) on loopback, with token auth from a token service
//! that signs real JWTs, fed with images pushed by our own upload code. A Debian root
//! pulled through `volumed` comes out byte for byte; a second image sharing its base
//! layer downloads only its own layer; damaged documents and blobs are refused with the
//! digest named and nothing stored.

use std::path::Path;

use registry::testing::{
    Registry, TestLayer, TokenServer, push_docker_image, push_image, push_index,
};
use registry::{Credentials, media};
use tests::fstree::assert_same;
use tests::tide::sh;
use tests::tmpdir;
use tests::volumed::Volumed;

fn alice() -> Credentials {
    Credentials::parse("alice:s3cret:with-colon").unwrap()
}

/// A tar of a small tree (a file `app/NAME.txt` holding `text`) at `tmp/NAME.tar`.
fn small_tar(tmp: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let dir = tmp.join(format!("{name}.d"));
    std::fs::create_dir_all(dir.join("app")).unwrap();
    std::fs::write(dir.join(format!("app/{name}.txt")), text).unwrap();
    let tar = tmp.join(format!("{name}.tar"));
    tests::oci::tar(&dir, None, &tar);
    tar
}

fn images(v: &Volumed) -> Vec<String> {
    v.tide()
        .json(&["image", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_debian_image_pulled_through_token_auth_is_the_root_and_shared_layers_are_not_fetched_again() {
    let tmp = tmpdir("tide-registry-");
    let t = tmp.path();
    let tokens = TokenServer::start(&t.join("token"), alice());
    let reg = Registry::start(&t.join("registry"), Some(&tokens));

    // The base layer is a real Debian root (gzip, as registries mostly serve), the app
    // layer small and zstd; an arm64 image beside the amd64 one under one index.
    let minbase = tests::roots::debian_root("minbase");
    let base_tar = t.join("minbase.tar");
    tests::oci::tar(&minbase, None, &base_tar);
    let base = TestLayer::from_tar(&base_tar, "gzip");
    let app = TestLayer::from_tar(&small_tar(t, "hello", "hello from the app layer\n"), "zstd");
    let other = TestLayer::from_tar(&small_tar(t, "arm", "not for this machine\n"), "none");
    let pusher = reg.client("debian/minbase", Some(alice()));
    let amd64 = push_image(
        &pusher,
        castore::host_arch(),
        std::slice::from_ref(&base),
        &["/bin/sh"],
    );
    let arm64 = push_image(&pusher, "arm64", std::slice::from_ref(&other), &["/bin/sh"]);
    push_index(
        &pusher,
        "12",
        &[(&arm64, "arm64"), (&amd64, castore::host_arch())],
    );
    let app_pusher = reg.client("shop/app", Some(alice()));
    let app_image = push_image(
        &app_pusher,
        castore::host_arch(),
        &[base.clone(), app.clone()],
        &["/app/run"],
    );
    let status = sh(&format!(
        "curl -s -o /dev/null -w '%{{http_code}}' http://{}/v2/shop/app/manifests/{}",
        reg.host, app_image.digest
    ));
    assert_eq!(status.trim(), "401", "the registry must demand a token");
    // The same manifest again under a tag (pushed by digest above).
    app_pusher
        .push_manifest("1", media::OCI_MANIFEST, &app_image.bytes)
        .unwrap();

    let v = Volumed::start(t.join("data"), t.join("volumed.sock"));
    let tide = v.tide();
    let reference = format!("{}/debian/minbase:12", reg.host);

    // No credentials, then wrong ones: clear errors, nothing stored, daemon serving.
    let err = tide.fails(&[
        "image",
        "pull",
        &reference,
        "--authfile",
        "/nonexistent/auth.json",
    ]);
    assert!(
        err.contains("wants credentials") && err.contains("--creds"),
        "{err}"
    );
    let err = tide.fails(&["image", "pull", &reference, "--creds", "alice:wrong"]);
    assert!(err.contains("refused the credentials of alice"), "{err}");
    assert!(images(&v).is_empty());

    // With an auth file, as `docker login` writes it.
    let authfile = t.join("auth.json");
    let b64 = sh(&format!(
        "printf '%s' '{}:{}' | base64 -w0",
        alice().username,
        alice().password
    ));
    std::fs::write(
        &authfile,
        format!(r#"{{"auths": {{"{}": {{"auth": "{b64}"}}}}}}"#, reg.host),
    )
    .unwrap();
    let r = tide.json(&[
        "image",
        "pull",
        &reference,
        "--authfile",
        authfile.to_str().unwrap(),
    ]);
    assert_eq!(r["manifest"], amd64.digest.to_string(), "{r}");
    assert_eq!(r["platform"], format!("linux/{}", castore::host_arch()));
    assert_eq!(r["layers"], 1);
    assert_eq!(r["layers_reused"], 0);
    assert_eq!(r["fetched_bytes"], base.blob.len() as u64);
    assert_eq!(r["import"]["name"], "debian/minbase:12");
    assert!(tokens.issued.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    let out = t.join("out");
    tide.ok(&[
        "image",
        "export",
        "debian/minbase:12",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_same(&minbase, &out);
    let inspect = tide.json(&["image", "inspect", "debian/minbase:12"]);
    assert_eq!(
        inspect["layers"][0]["diff_id"],
        base.diff_id.to_string(),
        "{inspect}"
    );

    // The app image shares the base layer: only its own small layer is downloaded.
    let app_ref = format!("{}/shop/app:1", reg.host);
    let pull_app = [
        "image",
        "pull",
        &app_ref,
        "--creds",
        "alice:s3cret:with-colon",
        "--name",
        "app:v1",
    ];
    let r = tide.json(&pull_app);
    assert_eq!(r["layers"], 2, "{r}");
    assert_eq!(r["layers_reused"], 1, "{r}");
    assert_eq!(r["fetched_bytes"], app.blob.len() as u64, "{r}");
    assert_eq!(r["import"]["layers"][0], inspect["layers"][0]["digest"]);
    // Pulled again: nothing downloaded, the same image.
    let again = tide.json(&pull_app);
    assert_eq!(again["layers_reused"], 2, "{again}");
    assert_eq!(again["fetched_bytes"], 0, "{again}");
    assert_eq!(again["import"]["image"], r["import"]["image"]);
    let detail = tide.json(&["image", "inspect", "app:v1"]);
    assert_eq!(detail["cmd"], serde_json::json!(["/app/run"]), "{detail}");
    let app_out = t.join("app-out");
    tide.ok(&[
        "image",
        "export",
        "app:v1",
        "--to",
        app_out.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_to_string(app_out.join("app/hello.txt")).unwrap(),
        "hello from the app layer\n"
    );
    assert!(app_out.join("usr/bin/dpkg").is_file());
    let fsck = tide.json(&["fsck"]);
    assert_eq!(fsck["problems"].as_array().map(Vec::len), Some(0), "{fsck}");
}

#[test]
fn damaged_manifests_and_blobs_and_missing_platforms_are_refused_and_nothing_is_stored() {
    let tmp = tmpdir("tide-registry-bad-");
    let t = tmp.path();
    let reg = Registry::start(&t.join("registry"), None);
    let c = reg.client("bad/img", None);
    let layer = TestLayer::from_tar(&small_tar(t, "data", &"0123456789".repeat(5000)), "none");
    let image = push_image(
        &c,
        castore::host_arch(),
        std::slice::from_ref(&layer),
        &["/bin/true"],
    );
    push_index(&c, "indexed", &[(&image, castore::host_arch())]);
    let only_arm = push_image(&c, "arm64", std::slice::from_ref(&layer), &["/bin/true"]);
    push_index(&c, "arm-only", &[(&only_arm, "arm64")]);

    let v = Volumed::start(t.join("data"), t.join("volumed.sock"));
    let tide = v.tide();
    let at = |tag: &str| format!("{}/bad/img:{tag}", reg.host);

    let err = tide.fails(&["image", "pull", &at("nosuch")]);
    assert!(err.contains("MANIFEST_UNKNOWN"), "{err}");
    let err = tide.fails(&["image", "pull", &at("arm-only")]);
    assert!(
        err.contains(&format!("no image for linux/{}", castore::host_arch()))
            && err.contains("linux/arm64"),
        "{err}"
    );

    // The manifest the index names, changed on the registry's disk (still valid JSON):
    // its bytes no longer hash to the digest the index gives.
    let manifest_file = reg.blob_file(&image.digest);
    let good_manifest = std::fs::read(&manifest_file).unwrap();
    let text = String::from_utf8(good_manifest.clone()).unwrap();
    assert!(text.contains(r#""schemaVersion":2"#));
    std::fs::write(
        &manifest_file,
        text.replacen(r#""schemaVersion":2"#, r#""schemaVersion": 2"#, 1),
    )
    .unwrap();
    let err = tide.fails(&["image", "pull", &at("indexed")]);
    assert!(
        err.contains("refusing it") && err.contains(&image.digest.to_string()),
        "{err}"
    );
    std::fs::write(&manifest_file, &good_manifest).unwrap();

    // A flipped byte in the layer blob: its content no longer matches the manifest.
    let blob_file = reg.blob_file(&layer.diff_id);
    let good_blob = std::fs::read(&blob_file).unwrap();
    let mut flipped = good_blob.clone();
    let at_content = flipped
        .windows(10)
        .position(|w| w == b"0123456789")
        .expect("the file's bytes in the tar");
    flipped[at_content + 1000] ^= 0x20;
    std::fs::write(&blob_file, &flipped).unwrap();
    let err = tide.fails(&["image", "pull", &at("indexed"), "--name", "bad:1"]);
    assert!(
        err.contains(&layer.diff_id.to_string()) && err.contains("the manifest says"),
        "{err}"
    );

    // A truncated blob: the download ends early and cannot be resumed past the end.
    std::fs::write(&blob_file, &good_blob[..good_blob.len() / 2]).unwrap();
    let err = tide.fails(&["image", "pull", &at("indexed"), "--name", "bad:1"]);
    assert!(
        err.contains(&layer.diff_id.to_string()) && err.contains("could not be resumed"),
        "{err}"
    );
    assert!(images(&v).is_empty(), "a refused pull stored an image");

    // Restored, the same pull works: the daemon served on, and the store is whole.
    std::fs::write(&blob_file, &good_blob).unwrap();
    let r = tide.json(&["image", "pull", &at("indexed"), "--name", "good:1"]);
    assert_eq!(r["manifest"], image.digest.to_string());
    assert_eq!(images(&v), ["good:1"]);
    let fsck = tide.json(&["fsck"]);
    assert_eq!(fsck["problems"].as_array().map(Vec::len), Some(0), "{fsck}");
    // A pull by digest alone needs a name; with one it is checked against that digest.
    let by_digest = format!("{}/bad/img@{}", reg.host, image.digest);
    let err = tide.fails(&["image", "pull", &by_digest]);
    assert!(err.contains("--name"), "{err}");
    tide.ok(&["image", "pull", &by_digest, "--name", "pinned:1"]);

    // Docker's media types (as `docker push` writes them), into a store opened by the
    // CLI itself (`--store`): the same pull code, no daemon.
    let gz = TestLayer::from_tar(&small_tar(t, "docker", "pushed the docker way\n"), "gzip");
    let docker = push_docker_image(
        &c,
        castore::host_arch(),
        std::slice::from_ref(&gz),
        &["/bin/true"],
    );
    c.push_manifest("docker", media::DOCKER_MANIFEST, &docker.bytes)
        .unwrap();
    let local = tests::tide::Tide::new(t.join("local-store"));
    let r = local.json(&["image", "pull", &at("docker")]);
    assert_eq!(r["manifest"], docker.digest.to_string(), "{r}");
    assert_eq!(r["import"]["name"], "bad/img:docker");
    let out = t.join("docker-out");
    local.ok(&[
        "image",
        "export",
        "bad/img:docker",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_to_string(out.join("app/docker.txt")).unwrap(),
        "pushed the docker way\n"
    );
}
