//! Block volumes: a size plus a block map of fixed power-of-two extents, each a chunk
//! (deduplicated with every other chunk of the store) or "zero", versioned by generation.
//!
//! **Block map.** Key `volume id ‖ extent ‖ !generation` (8 B big-endian each), value a
//! chunk digest or the 1-byte zero marker. Writes put `(vol, e, !current)`; reading
//! extent `e` at generation `g` is one seek to `(vol, e, !g)`: the first key with the
//! same `(vol, e)` is the newest version at or below `g`. A snapshot records
//! `name → current` and bumps the current generation (one record write, no chunk); a
//! clone is a new volume whose parent is `(volume, snapshot generation)`, and reads fall
//! back along that chain when the clone has no version of an extent (also O(1)).
//! Volume ids are internal `u64`s, so names never appear in block map keys.
//!
//! **Invariant (sizes):** at every generation a reader can see, every byte at or beyond
//! the volume's size at that generation reads as zero. Shrinking keeps it by writing zero
//! markers (and zeroing the tail of the boundary extent) at the current generation, so a
//! later grow shows zeros and snapshots keep their bytes.
//!
//! **Invariant (versions):** only the current generation is ever written; versions at
//! older generations are immutable until no live reader (a snapshot, the current
//! generation, or a clone's base, which is always a live snapshot) can see them, when
//! deleting a snapshot prunes them. GC marks every chunk named by the block map.
//!
//! **Journal:** writes smaller than an extent wait in the `volume_journal` family and in
//! memory until folded into their extent ([`journal`]); they are always of the current
//! generation, and snapshot, shrink and delete fold or drop them in their own batches.
//!
//! The admin operations (create, snapshot, clone, resize, delete) live here; reads and
//! writes of bytes in [`io`] through [`Volume`] handles.

mod check;
mod io;
mod journal;
mod record;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;

pub use io::{BLOCK_STATUS_MAX_EXTENTS, BlockStatus, Volume};
pub use journal::DEFAULT_JOURNAL_BUDGET;
use journal::{Dirty, Stripe};

use crate::Digest;
use crate::db::{Batch, Cf};
use crate::error::{Error, Result};
use crate::read::ChunkCache;
use crate::store::Store;
pub(crate) use record::{Extent, parse_key};
use record::{Record, Snap};

/// Default extent size: a chunk per 64 KiB of volume. A constant so that benchmarks can
/// move it; each volume records its own, so changing it affects only new volumes.
pub const DEFAULT_EXTENT_SIZE: u32 = 64 << 10;
/// Smallest extent size accepted.
pub const MIN_EXTENT_SIZE: u32 = 4 << 10;
/// Largest extent size accepted: an extent is read back through [`Store::chunk`], which
/// bounds decompression by the largest chunk FastCDC cuts.
pub const MAX_EXTENT_SIZE: u32 = crate::chunker::MAX_SIZE;
/// Volume sizes are whole sectors.
pub const SECTOR_SIZE: u64 = 512;

const NEXT_ID_KEY: &[u8] = b"volume_next_id";

/// Who may attach a volume, recorded for volumed (which enforces it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessMode {
    /// One read-write attachment at a time.
    Rwo = 0,
    /// Many read-write attachments.
    Rwx = 1,
    /// Many read-only attachments.
    Rox = 2,
}

impl AccessMode {
    /// Parses `rwo`, `rwx` or `rox` (any case).
    pub fn parse(s: &str) -> Option<AccessMode> {
        match s.to_ascii_lowercase().as_str() {
            "rwo" => Some(AccessMode::Rwo),
            "rwx" => Some(AccessMode::Rwx),
            "rox" => Some(AccessMode::Rox),
            _ => None,
        }
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessMode::Rwo => "rwo",
            AccessMode::Rwx => "rwx",
            AccessMode::Rox => "rox",
        }
    }

    pub(crate) fn from_u8(b: u8) -> Option<AccessMode> {
        [AccessMode::Rwo, AccessMode::Rwx, AccessMode::Rox]
            .get(usize::from(b))
            .copied()
    }
}

/// What went wrong with a volume operation; every variant names its volume.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    /// No volume has this name.
    #[error("no such volume: {volume}")]
    NotFound {
        /// The name asked for.
        volume: String,
    },
    /// The volume has no snapshot of this name.
    #[error("volume {volume} has no snapshot {snapshot}")]
    SnapshotNotFound {
        /// The volume.
        volume: String,
        /// The snapshot asked for.
        snapshot: String,
    },
    /// A volume of this name exists.
    #[error("volume {volume} already exists")]
    Exists {
        /// The name.
        volume: String,
    },
    /// The volume already has a snapshot of this name.
    #[error("volume {volume} already has a snapshot {snapshot}")]
    SnapshotExists {
        /// The volume.
        volume: String,
        /// The snapshot name.
        snapshot: String,
    },
    /// A volume or snapshot name breaks the naming rules.
    #[error("invalid volume or snapshot name {name:?}: {reason}")]
    BadName {
        /// What was given.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A size or extent size is not acceptable.
    #[error("volume {volume}: {reason}")]
    BadSize {
        /// The volume.
        volume: String,
        /// What is wrong with the size.
        reason: String,
    },
    /// An access beyond the end of the volume.
    #[error("volume {volume}: {len} bytes at offset {offset} reach past its size {size}")]
    OutOfRange {
        /// The volume (or `volume@snapshot`).
        volume: String,
        /// Where the access started.
        offset: u64,
        /// How long it was.
        len: u64,
        /// The volume's size.
        size: u64,
    },
    /// A write to a snapshot.
    #[error("{volume}@{snapshot} is a snapshot and cannot be written")]
    ReadOnly {
        /// The volume.
        volume: String,
        /// The snapshot.
        snapshot: String,
    },
    /// Deleting a volume that has snapshots, without cascade.
    #[error(
        "volume {volume} has snapshots ({}); delete them first or cascade",
        snapshots.join(", ")
    )]
    HasSnapshots {
        /// The volume.
        volume: String,
        /// Its snapshots.
        snapshots: Vec<String>,
    },
    /// Deleting a snapshot (or volume) that clones depend on, without cascade.
    #[error(
        "{volume}@{snapshot} has clones ({}); delete them first or cascade",
        clones.join(", ")
    )]
    HasClones {
        /// The volume.
        volume: String,
        /// The snapshot the clones were made from.
        snapshot: String,
        /// The clones.
        clones: Vec<String>,
    },
    /// A resize that would shrink, without the shrink flag.
    #[error(
        "volume {volume}: resizing from {size} to {new_size} bytes would discard data; shrink must be asked for explicitly"
    )]
    ShrinkRefused {
        /// The volume.
        volume: String,
        /// Its size.
        size: u64,
        /// The size asked for.
        new_size: u64,
    },
    /// A block map entry that does not decode (a bug or a foreign store).
    #[error("volume id {id}: block map entry of extent {extent} cannot be decoded")]
    BadEntry {
        /// The internal volume id.
        id: u64,
        /// The extent.
        extent: u64,
    },
    /// A volume record that does not decode (a bug or a foreign store).
    #[error("volume record {id} cannot be decoded")]
    BadRecord {
        /// The internal volume id.
        id: u64,
    },
}

