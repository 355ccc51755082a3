//! Placement: which host runs an instance, on which hypervisor, cold-booted or
//! converted from a warm-pool VM, and why.
//!
//! [`Cluster`] is the scheduler's view of the hosts: their inventories (capacity, arch,
//! hypervisors, labels, and how many bytes of each layer's chunks they hold), the
//! instances and warm VMs placed on them. Layer digests are interned to dense ids when a
//! host reports them, and an inverted index (layer → hosts holding it, with bytes)
//! lets one decision add up chunk locality for every host by walking only the holders
//! of the image's layers. The per-host loop then filters and scores with no allocation.
//!
//! A decision is pure: [`Cluster::place`] changes nothing but scratch space;
//! [`Cluster::commit`] records it (capacity used, replicas, and the layers the host
//! fetches, which it then holds).
//!
//! Score of a host that passes the filters (higher wins, ties to the host added first):
//! `w_locality·locality − w_spread·replicas − w_load·load − w_emulation·emulated`, where
//! `locality` is the image's bytes already on the host divided by the image's bytes
//! (chunk-level: a layer partly present through shared chunks counts for what is
//! there), `replicas` the instances of the same workload already on the host, `load`
//! the larger of the CPU and memory fractions in use after placing. A warm-pool VM whose
//! layer stack is an ordered prefix of the image's is converted in preference to any
//! cold boot: the longest prefix wins, then the score of its host.

use std::collections::HashMap;
use std::fmt;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::stack::{HostSelector, Pool, Resources, Service};
use crate::types::{Arch, Digest, Hypervisor, Name};

/// What a host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capacity {
    pub vcpus: u32,
    pub memory: u64,
    pub gpus: u32,
}

impl Capacity {
    fn of(r: &Resources) -> Self {
        Capacity {
            vcpus: r.vcpus,
            memory: r.memory.0,
            gpus: r.gpus,
        }
    }

    fn add(&mut self, o: Capacity) {
        self.vcpus += o.vcpus;
        self.memory += o.memory;
        self.gpus += o.gpus;
    }

    fn sub(&mut self, o: Capacity) {
        self.vcpus = self.vcpus.saturating_sub(o.vcpus);
        self.memory = self.memory.saturating_sub(o.memory);
        self.gpus = self.gpus.saturating_sub(o.gpus);
    }
}

/// What a host reports about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInventory {
    pub id: String,
    pub address: String,
    pub arch: Arch,
    pub capacity: Capacity,
    pub hypervisors: Vec<Hypervisor>,
    pub labels: IndexMap<String, String>,
    /// Layer digest → bytes of that layer's chunks present in the host's store (a
    /// layer can be partly present: its chunks may have come with other layers).
    pub layers: HashMap<Digest, u64>,
}

impl HostInventory {
    /// A host with every hypervisor installed, no labels and no layers yet.
    pub fn new(
        id: impl Into<String>,
        address: impl Into<String>,
        arch: Arch,
        capacity: Capacity,
    ) -> Self {
        HostInventory {
            id: id.into(),
            address: address.into(),
            arch,
            capacity,
            hypervisors: Hypervisor::ALL.to_vec(),
            labels: IndexMap::new(),
            layers: HashMap::new(),
        }
    }

    /// Bytes of layer chunks the host holds, counted per layer (a chunk shared by two
    /// layers counts twice).
    pub fn layer_bytes(&self) -> u64 {
        self.layers.values().sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageLayer {
    pub digest: Digest,
    /// Total bytes of the layer's chunks.
    pub bytes: u64,
}

/// An image as placement sees it: its layers, bottom first.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ImageSpec {
    pub layers: Vec<ImageLayer>,
}

impl ImageSpec {
    pub fn bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.bytes).sum()
    }
}

/// One instance to place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// Which instances this is one of (`service.stack[--variant]`, see
    /// [`crate::model::instance_key`]): replicas of one key are spread.
    pub key: String,
    pub image: ImageSpec,
    pub resources: Resources,
    /// Guest architecture; `None` runs natively anywhere.
    pub arch: Option<Arch>,
    pub hypervisor: Option<Hypervisor>,
    /// Hosts it may run on (empty: any).
    pub hosts: HostSelector,
}

impl Workload {
    /// An instance of a (resolved) service with its image's layers.
    pub fn for_service(key: String, service: &Service, image: ImageSpec) -> Self {
        Workload {
            key,
            image,
            resources: service.resources,
            arch: service.arch,
            hypervisor: service.hypervisor,
            hosts: HostSelector::default(),
        }
    }
}

/// How layer locality is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalityModel {
    /// Bytes of the image's chunks on the host / bytes of the image.
    ChunkBytes,
    /// kube-scheduler's ImageLocality, for comparison: a host scores only if it holds
    /// the whole image; the image's size is scaled by the fraction of hosts holding it
    /// and clamped between 23 MB and 1000 MB, mapped to 0..1.
    KubeImageLocality,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub locality: LocalityModel,
    pub w_locality: f64,
    pub w_spread: f64,
    pub w_load: f64,
    pub w_emulation: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            locality: LocalityModel::ChunkBytes,
            w_locality: 1.0,
            // Above w_locality: a replica goes to a host without one whenever there is
            // such a host, and locality chooses among hosts with equal replica counts.
            w_spread: 1.1,
            w_load: 0.3,
            w_emulation: 0.5,
        }
    }
}

/// Why a host cannot take a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FilterReason {
    Down,
    Selector,
    Cpu {
        need: u32,
        free: u32,
    },
    Memory {
        need: u64,
        free: u64,
    },
    Gpu {
        need: u32,
        free: u32,
    },
    /// The requested hypervisor is not installed on the host.
    HypervisorMissing(Hypervisor),
    /// The requested hypervisor cannot run this guest architecture on this host.
    HypervisorCannotEmulate {
        hypervisor: Hypervisor,
        guest: Arch,
        host: Arch,
    },
    /// None of the host's hypervisors can run the workload.
    NoEligibleHypervisor {
        gpu: bool,
        guest: Option<Arch>,
        host: Arch,
    },
}

impl fmt::Display for FilterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FilterReason::Down => write!(f, "host is down"),
            FilterReason::Selector => write!(f, "host does not match the selector"),
            FilterReason::Cpu { need, free } => write!(f, "needs {need} vCPUs, {free} free"),
            FilterReason::Memory { need, free } => {
                write!(f, "needs {need} bytes of memory, {free} free")
            }
            FilterReason::Gpu { need, free } => write!(f, "needs {need} GPUs, {free} free"),
            FilterReason::HypervisorMissing(h) => write!(f, "{h} is not installed"),
            FilterReason::HypervisorCannotEmulate {
                hypervisor,
                guest,
                host,
            } => write!(
                f,
                "{hypervisor} cannot run {guest} guests on an {host} host"
            ),
            FilterReason::NoEligibleHypervisor { gpu, guest, host } => {
                write!(f, "no installed hypervisor can run it (")?;
                if gpu {
                    write!(f, "GPU needs cloud-hypervisor or qemu")?;
                }
                match guest {
                    Some(g) if g != host => {
                        if gpu {
                            write!(f, "; ")?;
                        }
                        write!(f, "{g} on {host} needs qemu")
                    }
                    _ => Ok(()),
                }?;
                write!(f, ")")
            }
        }
    }
}

