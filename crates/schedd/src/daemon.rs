//! The scheduler's state and operations. [`Daemon`] holds the catalog (sched's
//! [`Catalog`]), the cluster view ([`Cluster`]), placed instances, hosts, pools and warm
//! VMs, and persists every change to the [`Store`] (see [`crate::state`]).
//!
//! Operations that call hosts are `async` functions over [`Shared`]: they plan with the
//! state borrowed (placements are committed into the cluster so concurrent plans see
//! them), release the borrow, await the hosts, then record the outcome or undo the plan.
//! Operations that change the catalog or placements hold [`Shared::op`] from start to
//! end, so a deploy's rollback never undoes someone else's change. Heartbeats take no
//! lock.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use sched::model::{Catalog, EnvVar, ResolvedService, Route, Sharing, entry_hostname};
use sched::placement::{
    Action, Capacity, Cluster, HostInventory, ImageLayer, ImageSpec, Placement, Policy, PoolBoot,
    ScoreBreakdown, Verdict, Workload,
};
use sched::stack::{
    AccessMode, HostSelector, Pool, PoolLayers, Resources, Stack, StackFile, parse,
};
use sched::types::{ByteSize, Digest, Hypervisor, ImageRef, Name};
use schema::sched_capnp::host;

use crate::error::{Error, Result};
use crate::hostcall::{self, WarmReport};
use crate::log;
use crate::routes::Routes;
use crate::state::{
    self, Batch, HostRec, ImageRec, InstState, InstanceRec, PoolRec, Prepared, PulledRec, Spec,
    StoredFile, VolumeReq, WarmRec,
};
use crate::store::Store;

/// A host as the daemon knows it: its last report and, while connected, its capability.
pub struct HostEntry {
    pub rec: HostRec,
    pub client: Option<host::Client>,
    /// The registration this entry belongs to; a newer one replaces it.
    pub session: u64,
    pub last_contact: Instant,
}

impl std::fmt::Debug for HostEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostEntry")
            .field("rec", &self.rec)
            .field("connected", &self.client.is_some())
            .field("session", &self.session)
            .finish()
    }
}

/// Everything the scheduler knows. See the module doc.
pub struct Daemon {
    store: Rc<Store>,
    /// A follower's view: loaded from etcd, its hosts connected to the leader (an
    /// instance shows the state the leader recorded, not "pending").
    follower: bool,
    /// Signalled by every state write (see [`crate::routes`]).
    changed: Rc<tokio::sync::Notify>,
    pub catalog: Catalog,
    pub files: BTreeMap<String, StoredFile>,
    pub cluster: Cluster,
    pub instances: BTreeMap<String, InstanceRec>,
    pub hosts: BTreeMap<String, HostEntry>,
    pub pools: BTreeMap<String, PoolRec>,
    /// Warm VMs by the id their host gave them, with the cluster's id for them.
    pub warm: BTreeMap<String, (WarmRec, u64)>,
    /// Instances being drained before a scale-in stops them: out of the routes, still
    /// running (in memory: a restarted scheduler has no drain under way).
    pub draining: std::collections::BTreeSet<String>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("stacks", &self.files.keys().collect::<Vec<_>>())
            .field("instances", &self.instances.len())
            .field("hosts", &self.hosts.len())
            .field("pools", &self.pools.len())
            .field("warm", &self.warm.len())
            .finish_non_exhaustive()
    }
}

/// Whether this scheduler may change the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Its state is a local directory: the only scheduler, always leading.
    Local,
    /// It holds the etcd leader key.
    Leader,
    /// Another scheduler leads (at `leader`, "" while none is elected).
    Follower { leader: String },
}

/// What every capability of one daemon shares.
pub struct Shared {
    pub state: RefCell<Daemon>,
    pub store: Rc<Store>,
    pub role: RefCell<Role>,
    /// Where clients reach this scheduler (the leader key names it).
    pub advertise: String,
    /// Held by every operation that changes the catalog or placements.
    pub op: tokio::sync::Mutex<()>,
    /// A host that sends no heartbeat for this long is marked down.
    pub host_timeout: Duration,
    next_session: Cell<u64>,
    /// The route table front ends watch.
    pub routes: Routes,
    /// Front ends' load reports and the autoscaler's state.
    pub autoscale: crate::autoscale::Autoscaler,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("host_timeout", &self.host_timeout)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub fn new(
        daemon: Daemon,
        host_timeout: Duration,
        role: Role,
        advertise: String,
    ) -> Rc<Shared> {
        let routes = Routes::new(daemon.changed.clone());
        Rc::new(Shared {
            routes,
            autoscale: Default::default(),
            store: daemon.store.clone(),
            role: RefCell::new(role),
            advertise,
            state: RefCell::new(daemon),
            op: tokio::sync::Mutex::new(()),
            host_timeout,
            next_session: Cell::new(1),
        })
    }
}

impl Shared {
    /// Refuses a change unless this scheduler leads, naming the leader.
    pub fn lead(&self) -> Result<()> {
        match &*self.role.borrow() {
            Role::Local | Role::Leader => Ok(()),
            Role::Follower { leader } => Err(Error::NotLeader(leader.clone())),
        }
    }

    pub fn leading(&self) -> bool {
        self.lead().is_ok()
    }

    pub fn set_role(&self, role: Role) {
        let mut r = self.role.borrow_mut();
        if *r != role {
            log!("role: {role:?}");
            *r = role;
        }
    }

    /// Replaces the view with one built from `records` (a follower's reload, a new
    /// leader's start). Hosts' capabilities are dropped: a new leader waits for them to
    /// register again, as after a restart.
    pub fn install(&self, records: &state::Records, follower: bool) -> Result<()> {
        let changed = self.state.borrow().changed.clone();
        let mut d = Daemon::load(self.store.clone(), records, changed)?;
        d.set_follower(follower);
        *self.state.borrow_mut() = d;
        self.state.borrow().changed.notify_one();
        Ok(())
    }

    /// Waits until every change made so far is durable (see [`Store::durable`]).
    pub async fn durable(&self) -> Result<()> {
        self.store.durable().await
    }
}

// ---- Views: what calls return, before the wire edge writes them. ----

#[derive(Debug, Clone)]
pub struct InstanceView {
    pub rec: InstanceRec,
    pub address: String,
    pub state: &'static str,
}

#[derive(Debug, Clone)]
pub struct VerdictView {
    pub host: String,
    pub eligible: bool,
    pub reason: String,
    pub score: f64,
}

#[derive(Debug, Clone)]
pub struct PlacedReport {
    pub instance: InstanceView,
    pub reasons: Vec<String>,
    pub fetch_bytes: u64,
    pub verdicts: Vec<VerdictView>,
}

#[derive(Debug, Clone)]
pub struct ServiceReport {
    pub service: String,
    pub hostname: String,
    pub sharing: &'static str,
    pub instances_of: String,
    pub env: Vec<EnvVar>,
}

#[derive(Debug, Clone, Default)]
pub struct DeployReport {
    pub stack: String,
    pub variant: String,
    pub services: Vec<ServiceReport>,
    pub placed: Vec<PlacedReport>,
    pub entrypoint: String,
}

#[derive(Debug, Clone)]
pub struct StackView {
    pub name: String,
    pub domain: String,
    pub services: Vec<String>,
    pub variants: Vec<String>,
    pub instances: u32,
}

#[derive(Debug, Clone)]
pub struct HostView {
    pub rec: HostRec,
    pub used: Capacity,
    pub instances: u32,
    pub warm: u32,
}

#[derive(Debug, Clone)]
pub struct PoolView {
    pub name: String,
    pub layers: Vec<String>,
    pub min: u32,
    pub max: u32,
    pub warm: u32,
}

#[derive(Debug, Clone)]
pub struct RouteView {
    pub hostname: String,
    pub route: Route,
    pub instance: InstanceView,
    pub started: bool,
}

/// One instance a plan placed (committed in the cluster, not yet prepared).
struct Planned {
    rec: InstanceRec,
    client: host::Client,
    reasons: Vec<String>,
    fetch_bytes: u64,
    verdicts: Vec<VerdictView>,
    /// The services it depends on, with the key of the instances serving each.
    links_to: Vec<(String, String)>,
}

#[derive(Default)]
struct DeployPlan {
    planned: Vec<Planned>,
    /// Instances the deploy replaces (released once the new ones are ready).
    stale: Vec<String>,
    /// Warm VMs the plan converts (gone from the cluster and the records either way).
    converted: Vec<String>,
    report: DeployReport,
}

/// The placement of an instance that already runs where its record says.
fn where_it_is(rec: &InstanceRec) -> Placement {
    Placement {
        host: rec.host.clone(),
        hypervisor: rec.spec.hypervisor,
        action: Action::ColdBoot,
        score: ScoreBreakdown::default(),
        fetch_bytes: 0,
    }
}

/// Where a lost instance that `host` reports running (`p`) is: there, on the hypervisor
/// the host recorded for it.
fn running_here(rec: &InstanceRec, host: &str, p: &Prepared) -> Placement {
    let mut at = where_it_is(rec);
    at.host = host.to_owned();
    if let Some(h) = Hypervisor::ALL
        .into_iter()
        .find(|h| h.as_str() == p.hypervisor)
    {
        at.hypervisor = h;
    }
    at
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A byte count as stack files write sizes ("512M", "1.5G").
fn human(n: u64) -> String {
    ByteSize(n).to_string()
}

fn mode_str(m: AccessMode) -> &'static str {
    match m {
        AccessMode::Rwo => "rwo",
        AccessMode::Rwx => "rwx",
        AccessMode::Rox => "rox",
    }
}

