//! The real `sched` binary over a real Unix socket, with fake hosts (the `Host`
//! interface served in this process) registered over their own connections.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use schedd::testing::{self, FakeHost, HostConfig, local};

const SHOP: &str = include_str!("../../sched/examples/shop.toml");

/// A running `sched` process, killed on drop.
struct Sched {
    child: Child,
    addr: String,
    data: PathBuf,
    socket: PathBuf,
    timeout: String,
}

impl Sched {
    fn start(dir: &Path, timeout: &str) -> Sched {
        let data = dir.join("data");
        let socket = dir.join("sched.sock");
        let child = spawn(&data, &socket, timeout);
        let s = Sched {
            child,
            addr: format!("unix:{}", socket.display()),
            data,
            socket,
            timeout: timeout.to_owned(),
        };
        s.wait_ready();
        s
    }

    fn wait_ready(&self) {
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(t.elapsed() < Duration::from_secs(20), "sched did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, then start again on the same data directory.
    fn kill9_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = spawn(&self.data, &self.socket, &self.timeout);
        self.wait_ready();
    }
}

impl Drop for Sched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(data: &Path, socket: &Path, timeout: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sched"))
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--data")
        .arg(data)
        .args(["--host-timeout", timeout])
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting sched")
}

fn digest(n: u64) -> String {
    format!("sha256:{n:064x}")
}

/// A host in zone eu-1 (shop.toml's pool selector).
fn eu_host(id: &str) -> HostConfig {
    let mut c = HostConfig::new(id);
    c.labels = vec![("zone".into(), "eu-1".into())];
    c
}

async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let t = Instant::now();
    while !f().await {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn deploy_places_and_prepares_with_env_volumes_and_hypervisor() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Sched::start(dir.path(), "10s");
    local(async {
        let a = FakeHost::start(&sched.addr, eu_host("host-a"))
            .await
            .unwrap();
        let b = FakeHost::start(&sched.addr, eu_host("host-b"))
            .await
            .unwrap();
        let s = schedd::net::connect(&sched.addr).await.unwrap();
        let report = testing::deploy(&s, "shop.toml", SHOP, "", false, "")
            .await
            .unwrap();
        // web (min 2) + api (min 1) + db (min 1).
        assert_eq!(report.placed.len(), 4, "{report:#?}");
        assert_eq!(report.entrypoint, "shop.tidedge.local");
        let prepares: Vec<_> = a
            .rec
            .borrow()
            .prepares
            .iter()
            .chain(b.rec.borrow().prepares.iter())
            .cloned()
            .collect();
        assert_eq!(prepares.len(), 4);
        let web: Vec<_> = prepares.iter().filter(|p| p.key == "web.shop").collect();
        assert_eq!(web.len(), 2);
        // Replicas are spread: one web on each host.
        assert_eq!(
            a.rec
                .borrow()
                .prepared
                .keys()
                .filter(|k| k.starts_with("web."))
                .count(),
            1
        );
        let w = web[0];
        assert_eq!(w.env("LOG_LEVEL"), Some("info"));
        assert_eq!(w.env("SHOP_CURRENCY"), Some("EUR"));
        assert_eq!(w.env("PUBLIC_URL"), Some("https://shop.tidedge.local"));
        assert_eq!(w.hypervisor, "firecracker");
        assert_eq!(w.volumes.len(), 1);
        // Host volume names carry the stack: two stacks' "cache" stay apart.
        assert_eq!(w.volumes[0].name, "shop-cache");
        assert_eq!(w.volumes[0].mode, "rwx");
        assert_eq!(w.volumes[0].mount_path, "/var/cache/shop");
        let api = prepares.iter().find(|p| p.key == "api.shop").unwrap();
        assert_eq!(api.vcpus, 2);
        assert_eq!(api.memory, 2 << 30);
        let model = api
            .volumes
            .iter()
            .find(|v| v.name == "shop-recommender-model")
            .unwrap();
        assert_eq!(
            (model.mode.as_str(), model.mount_path.as_str()),
            ("rox", "/models")
        );
        assert_eq!(
            api.env("DATABASE_URL"),
            Some("postgres://db.shop.tidedge.local/shop")
        );
        let db = prepares.iter().find(|p| p.key == "db.shop").unwrap();
        assert_eq!(db.hypervisor, "firecracker");
        assert_eq!(db.volumes[0].name, "shop-orders-db");
        assert_eq!(db.volumes[0].size, 20 << 30);
        assert_eq!(db.volumes[0].mode, "rwo");
        assert_eq!(db.image, "library/postgres:16.3");
        // The daemon's view agrees, with the host's answers recorded.
        let inst = testing::instances(&s).await.unwrap();
        assert_eq!(inst.len(), 4);
        for i in &inst {
            assert_eq!(i.state, "ready", "{i:?}");
            assert_eq!(i.root, format!("/run/fake/{}/{}", i.host, i.id));
        }
        // The file's pool was created and filled to min 2 on the eu-1 hosts, and its
        // alias is served.
        let pools = testing::pools(&s).await.unwrap();
        assert_eq!(pools, vec![("debian-node".into(), 2, 2, 8)]);
        let aliases = testing::aliases(&s).await.unwrap();
        assert_eq!(
            aliases,
            vec![("preview.shop.example.com".into(), "web.shop--pr-42".into())]
        );
        // A per-instance volume template: each ordinal gets its own volume.
        let pg = "[stack]\nname = \"pg\"\n[volumes.data]\nsize = \"1G\"\nmode = \"rwo\"\nper_instance = true\n[services.db]\nimage = \"pg:1\"\nvolumes = { data = \"/data\" }\n[services.db.instances]\nmin = 2\nmax = 2\n";
        let r = testing::deploy(&s, "pg.toml", pg, "", false, "")
            .await
            .unwrap();
        let mut seen: Vec<(u32, bool, String)> = r
            .placed
            .iter()
            .map(|p| {
                let host = if p.instance.host == "host-a" { &a } else { &b };
                let spec = host.rec.borrow().prepared[&p.instance.id].clone();
                (
                    spec.ordinal,
                    spec.volumes[0].per_instance,
                    p.instance.volumes[0].clone(),
                )
            })
            .collect();
        seen.sort();
        assert_eq!(seen[0].0, 0);
        assert_eq!(seen[1].0, 1);
        assert!(seen.iter().all(|s| s.1));
        assert!(
            seen[0].2.ends_with("/pg-data-0") && seen[1].2.ends_with("/pg-data-1"),
            "{seen:?}"
        );

        // Redeploying the same file changes nothing.
        let again = testing::deploy(&s, "shop.toml", SHOP, "", false, "")
            .await
            .unwrap();
        assert!(again.placed.is_empty(), "{again:#?}");
        assert_eq!(testing::instances(&s).await.unwrap().len(), 6);
    });
}

#[test]
fn a_variant_runs_only_its_unique_services_and_scale_to_zero_starts_on_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Sched::start(dir.path(), "10s");
    local(async {
        let a = FakeHost::start(&sched.addr, eu_host("host-a"))
            .await
            .unwrap();
        let s = schedd::net::connect(&sched.addr).await.unwrap();
        testing::deploy(&s, "shop.toml", SHOP, "", false, "")
            .await
            .unwrap();
        let before = a.rec.borrow().prepares.len();
        let variant = r#"
[variant]
name = "pr-7"
parent = "shop"
env = { FEATURE_X = "on" }

[variant.services.api]
image = "shop/api:pr-7"
env = { LOG_LEVEL = "debug" }
"#;
        let st = testing::stack(&s, "shop").await;
        let mut req = st.create_variant_request();
        req.get().set_file("pr-7.toml");
        req.get().set_source(variant);
        let reply = req.send().promise.await.unwrap();
        let report = testing::deploy_out(reply.get().unwrap().get_report().unwrap()).unwrap();
        assert_eq!(report.placed.len(), 1, "{report:#?}");
        assert_eq!(a.rec.borrow().prepares.len(), before + 1);
        let sharing: Vec<(&str, &str)> = report
            .services
            .iter()
            .map(|(svc, _, sh, _)| (svc.as_str(), sh.as_str()))
            .collect();
        assert_eq!(
            sharing,
            [("web", "shared"), ("api", "unique"), ("db", "shared")]
        );
        let spec = a.rec.borrow().prepares.last().cloned().unwrap();
        assert_eq!(spec.key, "api.shop--pr-7");
        assert_eq!(spec.image, "shop/api:pr-7");
        // The cascade: stack < service < variant < variant's service override.
        assert_eq!(spec.env("LOG_LEVEL"), Some("debug"));
        assert_eq!(spec.env("FEATURE_X"), Some("on"));
        assert_eq!(spec.env("SHOP_CURRENCY"), Some("EUR"));

        // pr-42 (in shop.toml) overrides web with scale_to_zero: deploying it starts
        // nothing; the first request does.
        let r = testing::deploy(&s, "shop.toml", SHOP, "pr-42", false, "")
            .await
            .unwrap();
        assert!(r.placed.is_empty(), "{r:#?}");
        let (inst, started) = testing::resolve(&s, "web.shop--pr-42.tidedge.local")
            .await
            .unwrap();
        assert!(started);
        assert_eq!(inst.key, "web.shop--pr-42");
        let (again, started) = testing::resolve(&s, "preview.shop.example.com")
            .await
            .unwrap();
        assert!(!started);
        assert_eq!(again.id, inst.id);
        // A SHARED service resolves to the parent's instances.
        let (db, started) = testing::resolve(&s, "db.shop--pr-7.tidedge.local")
            .await
            .unwrap();
        assert!(!started);
        assert_eq!(db.key, "db.shop");

        // Removing the variant releases its instance.
        let mut req = st.remove_variant_request();
        req.get().set_name("pr-7");
        req.send().promise.await.unwrap();
        assert!(!a.prepared().iter().any(|i| i.starts_with("api.shop--pr-7")));
        assert!(
            a.rec
                .borrow()
                .releases
                .iter()
                .any(|i| i == "api.shop--pr-7-0")
        );
        // An alias points into pr-42: the stack cannot go.
        let Err(err) = st.remove_request().send().promise.await else {
            panic!("a stack an alias points into was removed");
        };
        assert!(
            err.to_string().contains("alias preview.shop.example.com"),
            "{err}"
        );
    });
}