/// What [`Store::create_volume`] makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// Name: like an image name's components (`a-z 0-9 . _ -`, 1 to 128 characters).
    pub name: String,
    /// Size in bytes, a multiple of [`SECTOR_SIZE`].
    pub size: u64,
    /// Extent size, a power of two in [`MIN_EXTENT_SIZE`]..=[`MAX_EXTENT_SIZE`].
    pub extent_size: u32,
    /// Access mode.
    pub mode: AccessMode,
    /// Per-instance template count (`NAME-0`, `NAME-1`, … stamped by volumed).
    pub instances: Option<u32>,
}

impl VolumeSpec {
    /// An RWO volume with the default extent size.
    pub fn new(name: impl Into<String>, size: u64) -> VolumeSpec {
        VolumeSpec {
            name: name.into(),
            size,
            extent_size: DEFAULT_EXTENT_SIZE,
            mode: AccessMode::Rwo,
            instances: None,
        }
    }
}

/// A clone's origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeOrigin {
    /// The volume cloned.
    pub volume: String,
    /// Its snapshot the clone started from.
    pub snapshot: String,
}

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    /// Its name (exported as `VOLUME@NAME`).
    pub name: String,
    /// The generation it names.
    pub generation: u64,
    /// The volume's size when it was taken.
    pub size: u64,
    /// When it was taken (Unix seconds).
    pub created: u64,
    /// Volumes cloned from it.
    pub clones: Vec<String>,
}

/// One volume, as listings show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeSummary {
    /// Its name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Extent size in bytes.
    pub extent_size: u64,
    /// Access mode.
    pub mode: AccessMode,
    /// Per-instance template count.
    pub instances: Option<u32>,
    /// The generation writes go to.
    pub generation: u64,
    /// Number of snapshots.
    pub snapshots: usize,
    /// For clones: where from.
    pub origin: Option<VolumeOrigin>,
    /// When it was created (Unix seconds).
    pub created: u64,
}

/// Everything `volume inspect` shows that the store knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeInfo {
    /// The listing facts.
    #[serde(flatten)]
    pub summary: VolumeSummary,
    /// Its snapshots, oldest first.
    pub snapshot_list: Vec<SnapshotInfo>,
    /// Bytes of extents holding a chunk at the current generation (inherited ones too).
    pub allocated_bytes: u64,
    /// Stored (compressed) bytes of the chunks that only this volume's own block map
    /// names (its current data and its snapshots): roughly what deleting it with its
    /// snapshots would free. Approximate: chunks any other volume's block map names, or
    /// that a clone reads through one of its snapshots (even where the clone has since
    /// overwritten the extent), count as shared; image chunks are not consulted (an image
    /// chunk equals an extent only when FastCDC cut exactly an extent's bytes).
    pub unique_bytes: u64,
}

/// What [`Store::volume_totals`] counts.
#[derive(Debug, Default)]
pub(crate) struct VolumeTotals {
    pub(crate) volumes: u64,
    pub(crate) snapshots: u64,
    /// Allocated bytes of every volume and every snapshot, each as if stored alone.
    pub(crate) logical_bytes: u64,
    /// The distinct chunks block maps name.
    pub(crate) chunks: HashSet<Digest>,
}

/// Per-process state of one volume, shared by all its handles.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) id: u64,
    /// Writers and readers hold it shared; snapshot, resize and delete exclusively, so a
    /// snapshot never splits a write and a resize never races one.
    pub(crate) state: RwLock<State>,
    /// Extent locks (striped), each with its extents' pending journal records: a write
    /// or a fold holds its extents' stripes; a read holds one while it consults it.
    pub(crate) stripes: Box<[Mutex<Stripe>]>,
    /// Memory its pending journal records hold (part of [`Registry::dirty_bytes`]).
    pub(crate) dirty_bytes: AtomicUsize,
    /// Where the next fold to free memory starts looking (a stripe index).
    pub(crate) hand: AtomicUsize,
}

impl Shared {
    pub(crate) fn stripe_of(&self, e: u64) -> usize {
        (e % self.stripes.len() as u64) as usize
    }
}

#[derive(Debug)]
pub(crate) struct State {
    pub(crate) rec: Record,
    /// The clone chain above this volume: (parent id, generation, size), nearest first.
    pub(crate) ancestors: Vec<Level>,
    pub(crate) deleted: bool,
}

/// One step of a read: a volume's block map at a generation, with its size there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Level {
    pub(crate) id: u64,
    pub(crate) generation: u64,
    pub(crate) size: u64,
}

/// What a snapshot is, apart from its data: for sending it to the tier and making a
/// volume of it on another host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SnapshotShape {
    pub(crate) size: u64,
    pub(crate) extent_shift: u8,
    pub(crate) mode: AccessMode,
    pub(crate) created: u64,
}

const STRIPES: usize = 256;

