//! Volumes through the real `volumed`, driven by `tide volume ...` and by NBD clients
//! someone else wrote (libnbd's nbdinfo/nbdcopy, QEMU's qemu-img/qemu-io, fio's nbd
//! engine): flags, data round trips, snapshots and clones, access modes across client
//! processes, kill -9 after FLUSH/FUA, and a handshake fuzz against the daemon.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tests::nbd::{Fuzz, Rng, fuzz, map_runs, ok, qemu_img_compare, random_file, run};
use tests::tide::{Tide, XorShift};
use tests::tmpdir;
use tests::volumed::Volumed;

const MIB: u64 = 1 << 20;

fn start(dir: &Path) -> Volumed {
    Volumed::start(dir.join("data"), dir.join("volumed.sock"))
}

fn nbdinfo_json(uri: &str) -> serde_json::Value {
    let out = ok("nbdinfo", &["--json", uri]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["exports"][0].clone()
}

/// qemu-io commands against `uri` in one process; panics on failure. qemu-io reports
/// a failed verification (`read -P`) on stdout and still exits 0, so that is checked.
fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    // Reads only: open read-only, as snapshots and ROX volumes require.
    if cmds.iter().all(|c| c.starts_with("read")) {
        args.push("-r".into());
    }
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(uri.to_string());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ok("qemu-io", &a);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io {cmds:?}: {out}"
    );
    out
}

/// A qemu-io that connects to `uri` and holds the connection until killed.
fn holder(uri: &str) -> Child {
    Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "sleep 600000", uri])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-io must be installed (apt: qemu-utils)")
}

