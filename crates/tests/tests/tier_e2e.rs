//! The chunk tier end to end: two `volumed` hosts with separate stores and one Garage
//! cluster (three nodes, replication 3). Host A imports a real Debian root and publishes
//! it; A is then killed -9 and a Garage node dies; host B, which never had the image,
//! mounts it by name: it pulls the records, reads a few files fetching only their
//! chunks (`tide stats` says how many bytes), then the whole tree, identical to the
//! source. Host C does the same with a cache limit an eighth of the image's size: its
//! evictor runs while the tree is read, and every byte is still right.
//!
//! Needs FUSE (`/dev/fuse`, root), `garage` (built by .ci/run) and the minbase root.

use std::time::{Duration, Instant};

use tests::volumed::Volumed;
use tests::{roots, tmpdir};
use tier::testing::Garage;

fn tier_args(g: &Garage, node: usize) -> Vec<String> {
    let c = g.config(node, "e2e");
    vec![
        "--tier".into(),
        c.url,
        "--tier-endpoint".into(),
        c.endpoint.unwrap(),
        "--tier-region".into(),
        c.region.unwrap(),
        "--tier-credentials".into(),
        c.credentials.unwrap().display().to_string(),
    ]
}

fn tier_stats(v: &Volumed) -> serde_json::Value {
    v.tide().json(&["stats"])["tier"].clone()
}

#[test]
fn a_host_that_never_had_an_image_mounts_it_from_the_tier() {
    let src = roots::debian_root("minbase");
    let tmp = tmpdir("tide-tier-e2e");
    let mut g = Garage::start(tmp.path(), 3).unwrap();

    // Host A imports; a tiered host publishes what it imports, in the background.
    let a = Volumed::start_with(
        tmp.path().join("a"),
        tmp.path().join("a.sock"),
        &tier_args(&g, 0),
    );
    a.tide()
        .ok(&["image", "import", src.to_str().unwrap(), "--name", "deb:12"]);
    let start = Instant::now();
    while !a.log_text().contains("published deb:12") {
        assert!(!a.log_text().contains("failed"), "{}", a.log_text());
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "not published: {}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A second push finds everything there.
    let again = a.tide().json(&["image", "push", "deb:12"]);
    assert_eq!(again["report"]["transferred"], 0, "{again}");
    assert!(
        again["report"]["skipped"].as_u64().unwrap() > 1000,
        "{again}"
    );
    let image_stored = a.tide().json(&["stats"])["image_data"]["stored_bytes"]
        .as_u64()
        .unwrap();

    // A dies with its store; one Garage node of three goes too.
    a.signal_and_wait(libc::SIGKILL);
    g.kill(2);

    // Host B, an empty store on another Garage node.
    let b = Volumed::start_with(
        tmp.path().join("b"),
        tmp.path().join("b.sock"),
        &tier_args(&g, 1),
    );
    let tide = b.tide();
    let e = tide.fails(&["mount", "nothere:1", "/tmp"]);
    assert!(e.contains("nothere:1") && e.contains("tier"), "{e}");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _unmount = tests::UnmountBelow(mnt.clone());
    tide.ok(&["mount", "deb:12", mnt.to_str().unwrap()]);
    assert!(b.log_text().contains("pulled image deb:12 from the tier"));
    let before = tier_stats(&b);
    assert!(before["remote_chunks"].as_u64().unwrap() > 100, "{before}");

    // A few files: only their chunks are fetched.
    for f in ["etc/os-release", "usr/bin/dpkg", "usr/lib/os-release"] {
        assert_eq!(
            std::fs::read(mnt.join(f)).unwrap(),
            std::fs::read(src.join(f)).unwrap(),
            "{f}"
        );
    }
    let some = tier_stats(&b);
    let fetched = some["fetched_bytes"].as_u64().unwrap();
    assert!(fetched > 0, "{some}");
    assert!(
        fetched < image_stored / 10,
        "three files fetched {fetched} of the image's {image_stored} bytes"
    );
    eprintln!("three files: {fetched} bytes fetched of {image_stored} stored");

    // The whole tree: every byte from the tier, identical to the source.
    tests::fstree::assert_same(&src, &mnt);
    let all = tier_stats(&b);
    assert_eq!(all["remote_chunks"], 0, "{all}");
    let f = tide.json(&["fsck"]);
    assert_eq!(f["problems"], serde_json::json!([]), "{f}");
    tide.ok(&["umount", mnt.to_str().unwrap()]);

    // Host C keeps at most 8 MiB of chunks, an eighth of the image: the whole tree read
    // through it is still identical, while its evictor removes what was read earlier.
    let limit: u64 = 8 << 20;
    let mut args = tier_args(&g, 0);
    args.extend(["--cache-size".to_string(), "8M".to_string()]);
    let c = Volumed::start_with(tmp.path().join("c"), tmp.path().join("c.sock"), &args);
    let mnt_c = tmp.path().join("mnt-c");
    std::fs::create_dir(&mnt_c).unwrap();
    let _unmount_c = tests::UnmountBelow(mnt_c.clone());
    c.tide().ok(&["mount", "deb:12", mnt_c.to_str().unwrap()]);
    tests::fstree::assert_same(&src, &mnt_c);
    let start = Instant::now();
    let settled = loop {
        let s = tier_stats(&c);
        if s["local_bytes"].as_u64().unwrap() <= limit {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "still over the limit: {s}\n{}",
            c.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("host C, 8 MiB cache limit, after the whole tree: {settled}");
    assert_eq!(settled["cache_limit"], limit, "{settled}");
    assert!(
        settled["evicted_chunks"].as_u64().unwrap() > 100,
        "{settled}"
    );
    assert!(
        settled["fetched_bytes"].as_u64().unwrap() > limit * 4,
        "{settled}"
    );
    assert!(c.log_text().contains("cache: evicted"), "{}", c.log_text());
    let f = c.tide().json(&["fsck"]);
    assert_eq!(f["problems"], serde_json::json!([]), "{f}");
    // Files whose chunks were evicted read right again (fetched anew).
    for f in ["usr/bin/dpkg", "usr/bin/bash"] {
        assert_eq!(
            std::fs::read(mnt_c.join(f)).unwrap(),
            std::fs::read(src.join(f)).unwrap(),
            "{f}"
        );
    }
    c.tide().ok(&["umount", mnt_c.to_str().unwrap()]);
}