/// How many hosts were filtered out, by reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FilterCounts {
    pub down: u32,
    pub selector: u32,
    pub cpu: u32,
    pub memory: u32,
    pub gpu: u32,
    pub hypervisor: u32,
}

impl FilterCounts {
    fn count(&mut self, r: FilterReason) {
        match r {
            FilterReason::Down => self.down += 1,
            FilterReason::Selector => self.selector += 1,
            FilterReason::Cpu { .. } => self.cpu += 1,
            FilterReason::Memory { .. } => self.memory += 1,
            FilterReason::Gpu { .. } => self.gpu += 1,
            _ => self.hypervisor += 1,
        }
    }
}

impl fmt::Display for FilterCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts = [
            (self.down, "down"),
            (self.selector, "not matching the selector"),
            (self.cpu, "short of vCPUs"),
            (self.memory, "short of memory"),
            (self.gpu, "short of GPUs"),
            (self.hypervisor, "without a suitable hypervisor"),
        ];
        let mut first = true;
        for (n, what) in parts {
            if n > 0 {
                let hosts = if n == 1 { "host" } else { "hosts" };
                write!(f, "{}{n} {hosts} {what}", if first { "" } else { ", " })?;
                first = false;
            }
        }
        if first {
            write!(f, "no hosts")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum PlaceError {
    #[error("hypervisor {hypervisor} cannot run {key}: {reason}")]
    ImpossibleOverride {
        key: String,
        hypervisor: Hypervisor,
        reason: String,
    },
    #[error("no host can run {key}: {counts}")]
    NoHost { key: String, counts: FilterCounts },
    #[error("unknown host {0:?}")]
    UnknownHost(String),
    #[error("unknown instance {0:?}")]
    UnknownInstance(String),
    #[error("instance {instance:?} is on host {host:?} already")]
    AlreadyThere { instance: String, host: String },
    #[error("instance {0:?} exists already")]
    DuplicateInstance(String),
    #[error("host {0:?} exists already")]
    DuplicateHost(String),
    #[error("pool {0:?} exists already")]
    DuplicatePool(Name),
    #[error("unknown pool {0:?}")]
    UnknownPool(Name),
}

/// A host's score and its parts (already weighted except `local_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ScoreBreakdown {
    /// Bytes of the image's chunks already on the host.
    pub local_bytes: u64,
    /// Locality in 0..1 under the policy's model, before weighting.
    pub locality: f64,
    /// Instances of the same workload already on the host.
    pub replicas: u32,
    /// max(CPU, memory) fraction in use after placing, 0..1.
    pub load: f64,
    pub emulated: bool,
    pub total: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Action {
    ColdBoot,
    /// Convert warm VM `vm` of `pool`, whose layers are the first `prefix_layers` of
    /// the image's.
    Convert {
        vm: u64,
        pool: Name,
        prefix_layers: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub host: String,
    pub hypervisor: Hypervisor,
    pub action: Action,
    pub score: ScoreBreakdown,
    /// Bytes of the image the host still has to fetch.
    pub fetch_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Verdict {
    Filtered(FilterReason),
    Scored {
        hypervisor: Hypervisor,
        score: ScoreBreakdown,
    },
}

/// Every host's verdict and the decision, for `tide deploy --explain`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    pub hosts: Vec<(String, Verdict)>,
    pub decision: Result<Placement, PlaceError>,
}

/// A warm VM, booted on a pool's layers and waiting to be converted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WarmVm {
    pub id: u64,
    pub pool: Name,
    pub host: String,
    pub hypervisor: Hypervisor,
}

/// A warm VM to boot to bring a pool back to its minimum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolBoot {
    pub pool: Name,
    pub vm: u64,
    pub placement: Placement,
}

/// One instance moved off a failed host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    pub instance: String,
    pub key: String,
    pub result: Result<Placement, PlaceError>,
}

/// What to do after a host went down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailoverPlan {
    pub moves: Vec<Move>,
    /// Warm VMs lost with the host.
    pub lost_warm: Vec<u64>,
    /// Warm VMs to boot elsewhere.
    pub boots: Vec<PoolBoot>,
}

#[derive(Debug, Clone)]
struct HostState {
    inv: HostInventory,
    /// Bit i: `Hypervisor::ALL[i]` is installed.
    hv_mask: u8,
    up: bool,
    used: Capacity,
    /// Layer id → position of this host in that layer's holder list.
    held: HashMap<u32, u32>,
}

#[derive(Debug, Clone)]
struct Instance {
    host: u32,
    workload: u32,
    reserved: Capacity,
}

#[derive(Debug, Clone)]
struct WorkloadState {
    spec: Workload,
    /// Host index → instances on it.
    replicas: HashMap<u32, u32>,
}

#[derive(Debug, Clone)]
struct PoolState {
    spec: Pool,
    image: ImageSpec,
    layer_ids: Vec<u32>,
    vms: Vec<u64>,
}

#[derive(Debug, Clone)]
struct WarmState {
    vm: WarmVm,
    host: u32,
    reserved: Capacity,
}

/// Per-host accumulators reused by every decision.
#[derive(Debug, Clone, Default)]
struct Scratch {
    local: Vec<u64>,
    full_layers: Vec<u32>,
    replicas: Vec<u32>,
    layer_ids: Vec<u32>,
    /// Hosts holding every layer of the image fully (for the kube baseline).
    whole_image_hosts: usize,
}

/// The scheduler's view of the hosts. See the module doc.
#[derive(Debug, Clone)]
pub struct Cluster {
    policy: Policy,
    hosts: Vec<HostState>,
    host_index: HashMap<String, u32>,
    layer_ids: HashMap<Digest, u32>,
    /// Layer id → (host index, bytes held).
    holders: Vec<Vec<(u32, u64)>>,
    workloads: Vec<WorkloadState>,
    workload_index: HashMap<String, u32>,
    instances: HashMap<String, Instance>,
    pools: IndexMap<Name, PoolState>,
    warm: IndexMap<u64, WarmState>,
    next_vm: u64,
    scratch: Scratch,
}

/// A decision's inputs with digests interned.
struct Prepared<'w> {
    w: &'w Workload,
    need: Capacity,
    image_bytes: u64,
    workload: Option<u32>,
}

