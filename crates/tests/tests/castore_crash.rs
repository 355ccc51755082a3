//! Crash safety: `tide image import` killed with SIGKILL at random points, then `fsck` is
//! clean, the previous image still exports intact, and a re-import succeeds.
//! `TIDE_CRASH_RUNS` raises the count (the soak command: scripts/crash-soak).

use std::time::{Duration, Instant};

use tests::fstree::assert_same;
use tests::roots::debian_root;
use tests::tide::{Tide, XorShift, scratch};

#[test]
fn import_killed_at_random_points_leaves_a_consistent_store() {
    let runs: u32 = std::env::var("TIDE_CRASH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let root = debian_root("minbase");
    let tmp = scratch("tide-crash");
    let tide = Tide::new(tmp.path().join("store"));
    // A small fixture image that must survive every crash untouched.
    tide.import_fixture(&tmp.path().join("keep"), "keep:1");

    // Half the runs kill an import into a fresh store (mostly compressing and writing new
    // chunks), half into the store that keeps everything so far (mostly deduplicating and
    // committing). Kill points are spread over how long each kind of import takes.
    let fresh = tmp.path().join("fresh");
    let timed = |t: &Tide, name: &str| {
        let start = Instant::now();
        t.ok(&["image", "import", root.to_str().unwrap(), "--name", name]);
        start.elapsed().as_millis() as u64
    };
    let fresh_ms = timed(&Tide::new(&fresh), "probe:1");
    let reimport_ms = {
        timed(&tide, "probe:1");
        timed(&tide, "probe:2")
    };
    let mut rng = XorShift::new(0x5eed);
    let mut killed = 0;
    for run in 0..runs {
        let (target, span) = if run % 2 == 0 {
            std::fs::remove_dir_all(&fresh).unwrap();
            (Tide::new(&fresh), fresh_ms)
        } else {
            (Tide::new(&tide.store), reimport_ms)
        };
        let delay = rng.below(span * 11 / 10 + 1);
        let mut child = target
            .cmd()
            .args([
                "image",
                "import",
                root.to_str().unwrap(),
                "--name",
                &format!("crash:{run}"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            killed += 1;
        }
        let status = child.wait().unwrap();
        let fsck = target.json(&["fsck"]);
        assert_eq!(
            fsck["problems"].as_array().unwrap().len(),
            0,
            "run {run}, killed after {delay} ms ({status}): {fsck}"
        );
        // An import that reported success is there. One killed may be there too if the
        // kill came after its final commit; fsck above shows it is then complete.
        let names: Vec<String> = target
            .json(&["image", "ls"])
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_string())
            .collect();
        if status.success() {
            assert!(
                names.contains(&format!("crash:{run}")),
                "run {run}: {names:?}"
            );
        }
    }
    assert!(
        killed >= runs / 2,
        "only {killed} of {runs} imports were actually interrupted"
    );
    // What was stored before is untouched, and a re-import completes and is intact.
    let out = tmp.path().join("keep-out");
    tide.ok(&["image", "export", "keep:1", "--to", out.to_str().unwrap()]);
    assert_same(&tmp.path().join("keep"), &out);
    tide.ok(&[
        "image",
        "import",
        root.to_str().unwrap(),
        "--name",
        "crash:final",
    ]);
    let out = tmp.path().join("final-out");
    tide.ok(&[
        "image",
        "export",
        "crash:final",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_same(&root, &out);
    // GC after all that garbage leaves a consistent store.
    tide.ok(&["gc"]);
    assert_eq!(
        tide.json(&["fsck"])["problems"].as_array().unwrap().len(),
        0
    );
}
