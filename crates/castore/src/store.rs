//! The store: one directory, one process. Reads verify digests; writes go through
//! [`crate::db`] batches; imports in flight protect what they use from GC with claims.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::Digest;

thread_local! {
    /// The compressor of [`Store::encode_probed`]'s samples.
    static PROBE: std::cell::RefCell<zstd::bulk::Compressor<'static>> =
        std::cell::RefCell::new(zstd::bulk::Compressor::new(1).expect("zstd level 1 is valid"));
}
use crate::chunklog::{ChunkFiles, ChunkLog, DiskFiles, POINTER, Pointer};
use crate::codec::{Reader, Writer};
use crate::db::{Batch, Cf, Db};
use crate::error::{Error, ObjectKind, Result};
use crate::model::{Blob, FileData, Image, Layer, Tree};

const FORMAT_KEY: &[u8] = b"format";
/// Version 2 added chunk log pointers (`chunks` values starting with
/// [`crate::chunklog::POINTER`]), which version 1 builds would take for corruption; a
/// version 1 store is upgraded when opened.
const FORMAT_VERSION: &[u8] = b"tidedge-castore-2";
const FORMAT_VERSION_1: &[u8] = b"tidedge-castore-1";

pub(crate) const CODEC_RAW: u8 = 0;
pub(crate) const CODEC_ZSTD: u8 = 1;

/// zstd level for chunks: level 3 is zstd's default balance of speed and size.
pub(crate) const ZSTD_LEVEL: i32 = 3;

thread_local! {
    /// One zstd decompression context per reading thread: creating one per chunk costs
    /// about as much as decompressing a small chunk.
    static DECOMPRESSOR: std::cell::RefCell<zstd::bulk::Decompressor<'static>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new().expect("zstd decompressor"));
}

/// A zstd frame of at most one chunk's bytes (256 KiB raw, FastCDC's maximum; a bigger
/// claim is corruption), decompressed with this thread's context.
fn decompress(frame: &[u8]) -> Option<Vec<u8>> {
    DECOMPRESSOR
        .with_borrow_mut(|z| z.decompress(frame, crate::chunker::MAX_SIZE as usize))
        .ok()
}

/// A content-addressed store in one directory.
///
/// Opening takes an exclusive lock: a second process (or a second `open` in this one)
/// gets [`Error::InUse`]. All methods take `&self` and may be called from many threads.
#[derive(Debug)]
pub struct Store {
    pub(crate) db: Db,
    path: PathBuf,
    _lock: File,
    pub(crate) live: Mutex<Live>,
    next_claim: AtomicU64,
    /// Volumes open in this process (volume/mod.rs).
    pub(crate) volumes: crate::volume::Registry,
    /// Bumped by every change to layers, images, names or chunks (inventory.rs).
    pub(crate) changes: AtomicU64,
    /// The last inventory and each layer's chunk list (inventory.rs).
    pub(crate) inventory: crate::inventory::InventoryCache,
    /// Chunk bytes that volume writes store outside RocksDB (chunklog.rs).
    pub(crate) log: ChunkLog,
    /// The chunk tier this store caches, if any (tier/mod.rs).
    pub(crate) tiers: crate::tier::TierState,
    /// The limit on chunk bytes kept and what eviction did (cache.rs).
    pub(crate) cache: crate::cache::CacheState,
}

/// Digests in use by work that has not committed a reference yet.
#[derive(Debug, Default)]
pub(crate) struct Live {
    /// Per in-flight import: every digest it stored or found already stored.
    pub(crate) claims: std::collections::HashMap<u64, HashSet<Digest>>,
    /// While a GC runs: claims of imports that finished during it (their references may
    /// have been written after GC read the references).
    pub(crate) gc_extra: Option<HashSet<Digest>>,
}

impl Live {
    /// Whether work in flight uses `d` (an import's or volume write's claim, or one
    /// handed to a running GC): then neither GC nor eviction may delete it.
    pub(crate) fn holds(&self, d: &Digest) -> bool {
        self.claims.values().any(|c| c.contains(d))
            || self.gc_extra.as_ref().is_some_and(|e| e.contains(d))
    }
}

/// A set of claims held by one import; released (or handed to a running GC) on drop.
#[derive(Debug)]
pub(crate) struct ClaimSet<'a> {
    store: &'a Store,
    id: u64,
}