impl Cluster {
    pub fn new(policy: Policy) -> Self {
        Cluster {
            policy,
            hosts: Vec::new(),
            host_index: HashMap::new(),
            layer_ids: HashMap::new(),
            holders: Vec::new(),
            workloads: Vec::new(),
            workload_index: HashMap::new(),
            instances: HashMap::new(),
            pools: IndexMap::new(),
            warm: IndexMap::new(),
            next_vm: 1,
            scratch: Scratch::default(),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Adds a host, or replaces the inventory of a known one (its instances stay; its
    /// layers are replaced by the report).
    pub fn upsert_host(&mut self, inv: HostInventory) {
        let idx = match self.host_index.get(&inv.id) {
            Some(&i) => {
                let held: Vec<u32> = self.hosts[i as usize].held.keys().copied().collect();
                for l in held {
                    self.set_layer(i, l, 0);
                }
                i
            }
            None => {
                let i = self.hosts.len() as u32;
                self.host_index.insert(inv.id.clone(), i);
                self.hosts.push(HostState {
                    inv: inv.clone(),
                    hv_mask: 0,
                    up: true,
                    used: Capacity::default(),
                    held: HashMap::new(),
                });
                i
            }
        };
        let h = &mut self.hosts[idx as usize];
        h.hv_mask = Hypervisor::ALL
            .iter()
            .enumerate()
            .filter(|(_, hv)| inv.hypervisors.contains(hv))
            .fold(0, |m, (i, _)| m | 1 << i);
        h.up = true;
        h.inv = HostInventory {
            layers: HashMap::new(),
            ..inv.clone()
        };
        for (d, bytes) in inv.layers {
            let l = self.intern(&d);
            self.set_layer(idx, l, bytes);
        }
    }

    /// The host's inventory as the scheduler knows it now (layers included).
    pub fn inventory(&self, id: &str) -> Option<HostInventory> {
        let &i = self.host_index.get(id)?;
        let h = &self.hosts[i as usize];
        let digests: HashMap<u32, &Digest> = self.layer_ids.iter().map(|(d, &l)| (l, d)).collect();
        let mut inv = h.inv.clone();
        inv.layers = h
            .held
            .iter()
            .map(|(&l, &pos)| {
                (
                    digests[&l].clone(),
                    self.holders[l as usize][pos as usize].1,
                )
            })
            .collect();
        Some(inv)
    }

    /// Capacity in use on a host (instances and warm VMs).
    pub fn used(&self, id: &str) -> Option<Capacity> {
        self.host_index
            .get(id)
            .map(|&i| self.hosts[i as usize].used)
    }

    /// Instances of a workload per host id.
    pub fn replicas(&self, key: &str) -> HashMap<String, u32> {
        let Some(&w) = self.workload_index.get(key) else {
            return HashMap::new();
        };
        self.workloads[w as usize]
            .replicas
            .iter()
            .map(|(&h, &n)| (self.hosts[h as usize].inv.id.clone(), n))
            .collect()
    }

    pub fn warm_vms(&self) -> impl Iterator<Item = &WarmVm> {
        self.warm.values().map(|w| &w.vm)
    }

    fn intern(&mut self, d: &Digest) -> u32 {
        if let Some(&l) = self.layer_ids.get(d) {
            return l;
        }
        let l = self.holders.len() as u32;
        self.layer_ids.insert(d.clone(), l);
        self.holders.push(Vec::new());
        l
    }

    /// Sets how many bytes of layer `l` host `h` holds, keeping the inverted index.
    fn set_layer(&mut self, h: u32, l: u32, bytes: u64) {
        let host = &mut self.hosts[h as usize];
        let list = &mut self.holders[l as usize];
        match (host.held.get(&l).copied(), bytes) {
            (Some(pos), 0) => {
                list.swap_remove(pos as usize);
                host.held.remove(&l);
                if let Some(&(moved, _)) = list.get(pos as usize) {
                    self.hosts[moved as usize].held.insert(l, pos);
                }
            }
            (Some(pos), b) => list[pos as usize].1 = b,
            (None, 0) => {}
            (None, b) => {
                host.held.insert(l, list.len() as u32);
                list.push((h, b));
            }
        }
    }

    /// Records that a host now holds `bytes` of a layer (e.g. after a fetch or GC).
    pub fn set_host_layer(
        &mut self,
        host: &str,
        layer: &Digest,
        bytes: u64,
    ) -> Result<(), PlaceError> {
        let &h = self
            .host_index
            .get(host)
            .ok_or_else(|| PlaceError::UnknownHost(host.to_owned()))?;
        let l = self.intern(layer);
        self.set_layer(h, l, bytes);
        Ok(())
    }

    /// Interns the image's layers into the scratch list (unknown digests get ids with
    /// no holders), and sizes the per-host accumulators.
    fn prepare<'w>(&mut self, w: &'w Workload) -> Prepared<'w> {
        let mut ids = std::mem::take(&mut self.scratch.layer_ids);
        ids.clear();
        for l in &w.image.layers {
            ids.push(self.intern(&l.digest));
        }
        self.scratch.layer_ids = ids;
        Prepared {
            w,
            need: Capacity::of(&w.resources),
            image_bytes: w.image.bytes(),
            workload: self.workload_index.get(&w.key).copied(),
        }
    }

    /// Adds up, per host, the image's bytes present, its fully present layers, and the
    /// workload's replicas.
    fn accumulate(&mut self, p: &Prepared<'_>) {
        let n = self.hosts.len();
        let s = &mut self.scratch;
        s.local.clear();
        s.local.resize(n, 0);
        s.full_layers.clear();
        s.full_layers.resize(n, 0);
        s.replicas.clear();
        s.replicas.resize(n, 0);
        for (layer, &l) in p.w.image.layers.iter().zip(&s.layer_ids) {
            for &(h, bytes) in &self.holders[l as usize] {
                s.local[h as usize] += bytes.min(layer.bytes);
                if bytes >= layer.bytes {
                    s.full_layers[h as usize] += 1;
                }
            }
        }
        let layers = p.w.image.layers.len() as u32;
        s.whole_image_hosts = s.full_layers.iter().filter(|&&f| f >= layers).count();
        if let Some(wi) = p.workload {
            for (&h, &c) in &self.workloads[wi as usize].replicas {
                s.replicas[h as usize] = c;
            }
        }
    }

    /// The hypervisor host `h` would use, or why none.
    fn hypervisor_for(&self, h: &HostState, w: &Workload) -> Result<Hypervisor, FilterReason> {
        let gpu = w.resources.gpus > 0;
        let foreign = w.arch.filter(|&a| a != h.inv.arch);
        let eligible =
            |hv: Hypervisor| (!gpu || hv.supports_gpu()) && (foreign.is_none() || hv.emulates());
        let installed = |hv: Hypervisor| {
            let i = Hypervisor::ALL.iter().position(|&x| x == hv).unwrap_or(0);
            h.hv_mask & (1 << i) != 0
        };
        if let Some(hv) = w.hypervisor {
            if !installed(hv) {
                return Err(FilterReason::HypervisorMissing(hv));
            }
            if let Some(guest) = foreign
                && !hv.emulates()
            {
                return Err(FilterReason::HypervisorCannotEmulate {
                    hypervisor: hv,
                    guest,
                    host: h.inv.arch,
                });
            }
            return Ok(hv);
        }
        Hypervisor::ALL
            .into_iter()
            .find(|&hv| installed(hv) && eligible(hv))
            .ok_or(FilterReason::NoEligibleHypervisor {
                gpu,
                guest: w.arch,
                host: h.inv.arch,
            })
    }

    /// Filters and scores host `hi`, counting `extra` (a warm VM's reservation it
    /// would release) as free. Reads the accumulators `accumulate` filled.
    fn evaluate(
        &self,
        hi: usize,
        p: &Prepared<'_>,
        extra: Capacity,
    ) -> Result<(Hypervisor, ScoreBreakdown), FilterReason> {
        let h = &self.hosts[hi];
        if !h.up {
            return Err(FilterReason::Down);
        }
        let sel = &p.w.hosts;
        if sel.arch.is_some_and(|a| a != h.inv.arch)
            || sel
                .labels
                .iter()
                .any(|(k, v)| h.inv.labels.get(k) != Some(v))
        {
            return Err(FilterReason::Selector);
        }
        let cap = h.inv.capacity;
        let mut used = h.used;
        used.sub(extra);
        let free_cpu = cap.vcpus.saturating_sub(used.vcpus);
        if p.need.vcpus > free_cpu {
            return Err(FilterReason::Cpu {
                need: p.need.vcpus,
                free: free_cpu,
            });
        }
        let free_mem = cap.memory.saturating_sub(used.memory);
        if p.need.memory > free_mem {
            return Err(FilterReason::Memory {
                need: p.need.memory,
                free: free_mem,
            });
        }
        let free_gpu = cap.gpus.saturating_sub(used.gpus);
        if p.need.gpus > free_gpu {
            return Err(FilterReason::Gpu {
                need: p.need.gpus,
                free: free_gpu,
            });
        }
        let hv = self.hypervisor_for(h, p.w)?;
        let s = &self.scratch;
        let local = s.local[hi];
        let locality = match self.policy.locality {
            LocalityModel::ChunkBytes if p.image_bytes > 0 => local as f64 / p.image_bytes as f64,
            LocalityModel::ChunkBytes => 1.0,
            LocalityModel::KubeImageLocality => self.kube_locality(hi, p),
        };
        let frac = |u: u64, c: u64| if c == 0 { 1.0 } else { u as f64 / c as f64 };
        let load = frac((used.vcpus + p.need.vcpus) as u64, cap.vcpus as u64)
            .max(frac(used.memory + p.need.memory, cap.memory));
        let replicas = s.replicas[hi];
        let emulated = p.w.arch.is_some_and(|a| a != h.inv.arch);
        let pol = &self.policy;
        let total = pol.w_locality * locality
            - pol.w_spread * replicas as f64
            - pol.w_load * load
            - if emulated { pol.w_emulation } else { 0.0 };
        Ok((
            hv,
            ScoreBreakdown {
                local_bytes: local,
                locality,
                replicas,
                load,
                emulated,
                total,
            },
        ))
    }

    /// kube-scheduler's ImageLocality for one image on one host: `0` unless the host
    /// holds every layer fully; else the image size times the fraction of hosts holding
    /// it, clamped to 23..1000 MB and mapped to 0..1.
    fn kube_locality(&self, hi: usize, p: &Prepared<'_>) -> f64 {
        const MIN: f64 = 23.0 * 1024.0 * 1024.0;
        const MAX: f64 = 1000.0 * 1024.0 * 1024.0;
        let layers = p.w.image.layers.len() as u32;
        let s = &self.scratch;
        if s.full_layers[hi] < layers {
            return 0.0;
        }
        let holding = s.whole_image_hosts as f64;
        let scaled = p.image_bytes as f64 * holding / self.hosts.len().max(1) as f64;
        (scaled.clamp(MIN, MAX) - MIN) / (MAX - MIN)
    }

    /// The impossible overrides, known before looking at any host.
    fn check_override(w: &Workload) -> Result<(), PlaceError> {
        if let Some(hv) = w.hypervisor
            && w.resources.gpus > 0
            && !hv.supports_gpu()
        {
            return Err(PlaceError::ImpossibleOverride {
                key: w.key.clone(),
                hypervisor: hv,
                reason: format!(
                    "it needs {} GPU(s) and {hv} has no GPU passthrough (use cloud-hypervisor or qemu)",
                    w.resources.gpus
                ),
            });
        }
        Ok(())
    }

    /// Decides where `w` runs. Changes nothing but scratch space.
    pub fn place(&mut self, w: &Workload) -> Result<Placement, PlaceError> {
        self.decide(w, None, true)
    }

    /// Like [`Cluster::place`], with every host's verdict.
    pub fn explain(&mut self, w: &Workload) -> Explanation {
        let mut hosts = Vec::with_capacity(self.hosts.len());
        let decision = self.decide(w, Some(&mut hosts), true);
        Explanation { hosts, decision }
    }

    fn decide(
        &mut self,
        w: &Workload,
        mut verdicts: Option<&mut Vec<(String, Verdict)>>,
        allow_convert: bool,
    ) -> Result<Placement, PlaceError> {
        Self::check_override(w)?;
        let p = self.prepare(w);
        self.accumulate(&p);
        let mut counts = FilterCounts::default();
        let mut best: Option<(usize, Hypervisor, ScoreBreakdown)> = None;
        for hi in 0..self.hosts.len() {
            let r = self.evaluate(hi, &p, Capacity::default());
            if let Some(v) = verdicts.as_deref_mut() {
                let verdict = match r {
                    Ok((hypervisor, score)) => Verdict::Scored { hypervisor, score },
                    Err(f) => Verdict::Filtered(f),
                };
                v.push((self.hosts[hi].inv.id.clone(), verdict));
            }
            match r {
                Ok((hv, s)) => {
                    if best.is_none_or(|(_, _, b)| s.total > b.total) {
                        best = Some((hi, hv, s));
                    }
                }
                Err(f) => counts.count(f),
            }
        }
        let convert = if allow_convert {
            self.best_conversion(&p)
        } else {
            None
        };
        let (hi, hv, score, action) = match (convert, best) {
            (Some((hi, hv, s, action)), _) => (hi, hv, s, action),
            (None, Some((hi, hv, s))) => (hi, hv, s, Action::ColdBoot),
            (None, None) => {
                return Err(PlaceError::NoHost {
                    key: w.key.clone(),
                    counts,
                });
            }
        };
        Ok(Placement {
            host: self.hosts[hi].inv.id.clone(),
            hypervisor: hv,
            action,
            fetch_bytes: p.image_bytes.saturating_sub(score.local_bytes),
            score,
        })
    }

    /// The warm VM to convert: its pool's layers must be an ordered prefix of the
    /// image's, its host must take the workload once the VM's reservation is released,
    /// and it must run the hypervisor the host would choose. Longest prefix wins, then
    /// the host's score, then the older VM.
    fn best_conversion(
        &self,
        p: &Prepared<'_>,
    ) -> Option<(usize, Hypervisor, ScoreBreakdown, Action)> {
        let ids = &self.scratch.layer_ids;
        let mut best: Option<(usize, usize, Hypervisor, ScoreBreakdown, Action)> = None;
        for (name, pool) in &self.pools {
            let k = pool.layer_ids.len();
            if pool.vms.is_empty() || k == 0 || k > ids.len() || ids[..k] != pool.layer_ids[..] {
                continue;
            }
            for vm in &pool.vms {
                let ws = &self.warm[vm];
                let Ok((hv, score)) = self.evaluate(ws.host as usize, p, ws.reserved) else {
                    continue;
                };
                if hv != ws.vm.hypervisor {
                    continue;
                }
                let better = best.as_ref().is_none_or(|(bk, _, _, bs, _)| {
                    k > *bk || (k == *bk && score.total > bs.total)
                });
                if better {
                    let action = Action::Convert {
                        vm: *vm,
                        pool: name.clone(),
                        prefix_layers: k,
                    };
                    best = Some((k, ws.host as usize, hv, score, action));
                }
            }
        }
        best.map(|(_, hi, hv, s, a)| (hi, hv, s, a))
    }

    /// Records a placement as instance `instance` of `w`: capacity is reserved, a
    /// converted warm VM leaves its pool, and the host fetches the image's missing
    /// bytes (it holds every layer fully afterwards). Returns the bytes fetched.
    pub fn commit(
        &mut self,
        instance: &str,
        w: &Workload,
        p: &Placement,
    ) -> Result<u64, PlaceError> {
        if self.instances.contains_key(instance) {
            return Err(PlaceError::DuplicateInstance(instance.to_owned()));
        }
        let &h = self
            .host_index
            .get(&p.host)
            .ok_or_else(|| PlaceError::UnknownHost(p.host.clone()))?;
        if let Action::Convert { vm, .. } = p.action {
            self.remove_warm(vm);
        }
        let fetched = self.fetch_image(h, &w.image);
        let wi = self.intern_workload(w);
        if self.workloads[wi as usize].spec != *w {
            self.workloads[wi as usize].spec = w.clone();
        }
        *self.workloads[wi as usize].replicas.entry(h).or_insert(0) += 1;
        let reserved = Capacity::of(&w.resources);
        self.hosts[h as usize].used.add(reserved);
        self.instances.insert(
            instance.to_owned(),
            Instance {
                host: h,
                workload: wi,
                reserved,
            },
        );
        Ok(fetched)
    }

    /// The workload's id, registering it on first sight.
    fn intern_workload(&mut self, w: &Workload) -> u32 {
        if let Some(&wi) = self.workload_index.get(&w.key) {
            return wi;
        }
        let wi = self.workloads.len() as u32;
        self.workload_index.insert(w.key.clone(), wi);
        self.workloads.push(WorkloadState {
            spec: w.clone(),
            replicas: HashMap::new(),
        });
        wi
    }

    /// Makes host `h` hold every layer of `image` fully; returns the bytes it lacked.
    fn fetch_image(&mut self, h: u32, image: &ImageSpec) -> u64 {
        let mut fetched = 0;
        for layer in &image.layers {
            let l = self.intern(&layer.digest);
            let have = self.hosts[h as usize]
                .held
                .get(&l)
                .map_or(0, |&pos| self.holders[l as usize][pos as usize].1);
            if have < layer.bytes {
                fetched += layer.bytes - have;
                self.set_layer(h, l, layer.bytes);
            }
        }
        fetched
    }

    /// Forgets an instance and releases its reservation. Its layers stay on the host.
    pub fn remove_instance(&mut self, instance: &str) -> Result<(), PlaceError> {
        let inst = self
            .instances
            .remove(instance)
            .ok_or_else(|| PlaceError::UnknownInstance(instance.to_owned()))?;
        self.hosts[inst.host as usize].used.sub(inst.reserved);
        let reps = &mut self.workloads[inst.workload as usize].replicas;
        if let Some(c) = reps.get_mut(&inst.host) {
            *c -= 1;
            if *c == 0 {
                reps.remove(&inst.host);
            }
        }
        Ok(())
    }

    /// Declares a warm pool with its resolved layers. Its VMs come from
    /// [`Cluster::replenish_pools`] or [`Cluster::add_warm_vm`].
    pub fn add_pool(&mut self, spec: Pool, image: ImageSpec) -> Result<(), PlaceError> {
        if self.pools.contains_key(&spec.name) {
            return Err(PlaceError::DuplicatePool(spec.name));
        }
        let layer_ids = image
            .layers
            .iter()
            .map(|l| self.intern(&l.digest))
            .collect();
        self.pools.insert(
            spec.name.clone(),
            PoolState {
                spec,
                image,
                layer_ids,
                vms: Vec::new(),
            },
        );
        Ok(())
    }

    /// Registers a warm VM that already runs (e.g. found at daemon start).
    pub fn add_warm_vm(
        &mut self,
        pool: &Name,
        host: &str,
        hypervisor: Hypervisor,
    ) -> Result<u64, PlaceError> {
        let &h = self
            .host_index
            .get(host)
            .ok_or_else(|| PlaceError::UnknownHost(host.to_owned()))?;
        let ps = self
            .pools
            .get_mut(pool)
            .ok_or_else(|| PlaceError::UnknownPool(pool.clone()))?;
        let reserved = Capacity::of(&ps.spec.resources);
        let id = self.next_vm;
        self.next_vm += 1;
        ps.vms.push(id);
        self.hosts[h as usize].used.add(reserved);
        self.warm.insert(
            id,
            WarmState {
                vm: WarmVm {
                    id,
                    pool: pool.clone(),
                    host: host.to_owned(),
                    hypervisor,
                },
                host: h,
                reserved,
            },
        );
        Ok(id)
    }

    /// Forgets a warm VM (converted or discarded outside a placement) and releases its
    /// reservation. Returns whether it was known.
    pub fn remove_warm_vm(&mut self, vm: u64) -> bool {
        let known = self.warm.contains_key(&vm);
        self.remove_warm(vm);
        known
    }

    /// Forgets a pool and its warm VMs (their reservations are released); returns the
    /// ids of the VMs it had.
    pub fn remove_pool(&mut self, pool: &Name) -> Result<Vec<u64>, PlaceError> {
        let vms = self
            .pools
            .get(pool)
            .ok_or_else(|| PlaceError::UnknownPool(pool.clone()))?
            .vms
            .clone();
        for &vm in &vms {
            self.remove_warm(vm);
        }
        self.pools.shift_remove(pool);
        Ok(vms)
    }

    fn remove_warm(&mut self, vm: u64) {
        if let Some(ws) = self.warm.shift_remove(&vm) {
            self.hosts[ws.host as usize].used.sub(ws.reserved);
            if let Some(p) = self.pools.get_mut(&ws.vm.pool) {
                p.vms.retain(|&v| v != vm);
            }
        }
    }

    /// Plans and records the warm VMs to boot so that every pool has at least `min`:
    /// each is placed like a workload of the pool's layers and resources (chunk
    /// locality, spread across hosts, the pool's host selector), never by conversion.
    /// A pool that cannot be refilled (no host fits) gets fewer boots.
    pub fn replenish_pools(&mut self) -> Vec<PoolBoot> {
        let mut boots = Vec::new();
        let names: Vec<Name> = self.pools.keys().cloned().collect();
        for name in names {
            let ps = &self.pools[&name];
            let missing = ps.spec.min.min(ps.spec.max) as usize;
            let missing = missing.saturating_sub(ps.vms.len());
            if missing == 0 {
                continue;
            }
            let w = Workload {
                key: format!("pool:{name}"),
                image: ps.image.clone(),
                resources: ps.spec.resources,
                arch: ps.spec.hosts.arch,
                hypervisor: None,
                hosts: ps.spec.hosts.clone(),
            };
            let wi = self.workload_of(&w);
            for _ in 0..missing {
                let Ok(placement) = self.decide(&w, None, false) else {
                    break;
                };
                let h = self.host_index[&placement.host];
                self.fetch_image(h, &w.image);
                *self.workloads[wi as usize].replicas.entry(h).or_insert(0) += 1;
                let vm = self
                    .add_warm_vm(&name, &placement.host, placement.hypervisor)
                    .expect("pool and host exist");
                boots.push(PoolBoot {
                    pool: name.clone(),
                    vm,
                    placement,
                });
            }
        }
        boots
    }

    /// The warm VMs of a pool count as replicas of `pool:NAME`, so replenishment
    /// spreads them; this resets that count to the pool's live VMs.
    fn workload_of(&mut self, w: &Workload) -> u32 {
        let wi = self.intern_workload(w);
        let pool = w.key.strip_prefix("pool:").unwrap_or_default();
        let mut reps = HashMap::new();
        for ws in self.warm.values().filter(|ws| ws.vm.pool.as_str() == pool) {
            *reps.entry(ws.host).or_insert(0) += 1;
        }
        self.workloads[wi as usize].replicas = reps;
        wi
    }

    /// Marks a host down and moves everything off it: each of its instances is placed
    /// again elsewhere (and committed under the same instance id, in id order so the
    /// plan is deterministic), its warm VMs are dropped and the pools refilled.
    pub fn fail_host(&mut self, id: &str) -> Result<FailoverPlan, PlaceError> {
        let &h = self
            .host_index
            .get(id)
            .ok_or_else(|| PlaceError::UnknownHost(id.to_owned()))?;
        self.hosts[h as usize].up = false;
        let lost_warm: Vec<u64> = self
            .warm
            .values()
            .filter(|w| w.host == h)
            .map(|w| w.vm.id)
            .collect();
        for &vm in &lost_warm {
            self.remove_warm(vm);
        }
        let mut victims: Vec<(String, u32)> = self
            .instances
            .iter()
            .filter(|(_, i)| i.host == h)
            .map(|(id, i)| (id.clone(), i.workload))
            .collect();
        victims.sort();
        let mut moves = Vec::new();
        for (inst, wi) in victims {
            self.remove_instance(&inst)?;
            let w = self.workloads[wi as usize].spec.clone();
            let result = self.place(&w);
            if let Ok(p) = &result {
                self.commit(&inst, &w, p)?;
            }
            moves.push(Move {
                instance: inst,
                key: w.key,
                result,
            });
        }
        let boots = self.replenish_pools();
        Ok(FailoverPlan {
            moves,
            lost_warm,
            boots,
        })
    }

    /// Moves `instance` off the host it is on while that host is up (a live move): to
    /// host `to`, or wherever placement would put it among the other hosts. Nothing
    /// changes unless a host can take it. No warm VM is converted: the instance brings
    /// its own root and volumes.
    pub fn move_instance(
        &mut self,
        instance: &str,
        to: Option<&str>,
    ) -> Result<Placement, PlaceError> {
        let inst = self
            .instances
            .get(instance)
            .ok_or_else(|| PlaceError::UnknownInstance(instance.to_owned()))?;
        let (from, wi) = (inst.host, inst.workload);
        let target = match to {
            Some(t) => Some(
                *self
                    .host_index
                    .get(t)
                    .ok_or_else(|| PlaceError::UnknownHost(t.to_owned()))?,
            ),
            None => None,
        };
        if target == Some(from) {
            return Err(PlaceError::AlreadyThere {
                instance: instance.to_owned(),
                host: self.hosts[from as usize].inv.id.clone(),
            });
        }
        let w = self.workloads[wi as usize].spec.clone();
        // Only the hosts it may go to take part: the others are out for this decision.
        let was: Vec<bool> = self.hosts.iter().map(|h| h.up).collect();
        for (i, h) in self.hosts.iter_mut().enumerate() {
            let i = i as u32;
            if i == from || target.is_some_and(|t| t != i) {
                h.up = false;
            }
        }
        let decided = self.decide(&w, None, false);
        for (h, up) in self.hosts.iter_mut().zip(was) {
            h.up = up;
        }
        let p = decided?;
        self.remove_instance(instance)?;
        self.commit(instance, &w, &p)?;
        Ok(p)
    }

    /// Marks a host down without moving anything off it: no new placement goes there
    /// until [`Cluster::upsert_host`] or [`Cluster::host_up`] (a host that has not
    /// reconnected yet after the daemon restarted). [`Cluster::fail_host`] moves its
    /// instances if it does not come back.
    pub fn mark_down(&mut self, id: &str) -> Result<(), PlaceError> {
        let &h = self
            .host_index
            .get(id)
            .ok_or_else(|| PlaceError::UnknownHost(id.to_owned()))?;
        self.hosts[h as usize].up = false;
        Ok(())
    }

    /// Brings a failed host back (empty of instances; its layers as last known).
    pub fn host_up(&mut self, id: &str) -> Result<(), PlaceError> {
        let &h = self
            .host_index
            .get(id)
            .ok_or_else(|| PlaceError::UnknownHost(id.to_owned()))?;
        self.hosts[h as usize].up = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ByteSize;

    const MB: u64 = 1 << 20;
    const GB: u64 = 1 << 30;

    fn digest(n: u32) -> Digest {
        Digest::new(&format!("sha256:{n:064x}")).unwrap()
    }

    fn host(id: &str, layers: &[(u32, u64)]) -> HostInventory {
        let mut h = HostInventory::new(
            id,
            format!("{id}:7000"),
            Arch::X86_64,
            Capacity {
                vcpus: 16,
                memory: 64 * GB,
                gpus: 0,
            },
        );
        h.layers = layers.iter().map(|&(d, b)| (digest(d), b)).collect();
        h
    }

    fn image(layers: &[(u32, u64)]) -> ImageSpec {
        ImageSpec {
            layers: layers
                .iter()
                .map(|&(d, bytes)| ImageLayer {
                    digest: digest(d),
                    bytes,
                })
                .collect(),
        }
    }

    fn workload(key: &str, layers: &[(u32, u64)]) -> Workload {
        Workload {
            key: key.into(),
            image: image(layers),
            resources: Resources {
                vcpus: 1,
                memory: ByteSize(GB),
                gpus: 0,
            },
            arch: None,
            hypervisor: None,
            hosts: HostSelector::default(),
        }
    }

    fn cluster(hosts: Vec<HostInventory>) -> Cluster {
        let mut c = Cluster::new(Policy::default());
        for h in hosts {
            c.upsert_host(h);
        }
        c
    }

    const IMG: [(u32, u64); 3] = [(1, 100 * MB), (2, 300 * MB), (3, 50 * MB)];

    #[test]
    fn prefers_the_host_with_the_most_chunk_bytes() {
        // b holds the big layer only partly (shared chunks), but more bytes than a,
        // which holds two small layers fully. Image-level locality would see neither.
        let mut c = cluster(vec![
            host("a", &[(1, 100 * MB), (3, 50 * MB)]),
            host("b", &[(2, 250 * MB)]),
            host("c", &[]),
        ]);
        let w = workload("api.shop", &IMG);
        let p = c.place(&w).unwrap();
        assert_eq!(p.host, "b");
        assert_eq!(p.score.local_bytes, 250 * MB);
        assert_eq!(p.fetch_bytes, 200 * MB);
        assert_eq!(p.action, Action::ColdBoot);
        // After the commit b holds the whole image.
        assert_eq!(c.commit("i1", &w, &p).unwrap(), 200 * MB);
        assert_eq!(c.inventory("b").unwrap().layer_bytes(), 450 * MB);
    }

    #[test]
    fn spread_moves_replicas_to_other_hosts() {
        let mut c = cluster(vec![
            host("a", &IMG),
            host("b", &[(1, 100 * MB), (2, 300 * MB)]),
            host("c", &[]),
        ]);
        let w = workload("api.shop", &IMG);
        let mut hosts = Vec::new();
        for i in 0..3 {
            let p = c.place(&w).unwrap();
            c.commit(&format!("i{i}"), &w, &p).unwrap();
            hosts.push(p.host);
        }
        assert_eq!(hosts, ["a", "b", "c"]);
        // Another workload with the same image is not penalised by these replicas.
        let p = c.place(&workload("other.shop", &IMG)).unwrap();
        assert_eq!(p.score.replicas, 0);
    }

    fn pool(name: &str, min: u32) -> Pool {
        Pool {
            name: Name::new(name).unwrap(),
            layers: crate::stack::PoolLayers::Digests(vec![]),
            min,
            max: min.max(1),
            resources: Resources::default(),
            hosts: HostSelector::default(),
        }
    }

    #[test]
    fn converts_the_warm_vm_with_the_longest_prefix_and_replenishes() {
        let mut c = cluster(vec![
            host("a", &[]),
            host("b", &[]),
            host("c", &[(1, 100 * MB), (2, 300 * MB), (3, 50 * MB)]),
        ]);
        c.add_pool(pool("base", 1), image(&IMG[..1])).unwrap();
        c.add_pool(pool("base-fw", 1), image(&IMG[..2])).unwrap();
        // Layers 1 and 3: a subset of the image's, but not a prefix.
        c.add_pool(pool("gap", 1), image(&[IMG[0], IMG[2]]))
            .unwrap();
        let boots = c.replenish_pools();
        assert_eq!(boots.len(), 3);
        let fw_vm = boots
            .iter()
            .find(|b| b.pool.as_str() == "base-fw")
            .unwrap()
            .vm;
        let w = workload("api.shop", &IMG);
        let p = c.place(&w).unwrap();
        match &p.action {
            Action::Convert {
                vm,
                pool,
                prefix_layers,
            } => {
                assert_eq!((*vm, pool.as_str(), *prefix_layers), (fw_vm, "base-fw", 2));
            }
            a => panic!("expected a conversion, got {a:?}"),
        }
        c.commit("i1", &w, &p).unwrap();
        assert_eq!(
            c.warm_vms()
                .filter(|v| v.pool.as_str() == "base-fw")
                .count(),
            0
        );
        let again = c.replenish_pools();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].pool.as_str(), "base-fw");
        // An image that only the non-prefix pool's layers cover is cold-booted.
        let mut c2 = cluster(vec![host("a", &[])]);
        c2.add_pool(pool("gap", 1), image(&[IMG[0], IMG[2]]))
            .unwrap();
        c2.replenish_pools();
        let p = c2.place(&w).unwrap();
        assert_eq!(p.action, Action::ColdBoot);
    }