/// Waits until `volume` has `n` attachments.
fn wait_attachments(t: &Tide, volume: &str, n: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = t.json(&["volume", "inspect", volume]);
        if d["attachment_list"].as_array().unwrap().len() == n {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "{volume} never had {n} attachments: {d}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn nbd_clients_through_volumed() {
    let dir = tmpdir("vol-clients");
    let d = start(dir.path());
    let t = d.tide();
    t.ok(&["volume", "create", "disk", "--size", "512M"]);
    t.ok(&[
        "volume", "create", "model", "--size", "64M", "--mode", "rox",
    ]);
    t.ok(&["volume", "create", "mapv", "--size", "16M", "--mode", "rwx"]);
    let disk = d.nbd_uri("disk");
    assert_eq!(t.ok(&["volume", "url", "disk"]).trim(), disk);
    let tcp = t.ok(&["volume", "url", "--tcp", "disk"]);
    assert!(
        tcp.starts_with("nbd://127.0.0.1:") && tcp.trim().ends_with("/disk"),
        "{tcp}"
    );

    // Exactly the flags we mean to advertise.
    let rw = nbdinfo_json(&disk);
    for (flag, want) in [
        ("is_read_only", false),
        ("can_flush", true),
        ("can_fua", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_fast_zero", true),
        // RWO by name: the connection is the one attachment, so no second connection.
        ("can_multi_conn", false),
        ("can_cache", true),
        ("can_df", true),
    ] {
        assert_eq!(rw[flag], want, "{flag}: {rw}");
    }
    assert_eq!(rw["export-size"], 512 * MIB);
    assert_eq!(rw["block_size_minimum"], 512);
    assert_eq!(rw["block_size_maximum"], 32 * MIB);
    let ro = nbdinfo_json(&d.nbd_uri("model"));
    for (flag, want) in [
        ("is_read_only", true),
        ("can_flush", false),
        ("can_trim", false),
        ("can_zero", false),
        ("can_multi_conn", true),
    ] {
        assert_eq!(ro[flag], want, "{flag}: {ro}");
    }
    assert!(
        run("nbdinfo", &["--is", "read-only", &d.nbd_uri("model")])
            .status
            .success()
    );
    assert!(
        !run("nbdinfo", &["--is", "read-only", &disk])
            .status
            .success()
    );
    assert!(
        !run("nbdinfo", &["--can", "multi-conn", &disk])
            .status
            .success()
    );
    let rwx = d.nbd_uri("mapv");
    assert!(
        run("nbdinfo", &["--can", "multi-conn", &rwx])
            .status
            .success()
    );
    // A listing shows volumes (and snapshots), not templates.
    let list = ok("nbdinfo", &["--list", "--json", &disk]);
    assert!(
        list.contains("\"disk\"") && list.contains("\"model\""),
        "{list}"
    );

    // nbdcopy 256 MiB in and out.
    let src = dir.path().join("src.raw");
    let data = random_file(&src, 256 * MIB as usize, 7);
    ok("nbdcopy", &[src.to_str().unwrap(), &disk]);
    let back = dir.path().join("back.raw");
    ok("nbdcopy", &[&disk, back.to_str().unwrap()]);
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), 512 * MIB as usize);
    assert!(got[..data.len()] == data[..], "nbdcopy round trip differs");
    assert!(got[data.len()..].iter().all(|&b| b == 0));

    // qemu-img convert and compare against a raw file.
    let img = dir.path().join("img.raw");
    random_file(&img, 512 * MIB as usize, 8);
    ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            img.to_str().unwrap(),
            &disk,
        ],
    );
    let img_path = img.to_str().unwrap();
    let same = qemu_img_compare(img_path, &disk);
    assert!(same.status.success(), "{same:?}");
    std::fs::write(&img, vec![1u8; 4096]).unwrap();
    let differ = qemu_img_compare(img_path, &disk);
    assert_eq!(
        differ.status.code(),
        Some(1),
        "compare must see a difference"
    );

    // qemu-io patterns, aligned and not.
    qemu_io(
        &disk,
        &[
            "write -P 0x5a 1M 64k".into(),
            "write -P 0xa5 3M 4096".into(),
            "write -P 0x3c 5243392 1536".into(),
            "read -P 0x5a 1M 64k".into(),
            "read -P 0xa5 3M 4096".into(),
            "read -P 0x3c 5243392 1536".into(),
            "flush".into(),
        ],
    );

    // fio's nbd engine, random writes verified with crc32c.
    let fio = ok(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={disk}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=64M",
            "--iodepth=8",
            "--verify=crc32c",
            // fio writes a verify-state file into its working directory otherwise.
            "--verify_state_save=0",
            "--output-format=json",
        ],
    );
    let json: serde_json::Value = serde_json::from_str(&fio[fio.find('{').unwrap()..]).unwrap();
    assert_eq!(json["jobs"][0]["error"], 0, "{fio}");

    // nbdinfo --map matches written and trimmed ranges.
    let map = d.nbd_uri("mapv");
    qemu_io(
        &map,
        &[
            "write -P 0x11 0 1M".into(),
            "write -P 0x22 4M 2M".into(),
            "discard 4M 1M".into(),
            "write -z -u 8M 1M".into(),
            // Without -u qemu sends NBD_CMD_FLAG_NO_HOLE: zeros that stay allocated,
            // over data and over a hole.
            "write -P 0x33 10M 1M".into(),
            "write -z 10M 1M".into(),
            "write -z 12M 1M".into(),
        ],
    );
    let runs = map_runs(&map);
    let kind_at = |off: u64| {
        runs.iter()
            .find(|(o, l, _)| *o <= off && off < o + l)
            .map(|r| r.2)
            .unwrap_or_else(|| panic!("offset {off} not mapped: {runs:?}"))
    };
    assert_eq!(kind_at(0), 0, "written: data");
    assert_eq!(kind_at(MIB - 1), 0);
    assert_eq!(kind_at(2 * MIB), 3, "never written: hole, zero");
    assert_eq!(kind_at(4 * MIB), 3, "trimmed: hole, zero");
    assert_eq!(kind_at(5 * MIB), 0, "written, not trimmed");
    assert_eq!(kind_at(8 * MIB), 3, "zeroed: hole, zero");
    assert_eq!(
        kind_at(10 * MIB),
        2,
        "zeroed with NO_HOLE over data: data, zero"
    );
    assert_eq!(
        kind_at(12 * MIB),
        2,
        "zeroed with NO_HOLE over a hole: data, zero"
    );
    assert_eq!(kind_at(11 * MIB), 3, "never written");
    qemu_io(
        &map,
        &[
            "read -P 0 4M 1M".into(),
            "read -P 0x22 5M 1M".into(),
            "read -P 0 10M 1M".into(),
            "read -P 0 12M 1M".into(),
        ],
    );

    // Through all of that the store stayed consistent.
    assert!(t.ok(&["fsck"]).contains("store is consistent"));
}