fn sharing_str(s: Sharing) -> &'static str {
    match s {
        Sharing::Own => "own",
        Sharing::Shared => "shared",
        Sharing::Unique => "unique",
    }
}

fn write(d: &Daemon, batch: Batch) {
    d.store.write(batch);
    d.changed.notify_one();
}

impl Daemon {
    /// Takes `ids` out of the routes (or puts them back) without a state write: the
    /// route table is recomputed and pushed as after one.
    pub fn set_draining(&mut self, ids: &[String], on: bool) {
        for id in ids {
            if on {
                self.draining.insert(id.clone());
            } else {
                self.draining.remove(id);
            }
        }
        self.changed.notify_one();
    }

    /// Rebuilds the catalog and cluster from `records`, later changes going to `store`.
    /// Hosts start down until they register again; records that no longer fit (a
    /// variant whose stack is gone) are logged and skipped.
    pub fn load(
        store: Rc<Store>,
        records: &state::Records,
        changed: Rc<tokio::sync::Notify>,
    ) -> Result<Daemon> {
        let mut d = Daemon {
            store,
            follower: false,
            changed,
            catalog: Catalog::new(),
            files: BTreeMap::new(),
            cluster: Cluster::new(Policy::default()),
            instances: BTreeMap::new(),
            hosts: BTreeMap::new(),
            pools: BTreeMap::new(),
            warm: BTreeMap::new(),
            draining: Default::default(),
        };
        for (name, f) in state::scan::<StoredFile>(records, "stack/")? {
            match parse(&f.file, &f.source)
                .map_err(Error::from)
                .and_then(|p| {
                    let s = p
                        .stack
                        .ok_or_else(|| Error::BadRequest("no [stack]".into()))?;
                    Ok(d.catalog.put_stack(s)?)
                }) {
                Ok(()) => {
                    d.files.insert(name, f);
                }
                Err(e) => log!("skipping stored stack {name}: {e}"),
            }
        }
        for (key, v) in state::scan::<state::StoredVariant>(records, "variant/")? {
            if let Err(e) = d.catalog.put_variant(v) {
                log!("skipping stored variant {key}: {e}");
            }
        }
        for (domain, target) in state::scan::<String>(records, "alias/")? {
            if let Err(e) = d.catalog.put_alias(&domain, &target) {
                log!("skipping stored alias {domain}: {e}");
            }
        }
        let now = Instant::now();
        for (id, rec) in state::scan::<HostRec>(records, "host/")? {
            d.cluster.upsert_host(rec.inventory.clone());
            d.cluster.mark_down(&id)?;
            d.hosts.insert(
                id,
                HostEntry {
                    rec,
                    client: None,
                    session: 0,
                    last_contact: now,
                },
            );
        }
        for (name, rec) in state::scan::<PoolRec>(records, "pool/")? {
            if let Err(e) = d.cluster.add_pool(rec.pool.clone(), rec.image.clone()) {
                log!("skipping stored pool {name}: {e}");
                continue;
            }
            d.pools.insert(name, rec);
        }
        for (id, rec) in state::scan::<InstanceRec>(records, "instance/")? {
            if rec.state != InstState::Lost
                && let Err(e) = d.cluster.commit(&id, &rec.workload, &where_it_is(&rec))
            {
                log!("instance {id}: {e}");
            }
            d.instances.insert(id, rec);
        }
        for (id, rec) in state::scan::<WarmRec>(records, "warm/")? {
            match d.cluster.add_warm_vm(&rec.pool, &rec.host, rec.hypervisor) {
                Ok(vm) => {
                    d.warm.insert(id, (rec, vm));
                }
                Err(e) => log!("skipping stored warm VM {id}: {e}"),
            }
        }
        Ok(d)
    }

    /// Marks the view as a follower's (see [`Daemon::view`]).
    pub fn set_follower(&mut self, on: bool) {
        self.follower = on;
    }

    /// How many records the view holds (stacks, instances, hosts, pools, warm VMs).
    pub fn record_count(&self) -> usize {
        self.files.len()
            + self.instances.len()
            + self.hosts.len()
            + self.pools.len()
            + self.warm.len()
    }

    fn client(&self, host: &str) -> Option<host::Client> {
        self.hosts.get(host).and_then(|h| h.client.clone())
    }

    fn address(&self, host: &str) -> String {
        self.hosts
            .get(host)
            .map(|h| h.rec.inventory.address.clone())
            .unwrap_or_default()
    }

    pub fn view(&self, rec: &InstanceRec) -> InstanceView {
        let connected = if self.follower {
            self.hosts.get(&rec.host).is_some_and(|h| h.rec.up)
        } else {
            self.client(&rec.host).is_some()
        };
        let state = match rec.state {
            InstState::Lost => "lost",
            _ if !connected => "pending",
            // Placed on a new host that has not answered its `prepare` yet.
            InstState::Moved if rec.prepared.root.is_empty() => "moving",
            s => s.as_str(),
        };
        InstanceView {
            rec: rec.clone(),
            address: self.address(&rec.host),
            state,
        }
    }

    /// The image's layers, from the first host whose store reports it (by NAME:TAG or
    /// digest); no layers when no host has it (placement then sees no locality).
    fn image_spec(&self, image: &ImageRef) -> ImageSpec {
        let want = image.to_string();
        self.hosts
            .values()
            .flat_map(|h| h.rec.images.iter())
            .find(|i| i.name == want || i.digest == want)
            .map(ImageRec::spec)
            .unwrap_or_default()
    }

    fn find_image(&self, pred: impl Fn(&ImageRec) -> bool) -> Option<&ImageRec> {
        self.hosts
            .values()
            .flat_map(|h| h.rec.images.iter())
            .find(|i| pred(i))
    }

    /// The catalog changes a file makes; returns the stack it concerns and, for a
    /// variant file, the variant.
    fn apply_file(&mut self, f: &StackFile, file: &str) -> Result<(String, Option<String>)> {
        if let Some(s) = &f.stack {
            self.catalog.put_stack(s.clone())?;
        }
        for v in &f.variants {
            self.catalog.put_variant(v.clone())?;
        }
        for a in &f.aliases {
            self.catalog.put_alias(&a.domain, &a.target)?;
        }
        match (&f.stack, f.variants.first()) {
            (Some(s), _) => Ok((s.name.to_string(), None)),
            (None, Some(v)) => Ok((v.parent.to_string(), Some(v.name.to_string()))),
            (None, None) => Err(Error::BadRequest(format!(
                "{file}: declares neither a [stack] nor a [variant] to deploy"
            ))),
        }
    }

    /// What identifies what an instance runs: a change means it is replaced.
    fn fingerprint(spec: &Spec, hv_request: Option<Hypervisor>) -> String {
        // Links are left out: they follow where the dependencies run.
        let runs = (&spec.port, &spec.command, &spec.args);
        let runs = if runs == (&None, &None, &None) {
            // What records of an earlier version hashed.
            String::new()
        } else {
            serde_json::to_string(&runs).expect("serializable")
        };
        serde_json::to_string(&(
            &spec.image,
            &spec.env,
            &spec.resources,
            &spec.volumes,
            hv_request,
        ))
        .map(|f| {
            if runs.is_empty() {
                f
            } else {
                format!("{f}{runs}")
            }
        })
        .expect("serializable")
    }

    fn build_spec(stack: &Stack, rs: &ResolvedService, id: &str, ordinal: u32) -> Spec {
        let svc = &rs.service;
        Spec {
            instance: id.to_owned(),
            key: rs.instances_of.clone(),
            ordinal,
            image: svc.image.to_string(),
            hypervisor: Hypervisor::Firecracker,
            resources: svc.resources,
            env: svc
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            volumes: svc
                .mounts
                .iter()
                .filter_map(|m| {
                    let v = stack.volumes.get(&m.volume)?;
                    Some(VolumeReq {
                        name: host_volume_name(stack, rs, &m.volume, v.mode),
                        size: v.size.0,
                        mode: mode_str(v.mode).to_owned(),
                        per_instance: v.per_instance,
                        mount_path: m.path.clone(),
                    })
                })
                .collect(),
            warm_vm: String::new(),
            port: svc.port,
            command: svc.command.clone(),
            args: svc.args.clone(),
            links: Vec::new(),
            moved: false,
        }
    }

