//! volumed as a scheduler's host, end to end: the real `volumed` binary joins a fake
//! scheduler written here (it serves `Scheduler.register` on a real Unix socket, records
//! inventories and heartbeats, and calls back the `Host` capability it was given).
//! Roots are read through the real FUSE mounts; volumes through `nbdinfo` and `nbdcopy`.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use capnp::capability::Rc as CapRc;
use capnp_rpc::{RpcSystem, rpc_twoparty_capnp, twoparty};
use futures::AsyncReadExt;
use schema::sched_capnp::{host, host_session, scheduler};
use tests::nbd::{ok, random_file};
use tests::tmpdir;
use tests::volumed::Volumed;

// ---- The fake scheduler ----

/// (name, digest, [(layer, total bytes)]).
type ImageEntry = (String, String, Vec<(String, u64)>);

/// An inventory as received.
#[derive(Debug, Clone, Default)]
struct Inv {
    host_id: String,
    address: String,
    arch: String,
    vcpus: u32,
    memory: u64,
    gpus: u32,
    hypervisors: Vec<String>,
    labels: Vec<(String, String)>,
    layers: Vec<(String, u64)>,
    images: Vec<ImageEntry>,
}

fn s(r: capnp::Result<capnp::text::Reader<'_>>) -> String {
    r.unwrap().to_str().unwrap().to_string()
}

fn read_inv(r: schema::sched_capnp::inventory::Reader<'_>) -> Inv {
    let cap = r.get_capacity().unwrap();
    Inv {
        host_id: s(r.get_host_id()),
        address: s(r.get_address()),
        arch: s(r.get_arch()),
        vcpus: cap.get_vcpus(),
        memory: cap.get_memory(),
        gpus: cap.get_gpus(),
        hypervisors: r
            .get_hypervisors()
            .unwrap()
            .iter()
            .map(|t| t.unwrap().to_string().unwrap())
            .collect(),
        labels: r
            .get_labels()
            .unwrap()
            .iter()
            .map(|kv| (s(kv.get_key()), s(kv.get_value())))
            .collect(),
        layers: r
            .get_layers()
            .unwrap()
            .iter()
            .map(|l| (s(l.get_digest()), l.get_bytes()))
            .collect(),
        images: r
            .get_images()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    s(i.get_name()),
                    s(i.get_digest()),
                    i.get_layers()
                        .unwrap()
                        .iter()
                        .map(|l| (s(l.get_digest()), l.get_bytes()))
                        .collect(),
                )
            })
            .collect(),
    }
}

#[derive(Default)]
struct State {
    registrations: Vec<(Inv, host::Client)>,
    heartbeats: Vec<Inv>,
}

#[derive(Clone)]
struct SchedulerImpl(Rc<RefCell<State>>);

impl scheduler::Server for SchedulerImpl {
    async fn register(
        self: CapRc<Self>,
        params: scheduler::RegisterParams,
        mut results: scheduler::RegisterResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let inv = read_inv(p.get_inventory()?);
        let host = p.get_host()?;
        self.0.borrow_mut().registrations.push((inv, host));
        results
            .get()
            .set_session(capnp_rpc::new_client(SessionImpl(self.0.clone())));
        Ok(())
    }
}

struct SessionImpl(Rc<RefCell<State>>);

impl host_session::Server for SessionImpl {
    async fn heartbeat(
        self: CapRc<Self>,
        params: host_session::HeartbeatParams,
        mut results: host_session::HeartbeatResults,
    ) -> Result<(), capnp::Error> {
        let inv = read_inv(params.get()?.get_inventory()?);
        self.0.borrow_mut().heartbeats.push(inv);
        results.get().set_interval_ms(100);
        Ok(())
    }
}

/// A scheduler serving on a Unix socket until stopped (its connections dropped).
struct FakeScheduler {
    state: Rc<RefCell<State>>,
    tasks: Rc<RefCell<Vec<tokio::task::JoinHandle<()>>>>,
}

impl FakeScheduler {
    fn start(path: &Path) -> FakeScheduler {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        let state = Rc::new(RefCell::new(State::default()));
        let tasks = Rc::new(RefCell::new(Vec::new()));
        let client: scheduler::Client = capnp_rpc::new_client(SchedulerImpl(state.clone()));
        let t = tasks.clone();
        let accept = tokio::task::spawn_local(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (r, w) = tokio_util::compat::TokioAsyncReadCompatExt::compat(stream).split();
                let network = twoparty::VatNetwork::new(
                    futures::io::BufReader::new(r),
                    futures::io::BufWriter::new(w),
                    rpc_twoparty_capnp::Side::Server,
                    Default::default(),
                );
                let rpc = RpcSystem::new(Box::new(network), Some(client.clone().client));
                t.borrow_mut().push(tokio::task::spawn_local(async move {
                    let _ = rpc.await;
                }));
            }
        });
        tasks.borrow_mut().push(accept);
        FakeScheduler { state, tasks }
    }

    /// Goes away: the listener and every connection (and so every capability) dropped.
    fn stop(self) {
        for t in self.tasks.borrow_mut().drain(..) {
            t.abort();
        }
    }

    fn registrations(&self) -> usize {
        self.state.borrow().registrations.len()
    }

    fn heartbeats(&self) -> usize {
        self.state.borrow().heartbeats.len()
    }

    /// The latest registration's inventory and host capability.
    fn latest(&self) -> (Inv, host::Client) {
        self.state
            .borrow()
            .registrations
            .last()
            .cloned()
            .expect("a registration")
    }

    fn last_heartbeat(&self) -> Inv {
        self.state
            .borrow()
            .heartbeats
            .last()
            .cloned()
            .expect("a heartbeat")
    }
}

// ---- Helpers ----

/// Runs `f` on a current-thread runtime inside a `LocalSet` (capnp-rpc is not Send).
fn run<F: std::future::Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f);
}