#[test]
fn placement_prefers_the_host_holding_the_image_bytes_and_explains() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Sched::start(dir.path(), "10s");
    local(async {
        let image = (
            "app/big:1".to_string(),
            digest(99),
            vec![(digest(1), 300 << 20), (digest(2), 100 << 20)],
        );
        let mut hosts = Vec::new();
        for id in ["host-a", "host-b", "host-c"] {
            let mut c = HostConfig::new(id);
            c.images = vec![image.clone()];
            if id == "host-b" {
                c.layers = vec![(digest(1), 300 << 20), (digest(2), 60 << 20)];
            }
            if id == "host-c" {
                c.layers = vec![(digest(2), 100 << 20)];
            }
            hosts.push(FakeHost::start(&sched.addr, c).await.unwrap());
        }
        let s = schedd::net::connect(&sched.addr).await.unwrap();
        let file = "[stack]\nname = \"big\"\n[services.app]\nimage = \"app/big:1\"\n";
        let r = testing::deploy(&s, "big.toml", file, "", true, "")
            .await
            .unwrap();
        assert_eq!(r.placed.len(), 1);
        let p = &r.placed[0];
        assert_eq!(p.instance.host, "host-b", "{p:#?}");
        assert_eq!(p.fetch_bytes, 40 << 20);
        assert_eq!(p.verdicts.len(), 3, "explain gives every host's verdict");
        assert!(p.verdicts.iter().all(|v| v.1));
        let best = p
            .verdicts
            .iter()
            .max_by(|x, y| x.3.total_cmp(&y.3))
            .unwrap();
        assert_eq!(best.0, "host-b");
        assert!(
            p.reasons.iter().any(|r| r.contains("locality")),
            "{:?}",
            p.reasons
        );
        assert_eq!(hosts[1].prepared(), vec!["app.big-0".to_string()]);
    });
}