    /// Places one instance of `rs` and commits it in the cluster.
    #[allow(clippy::too_many_arguments)]
    fn plan_one(
        &mut self,
        stack: &Stack,
        variant: Option<&Name>,
        rs: &ResolvedService,
        hv_request: Option<Hypervisor>,
        explain: bool,
        taken: &mut BTreeSet<String>,
        converted: &mut Vec<String>,
    ) -> Result<Planned> {
        let key = rs.instances_of.clone();
        let ordinal = (0u32..)
            .find(|o| {
                let id = format!("{key}-{o}");
                !self.instances.contains_key(&id) && !taken.contains(&id)
            })
            .expect("a free ordinal");
        let id = format!("{key}-{ordinal}");
        let mut spec = Self::build_spec(stack, rs, &id, ordinal);
        let fingerprint = Self::fingerprint(&spec, hv_request);
        let image = self.image_spec(&rs.service.image);
        let image_bytes = image.bytes();
        let mut w = Workload::for_service(key.clone(), &rs.service, image);
        w.hypervisor = hv_request;
        let (decision, verdicts) = if explain {
            let e = self.cluster.explain(&w);
            let verdicts = e
                .hosts
                .into_iter()
                .map(|(host, v)| match v {
                    Verdict::Filtered(r) => VerdictView {
                        host,
                        eligible: false,
                        reason: r.to_string(),
                        score: 0.0,
                    },
                    Verdict::Scored { hypervisor, score } => VerdictView {
                        host,
                        eligible: true,
                        reason: format!(
                            "{} of the image local (locality {:.2}), {} replicas already there, load {:.0}% after, {hypervisor}{}",
                            human(score.local_bytes),
                            score.locality,
                            score.replicas,
                            score.load * 100.0,
                            if score.emulated { ", emulated" } else { "" }
                        ),
                        score: score.total,
                    },
                })
                .collect();
            (e.decision, verdicts)
        } else {
            (self.cluster.place(&w), Vec::new())
        };
        let p = decision?;
        let Some(client) = self.client(&p.host) else {
            return Err(Error::Host {
                host: p.host.clone(),
                op: format!("prepare {id}"),
                reason: "not connected".into(),
            });
        };
        self.cluster.commit(&id, &w, &p)?;
        taken.insert(id.clone());
        spec.hypervisor = p.hypervisor;
        let mut reasons = vec![format!(
            "{} of the image's {} already on {} (locality {:.2})",
            human(p.score.local_bytes),
            human(image_bytes),
            p.host,
            p.score.locality
        )];
        reasons.push(format!(
            "{} other replicas of {key} on that host; load {:.0}% after placing",
            p.score.replicas,
            p.score.load * 100.0
        ));
        if let Action::Convert {
            vm,
            pool,
            prefix_layers,
        } = &p.action
        {
            let found = self
                .warm
                .iter()
                .find(|(_, (_, v))| v == vm)
                .map(|(k, _)| k.clone());
            if let Some(wid) = found {
                self.warm.remove(&wid);
                reasons.push(format!(
                    "converts warm VM {wid} of pool {pool} ({prefix_layers} layers already booted)"
                ));
                spec.warm_vm = wid.clone();
                converted.push(wid);
            }
        }
        reasons.push(format!(
            "hypervisor {}{}",
            p.hypervisor,
            if hv_request.is_some() {
                " (requested)"
            } else {
                " (lowest priority eligible)"
            }
        ));
        let rec = InstanceRec {
            id: id.clone(),
            key,
            stack: stack.name.clone(),
            variant: if rs.sharing == Sharing::Unique {
                variant.cloned()
            } else {
                None
            },
            service: rs.service.name.clone(),
            host: p.host.clone(),
            state: InstState::Ready,
            spec,
            workload: w,
            fingerprint,
            prepared: Prepared::default(),
        };
        Ok(Planned {
            rec,
            client,
            reasons,
            fetch_bytes: p.fetch_bytes,
            verdicts,
            links_to: Vec::new(),
        })
    }

    /// Undoes a plan's commits in the cluster.
    fn undo(&mut self, planned: &[Planned]) {
        for p in planned {
            let _ = self.cluster.remove_instance(&p.rec.id);
        }
    }

    fn plan_deploy(
        &mut self,
        stack: &str,
        variant: Option<&str>,
        hv: Option<Hypervisor>,
        explain: bool,
    ) -> Result<DeployPlan> {
        let mut plan = DeployPlan::default();
        match self.plan_deploy_into(&mut plan, stack, variant, hv, explain) {
            Ok(()) => Ok(plan),
            Err(e) => {
                self.undo(&plan.planned);
                Err(e)
            }
        }
    }

    fn plan_deploy_into(
        &mut self,
        plan: &mut DeployPlan,
        stack: &str,
        variant: Option<&str>,
        hv: Option<Hypervisor>,
        explain: bool,
    ) -> Result<()> {
        let s = self
            .catalog
            .stack(stack)
            .cloned()
            .ok_or_else(|| Error::BadRequest(format!("no stack {stack:?}")))?;
        let target = self.catalog.deployment(stack, variant)?;
        let mut deployments = Vec::new();
        if variant.is_some() {
            // The parent's instances serve the variant's SHARED services: make sure
            // they run (nothing to do when the stack is already deployed).
            deployments.push((self.catalog.deployment(stack, None)?, false));
        }
        deployments.push((target.clone(), true));
        plan.report.stack = s.name.to_string();
        plan.report.variant = variant.unwrap_or_default().to_owned();
        plan.report.entrypoint = entry_hostname(&s, target.variant.as_ref());
        for rs in &target.services {
            plan.report.services.push(ServiceReport {
                service: rs.service.name.to_string(),
                hostname: rs.hostname.clone(),
                sharing: sharing_str(rs.sharing),
                instances_of: rs.instances_of.clone(),
                env: self
                    .catalog
                    .effective_env(stack, variant, rs.service.name.as_str())?,
            });
        }
        let mut taken = BTreeSet::new();
        for (dep, is_target) in deployments {
            let running_keys: BTreeSet<String> =
                dep.running().map(|rs| rs.instances_of.clone()).collect();
            if is_target {
                // Services no longer in the stack (or no longer overridden).
                for r in self.instances.values() {
                    let same = r.stack == dep.stack && r.variant == dep.variant;
                    if same && !running_keys.contains(&r.key) {
                        plan.stale.push(r.id.clone());
                    }
                }
            }
            for rs in dep.running() {
                let hv_request = if is_target {
                    hv.or(rs.service.hypervisor)
                } else {
                    rs.service.hypervisor
                };
                let want = Self::fingerprint(&Self::build_spec(&s, rs, "", 0), hv_request);
                let mut keep = 0u32;
                for r in self.instances.values() {
                    if r.key != rs.instances_of || r.state == InstState::Lost {
                        continue;
                    }
                    if !is_target || r.fingerprint == want {
                        keep += 1;
                    } else {
                        plan.stale.push(r.id.clone());
                    }
                }
                let links_to = links_to(&dep.services, rs);
                for _ in keep..rs.service.instances.min {
                    let mut p = self.plan_one(
                        &s,
                        dep.variant.as_ref(),
                        rs,
                        hv_request,
                        explain && is_target,
                        &mut taken,
                        &mut plan.converted,
                    )?;
                    p.links_to = links_to.clone();
                    plan.planned.push(p);
                }
            }
        }
        Ok(())
    }

    /// Records prepared instances and forgets stale ones; returns what to release.
    fn record(
        &mut self,
        plan: &mut DeployPlan,
        prepared: Vec<Prepared>,
        batch: &mut Batch,
    ) -> Vec<(String, String)> {
        for (p, prep) in plan.planned.iter().zip(prepared) {
            let mut rec = p.rec.clone();
            rec.prepared = prep;
            state::put(batch, &state::instance_key(&rec.id), &rec);
            self.instances.insert(rec.id.clone(), rec.clone());
            plan.report.placed.push(PlacedReport {
                instance: self.view(&rec),
                reasons: p.reasons.clone(),
                fetch_bytes: p.fetch_bytes,
                verdicts: p.verdicts.clone(),
            });
        }
        let stale: BTreeSet<&String> = plan.stale.iter().collect();
        let releases = self.forget_instances(|r| stale.contains(&r.id), batch);
        for w in &plan.converted {
            batch.delete(state::warm_key(w));
        }
        releases
    }

    /// Persists the stack's file, variants and the file's aliases.
    fn persist_catalog(&mut self, stack: &str, f: &StackFile, stored: StoredFile) -> Batch {
        let mut batch = Batch::new();
        if f.stack.is_some() {
            state::put(&mut batch, &state::stack_key(stack), &stored);
            self.files.insert(stack.to_owned(), stored);
        }
        for v in self.catalog.variants_of(stack) {
            state::put(&mut batch, &state::variant_key(stack, v.name.as_str()), v);
        }
        for a in &f.aliases {
            state::put(&mut batch, &state::alias_key(&a.domain), &a.target);
        }
        batch
    }

    pub fn stack_view(&self, name: &str) -> Option<StackView> {
        let s = self.catalog.stack(name)?;
        Some(StackView {
            name: s.name.to_string(),
            domain: s.domain.clone(),
            services: s.services.keys().map(|n| n.to_string()).collect(),
            variants: self
                .catalog
                .variants_of(name)
                .map(|v| v.name.to_string())
                .collect(),
            instances: self
                .instances
                .values()
                .filter(|r| r.stack.as_str() == name)
                .count() as u32,
        })
    }

    /// Every stack, by name: the same order before and after a restart (the catalog
    /// keeps deploy order, which a restart, loading the files by name, does not).
    pub fn stack_views(&self) -> Vec<StackView> {
        self.files
            .keys()
            .filter_map(|name| self.stack_view(name))
            .collect()
    }

