//! Garbage collection: mark everything reachable from the roots, sweep the rest.
//!
//! Roots: image references, layers imported on their own, every chunk a volume block map
//! names (volumes, their snapshots and the snapshots clones read through), digests pinned
//! by callers (live mounts, through [`GcRoots`]), and the claims of imports and volume
//! writes in flight. The sweep deletes top-down (images, layers, trees, blobs,
//! then chunks), each step a synced batch, so a crash at any point leaves no surviving
//! object pointing at a deleted one.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::Digest;
use crate::db::{Batch, Cf};
use crate::error::{ObjectKind, Result};
use crate::model::{FileData, Kind, Segment};
use crate::store::Store;

/// Extra roots supplied by the caller: trees, images, layers, blobs or chunks in use
/// elsewhere (e.g. a live mount's image). Volumes need none: GC reads block maps itself.
#[derive(Debug, Default, Clone)]
pub struct GcRoots {
    /// Images kept with everything below them.
    pub images: Vec<Digest>,
    /// Layers kept with everything below them.
    pub layers: Vec<Digest>,
    /// Chunks kept (e.g. volume extents).
    pub chunks: Vec<Digest>,
}

/// Live counters of a GC, for a progress display.
#[derive(Debug, Default)]
pub struct GcProgress {
    /// Objects marked reachable so far.
    pub marked: AtomicU64,
    /// Objects deleted so far.
    pub swept: AtomicU64,
}

/// What a GC removed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    /// Reachable objects.
    pub kept: u64,
    /// Images deleted.
    pub images: u64,
    /// Layers deleted.
    pub layers: u64,
    /// Trees deleted.
    pub trees: u64,
    /// Blobs deleted.
    pub blobs: u64,
    /// Chunks deleted.
    pub chunks: u64,
    /// Stored (compressed) bytes of the deleted chunks.
    pub freed_bytes: u64,
}

const SWEEP_BATCH: usize = 4096;

struct Marker<'s> {
    store: &'s Store,
    seen: HashSet<Digest>,
    progress: &'s GcProgress,
}

impl Marker<'_> {
    fn first(&mut self, d: Digest) -> bool {
        let new = self.seen.insert(d);
        if new {
            self.progress.marked.fetch_add(1, Ordering::Relaxed);
        }
        new
    }

    fn image(&mut self, d: Digest) -> Result<()> {
        if !self.first(d) {
            return Ok(());
        }
        for l in self.store.image(&d)?.layers {
            self.layer(l)?;
        }
        Ok(())
    }

    fn layer(&mut self, d: Digest) -> Result<()> {
        if !self.first(d) {
            return Ok(());
        }
        let l = self.store.layer(&d)?;
        self.tree(l.root_tree())
    }

    fn tree(&mut self, d: Digest) -> Result<()> {
        let (store, progress) = (self.store, self.progress);
        store.walk_tree(d, &mut self.seen, &mut |_, _| {
            progress.marked.fetch_add(1, Ordering::Relaxed);
        })
    }
}