/// host-a holding `base/node:20` and `app/api:1` (base plus an app layer), and pool
/// `node` on the base (min 1, max 3), whose warm VM it runs.
async fn host_with_a_pool(addr: &str) -> (FakeHost, schema::sched_capnp::scheduler::Client) {
    let base = (digest(10), 200 << 20);
    let app = (digest(11), 10 << 20);
    let mut c = HostConfig::new("host-a");
    c.images = vec![
        ("base/node:20".into(), digest(20), vec![base.clone()]),
        ("app/api:1".into(), digest(21), vec![base, app]),
    ];
    let a = FakeHost::start(addr, c).await.unwrap();
    let s = schedd::net::connect(addr).await.unwrap();
    testing::create_pool(&s, "node", &[], "base/node:20", 1, 3)
        .await
        .unwrap();
    (a, s)
}

#[test]
fn a_warm_vm_is_converted_and_the_pool_refilled() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Sched::start(dir.path(), "10s");
    local(async {
        let (a, s) = host_with_a_pool(&sched.addr).await;
        assert_eq!(
            a.rec.borrow().boots,
            vec![("node".to_string(), "base/node:20".to_string())]
        );
        let first_vm = a.rec.borrow().warm.keys().next().cloned().unwrap();
        let file = "[stack]\nname = \"api\"\n[services.api]\nimage = \"app/api:1\"\n";
        let r = testing::deploy(&s, "api.toml", file, "", false, "")
            .await
            .unwrap();
        let p = &r.placed[0];
        assert_eq!(p.instance.warm_vm, first_vm, "{p:#?}");
        assert!(
            p.reasons.iter().any(|r| r.contains("converts warm VM")),
            "{:?}",
            p.reasons
        );
        assert_eq!(a.rec.borrow().prepares[0].warm_vm, first_vm);
        // Replenished (after the deploy answered): a second boot, one warm VM again.
        wait_for("the pool to be refilled", async || {
            a.rec.borrow().boots.len() == 2
        })
        .await;
        assert_eq!(a.rec.borrow().warm.len(), 1);
        assert!(!a.rec.borrow().warm.contains_key(&first_vm));
        assert_eq!(
            testing::pools(&s).await.unwrap(),
            vec![("node".into(), 1, 1, 3)]
        );
        // Removing the pool releases its warm VM.
        let mut req = s.remove_pool_request();
        req.get().set_name("node");
        req.send().promise.await.unwrap();
        assert!(a.rec.borrow().warm.is_empty());
        assert!(testing::pools(&s).await.unwrap().is_empty());
    });
}

