//! The chunk tier: one store shared by every host (S3-compatible object storage behind
//! the [`Tier`] trait), holding the same content-addressed objects as a host's store. A
//! host that lacks an image pulls its records (one object) and fetches each chunk the
//! first time something reads it; a host's store becomes a cache of the tier.
//!
//! Objects in the tier, under its prefix (the format is also in ARCHITECTURE.md):
//!
//! | key | value |
//! |---|---|
//! | `chunks/HEX` | the chunk as a host stores it: codec byte, then a zstd frame or the raw bytes |
//! | `blobs/HEX`, `trees/HEX`, `layers/HEX`, `images/HEX` | the canonical record |
//! | `packs/HEX` | every record image HEX needs (its layers, trees and blobs, then the image), so a pull is one GET: per record a kind byte, a varint length and the bytes |
//! | `refs/NAME:TAG` | `sha256:HEX` of the image the name points at |
//! | `readsets/HEX` | the chunks the first cold host read of image HEX until its guest answered (or its mount ended), in the order it read them: 32-byte digests |
//! | `volsnaps/HEX`, `volumes/NAME` | a volume snapshot's manifest and the name of a volume's last pushed one (volume.rs) |
//!
//! Everything fetched is verified against its digest before it is stored or returned: a
//! flipped or truncated object is an error naming the digest, never data. A name is not
//! content-addressed, but the image it names is checked. Uploads are idempotent (the key
//! is the content), so a push that failed half way is simply run again; the `tiered`
//! family remembers what the tier holds, so a second push sends only what is new.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Instant;

use crate::Digest;
use crate::codec::{Reader, Writer};
use crate::db::{Batch, Cf};
use crate::error::{Error, ObjectKind, Result, ResultExt};
use crate::store::Store;

mod volume;
pub use volume::{PUSHED_PREFIX, VolumeTierReport};

/// A shared object store of the tier's keys (see the module documentation). Calls block;
/// they are made from many threads at once.
pub trait Tier: Send + Sync + fmt::Debug {
    /// Where the tier is, for messages (`s3://BUCKET/PREFIX`, a directory).
    fn url(&self) -> &str;
    /// The object at `key`, or None if there is none.
    fn get(&self, key: &str) -> std::result::Result<Option<Vec<u8>>, TierError>;
    /// Stores `bytes` at `key`, replacing what is there. Returns once the tier has
    /// acknowledged the whole object (retries are the implementation's).
    fn put(&self, key: &str, bytes: &[u8]) -> std::result::Result<(), TierError>;
}

/// What a tier said when a call failed.
#[derive(Debug, Clone)]
pub struct TierError(pub String);

impl fmt::Display for TierError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TierError {}

/// A tier in a directory (a shared file system such as NFS, or tests): each key is a
/// file, written to a temporary name and renamed, so a reader sees a whole object or none.
#[derive(Debug)]
pub struct DirTier {
    root: PathBuf,
    url: String,
}

impl DirTier {
    /// The tier at `root`, created if missing.
    pub fn open(root: impl AsRef<Path>) -> Result<DirTier> {
        let root = root.as_ref().to_path_buf();
        std::fs::create_dir_all(&root).map_err(|e| Error::io("create", &root, e))?;
        let url = format!("file://{}", root.display());
        Ok(DirTier { root, url })
    }

    fn path(&self, key: &str) -> std::result::Result<PathBuf, TierError> {
        if key
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(TierError(format!("key {key:?} is not a relative path")));
        }
        Ok(self.root.join(key))
    }
}

impl Tier for DirTier {
    fn url(&self) -> &str {
        &self.url
    }

    fn get(&self, key: &str) -> std::result::Result<Option<Vec<u8>>, TierError> {
        match std::fs::read(self.path(key)?) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(TierError(e.to_string())),
        }
    }

    fn put(&self, key: &str, bytes: &[u8]) -> std::result::Result<(), TierError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = self.path(key)?;
        let err = |e: std::io::Error| TierError(e.to_string());
        let dir = path.parent().expect("a key has a parent: the root");
        std::fs::create_dir_all(dir).map_err(err)?;
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&tmp, bytes).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)
    }
}

/// The tier's key of an object.
pub fn object_key(kind: ObjectKind, d: &Digest) -> String {
    let dir = match kind {
        ObjectKind::Chunk => "chunks",
        ObjectKind::Blob => "blobs",
        ObjectKind::Tree => "trees",
        ObjectKind::Layer => "layers",
        ObjectKind::Image => "images",
    };
    format!("{dir}/{}", d.to_hex())
}

