//! Volumes as volumed serves them: access modes enforced through attachments, the NBD
//! export names mapped to castore volumes, and per-instance templates.
//!
//! **Export names.** `NAME` serves volume NAME (the connection is an attachment for its
//! lifetime); `NAME@SNAP` serves a snapshot, always read-only, never counted as an
//! attachment; `NAME/ID` serves under the persistent attachment ID (made by `tide volume
//! attach`), any number of connections, until it is detached.
//!
//! **Access modes.** RWO: at most one attachment (persistent or connection) of any kind;
//! a second one fails naming the holder. RWX: any number, read-write. ROX: any number,
//! all read-only (writes get `EPERM`). A per-instance template `NAME` (created with
//! `instances`) is never attached itself; its stamps `NAME-0`, `NAME-1`, ... are RWO
//! volumes of the same size.
//!
//! **Persistence.** Persistent attachments are recorded in `DATA/attachments.json`
//! (written to a temporary file, fsynced, renamed), so an instance keeps its volume across
//! a daemon restart; connection attachments end with their connection.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use castore::{AccessMode, Store, VolumeError, VolumeSpec, VolumeSummary};
use layerfs::block::{BlockDevice, BlockSizes, DeviceError, Extent, ZeroFlags};
use layerfs::nbd::{Export, ExportError, Exports, Intent};
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// One attachment of a volume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Attachment {
    /// Unique for the daemon's data directory (never reused).
    pub(crate) id: u64,
    /// The volume.
    pub(crate) volume: String,
    /// Who holds it: what `tide volume attach --holder` said, or the NBD client.
    pub(crate) holder: String,
    /// Read-only attachment.
    pub(crate) read_only: bool,
    /// Made by `attach` (kept until detached, across restarts) rather than by a
    /// connection to `NAME` (ends with the connection).
    pub(crate) persistent: bool,
    /// When it was made (Unix seconds).
    pub(crate) since: u64,
    /// Set when detached: devices opened under it refuse every request from then on.
    #[serde(skip)]
    revoked: Arc<AtomicBool>,
}

impl Attachment {
    /// The NBD export name that serves under this attachment.
    pub(crate) fn export_name(&self) -> String {
        if self.persistent {
            format!("{}/{}", self.volume, self.id)
        } else {
            self.volume.clone()
        }
    }

