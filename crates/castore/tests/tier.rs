//! The chunk tier through castore's public API: an image pushed from one real store and
//! pulled into another, whose chunks come lazily (one GET for concurrent readers of one
//! chunk), verified; damaged tier objects are errors naming the digest and store nothing.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use castore::{
    DirTier, Error, ExportTarget, ImportOptions, ObjectKind, Store, Tier, TierError, TierProgress,
    object_key, testing,
};

/// A directory tier that counts GETs per key and can be told to stall them.
#[derive(Debug)]
struct Counting {
    inner: DirTier,
    gets: Mutex<std::collections::HashMap<String, u64>>,
    delay_ms: AtomicU64,
}

impl Counting {
    fn gets(&self, prefix: &str) -> u64 {
        let g = self.gets.lock().unwrap();
        g.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, n)| n)
            .sum()
    }
}

impl Tier for Counting {
    fn url(&self) -> &str {
        self.inner.url()
    }
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, TierError> {
        *self
            .gets
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_default() += 1;
        std::thread::sleep(std::time::Duration::from_millis(
            self.delay_ms.load(Ordering::Relaxed),
        ));
        self.inner.get(key)
    }
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), TierError> {
        self.inner.put(key, bytes)
    }
}

/// A tree of files: small (inline), one-chunk and multi-chunk (random, so nothing
/// dedups or compresses), a text file, a symlink and a nested directory.
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("etc/deep/er")).unwrap();
    std::fs::write(root.join("etc/hostname"), b"tier\n").unwrap();
    std::fs::write(root.join("etc/deep/er/one"), testing::noise(40 << 10, 1)).unwrap();
    std::fs::write(root.join("big"), testing::noise(3 << 20, 2)).unwrap();
    let text: Vec<u8> = b"the same line again\n"
        .iter()
        .copied()
        .cycle()
        .take(1 << 20)
        .collect();
    std::fs::write(root.join("etc/text"), text).unwrap();
    std::os::unix::fs::symlink("etc/hostname", root.join("link")).unwrap();
}

fn same_files(a: &Path, b: &Path) {
    for rel in ["etc/hostname", "etc/deep/er/one", "big", "etc/text"] {
        assert_eq!(
            std::fs::read(a.join(rel)).unwrap(),
            std::fs::read(b.join(rel)).unwrap(),
            "{rel}"
        );
    }
    assert_eq!(
        std::fs::read_link(b.join("link")).unwrap(),
        Path::new("etc/hostname")
    );
}

struct Two {
    dir: tempfile::TempDir,
    a: Store,
    b: Store,
    tier: Arc<Counting>,
}

fn two_hosts() -> Two {
    let dir = tempfile::tempdir().unwrap();
    let tier = Arc::new(Counting {
        inner: DirTier::open(dir.path().join("tier")).unwrap(),
        gets: Mutex::default(),
        delay_ms: AtomicU64::new(0),
    });
    let a = Store::open(dir.path().join("a")).unwrap();
    let b = Store::open(dir.path().join("b")).unwrap();
    a.set_tier(tier.clone()).unwrap();
    b.set_tier(tier.clone()).unwrap();
    make_tree(&dir.path().join("src"));
    a.import_image(
        &dir.path().join("src"),
        Some("app:1"),
        &ImportOptions::default(),
    )
    .unwrap();
    Two { dir, a, b, tier }
}