fn ref_key(name: &str) -> String {
    format!("refs/{name}")
}

fn readset_key(image: &Digest) -> String {
    format!("readsets/{}", image.to_hex())
}

fn pack_key(image: &Digest) -> String {
    format!("packs/{}", image.to_hex())
}

/// The kind byte of chunks in `tiered` keys.
pub(crate) const CHUNK_MARK: u8 = 0;

fn kind_byte(kind: ObjectKind) -> u8 {
    match kind {
        ObjectKind::Chunk => CHUNK_MARK,
        ObjectKind::Blob => 1,
        ObjectKind::Tree => 2,
        ObjectKind::Layer => 3,
        ObjectKind::Image => 4,
    }
}

fn kind_of(b: u8) -> Option<ObjectKind> {
    Some(match b {
        0 => ObjectKind::Chunk,
        1 => ObjectKind::Blob,
        2 => ObjectKind::Tree,
        3 => ObjectKind::Layer,
        4 => ObjectKind::Image,
        _ => return None,
    })
}

pub(crate) fn record_cf(kind: ObjectKind) -> Cf {
    match kind {
        ObjectKind::Chunk => Cf::Chunks,
        ObjectKind::Blob => Cf::Blobs,
        ObjectKind::Tree => Cf::Trees,
        ObjectKind::Layer => Cf::Layers,
        ObjectKind::Image => Cf::Images,
    }
}

/// The `tiered` key of chunk `d`.
pub(crate) fn tiered_chunk_key(d: &Digest) -> [u8; 33] {
    tiered_key(ObjectKind::Chunk, d)
}

fn tiered_key(kind: ObjectKind, d: &Digest) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = kind_byte(kind);
    k[1..].copy_from_slice(&d.0);
    k
}

/// The `meta` key of the URL of the tier the `tiered` family describes.
const TIER_URL_KEY: &[u8] = b"tier_url";

/// Uploads and downloads in flight at once: object stores answer each request in a few
/// milliseconds however small it is, so throughput comes from concurrency.
const PARALLEL: usize = 16;

/// The tier a store uses, and what it has fetched from it.
#[derive(Default)]
pub(crate) struct TierState {
    tier: RwLock<Option<Arc<dyn Tier>>>,
    /// Fetches in progress, so concurrent readers of one object share one GET.
    flights: Mutex<HashMap<[u8; 33], Arc<Flight>>>,
    fetched_objects: AtomicU64,
    fetched_bytes: AtomicU64,
    /// Images whose reads are being recorded (see [`Store::record_reads`]).
    recorders: Mutex<Vec<Arc<Recorder>>>,
}

/// The chunks of one image fetched from the tier, in order, while it is recorded.
struct Recorder {
    image: Digest,
    chunks: HashSet<Digest>,
    read: Mutex<Vec<Digest>>,
}

impl fmt::Debug for TierState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TierState")
            .field("tier", &*self.tier.read().expect("tier lock"))
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Flight {
    done: Mutex<bool>,
    cv: Condvar,
}

/// What a store has fetched from its tier since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchCounters {
    /// Objects (chunks and records) fetched.
    pub objects: u64,
    /// Their bytes as the tier holds them (chunks compressed).
    pub bytes: u64,
}

/// How far a push or pull has come; read from another thread while it runs.
#[derive(Debug, Default)]
pub struct TierProgress {
    /// Objects it will look at (known once the image has been walked).
    pub objects: AtomicU64,
    /// Objects looked at so far.
    pub done: AtomicU64,
    /// Bytes sent or fetched so far.
    pub bytes: AtomicU64,
}

/// What a push or a pull did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TierReport {
    /// The image.
    pub image: Digest,
    /// The name pushed or pulled, if it was one.
    pub name: Option<String>,
    /// Objects the image consists of (records and chunks).
    pub objects: u64,
    /// Objects sent (push) or fetched (pull).
    pub transferred: u64,
    /// Objects the other side already had.
    pub skipped: u64,
    /// Bytes sent or fetched (chunks as stored, compressed).
    pub bytes: u64,
    /// Raw bytes of the image's file content (each chunk once).
    pub content_bytes: u64,
    /// Chunks the image has that are not in this host's store (pull without chunks).
    pub chunks_remote: u64,
    /// How long it took.
    pub seconds: f64,
}

