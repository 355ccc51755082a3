//! Block volumes through castore's public API on a real RocksDB store: reads and writes
//! against an in-memory model, snapshots, clones, resize, trim, block status, deletes,
//! GC, fsck, concurrency, and durability across SIGKILL right after a flush.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use castore::{
    BlockStatus, Error, GcProgress, GcRoots, Store, Volume, VolumeError, VolumeSpec, testing,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// A small deterministic generator (xorshift64*), so a crash run can be replayed.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn store() -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(Store::open(dir.path().join("store")).unwrap());
    (dir, s)
}

fn volume_error(e: &Error) -> &VolumeError {
    match e.root() {
        Error::Volume(v) => v,
        other => panic!("expected a volume error, got {other}"),
    }
}

/// One operation of the random workloads.
#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Zeroes {
        offset: u64,
        len: u64,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    Flush,
}

/// Random bytes of a few kinds: noise, a repeated pattern (deduplicates), zeros.
fn payload(rng: &mut Rng, len: usize) -> Vec<u8> {
    match rng.below(5) {
        0 => vec![0; len],
        1 => vec![(rng.below(4) + 1) as u8; len],
        _ => {
            let mut v = vec![0u8; len];
            for b in v.chunks_mut(8) {
                let x = rng.next().to_le_bytes();
                b.copy_from_slice(&x[..b.len()]);
            }
            v
        }
    }
}

fn random_op(rng: &mut Rng, size: u64, es: u64) -> Op {
    let offset = rng.below(size);
    let max = (size - offset).min(3 * es);
    let len = 1 + rng.below(max);
    // Half the offsets land on extent boundaries, so whole-extent paths run too.
    let (offset, len) = if rng.below(2) == 0 {
        let o = offset / es * es;
        (o, len.min(size - o))
    } else {
        (offset, len)
    };
    match rng.below(10) {
        0 => Op::Zeroes { offset, len },
        1 => Op::Trim { offset, len },
        2 => Op::Flush,
        n => Op::Write {
            offset,
            data: payload(rng, len as usize),
            fua: n == 3,
        },
    }
}

/// The model's version of an operation: trim zeroes only whole extents (partial ones are
/// a hint the store ignores).
fn apply_model(model: &mut [u8], op: &Op, es: u64) {
    match op {
        Op::Write { offset, data, .. } => {
            model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
        }
        Op::Zeroes { offset, len } => model[*offset as usize..(*offset + *len) as usize].fill(0),
        Op::Trim { offset, len } => {
            let size = model.len() as u64;
            let mut e = offset.div_ceil(es);
            loop {
                let start = e * es;
                let end = (start + es).min(size);
                if start >= size || end > offset + len {
                    break;
                }
                model[start as usize..end as usize].fill(0);
                e += 1;
            }
        }
        Op::Flush => {}
    }
}

fn apply(vol: &Volume, op: &Op) {
    match op {
        Op::Write { offset, data, fua } => vol.write(*offset, data, *fua).unwrap(),
        Op::Zeroes { offset, len } => vol.write_zeroes(*offset, *len, false).unwrap(),
        Op::Trim { offset, len } => vol.trim(*offset, *len, false).unwrap(),
        Op::Flush => vol.flush().unwrap(),
    }
}

/// Block status as the model says it should be: an extent is allocated iff it holds a
/// non-zero byte (all-zero extents are stored as zero markers).
fn model_status(model: &[u8], es: u64) -> Vec<BlockStatus> {
    let mut out: Vec<BlockStatus> = Vec::new();
    for ext in model.chunks(es as usize) {
        let data = ext.iter().any(|&b| b != 0);
        match out.last_mut() {
            Some(l) if l.allocated == data => l.len += ext.len() as u64,
            _ => out.push(BlockStatus {
                len: ext.len() as u64,
                allocated: data,
                zero: !data,
            }),
        }
    }
    out
}

fn check(vol: &Volume, model: &[u8], what: &str) {
    let got = vol.read(0, model.len()).unwrap();
    if let Some(i) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
    assert_eq!(
        vol.block_status(0, model.len() as u64).unwrap(),
        model_status(model, vol.extent_size()),
        "{what}: block status"
    );
}

#[test]
fn random_io_snapshots_clones_and_resize_match_a_model() {
    random_io_matches_a_model(castore::DEFAULT_JOURNAL_BUDGET);
}

/// The same workload when writers fold small writes into extents right away (budget 0)
/// and every few writes (a small budget), so folds interleave with everything else.
#[test]
fn random_io_matches_a_model_while_folding() {
    random_io_matches_a_model(0);
    random_io_matches_a_model(256 * KIB as usize);
}

