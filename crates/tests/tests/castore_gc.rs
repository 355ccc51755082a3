//! GC against concurrent imports (in one process, as the daemon runs them) and against
//! kill -9 in the middle of a sweep.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use castore::{GcProgress, GcRoots, ImportOptions, Store};
use tests::fstree::assert_same;
use tests::roots::debian_root;
use tests::tide::{Tide, XorShift, scratch};

#[test]
fn gc_running_during_imports_never_takes_their_chunks() {
    let root = debian_root("minbase");
    let tmp = scratch("tide-gc");
    let store = Arc::new(Store::open(tmp.path().join("store")).unwrap());
    // Garbage for GC to chew on, sharing every chunk with what the imports will use: an
    // image imported and then unnamed.
    store
        .import_image(&root, Some("old:1"), &ImportOptions::default())
        .unwrap();
    store.remove_ref("old:1").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let collector = {
        let store = store.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut runs = 0;
            let mut deleted = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = store
                    .gc(&GcRoots::default(), &GcProgress::default())
                    .unwrap();
                deleted += r.chunks;
                runs += 1;
            }
            (runs, deleted)
        })
    };
    for i in 0..3 {
        store
            .import_image(&root, Some(&format!("new:{i}")), &ImportOptions::default())
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let (runs, deleted) = collector.join().unwrap();
    assert!(runs >= 2, "GC ran only {runs} times during the imports");
    assert!(
        deleted > 0,
        "GC never had anything to delete: the test proves nothing"
    );
    let fsck = store.fsck().unwrap();
    assert!(fsck.is_clean(), "{:?}", fsck.problems);
    for i in 0..3 {
        let out = tmp.path().join(format!("out{i}"));
        let d = store.resolve_image(&format!("new:{i}")).unwrap();
        store
            .export_image(&d, &castore::ExportTarget::Dir(out.clone()))
            .unwrap();
        assert_same(&root, &out);
    }
}

#[test]
fn gc_killed_at_random_points_leaves_a_consistent_store() {
    let root = debian_root("minbase");
    let tmp = scratch("tide-gckill");
    let tide = Tide::new(tmp.path().join("store"));
    tide.import_fixture(&tmp.path().join("keep"), "keep:1");
    // Garbage to collect: an image imported and then unnamed.
    let make_garbage = || {
        tide.ok(&[
            "image",
            "import",
            root.to_str().unwrap(),
            "--name",
            "junk:1",
        ]);
        tide.ok(&["image", "rm", "junk:1"]);
    };
    // How long collecting one such image takes, to spread kill points over it.
    make_garbage();
    let t = std::time::Instant::now();
    tide.ok(&["gc"]);
    let span = t.elapsed().as_millis() as u64 + 1;
    let mut rng = XorShift::new(0x9c);
    let mut killed = 0;
    for run in 0..10u64 {
        make_garbage();
        let delay = rng.below(span);
        let mut child = tide
            .cmd()
            .arg("gc")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            killed += 1;
        }
        child.wait().unwrap();
        let fsck = tide.json(&["fsck"]);
        assert_eq!(
            fsck["problems"].as_array().unwrap().len(),
            0,
            "run {run}, gc killed after {delay} ms: {fsck}"
        );
    }
    assert!(
        killed >= 3,
        "only {killed} of 10 collections were interrupted"
    );
    tide.ok(&["gc"]);
    let s = tide.json(&["stats"]);
    let out = tmp.path().join("out");
    tide.ok(&["image", "export", "keep:1", "--to", out.to_str().unwrap()]);
    assert_same(&tmp.path().join("keep"), &out);
    // Only keep:1 is left: everything else was collected.
    assert_eq!(s["images"], 1);
}