#[test]
fn a_warm_vm_whose_conversion_failed_is_not_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Sched::start(dir.path(), "10s");
    local(async {
        let (a, s) = host_with_a_pool(&sched.addr).await;
        let first_vm = a.rec.borrow().warm.keys().next().cloned().unwrap();
        // The host refuses the conversion (and so keeps its warm VM, as volumed does).
        a.rec.borrow_mut().fail_prepare = Some("disk full".into());
        let file = "[stack]\nname = \"api\"\n[services.api]\nimage = \"app/api:1\"\n";
        let e = testing::deploy(&s, "api.toml", file, "", false, "")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("rolled back"), "{e}");
        // The scheduler gave that VM up: the host no longer runs it, and the pool is
        // back to its minimum with a VM both sides know.
        assert!(a.rec.borrow().releases.contains(&first_vm));
        assert_eq!(a.rec.borrow().warm.len(), 1);
        assert!(!a.rec.borrow().warm.contains_key(&first_vm));
        assert_eq!(
            testing::pools(&s).await.unwrap(),
            vec![("node".into(), 1, 1, 3)]
        );
    });
}

/// Two fake hosts, host-a holding the image of one-service stack `x` (so it runs its
/// instance) and host-b empty; the scheduler client and the deploy's report.
async fn app_on_host_a(
    addr: &str,
) -> (
    FakeHost,
    FakeHost,
    schema::sched_capnp::scheduler::Client,
    testing::DeployOut,
) {
    let mut ca = HostConfig::new("host-a");
    ca.layers = vec![(digest(1), 100 << 20)];
    ca.images = vec![("app/x:1".into(), digest(50), vec![(digest(1), 100 << 20)])];
    let a = FakeHost::start(addr, ca).await.unwrap();
    let b = FakeHost::start(addr, HostConfig::new("host-b"))
        .await
        .unwrap();
    let s = schedd::net::connect(addr).await.unwrap();
    let file = "[stack]\nname = \"x\"\n[services.app]\nimage = \"app/x:1\"\n";
    let r = testing::deploy(&s, "x.toml", file, "", false, "")
        .await
        .unwrap();
    (a, b, s, r)
}

#[test]
fn a_moved_instance_is_moving_until_its_new_host_has_prepared_it() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Sched::start(dir.path(), "1s");
    local(async {
        let (a, b, s, _) = app_on_host_a(&sched.addr).await;
        // host-b takes the instance but does not answer its prepare.
        b.rec.borrow_mut().hang_after_prepare = true;
        a.stop_heartbeats();
        wait_for("the instance to be moving to host-b", async || {
            let i = testing::instances(&s).await.unwrap();
            i[0].state == "moving" && i[0].host == "host-b"
        })
        .await;
        let i = testing::instances(&s).await.unwrap();
        assert_eq!(i[0].root, "", "no root until host-b answers");
    });
}

#[test]
fn a_host_that_stops_heartbeating_is_marked_down_and_its_instances_move() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Sched::start(dir.path(), "1s");
    local(async {
        let (a, b, s, r) = app_on_host_a(&sched.addr).await;
        assert_eq!(r.placed[0].instance.host, "host-a");
        a.stop_heartbeats();
        wait_for("the instance to move", async || {
            let i = testing::instances(&s).await.unwrap();
            i[0].state == "moved" && i[0].host == "host-b"
        })
        .await;
        assert_eq!(b.prepared(), vec!["app.x-0".to_string()]);
        let hosts = testing::hosts(&s).await.unwrap();
        assert_eq!(
            hosts,
            vec![("host-a".into(), false), ("host-b".into(), true)]
        );
        // b keeps heartbeating and stays up.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            testing::hosts(&s).await.unwrap()[1],
            ("host-b".into(), true)
        );
    });
}

/// host-a running the one instance of stack x (`app.x-0`).
async fn one_instance_on_host_a(addr: &str) -> (FakeHost, schema::sched_capnp::scheduler::Client) {
    let a = FakeHost::start(addr, HostConfig::new("host-a"))
        .await
        .unwrap();
    let s = schedd::net::connect(addr).await.unwrap();
    let file = "[stack]\nname = \"x\"\n[services.app]\nimage = \"app/x:1\"\n";
    testing::deploy(&s, "x.toml", file, "", false, "")
        .await
        .unwrap();
    (a, s)
}

