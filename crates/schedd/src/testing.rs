//! Test support: [`FakeHost`] serves the `Host` interface in-process and registers over
//! a real socket, recording every call, so tests and `bench-deploy` exercise the real
//! daemon without VMs; and small client helpers that turn replies into plain structs.
//! Not used by the daemon itself.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{Result, anyhow};
use capnp::capability::Rc as CapRc;
use schema::sched_capnp::{host, host_session, scheduler};
use serde::Serialize;

use crate::error::host_reason;
use crate::wire::text;

/// An image a fake host's store holds: NAME:TAG, digest, layers (digest, total bytes)
/// bottom first.
pub type ImageEntry = (String, String, Vec<(String, u64)>);

/// What a fake host reports about itself.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub id: String,
    pub arch: String,
    pub vcpus: u32,
    pub memory: u64,
    pub gpus: u32,
    pub hypervisors: Vec<String>,
    pub labels: Vec<(String, String)>,
    /// Layer digest and the bytes of its chunks present.
    pub layers: Vec<(String, u64)>,
    pub images: Vec<ImageEntry>,
}

impl HostConfig {
    /// An x86_64 host with 64 vCPUs, 256 GiB, no GPU, Firecracker and cloud-hypervisor.
    pub fn new(id: &str) -> HostConfig {
        HostConfig {
            id: id.to_owned(),
            arch: "x86_64".into(),
            vcpus: 64,
            memory: 256 << 30,
            gpus: 0,
            hypervisors: vec!["firecracker".into(), "cloud-hypervisor".into()],
            labels: Vec::new(),
            layers: Vec::new(),
            images: Vec::new(),
        }
    }
}

/// A volume request as a host saw it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VolumeSeen {
    pub name: String,
    pub size: u64,
    pub mode: String,
    pub per_instance: bool,
    pub mount_path: String,
}

/// An `InstanceSpec` as a host saw it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpecSeen {
    pub instance: String,
    pub key: String,
    pub ordinal: u32,
    pub image: String,
    pub hypervisor: String,
    pub vcpus: u32,
    pub memory: u64,
    pub env: Vec<(String, String)>,
    pub volumes: Vec<VolumeSeen>,
    pub warm_vm: String,
}

impl SpecSeen {
    /// A spec with only its instance id and key, for a host that already holds it.
    pub fn named(instance: &str, key: &str) -> SpecSeen {
        SpecSeen {
            instance: instance.to_owned(),
            key: key.to_owned(),
            ordinal: 0,
            image: String::new(),
            hypervisor: String::new(),
            vcpus: 0,
            memory: 0,
            env: Vec::new(),
            volumes: Vec::new(),
            warm_vm: String::new(),
        }
    }