#[test]
fn snapshots_clones_and_resize_over_nbd() {
    let dir = tmpdir("vol-snap");
    let d = start(dir.path());
    let t = d.tide();
    t.ok(&["volume", "create", "data", "--size", "64M"]);
    let uri = d.nbd_uri("data");
    qemu_io(&uri, &["write -P 0xaa 0 8M".into()]);
    let s = t.json(&["volume", "snapshot", "data", "s1"]);
    assert_eq!(s["name"], "s1");
    qemu_io(&uri, &["write -P 0xbb 0 4M".into()]);
    // The snapshot still reads the old bytes, read-only.
    let snap = d.nbd_uri("data@s1");
    assert!(
        run("nbdinfo", &["--is", "read-only", &snap])
            .status
            .success()
    );
    qemu_io(&snap, &["read -P 0xaa 0 8M".into()]);
    // Clone it, write to the clone: the parent and the snapshot are unchanged.
    t.ok(&["volume", "clone", "data@s1", "copy"]);
    let copy = d.nbd_uri("copy");
    qemu_io(
        &copy,
        &["read -P 0xaa 0 8M".into(), "write -P 0xcc 2M 1M".into()],
    );
    qemu_io(
        &uri,
        &["read -P 0xbb 0 4M".into(), "read -P 0xaa 4M 4M".into()],
    );
    qemu_io(&snap, &["read -P 0xaa 0 8M".into()]);
    qemu_io(
        &copy,
        &[
            "read -P 0xaa 0 2M".into(),
            "read -P 0xcc 2M 1M".into(),
            "read -P 0xaa 3M 5M".into(),
        ],
    );
    // inspect: what is shared and what is the clone's own.
    let ci = t.json(&["volume", "inspect", "copy"]);
    assert_eq!(ci["origin"], "data@s1");
    assert_eq!(ci["allocated_bytes"], 8 * MIB, "{ci}");
    let unique = ci["unique_bytes"].as_u64().unwrap();
    assert!(
        unique > 0 && unique < MIB,
        "only the 1 MiB written (compressed) is the clone's: {ci}"
    );
    let di = t.json(&["volume", "inspect", "data"]);
    assert_eq!(di["snapshot_list"][0]["clones"][0], "copy");
    assert_eq!(t.json(&["volume", "snapshots", "data"])[0]["name"], "s1");

    // Deleting what others depend on is refused, naming them.
    let e = t.fails(&["volume", "rm", "data"]);
    assert!(
        e.contains("clones (copy)") || e.contains("snapshots (s1)"),
        "{e}"
    );
    let e = t.fails(&["volume", "rm", "data@s1"]);
    assert!(e.contains("copy"), "{e}");

    // Grow online: a connection made after sees the new size, data kept.
    t.ok(&["volume", "resize", "data", "128M"]);
    assert_eq!(nbdinfo_json(&uri)["export-size"], 128 * MIB);
    qemu_io(
        &uri,
        &["read -P 0xbb 0 4M".into(), "read -P 0 64M 64M".into()],
    );
    // Shrinking needs --shrink and a confirmation (no terminal here: --yes).
    let e = t.fails(&["volume", "resize", "data", "4M"]);
    assert!(e.contains("--shrink"), "{e}");
    let e = t.fails(&["volume", "resize", "data", "4M", "--shrink"]);
    assert!(e.contains("--yes"), "{e}");
    t.ok(&["volume", "resize", "data", "4M", "--shrink", "--yes"]);
    assert_eq!(nbdinfo_json(&uri)["export-size"], 4 * MIB);
    t.ok(&["volume", "resize", "data", "8M"]);
    qemu_io(
        &uri,
        &["read -P 0xbb 0 4M".into(), "read -P 0 4M 4M".into()],
    );
    qemu_io(&snap, &["read -P 0xaa 0 8M".into()]);

    // Cascade removes the clone with the volume.
    let r = t.json(&["volume", "rm", "--cascade", "data"]);
    let removed: Vec<&str> = r["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        removed.contains(&"copy") && removed.contains(&"data"),
        "{r}"
    );
    assert!(t.json(&["volume", "ls"]).as_array().unwrap().is_empty());
    assert!(t.ok(&["fsck"]).contains("store is consistent"));
}