/// What a push has sent so far.
#[derive(Debug, Default)]
pub(crate) struct Sent {
    /// Objects sent.
    pub(crate) objects: AtomicU64,
    /// Their bytes as sent (chunks as stored).
    pub(crate) bytes: AtomicU64,
    /// Raw bytes of the chunks sent.
    pub(crate) content: AtomicU64,
}

/// An image's objects: records (blobs and trees, then layers, then the image: an order in
/// which every record's children come first) and chunks.
struct ImageObjects {
    records: Vec<(ObjectKind, Digest)>,
    chunks: Vec<Digest>,
}

impl Store {
    /// Makes this store a cache of `tier`: objects missing here are fetched from it on
    /// first read, and [`Store::push_image`] and [`Store::pull_image`] use it.
    ///
    /// What the store knows the tier holds (the `tiered` family, on which eviction
    /// relies) is kept for one tier: a store moved to a tier with another URL forgets it
    /// first, so nothing is evicted that the new tier may lack and the next push sends
    /// everything.
    pub fn set_tier(&self, tier: Arc<dyn Tier>) -> Result<()> {
        let url = tier.url().as_bytes();
        let known = self.db.get(Cf::Meta, TIER_URL_KEY)?;
        if known.as_deref() != Some(url) {
            let mut b = Batch::new();
            if known.is_some() {
                b.delete_range(&self.db, Cf::Tiered, &[0], &[0xff; 34]);
            }
            b.put(&self.db, Cf::Meta, TIER_URL_KEY, url);
            self.db.write(b, true)?;
        }
        *self.tiers.tier.write().expect("tier lock") = Some(tier);
        Ok(())
    }

    /// The tier this store uses, if any.
    pub fn tier(&self) -> Option<Arc<dyn Tier>> {
        self.tiers.tier.read().expect("tier lock").clone()
    }

    pub(crate) fn need_tier(&self) -> Result<Arc<dyn Tier>> {
        self.tier().ok_or_else(|| {
            Error::Refused("this store has no tier (volumed --tier URL)".to_string())
        })
    }

    /// What this store has fetched from its tier since it was opened.
    pub fn fetched(&self) -> FetchCounters {
        FetchCounters {
            objects: self.tiers.fetched_objects.load(Ordering::Relaxed),
            bytes: self.tiers.fetched_bytes.load(Ordering::Relaxed),
        }
    }

    /// Whether the tier is known to hold the object (this host pushed or fetched it).
    pub(crate) fn is_tiered(&self, kind: ObjectKind, d: &Digest) -> Result<bool> {
        self.db.contains(Cf::Tiered, &tiered_key(kind, d))
    }

    /// Every chunk the tier is known to hold.
    pub(crate) fn tiered_chunks(&self) -> Result<Vec<Digest>> {
        let mut out = Vec::new();
        for k in self.db.keys(Cf::Tiered) {
            let k = k?;
            if k.first() == Some(&CHUNK_MARK)
                && let Some(d) = Digest::from_slice(&k[1..])
            {
                out.push(d);
            }
        }
        Ok(out)
    }

    pub(crate) fn mark_tiered(&self, b: &mut Batch, kind: ObjectKind, d: &Digest) {
        let now = crate::cache::now_ms().to_be_bytes();
        b.put(&self.db, Cf::Tiered, &tiered_key(kind, d), &now);
    }

