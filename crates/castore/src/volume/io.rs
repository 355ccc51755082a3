//! Byte-granular access to a volume, for an NBD server: read, write (with FUA), write
//! zeroes, trim, flush and block status, through [`Volume`] handles.
//!
//! Every request is one batch. Whole extents are written as chunks directly (dropping
//! the extent's journal records in the same batch); smaller writes and partial zeroing
//! append a record to the small-write journal ([`super::journal`]) and patch the
//! extent's pending state in memory, under the extent's stripe lock. Reads of the
//! current generation consult that state first. Writers fold the oldest pending
//! extents into chunks when the store's journal budget is exceeded, and an extent with
//! [`journal::MAX_RECORDS`] records right away.
//!
//! Durability: batches go through RocksDB's write-ahead log. A write acknowledged with
//! `fua`, and every write acknowledged before a [`Volume::flush`] returns, survives a
//! crash (the WAL is fsynced, and it is ordered, so a sync covers all earlier writes).

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, RwLockReadGuard};

use super::journal::{self, Dirty, Patch, Stripe};
use super::record::{Extent, ZERO_MARKER, ZEROED_MARKER, key};
use super::{Level, Shared, State, VolumeError, extents};
use crate::Digest;
use crate::chunklog::Pointer;
use crate::db::{Batch, Cf, Cursor};
use crate::error::{Error, ObjectKind, Result};
use crate::store::{ClaimSet, Store};

thread_local! {
    static COMPRESSOR: RefCell<zstd::bulk::Compressor<'static>> = RefCell::new(Store::compressor());
}

/// At most this many extents are examined by one [`Volume::block_status`] call; the
/// answer then covers less than asked, as NBD allows.
pub const BLOCK_STATUS_MAX_EXTENTS: u64 = 1 << 16;

/// One run of a [`Volume::block_status`] answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BlockStatus {
    /// Bytes in the run.
    pub len: u64,
    /// Whether a chunk backs it (NBD's `HOLE` flag is its negation).
    pub allocated: bool,
    /// Whether it reads as zeros (NBD's `ZERO` flag).
    pub zero: bool,
}

/// A handle on a volume (read-write) or one of its snapshots (read-only). Cheap to
/// clone; all handles of a volume in a process share its locks, so many threads may
/// read and write through them at once. Operations on a handle of a volume or snapshot
/// deleted since fail with [`VolumeError::NotFound`] or
/// [`VolumeError::SnapshotNotFound`].
#[derive(Debug, Clone)]
pub struct Volume {
    store: Arc<Store>,
    shared: Arc<Shared>,
    name: String,
    snapshot: Option<(String, u64)>,
}

/// What one operation sees: the state (held shared) and the chain to read through.
struct View<'a> {
    st: RwLockReadGuard<'a, State>,
    levels: Vec<Level>,
    size: u64,
    shift: u8,
}

/// A new value for one extent.
enum Content<'a> {
    Zero,
    /// Zeros kept allocated (`no_hole`).
    Zeroed,
    Bytes(Cow<'a, [u8]>),
}

/// What [`Volume::modify`] writes.
#[derive(Clone, Copy)]
enum Fill<'a> {
    Data(&'a [u8]),
    /// Zeros; `true`: keep the range allocated (NBD's `NO_HOLE`).
    Zeroes(bool),
    Trim,
}

impl Store {
    /// Opens volume `name` for reading and writing.
    pub fn open_volume(self: &Arc<Self>, name: &str) -> Result<Volume> {
        // Under the admin lock, so a concurrent delete is either seen or not started.
        let _admin = self.volumes.admin.lock().expect("volume admin lock");
        let id = self.volume_id(name)?;
        Ok(Volume {
            store: self.clone(),
            shared: self.volume_shared(id)?,
            name: name.to_string(),
            snapshot: None,
        })
    }

    /// Opens snapshot `volume@snapshot`, read-only.
    pub fn open_snapshot(self: &Arc<Self>, name: &str, snapshot: &str) -> Result<Volume> {
        let _admin = self.volumes.admin.lock().expect("volume admin lock");
        let id = self.volume_id(name)?;
        let shared = self.volume_shared(id)?;
        let generation = {
            let st = shared.state.read().expect("volume state lock");
            st.rec
                .snapshot(snapshot)
                .ok_or_else(|| VolumeError::SnapshotNotFound {
                    volume: name.to_string(),
                    snapshot: snapshot.to_string(),
                })?
                .generation
        };
        Ok(Volume {
            store: self.clone(),
            shared,
            name: name.to_string(),
            snapshot: Some((snapshot.to_string(), generation)),
        })
    }
}

/// Extent `e` as seen through `levels` (nearest first): one seek per level until one
/// has a version at or below its generation. Past a level's size reads as zero.
pub(crate) fn lookup(
    cursor: &mut Cursor<'_>,
    levels: &[Level],
    e: u64,
    shift: u8,
) -> Result<Extent> {
    for l in levels {
        if e >= extents(l.size, shift) {
            return Ok(Extent::Zero);
        }
        let k = key(l.id, e, l.generation);
        if let Some((found, v)) = cursor.seek(&k)?
            && found.len() == 24
            && found[..16] == k[..16]
        {
            return Extent::decode(v).ok_or_else(|| {
                VolumeError::BadEntry {
                    id: l.id,
                    extent: e,
                }
                .into()
            });
        }
    }
    Ok(Extent::Zero)
}

