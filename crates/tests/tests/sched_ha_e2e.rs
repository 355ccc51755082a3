//! Two real `sched` processes on a real three-member etcd cluster (Debian's `etcd` on
//! loopback), three real `volumed` hosts given both schedulers (`--scheduler A,B`),
//! `tide` given both: deploy, kill -9 the leader, the other takes over, the hosts
//! re-register with it, the instances deployed before are still there (roots mounted,
//! records in etcd), a deploy on the new leader works, and the killed scheduler comes
//! back as a follower that answers reads and sends `tide` to the leader. A
//! `tide-gateway` given both keeps its routes through the kill and learns the new
//! leader's.
//!
//! Needs root, FUSE and `etcd`. About 15 s.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

use serde_json::Value;
use tests::gateway::Gateway;
use tests::oci::{Blobs, tar};
use tests::sched::{Sched, instances, json, tide, wait_for, wait_hosts_up};
use tests::volumed::Volumed;
use tests::{UnmountBelow, mounts_below};

const HOSTS: [&str; 3] = ["host-a", "host-b", "host-c"];

fn stack(name: &str, min: u32) -> String {
    format!(
        "[stack]\nname = \"{name}\"\n\n[services.app]\nimage = \"ha/app:1\"\n\n[services.app.instances]\nmin = {min}\nmax = {min}\n"
    )
}

fn host_args(id: &str, addrs: &str) -> Vec<String> {
    [
        "--scheduler",
        addrs,
        "--host-id",
        id,
        "--vcpus",
        "16",
        "--memory",
        "32G",
        "--hypervisors",
        "qemu",
        "--heartbeat-ms",
        "200",
    ]
    .iter()
    .map(|a| (*a).to_string())
    .collect()
}