fn random_io_matches_a_model(budget: usize) {
    let (_dir, store) = store();
    store.set_volume_journal_budget(budget);
    let es = 64 * KIB;
    // Not a multiple of the extent size: the last extent is partial.
    let size = 40 * es + 1536;
    store
        .create_volume(&VolumeSpec::new("model", size))
        .unwrap();
    let vol = store.open_volume("model").unwrap();
    assert_eq!(vol.extent_size(), es);
    check(&vol, &vec![0; size as usize], "fresh volume");
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(0x5eed_1234);
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..3000 {
        let op = random_op(&mut rng, model.len() as u64, es);
        apply(&vol, &op);
        apply_model(&mut model, &op, es);
        // Spot reads at unaligned places, across extent boundaries.
        let off = rng.below(model.len() as u64);
        let len = 1 + rng.below((model.len() as u64 - off).min(3 * es));
        assert_eq!(
            vol.read(off, len as usize).unwrap(),
            model[off as usize..(off + len) as usize],
            "op {i}: {len} bytes at {off}"
        );
        if i % 500 == 499 {
            let name = format!("s{i}");
            store.snapshot_volume("model", &name).unwrap();
            snaps.push((name, model.clone()));
            check(&vol, &model, &format!("after snapshot at op {i}"));
        }
    }
    check(&vol, &model, "after random ops");
    for (name, m) in &snaps {
        check(&store.open_snapshot("model", name).unwrap(), m, name);
    }

    // A clone of a middle snapshot diverges from its parent without touching it.
    let (base, base_model) = snaps[2].clone();
    store.clone_volume("model", &base, "copy").unwrap();
    let copy = store.open_volume("copy").unwrap();
    check(&copy, &base_model, "fresh clone");
    let mut copy_model = base_model.clone();
    for _ in 0..500 {
        let op = random_op(&mut rng, copy_model.len() as u64, es);
        apply(&copy, &op);
        apply_model(&mut copy_model, &op, es);
    }
    check(&copy, &copy_model, "clone after writes");
    check(&vol, &model, "parent after the clone's writes");
    check(
        &store.open_snapshot("model", &base).unwrap(),
        &base_model,
        "clone's base",
    );
    // A clone of a clone reads through two levels.
    store.snapshot_volume("copy", "c1").unwrap();
    store.clone_volume("copy", "c1", "copy2").unwrap();
    let copy2 = store.open_volume("copy2").unwrap();
    check(&copy2, &copy_model, "clone of a clone");
    copy2.write(3, b"grandchild", true).unwrap();
    let mut copy2_model = copy_model.clone();
    copy2_model[3..13].copy_from_slice(b"grandchild");
    check(&copy2, &copy2_model, "clone of a clone after a write");
    check(&copy, &copy_model, "its parent after the write");

    // Shrink to a size inside an extent, then grow: the discarded bytes read as zeros,
    // while a snapshot taken before keeps them.
    assert!(matches!(
        volume_error(&store.resize_volume("model", 10 * es, false).unwrap_err()),
        VolumeError::ShrinkRefused { .. }
    ));
    store.snapshot_volume("model", "before-shrink").unwrap();
    let before = model.clone();
    let small = 10 * es + 512;
    store.resize_volume("model", small, true).unwrap();
    model.truncate(small as usize);
    check(&vol, &model, "after shrink");
    let err = vol.read(small, 1).unwrap_err();
    assert!(
        matches!(volume_error(&err), VolumeError::OutOfRange { .. }),
        "{err}"
    );
    store.resize_volume("model", size + 5 * es, false).unwrap();
    model.resize((size + 5 * es) as usize, 0);
    check(&vol, &model, "after grow");
    check(
        &store.open_snapshot("model", "before-shrink").unwrap(),
        &before,
        "snapshot before the shrink",
    );
    for _ in 0..300 {
        let op = random_op(&mut rng, model.len() as u64, es);
        apply(&vol, &op);
        apply_model(&mut model, &op, es);
    }
    check(&vol, &model, "writes after grow");
    // A clone's shrink and grow do not show the parent's bytes again either.
    store.resize_volume("copy", 2 * es, true).unwrap();
    store.resize_volume("copy", 8 * es, false).unwrap();
    copy_model.truncate(2 * es as usize);
    copy_model.resize(8 * es as usize, 0);
    check(&copy, &copy_model, "clone after shrink and grow");

    // Deleting snapshots prunes versions; what remains still reads right.
    for (name, _) in &snaps[..2] {
        store.delete_snapshot("model", name, false).unwrap();
    }
    check(&vol, &model, "after deleting snapshots");
    for (name, m) in &snaps[2..] {
        check(&store.open_snapshot("model", name).unwrap(), m, name);
    }
    check(
        &copy2,
        &copy2_model,
        "clone of a clone after its grandparent's changes",
    );

    let report = store.fsck().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert!(report.volumes == 3 && report.extents > 0, "{report:?}");

    // GC keeps every volume's and snapshot's data.
    store
        .gc(&GcRoots::default(), &GcProgress::default())
        .unwrap();
    check(&vol, &model, "after gc");
    check(&copy, &copy_model, "clone after gc");
    for (name, m) in &snaps[2..] {
        check(&store.open_snapshot("model", name).unwrap(), m, name);
    }
    assert!(store.fsck().unwrap().is_clean());
}

