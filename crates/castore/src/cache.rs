//! The host store as a cache of its chunk tier: a limit on the bytes of chunks it keeps
//! ([`Store::set_cache_limit`]) and [`Store::evict`], which removes the least recently
//! used chunks the tier holds until the store is under it.
//!
//! What may go: a chunk the `tiered` family says the tier holds (this host pushed it or
//! fetched it from there), that no volume's block map names (volumes are local-only: their
//! data must be readable without the tier), that no import or volume write in flight has
//! claimed. Everything else is pinned. An evicted chunk loses its `chunks` and
//! `chunk_index` entries and keeps its `tiered` mark, so the next read fetches it again.
//!
//! Recency: reads note the time a chunk was used in memory (only while a limit is set);
//! each eviction pass orders candidates by that, or by the time kept in the chunk's
//! `tiered` value (when it was fetched, pushed, or last seen used by an earlier pass),
//! and writes the times of the survivors back there, so the order outlives a restart.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::Digest;
use crate::db::{Batch, Cf};
use crate::error::Result;
use crate::store::Store;
use crate::tier::{CHUNK_MARK, tiered_chunk_key};

/// An eviction pass stops once the store holds this share of its limit (in percent), so
/// that it does not run again for the next chunk fetched.
const LOW_WATER_PERCENT: u64 = 80;

/// The share of blob files (oldest first) an eviction pass rewrites.
const RECLAIM_SHARE: f64 = 0.25;

/// Chunks deleted per batch (each batch under the claim lock, as GC's sweep).
const EVICT_BATCH: usize = 1024;

/// The cache's limit and what it has evicted.
#[derive(Debug, Default)]
pub(crate) struct CacheState {
    /// Bytes of stored chunks to keep at most; 0: no limit.
    limit: AtomicU64,
    /// Chunks read since the last eviction pass, and when (ms since the epoch).
    used: Mutex<HashMap<Digest, u64>>,
    evicted_chunks: AtomicU64,
    evicted_bytes: AtomicU64,
    /// Serializes eviction passes.
    pass: Mutex<()>,
}

/// What one eviction pass found and did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EvictReport {
    /// The limit it enforced.
    pub limit: u64,
    /// Stored bytes of the chunks this store held before the pass.
    pub local_bytes: u64,
    /// Of those, bytes that could have been evicted (in the tier, no volume's).
    pub evictable_bytes: u64,
    /// Chunks evicted.
    pub evicted_chunks: u64,
    /// Their stored bytes.
    pub evicted_bytes: u64,
    /// Stored bytes the store still holds.
    pub remaining_bytes: u64,
    /// How long the pass took (listing, deleting, compacting).
    pub seconds: f64,
}

impl EvictReport {
    /// Whether pinned chunks alone keep the store over its limit.
    pub fn over_limit(&self) -> bool {
        self.limit > 0 && self.remaining_bytes > self.limit
    }
}

/// Milliseconds since the epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A `tiered` value: when the object was last known used (ms), or 0 (empty: written
/// before values held times).
pub(crate) fn mark_time(v: &[u8]) -> u64 {
    <[u8; 8]>::try_from(v).map_or(0, u64::from_be_bytes)
}

impl Store {
    /// Limits the stored bytes of chunks this store keeps to `bytes` (None: no limit).
    /// [`Store::evict`] enforces it; volumed runs it in the background.
    pub fn set_cache_limit(&self, bytes: Option<u64>) {
        self.cache
            .limit
            .store(bytes.unwrap_or(0), Ordering::Relaxed);
    }

