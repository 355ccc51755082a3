//! volumed as a scheduler's host: what it says about itself (its [`HostConfig`] and the
//! store's inventory) and the instances and warm VMs it prepares for the scheduler.
//!
//! **Instances.** `prepare` attaches an instance's volumes (persistent attachments held
//! by the instance id, so access modes apply across instances), makes its scratch
//! device (a clone of a formatted ext4 template, attached the same way: see
//! [`crate::scratch`]), checks that every layer of its image has an EROFS image (see
//! [`crate::layers`]), and mounts its root (its image plus a fresh scratch layer, for
//! the host's own view) at `DATA/instances/ID/root`. Its [`BootSpec`] lists the block
//! devices a guest boots from: the layer exports bottom first, the scratch device, the
//! volumes. A warm VM (`DATA/warm/ID/root`) is converted by handing its root to the
//! instance. Nothing is launched: the hypervisor is recorded for a launcher of a later
//! version.
//!
//! **Records.** Prepared instances and warm VMs are recorded in `DATA/instances.json`
//! (temporary file, fsync, rename, directory fsync). A restarted volumed mounts their
//! roots again (scratch never survives a restart, so a root comes back as its image
//! was) and keeps their volume attachments (recorded by [`Volumes`]).
//!
//! Every operation is idempotent by id and runs on a blocking thread; one lock
//! serialises them, so two calls for one id never interleave.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use castore::{AccessMode, Digest, Store, VolumeError, VolumeSpec};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::exports::layer_export;
use crate::guests::{GuestStatus, Guests, Launch};
use crate::layers::Layers;
use crate::log;
use crate::mounts::MountTable;
use crate::scratch::Scratch;
use crate::server::{mount_image, unmount_now};
use crate::volumes::Volumes;

/// Hypervisors by preference: the first eligible one is chosen when the scheduler
/// leaves the choice to the host. (name, supports GPUs)
const HYPERVISORS: [(&str, bool); 3] = [
    ("firecracker", false),
    ("cloud-hypervisor", true),
    ("qemu", true),
];

/// `PATH` of a guest's app when its image sets none (Docker's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A guest's memory when its service gives none.
const DEFAULT_GUEST_MEMORY: u64 = 512 << 20;

/// How long a stopped guest's app has to exit after SIGTERM.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(10);

/// The env names a dependent instance finds a service at: `DB_HOST` and `DB_PORT` for
/// `db` (upper-cased, `-` as `_`).
pub(crate) fn link_vars(service: &str) -> (String, String) {
    let n = service.to_ascii_uppercase().replace('-', "_");
    (format!("{n}_HOST"), format!("{n}_PORT"))
}

/// An address as this host's guests reach it: the host's own loopback is the user
/// network's gateway inside a guest.
pub(crate) fn guest_view_of(host: &str) -> String {
    let loopback = host == "localhost"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_loopback());
    if loopback {
        vmm::qemu::USER_NET_GATEWAY.to_string()
    } else {
        host.to_string()
    }
}

/// What the host offers, as configured on volumed's command line.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostConfig {
    pub(crate) host_id: String,
    pub(crate) address: String,
    pub(crate) arch: String,
    pub(crate) vcpus: u32,
    pub(crate) memory: u64,
    pub(crate) gpus: u32,
    pub(crate) hypervisors: Vec<String>,
    pub(crate) labels: Vec<(String, String)>,
}

/// Parses `KEY=VALUE`.
pub(crate) fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("label {s:?}: expected KEY=VALUE")),
    }
}

/// The host id kept in `DATA/host-id`, generated on first use (the machine's host name
/// and 32 random bits, so two hosts with one name still differ).
pub(crate) fn persistent_host_id(data: &Path) -> std::io::Result<String> {
    let path = data.join("host-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "host".into());
    let mut random = [0u8; 4];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut random)?;
    let id = format!("{name}-{:08x}", u32::from_le_bytes(random));
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{id}\n"))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(id)
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
pub(crate) fn total_memory() -> std::io::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    text.lines()
        .find_map(|l| {
            let kib = l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?;
            kib.trim().parse::<u64>().ok()
        })
        .map(|kib| kib * 1024)
        .ok_or_else(|| std::io::Error::other("no MemTotal line"))
}

/// The hypervisors this host can launch guests with, in the scheduler's preference
/// order.
pub(crate) fn detect_hypervisors() -> Vec<String> {
    // Only what a driver here can launch (crates/vmm): QEMU when its binary runs.
    // Firecracker and cloud-hypervisor have no driver yet (they need KVM, which the
    // machines this is built on cannot use), so a binary of theirs on PATH is said and
    // not advertised.
    let mut found = Vec::new();
    if vmm::qemu::Qemu::default().available() {
        found.push("qemu".to_string());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["firecracker", "cloud-hypervisor"] {
        if std::env::split_paths(&path).any(|d| d.join(name).is_file()) {
            log!("{name} is on PATH but volumed has no driver for it: not advertised");
        }
    }
    found
}

/// A volume an instance asks for (a validated `VolumeRequest`).
#[derive(Debug, Clone)]
pub(crate) struct VolumeRequest {
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) mode: AccessMode,
    pub(crate) per_instance: bool,
    pub(crate) mount_path: String,
}

/// Where a service the instance depends on answers (a validated `Link`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    pub(crate) service: String,
    pub(crate) host: String,
    pub(crate) port: u16,
}

/// What the scheduler asks a host to prepare (a validated `InstanceSpec`).
#[derive(Debug, Clone)]
pub(crate) struct InstanceSpec {
    pub(crate) instance: String,
    pub(crate) key: String,
    pub(crate) ordinal: u32,
    pub(crate) image: String,
    pub(crate) hypervisor: String,
    pub(crate) vcpus: u32,
    pub(crate) memory: u64,
    pub(crate) gpus: u32,
    pub(crate) volumes: Vec<VolumeRequest>,
    pub(crate) warm_vm: String,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) port: Option<u16>,
    pub(crate) command: Option<Vec<String>>,
    pub(crate) args: Option<Vec<String>>,
    pub(crate) links: Vec<Link>,
    /// It ran on a host that went down: a volume missing here must come from the
    /// tier's last pushed snapshot, never be created empty.
    pub(crate) moved: bool,
}

/// The tier snapshot a volume was made from for an instance (a move); the default, an
/// empty snapshot name, says an RWO volume of a moved instance was created empty (the
/// host has no tier).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct PulledFrom {
    pub(crate) snapshot: String,
    /// When it was pushed (seconds since the epoch).
    pub(crate) pushed: u64,
    /// The host that pushed it.
    pub(crate) host: String,
    /// Its manifest, `sha256:HEX`.
    pub(crate) manifest: String,
}