#[test]
fn a_pushed_image_is_pulled_lazily_and_reads_the_same() {
    let t = two_hosts();
    let p = TierProgress::default();
    let pushed = t.a.push_image("app:1", &p).unwrap();
    assert_eq!(pushed.name.as_deref(), Some("app:1"));
    assert!(pushed.transferred > 5 && pushed.skipped == 0, "{pushed:?}");
    assert_eq!(p.done.load(Ordering::Relaxed), pushed.objects);
    // A second push finds everything there.
    let again = t.a.push_image("app:1", &TierProgress::default()).unwrap();
    assert_eq!((again.transferred, again.skipped), (0, pushed.objects));

    // Host B: records only (one GET for the name, one for the pack), chunks stay remote.
    let pulled =
        t.b.pull_image("app:1", false, &TierProgress::default())
            .unwrap();
    assert_eq!(pulled.image, pushed.image);
    assert_eq!(t.tier.gets("refs/") + t.tier.gets("packs/"), 2);
    assert_eq!(t.tier.gets("trees/") + t.tier.gets("blobs/"), 0);
    assert!(pulled.chunks_remote > 40, "{pulled:?}");
    assert_eq!(t.tier.gets("chunks/"), 0);
    assert_eq!(t.b.resolve_image("app:1").unwrap(), pushed.image);
    // fsck: the chunks only the tier holds are a cache's, not damage.
    let f = t.b.fsck().unwrap();
    assert!(f.is_clean(), "{:?}", f.problems);

    // Reading fetches each chunk once, verified.
    let out = t.dir.path().join("out");
    t.b.export_image(&pulled.image, &ExportTarget::Dir(out.clone()))
        .unwrap();
    same_files(&t.dir.path().join("src"), &out);
    let fetched = t.tier.gets("chunks/");
    assert_eq!(fetched, pulled.chunks_remote);
    let out2 = t.dir.path().join("out2");
    t.b.export_image(&pulled.image, &ExportTarget::Dir(out2.clone()))
        .unwrap();
    assert_eq!(t.tier.gets("chunks/"), fetched, "read again from the cache");
    assert!(t.b.fetched().bytes > 3 << 20);
}

#[test]
fn a_full_pull_brings_every_chunk_and_concurrent_readers_share_one_fetch() {
    let t = two_hosts();
    t.a.push_image("app:1", &TierProgress::default()).unwrap();
    let r =
        t.b.pull_image("app:1", true, &TierProgress::default())
            .unwrap();
    assert_eq!(r.chunks_remote, 0);
    assert!(r.content_bytes >= 4 << 20, "{r:?}");
    let n = t.tier.gets("chunks/");
    assert!(n > 40);

    // A third host: eight threads read the same chunk while the tier is slow.
    let c = Store::open(t.dir.path().join("c")).unwrap();
    c.set_tier(t.tier.clone()).unwrap();
    c.pull_image("app:1", false, &TierProgress::default())
        .unwrap();
    let chunk = testing::chunk_digests(&t.a).unwrap()[0];
    t.tier.delay_ms.store(300, Ordering::Relaxed);
    let want = t.a.chunk(&chunk).unwrap();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| assert_eq!(c.chunk(&chunk).unwrap(), want));
        }
    });
    assert_eq!(
        t.tier.gets(&object_key(ObjectKind::Chunk, &chunk)),
        2,
        "B's full pull and one fetch for C's eight readers"
    );
}

#[test]
fn damaged_tier_objects_are_errors_naming_the_digest_and_store_nothing() {
    let t = two_hosts();
    t.a.push_image("app:1", &TierProgress::default()).unwrap();
    t.b.pull_image("app:1", false, &TierProgress::default())
        .unwrap();
    let chunks = testing::chunk_digests(&t.a).unwrap();
    let tier_dir = t.dir.path().join("tier");
    // One object with a flipped byte, one truncated, one gone.
    let flip = tier_dir.join(object_key(ObjectKind::Chunk, &chunks[0]));
    let mut v = std::fs::read(&flip).unwrap();
    let at = v.len() / 2;
    v[at] ^= 0x40;
    std::fs::write(&flip, v).unwrap();
    let cut = tier_dir.join(object_key(ObjectKind::Chunk, &chunks[1]));
    let v = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &v[..v.len() / 3]).unwrap();
    std::fs::remove_file(tier_dir.join(object_key(ObjectKind::Chunk, &chunks[2]))).unwrap();
    for (i, want) in [(0, "corrupt"), (1, "corrupt"), (2, "missing")] {
        let e = t.b.chunk(&chunks[i]).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&chunks[i].to_string()) && msg.contains(want),
            "{msg}"
        );
        assert!(msg.contains("tier"), "{msg}");
        assert!(!t.b.has_chunk(&chunks[i]).unwrap(), "nothing stored");
        assert!(matches!(
            e.root(),
            Error::Corrupt { .. } | Error::Missing { .. }
        ));
    }
    // The others still read.
    assert_eq!(
        t.b.chunk(&chunks[3]).unwrap(),
        t.a.chunk(&chunks[3]).unwrap()
    );

    // A pack with a flipped byte: refused, naming its key; no name is set.
    let c = Store::open(t.dir.path().join("c")).unwrap();
    c.set_tier(t.tier.clone()).unwrap();
    let image = t.a.resolve_image("app:1").unwrap();
    let pack = tier_dir.join(format!("packs/{}", image.to_hex()));
    let mut v = std::fs::read(&pack).unwrap();
    v.truncate(v.len() - 7);
    std::fs::write(&pack, v).unwrap();
    let e = c
        .pull_image("app:1", false, &TierProgress::default())
        .unwrap_err();
    assert!(e.to_string().contains("packs/"), "{e}");
    assert!(c.resolve_image("app:1").is_err());
    // Without the pack, records come one by one, each verified.
    std::fs::remove_file(&pack).unwrap();
    let r = c
        .pull_image("app:1", false, &TierProgress::default())
        .unwrap();
    assert_eq!(r.image, image);
    assert!(t.tier.gets("trees/") > 3);
    // A name pointing at something that is not a digest.
    t.tier.put("refs/bad:1", b"hello").unwrap();
    let e = c
        .pull_image("bad:1", false, &TierProgress::default())
        .unwrap_err();
    assert!(e.to_string().contains("not an image digest"), "{e}");
    let e = c
        .pull_image("nothere:1", false, &TierProgress::default())
        .unwrap_err();
    assert!(e.to_string().contains("nothere:1"), "{e}");
}