#[test]
fn trim_write_zeroes_and_block_status() {
    let (_dir, store) = store();
    let es = 64 * KIB;
    store.create_volume(&VolumeSpec::new("z", 8 * es)).unwrap();
    let vol = store.open_volume("z").unwrap();
    vol.write(0, &vec![7; (4 * es) as usize], false).unwrap();
    let st = |o, l| vol.block_status(o, l).unwrap();
    assert_eq!(
        st(0, 8 * es),
        vec![
            BlockStatus {
                len: 4 * es,
                allocated: true,
                zero: false
            },
            BlockStatus {
                len: 4 * es,
                allocated: false,
                zero: true
            },
        ]
    );
    // Trim covers extent 1 wholly and extent 2 partly: only extent 1 goes.
    vol.trim(es - 10, es + 100, false).unwrap();
    assert_eq!(vol.read(es - 10, 10).unwrap(), vec![7; 10]);
    assert_eq!(vol.read(es, es as usize).unwrap(), vec![0; es as usize]);
    assert_eq!(vol.read(2 * es, 100).unwrap(), vec![7; 100]);
    // Write zeroes zeroes partial extents too.
    vol.write_zeroes(2 * es + 10, 20, true).unwrap();
    assert_eq!(
        vol.read(2 * es + 5, 30).unwrap(),
        [vec![7; 5], vec![0; 20], vec![7; 5]].concat()
    );
    vol.write_zeroes(3 * es, es, false).unwrap();
    assert_eq!(
        st(0, 8 * es),
        vec![
            BlockStatus {
                len: es,
                allocated: true,
                zero: false
            },
            BlockStatus {
                len: es,
                allocated: false,
                zero: true
            },
            BlockStatus {
                len: es,
                allocated: true,
                zero: false
            },
            BlockStatus {
                len: 5 * es,
                allocated: false,
                zero: true
            },
        ]
    );
    // Sub-ranges are clipped to what was asked.
    assert_eq!(
        st(es - 1, 2),
        vec![
            BlockStatus {
                len: 1,
                allocated: true,
                zero: false
            },
            BlockStatus {
                len: 1,
                allocated: false,
                zero: true
            },
        ]
    );
    // Writing zeros through write() stores no chunk either.
    let before = testing::chunk_digests(&store).unwrap().len();
    vol.write(5 * es, &vec![0; es as usize], false).unwrap();
    assert_eq!(testing::chunk_digests(&store).unwrap().len(), before);
    assert!(!st(5 * es, es)[0].allocated);
    // Identical extents share one chunk.
    vol.write(6 * es, &vec![7; (2 * es) as usize], false)
        .unwrap();
    assert_eq!(testing::chunk_digests(&store).unwrap().len(), before);
    assert!(vol.block_status(0, 9 * es).is_err());

    // Zeros kept allocated (NBD's NO_HOLE), over data (extent 6) and over a hole
    // (extent 5): they read as zeros, report data and zero, and store no chunk; a
    // snapshot keeps them; zeroing without no_hole, or a trim, ...
    let before = testing::chunk_digests(&store).unwrap().len();
    vol.write_zeroes_allocated(5 * es, 2 * es, false).unwrap();
    assert_eq!(
        vol.read(5 * es, (2 * es) as usize).unwrap(),
        vec![0; (2 * es) as usize]
    );
    assert_eq!(testing::chunk_digests(&store).unwrap().len(), before);
    let zeroed = BlockStatus {
        len: 2 * es,
        allocated: true,
        zero: true,
    };
    assert_eq!(st(5 * es, 2 * es), vec![zeroed]);
    store.snapshot_volume("z", "s").unwrap();
    let snap = store.open_snapshot("z", "s").unwrap();
    assert_eq!(snap.block_status(5 * es, 2 * es).unwrap(), vec![zeroed]);
    // ... leave them zero but let go of the allocation.
    vol.write_zeroes(5 * es, es, false).unwrap();
    vol.trim(6 * es, es, false).unwrap();
    assert_eq!(
        st(5 * es, 2 * es),
        vec![BlockStatus {
            len: 2 * es,
            allocated: false,
            zero: true
        }]
    );
    // A shrink over a kept-allocated extent discards it like data.
    vol.write_zeroes_allocated(7 * es, es, false).unwrap();
    store.resize_volume("z", 7 * es, true).unwrap();
    store.resize_volume("z", 8 * es, false).unwrap();
    let vol = store.open_volume("z").unwrap();
    assert!(!vol.block_status(7 * es, es).unwrap()[0].allocated);
    assert!(store.fsck().unwrap().is_clean());
}