    #[test]
    fn removing_pools_and_warm_vms_frees_their_reservations_and_down_hosts_get_nothing() {
        let mut c = cluster(vec![host("a", &[]), host("b", &[])]);
        c.add_pool(pool("base", 2), image(&IMG[..1])).unwrap();
        let boots = c.replenish_pools();
        assert_eq!(boots.len(), 2);
        let reserved = |c: &Cluster| c.used("a").unwrap().vcpus + c.used("b").unwrap().vcpus;
        assert_eq!(reserved(&c), 2);
        assert!(c.remove_warm_vm(boots[0].vm));
        assert!(!c.remove_warm_vm(boots[0].vm));
        assert_eq!(reserved(&c), 1);
        assert_eq!(
            c.remove_pool(&Name::new("base").unwrap()).unwrap(),
            vec![boots[1].vm]
        );
        assert_eq!(reserved(&c), 0);
        assert_eq!(c.warm_vms().count(), 0);
        assert!(c.remove_pool(&Name::new("base").unwrap()).is_err());
        // A host marked down keeps its instances but gets no new ones.
        let w = workload("web.shop", &IMG);
        let p = c.place(&w).unwrap();
        assert_eq!(p.host, "a");
        c.commit("i0", &w, &p).unwrap();
        c.mark_down("b").unwrap();
        let p = c.place(&w).unwrap();
        assert_eq!(p.host, "a", "spread would pick b, but b is down");
        assert_eq!(c.replicas("web.shop")["a"], 1);
        assert!(c.mark_down("nope").is_err());
    }