/// The host came back still running `app.x-0`, which was taken back as it is: neither
/// released nor prepared again.
fn assert_taken_back(back: &FakeHost) {
    assert_eq!(back.prepared(), ["app.x-0"]);
    assert!(back.rec.borrow().releases.is_empty(), "not restarted");
    assert_eq!(back.rec.borrow().prepares.len(), 1, "not prepared again");
}

/// One host, one instance of stack x on it; the host stops heartbeating and, no other
/// host being there, the instance is lost.
async fn lose_the_only_host(addr: &str) -> (FakeHost, schema::sched_capnp::scheduler::Client) {
    let (a, s) = one_instance_on_host_a(addr).await;
    a.stop_heartbeats();
    wait_for("the instance to be lost", async || {
        testing::instances(&s).await.unwrap()[0].state == "lost"
    })
    .await;
    (a, s)
}

#[test]
fn an_instance_lost_with_the_only_host_runs_again_when_a_host_joins() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Sched::start(dir.path(), "1s");
    local(async {
        let (_a, s) = lose_the_only_host(&sched.addr).await;
        let b = FakeHost::start(&sched.addr, HostConfig::new("host-b"))
            .await
            .unwrap();
        wait_for("the instance to run on host-b", async || {
            let i = testing::instances(&s).await.unwrap();
            i[0].state == "moved" && i[0].host == "host-b"
        })
        .await;
        assert_eq!(b.prepared(), vec!["app.x-0".to_string()]);
        let (served, started) = testing::resolve(&s, "app.x.tidedge.local").await.unwrap();
        assert!(!started);
        assert_eq!(served.host, "host-b");
    });
}

#[test]
fn an_instance_lost_with_its_host_is_taken_back_when_the_host_returns_holding_it() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Sched::start(dir.path(), "1s");
    local(async {
        let (a, s) = lose_the_only_host(&sched.addr).await;
        // The host was only cut off: it registers again, still running the instance.
        let back = FakeHost::start_with(&sched.addr, HostConfig::new("host-a"), a.rec.clone())
            .await
            .unwrap();
        wait_for("the instance to be ready again", async || {
            testing::instances(&s).await.unwrap()[0].state == "ready"
        })
        .await;
        assert_taken_back(&back);
    });
}

#[test]
fn an_instance_whose_move_failed_is_taken_back_when_its_host_returns_holding_it() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Sched::start(dir.path(), "1s");
    local(async {
        let (a, s) = one_instance_on_host_a(&sched.addr).await;
        // host-b cannot run it (in real life: the image is not in its store).
        let b = FakeHost::start(&sched.addr, HostConfig::new("host-b"))
            .await
            .unwrap();
        b.rec.borrow_mut().fail_prepare = Some("image app/x:1 is not in this host's store".into());
        a.stop_heartbeats();
        wait_for("the move to host-b to fail", async || {
            let i = testing::instances(&s).await.unwrap();
            i[0].state == "lost" && i[0].host == "host-b"
        })
        .await;
        // host-a was only cut off: it returns still running the instance, which is
        // taken back there rather than released and started again.
        let back = FakeHost::start_with(&sched.addr, HostConfig::new("host-a"), a.rec.clone())
            .await
            .unwrap();
        wait_for("the instance to be ready on host-a", async || {
            let i = testing::instances(&s).await.unwrap();
            i[0].state == "ready" && i[0].host == "host-a"
        })
        .await;
        assert_taken_back(&back);
    });
}

#[test]
fn state_survives_kill_9_and_hosts_are_reconciled() {
    let dir = tempfile::tempdir().unwrap();
    let mut sched = Sched::start(dir.path(), "10s");
    let addr = sched.addr.clone();
    let before = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    local(async {
        let _a = FakeHost::start(&addr, eu_host("host-a")).await.unwrap();
        let s = schedd::net::connect(&addr).await.unwrap();
        testing::deploy(&s, "shop.toml", SHOP, "", false, "")
            .await
            .unwrap();
        // Deployed after shop, listed before it: by name, before and after the restart.
        let app = "[stack]\nname = \"app\"\n[services.x]\nimage = \"app/x:1\"\n";
        testing::deploy(&s, "app.toml", app, "", false, "")
            .await
            .unwrap();
        assert_eq!(testing::stacks(&s).await.unwrap(), ["app", "shop"]);
        testing::create_pool(&s, "extra", &[&digest(7)], "", 0, 2)
            .await
            .unwrap();
        let mut req = s.add_alias_request();
        req.get().set_domain("shop.example.com");
        req.get().set_target("web.shop");
        req.send().promise.await.unwrap();
        *before.borrow_mut() = testing::instances(&s).await.unwrap();
    });
    sched.kill9_and_restart();
    local(async {
        let s = schedd::net::connect(&addr).await.unwrap();
        assert_eq!(testing::stacks(&s).await.unwrap(), ["app", "shop"]);
        let after = testing::instances(&s).await.unwrap();
        let ids = |v: &[testing::InstanceOut]| v.iter().map(|i| i.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&after), ids(&before.borrow()));
        // The host has not come back yet.
        assert!(after.iter().all(|i| i.state == "pending"), "{after:#?}");
        let mut aliases = testing::aliases(&s).await.unwrap();
        aliases.sort();
        assert_eq!(
            aliases,
            vec![
                ("preview.shop.example.com".into(), "web.shop--pr-42".into()),
                ("shop.example.com".into(), "web.shop".into()),
            ]
        );
        let pools: Vec<String> = testing::pools(&s)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.0)
            .collect();
        assert_eq!(pools, ["debian-node", "extra"]);
        // The stack file is kept as deployed.
        let st = testing::stack(&s, "shop").await;
        let src = st.source_request().send().promise.await.unwrap();
        assert_eq!(
            src.get().unwrap().get_source().unwrap().to_str().unwrap(),
            SHOP
        );
        // The host comes back with nothing prepared (it restarted too): the scheduler
        // prepares again what it placed there.
        let a = FakeHost::start(&addr, eu_host("host-a")).await.unwrap();
        wait_for("the host to be reconciled", async || {
            a.prepared().len() == 5
        })
        .await;
        wait_for("instances to be ready", async || {
            testing::instances(&s)
                .await
                .unwrap()
                .iter()
                .all(|i| i.state == "ready")
        })
        .await;
    });
}

