//! What the scheduler keeps, as serde records, one JSON value per key, in the store
//! [`crate::store`] picks: a [`castore::Kv`] at `DATA/state`, or etcd under
//! `PREFIX/state/`.
//!
//! | key | value |
//! |---|---|
//! | `stack/NAME` | [`StoredFile`]: the stack file's name and TOML text, re-parsed at load |
//! | `variant/STACK/NAME` | [`sched::stack::Variant`] |
//! | `alias/DOMAIN` | the target, as text |
//! | `pool/NAME` | [`PoolRec`] |
//! | `instance/ID` | [`InstanceRec`] |
//! | `host/ID` | [`HostRec`]: the last inventory a host reported |
//! | `warm/ID` | [`WarmRec`] |
//!
//! Every change a call makes is one [`Batch`], written atomically after the hosts
//! answered and durable before the call returns: a crash loses no acknowledged change
//! and leaves no half of one.

use std::collections::BTreeMap;

use sched::placement::{HostInventory, ImageLayer, ImageSpec, Workload};
use sched::stack::{Pool, Resources, Variant};
use sched::types::{Hypervisor, Name};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A stack file as deployed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredFile {
    pub file: String,
    pub source: String,
}

/// A volume an instance mounts (the wire's `VolumeRequest`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeReq {
    pub name: String,
    pub size: u64,
    /// "rwo", "rwx" or "rox".
    pub mode: String,
    pub per_instance: bool,
    pub mount_path: String,
}

/// Everything a host needs to prepare one instance (the wire's `InstanceSpec`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    pub instance: String,
    pub key: String,
    pub ordinal: u32,
    pub image: String,
    pub hypervisor: Hypervisor,
    pub resources: Resources,
    pub env: Vec<(String, String)>,
    pub volumes: Vec<VolumeReq>,
    /// The host's warm VM to convert, or "".
    pub warm_vm: String,
    /// The guest port its service listens on.
    #[serde(default)]
    pub port: Option<u16>,
    /// Replaces the image's entrypoint (and cmd).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Replaces the image's cmd.
    #[serde(default)]
    pub args: Option<Vec<String>>,
    /// Where the services it depends on answer.
    #[serde(default)]
    pub links: Vec<LinkRec>,
    /// It was moved off a host that went down: its host must not create a volume it
    /// lacks empty, only from the chunk tier's last pushed snapshot.
    #[serde(default)]
    pub moved: bool,
}

/// Where a service an instance depends on answers (the wire's `Link`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRec {
    pub service: String,
    pub host: String,
    pub port: u16,
}

/// An instance's VM as its host reports it (the wire's `GuestState`; times in Unix
/// milliseconds, 0 until they happen).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GuestRec {
    /// "" (its host boots no VM), "booting", "running", "exited", "failed".
    pub phase: String,
    pub launched: u64,
    pub booted: u64,
    pub started: u64,
    pub answered: u64,
    pub ended: u64,
    pub exit_code: i32,
    pub exit_signal: i32,
    pub reason: String,
    pub pid: u32,
    pub restarts: u32,
    #[serde(default)]
    pub storage_ms: u32,
    #[serde(default)]
    pub converted: u64,
}

/// What a host reported for a prepared instance (the wire's `PreparedInstance`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Prepared {
    pub instance: String,
    pub root: String,
    pub image: String,
    pub volumes: Vec<String>,
    pub hypervisor: String,
    pub warm_vm: String,
    /// The block devices its host serves it to boot from (the wire's `BootSpec.disks`;
    /// records of an earlier version have none).
    #[serde(default)]
    pub disks: Vec<Disk>,
    /// HOST:PORT forwarded to its service port, or "".
    #[serde(default)]
    pub address: String,
    /// Its VM, as last reported.
    #[serde(default)]
    pub guest: GuestRec,
    /// Volumes its host made from the chunk tier's last pushed snapshot (a move).
    #[serde(default)]
    pub pulled: Vec<PulledRec>,
}

/// A volume made from the tier for an instance (the wire's `PulledVolume`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PulledRec {
    pub volume: String,
    pub snapshot: String,
    /// When the snapshot was pushed (seconds since the epoch).
    pub pushed: u64,
    /// The host that pushed it.
    pub host: String,
    pub manifest: String,
}

/// One of an instance's block devices (the wire's `BootDisk`), kept to show.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Disk {
    pub role: String,
    pub export: String,
    pub uri: String,
    pub read_only: bool,
    pub size: u64,
    pub layer: String,
    pub mount_path: String,
}