/// The bytes of extent `e` as seen through `levels` (its block map only, no journal),
/// or None when it reads as zeros. Verified, through the shared chunk cache.
pub(crate) fn base_bytes(
    store: &Store,
    cursor: &mut Cursor<'_>,
    levels: &[Level],
    e: u64,
    shift: u8,
) -> Result<Option<Arc<Vec<u8>>>> {
    match lookup(cursor, levels, e, shift)? {
        Extent::Zero | Extent::Zeroed => Ok(None),
        Extent::Chunk(d) => extent_bytes(store, &d, levels[0].id, e, shift).map(Some),
    }
}

/// The bytes of chunk `d`, extent `e` of volume `id`, from the volumes' cache (verified
/// when read from disk), checked to be one extent long.
fn extent_bytes(store: &Store, d: &Digest, id: u64, e: u64, shift: u8) -> Result<Arc<Vec<u8>>> {
    let data = store.volumes.cache.chunk(store, d)?;
    if data.len() as u64 != 1u64 << shift {
        return Err(Error::Corrupt {
            kind: ObjectKind::Chunk,
            digest: *d,
        }
        .context(format!("volume id {id}: extent {e} has the wrong size")));
    }
    Ok(data)
}

/// The levels a write of the volume in `st` sees (its current generation first).
fn current_levels(id: u64, st: &State) -> Vec<Level> {
    let mut levels = vec![Level {
        id,
        generation: st.rec.generation,
        size: st.rec.size,
    }];
    levels.extend(st.ancestors.iter().copied());
    levels
}

/// Whether an extent with nothing pending (None: something is) reads as zeros.
fn reads_zero(settled: Option<Extent>) -> bool {
    matches!(settled, Some(Extent::Zero | Extent::Zeroed))
}

fn is_zero(b: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; align_to only reinterprets the
        // aligned middle of the slice.
        unsafe { b.align_to::<u64>() }
    };
    head.iter().all(|&x| x == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&x| x == 0)
}

/// A chunk a batch names that the store lacks durably, to be stored with the batch: in
/// the chunk log for whole-extent writes ([`write_chunks`]), or in the batch itself
/// ([`put_inline`]).
struct NewChunk<'a> {
    d: Digest,
    raw_len: usize,
    codec: u8,
    /// The stored bytes (the caller's own when they are raw).
    bytes: Cow<'a, [u8]>,
}

/// Stages extent `e`'s new content at `generation` into `b`: a zero marker, or the
/// chunk's digest, adding the chunk to `new` if the store lacks it durably. `claims`
/// keeps the chunk from a concurrent GC until the batch is written.
#[allow(clippy::too_many_arguments)]
fn stage<'a>(
    store: &Store,
    claims: &ClaimSet<'_>,
    b: &mut Batch,
    id: u64,
    e: u64,
    generation: u64,
    content: &'a Content<'a>,
    new: &mut Vec<NewChunk<'a>>,
) -> Result<()> {
    let db = &store.db;
    let k = key(id, e, generation);
    match content {
        Content::Bytes(buf) if !is_zero(buf) => {
            let d = Digest::of(buf);
            // Claim before looking, as imports do. A chunk still in a memtable (perhaps
            // from an unlogged import batch) is written again, logged, so this batch never
            // names a chunk a crash could lose.
            if claims.claim(d) && !db.contains_durable(&[Cf::ChunkIndex, Cf::Chunks], &d.0)? {
                let (codec, bytes) = COMPRESSOR.with_borrow_mut(|zc| Store::encode_probed(zc, buf));
                new.push(NewChunk {
                    d,
                    raw_len: buf.len(),
                    codec,
                    bytes,
                });
            }
            // Reads after writes (a guest reading what it wrote, a copy checked back)
            // find it here. Harmless if the batch then fails: the digest names these bytes.
            store.volumes.cache.insert_known(&d, buf.to_vec());
            b.put(db, Cf::BlockMap, &k, &d.0);
        }
        Content::Zeroed => b.put(db, Cf::BlockMap, &k, ZEROED_MARKER),
        _ => b.put(db, Cf::BlockMap, &k, ZERO_MARKER),
    }
    Ok(())
}

/// Puts `new` chunks into `b` itself (the bytes go through RocksDB's log and a blob file).
fn put_inline(store: &Store, b: &mut Batch, new: Vec<NewChunk<'_>>) {
    for c in new {
        let mut stored = Vec::with_capacity(c.bytes.len() + 1);
        stored.push(c.codec);
        stored.extend_from_slice(&c.bytes);
        Store::put_chunk(b, &store.db, &c.d, c.raw_len, &stored);
    }
}

/// Appends `new` chunks to the chunk log, makes them durable, and puts their pointers
/// into `b`. The returned pin keeps their segment from GC's reclaim until `b` is written.
fn write_chunks<'s>(
    store: &'s Store,
    b: &mut Batch,
    new: &[NewChunk<'_>],
) -> Result<Option<crate::chunklog::Appended<'s>>> {
    if new.is_empty() {
        return Ok(None);
    }
    let parts: Vec<&[u8]> = new.iter().map(|c| &*c.bytes).collect();
    let appended = store.log.append(&parts)?;
    for (c, &(segment, offset)) in new.iter().zip(&appended.places) {
        let p = Pointer {
            codec: c.codec,
            segment,
            offset,
            len: c.bytes.len() as u32,
        };
        Store::put_chunk_pointer(b, &store.db, &c.d, c.raw_len, &p);
    }
    // The durability invariant of the chunk log: bytes first, then what points at them.
    appended.sync()?;
    Ok(Some(appended))
}