impl Store {
    /// Walks tree `root` and everything below it, calling `visit` once for each tree,
    /// blob and chunk not yet in `seen` (adding it there): a tree as it is entered, a
    /// file's blob and then its chunks as the file is met. A missing or broken record
    /// is an error. GC's mark phase and the tier's image walk share it.
    pub(crate) fn walk_tree(
        &self,
        root: Digest,
        seen: &mut HashSet<Digest>,
        visit: &mut dyn FnMut(ObjectKind, Digest),
    ) -> Result<()> {
        let mut stack = vec![root];
        while let Some(d) = stack.pop() {
            if !seen.insert(d) {
                continue;
            }
            visit(ObjectKind::Tree, d);
            for e in self.tree(&d)?.entries {
                match e.kind {
                    Kind::Dir { tree, .. } => stack.push(tree),
                    Kind::File {
                        data: FileData::Chunk(c),
                        ..
                    } if seen.insert(c) => visit(ObjectKind::Chunk, c),
                    Kind::File {
                        data: FileData::Blob(b),
                        ..
                    } if seen.insert(b) => {
                        visit(ObjectKind::Blob, b);
                        for s in self.blob(&b)?.segments {
                            if let Segment::Data { chunk, .. } = s
                                && seen.insert(chunk)
                            {
                                visit(ObjectKind::Chunk, chunk);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Collects garbage. Safe to run while imports are in progress: whatever they have
    /// stored or found stored is kept.
    pub fn gc(&self, roots: &GcRoots, progress: &GcProgress) -> Result<GcReport> {
        self.gc_with(|| roots.clone(), progress)
    }

    /// Like [`Store::gc`], with the caller's roots read by `roots` *after* the store's
    /// own names. A caller that resolves a name and pins the result as a root atomically
    /// with respect to `roots` (under one lock) can then never lose what it pinned: either
    /// the pin is seen, or the name was still there when GC read the names.
    pub fn gc_with(
        &self,
        roots: impl FnOnce() -> GcRoots,
        progress: &GcProgress,
    ) -> Result<GcReport> {
        // From here on, imports that finish hand their claims to us instead of dropping
        // them, because their references may be written after we read the references.
        let _guard = GcGuard::start(self)?;
        let mut m = Marker {
            store: self,
            seen: HashSet::new(),
            progress,
        };
        let names: Vec<Digest> = self.refs()?.into_iter().map(|(_, d)| d).collect();
        let lone = self.layer_refs()?;
        let roots = roots();
        for d in names {
            m.image(d)?;
        }
        for d in lone {
            m.layer(d)?;
        }
        for d in &roots.images {
            m.image(*d)?;
        }
        for d in &roots.layers {
            m.layer(*d)?;
        }
        for d in &roots.chunks {
            m.first(*d);
        }
        // Volume writes hold claims until their block map entries are written, so an
        // entry written after this scan is protected the way an import's names are.
        self.volume_chunks(|d| {
            m.first(d);
        })?;
        let reachable = m.seen;
        let mut report = GcReport {
            kept: reachable.len() as u64,
            ..GcReport::default()
        };
        for cf in [Cf::Images, Cf::Layers, Cf::Trees, Cf::Blobs, Cf::ChunkIndex] {
            let count = self.sweep(cf, &reachable, progress, &mut report)?;
            match cf {
                Cf::Images => report.images = count,
                Cf::Layers => report.layers = count,
                Cf::Trees => report.trees = count,
                Cf::Blobs => report.blobs = count,
                _ => report.chunks = count,
            }
        }
        self.bump_changes();
        let moved = self.reclaim_log()?;
        if report.chunks > 0 || moved > 0 {
            // Give the space of deleted chunk values back now rather than at some later
            // compaction.
            self.db.reclaim(Cf::Chunks)?;
            self.db.reclaim(Cf::ChunkIndex)?;
        }
        Ok(report)
    }

    fn sweep(
        &self,
        cf: Cf,
        reachable: &HashSet<Digest>,
        progress: &GcProgress,
        report: &mut GcReport,
    ) -> Result<u64> {
        let mut candidates: Vec<(Digest, u64)> = Vec::new();
        let mut deleted = 0;
        let mut flush =
            |candidates: &mut Vec<(Digest, u64)>, report: &mut GcReport| -> Result<()> {
                if candidates.is_empty() {
                    return Ok(());
                }
                // Claims are checked and the deletion committed under the same lock an import
                // takes to claim: a digest claimed before this point is kept; one claimed
                // after sees it gone and is written again.
                let live = self.live.lock().expect("live lock");
                let mut batch = Batch::new();
                for (d, stored) in candidates.drain(..) {
                    if live.holds(&d) {
                        continue;
                    }
                    batch.delete(&self.db, cf, &d.0);
                    if cf == Cf::ChunkIndex {
                        batch.delete(&self.db, Cf::Chunks, &d.0);
                        report.freed_bytes += stored;
                    }
                    deleted += 1;
                    progress.swept.fetch_add(1, Ordering::Relaxed);
                }
                self.db.write(batch, true)?;
                drop(live);
                Ok(())
            };
        for kv in self.db.entries(cf) {
            let (k, v) = kv?;
            let Some(d) = Digest::from_slice(&k) else {
                continue;
            };
            if reachable.contains(&d) {
                continue;
            }
            let stored = if cf == Cf::ChunkIndex {
                Store::chunk_sizes(&v).map_or(0, |(_, s)| s)
            } else {
                0
            };
            candidates.push((d, stored));
            if candidates.len() >= SWEEP_BATCH {
                flush(&mut candidates, report)?;
            }
        }
        flush(&mut candidates, report)?;
        Ok(deleted)
    }
}

impl Store {
    /// Gives back the chunk log's dead space: removes sealed segments no chunk lives in,
    /// and moves the live chunks of segments less than half live into RocksDB (verified,
    /// in synced batches) before removing those too. Returns the bytes moved.
    fn reclaim_log(&self) -> Result<u64> {
        // From here on no pointer into a sealed segment can appear: the index says all.
        let first_open = self.log.seal();
        let sealed: Vec<(u64, u64)> = self
            .log
            .segments()?
            .into_iter()
            .filter(|&(s, _)| s < first_open)
            .collect();
        if sealed.is_empty() {
            return Ok(0);
        }
        let mut moved = 0;
        let mut live: HashMap<u64, (u64, Vec<Digest>)> = HashMap::new();
        for kv in self.db.entries(Cf::ChunkIndex) {
            let (k, v) = kv?;
            if let (Some(d), Some((_, stored, Some(seg)))) =
                (Digest::from_slice(&k), Store::chunk_entry(&v))
            {
                let e = live.entry(seg).or_default();
                e.0 += crate::chunklog::padded(stored);
                e.1.push(d);
            }
        }
        for (seg, len) in sealed {
            let (bytes, digests) = live.remove(&seg).unwrap_or_default();
            if bytes > 0 && bytes * 2 >= len {
                continue;
            }
            let mut batch = Batch::new();
            for d in digests {
                let (raw_len, stored) = self.chunk_stored(&d)?;
                moved += stored.len() as u64 - 1;
                Store::put_chunk(&mut batch, &self.db, &d, raw_len, &stored);
                if batch.size_in_bytes() >= MOVE_BATCH_BYTES {
                    self.db.write(std::mem::take(&mut batch), true)?;
                }
            }
            if !batch.is_empty() {
                self.db.write(batch, true)?;
            }
            self.log.remove(seg)?;
        }
        Ok(moved)
    }
}

/// Moved chunks are written in synced batches of about this size.
const MOVE_BATCH_BYTES: usize = 32 << 20;

/// Marks a GC as running for the duration of a collection.
struct GcGuard<'s> {
    store: &'s Store,
}

impl<'s> GcGuard<'s> {
    fn start(store: &'s Store) -> Result<GcGuard<'s>> {
        let mut live = store.live.lock().expect("live lock");
        if live.gc_extra.is_some() {
            return Err(crate::Error::Refused(
                "a garbage collection is already running".into(),
            ));
        }
        live.gc_extra = Some(HashSet::new());
        Ok(GcGuard { store })
    }
}

impl Drop for GcGuard<'_> {
    fn drop(&mut self) {
        self.store.live.lock().expect("live lock").gc_extra = None;
    }
}