impl From<castore::VolumeTierReport> for PulledFrom {
    fn from(r: castore::VolumeTierReport) -> PulledFrom {
        PulledFrom {
            snapshot: r.snapshot,
            pushed: r.pushed,
            host: r.host,
            manifest: r.manifest.to_string(),
        }
    }
}

/// One of an instance's attached volumes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct AttachedVolume {
    pub(crate) volume: String,
    pub(crate) attachment: u64,
    pub(crate) read_only: bool,
    /// Made from the tier for this instance (records of earlier versions have none).
    #[serde(default)]
    pub(crate) pulled: Option<PulledFrom>,
}

/// What a block device of an instance is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum DiskRole {
    Layer,
    Scratch,
    Volume,
}

impl DiskRole {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DiskRole::Layer => "layer",
            DiskRole::Scratch => "scratch",
            DiskRole::Volume => "volume",
        }
    }
}

/// One block device of an instance: an NBD export of this host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct BootDisk {
    pub(crate) role: DiskRole,
    pub(crate) export: String,
    pub(crate) read_only: bool,
    pub(crate) size: u64,
    /// For layers: the layer digest.
    #[serde(default)]
    pub(crate) layer: String,
    /// For volumes: where the guest mounts it.
    #[serde(default)]
    pub(crate) mount_path: String,
}

/// What a launcher boots an instance from (`sched.capnp`'s `BootSpec`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct BootSpec {
    /// Layers bottom first, then the scratch device, then the volumes in request order.
    pub(crate) disks: Vec<BootDisk>,
    pub(crate) root_mode: u32,
    pub(crate) root_uid: u32,
    pub(crate) root_gid: u32,
    pub(crate) root_mtime: i64,
    pub(crate) root_mtime_nsec: u32,
    pub(crate) vcpus: u32,
    pub(crate) memory: u64,
}

/// A prepared instance, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct InstanceRecord {
    pub(crate) instance: String,
    pub(crate) key: String,
    pub(crate) ordinal: u32,
    /// The image digest mounted.
    pub(crate) image: String,
    pub(crate) root: PathBuf,
    pub(crate) volumes: Vec<AttachedVolume>,
    /// Its scratch device (records of an earlier version have none).
    #[serde(default)]
    pub(crate) scratch: Option<AttachedVolume>,
    pub(crate) hypervisor: String,
    pub(crate) warm_vm: String,
    #[serde(default)]
    pub(crate) boot: BootSpec,
    /// What its guest boots with, when this host boots guests.
    #[serde(default)]
    pub(crate) guest: Option<Launch>,
    /// The guest's state now (filled in when the record is handed out).
    #[serde(skip)]
    pub(crate) status: Option<GuestStatus>,
    /// The live mount of the root (this run's mount table id; 0 when not mounted).
    #[serde(skip)]
    mount: u64,
}

/// A warm VM's root, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WarmRecord {
    pub(crate) id: String,
    pub(crate) pool: String,
    /// The image digest whose layers it runs.
    pub(crate) image: String,
    pub(crate) layers: Vec<String>,
    pub(crate) root: PathBuf,
    /// Its guest, booted on the pool's layers and waiting for a config, when this host
    /// boots guests.
    #[serde(default)]
    pub(crate) guest: Option<Launch>,
    #[serde(skip)]
    mount: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Records {
    next_warm: u64,
    instances: BTreeMap<String, InstanceRecord>,
    warm: BTreeMap<String, WarmRecord>,
}

/// The instances and warm VMs of this host.
#[derive(Debug)]
pub(crate) struct Host {
    pub(crate) config: HostConfig,
    store: Arc<Store>,
    mounts: Arc<MountTable>,
    volumes: Arc<Volumes>,
    layers: Arc<Layers>,
    scratch: Scratch,
    data: PathBuf,
    records: Mutex<Records>,
    /// Boots instances' guests; None when this host boots none (no kernel configured).
    guests: Option<Arc<Guests>>,
    /// Told when a guest's state changes (the scheduler link reports it at once).
    pub(crate) changed: Arc<tokio::sync::Notify>,
}

/// Instance, pool and warm VM ids become directory names: keep them tame.
fn check_id(what: &str, id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "{what} {id:?} must be 1 to 128 characters of a-z A-Z 0-9 . _ - (not starting with .)"
        )))
    }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Io(what, e)
}

/// `DIR/ID/root`, created (with its parent) if missing.
fn make_root(dir: &Path, id: &str) -> Result<PathBuf, Error> {
    let root = dir.join(id).join("root");
    std::fs::create_dir_all(&root).map_err(io_err(format!("creating {}", root.display())))?;
    Ok(root)
}

/// Removes `DIR/ID` once its root is unmounted (only empty directories: a root still
/// mounted lazily, or anything unexpected, is left alone).
fn remove_root(root: &Path) {
    let _ = std::fs::remove_dir(root);
    if let Some(dir) = root.parent() {
        let _ = std::fs::remove_dir(dir);
    }
}