/// Stages a shrink of the volume in `st` to `new_size` into `b`: every extent past the
/// new end that reads as data gets a zero marker at the current generation (others lose
/// their current version), and the boundary extent's tail is zeroed. Returns the claims
/// to hold until `b` is written.
pub(crate) fn discard_tail<'s>(
    store: &'s Store,
    shared: &Shared,
    st: &State,
    new_size: u64,
    b: &mut Batch,
) -> Result<ClaimSet<'s>> {
    let claims = store.claims();
    let shift = st.rec.extent_shift;
    let es = 1u64 << shift;
    let cur = st.rec.generation;
    let id = shared.id;
    let mut now = vec![Level {
        id,
        generation: cur,
        size: st.rec.size,
    }];
    now.extend(st.ancestors.iter().copied());
    // What an extent shows without its current version.
    let mut below = now.clone();
    below[0] = Level {
        id,
        generation: cur - 1,
        size: u64::MAX,
    };
    let mut cursor = store.db.cursor(Cf::BlockMap, None, None);
    let first_dropped = extents(new_size, shift);
    for e in store.chain_extents(&now, first_dropped, extents(st.rec.size, shift))? {
        match lookup(&mut cursor, &below, e, shift)? {
            Extent::Chunk(_) | Extent::Zeroed => {
                b.put(&store.db, Cf::BlockMap, &key(id, e, cur), ZERO_MARKER)
            }
            Extent::Zero => b.delete(&store.db, Cf::BlockMap, &key(id, e, cur)),
        }
    }
    if !new_size.is_multiple_of(es) {
        let e = new_size >> shift;
        if let Extent::Chunk(d) = lookup(&mut cursor, &now, e, shift)? {
            let mut buf = store.volumes.cache.chunk(store, &d)?.as_ref().clone();
            let keep = (new_size - (e << shift)) as usize;
            buf[keep..].fill(0);
            let content = Content::Bytes(Cow::Owned(buf));
            let mut new = Vec::new();
            stage(store, &claims, b, id, e, cur, &content, &mut new)?;
            put_inline(store, b, new);
        }
    }
    Ok(claims)
}

impl Volume {
    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The snapshot this handle reads, if it is a snapshot handle.
    pub fn snapshot(&self) -> Option<&str> {
        self.snapshot.as_ref().map(|(s, _)| s.as_str())
    }

    /// Whether writes are refused (snapshot handles).
    pub fn is_read_only(&self) -> bool {
        self.snapshot.is_some()
    }

    /// `name` or `name@snapshot`, for messages.
    fn label(&self) -> String {
        match &self.snapshot {
            None => self.name.clone(),
            Some((s, _)) => format!("{}@{s}", self.name),
        }
    }

