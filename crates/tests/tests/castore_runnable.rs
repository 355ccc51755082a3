//! `tide image import` makes a plain root runnable: `--entrypoint`, `--cmd`, `--env`,
//! `--workdir` and `--user` set what the image runs, in-process and through volumed
//! alike, and adjust an OCI image's own config (an `--env` key replaces the config's).
//! Bad values are refused naming the flag's field, and nothing is imported.

use std::path::Path;

use tests::tide::Tide;
use tests::volumed::Volumed;

const FLAGS: [&str; 12] = [
    "--entrypoint",
    "[\"python3\", \"-m\", \"flask\"]",
    "--cmd",
    "run",
    "--env",
    "FLASK_APP=app.py",
    "--env",
    "PATH=/opt/bin:/usr/bin",
    "--workdir",
    "/srv/app",
    "--user",
    "65534:65534",
];

fn check(tide: &Tide, src: &Path, name: &str) {
    let mut args = vec!["image", "import", src.to_str().unwrap(), "--name", name];
    args.extend_from_slice(&FLAGS);
    tide.ok(&args);
    let d = tide.json(&["image", "inspect", name]);
    assert_eq!(
        d["entrypoint"],
        serde_json::json!(["python3", "-m", "flask"]),
        "{d}"
    );
    assert_eq!(d["cmd"], serde_json::json!(["run"]), "{d}");
    assert_eq!(d["workdir"], "/srv/app", "{d}");
    assert_eq!(d["user"], "65534:65534", "{d}");
    let env: Vec<&str> = d["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(env.contains(&"FLASK_APP=app.py"), "{d}");
    assert_eq!(
        env.iter()
            .filter(|e| e.starts_with("PATH="))
            .collect::<Vec<_>>(),
        vec![&"PATH=/opt/bin:/usr/bin"],
        "one PATH, the flag's: {d}"
    );
}

#[test]
fn import_flags_set_what_an_image_runs_in_process_and_through_the_daemon() {
    let tmp = tests::tmpdir("tide-runnable");
    let t = tmp.path();
    let src = t.join("src");
    std::fs::create_dir_all(src.join("srv/app")).unwrap();
    std::fs::write(src.join("srv/app/app.py"), "print('hi')\n").unwrap();
    // In-process, on a plain directory.
    let local = Tide::new(t.join("store"));
    check(&local, &src, "app:1");
    // Through volumed, on an OCI image whose config has PATH and Cmd of its own.
    let blobs = tests::oci::Blobs::new(&t.join("blobs"));
    let tar = t.join("src.tar");
    tests::oci::tar(&src, None, &tar);
    let layer = blobs.layer(&tar);
    let oci = t.join("oci");
    blobs.image(&oci, "app:2", &[layer]);
    let daemon = Volumed::start(t.join("data"), t.join("v.sock"));
    let remote = daemon.tide();
    check(&remote, &oci, "app:2");
    // Without flags the OCI config stays as it was.
    remote.ok(&["image", "import", oci.to_str().unwrap(), "--name", "app:3"]);
    let d = remote.json(&["image", "inspect", "app:3"]);
    assert_eq!(d["cmd"], serde_json::json!(["/bin/sh"]), "{d}");

    // Bad values: refused by name, nothing imported, the daemon serves on.
    for (flag, value, says) in [
        (
            "--workdir",
            "srv",
            "workdir \"srv\" is not an absolute path",
        ),
        ("--env", "NOEQUALS", "env \"NOEQUALS\" is not KEY=VALUE"),
        (
            "--user",
            "a:b:c",
            "user \"a:b:c\" is not NAME, UID or UID:GID",
        ),
        (
            "--entrypoint",
            "[\"python3\", 7]",
            "not a JSON array of strings",
        ),
    ] {
        for tide in [&local, &remote] {
            let e = tide.fails(&[
                "image",
                "import",
                src.to_str().unwrap(),
                "--name",
                "bad:1",
                flag,
                value,
            ]);
            assert!(e.contains(says), "{flag} {value}: {e}");
        }
    }
    assert!(!remote.ok(&["image", "ls"]).contains("bad:1"));
    assert!(!local.ok(&["image", "ls"]).contains("bad:1"));
}