    pub fn env(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Everything a fake host was asked, and what it holds.
#[derive(Debug, Default)]
pub struct Record {
    /// Every prepare call, in order.
    pub prepares: Vec<SpecSeen>,
    /// Instances prepared and not released.
    pub prepared: BTreeMap<String, SpecSeen>,
    pub releases: Vec<String>,
    /// (pool, image) of every bootWarm call.
    pub boots: Vec<(String, String)>,
    /// Warm VMs held: id → (pool, image).
    pub warm: BTreeMap<String, (String, String)>,
    /// When set, prepare fails with this reason.
    pub fail_prepare: Option<String>,
    /// When set, the host drops its connection in the middle of the next prepare.
    pub vanish_in_prepare: bool,
    /// When set, prepare does its work (the instance is held) and never answers.
    pub hang_after_prepare: bool,
    next_vm: u64,
}

struct HostImpl {
    cfg: HostConfig,
    rec: Rc<RefCell<Record>>,
    /// The task running the host's connection (set once connected).
    connection: Rc<RefCell<Option<tokio::task::AbortHandle>>>,
}

fn layers_of(cfg: &HostConfig, image: &str) -> Vec<String> {
    cfg.images
        .iter()
        .find(|(n, d, _)| n == image || d == image)
        .map(|(_, _, l)| l.iter().map(|(d, _)| d.clone()).collect())
        .unwrap_or_default()
}

fn image_digest(cfg: &HostConfig, image: &str) -> String {
    cfg.images
        .iter()
        .find(|(n, d, _)| n == image || d == image)
        .map(|(_, d, _)| d.clone())
        .unwrap_or_else(|| format!("sha256:{:064x}", image.len()))
}

fn set_prepared(
    mut b: schema::sched_capnp::prepared_instance::Builder<'_>,
    host: &str,
    cfg: &HostConfig,
    s: &SpecSeen,
) {
    b.set_instance(&s.instance);
    b.set_root(format!("/run/fake/{host}/{}", s.instance).as_str());
    b.set_image(image_digest(cfg, &s.image).as_str());
    let mut v = b.reborrow().init_volumes(s.volumes.len() as u32);
    for (i, vol) in s.volumes.iter().enumerate() {
        let name = if vol.per_instance {
            format!("{}-{}", vol.name, s.ordinal)
        } else {
            vol.name.clone()
        };
        v.set(i as u32, format!("nbd://{host}/{name}").as_str());
    }
    b.set_hypervisor(&s.hypervisor);
    b.set_warm_vm(&s.warm_vm);
}

impl host::Server for HostImpl {
    async fn inventory(
        self: CapRc<Self>,
        _: host::InventoryParams,
        mut results: host::InventoryResults,
    ) -> Result<(), capnp::Error> {
        set_inventory(results.get().init_inventory(), &self.cfg);
        Ok(())
    }

    async fn prepare(
        self: CapRc<Self>,
        params: host::PrepareParams,
        mut results: host::PrepareResults,
    ) -> Result<(), capnp::Error> {
        let s = params.get()?.get_spec()?;
        let r = s.get_resources()?;
        let mut env = Vec::new();
        for kv in s.get_env()? {
            env.push((text(kv.get_key())?, text(kv.get_value())?));
        }
        let mut volumes = Vec::new();
        for v in s.get_volumes()? {
            volumes.push(VolumeSeen {
                name: text(v.get_name())?,
                size: v.get_size(),
                mode: text(v.get_mode())?,
                per_instance: v.get_per_instance(),
                mount_path: text(v.get_mount_path())?,
            });
        }
        let seen = SpecSeen {
            instance: text(s.get_instance())?,
            key: text(s.get_key())?,
            ordinal: s.get_ordinal(),
            image: text(s.get_image())?,
            hypervisor: text(s.get_hypervisor())?,
            vcpus: r.get_vcpus(),
            memory: r.get_memory(),
            env,
            volumes,
            warm_vm: text(s.get_warm_vm())?,
        };
        let vanish = {
            let mut rec = self.rec.borrow_mut();
            rec.prepares.push(seen.clone());
            std::mem::take(&mut rec.vanish_in_prepare)
        };
        if vanish {
            // The call is in flight on the scheduler's side: cut the link under it.
            if let Some(c) = self.connection.borrow_mut().take() {
                c.abort();
            }
            std::future::pending::<()>().await;
        }
        let (seen, hang) = {
            let mut rec = self.rec.borrow_mut();
            if let Some(why) = &rec.fail_prepare {
                return Err(capnp::Error::failed(format!(
                    "prepare {}: {why}",
                    seen.instance
                )));
            }
            let seen = rec
                .prepared
                .entry(seen.instance.clone())
                .or_insert(seen)
                .clone();
            rec.warm.remove(&seen.warm_vm);
            (seen, rec.hang_after_prepare)
        };
        if hang {
            std::future::pending::<()>().await;
        }
        set_prepared(
            results.get().init_prepared(),
            &self.cfg.id,
            &self.cfg,
            &seen,
        );
        Ok(())
    }

    async fn release(
        self: CapRc<Self>,
        params: host::ReleaseParams,
        _: host::ReleaseResults,
    ) -> Result<(), capnp::Error> {
        let id = text(params.get()?.get_instance())?;
        let mut rec = self.rec.borrow_mut();
        rec.prepared.remove(&id);
        rec.warm.remove(&id);
        rec.releases.push(id);
        Ok(())
    }

    async fn boot_warm(
        self: CapRc<Self>,
        params: host::BootWarmParams,
        mut results: host::BootWarmResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let pool = text(p.get_pool())?;
        let image = text(p.get_image())?;
        let mut rec = self.rec.borrow_mut();
        rec.next_vm += 1;
        let id = format!("{}-warm-{}", self.cfg.id, rec.next_vm);
        rec.boots.push((pool.clone(), image.clone()));
        rec.warm.insert(id.clone(), (pool.clone(), image.clone()));
        let mut b = results.get().init_vm();
        b.set_id(&id);
        b.set_pool(&pool);
        b.set_image(image_digest(&self.cfg, &image).as_str());
        let layers = layers_of(&self.cfg, &image);
        let mut l = b.reborrow().init_layers(layers.len() as u32);
        for (i, d) in layers.iter().enumerate() {
            l.set(i as u32, d.as_str());
        }
        b.set_root(format!("/run/fake/{}/{id}", self.cfg.id).as_str());
        Ok(())
    }

    async fn instances(
        self: CapRc<Self>,
        _: host::InstancesParams,
        mut results: host::InstancesResults,
    ) -> Result<(), capnp::Error> {
        let rec = self.rec.borrow();
        let mut r = results.get();
        let mut l = r.reborrow().init_instances(rec.prepared.len() as u32);
        for (i, s) in rec.prepared.values().enumerate() {
            set_prepared(l.reborrow().get(i as u32), &self.cfg.id, &self.cfg, s);
        }
        let mut w = r.init_warm(rec.warm.len() as u32);
        for (i, (id, (pool, image))) in rec.warm.iter().enumerate() {
            let mut b = w.reborrow().get(i as u32);
            b.set_id(id);
            b.set_pool(pool);
            b.set_image(image);
            b.set_root(format!("/run/fake/{}/{id}", self.cfg.id).as_str());
        }
        Ok(())
    }
}

fn set_inventory(mut b: schema::sched_capnp::inventory::Builder<'_>, c: &HostConfig) {
    b.set_host_id(&c.id);
    b.set_address(format!("10.0.0.{}", c.id.len()).as_str());
    b.set_arch(&c.arch);
    let mut cap = b.reborrow().init_capacity();
    cap.set_vcpus(c.vcpus);
    cap.set_memory(c.memory);
    cap.set_gpus(c.gpus);
    let mut h = b.reborrow().init_hypervisors(c.hypervisors.len() as u32);
    for (i, s) in c.hypervisors.iter().enumerate() {
        h.set(i as u32, s.as_str());
    }
    let mut l = b.reborrow().init_labels(c.labels.len() as u32);
    for (i, (k, v)) in c.labels.iter().enumerate() {
        let mut e = l.reborrow().get(i as u32);
        e.set_key(k);
        e.set_value(v);
    }
    let mut l = b.reborrow().init_layers(c.layers.len() as u32);
    for (i, (d, n)) in c.layers.iter().enumerate() {
        let mut e = l.reborrow().get(i as u32);
        e.set_digest(d);
        e.set_bytes(*n);
    }
    let mut im = b.init_images(c.images.len() as u32);
    for (i, (name, digest, layers)) in c.images.iter().enumerate() {
        let mut e = im.reborrow().get(i as u32);
        e.set_name(name);
        e.set_digest(digest);
        let mut l = e.init_layers(layers.len() as u32);
        for (j, (d, n)) in layers.iter().enumerate() {
            let mut x = l.reborrow().get(j as u32);
            x.set_digest(d);
            x.set_bytes(*n);
        }
    }
}

/// A fake host registered with a scheduler, heartbeating until stopped or dropped.
pub struct FakeHost {
    pub id: String,
    pub rec: Rc<RefCell<Record>>,
    beating: Rc<Cell<bool>>,
    pub scheduler: scheduler::Client,
    connection: schedclient::Connection,
}

impl std::fmt::Debug for FakeHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeHost").field("id", &self.id).finish()
    }
}