/// Waits (up to 20 s) until `f` holds, serving RPC meanwhile.
async fn until(what: &str, v: &Volumed, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; volumed log:\n{}",
            v.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn write_files(dir: &Path, files: &[(&str, &[u8])]) {
    for (name, bytes) in files {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
}

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut b = vec![0; n];
    tests::nbd::Rng(seed | 1).fill(&mut b);
    b
}

/// A small root for image `name`: /etc/hostname says `hostname`, /usr/lib/big is 1 MiB.
fn import_web(
    store: &castore::Store,
    dir: &Path,
    name: &str,
    hostname: &str,
) -> castore::ImportReport {
    let big = noise(1 << 20, 7);
    write_files(
        dir,
        &[
            ("etc/hostname", hostname.as_bytes()),
            ("usr/lib/big", &big),
            ("usr/bin/app", b"#!/bin/sh\necho hi\n"),
        ],
    );
    store
        .import_image(dir, Some(name), &castore::ImportOptions::default())
        .unwrap()
}

fn host_args(sched: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--scheduler",
        &format!("unix:{}", sched.display()),
        "--host-id",
        "h1",
        "--hypervisors",
        "firecracker,qemu",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// A volumed started with `args` on `DIR/data`, joined to a fake scheduler on
/// `DIR/sched.sock`: started, and its registration received.
struct Joined {
    v: Volumed,
    sched: FakeScheduler,
    host: host::Client,
}

async fn join(dir: &Path, args: &[String]) -> Joined {
    let sched = FakeScheduler::start(&dir.join("sched.sock"));
    let v = Volumed::start_with(dir.join("data"), dir.join("volumed.sock"), args);
    until("registration", &v, || sched.registrations() == 1).await;
    let host = sched.latest().1;
    Joined { v, sched, host }
}

fn reason(e: capnp::Error) -> String {
    assert_eq!(e.kind, capnp::ErrorKind::Failed, "{e}");
    e.extra
}

/// What a prepare returned.
#[derive(Debug, Clone)]
struct Prepared {
    instance: String,
    root: PathBuf,
    image: String,
    volumes: Vec<String>,
    hypervisor: String,
    warm_vm: String,
    /// (role, uri, read-only, size, layer, mount path)
    disks: Vec<(String, String, bool, u64, String, String)>,
    root_mode: u32,
    /// Volumes made from the tier: (volume, snapshot, pushed by).
    pulled: Vec<(String, String, String)>,
}

fn read_prepared(p: schema::sched_capnp::prepared_instance::Reader<'_>) -> Prepared {
    Prepared {
        instance: s(p.get_instance()),
        root: s(p.get_root()).into(),
        image: s(p.get_image()),
        volumes: p
            .get_volumes()
            .unwrap()
            .iter()
            .map(|t| t.unwrap().to_string().unwrap())
            .collect(),
        hypervisor: s(p.get_hypervisor()),
        warm_vm: s(p.get_warm_vm()),
        disks: p
            .get_boot()
            .unwrap()
            .get_disks()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    s(d.get_role()),
                    s(d.get_uri()),
                    d.get_read_only(),
                    d.get_size(),
                    s(d.get_layer()),
                    s(d.get_mount_path()),
                )
            })
            .collect(),
        root_mode: p.get_boot().unwrap().get_root_mode(),
        pulled: p
            .get_pulled()
            .unwrap()
            .iter()
            .map(|v| (s(v.get_volume()), s(v.get_snapshot()), s(v.get_host())))
            .collect(),
    }
}

/// (name, size, mode, per instance)
type Vol<'a> = (&'a str, u64, &'a str, bool);