    #[test]
    fn hypervisor_choice_and_overrides() {
        let mut gpu_host = host("gpu", &[]);
        gpu_host.capacity.gpus = 2;
        let mut arm = host("arm", &[]);
        arm.arch = Arch::Aarch64;
        arm.hypervisors = vec![Hypervisor::Firecracker];
        let mut c = cluster(vec![host("plain", &[]), gpu_host, arm]);
        let mut w = workload("web.shop", &IMG);
        let p = c.place(&w).unwrap();
        assert_eq!(p.hypervisor, Hypervisor::Firecracker);

        w.resources.gpus = 1;
        let p = c.place(&w).unwrap();
        assert_eq!(
            (p.host.as_str(), p.hypervisor),
            ("gpu", Hypervisor::CloudHypervisor)
        );

        w.hypervisor = Some(Hypervisor::Qemu);
        assert_eq!(c.place(&w).unwrap().hypervisor, Hypervisor::Qemu);

        w.hypervisor = Some(Hypervisor::Firecracker);
        let e = c.place(&w).unwrap_err();
        assert!(matches!(e, PlaceError::ImpossibleOverride { .. }), "{e}");
        assert!(e.to_string().contains("no GPU passthrough"), "{e}");

        // An aarch64 guest: native on the arm host with Firecracker, or emulated by
        // QEMU elsewhere (penalised).
        let mut w = workload("arm.shop", &IMG);
        w.arch = Some(Arch::Aarch64);
        let p = c.place(&w).unwrap();
        assert_eq!(
            (p.host.as_str(), p.hypervisor),
            ("arm", Hypervisor::Firecracker)
        );
        let x = c.explain(&w);
        let plain = &x.hosts.iter().find(|(h, _)| h == "plain").unwrap().1;
        assert!(
            matches!(plain, Verdict::Scored { hypervisor: Hypervisor::Qemu, score } if score.emulated)
        );
        // Firecracker pinned for an aarch64 guest: only the arm host qualifies, and
        // the others say why.
        w.hypervisor = Some(Hypervisor::Firecracker);
        c.fail_host("arm").unwrap();
        let x = c.explain(&w);
        let e = x.decision.unwrap_err();
        assert!(matches!(e, PlaceError::NoHost { .. }));
        assert_eq!(
            e.to_string(),
            "no host can run arm.shop: 1 host down, 2 hosts without a suitable hypervisor"
        );
        let reason = &x.hosts.iter().find(|(h, _)| h == "plain").unwrap().1;
        assert_eq!(
            reason,
            &Verdict::Filtered(FilterReason::HypervisorCannotEmulate {
                hypervisor: Hypervisor::Firecracker,
                guest: Arch::Aarch64,
                host: Arch::X86_64
            })
        );
    }

