//! The scheduler end to end, every process real, on loopback: one `sched`, three
//! `volumed` hosts joined with `--scheduler` (own data directories and sockets), images
//! built from real Debian roots and imported with `tide`, the stack deployed with
//! `tide --scheduler ... deploy`, and a second client in Python (pycapnp, loading only
//! `sched.capnp`).
//!
//! Images are OCI layouts of plain tar layers: the distribution (debootstrap minbase),
//! the framework (what the python3 root adds to minbase) and small app layers on top.
//! host-a holds every image; host-b and host-c lack the `pr-42` preview's image, whose
//! app layer is large, so its placement shows locality. One cluster serves every step
//! in turn: deploy (roots read on their hosts, volumes through `nbdinfo`), the `pr-42`
//! variant and a scale-to-zero one, an alias, a warm pool converted and refilled, a host
//! killed with -9 (its instances move; back, it releases them), the scheduler killed
//! with -9 and restarted, host-a down (the preview, whose image no other host holds, is
//! lost, then taken back), the Python client, and removal down to nothing mounted. At
//! every step each host's `instances.json` must agree with what the scheduler lists.
//!
//! Needs root, FUSE, `nbdinfo`, the Debian roots (built on first use) and pycapnp
//! (see [`tests::python`]). About 20 s once the roots exist.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tests::oci::{Blobs, Changes, diff_list, tar};
use tests::roots::debian_root;
use tests::sched::{Sched, hosts_up, instances, json, tide, wait_for, wait_hosts_up};
use tests::tide::sh;
use tests::volumed::Volumed;
use tests::{UnmountBelow, mounts_below};

const HOSTS: [&str; 3] = ["host-a", "host-b", "host-c"];

/// The stack: an RWO database volume, a shared RWX cache, a read-only model, three
/// services, and a preview variant overriding only `web`.
const SHOP: &str = r#"
[stack]
name = "shop"
entrypoint = "web"

[volumes.orders-db]
size = "64M"
mode = "rwo"

[volumes.cache]
size = "32M"
mode = "rwx"

[volumes.model]
size = "16M"
mode = "rox"

[services.web]
image = "shop/web:1"
depends_on = ["api"]
volumes = { cache = "/var/cache/shop" }

[services.web.instances]
min = 2
max = 4

[services.api]
image = "shop/api:1"
depends_on = ["db"]
volumes = { cache = "/var/cache/shop", model = "/models" }

[services.db]
image = "shop/db:1"
volumes = { orders-db = "/var/lib/db" }

[services.db.instances]
min = 1
max = 1

[variants.pr-42.services.web]
image = "shop/web:pr-42"

[variants.pr-42.services.web.instances]
min = 1
max = 1

[variants.pr-7.services.web.instances]
min = 0
max = 1
scale_to_zero = true
"#;

/// A one-service stack on the framework: its instance converts the pool's warm VM.
const JOBS: &str = r#"
[stack]
name = "jobs"

[services.worker]
image = "jobs/worker:1"
"#;

/// Deployed by the Python client.
const PY_STACK: &str = r#"
[stack]
name = "pystack"

[services.kv]
image = "shop/db:1"
"#;

const PY_CLIENT: &str = r#"
import asyncio, sys
import capnp

schema = capnp.load(sys.argv[1])

async def main():
    conn = await capnp.AsyncIoStream.create_unix_connection(sys.argv[2])
    s = capnp.TwoPartyClient(conn).bootstrap().cast_as(schema.Scheduler)
    v = await s.version()
    print("version", v.version, schema.version)
    r = await s.deploy("py.toml", open(sys.argv[3]).read(), "", False, "")
    for p in r.report.placed:
        print("placed", p.instance.id, p.instance.host, p.instance.state)
    for i in (await s.instances()).instances:
        print("instance", i.id, i.host, i.state, i.root)

asyncio.run(capnp.run(main()))
"#;

// ---- Images ----