    fn view(&self) -> Result<View<'_>> {
        let st = self.shared.state.read().expect("volume state lock");
        if st.deleted {
            return Err(VolumeError::NotFound {
                volume: self.name.clone(),
            }
            .into());
        }
        let (generation, size) = match &self.snapshot {
            None => (st.rec.generation, st.rec.size),
            Some((name, generation)) => {
                let s = st
                    .rec
                    .snapshots
                    .iter()
                    .find(|s| &s.name == name && s.generation == *generation)
                    .ok_or_else(|| VolumeError::SnapshotNotFound {
                        volume: self.name.clone(),
                        snapshot: name.clone(),
                    })?;
                (s.generation, s.size)
            }
        };
        let mut levels = vec![Level {
            id: self.shared.id,
            generation,
            size,
        }];
        levels.extend(st.ancestors.iter().copied());
        let shift = st.rec.extent_shift;
        Ok(View {
            st,
            levels,
            size,
            shift,
        })
    }

    fn check_range(&self, v: &View<'_>, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > v.size) {
            return Err(VolumeError::OutOfRange {
                volume: self.label(),
                offset,
                len,
                size: v.size,
            }
            .into());
        }
        Ok(())
    }

    /// Size in bytes now (a resize changes it).
    pub fn size(&self) -> Result<u64> {
        Ok(self.view()?.size)
    }

    /// Extent size in bytes.
    pub fn extent_size(&self) -> u64 {
        self.shared
            .state
            .read()
            .expect("volume state lock")
            .rec
            .extent_size()
    }

    /// The generation this handle reads (the snapshot's, or the current one).
    pub fn generation(&self) -> Result<u64> {
        Ok(self.view()?.levels[0].generation)
    }

    /// Calls `f` with extent `e`'s pending journal state and its base bytes (None: zeros)
    /// if it has any, under its stripe lock. Journal records belong to the current
    /// generation: snapshot handles never see them.
    ///
    /// A cursor reads the block map as of its creation, so when this returns None the
    /// caller must look the extent up through a cursor made *after* the call: a fold
    /// that emptied the extent's pending state before then is in the block map it sees.
    fn pending<R>(
        &self,
        v: &View<'_>,
        e: u64,
        f: impl FnOnce(&Dirty, Option<&[u8]>) -> R,
    ) -> Result<Option<R>> {
        if self.snapshot.is_some() {
            return Ok(None);
        }
        let stripe = self.shared.stripes[self.shared.stripe_of(e)]
            .lock()
            .expect("extent lock");
        let Some(d) = stripe.dirty.get(&e) else {
            return Ok(None);
        };
        let base = match d.needs_base() {
            true => {
                let mut cursor = self.store.db.cursor(Cf::BlockMap, None, None);
                base_bytes(&self.store, &mut cursor, &v.levels, e, v.shift)?
            }
            false => None,
        };
        Ok(Some(f(d, base.as_deref().map(Vec::as_slice))))
    }

    /// Reads `buf.len()` bytes at `offset`. Every chunk is verified on its way in; a
    /// volume handle sees the pending journal records of every handle in the process.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let v = self.view()?;
        self.check_range(&v, offset, buf.len() as u64)?;
        let es = 1u64 << v.shift;
        if !buf.is_empty() {
            self.fetch_ahead(
                &v,
                offset >> v.shift,
                (offset + buf.len() as u64 - 1) >> v.shift,
            )?;
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let e = pos >> v.shift;
            let within = (pos - (e << v.shift)) as usize;
            let n = (buf.len() - done).min(es as usize - within);
            let out = &mut buf[done..done + n];
            done += n;
            if self
                .pending(&v, e, |d, base| d.read(base, within, out))?
                .is_some()
            {
                continue;
            }
            let data = match self.mapped(&v, e)? {
                Some(Extent::Zero | Extent::Zeroed) => None,
                Some(Extent::Chunk(d)) => {
                    Some(extent_bytes(&self.store, &d, self.shared.id, e, v.shift)?)
                }
                None => {
                    let mut cursor = self.store.db.cursor(Cf::BlockMap, None, None);
                    base_bytes(&self.store, &mut cursor, &v.levels, e, v.shift)?
                }
            };
            match data {
                None => out.fill(0),
                Some(data) => out.copy_from_slice(&data[within..within + n]),
            }
        }
        Ok(())
    }

    /// Before a read of extents `first..=last`: the chunks among them that only the
    /// chunk tier holds (a volume pulled from there) are fetched in parallel, not one
    /// GET after another as the read reaches each. Nothing without a tier, or for a
    /// read of one extent.
    fn fetch_ahead(&self, v: &View<'_>, first: u64, last: u64) -> Result<()> {
        if last == first || self.store.tier().is_none() {
            return Ok(());
        }
        let mut missing = Vec::new();
        for e in first..=last {
            if let Some(Extent::Chunk(d)) = self.mapped(v, e)?
                && !self.store.has_chunk(&d)?
            {
                missing.push(d);
            }
        }
        if missing.len() > 1 {
            self.store.prefetch(&missing)?;
        }
        Ok(())
    }

    /// Fills `buf` as [`Volume::read_at`] would, if every byte is in memory: pending
    /// writes, remembered extents of the block map and decompressed extents in the
    /// cache. None (nothing read) if anything would need the store or a lock someone
    /// holds; the caller then reads normally. For servers that answer cached reads
    /// without handing them to a blocking thread.
    pub fn read_in_memory(&self, offset: u64, buf: &mut [u8]) -> Option<()> {
        if self.snapshot.is_some() {
            return None;
        }
        let st = self.shared.state.try_read().ok()?;
        let end = offset.checked_add(buf.len() as u64)?;
        if st.deleted || end > st.rec.size {
            return None;
        }
        let shift = st.rec.extent_shift;
        let es = 1u64 << shift;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let e = pos >> shift;
            let within = (pos - (e << shift)) as usize;
            let n = (buf.len() - done).min(es as usize - within);
            let out = &mut buf[done..done + n];
            done += n;
            let stripe = self.shared.stripes[self.shared.stripe_of(e)]
                .try_lock()
                .ok()?;
            if let Some(d) = stripe.dirty.get(&e) {
                if d.needs_base() {
                    return None;
                }
                d.read(None, within, out);
                continue;
            }
            match *stripe.map.get(&e)? {
                Extent::Zero | Extent::Zeroed => out.fill(0),
                Extent::Chunk(d) => {
                    let data = self.store.volumes.cache.get_cached(&d)?;
                    if data.len() as u64 != es {
                        return None;
                    }
                    out.copy_from_slice(&data[within..within + n]);
                }
            }
        }
        Some(())
    }

    /// Extent `e` of the current generation as the block map says, from the stripe's
    /// map cache or looked up (and remembered) under the stripe's lock. None for
    /// snapshot handles, and when `e` has pending journal records (a fold may have raced
    /// the caller's check; it then reads the block map itself).
    fn mapped(&self, v: &View<'_>, e: u64) -> Result<Option<Extent>> {
        if self.snapshot.is_some() {
            return Ok(None);
        }
        let mut stripe = self.shared.stripes[self.shared.stripe_of(e)]
            .lock()
            .expect("extent lock");
        if stripe.dirty.contains_key(&e) {
            return Ok(None);
        }
        if let Some(x) = stripe.map.get(&e) {
            return Ok(Some(*x));
        }
        // Made under the lock: every change to `e` committed before it is visible.
        let mut cursor = self.store.db.cursor(Cf::BlockMap, None, None);
        let x = lookup(&mut cursor, &v.levels, e, v.shift)?;
        stripe.map.insert(e, x);
        Ok(Some(x))
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0; len];
        self.read_at(offset, &mut buf)?;
        Ok(buf)
    }

    /// Writes `data` at `offset`: one batch for all extents it touches. With `fua` it is
    /// durable when this returns; otherwise after the next [`Volume::flush`].
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.modify(offset, data.len() as u64, Fill::Data(data), fua)
    }

    /// Makes `len` bytes at `offset` read as zeros: whole extents become zero markers (no
    /// chunk), partial ones are rewritten.
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.modify(offset, len, Fill::Zeroes(false), fua)
    }

    /// [`Volume::write_zeroes`] keeping the range allocated (NBD's `NO_HOLE`): whole
    /// extents read as zeros yet [`Volume::block_status`] reports them as data, and no
    /// chunk is written. A partial extent gets a zero patch like any write (so an extent
    /// that ends up all zeros when folded is a hole again).
    pub fn write_zeroes_allocated(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.modify(offset, len, Fill::Zeroes(true), fua)
    }

    /// Discards whole extents within `[offset, offset + len)` (they read as zeros
    /// afterwards); the partial extents at either end are left as they are, as NBD's
    /// TRIM, a hint, allows.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.modify(offset, len, Fill::Trim, fua)
    }

    /// Makes every write acknowledged so far durable.
    pub fn flush(&self) -> Result<()> {
        self.view()?;
        self.store.db.sync_wal()
    }

    /// Locks the stripes of extents `e0..=e1`, in index order (so two multi-extent
    /// writes cannot deadlock), as (stripe index, guard) sorted by index.
    fn lock_stripes(&self, e0: u64, e1: u64) -> Vec<(usize, MutexGuard<'_, Stripe>)> {
        let n = self.shared.stripes.len() as u64;
        let set: BTreeSet<usize> = if e1 - e0 + 1 >= n {
            (0..n as usize).collect()
        } else {
            (e0..=e1).map(|e| self.shared.stripe_of(e)).collect()
        };
        set.into_iter()
            .map(|i| (i, self.shared.stripes[i].lock().expect("extent lock")))
            .collect()
    }

    fn modify(&self, offset: u64, len: u64, fill: Fill<'_>, fua: bool) -> Result<()> {
        if let Some((s, _)) = &self.snapshot {
            return Err(VolumeError::ReadOnly {
                volume: self.name.clone(),
                snapshot: s.clone(),
            }
            .into());
        }
        let v = self.view()?;
        self.check_range(&v, offset, len)?;
        if len == 0 {
            if fua {
                self.store.db.sync_wal()?;
            }
            return Ok(());
        }
        let store = &*self.store;
        let db = &store.db;
        let id = self.shared.id;
        let generation = v.st.rec.generation;
        let shift = v.shift;
        let es = 1u64 << shift;
        let (e0, e1) = (offset >> shift, (offset + len - 1) >> shift);
        let mut locks = self.lock_stripes(e0, e1);
        let mut cursor = db.cursor(Cf::BlockMap, None, None);
        let claims = store.claims();
        // Keys, digests, pointers and index entries for each extent (journal records
        // hold their bytes).
        let mut b = match fill {
            Fill::Data(_) if len < es => Batch::with_capacity(len as usize + 256),
            Fill::Data(_) => Batch::with_capacity(256 * (e1 - e0 + 1) as usize),
            _ => Batch::new(),
        };
        let mut changes: Vec<(u64, Change)> = Vec::new();
        let mut contents: Vec<(u64, Content<'_>)> = Vec::new();
        for e in e0..=e1 {
            let stripe = stripe_mut(&mut locks, self.shared.stripe_of(e));
            let dirty = stripe.dirty.get(&e);
            let start = e << shift;
            let lo = offset.max(start);
            let hi = (offset + len).min(start + es);
            // Covers every byte of the extent that lies inside the volume.
            let whole = lo == start && hi >= (start + es).min(v.size);
            let off = (lo - start) as u32;
            // What the extent holds when no write is pending on it.
            let mut settled = || -> Result<Option<Extent>> {
                Ok(match dirty {
                    Some(_) => None,
                    None => Some(lookup(&mut cursor, &v.levels, e, shift)?),
                })
            };
            // Whole extents replace the extent (and its journal records) in this batch;
            // partial ones append a journal record.
            let action = match fill {
                Fill::Data(data) => {
                    let src = &data[(lo - offset) as usize..(hi - offset) as usize];
                    if lo == start && hi == start + es {
                        Some(Err(Content::Bytes(Cow::Borrowed(src))))
                    } else {
                        Some(Ok(Patch::Data(src.to_vec())))
                    }
                }
                Fill::Zeroes(true) if whole => {
                    (settled()? != Some(Extent::Zeroed)).then_some(Err(Content::Zeroed))
                }
                Fill::Zeroes(false) | Fill::Trim if whole => {
                    (settled()? != Some(Extent::Zero)).then_some(Err(Content::Zero))
                }
                Fill::Zeroes(_) => {
                    (!reads_zero(settled()?)).then(|| Ok(Patch::Zero((hi - lo) as u32)))
                }
                Fill::Trim => None,
            };
            match action {
                None => {}
                Some(Err(content)) => {
                    drop_records(&mut b, store, id, e, dirty);
                    contents.push((e, content));
                    changes.push((e, Change::Replace));
                }
                Some(Ok(patch)) => {
                    let seq = Dirty::next_seq(dirty);
                    let value = journal::encode(off, &patch);
                    b.put(db, Cf::VolumeJournal, &journal::key(id, e, seq), &value);
                    changes.push((e, Change::Append(seq, off, patch)));
                }
            }
        }
        // Whole extents replace the extent and its journal records; their new chunks go
        // to the chunk log, durable before the batch that names them.
        let mut new = Vec::new();
        for (e, content) in &contents {
            stage(
                store, &claims, &mut b, id, *e, generation, content, &mut new,
            )?;
        }
        let pinned = write_chunks(store, &mut b, &new)?;
        drop(new);
        drop(contents);
        if b.is_empty() {
            if fua {
                db.sync_wal()?;
            }
            return Ok(());
        }
        db.write(b, fua)?;
        drop(pinned);
        drop(claims);
        // The batch is in: now the memory state follows it, under the same locks.
        let reg = &store.volumes;
        let mut full = Vec::new();
        for (e, change) in changes {
            let stripe = stripe_mut(&mut locks, self.shared.stripe_of(e));
            match change {
                Change::Replace => {
                    stripe.map.remove(&e);
                    if let Some(d) = stripe.dirty.remove(&e) {
                        reg.account(&self.shared, -(d.mem as isize));
                    }
                }
                Change::Append(seq, off, patch) => {
                    let d = stripe.dirty.entry(e).or_insert_with(|| {
                        let d = Dirty::new(reg.next_tick());
                        reg.account(&self.shared, d.mem as isize);
                        d
                    });
                    let mut delta = d.push(seq, off, patch);
                    if d.wants_base(es as usize) {
                        // Many patches: keep the whole extent instead. If its base cannot
                        // be read now, the patches stay (reads will report the error).
                        if let Ok(base) = base_bytes(store, &mut cursor, &v.levels, e, shift) {
                            delta += d.materialise(base.as_deref().map(Vec::as_slice), es as usize);
                        }
                    }
                    reg.account(&self.shared, delta);
                    if d.seqs.len() >= journal::MAX_RECORDS {
                        full.push(e);
                    }
                }
            }
        }
        drop(cursor);
        for e in full {
            let stripe = stripe_mut(&mut locks, self.shared.stripe_of(e));
            store.fold_locked(&self.shared, &v.st, stripe, &[e])?;
        }
        drop(locks);
        drop(v);
        store.fold_over_budget()
    }

    /// Which bytes of `[offset, offset + len)` hold data and which read as zeros, as
    /// runs in order. Covers at least the first extent touched, and at most
    /// [`BLOCK_STATUS_MAX_EXTENTS`] extents: the answer may be shorter than asked.
    /// Extents with pending journal records are data unless they read as all zeros.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<BlockStatus>> {
        let v = self.view()?;
        self.check_range(&v, offset, len)?;
        let mut out: Vec<BlockStatus> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let shift = v.shift;
        let es = 1u64 << shift;
        let end = offset + len;
        let mut pos = offset;
        let mut examined = 0;
        while pos < end && examined < BLOCK_STATUS_MAX_EXTENTS {
            let e = pos >> shift;
            let n = end.min((e << shift) + es) - pos;
            let pending = self.pending(&v, e, |d, base| !is_zero(&d.content(base, es as usize)))?;
            // (allocated, reads as zeros)
            let (allocated, zero) = match pending {
                Some(data) => (data, !data),
                None => {
                    let mut cursor = self.store.db.cursor(Cf::BlockMap, None, None);
                    match lookup(&mut cursor, &v.levels, e, shift)? {
                        Extent::Chunk(_) => (true, false),
                        Extent::Zeroed => (true, true),
                        Extent::Zero => (false, true),
                    }
                }
            };
            match out.last_mut() {
                Some(last) if last.allocated == allocated && last.zero == zero => last.len += n,
                _ => out.push(BlockStatus {
                    len: n,
                    allocated,
                    zero,
                }),
            }
            pos += n;
            examined += 1;
        }
        Ok(out)
    }
}