/// The volumes of one store as this process sees them.
#[derive(Debug)]
pub(crate) struct Registry {
    /// Serialises admin operations (create, snapshot, clone, resize, delete, open).
    pub(crate) admin: Mutex<()>,
    pub(crate) open: Mutex<HashMap<u64, Arc<Shared>>>,
    /// Decompressed, verified extents, shared by all volumes.
    pub(crate) cache: ChunkCache,
    /// Memory held by pending journal records of all volumes.
    pub(crate) dirty_bytes: AtomicUsize,
    /// Above this many dirty bytes, writers fold the oldest dirty extents.
    pub(crate) budget: AtomicUsize,
    /// Orders extents by when they became dirty.
    pub(crate) tick: AtomicU64,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            admin: Mutex::default(),
            open: Mutex::default(),
            cache: ChunkCache::default(),
            dirty_bytes: AtomicUsize::new(0),
            budget: AtomicUsize::new(DEFAULT_JOURNAL_BUDGET),
            tick: AtomicU64::new(0),
        }
    }
}

impl Registry {
    /// Counts `delta` bytes of pending journal memory for `shared`.
    pub(crate) fn account(&self, shared: &Shared, delta: isize) {
        if delta >= 0 {
            shared
                .dirty_bytes
                .fetch_add(delta as usize, Ordering::Relaxed);
            self.dirty_bytes
                .fetch_add(delta as usize, Ordering::Relaxed);
        } else {
            shared
                .dirty_bytes
                .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
            self.dirty_bytes
                .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }

    pub(crate) fn next_tick(&self) -> u64 {
        self.tick.fetch_add(1, Ordering::Relaxed)
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Checks a volume or snapshot name: 1 to 128 of `a-z 0-9 . _ -`, starting with a letter
/// or digit. No `/`, `:` or `@`, so `VOLUME@SNAPSHOT` export names are unambiguous.
pub fn validate_volume_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Error::from(VolumeError::BadName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 128 {
        return Err(bad("must be 1 to 128 characters"));
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(&c))
    {
        return Err(bad("may hold only a-z, 0-9 and . _ -"));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(bad("must start with a letter or digit"));
    }
    Ok(())
}

/// Bytes from a size as people write it: `4096`, `64K`, `64KiB`, `10G`, `1.5T`, `2gb`
/// (K, M, G, T, P are powers of 1024, in any case, with an optional `B` or `iB`). For
/// command-line sizes (volumes, a host's memory); fractions must come to whole bytes.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let t = if lower.ends_with("ib") {
        &t[..t.len() - 2]
    } else if lower.ends_with('b') {
        &t[..t.len() - 1]
    } else {
        t
    };
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                _ => return Err(format!("size {s:?}: unknown unit {c:?} (K, M, G, T, P)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let bad = || format!("size {s:?}: expected a number of bytes, optionally with K, M, G, T or P");
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(1u64 << shift)
            .ok_or_else(|| format!("size {s:?} is too large"));
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    let v = f * (1u64 << shift) as f64;
    if !(v.is_finite() && v >= 0.0 && v < u64::MAX as f64) || v.fract() != 0.0 {
        return Err(format!("size {s:?} is not a whole number of bytes"));
    }
    Ok(v as u64)
}

fn check_size(volume: &str, size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
        return Err(VolumeError::BadSize {
            volume: volume.to_string(),
            reason: format!("size {size} must be a positive multiple of {SECTOR_SIZE} bytes"),
        }
        .into());
    }
    Ok(())
}

pub(crate) fn extents(size: u64, shift: u8) -> u64 {
    size.div_ceil(1 << shift)
}

impl Store {
    fn volume_id(&self, name: &str) -> Result<u64> {
        let v = self
            .db
            .get(Cf::VolumeNames, name.as_bytes())?
            .ok_or_else(|| VolumeError::NotFound {
                volume: name.to_string(),
            })?;
        let bytes: [u8; 8] = v.as_slice().try_into().map_err(|_| VolumeError::NotFound {
            volume: name.to_string(),
        })?;
        Ok(u64::from_be_bytes(bytes))
    }

    pub(crate) fn volume_record(&self, id: u64) -> Result<Option<Record>> {
        match self.db.get(Cf::Volumes, &id.to_be_bytes())? {
            None => Ok(None),
            Some(v) => Record::decode(&v)
                .map(Some)
                .map_err(|_| VolumeError::BadRecord { id }.into()),
        }
    }

    /// Every volume record, by id.
    pub(crate) fn volume_records(&self) -> Result<Vec<(u64, Record)>> {
        let mut out = Vec::new();
        for kv in self.db.entries(Cf::Volumes) {
            let (k, v) = kv?;
            let id = u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0xff; 8]));
            out.push((
                id,
                Record::decode(&v).map_err(|_| VolumeError::BadRecord { id })?,
            ));
        }
        Ok(out)
    }

    /// The shared state of volume `id`, loaded on first use.
    pub(crate) fn volume_shared(&self, id: u64) -> Result<Arc<Shared>> {
        let mut open = self.volumes.open.lock().expect("volume registry lock");
        if let Some(s) = open.get(&id) {
            return Ok(s.clone());
        }
        let rec = self
            .volume_record(id)?
            .ok_or(VolumeError::BadRecord { id })?;
        let mut ancestors = Vec::new();
        let mut next = rec.parent;
        while let Some((pid, generation)) = next {
            let p = self
                .volume_record(pid)?
                .ok_or(VolumeError::BadRecord { id: pid })?;
            let size = p
                .snapshots
                .iter()
                .find(|s| s.generation == generation)
                .map_or(0, |s| s.size);
            ancestors.push(Level {
                id: pid,
                generation,
                size,
            });
            next = p.parent;
        }
        let es = rec.extent_size();
        let mut stripes: Vec<Stripe> = (0..STRIPES).map(|_| Stripe::default()).collect();
        // Replay: the journal records that survived (a crash, or a close without a fold)
        // become the extents' pending state again, in sequence order.
        let lower = journal::key(id, 0, 0);
        let upper = journal::key(id + 1, 0, 0);
        let mut cursor = self
            .db
            .cursor(Cf::VolumeJournal, Some(&lower[..]), Some(&upper[..]));
        let mut entry = cursor.first()?;
        let mut mem = 0;
        while let Some((k, v)) = entry {
            let bad = |extent| VolumeError::BadEntry { id, extent };
            let (_, e, seq) = journal::parse_key(k).ok_or(bad(u64::MAX))?;
            let (off, patch) = journal::decode(v, es).ok_or(bad(e))?;
            let d = stripes[(e % STRIPES as u64) as usize]
                .dirty
                .entry(e)
                .or_insert_with(|| {
                    let d = Dirty::new(self.volumes.next_tick());
                    mem += d.mem;
                    d
                });
            mem = (mem as isize + d.push(seq, off, patch)) as usize;
            entry = cursor.next()?;
        }
        drop(cursor);
        let shared = Arc::new(Shared {
            id,
            state: RwLock::new(State {
                rec,
                ancestors,
                deleted: false,
            }),
            stripes: stripes.into_iter().map(Mutex::new).collect(),
            dirty_bytes: AtomicUsize::new(0),
            hand: AtomicUsize::new(0),
        });
        self.volumes.account(&shared, mem as isize);
        open.insert(id, shared.clone());
        Ok(shared)
    }

    /// Creates an empty volume (every byte reads as zero).
    pub fn create_volume(&self, spec: &VolumeSpec) -> Result<VolumeSummary> {
        validate_volume_name(&spec.name)?;
        check_size(&spec.name, spec.size)?;
        let es = spec.extent_size;
        if !es.is_power_of_two() || !(MIN_EXTENT_SIZE..=MAX_EXTENT_SIZE).contains(&es) {
            return Err(VolumeError::BadSize {
                volume: spec.name.clone(),
                reason: format!(
                    "extent size {es} must be a power of two from {MIN_EXTENT_SIZE} to {MAX_EXTENT_SIZE}"
                ),
            }
            .into());
        }
        let rec = Record {
            name: spec.name.clone(),
            size: spec.size,
            extent_shift: es.trailing_zeros() as u8,
            mode: spec.mode,
            instances: spec.instances.unwrap_or(0),
            parent: None,
            generation: 1,
            created: now(),
            snapshots: Vec::new(),
        };
        let _admin = self.volumes.admin.lock().expect("volume admin lock");
        self.insert_volume(&rec)?;
        Ok(self.summary(&rec, &HashMap::new()))
    }

    /// Writes a new volume record and its name (admin lock held).
    fn insert_volume(&self, rec: &Record) -> Result<u64> {
        self.insert_volume_with(rec, |_, _, _| {})
    }

    /// [`Store::insert_volume`], with `more` adding to the same batch once the new
    /// volume's id is known.
    fn insert_volume_with(
        &self,
        rec: &Record,
        more: impl FnOnce(&crate::db::Db, u64, &mut Batch),
    ) -> Result<u64> {
        if self.db.contains(Cf::VolumeNames, rec.name.as_bytes())? {
            return Err(VolumeError::Exists {
                volume: rec.name.clone(),
            }
            .into());
        }
        let id = match self.db.get(Cf::Meta, NEXT_ID_KEY)? {
            Some(v) => u64::from_be_bytes(v.as_slice().try_into().unwrap_or([0; 8])).max(1),
            None => 1,
        };
        let mut b = Batch::new();
        b.put(&self.db, Cf::Meta, NEXT_ID_KEY, &(id + 1).to_be_bytes());
        b.put(&self.db, Cf::Volumes, &id.to_be_bytes(), &rec.encode());
        b.put(
            &self.db,
            Cf::VolumeNames,
            rec.name.as_bytes(),
            &id.to_be_bytes(),
        );
        more(&self.db, id, &mut b);
        self.db.write(b, true)?;
        Ok(id)
    }

    fn summary(&self, rec: &Record, names: &HashMap<u64, Record>) -> VolumeSummary {
        let origin = rec.parent.and_then(|(pid, generation)| {
            let p = names.get(&pid)?;
            let s = p.snapshots.iter().find(|s| s.generation == generation)?;
            Some(VolumeOrigin {
                volume: p.name.clone(),
                snapshot: s.name.clone(),
            })
        });
        VolumeSummary {
            name: rec.name.clone(),
            size: rec.size,
            extent_size: rec.extent_size(),
            mode: rec.mode,
            instances: (rec.instances > 0).then_some(rec.instances),
            generation: rec.generation,
            snapshots: rec.snapshots.len(),
            origin,
            created: rec.created,
        }
    }

    /// Every volume, sorted by name.
    pub fn volumes(&self) -> Result<Vec<VolumeSummary>> {
        let all: HashMap<u64, Record> = self.volume_records()?.into_iter().collect();
        let mut out: Vec<_> = all.values().map(|r| self.summary(r, &all)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// A volume's snapshots, oldest first, each with the clones made from it.
    pub fn volume_snapshots(&self, name: &str) -> Result<Vec<SnapshotInfo>> {
        let id = self.volume_id(name)?;
        let all: HashMap<u64, Record> = self.volume_records()?.into_iter().collect();
        let rec = all.get(&id).ok_or_else(|| VolumeError::NotFound {
            volume: name.to_string(),
        })?;
        Ok(rec
            .snapshots
            .iter()
            .map(|s| SnapshotInfo {
                name: s.name.clone(),
                generation: s.generation,
                size: s.size,
                created: s.created,
                clones: clones_of(&all, id, s.generation),
            })
            .collect())
    }

    /// Size, mode, generation, snapshots, allocated and unique bytes of a volume. Reads the
    /// volume's block map (and, for unique bytes, every other volume's): for inspection,
    /// not for a hot path.
    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo> {
        let id = self.volume_id(name)?;
        let all: HashMap<u64, Record> = self.volume_records()?.into_iter().collect();
        let rec = all.get(&id).ok_or_else(|| VolumeError::NotFound {
            volume: name.to_string(),
        })?;
        let shared = self.volume_shared(id)?;
        // Pending journal records count like any write: fold them so the block map says
        // everything.
        self.fold_volume(&shared)?;
        let allocated = {
            let st = shared.state.read().expect("volume state lock");
            self.allocated_bytes(id, &st, st.rec.generation, st.rec.size)?
        };
        // Unique bytes: own chunks, minus those another volume names or a clone reads.
        let clone_bases: BTreeSet<u64> = all
            .values()
            .filter_map(|c| c.parent.filter(|(p, _)| *p == id).map(|(_, g)| g))
            .collect();
        let mut own: HashMap<Digest, bool> = HashMap::new(); // digest → shared
        let mut cursor = self.block_map_of(id);
        let mut entry = cursor.first()?;
        // Versions of one extent, newest first: the one a clone base sees is the first
        // with generation <= base.
        let mut current: Option<(u64, Vec<(u64, Extent)>)> = None;
        let finish = |versions: &[(u64, Extent)], own: &mut HashMap<Digest, bool>| {
            for (i, (g, ext)) in versions.iter().enumerate() {
                let Extent::Chunk(d) = ext else { continue };
                let newer = if i == 0 { u64::MAX } else { versions[i - 1].0 };
                let seen_by_clone = clone_bases.range(*g..newer).next().is_some();
                let shared = own.entry(*d).or_insert(false);
                *shared |= seen_by_clone;
            }
        };
        while let Some((k, v)) = entry {
            if let (Some((_, e, g)), Some(ext)) = (parse_key(k), Extent::decode(v)) {
                match &mut current {
                    Some((ce, versions)) if *ce == e => versions.push((g, ext)),
                    _ => {
                        if let Some((_, versions)) = current.take() {
                            finish(&versions, &mut own);
                        }
                        current = Some((e, vec![(g, ext)]));
                    }
                }
            }
            entry = cursor.next()?;
        }
        if let Some((_, versions)) = current.take() {
            finish(&versions, &mut own);
        }
        drop(cursor);
        for kv in self.db.entries(Cf::BlockMap) {
            let (k, v) = kv?;
            if let (Some((vid, _, _)), Some(Extent::Chunk(d))) = (parse_key(&k), Extent::decode(&v))
                && vid != id
                && let Some(shared) = own.get_mut(&d)
            {
                *shared = true;
            }
        }
        let mut unique = 0;
        for (d, shared) in own {
            if !shared && let Some(v) = self.db.get(Cf::ChunkIndex, &d.0)? {
                unique += Store::chunk_sizes(&v).map_or(0, |(_, s)| s);
            }
        }
        let summary = self.summary(rec, &all);
        Ok(VolumeInfo {
            summary,
            snapshot_list: self.volume_snapshots(name)?,
            allocated_bytes: allocated,
            unique_bytes: unique,
        })
    }

    /// Bytes of extents holding a chunk (inherited ones too) in volume `id` (whose state
    /// `st` is) as it reads at `generation`, when it was `size` bytes long: its current
    /// data, or a snapshot. The caller holds the volume's state lock; pending journal
    /// records are not counted (fold first).
    fn allocated_bytes(&self, id: u64, st: &State, generation: u64, size: u64) -> Result<u64> {
        let mut levels = vec![Level {
            id,
            generation,
            size,
        }];
        levels.extend(st.ancestors.iter().copied());
        let shift = st.rec.extent_shift;
        let mut n = 0u64;
        let mut cursor = self.db.cursor(Cf::BlockMap, None, None);
        for e in self.chain_extents(&levels, 0, extents(size, shift))? {
            if let Extent::Chunk(_) = io::lookup(&mut cursor, &levels, e, shift)? {
                n += 1;
            }
        }
        Ok(n * st.rec.extent_size())
    }

    /// What the volumes hold, for `stats`, counted as `stats` counts images: every
    /// volume's current data and every snapshot as if each were stored alone (the bytes
    /// of its extents that hold a chunk, inherited ones included), and the distinct
    /// chunks any block map names. Folds pending small writes first, as
    /// [`Store::volume_info`] does.
    pub(crate) fn volume_totals(&self) -> Result<VolumeTotals> {
        let mut t = VolumeTotals::default();
        for (id, rec) in self.volume_records()? {
            let shared = self.volume_shared(id)?;
            self.fold_volume(&shared)?;
            let st = shared.state.read().expect("volume state lock");
            // Deleted since its record was read: it holds nothing any more.
            if st.deleted {
                continue;
            }
            t.volumes += 1;
            t.snapshots += rec.snapshots.len() as u64;
            t.logical_bytes += self.allocated_bytes(id, &st, st.rec.generation, st.rec.size)?;
            for snap in &st.rec.snapshots {
                t.logical_bytes += self.allocated_bytes(id, &st, snap.generation, snap.size)?;
            }
        }
        self.volume_chunks(|d| {
            t.chunks.insert(d);
        })?;
        Ok(t)
    }

    /// Extents in `[from, to)` that any level of a chain has an entry for (at or below
    /// the level's generation), ascending. Only these can read as anything but zero.
    pub(crate) fn chain_extents(&self, levels: &[Level], from: u64, to: u64) -> Result<Vec<u64>> {
        let mut set = BTreeSet::new();
        for l in levels {
            let lower = record::extent_start(l.id, from);
            let upper = record::extent_start(l.id, to);
            let mut cursor = self
                .db
                .cursor(Cf::BlockMap, Some(&lower[..]), Some(&upper[..]));
            let mut entry = cursor.first()?;
            while let Some((k, _)) = entry {
                if let Some((_, e, g)) = parse_key(k)
                    && g <= l.generation
                {
                    set.insert(e);
                }
                entry = cursor.next()?;
            }
        }
        Ok(set.into_iter().collect())
    }

    /// A cursor over volume `id`'s block map entries (every extent, every generation).
    fn block_map_of(&self, id: u64) -> crate::db::Cursor<'_> {
        let lower = record::extent_start(id, 0);
        let upper = record::extent_start(id + 1, 0);
        self.db
            .cursor(Cf::BlockMap, Some(&lower[..]), Some(&upper[..]))
    }

    /// Whether volume `name` reads differently now than its snapshot `snapshot` did: a
    /// write (or trim, or resize) since. Folds pending small writes first; reads the
    /// volume's block map keys.
    pub fn volume_changed_since(&self, name: &str, snapshot: &str) -> Result<bool> {
        let id = self.volume_id(name)?;
        let shared = self.volume_shared(id)?;
        self.fold_volume(&shared)?;
        let st = shared.state.read().expect("volume state lock");
        let snap = snapshot_named(&st.rec, name, snapshot)?;
        if snap.size != st.rec.size {
            return Ok(true);
        }
        let mut cursor = self.block_map_of(id);
        let mut entry = cursor.first()?;
        while let Some((k, _)) = entry {
            if parse_key(k).is_some_and(|(_, _, g)| g > snap.generation) {
                return Ok(true);
            }
            entry = cursor.next()?;
        }
        Ok(false)
    }

    /// Snapshot `snapshot` of volume `name` as it reads: its size, extent shift, mode,
    /// creation time and every extent that is not a hole (inherited ones included),
    /// ascending. For sending a snapshot to the tier (tier/volume.rs).
    pub(crate) fn snapshot_extents(
        &self,
        name: &str,
        snapshot: &str,
    ) -> Result<(SnapshotShape, Vec<(u64, Extent)>)> {
        let id = self.volume_id(name)?;
        let shared = self.volume_shared(id)?;
        let st = shared.state.read().expect("volume state lock");
        let snap = snapshot_named(&st.rec, name, snapshot)?.clone();
        let mut levels = vec![Level {
            id,
            generation: snap.generation,
            size: snap.size,
        }];
        levels.extend(st.ancestors.iter().copied());
        let shift = st.rec.extent_shift;
        let mut cursor = self.db.cursor(Cf::BlockMap, None, None);
        let mut out = Vec::new();
        for e in self.chain_extents(&levels, 0, extents(snap.size, shift))? {
            match io::lookup(&mut cursor, &levels, e, shift)? {
                Extent::Zero => {}
                x => out.push((e, x)),
            }
        }
        let shape = SnapshotShape {
            size: snap.size,
            extent_shift: shift,
            mode: st.rec.mode,
            created: snap.created,
        };
        Ok((shape, out))
    }

    /// Creates volume `name` holding `extents` as snapshot `snapshot` (generation 1,
    /// created at `created`), its current data the same (generation 2), in one synced
    /// batch with what `more` adds (the caller's marks): a volume pulled from the tier,
    /// whose chunks are read from there when first needed.
    pub(crate) fn insert_snapshot_volume(
        &self,
        name: &str,
        snapshot: &str,
        shape: &SnapshotShape,
        extents_in: &[(u64, Extent)],
        more: impl FnOnce(&mut Batch),
    ) -> Result<VolumeSummary> {
        validate_volume_name(name)?;
        validate_volume_name(snapshot)?;
        check_size(name, shape.size)?;
        let n = extents(shape.size, shape.extent_shift);
        if !(MIN_EXTENT_SIZE.trailing_zeros()..=MAX_EXTENT_SIZE.trailing_zeros())
            .contains(&u32::from(shape.extent_shift))
            || extents_in.iter().any(|&(e, _)| e >= n)
        {
            return Err(VolumeError::BadSize {
                volume: name.to_string(),
                reason: format!(
                    "the snapshot's extents (1 << {}, {} of them) do not fit its size {}",
                    shape.extent_shift,
                    extents_in.len(),
                    shape.size
                ),
            }
            .into());
        }
        let rec = Record {
            name: name.to_string(),
            size: shape.size,
            extent_shift: shape.extent_shift,
            mode: shape.mode,
            instances: 0,
            parent: None,
            generation: 2,
            created: now(),
            snapshots: vec![Snap {
                name: snapshot.to_string(),
                generation: 1,
                size: shape.size,
                created: shape.created,
            }],
        };
        let _admin = self.volumes.admin.lock().expect("volume admin lock");
        self.insert_volume_with(&rec, |db, id, b| {
            for &(e, x) in extents_in {
                let v: &[u8] = match &x {
                    Extent::Zero => record::ZERO_MARKER,
                    Extent::Zeroed => record::ZEROED_MARKER,
                    Extent::Chunk(d) => &d.0,
                };
                b.put(db, Cf::BlockMap, &record::key(id, e, 1), v);
            }
            more(b);
        })?;
        Ok(self.summary(&rec, &HashMap::new()))
    }

    /// Records the current generation as snapshot `snapshot` and moves writes to a new
    /// generation. O(1) when no small write is pending: one record write, no chunk or
    /// block map entry. Pending journal records are folded into their extents first
    /// (writers keep running), and those written meanwhile in the snapshot's own batch.
    /// Crash-consistent: every write acknowledged before it is in it, none started after
    /// it.
    pub fn snapshot_volume(&self, name: &str, snapshot: &str) -> Result<SnapshotInfo> {
        validate_volume_name(snapshot)?;
        let _admin = self.volumes.admin.lock().expect("volume admin lock");
        let id = self.volume_id(name)?;
        let shared = self.volume_shared(id)?;
        // Fold what is pending while writers may still run (a fold changes no byte they
        // see); only what they add meanwhile is folded under the exclusive lock below.
        self.fold_volume(&shared)?;
        let mut st = shared.state.write().expect("volume state lock");
        if st.rec.snapshot(snapshot).is_some() {
            return Err(VolumeError::SnapshotExists {
                volume: name.to_string(),
                snapshot: snapshot.to_string(),
            }
            .into());
        }
        let mut rec = st.rec.clone();
        let snap = Snap {
            name: snapshot.to_string(),
            generation: rec.generation,
            size: rec.size,
            created: now(),
        };
        rec.snapshots.push(snap.clone());
        rec.generation += 1;
        let mut b = Batch::new();
        // Pending journal records belong to the generation being frozen: fold them in
        // the same batch, so the snapshot holds every acknowledged write or does not exist.
        let claims = self.claims();
        self.stage_fold_all(&shared, &st, &mut b, &claims)?;
        b.put(&self.db, Cf::Volumes, &id.to_be_bytes(), &rec.encode());
        self.db.write(b, true)?;
        drop(claims);
        self.forget_dirty(&shared, |_| true);
        st.rec = rec;
        Ok(SnapshotInfo {
            name: snap.name,
            generation: snap.generation,
            size: snap.size,
            created: snap.created,
            clones: Vec::new(),
        })
    }

    /// Makes volume `new` from `volume@snapshot`: it shares every chunk until written.
    /// O(1): one record, no block map entry. It keeps the source's mode and extent size.
    pub fn clone_volume(&self, volume: &str, snapshot: &str, new: &str) -> Result<VolumeSummary> {
        validate_volume_name(new)?;
        let _admin = self.volumes.admin.lock().expect("volume admin lock");
        let id = self.volume_id(volume)?;
        let src = self
            .volume_record(id)?
            .ok_or(VolumeError::BadRecord { id })?;
        let snap = src
            .snapshot(snapshot)
            .ok_or_else(|| VolumeError::SnapshotNotFound {
                volume: volume.to_string(),
                snapshot: snapshot.to_string(),
            })?;
        let rec = Record {
            name: new.to_string(),
            size: snap.size,
            extent_shift: src.extent_shift,
            mode: src.mode,
            instances: 0,
            parent: Some((id, snap.generation)),
            generation: 1,
            created: now(),
            snapshots: Vec::new(),
        };
        self.insert_volume(&rec)?;
        let names = HashMap::from([(id, src.clone())]);
        Ok(self.summary(&rec, &names))
    }

    /// Changes a volume's size. Growing shows zeros past the old end. Shrinking needs
    /// `shrink`: bytes past the new end are discarded at the current generation (zero
    /// markers, the boundary extent's tail zeroed), in one batch; snapshots keep theirs.
    pub fn resize_volume(&self, name: &str, new_size: u64, shrink: bool) -> Result<()> {
        check_size(name, new_size)?;
        let _admin = self.volumes.admin.lock().expect("volume admin lock");
        let id = self.volume_id(name)?;
        let shared = self.volume_shared(id)?;
        let mut st = shared.state.write().expect("volume state lock");
        let old = st.rec.size;
        if new_size < old && !shrink {
            return Err(VolumeError::ShrinkRefused {
                volume: name.to_string(),
                size: old,
                new_size,
            }
            .into());
        }
        let mut rec = st.rec.clone();
        rec.size = new_size;
        let mut b = Batch::new();
        let first_dropped = extents(new_size, st.rec.extent_shift);
        if new_size < old {
            // The boundary extent's pending records are folded first (its tail is then
            // zeroed from the block map); those past the new end are simply deleted.
            let boundary = new_size >> st.rec.extent_shift;
            if boundary < first_dropped {
                self.fold_extents(&shared, &st, &[boundary])?;
            }
            self.drop_journal_from(&shared, &st, first_dropped, &mut b);
            io::discard_tail(self, &shared, &st, new_size, &mut b)?;
        }
        b.put(&self.db, Cf::Volumes, &id.to_be_bytes(), &rec.encode());
        self.db.write(b, true)?;
        if new_size < old {
            self.forget_dirty(&shared, |e| e >= first_dropped);
        }
        // The boundary extent and the ones past the end changed; no reader runs now
        // (the state lock is held exclusively), so the map caches simply start over.
        for stripe in shared.stripes.iter() {
            stripe.lock().expect("extent lock").map.clear();
        }
        st.rec = rec;
        Ok(())
    }

    /// Deletes a volume and its block map. Refused if it has snapshots (or clones, which
    /// need snapshots) unless `cascade`, which deletes its clones (recursively) too.
    /// Returns the names deleted, the volume last. Its chunks go at the next GC unless
    /// something else names them.
    pub fn delete_volume(&self, name: &str, cascade: bool) -> Result<Vec<String>> {
        let _admin = self.volumes.admin.lock().expect("volume admin lock");
        let id = self.volume_id(name)?;
        let all: HashMap<u64, Record> = self.volume_records()?.into_iter().collect();
        let rec = all.get(&id).ok_or(VolumeError::BadRecord { id })?;
        if !cascade && !rec.snapshots.is_empty() {
            if let Some(s) = rec
                .snapshots
                .iter()
                .find(|s| all.values().any(|c| c.parent == Some((id, s.generation))))
            {
                return Err(self.has_clones(&all, id, s).into());
            }
            return Err(VolumeError::HasSnapshots {
                volume: name.to_string(),
                snapshots: rec.snapshots.iter().map(|s| s.name.clone()).collect(),
            }
            .into());
        }
        let doomed = descendants(&all, id, None);
        self.drop_volumes(&all, &doomed, Batch::new())
    }

    /// Deletes a snapshot and prunes block map versions no reader can see any more.
    /// Refused if volumes were cloned from it unless `cascade`, which deletes them (and
    /// their clones). Returns the clones deleted.
    pub fn delete_snapshot(
        &self,
        name: &str,
        snapshot: &str,
        cascade: bool,
    ) -> Result<Vec<String>> {
        let _admin = self.volumes.admin.lock().expect("volume admin lock");
        let id = self.volume_id(name)?;
        let all: HashMap<u64, Record> = self.volume_records()?.into_iter().collect();
        let rec = all.get(&id).ok_or(VolumeError::BadRecord { id })?;
        let snap = rec
            .snapshot(snapshot)
            .ok_or_else(|| VolumeError::SnapshotNotFound {
                volume: name.to_string(),
                snapshot: snapshot.to_string(),
            })?
            .clone();
        let doomed = descendants(&all, id, Some(snap.generation));
        if !doomed.is_empty() && !cascade {
            return Err(self.has_clones(&all, id, &snap).into());
        }
        let shared = self.volume_shared(id)?;
        let mut st = shared.state.write().expect("volume state lock");
        let mut rec = st.rec.clone();
        rec.snapshots.retain(|s| s.name != snapshot);
        let mut b = Batch::new();
        b.put(&self.db, Cf::Volumes, &id.to_be_bytes(), &rec.encode());
        self.prune(id, &rec, &mut b)?;
        let deleted = self.drop_volumes(&all, &doomed, b)?;
        st.rec = rec;
        Ok(deleted)
    }

    fn has_clones(&self, all: &HashMap<u64, Record>, id: u64, s: &Snap) -> VolumeError {
        VolumeError::HasClones {
            volume: all.get(&id).map(|r| r.name.clone()).unwrap_or_default(),
            snapshot: s.name.clone(),
            clones: clones_of(all, id, s.generation),
        }
    }

    /// Deletes volumes (records, names, block maps) in `b`, one synced batch, and marks
    /// their open handles deleted.
    fn drop_volumes(
        &self,
        all: &HashMap<u64, Record>,
        doomed: &[u64],
        mut b: Batch,
    ) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for &v in doomed {
            let Some(r) = all.get(&v) else { continue };
            b.delete(&self.db, Cf::Volumes, &v.to_be_bytes());
            b.delete(&self.db, Cf::VolumeNames, r.name.as_bytes());
            b.delete_range(
                &self.db,
                Cf::BlockMap,
                &record::extent_start(v, 0),
                &record::extent_start(v + 1, 0),
            );
            b.delete_range(
                &self.db,
                Cf::VolumeJournal,
                &journal::key(v, 0, 0),
                &journal::key(v + 1, 0, 0),
            );
            names.push(r.name.clone());
        }
        // Handles must stop writing before the batch lands, or a write racing the range
        // delete could leave block map entries of a volume that no longer exists.
        let shared: Vec<Arc<Shared>> = {
            let open = self.volumes.open.lock().expect("volume registry lock");
            doomed.iter().filter_map(|v| open.get(v).cloned()).collect()
        };
        let mut guards: Vec<_> = shared
            .iter()
            .map(|s| s.state.write().expect("volume state lock"))
            .collect();
        self.db.write(b, true)?;
        for g in &mut guards {
            g.deleted = true;
        }
        for s in &shared {
            self.forget_dirty(s, |_| true);
        }
        drop(guards);
        let mut open = self.volumes.open.lock().expect("volume registry lock");
        for v in doomed {
            open.remove(v);
        }
        Ok(names)
    }

    /// Adds to `b` the deletion of every version of volume `id` that no live reader sees:
    /// a version at generation `a`, next newer version at `b` (or none), is visible to
    /// readers at generations in `[a, b)`; the live readers are the snapshots and the
    /// current generation (clones' bases are snapshots).
    fn prune(&self, id: u64, rec: &Record, b: &mut Batch) -> Result<()> {
        let live: BTreeSet<u64> = rec
            .snapshots
            .iter()
            .map(|s| s.generation)
            .chain([rec.generation])
            .collect();
        let mut cursor = self.block_map_of(id);
        let mut entry = cursor.first()?;
        let mut prev: Option<(u64, u64)> = None; // (extent, generation) of the newer version
        while let Some((k, _)) = entry {
            if let Some((_, e, g)) = parse_key(k) {
                let newer = match prev {
                    Some((pe, pg)) if pe == e => pg,
                    _ => u64::MAX,
                };
                if live.range(g..newer).next().is_none() {
                    b.delete(&self.db, Cf::BlockMap, k);
                }
                prev = Some((e, g));
            }
            entry = cursor.next()?;
        }
        Ok(())
    }

    /// Calls `f` with every chunk any block map entry names (GC roots: volumes, their
    /// snapshots and clones' bases).
    pub(crate) fn volume_chunks(&self, mut f: impl FnMut(Digest)) -> Result<()> {
        for kv in self.db.entries(Cf::BlockMap) {
            let (_, v) = kv?;
            if let Some(Extent::Chunk(d)) = Extent::decode(&v) {
                f(d);
            }
        }
        Ok(())
    }
}