#[test]
fn access_modes_hold_across_client_processes() {
    let dir = tmpdir("vol-modes");
    let d = start(dir.path());
    let t = d.tide();
    t.ok(&["volume", "create", "db", "--size", "16M", "--mode", "rwo"]);
    t.ok(&[
        "volume", "create", "cache", "--size", "16M", "--mode", "rwx",
    ]);
    t.ok(&[
        "volume", "create", "model", "--size", "16M", "--mode", "rox",
    ]);
    let made = t.json(&["volume", "create", "pg", "--size", "8M", "--instances", "3"]);
    let names: Vec<&str> = made
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pg", "pg-0", "pg-1", "pg-2"]);

    // RWO: one process holds it; a second is refused naming the holder, over NBD and
    // through tide.
    let db = d.nbd_uri("db");
    let mut first = holder(&db);
    let info = wait_attachments(&t, "db", 1);
    let pid = first.id();
    assert!(
        info["attachment_list"][0]["holder"]
            .as_str()
            .unwrap()
            .contains(&format!("pid {pid}")),
        "{info}"
    );
    let second = run("qemu-io", &["-f", "raw", "-c", "read 0 4k", &db]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    assert!(
        err.contains(&format!("in use by nbd client pid {pid} (qemu-io)")),
        "{err}"
    );
    let e = t.fails(&["volume", "attach", "db", "--holder", "vm-2"]);
    assert!(e.contains(&format!("pid {pid}")), "{e}");
    // Deleting an attached volume is refused.
    assert!(t.fails(&["volume", "rm", "db"]).contains("attached"));
    first.kill().unwrap();
    first.wait().unwrap();
    wait_attachments(&t, "db", 0);

    // A persistent attachment: its own export name works, the plain name is refused
    // naming it, and detaching ends it.
    let a = t.json(&["volume", "attach", "db", "--holder", "vm-7"]);
    let export = a["export_name"].as_str().unwrap().to_string();
    assert_eq!(export, format!("db/{}", a["id"]));
    assert_eq!(a["url"], d.nbd_uri(&export));
    qemu_io(&d.nbd_uri(&export), &["write -P 7 0 64k".into()]);
    qemu_io(&d.nbd_uri(&export), &["read -P 7 0 64k".into()]);
    let refused = run("qemu-io", &["-f", "raw", "-c", "read 0 4k", &db]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("held by vm-7"));
    // It survives a restart of the daemon.
    let d = {
        drop(d);
        start(dir.path())
    };
    let t = d.tide();
    assert_eq!(
        wait_attachments(&t, "db", 1)["attachment_list"][0]["holder"],
        "vm-7"
    );
    t.ok(&["volume", "detach", "db"]);
    let gone = run(
        "qemu-io",
        &["-f", "raw", "-c", "read 0 4k", &d.nbd_uri(&export)],
    );
    assert!(!gone.status.success());
    qemu_io(&db, &["read -P 7 0 64k".into()]);

    // RWX: two writer processes at once, each sees the other's writes (multi-conn).
    let cache = d.nbd_uri("cache");
    let mut a = holder(&cache);
    wait_attachments(&t, "cache", 1);
    qemu_io(&cache, &["write -P 0x41 0 1M".into()]);
    qemu_io(
        &cache,
        &["read -P 0x41 0 1M".into(), "write -P 0x42 1M 1M".into()],
    );
    a.kill().unwrap();
    a.wait().unwrap();

    // ROX: any number of readers; writes get EPERM.
    let model = d.nbd_uri("model");
    let mut r1 = holder(&model);
    let mut r2 = holder(&model);
    wait_attachments(&t, "model", 2);
    let w = run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &model]);
    assert!(
        String::from_utf8_lossy(&w.stderr).contains("Permission denied"),
        "{w:?}"
    );
    let src = dir.path().join("x.raw");
    random_file(&src, MIB as usize, 3);
    let w = run("nbdcopy", &[src.to_str().unwrap(), &model]);
    assert!(
        !w.status.success(),
        "nbdcopy into a read-only export must fail"
    );
    r1.kill().unwrap();
    r2.kill().unwrap();
    r1.wait().unwrap();
    r2.wait().unwrap();

    // Per-instance: the template is not attachable, its instances are (each RWO).
    let e = t.fails(&["volume", "attach", "pg", "--holder", "x"]);
    assert!(
        e.contains("per-instance template") && e.contains("pg-0"),
        "{e}"
    );
    t.ok(&["volume", "attach", "pg-1", "--holder", "instance-1"]);
    assert!(
        t.fails(&["volume", "attach", "pg-1", "--holder", "instance-9"])
            .contains("instance-1")
    );
    let ls = t.json(&["volume", "ls"]);
    let pg1 = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "pg-1")
        .unwrap();
    assert_eq!(pg1["template"], "pg");
    assert_eq!(pg1["attachments"], 1);
    let e = t.fails(&["volume", "rm", "pg"]);
    assert!(e.contains("pg-0, pg-1, pg-2"), "{e}");
    t.ok(&["volume", "detach", "pg-1"]);
    let r = t.json(&["volume", "rm", "--cascade", "pg"]);
    assert_eq!(r["removed"].as_array().unwrap().len(), 4, "{r}");
}