/// A small app layer: `/srv/app/NAME.txt` saying `text`, plus `extra` bytes of random
/// data in `/srv/app/blob.bin` when non-zero.
fn app_layer(tmp: &Path, name: &str, text: &str, extra_mib: u32) -> PathBuf {
    let root = tmp.join(format!("app-{name}"));
    std::fs::create_dir_all(root.join("srv/app")).unwrap();
    std::fs::write(root.join(format!("srv/app/{name}.txt")), text).unwrap();
    if extra_mib > 0 {
        sh(&format!(
            "head -c {extra_mib}M /dev/urandom > {}",
            root.join("srv/app/blob.bin").display()
        ));
    }
    let out = tmp.join(format!("app-{name}.tar"));
    tar(&root, None, &out);
    out
}

/// Builds the images; returns their (OCI layout directory, name) pairs.
fn build_images(tmp: &Path) -> Vec<(PathBuf, &'static str)> {
    let minbase = debian_root("minbase");
    let python3 = debian_root("python3");
    let blobs = Blobs::new(&tmp.join("blobs"));
    let dist_tar = tmp.join("dist.tar");
    tar(&minbase, None, &dist_tar);
    let list = tmp.join("fw.list");
    let changed = diff_list(&minbase, &python3, &Changes::default(), &list);
    assert!(
        changed > 100,
        "python3 adds only {changed} files to minbase?"
    );
    let fw_tar = tmp.join("fw.tar");
    tar(&python3, Some(&list), &fw_tar);
    let dist = blobs.layer(&dist_tar);
    let fw = blobs.layer(&fw_tar);
    let app = |name, text, mib| blobs.layer(&app_layer(tmp, name, text, mib));
    let (web, pr42, api, db, worker) = (
        app("web", "web v1\n", 0),
        app("web", "web pr-42\n", 48),
        app("api", "api v1\n", 0),
        app("db", "db v1\n", 0),
        app("worker", "worker v1\n", 0),
    );
    let images: [(&str, Vec<(castore::Digest, usize)>); 6] = [
        ("framework:1", vec![dist, fw]),
        ("shop/web:1", vec![dist, fw, web]),
        ("shop/api:1", vec![dist, fw, api]),
        ("shop/db:1", vec![dist, db]),
        ("jobs/worker:1", vec![dist, fw, worker]),
        ("shop/web:pr-42", vec![dist, fw, pr42]),
    ];
    images
        .into_iter()
        .enumerate()
        .map(|(i, (name, layers))| {
            let dir = tmp.join(format!("oci-{i}"));
            blobs.image(&dir, name, &layers);
            (dir, name)
        })
        .collect()
}

// ---- Running tide against the scheduler ----