    pub fn host_views(&self) -> Vec<HostView> {
        self.hosts
            .iter()
            .map(|(id, h)| {
                let mut rec = h.rec.clone();
                if let Some(inv) = self.cluster.inventory(id) {
                    rec.inventory = inv;
                }
                // Up means registered with this scheduler (after a restart or a change
                // of leader, once it registered again); a follower shows what its
                // leader recorded.
                rec.up = rec.up && (self.follower || h.client.is_some());
                HostView {
                    rec,
                    used: self.cluster.used(id).unwrap_or_default(),
                    instances: self
                        .instances
                        .values()
                        .filter(|r| &r.host == id && r.state != InstState::Lost)
                        .count() as u32,
                    warm: self.warm.values().filter(|(w, _)| &w.host == id).count() as u32,
                }
            })
            .collect()
    }

    pub fn pool_view(&self, rec: &PoolRec) -> PoolView {
        PoolView {
            name: rec.pool.name.to_string(),
            layers: rec
                .image
                .layers
                .iter()
                .map(|l| l.digest.to_string())
                .collect(),
            min: rec.pool.min,
            max: rec.pool.max,
            warm: self
                .warm
                .values()
                .filter(|(w, _)| w.pool == rec.pool.name)
                .count() as u32,
        }
    }

    /// A pool's layers (with sizes where a host's image lists them) and the image to
    /// boot its VMs from.
    fn resolve_pool(&self, pool: &Pool) -> Result<(ImageSpec, String)> {
        match &pool.layers {
            PoolLayers::Digests(ds) => {
                let layers = ds
                    .iter()
                    .map(|d| ImageLayer {
                        digest: d.clone(),
                        bytes: self
                            .hosts
                            .values()
                            .flat_map(|h| h.rec.images.iter())
                            .flat_map(|i| i.layers.iter())
                            .find(|l| &l.digest == d)
                            .map_or(0, |l| l.bytes),
                    })
                    .collect();
                let boot = self
                    .find_image(|i| {
                        i.layers.len() == ds.len()
                            && i.layers.iter().zip(ds).all(|(l, d)| &l.digest == d)
                    })
                    .map(|i| {
                        if i.name.is_empty() {
                            i.digest.clone()
                        } else {
                            i.name.clone()
                        }
                    })
                    .unwrap_or_default();
                Ok((ImageSpec { layers }, boot))
            }
            PoolLayers::Image(r) => {
                let want = r.to_string();
                let i = self
                    .find_image(|i| i.name == want || i.digest == want)
                    .ok_or_else(|| {
                        Error::BadRequest(format!(
                            "pool {}: no host's store has image {want}",
                            pool.name
                        ))
                    })?;
                Ok((i.spec(), want))
            }
        }
    }

    /// Forgets the instances `pick` selects (records and cluster reservations); returns
    /// (host, instance) pairs to release.
    fn forget_instances(
        &mut self,
        pick: impl Fn(&InstanceRec) -> bool,
        batch: &mut Batch,
    ) -> Vec<(String, String)> {
        let ids: Vec<String> = self
            .instances
            .values()
            .filter(|r| pick(r))
            .map(|r| r.id.clone())
            .collect();
        let mut releases = Vec::new();
        for id in ids {
            if let Some(r) = self.instances.remove(&id) {
                let _ = self.cluster.remove_instance(&id);
                batch.delete(state::instance_key(&id));
                releases.push((r.host, id));
            }
        }
        releases
    }

    /// Places the lost instances again where they now fit (a host came back or joined)
    /// and commits them; returns what to prepare. Those that still fit nowhere stay
    /// lost.
    fn plan_revive(&mut self, batch: &mut Batch) -> Vec<(host::Client, String, Spec)> {
        let lost: Vec<String> = self
            .instances
            .values()
            .filter(|r| r.state == InstState::Lost)
            .map(|r| r.id.clone())
            .collect();
        let mut out = Vec::new();
        for id in lost {
            let w = self.instances[&id].workload.clone();
            let Ok(p) = self.cluster.place(&w) else {
                continue;
            };
            let Some(client) = self.client(&p.host) else {
                continue;
            };
            if self.cluster.commit(&id, &w, &p).is_err() {
                continue;
            }
            let mut warm_vm = String::new();
            if let Action::Convert { vm, .. } = p.action {
                let wid = self
                    .warm
                    .iter()
                    .find(|(_, (_, v))| *v == vm)
                    .map(|(k, _)| k.clone());
                if let Some(wid) = wid {
                    self.warm.remove(&wid);
                    batch.delete(state::warm_key(&wid));
                    warm_vm = wid;
                }
            }
            let rec = self.instances.get_mut(&id).expect("listed above");
            rec.host = p.host.clone();
            rec.spec.hypervisor = p.hypervisor;
            rec.spec.warm_vm = warm_vm;
            rec.state = InstState::Moved;
            rec.prepared = Prepared::default();
            state::put(batch, &state::instance_key(&id), rec);
            out.push((client, p.host, rec.spec.clone()));
        }
        out
    }

    /// The instance serving `key`: a ready one on a connected host first.
    fn pick_instance(&self, key: &str) -> Option<InstanceView> {
        let mut candidates: Vec<InstanceView> = self
            .instances
            .values()
            .filter(|r| r.key == key && r.state != InstState::Lost)
            // A VM that exited or failed serves nothing.
            .filter(|r| !matches!(r.prepared.guest.phase.as_str(), "exited" | "failed"))
            .map(|r| self.view(r))
            .collect();
        candidates.sort_by_key(|v| matches!(v.state, "pending" | "moving"));
        candidates.into_iter().next()
    }
}

// ---- Async operations ----

async fn prepare_all(items: Vec<(host::Client, String, Spec)>) -> Vec<Result<Prepared>> {
    join_all(
        items
            .into_iter()
            .map(|(c, host, spec)| async move { hostcall::prepare(&c, &host, &spec).await }),
    )
    .await
}

/// The services `rs` depends on, with the key of the instances serving each (among
/// `services`, its deployment's).
fn links_to(services: &[ResolvedService], rs: &ResolvedService) -> Vec<(String, String)> {
    rs.service
        .depends_on
        .iter()
        .filter_map(|d| {
            let to = services.iter().find(|x| x.service.name == *d)?;
            Some((d.to_string(), to.instances_of.clone()))
        })
        .collect()
}

/// Where an instance of `key` answers (HOST, PORT), from the instances prepared so far
/// in this plan or, failing that, those already running (not about to be replaced).
fn endpoint_of(
    d: &Daemon,
    planned: &[Planned],
    results: &[Option<Result<Prepared>>],
    stale: &[String],
    key: &str,
) -> Option<(String, u16)> {
    let from_plan = planned
        .iter()
        .zip(results)
        .filter(|(p, _)| p.rec.key == key)
        .find_map(|(_, r)| match r {
            Some(Ok(p)) if !p.address.is_empty() => Some(p.address.clone()),
            _ => None,
        });
    let addr = from_plan.or_else(|| {
        d.instances
            .values()
            .filter(|r| r.key == key && !stale.contains(&r.id) && r.state != InstState::Lost)
            .find(|r| !r.prepared.address.is_empty())
            .map(|r| r.prepared.address.clone())
    })?;
    let (host, port) = addr.rsplit_once(':')?;
    Some((host.to_owned(), port.parse().ok()?))
}

/// Prepares a plan's instances in dependency order: those whose dependencies are all
/// prepared go together (concurrently), each told where its dependencies answer
/// (`links`), so a service's guest boots knowing its `DB_HOST`/`DB_PORT`. After a wave
/// with a failure nothing more is started; what was not is `NotStarted`.
async fn prepare_in_order(
    sh: &Rc<Shared>,
    planned: &mut [Planned],
    stale: &[String],
) -> Vec<Result<Prepared>> {
    let n = planned.len();
    let mut results: Vec<Option<Result<Prepared>>> = (0..n).map(|_| None).collect();
    loop {
        let done_ok = |key: &str, results: &[Option<Result<Prepared>>]| {
            planned
                .iter()
                .zip(results)
                .filter(|(p, _)| p.rec.key == key)
                .all(|(_, r)| matches!(r, Some(Ok(_))))
        };
        let wave: Vec<usize> = (0..n)
            .filter(|&i| {
                results[i].is_none()
                    && planned[i]
                        .links_to
                        .iter()
                        .all(|(_, key)| *key == planned[i].rec.key || done_ok(key, &results))
            })
            .collect();
        if wave.is_empty() {
            break;
        }
        {
            let d = sh.state.borrow();
            for &i in &wave {
                let links = planned[i]
                    .links_to
                    .iter()
                    .filter_map(|(service, key)| {
                        let (host, port) = endpoint_of(&d, planned, &results, stale, key)?;
                        Some(state::LinkRec {
                            service: service.clone(),
                            host,
                            port,
                        })
                    })
                    .collect();
                planned[i].rec.spec.links = links;
            }
        }
        let items = wave
            .iter()
            .map(|&i| {
                let p = &planned[i];
                (p.client.clone(), p.rec.host.clone(), p.rec.spec.clone())
            })
            .collect();
        let rs = prepare_all(items).await;
        let failed = rs.iter().any(Result::is_err);
        for (i, r) in wave.into_iter().zip(rs) {
            results[i] = Some(r);
        }
        if failed {
            break;
        }
    }
    results
        .into_iter()
        .zip(planned.iter())
        .map(|(r, p)| {
            r.unwrap_or_else(|| {
                Err(Error::NotStarted(format!(
                    "{} was not started: a service it depends on failed",
                    p.rec.id
                )))
            })
        })
        .collect()
}