    #[test]
    fn capacity_filters_name_what_is_short() {
        let mut c = cluster(vec![host("a", &[])]);
        let mut w = workload("big.shop", &IMG);
        w.resources.memory = ByteSize(128 * GB);
        let x = c.explain(&w);
        assert_eq!(
            x.hosts[0].1,
            Verdict::Filtered(FilterReason::Memory {
                need: 128 * GB,
                free: 64 * GB
            })
        );
        assert_eq!(
            x.decision.unwrap_err().to_string(),
            "no host can run big.shop: 1 host short of memory"
        );
    }

    #[test]
    fn failed_host_instances_are_rescheduled_elsewhere() {
        let mut c = cluster(vec![
            host("a", &IMG),
            host("b", &[(1, 100 * MB)]),
            host("c", &[]),
        ]);
        c.add_pool(pool("base", 1), image(&IMG[..1])).unwrap();
        let w = workload("api.shop", &IMG);
        for i in 0..2 {
            // The first may convert the warm VM (its layer is a prefix of the image's).
            c.replenish_pools();
            let p = c.place(&w).unwrap();
            c.commit(&format!("i{i}"), &w, &p).unwrap();
        }
        c.replenish_pools();
        let on_a = c.replicas("api.shop").get("a").copied().unwrap_or(0);
        assert!(on_a >= 1);
        let plan = c.fail_host("a").unwrap();
        assert_eq!(plan.moves.len() as u32, on_a);
        for m in &plan.moves {
            let p = m.result.as_ref().unwrap();
            assert_ne!(p.host, "a");
        }
        assert!(!c.replicas("api.shop").contains_key("a"));
        assert_eq!(c.replicas("api.shop").values().sum::<u32>(), 2);
        assert_eq!(c.used("a").unwrap(), Capacity::default());
        // The pool is back at its minimum, on a live host.
        assert_eq!(c.warm_vms().count(), 1);
        assert!(c.warm_vms().all(|v| v.host != "a"));
    }

