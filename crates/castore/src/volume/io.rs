//! Byte-granular access to a volume, for an NBD server: read, write (with FUA), write
//! zeroes, trim, flush and block status, through [`Volume`] handles.
//!
//! Every change is staged extent by extent into one batch ([`Volume::commit`]): whole
//! extents directly, partial ones read-modify-written under their extent locks. That
//! batch is the seam for the journal the NBD benchmark will need: small writes would be
//! appended to a journal there and coalesced into extents later, instead of rewriting a
//! whole extent per request.
//!
//! Durability: batches go through RocksDB's write-ahead log. A write acknowledged with
//! `fua`, and every write acknowledged before a [`Volume::flush`] returns, survives a
//! crash (the WAL is fsynced, and it is ordered, so a sync covers all earlier writes).

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::sync::{Arc, MutexGuard, RwLockReadGuard};

use super::record::{Extent, ZERO_MARKER, key};
use super::{Level, Shared, State, VolumeError, extents};
use crate::Digest;
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
    Bytes(Cow<'a, [u8]>),
}

/// What [`Volume::modify`] writes.
#[derive(Clone, Copy)]
enum Fill<'a> {
    Data(&'a [u8]),
    Zeroes,
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

fn is_zero(b: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; align_to only reinterprets the
        // aligned middle of the slice.
        unsafe { b.align_to::<u64>() }
    };
    head.iter().all(|&x| x == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&x| x == 0)
}

