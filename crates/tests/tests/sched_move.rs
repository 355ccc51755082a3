//! `tide instance move`: a live move between two real `volumed` hosts sharing a chunk
//! tier (a directory), driven through the real `sched`. The instance's RWO volume is
//! written on host-a over NBD, the instance moved while host-a is up, and host-b's copy
//! of the volume reads every byte; the instance record says which snapshot it came
//! from. Moves that cannot happen change nothing.

use tests::nbd::{ok, random_file};
use tests::sched::{Sched, instances, json, tide, wait_for, wait_hosts_up};
use tests::volumed::Volumed;
use tests::{UnmountBelow, tmpdir};

const STACK: &str = r#"
[stack]
name = "shop"

[volumes.orders-db]
size = "16M"
mode = "rwo"

[services.db]
image = "shop/db:1"
volumes = { orders-db = "/var/lib/db" }

[services.db.instances]
min = 1
max = 1
"#;

fn host_args(id: &str, addr: &str, tier: &str) -> Vec<String> {
    [
        "--scheduler",
        addr,
        "--host-id",
        id,
        "--hypervisors",
        "firecracker,qemu",
        "--heartbeat-ms",
        "200",
        "--tier",
        tier,
    ]
    .iter()
    .map(|a| (*a).to_string())
    .collect()
}

#[test]
fn a_live_move_takes_every_byte_of_the_volume_to_the_new_host() {
    let tmp = tmpdir("tide-sched-move");
    let t = tmp.path();
    let _unmount = UnmountBelow(t.to_path_buf());
    let tier = format!("file://{}", t.join("tier").display());
    let sched = Sched::start(
        t.join("sched"),
        t.join("sched.sock"),
        &["--host-timeout", "5s"],
    );
    let addr = sched.addr();
    let hosts: Vec<Volumed> = ["host-a", "host-b", "host-c"]
        .iter()
        .map(|id| {
            Volumed::start_with(
                t.join(id),
                t.join(format!("{id}.sock")),
                &host_args(id, &addr, &tier),
            )
        })
        .collect();
    // The image only on host-a (published to the tier, so host-b can start it too).
    let root = t.join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hostname"), "db\n").unwrap();
    // Enough content for the image's locality to decide the first placement.
    random_file(&root.join("etc/blob"), 2 << 20, 76);
    hosts[0].tide().ok(&[
        "image",
        "import",
        root.to_str().unwrap(),
        "--name",
        "shop/db:1",
    ]);
    wait_for(30, "the image published", || {
        if hosts[0].log_text().contains("published shop/db:1") {
            Ok(())
        } else {
            Err(hosts[0].log_text())
        }
    });
    let all = ["host-a", "host-b", "host-c"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    wait_hosts_up(&addr, &all, 30, "three hosts up");
    wait_for(30, "host-a's layers", || {
        let h = json(&addr, &["host", "ls"]);
        match h.as_array().unwrap().iter().find(|h| h["id"] == "host-a") {
            Some(a) if a["layer_bytes"].as_u64().unwrap() > 0 => Ok(()),
            _ => Err(h.to_string()),
        }
    });
    let stack = t.join("shop.toml");
    std::fs::write(&stack, STACK).unwrap();
    let o = tide(&addr, &["deploy", stack.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let i = instances(&addr).into_iter().next().expect("one instance");
    assert_eq!(i["host"], "host-a", "placed where its image is: {i}");
    let id = i["id"].as_str().unwrap().to_string();
    let uri = i["volumes"][0].as_str().unwrap().to_string();

    // Written on host-a and never pushed.
    let data = t.join("data");
    let want = random_file(&data, 6 << 20, 77);
    ok("nbdcopy", &[data.to_str().unwrap(), uri.as_str()]);

    // Moves that cannot happen: nothing changes.
    let o = tide(&addr, &["instance", "move", &id, "--to", "host-a"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("already"), "{e}");
    let o = tide(&addr, &["instance", "move", &id, "--to", "host-z"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("host-z"));
    assert_eq!(instances(&addr)[0]["host"], "host-a");

    let o = tide(
        &addr,
        &["instance", "move", &id, "--to", "host-b", "--json"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(m["instance"]["host"], "host-b", "{m}");
    assert_eq!(m["instance"]["state"], "moved", "{m}");
    let pushed = &m["pushed"][0];
    assert_eq!(pushed["volume"], "shop-orders-db", "{m}");
    assert_eq!(pushed["host"], "host-a", "{m}");
    let snapshot = pushed["snapshot"].as_str().unwrap();
    assert!(snapshot.starts_with("pushed-"), "{m}");
    let pulled = &m["instance"]["pulled"][0];
    assert_eq!(
        pulled["snapshot"], snapshot,
        "host-b made it from that snapshot: {m}"
    );

    // host-b reads every byte written on host-a; host-a no longer holds the instance.
    let i = &instances(&addr)[0];
    assert_eq!(i["host"], "host-b");
    let new_uri = i["volumes"][0].as_str().unwrap();
    assert_ne!(new_uri, uri, "served by host-b now");
    let back = t.join("back");
    ok("nbdcopy", &[new_uri, back.to_str().unwrap()]);
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), 16 << 20);
    assert!(
        got[..want.len()] == want[..],
        "every byte written before the move"
    );
    assert!(got[want.len()..].iter().all(|&b| b == 0));
    let listed = hosts[0].tide().json(&["volume", "ls"]);
    assert!(
        !listed.to_string().contains(&id),
        "host-a still attaches it: {listed}"
    );
    let text = String::from_utf8_lossy(&tide(&addr, &["instance", "ls"]).stdout).into_owned();
    assert!(
        text.contains(&format!(
            "made from the tier's snapshot {snapshot}, pushed by host-a"
        )),
        "{text}"
    );

    // Written on host-b too, then on to host-c (human output): both writes are there.
    let more = t.join("more");
    let over = random_file(&more, 1 << 20, 78);
    ok("nbdcopy", &[more.to_str().unwrap(), new_uri]);
    let o = tide(&addr, &["instance", "move", &id, "--to", "host-c"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(text.starts_with(&format!("moved {id} to host-c")), "{text}");
    assert!(
        text.contains("volume shop-orders-db handed over as snapshot pushed-"),
        "{text}"
    );
    let i = &instances(&addr)[0];
    assert_eq!(
        (i["host"].as_str(), i["pulled"][0]["host"].as_str()),
        (Some("host-c"), Some("host-b"))
    );
    ok(
        "nbdcopy",
        &[i["volumes"][0].as_str().unwrap(), back.to_str().unwrap()],
    );
    let got = std::fs::read(&back).unwrap();
    assert!(got[..1 << 20] == over[..], "host-b's write");
    assert!(
        got[1 << 20..want.len()] == want[1 << 20..],
        "host-a's write"
    );

    // Back to host-a, which kept its copy from before host-b's writes: refused there,
    // never served stale, and that copy is left alone.
    let o = tide(&addr, &["instance", "move", &id, "--to", "host-a"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("older copy") && e.contains("host-c"), "{e}");
    let i = &instances(&addr)[0];
    assert_eq!(i["state"], "lost", "{i}");
    let a_copy = hosts[0].tide().json(&["volume", "ls"]);
    assert!(a_copy.to_string().contains("shop-orders-db"), "{a_copy}");
    drop(hosts);
}