/// What a write does to an extent's pending state once its batch is in.
enum Change {
    /// The extent was replaced whole: its journal records are gone.
    Replace,
    /// A journal record was appended.
    Append(u64, u32, Patch),
}

fn stripe_mut<'a, 'g>(
    locks: &'a mut [(usize, MutexGuard<'g, Stripe>)],
    idx: usize,
) -> &'a mut Stripe {
    let i = locks
        .binary_search_by_key(&idx, |(i, _)| *i)
        .expect("the extent's stripe is locked");
    &mut locks[i].1
}

/// Deletes the journal records of extent `e` (pending state `dirty`) in `b`.
fn drop_records(b: &mut Batch, store: &Store, id: u64, e: u64, dirty: Option<&Dirty>) {
    for &seq in dirty.map_or(&[][..], |d| &d.seqs) {
        b.delete(&store.db, Cf::VolumeJournal, &journal::key(id, e, seq));
    }
}

impl Store {
    /// Stages the fold of pending extent `e` of the volume in `st` into `b`: its new
    /// content (base plus records) as a chunk at the current generation, and the
    /// deletion of its journal records.
    fn stage_fold(
        &self,
        claims: &ClaimSet<'_>,
        b: &mut Batch,
        shared: &Shared,
        st: &State,
        e: u64,
        d: &Dirty,
    ) -> Result<()> {
        let shift = st.rec.extent_shift;
        let base = match d.needs_base() {
            true => {
                let mut cursor = self.db.cursor(Cf::BlockMap, None, None);
                base_bytes(self, &mut cursor, &current_levels(shared.id, st), e, shift)?
            }
            false => None,
        };
        let content = Content::Bytes(Cow::Owned(
            d.content(base.as_deref().map(Vec::as_slice), 1 << shift),
        ));
        let mut new = Vec::new();
        let generation = st.rec.generation;
        stage(
            self, claims, b, shared.id, e, generation, &content, &mut new,
        )?;
        put_inline(self, b, new);
        drop_records(b, self, shared.id, e, Some(d));
        Ok(())
    }