#[test]
fn a_deploy_cut_by_kill_9_leaves_nothing_and_its_instance_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let mut sched = Sched::start(dir.path(), "10s");
    let addr = sched.addr.clone();
    let file = "[stack]\nname = \"x\"\n[services.app]\nimage = \"app/x:1\"\n";
    local(async {
        let a = FakeHost::start(&addr, HostConfig::new("host-a"))
            .await
            .unwrap();
        let s = schedd::net::connect(&addr).await.unwrap();
        testing::deploy(&s, "y.toml", &file.replace("\"x\"", "\"y\""), "", false, "")
            .await
            .unwrap();
        a.rec.borrow_mut().hang_after_prepare = true;
        let deploy = testing::deploy(&s, "x.toml", file, "", false, "");
        let waited = tokio::time::timeout(Duration::from_millis(300), deploy).await;
        assert!(waited.is_err(), "the deploy waits for the hung host");
        assert_eq!(a.prepared(), ["app.x-0", "app.y-0"]);
    });
    sched.kill9_and_restart();
    local(async {
        let s = schedd::net::connect(&addr).await.unwrap();
        // The acknowledged deploy is there, the cut one is not.
        assert_eq!(testing::stacks(&s).await.unwrap(), ["y"]);
        let ids: Vec<String> = testing::instances(&s)
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(ids, ["app.y-0"]);
        // The host still holds what the cut deploy prepared; it comes back holding it
        // and the scheduler releases it.
        let held = std::rc::Rc::new(std::cell::RefCell::new(testing::Record::default()));
        for (id, key) in [("app.x-0", "app.x"), ("app.y-0", "app.y")] {
            held.borrow_mut()
                .prepared
                .insert(id.into(), testing::SpecSeen::named(id, key));
        }
        let a = FakeHost::start_with(&addr, HostConfig::new("host-a"), held)
            .await
            .unwrap();
        wait_for("the cut deploy's instance to be released", async || {
            a.prepared() == ["app.y-0"]
        })
        .await;
        assert!(a.rec.borrow().releases.iter().any(|r| r == "app.x-0"));
    });
}

