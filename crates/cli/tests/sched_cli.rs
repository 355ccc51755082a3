//! `tide`'s scheduler commands, run as a real process against the scheduler daemon
//! (schedd's server, on its own thread, over a real Unix socket) with two fake hosts.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use schedd::testing::{FakeHost, HostConfig};
use serde_json::Value;

const SHOP: &str = include_str!("../../sched/examples/shop.toml");

/// Starts the daemon and two fake hosts (zone eu-1) on threads of their own; returns
/// the daemon's address.
fn start(dir: &Path) -> String {
    let opts = schedd::server::Options {
        listen: format!("unix:{}", dir.join("sched.sock").display()),
        state: schedd::server::StateOptions::Local(dir.join("data")),
        advertise: None,
        allow_remote: false,
        host_timeout: Duration::from_secs(30),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || schedd::server::run(&opts, Some(tx)).unwrap());
    let addr = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let a = addr.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async move {
            let mut hosts = Vec::new();
            for id in ["host-a", "host-b"] {
                let mut c = HostConfig::new(id);
                c.labels = vec![("zone".into(), "eu-1".into())];
                hosts.push(FakeHost::start(&a, c).await.unwrap());
            }
            tx.send(()).unwrap();
            std::future::pending::<()>().await;
        });
    });
    rx.recv_timeout(Duration::from_secs(20)).unwrap();
    addr
}

fn tide(addr: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tide"))
        .arg("--scheduler")
        .arg(addr)
        .args(args)
        .output()
        .unwrap()
}

/// Runs `tide --json ARGS`, which must succeed, and parses its output.
fn json(addr: &str, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = tide(addr, &a);
    assert!(
        out.status.success(),
        "tide {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "tide {args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn human(addr: &str, args: &[&str]) -> String {
    let out = tide(addr, args);
    assert!(
        out.status.success(),
        "tide {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn tide_drives_the_scheduler() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path());
    let shop = dir.path().join("shop.toml");
    std::fs::write(&shop, SHOP).unwrap();
    let shop = shop.to_str().unwrap();

    let d = json(&addr, &["deploy", shop, "--explain"]);
    assert_eq!(d["stack"], "shop");
    let placed = d["placed"].as_array().unwrap();
    assert_eq!(placed.len(), 4);
    assert_eq!(placed[0]["verdicts"].as_array().unwrap().len(), 2);
    assert_eq!(d["services"][0]["sharing"], "own");
    let human_deploy = human(&addr, &["deploy", shop, "--variant", "pr-42"]);
    assert!(
        human_deploy.contains("deployed variant pr-42 of shop: 0 new instance(s)"),
        "{human_deploy}"
    );

    let inst = json(&addr, &["instance", "ls"]);
    assert_eq!(inst.as_array().unwrap().len(), 4);
    assert!(
        inst.as_array()
            .unwrap()
            .iter()
            .all(|i| i["state"] == "ready")
    );
    assert!(human(&addr, &["instance", "ls"]).starts_with("INSTANCE"));

    let stacks = json(&addr, &["stack", "ls"]);
    assert_eq!(stacks[0]["name"], "shop");
    assert_eq!(stacks[0]["instances"], 4);
    let inspect = json(&addr, &["stack", "inspect", "shop"]);
    assert_eq!(inspect["source"], SHOP);
    assert!(human(&addr, &["stack", "inspect", "shop"]).contains("domain:    tidedge.local"));

    let variant = dir.path().join("pr-7.toml");
    std::fs::write(
        &variant,
        "[variant]\nname = \"pr-7\"\nparent = \"shop\"\n[variant.services.api]\nimage = \"shop/api:pr-7\"\n",
    )
    .unwrap();
    let v = json(&addr, &["variant", "create", variant.to_str().unwrap()]);
    assert_eq!(v["placed"].as_array().unwrap().len(), 1);
    assert_eq!(v["placed"][0]["instance"]["key"], "api.shop--pr-7");
    assert_eq!(
        json(&addr, &["variant", "ls", "shop"]),
        serde_json::json!(["pr-42", "pr-7"])
    );

    let layer = format!("sha256:{:064x}", 5);
    let p = json(
        &addr,
        &[
            "pool", "create", "extra", "--layers", &layer, "--min", "1", "--max", "2",
        ],
    );
    assert_eq!(p["warm"], 1);
    let pools = json(&addr, &["pool", "ls"]);
    assert_eq!(pools.as_array().unwrap().len(), 2);
    assert_eq!(
        json(&addr, &["pool", "rm", "extra"]),
        serde_json::json!({ "removed": "pool extra" })
    );
    assert_eq!(json(&addr, &["pool", "ls"]).as_array().unwrap().len(), 1);

    human(&addr, &["alias", "add", "www.shop.example.com", "web.shop"]);
    let aliases = json(&addr, &["alias", "ls"]);
    assert_eq!(aliases.as_array().unwrap().len(), 2);
    let r = json(&addr, &["resolve", "www.shop.example.com"]);
    assert_eq!(r["service"], "web");
    assert_eq!(
        r["via_aliases"],
        serde_json::json!(["www.shop.example.com"])
    );
    human(&addr, &["alias", "rm", "www.shop.example.com"]);

    let r = json(&addr, &["resolve", "web.shop--pr-42.tidedge.local"]);
    assert_eq!(r["started"], true);
    assert_eq!(r["instance"]["key"], "web.shop--pr-42");

    let hosts = json(&addr, &["host", "ls"]);
    assert_eq!(hosts.as_array().unwrap().len(), 2);
    assert!(hosts.as_array().unwrap().iter().all(|h| h["up"] == true));
    assert!(human(&addr, &["host", "ls"]).contains("host-a"));

    // Errors: one line on stderr, exit status 1; the daemon keeps serving.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[stack]\nname = \"Bad Name\"\n").unwrap();
    let out = tide(&addr, &["deploy", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:2: stack.name"), "{err}");
    let out = tide(&addr, &["stack", "rm", "shop"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("alias preview.shop.example.com"));
    human(&addr, &["variant", "rm", "shop", "pr-7"]);
    human(&addr, &["alias", "rm", "preview.shop.example.com"]);
    human(&addr, &["stack", "rm", "shop"]);
    assert_eq!(json(&addr, &["stack", "ls"]), serde_json::json!([]));
    assert_eq!(json(&addr, &["instance", "ls"]), serde_json::json!([]));

    let out = Command::new(env!("CARGO_BIN_EXE_tide"))
        .args(["host", "ls"])
        .env_remove("TIDE_SCHEDULER")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--scheduler"));
}