async fn prepare(
    h: &host::Client,
    instance: &str,
    ordinal: u32,
    image: &str,
    volumes: &[Vol<'_>],
    warm: &str,
) -> Result<Prepared, capnp::Error> {
    prepare_spec(h, instance, ordinal, image, volumes, warm, false).await
}

/// [`prepare`], with `moved`: the instance ran on a host that went down.
async fn prepare_spec(
    h: &host::Client,
    instance: &str,
    ordinal: u32,
    image: &str,
    volumes: &[Vol<'_>],
    warm: &str,
    moved: bool,
) -> Result<Prepared, capnp::Error> {
    let mut req = h.prepare_request();
    {
        let mut spec = req.get().init_spec();
        spec.set_moved(moved);
        spec.set_instance(instance);
        spec.set_key("web.shop");
        spec.set_ordinal(ordinal);
        spec.set_image(image);
        spec.set_warm_vm(warm);
        spec.reborrow().init_resources().set_vcpus(1);
        let mut vs = spec.init_volumes(volumes.len() as u32);
        for (i, (name, size, mode, per)) in volumes.iter().enumerate() {
            let mut v = vs.reborrow().get(i as u32);
            v.set_name(*name);
            v.set_size(*size);
            v.set_mode(*mode);
            v.set_per_instance(*per);
            v.set_mount_path("/data");
        }
    }
    let r = req.send().promise.await?;
    Ok(read_prepared(r.get()?.get_prepared()?))
}

async fn release(h: &host::Client, id: &str) {
    let mut req = h.release_request();
    req.get().set_instance(id);
    req.send().promise.await.unwrap();
}

/// (prepared instances, warm VM (id, pool, root, layers))
async fn instances(
    h: &host::Client,
) -> (Vec<Prepared>, Vec<(String, String, PathBuf, Vec<String>)>) {
    let r = h.instances_request().send().promise.await.unwrap();
    let r = r.get().unwrap();
    let inst = r
        .get_instances()
        .unwrap()
        .iter()
        .map(read_prepared)
        .collect();
    let warm = r
        .get_warm()
        .unwrap()
        .iter()
        .map(|w| {
            (
                s(w.get_id()),
                s(w.get_pool()),
                PathBuf::from(s(w.get_root())),
                w.get_layers()
                    .unwrap()
                    .iter()
                    .map(|t| t.unwrap().to_string().unwrap())
                    .collect(),
            )
        })
        .collect();
    (inst, warm)
}

fn is_mounted(p: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = p.to_str().unwrap();
    text.lines().any(|l| l.split(' ').nth(4) == Some(p))
}

/// Imports `dir` as `name` through the daemon's own RPC interface (`Store.importImage`).
async fn import_over_rpc(socket: &Path, dir: &Path, name: &str) {
    use schema::store_capnp::daemon;
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (r, w) = tokio_util::compat::TokioAsyncReadCompatExt::compat(stream).split();
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(r),
        futures::io::BufWriter::new(w),
        rpc_twoparty_capnp::Side::Client,
        Default::default(),
    );
    let mut rpc = RpcSystem::new(Box::new(network), None);
    let d: daemon::Client = rpc.bootstrap(rpc_twoparty_capnp::Side::Server);
    let task = tokio::task::spawn_local(rpc);
    let store = d.store_request().send().pipeline.get_store();
    let mut req = store.import_image_request();
    req.get().set_path(dir.to_str().unwrap());
    req.get().set_name(name);
    req.send().promise.await.unwrap();
    task.abort();
}

fn nbd_size(uri: &str) -> u64 {
    let out = ok("nbdinfo", &["--size", uri]);
    out.trim().parse().unwrap()
}

// ---- Tests ----

/// Registration carries the configured host and the store's layers (a partly present
/// one with only its present bytes), heartbeats follow and track imports, and a
/// scheduler that goes away and comes back gets a new registration while volumed keeps
/// serving its own clients.
#[test]
fn registers_heartbeats_and_rejoins() {
    let tmp = tmpdir("host-register");
    let data = tmp.path().join("data");
    let (web, lone_layer, partial_bytes) = {
        let store = castore::Store::open(data.join("store")).unwrap();
        let web = import_web(&store, &tmp.path().join("web"), "shop/web:1", "web\n");
        // A lone layer sharing web's big file, with 40000 bytes of its own of which the
        // chunk is then lost: the layer is partly present.
        let own = noise(40_000, 99);
        write_files(
            &tmp.path().join("extra"),
            &[("big", &noise(1 << 20, 7)), ("own", &own)],
        );
        let extra = store
            .import_layer(
                &tmp.path().join("extra"),
                &castore::ImportOptions::default(),
            )
            .unwrap();
        let layer = extra.layers[0];
        let shared: Vec<_> = store.layer_chunks(&web.layers[0]).unwrap();
        let mut lost = 0;
        for (c, len) in store.layer_chunks(&layer).unwrap() {
            if !shared.iter().any(|(d, _)| *d == c) {
                castore::testing::forget_chunk(&store, &c).unwrap();
                lost += len;
            }
        }
        assert_eq!(lost, 40_000);
        // A layer none of whose chunks are here is not reported at all.
        write_files(&tmp.path().join("gone"), &[("gone", &noise(50_000, 42))]);
        let gone = store
            .import_layer(&tmp.path().join("gone"), &castore::ImportOptions::default())
            .unwrap();
        for (c, _) in store.layer_chunks(&gone.layers[0]).unwrap() {
            castore::testing::forget_chunk(&store, &c).unwrap();
        }
        (web, layer, 1u64 << 20)
    };
    run(async move {
        let sock = tmp.path().join("sched.sock");
        let args = host_args(
            &sock,
            &[
                "--address",
                "10.0.0.7",
                "--vcpus",
                "4",
                "--memory",
                "8G",
                "--gpus",
                "1",
                "--arch",
                "aarch64",
                "--label",
                "zone=a",
                "--label",
                "disk=ssd",
            ],
        );
        let Joined { v, sched, .. } = join(tmp.path(), &args).await;
        let (inv, h) = sched.latest();
        assert_eq!(inv.host_id, "h1");
        assert_eq!(inv.address, "10.0.0.7");
        assert_eq!(inv.arch, "aarch64");
        assert_eq!((inv.vcpus, inv.memory, inv.gpus), (4, 8 << 30, 1));
        assert_eq!(inv.hypervisors, ["firecracker", "qemu"]);
        assert_eq!(
            inv.labels,
            [
                ("zone".to_string(), "a".to_string()),
                ("disk".to_string(), "ssd".to_string())
            ]
        );
        let web_layer = web.layers[0].to_string();
        // Web's small files are inlined in their trees: only the big file has chunks.
        let web_bytes = 1u64 << 20;
        let layers: std::collections::HashMap<_, _> = inv.layers.iter().cloned().collect();
        assert_eq!(layers.len(), 2, "{:?}", inv.layers);
        assert_eq!(layers[&web_layer], web_bytes);
        // The lone layer: only its shared 1 MiB is present, not its lost 40000 bytes.
        assert_eq!(layers[&lone_layer.to_string()], partial_bytes);
        assert_eq!(inv.images.len(), 1);
        let (name, digest, img_layers) = &inv.images[0];
        assert_eq!(name, "shop/web:1");
        assert_eq!(digest, &web.image.unwrap().to_string());
        assert_eq!(img_layers, &vec![(web_layer.clone(), web_bytes)]);

        // Heartbeats arrive at the interval the scheduler asked for (100 ms).
        until("three heartbeats", &v, || sched.heartbeats() >= 3).await;
        assert_eq!(sched.last_heartbeat().layers.len(), 2);

        // An image imported while running shows up in the next heartbeats and in
        // Host.inventory.
        let api = tmp.path().join("api");
        write_files(&api, &[("srv/api", &noise(300_000, 5))]);
        import_over_rpc(&v.socket, &api, "shop/api:1").await;
        until("a heartbeat with shop/api:1", &v, || {
            sched
                .last_heartbeat()
                .images
                .iter()
                .any(|(n, _, _)| n == "shop/api:1")
        })
        .await;
        let r = h.inventory_request().send().promise.await.unwrap();
        let now = read_inv(r.get().unwrap().get_inventory().unwrap());
        assert_eq!(now.images.len(), 2);
        let api_layer = &now
            .images
            .iter()
            .find(|(n, _, _)| n == "shop/api:1")
            .unwrap()
            .2[0];
        assert_eq!(api_layer.1, 300_000);

        // The scheduler goes away: volumed keeps serving, and registers again with the
        // next scheduler on that address.
        sched.stop();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(v.log_text().contains("reconnecting"), "{}", v.log_text());
        assert!(std::os::unix::net::UnixStream::connect(&v.socket).is_ok());
        let again = FakeScheduler::start(&sock);
        until("re-registration", &v, || again.registrations() == 1).await;
        assert_eq!(again.latest().0.images.len(), 2);
        until("heartbeats to the new scheduler", &v, || {
            again.heartbeats() >= 1
        })
        .await;
    });
}

/// prepare mounts a root with a scratch of its own, attaches volumes honouring their
/// modes (and undoes everything when one cannot be attached), serves them over NBD;
/// release undoes it.
#[test]
fn prepare_attach_and_release() {
    let tmp = tmpdir("host-prepare");
    let data = tmp.path().join("data");
    let web = {
        let store = castore::Store::open(data.join("store")).unwrap();
        import_web(&store, &tmp.path().join("web"), "shop/web:1", "web\n")
    };
    run(async move {
        let sock = tmp.path().join("sched.sock");
        let Joined { v: _v, host: h, .. } = join(tmp.path(), &host_args(&sock, &[])).await;
        let vols: &[Vol<'_>] = &[
            ("db", 16 << 20, "rwo", false),
            ("data", 8 << 20, "rwo", true),
            ("assets", 4 << 20, "rox", false),
        ];

        let p0 = prepare(&h, "web.shop-0", 0, "shop/web:1", vols, "")
            .await
            .unwrap();
        assert_eq!(p0.instance, "web.shop-0");
        assert_eq!(p0.image, web.image.unwrap().to_string());
        assert_eq!(p0.hypervisor, "firecracker", "the host's first eligible");
        assert_eq!(p0.warm_vm, "");
        assert_eq!(p0.root, data.join("instances/web.shop-0/root"));
        assert_eq!(
            std::fs::read_to_string(p0.root.join("etc/hostname")).unwrap(),
            "web\n"
        );
        assert_eq!(
            std::fs::read(p0.root.join("usr/lib/big")).unwrap(),
            noise(1 << 20, 7)
        );
        // Writes go to the instance's scratch layer.
        std::fs::write(p0.root.join("etc/motd"), b"instance 0\n").unwrap();
        assert_eq!(
            std::fs::read(p0.root.join("etc/motd")).unwrap(),
            b"instance 0\n"
        );
        // …as a real file in a scratch directory of DATA/scratch, not in the store.
        let in_scratch = std::fs::read_dir(data.join("scratch"))
            .unwrap()
            .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
            .any(|f| std::fs::read(f.unwrap().path()).is_ok_and(|b| b == b"instance 0\n"));
        assert!(in_scratch, "the write is in the instance's scratch layer");

        // Volumes: created with the requested sizes, NAME-ORDINAL for per-instance,
        // reachable with nbdinfo; data written with nbdcopy reads back.
        assert_eq!(p0.volumes.len(), 3);
        let nbd = data.join("nbd.sock");
        for (uri, name) in p0.volumes.iter().zip(["db/", "data-0/", "assets/"]) {
            assert!(
                uri.starts_with(&format!("nbd+unix:///{name}"))
                    && uri.ends_with(&format!("?socket={}", nbd.display())),
                "{uri}"
            );
        }
        assert_eq!(nbd_size(&p0.volumes[0]), 16 << 20);
        assert_eq!(nbd_size(&p0.volumes[1]), 8 << 20);
        assert_eq!(nbd_size(&p0.volumes[2]), 4 << 20);
        let src = tmp.path().join("blob");
        let bytes = random_file(&src, 8 << 20, 11);
        ok("nbdcopy", &[src.to_str().unwrap(), p0.volumes[1].as_str()]);
        let back = tmp.path().join("back");
        ok("nbdcopy", &[p0.volumes[1].as_str(), back.to_str().unwrap()]);
        assert!(std::fs::read(&back).unwrap() == bytes, "data-0 reads back");
        // ROX: writes are refused.
        let out = tests::nbd::run("nbdcopy", &[src.to_str().unwrap(), p0.volumes[2].as_str()]);
        assert!(!out.status.success(), "a write to a rox volume must fail");

        // The boot spec: the image's layer as an EROFS device (fsck.erofs reads it as
        // nbdcopy copies it), the scratch device (an ext4 filesystem), the volumes in
        // request order with their mount paths.
        let roles: Vec<&str> = p0.disks.iter().map(|d| d.0.as_str()).collect();
        assert_eq!(roles, ["layer", "scratch", "volume", "volume", "volume"]);
        let (_, layer_uri, ro, size, layer, _) = &p0.disks[0];
        assert!(*ro && layer_uri.contains("/layer/sha256:") && layer.starts_with("sha256:"));
        assert_eq!(nbd_size(layer_uri), *size);
        let info = ok("nbdinfo", &[layer_uri.as_str()]);
        assert!(info.contains("EROFS filesystem"), "{info}");
        let img = tmp.path().join("layer.erofs");
        ok("nbdcopy", &[layer_uri.as_str(), img.to_str().unwrap()]);
        ok("fsck.erofs", &[img.to_str().unwrap()]);
        let (_, scratch_uri, ro, size, _, _) = &p0.disks[1];
        assert!(!ro && *size == 10 << 30, "{:?}", p0.disks[1]);
        assert!(
            scratch_uri.contains("/scratch.web.shop-0/"),
            "{scratch_uri}"
        );
        let info = ok("nbdinfo", &[scratch_uri.as_str()]);
        assert!(info.contains("ext4 filesystem"), "{info}");
        assert_eq!(p0.disks[2].1, p0.volumes[0]);
        assert_eq!(p0.disks[3].5, "/data");
        assert_eq!(p0.root_mode, 0o755);

        // Idempotent: the same instance again is returned as it is.
        let again = prepare(&h, "web.shop-0", 0, "shop/web:1", vols, "")
            .await
            .unwrap();
        assert_eq!((&again.root, &again.volumes), (&p0.root, &p0.volumes));

        // A second instance wanting the RWO volume db (asked for last) fails naming the
        // holder, and leaves nothing behind: data-1 it created is removed again, no
        // root is left.
        let e = reason(
            prepare(
                &h,
                "web.shop-1",
                1,
                "shop/web:1",
                &[vols[1], vols[2], vols[0]],
                "",
            )
            .await
            .unwrap_err(),
        );
        assert!(e.contains("volume db is held by web.shop-0 (rwo)"), "{e}");
        assert!(!data.join("instances/web.shop-1").exists());
        let list = ok(
            "nbdinfo",
            &["--list", &format!("nbd+unix://?socket={}", nbd.display())],
        );
        assert!(
            list.contains("data-0") && !list.contains("data-1"),
            "{list}"
        );
        let (list, _) = instances(&h).await;
        assert_eq!(
            list.iter().map(|p| p.instance.as_str()).collect::<Vec<_>>(),
            ["web.shop-0"]
        );

        // Without db it works; data-1 is its own volume; assets is shared read-only;
        // instance 0's writes are not in instance 1's root.
        let p1 = prepare(&h, "web.shop-1", 1, "shop/web:1", &vols[1..], "")
            .await
            .unwrap();
        assert!(
            p1.volumes[0].starts_with("nbd+unix:///data-1/"),
            "{:?}",
            p1.volumes
        );
        assert!(p1.volumes[1].starts_with("nbd+unix:///assets/"));
        assert_eq!(nbd_size(&p1.volumes[0]), 8 << 20);
        assert!(
            !p1.root.join("etc/motd").exists(),
            "scratch layers are per instance"
        );
        let back1 = tmp.path().join("back1");
        ok(
            "nbdcopy",
            &[p1.volumes[0].as_str(), back1.to_str().unwrap()],
        );
        assert!(
            std::fs::read(&back1).unwrap().iter().all(|&b| b == 0),
            "data-1 is new"
        );

        // Bad requests fail clearly.
        let e = reason(prepare(&h, "x-0", 0, "nope:1", &[], "").await.unwrap_err());
        assert!(
            e.ends_with(": image nope:1 is not in this host's store"),
            "{e}"
        );
        let e = reason(
            prepare(&h, "../x", 0, "shop/web:1", &[], "")
                .await
                .unwrap_err(),
        );
        assert!(e.contains("instance id"), "{e}");
        let e = reason(
            prepare(&h, "x-0", 0, "shop/web:1", &[("new", 0, "rwo", false)], "")
                .await
                .unwrap_err(),
        );
        assert!(e.contains("volume new does not exist"), "{e}");

        // Release: the root is unmounted and removed, db is free for someone else, the
        // scratch device is gone.
        release(&h, "web.shop-0").await;
        assert!(!is_mounted(&p0.root));
        assert!(!data.join("instances/web.shop-0").exists());
        let out = tests::nbd::run("nbdinfo", &[p0.disks[1].1.as_str()]);
        assert!(
            !out.status.success(),
            "the scratch device of a released instance is gone"
        );
        release(&h, "web.shop-0").await; // idempotent
        let p2 = prepare(&h, "web.shop-2", 2, "shop/web:1", &vols[..1], "")
            .await
            .unwrap();
        assert!(p2.volumes[0].starts_with("nbd+unix:///db/"));
        // The data written through instance 0's attachment is still in data-0.
        let p0b = prepare(&h, "web.shop-0", 0, "shop/web:1", &vols[1..2], "")
            .await
            .unwrap();
        let back0 = tmp.path().join("back0");
        ok(
            "nbdcopy",
            &[p0b.volumes[0].as_str(), back0.to_str().unwrap()],
        );
        assert!(
            std::fs::read(&back0).unwrap() == bytes,
            "data-0 keeps its data"
        );
        assert!(
            !p0b.root.join("etc/motd").exists(),
            "a new root has a fresh scratch"
        );
        let (list, _) = instances(&h).await;
        assert_eq!(list.len(), 3);
    });
}

/// Warm VMs: booted on a pool's image, converted into an instance (same root), and
/// prepared instances and warm VMs survive a volumed restart, graceful or kill -9 (roots
/// mounted again, volumes still attached), reported to the scheduler it registers with
/// again.
#[test]
fn warm_vms_and_restart() {
    let tmp = tmpdir("host-warm");
    let data = tmp.path().join("data");
    let web = {
        let store = castore::Store::open(data.join("store")).unwrap();
        import_web(&store, &tmp.path().join("web"), "shop/web:1", "web\n")
    };
    run(async move {
        let sock = tmp.path().join("sched.sock");
        let args = host_args(&sock, &["--heartbeat-ms", "50"]);
        let Joined { v, sched, host: h } = join(tmp.path(), &args).await;

        let boot = |pool: &'static str| {
            let h = h.clone();
            async move {
                let mut req = h.boot_warm_request();
                req.get().set_pool(pool);
                req.get().set_image("shop/web:1");
                let r = req.send().promise.await.unwrap();
                let w = r.get().unwrap().get_vm().unwrap();
                (
                    s(w.get_id()),
                    s(w.get_image()),
                    PathBuf::from(s(w.get_root())),
                    w.get_layers().unwrap().len(),
                )
            }
        };
        let (w1, img, root1, nlayers) = boot("base").await;
        assert_eq!(img, web.image.unwrap().to_string());
        assert_eq!(nlayers, 1);
        assert_eq!(
            std::fs::read_to_string(root1.join("etc/hostname")).unwrap(),
            "web\n"
        );
        let (w2, _, root2, _) = boot("base").await;
        assert_ne!(w1, w2);

        // Conversion: the instance gets the warm VM's root; the warm VM is gone.
        let p = prepare(
            &h,
            "web.shop-0",
            0,
            "shop/web:1",
            &[("db", 1 << 20, "rwo", false)],
            &w1,
        )
        .await
        .unwrap();
        assert_eq!(p.root, root1);
        assert_eq!(p.warm_vm, w1);
        let (list, warm) = instances(&h).await;
        assert_eq!(list.len(), 1);
        assert_eq!(
            warm.iter().map(|w| w.0.as_str()).collect::<Vec<_>>(),
            [w2.as_str()]
        );
        let e = reason(
            prepare(&h, "web.shop-1", 1, "shop/web:1", &[], &w1)
                .await
                .unwrap_err(),
        );
        assert!(
            e.contains(&format!("warm VM {w1} is not on this host")),
            "{e}"
        );
        std::fs::write(p.root.join("etc/motd"), b"before restart").unwrap();

        // Restart: gracefully, then the same flags.
        let st = v.signal_and_wait(libc::SIGTERM);
        assert!(st.success(), "{st}");
        assert!(!is_mounted(&root1));
        let v = Volumed::start_with(&data, tmp.path().join("volumed.sock"), &args);
        until("re-registration", &v, || sched.registrations() == 2).await;
        let (_, h) = sched.latest();
        let (list, warm) = instances(&h).await;
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].instance, "web.shop-0");
        assert_eq!(list[0].root, root1);
        assert_eq!(list[0].volumes, p.volumes, "the same attachment");
        assert_eq!(warm.len(), 1);
        assert_eq!(warm[0].0, w2);
        assert!(is_mounted(&root1) && is_mounted(&root2));
        assert_eq!(
            std::fs::read_to_string(root1.join("etc/hostname")).unwrap(),
            "web\n"
        );
        assert!(
            !root1.join("etc/motd").exists(),
            "scratch does not survive a restart"
        );
        assert_eq!(nbd_size(&list[0].volumes[0]), 1 << 20);
        // The volume is still held by the instance.
        let e = reason(
            prepare(
                &h,
                "other-0",
                0,
                "shop/web:1",
                &[("db", 1 << 20, "rwo", false)],
                "",
            )
            .await
            .unwrap_err(),
        );
        assert!(e.contains("held by web.shop-0"), "{e}");

        // kill -9: the next start cleans up the dead mounts and mounts the roots again.
        let st = v.signal_and_wait(libc::SIGKILL);
        assert!(!st.success());
        let v = Volumed::start_with(&data, tmp.path().join("volumed.sock"), &args);
        until("registration after kill -9", &v, || {
            sched.registrations() == 3
        })
        .await;
        let (_, h) = sched.latest();
        let (list, warm) = instances(&h).await;
        assert_eq!((list.len(), warm.len()), (1, 1));
        assert_eq!(
            std::fs::read_to_string(root1.join("etc/hostname")).unwrap(),
            "web\n"
        );
        assert_eq!(
            std::fs::read_to_string(root2.join("etc/hostname")).unwrap(),
            "web\n"
        );
        assert_eq!(nbd_size(&list[0].volumes[0]), 1 << 20);

        release(&h, "web.shop-0").await;
        release(&h, &w2).await;
        let (list, warm) = instances(&h).await;
        assert!(list.is_empty() && warm.is_empty());
        assert!(!is_mounted(&root1) && !is_mounted(&root2));
    });
}