    /// Runs `fetch` for the object unless another thread is already fetching it, in
    /// which case this waits for that one and runs `again` (a local read).
    fn one_fetch<T>(
        &self,
        kind: ObjectKind,
        d: &Digest,
        fetch: impl FnOnce() -> Result<T>,
        again: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let key = tiered_key(kind, d);
        let (flight, leader) = {
            let mut flights = self.tiers.flights.lock().expect("flights lock");
            match flights.get(&key) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Arc::new(Flight::default());
                    flights.insert(key, f.clone());
                    (f, true)
                }
            }
        };
        if !leader {
            let mut done = flight.done.lock().expect("flight lock");
            while !*done {
                done = flight.cv.wait(done).expect("flight lock");
            }
            drop(done);
            // The leader stored it, or failed: then this reader fetches on its own.
            return match again() {
                Err(e) if matches!(e.root(), Error::Missing { .. }) => fetch(),
                r => r,
            };
        }
        let r = fetch();
        self.tiers
            .flights
            .lock()
            .expect("flights lock")
            .remove(&key);
        *flight.done.lock().expect("flight lock") = true;
        flight.cv.notify_all();
        r
    }

    pub(crate) fn tier_get(&self, tier: &dyn Tier, key: &str) -> Result<Option<Vec<u8>>> {
        let v = tier
            .get(key)
            .map_err(|e| tier_error(tier, "get", key, e.0))?;
        if let Some(v) = &v {
            self.tiers.fetched_objects.fetch_add(1, Ordering::Relaxed);
            self.tiers
                .fetched_bytes
                .fetch_add(v.len() as u64, Ordering::Relaxed);
        }
        Ok(v)
    }

    pub(crate) fn tier_put(tier: &dyn Tier, key: &str, bytes: &[u8]) -> Result<()> {
        tier.put(key, bytes)
            .map_err(|e| tier_error(tier, "put", key, e.0))
    }

    /// A chunk missing from this store, fetched from the tier (if the store has one),
    /// verified and kept here. None: there is no tier.
    pub(crate) fn fetch_chunk(&self, d: &Digest) -> Option<Result<Vec<u8>>> {
        let tier = self.tier()?;
        Some(self.one_fetch(
            ObjectKind::Chunk,
            d,
            || self.fetch_chunk_from(&*tier, d),
            || self.chunk_local(d),
        ))
    }

    fn fetch_chunk_from(&self, tier: &dyn Tier, d: &Digest) -> Result<Vec<u8>> {
        let key = object_key(ObjectKind::Chunk, d);
        let missing = || {
            Error::Missing {
                kind: ObjectKind::Chunk,
                digest: *d,
            }
            .context(format!("not in this store nor in the tier {}", tier.url()))
        };
        let stored = self.tier_get(tier, &key)?.ok_or_else(missing)?;
        let raw = Store::decode_stored(d, &stored)
            .with_context(|| format!("fetched from the tier {}", tier.url()))?;
        let mut b = Batch::new();
        Store::put_chunk(&mut b, &self.db, d, raw.len(), &stored);
        self.mark_tiered(&mut b, ObjectKind::Chunk, d);
        // A cache: a crash may lose it, and it is fetched again.
        self.db.write(b, false)?;
        self.bump_changes();
        for r in self.tiers.recorders.lock().expect("recorders lock").iter() {
            if r.chunks.contains(d) {
                r.read.lock().expect("recorder lock").push(*d);
            }
        }
        Ok(raw)
    }

    /// A record missing from this store, fetched from the tier: see
    /// [`Store::fetch_chunk`].
    pub(crate) fn fetch_record(&self, kind: ObjectKind, d: &Digest) -> Option<Result<Vec<u8>>> {
        let tier = self.tier()?;
        let cf = record_cf(kind);
        Some(self.one_fetch(
            kind,
            d,
            || {
                let key = object_key(kind, d);
                let v = self.tier_get(&*tier, &key)?.ok_or_else(|| {
                    Error::Missing { kind, digest: *d }
                        .context(format!("not in this store nor in the tier {}", tier.url()))
                })?;
                if Digest::of(&v) != *d {
                    return Err(Error::Corrupt { kind, digest: *d }
                        .context(format!("fetched from the tier {}", tier.url())));
                }
                let mut b = Batch::new();
                b.put(&self.db, cf, &d.0, &v);
                self.mark_tiered(&mut b, kind, d);
                self.db.write(b, false)?;
                Ok(v)
            },
            || {
                self.db
                    .get(cf, &d.0)?
                    .ok_or(Error::Missing { kind, digest: *d })
            },
        ))
    }

    /// Every object of image `d`, walked through this store (records it lacks are
    /// fetched from the tier).
    fn image_objects(&self, d: &Digest) -> Result<ImageObjects> {
        let mut seen = HashSet::new();
        let mut dirs = Vec::new();
        let mut chunks = Vec::new();
        let mut layers = Vec::new();
        for l in self.image(d)?.layers {
            if !seen.insert(l) {
                continue;
            }
            layers.push((ObjectKind::Layer, l));
            self.walk_tree(
                self.layer(&l)?.root_tree(),
                &mut seen,
                &mut |kind, o| match kind {
                    ObjectKind::Chunk => chunks.push(o),
                    _ => dirs.push((kind, o)),
                },
            )?;
        }
        // Children before parents: a reader that finds a record finds what it names.
        dirs.reverse();
        dirs.extend(layers);
        dirs.push((ObjectKind::Image, *d));
        Ok(ImageObjects {
            records: dirs,
            chunks,
        })
    }

    /// A record's bytes as stored here (fetched from the tier if missing).
    fn record_bytes(&self, kind: ObjectKind, d: &Digest) -> Result<Vec<u8>> {
        self.record(record_cf(kind), kind, d)
    }

    /// Sends one object to the tier unless it is known to hold it, and marks it held.
    pub(crate) fn send(
        &self,
        tier: &dyn Tier,
        kind: ObjectKind,
        d: &Digest,
        sent: &Sent,
        progress: &TierProgress,
    ) -> Result<()> {
        if !self.is_tiered(kind, d)? {
            let value = match kind {
                ObjectKind::Chunk => {
                    let (raw_len, stored) = self.chunk_stored(d)?;
                    sent.content.fetch_add(raw_len as u64, Ordering::Relaxed);
                    stored
                }
                _ => self.record_bytes(kind, d)?,
            };
            Store::tier_put(tier, &object_key(kind, d), &value)?;
            let mut b = Batch::new();
            self.mark_tiered(&mut b, kind, d);
            self.db.write(b, false)?;
            sent.objects.fetch_add(1, Ordering::Relaxed);
            sent.bytes.fetch_add(value.len() as u64, Ordering::Relaxed);
            progress
                .bytes
                .fetch_add(value.len() as u64, Ordering::Relaxed);
        }
        progress.done.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Sends image `spec` (NAME:TAG, digest or prefix) to the tier: its chunks, records,
    /// a pack of its records, and its name if it was given by one. Objects the tier is
    /// known to hold are skipped. Safe to run again after a failure.
    pub fn push_image(&self, spec: &str, progress: &TierProgress) -> Result<TierReport> {
        let tier = self.need_tier()?;
        let start = Instant::now();
        let d = self.resolve_image(spec)?;
        let name = self.name_of(spec, &d)?;
        let objects = self.image_objects(&d)?;
        let total = (objects.records.len() + objects.chunks.len()) as u64;
        progress.objects.store(total, Ordering::Relaxed);
        let sent = Sent::default();
        let send = |kind: ObjectKind, d: &Digest| self.send(&*tier, kind, d, &sent, progress);
        // Chunks first, then records children first, then the pack, then the name: a
        // host that finds a name finds everything under it.
        parallel(&objects.chunks, |c| send(ObjectKind::Chunk, c))?;
        let (inner, top): (Vec<_>, Vec<_>) = objects
            .records
            .iter()
            .partition(|(k, _)| matches!(k, ObjectKind::Blob | ObjectKind::Tree));
        parallel(&inner, |(k, d)| send(*k, d))?;
        let mut pack = Writer::new();
        for (kind, d) in &objects.records {
            pack.u8(kind_byte(*kind));
            pack.bytes(&self.record_bytes(*kind, d)?);
        }
        let pack = pack.finish();
        Store::tier_put(&*tier, &pack_key(&d), &pack)?;
        sent.bytes.fetch_add(pack.len() as u64, Ordering::Relaxed);
        for (k, d) in top {
            send(k, &d)?;
        }
        if let Some(name) = &name {
            Store::tier_put(&*tier, &ref_key(name), d.to_string().as_bytes())?;
        }
        let objects_sent = sent.objects.into_inner();
        Ok(TierReport {
            image: d,
            name,
            objects: total,
            transferred: objects_sent,
            skipped: total - objects_sent,
            bytes: sent.bytes.into_inner(),
            content_bytes: sent.content.into_inner(),
            chunks_remote: 0,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// The image `spec` names ([`Store::resolve_image`]); one this store lacks is pulled
    /// from the tier, if the store has one: its records now, its chunks when read. The
    /// report says what the pull did (None: the image was here).
    pub fn resolve_or_pull(&self, spec: &str) -> Result<(Digest, Option<TierReport>)> {
        match self.resolve_image(spec) {
            Err(Error::NotFound { .. }) if self.tier().is_some() => {
                let r = self
                    .pull_image(spec, false, &TierProgress::default())
                    .map_err(|e| match e {
                        Error::NotFound { .. } => Error::NotFound {
                            what: "image (here or in the tier)",
                            name: spec.to_string(),
                        },
                        e => e,
                    })?;
                Ok((r.image, Some(r)))
            }
            r => Ok((r?, None)),
        }
    }

    /// Starts recording which of image `d`'s chunks this store fetches from the tier,
    /// unless the tier already has a read set for it or it is being recorded. Returns
    /// whether it started; [`Store::finish_reads`] stores what was read.
    pub fn record_reads(&self, d: &Digest) -> Result<bool> {
        let tier = self.need_tier()?;
        if self
            .tiers
            .recorders
            .lock()
            .expect("recorders lock")
            .iter()
            .any(|r| r.image == *d)
            || self.tier_get(&*tier, &readset_key(d))?.is_some()
        {
            return Ok(false);
        }
        let chunks = self.image_objects(d)?.chunks.into_iter().collect();
        self.tiers
            .recorders
            .lock()
            .expect("recorders lock")
            .push(Arc::new(Recorder {
                image: *d,
                chunks,
                read: Mutex::default(),
            }));
        Ok(true)
    }

    /// Ends the recording of image `d` and sends what was read to the tier as its read
    /// set (nothing if nothing was fetched). Returns the number of chunks in it; 0 if
    /// it was not being recorded.
    pub fn finish_reads(&self, d: &Digest) -> Result<usize> {
        let r = {
            let mut recs = self.tiers.recorders.lock().expect("recorders lock");
            match recs.iter().position(|r| r.image == *d) {
                Some(i) => recs.swap_remove(i),
                None => return Ok(0),
            }
        };
        let read = std::mem::take(&mut *r.read.lock().expect("recorder lock"));
        if read.is_empty() {
            return Ok(0);
        }
        let mut v = Vec::with_capacity(read.len() * 32);
        for c in &read {
            v.extend_from_slice(&c.0);
        }
        Store::tier_put(&*self.need_tier()?, &readset_key(d), &v)?;
        Ok(read.len())
    }

    /// The read set the tier holds for image `d` (see [`Store::record_reads`]), less
    /// the chunks already here: what a cold host should fetch first. Empty if the tier
    /// has none. Chunks it names that are not the image's are dropped.
    pub fn readset(&self, d: &Digest) -> Result<Vec<Digest>> {
        let tier = self.need_tier()?;
        let key = readset_key(d);
        let Some(v) = self.tier_get(&*tier, &key)? else {
            return Ok(Vec::new());
        };
        if v.len() % 32 != 0 {
            return Err(tier_error(
                &*tier,
                "get",
                &key,
                format!("{} bytes is not a list of digests", v.len()),
            ));
        }
        let mine: HashSet<Digest> = self.image_objects(d)?.chunks.into_iter().collect();
        let mut out = Vec::new();
        for c in v.chunks_exact(32).filter_map(Digest::from_slice) {
            if mine.contains(&c) && !self.has_chunk(&c)? {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Fetches `chunks` from the tier into this store, [`PARALLEL`] at a time, in about
    /// their order (concurrent readers of one share its fetch). Returns how many were
    /// fetched; stops at the first error.
    pub fn prefetch(&self, chunks: &[Digest]) -> Result<u64> {
        let n = AtomicU64::new(0);
        parallel(chunks, |c| {
            if !self.has_chunk(c)? {
                self.chunk(c)?;
                n.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })?;
        Ok(n.into_inner())
    }

    /// The `name:tag` a user's spec names (`:latest` implied), if it is a name of `d`.
    fn name_of(&self, spec: &str, d: &Digest) -> Result<Option<String>> {
        if Digest::parse(spec).is_some() {
            return Ok(None);
        }
        let named = crate::refname::with_default_tag(spec);
        Ok((self.get_ref(&named)? == Some(*d)).then_some(named))
    }

    /// Brings image `spec` (NAME:TAG, `:latest` implied, or `sha256:HEX`) from the tier:
    /// every record (from its pack, one GET, each verified) and, with `chunks`, every
    /// chunk this store lacks; without, chunks are fetched as they are read. Then points
    /// the name here at it. Records and name are written durably before it returns.
    pub fn pull_image(
        &self,
        spec: &str,
        chunks: bool,
        progress: &TierProgress,
    ) -> Result<TierReport> {
        let tier = self.need_tier()?;
        let start = Instant::now();
        let before = self.fetched();
        let (d, name) = match Digest::parse(spec) {
            Some(d) => (d, None),
            None => {
                let name = crate::refname::with_default_tag(spec);
                crate::refname::validate(&name)?;
                let key = ref_key(&name);
                let v = self
                    .tier_get(&*tier, &key)?
                    .ok_or_else(|| Error::NotFound {
                        what: "image in the tier",
                        name: name.clone(),
                    })?;
                let d = std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| Digest::parse(s.trim()))
                    .ok_or_else(|| tier_error(&*tier, "get", &key, "not an image digest"))?;
                (d, Some(name))
            }
        };
        if !self.db.contains(Cf::Images, &d.0)? {
            self.unpack(&*tier, &d)?;
        }
        // Every record is here now (the walk fetches any the pack lacked, one by one).
        let objects = self.image_objects(&d)?;
        let total = (objects.records.len() + objects.chunks.len()) as u64;
        progress.objects.store(total, Ordering::Relaxed);
        progress
            .done
            .store(objects.records.len() as u64, Ordering::Relaxed);
        let remote = AtomicU64::new(0);
        let content = AtomicU64::new(0);
        parallel(&objects.chunks, |c| {
            if !self.has_chunk(c)? {
                if chunks {
                    let raw = self.chunk(c)?;
                    content.fetch_add(raw.len() as u64, Ordering::Relaxed);
                } else {
                    remote.fetch_add(1, Ordering::Relaxed);
                }
            }
            progress.done.fetch_add(1, Ordering::Relaxed);
            progress
                .bytes
                .store(self.fetched().bytes - before.bytes, Ordering::Relaxed);
            Ok(())
        })?;
        // A pushed image's chunks are all in the tier (a push sends them before its
        // pack and name): remember it, for fsck and for eviction.
        let mut b = Batch::new();
        for c in &objects.chunks {
            self.mark_tiered(&mut b, ObjectKind::Chunk, c);
        }
        if let Some(name) = &name {
            b.put(&self.db, Cf::Refs, name.as_bytes(), &d.0);
        }
        // Synced: it also makes every record fetched before it durable.
        self.db.write(b, true)?;
        self.bump_changes();
        let after = self.fetched();
        let transferred = after.objects - before.objects;
        Ok(TierReport {
            image: d,
            name,
            objects: total,
            transferred,
            skipped: total.saturating_sub(transferred),
            bytes: after.bytes - before.bytes,
            content_bytes: content.into_inner(),
            chunks_remote: remote.into_inner(),
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Stores the records of image `d`'s pack, each verified. A tier without the pack
    /// (pushed by hand, or lost) is not an error: the walk fetches records one by one.
    fn unpack(&self, tier: &dyn Tier, d: &Digest) -> Result<()> {
        let key = pack_key(d);
        let Some(pack) = self.tier_get(tier, &key)? else {
            return Ok(());
        };
        let bad = |why: &str| tier_error(tier, "get", &key, why);
        let mut r = Reader::new(&pack);
        let mut b = Batch::new();
        let mut has_image = false;
        while r.end().is_err() {
            let kind = r
                .u8()
                .ok()
                .and_then(kind_of)
                .ok_or_else(|| bad("a record of an unknown kind"))?;
            let v = r.bytes().map_err(|_| bad("truncated"))?;
            let rd = Digest::of(v);
            if kind == ObjectKind::Chunk {
                return Err(bad("a chunk in a pack of records"));
            }
            has_image |= kind == ObjectKind::Image && rd == *d;
            b.put(&self.db, record_cf(kind), &rd.0, v);
            self.mark_tiered(&mut b, kind, &rd);
        }
        if !has_image {
            return Err(bad("the pack does not hold its image"));
        }
        self.db.write(b, false)
    }
}

/// A tier's failure or refusal of `op` on `key`.
fn tier_error(tier: &dyn Tier, op: &'static str, key: &str, message: impl Into<String>) -> Error {
    Error::Tier {
        url: tier.url().to_string(),
        op,
        key: key.to_string(),
        message: message.into(),
    }
}

/// Runs `f` on every item from [`PARALLEL`] threads; the first error stops the rest and
/// is returned.
pub(crate) fn parallel<T: Sync>(items: &[T], f: impl Fn(&T) -> Result<()> + Sync) -> Result<()> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..PARALLEL.min(items.len()) {
            s.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    if let Err(e) = f(item) {
                        failed.store(true, Ordering::Relaxed);
                        first_error.lock().expect("error lock").get_or_insert(e);
                    }
                }
            });
        }
    });
    match first_error.into_inner().expect("error lock") {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