/// Warm VMs of pool `py-fw` now.
fn warm_count(addr: &str) -> u64 {
    json(addr, &["pool", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "py-fw")
        .map_or(0, |p| p["warm"].as_u64().unwrap())
}

/// Waits until pool `py-fw` has one warm VM.
fn wait_one_warm(addr: &str, what: &str) {
    wait_for(30, what, || match warm_count(addr) {
        1 => Ok(()),
        n => Err(format!("{n} warm")),
    });
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

/// Checks an instance is really there: its root (on its host) shows the image's files,
/// the volumes' NBD URIs answer `nbdinfo`.
fn check_instance(i: &Value, want_file: &str, want_text: &str, python: bool) {
    let root = Path::new(s(&i["root"]));
    // On its host: under that volumed's data directory (named after the host id).
    assert!(
        root.to_string_lossy()
            .contains(&format!("/{}/", s(&i["host"]))),
        "{i}"
    );
    let got = std::fs::read_to_string(root.join(want_file))
        .unwrap_or_else(|e| panic!("{}: {e} ({i})", root.join(want_file).display()));
    assert_eq!(got, want_text, "{i}");
    // The distribution layer is under it.
    let osr = std::fs::read_to_string(root.join("etc/os-release")).unwrap();
    assert!(osr.contains("bookworm"), "{osr}");
    assert_eq!(
        root.join("usr/bin/python3").exists(),
        python,
        "framework layer in {}",
        root.display()
    );
    assert!(is_mount(s(&i["root"])), "root not mounted: {i}");
    for uri in i["volumes"].as_array().unwrap() {
        let o = Command::new("nbdinfo")
            .arg("--json")
            .arg(s(uri))
            .output()
            .expect("run nbdinfo");
        assert!(
            o.status.success(),
            "nbdinfo {uri}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let info: Value = serde_json::from_slice(&o.stdout).unwrap();
        let export = &info["exports"][0];
        let size = export["export-size"].as_u64().unwrap();
        assert!(size >= 16 << 20, "{uri}: {info}");
        // The model is ROX: attached read-only; the cache (RWX) and database (RWO)
        // are writable.
        let name = s(&export["export-name"]);
        // Host volumes are named STACK-VOLUME; the variants' own web instances share
        // the parent's RWX cache.
        let mode = match name.split('/').next().unwrap() {
            "shop-model" => "rox",
            "shop-cache" => "rwx",
            "shop-orders-db" => "rwo",
            other => panic!("unexpected volume {other}: {info}"),
        };
        assert!(
            s(&export["description"]).starts_with(&format!("{mode} volume")),
            "{info}"
        );
        assert_eq!(export["is_read_only"], mode == "rox", "{uri}: {info}");
    }
}

/// Mount points (in this process's mount namespace) at or below `dir`, deepest first.
/// Whether `path` is a mount point.
fn is_mount(path: &str) -> bool {
    mounts_below(Path::new(path)).iter().any(|m| m == path)
}

/// What each live host's volumed has recorded (`DATA/instances.json`: instance ids and
/// warm VM count) agrees with what the scheduler lists for it; waits for it (moves and
/// pool refills finish in the background).
fn check_hosts_agree(addr: &str, t: &Path) {
    wait_for(30, "hosts and scheduler to agree", || {
        let insts = instances(addr);
        let hosts = json(addr, &["host", "ls"]);
        let mut diffs = Vec::new();
        for h in hosts.as_array().unwrap().iter().filter(|h| h["up"] == true) {
            let id = s(&h["id"]);
            let rec: Value = serde_json::from_str(
                &std::fs::read_to_string(t.join(id).join("instances.json")).unwrap_or_default(),
            )
            .unwrap_or(Value::Null);
            let on_host: BTreeSet<&str> = rec["instances"]
                .as_object()
                .map(|m| m.keys().map(String::as_str).collect())
                .unwrap_or_default();
            let placed: BTreeSet<&str> = insts
                .iter()
                .filter(|i| i["host"] == id)
                .map(|i| s(&i["id"]))
                .collect();
            let warm = rec["warm"].as_object().map_or(0, |m| m.len() as u64);
            if on_host != placed || h["warm_vms"] != warm || h["instances"] != placed.len() {
                diffs.push(format!(
                    "{id}: volumed has {on_host:?} and {warm} warm, sched {placed:?} and {h}"
                ));
            }
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(diffs.join("; "))
        }
    });
}

/// The service's file, its text and whether it runs on the framework.
fn expect_of(i: &Value) -> (&'static str, &'static str, bool) {
    match s(&i["service"]) {
        "web" if i["variant"] == "pr-42" => ("srv/app/web.txt", "web pr-42\n", true),
        "web" => ("srv/app/web.txt", "web v1\n", true),
        "api" => ("srv/app/api.txt", "api v1\n", true),
        "db" | "kv" => ("srv/app/db.txt", "db v1\n", false),
        "worker" => ("srv/app/worker.txt", "worker v1\n", true),
        other => panic!("unexpected service {other}: {i}"),
    }
}

fn host_args(id: &str, addr: &str) -> Vec<String> {
    [
        "--scheduler",
        addr,
        "--host-id",
        id,
        "--vcpus",
        "16",
        "--memory",
        "32G",
        "--hypervisors",
        "firecracker,qemu",
        "--label",
        "zone=e2e",
        "--heartbeat-ms",
        "200",
    ]
    .iter()
    .map(|a| (*a).to_string())
    .collect()
}

#[test]
fn scheduler_with_real_hosts_end_to_end() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: instance roots are FUSE mounts (needs root)"
    );
    // Fails now, not after the deploys, if pycapnp is missing.
    tests::python();
    let tmp = tests::tmpdir("tide-sched-e2e");
    let t = tmp.path();
    let _unmount = UnmountBelow(t.to_path_buf());
    let images = build_images(t);

    // ---- The cluster ----
    let mut sched = Sched::start(
        t.join("sched"),
        t.join("sched.sock"),
        &["--host-timeout", "2s"],
    );
    let addr = sched.addr();
    let mut hosts: Vec<Option<Volumed>> = HOSTS
        .iter()
        .map(|id| {
            let v = Volumed::start_with(
                t.join(id),
                t.join(format!("{id}.sock")),
                &host_args(id, &addr),
            );
            Some(v)
        })
        .collect();
    // host-a holds every image, host-b and host-c all but the preview's.
    std::thread::scope(|sc| {
        for (n, h) in hosts.iter().enumerate() {
            let images = &images;
            sc.spawn(move || {
                let tide = h.as_ref().unwrap().tide();
                for (dir, name) in images {
                    if n > 0 && name.ends_with("pr-42") {
                        continue;
                    }
                    let r = tide.json(&["image", "import", dir.to_str().unwrap()]);
                    assert_eq!(r["name"], *name, "{r}");
                }
            });
        }
    });
    let all: BTreeSet<String> = HOSTS.iter().map(|h| h.to_string()).collect();
    wait_hosts_up(&addr, &all, 30, "three hosts up");
    // The inventories after the imports reach the scheduler with the heartbeats.
    wait_for(30, "the hosts' layers", || {
        let h = json(&addr, &["host", "ls"]);
        let bytes: Vec<u64> = h
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["layer_bytes"].as_u64().unwrap())
            .collect();
        let ok = bytes.len() == 3
            && bytes[0] > bytes[1] + (40 << 20)
            && bytes[1] > 50 << 20
            && bytes[1] == bytes[2];
        if ok { Ok(()) } else { Err(format!("{h}")) }
    });

    // ---- Deploy: four instances with roots mounted and volumes attached ----
    let shop = t.join("shop.toml");
    std::fs::write(&shop, SHOP).unwrap();
    let shop = shop.to_str().unwrap();
    // As the issue writes it: `tide --scheduler ADDR deploy FILE --json`.
    let o = tide(&addr, &["deploy", shop, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(d["stack"], "shop");
    let placed = d["placed"].as_array().unwrap();
    assert_eq!(placed.len(), 4, "{d}");
    let inst = instances(&addr);
    assert_eq!(inst.len(), 4);
    for i in &inst {
        assert_eq!(i["state"], "ready", "{i}");
        match s(&i["service"]) {
            "web" => {
                assert_eq!(i["volumes"].as_array().unwrap().len(), 1);
                check_instance(i, "srv/app/web.txt", "web v1\n", true);
            }
            "api" => {
                assert_eq!(i["volumes"].as_array().unwrap().len(), 2);
                check_instance(i, "srv/app/api.txt", "api v1\n", true);
            }
            "db" => {
                assert_eq!(i["volumes"].as_array().unwrap().len(), 1);
                check_instance(i, "srv/app/db.txt", "db v1\n", false);
            }
            other => panic!("unexpected service {other}: {i}"),
        }
    }
    let web_hosts: BTreeSet<&str> = inst
        .iter()
        .filter(|i| i["service"] == "web")
        .map(|i| s(&i["host"]))
        .collect();
    assert_eq!(web_hosts.len(), 2, "web's replicas spread: {inst:?}");
    // A root written through an instance's scratch is that instance's alone.
    let web0 = inst.iter().find(|i| i["service"] == "web").unwrap();
    std::fs::write(Path::new(s(&web0["root"])).join("srv/app/written"), "x").unwrap();
    let web1 = inst
        .iter()
        .filter(|i| i["service"] == "web")
        .nth(1)
        .unwrap();
    assert!(!Path::new(s(&web1["root"])).join("srv/app/written").exists());

    check_hosts_agree(&addr, t);

    // ---- The preview variant: one new instance, on the host with its layers ----
    let v = json(&addr, &["deploy", shop, "--variant", "pr-42", "--explain"]);
    let placed = v["placed"].as_array().unwrap();
    assert_eq!(placed.len(), 1, "exactly one new instance: {v}");
    let p = &placed[0];
    assert_eq!(p["instance"]["service"], "web");
    assert_eq!(p["instance"]["host"], "host-a", "{p}");
    assert_eq!(p["fetch_bytes"], 0, "{p}");
    let reasons = p["reasons"].to_string();
    assert!(reasons.contains("already on host-a"), "{reasons}");
    let verdicts = p["verdicts"].as_array().unwrap();
    assert_eq!(verdicts.len(), 3, "{p}");
    let score = |h: &str| {
        verdicts.iter().find(|v| v["host"] == h).unwrap()["score"]
            .as_f64()
            .unwrap()
    };
    assert!(
        score("host-a") > score("host-b") && score("host-a") > score("host-c"),
        "{verdicts:?}"
    );
    for v in verdicts {
        assert!(s(&v["reason"]).contains("locality"), "{v}");
    }
    check_instance(&p["instance"], "srv/app/web.txt", "web pr-42\n", true);
    assert_eq!(instances(&addr).len(), 5);
    for svc in &v["services"].as_array().unwrap()[..] {
        let want = if svc["service"] == "web" {
            "unique"
        } else {
            "shared"
        };
        assert_eq!(svc["sharing"], want, "{svc}");
    }
    let r = json(&addr, &["resolve", "web.shop--pr-42.tidedge.local"]);
    assert_eq!(r["instance"]["id"], p["instance"]["id"], "{r}");
    assert_eq!(r["shared_from_parent"], false);
    let r = json(&addr, &["resolve", "api.shop--pr-42.tidedge.local"]);
    assert_eq!(r["shared_from_parent"], true, "{r}");
    let api = instances(&addr)
        .into_iter()
        .find(|i| i["service"] == "api")
        .unwrap();
    assert_eq!(r["instance"]["id"], api["id"], "{r}");
    assert_eq!(r["instance"]["variant"], "");
    json(
        &addr,
        &[
            "alias",
            "add",
            "preview.shop.example.com",
            "web.shop--pr-42",
        ],
    );
    let r = json(&addr, &["resolve", "preview.shop.example.com"]);
    assert_eq!(r["instance"]["id"], p["instance"]["id"], "{r}");

    // A scaled-to-zero variant costs nothing until its name is resolved.
    let v = json(&addr, &["deploy", shop, "--variant", "pr-7"]);
    assert_eq!(v["placed"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(instances(&addr).len(), 5);
    let r = json(&addr, &["resolve", "web.shop--pr-7.tidedge.local"]);
    assert_eq!(r["started"], true, "{r}");
    assert_eq!(r["instance"]["variant"], "pr-7", "{r}");
    check_instance(&r["instance"], "srv/app/web.txt", "web v1\n", true);
    let again = json(&addr, &["resolve", "web.shop--pr-7.tidedge.local"]);
    assert_eq!(again["started"], false, "{again}");
    assert_eq!(again["instance"]["id"], r["instance"]["id"]);
    assert_eq!(instances(&addr).len(), 6);

    check_hosts_agree(&addr, t);

    // ---- A warm pool on distribution + framework, converted by a deploy ----
    let fw = hosts[0]
        .as_ref()
        .unwrap()
        .tide()
        .json(&["image", "inspect", "framework:1"]);
    let layers: Vec<&str> = fw["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| s(&l["digest"]))
        .collect();
    assert_eq!(layers.len(), 2);
    let pool = json(
        &addr,
        &[
            "pool",
            "create",
            "py-fw",
            "--layers",
            &layers.join(","),
            "--min",
            "1",
            "--max",
            "2",
        ],
    );
    assert_eq!(pool["layers"].as_array().unwrap().len(), 2, "{pool}");
    wait_one_warm(&addr, "a warm VM");
    let warm_host = wait_for(30, "the warm VM's host", || {
        let h = json(&addr, &["host", "ls"]);
        h.as_array()
            .unwrap()
            .iter()
            .find(|h| h["warm_vms"] == 1)
            .map(|h| s(&h["id"]).to_string())
            .ok_or_else(|| h.to_string())
    });
    let warm_dir = t.join(&warm_host).join("warm");
    let warm_roots: Vec<_> = std::fs::read_dir(&warm_dir).unwrap().collect();
    assert_eq!(warm_roots.len(), 1, "{}", warm_dir.display());
    let jobs = t.join("jobs.toml");
    std::fs::write(&jobs, JOBS).unwrap();
    let j = json(&addr, &["deploy", jobs.to_str().unwrap()]);
    let w = &j["placed"][0]["instance"];
    assert!(!s(&w["warm_vm"]).is_empty(), "not converted: {j}");
    assert_eq!(w["host"], warm_host.as_str(), "{j}");
    // The instance took over the warm VM's root.
    let warm_root = warm_roots[0].as_ref().unwrap().path().join("root");
    assert_eq!(s(&w["root"]), warm_root.to_str().unwrap(), "{j}");
    check_instance(w, "srv/app/worker.txt", "worker v1\n", true);
    let listed = instances(&addr)
        .into_iter()
        .find(|i| i["id"] == w["id"])
        .unwrap();
    assert_eq!(listed["warm_vm"], w["warm_vm"]);
    wait_one_warm(&addr, "the pool refilled");

    check_hosts_agree(&addr, t);

    // ---- kill -9 a host: its instances move ----
    let before = instances(&addr);
    let victim = ["host-b", "host-c"]
        .into_iter()
        .max_by_key(|h| before.iter().filter(|i| i["host"] == *h).count())
        .unwrap();
    let moved: BTreeSet<String> = before
        .iter()
        .filter(|i| i["host"] == victim)
        .map(|i| s(&i["id"]).to_string())
        .collect();
    assert!(!moved.is_empty(), "{before:?}");
    let n = HOSTS.iter().position(|h| *h == victim).unwrap();
    hosts[n].take().unwrap().signal_and_wait(libc::SIGKILL);
    // "moving" once placed again, "moved" (with its root) once the new host prepared it.
    let after = wait_for(60, "the dead host's instances moved and prepared", || {
        let now = instances(&addr);
        let ok = now.iter().all(|i| i["host"] != victim)
            && moved.iter().all(|id| {
                now.iter()
                    .any(|i| i["id"] == id.as_str() && i["state"] == "moved" && i["root"] != "")
            });
        if ok { Ok(now) } else { Err(format!("{now:?}")) }
    });
    assert_eq!(after.len(), before.len());
    for i in after.iter().filter(|i| moved.contains(s(&i["id"]))) {
        let (file, text, py) = expect_of(i);
        check_instance(i, file, text, py);
        // These hosts have no chunk tier: a moved instance's RWO volume (the database's)
        // could only be made empty, and its record says so; RWX and ROX volumes are each
        // host's own and are not listed.
        let pulled = i["pulled"].as_array().unwrap();
        if i["service"] == "db" {
            assert_eq!(pulled.len(), 1, "{i}");
            assert_eq!(pulled[0]["volume"], "shop-orders-db", "{i}");
            assert_eq!(pulled[0]["snapshot"], "", "created empty: {i}");
        } else {
            assert!(pulled.is_empty(), "{i}");
        }
    }
    assert!(!hosts_up(&addr).contains(victim));

    check_hosts_agree(&addr, t);

    // ---- kill -9 the scheduler, restart it on the same data ----
    let stacks = json(&addr, &["stack", "ls"]);
    let aliases = json(&addr, &["alias", "ls"]);
    let pools = json(&addr, &["pool", "ls"]);
    sched.kill9();
    sched.restart();
    let live: BTreeSet<String> = all.iter().filter(|h| *h != victim).cloned().collect();
    wait_hosts_up(&addr, &live, 30, "the live hosts re-registered");
    assert_eq!(json(&addr, &["stack", "ls"]), stacks);
    assert_eq!(json(&addr, &["alias", "ls"]), aliases);
    let pools_after = json(&addr, &["pool", "ls"]);
    assert_eq!(pools_after[0]["name"], pools[0]["name"], "{pools_after}");
    assert_eq!(pools_after[0]["layers"], pools[0]["layers"]);
    wait_one_warm(&addr, "the pool warm after the restart");
    let ids = |v: &[Value]| -> BTreeSet<(String, String)> {
        v.iter()
            .map(|i| (s(&i["id"]).to_string(), s(&i["host"]).to_string()))
            .collect()
    };
    let restarted = instances(&addr);
    assert_eq!(ids(&restarted), ids(&after));
    // Reconciled with the hosts: every instance is served with its root and volumes.
    let restarted = wait_for(30, "instances ready after the restart", || {
        let now = instances(&addr);
        if now
            .iter()
            .all(|i| (i["state"] == "ready" || i["state"] == "moved") && i["root"] != "")
        {
            Ok(now)
        } else {
            Err(format!("{now:?}"))
        }
    });
    for i in &restarted {
        let (file, text, py) = expect_of(i);
        check_instance(i, file, text, py);
    }
    let r = json(&addr, &["resolve", "preview.shop.example.com"]);
    assert_eq!(r["instance"]["id"], p["instance"]["id"], "{r}");

    check_hosts_agree(&addr, t);

    // ---- The killed host comes back: it gives up what moved away ----
    let victim_data = t.join(victim);
    let old_roots: Vec<String> = before
        .iter()
        .filter(|i| moved.contains(s(&i["id"])))
        .map(|i| s(&i["root"]).to_string())
        .collect();
    hosts[n] = Some(Volumed::start_with(
        &victim_data,
        t.join(format!("{victim}.sock")),
        &host_args(victim, &addr),
    ));
    wait_hosts_up(&addr, &all, 30, "the killed host back");
    wait_for(30, "the killed host to release what moved", || {
        let rec = std::fs::read_to_string(victim_data.join("instances.json")).unwrap_or_default();
        let left: Vec<&String> = moved
            .iter()
            .filter(|id| rec.contains(id.as_str()))
            .collect();
        let mounted: Vec<&String> = old_roots.iter().filter(|r| is_mount(r)).collect();
        if left.is_empty() && mounted.is_empty() {
            Ok(())
        } else {
            Err(format!("still recorded {left:?}, mounted {mounted:?}"))
        }
    });
    assert_eq!(ids(&instances(&addr)), ids(&after));

    // ---- host-a down long enough to be noticed: what it ran moves, except the preview,
    // whose image no other host holds (hosts do not fetch layers from each other yet):
    // lost until host-a returns with it ----
    let pr42 = s(&p["instance"]["id"]).to_string();
    hosts[0].take().unwrap().signal_and_wait(libc::SIGKILL);
    wait_for(30, "host-a marked down, the preview lost", || {
        let now = instances(&addr);
        let lost = now.iter().find(|i| i["id"] == pr42.as_str()).unwrap();
        if !hosts_up(&addr).contains("host-a") && lost["state"] == "lost" {
            Ok(())
        } else {
            Err(format!("{now:?}"))
        }
    });
    assert!(
        sched.log_text().contains(&format!(
            "prepare {pr42}: image shop/web:pr-42 is not in this host's store"
        )),
        "{}",
        sched.log_text()
    );
    hosts[0] = Some(Volumed::start_with(
        t.join("host-a"),
        t.join("host-a.sock"),
        &host_args("host-a", &addr),
    ));
    wait_hosts_up(&addr, &all, 30, "host-a back");
    let served = wait_for(60, "every instance served again", || {
        let now = instances(&addr);
        if now.iter().all(|i| {
            (i["state"] == "ready" || i["state"] == "moved")
                && i["root"] != ""
                && is_mount(s(&i["root"]))
        }) {
            Ok(now)
        } else {
            Err(format!("{now:?}"))
        }
    });
    assert_eq!(served.len(), after.len());
    let back = served.iter().find(|i| i["id"] == pr42.as_str()).unwrap();
    assert_eq!(back["host"], "host-a", "{back}");
    for i in &served {
        let (file, text, py) = expect_of(i);
        check_instance(i, file, text, py);
    }
    check_hosts_agree(&addr, t);

    // ---- A second client: Python, from sched.capnp alone ----
    let py_stack = t.join("py.toml");
    std::fs::write(&py_stack, PY_STACK).unwrap();
    let out = tests::run_python_client(PY_CLIENT, "sched.capnp", &[&sched.socket, &py_stack]);
    assert!(out.contains("version 1 1"), "{out}");
    let py_inst: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("placed "))
        .collect();
    assert_eq!(py_inst.len(), 1, "{out}");
    let id = py_inst[0].split(' ').next().unwrap();
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("instance {id} ")) && l.contains(" ready ")),
        "{out}"
    );
    // Everything tide lists, Python listed too.
    for i in instances(&addr) {
        assert!(
            out.contains(&format!("instance {} {}", s(&i["id"]), s(&i["host"]))),
            "{i} missing from:\n{out}"
        );
    }
    let kv = instances(&addr)
        .into_iter()
        .find(|i| i["id"] == id)
        .unwrap();
    check_instance(&kv, "srv/app/db.txt", "db v1\n", false);

    check_hosts_agree(&addr, t);

    // ---- Removing the stack releases its instances on their hosts ----
    let roots: Vec<String> = instances(&addr)
        .iter()
        .filter(|i| i["stack"] == "shop")
        .map(|i| s(&i["root"]).to_string())
        .collect();
    assert_eq!(roots.len(), 6);
    assert!(roots.iter().all(|r| is_mount(r)), "{roots:?}");
    for args in [
        &["stack", "rm", "shop"][..],
        &["variant", "rm", "shop", "pr-42"],
    ] {
        let o = tide(&addr, args);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains("alias"), "{args:?}: {e}");
    }
    json(&addr, &["alias", "rm", "preview.shop.example.com"]);
    json(&addr, &["stack", "rm", "shop"]);
    let left: Vec<Value> = instances(&addr);
    assert!(left.iter().all(|i| i["stack"] != "shop"), "{left:?}");
    for r in &roots {
        assert!(!is_mount(r), "{r} still mounted");
    }
    check_hosts_agree(&addr, t);
    // Capacity reserved is what is left: the two instances and the warm VM (1 vCPU each).
    let used: u64 = json(&addr, &["host", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["used_vcpus"].as_u64().unwrap())
        .sum();
    assert_eq!(used, left.len() as u64 + warm_count(&addr), "{left:?}");

    // ---- Everything removed: the hosts hold nothing mounted ----
    json(&addr, &["pool", "rm", "py-fw"]);
    json(&addr, &["stack", "rm", "jobs"]);
    json(&addr, &["stack", "rm", "pystack"]);
    assert!(instances(&addr).is_empty());
    check_hosts_agree(&addr, t);
    let mounted = mounts_below(t);
    assert!(mounted.is_empty(), "still mounted: {mounted:?}");
}