#[test]
fn snapshot_and_clone_of_a_large_volume_are_constant_time() {
    let gib: u64 = std::env::var("TIDE_VOLUME_BIG_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let (_dir, store) = store();
    let size = gib * MIB;
    store.create_volume(&VolumeSpec::new("big", size)).unwrap();
    let vol = store.open_volume("big").unwrap();
    let start = Instant::now();
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..gib {
        // Every extent differs (its index in its first bytes) but compresses well.
        for (j, ext) in buf.chunks_mut(64 * KIB as usize).enumerate() {
            ext.fill((i % 251) as u8 + 1);
            ext[..16].copy_from_slice(&(u128::from(i) << 64 | j as u128).to_le_bytes());
        }
        vol.write(i * MIB, &buf, false).unwrap();
    }
    vol.flush().unwrap();
    eprintln!("wrote {gib} MiB in {:?}", start.elapsed());
    let chunks = testing::chunk_digests(&store).unwrap().len();
    assert_eq!(chunks as u64, size / (64 * KIB));

    let t = Instant::now();
    store.snapshot_volume("big", "snap").unwrap();
    let snap_time = t.elapsed();
    let t = Instant::now();
    store.clone_volume("big", "snap", "big2").unwrap();
    let clone_time = t.elapsed();
    eprintln!("snapshot of {gib} MiB written: {snap_time:?}; clone: {clone_time:?}");
    assert_eq!(
        testing::chunk_digests(&store).unwrap().len(),
        chunks,
        "new chunks"
    );
    let info = store.volume_info("big2").unwrap();
    assert_eq!(info.allocated_bytes, size);
    assert_eq!(info.unique_bytes, 0, "a fresh clone owns nothing");
    let parent = store.volume_info("big").unwrap();
    assert_eq!(parent.allocated_bytes, size);
    assert_eq!(parent.unique_bytes, 0, "every chunk is read by the clone");
    let clone = store.open_volume("big2").unwrap();
    assert_eq!(
        clone.read(size - 10, 10).unwrap(),
        vol.read(size - 10, 10).unwrap()
    );
}

#[test]
fn deletes_are_refused_with_snapshots_or_clones_and_gc_collects_after() {
    let (_dir, store) = store();
    let es = 64 * KIB;
    store
        .create_volume(&VolumeSpec::new("keep", 4 * es))
        .unwrap();
    store
        .create_volume(&VolumeSpec::new("gone", 4 * es))
        .unwrap();
    let keep = store.open_volume("keep").unwrap();
    let gone = store.open_volume("gone").unwrap();
    keep.write(0, &vec![1; (2 * es) as usize], false).unwrap();
    let mut noise = vec![0u8; (4 * es) as usize];
    let mut rng = Rng(99);
    noise.iter_mut().for_each(|b| *b = rng.next() as u8);
    gone.write(0, &noise, false).unwrap();
    store.snapshot_volume("gone", "s").unwrap();
    store.clone_volume("gone", "s", "child").unwrap();
    let child = store.open_volume("child").unwrap();
    child.write(0, &vec![9; es as usize], true).unwrap();
    let info = store.volume_info("gone").unwrap();
    assert_eq!(info.allocated_bytes, 4 * es);
    assert_eq!(info.snapshot_list[0].clones, vec!["child".to_string()]);
    assert!(store.volume_info("child").unwrap().unique_bytes > 0);

    let err = store.delete_volume("gone", false).unwrap_err();
    assert!(
        matches!(volume_error(&err), VolumeError::HasClones { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("gone@s has clones (child)"),
        "{err}"
    );
    let err = store.delete_snapshot("gone", "s", false).unwrap_err();
    assert!(
        matches!(volume_error(&err), VolumeError::HasClones { .. }),
        "{err}"
    );
    store.delete_volume("child", false).unwrap();
    let err = store.delete_volume("gone", false).unwrap_err();
    assert!(err.to_string().contains("has snapshots (s)"), "{err}");
    // Cascade takes clones along.
    store.clone_volume("gone", "s", "child").unwrap();
    assert_eq!(
        store.delete_volume("gone", true).unwrap(),
        vec!["child".to_string(), "gone".to_string()]
    );
    let err = gone.read(0, 1).unwrap_err();
    assert!(
        matches!(volume_error(&err), VolumeError::NotFound { .. }),
        "{err}"
    );
    assert!(matches!(
        volume_error(&store.open_volume("gone").unwrap_err()),
        VolumeError::NotFound { .. }
    ));
    let names: Vec<String> = store
        .volumes()
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, vec!["keep".to_string()]);

    let before = testing::chunk_digests(&store).unwrap().len();
    let report = store
        .gc(&GcRoots::default(), &GcProgress::default())
        .unwrap();
    // gone's four noise extents and child's one extent go; keep's one chunk stays.
    assert_eq!(report.chunks, 5, "{report:?}");
    assert_eq!(testing::chunk_digests(&store).unwrap().len(), before - 5);
    assert_eq!(
        keep.read(0, (2 * es) as usize).unwrap(),
        vec![1; (2 * es) as usize]
    );
    assert!(store.fsck().unwrap().is_clean());

    // Deleting a snapshot frees the versions only it could see.
    keep.write(0, &noise[..es as usize], false).unwrap();
    store.snapshot_volume("keep", "old").unwrap();
    keep.write(0, &vec![1; es as usize], false).unwrap();
    assert_eq!(
        store
            .gc(&GcRoots::default(), &GcProgress::default())
            .unwrap()
            .chunks,
        0
    );
    store.delete_snapshot("keep", "old", false).unwrap();
    assert_eq!(
        store
            .gc(&GcRoots::default(), &GcProgress::default())
            .unwrap()
            .chunks,
        1
    );
    assert_eq!(
        keep.read(0, (2 * es) as usize).unwrap(),
        vec![1; (2 * es) as usize]
    );
    assert!(store.fsck().unwrap().is_clean());
}

#[test]
fn bad_requests_get_typed_errors() {
    let (_dir, store) = store();
    for bad in ["", "Upper", "a/b", "a@b", "a:b", "-x", &"x".repeat(129)] {
        let err = store.create_volume(&VolumeSpec::new(bad, MIB)).unwrap_err();
        assert!(
            matches!(volume_error(&err), VolumeError::BadName { .. }),
            "{bad}: {err}"
        );
    }
    for size in [0, 1000] {
        let err = store
            .create_volume(&VolumeSpec::new("v", size))
            .unwrap_err();
        assert!(
            matches!(volume_error(&err), VolumeError::BadSize { .. }),
            "{err}"
        );
    }
    let mut spec = VolumeSpec::new("v", MIB);
    spec.extent_size = 3000;
    assert!(store.create_volume(&spec).is_err());
    spec.extent_size = 1 << 20;
    assert!(store.create_volume(&spec).is_err());
    store.create_volume(&VolumeSpec::new("v", MIB)).unwrap();
    let err = store.create_volume(&VolumeSpec::new("v", MIB)).unwrap_err();
    assert_eq!(err.to_string(), "volume v already exists");
    let vol = store.open_volume("v").unwrap();
    let err = vol.write(MIB - 1, b"ab", false).unwrap_err();
    assert!(
        matches!(volume_error(&err), VolumeError::OutOfRange { .. }),
        "{err}"
    );
    assert!(vol.read(u64::MAX, 2).is_err());
    store.snapshot_volume("v", "s").unwrap();
    let err = store.snapshot_volume("v", "s").unwrap_err();
    assert!(
        matches!(volume_error(&err), VolumeError::SnapshotExists { .. }),
        "{err}"
    );
    let snap = store.open_snapshot("v", "s").unwrap();
    let err = snap.write(0, b"x", false).unwrap_err();
    assert_eq!(err.to_string(), "v@s is a snapshot and cannot be written");
    let err = store.open_snapshot("v", "nope").unwrap_err();
    assert_eq!(err.to_string(), "volume v has no snapshot nope");
    let err = store.clone_volume("v", "nope", "w").unwrap_err();
    assert!(
        matches!(volume_error(&err), VolumeError::SnapshotNotFound { .. }),
        "{err}"
    );
    store.delete_snapshot("v", "s", false).unwrap();
    let err = snap.read(0, 1).unwrap_err();
    assert!(
        matches!(volume_error(&err), VolumeError::SnapshotNotFound { .. }),
        "{err}"
    );
}

/// Threads doing small writes to the same extents must not lose each other's writes:
/// each owns every fourth 512-byte sector and writes random ones of its own. With a
/// small journal budget, folds run beside the writes and reads.
#[test]
fn concurrent_sub_extent_writes_lose_nothing() {
    for budget in [castore::DEFAULT_JOURNAL_BUDGET, 64 * KIB as usize] {
        concurrent_sub_extent_writes(budget);
    }
}

fn concurrent_sub_extent_writes(budget: usize) {
    let (_dir, store) = store();
    store.set_volume_journal_budget(budget);
    let es = 64 * KIB;
    let size = 4 * es;
    store.create_volume(&VolumeSpec::new("c", size)).unwrap();
    let threads = 4u64;
    let sectors = size / 512;
    let finals: Vec<Vec<(u64, u8)>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let vol = store.open_volume("c").unwrap();
                s.spawn(move || {
                    let mut rng = Rng(t + 1);
                    let mut last = vec![0u8; sectors as usize];
                    for _ in 0..400 {
                        let sector = rng.below(sectors / threads) * threads + t;
                        let byte = (rng.below(255) + 1) as u8;
                        vol.write(sector * 512, &[byte; 512], false).unwrap();
                        last[sector as usize] = byte;
                        // Read-your-writes while other threads' folds replace journal
                        // records by chunks.
                        assert_eq!(vol.read(sector * 512, 512).unwrap(), vec![byte; 512]);
                        // Readers run beside the writers.
                        let _ = vol.read(rng.below(size - 4096), 4096).unwrap();
                    }
                    last.iter()
                        .enumerate()
                        .filter(|(i, _)| *i as u64 % threads == t)
                        .map(|(i, &b)| (i as u64, b))
                        .collect()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let vol = store.open_volume("c").unwrap();
    for (sector, byte) in finals.into_iter().flatten() {
        assert_eq!(
            vol.read(sector * 512, 512).unwrap(),
            vec![byte; 512],
            "sector {sector}"
        );
    }
}

// Durability across SIGKILL: a child process (this test binary, re-run as
// `crash_child`) writes a seeded random workload and prints `ack N` after each flush or
// FUA write returns; the parent kills it at random points, reopens the store and checks
// that the volume equals the model after some prefix of the workload no shorter than
// the last acknowledgement (RocksDB's WAL is ordered, each operation one batch).

const CRASH_ENV: &str = "TIDE_VOLUME_CRASH_CHILD";
const CRASH_SIZE: u64 = 24 * 64 * KIB + 512;
/// The child snapshots the volume after every this many operations (`s{N}`).
const SNAPSHOT_EVERY: u64 = 37;

#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CRASH_ENV) else {
        return; // Only runs when the crash test starts it.
    };
    let mut parts = spec.split(',');
    let (dir, seed, budget) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let store = Arc::new(Store::open(dir).unwrap());
    store.set_volume_journal_budget(budget.parse().unwrap());
    let vol = store.open_volume("crash").unwrap();
    let mut rng = Rng(seed.parse().unwrap());
    for i in 0..100_000u64 {
        let op = random_op(&mut rng, CRASH_SIZE, 64 * KIB);
        apply(&vol, &op);
        if i % SNAPSHOT_EVERY == SNAPSHOT_EVERY - 1 {
            store.snapshot_volume("crash", &format!("s{i}")).unwrap();
            println!("ack {i}");
        } else if matches!(op, Op::Flush | Op::Write { fua: true, .. }) {
            println!("ack {i}");
        }
    }
}

/// With the default budget the volume (1.5 MiB) never leaves the journal's memory, so a
/// crash leaves every small write since the last snapshot in the journal: the reopened
/// store replays it.
#[test]
fn acknowledged_writes_survive_sigkill() {
    let runs: u64 = std::env::var("TIDE_VOLUME_CRASH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    crash_runs(runs, castore::DEFAULT_JOURNAL_BUDGET, 1000);
}

/// With a tiny budget, writers fold extents all the time, so kills land between journal
/// appends and folds: the state must still be a prefix, and fsck clean.
#[test]
fn acknowledged_writes_survive_sigkill_while_folding() {
    crash_runs(10, 96 * KIB as usize, 5000);
}

fn crash_runs(runs: u64, budget: usize, seeds: u64) {
    let exe = std::env::current_exe().unwrap();
    let mut pick = Rng(0xc0ffee);
    for run in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        {
            let store = Store::open(&path).unwrap();
            store
                .create_volume(&VolumeSpec::new("crash", CRASH_SIZE))
                .unwrap();
        }
        let seed = seeds + run;
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CRASH_ENV, format!("{},{seed},{budget}", path.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill right after the k-th acknowledgement, or a little later.
        let kill_after = 1 + pick.below(40);
        let linger_us = if run % 2 == 0 { 0 } else { pick.below(3000) };
        let mut acked: Option<u64> = None;
        let mut seen = 0;
        let out = BufReader::new(child.stdout.take().unwrap());
        for line in out.lines() {
            let line = line.unwrap();
            let Some(n) = line.strip_prefix("ack ") else {
                continue;
            };
            acked = Some(n.parse().unwrap());
            seen += 1;
            if seen == kill_after {
                std::thread::sleep(std::time::Duration::from_micros(linger_us));
                child.kill().unwrap(); // SIGKILL
                break;
            }
        }
        let status = child.wait().unwrap();
        let acked = acked.expect("the child acknowledged something");

        let store = Arc::new(Store::open(&path).unwrap());
        let report = store.fsck().unwrap();
        assert!(report.is_clean(), "run {run}: {:?}", report.problems);
        let got = store
            .open_volume("crash")
            .unwrap()
            .read(0, CRASH_SIZE as usize)
            .unwrap();
        let mut model = vec![0u8; CRASH_SIZE as usize];
        let mut rng = Rng(seed);
        let mut matched = None;
        let mut snapshots = std::collections::HashMap::new();
        // The surviving state is some prefix of the operations at least as long as the
        // last acknowledged one *and* as the newest surviving snapshot: an operation that
        // changes no byte (zeroing zeros) makes several prefixes look alike, so the match
        // must not stop before the snapshots that exist.
        let newest_snapshot = store
            .volume_snapshots("crash")
            .unwrap()
            .iter()
            .filter_map(|s| s.name.strip_prefix('s').and_then(|n| n.parse::<u64>().ok()))
            .max()
            .unwrap_or(0);
        let at_least = acked.max(newest_snapshot);
        for i in 0..100_000u64 {
            let op = random_op(&mut rng, CRASH_SIZE, 64 * KIB);
            apply_model(&mut model, &op, 64 * KIB);
            if i % SNAPSHOT_EVERY == SNAPSHOT_EVERY - 1 {
                snapshots.insert(format!("s{i}"), model.clone());
            }
            if i >= at_least && model == got {
                matched = Some(i);
                break;
            }
        }
        let matched = matched.unwrap_or_else(|| {
            panic!("run {run}: no prefix of at least {acked} operations matches ({status})")
        });
        // Every snapshot that survived is crash-consistent: exactly the volume after the
        // operation it followed; every acknowledged one survived.
        let list = store.volume_snapshots("crash").unwrap();
        for s in &list {
            let want = snapshots
                .get(&s.name)
                .unwrap_or_else(|| panic!("run {run}: snapshot {} is from the future", s.name));
            let snap = store.open_snapshot("crash", &s.name).unwrap();
            assert!(
                snap.read(0, CRASH_SIZE as usize).unwrap() == *want,
                "run {run}: {}",
                s.name
            );
        }
        let acked_snaps = (acked + 1) / SNAPSHOT_EVERY;
        assert!(
            list.len() as u64 >= acked_snaps,
            "run {run}: lost a snapshot"
        );
        eprintln!(
            "run {run}: acked {acked}, recovered through op {matched}, {} snapshots",
            list.len()
        );
    }
}

/// GC running while a volume is written keeps every chunk the volume names: writes claim
/// their chunks until the block map entries are in.
#[test]
fn gc_during_writes_keeps_what_they_write() {
    let (_dir, store) = store();
    let es = 64 * KIB;
    let size = 32 * es;
    store.create_volume(&VolumeSpec::new("g", size)).unwrap();
    let vol = store.open_volume("g").unwrap();
    let mut model = vec![0u8; size as usize];
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let gc = s.spawn(|| {
            let mut runs = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                store
                    .gc(&GcRoots::default(), &GcProgress::default())
                    .unwrap();
                runs += 1;
            }
            runs
        });
        let mut rng = Rng(7);
        for _ in 0..400 {
            let op = random_op(&mut rng, size, es);
            apply(&vol, &op);
            apply_model(&mut model, &op, es);
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let runs = gc.join().unwrap();
        eprintln!("{runs} collections ran beside the writes");
    });
    check(&vol, &model, "after writes beside gc");
    let report = store.fsck().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}

#[test]
fn deleting_a_snapshot_with_clones_cascades_only_when_asked() {
    let (_dir, store) = store();
    store.create_volume(&VolumeSpec::new("p", MIB)).unwrap();
    let p = store.open_volume("p").unwrap();
    p.write(0, &[5; 4096], false).unwrap();
    store.snapshot_volume("p", "a").unwrap();
    store.snapshot_volume("p", "b").unwrap();
    store.clone_volume("p", "a", "ca").unwrap();
    store.snapshot_volume("ca", "x").unwrap();
    store.clone_volume("ca", "x", "cax").unwrap();
    store.clone_volume("p", "b", "cb").unwrap();
    let err = store.delete_snapshot("p", "a", false).unwrap_err();
    assert_eq!(
        err.to_string(),
        "p@a has clones (ca); delete them first or cascade"
    );
    assert_eq!(
        store.delete_snapshot("p", "a", true).unwrap(),
        vec!["cax".to_string(), "ca".to_string()]
    );
    let names: Vec<String> = store
        .volumes()
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, vec!["cb".to_string(), "p".to_string()]);
    let cb = store.volume_info("cb").unwrap();
    assert_eq!(
        cb.summary.origin,
        Some(castore::VolumeOrigin {
            volume: "p".into(),
            snapshot: "b".into()
        })
    );
    assert_eq!(
        store.open_volume("cb").unwrap().read(0, 4096).unwrap(),
        vec![5; 4096]
    );
    let snaps: Vec<String> = store
        .volume_snapshots("p")
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(snaps, vec!["b".to_string()]);
    assert!(store.fsck().unwrap().is_clean());
}