impl ClaimSet<'_> {
    /// Records that this import uses `d`. Returns true the first time `d` is claimed by
    /// this import. Must be called before checking whether `d` exists, so a concurrent
    /// GC either sees the claim or has already deleted `d` (and the caller rewrites it).
    pub(crate) fn claim(&self, d: Digest) -> bool {
        let mut live = self.store.live.lock().expect("live lock");
        live.claims
            .get_mut(&self.id)
            .expect("own claim set")
            .insert(d)
    }
}

impl Drop for ClaimSet<'_> {
    fn drop(&mut self) {
        let mut live = self.store.live.lock().expect("live lock");
        let set = live.claims.remove(&self.id).unwrap_or_default();
        if let Some(extra) = live.gc_extra.as_mut() {
            extra.extend(set);
        }
    }
}

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join("lock");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io("open", &path, e))?;
    // SAFETY: flock on a file descriptor we own; no memory is shared with the kernel.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim().to_string();
            return Err(Error::InUse {
                path: dir.to_path_buf(),
                holder: (!holder.is_empty()).then_some(holder),
            });
        }
        return Err(Error::io("lock", &path, err));
    }
    let exe = std::env::args().next().unwrap_or_default();
    let exe = Path::new(&exe)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    f.set_len(0).map_err(|e| Error::io("truncate", &path, e))?;
    f.rewind().map_err(|e| Error::io("seek", &path, e))?;
    writeln!(f, "pid {} ({exe})", std::process::id()).map_err(|e| Error::io("write", &path, e))?;
    Ok(f)
}

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store> {
        Store::open_with_files(dir, |files| files)
    }

    /// Opens the store in `dir` with its chunk log's files wrapped by `wrap`: the seam
    /// through which tests inject I/O faults ([`crate::testing::FaultyFiles`]).
    pub fn open_with_files(
        dir: impl AsRef<Path>,
        wrap: impl FnOnce(Arc<dyn ChunkFiles>) -> Arc<dyn ChunkFiles>,
    ) -> Result<Store> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
        let lock = lock_dir(dir)?;
        let log_dir = dir.join("chunks");
        let files = DiskFiles::open(&log_dir).map_err(|e| Error::io("open", &log_dir, e))?;
        let log = ChunkLog::open(wrap(Arc::new(files)))?;
        let db_path = dir.join("db");
        let db = Db::open(&db_path).map_err(|e| {
            let msg = e.into_string();
            if msg.contains("lock") {
                Error::InUse {
                    path: dir.to_path_buf(),
                    holder: None,
                }
            } else {
                Error::Db(msg)
            }
        })?;
        match db.get(Cf::Meta, FORMAT_KEY)? {
            None => {
                let mut b = Batch::new();
                b.put(&db, Cf::Meta, FORMAT_KEY, FORMAT_VERSION);
                db.write(b, true)?;
            }
            Some(v) if v == FORMAT_VERSION => {}
            Some(v) if v == FORMAT_VERSION_1 => {
                // Everything version 1 wrote reads the same; only new writes may hold
                // pointers, so the mark goes first.
                let mut b = Batch::new();
                b.put(&db, Cf::Meta, FORMAT_KEY, FORMAT_VERSION);
                db.write(b, true)?;
            }
            Some(v) => {
                return Err(Error::Refused(format!(
                    "store {} has format {:?}, this build reads {:?}",
                    dir.display(),
                    String::from_utf8_lossy(&v),
                    String::from_utf8_lossy(FORMAT_VERSION)
                )));
            }
        }
        Ok(Store {
            db,
            path: dir.to_path_buf(),
            _lock: lock,
            live: Mutex::new(Live::default()),
            next_claim: AtomicU64::new(1),
            volumes: crate::volume::Registry::default(),
            changes: AtomicU64::new(0),
            inventory: crate::inventory::InventoryCache::default(),
            log,
            tiers: crate::tier::TierState::default(),
            cache: crate::cache::CacheState::default(),
        })
    }

    /// The store directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn claims(&self) -> ClaimSet<'_> {
        let id = self.next_claim.fetch_add(1, Ordering::Relaxed);
        self.live
            .lock()
            .expect("live lock")
            .claims
            .insert(id, HashSet::new());
        ClaimSet { store: self, id }
    }

    /// Whether a chunk is stored.
    pub fn has_chunk(&self, d: &Digest) -> Result<bool> {
        self.db.contains(Cf::ChunkIndex, &d.0)
    }

    /// Reads a chunk, verifying its digest: corrupt bytes are an error, never data. A
    /// chunk this store lacks is fetched from its tier, if it has one.
    pub fn chunk(&self, d: &Digest) -> Result<Vec<u8>> {
        self.touch(d);
        match self.chunk_local(d) {
            Err(Error::Missing { .. }) if let Some(r) = self.fetch_chunk(d) => r,
            r => r,
        }
    }

    /// Reads a chunk from this store alone.
    pub(crate) fn chunk_local(&self, d: &Digest) -> Result<Vec<u8>> {
        Store::decode_stored(d, &self.stored_local(d)?)
    }

    /// A chunk's stored value (codec byte + payload) from RocksDB or the chunk log, not
    /// yet verified.
    fn stored_local(&self, d: &Digest) -> Result<Vec<u8>> {
        let stored = self.stored_value(d)?;
        if stored.first() != Some(&POINTER) {
            return Ok(stored);
        }
        let (codec, bytes) = self.log_bytes(d, &stored)?;
        let mut v = Vec::with_capacity(bytes.len() + 1);
        v.push(codec);
        v.extend_from_slice(&bytes);
        Ok(v)
    }

    /// A chunk's raw bytes from its stored value (codec byte + payload), verified.
    pub(crate) fn decode_stored(d: &Digest, stored: &[u8]) -> Result<Vec<u8>> {
        let corrupt = || Error::Corrupt {
            kind: ObjectKind::Chunk,
            digest: *d,
        };
        let raw = match stored.split_first() {
            Some((&CODEC_RAW, rest)) => rest.to_vec(),
            Some((&CODEC_ZSTD, rest)) => decompress(rest).ok_or_else(corrupt)?,
            _ => return Err(corrupt()),
        };
        if Digest::of(&raw) != *d {
            return Err(corrupt());
        }
        Ok(raw)
    }

    /// The `chunks` value of `d`.
    fn stored_value(&self, d: &Digest) -> Result<Vec<u8>> {
        self.db
            .get_verified_by_caller(Cf::Chunks, &d.0)?
            .ok_or(Error::Missing {
                kind: ObjectKind::Chunk,
                digest: *d,
            })
    }

    /// The codec and stored bytes a chunk log pointer (the `chunks` value of `d`) names.
    fn log_bytes(&self, d: &Digest, value: &[u8]) -> Result<(u8, Vec<u8>)> {
        let corrupt = || Error::Corrupt {
            kind: ObjectKind::Chunk,
            digest: *d,
        };
        let mut p = Pointer::decode(value).ok_or_else(corrupt)?;
        let mut retried = false;
        loop {
            match self.log.read(&p) {
                Ok(bytes) => return Ok((p.codec, bytes)),
                // GC moved the chunk out of its segment and removed the segment after
                // this lookup: look again.
                Err(Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound && !retried =>
                {
                    retried = true;
                    let again = self.stored_value(d)?;
                    match Pointer::decode(&again) {
                        Some(q) => p = q,
                        None => return Ok((again[0], again[1..].to_vec())),
                    }
                }
                Err(e) => return Err(e.context(format!("reading chunk {d}"))),
            }
        }
    }

    /// A chunk's raw length and its value as RocksDB holds one in place (codec byte +
    /// payload), read from wherever it is and verified: for moving it out of the log.
    pub(crate) fn chunk_stored(&self, d: &Digest) -> Result<(usize, Vec<u8>)> {
        let stored = match self.stored_local(d) {
            Err(Error::Missing { .. }) if let Some(r) = self.fetch_chunk(d) => {
                r?;
                self.stored_local(d)?
            }
            r => r?,
        };
        let raw = Store::decode_stored(d, &stored)?;
        Ok((raw.len(), stored))
    }

    /// The stored value of a chunk (codec byte + payload): zstd when that saves space,
    /// raw otherwise. `zc` is the caller's compressor, reused across chunks (creating a
    /// zstd context per chunk costs more than compressing a small one).
    pub(crate) fn encode_chunk(zc: &mut zstd::bulk::Compressor<'_>, raw: &[u8]) -> Vec<u8> {
        let bound = zstd::zstd_safe::compress_bound(raw.len());
        let mut out = Vec::with_capacity(bound + 1);
        out.push(CODEC_ZSTD);
        out.resize(bound + 1, 0);
        match zc.compress_to_buffer(raw, &mut out[1..]) {
            Ok(n) if n < raw.len() => {
                out.truncate(n + 1);
                out
            }
            _ => {
                out.clear();
                out.push(CODEC_RAW);
                out.extend_from_slice(raw);
                out
            }
        }
    }

    /// As [`Store::encode_chunk`], but first compresses two 4 KiB samples (the start and
    /// the middle, at zstd level 1: it keeps Huffman-coded literals, so skewed bytes
    /// still shrink, at about twice level 3's speed) and stores the chunk raw, without
    /// compressing the rest, when neither shrinks by 3%: random or already-compressed
    /// data (a guest's encrypted or compressed blocks, fio's buffers) then costs a few
    /// microseconds instead of a full zstd pass. Used for volume extents, written at I/O
    /// time; data that is incompressible only at those two places is stored raw (more
    /// space, never wrong). Returns the codec and the stored bytes without a codec byte
    /// (`raw` itself, not copied, when they are raw).
    pub(crate) fn encode_probed<'a>(
        zc: &mut zstd::bulk::Compressor<'_>,
        raw: &'a [u8],
    ) -> (u8, Cow<'a, [u8]>) {
        const SAMPLE: usize = 4096;
        if raw.len() >= 4 * SAMPLE {
            let mut buf = [0u8; SAMPLE + 128];
            let shrinks = |at: usize, buf: &mut [u8]| {
                PROBE.with_borrow_mut(|probe| {
                    matches!(probe.compress_to_buffer(&raw[at..at + SAMPLE], buf),
                        Ok(n) if n < SAMPLE * 97 / 100)
                })
            };
            if !shrinks(0, &mut buf) && !shrinks(raw.len() / 2, &mut buf) {
                return (CODEC_RAW, Cow::Borrowed(raw));
            }
        }
        let bound = zstd::zstd_safe::compress_bound(raw.len());
        let mut out = vec![0u8; bound];
        match zc.compress_to_buffer(raw, &mut out[..]) {
            Ok(n) if n < raw.len() => {
                out.truncate(n);
                (CODEC_ZSTD, Cow::Owned(out))
            }
            _ => (CODEC_RAW, Cow::Borrowed(raw)),
        }
    }

    /// A compressor at the store's level, for [`Store::encode_chunk`].
    pub(crate) fn compressor() -> zstd::bulk::Compressor<'static> {
        zstd::bulk::Compressor::new(ZSTD_LEVEL).expect("zstd level 3 is valid")
    }

    /// Adds a chunk (already encoded by [`Store::encode_chunk`]) and its index entry.
    pub(crate) fn put_chunk(batch: &mut Batch, db: &Db, d: &Digest, raw_len: usize, stored: &[u8]) {
        batch.put(db, Cf::Chunks, &d.0, stored);
        let mut w = Writer::new();
        w.varint(raw_len as u64);
        w.varint(stored.len() as u64);
        batch.put(db, Cf::ChunkIndex, &d.0, &w.finish());
    }

    /// Adds a chunk whose stored bytes are in the chunk log at `p` (made durable before
    /// this batch is written) and its index entry, which names the segment.
    pub(crate) fn put_chunk_pointer(
        batch: &mut Batch,
        db: &Db,
        d: &Digest,
        raw_len: usize,
        p: &Pointer,
    ) {
        batch.put(db, Cf::Chunks, &d.0, &p.encode());
        let mut w = Writer::new();
        w.varint(raw_len as u64);
        w.varint(u64::from(p.len));
        w.varint(p.segment + 1);
        batch.put(db, Cf::ChunkIndex, &d.0, &w.finish());
    }

    /// Reads a record and checks it hashes to its key; one this store lacks is fetched
    /// from its tier, if it has one.
    pub(crate) fn record(&self, cf: Cf, kind: ObjectKind, d: &Digest) -> Result<Vec<u8>> {
        let v = match self.db.get(cf, &d.0)? {
            Some(v) => v,
            None => match self.fetch_record(kind, d) {
                Some(r) => return r,
                None => return Err(Error::Missing { kind, digest: *d }),
            },
        };
        if Digest::of(&v) != *d {
            return Err(Error::Corrupt { kind, digest: *d });
        }
        Ok(v)
    }

    /// A directory tree.
    pub fn tree(&self, d: &Digest) -> Result<Tree> {
        let v = self.record(Cf::Trees, ObjectKind::Tree, d)?;
        Tree::decode(&v).map_err(|_| Error::Undecodable {
            kind: ObjectKind::Tree,
            digest: *d,
        })
    }

    /// A blob's segment list.
    pub fn blob(&self, d: &Digest) -> Result<Blob> {
        let v = self.record(Cf::Blobs, ObjectKind::Blob, d)?;
        Blob::decode(&v).map_err(|_| Error::Undecodable {
            kind: ObjectKind::Blob,
            digest: *d,
        })
    }

    /// A layer record.
    pub fn layer(&self, d: &Digest) -> Result<Layer> {
        let v = self.record(Cf::Layers, ObjectKind::Layer, d)?;
        Layer::decode(&v).map_err(|_| Error::Undecodable {
            kind: ObjectKind::Layer,
            digest: *d,
        })
    }

    /// An image record.
    pub fn image(&self, d: &Digest) -> Result<Image> {
        let v = self.record(Cf::Images, ObjectKind::Image, d)?;
        Image::decode(&v).map_err(|_| Error::Undecodable {
            kind: ObjectKind::Image,
            digest: *d,
        })
    }

    /// Writes a file's full content to `out`, verifying every chunk and the whole-file
    /// digest. Holes are written as zeros; use [`Store::file_segments`] to keep them.
    pub fn read_file(&self, data: &FileData, out: &mut dyn Write) -> Result<u64> {
        let write_err = |e| Error::io("write", "<output>", e);
        match data {
            FileData::Inline(b) => {
                out.write_all(b).map_err(write_err)?;
                Ok(b.len() as u64)
            }
            FileData::Chunk(d) => {
                let c = self.chunk(d)?;
                out.write_all(&c).map_err(write_err)?;
                Ok(c.len() as u64)
            }
            FileData::Blob(d) => {
                let blob = self.blob(d)?;
                let mut h = crate::digest::Hasher::new();
                let zeros = vec![0u8; 1 << 16];
                let mut n = 0;
                for seg in &blob.segments {
                    match *seg {
                        crate::model::Segment::Data { chunk, .. } => {
                            let c = self.chunk(&chunk)?;
                            h.update(&c);
                            out.write_all(&c).map_err(write_err)?;
                        }
                        crate::model::Segment::Hole { len } => {
                            let mut left = len;
                            while left > 0 {
                                let k = left.min(zeros.len() as u64) as usize;
                                h.update(&zeros[..k]);
                                out.write_all(&zeros[..k]).map_err(write_err)?;
                                left -= k as u64;
                            }
                        }
                    }
                    n += seg.len();
                }
                if h.finish() != blob.content {
                    return Err(Error::Corrupt {
                        kind: ObjectKind::Blob,
                        digest: *d,
                    });
                }
                Ok(n)
            }
        }
    }

    /// The image a `name:tag` reference points at.
    pub fn get_ref(&self, name: &str) -> Result<Option<Digest>> {
        Ok(self
            .db
            .get(Cf::Refs, name.as_bytes())?
            .and_then(|v| Digest::from_slice(&v)))
    }

    /// Every `name:tag` reference, sorted by name.
    pub fn refs(&self) -> Result<Vec<(String, Digest)>> {
        let mut out = Vec::new();
        for kv in self.db.entries(Cf::Refs) {
            let (k, v) = kv?;
            if let Some(d) = Digest::from_slice(&v) {
                out.push((String::from_utf8_lossy(&k).into_owned(), d));
            }
        }
        Ok(out)
    }

    /// Points `name:tag` at an image that is already stored.
    pub fn set_ref(&self, name: &str, image: &Digest) -> Result<()> {
        crate::refname::validate(name)?;
        if !self.db.contains(Cf::Images, &image.0)? {
            return Err(Error::Missing {
                kind: ObjectKind::Image,
                digest: *image,
            });
        }
        let mut b = Batch::new();
        b.put(&self.db, Cf::Refs, name.as_bytes(), &image.0);
        self.db.write(b, true)?;
        self.bump_changes();
        Ok(())
    }

    /// Removes a `name:tag` reference; its data goes at the next GC if nothing else
    /// references it.
    pub fn remove_ref(&self, name: &str) -> Result<Digest> {
        let d = self.get_ref(name)?.ok_or_else(|| Error::NotFound {
            what: "image",
            name: name.to_string(),
        })?;
        let mut b = Batch::new();
        b.delete(&self.db, Cf::Refs, name.as_bytes());
        self.db.write(b, true)?;
        self.bump_changes();
        Ok(d)
    }

    /// Layers imported on their own (kept by GC until removed).
    pub fn layer_refs(&self) -> Result<Vec<Digest>> {
        let mut out = Vec::new();
        for k in self.db.keys(Cf::LayerRefs) {
            if let Some(d) = Digest::from_slice(&k?) {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Forgets a layer imported on its own.
    pub fn remove_layer_ref(&self, d: &Digest) -> Result<()> {
        if !self.db.contains(Cf::LayerRefs, &d.0)? {
            return Err(Error::NotFound {
                what: "layer",
                name: d.to_string(),
            });
        }
        let mut b = Batch::new();
        b.delete(&self.db, Cf::LayerRefs, &d.0);
        self.db.write(b, true)?;
        self.bump_changes();
        Ok(())
    }

    /// Resolves what a user typed: `name:tag` (`:latest` implied), `sha256:HEX`, or a
    /// unique hex prefix of at least 6 digits of a stored image digest.
    pub fn resolve_image(&self, spec: &str) -> Result<Digest> {
        let not_found = || Error::NotFound {
            what: "image",
            name: spec.to_string(),
        };
        if let Some(d) = Digest::parse(spec) {
            return if self.db.contains(Cf::Images, &d.0)? {
                Ok(d)
            } else {
                Err(not_found())
            };
        }
        let named = crate::refname::with_default_tag(spec);
        if let Some(d) = self.get_ref(&named)? {
            return Ok(d);
        }
        let hex = spec.strip_prefix("sha256:").unwrap_or(spec);
        if hex.len() >= 6 && hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            let mut found = None;
            for k in self.db.keys(Cf::Images) {
                let k = k?;
                if hex::encode(&k).starts_with(&hex.to_ascii_lowercase()) {
                    if found.is_some() {
                        return Err(Error::Refused(format!("image prefix {spec} is ambiguous")));
                    }
                    found = Digest::from_slice(&k);
                }
            }
            return found.ok_or_else(not_found);
        }
        Err(not_found())
    }

    /// Size facts about a chunk from the index: (raw length, stored length).
    pub(crate) fn chunk_sizes(v: &[u8]) -> Option<(u64, u64)> {
        Store::chunk_entry(v).map(|(raw, stored, _)| (raw, stored))
    }

    /// An index entry: raw length, stored length, and the chunk log segment holding the
    /// stored bytes (None: they are in RocksDB).
    pub(crate) fn chunk_entry(v: &[u8]) -> Option<(u64, u64, Option<u64>)> {
        let mut r = Reader::new(v);
        let raw = r.varint().ok()?;
        let stored = r.varint().ok()?;
        let segment = match r.end() {
            Ok(()) => None,
            Err(_) => {
                let s = r.varint().ok()?.checked_sub(1)?;
                r.end().ok()?;
                Some(s)
            }
        };
        Some((raw, stored, segment))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::noise;

    #[test]
    fn probed_encoding_skips_only_incompressible_chunks() {
        let mut zc = Store::compressor();
        let random = noise(64 << 10, 7);
        let (codec, e) = Store::encode_probed(&mut zc, &random);
        assert_eq!(codec, CODEC_RAW);
        assert!(matches!(e, Cow::Borrowed(b) if b == &random[..]));
        // Text compresses; so does a chunk random at its start but not in its middle.
        let text: Vec<u8> = b"volume extent "
            .iter()
            .copied()
            .cycle()
            .take(64 << 10)
            .collect();
        assert_eq!(Store::encode_probed(&mut zc, &text).0, CODEC_ZSTD);
        let mut mixed = noise(64 << 10, 9);
        mixed[32 << 10..].fill(0);
        let (codec, e) = Store::encode_probed(&mut zc, &mixed);
        assert_eq!(codec, CODEC_ZSTD);
        assert!(e.len() < 40 << 10);
    }
}