/// Every instance of `stack` is ready with its root mounted on its host, showing the
/// image's file.
fn check_running(addrs: &str, stack: &str, want: usize) -> Vec<String> {
    let mine: Vec<Value> = instances(addrs)
        .into_iter()
        .filter(|i| i["stack"] == stack)
        .collect();
    assert_eq!(mine.len(), want, "{mine:?}");
    for i in &mine {
        assert_eq!(i["state"], "ready", "{i}");
        let root = i["root"].as_str().unwrap();
        let text = std::fs::read_to_string(Path::new(root).join("srv/app/app.txt"))
            .unwrap_or_else(|e| panic!("{root}: {e} ({i})"));
        assert_eq!(text, "ha app\n");
        assert!(
            mounts_below(Path::new(root)).iter().any(|m| m == root),
            "root not mounted: {i}"
        );
    }
    mine.iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

fn leads(s: &Sched) -> bool {
    s.log_text().contains("sched: leading (term")
}

#[test]
fn real_hosts_follow_the_leader_and_keep_their_instances_when_it_dies() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing (needs root)"
    );
    let tmp = tests::tmpdir("tide-sched-ha");
    let t = tmp.path();
    let _unmount = UnmountBelow(t.to_path_buf());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let etcd = rt
        .block_on(schedd::testing::EtcdCluster::start(&t.join("etcd"), 3))
        .unwrap();
    let ep = etcd.endpoints_arg();
    let args = [
        "--etcd",
        ep.as_str(),
        "--host-timeout",
        "5s",
        "--lease",
        "2s",
    ];
    let mut scheds = [
        Sched::start(t.join("sched-a"), t.join("a.sock"), &args),
        Sched::start(t.join("sched-b"), t.join("b.sock"), &args),
    ];
    let addrs = format!("{},{}", scheds[0].addr(), scheds[1].addr());

    // One image: a single layer with one file.
    let app = t.join("app");
    std::fs::create_dir_all(app.join("srv/app")).unwrap();
    std::fs::write(app.join("srv/app/app.txt"), "ha app\n").unwrap();
    tar(&app, None, &t.join("app.tar"));
    let blobs = Blobs::new(&t.join("blobs"));
    let layer = blobs.layer(&t.join("app.tar"));
    blobs.image(&t.join("oci"), "ha/app:1", &[layer]);
    let hosts: Vec<Volumed> = HOSTS
        .iter()
        .map(|id| {
            let v = Volumed::start_with(
                t.join(id),
                t.join(format!("{id}.sock")),
                &host_args(id, &addrs),
            );
            let r = v
                .tide()
                .json(&["image", "import", t.join("oci").to_str().unwrap()]);
            assert_eq!(r["name"], "ha/app:1", "{r}");
            v
        })
        .collect();
    let all: BTreeSet<String> = HOSTS.iter().map(|h| h.to_string()).collect();
    wait_hosts_up(&addrs, &all, 30, "three hosts up at the leader");
    let l = scheds.iter().position(leads).expect("a leader");
    let f = 1 - l;

    let one = t.join("one.toml");
    std::fs::write(&one, stack("one", 3)).unwrap();
    let o = tide(&addrs, &["deploy", one.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let before = check_running(&addrs, "one", 3);

    // A front end given both schedulers, watching the leader's routes.
    let gw = Gateway::start(
        &addrs,
        t.join("gateway.log"),
        &["--start-timeout", "2", "--timeout", "2"],
    );
    let known = |host: &str| gw.get(host, "/").status != 404;
    assert!(!known("www.before.example"));
    let o = tide(&addrs, &["alias", "add", "www.before.example", "app.one"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_for(10, "the alias to reach the front end", || {
        if known("www.before.example") {
            Ok(())
        } else {
            Err("404".into())
        }
    });

    // kill -9 the leader: the follower leads, the hosts come back to it.
    scheds[l].kill9();
    let killed = Instant::now();
    wait_for(15, "the follower to lead", || {
        if leads(&scheds[f]) {
            Ok(())
        } else {
            Err(scheds[f].log_text())
        }
    });
    let elected = killed.elapsed();
    wait_hosts_up(&addrs, &all, 5, "every host registered with the new leader");
    eprintln!(
        "leader killed: follower led after {elected:?}, hosts back after {:?}",
        killed.elapsed()
    );
    let roles = |want: [&str; 2]| {
        let rows = json(&addrs, &["scheduler", "ls"]);
        let got: Vec<&str> = rows
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["role"].as_str().unwrap())
            .collect();
        let mut expect = ["", ""];
        expect[l] = want[0];
        expect[f] = want[1];
        assert_eq!(got, expect, "{rows}");
        rows
    };
    roles(["unreachable", "leader"]);
    // The front end kept its routes, moved to the new leader, and learns its changes.
    assert!(known("www.before.example"), "{}", gw.log_text());
    let o = tide(&addrs, &["alias", "add", "www.after.example", "app.one"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_for(10, "the new leader's alias to reach the front end", || {
        if known("www.after.example") {
            Ok(())
        } else {
            Err(gw.log_text())
        }
    });
    let up_lines: Vec<String> = gw
        .log_text()
        .lines()
        .filter(|l| l.contains("scheduler link up"))
        .map(str::to_string)
        .collect();
    eprintln!("front end links: {up_lines:#?}");
    assert!(
        up_lines.last().unwrap().contains(&scheds[f].addr()),
        "{up_lines:?}"
    );
    // What was deployed is still there, unchanged: same instances, roots mounted.
    assert_eq!(check_running(&addrs, "one", 3), before);
    let two = t.join("two.toml");
    std::fs::write(&two, stack("two", 1)).unwrap();
    let o = tide(&addrs, &["deploy", two.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    check_running(&addrs, "two", 1);

    // The killed one returns as a follower: it answers reads from etcd, and tide given
    // only its address is sent on to the leader for a change.
    scheds[l].restart();
    let back = scheds[l].addr();
    wait_for(10, "the restarted scheduler's view", || {
        let ids: Vec<String> = instances(&back)
            .iter()
            .map(|i| format!("{} {}", i["id"].as_str().unwrap(), i["state"]))
            .collect();
        if ids.len() == 4 && ids.iter().all(|i| i.ends_with("\"ready\"")) {
            Ok(())
        } else {
            Err(format!("{ids:?}"))
        }
    });
    let rows = roles(["follower", "leader"]);
    assert_eq!(rows[l]["leader"], scheds[f].addr(), "{rows}");
    assert_eq!(rows[l]["store"], "etcd", "{rows}");
    // Its view was loaded before it served; its election task logs that it follows
    // once its campaign lost, which may be a moment later.
    let since_restart = || {
        let log = scheds[l].log_text();
        log[log.rfind("sched: serving").unwrap()..].to_string()
    };
    wait_for(10, "the restarted scheduler to log that it follows", || {
        let text = since_restart();
        if text.contains("following unix:") {
            Ok(())
        } else {
            Err(text)
        }
    });
    assert!(
        !since_restart().contains("leading (term"),
        "{}",
        since_restart()
    );
    let o = tide(&back, &["stack", "rm", "two"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_for(10, "two removed everywhere", || {
        let n = instances(&addrs)
            .iter()
            .filter(|i| i["stack"] == "two")
            .count();
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} left"))
        }
    });
    // Every host's own record agrees with the scheduler's.
    let listed: BTreeSet<String> = instances(&addrs)
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    wait_for(10, "the hosts to hold exactly what is listed", || {
        let mut held = BTreeSet::new();
        for id in HOSTS {
            let rec: Value = serde_json::from_str(
                &std::fs::read_to_string(t.join(id).join("instances.json")).unwrap_or_default(),
            )
            .unwrap_or(Value::Null);
            if let Some(m) = rec["instances"].as_object() {
                held.extend(m.keys().cloned());
            }
        }
        if held == listed {
            Ok(())
        } else {
            Err(format!("hosts {held:?}, sched {listed:?}"))
        }
    });
    drop(hosts);
    drop(etcd);
}