/// Small writes wait in the journal: they read back at once through every handle,
/// survive closing and reopening the store (replay), and fold into ordinary extents.
#[test]
fn journaled_writes_replay_after_reopen_and_fold() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let es = 64 * KIB;
    let size = 16 * es;
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(42);
    {
        let store = Arc::new(Store::open(&path).unwrap());
        store.create_volume(&VolumeSpec::new("j", size)).unwrap();
        let a = store.open_volume("j").unwrap();
        let b = store.open_volume("j").unwrap();
        // A whole extent first, so some journal records patch a real chunk.
        let full = payload(&mut rng, es as usize);
        a.write(es, &full, false).unwrap();
        model[es as usize..2 * es as usize].copy_from_slice(&full);
        for i in 0..200 {
            let off = rng.below(size - 4096);
            let len = 1 + rng.below(4096);
            let data = payload(&mut rng, len as usize);
            let vol = if i % 2 == 0 { &a } else { &b };
            vol.write(off, &data, i % 7 == 0).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
            // The other handle sees it at once.
            let other = if i % 2 == 0 { &b } else { &a };
            assert_eq!(other.read(off, len as usize).unwrap(), data, "write {i}");
        }
        a.write_zeroes(3 * es + 100, 1000, false).unwrap();
        model[(3 * es + 100) as usize..(3 * es + 1100) as usize].fill(0);
        check(&a, &model, "with pending writes");
        assert!(testing::journal_records(&store).unwrap() > 0);
        assert!(store.volume_journal_bytes() > 0);
        // Whole-extent writes drop the extent's records in their own batch.
        let before = testing::journal_records(&store).unwrap();
        a.write(0, &vec![3; es as usize], false).unwrap();
        model[..es as usize].fill(3);
        assert!(testing::journal_records(&store).unwrap() < before);
        a.flush().unwrap();
        let report = store.fsck().unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);
    }
    let chunks_before;
    {
        let store = Arc::new(Store::open(&path).unwrap());
        assert!(testing::journal_records(&store).unwrap() > 0);
        let vol = store.open_volume("j").unwrap();
        check(&vol, &model, "replayed after reopen");
        chunks_before = testing::chunk_digests(&store).unwrap().len();
        store.fold_journal().unwrap();
        assert_eq!(testing::journal_records(&store).unwrap(), 0);
        assert_eq!(store.volume_journal_bytes(), 0);
        assert!(testing::chunk_digests(&store).unwrap().len() > chunks_before);
        check(&vol, &model, "after folding");
        let report = store.fsck().unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);
    }
    let store = Arc::new(Store::open(&path).unwrap());
    check(&store.open_volume("j").unwrap(), &model, "folded, reopened");
}