    /// The limit set by [`Store::set_cache_limit`].
    pub fn cache_limit(&self) -> Option<u64> {
        match self.cache.limit.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    /// Chunks and stored bytes evicted since the store was opened.
    pub fn evicted(&self) -> (u64, u64) {
        (
            self.cache.evicted_chunks.load(Ordering::Relaxed),
            self.cache.evicted_bytes.load(Ordering::Relaxed),
        )
    }

    /// Notes that chunk `d` was just read (for the eviction order). Costs an atomic load
    /// when no limit is set.
    pub(crate) fn touch(&self, d: &Digest) {
        if self.cache.limit.load(Ordering::Relaxed) != 0 {
            self.cache
                .used
                .lock()
                .expect("cache lock")
                .insert(*d, now_ms());
        }
    }

    /// Evicts least recently used chunks that the tier holds until the store's chunks
    /// take at most [`LOW_WATER_PERCENT`] of its limit, or until only pinned ones are
    /// left. Does nothing without a limit or while the store is under it. Safe while
    /// anything else runs: a chunk evicted under a reader is fetched again.
    pub fn evict(&self) -> Result<EvictReport> {
        let start = Instant::now();
        let _pass = self.cache.pass.lock().expect("cache pass lock");
        let Some(limit) = self.cache_limit() else {
            return Ok(EvictReport::default());
        };
        let mut report = EvictReport {
            limit,
            ..EvictReport::default()
        };
        let mut sizes: HashMap<Digest, u64> = HashMap::new();
        for kv in self.db.entries(Cf::ChunkIndex) {
            let (k, v) = kv?;
            if let (Some(d), Some((_, stored))) = (Digest::from_slice(&k), Store::chunk_sizes(&v)) {
                report.local_bytes += stored;
                sizes.insert(d, stored);
            }
        }
        report.remaining_bytes = report.local_bytes;
        let used = std::mem::take(&mut *self.cache.used.lock().expect("cache lock"));
        if report.local_bytes <= limit {
            self.save_used(&used)?;
            report.seconds = start.elapsed().as_secs_f64();
            return Ok(report);
        }
        let mut pinned = HashSet::new();
        self.volume_chunks(|d| {
            pinned.insert(d);
        })?;
        // (last used, digest, stored bytes), oldest first.
        let mut candidates = Vec::new();
        for kv in self.db.entries(Cf::Tiered) {
            let (k, v) = kv?;
            if k.first() != Some(&CHUNK_MARK) {
                continue;
            }
            let Some(d) = Digest::from_slice(&k[1..]) else {
                continue;
            };
            let Some(&stored) = sizes.get(&d) else {
                continue;
            };
            if pinned.contains(&d) {
                continue;
            }
            let t = used.get(&d).copied().unwrap_or(0).max(mark_time(&v));
            candidates.push((t, d, stored));
            report.evictable_bytes += stored;
        }
        candidates.sort_unstable();
        let target = limit / 100 * LOW_WATER_PERCENT;
        let mut evicted = HashSet::new();
        let mut queue = candidates.iter().peekable();
        while report.remaining_bytes > target && queue.peek().is_some() {
            // Claims are checked and the deletion committed under the lock an import or a
            // volume write takes to claim, as GC's sweep does.
            let live = self.live.lock().expect("live lock");
            let mut batch = Batch::new();
            let mut n = 0;
            while report.remaining_bytes > target && n < EVICT_BATCH {
                let Some(&(_, d, stored)) = queue.next() else {
                    break;
                };
                if live.holds(&d) {
                    continue;
                }
                batch.delete(&self.db, Cf::ChunkIndex, &d.0);
                batch.delete(&self.db, Cf::Chunks, &d.0);
                report.remaining_bytes -= stored;
                report.evicted_bytes += stored;
                report.evicted_chunks += 1;
                evicted.insert(d);
                n += 1;
            }
            // A cache: a crash may bring an evicted chunk back, never lose one the tier
            // lacks, since only tiered chunks are deleted.
            self.db.write(batch, false)?;
            drop(live);
        }
        let survivors: HashMap<Digest, u64> = used
            .into_iter()
            .filter(|(d, _)| !evicted.contains(d))
            .collect();
        self.save_used(&survivors)?;
        if report.evicted_chunks > 0 {
            self.bump_changes();
            self.cache
                .evicted_chunks
                .fetch_add(report.evicted_chunks, Ordering::Relaxed);
            self.cache
                .evicted_bytes
                .fetch_add(report.evicted_bytes, Ordering::Relaxed);
            // Give the space back now: deleted values in blob files stay on disk until
            // blob garbage collection rewrites them. Only the oldest quarter of the blob
            // files is rewritten per pass (where least recently used chunks mostly are);
            // space held in newer ones comes back in later passes or at GC.
            self.db.reclaim_oldest(Cf::Chunks, RECLAIM_SHARE)?;
            self.db.reclaim(Cf::ChunkIndex)?;
        }
        report.seconds = start.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Writes the read times of tiered chunks into their `tiered` values.
    fn save_used(&self, used: &HashMap<Digest, u64>) -> Result<()> {
        let mut batch = Batch::new();
        for (d, t) in used {
            let key = tiered_chunk_key(d);
            if self.db.contains(Cf::Tiered, &key)? {
                batch.put(&self.db, Cf::Tiered, &key, &t.to_be_bytes());
            }
            if batch.size_in_bytes() >= 1 << 20 {
                self.db.write(std::mem::take(&mut batch), false)?;
            }
        }
        if !batch.is_empty() {
            self.db.write(batch, false)?;
        }
        Ok(())
    }
}