async fn release_all(sh: &Rc<Shared>, items: Vec<(String, String)>) {
    let calls: Vec<_> = {
        let d = sh.state.borrow();
        items
            .into_iter()
            .filter_map(|(host, id)| d.client(&host).map(|c| (c, host, id)))
            .collect()
    };
    let results = join_all(
        calls
            .iter()
            .map(|(c, host, id)| hostcall::release(c, host, id)),
    )
    .await;
    for r in results {
        if let Err(e) = r {
            log!("{e}");
        }
    }
}

/// Prepares instances the scheduler already recorded (after a move or a host's
/// restart) and records the hosts' answers; one that fails is marked lost.
async fn prepare_existing(sh: &Rc<Shared>, items: Vec<(host::Client, String, Spec)>, what: &str) {
    let ids: Vec<String> = items.iter().map(|(_, _, s)| s.instance.clone()).collect();
    let specs: Vec<(String, Spec)> = items
        .iter()
        .map(|(_, h, s)| (h.clone(), s.clone()))
        .collect();
    let results = prepare_all(items).await;
    let stale = failed_conversions(specs.iter().map(|(h, s)| (h, s)), &results);
    prepare_recorded(sh, &ids, results, what);
    if !stale.is_empty() {
        release_all(sh, stale).await;
        replenish(sh).await;
    }
}

/// The warm VMs that failed prepares were to convert, as (host, VM id): the scheduler
/// has given them up, but a host that refused the conversion still runs the VM.
fn failed_conversions<'a, T>(
    specs: impl Iterator<Item = (&'a String, &'a Spec)>,
    results: &[Result<T>],
) -> Vec<(String, String)> {
    specs
        .zip(results)
        .filter(|((_, s), r)| r.is_err() && !s.warm_vm.is_empty())
        .map(|((h, s), _)| (h.clone(), s.warm_vm.clone()))
        .collect()
}

/// Records the answers of `prepare_existing`'s prepares.
fn prepare_recorded(sh: &Rc<Shared>, ids: &[String], results: Vec<Result<Prepared>>, what: &str) {
    let mut d = sh.state.borrow_mut();
    let mut batch = Batch::new();
    for (iid, r) in ids.iter().zip(results) {
        let Some(rec) = d.instances.get_mut(iid) else {
            continue;
        };
        match r {
            Ok(p) => rec.prepared = p,
            Err(e) => {
                log!("{what}: {e}");
                rec.state = InstState::Lost;
                rec.spec.warm_vm.clear();
            }
        }
        let rec = rec.clone();
        if rec.state == InstState::Lost {
            let _ = d.cluster.remove_instance(iid);
        }
        state::put(&mut batch, &state::instance_key(iid), &rec);
    }
    write(&d, batch);
}

/// Validates, stores and runs a stack file (`variant`: also the variant's UNIQUE
/// services). `variant_of`: the file must be a variant file of that stack
/// (`Stack.createVariant`).
pub async fn deploy(
    sh: &Rc<Shared>,
    file: &str,
    source: &str,
    variant: Option<&str>,
    variant_of: Option<&str>,
    explain: bool,
    hv: Option<Hypervisor>,
) -> Result<DeployReport> {
    let parsed = parse(file, source)?;
    if let Some(parent) = variant_of {
        let ok = parsed.stack.is_none()
            && parsed.variants.len() == 1
            && parsed.variants[0].parent.as_str() == parent;
        if !ok {
            return Err(Error::BadRequest(format!(
                "{file}: a variant file of stack {parent} holds one [variant] with parent = \"{parent}\" and no [stack]"
            )));
        }
    }
    let _op = sh.op.lock().await;
    sh.lead()?;
    let (mut plan, saved, stack) = {
        let mut d = sh.state.borrow_mut();
        let saved = d.catalog.clone();
        let planned = d
            .apply_file(&parsed, file)
            .and_then(|(stack, file_variant)| {
                let variant = variant.map(str::to_owned).or(file_variant);
                let plan = d.plan_deploy(&stack, variant.as_deref(), hv, explain)?;
                Ok((plan, stack))
            });
        match planned {
            Ok((plan, stack)) => (plan, saved, stack),
            Err(e) => {
                d.catalog = saved;
                return Err(e);
            }
        }
    };
    let results = prepare_in_order(sh, &mut plan.planned, &plan.stale).await;
    let failed = results
        .iter()
        .position(|r| {
            r.as_ref()
                .is_err_and(|e| !matches!(e, Error::NotStarted(_)))
        })
        .or_else(|| results.iter().position(Result::is_err));
    if let Some(i) = failed {
        let mut done: Vec<(String, String)> = plan
            .planned
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_ok())
            .map(|(p, _)| (p.rec.host.clone(), p.rec.id.clone()))
            .collect();
        // Converted warm VMs are given up (their pools refill below), also where the
        // conversion failed and the host kept the VM.
        done.extend(failed_conversions(
            plan.planned.iter().map(|p| (&p.rec.host, &p.rec.spec)),
            &results,
        ));
        release_all(sh, done).await;
        {
            let mut d = sh.state.borrow_mut();
            d.undo(&plan.planned);
            d.catalog = saved;
            let mut batch = Batch::new();
            for w in &plan.converted {
                batch.delete(state::warm_key(w));
            }
            write(&d, batch);
        }
        replenish(sh).await;
        let err = results
            .into_iter()
            .nth(i)
            .expect("index found")
            .unwrap_err();
        return Err(Error::BadRequest(format!(
            "deploy of {stack} rolled back: {err}"
        )));
    }
    let prepared: Vec<Prepared> = results.into_iter().map(|r| r.expect("all ok")).collect();
    let releases = {
        let mut d = sh.state.borrow_mut();
        let stored = StoredFile {
            file: file.to_owned(),
            source: source.to_owned(),
        };
        let mut batch = d.persist_catalog(&stack, &parsed, stored);
        let releases = d.record(&mut plan, prepared, &mut batch);
        write(&d, batch);
        releases
    };
    release_all(sh, releases).await;
    for p in &parsed.pools {
        let exists = sh.state.borrow().pools.contains_key(p.name.as_str());
        if !exists && let Err(e) = add_pool(sh, p.clone()).await {
            log!("{file}: pool {}: {e}", p.name);
        }
    }
    refill_later(sh);
    Ok(plan.report)
}

/// Refills the pools once the current operation is over (it holds the op lock): a
/// deploy or resolve that converted a warm VM answers without waiting for the new VM's
/// boot.
fn refill_later(sh: &Rc<Shared>) {
    let sh = sh.clone();
    tokio::task::spawn_local(async move {
        let _op = sh.op.lock().await;
        if !sh.leading() {
            return;
        }
        replenish(&sh).await;
    });
}

/// Declares a pool and boots its warm VMs (the caller holds the op lock).
async fn add_pool(sh: &Rc<Shared>, pool: Pool) -> Result<()> {
    {
        let mut d = sh.state.borrow_mut();
        let (image, boot_image) = d.resolve_pool(&pool)?;
        d.cluster.add_pool(pool.clone(), image.clone())?;
        let rec = PoolRec {
            pool,
            image,
            boot_image,
        };
        let mut batch = Batch::new();
        state::put(&mut batch, &state::pool_key(rec.pool.name.as_str()), &rec);
        write(&d, batch);
        d.pools.insert(rec.pool.name.to_string(), rec);
    }
    replenish(sh).await;
    Ok(())
}

/// Boots warm VMs until every pool has its minimum (the caller holds the op lock).
pub async fn replenish(sh: &Rc<Shared>) {
    let boots = sh.state.borrow_mut().cluster.replenish_pools();
    boot_all(sh, boots).await;
}

async fn boot_all(sh: &Rc<Shared>, boots: Vec<PoolBoot>) {
    if boots.is_empty() {
        return;
    }
    let mut calls = Vec::new();
    {
        let mut d = sh.state.borrow_mut();
        for b in boots {
            let image = d
                .pools
                .get(b.pool.as_str())
                .map(|p| p.boot_image.clone())
                .unwrap_or_default();
            match d.client(&b.placement.host) {
                Some(c) => calls.push((c, b, image)),
                None => {
                    d.cluster.remove_warm_vm(b.vm);
                }
            }
        }
    }
    let results =
        join_all(calls.iter().map(|(c, b, image)| {
            hostcall::boot_warm(c, &b.placement.host, b.pool.as_str(), image)
        }))
        .await;
    let mut d = sh.state.borrow_mut();
    let mut batch = Batch::new();
    for ((_, b, image), r) in calls.into_iter().zip(results) {
        match r {
            Ok(w) => {
                let rec = WarmRec {
                    id: w.id.clone(),
                    pool: b.pool.clone(),
                    host: b.placement.host.clone(),
                    hypervisor: b.placement.hypervisor,
                    image: if w.image.is_empty() { image } else { w.image },
                    layers: w.layers,
                    root: w.root,
                };
                state::put(&mut batch, &state::warm_key(&rec.id), &rec);
                d.warm.insert(rec.id.clone(), (rec, b.vm));
            }
            Err(e) => {
                log!("{e}");
                d.cluster.remove_warm_vm(b.vm);
            }
        }
    }
    write(&d, batch);
}