    #[test]
    fn a_live_move_goes_elsewhere_or_where_asked_and_changes_nothing_when_it_cannot() {
        let mut c = cluster(vec![
            host("a", &IMG),
            host("b", &[(1, 100 * MB)]),
            host("c", &[]),
        ]);
        let w = workload("api.shop", &IMG);
        let p = c.place(&w).unwrap();
        assert_eq!(p.host, "a", "the host with the image");
        c.commit("i0", &w, &p).unwrap();
        let used_a = c.used("a").unwrap();
        // Placement's choice among the others: b holds a layer of it.
        let m = c.move_instance("i0", None).unwrap();
        assert_eq!(m.host, "b");
        assert_eq!(m.action, Action::ColdBoot);
        assert_eq!(c.replicas("api.shop").get("b"), Some(&1));
        assert!(!c.replicas("api.shop").contains_key("a"));
        assert_eq!(c.used("a").unwrap(), Capacity::default());
        assert_eq!(c.used("b").unwrap(), used_a);
        // Where asked, even a host with nothing of it.
        assert_eq!(c.move_instance("i0", Some("c")).unwrap().host, "c");
        let e = c.move_instance("i0", Some("c")).unwrap_err();
        assert!(matches!(e, PlaceError::AlreadyThere { .. }), "{e}");
        assert!(matches!(
            c.move_instance("i0", Some("zz")),
            Err(PlaceError::UnknownHost(_))
        ));
        assert!(matches!(
            c.move_instance("nope", None),
            Err(PlaceError::UnknownInstance(_))
        ));
        // With the other hosts down nothing can take it: it stays, and all hosts are as
        // they were (down ones still down, its own still up).
        c.mark_down("a").unwrap();
        c.mark_down("b").unwrap();
        assert!(matches!(
            c.move_instance("i0", None),
            Err(PlaceError::NoHost { .. })
        ));
        assert_eq!(c.replicas("api.shop").get("c"), Some(&1));
        assert_eq!(c.place(&w).unwrap().host, "c", "c is still up");
        c.host_up("a").unwrap();
        assert_eq!(c.move_instance("i0", None).unwrap().host, "a");
    }

