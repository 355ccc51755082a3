//! Crash safety: `tide image import` killed with SIGKILL at random points, then `fsck` is
//! clean, the previous image still exports intact, and a re-import succeeds.
//! `TIDE_CRASH_RUNS` raises the count (the soak command: scripts/crash-soak).

use std::time::{Duration, Instant};

use tests::fstree::assert_same;
use tests::roots::debian_root;
use tests::tide::Tide;

fn random_below(n: u64, state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state % n.max(1)
}

#[test]
fn import_killed_at_random_points_leaves_a_consistent_store() {
    let runs: u32 = std::env::var("TIDE_CRASH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let root = debian_root("minbase");
    let tmp = tempfile::Builder::new().prefix("tide-crash").tempdir_in("/var/tmp").unwrap();
    let tide = Tide::new(tmp.path().join("store"));
    // A small fixture image that must survive every crash untouched.
    tests::fixture::build(&tmp.path().join("keep"));
    tide.ok(&["image", "import", tmp.path().join("keep").to_str().unwrap(), "--name", "keep:1"]);

    // How long a full import takes, to spread kill points over it.
    let t = Instant::now();
    let probe = Tide::new(tmp.path().join("probe"));
    probe.ok(&["image", "import", root.to_str().unwrap(), "--name", "probe:1"]);
    let full = t.elapsed().as_millis() as u64;
    let mut seed = 0x5eed_u64 ^ u64::from(std::process::id());
    let mut killed = 0;
    for run in 0..runs {
        let delay = random_below(full * 11 / 10 + 1, &mut seed);
        let mut child = tide
            .cmd()
            .args(["image", "import", root.to_str().unwrap(), "--name", &format!("crash:{run}")])
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
        let fsck = tide.json(&["fsck"]);
        assert_eq!(
            fsck["problems"].as_array().unwrap().len(),
            0,
            "run {run}, killed after {delay} ms ({status}): {fsck}"
        );
        // An import is all or nothing: the name exists only if the import finished.
        let names: Vec<String> = tide.json(&["image", "ls"]).as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap().to_string()).collect();
        assert_eq!(names.contains(&format!("crash:{run}")), status.success(), "run {run}: {names:?}");
    }
    assert!(killed >= runs / 2, "only {killed} of {runs} imports were actually interrupted");
    // What was stored before is untouched, and a re-import completes and is intact.
    let out = tmp.path().join("keep-out");
    tide.ok(&["image", "export", "keep:1", "--to", out.to_str().unwrap()]);
    assert_same(&tmp.path().join("keep"), &out);
    tide.ok(&["image", "import", root.to_str().unwrap(), "--name", "crash:final"]);
    let out = tmp.path().join("final-out");
    tide.ok(&["image", "export", "crash:final", "--to", out.to_str().unwrap()]);
    assert_same(&root, &out);
    // GC after all that garbage leaves a consistent store.
    tide.ok(&["gc"]);
    assert_eq!(tide.json(&["fsck"])["problems"].as_array().unwrap().len(), 0);
}