pub async fn create_pool(
    sh: &Rc<Shared>,
    name: &str,
    layers: &[String],
    image: &str,
    min: u32,
    max: u32,
) -> Result<PoolView> {
    let name = Name::new(name).map_err(|e| Error::BadRequest(format!("pool name: {e}")))?;
    let layers = match (layers.is_empty(), image.is_empty()) {
        (false, true) => PoolLayers::Digests(
            layers
                .iter()
                .map(|d| Digest::new(d))
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| Error::BadRequest(format!("pool {name}: layers: {e}")))?,
        ),
        (true, false) => PoolLayers::Image(
            image
                .parse()
                .map_err(|e| Error::BadRequest(format!("pool {name}: image: {e}")))?,
        ),
        _ => {
            return Err(Error::BadRequest(format!(
                "pool {name}: give either layers or an image, not both or neither"
            )));
        }
    };
    if max == 0 || min > max {
        return Err(Error::BadRequest(format!(
            "pool {name}: need 1 <= max and min <= max (min {min}, max {max})"
        )));
    }
    let _op = sh.op.lock().await;
    sh.lead()?;
    if sh.state.borrow().pools.contains_key(name.as_str()) {
        return Err(Error::BadRequest(format!("pool {name} exists already")));
    }
    let pool = Pool {
        name: name.clone(),
        layers,
        min,
        max,
        resources: Resources::default(),
        hosts: HostSelector::default(),
    };
    add_pool(sh, pool).await?;
    let d = sh.state.borrow();
    Ok(d.pool_view(&d.pools[name.as_str()]))
}

pub async fn remove_pool(sh: &Rc<Shared>, name: &str) -> Result<()> {
    let _op = sh.op.lock().await;
    sh.lead()?;
    let releases = {
        let mut d = sh.state.borrow_mut();
        let Some(rec) = d.pools.remove(name) else {
            return Err(Error::BadRequest(format!("no pool {name:?}")));
        };
        d.cluster.remove_pool(&rec.pool.name)?;
        let mut batch = Batch::new();
        batch.delete(state::pool_key(name));
        let ids: Vec<String> = d
            .warm
            .iter()
            .filter(|(_, (w, _))| w.pool.as_str() == name)
            .map(|(k, _)| k.clone())
            .collect();
        let mut releases = Vec::new();
        for id in ids {
            if let Some((w, _)) = d.warm.remove(&id) {
                batch.delete(state::warm_key(&id));
                releases.push((w.host, id));
            }
        }
        write(&d, batch);
        releases
    };
    // The Host interface has no call to discard a warm VM: `release` by its id is the
    // closest (volumed treats ids alike).
    release_all(sh, releases).await;
    Ok(())
}

pub async fn add_alias(sh: &Rc<Shared>, domain: &str, target: &str) -> Result<()> {
    let _op = sh.op.lock().await;
    sh.lead()?;
    let mut d = sh.state.borrow_mut();
    d.catalog.put_alias(domain, target)?;
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let target = target.trim_end_matches('.').to_ascii_lowercase();
    let mut batch = Batch::new();
    state::put(&mut batch, &state::alias_key(&domain), &target);
    write(&d, batch);
    Ok(())
}

pub async fn remove_alias(sh: &Rc<Shared>, domain: &str) -> Result<()> {
    let _op = sh.op.lock().await;
    sh.lead()?;
    let mut d = sh.state.borrow_mut();
    d.catalog.remove_alias(domain)?;
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let mut batch = Batch::new();
    batch.delete(state::alias_key(&domain));
    write(&d, batch);
    Ok(())
}

/// The alias (domain, target) routing into `stack` (and `variant`, when given).
fn alias_into(d: &Daemon, stack: &str, variant: Option<&str>) -> Option<(String, String)> {
    d.catalog.aliases().find_map(|(domain, target)| {
        let r = d.catalog.resolve(domain).ok()?;
        let hit = r.stack.as_str() == stack
            && variant.is_none_or(|v| r.variant.as_ref().is_some_and(|rv| rv.as_str() == v));
        hit.then(|| (domain.to_owned(), target.to_owned()))
    })
}

/// Removes a stack, its variants and their instances (refused while an alias points
/// into it).
pub async fn remove_stack(sh: &Rc<Shared>, name: &str) -> Result<()> {
    let _op = sh.op.lock().await;
    sh.lead()?;
    let releases = {
        let mut d = sh.state.borrow_mut();
        if d.catalog.stack(name).is_none() {
            return Err(Error::BadRequest(format!("no stack {name:?}")));
        }
        if let Some((domain, target)) = alias_into(&d, name, None) {
            return Err(Error::BadRequest(format!(
                "stack {name} is the target of alias {domain} -> {target}; remove the alias first"
            )));
        }
        let saved = d.catalog.clone();
        let variants: Vec<String> = d
            .catalog
            .variants_of(name)
            .map(|v| v.name.to_string())
            .collect();
        let mut batch = Batch::new();
        let removed = (|| {
            for v in &variants {
                d.catalog.remove_variant(name, v)?;
                batch.delete(state::variant_key(name, v));
            }
            d.catalog.remove_stack(name)
        })();
        if let Err(e) = removed {
            d.catalog = saved;
            return Err(e.into());
        }
        batch.delete(state::stack_key(name));
        d.files.remove(name);
        let releases = d.forget_instances(|r| r.stack.as_str() == name, &mut batch);
        write(&d, batch);
        releases
    };
    release_all(sh, releases).await;
    Ok(())
}

pub async fn remove_variant(sh: &Rc<Shared>, stack: &str, name: &str) -> Result<()> {
    let _op = sh.op.lock().await;
    sh.lead()?;
    let releases = {
        let mut d = sh.state.borrow_mut();
        if let Some((domain, target)) = alias_into(&d, stack, Some(name)) {
            return Err(Error::BadRequest(format!(
                "variant {name} of {stack} is the target of alias {domain} -> {target}; remove the alias first"
            )));
        }
        d.catalog.remove_variant(stack, name)?;
        let mut batch = Batch::new();
        batch.delete(state::variant_key(stack, name));
        let releases = d.forget_instances(
            |r| r.stack.as_str() == stack && r.variant.as_ref().is_some_and(|v| v.as_str() == name),
            &mut batch,
        );
        write(&d, batch);
        releases
    };
    release_all(sh, releases).await;
    Ok(())
}

/// Which instance serves `hostname`, starting one when none runs (scaled to zero).
pub async fn resolve(sh: &Rc<Shared>, hostname: &str) -> Result<RouteView> {
    let route = sh.state.borrow().catalog.resolve(hostname)?;
    let key = route.instances_of();
    if let Some(instance) = sh.state.borrow().pick_instance(&key) {
        return Ok(RouteView {
            hostname: hostname.to_owned(),
            route,
            instance,
            started: false,
        });
    }
    let _op = sh.op.lock().await;
    sh.lead()?;
    // Another resolve may have started it while this one waited.
    if let Some(instance) = sh.state.borrow().pick_instance(&key) {
        return Ok(RouteView {
            hostname: hostname.to_owned(),
            route,
            instance,
            started: false,
        });
    }
    let instance = start_locked(sh, hostname, &route).await?;
    Ok(RouteView {
        hostname: hostname.to_owned(),
        route,
        instance,
        started: true,
    })
}

/// Starts one more instance of the service `hostname` names (the autoscaler's scale
/// out), whatever already runs.
pub async fn start_one(sh: &Rc<Shared>, hostname: &str) -> Result<InstanceView> {
    let route = sh.state.borrow().catalog.resolve(hostname)?;
    let _op = sh.op.lock().await;
    sh.lead()?;
    start_locked(sh, hostname, &route).await
}

/// Places, prepares and records one instance of `route`'s service; the caller holds
/// the operation lock.
async fn start_locked(sh: &Rc<Shared>, hostname: &str, route: &Route) -> Result<InstanceView> {
    let mut plan = {
        let mut d = sh.state.borrow_mut();
        let variant = if route.shared_from_parent {
            None
        } else {
            route.variant.as_ref().map(Name::as_str)
        };
        let dep = d.catalog.deployment(route.stack.as_str(), variant)?;
        let rs = dep
            .services
            .iter()
            .find(|s| s.service.name == route.service)
            .cloned()
            .ok_or_else(|| Error::BadRequest(format!("no service answers to {hostname}")))?;
        let s = d
            .catalog
            .stack(route.stack.as_str())
            .cloned()
            .ok_or_else(|| Error::BadRequest(format!("no stack {}", route.stack)))?;
        let mut taken = BTreeSet::new();
        let mut converted = Vec::new();
        let hv = rs.service.hypervisor;
        let mut p = d.plan_one(
            &s,
            dep.variant.as_ref(),
            &rs,
            hv,
            false,
            &mut taken,
            &mut converted,
        )?;
        p.links_to = links_to(&dep.services, &rs);
        DeployPlan {
            planned: vec![p],
            converted,
            ..Default::default()
        }
    };
    let r = prepare_in_order(sh, &mut plan.planned, &[])
        .await
        .pop()
        .expect("one result");
    let planned = {
        let mut d = sh.state.borrow_mut();
        match r {
            Ok(prep) => {
                let mut batch = Batch::new();
                d.record(&mut plan, vec![prep], &mut batch);
                write(&d, batch);
                plan.report.placed.pop().expect("recorded")
            }
            Err(e) => {
                d.undo(&plan.planned);
                return Err(e);
            }
        }
    };
    refill_later(sh);
    Ok(planned.instance)
}