#[test]
fn a_store_without_a_tier_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path().join("s")).unwrap();
    let e = s
        .pull_image("app:1", false, &TierProgress::default())
        .unwrap_err();
    assert!(e.to_string().contains("--tier"), "{e}");
}

#[test]
fn the_first_cold_host_records_what_it_reads_and_the_next_prefetches_it() {
    let t = two_hosts();
    t.a.push_image("app:1", &TierProgress::default()).unwrap();
    let d =
        t.b.pull_image("app:1", false, &TierProgress::default())
            .unwrap()
            .image;
    assert!(t.b.record_reads(&d).unwrap());
    assert!(!t.b.record_reads(&d).unwrap(), "already recording");
    // B reads one multi-chunk file (by reading each of its chunks, as a mount would).
    let read: Vec<_> = testing::chunk_digests(&t.a)
        .unwrap()
        .into_iter()
        .take(7)
        .collect();
    for c in &read {
        t.b.chunk(c).unwrap();
    }
    assert_eq!(t.b.finish_reads(&d).unwrap(), 7);
    assert_eq!(t.b.finish_reads(&d).unwrap(), 0, "no recording any more");
    // The tier has a read set now: a later host does not record, it prefetches.
    let c = Store::open(t.dir.path().join("c")).unwrap();
    c.set_tier(t.tier.clone()).unwrap();
    c.pull_image("app:1", false, &TierProgress::default())
        .unwrap();
    assert!(!c.record_reads(&d).unwrap());
    let set = c.readset(&d).unwrap();
    let mut want = read.clone();
    want.sort();
    let mut got = set.clone();
    got.sort();
    assert_eq!(got, want);
    assert_eq!(c.prefetch(&set).unwrap(), 7);
    for x in &read {
        assert!(c.has_chunk(x).unwrap());
    }
    assert!(c.readset(&d).unwrap().is_empty(), "all of it is here now");
    // A read set that is not a list of digests is an error naming it.
    t.tier
        .put(&format!("readsets/{}", d.to_hex()), b"short")
        .unwrap();
    let e = c.readset(&d).unwrap_err().to_string();
    assert!(e.contains("readsets/") && e.contains("not a list"), "{e}");
}

/// Stored bytes of the chunks `s` holds, as `stats` counts them.
fn local_bytes(s: &Store) -> u64 {
    s.stats().unwrap().store.stored_bytes
}