#[test]
fn kill_9_after_flush_or_fua_loses_nothing_acknowledged() {
    let dir = tmpdir("vol-kill");
    let mut d = start(dir.path());
    d.tide().ok(&["volume", "create", "v", "--size", "32M"]);
    let mut rng = XorShift::new(0x5eed);
    // The expected content, in 64 KiB units: the pattern byte last acknowledged there.
    let unit = 64 << 10;
    let mut model = vec![0u8; 512];
    for round in 0..20 {
        let uri = d.nbd_uri("v");
        let mut cmds = Vec::new();
        let mut next = model.clone();
        for _ in 0..1 + rng.below(6) {
            let u = rng.below(488) as usize;
            let n = 1 + rng.below(8) as usize;
            let p = 1 + rng.below(250) as u8;
            // Every other round ends with a FUA write instead of a flush.
            let fua = if round % 2 == 1 { "-f " } else { "" };
            cmds.push(format!("write {fua}-P {p} {} {}", u * unit, n * unit));
            next[u..u + n].fill(p);
        }
        if round % 2 == 0 {
            cmds.push("flush".into());
        }
        qemu_io(&uri, &cmds);
        model = next;
        // Unacknowledged-as-durable writes racing the kill: they may or may not survive,
        // but must not break anything acknowledged or the store.
        let racer = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0xfe 31M 1M", &uri])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.below(30)));
        d.signal_and_wait(libc::SIGKILL);
        let mut racer = racer;
        let _ = racer.wait();
        d = start(dir.path());
        // Every acknowledged byte reads back (runs of equal units at once).
        let mut reads = Vec::new();
        let mut u = 0;
        while u < 496 {
            let mut e = u + 1;
            while e < 496 && model[e] == model[u] {
                e += 1;
            }
            reads.push(format!(
                "read -P {} {} {}",
                model[u],
                u * unit,
                (e - u) * unit
            ));
            u = e;
        }
        qemu_io(&d.nbd_uri("v"), &reads);
    }
    let fsck = d.tide().ok(&["fsck"]);
    assert!(fsck.contains("store is consistent"), "{fsck}");
    d.alive();
}