/// Snapshot `snapshot` of volume `name` (whose record is `rec`), or the error naming it.
fn snapshot_named<'r>(rec: &'r Record, name: &str, snapshot: &str) -> Result<&'r Snap> {
    rec.snapshot(snapshot).ok_or_else(|| {
        VolumeError::SnapshotNotFound {
            volume: name.to_string(),
            snapshot: snapshot.to_string(),
        }
        .into()
    })
}

/// The names of the volumes cloned from `id` at `generation`, sorted.
fn clones_of(all: &HashMap<u64, Record>, id: u64, generation: u64) -> Vec<String> {
    let mut clones: Vec<String> = all
        .values()
        .filter(|c| c.parent == Some((id, generation)))
        .map(|c| c.name.clone())
        .collect();
    clones.sort();
    clones
}

/// `id` (when `generation` is None) and every volume cloned from it, recursively; with a
/// generation, only the clones of that snapshot and theirs. Children before parents.
fn descendants(all: &HashMap<u64, Record>, id: u64, generation: Option<u64>) -> Vec<u64> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    fn walk(
        all: &HashMap<u64, Record>,
        id: u64,
        generation: Option<u64>,
        out: &mut Vec<u64>,
        seen: &mut HashSet<u64>,
    ) {
        let mut kids: Vec<u64> = all
            .iter()
            .filter(|(_, r)| match (r.parent, generation) {
                (Some((p, _)), None) => p == id,
                (Some((p, g)), Some(want)) => p == id && g == want,
                _ => false,
            })
            .map(|(&k, _)| k)
            .collect();
        kids.sort_unstable();
        for k in kids {
            if seen.insert(k) {
                walk(all, k, None, out, seen);
            }
        }
        if generation.is_none() {
            out.push(id);
        }
    }
    walk(all, id, generation, &mut out, &mut seen);
    out
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_with_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("2gib"), Ok(2 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("1.5T"), Ok(3 << 39));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert!(parse_size("10Q").unwrap_err().contains("unknown unit"));
        assert!(parse_size("8X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("0.3K").unwrap_err().contains("whole number"));
        assert!(parse_size("99999999P").unwrap_err().contains("too large"));
        assert!(parse_size("-1G").is_err());
    }
}
