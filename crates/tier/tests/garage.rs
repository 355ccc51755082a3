//! The S3 tier against a real Garage cluster (three nodes, replication 3): castore
//! stores push to it and pull from it lazily; a node killed mid-pull does not stop the
//! pull; a flipped object is an error naming the digest; a wrong key fails at open.

use castore::{ExportTarget, ImportOptions, ObjectKind, Store, TierProgress, object_key, testing};
use tier::testing::Garage;

fn tree(root: &std::path::Path) {
    std::fs::create_dir_all(root.join("usr/lib")).unwrap();
    for i in 0..40u64 {
        std::fs::write(
            root.join(format!("usr/lib/f{i}")),
            testing::noise(((i % 7) as usize + 1) * 100_000, i),
        )
        .unwrap();
    }
    std::fs::write(root.join("hello"), b"hello from the tier\n").unwrap();
}

#[test]
fn garage_holds_a_pushed_image_that_another_host_reads_lazily_through_a_node_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Garage::start(dir.path(), 3).unwrap();
    let src = dir.path().join("src");
    tree(&src);
    let a = Store::open(dir.path().join("a")).unwrap();
    a.set_tier(tier::open(&g.config(0, "fleet")).unwrap())
        .unwrap();
    a.import_image(&src, Some("app:1"), &ImportOptions::default())
        .unwrap();
    let pushed = a.push_image("app:1", &TierProgress::default()).unwrap();
    assert!(pushed.transferred > 40, "{pushed:?}");

    // Host B talks to node 1; node 2 dies during its reads (two replicas of three are
    // a quorum).
    let b = Store::open(dir.path().join("b")).unwrap();
    let t = tier::open(&g.config(1, "fleet")).unwrap();
    b.set_tier(t.clone()).unwrap();
    let pulled = b
        .pull_image("app:1", false, &TierProgress::default())
        .unwrap();
    assert_eq!(pulled.image, pushed.image);
    assert!(pulled.chunks_remote > 40);
    let out = dir.path().join("out");
    let fetched = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            b.export_image(&pulled.image, &ExportTarget::Dir(out.clone()))
                .unwrap();
        });
        // Kill node 2 once B has fetched some chunks, while it fetches the rest.
        while b.fetched().objects < 10 && !reader.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let at_kill = b.fetched().objects;
        g.kill(2);
        reader.join().unwrap();
        at_kill
    });
    assert!(
        b.fetched().objects > fetched,
        "chunks were fetched after the kill"
    );
    for i in 0..40 {
        let rel = format!("usr/lib/f{i}");
        assert_eq!(
            std::fs::read(out.join(&rel)).unwrap(),
            std::fs::read(src.join(&rel)).unwrap(),
            "{rel}"
        );
    }
    assert!(b.fsck().unwrap().is_clean());

    // A flipped object: an error naming the digest, nothing stored.
    let chunk = testing::chunk_digests(&a).unwrap()[5];
    let key = object_key(ObjectKind::Chunk, &chunk);
    let mut v = t.get(&key).unwrap().unwrap();
    let at = v.len() - 1;
    v[at] ^= 1;
    t.put(&key, &v).unwrap();
    let c = Store::open(dir.path().join("c")).unwrap();
    c.set_tier(t.clone()).unwrap();
    c.pull_image("app:1", false, &TierProgress::default())
        .unwrap();
    let e = c.chunk(&chunk).unwrap_err().to_string();
    assert!(
        e.contains(&chunk.to_string()) && e.contains("corrupt"),
        "{e}"
    );
    assert!(!c.has_chunk(&chunk).unwrap());

    // A wrong secret: refused when the tier is opened.
    let mut bad = g.config(0, "fleet");
    let creds = dir.path().join("bad-credentials");
    std::fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            g.key_id,
            "0".repeat(64)
        ),
    )
    .unwrap();
    bad.credentials = Some(creds);
    let e = format!("{:#}", tier::open(&bad).unwrap_err());
    assert!(e.contains("s3://tidedge/fleet"), "{e}");
    eprintln!("a wrong secret: {e}");
}