#[test]
fn fuzzed_handshakes_against_volumed_change_nothing() {
    let dir = tmpdir("vol-fuzz");
    let d = start(dir.path());
    let t = d.tide();
    let size = 64 * MIB;
    t.ok(&["volume", "create", "fuzz", "--size", "64M", "--mode", "rwx"]);
    t.ok(&["volume", "create", "live", "--size", "8M"]);
    let mut content = vec![0u8; size as usize];
    Rng(99).fill(&mut content[..4 * MIB as usize]);
    let src = dir.path().join("content.raw");
    std::fs::write(&src, &content).unwrap();
    ok("nbdcopy", &[src.to_str().unwrap(), &d.nbd_uri("fuzz")]);
    t.ok(&["volume", "snapshot", "fuzz", "ro"]);
    let socket = d.data.join("nbd.sock");
    fuzz(
        Fuzz {
            socket: &socket,
            export: "fuzz",
            size,
            content: &content,
            ro_export: "fuzz@ro",
            live_uri: d.nbd_uri("live"),
            map_uri: d.nbd_uri("fuzz"),
        },
        3000,
    );
    for export in ["fuzz", "fuzz@ro"] {
        let out = dir.path().join("out.raw");
        let _ = std::fs::remove_file(&out);
        ok("nbdcopy", &[&d.nbd_uri(export), out.to_str().unwrap()]);
        assert!(
            std::fs::read(&out).unwrap() == content,
            "the fuzz changed {export}"
        );
    }
    // The daemon still serves RPC and the store is consistent.
    assert_eq!(t.json(&["volume", "ls"]).as_array().unwrap().len(), 2);
    assert!(t.ok(&["fsck"]).contains("store is consistent"));
}