/// Stages extent `e`'s new content at `generation` into `b`: a zero marker, or the
/// chunk (written only if the store lacks it durably) and its digest. `claims` keeps the
/// chunk from a concurrent GC until the batch is written.
fn stage(
    store: &Store,
    claims: &ClaimSet<'_>,
    b: &mut Batch,
    id: u64,
    e: u64,
    generation: u64,
    content: &Content<'_>,
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
                let stored = COMPRESSOR.with_borrow_mut(|zc| Store::encode_chunk(zc, buf));
                Store::put_chunk(b, db, &d, buf.len(), &stored);
            }
            b.put(db, Cf::BlockMap, &k, &d.0);
        }
        _ => b.put(db, Cf::BlockMap, &k, ZERO_MARKER),
    }
    Ok(())
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
            Extent::Chunk(_) => b.put(&store.db, Cf::BlockMap, &key(id, e, cur), ZERO_MARKER),
            Extent::Zero => b.delete(&store.db, Cf::BlockMap, &key(id, e, cur)),
        }
    }
    if !new_size.is_multiple_of(es) {
        let e = new_size >> shift;
        if let Extent::Chunk(d) = lookup(&mut cursor, &now, e, shift)? {
            let mut buf = store.volumes.cache.chunk(store, &d)?.as_ref().clone();
            let keep = (new_size - (e << shift)) as usize;
            buf[keep..].fill(0);
            stage(
                store,
                &claims,
                b,
                id,
                e,
                cur,
                &Content::Bytes(Cow::Owned(buf)),
            )?;
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

    /// The bytes of extent `e`, or None when it reads as zeros.
    fn extent(
        &self,
        cursor: &mut Cursor<'_>,
        v: &View<'_>,
        e: u64,
    ) -> Result<Option<Arc<Vec<u8>>>> {
        match lookup(cursor, &v.levels, e, v.shift)? {
            Extent::Zero => Ok(None),
            Extent::Chunk(d) => {
                let data = self.store.volumes.cache.chunk(&self.store, &d)?;
                if data.len() as u64 != 1u64 << v.shift {
                    return Err(Error::Corrupt {
                        kind: ObjectKind::Chunk,
                        digest: d,
                    }
                    .context(format!(
                        "volume {}: extent {e} has the wrong size",
                        self.name
                    )));
                }
                Ok(Some(data))
            }
        }
    }

    /// Reads `buf.len()` bytes at `offset`. Every chunk is verified on its way in.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let v = self.view()?;
        self.check_range(&v, offset, buf.len() as u64)?;
        let mut cursor = self.store.db.cursor(Cf::BlockMap, None, None);
        let es = 1u64 << v.shift;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let e = pos >> v.shift;
            let within = (pos - (e << v.shift)) as usize;
            let n = (buf.len() - done).min(es as usize - within);
            let out = &mut buf[done..done + n];
            match self.extent(&mut cursor, &v, e)? {
                None => out.fill(0),
                Some(data) => out.copy_from_slice(&data[within..within + n]),
            }
            done += n;
        }
        Ok(())
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
        self.modify(offset, len, Fill::Zeroes, fua)
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

    fn lock_stripes(&self, e0: u64, e1: u64) -> Vec<MutexGuard<'_, ()>> {
        let n = self.shared.stripes.len() as u64;
        // Stripes are taken in index order, so two multi-extent writes cannot deadlock.
        let set: BTreeSet<usize> = if e1 - e0 + 1 >= n {
            (0..n as usize).collect()
        } else {
            (e0..=e1).map(|e| (e % n) as usize).collect()
        };
        set.into_iter()
            .map(|i| self.shared.stripes[i].lock().expect("extent lock"))
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
        let shift = v.shift;
        let es = 1u64 << shift;
        let (e0, e1) = (offset >> shift, (offset + len - 1) >> shift);
        let _locks = self.lock_stripes(e0, e1);
        let mut cursor = self.store.db.cursor(Cf::BlockMap, None, None);
        let mut updates: Vec<(u64, Content<'_>)> = Vec::new();
        for e in e0..=e1 {
            let start = e << shift;
            let lo = offset.max(start);
            let hi = (offset + len).min(start + es);
            // Covers every byte of the extent that lies inside the volume.
            let whole = lo == start && hi >= (start + es).min(v.size);
            let range = (lo - start) as usize..(hi - start) as usize;
            match fill {
                Fill::Data(data) => {
                    let src = &data[(lo - offset) as usize..(hi - offset) as usize];
                    if lo == start && hi == start + es {
                        updates.push((e, Content::Bytes(Cow::Borrowed(src))));
                    } else {
                        let mut buf = match self.extent(&mut cursor, &v, e)? {
                            Some(d) => d.as_ref().clone(),
                            None => vec![0; es as usize],
                        };
                        buf[range].copy_from_slice(src);
                        updates.push((e, Content::Bytes(Cow::Owned(buf))));
                    }
                }
                Fill::Zeroes | Fill::Trim if whole => {
                    if lookup(&mut cursor, &v.levels, e, shift)? != Extent::Zero {
                        updates.push((e, Content::Zero));
                    }
                }
                Fill::Zeroes => {
                    if let Some(d) = self.extent(&mut cursor, &v, e)? {
                        let mut buf = d.as_ref().clone();
                        buf[range].fill(0);
                        updates.push((e, Content::Bytes(Cow::Owned(buf))));
                    }
                }
                Fill::Trim => {}
            }
        }
        drop(cursor);
        self.commit(&v, &updates, fua)
    }

    /// Writes new extent contents at the current generation in one batch (the seam for
    /// a small-write journal; see the module comment).
    fn commit(&self, v: &View<'_>, updates: &[(u64, Content<'_>)], fua: bool) -> Result<()> {
        let store = &*self.store;
        let claims = store.claims();
        let mut b = Batch::new();
        let generation = v.st.rec.generation;
        for (e, content) in updates {
            stage(
                store,
                &claims,
                &mut b,
                self.shared.id,
                *e,
                generation,
                content,
            )?;
        }
        if b.is_empty() {
            if fua {
                store.db.sync_wal()?;
            }
            return Ok(());
        }
        store.db.write(b, fua)?;
        drop(claims);
        Ok(())
    }

    /// Which bytes of `[offset, offset + len)` hold data and which read as zeros, as
    /// runs in order. Covers at least the first extent touched, and at most
    /// [`BLOCK_STATUS_MAX_EXTENTS`] extents: the answer may be shorter than asked.
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
        let mut cursor = self.store.db.cursor(Cf::BlockMap, None, None);
        let mut pos = offset;
        let mut examined = 0;
        while pos < end && examined < BLOCK_STATUS_MAX_EXTENTS {
            let e = pos >> shift;
            let n = end.min((e << shift) + es) - pos;
            let data = matches!(lookup(&mut cursor, &v.levels, e, shift)?, Extent::Chunk(_));
            match out.last_mut() {
                Some(last) if last.allocated == data => last.len += n,
                _ => out.push(BlockStatus {
                    len: n,
                    allocated: data,
                    zero: !data,
                }),
            }
            pos += n;
            examined += 1;
        }
        Ok(out)
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