impl Host {
    /// Loads `DATA/instances.json` and mounts every recorded root again (after
    /// [`MountTable::recover`] cleaned up the last run's mounts). A root that cannot be
    /// mounted is logged and kept on record, so `release` can still clean up after it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open(
        config: HostConfig,
        store: Arc<Store>,
        mounts: Arc<MountTable>,
        volumes: Arc<Volumes>,
        layers: Arc<Layers>,
        scratch: Scratch,
        data: &Path,
        guests: Option<Arc<Guests>>,
        changed: Arc<tokio::sync::Notify>,
    ) -> Result<Arc<Host>, Error> {
        let path = data.join("instances.json");
        let mut records: Records = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                Error::BadRequest(format!("{} is not an instance record: {e}", path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Records::default(),
            Err(e) => return Err(Error::Io(format!("reading {}", path.display()), e)),
        };
        for r in records.instances.values_mut() {
            match mount_image(&mounts, &store, &r.image, &r.root, false) {
                Ok((id, _)) => {
                    r.mount = id;
                    log!(
                        "instance {}: root mounted again at {}",
                        r.instance,
                        r.root.display()
                    );
                }
                Err(e) => log!("instance {}: cannot mount its root again: {e}", r.instance),
            }
            for v in &r.volumes {
                if volumes.attachment(&v.volume, v.attachment).is_err() {
                    log!(
                        "instance {}: attachment {} of volume {} is gone",
                        r.instance,
                        v.attachment,
                        v.volume
                    );
                }
            }
        }
        for w in records.warm.values_mut() {
            match mount_image(&mounts, &store, &w.image, &w.root, false) {
                Ok((id, _)) => w.mount = id,
                Err(e) => log!("warm VM {}: cannot mount its root again: {e}", w.id),
            }
        }
        let host = Arc::new(Host {
            config,
            store,
            mounts,
            volumes,
            layers,
            scratch,
            data: data.to_path_buf(),
            records: Mutex::new(records),
            guests,
            changed,
        });
        host.save(&host.lock())?;
        Ok(host)
    }

    fn lock(&self) -> MutexGuard<'_, Records> {
        // A panic while holding the lock leaves the maps themselves consistent.
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, r: &Records) -> Result<(), Error> {
        let path = self.data.join("instances.json");
        crate::mounts::write_atomic(&path, r).map_err(io_err(format!("writing {}", path.display())))
    }

    /// The store the host reports on.
    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Every prepared instance (with its guest's state) and warm VM, by id.
    pub(crate) fn list(&self) -> (Vec<InstanceRecord>, Vec<WarmRecord>) {
        let r = self.lock();
        (
            r.instances.values().map(|i| self.with_status(i)).collect(),
            r.warm.values().cloned().collect(),
        )
    }

    /// `r` with its guest's state now.
    fn with_status(&self, r: &InstanceRecord) -> InstanceRecord {
        let mut r = r.clone();
        r.status = self
            .guests
            .as_ref()
            .and_then(|g| g.get(&r.instance))
            .map(|g| g.status());
        r
    }

    /// The hypervisor to record: the scheduler's choice, or this host's first eligible.
    fn hypervisor(&self, spec: &InstanceSpec) -> String {
        if !spec.hypervisor.is_empty() {
            if !self.config.hypervisors.contains(&spec.hypervisor) {
                log!(
                    "instance {}: hypervisor {} is not installed here (have: {}); recorded anyway",
                    spec.instance,
                    spec.hypervisor,
                    self.config.hypervisors.join(", ")
                );
            }
            return spec.hypervisor.clone();
        }
        HYPERVISORS
            .iter()
            .find(|(h, gpu)| {
                (spec.gpus == 0 || *gpu) && self.config.hypervisors.iter().any(|x| x == h)
            })
            .map_or_else(String::new, |(h, _)| (*h).to_string())
    }

    /// The image `spec` names; one this host's store lacks is pulled from the chunk
    /// tier, if the host has one (records now, chunks as the guest reads them).
    fn resolve(&self, spec: &str) -> Result<Digest, Error> {
        match crate::server::resolve_or_pull(&self.store, spec) {
            Ok(d) => Ok(d),
            Err(castore::Error::NotFound { .. }) => Err(Error::BadRequest(format!(
                "image {spec} is not in this host's store{}",
                if self.store.tier().is_some() {
                    " nor in its tier"
                } else {
                    ""
                }
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Prepares an instance (see the module doc) and, when this host boots guests,
    /// boots it and waits until its app runs and answers on its port; an instance
    /// already prepared is returned as it is. A failure undoes every step already
    /// taken (a guest that does not come up is stopped and the instance released).
    pub(crate) fn prepare(&self, spec: &InstanceSpec) -> Result<InstanceRecord, Error> {
        let (record, guest) = self.prepare_root(spec)?;
        let (Some(g), Some(guests)) = (guest, &self.guests) else {
            return Ok(self.with_status(&record));
        };
        match g.wait_ready(guests.config.boot_timeout) {
            Ok(s) => {
                log!(
                    "instance {}: running{} ({} ms from launch)",
                    spec.instance,
                    if s.address.is_empty() {
                        String::new()
                    } else {
                        format!(", answering on {}", s.address)
                    },
                    s.answered.max(s.started).saturating_sub(s.launched)
                );
                if let Some(d) = Digest::parse(&record.image) {
                    crate::server::finish_reads(&self.store, &d, "its first guest answered");
                }
                Ok(self.with_status(&record))
            }
            Err(reason) => {
                let output = crate::guests::tail_lines(&g.app_log(), 4);
                if let Err(e) = self.release(&spec.instance) {
                    log!(
                        "instance {}: release after a failed boot: {e}",
                        spec.instance
                    );
                }
                Err(Error::BadRequest(format!(
                    "instance {} did not start: {reason}{}",
                    spec.instance,
                    if output.is_empty() {
                        String::new()
                    } else {
                        format!(" (its log: {output})")
                    }
                )))
            }
        }
    }

    /// Prepares the root, volumes and scratch of an instance and launches its guest;
    /// returns the record and the guest launched (None: prepared before, or no guests).
    fn prepare_root(
        &self,
        spec: &InstanceSpec,
    ) -> Result<(InstanceRecord, Option<Arc<crate::guests::GuestVm>>), Error> {
        check_id("instance id", &spec.instance)?;
        let mut records = self.lock();
        let started = std::time::Instant::now();
        if let Some(r) = records.instances.get(&spec.instance) {
            return Ok((r.clone(), None));
        }
        if self.guests.is_some() && spec.memory > self.config.memory {
            return Err(Error::BadRequest(format!(
                "instance {} asks for {} MiB of memory; this host has {} MiB",
                spec.instance,
                spec.memory >> 20,
                self.config.memory >> 20
            )));
        }
        let image = self.resolve(&spec.image)?;
        let warm = if spec.warm_vm.is_empty() {
            None
        } else {
            let w = records.warm.get(&spec.warm_vm).ok_or_else(|| {
                Error::BadRequest(format!("warm VM {} is not on this host", spec.warm_vm))
            })?;
            let layers = self.store.image(&image)?.layers;
            let ok = w.layers.len() <= layers.len()
                && w.layers
                    .iter()
                    .zip(&layers)
                    .all(|(a, b)| *a == b.to_string());
            if !ok {
                return Err(Error::BadRequest(format!(
                    "warm VM {} (pool {}) runs layers that are not a prefix of image {}'s",
                    w.id, w.pool, spec.image
                )));
            }
            Some(w.clone())
        };
        log!(
            "prepare instance {} ({}, image {})",
            spec.instance,
            spec.key,
            spec.image
        );
        let mut undo = Undo::new(self);
        let mut attached = Vec::new();
        for v in &spec.volumes {
            let a = self.attach(spec, v, &mut undo)?;
            if self.guests.is_some() && !a.read_only {
                self.scratch.format_if_blank(&a.volume)?;
            }
            attached.push(a);
        }
        let scratch = self.make_scratch(spec, &mut undo)?;
        let boot = self.boot_spec(spec, &image, &attached, &scratch)?;
        let (root, mount) = match warm {
            Some(w) => {
                records.warm.remove(&w.id);
                undo.warm = Some(w.clone());
                if w.image == image.to_string() && w.mount != 0 {
                    // The same stack: the warm root becomes the instance's as it is.
                    (w.root, w.mount)
                } else {
                    // A prefix: the root is mounted again with the instance's full
                    // stack, at the same place (the warm VM wrote nothing there).
                    unmount_now(&self.mounts, w.mount, true)?;
                    let (id, _) = mount_image(
                        &self.mounts,
                        &self.store,
                        &image.to_string(),
                        &w.root,
                        false,
                    )?;
                    (w.root, id)
                }
            }
            None => {
                let root = make_root(&self.data.join("instances"), &spec.instance)?;
                undo.dir = Some(root.clone());
                let (id, _) =
                    mount_image(&self.mounts, &self.store, &image.to_string(), &root, false)?;
                undo.mount = id;
                (root, id)
            }
        };
        let hypervisor = self.hypervisor(spec);
        let launch = match &self.guests {
            Some(_) if hypervisor != "qemu" => {
                return Err(Error::BadRequest(format!(
                    "instance {}: hypervisor {hypervisor:?} has no driver on this host (it boots qemu guests)",
                    spec.instance
                )));
            }
            Some(_) => Some(self.guest_launch(spec, &image, &boot, &root)?),
            None => None,
        };
        let mut record = InstanceRecord {
            instance: spec.instance.clone(),
            key: spec.key.clone(),
            ordinal: spec.ordinal,
            image: image.to_string(),
            root,
            volumes: attached,
            scratch: Some(scratch),
            hypervisor,
            warm_vm: spec.warm_vm.clone(),
            boot,
            guest: launch.clone(),
            status: None,
            mount,
        };
        let converting = undo.warm.clone();
        let guest = match (&self.guests, launch) {
            (Some(guests), Some(l)) => {
                undo.guest = Some(spec.instance.clone());
                let storage = started.elapsed();
                let converted = match &converting {
                    Some(w) => self.convert(guests, w, &l, spec)?,
                    None => None,
                };
                let g = match converted {
                    Some((g, vm_dir)) => {
                        if let Some(rl) = record.guest.as_mut() {
                            rl.vm = vm_dir;
                        }
                        g
                    }
                    None => guests.launch(l).map_err(|e| {
                        Error::BadRequest(format!("instance {}: {e}", spec.instance))
                    })?,
                };
                g.set_storage_time(storage);
                // The port it got, so a restart or a restarted daemon keeps it.
                if let (Some(rl), Some(port)) = (
                    record.guest.as_mut(),
                    g.status()
                        .address
                        .parse::<std::net::SocketAddr>()
                        .ok()
                        .map(|a| a.port()),
                ) {
                    rl.host_port = port;
                }
                Some(g)
            }
            _ => None,
        };
        records
            .instances
            .insert(spec.instance.clone(), record.clone());
        if let Err(e) = self.save(&records) {
            records.instances.remove(&spec.instance);
            if let Some(w) = undo.warm.take() {
                // The converted root is the instance's now: undo unmounts it.
                undo.mount = mount;
                undo.dir = Some(w.root);
            }
            return Err(e);
        }
        undo.done();
        log!(
            "instance {} ready: root {}, {} volume(s){}",
            record.instance,
            record.root.display(),
            record.volumes.len(),
            if guest.is_some() {
                ", guest booting"
            } else {
                ""
            }
        );
        Ok((record, guest))
    }

    /// Converts warm VM `w`'s guest into instance `spec`'s (`l`): hot-adds the disks
    /// it lacks, forwards the port, sends the config. Returns the guest and its VM
    /// directory, or None when `w` has no guest or it does not fit (other vCPUs or
    /// memory, more disks than hot-plug ports): its guest is then stopped and the
    /// instance boots cold.
    fn convert(
        &self,
        guests: &Guests,
        w: &WarmRecord,
        l: &Launch,
        spec: &InstanceSpec,
    ) -> Result<Option<(Arc<crate::guests::GuestVm>, String)>, Error> {
        let Some(wl) = &w.guest else {
            return Ok(None);
        };
        let Some(g) = guests.take_warm(&w.id, &spec.instance) else {
            log!(
                "instance {}: warm VM {} has no live guest: booting cold",
                spec.instance,
                w.id
            );
            return Ok(None);
        };
        let extra = &l.disks[wl.disks.len().min(l.disks.len())..];
        let fits = wl.memory_mib == l.memory_mib
            && wl.vcpus == l.vcpus
            && extra.len() <= vmm::qemu::HOTPLUG_PORTS
            && wl.disks.iter().zip(&l.disks).all(|(a, b)| a == b);
        if !fits {
            log!(
                "instance {}: warm VM {} ({} vCPU, {} MiB) does not fit it ({} vCPU, {} MiB, {} disks to add): booting cold",
                spec.instance,
                w.id,
                wl.vcpus,
                wl.memory_mib,
                l.vcpus,
                l.memory_mib,
                extra.len()
            );
            guests.remove(&spec.instance, Duration::from_secs(1));
            return Ok(None);
        }
        let config = l.config.clone().ok_or_else(|| {
            Error::BadRequest(format!("instance {}: no config to send", spec.instance))
        })?;
        let err = |e: String| {
            Error::BadRequest(format!(
                "instance {}: converting warm VM {}: {e}",
                spec.instance, w.id
            ))
        };
        let forward = guests.forward(l.port, 0).map_err(err)?;
        g.convert(&guests.config, l.vcpus, extra, forward, config)
            .map_err(err)?;
        log!(
            "instance {}: converting warm VM {} ({} disk(s) hot-added)",
            spec.instance,
            w.id,
            extra.len()
        );
        Ok(Some((g, w.id.clone())))
    }

    /// What instance `spec`'s guest boots with: its disks by serial, and the config its
    /// init gets: the image's entrypoint and cmd (or the service's command and args,
    /// replacing them as Compose does), the image's env under the scheduler's cascade
    /// and the links of the services it depends on, its user (names looked up in the
    /// image's `/etc/passwd` and `/etc/group`) and workdir.
    fn guest_launch(
        &self,
        spec: &InstanceSpec,
        image: &Digest,
        boot: &BootSpec,
        root: &Path,
    ) -> Result<Launch, Error> {
        let cfg = self.store.image(image)?.config;
        let (entry, cmd) = match (&spec.command, &spec.args) {
            (Some(c), a) => (c.clone(), a.clone().unwrap_or_default()),
            (None, Some(a)) => (cfg.entrypoint.clone(), a.clone()),
            (None, None) => (cfg.entrypoint.clone(), cfg.cmd.clone()),
        };
        let argv = [entry, cmd].concat();
        if argv.is_empty() {
            return Err(Error::BadRequest(format!(
                "instance {}: image {} has no entrypoint or cmd and its service gives no command: nothing to run",
                spec.instance, spec.image
            )));
        }
        let mut env: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: &str| match env.iter_mut().find(|(x, _)| x == k) {
            Some(e) => e.1 = v.to_string(),
            None => env.push((k.to_string(), v.to_string())),
        };
        set("PATH", DEFAULT_PATH);
        for kv in &cfg.env {
            if let Some((k, v)) = kv.split_once('=') {
                set(k, v);
            }
        }
        for (k, v) in &spec.env {
            set(k, v);
        }
        for l in &spec.links {
            let (host_var, port_var) = link_vars(&l.service);
            set(&host_var, &guest_view_of(&l.host));
            set(&port_var, &l.port.to_string());
        }
        let (uid, gid) = crate::guests::resolve_user(root, &cfg.user)
            .map_err(|e| Error::BadRequest(format!("instance {}: {e}", spec.instance)))?;
        let mut disks = Vec::new();
        let (mut layers, mut scratch, mut volumes) = (Vec::new(), String::new(), Vec::new());
        for d in &boot.disks {
            let serial = match d.role {
                DiskRole::Layer => {
                    let s = format!("layer{}", layers.len());
                    layers.push(s.clone());
                    s
                }
                DiskRole::Scratch => {
                    scratch = "scratch".to_string();
                    scratch.clone()
                }
                DiskRole::Volume => {
                    let s = format!("vol{}", volumes.len());
                    volumes.push(guest::control::VolumeMount {
                        serial: s.clone(),
                        path: d.mount_path.clone(),
                        read_only: d.read_only,
                    });
                    s
                }
            };
            disks.push((serial, d.export.clone(), d.read_only));
        }
        let memory = if spec.memory == 0 {
            DEFAULT_GUEST_MEMORY
        } else {
            spec.memory
        };
        let hostname: String = spec
            .instance
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .take(63)
            .collect();
        Ok(Launch {
            id: spec.instance.clone(),
            vcpus: spec.vcpus.max(1),
            memory_mib: (memory >> 20).max(64),
            disks,
            vm: String::new(),
            config: Some(guest::control::Config {
                hostname,
                layers,
                scratch,
                root: guest::control::RootMeta {
                    mode: boot.root_mode,
                    uid: boot.root_uid,
                    gid: boot.root_gid,
                    mtime: boot.root_mtime,
                    mtime_nsec: i64::from(boot.root_mtime_nsec),
                },
                env,
                uid,
                gid,
                workdir: if cfg.workdir.is_empty() {
                    "/".into()
                } else {
                    cfg.workdir.clone()
                },
                argv,
                disk_timeout_ms: 30_000,
                network: None,
                volumes,
            }),
            port: spec.port,
            host_port: 0,
            restarts: 0,
        })
    }

    /// A fresh scratch device for `spec.instance`, attached with the instance as holder.
    fn make_scratch(
        &self,
        spec: &InstanceSpec,
        undo: &mut Undo<'_>,
    ) -> Result<AttachedVolume, Error> {
        let name = self.scratch.create(&spec.instance)?;
        undo.scratch = Some(spec.instance.clone());
        let a = self.volumes.attach(&name, &spec.instance, false)?;
        undo.attached.push((name.clone(), a.id));
        Ok(AttachedVolume {
            volume: name,
            attachment: a.id,
            read_only: false,
            pulled: None,
        })
    }

    /// The boot spec of an instance of `image` with these volumes and scratch. Every
    /// layer's EROFS image is synthesized here, so a layer that has none fails the
    /// prepare with its reason rather than the guest's boot.
    fn boot_spec(
        &self,
        spec: &InstanceSpec,
        image: &Digest,
        volumes: &[AttachedVolume],
        scratch: &AttachedVolume,
    ) -> Result<BootSpec, Error> {
        let mut disks = Vec::new();
        for l in self.store.image(image)?.layers {
            let erofs = self.layers.image(&l)?;
            disks.push(BootDisk {
                role: DiskRole::Layer,
                export: layer_export(&l),
                read_only: true,
                size: erofs.size(),
                layer: l.to_string(),
                mount_path: String::new(),
            });
        }
        disks.push(BootDisk {
            role: DiskRole::Scratch,
            export: format!("{}/{}", scratch.volume, scratch.attachment),
            read_only: false,
            size: self.scratch.size(),
            layer: String::new(),
            mount_path: String::new(),
        });
        for (a, req) in volumes.iter().zip(&spec.volumes) {
            disks.push(BootDisk {
                role: DiskRole::Volume,
                export: format!("{}/{}", a.volume, a.attachment),
                read_only: a.read_only,
                size: self.volumes.listed(&a.volume)?.summary.size,
                layer: String::new(),
                mount_path: req.mount_path.clone(),
            });
        }
        let (root, _) = castore::merge::image_root(&self.store, image)?;
        Ok(BootSpec {
            disks,
            root_mode: root.mode,
            root_uid: root.uid,
            root_gid: root.gid,
            root_mtime: root.mtime.sec,
            root_mtime_nsec: root.mtime.nsec,
            vcpus: spec.vcpus,
            memory: spec.memory,
        })
    }

    /// Attaches one requested volume for `spec.instance`, creating it if missing.
    /// Volume `name`, missing here, made from the tier's last pushed snapshot of it
    /// (None: there is no tier, or it holds no such volume).
    fn pull_volume(&self, spec: &InstanceSpec, name: &str) -> Result<Option<PulledFrom>, Error> {
        if self.store.tier().is_none() {
            return Ok(None);
        }
        match self.store.pull_volume(name, None) {
            Ok(r) => {
                log!(
                    "volume {name} for {}: made from the tier's snapshot {} (pushed by {} {} s ago; {} chunks, read from the tier when first needed)",
                    spec.instance,
                    r.snapshot,
                    r.host,
                    r.age(),
                    r.chunks
                );
                Ok(Some(PulledFrom::from(r)))
            }
            Err(castore::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// For a moved instance's RWO volume this host already holds: refuses an older copy,
    /// one that lacks the snapshot another host last pushed of it (the instance's data
    /// is in that snapshot; this copy is kept, never overwritten, as it may hold writes
    /// of its own). A copy holding that snapshot (same extents) is the same or newer.
    fn check_not_stale(&self, spec: &InstanceSpec, name: &str) -> Result<(), Error> {
        if self.store.tier().is_none() {
            return Ok(());
        }
        match self.store.holds_last_pushed(name)? {
            Some((false, last)) => Err(Error::BadRequest(format!(
                "volume {name} of moved instance {} is here as an older copy: the chunk tier's last snapshot of it is {} from {}, which this copy lacks; keep this copy under another name (tide volume clone) and remove it (tide volume rm) to take the tier's",
                spec.instance, last.snapshot, last.host
            ))),
            _ => Ok(()),
        }
    }

    fn attach(
        &self,
        spec: &InstanceSpec,
        v: &VolumeRequest,
        undo: &mut Undo<'_>,
    ) -> Result<AttachedVolume, Error> {
        let name = if v.per_instance {
            format!("{}-{}", v.name, spec.ordinal)
        } else {
            v.name.clone()
        };
        let existing = self.volumes.list()?;
        let mut pulled = None;
        let rwo = v.mode == AccessMode::Rwo || v.per_instance;
        match existing.iter().find(|l| l.summary.name == name) {
            Some(l) if l.summary.instances.is_some() => {
                return Err(Error::BadRequest(format!(
                    "volume {name} is a per-instance template: ask for it per instance"
                )));
            }
            Some(l) if l.summary.mode != v.mode => {
                return Err(Error::BadRequest(format!(
                    "volume {name} is {}, instance {} asks for {}",
                    l.summary.mode.as_str(),
                    spec.instance,
                    v.mode.as_str()
                )));
            }
            Some(_) if spec.moved && rwo => self.check_not_stale(spec, &name)?,
            Some(_) => {}
            None if let Some(p) = self.pull_volume(spec, &name)? => {
                undo.created.push(name.clone());
                pulled = Some(p);
            }
            None if spec.moved && rwo && self.store.tier().is_some() => {
                return Err(Error::BadRequest(format!(
                    "volume {name} of moved instance {} is not on this host and the chunk tier has no pushed snapshot of it: refusing to create it empty (its data was on the host that went down)",
                    spec.instance
                )));
            }
            None => {
                // A stamp of a template takes the template's size when none is asked.
                let size = match (v.size, existing.iter().find(|l| l.summary.name == v.name)) {
                    (0, Some(t)) if v.per_instance => t.summary.size,
                    (s, _) => s,
                };
                if size == 0 {
                    return Err(Error::BadRequest(format!(
                        "volume {name} does not exist and instance {} gives no size to create it with",
                        spec.instance
                    )));
                }
                let mut vs = VolumeSpec::new(name.clone(), size);
                vs.mode = if v.per_instance {
                    AccessMode::Rwo
                } else {
                    v.mode
                };
                self.volumes.create(&vs)?;
                log!(
                    "created volume {name} ({size} bytes, {}) for {}",
                    vs.mode.as_str(),
                    spec.instance
                );
                if spec.moved && rwo {
                    // Not silent: the instance record says its volume started empty.
                    log!(
                        "warning: volume {name} of moved instance {} was created EMPTY: its data was on the host that went down and this host has no chunk tier (volumed --tier) to take a pushed snapshot from",
                        spec.instance
                    );
                    pulled = Some(PulledFrom::default());
                }
                undo.created.push(name.clone());
            }
        }
        let read_only = v.mode == AccessMode::Rox;
        let a = match self.volumes.attach(&name, &spec.instance, read_only) {
            Ok(a) => a,
            Err(Error::InUse { .. }) => {
                let holder = self
                    .volumes
                    .attachments(&name)
                    .into_iter()
                    .map(|a| a.holder)
                    .next()
                    .unwrap_or_else(|| "another client".into());
                return Err(Error::BadRequest(format!(
                    "volume {name} is held by {holder} (rwo)"
                )));
            }
            Err(e) => return Err(e),
        };
        undo.attached.push((name.clone(), a.id));
        Ok(AttachedVolume {
            volume: name,
            attachment: a.id,
            read_only: a.read_only,
            pulled,
        })
    }

    /// Undoes `prepare` (or removes a warm VM): detaches the volumes, unmounts the root
    /// (lazily if busy), discards the scratch. An unknown id is already released.
    pub(crate) fn release(&self, id: &str) -> Result<bool, Error> {
        let mut records = self.lock();
        if let Some(r) = records.instances.remove(id) {
            self.save(&records)?;
            log!("release instance {id}");
            if let Some(g) = &self.guests {
                g.remove(id, STOP_GRACE);
            }
            for v in r.volumes.iter().chain(&r.scratch) {
                if let Err(e) = self.volumes.detach(&v.volume, v.attachment) {
                    log!("release {id}: detach {}: {e}", v.volume);
                }
            }
            if let Err(e) = self.scratch.remove(id) {
                log!("release {id}: remove its scratch device: {e}");
            }
            if r.mount != 0 {
                unmount_now(&self.mounts, r.mount, true)?;
            }
            remove_root(&r.root);
            return Ok(true);
        }
        if let Some(w) = records.warm.remove(id) {
            self.save(&records)?;
            log!("release warm VM {id}");
            if let Some(g) = &self.guests {
                g.remove(id, Duration::from_secs(1));
            }
            if w.mount != 0 {
                unmount_now(&self.mounts, w.mount, true)?;
            }
            remove_root(&w.root);
            return Ok(true);
        }
        Ok(false)
    }

    /// Gives instance `id` up for a live move: stops its guest, so its last writes reach
    /// the store; pushes a new snapshot of each of its read-write-once volumes to the
    /// tier; then releases it. Returns what was pushed, per volume. Refused, with nothing
    /// changed, when it has RWO volumes and this host has no tier; a failed push leaves
    /// it prepared (its guest stopped) and is the error.
    pub(crate) fn hand_over(&self, id: &str) -> Result<Vec<(String, PulledFrom)>, Error> {
        let rwo: Vec<String> = {
            let records = self.lock();
            let Some(rec) = records.instances.get(id) else {
                return Err(Error::BadRequest(format!("no instance {id} on this host")));
            };
            let listed = self.volumes.list()?;
            rec.volumes
                .iter()
                .filter(|a| {
                    !a.read_only
                        && listed.iter().any(|l| {
                            l.summary.name == a.volume && l.summary.mode == AccessMode::Rwo
                        })
                })
                .map(|a| a.volume.clone())
                .collect()
        };
        if !rwo.is_empty() && self.store.tier().is_none() {
            return Err(Error::BadRequest(format!(
                "instance {id} has read-write-once volumes ({}) and this host has no chunk tier (volumed --tier) to hand them over through",
                rwo.join(", ")
            )));
        }
        log!(
            "hand over instance {id}: stopping it, then pushing {} volume(s)",
            rwo.len()
        );
        if let Some(g) = self.guests.as_ref().and_then(|g| g.get(id)) {
            g.stop(STOP_GRACE);
        }
        let mut pushed = Vec::new();
        for name in &rwo {
            let r = self
                .store
                .push_volume(
                    name,
                    None,
                    &self.config.host_id,
                    &castore::TierProgress::default(),
                )
                .map_err(|e| {
                    Error::BadRequest(format!(
                        "instance {id} stays here (stopped): pushing volume {name} failed: {e}"
                    ))
                })?;
            log!(
                "hand over instance {id}: volume {name} pushed as {} ({} of {} chunks sent)",
                r.snapshot,
                r.transferred,
                r.chunks
            );
            pushed.push((name.clone(), PulledFrom::from(r)));
        }
        self.release(id)?;
        Ok(pushed)
    }

    /// Up to `max` bytes of instance `id`'s app log (or its console) from `offset`: the
    /// bytes, the next offset, and whether its guest has ended.
    pub(crate) fn logs(
        &self,
        id: &str,
        offset: u64,
        console: bool,
        max: u32,
    ) -> Result<(Vec<u8>, u64, bool), Error> {
        if !self.lock().instances.contains_key(id) {
            return Err(Error::BadRequest(format!("no instance {id} on this host")));
        }
        let Some(g) = self.guests.as_ref().and_then(|g| g.get(id)) else {
            return Err(Error::BadRequest(format!(
                "instance {id} has no guest here (this host boots none: give volumed --kernel and --initramfs)"
            )));
        };
        let ended = g.status().phase.ended();
        let path = if console {
            g.console_log()
        } else {
            g.app_log()
        };
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Vec::new(), offset, ended));
            }
            Err(e) => return Err(Error::Io(format!("reading {}", path.display()), e)),
        };
        use std::io::{Read, Seek};
        f.seek(std::io::SeekFrom::Start(offset))
            .map_err(io_err(format!("reading {}", path.display())))?;
        let mut data = Vec::new();
        f.take(u64::from(max))
            .read_to_end(&mut data)
            .map_err(io_err(format!("reading {}", path.display())))?;
        let next = offset + data.len() as u64;
        Ok((data, next, ended))
    }

    /// `stop` or `restart` instance `id`'s guest. A restart boots it again with the
    /// same root and volumes and a fresh scratch device, on the same host port, and
    /// waits until it answers as `prepare` does.
    pub(crate) fn control(&self, id: &str, action: &str) -> Result<InstanceRecord, Error> {
        let Some(guests) = self.guests.clone() else {
            return Err(Error::BadRequest(format!(
                "instance {id}: this host boots no guests (give volumed --kernel and --initramfs)"
            )));
        };
        if action != "stop" && action != "restart" {
            return Err(Error::BadRequest(format!(
                "instance {id}: unknown action {action:?} (stop or restart)"
            )));
        }
        let mut records = self.lock();
        let Some(rec) = records.instances.get(id).cloned() else {
            return Err(Error::BadRequest(format!("no instance {id} on this host")));
        };
        log!("{action} instance {id}");
        if let Some(g) = guests.get(id) {
            g.stop(STOP_GRACE);
        }
        if action == "stop" {
            drop(records);
            return Ok(self.with_status(&rec));
        }
        let Some(mut launch) = rec.guest.clone() else {
            return Err(Error::BadRequest(format!(
                "instance {id} was prepared before this host booted guests: release and prepare it again"
            )));
        };
        // A fresh scratch device, attached again.
        let mut rec = rec;
        if let Some(old) = &rec.scratch
            && let Err(e) = self.volumes.detach(&old.volume, old.attachment)
        {
            log!("restart {id}: detach {}: {e}", old.volume);
        }
        let name = self.scratch.create(id)?;
        let a = self.volumes.attach(&name, id, false)?;
        let export = format!("{name}/{}", a.id);
        rec.scratch = Some(AttachedVolume {
            volume: name,
            attachment: a.id,
            read_only: false,
            pulled: None,
        });
        for d in rec
            .boot
            .disks
            .iter_mut()
            .filter(|d| d.role == DiskRole::Scratch)
        {
            d.export = export.clone();
        }
        for d in launch.disks.iter_mut().filter(|d| d.0 == "scratch") {
            d.1 = export.clone();
        }
        launch.restarts += 1;
        rec.guest = Some(launch.clone());
        records.instances.insert(id.to_string(), rec.clone());
        self.save(&records)?;
        let g = guests
            .launch(launch)
            .map_err(|e| Error::BadRequest(format!("instance {id}: {e}")))?;
        drop(records);
        g.wait_ready(guests.config.boot_timeout)
            .map_err(|e| Error::BadRequest(format!("instance {id} did not start again: {e}")))?;
        Ok(self.with_status(&rec))
    }

    /// The guests of recorded instances at volumed's start (once NBD is served): a
    /// guest whose QEMU still runs (volumed was killed, not stopped) is adopted as it
    /// is; the others boot again with a fresh scratch device, as a restart does, in the
    /// background.
    pub(crate) fn boot_recorded(self: &Arc<Host>) {
        let Some(guests) = &self.guests else {
            return;
        };
        let (recorded, warm): (Vec<(String, Launch)>, Vec<Launch>) = {
            let r = self.lock();
            (
                r.instances
                    .values()
                    .filter_map(|r| Some((r.instance.clone(), r.guest.clone()?)))
                    .collect(),
                r.warm.values().filter_map(|w| w.guest.clone()).collect(),
            )
        };
        for l in warm {
            if guests.adopt(&l).is_some() {
                log!("warm VM {}: adopted its running guest", l.id);
                continue;
            }
            let id = l.id.clone();
            match guests.launch(l) {
                Ok(_) => log!("warm VM {id}: booted again"),
                Err(e) => log!("warm VM {id}: cannot boot it again: {e}"),
            }
        }
        let mut ids = Vec::new();
        for (id, launch) in recorded {
            match guests.adopt(&launch) {
                Some(g) => log!(
                    "instance {id}: adopted its running guest (pid {})",
                    g.status().pid
                ),
                None => ids.push(id),
            }
        }
        for id in ids {
            let h = self.clone();
            std::thread::spawn(move || match h.control(&id, "restart") {
                Ok(_) => log!("instance {id}: booted again"),
                Err(e) => log!("instance {id}: cannot boot it again: {e}"),
            });
        }
    }

    /// Mounts a warm VM's root for `pool` from `image`.
    pub(crate) fn boot_warm(&self, pool: &str, image: &str) -> Result<WarmRecord, Error> {
        check_id("pool", pool)?;
        let mut records = self.lock();
        let digest = self.resolve(image)?;
        let layers = self.store.image(&digest)?.layers;
        records.next_warm += 1;
        let id = format!("{pool}-warm-{}", records.next_warm);
        log!("boot warm VM {id} for pool {pool} from {image}");
        let root = make_root(&self.data.join("warm"), &id)?;
        let mount = match mount_image(&self.mounts, &self.store, &digest.to_string(), &root, false)
        {
            Ok((m, _)) => m,
            Err(e) => {
                remove_root(&root);
                return Err(e);
            }
        };
        let mut w = WarmRecord {
            id: id.clone(),
            pool: pool.to_string(),
            image: digest.to_string(),
            layers: layers.iter().map(ToString::to_string).collect(),
            root: root.clone(),
            guest: None,
            mount,
        };
        let undo = |records: &mut Records| {
            records.warm.remove(&id);
            if let Some(g) = &self.guests {
                g.remove(&id, Duration::from_secs(1));
            }
            let _ = unmount_now(&self.mounts, mount, true);
            remove_root(&root);
        };
        // Its guest boots the pool's layers and waits in init for a conversion.
        let guest = match &self.guests {
            Some(guests) => {
                let mut disks = Vec::new();
                for (i, l) in layers.iter().enumerate() {
                    if let Err(e) = self.layers.image(l) {
                        undo(&mut records);
                        return Err(e);
                    }
                    disks.push((format!("layer{i}"), layer_export(l), true));
                }
                let l = Launch {
                    id: id.clone(),
                    vcpus: 1,
                    memory_mib: DEFAULT_GUEST_MEMORY >> 20,
                    disks,
                    config: None,
                    port: None,
                    host_port: 0,
                    restarts: 0,
                    vm: String::new(),
                };
                w.guest = Some(l.clone());
                match guests.launch(l) {
                    Ok(g) => Some(g),
                    Err(e) => {
                        undo(&mut records);
                        return Err(Error::BadRequest(format!("warm VM {id}: {e}")));
                    }
                }
            }
            None => None,
        };
        records.warm.insert(id.clone(), w.clone());
        if let Err(e) = self.save(&records) {
            undo(&mut records);
            return Err(e);
        }
        drop(records);
        if let (Some(g), Some(guests)) = (guest, &self.guests)
            && let Err(e) = g.wait_booted(guests.config.boot_timeout)
        {
            let _ = self.release(&id);
            return Err(Error::BadRequest(format!("warm VM {id} did not boot: {e}")));
        }
        Ok(w)
    }
}

/// What a `prepare` did so far, undone on drop unless [`Undo::done`].
#[derive(Debug)]
struct Undo<'a> {
    host: &'a Host,
    created: Vec<String>,
    attached: Vec<(String, u64)>,
    /// The instance whose scratch device was made.
    scratch: Option<String>,
    mount: u64,
    dir: Option<PathBuf>,
    /// A warm VM taken for conversion: given back on failure.
    warm: Option<WarmRecord>,
    /// The instance whose guest was launched.
    guest: Option<String>,
}

impl<'a> Undo<'a> {
    fn new(host: &'a Host) -> Undo<'a> {
        Undo {
            host,
            created: Vec::new(),
            attached: Vec::new(),
            scratch: None,
            mount: 0,
            dir: None,
            warm: None,
            guest: None,
        }
    }

    fn done(mut self) {
        self.created.clear();
        self.attached.clear();
        self.scratch = None;
        self.mount = 0;
        self.dir = None;
        self.warm = None;
        self.guest = None;
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if let (Some(i), Some(g)) = (self.guest.take(), &self.host.guests) {
            g.remove(&i, Duration::from_secs(1));
        }
        for (v, id) in self.attached.drain(..).rev() {
            if let Err(e) = self.host.volumes.detach(&v, id) {
                log!("undo: detach {v}: {e}");
            }
        }
        if let Some(i) = self.scratch.take()
            && let Err(e) = self.host.scratch.remove(&i)
        {
            log!("undo: remove the scratch device of {i}: {e}");
        }
        for v in self.created.drain(..).rev() {
            match self.host.volumes.remove(&v, false) {
                Ok(_) | Err(Error::Store(castore::Error::Volume(VolumeError::NotFound { .. }))) => {
                }
                Err(e) => log!("undo: remove volume {v}: {e}"),
            }
        }
        if self.mount != 0 {
            let _ = unmount_now(&self.host.mounts, self.mount, true);
        }
        if let Some(d) = self.dir.take() {
            remove_root(&d);
        }
        if let Some(w) = self.warm.take() {
            // Its root may have been remounted or lost on the way: it is gone. The
            // records are saved by whoever saves next.
            log!("undo: warm VM {} was consumed by a failed conversion", w.id);
            if w.mount != 0 {
                let _ = unmount_now(&self.host.mounts, w.mount, true);
            }
            remove_root(&w.root);
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn only_hypervisors_a_driver_can_launch_are_detected() {
        let found = detect_hypervisors();
        assert_eq!(
            found.contains(&"qemu".to_string()),
            vmm::qemu::Qemu::default().available(),
            "{found:?}"
        );
        assert!(
            found.iter().all(|h| h == "qemu"),
            "no driver but QEMU's exists: {found:?}"
        );
    }
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(parse_label("zone=a"), Ok(("zone".into(), "a".into())));
        assert!(parse_label("zone").is_err());
        assert!(parse_label("=a").is_err());
    }

    #[test]
    fn ids_stay_directory_names() {
        assert!(check_id("instance id", "web.shop--pr-42-0").is_ok());
        for bad in ["", "..", ".x", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_id("instance id", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn host_id_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let a = persistent_host_id(tmp.path()).unwrap();
        assert_eq!(persistent_host_id(tmp.path()).unwrap(), a);
        assert!(!a.is_empty());
    }
}