#[test]
fn a_cache_limit_evicts_least_recently_used_tiered_chunks_and_reads_stay_right() {
    let t = two_hosts();
    t.a.push_image("app:1", &TierProgress::default()).unwrap();
    let image =
        t.b.pull_image("app:1", true, &TierProgress::default())
            .unwrap()
            .image;
    let full = local_bytes(&t.b);
    assert!(full > 3 << 20, "{full}");
    // No limit: nothing happens.
    assert_eq!(t.b.evict().unwrap().evicted_chunks, 0);

    t.b.set_cache_limit(Some(full / 2));
    // Under the limit's eyes, the chunks of one file are read last: they are the most
    // recently used and must survive.
    let mut chunks = testing::chunk_digests(&t.a).unwrap();
    chunks.sort();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let recent = &chunks[..4];
    for c in recent {
        t.b.chunk(c).unwrap();
    }
    let r = t.b.evict().unwrap();
    assert!(r.evicted_chunks > 0, "{r:?}");
    assert_eq!(r.local_bytes, full);
    assert!(r.remaining_bytes <= full / 2 / 100 * 80, "{r:?}");
    assert_eq!(local_bytes(&t.b), r.remaining_bytes);
    assert!(!r.over_limit());
    for c in recent {
        assert!(t.b.has_chunk(c).unwrap(), "recently read {c} was evicted");
    }
    let s = t.b.stats().unwrap().tier.unwrap();
    assert_eq!(
        (s.evicted_chunks, s.evicted_bytes),
        (r.evicted_chunks, r.evicted_bytes)
    );
    assert_eq!(s.cache_limit, Some(full / 2));
    assert!(s.remote_chunks >= r.evicted_chunks, "{s:?}");
    // Under the limit now: a second pass evicts nothing.
    assert_eq!(t.b.evict().unwrap().evicted_chunks, 0);
    // fsck: evicted chunks are the tier's, not damage; every byte reads back.
    assert!(t.b.fsck().unwrap().is_clean());
    let before = t.tier.gets("chunks/");
    let out = t.dir.path().join("out");
    t.b.export_image(&image, &ExportTarget::Dir(out.clone()))
        .unwrap();
    same_files(&t.dir.path().join("src"), &out);
    assert!(
        t.tier.gets("chunks/") - before >= r.evicted_chunks,
        "evicted chunks are fetched again"
    );
}

#[test]
fn chunks_not_in_the_tier_and_volume_chunks_are_never_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let tier = Arc::new(DirTier::open(dir.path().join("tier")).unwrap());
    let s = Arc::new(Store::open(dir.path().join("s")).unwrap());
    s.set_tier(tier.clone()).unwrap();
    make_tree(&dir.path().join("src"));
    s.import_image(
        &dir.path().join("src"),
        Some("app:1"),
        &ImportOptions::default(),
    )
    .unwrap();
    // A one-byte limit, nothing pushed yet: everything is pinned.
    s.set_cache_limit(Some(1));
    let r = s.evict().unwrap();
    assert_eq!((r.evicted_chunks, r.evictable_bytes), (0, 0), "{r:?}");
    assert!(r.over_limit());
    // A volume's chunks are pinned: volumes are local-only. The image's go once pushed.
    s.create_volume(&castore::VolumeSpec::new("v", 8 << 20))
        .unwrap();
    let v = s.open_volume("v").unwrap();
    let data = testing::noise(1 << 20, 99);
    v.write(0, &data, true).unwrap();
    s.push_image("app:1", &TierProgress::default()).unwrap();
    let st = s.stats().unwrap().tier.unwrap();
    assert!(st.pinned_bytes >= 1 << 20, "{st:?}");
    assert!(st.tiered_bytes > 3 << 20, "{st:?}");
    assert_eq!(st.local_bytes, st.tiered_bytes + st.pinned_bytes);
    let r = s.evict().unwrap();
    assert_eq!(r.evictable_bytes, st.tiered_bytes, "{r:?}");
    assert_eq!(r.evicted_bytes, st.tiered_bytes, "{r:?}");
    assert!(r.over_limit(), "the volume's chunks stay: {r:?}");
    assert_eq!(r.remaining_bytes, st.pinned_bytes, "{r:?}");
    assert_eq!(v.read(0, data.len()).unwrap(), data);
    // The image reads from the tier again.
    let out = dir.path().join("out");
    s.export_image(
        &s.resolve_image("app:1").unwrap(),
        &ExportTarget::Dir(out.clone()),
    )
    .unwrap();
    same_files(&dir.path().join("src"), &out);
    assert!(s.fsck().unwrap().is_clean());
}