/// An OCI image layout at `out` named `name`, its layers the directories `layers`
/// (bottom first, as uncompressed tars).
fn oci_layout(out: &Path, name: &str, layers: &[&Path]) {
    let blobs = out.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let d = castore::Digest::of(bytes);
        std::fs::write(blobs.join(d.to_hex()), bytes).unwrap();
        (d, bytes.len())
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for dir in layers {
        let tar = std::process::Command::new("tar")
            .arg("-C")
            .arg(dir)
            .args(["-cf", "-", "."])
            .output()
            .unwrap();
        assert!(tar.status.success());
        let (d, len) = put(&tar.stdout);
        diff_ids.push(d.to_string());
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": d.to_string(), "size": len
        }));
    }
    let cfg = serde_json::to_vec(&serde_json::json!({
        "architecture": castore::host_arch(), "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))
    .unwrap();
    let (c, clen) = put(&cfg);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c.to_string(), "size": clen},
        "layers": descs
    });
    let (m, mlen) = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": m.to_string(),
        "size": mlen, "annotations": {"org.opencontainers.image.ref.name": name}
    }]});
    std::fs::write(out.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(out.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// A warm VM booted on a pool's base image is converted for an instance whose image
/// adds a layer on top: the root, at the same place, then shows the full stack. A warm
/// VM whose layers are not a prefix of the instance's image is refused and kept.
#[test]
fn warm_vm_on_a_prefix_takes_the_full_stack() {
    let tmp = tmpdir("host-prefix");
    let data = tmp.path().join("data");
    let (base, app) = {
        let store = castore::Store::open(data.join("store")).unwrap();
        let (l1, l2) = (tmp.path().join("l1"), tmp.path().join("l2"));
        write_files(
            &l1,
            &[
                ("etc/os-release", b"base\n"),
                ("usr/lib/libc", &noise(200_000, 3)),
            ],
        );
        write_files(
            &l2,
            &[
                ("srv/app", &noise(100_000, 4)),
                ("etc/app.conf", b"port=80\n"),
            ],
        );
        oci_layout(&tmp.path().join("base-oci"), "base:1", &[&l1]);
        oci_layout(&tmp.path().join("app-oci"), "shop/app:1", &[&l1, &l2]);
        let opts = castore::ImportOptions::default();
        let base = store
            .import_image(&tmp.path().join("base-oci"), None, &opts)
            .unwrap();
        let app = store
            .import_image(&tmp.path().join("app-oci"), None, &opts)
            .unwrap();
        (base, app)
    };
    assert_eq!(app.layers[0], base.layers[0]);
    run(async move {
        let sock = tmp.path().join("sched.sock");
        let Joined {
            v: _v,
            sched,
            host: h,
        } = join(tmp.path(), &host_args(&sock, &[])).await;
        // The inventory names both images with their layers, bottom first.
        let inv = sched.latest().0;
        let app_inv = inv.images.iter().find(|i| i.0 == "shop/app:1").unwrap();
        assert_eq!(
            app_inv.2,
            [
                (app.layers[0].to_string(), 200_000),
                (app.layers[1].to_string(), 100_000)
            ]
        );
        assert_eq!(inv.layers.len(), 2);

        let mut req = h.boot_warm_request();
        req.get().set_pool("base");
        req.get().set_image("base:1");
        let r = req.send().promise.await.unwrap();
        let w = r.get().unwrap().get_vm().unwrap();
        let (id, root) = (s(w.get_id()), PathBuf::from(s(w.get_root())));
        assert!(!root.join("srv/app").exists());

        // base:1's warm VM cannot serve an image that does not start with its layers…
        let mut req = h.boot_warm_request();
        req.get().set_pool("apps");
        req.get().set_image("shop/app:1");
        let r = req.send().promise.await.unwrap();
        let app_vm = s(r.get().unwrap().get_vm().unwrap().get_id());
        let e = reason(
            prepare(&h, "base-0", 0, "base:1", &[], &app_vm)
                .await
                .unwrap_err(),
        );
        assert!(e.contains("not a prefix"), "{e}");
        let (_, warm) = instances(&h).await;
        assert_eq!(warm.len(), 2, "a refused conversion keeps the warm VM");

        // …but base:1's serves shop/app:1: same root, now with the app layer.
        let p = prepare(&h, "app-0", 0, "shop/app:1", &[], &id)
            .await
            .unwrap();
        assert_eq!(
            (p.root.as_path(), p.warm_vm.as_str()),
            (root.as_path(), id.as_str())
        );
        assert_eq!(p.image, app.image.unwrap().to_string());
        assert_eq!(
            std::fs::read(root.join("srv/app")).unwrap(),
            noise(100_000, 4)
        );
        assert_eq!(
            std::fs::read_to_string(root.join("etc/os-release")).unwrap(),
            "base\n"
        );
        let (list, warm) = instances(&h).await;
        assert_eq!(list.len(), 1);
        assert_eq!(
            warm.iter().map(|w| w.0.as_str()).collect::<Vec<_>>(),
            [app_vm.as_str()]
        );
    });
}

/// Imports a one-file root as `shop/web:1` through the daemon of `DIR/volumed.sock`.
async fn import_tiny_web(dir: &Path) {
    write_files(&dir.join("web"), &[("etc/hostname", b"web\n")]);
    import_over_rpc(&dir.join("volumed.sock"), &dir.join("web"), "shop/web:1").await;
}

/// Three host directories under `work` (`a`, `b`, `c`) and the volumed arguments of a
/// host there: its id, and the shared directory tier `work/tier` if asked.
fn tiered_hosts(
    work: &Path,
) -> (
    impl Fn(&Path, &str, bool) -> Vec<String> + use<>,
    [PathBuf; 3],
) {
    let tier_arg = format!("file://{}", work.join("tier").display());
    let args = move |dir: &Path, id: &str, with_tier: bool| -> Vec<String> {
        let mut a = host_args(&dir.join("sched.sock"), &[]);
        let at = a.iter().position(|x| x == "--host-id").unwrap();
        a[at + 1] = id.to_string();
        if with_tier {
            a.extend(["--tier".to_string(), tier_arg.clone()]);
        }
        a
    };
    let dirs = ["a", "b", "c"].map(|d| work.join(d));
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
    }
    (args, dirs)
}

/// Host h1 joined with `args`, the tiny image imported there and published, and
/// instance `db.shop-0` prepared on it with `vols`.
async fn first_host(dir: &Path, args: &[String], vols: &[Vol<'_>]) -> (Joined, Prepared) {
    let a = join(dir, args).await;
    import_tiny_web(dir).await;
    until("the image published", &a.v, || {
        a.v.log_text().contains("published shop/web:1")
    })
    .await;
    let p = prepare(&a.host, "db.shop-0", 0, "shop/web:1", vols, "")
        .await
        .unwrap();
    (a, p)
}

/// Volumes that follow their instances: host h1 (with a directory chunk tier) runs an
/// instance with an RWO volume, pushes it, writes more and is killed -9. Host h2, on
/// the same tier, prepares the moved instance: the image it never had comes from the
/// tier, the volume is made from the last pushed snapshot (the prepare says which, and
/// who pushed it), and reads byte for byte what was pushed, not what came after. A moved
/// instance whose volume the tier never got is refused; a host without a tier creates
/// it empty and says so.
#[test]
fn a_moved_instance_takes_its_volume_from_the_tiers_last_snapshot() {
    let tmp = tmpdir("host-move");
    // Host h1 is killed with its instance's root mounted: unmounted before tmp goes.
    let _unmount = tests::UnmountBelow(tmp.path().to_path_buf());
    let work = tmp.path().to_path_buf();
    let (args, [a_dir, b_dir, c_dir]) = tiered_hosts(&work);
    let vols: &[Vol<'_>] = &[("db", 16 << 20, "rwo", false)];
    run(async move {
        // Host h1: the image imported there (and published), the instance, its volume.
        let (a, p) = first_host(&a_dir, &args(&a_dir, "h1", true), vols).await;
        assert!(p.pulled.is_empty(), "{:?}", p.pulled);
        let src = work.join("pushed");
        let pushed_bytes = random_file(&src, 8 << 20, 21);
        ok("nbdcopy", &[src.to_str().unwrap(), p.volumes[0].as_str()]);
        let push = a.v.tide().json(&["volume", "push", "db"]);
        let snapshot = push["snapshot"].as_str().unwrap().to_string();
        assert!(snapshot.starts_with("pushed-"), "{push}");
        assert!(push["transferred"].as_u64().unwrap() >= 128, "{push}");
        // Written after the push, then the host dies: these bytes are not in the tier.
        let later = work.join("later");
        random_file(&later, 1 << 20, 22);
        ok("nbdcopy", &[later.to_str().unwrap(), p.volumes[0].as_str()]);
        let Joined { v: a_v, .. } = a;
        a_v.signal_and_wait(libc::SIGKILL);

        // Host h2: neither the image nor the volume; the moved instance gets both.
        let b = join(&b_dir, &args(&b_dir, "h2", true)).await;
        let shown = b.v.tide().json(&["volume", "pushed", "db"]);
        assert_eq!(shown["snapshot"], snapshot.as_str(), "{shown}");
        assert_eq!(shown["host"], "h1", "{shown}");
        let moved = prepare_spec(&b.host, "db.shop-0", 0, "shop/web:1", vols, "", true)
            .await
            .unwrap();
        assert_eq!(
            moved.pulled,
            [("db".to_string(), snapshot.clone(), "h1".to_string())]
        );
        assert_eq!(
            std::fs::read_to_string(moved.root.join("etc/hostname")).unwrap(),
            "web\n"
        );
        let back = work.join("back");
        ok(
            "nbdcopy",
            &[moved.volumes[0].as_str(), back.to_str().unwrap()],
        );
        let got = std::fs::read(&back).unwrap();
        assert_eq!(got.len(), 16 << 20);
        assert!(
            got[..8 << 20] == pushed_bytes[..],
            "the pushed snapshot's bytes"
        );
        assert!(got[8 << 20..].iter().all(|&b| b == 0));
        assert!(b.v.log_text().contains("made from the tier's snapshot"));

        // A moved instance whose RWO volume the tier never got: refused, nothing made.
        let e = reason(
            prepare_spec(
                &b.host,
                "kv.shop-0",
                0,
                "shop/web:1",
                &[("kv", 16 << 20, "rwo", false)],
                "",
                true,
            )
            .await
            .unwrap_err(),
        );
        assert!(e.contains("refusing to create it empty"), "{e}");
        let listed = b.v.tide().json(&["volume", "ls"]);
        assert!(
            !listed.to_string().contains("\"kv\""),
            "no empty kv volume: {listed}"
        );
        // The same instance not moved (a first deploy) gets a new, empty volume.
        prepare(
            &b.host,
            "kv.shop-0",
            0,
            "shop/web:1",
            &[("kv", 16 << 20, "rwo", false)],
            "",
        )
        .await
        .unwrap();

        // Host h3 has no tier: a moved instance's volume is created empty, and said so.
        let c = join(&c_dir, &args(&c_dir, "h3", false)).await;
        import_tiny_web(&c_dir).await;
        let empty = prepare_spec(&c.host, "db.shop-0", 0, "shop/web:1", vols, "", true)
            .await
            .unwrap();
        assert_eq!(
            empty.pulled,
            [("db".to_string(), String::new(), String::new())]
        );
        assert!(c.v.log_text().contains("was created EMPTY"));
        drop(b);
        drop(c);
    });
}

/// A live move's hand-over: the old host stops the instance, pushes a snapshot of its
/// RWO volume with every write made so far (none pushed before), and releases it; the
/// next host makes the volume from that snapshot and reads every byte. A host without
/// a tier refuses to hand over an instance with an RWO volume and keeps it.
#[test]
fn a_hand_over_pushes_every_written_byte_and_the_next_host_reads_them() {
    let tmp = tmpdir("host-handover");
    let _unmount = tests::UnmountBelow(tmp.path().to_path_buf());
    let work = tmp.path().to_path_buf();
    let (args, [a_dir, b_dir, c_dir]) = tiered_hosts(&work);
    let vols: &[Vol<'_>] = &[("db", 16 << 20, "rwo", false)];
    run(async move {
        let (a, p) = first_host(&a_dir, &args(&a_dir, "h1", true), vols).await;
        // Two writes, the second over the start of the first; nothing pushed before.
        let first = work.join("first");
        let mut want = random_file(&first, 12 << 20, 31);
        ok("nbdcopy", &[first.to_str().unwrap(), p.volumes[0].as_str()]);
        let second = work.join("second");
        let over = random_file(&second, 2 << 20, 32);
        ok(
            "nbdcopy",
            &[second.to_str().unwrap(), p.volumes[0].as_str()],
        );
        want[..2 << 20].copy_from_slice(&over);
        want.resize(16 << 20, 0);

        let mut req = a.host.hand_over_request();
        req.get().set_instance("db.shop-0");
        let reply = req.send().promise.await.unwrap();
        let pushed: Vec<(String, String, String)> = reply
            .get()
            .unwrap()
            .get_pushed()
            .unwrap()
            .iter()
            .map(|v| (s(v.get_volume()), s(v.get_snapshot()), s(v.get_host())))
            .collect();
        assert_eq!(pushed.len(), 1, "{pushed:?}");
        let (volume, snapshot, by) = pushed[0].clone();
        assert_eq!((volume.as_str(), by.as_str()), ("db", "h1"));
        assert!(snapshot.starts_with("pushed-"), "{snapshot}");
        assert!(a.v.log_text().contains("hand over instance db.shop-0"));
        // Released: a second hand-over finds nothing, and the volume is free here.
        let mut again = a.host.hand_over_request();
        again.get().set_instance("db.shop-0");
        let Err(e) = again.send().promise.await else {
            panic!("a second hand-over succeeded")
        };
        let e = reason(e);
        assert!(e.contains("no instance db.shop-0"), "{e}");
        let listed = a.v.tide().json(&["volume", "ls"]);
        assert!(!listed.to_string().contains("db.shop-0"), "{listed}");

        let b = join(&b_dir, &args(&b_dir, "h2", true)).await;
        let moved = prepare_spec(&b.host, "db.shop-0", 0, "shop/web:1", vols, "", true)
            .await
            .unwrap();
        assert_eq!(
            moved.pulled,
            [("db".to_string(), snapshot.clone(), "h1".to_string())]
        );
        let back = work.join("back");
        ok(
            "nbdcopy",
            &[moved.volumes[0].as_str(), back.to_str().unwrap()],
        );
        let got = std::fs::read(&back).unwrap();
        assert_eq!(got.len(), want.len());
        assert!(
            got == want,
            "the next host reads every byte written before the move"
        );

        // No tier: the hand-over is refused and the instance stays prepared.
        let c = join(&c_dir, &args(&c_dir, "h3", false)).await;
        import_tiny_web(&c_dir).await;
        prepare(&c.host, "db.shop-0", 0, "shop/web:1", vols, "")
            .await
            .unwrap();
        for _ in 0..2 {
            let mut req = c.host.hand_over_request();
            req.get().set_instance("db.shop-0");
            let Err(e) = req.send().promise.await else {
                panic!("a host without a tier handed over")
            };
            let e = reason(e);
            assert!(e.contains("no chunk tier") && e.contains("db"), "{e}");
        }
        drop((a, b, c));
    });
}