    #[test]
    fn kube_image_locality_ignores_partial_images() {
        let mut c = Cluster::new(Policy {
            locality: LocalityModel::KubeImageLocality,
            ..Policy::default()
        });
        c.upsert_host(host("partial", &[(2, 300 * MB)]));
        c.upsert_host(host("whole", &IMG));
        c.upsert_host(host("none", &[]));
        let w = workload("api.shop", &IMG);
        let x = c.explain(&w);
        let loc = |id: &str| match &x.hosts.iter().find(|(h, _)| h == id).unwrap().1 {
            Verdict::Scored { score, .. } => score.locality,
            v => panic!("{v:?}"),
        };
        assert_eq!(loc("partial"), 0.0);
        assert_eq!(loc("none"), 0.0);
        // 450 MB held by 1 of 3 hosts: 150 MB scaled, (150 - 23) / (1000 - 23).
        assert!(
            (loc("whole") - 127.0 / 977.0).abs() < 1e-9,
            "{}",
            loc("whole")
        );
    }

    #[test]
    fn upsert_replaces_reported_layers_and_keeps_the_index_consistent() {
        let mut c = cluster(vec![host("a", &IMG), host("b", &IMG)]);
        c.upsert_host(host("a", &[(1, 10 * MB)]));
        let w = workload("x", &IMG);
        let x = c.explain(&w);
        let local: Vec<u64> = x
            .hosts
            .iter()
            .map(|(_, v)| match v {
                Verdict::Scored { score, .. } => score.local_bytes,
                v => panic!("{v:?}"),
            })
            .collect();
        assert_eq!(local, [10 * MB, 450 * MB]);
        assert_eq!(c.inventory("b").unwrap().layers.len(), 3);
    }
}
