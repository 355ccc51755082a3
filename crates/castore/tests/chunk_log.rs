//! The chunk log under faults, through its I/O seam ([`testing::FaultyFiles`]): a failed
//! or short write and a failed sync are errors to the writer and change nothing it was
//! told was written; a process killed between a chunk log sync and the batch that would
//! point at it loses only that unacknowledged write, and GC gives the orphaned log space
//! back.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

use castore::testing::{self, Fault, FaultyFiles};
use castore::{GcProgress, GcRoots, Store, VolumeSpec};

const EXTENT: u64 = 64 << 10;

/// A store whose chunk log goes through a [`FaultyFiles`].
fn faulty(dir: &std::path::Path) -> (Arc<Store>, Arc<FaultyFiles>) {
    let mut handle = None;
    let store = Store::open_with_files(dir, |files| {
        let f = FaultyFiles::new(files);
        handle = Some(f.clone());
        f
    })
    .unwrap();
    (Arc::new(store), handle.unwrap())
}

fn gc(store: &Store) {
    store
        .gc(&GcRoots::default(), &GcProgress::default())
        .unwrap();
}

/// `extents` whole extents of pattern data for seed `seed` (incompressible).
fn data(extents: u64, seed: u64) -> Vec<u8> {
    testing::noise((extents * EXTENT) as usize, seed)
}

#[test]
fn failed_writes_and_syncs_are_errors_and_lose_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (store, faults) = faulty(&dir.path().join("store"));
    store
        .create_volume(&VolumeSpec::new("v", 16 * EXTENT))
        .unwrap();
    let v = store.open_volume("v").unwrap();
    let first = data(8, 1);
    v.write(0, &first, true).unwrap();
    for (i, fault) in [Fault::FailWrite, Fault::ShortWrite, Fault::FailSync]
        .into_iter()
        .enumerate()
    {
        faults.arm(fault, 0);
        let e = v
            .write(0, &data(8, 10 + i as u64), i % 2 == 0)
            .expect_err("the faulty write fails");
        assert!(faults.spent(), "{fault:?} was not met");
        assert!(
            matches!(e.root(), castore::Error::Io { .. }),
            "{fault:?}: {e}"
        );
        // What was acknowledged reads back; nothing of the failed write does.
        assert_eq!(v.read(0, first.len()).unwrap(), first, "after {fault:?}");
    }
    // The log works again afterwards (a failed sync retires its segment).
    let second = data(4, 20);
    v.write(8 * EXTENT, &second, true).unwrap();
    assert_eq!(v.read(8 * EXTENT, second.len()).unwrap(), second);
    drop(v);
    let report = store.fsck().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    // Reopened: the same bytes, verified from the log.
    drop(store);
    let store = Arc::new(Store::open(dir.path().join("store")).unwrap());
    let v = store.open_volume("v").unwrap();
    assert_eq!(v.read(0, first.len()).unwrap(), first);
    assert_eq!(v.read(8 * EXTENT, second.len()).unwrap(), second);
    gc(&store);
    assert_eq!(v.read(0, first.len()).unwrap(), first);
    // The failed writes' space (and the first segment, mostly theirs) is given back.
    let live = (first.len() + second.len()) as u64;
    let kept: u64 = testing::chunk_log_segments(&store)
        .unwrap()
        .iter()
        .map(|s| s.1)
        .sum();
    assert!(kept <= 2 * live, "{kept} bytes of log kept for {live} live");
    assert!(store.fsck().unwrap().is_clean());
}

const CHILD_ENV: &str = "TIDE_CHUNK_LOG_CRASH_CHILD";

/// The child of [`killed_between_log_sync_and_batch_loses_only_that_write`]: writes
/// whole extents with FUA, printing `ack N` after write N returns; its chunk log kills it
/// right after the sync of write `KILL`.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return; // Only runs when the crash test starts it.
    };
    let (dir, kill) = spec.split_once(',').unwrap();
    let (store, faults) = faulty(std::path::Path::new(dir));
    let v = store.open_volume("v").unwrap();
    faults.arm(Fault::KillAfterSync, kill.parse().unwrap());
    for n in 0u64.. {
        v.write((n % 4) * 4 * EXTENT, &data(4, 100 + n), n % 2 == 0)
            .unwrap();
        if n % 2 == 1 {
            v.flush().unwrap();
        }
        println!("ack {n}");
    }
}

#[test]
fn killed_between_log_sync_and_batch_loses_only_that_write() {
    let exe = std::env::current_exe().unwrap();
    for kill in [0u64, 1, 5, 6] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        {
            let store = Arc::new(Store::open(&path).unwrap());
            store
                .create_volume(&VolumeSpec::new("v", 16 * EXTENT))
                .unwrap();
        }
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, format!("{},{kill}", path.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut acked: Option<u64> = None;
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            // The first one shares its line with libtest's "test crash_child ... ".
            if let Some((_, n)) = line.unwrap().rsplit_once("ack ") {
                acked = Some(n.parse().unwrap());
            }
        }
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "kill {kill}: the child was to die at its sync"
        );
        // Every write syncs the log once (one writer, so no group): write `kill` died
        // after its data was durable and before its batch.
        let done = acked.map_or(0, |n| n + 1);
        assert_eq!(done, kill, "the child acknowledged writes up to the kill");
        let store = Arc::new(Store::open(&path).unwrap());
        let report = store.fsck().unwrap();
        assert!(report.is_clean(), "kill {kill}: {:?}", report.problems);
        let v = store.open_volume("v").unwrap();
        let expect = |store: &Arc<Store>| {
            let v = store.open_volume("v").unwrap();
            for slot in 0..4u64 {
                // The last acknowledged write into this slot, or zeros.
                let last = (0..done).rev().find(|n| n % 4 == slot);
                let want = match last {
                    Some(n) => data(4, 100 + n),
                    None => vec![0; (4 * EXTENT) as usize],
                };
                let got = v.read(slot * 4 * EXTENT, want.len()).unwrap();
                assert!(
                    got == want,
                    "kill {kill}: slot {slot} is not write {last:?}"
                );
            }
        };
        expect(&store);
        // The killed write's bytes are in the log with nothing pointing at them; so are
        // the overwritten ones. GC removes or moves out every mostly dead segment.
        let before: u64 = testing::chunk_log_segments(&store)
            .unwrap()
            .iter()
            .map(|s| s.1)
            .sum();
        assert!(before >= (done + 1) * 4 * EXTENT, "kill {kill}: {before}");
        drop(v);
        gc(&store);
        expect(&store);
        let live = done.min(4) * 4 * EXTENT;
        for (segment, len) in testing::chunk_log_segments(&store).unwrap() {
            assert!(
                len <= 2 * live,
                "kill {kill}: segment {segment} ({len} bytes) kept for {live} live bytes"
            );
        }
        assert!(store.fsck().unwrap().is_clean());
        drop(store);
        // And all of it again after a restart.
        let store = Arc::new(Store::open(&path).unwrap());
        expect(&store);
    }
}
