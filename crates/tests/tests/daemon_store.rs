//! Every store command through `volumed` (`tide --socket`) behaves as it does on a store
//! opened in-process (`tide --store`): same results, same output shape.

use serde_json::Value;
use tests::fstree::assert_same;
use tests::tide::Tide;
use tests::volumed::Volumed;
use tests::{fixture, tmpdir};

/// Drops the fields that measure time or the disk, which differ between two runs.
fn without(mut v: Value, keys: &[&str]) -> Value {
    if let Some(o) = v.as_object_mut() {
        for k in keys {
            o.remove(*k);
        }
    }
    v
}

/// Runs `args` on both and checks the JSON replies agree.
fn same_json(local: &Tide, remote: &Tide, args: &[&str], ignore: &[&str]) -> Value {
    let l = without(local.json(args), ignore);
    let r = without(remote.json(args), ignore);
    assert_eq!(l, r, "tide {args:?}: --store and --socket disagree");
    r
}

/// Runs `args` on both and checks the human output agrees line by line, except lines
/// starting with one of `ignore`.
fn same_text(local: &Tide, remote: &Tide, args: &[&str], ignore: &[&str]) -> String {
    let keep = |s: String| -> Vec<String> {
        s.lines()
            .filter(|l| !ignore.iter().any(|i| l.starts_with(i)))
            .map(str::to_string)
            .collect()
    };
    let l = keep(local.ok(args));
    let r = keep(remote.ok(args));
    assert_eq!(l, r, "tide {args:?}: --store and --socket disagree");
    r.join("\n")
}

#[test]
fn store_commands_through_the_daemon_match_the_local_store() {
    let tmp = tmpdir("tide-daemon-store");
    let src = tmp.path().join("src");
    fixture::build(&src);
    let daemon = Volumed::start(tmp.path().join("data"), tmp.path().join("volumed.sock"));
    let remote = daemon.tide();
    let local = Tide::new(tmp.path().join("local-store"));
    let s = src.to_str().unwrap();

    // Import: same report (timing aside), human line included.
    let r = same_json(
        &local,
        &remote,
        &["image", "import", s, "--name", "fixture:1"],
        &["seconds"],
    );
    assert_eq!(r["name"], "fixture:1");
    let human = |t: &Tide| {
        let out = t.ok(&["image", "import", s, "--name", "fixture:2"]);
        // "... in 0.01s; ..." differs in its timing only.
        let line = out.lines().next().unwrap().to_string();
        let (a, b) = line.split_once(" in ").unwrap();
        format!("{a} {}", b.split_once(';').unwrap().1)
    };
    assert_eq!(human(&local), human(&remote));

    same_text(&local, &remote, &["image", "ls"], &[]);
    same_json(&local, &remote, &["image", "ls"], &[]);
    same_text(&local, &remote, &["image", "inspect", "fixture:1"], &[]);
    same_json(&local, &remote, &["image", "inspect", "fixture:1"], &[]);

    // Export to a directory and to a tar, through the daemon.
    let out = tmp.path().join("out");
    let text = remote.ok(&[
        "image",
        "export",
        "fixture:1",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert!(text.starts_with("exported fixture:1 to "), "{text}");
    assert_same(&src, &out);
    let tar = tmp.path().join("out.tar");
    let r = remote.json(&[
        "image",
        "export",
        "fixture:1",
        "--to",
        tar.to_str().unwrap(),
    ]);
    assert!(r["entries"].as_u64().unwrap() > 5 && tar.is_file(), "{r}");
    // A relative target is resolved in tide's directory, not the daemon's.
    let o = remote
        .cmd()
        .current_dir(tmp.path())
        .args(["image", "export", "fixture:1", "--to", "rel-out"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same(&src, &tmp.path().join("rel-out"));

    // Lone layers.
    let l = same_json(&local, &remote, &["layer", "import", s], &["seconds"]);
    let layer = l["layers"][0].as_str().unwrap().to_string();
    same_text(&local, &remote, &["layer", "ls"], &[]);
    let lout = tmp.path().join("layer-out");
    remote.ok(&[
        "layer",
        "export",
        &layer[..20],
        "--to",
        lout.to_str().unwrap(),
    ]);
    assert_same(&src, &lout);
    same_text(&local, &remote, &["layer", "rm", &layer], &[]);

    // Removal, gc, fsck, stats.
    same_text(&local, &remote, &["image", "rm", "fixture:2"], &[]);
    same_json(&local, &remote, &["stats"], &["disk_bytes"]);
    same_text(&local, &remote, &["stats"], &["  on disk:"]);
    same_json(&local, &remote, &["gc"], &[]);
    same_text(&local, &remote, &["image", "rm", "fixture:1"], &[]);
    same_text(&local, &remote, &["gc"], &[]);
    same_text(&local, &remote, &["fsck"], &[]);
    same_json(&local, &remote, &["fsck"], &[]);
    same_text(&local, &remote, &["image", "ls"], &[]);

    // Errors read the same too.
    for args in [
        &["image", "inspect", "nope:1"][..],
        &["image", "rm", "nope:1"],
        &["layer", "rm", "abcdef"],
        &["image", "import", "/nonexistent/path", "--name", "x:1"],
    ] {
        assert_eq!(local.fails(args), remote.fails(args), "tide {args:?}");
    }
}

#[test]
fn socket_and_store_are_exclusive_and_one_is_required() {
    let tmp = tmpdir("tide-daemon-args");
    let tide = Tide::new(tmp.path().join("s"));
    let e = tide.fails(&["--socket", "/nonexistent.sock", "image", "ls"]);
    assert!(e.contains("not both"), "{e}");
    let o = std::process::Command::new(tests::tide_bin())
        .args(["image", "ls"])
        .env_remove("TIDE_STORE")
        .env_remove("TIDE_SOCKET")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("--store DIR") && e.contains("--socket PATH"),
        "{e}"
    );
    let remote = Tide::remote(tmp.path().join("none.sock"), tmp.path().join("s"));
    let e = remote.fails(&["image", "ls"]);
    assert!(
        e.contains("connecting to volumed") && e.contains("none.sock"),
        "{e}"
    );
    // Stdout export needs the local store: the daemon writes files on its own host.
    let daemon = Volumed::start(tmp.path().join("data"), tmp.path().join("v.sock"));
    let e = daemon
        .tide()
        .fails(&["image", "export", "x:1", "--to", "-"]);
    assert!(e.contains("stdout"), "{e}");
}