#[test]
fn eviction_under_concurrent_readers_returns_the_right_bytes() {
    let t = two_hosts();
    t.a.push_image("app:1", &TierProgress::default()).unwrap();
    t.b.pull_image("app:1", true, &TierProgress::default())
        .unwrap();
    t.b.set_cache_limit(Some(local_bytes(&t.b) / 4));
    let chunks = testing::chunk_digests(&t.a).unwrap();
    let want: Vec<Vec<u8>> = chunks.iter().map(|c| t.a.chunk(c).unwrap()).collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut evicted = 0;
    std::thread::scope(|s| {
        for k in 0..4 {
            let (chunks, want, b, stop) = (&chunks, &want, &t.b, &stop);
            s.spawn(move || {
                let mut i = k;
                while !stop.load(Ordering::Relaxed) {
                    let j = i % chunks.len();
                    assert_eq!(b.chunk(&chunks[j]).unwrap(), want[j], "{}", chunks[j]);
                    i += 7;
                }
            });
        }
        for _ in 0..20 {
            evicted += t.b.evict().unwrap().evicted_chunks;
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(evicted > 0);
    assert!(t.b.fsck().unwrap().is_clean());
}

#[test]
fn a_store_moved_to_another_tier_forgets_what_the_first_holds() {
    let t = two_hosts();
    t.a.push_image("app:1", &TierProgress::default()).unwrap();
    assert!(t.a.stats().unwrap().tier.unwrap().tiered_chunks > 40);
    let other = Arc::new(DirTier::open(t.dir.path().join("other")).unwrap());
    t.a.set_tier(other).unwrap();
    let s = t.a.stats().unwrap().tier.unwrap();
    assert_eq!((s.tiered_chunks, s.tiered_bytes), (0, 0), "{s:?}");
    t.a.set_cache_limit(Some(1));
    assert_eq!(t.a.evict().unwrap().evicted_chunks, 0);
    // A push to the new tier sends everything.
    let r = t.a.push_image("app:1", &TierProgress::default()).unwrap();
    assert_eq!(r.skipped, 0, "{r:?}");
}

/// A store of its own on tier `tier`.
fn host(dir: &Path, name: &str, tier: Arc<dyn Tier>) -> Arc<Store> {
    let s = Arc::new(Store::open(dir.join(name)).unwrap());
    s.set_tier(tier).unwrap();
    s
}

#[test]
fn a_volume_pushed_from_one_host_is_pulled_on_another_with_every_byte() {
    let dir = tempfile::tempdir().unwrap();
    let tier: Arc<dyn Tier> = Arc::new(DirTier::open(dir.path().join("tier")).unwrap());
    let a = host(dir.path(), "a", tier.clone());
    let b = host(dir.path(), "b", tier.clone());
    let size = 16 << 20;
    a.create_volume(&castore::VolumeSpec::new("db", size))
        .unwrap();
    let v = a.open_volume("db").unwrap();
    v.write(0, &testing::noise(3 << 20, 5), true).unwrap();
    // Small writes (journaled, not yet folded) and zeros kept allocated.
    v.write(9 << 20, &testing::noise(4096, 6), false).unwrap();
    v.write((9 << 20) + 70_000, b"tail of a record", false)
        .unwrap();
    v.write_zeroes_allocated(12 << 20, 1 << 20, false).unwrap();
    v.flush().unwrap();
    let want = v.read(0, size as usize).unwrap();

    let e = b.pull_volume("db", None).unwrap_err().to_string();
    assert!(e.contains("db") && e.contains("tier"), "{e}");
    let p = a
        .push_volume("db", None, "host-a", &TierProgress::default())
        .unwrap();
    assert!(p.snapshot.starts_with(castore::PUSHED_PREFIX), "{p:?}");
    assert!(p.transferred >= 48 && p.skipped == 0, "{p:?}");
    assert_eq!(p.host, "host-a");
    // Writes after the push are not in the tier until the next push.
    v.write(1 << 20, &testing::noise(65536, 7), true).unwrap();

    let r = b.pull_volume("db", None).unwrap();
    assert_eq!(
        (r.snapshot.as_str(), r.manifest),
        (p.snapshot.as_str(), p.manifest)
    );
    assert_eq!((r.size, r.transferred), (size, 0));
    assert!(r.age() < 60);
    assert!(b.fsck().unwrap().is_clean(), "remote chunks are not damage");
    let before = b.fetched().objects;
    let got = b.open_volume("db").unwrap().read(0, size as usize).unwrap();
    assert!(
        got == want,
        "the pulled volume reads what A had at the push"
    );
    assert_eq!(
        b.fetched().objects - before,
        p.chunks,
        "each chunk fetched once"
    );
    // Its snapshot is there under the pushed name, and reads the same.
    let snap = b.open_snapshot("db", &p.snapshot).unwrap();
    assert!(snap.read(0, size as usize).unwrap() == want);
    assert!(b.fsck().unwrap().is_clean());

    // A volume of that name here is never replaced; another name is fine.
    let e = b.pull_volume("db", None).unwrap_err().to_string();
    assert!(e.contains("exists"), "{e}");
    b.pull_volume("db", Some("db-copy")).unwrap();

    // A second push of A sends only the extent written since.
    let p2 = a
        .push_volume("db", None, "host-a", &TierProgress::default())
        .unwrap();
    assert_eq!(p2.transferred, 1, "{p2:?}");
    assert_ne!(p2.snapshot, p.snapshot);
    assert_eq!(b.pushed_volume("db").unwrap().manifest, p2.manifest);

    // B writes to its copy and pushes it under its own name; A pulls that back.
    let bv = b.open_volume("db-copy").unwrap();
    bv.write(15 << 20, b"written on b", true).unwrap();
    let p3 = b
        .push_volume("db-copy", None, "host-b", &TierProgress::default())
        .unwrap();
    assert_eq!(p3.transferred, 1, "only B's new extent: {p3:?}");
    a.pull_volume("db-copy", Some("from-b")).unwrap();
    let back = a.open_volume("from-b").unwrap();
    assert_eq!(back.read(15 << 20, 12).unwrap(), b"written on b");
    assert!(back.read(0, 3 << 20).unwrap() == want[..3 << 20]);

    // A damaged manifest: an error naming it, and no volume is made.
    let m = dir
        .path()
        .join("tier")
        .join(format!("volsnaps/{}", p2.manifest.to_hex()));
    let mut bytes = std::fs::read(&m).unwrap();
    bytes[5] ^= 1;
    std::fs::write(&m, bytes).unwrap();
    let e = b.pull_volume("db", Some("db-3")).unwrap_err().to_string();
    assert!(e.contains("volsnaps/") && e.contains("corrupt"), "{e}");
    assert!(b.volume_info("db-3").is_err());
}

/// Whether a host's copy of a volume holds the tier's last pushed snapshot is decided by
/// content, not by name: two hosts can take snapshots of the same name (`pushed-T` in
/// the same second) holding different data.
#[test]
fn a_copy_holds_the_last_pushed_snapshot_only_with_the_same_extents() {
    let dir = tempfile::tempdir().unwrap();
    let tier: Arc<dyn Tier> = Arc::new(DirTier::open(dir.path().join("tier")).unwrap());
    let a = host(dir.path(), "a", tier.clone());
    let b = host(dir.path(), "b", tier.clone());
    assert!(
        a.holds_last_pushed("db").unwrap().is_none(),
        "nothing pushed yet"
    );
    a.create_volume(&castore::VolumeSpec::new("db", 4 << 20))
        .unwrap();
    let va = a.open_volume("db").unwrap();
    va.write(0, &testing::noise(1 << 20, 41), true).unwrap();
    a.snapshot_volume("db", "s1").unwrap();
    a.push_volume("db", Some("s1"), "host-a", &TierProgress::default())
        .unwrap();
    let (holds, last) = a.holds_last_pushed("db").unwrap().unwrap();
    assert!(holds && last.snapshot == "s1", "{last:?}");

    // b takes it over, writes, and pushes its own snapshot s2; a takes an s2 of its own
    // (its old data) under the same name.
    b.pull_volume("db", None).unwrap();
    let vb = b.open_volume("db").unwrap();
    vb.write(0, &testing::noise(65536, 42), true).unwrap();
    b.snapshot_volume("db", "s2").unwrap();
    b.push_volume("db", Some("s2"), "host-b", &TierProgress::default())
        .unwrap();
    a.snapshot_volume("db", "s2").unwrap();
    let (holds, last) = a.holds_last_pushed("db").unwrap().unwrap();
    assert!(!holds, "a's s2 is not b's: {last:?}");
    assert_eq!(
        (last.snapshot.as_str(), last.host.as_str()),
        ("s2", "host-b")
    );
    // b holds it, and still does after writing more (its copy is newer).
    vb.write(1 << 20, &testing::noise(4096, 43), true).unwrap();
    assert!(b.holds_last_pushed("db").unwrap().unwrap().0);
}
