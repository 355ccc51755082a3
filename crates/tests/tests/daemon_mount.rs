//! `tide mount`, `tide umount` and `tide mount ls` through `volumed` and layerfs: a
//! round trip, mounts as GC roots, and the cleanup of mounts a killed daemon left.
//!
//! These need FUSE (`/dev/fuse`, root): without it the test fails loudly.

use std::path::Path;

use tests::tide::Tide;
use tests::volumed::Volumed;
use tests::{fixture, tmpdir};

const NOT_YET: &str = "layerfs mount is not implemented yet";

fn is_fuse_mount(mp: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mp = mp.to_str().unwrap();
    info.lines().any(|l| {
        let (pre, post) = l.split_once(" - ").unwrap();
        pre.split(' ').nth(4) == Some(mp) && post.starts_with("fuse")
    })
}

#[test]
fn mounts_need_the_daemon() {
    let tmp = tmpdir("tide-mount-local");
    let t = Tide::new(tmp.path().join("store"));
    for args in [
        &["mount", "x:1", "/tmp"][..],
        &["umount", "/tmp"],
        &["mount", "ls"],
    ] {
        let e = t.fails(args);
        assert!(e.contains("mounts need the daemon"), "{args:?}: {e}");
    }
}

#[test]
fn mount_round_trip() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: FUSE tests need it (and root)"
    );
    let tmp = tmpdir("tide-mount");
    let src = tmp.path().join("src");
    fixture::build(&src);
    let data = tmp.path().join("data");
    let sock = tmp.path().join("v.sock");
    let daemon = Volumed::start(&data, &sock);
    let tide = daemon.tide();
    tide.ok(&["image", "import", src.to_str().unwrap(), "--name", "fx:1"]);
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = mnt.to_str().unwrap();

    // Bad requests first: each a clear error, and the daemon keeps serving.
    let e = tide.fails(&["mount", "nope:1", m]);
    assert!(e.contains("nope:1"), "{e}");
    let e = tide.fails(&["mount", "fx:1", "/nonexistent/dir"]);
    assert!(e.contains("/nonexistent/dir"), "{e}");
    let e = tide.fails(&["umount", m]);
    assert!(e.contains("nothing mounted by volumed"), "{e}");

    let o = tide.run(&["mount", "fx:1", m]);
    if !o.status.success() {
        // Until layerfs lands its FUSE front end, the daemon reports that clearly and
        // records nothing.
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(NOT_YET), "unexpected mount failure: {e}");
        assert_eq!(tide.json(&["mount", "ls"]), serde_json::json!([]));
        assert!(!is_fuse_mount(&mnt));
        let scratch: Vec<_> = std::fs::read_dir(data.join("scratch")).unwrap().collect();
        assert!(scratch.is_empty(), "scratch left behind: {scratch:?}");
        panic!("tide mount is not usable yet: layerfs says: {e}");
    }
    assert!(is_fuse_mount(&mnt), "no FUSE mount at {m}");
    let e = tide.fails(&["mount", "fx:1", m]);
    assert!(e.contains("already a volumed mount"), "{e}");
    tests::fstree::assert_same(&src, &mnt);

    let ls = tide.json(&["mount", "ls"]);
    assert_eq!(ls.as_array().unwrap().len(), 1, "{ls}");
    assert_eq!(ls[0]["mountpoint"], m);
    assert_eq!(ls[0]["name"], "fx:1");
    assert_eq!(ls[0]["read_only"], false);
    let text = tide.ok(&["mount", "ls"]);
    assert!(text.starts_with("MOUNTPOINT") && text.contains(m), "{text}");

    // Writes land in scratch and show in the scratch usage.
    std::fs::write(mnt.join("new-file"), vec![7u8; 1 << 20]).unwrap();
    let ls = tide.json(&["mount", "ls"]);
    assert!(ls[0]["scratch_bytes"].as_u64().unwrap() >= 1 << 20, "{ls}");

    // A busy mount stays mounted and says so; once its user leaves, it unmounts.
    let mut user = std::process::Command::new("sleep")
        .arg("600")
        .current_dir(&mnt)
        .spawn()
        .unwrap();
    let e = tide.fails(&["umount", m]);
    assert!(e.contains("busy"), "{e}");
    assert!(is_fuse_mount(&mnt));
    assert_eq!(tide.json(&["mount", "ls"]).as_array().unwrap().len(), 1);
    user.kill().unwrap();
    user.wait().unwrap();

    // A live mount's image is a GC root, even once its name is gone.
    tide.ok(&["image", "rm", "fx:1"]);
    tide.ok(&["gc"]);
    tests::fstree::assert_same(&src.join("usr"), &mnt.join("usr"));
    tide.ok(&["umount", m]);
    assert!(!is_fuse_mount(&mnt));
    assert_eq!(tide.json(&["mount", "ls"]), serde_json::json!([]));

    // kill -9 while mounted: the next start cleans the stale mount and its scratch.
    tide.ok(&["image", "import", src.to_str().unwrap(), "--name", "fx:2"]);
    tide.ok(&["mount", "fx:2", m, "--read-only"]);
    assert!(
        std::fs::write(mnt.join("x"), b"x").is_err(),
        "read-only mount took a write"
    );
    let st = daemon.signal_and_wait(libc::SIGKILL);
    assert!(!st.success());
    let daemon = Volumed::start(&data, &sock);
    assert!(
        !is_fuse_mount(&mnt),
        "stale mount left at {m}:\n{}",
        daemon.log_text()
    );
    assert!(
        daemon.log_text().contains("stale mount"),
        "{}",
        daemon.log_text()
    );
    assert_eq!(std::fs::read_dir(data.join("scratch")).unwrap().count(), 0);
    assert!(daemon.tide().ok(&["fsck"]).contains("store is consistent"));

    // SIGTERM unmounts everything.
    daemon.tide().ok(&["mount", "fx:2", m]);
    assert!(daemon.signal_and_wait(libc::SIGTERM).success());
    assert!(!is_fuse_mount(&mnt));
}