#[test]
fn bad_input_gets_a_clear_error_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Sched::start(dir.path(), "10s");
    local(async {
        let a = FakeHost::start(&sched.addr, HostConfig::new("host-a"))
            .await
            .unwrap();
        let s = schedd::net::connect(&sched.addr).await.unwrap();
        let err = |r: anyhow::Result<testing::DeployOut>| r.unwrap_err().to_string();

        let e = err(testing::deploy(&s, "bad.toml", "[stack]\nname = \"x\n", "", false, "").await);
        assert!(e.starts_with("bad.toml:2:"), "{e}");
        let bad_field = "[stack]\nname = \"x\"\n[services.a]\nimage = \"a:1\"\n[services.a.instances]\nmin = 3\nmax = 2\n";
        let e = err(testing::deploy(&s, "x.toml", bad_field, "", false, "").await);
        assert!(e.contains("x.toml:7: services.a.instances.max"), "{e}");
        let e = err(testing::deploy(&s, "shop.toml", SHOP, "pr-7", false, "").await);
        assert!(e.contains("no variant") && e.contains("pr-7"), "{e}");
        // Nothing of the refused deploy stays.
        assert!(testing::stacks(&s).await.unwrap().is_empty());
        let ok = "[stack]\nname = \"ok\"\n[services.app]\nimage = \"app/ok:1\"\n";
        let e = err(testing::deploy(&s, "ok.toml", ok, "", false, "qemu").await);
        assert!(e.contains("app.ok") && e.contains("hypervisor"), "{e}");
        let e = err(testing::deploy(&s, "ok.toml", ok, "", false, "vmware").await);
        assert!(e.contains("unknown hypervisor \"vmware\""), "{e}");
        let gpu = "[stack]\nname = \"g\"\n[services.ml]\nimage = \"ml:1\"\n[services.ml.resources]\ngpus = 1\n";
        let e = err(testing::deploy(&s, "g.toml", gpu, "", false, "firecracker").await);
        assert!(e.contains("firecracker cannot run ml.g"), "{e}");
        let e = testing::resolve(&s, "nothing.example.com")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("nothing.example.com"), "{e}");
        assert_eq!(a.rec.borrow().prepares.len(), 0);

        // A host failing prepare rolls the whole deploy back.
        let b = FakeHost::start(&sched.addr, HostConfig::new("host-b"))
            .await
            .unwrap();
        b.rec.borrow_mut().fail_prepare = Some("disk full".into());
        let two = "[stack]\nname = \"two\"\n[services.app]\nimage = \"app/two:1\"\n[services.app.instances]\nmin = 2\nmax = 2\n";
        let e = err(testing::deploy(&s, "two.toml", two, "", false, "").await);
        assert!(
            e.contains("rolled back") && e.contains("host-b") && e.contains("disk full"),
            "{e}"
        );
        assert!(a.prepared().is_empty(), "a's instance was released");
        assert_eq!(a.rec.borrow().releases.len(), 1);
        assert!(testing::stacks(&s).await.unwrap().is_empty());
        assert!(testing::instances(&s).await.unwrap().is_empty());

        // A host reporting what the scheduler cannot use is refused, naming the field.
        let mut odd = HostConfig::new("host-odd");
        odd.arch = "sparc".into();
        let e = FakeHost::start(&sched.addr, odd)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("inventory of host \"host-odd\": arch"), "{e}");
        let mut odd = HostConfig::new("host-odd");
        odd.layers = vec![("sha256:nothex".into(), 1)];
        let e = FakeHost::start(&sched.addr, odd)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("host-odd") && e.contains("layers"), "{e}");
        assert_eq!(testing::hosts(&s).await.unwrap().len(), 2);

        // A peer that sends garbage loses its own connection only.
        {
            use std::io::{Read, Write};
            let mut raw = std::os::unix::net::UnixStream::connect(&sched.socket).unwrap();
            raw.write_all(&[0xff; 4096]).unwrap();
            raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut rest = Vec::new();
            // The daemon hangs up (EOF or reset), rather than leaving it open.
            let r = raw.read_to_end(&mut rest);
            assert!(
                r.as_ref().map_or_else(
                    |e| !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    |_| true
                ),
                "{r:?}"
            );
        }

        // Still serving.
        assert_eq!(testing::version(&s).await.unwrap(), 1);
        b.rec.borrow_mut().fail_prepare = None;
        let r = testing::deploy(&s, "two.toml", two, "", false, "")
            .await
            .unwrap();
        assert_eq!(r.placed.len(), 2);
    });
}

#[test]
fn a_host_that_vanishes_mid_deploy_fails_it_cleanly_and_is_marked_down() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Sched::start(dir.path(), "1s");
    local(async {
        let a = FakeHost::start(&sched.addr, HostConfig::new("host-a"))
            .await
            .unwrap();
        let b = FakeHost::start(&sched.addr, HostConfig::new("host-b"))
            .await
            .unwrap();
        let s = schedd::net::connect(&sched.addr).await.unwrap();
        b.rec.borrow_mut().vanish_in_prepare = true;
        // Two replicas spread over both hosts: host-b drops its connection while its
        // prepare is in flight.
        let two = "[stack]\nname = \"two\"\n[services.app]\nimage = \"app/two:1\"\n[services.app.instances]\nmin = 2\nmax = 2\n";
        let e = testing::deploy(&s, "two.toml", two, "", false, "")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rolled back") && e.contains("host host-b"),
            "{e}"
        );
        assert!(a.prepared().is_empty());
        assert!(testing::stacks(&s).await.unwrap().is_empty());
        assert_eq!(b.rec.borrow().prepares.len(), 1, "host-b was asked");
        wait_for("host-b to be marked down", async || {
            testing::hosts(&s).await.unwrap() == [("host-a".into(), true), ("host-b".into(), false)]
        })
        .await;
        // The daemon kept serving: the same deploy now lands on host-a alone.
        let r = testing::deploy(&s, "two.toml", two, "", false, "")
            .await
            .unwrap();
        assert_eq!(r.placed.len(), 2);
        assert!(r.placed.iter().all(|p| p.instance.host == "host-a"));
        assert_eq!(a.prepared().len(), 2);
    });
}