/// `tide stats` with an image and volumes: images and volumes in sections of their own,
/// each counted as if every image, volume and snapshot were stored alone, the store's
/// totals both added up; the same figures through the daemon and in-process.
#[test]
fn stats_count_images_and_volumes_apart_and_alike() {
    let dir = tmpdir("vol-stats");
    let src = dir.path().join("src");
    tests::fixture::build(&src);
    let d = start(dir.path());
    let t = d.tide();
    t.ok(&["image", "import", src.to_str().unwrap(), "--name", "f:1"]);
    let images_only = t.json(&["stats"]);
    assert_eq!(images_only["volumes"], 0);
    assert_eq!(images_only["volume_data"]["logical_bytes"], 0);
    let image_data = images_only["image_data"].clone();
    assert!(
        image_data["unique_bytes"].as_u64().unwrap() > 0,
        "{images_only}"
    );

    // 8 MiB of random bytes (128 distinct extents), a snapshot and a clone of it: three
    // views of the same 8 MiB, 24 MiB logical over 8 MiB of chunks.
    t.ok(&["volume", "create", "data", "--size", "64M"]);
    let noise = dir.path().join("noise");
    random_file(&noise, 8 * MIB as usize, 18);
    ok(
        "nbdcopy",
        &[noise.to_str().unwrap(), &d.nbd_uri("data"), "--flush"],
    );
    t.ok(&["volume", "snapshot", "data", "s1"]);
    t.ok(&["volume", "clone", "data@s1", "copy"]);
    let s = t.json(&["stats"]);
    assert_eq!(
        (s["volumes"].as_u64(), s["snapshots"].as_u64()),
        (Some(2), Some(1))
    );
    let v = &s["volume_data"];
    assert_eq!(v["chunks"], 128, "{s}");
    assert_eq!(v["logical_bytes"], 24 * MIB, "{s}");
    assert_eq!(v["unique_bytes"], 8 * MIB, "{s}");
    assert_eq!(v["dedup_ratio"], 3.0, "{s}");
    // Volumes leave the image side as it was; the totals are both sides.
    assert_eq!(s["image_data"], image_data, "{s}");
    let u = |v: &serde_json::Value| v.as_u64().unwrap();
    assert_eq!(
        u(&s["logical_bytes"]),
        u(&image_data["logical_bytes"]) + 24 * MIB
    );
    assert_eq!(u(&s["chunks"]), u(&images_only["chunks"]) + 128);
    let ratio = u(&s["logical_bytes"]) as f64 / u(&s["unique_bytes"]) as f64;
    assert!(
        (s["dedup_ratio"].as_f64().unwrap() - ratio).abs() < 1e-9,
        "{s}"
    );
    let human = t.ok(&["stats"]);
    for line in [
        "images:          1 (",
        "volumes:         2 (1 snapshot)",
        "  logical bytes: 25165824 (24.0 MiB)",
        "  dedup ratio:   3.00x",
        "store:           images and volumes together",
    ] {
        assert!(human.contains(line), "{line:?} not in:\n{human}");
    }
    // In-process, the store reports the same (but for its size on disk).
    let store = d.data.join("store");
    let st = d.signal_and_wait(libc::SIGTERM);
    assert!(st.success());
    let mut local = Tide::new(&store).json(&["stats"]);
    let mut remote = s.clone();
    for v in [&mut local, &mut remote] {
        v.as_object_mut().unwrap().remove("disk_bytes");
    }
    assert_eq!(local, remote);
}

/// The lines of `d`'s log that contain every one of `parts`.
fn log_lines(d: &Volumed, parts: &[&str]) -> Vec<String> {
    d.log_text()
        .lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .map(str::to_string)
        .collect()
}