    /// Folds the pending extents `es` of one locked stripe in one batch (not synced: a
    /// fold changes no byte a reader sees, and the records it replaces are logged
    /// before it).
    fn fold_locked(
        &self,
        shared: &Shared,
        st: &State,
        stripe: &mut Stripe,
        es: &[u64],
    ) -> Result<()> {
        let claims = self.claims();
        let mut b = Batch::new();
        for e in es {
            if let Some(d) = stripe.dirty.get(e) {
                self.stage_fold(&claims, &mut b, shared, st, *e, d)?;
            }
        }
        if b.is_empty() {
            return Ok(());
        }
        self.db.write(b, false)?;
        drop(claims);
        for e in es {
            stripe.map.remove(e);
            if let Some(d) = stripe.dirty.remove(e) {
                self.volumes.account(shared, -(d.mem as isize));
            }
        }
        Ok(())
    }

    /// Folds the pending extents `es` of a volume whose state lock the caller holds.
    pub(crate) fn fold_extents(&self, shared: &Shared, st: &State, es: &[u64]) -> Result<()> {
        for &e in es {
            let mut stripe = shared.stripes[shared.stripe_of(e)]
                .lock()
                .expect("extent lock");
            self.fold_locked(shared, st, &mut stripe, &[e])?;
        }
        Ok(())
    }