#[test]
fn non_loopback_listen_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sched"))
        .args(["--listen", "0.0.0.0:0", "--data"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--allow-remote"), "{err}");
    // Loopback TCP is fine.
    let mut child = Command::new(env!("CARGO_BIN_EXE_sched"))
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        line.contains("serving") && line.contains("127.0.0.1:"),
        "{line}"
    );
}

/// The parts of a pushed route table a test checks: version, name → key, key →
/// instance ids.
#[derive(Debug, Default, Clone)]
struct Table {
    version: u64,
    names: std::collections::BTreeMap<String, String>,
    instances: std::collections::BTreeMap<String, Vec<String>>,
    scale_to_zero: Vec<String>,
}

fn table(r: schema::sched_capnp::route_table::Reader<'_>) -> Table {
    let s = |t: capnp::Result<capnp::text::Reader<'_>>| t.unwrap().to_string().unwrap();
    let mut t = Table {
        version: r.get_version(),
        ..Table::default()
    };
    for n in r.get_names().unwrap() {
        t.names.insert(s(n.get_hostname()), s(n.get_key()));
    }
    for svc in r.get_services().unwrap() {
        let ids = svc
            .get_instances()
            .unwrap()
            .iter()
            .map(|i| s(i.get_id()))
            .collect();
        if svc.get_scale_to_zero() {
            t.scale_to_zero.push(s(svc.get_key()));
        }
        t.instances.insert(s(svc.get_key()), ids);
    }
    t
}

/// A front end's watcher: keeps every table pushed to it.
struct Watcher(std::rc::Rc<std::cell::RefCell<Vec<Table>>>);

impl schema::sched_capnp::route_watcher::Server for Watcher {
    async fn update(
        self: capnp::capability::Rc<Self>,
        params: schema::sched_capnp::route_watcher::UpdateParams,
        _: schema::sched_capnp::route_watcher::UpdateResults,
    ) -> Result<(), capnp::Error> {
        self.0.borrow_mut().push(table(params.get()?.get_table()?));
        Ok(())
    }
}

#[test]
fn route_watchers_get_the_table_and_every_change_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Sched::start(dir.path(), "10s");
    local(async {
        let _a = FakeHost::start(&sched.addr, eu_host("host-a"))
            .await
            .unwrap();
        let s = schedd::net::connect(&sched.addr).await.unwrap();
        let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let mut req = s.watch_routes_request();
        req.get()
            .set_watcher(capnp_rpc::new_client(Watcher(seen.clone())));
        let reply = req.send().promise.await.unwrap();
        let first = table(reply.get().unwrap().get_table().unwrap());
        assert!(first.names.is_empty(), "{first:?}");

        testing::deploy(&s, "shop.toml", SHOP, "", false, "")
            .await
            .unwrap();
        let current = || seen.borrow().last().cloned().unwrap_or_default();
        wait_for("the deploy's table", async || {
            current().instances.get("web.shop").map(Vec::len) == Some(2)
        })
        .await;
        let t = current();
        assert!(t.version > first.version, "{t:?}");
        assert_eq!(t.names["shop.tidedge.local"], "web.shop");
        assert_eq!(t.names["api.shop.tidedge.local"], "api.shop");
        // pr-42 is in the catalog (shop.toml declares it): its own web, and the parent's
        // api (SHARED); the alias names pr-42's web.
        assert_eq!(t.names["web.shop--pr-42.tidedge.local"], "web.shop--pr-42");
        assert_eq!(t.names["api.shop--pr-42.tidedge.local"], "api.shop");
        assert_eq!(t.names["preview.shop.example.com"], "web.shop--pr-42");
        assert_eq!(t.instances["web.shop--pr-42"], Vec::<String>::new());
        assert_eq!(t.scale_to_zero, vec!["web.shop--pr-42".to_string()]);

        // Starting the scaled-to-zero service is pushed too.
        let (inst, started) = testing::resolve(&s, "preview.shop.example.com")
            .await
            .unwrap();
        assert!(started);
        wait_for("the started instance in the table", async || {
            current().instances["web.shop--pr-42"] == vec![inst.id.clone()]
        })
        .await;
        // Versions only grow.
        let versions: Vec<u64> = seen.borrow().iter().map(|t| t.version).collect();
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");

        // A second watcher gets the current table at once.
        let mut req = s.watch_routes_request();
        req.get()
            .set_watcher(capnp_rpc::new_client(Watcher(Default::default())));
        let t = table(
            req.send()
                .promise
                .await
                .unwrap()
                .get()
                .unwrap()
                .get_table()
                .unwrap(),
        );
        assert_eq!(t.instances["web.shop--pr-42"], vec![inst.id]);
        assert!(t.version >= current().version);
    });
}