impl FakeHost {
    /// Connects to `addr` (its own connection), registers and starts heartbeating.
    /// Must run on a `LocalSet`.
    pub async fn start(addr: &str, cfg: HostConfig) -> Result<FakeHost> {
        Self::start_with(addr, cfg, Rc::new(RefCell::new(Record::default()))).await
    }

    /// [`FakeHost::start`] for a host that already holds what `rec` says (it restarted
    /// with its instances).
    pub async fn start_with(
        addr: &str,
        cfg: HostConfig,
        rec: Rc<RefCell<Record>>,
    ) -> Result<FakeHost> {
        let (scheduler, connection) = crate::net::connect_task(addr).await?;
        let handle = Rc::new(RefCell::new(Some(connection.abort_handle())));
        let host: host::Client = capnp_rpc::new_client(HostImpl {
            cfg: cfg.clone(),
            rec: rec.clone(),
            connection: handle,
        });
        let mut req = scheduler.register_request();
        req.get().set_host(host);
        set_inventory(req.get().init_inventory(), &cfg);
        let reply = req.send().promise.await.map_err(reason)?;
        let session = reply.get().map_err(reason)?.get_session().map_err(reason)?;
        let beating = Rc::new(Cell::new(true));
        tokio::task::spawn_local(heartbeats(session, cfg.clone(), beating.clone()));
        Ok(FakeHost {
            id: cfg.id,
            rec,
            beating,
            scheduler,
            connection,
        })
    }