    /// Stages the fold of every pending extent of a volume into `b`; the caller holds
    /// its state lock exclusively and calls [`Store::forget_dirty`] once `b` is in.
    pub(crate) fn stage_fold_all(
        &self,
        shared: &Shared,
        st: &State,
        b: &mut Batch,
        claims: &ClaimSet<'_>,
    ) -> Result<()> {
        if shared.dirty_bytes.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        for stripe in shared.stripes.iter() {
            let stripe = stripe.lock().expect("extent lock");
            for (&e, d) in &stripe.dirty {
                self.stage_fold(claims, b, shared, st, e, d)?;
            }
        }
        Ok(())
    }

    /// Stages into `b` the deletion of the journal records of extents at or past `first`
    /// (a shrink); [`Store::forget_dirty`] drops them from memory once `b` is in.
    pub(crate) fn drop_journal_from(
        &self,
        shared: &Shared,
        _st: &State,
        first: u64,
        b: &mut Batch,
    ) {
        for stripe in shared.stripes.iter() {
            let stripe = stripe.lock().expect("extent lock");
            for (&e, d) in stripe.dirty.iter().filter(|(e, _)| **e >= first) {
                drop_records(b, self, shared.id, e, Some(d));
            }
        }
    }

    /// Forgets the pending state of the extents `which` selects, after a batch that
    /// folded or deleted their records.
    pub(crate) fn forget_dirty(&self, shared: &Shared, which: impl Fn(u64) -> bool) {
        for stripe in shared.stripes.iter() {
            let mut stripe = stripe.lock().expect("extent lock");
            let mut freed = 0;
            stripe.dirty.retain(|&e, d| {
                let drop = which(e);
                if drop {
                    freed += d.mem;
                }
                !drop
            });
            self.volumes.account(shared, -(freed as isize));
        }
    }

    /// Folds every pending extent of one volume, stripe by stripe.
    pub(crate) fn fold_volume(&self, shared: &Shared) -> Result<()> {
        let st = shared.state.read().expect("volume state lock");
        if st.deleted {
            return Ok(());
        }
        for stripe in shared.stripes.iter() {
            let mut stripe = stripe.lock().expect("extent lock");
            let es: Vec<u64> = stripe.dirty.keys().copied().collect();
            self.fold_locked(shared, &st, &mut stripe, &es)?;
        }
        Ok(())
    }

    /// Folds the oldest pending extents of the volumes with the most pending memory until
    /// the store is within its journal budget.
    pub(crate) fn fold_over_budget(&self) -> Result<()> {
        let reg = &self.volumes;
        while reg.dirty_bytes.load(Ordering::Relaxed) > reg.budget.load(Ordering::Relaxed) {
            let victim = {
                let open = reg.open.lock().expect("volume registry lock");
                open.values()
                    .max_by_key(|s| s.dirty_bytes.load(Ordering::Relaxed))
                    .cloned()
            };
            let Some(shared) = victim.filter(|s| s.dirty_bytes.load(Ordering::Relaxed) > 0) else {
                return Ok(());
            };
            let st = shared.state.read().expect("volume state lock");
            if st.deleted {
                continue;
            }
            // Each folding thread starts at its own stripe and skips stripes in use, so
            // concurrent writers over budget fold different extents side by side.
            let n = shared.stripes.len();
            let start = shared.hand.fetch_add(1, Ordering::Relaxed);
            let mut folded = false;
            for i in 0..n {
                let idx = (start + i) % n;
                let Ok(mut stripe) = shared.stripes[idx].try_lock() else {
                    continue;
                };
                if let Some(e) = stripe.oldest() {
                    self.fold_locked(&shared, &st, &mut stripe, &[e])?;
                    folded = true;
                    break;
                }
            }
            if !folded {
                // Another thread folded the rest meanwhile: nothing left here to free.
                return Ok(());
            }
        }
        Ok(())
    }

