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

use castore::{AccessMode, Digest, Store, VolumeError, VolumeSpec};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::exports::layer_export;
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
}

/// One of an instance's attached volumes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct AttachedVolume {
    pub(crate) volume: String,
    pub(crate) attachment: u64,
    pub(crate) read_only: bool,
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
    pub(crate) fn open(
        config: HostConfig,
        store: Arc<Store>,
        mounts: Arc<MountTable>,
        volumes: Arc<Volumes>,
        layers: Arc<Layers>,
        scratch: Scratch,
        data: &Path,
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

    /// Every prepared instance and warm VM, by id.
    pub(crate) fn list(&self) -> (Vec<InstanceRecord>, Vec<WarmRecord>) {
        let r = self.lock();
        (
            r.instances.values().cloned().collect(),
            r.warm.values().cloned().collect(),
        )
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

    fn resolve(&self, spec: &str) -> Result<Digest, Error> {
        self.store.resolve_image(spec).map_err(|e| match e {
            castore::Error::NotFound { .. } => {
                Error::BadRequest(format!("image {spec} is not in this host's store"))
            }
            e => e.into(),
        })
    }

    /// Prepares an instance (see the module doc); an instance already prepared is
    /// returned as it is. A failure undoes every step already taken.
    pub(crate) fn prepare(&self, spec: &InstanceSpec) -> Result<InstanceRecord, Error> {
        check_id("instance id", &spec.instance)?;
        let mut records = self.lock();
        if let Some(r) = records.instances.get(&spec.instance) {
            return Ok(r.clone());
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
            attached.push(self.attach(spec, v, &mut undo)?);
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
        let record = InstanceRecord {
            instance: spec.instance.clone(),
            key: spec.key.clone(),
            ordinal: spec.ordinal,
            image: image.to_string(),
            root,
            volumes: attached,
            scratch: Some(scratch),
            hypervisor: self.hypervisor(spec),
            warm_vm: spec.warm_vm.clone(),
            boot,
            mount,
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
            "instance {} ready: root {}, {} volume(s)",
            record.instance,
            record.root.display(),
            record.volumes.len()
        );
        Ok(record)
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
            Some(_) => {}
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
        })
    }

    /// Undoes `prepare` (or removes a warm VM): detaches the volumes, unmounts the root
    /// (lazily if busy), discards the scratch. An unknown id is already released.
    pub(crate) fn release(&self, id: &str) -> Result<bool, Error> {
        let mut records = self.lock();
        if let Some(r) = records.instances.remove(id) {
            self.save(&records)?;
            log!("release instance {id}");
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
            if w.mount != 0 {
                unmount_now(&self.mounts, w.mount, true)?;
            }
            remove_root(&w.root);
            return Ok(true);
        }
        Ok(false)
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
        let w = WarmRecord {
            id: id.clone(),
            pool: pool.to_string(),
            image: digest.to_string(),
            layers: layers.iter().map(ToString::to_string).collect(),
            root: root.clone(),
            mount,
        };
        records.warm.insert(id.clone(), w.clone());
        if let Err(e) = self.save(&records) {
            records.warm.remove(&id);
            let _ = unmount_now(&self.mounts, mount, true);
            remove_root(&root);
            return Err(e);
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
        }
    }

    fn done(mut self) {
        self.created.clear();
        self.attached.clear();
        self.scratch = None;
        self.mount = 0;
        self.dir = None;
        self.warm = None;
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
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