/// A snapshot folds the volume's pending writes in its own batch and stays immutable; a
/// snapshot with nothing pending writes no chunk. Shrink discards journaled bytes past
/// the new end; delete takes the volume's journal along.
#[test]
fn snapshots_shrink_and_delete_with_pending_writes() {
    let (_dir, store) = store();
    let es = 64 * KIB;
    let size = 8 * es;
    store.create_volume(&VolumeSpec::new("p", size)).unwrap();
    let vol = store.open_volume("p").unwrap();
    let mut model = vec![0u8; size as usize];
    for (i, off) in [10, es + 5, 5 * es - 2, 7 * es + 4000]
        .into_iter()
        .enumerate()
    {
        let data = vec![i as u8 + 1; 300];
        vol.write(off, &data, false).unwrap();
        model[off as usize..off as usize + 300].copy_from_slice(&data);
    }
    assert_eq!(testing::journal_records(&store).unwrap(), 5);
    let chunks = testing::chunk_digests(&store).unwrap().len();
    store.snapshot_volume("p", "s1").unwrap();
    assert_eq!(testing::journal_records(&store).unwrap(), 0);
    assert_eq!(testing::chunk_digests(&store).unwrap().len(), chunks + 5);
    let s1 = store.open_snapshot("p", "s1").unwrap();
    check(&s1, &model, "snapshot of pending writes");
    // Nothing pending: no chunk.
    store.snapshot_volume("p", "s2").unwrap();
    assert_eq!(testing::chunk_digests(&store).unwrap().len(), chunks + 5);
    // Writes after the snapshot do not reach it.
    let snap_model = model.clone();
    vol.write(20, b"after", false).unwrap();
    model[20..25].copy_from_slice(b"after");
    check(&s1, &snap_model, "snapshot after a later write");
    check(&vol, &model, "volume after a later write");
    // A clone of the snapshot reads what it froze, and journals its own small writes.
    store.clone_volume("p", "s1", "c").unwrap();
    let c = store.open_volume("c").unwrap();
    c.write(es + 6, b"clone", false).unwrap();
    let mut clone_model = snap_model.clone();
    clone_model[(es + 6) as usize..(es + 11) as usize].copy_from_slice(b"clone");
    check(&c, &clone_model, "clone with a pending write");
    check(&s1, &snap_model, "the clone's base");

    // Pending writes past a shrink's end are gone, also after a grow; the boundary
    // extent keeps its bytes below the end.
    vol.write(6 * es + 10, &[9; 100], false).unwrap();
    vol.write(4 * es + 400, &[8; 200], false).unwrap();
    model[(4 * es + 400) as usize..(4 * es + 600) as usize].fill(8);
    let small = 4 * es + 512;
    store.resize_volume("p", small, true).unwrap();
    model.truncate(small as usize);
    check(&vol, &model, "after shrink");
    store.resize_volume("p", size, false).unwrap();
    model.resize(size as usize, 0);
    check(&vol, &model, "after grow");
    let report = store.fsck().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);

    // Deleting volumes deletes their journal records in the same batch.
    c.write(2 * es + 1, b"x", false).unwrap();
    vol.write(2 * es + 1, b"y", false).unwrap();
    assert!(testing::journal_records(&store).unwrap() > 0);
    store.delete_volume("p", true).unwrap();
    assert_eq!(testing::journal_records(&store).unwrap(), 0);
    assert_eq!(store.volume_journal_bytes(), 0);
    let report = store.fsck().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    store
        .gc(&GcRoots::default(), &GcProgress::default())
        .unwrap();
    assert_eq!(testing::chunk_digests(&store).unwrap().len(), 0);
}