/// Releases instances `ids` (the autoscaler's scale in) and forgets them.
pub async fn stop_instances(sh: &Rc<Shared>, ids: &[String]) {
    let releases = {
        let _op = sh.op.lock().await;
        if !sh.leading() {
            return;
        }
        let mut d = sh.state.borrow_mut();
        let mut batch = Batch::new();
        let r = d.forget_instances(|r| ids.contains(&r.id), &mut batch);
        write(&d, batch);
        r
    };
    release_all(sh, releases).await;
}

/// A host joins or rejoins; returns its session number.
pub fn register(
    sh: &Rc<Shared>,
    client: host::Client,
    inv: HostInventory,
    images: Vec<ImageRec>,
) -> u64 {
    let session = sh.next_session.get();
    sh.next_session.set(session + 1);
    let id = inv.id.clone();
    let mut d = sh.state.borrow_mut();
    d.cluster.upsert_host(inv.clone());
    let rec = HostRec {
        inventory: inv,
        images,
        last_seen: unix_now(),
        up: true,
    };
    let mut batch = Batch::new();
    state::put(&mut batch, &state::host_key(&id), &rec);
    write(&d, batch);
    d.hosts.insert(
        id.clone(),
        HostEntry {
            rec,
            client: Some(client),
            session,
            last_contact: Instant::now(),
        },
    );
    log!("host {id} registered (session {session})");
    session
}

/// A heartbeat of session `session` of host `id`.
pub fn heartbeat(
    sh: &Rc<Shared>,
    id: &str,
    session: u64,
    inv: HostInventory,
    images: Vec<ImageRec>,
    guests: Vec<(String, state::GuestRec)>,
) -> Result<()> {
    if inv.id != id {
        return Err(Error::BadRequest(format!(
            "heartbeat of host {id} reports host id {:?}",
            inv.id
        )));
    }
    let mut d = sh.state.borrow_mut();
    let d = &mut *d;
    let h = d
        .hosts
        .get_mut(id)
        .ok_or_else(|| Error::BadRequest(format!("unknown host {id:?}")))?;
    if h.session != session {
        return Err(Error::BadRequest(format!(
            "host {id}: this session was replaced by a newer registration"
        )));
    }
    if !h.rec.up {
        return Err(Error::BadRequest(format!(
            "host {id} was marked down after missing heartbeats; register again"
        )));
    }
    h.last_contact = Instant::now();
    h.rec.last_seen = unix_now();
    if h.rec.inventory != inv || h.rec.images != images {
        h.rec.inventory = inv.clone();
        h.rec.images = images;
        d.cluster.upsert_host(inv);
        let mut batch = Batch::new();
        state::put(&mut batch, &state::host_key(id), &h.rec);
        write(d, batch);
    }
    // Guests' states: kept as reported, stored when a phase changes (an app that
    // exited, a VM that died), so a restarted scheduler shows them too.
    let mut batch = Batch::new();
    for (instance, g) in guests {
        let Some(rec) = d.instances.get_mut(&instance) else {
            continue;
        };
        if rec.host != id || rec.prepared.guest == g {
            continue;
        }
        let phase_changed = rec.prepared.guest.phase != g.phase;
        if phase_changed && (g.phase == "failed" || g.phase == "exited") {
            log!(
                "instance {instance} on {id}: {}{}",
                g.phase,
                if g.reason.is_empty() {
                    format!(" (status {})", g.exit_code)
                } else {
                    format!(": {}", g.reason)
                }
            );
        }
        rec.prepared.guest = g;
        if phase_changed {
            state::put(&mut batch, &state::instance_key(&instance), &*rec);
        }
    }
    if !batch.is_empty() {
        write(d, batch);
    }
    Ok(())
}

/// Instance `id`'s host, with its capability.
fn host_of(sh: &Rc<Shared>, id: &str) -> Result<(String, host::Client)> {
    let d = sh.state.borrow();
    let rec = d
        .instances
        .get(id)
        .ok_or_else(|| Error::BadRequest(format!("no instance {id:?}")))?;
    let client = d.client(&rec.host).ok_or_else(|| Error::Host {
        host: rec.host.clone(),
        op: format!("reaching {id}"),
        reason: "not connected".into(),
    })?;
    Ok((rec.host.clone(), client))
}

/// A chunk of instance `id`'s log, from its host.
pub async fn logs(
    sh: &Rc<Shared>,
    id: &str,
    offset: u64,
    console: bool,
    max: u32,
) -> Result<(Vec<u8>, u64, bool)> {
    let (host, client) = host_of(sh, id)?;
    hostcall::logs(&client, &host, id, offset, console, max).await
}

/// Stops or restarts instance `id` on its host; the instance as it then is.
pub async fn control(sh: &Rc<Shared>, id: &str, action: &str) -> Result<InstanceView> {
    if action != "stop" && action != "restart" {
        return Err(Error::BadRequest(format!(
            "instance {id}: unknown action {action:?} (stop or restart)"
        )));
    }
    let (host, client) = host_of(sh, id)?;
    let p = hostcall::control(&client, &host, id, action).await?;
    let mut d = sh.state.borrow_mut();
    let d = &mut *d;
    let rec = d
        .instances
        .get_mut(id)
        .ok_or_else(|| Error::BadRequest(format!("instance {id} was released meanwhile")))?;
    rec.prepared = p;
    let mut batch = Batch::new();
    state::put(&mut batch, &state::instance_key(id), &*rec);
    let rec = rec.clone();
    write(d, batch);
    Ok(d.view(&rec))
}

/// Moves instance `id` to another host while its own is up (`tide instance move`):
/// placement picks the host (or `to` names it), the old host hands the instance over
/// (stopped, its RWO volumes pushed to the tier, released), and the new one prepares it
/// with those volumes made from the pushed snapshots. Returns it and what was pushed. A
/// refused hand-over leaves it where it was.
pub async fn move_instance(
    sh: &Rc<Shared>,
    id: &str,
    to: Option<&str>,
) -> Result<(InstanceView, Vec<PulledRec>)> {
    let _op = sh.op.lock().await;
    sh.lead()?;
    let (from, old) = host_of(sh, id)?;
    let (placed, new) = {
        let mut d = sh.state.borrow_mut();
        let p = d
            .cluster
            .move_instance(id, to)
            .map_err(|e| Error::BadRequest(format!("instance {id} cannot move: {e}")))?;
        match d.client(&p.host) {
            Some(c) => (p, c),
            None => {
                let _ = d.cluster.move_instance(id, Some(&from));
                return Err(Error::Host {
                    host: p.host,
                    op: format!("moving {id} there"),
                    reason: "not connected".into(),
                });
            }
        }
    };
    let pushed = match hostcall::hand_over(&old, &from, id).await {
        Ok(p) => p,
        Err(e) => {
            let _ = sh.state.borrow_mut().cluster.move_instance(id, Some(&from));
            return Err(e);
        }
    };
    log!(
        "moving {id} from {from} to {}: handed over, {} volume(s) pushed",
        placed.host,
        pushed.len()
    );
    let spec = {
        let mut d = sh.state.borrow_mut();
        let d = &mut *d;
        let rec = d
            .instances
            .get_mut(id)
            .ok_or_else(|| Error::BadRequest(format!("instance {id} was removed meanwhile")))?;
        rec.host = placed.host.clone();
        rec.spec.hypervisor = placed.hypervisor;
        rec.spec.warm_vm = String::new();
        // Its volumes' data is in the snapshots just pushed: never made empty there.
        rec.spec.moved = true;
        rec.state = InstState::Moved;
        rec.prepared = Prepared::default();
        let mut batch = Batch::new();
        state::put(&mut batch, &state::instance_key(id), &*rec);
        let spec = rec.spec.clone();
        write(d, batch);
        spec
    };
    let results = prepare_all(vec![(new, placed.host.clone(), spec)]).await;
    let failed = results
        .first()
        .and_then(|r| r.as_ref().err())
        .map(|e| e.to_string());
    prepare_recorded(sh, &[id.to_string()], results, "moving");
    if let Some(e) = failed {
        return Err(Error::BadRequest(format!(
            "instance {id} was handed over by {from} ({} volume(s) pushed to the tier) but {} could not prepare it, so it is lost: {e}",
            pushed.len(),
            placed.host
        )));
    }
    let d = sh.state.borrow();
    let rec = d
        .instances
        .get(id)
        .ok_or_else(|| Error::BadRequest(format!("instance {id} was removed meanwhile")))?;
    Ok((d.view(rec), pushed))
}