    /// Stops heartbeating (the connection stays open), as a hung host would.
    pub fn stop_heartbeats(&self) {
        self.beating.set(false);
    }

    /// Drops its connection, as a host that crashed or lost the network would: calls the
    /// scheduler makes on it fail, and it sends no more heartbeats.
    pub fn vanish(&self) {
        self.beating.set(false);
        self.connection.abort();
    }

    /// Ids of the instances it holds prepared.
    pub fn prepared(&self) -> Vec<String> {
        self.rec.borrow().prepared.keys().cloned().collect()
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        self.beating.set(false);
    }
}

async fn heartbeats(session: host_session::Client, cfg: HostConfig, beating: Rc<Cell<bool>>) {
    while beating.get() {
        let mut req = session.heartbeat_request();
        set_inventory(req.get().init_inventory(), &cfg);
        // Unanswered for 2 s: the scheduler is paused or gone (volumed waits 3 s when
        // it has several schedulers to choose from).
        let ms = match tokio::time::timeout(Duration::from_secs(2), req.send().promise).await {
            Ok(Ok(r)) => r.get().map(|r| r.get_interval_ms()).unwrap_or(1000),
            _ => return,
        };
        tokio::time::sleep(Duration::from_millis(u64::from(ms.max(10)))).await;
    }
}

/// Runs `f` on a current-thread runtime with a `LocalSet`, as capnp-rpc needs.
pub fn local<F: std::future::Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    tokio::task::LocalSet::new().block_on(&rt, f);
}

/// A wire error as its one-line reason.
pub fn reason(e: capnp::Error) -> anyhow::Error {
    anyhow!("{}", host_reason(&e))
}

// ---- Client helpers: replies as plain structs ----

#[derive(Debug, Clone, Serialize)]
pub struct InstanceOut {
    pub id: String,
    pub key: String,
    pub stack: String,
    pub variant: String,
    pub service: String,
    pub host: String,
    pub hypervisor: String,
    pub state: String,
    pub root: String,
    pub volumes: Vec<String>,
    pub warm_vm: String,
    pub image: String,
}