/// Waits until `d`'s log has a line with every one of `parts` (NBD lines come from the
/// connection's task, after the client may already have gone on).
fn wait_log_line(d: &Volumed, parts: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(l) = log_lines(d, parts).pop() {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {parts:?} in:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every request is one line of the log: who sent it (pid and program), what it asked,
/// and the outcome or the error the client was told. NBD connections log the export
/// they are served and their end, and a refusal with the reason the client was sent.
#[test]
fn the_log_has_a_line_per_request_with_who_what_and_outcome() {
    let dir = tmpdir("vol-log");
    let src = dir.path().join("src");
    tests::fixture::build(&src);
    let d = start(dir.path());
    let t = d.tide();
    t.ok(&["volume", "create", "db", "--size", "16M"]);
    t.ok(&["volume", "snapshot", "db", "s1"]);
    t.ok(&["image", "import", src.to_str().unwrap(), "--name", "f:1"]);
    let out = dir.path().join("out");
    t.ok(&["image", "export", "f:1", "--to", out.to_str().unwrap()]);
    let missing = dir.path().join("missing");
    let e = t.fails(&[
        "image",
        "import",
        missing.to_str().unwrap(),
        "--name",
        "m:1",
    ]);

    let line = |parts: &[&str]| -> String {
        let found = log_lines(&d, parts);
        assert_eq!(found.len(), 1, "{parts:?}: {found:?} in:\n{}", d.log_text());
        found[0].clone()
    };
    line(&["(tide): create volume db (16777216 bytes): created db (rwo)"]);
    line(&["(tide): snapshot volume db as s1: generation "]);
    line(&[
        "(tide): import image ",
        " as f:1: image sha256:",
        " files, ",
    ]);
    // An export names its target as given, not as a Rust debug form.
    line(&[
        &format!("(tide): export image f:1 to {}: ", out.display()),
        " entries, ",
    ]);
    assert!(!d.log_text().contains("Dir("), "{}", d.log_text());
    // A failed request: one line, with the error text the client printed.
    let failed = line(&["import image ", "missing", " as m:1: failed: "]);
    let told = e.trim().trim_start_matches("tide: error: ");
    assert!(failed.ends_with(told), "{failed:?} vs {e:?}");
    assert_eq!(log_lines(&d, &["missing"]).len(), 1, "{}", d.log_text());
    // Who: the pid is a real process's, its program named.
    let pid: u32 = line(&["snapshot volume db"])
        .split("volumed: pid ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .expect("a pid");
    assert!(pid > 1 && pid != d.pid());

    // NBD: a holder is served, a second client refused with the holder's name.
    let db = d.nbd_uri("db");
    let mut first = holder(&db);
    let hp = first.id();
    wait_log_line(
        &d,
        &[&format!(
            "nbd client pid {hp} (qemu-io): serving export \"db\" (read-write)"
        )],
    );
    let held = format!("export \"db\" is in use by nbd client pid {hp} (qemu-io)");
    let info = Command::new("nbdinfo")
        .arg(&db)
        .env("LIBNBD_DEBUG", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nbdinfo must be installed (apt: libnbd-bin)");
    let ip = info.id();
    let info = info.wait_with_output().unwrap();
    assert!(!info.status.success());
    // The refusal is NBD_REP_ERR_POLICY with the holder in its message, which libnbd
    // reads (and shows only in its debug output; qemu shows it as "server reported").
    let err = String::from_utf8_lossy(&info.stderr);
    assert!(
        err.contains(&format!("server error message: {held}")),
        "{err}"
    );
    wait_log_line(
        &d,
        &[&format!(
            "nbd client pid {ip} (nbdinfo): refused export \"db\": {held}"
        )],
    );
    // Described without being served, the export says who holds it.
    let list = ok("nbdinfo", &["--list", &db]);
    assert!(
        list.contains(&format!(
            "description: rwo volume, 16777216 bytes, in use by nbd client pid {hp} (qemu-io)"
        )),
        "{list}"
    );
    first.kill().unwrap();
    first.wait().unwrap();
    wait_log_line(
        &d,
        &[&format!(
            "nbd client pid {hp} (qemu-io): disconnected from export \"db\""
        )],
    );
}

/// `Volumes.url` builds an export's URI and checks it exists; an rox volume is attached
/// read-only or not at all.
#[test]
fn urls_come_from_the_daemon_and_rox_attaches_are_read_only() {
    let dir = tmpdir("vol-url");
    let d = start(dir.path());
    let t = d.tide();
    t.ok(&["volume", "create", "db", "--size", "16M"]);
    t.ok(&["volume", "snapshot", "db", "s1"]);
    assert_eq!(t.ok(&["volume", "url", "db@s1"]).trim(), d.nbd_uri("db@s1"));
    let e = t.fails(&["volume", "url", "db@nope"]);
    assert!(e.contains("nope"), "{e}");
    let e = t.fails(&["volume", "url", "nosuch"]);
    assert!(e.contains("no such volume: nosuch"), "{e}");
    assert!(log_lines(&d, &["url of export nosuch: failed: no such volume"]).len() == 1);

    t.ok(&[
        "volume", "create", "model", "--size", "16M", "--mode", "rox",
    ]);
    let e = t.fails(&["volume", "attach", "model", "--holder", "vm-1"]);
    assert!(e.contains("rox") && e.contains("--read-only"), "{e}");
    let a = t.json(&[
        "volume",
        "attach",
        "model",
        "--holder",
        "vm-1",
        "--read-only",
    ]);
    assert_eq!(a["read_only"], true, "{a}");
    let export = a["export_name"].as_str().unwrap();
    assert_eq!(a["url"], d.nbd_uri(export));
    assert_eq!(nbdinfo_json(&d.nbd_uri(export))["is_read_only"], true);
}