/// Where an instance stands. "pending" (its host has not reconnected) is not stored: it
/// is derived when the instance is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstState {
    /// Prepared on its host.
    Ready,
    /// Prepared on another host after its first host went down, or moved there live
    /// (`tide instance move`).
    Moved,
    /// Its host went down and no other host could take it.
    Lost,
}

impl InstState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstState::Ready => "ready",
            InstState::Moved => "moved",
            InstState::Lost => "lost",
        }
    }
}

/// One placed instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRec {
    pub id: String,
    pub key: String,
    pub stack: Name,
    pub variant: Option<Name>,
    pub service: Name,
    pub host: String,
    pub state: InstState,
    pub spec: Spec,
    /// What placement saw, so a restarted daemon re-enters it into the cluster.
    pub workload: Workload,
    /// What the deploy asked for (image, env, resources, volumes, hypervisor request):
    /// a redeploy replaces instances whose fingerprint changed.
    pub fingerprint: String,
    pub prepared: Prepared,
}

/// An image a host's store holds, with its layers (from the host's inventory).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRec {
    pub name: String,
    pub digest: String,
    pub layers: Vec<ImageLayer>,
}

impl ImageRec {
    pub fn spec(&self) -> ImageSpec {
        ImageSpec {
            layers: self.layers.clone(),
        }
    }
}

/// A host's last report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRec {
    pub inventory: HostInventory,
    pub images: Vec<ImageRec>,
    /// Unix seconds of its last registration or heartbeat.
    pub last_seen: u64,
    /// False once it missed heartbeats for the timeout.
    pub up: bool,
}

/// A warm pool: its spec, the layers it was resolved to, and the image booted for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolRec {
    pub pool: Pool,
    pub image: ImageSpec,
    /// NAME:TAG or digest handed to `Host.bootWarm` ("" when no known image has exactly
    /// the pool's layers; the host then decides).
    pub boot_image: String,
}

/// A warm VM a host booted for a pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WarmRec {
    pub id: String,
    pub pool: Name,
    pub host: String,
    pub hypervisor: Hypervisor,
    pub image: String,
    pub layers: Vec<String>,
    pub root: String,
}

pub fn stack_key(name: &str) -> String {
    format!("stack/{name}")
}
pub fn variant_key(stack: &str, name: &str) -> String {
    format!("variant/{stack}/{name}")
}
pub fn alias_key(domain: &str) -> String {
    format!("alias/{domain}")
}
pub fn pool_key(name: &str) -> String {
    format!("pool/{name}")
}
pub fn instance_key(id: &str) -> String {
    format!("instance/{id}")
}
pub fn host_key(id: &str) -> String {
    format!("host/{id}")
}
pub fn warm_key(id: &str) -> String {
    format!("warm/{id}")
}

/// The kinds of record, by key prefix: a stored key outside them is not the
/// scheduler's.
pub const KINDS: [&str; 7] = [
    "stack/",
    "variant/",
    "alias/",
    "pool/",
    "instance/",
    "host/",
    "warm/",
];

/// One call's changes, applied all or nothing: puts and deletes in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Each key with its new value, `None` to delete it.
    pub ops: Vec<(String, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }
    pub fn put(&mut self, key: impl Into<String>, value: Vec<u8>) {
        self.ops.push((key.into(), Some(value)));
    }
    pub fn delete(&mut self, key: impl Into<String>) {
        self.ops.push((key.into(), None));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Every record, by key, as a store holds them.
pub type Records = BTreeMap<String, Vec<u8>>;

/// Puts `value` as JSON under `key` in `batch`.
pub fn put<T: Serialize>(batch: &mut Batch, key: &str, value: &T) {
    let json = serde_json::to_vec(value).expect("records serialize");
    batch.put(key, json);
}

/// Every record under `prefix` (`"stack/"`, ...), decoded, with the rest of its key.
pub fn scan<T: DeserializeOwned>(records: &Records, prefix: &str) -> Result<Vec<(String, T)>> {
    records
        .range(prefix.to_owned()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .map(|(key, v)| {
            let value = serde_json::from_slice(v).map_err(|e| Error::Record {
                key: key.clone(),
                reason: e.to_string(),
            })?;
            Ok((key[prefix.len()..].to_owned(), value))
        })
        .collect()
}

/// Variants are stored as their domain type.
pub type StoredVariant = Variant;