pub fn instance_out(
    r: schema::sched_capnp::instance_info::Reader<'_>,
) -> capnp::Result<InstanceOut> {
    Ok(InstanceOut {
        id: text(r.get_id())?,
        key: text(r.get_key())?,
        stack: text(r.get_stack())?,
        variant: text(r.get_variant())?,
        service: text(r.get_service())?,
        host: text(r.get_host())?,
        hypervisor: text(r.get_hypervisor())?,
        state: text(r.get_state())?,
        root: text(r.get_root())?,
        volumes: r
            .get_volumes()?
            .iter()
            .map(text)
            .collect::<capnp::Result<_>>()?,
        warm_vm: text(r.get_warm_vm())?,
        image: text(r.get_image())?,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct PlacedOut {
    pub instance: InstanceOut,
    pub reasons: Vec<String>,
    pub fetch_bytes: u64,
    /// (host, eligible, reason, score)
    pub verdicts: Vec<(String, bool, String, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeployOut {
    pub stack: String,
    pub variant: String,
    /// (service, hostname, sharing, instancesOf)
    pub services: Vec<(String, String, String, String)>,
    pub placed: Vec<PlacedOut>,
    pub entrypoint: String,
}

pub fn deploy_out(r: schema::sched_capnp::deploy_report::Reader<'_>) -> capnp::Result<DeployOut> {
    let mut services = Vec::new();
    for s in r.get_services()? {
        services.push((
            text(s.get_service())?,
            text(s.get_hostname())?,
            text(s.get_sharing())?,
            text(s.get_instances_of())?,
        ));
    }
    let mut placed = Vec::new();
    for p in r.get_placed()? {
        let mut verdicts = Vec::new();
        for v in p.get_verdicts()? {
            verdicts.push((
                text(v.get_host())?,
                v.get_eligible(),
                text(v.get_reason())?,
                v.get_score(),
            ));
        }
        placed.push(PlacedOut {
            instance: instance_out(p.get_instance()?)?,
            reasons: p
                .get_reasons()?
                .iter()
                .map(text)
                .collect::<capnp::Result<_>>()?,
            fetch_bytes: p.get_fetch_bytes(),
            verdicts,
        });
    }
    Ok(DeployOut {
        stack: text(r.get_stack())?,
        variant: text(r.get_variant())?,
        services,
        placed,
        entrypoint: text(r.get_entrypoint())?,
    })
}

/// `Scheduler.deploy`; the error is the daemon's one-line reason.
pub async fn deploy(
    s: &scheduler::Client,
    file: &str,
    source: &str,
    variant: &str,
    explain: bool,
    hypervisor: &str,
) -> Result<DeployOut> {
    let mut req = s.deploy_request();
    let mut p = req.get();
    p.set_file(file);
    p.set_source(source);
    p.set_variant(variant);
    p.set_explain(explain);
    p.set_hypervisor(hypervisor);
    let reply = req.send().promise.await.map_err(reason)?;
    deploy_out(reply.get().map_err(reason)?.get_report().map_err(reason)?).map_err(reason)
}

pub async fn instances(s: &scheduler::Client) -> Result<Vec<InstanceOut>> {
    let reply = s.instances_request().send().promise.await.map_err(reason)?;
    reply
        .get()
        .map_err(reason)?
        .get_instances()
        .map_err(reason)?
        .iter()
        .map(|i| instance_out(i).map_err(reason))
        .collect()
}

/// `Scheduler.resolve`: the serving instance and whether resolving started it.
pub async fn resolve(s: &scheduler::Client, hostname: &str) -> Result<(InstanceOut, bool)> {
    let mut req = s.resolve_request();
    req.get().set_hostname(hostname);
    let reply = req.send().promise.await.map_err(reason)?;
    let r = reply.get().map_err(reason)?.get_route().map_err(reason)?;
    Ok((
        instance_out(r.get_instance().map_err(reason)?).map_err(reason)?,
        r.get_started(),
    ))
}

pub async fn version(s: &scheduler::Client) -> Result<u32> {
    let reply = s.version_request().send().promise.await.map_err(reason)?;
    Ok(reply.get().map_err(reason)?.get_version())
}

/// (name, warm, min, max) of every pool.
pub async fn pools(s: &scheduler::Client) -> Result<Vec<(String, u32, u32, u32)>> {
    let reply = s.pools_request().send().promise.await.map_err(reason)?;
    let mut out = Vec::new();
    for p in reply.get().map_err(reason)?.get_pools().map_err(reason)? {
        out.push((
            text(p.get_name()).map_err(reason)?,
            p.get_warm(),
            p.get_min(),
            p.get_max(),
        ));
    }
    Ok(out)
}

pub async fn create_pool(
    s: &scheduler::Client,
    name: &str,
    layers: &[&str],
    image: &str,
    min: u32,
    max: u32,
) -> Result<()> {
    let mut req = s.create_pool_request();
    let mut p = req.get();
    p.set_name(name);
    let mut l = p.reborrow().init_layers(layers.len() as u32);
    for (i, d) in layers.iter().enumerate() {
        l.set(i as u32, *d);
    }
    p.set_image(image);
    p.set_min(min);
    p.set_max(max);
    req.send().promise.await.map_err(reason)?;
    Ok(())
}

/// (domain, target) of every alias.
pub async fn aliases(s: &scheduler::Client) -> Result<Vec<(String, String)>> {
    let reply = s.aliases_request().send().promise.await.map_err(reason)?;
    let mut out = Vec::new();
    for a in reply.get().map_err(reason)?.get_aliases().map_err(reason)? {
        out.push((
            text(a.get_domain()).map_err(reason)?,
            text(a.get_target()).map_err(reason)?,
        ));
    }
    Ok(out)
}

/// Names of the deployed stacks.
pub async fn stacks(s: &scheduler::Client) -> Result<Vec<String>> {
    let reply = s.stacks_request().send().promise.await.map_err(reason)?;
    let mut out = Vec::new();
    for st in reply.get().map_err(reason)?.get_stacks().map_err(reason)? {
        out.push(text(st.get_name()).map_err(reason)?);
    }
    Ok(out)
}

/// (host id, up) of every host.
pub async fn hosts(s: &scheduler::Client) -> Result<Vec<(String, bool)>> {
    let reply = s.hosts_request().send().promise.await.map_err(reason)?;
    let mut out = Vec::new();
    for h in reply.get().map_err(reason)?.get_hosts().map_err(reason)? {
        let inv = h.get_inventory().map_err(reason)?;
        out.push((text(inv.get_host_id()).map_err(reason)?, h.get_up()));
    }
    Ok(out)
}

/// A stack's `Stack` capability.
pub async fn stack(s: &scheduler::Client, name: &str) -> schema::sched_capnp::stack::Client {
    let mut req = s.stack_request();
    req.get().set_name(name);
    req.send().pipeline.get_stack()
}

/// A fake host that follows the leader among several schedulers, as volumed's link
/// does: it finds the one that leads, registers, heartbeats, and when that ends (the
/// leader died, or stepped down and refuses heartbeats) finds the leader again every
/// 100 ms. What it holds (`rec`) survives the moves, so each new leader reconciles it.
pub struct FollowingHost {
    pub id: String,
    pub rec: Rc<RefCell<Record>>,
    /// Every registration: when it was accepted and with which scheduler.
    pub registrations: Rc<RefCell<Vec<(std::time::Instant, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FollowingHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FollowingHost")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl FollowingHost {
    /// Starts following `addrs` (`ADDR,ADDR,...`). Must run on a `LocalSet`.
    pub fn start(addrs: &str, cfg: HostConfig) -> Result<FollowingHost> {
        let list = schedclient::parse_list(addrs).map_err(|e| anyhow!("{e}"))?;
        let rec = Rc::new(RefCell::new(Record::default()));
        let registrations = Rc::new(RefCell::new(Vec::new()));
        let task = tokio::task::spawn_local(follow(
            list,
            cfg.clone(),
            rec.clone(),
            registrations.clone(),
        ));
        Ok(FollowingHost {
            id: cfg.id,
            rec,
            registrations,
            task,
        })
    }

    /// Ids of the instances it holds prepared.
    pub fn prepared(&self) -> Vec<String> {
        self.rec.borrow().prepared.keys().cloned().collect()
    }

    /// The scheduler it last registered with and when.
    pub fn last_registration(&self) -> Option<(std::time::Instant, String)> {
        self.registrations.borrow().last().cloned()
    }
}

impl Drop for FollowingHost {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn follow(
    addrs: Vec<schedclient::Addr>,
    cfg: HostConfig,
    rec: Rc<RefCell<Record>>,
    registrations: Rc<RefCell<Vec<(std::time::Instant, String)>>>,
) {
    loop {
        if let Ok(mut found) = schedclient::find(&addrs, false).await {
            let handle = Rc::new(RefCell::new(Some(found.connection.abort_handle())));
            let host: host::Client = capnp_rpc::new_client(HostImpl {
                cfg: cfg.clone(),
                rec: rec.clone(),
                connection: handle,
            });
            let mut req = found.client.register_request();
            req.get().set_host(host);
            set_inventory(req.get().init_inventory(), &cfg);
            let session = match req.send().promise.await {
                Ok(r) => r.get().and_then(|r| r.get_session()).ok(),
                Err(_) => None,
            };
            if let Some(session) = session {
                registrations
                    .borrow_mut()
                    .push((std::time::Instant::now(), found.addr.to_string()));
                // Until a heartbeat fails or the connection ends (the scheduler died:
                // noticed at once, as volumed's link does, not at the next heartbeat).
                tokio::select! {
                    () = heartbeats(session, cfg.clone(), Rc::new(Cell::new(true))) => {}
                    _ = &mut found.connection => {}
                }
            }
            found.connection.abort();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A local etcd cluster for tests and benchmarks: `etcd` from Debian (`etcd-server`),
/// each member with its own loopback ports and data directory under `dir`. Dropping
/// it kills the members.
#[derive(Debug)]
pub struct EtcdCluster {
    pub dir: std::path::PathBuf,
    pub members: Vec<EtcdMember>,
}

/// One member of an [`EtcdCluster`].
#[derive(Debug)]
pub struct EtcdMember {
    pub name: String,
    pub client_url: String,
    pub peer_url: String,
    pub child: Option<std::process::Child>,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl EtcdCluster {
    /// Starts `n` members under `dir` and waits until the cluster answers a write.
    pub async fn start(dir: &std::path::Path, n: usize) -> Result<EtcdCluster> {
        let mut members = Vec::new();
        for i in 0..n {
            members.push(EtcdMember {
                name: format!("m{i}"),
                client_url: format!("http://127.0.0.1:{}", free_port()?),
                peer_url: format!("http://127.0.0.1:{}", free_port()?),
                child: None,
            });
        }
        let initial: Vec<String> = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect();
        let initial = initial.join(",");
        for m in &mut members {
            let data = dir.join(&m.name);
            std::fs::create_dir_all(&data)?;
            let log = std::fs::File::create(dir.join(format!("{}.log", m.name)))?;
            let child = std::process::Command::new("etcd")
                .arg("--name")
                .arg(&m.name)
                .arg("--data-dir")
                .arg(&data)
                .args(["--listen-client-urls", &m.client_url])
                .args(["--advertise-client-urls", &m.client_url])
                .args(["--listen-peer-urls", &m.peer_url])
                .args(["--initial-advertise-peer-urls", &m.peer_url])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "tidedge-test"])
                .args(["--logger", "zap", "--log-level", "warn"])
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|e| anyhow!("starting etcd (Debian's etcd-server): {e}"))?;
            m.child = Some(child);
        }
        let c = EtcdCluster {
            dir: dir.to_owned(),
            members,
        };
        c.wait_ready(Duration::from_secs(30)).await?;
        Ok(c)
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The client URLs as `--etcd` takes them.
    pub fn endpoints_arg(&self) -> String {
        self.endpoints().join(",")
    }

    /// A client of the cluster's running members.
    pub async fn client(&self) -> Result<etcd_client::Client> {
        let live: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client_url.clone())
            .collect();
        Ok(etcd_client::Client::connect(
            live,
            Some(
                etcd_client::ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(2))
                    .with_timeout(Duration::from_secs(5)),
            ),
        )
        .await?)
    }

    /// Waits until a write through any member is committed.
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        let start = std::time::Instant::now();
        loop {
            let r = async {
                let mut c = self.client().await?;
                c.put("/tidedge-test/ready", "1", None).await?;
                anyhow::Ok(())
            }
            .await;
            match r {
                Ok(()) => return Ok(()),
                Err(e) if start.elapsed() > limit => {
                    return Err(anyhow!("etcd did not come up in {limit:?}: {e:#}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