/// fsck checks journal records: well-formed, inside their extent, of a live volume.
#[test]
fn fsck_reports_bad_journal_records() {
    let (_dir, store) = store();
    store.create_volume(&VolumeSpec::new("f", MIB)).unwrap();
    store
        .open_volume("f")
        .unwrap()
        .write(7, b"ok", false)
        .unwrap();
    assert!(store.fsck().unwrap().is_clean());
    let key = |v: u64, e: u64, s: u64| [v.to_be_bytes(), e.to_be_bytes(), s.to_be_bytes()].concat();
    // Volume 99 does not exist; kind 7 is no record; the last runs past its extent;
    // extent 16 lies past the 1 MiB volume's end.
    testing::put_journal_record(&store, &key(99, 0, 0), &[0, 0, 0, 0, 0, 1]).unwrap();
    testing::put_journal_record(&store, &key(1, 0, 5), &[7, 0, 0, 0, 0, 1]).unwrap();
    testing::put_journal_record(&store, &key(1, 1, 0), &[1, 0, 1, 0, 0, 0, 1, 0, 0]).unwrap();
    testing::put_journal_record(&store, &key(1, 16, 0), &[0, 0, 0, 0, 0, 1]).unwrap();
    testing::put_journal_record(&store, b"short", &[0]).unwrap();
    let report = store.fsck().unwrap();
    let journal: Vec<_> = report
        .problems
        .iter()
        .filter(|p| p.object == "volume journal")
        .collect();
    assert_eq!(journal.len(), 5, "{:?}", report.problems);
    assert!(journal.iter().any(|p| p.problem == "belongs to no volume"));
    assert!(journal.iter().any(|p| p.problem.contains("past the end")));
}