/// Compares what a (re)registered host has with what the scheduler placed on it:
/// prepares what it lacks, releases what it should not have, adopts warm VMs of known
/// pools.
pub async fn reconcile(sh: Rc<Shared>, id: String, session: u64) {
    // Under the lock from the host's answer on: a deploy in between would otherwise
    // prepare or boot something the answer does not show, and this would undo it.
    let _op = sh.op.lock().await;
    if !sh.leading() {
        return;
    }
    let Some(client) = sh.state.borrow().client(&id) else {
        return;
    };
    let (prepared, warm) = match hostcall::instances(&client, &id).await {
        Ok(r) => r,
        Err(e) => {
            log!("reconcile: {e}");
            return;
        }
    };
    let (releases, reprepare) = {
        let mut d = sh.state.borrow_mut();
        let d = &mut *d;
        if d.hosts.get(&id).is_none_or(|h| h.session != session) {
            return;
        }
        let mut batch = Batch::new();
        let mut releases = Vec::new();
        let reported: BTreeSet<String> = prepared.iter().map(|p| p.instance.clone()).collect();
        for p in prepared {
            match d.instances.get_mut(&p.instance) {
                Some(r) if r.host == id && r.state != InstState::Lost => {
                    r.prepared = p;
                    state::put(&mut batch, &state::instance_key(&r.id), r);
                }
                // Given up on while its host was away (no other host could take it,
                // or the move to one failed, which leaves that host in the record),
                // and still running here: it is taken back as it is.
                Some(r)
                    if r.state == InstState::Lost
                        && d.cluster
                            .commit(&r.id, &r.workload, &running_here(r, &id, &p))
                            .is_ok() =>
                {
                    let here = running_here(r, &id, &p);
                    r.host = here.host;
                    r.spec.hypervisor = here.hypervisor;
                    r.spec.warm_vm = p.warm_vm.clone();
                    r.state = InstState::Ready;
                    r.prepared = p;
                    state::put(&mut batch, &state::instance_key(&r.id), r);
                }
                _ => releases.push((id.clone(), p.instance)),
            }
        }
        let reprepare: Vec<(host::Client, String, Spec)> = d
            .instances
            .values()
            .filter(|r| r.host == id && r.state != InstState::Lost && !reported.contains(&r.id))
            .map(|r| (client.clone(), id.clone(), r.spec.clone()))
            .collect();
        let reported_warm: BTreeSet<String> = warm.iter().map(|w| w.id.clone()).collect();
        for w in warm {
            adopt_warm(d, &id, w, &mut batch, &mut releases);
        }
        let gone: Vec<String> = d
            .warm
            .iter()
            .filter(|(k, (w, _))| w.host == id && !reported_warm.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            if let Some((_, vm)) = d.warm.remove(&k) {
                d.cluster.remove_warm_vm(vm);
                batch.delete(state::warm_key(&k));
            }
        }
        write(d, batch);
        (releases, reprepare)
    };
    release_all(&sh, releases).await;
    prepare_existing(&sh, reprepare, "reconcile").await;
    // Capacity may have come back: lost instances get another chance.
    let revive = {
        let mut d = sh.state.borrow_mut();
        let mut batch = Batch::new();
        let r = d.plan_revive(&mut batch);
        write(&d, batch);
        r
    };
    prepare_existing(&sh, revive, "restarting a lost instance").await;
    replenish(&sh).await;
}

fn adopt_warm(
    d: &mut Daemon,
    host: &str,
    w: WarmReport,
    batch: &mut Batch,
    releases: &mut Vec<(String, String)>,
) {
    if d.warm.contains_key(&w.id) {
        return;
    }
    let Ok(pool) = Name::new(&w.pool) else {
        releases.push((host.to_owned(), w.id));
        return;
    };
    if !d.pools.contains_key(pool.as_str()) {
        releases.push((host.to_owned(), w.id));
        return;
    }
    let hv = d
        .hosts
        .get(host)
        .and_then(|h| {
            h.rec
                .inventory
                .hypervisors
                .iter()
                .min_by_key(|h| h.priority())
                .copied()
        })
        .unwrap_or(Hypervisor::Firecracker);
    if let Ok(vm) = d.cluster.add_warm_vm(&pool, host, hv) {
        let rec = WarmRec {
            id: w.id.clone(),
            pool,
            host: host.to_owned(),
            hypervisor: hv,
            image: w.image,
            layers: w.layers,
            root: w.root,
        };
        state::put(batch, &state::warm_key(&rec.id), &rec);
        d.warm.insert(w.id, (rec, vm));
    }
}

/// Marks hosts down that missed heartbeats for the timeout, forever.
pub async fn monitor(sh: Rc<Shared>) {
    let tick = (sh.host_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        tokio::time::sleep(tick).await;
        if !sh.leading() {
            continue;
        }
        let expired: Vec<String> = sh
            .state
            .borrow()
            .hosts
            .iter()
            .filter(|(_, h)| h.rec.up && h.last_contact.elapsed() > sh.host_timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if let Err(e) = fail_host(&sh, &id).await {
                log!("failing host {id}: {e}");
            }
        }
    }
}

/// Marks a host down and moves its instances (see `Cluster::fail_host`).
pub async fn fail_host(sh: &Rc<Shared>, id: &str) -> Result<()> {
    let _op = sh.op.lock().await;
    sh.lead()?;
    let (prepares, boots) = {
        let mut d = sh.state.borrow_mut();
        let d = &mut *d;
        let Some(h) = d.hosts.get_mut(id) else {
            return Ok(());
        };
        // A heartbeat may have arrived while this waited for the lock.
        if !h.rec.up || h.last_contact.elapsed() <= sh.host_timeout {
            return Ok(());
        }
        h.rec.up = false;
        h.client = None;
        let mut batch = Batch::new();
        state::put(&mut batch, &state::host_key(id), &h.rec);
        let plan = d.cluster.fail_host(id)?;
        let lost: Vec<String> = d
            .warm
            .iter()
            .filter(|(_, (_, vm))| plan.lost_warm.contains(vm))
            .map(|(k, _)| k.clone())
            .collect();
        for k in lost {
            d.warm.remove(&k);
            batch.delete(state::warm_key(&k));
        }
        let mut prepares = Vec::new();
        for mv in &plan.moves {
            let Some(rec) = d.instances.get_mut(&mv.instance) else {
                continue;
            };
            // Wherever it runs next, its volumes' data was on the host that went down.
            rec.spec.moved = true;
            match &mv.result {
                Ok(p) => {
                    rec.host = p.host.clone();
                    rec.spec.hypervisor = p.hypervisor;
                    rec.spec.warm_vm = String::new();
                    rec.state = InstState::Moved;
                    rec.prepared = Prepared::default();
                    if let Action::Convert { vm, .. } = p.action {
                        let wid = d
                            .warm
                            .iter()
                            .find(|(_, (_, v))| *v == vm)
                            .map(|(k, _)| k.clone());
                        if let Some(wid) = wid {
                            d.warm.remove(&wid);
                            batch.delete(state::warm_key(&wid));
                            rec.spec.warm_vm = wid;
                        }
                    }
                    let client = d.hosts.get(&p.host).and_then(|h| h.client.clone());
                    match client {
                        Some(c) => prepares.push((c, p.host.clone(), rec.spec.clone())),
                        None => {
                            rec.state = InstState::Lost;
                            let _ = d.cluster.remove_instance(&mv.instance);
                        }
                    }
                }
                Err(e) => {
                    log!("instance {} lost with host {id}: {e}", mv.instance);
                    rec.state = InstState::Lost;
                }
            }
            let rec = d.instances[&mv.instance].clone();
            state::put(&mut batch, &state::instance_key(&rec.id), &rec);
        }
        write(d, batch);
        log!(
            "host {id} missed heartbeats for {:?}: marked down, {} instances to move",
            sh.host_timeout,
            plan.moves.len()
        );
        (prepares, plan.boots)
    };
    prepare_existing(sh, prepares, "moving").await;
    boot_all(sh, boots).await;
    replenish(sh).await;
    Ok(())
}

/// The name a stack's volume has on a host: `{stack}-{volume}`, so two stacks' volumes
/// of the same name stay apart. A variant's own (UNIQUE) instances get RWO volumes of
/// their own, `{stack}--{variant}-{volume}` (the parent's is held by the parent's
/// instance), and share the parent's RWX and ROX volumes.
fn host_volume_name(
    stack: &Stack,
    rs: &ResolvedService,
    volume: &Name,
    mode: AccessMode,
) -> String {
    let owner = match mode {
        AccessMode::Rwo => rs
            .instances_of
            .split_once('.')
            .map_or(stack.name.as_str(), |(_, owner)| owner),
        AccessMode::Rwx | AccessMode::Rox => stack.name.as_str(),
    };
    format!("{owner}-{volume}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// shop.toml plus a variant that overrides the database (RWO volume) and web (RWX).
    const VARIANT: &str = r#"
[variant]
name = "pr-7"
parent = "shop"

[variant.services.db]
image = "library/postgres:17.0"

[variant.services.web]
image = "shop/web:pr-7"
"#;

    #[test]
    fn host_volume_names_keep_stacks_apart_and_give_variants_their_own_rwo_volumes() {
        let mut catalog = Catalog::new();
        let shop = include_str!("../../sched/examples/shop.toml");
        catalog.load(parse("shop.toml", shop).unwrap()).unwrap();
        catalog.load(parse("pr-7.toml", VARIANT).unwrap()).unwrap();
        let stack = catalog.stack("shop").unwrap().clone();
        let names = |variant: Option<&str>, service: &str| -> Vec<String> {
            let d = catalog.deployment("shop", variant).unwrap();
            let rs = d
                .services
                .iter()
                .find(|s| s.service.name.as_str() == service)
                .unwrap();
            Daemon::build_spec(&stack, rs, "x-0", 0)
                .volumes
                .into_iter()
                .map(|v| v.name)
                .collect()
        };
        assert_eq!(names(None, "db"), ["shop-orders-db"]);
        assert_eq!(names(None, "web"), ["shop-cache"]);
        assert_eq!(names(Some("pr-7"), "db"), ["shop--pr-7-orders-db"]);
        assert_eq!(names(Some("pr-7"), "web"), ["shop-cache"], "RWX is shared");
    }
}