    /// Folds every pending small write of every volume open in this process into its
    /// extent (chunks and block map entries), leaving the journal empty. Not needed for
    /// durability (the journal is durable); it makes the block map say everything, and
    /// makes the next open replay nothing.
    pub fn fold_journal(&self) -> Result<()> {
        let open: Vec<Arc<Shared>> = self
            .volumes
            .open
            .lock()
            .expect("volume registry lock")
            .values()
            .cloned()
            .collect();
        for shared in open {
            self.fold_volume(&shared)?;
        }
        Ok(())
    }

    /// Sets how much memory pending small writes may hold, over all volumes, before
    /// writers fold the oldest of them into their extents ([`super::DEFAULT_JOURNAL_BUDGET`] by
    /// default; 0 folds every small write right after it is journaled).
    pub fn set_volume_journal_budget(&self, bytes: usize) {
        self.volumes.budget.store(bytes, Ordering::Relaxed);
    }

    /// Sets how many bytes of decompressed, verified extents the volumes of this store
    /// keep in memory (shared by all volumes; [`crate::DEFAULT_CHUNK_CACHE_BYTES`] by
    /// default). Random reads of a volume larger than it decompress and verify a whole
    /// extent per miss.
    pub fn set_volume_cache_bytes(&self, bytes: usize) {
        self.volumes.cache.set_capacity(bytes);
    }

    /// Memory held now by pending small writes, over all open volumes.
    pub fn volume_journal_bytes(&self) -> usize {
        self.volumes.dirty_bytes.load(Ordering::Relaxed)
    }
}

// Handles are shared across an NBD server's connection threads.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Volume>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VolumeSpec;

    /// Memory-only reads answer exactly what `read_at` does, and only when nothing
    /// needs the store.
    #[test]
    fn reads_in_memory_match_reads_and_decline_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        store.create_volume(&VolumeSpec::new("v", 1 << 20)).unwrap();
        let v = store.open_volume("v").unwrap();
        let data: Vec<u8> = (0..256 << 10).map(|i| (i * 7 % 251) as u8).collect();
        v.write(0, &data, false).unwrap();
        let mut buf = vec![0u8; 8192];
        // Written whole extents are cached, but the block map is not remembered yet.
        assert!(v.read_in_memory(4096, &mut buf).is_none());
        assert_eq!(v.read(4096, 8192).unwrap(), data[4096..12288]);
        assert!(v.read_in_memory(4096, &mut buf).is_some());
        assert_eq!(buf, data[4096..12288]);
        // Never-written extents read as zeros once looked up.
        assert!(v.read_in_memory(512 << 10, &mut buf).is_none());
        assert!(v.read(512 << 10, 8192).unwrap().iter().all(|&b| b == 0));
        buf.fill(1);
        assert!(v.read_in_memory(512 << 10, &mut buf).is_some());
        assert!(buf.iter().all(|&b| b == 0));
        // A small write over a remembered extent: pending without its base, declined;
        // the normal read sees it.
        v.write(4096, &[9u8; 512], false).unwrap();
        assert!(v.read_in_memory(4096, &mut buf).is_none());
        assert_eq!(v.read(4096, 512).unwrap(), vec![9u8; 512]);
        // Beyond the end and snapshot handles: declined.
        assert!(v.read_in_memory((1 << 20) - 4096, &mut buf).is_none());
        store.snapshot_volume("v", "s").unwrap();
        let s = store.open_snapshot("v", "s").unwrap();
        assert!(s.read_in_memory(0, &mut buf).is_none());
        // After the snapshot folded the pending write, memory reads see it too.
        v.read(0, 8192).unwrap();
        assert!(v.read_in_memory(4096, &mut buf[..512]).is_some());
        assert_eq!(buf[..512], [9u8; 512]);
    }

    /// Deduplication trusts only chunks a crash cannot take away.
    #[test]
    fn only_chunks_outside_memtables_count_as_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let db = &store.db;
        let both = [Cf::ChunkIndex, Cf::Chunks];
        let raw = vec![3u8; 4096];
        let d = Digest::of(&raw);
        let put = |unlogged: bool| {
            let mut b = Batch::new();
            let stored = COMPRESSOR.with_borrow_mut(|zc| Store::encode_chunk(zc, &raw));
            Store::put_chunk(&mut b, db, &d, raw.len(), &stored);
            if unlogged {
                db.write_unlogged(b).unwrap();
            } else {
                db.write(b, true).unwrap();
            }
        };
        assert!(!db.contains_durable(&both, &d.0).unwrap());
        // As an import writes it: present, but only in memtables.
        put(true);
        assert!(store.has_chunk(&d).unwrap());
        assert!(!db.contains_durable(&both, &d.0).unwrap());
        // One family on disk, the other still in a memtable.
        db.flush(&[Cf::ChunkIndex]).unwrap();
        assert!(!db.contains_durable(&both, &d.0).unwrap());
        db.flush(&[Cf::Chunks]).unwrap();
        assert!(db.contains_durable(&both, &d.0).unwrap());
        // Deleted (as GC does, synced) while the old value is still on disk.
        let mut b = Batch::new();
        b.delete(db, Cf::ChunkIndex, &d.0);
        b.delete(db, Cf::Chunks, &d.0);
        db.write(b, true).unwrap();
        assert!(!db.contains_durable(&both, &d.0).unwrap());
        // Written again unlogged over the on-disk copy's tombstone.
        put(true);
        assert!(!db.contains_durable(&both, &d.0).unwrap());
        db.flush(&both).unwrap();
        assert!(db.contains_durable(&both, &d.0).unwrap());
    }
}