    fn describe(&self) -> String {
        if self.persistent {
            format!("attachment {} held by {}", self.id, self.holder)
        } else {
            self.holder.clone()
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Table {
    next_id: u64,
    attachments: BTreeMap<u64, Attachment>,
}

/// Volumes, their attachments and their NBD exports.
#[derive(Debug)]
pub(crate) struct Volumes {
    store: Arc<Store>,
    path: PathBuf,
    /// Held across the access check and the change it allows (attach, delete), so two
    /// clients can never both pass an RWO check.
    table: Mutex<Table>,
    /// Signalled when a connection's attachment ends.
    released: Condvar,
}

/// How long an RWO attach waits for a connection attachment to end before refusing: a
/// client that has just disconnected may not have been noticed yet, and the next user
/// (a restarted VM, the next tool in a script) should not fail for it.
const HANDOFF_GRACE: Duration = Duration::from_secs(2);

/// A connection's attachment: released when the device (the connection) goes.
#[derive(Debug)]
struct Held {
    volumes: Arc<Volumes>,
    id: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.volumes.lock().attachments.remove(&self.id);
        self.volumes.released.notify_all();
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Splits `NAME@SNAP`.
pub(crate) fn split_snapshot(s: &str) -> Option<(&str, &str)> {
    s.split_once('@')
}

impl Volumes {
    /// Loads the attachment record in `data` (forgetting attachments of volumes that no
    /// longer exist).
    pub(crate) fn open(store: Arc<Store>, data: &Path) -> Result<Arc<Volumes>, Error> {
        let path = data.join("attachments.json");
        let mut table: Table = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                Error::BadRequest(format!(
                    "{} is not an attachment record: {e}",
                    path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Table::default(),
            Err(e) => return Err(Error::Io(format!("reading {}", path.display()), e)),
        };
        let names: std::collections::HashSet<String> =
            store.volumes()?.into_iter().map(|v| v.name).collect();
        table
            .attachments
            .retain(|_, a| a.persistent && names.contains(&a.volume));
        let v = Arc::new(Volumes {
            store,
            path,
            table: Mutex::new(table),
            released: Condvar::new(),
        });
        v.save(&v.lock())?;
        Ok(v)
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().expect("attachment table lock")
    }

    /// Writes the persistent attachments durably.
    fn save(&self, t: &Table) -> Result<(), Error> {
        let persistent = Table {
            next_id: t.next_id,
            attachments: t
                .attachments
                .iter()
                .filter(|(_, a)| a.persistent)
                .map(|(k, a)| (*k, a.clone()))
                .collect(),
        };
        crate::mounts::write_atomic(&self.path, &persistent)
            .map_err(|e| Error::Io(format!("writing {}", self.path.display()), e))
    }

    /// The template whose stamp `name` is (`data` for `data-3` when `data` is a template
    /// of more than 3 instances).
    fn template_of(&self, name: &str, all: &[VolumeSummary]) -> Option<String> {
        let (base, n) = name.rsplit_once('-')?;
        let n: u32 = n.parse().ok()?;
        all.iter()
            .find(|v| v.name == base && v.instances.is_some_and(|i| n < i))
            .map(|v| v.name.clone())
    }

    /// Creates a volume; a per-instance template (`spec.instances`) also gets its stamps
    /// `NAME-0` .. `NAME-{N-1}`. All or nothing: a failure removes what was created.
    pub(crate) fn create(&self, spec: &VolumeSpec) -> Result<Vec<VolumeSummary>, Error> {
        if let Some(n) = spec.instances {
            if spec.mode != AccessMode::Rwo {
                return Err(Error::BadRequest(format!(
                    "volume {}: per-instance volumes are rwo (one per instance); mode {} cannot be stamped",
                    spec.name,
                    spec.mode.as_str()
                )));
            }
            if n == 0 || n > 1024 {
                return Err(Error::BadRequest(format!(
                    "volume {}: --instances must be 1 to 1024, not {n}",
                    spec.name
                )));
            }
        }
        let stamps: Vec<String> = (0..spec.instances.unwrap_or(0))
            .map(|i| format!("{}-{i}", spec.name))
            .collect();
        let existing = self.store.volumes()?;
        if let Some(v) = existing.iter().find(|v| stamps.contains(&v.name)) {
            return Err(VolumeError::Exists {
                volume: v.name.clone(),
            }
            .into());
        }
        let mut made = vec![self.store.create_volume(spec)?];
        for s in &stamps {
            let stamp = VolumeSpec {
                name: s.clone(),
                instances: None,
                ..spec.clone()
            };
            match self.store.create_volume(&stamp) {
                Ok(v) => made.push(v),
                Err(e) => {
                    for v in made.iter().rev() {
                        let _ = self.store.delete_volume(&v.name, false);
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(made)
    }

    /// Removes a volume (`NAME`) or a snapshot (`NAME@SNAP`); refused while the volume
    /// is attached, while it has snapshots or clones (unless `cascade`), and for a
    /// template with stamps (unless `cascade`, which removes the stamps too). Returns
    /// what was removed.
    pub(crate) fn remove(&self, name: &str, cascade: bool) -> Result<Vec<String>, Error> {
        let t = self.lock();
        if let Some((vol, snap)) = split_snapshot(name) {
            let clones = self.store.delete_snapshot(vol, snap, cascade)?;
            let mut removed = clones;
            removed.push(name.to_string());
            return Ok(removed);
        }
        let all = self.store.volumes()?;
        let v = all
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| VolumeError::NotFound {
                volume: name.to_string(),
            })?;
        let stamps: Vec<String> = (0..v.instances.unwrap_or(0))
            .map(|i| format!("{name}-{i}"))
            .filter(|s| all.iter().any(|v| &v.name == s))
            .collect();
        if !stamps.is_empty() && !cascade {
            return Err(Error::BadRequest(format!(
                "volume {name} is a per-instance template with instances {}; remove them first or cascade",
                stamps.join(", ")
            )));
        }
        let mut order = stamps;
        order.push(name.to_string());
        // Every volume a cascade could take must be free; clones are found by castore.
        for n in &order {
            if let Some(a) = t.attachments.values().find(|a| &a.volume == n) {
                return Err(Error::BadRequest(format!(
                    "volume {n} is attached ({}); detach it first",
                    a.describe()
                )));
            }
        }
        let mut removed = Vec::new();
        for n in &order {
            removed.extend(self.store.delete_volume(n, cascade)?);
        }
        Ok(removed)
    }

    /// The volume's attachments, oldest first.
    pub(crate) fn attachments(&self, volume: &str) -> Vec<Attachment> {
        self.lock()
            .attachments
            .values()
            .filter(|a| a.volume == volume)
            .cloned()
            .collect()
    }

    /// Attaches `volume` for `holder` under its access mode. `persistent`: recorded
    /// until detached; otherwise the returned guard's drop ends it.
    fn acquire(
        &self,
        volume: &str,
        holder: &str,
        read_only: bool,
        persistent: bool,
    ) -> Result<Attachment, Error> {
        let all = self.store.volumes()?;
        let v = all
            .iter()
            .find(|v| v.name == volume)
            .ok_or_else(|| VolumeError::NotFound {
                volume: volume.to_string(),
            })?;
        if let Some(n) = v.instances {
            return Err(Error::BadRequest(format!(
                "volume {volume} is a per-instance template; attach one of its instances {volume}-0 .. {volume}-{}",
                n.saturating_sub(1)
            )));
        }
        if persistent && !read_only && v.mode == AccessMode::Rox {
            return Err(Error::BadRequest(format!(
                "volume {volume} is rox (read-only many): attach it read-only (tide volume attach --read-only)"
            )));
        }
        let mut t = self.lock();
        let deadline = Instant::now() + HANDOFF_GRACE;
        while v.mode == AccessMode::Rwo
            && let Some(a) = t.attachments.values().find(|a| a.volume == volume)
        {
            let now = Instant::now();
            if a.persistent || now >= deadline {
                return Err(Error::InUse {
                    volume: volume.to_string(),
                    holder: a.describe(),
                });
            }
            t = self
                .released
                .wait_timeout(t, deadline - now)
                .expect("attachment table lock")
                .0;
        }
        t.next_id += 1;
        let a = Attachment {
            id: t.next_id,
            volume: volume.to_string(),
            holder: holder.to_string(),
            read_only: read_only || v.mode == AccessMode::Rox,
            persistent,
            since: now(),
            revoked: Arc::new(AtomicBool::new(false)),
        };
        t.attachments.insert(a.id, a.clone());
        if persistent && let Err(e) = self.save(&t) {
            t.attachments.remove(&a.id);
            return Err(e);
        }
        Ok(a)
    }

    /// A persistent attachment (`tide volume attach`).
    pub(crate) fn attach(
        &self,
        volume: &str,
        holder: &str,
        read_only: bool,
    ) -> Result<Attachment, Error> {
        if holder.trim().is_empty() {
            return Err(Error::BadRequest("an attachment needs a holder".into()));
        }
        self.acquire(volume, holder, read_only, true)
    }

    /// Ends persistent attachment `id` of `volume`; connections under it fail from now.
    pub(crate) fn detach(&self, volume: &str, id: u64) -> Result<Attachment, Error> {
        let mut t = self.lock();
        match t.attachments.get(&id) {
            Some(a) if a.volume == volume && a.persistent => {}
            Some(a) if a.volume == volume => {
                return Err(Error::BadRequest(format!(
                    "attachment {id} of volume {volume} is an NBD connection ({}); it ends when the client disconnects",
                    a.holder
                )));
            }
            _ => {
                return Err(Error::BadRequest(format!(
                    "volume {volume} has no attachment {id}"
                )));
            }
        }
        let a = t.attachments.remove(&id).expect("checked above");
        if let Err(e) = self.save(&t) {
            t.attachments.insert(id, a);
            return Err(e);
        }
        a.revoked.store(true, Ordering::SeqCst);
        Ok(a)
    }

    /// The attachment `id` of `volume`, for `Attachment` capabilities.
    pub(crate) fn attachment(&self, volume: &str, id: u64) -> Result<Attachment, Error> {
        self.lock()
            .attachments
            .get(&id)
            .filter(|a| a.volume == volume)
            .cloned()
            .ok_or_else(|| Error::BadRequest(format!("volume {volume} has no attachment {id}")))
    }

    /// Every volume with what volumed adds: its template and its attachment count.
    pub(crate) fn list(&self) -> Result<Vec<Listed>, Error> {
        let all = self.store.volumes()?;
        let t = self.lock();
        Ok(all
            .iter()
            .map(|v| Listed {
                template: self.template_of(&v.name, &all),
                attachments: t
                    .attachments
                    .values()
                    .filter(|a| a.volume == v.name)
                    .count() as u32,
                summary: v.clone(),
            })
            .collect())
    }

    /// One volume as [`Volumes::list`] shows it.
    pub(crate) fn listed(&self, name: &str) -> Result<Listed, Error> {
        self.list()?
            .into_iter()
            .find(|l| l.summary.name == name)
            .ok_or_else(|| {
                VolumeError::NotFound {
                    volume: name.to_string(),
                }
                .into()
            })
    }

    /// The store the volumes live in.
    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }
}

/// A volume with what volumed knows of it beyond the store.
#[derive(Debug, Clone)]
pub(crate) struct Listed {
    pub(crate) summary: VolumeSummary,
    pub(crate) template: Option<String>,
    pub(crate) attachments: u32,
}

/// The export names [`Exports`] serves: a handle on the shared [`Volumes`].
#[derive(Debug, Clone)]
pub(crate) struct VolumeExports(pub(crate) Arc<Volumes>);

fn export_err(e: Error) -> ExportError {
    match e {
        Error::InUse { volume, holder } => ExportError::InUse {
            name: volume,
            holder,
        },
        Error::Store(castore::Error::Volume(
            VolumeError::NotFound { .. } | VolumeError::SnapshotNotFound { .. },
        )) => ExportError::NotFound(e.to_string()),
        Error::BadRequest(m) => ExportError::Denied(m),
        e => ExportError::Failed(Box::new(e)),
    }
}

impl Exports for VolumeExports {
    fn list(&self) -> Result<Vec<(String, Option<String>)>, ExportError> {
        let vols = self
            .0
            .store
            .volumes()
            .map_err(|e| ExportError::Failed(Box::new(e)))?;
        let mut out = Vec::new();
        for v in vols.iter().filter(|v| v.instances.is_none()) {
            out.push((v.name.clone(), Some(describe(&self.0, v))));
            let snaps = self
                .0
                .store
                .volume_snapshots(&v.name)
                .map_err(|e| ExportError::Failed(Box::new(e)))?;
            for s in snaps {
                out.push((
                    format!("{}@{}", v.name, s.name),
                    Some(format!("snapshot {} of {} (read-only)", s.name, v.name)),
                ));
            }
        }
        Ok(out)
    }

    fn open(&self, name: &str, intent: Intent, peer: &str) -> Result<Export, ExportError> {
        let vols = &self.0;
        if name.is_empty() {
            return Err(ExportError::NotFound(
                "volumed has no default export: name a volume (NAME, NAME@SNAPSHOT)".into(),
            ));
        }
        if let Some((vol, snap)) = split_snapshot(name) {
            let v = vols
                .store
                .open_snapshot(vol, snap)
                .map_err(|e| export_err(e.into()))?;
            return device(
                v,
                Access::shared(true),
                None,
                format!("snapshot {snap} of {vol} (read-only)"),
            );
        }
        let (volume, att) = match name.split_once('/') {
            Some((vol, id)) => {
                let id: u64 = id.parse().map_err(|_| {
                    ExportError::NotFound(format!("export {name:?}: expected VOLUME/ATTACHMENT-ID"))
                })?;
                let a = vols.attachment(vol, id).map_err(|_| {
                    ExportError::NotFound(format!("volume {vol} has no attachment {id}"))
                })?;
                if !a.persistent {
                    return Err(ExportError::NotFound(format!(
                        "volume {vol} has no attachment {id}"
                    )));
                }
                (vol.to_string(), Some(a))
            }
            None => (name.to_string(), None),
        };
        let summary = vols
            .store
            .volumes()
            .map_err(|e| export_err(e.into()))?
            .into_iter()
            .find(|v| v.name == volume)
            .ok_or_else(|| ExportError::NotFound(format!("no such volume: {volume}")))?;
        let handle = vols
            .store
            .open_volume(&volume)
            .map_err(|e| export_err(e.into()))?;
        let description = describe(vols, &summary);
        // A connection to an RWO volume by name is the one attachment, so a second
        // connection would be refused: multi-conn is not offered there.
        let by_name = Access {
            read_only: summary.mode == AccessMode::Rox,
            multi_conn: summary.mode != AccessMode::Rwo,
            revoked: None,
        };
        match (att, intent) {
            (Some(a), _) => {
                let access = Access {
                    read_only: a.read_only,
                    multi_conn: true,
                    revoked: Some(a.revoked.clone()),
                };
                device(handle, access, None, description)
            }
            (None, Intent::Query) => device(handle, by_name, None, description),
            (None, Intent::Serve) => {
                let a = vols
                    .acquire(&volume, peer, false, false)
                    .map_err(export_err)?;
                let held = Held {
                    volumes: vols.clone(),
                    id: a.id,
                };
                device(handle, by_name, Some(held), description)
            }
        }
    }
}

/// An export's description: mode and size, and who holds an RWO volume (serving it to
/// anyone else would be refused; `nbdinfo --list` shows this).
fn describe(vols: &Volumes, v: &VolumeSummary) -> String {
    let d = format!("{} volume, {} bytes", v.mode.as_str(), v.size);
    match vols.attachments(&v.name).first() {
        Some(a) if v.mode == AccessMode::Rwo => format!("{d}, in use by {}", a.describe()),
        _ => d,
    }
}

/// What a connection may do with a volume.
#[derive(Debug)]
struct Access {
    read_only: bool,
    /// Whether other connections may serve the same attachment (NBD `CAN_MULTI_CONN`).
    multi_conn: bool,
    /// Set when the persistent attachment served is detached.
    revoked: Option<Arc<AtomicBool>>,
}

impl Access {
    /// Any number of connections, read-only or not.
    fn shared(read_only: bool) -> Access {
        Access {
            read_only,
            multi_conn: true,
            revoked: None,
        }
    }
}

fn device(
    vol: castore::Volume,
    access: Access,
    held: Option<Held>,
    description: String,
) -> Result<Export, ExportError> {
    let size = vol.size().map_err(|e| export_err(e.into()))?;
    let extent = vol.extent_size();
    Ok(Export {
        device: Arc::new(VolumeDevice {
            vol,
            size,
            extent,
            access,
            _held: held,
        }),
        description: Some(description),
    })
}

/// A castore volume (or snapshot) as an NBD block device.
#[derive(Debug)]
struct VolumeDevice {
    vol: castore::Volume,
    /// The size when the connection opened it (a resize is seen by new connections).
    size: u64,
    extent: u64,
    access: Access,
    _held: Option<Held>,
}

/// The one mapping from store errors to device errors.
fn device_err(e: castore::Error) -> DeviceError {
    match e {
        // The disk refused or failed the chunk log's write or sync: its errno (ENOSPC
        // becomes NBD's ENOSPC, the rest EIO).
        castore::Error::Io { source, op, path } => {
            crate::log!("nbd: {op} {}: {source}", path.display());
            DeviceError::Io(source)
        }
        castore::Error::Volume(VolumeError::ReadOnly { .. }) => DeviceError::ReadOnly,
        // A shrink since this connection opened: the range is gone.
        castore::Error::Volume(VolumeError::OutOfRange { .. }) => DeviceError::NoSpace,
        castore::Error::Volume(
            VolumeError::NotFound { .. } | VolumeError::SnapshotNotFound { .. },
        ) => DeviceError::Io(std::io::Error::from_raw_os_error(libc::ESHUTDOWN)),
        e => {
            crate::log!("nbd: {e}");
            DeviceError::Backend(Box::new(e))
        }
    }
}

impl VolumeDevice {
    fn live(&self) -> Result<(), DeviceError> {
        match &self.access.revoked {
            Some(r) if r.load(Ordering::SeqCst) => Err(DeviceError::Io(
                std::io::Error::from_raw_os_error(libc::ESHUTDOWN),
            )),
            _ => Ok(()),
        }
    }
}

impl BlockDevice for VolumeDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.access.read_only
    }

    /// Where more than one connection may serve the volume, the promise holds: every
    /// connection's handle shares the volume's in-process state (a write is seen by
    /// every later read), and a flush syncs the one write-ahead log every write went
    /// through.
    fn can_multi_conn(&self) -> bool {
        self.access.multi_conn
    }

    /// Sectors, like a disk: volume sizes are whole sectors, and clients align to it
    /// (byte-granular writes would only add read-modify-write cycles).
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            min: 512,
            preferred: 4096,
            max: 32 << 20,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.live()?;
        self.vol.read_at(offset, buf).map_err(device_err)
    }

    fn read_in_memory(&self, offset: u64, buf: &mut [u8]) -> Option<Result<(), DeviceError>> {
        if let Err(e) = self.live() {
            return Some(Err(e));
        }
        self.vol.read_in_memory(offset, buf).map(Ok)
    }

    /// Writes smaller than an extent are journal appends (memory and an unsynced log
    /// write); a write covering a whole extent stores its chunk in the chunk log and
    /// waits for it to be durable.
    fn write_is_quick(&self, _offset: u64, len: u32) -> bool {
        u64::from(len) < self.extent
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        self.live()?;
        self.vol.write(offset, data, fua).map_err(device_err)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.live()?;
        self.vol.flush().map_err(device_err)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        self.live()?;
        self.vol.trim(offset, len, fua).map_err(device_err)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), DeviceError> {
        self.live()?;
        // Whole extents become zero markers (fast); a partial extent is rewritten.
        let aligned = offset.is_multiple_of(self.extent) && len.is_multiple_of(self.extent);
        if flags.fast && !aligned {
            return Err(DeviceError::NotFast);
        }
        match flags.no_hole {
            true => self.vol.write_zeroes_allocated(offset, len, flags.fua),
            false => self.vol.write_zeroes(offset, len, flags.fua),
        }
        .map_err(device_err)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        self.live()?;
        let runs = self.vol.block_status(offset, len).map_err(device_err)?;
        Ok(runs
            .into_iter()
            .map(|r| Extent {
                len: r.len,
                hole: !r.allocated,
                zero: r.zero,
            })
            .collect())
    }
}
