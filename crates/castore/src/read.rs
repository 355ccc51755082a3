//! Random-access reads of stored files, for front ends that serve `read(offset, len)`
//! (FUSE, NBD) instead of streaming whole files.
//!
//! A [`FileLayout`] maps a file's byte offsets to its chunks and holes once (one blob
//! record read), and a [`ChunkCache`] keeps recently used chunks decompressed so that a
//! sequential reader asking for 128 KiB at a time does not decompress and re-hash the same
//! 64 KiB..256 KiB chunk several times. Every chunk still comes from [`Store::chunk`], so
//! every byte handed out was verified against its digest when it entered the cache.
//! Whole-file digests cannot be checked by random reads; chunk digests are.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::Digest;
use crate::error::Result;
use crate::model::{FileData, Segment};
use crate::store::Store;

/// Default capacity of a [`ChunkCache`]: enough for a few readers streaming at once.
pub const DEFAULT_CHUNK_CACHE_BYTES: usize = 64 << 20;

/// A small LRU of decompressed, verified chunks, shared by threads.
///
/// Fetches are deduplicated: while one thread reads a chunk from the store, others asking
/// for the same chunk wait for that read instead of issuing their own. This is what lets
/// a [`Prefetcher`] run ahead of readers: a reader that catches up with a chunk still in
/// flight waits for it rather than reading it a second time.
#[derive(Debug)]
pub struct ChunkCache {
    capacity: AtomicUsize,
    inner: Mutex<Lru>,
}

#[derive(Debug, Default)]
struct Lru {
    bytes: usize,
    tick: u64,
    map: HashMap<Digest, (Arc<Vec<u8>>, u64)>,
    /// Last-use tick → digest; the smallest tick is evicted first.
    order: BTreeMap<u64, Digest>,
    /// Chunks being read from the store right now.
    inflight: HashMap<Digest, Arc<Fetch>>,
}

/// One fetch in flight; waiters block on `cv` until `done`.
#[derive(Debug, Default)]
struct Fetch {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Fetch {
    fn wait(&self) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            done = self.cv.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Ends a fetch (also when the fetching thread panics): removes it from the in-flight map
/// and wakes its waiters, who then find the chunk cached or fetch it themselves.
struct FetchGuard<'a> {
    cache: &'a ChunkCache,
    digest: Digest,
    fetch: Arc<Fetch>,
}

impl Drop for FetchGuard<'_> {
    fn drop(&mut self) {
        self.cache.lock().inflight.remove(&self.digest);
        *self.fetch.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.fetch.cv.notify_all();
    }
}

impl ChunkCache {
    /// A cache holding up to `capacity` bytes of decompressed chunks.
    pub fn new(capacity: usize) -> ChunkCache {
        ChunkCache {
            capacity: AtomicUsize::new(capacity),
            inner: Mutex::new(Lru::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    /// Changes the capacity; a smaller one is enforced at the next insertion.
    pub fn set_capacity(&self, bytes: usize) {
        self.capacity.store(bytes, Ordering::Relaxed);
    }

    /// Bytes currently cached.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Whether `d` is cached or being fetched (without counting as a use).
    pub fn contains(&self, d: &Digest) -> bool {
        let lru = self.lock();
        lru.map.contains_key(d) || lru.inflight.contains_key(d)
    }

    /// The chunk `d`, from the cache or read (and verified) from `store`. If another
    /// thread is reading `d` already, waits for that read.
    pub fn chunk(&self, store: &Store, d: &Digest) -> Result<Arc<Vec<u8>>> {
        let guard = loop {
            if let Some(data) = self.get_cached(d) {
                store.touch(d);
                return Ok(data);
            }
            let mut lru = self.lock();
            // Fetched between the two locks: look once more.
            if lru.map.contains_key(d) {
                continue;
            }
            if let Some(f) = lru.inflight.get(d) {
                let f = f.clone();
                drop(lru);
                // Then look again: normally it is cached now; if that fetch failed (or the
                // chunk does not fit), this thread fetches it and sees the error itself.
                f.wait();
                continue;
            }
            let fetch = Arc::new(Fetch::default());
            lru.inflight.insert(*d, fetch.clone());
            break FetchGuard {
                cache: self,
                digest: *d,
                fetch,
            };
        };
        // Decompress outside the lock so that readers of other chunks are not held up.
        let data = Arc::new(store.chunk(d)?);
        self.insert(d, &data);
        drop(guard);
        Ok(data)
    }

    /// The chunk `d` if it is cached (counts as a use); never reads the store.
    pub(crate) fn get_cached(&self, d: &Digest) -> Option<Arc<Vec<u8>>> {
        let mut lru = self.lock();
        lru.tick += 1;
        let tick = lru.tick;
        let (data, used) = lru.map.get_mut(d)?;
        let old = std::mem::replace(used, tick);
        let data = data.clone();
        lru.order.remove(&old);
        lru.order.insert(tick, *d);
        Some(data)
    }

    /// Adds `data`, which the caller knows hashes to `d` (it just computed the digest),
    /// so that reading back what was just written finds it decompressed.
    pub(crate) fn insert_known(&self, d: &Digest, data: Vec<u8>) {
        self.insert(d, &Arc::new(data));
    }

    fn insert(&self, d: &Digest, data: &Arc<Vec<u8>>) {
        let mut lru = self.lock();
        let capacity = self.capacity();
        if data.len() > capacity || lru.map.contains_key(d) {
            return;
        }
        lru.tick += 1;
        let tick = lru.tick;
        lru.bytes += data.len();
        lru.map.insert(*d, (data.clone(), tick));
        lru.order.insert(tick, *d);
        while lru.bytes > capacity {
            let Some((_, victim)) = lru.order.pop_first() else {
                break;
            };
            if let Some((v, _)) = lru.map.remove(&victim) {
                lru.bytes -= v.len();
            }
        }
    }
}

/// Background chunk fetches into a [`ChunkCache`]: a fixed pool of threads reading from a
/// bounded queue, so that a sequential reader finds the chunks ahead of it already
/// decompressed and verified (every chunk still comes through [`Store::chunk`]), and the
/// chunks one large read spans are fetched several at a time.
///
/// [`Prefetcher::request`] never blocks: when the queue is full the request is dropped
/// (the reader fetches the chunk itself when it gets there). Errors are dropped too; the
/// reader meets them on its own fetch, with its own context. Dropping the prefetcher
/// stops and joins its threads, so the store is released with it.
#[derive(Debug)]
pub struct Prefetcher {
    tx: Option<crossbeam_channel::Sender<Digest>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Prefetcher {
    /// `threads` fetchers (at least one) behind a queue of `queue` chunks.
    pub fn new(
        store: Arc<Store>,
        cache: Arc<ChunkCache>,
        threads: usize,
        queue: usize,
    ) -> std::io::Result<Prefetcher> {
        let (tx, rx) = crossbeam_channel::bounded::<Digest>(queue.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let (rx, store, cache, halt) = (rx.clone(), store.clone(), cache.clone(), stop.clone());
            let h = std::thread::Builder::new()
                .name(format!("prefetch-{i}"))
                .spawn(move || {
                    for d in rx {
                        if halt.load(Ordering::Relaxed) {
                            break;
                        }
                        if !cache.contains(&d) {
                            let _ = cache.chunk(&store, &d);
                        }
                    }
                });
            match h {
                Ok(h) => handles.push(h),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    drop(tx);
                    for h in handles {
                        let _ = h.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(Prefetcher {
            tx: Some(tx),
            stop,
            threads: handles,
        })
    }

    /// Asks for `d` to be fetched into the cache; false if the queue was full.
    pub fn request(&self, d: &Digest) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.try_send(*d).is_ok())
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.tx = None;
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

impl Default for ChunkCache {
    fn default() -> ChunkCache {
        ChunkCache::new(DEFAULT_CHUNK_CACHE_BYTES)
    }
}

/// Where a file's bytes are, by offset: resolved once per file, then read at will.
#[derive(Debug, Clone)]
pub enum FileLayout {
    /// Bytes kept in the tree entry (already verified with the tree record).
    Inline(Arc<Vec<u8>>),
    /// Pieces in order, each with its starting offset.
    Segments(Arc<Vec<(u64, Segment)>>),
}

impl Store {
    /// Resolves a file's content into a [`FileLayout`] (reads the blob record, if any).
    pub fn file_layout(&self, data: &FileData, size: u64) -> Result<FileLayout> {
        Ok(match data {
            FileData::Inline(b) => FileLayout::Inline(Arc::new(b.clone())),
            FileData::Chunk(d) => {
                let len = u32::try_from(size).unwrap_or(u32::MAX);
                FileLayout::Segments(Arc::new(vec![(0, Segment::Data { chunk: *d, len })]))
            }
            FileData::Blob(d) => {
                let blob = self.blob(d)?;
                let mut off = 0;
                let mut segs = Vec::with_capacity(blob.segments.len());
                for s in blob.segments {
                    segs.push((off, s));
                    off += s.len();
                }
                FileLayout::Segments(Arc::new(segs))
            }
        })
    }
}

impl FileLayout {
    /// Total length in bytes.
    pub fn size(&self) -> u64 {
        match self {
            FileLayout::Inline(b) => b.len() as u64,
            FileLayout::Segments(s) => s.last().map(|(o, s)| o + s.len()).unwrap_or(0),
        }
    }

    /// Bytes that are stored (not holes): what `st_blocks` should count.
    pub fn allocated(&self) -> u64 {
        match self {
            FileLayout::Inline(b) => b.len() as u64,
            FileLayout::Segments(s) => s
                .iter()
                .filter(|(_, s)| matches!(s, Segment::Data { .. }))
                .map(|(_, s)| s.len())
                .sum(),
        }
    }

    /// Index of the segment holding `offset` (which must be below the size).
    fn find(segs: &[(u64, Segment)], offset: u64) -> usize {
        segs.partition_point(|(o, _)| *o <= offset)
            .saturating_sub(1)
    }

    /// Fills `buf` from `offset`; returns how many bytes were read (short only at the end
    /// of the file). Chunks come through `cache`, verified.
    pub fn read_at(
        &self,
        store: &Store,
        cache: &ChunkCache,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        self.read_at_with(store, cache, None, offset, buf)
    }

    /// The data chunks holding any byte of `start..end`, in file order.
    pub fn chunks_in(&self, start: u64, end: u64) -> Vec<Digest> {
        let FileLayout::Segments(segs) = self else {
            return Vec::new();
        };
        let end = end.min(self.size());
        if start >= end {
            return Vec::new();
        }
        segs[Self::find(segs, start)..]
            .iter()
            .take_while(|(o, _)| *o < end)
            .filter_map(|(_, s)| match s {
                Segment::Data { chunk, .. } => Some(*chunk),
                Segment::Hole { .. } => None,
            })
            .collect()
    }

    /// [`FileLayout::read_at`], with the chunks after the first that the read spans (and
    /// that are not cached) handed to `prefetch` first, so they are fetched in parallel
    /// while this thread fetches the first.
    pub fn read_at_with(
        &self,
        store: &Store,
        cache: &ChunkCache,
        prefetch: Option<&Prefetcher>,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        if let Some(p) = prefetch {
            let chunks = self.chunks_in(offset, offset.saturating_add(buf.len() as u64));
            for d in chunks.iter().skip(1) {
                if !cache.contains(d) {
                    p.request(d);
                }
            }
        }
        let size = self.size();
        if offset >= size {
            return Ok(0);
        }
        let want = buf.len().min((size - offset) as usize);
        match self {
            FileLayout::Inline(b) => {
                let o = offset as usize;
                buf[..want].copy_from_slice(&b[o..o + want]);
            }
            FileLayout::Segments(segs) => {
                let mut i = Self::find(segs, offset);
                let mut done = 0;
                while done < want {
                    let (start, seg) = segs[i];
                    let pos = offset + done as u64 - start;
                    let n = ((seg.len() - pos) as usize).min(want - done);
                    match seg {
                        Segment::Hole { .. } => buf[done..done + n].fill(0),
                        Segment::Data { chunk, .. } => {
                            let c = cache.chunk(store, &chunk)?;
                            let p = pos as usize;
                            let avail = c.len().saturating_sub(p).min(n);
                            buf[done..done + avail].copy_from_slice(&c[p..p + avail]);
                            // A chunk shorter than its segment claims is corrupt metadata;
                            // read it as zeros rather than panic (fsck reports it).
                            buf[done + avail..done + n].fill(0);
                        }
                    }
                    done += n;
                    i += 1;
                }
            }
        }
        Ok(want)
    }

    /// As [`FileLayout::read_at_with`], but only from chunks `cache` holds already: None
    /// (with `buf` partly written) as soon as one the range needs is not cached. Never
    /// reads the store, so it may run where blocking is not allowed.
    pub fn read_cached(&self, cache: &ChunkCache, offset: u64, buf: &mut [u8]) -> Option<usize> {
        let size = self.size();
        if offset >= size {
            return Some(0);
        }
        let want = buf.len().min((size - offset) as usize);
        match self {
            FileLayout::Inline(b) => {
                let o = offset as usize;
                buf[..want].copy_from_slice(&b[o..o + want]);
            }
            FileLayout::Segments(segs) => {
                let mut i = Self::find(segs, offset);
                let mut done = 0;
                while done < want {
                    let (start, seg) = segs[i];
                    let pos = offset + done as u64 - start;
                    let n = ((seg.len() - pos) as usize).min(want - done);
                    match seg {
                        Segment::Hole { .. } => buf[done..done + n].fill(0),
                        Segment::Data { chunk, .. } => {
                            let c = cache.get_cached(&chunk)?;
                            let p = pos as usize;
                            let avail = c.len().saturating_sub(p).min(n);
                            buf[done..done + avail].copy_from_slice(&c[p..p + avail]);
                            buf[done + avail..done + n].fill(0);
                        }
                    }
                    done += n;
                    i += 1;
                }
            }
        }
        Some(want)
    }

    /// `SEEK_DATA`: the first offset at or after `offset` that holds data, if any.
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        if offset >= self.size() {
            return None;
        }
        match self {
            FileLayout::Inline(_) => Some(offset),
            FileLayout::Segments(segs) => segs[Self::find(segs, offset)..]
                .iter()
                .find(|(_, s)| matches!(s, Segment::Data { .. }))
                .map(|(o, _)| (*o).max(offset)),
        }
    }

    /// `SEEK_HOLE`: the first offset at or after `offset` inside a hole, or the size (the
    /// end of a file counts as a hole). `None` if `offset` is past the end.
    pub fn next_hole(&self, offset: u64) -> Option<u64> {
        let size = self.size();
        if offset >= size {
            return None;
        }
        match self {
            FileLayout::Inline(_) => Some(size),
            FileLayout::Segments(segs) => Some(
                segs[Self::find(segs, offset)..]
                    .iter()
                    .find(|(_, s)| matches!(s, Segment::Hole { .. }))
                    .map(|(o, _)| (*o).max(offset))
                    .unwrap_or(size),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        // Three files of one chunk each (below FastCDC's minimum, so one chunk).
        for (i, b) in [b'a', b'b', b'c'].iter().enumerate() {
            std::fs::write(src.join(format!("f{i}")), vec![*b; 10_000]).unwrap();
        }
        store
            .import_image(&src, Some("t:1"), &Default::default())
            .unwrap();
        let chunks = crate::testing::chunk_digests(&store).unwrap();
        assert_eq!(chunks.len(), 3);
        let cache = ChunkCache::new(25_000);
        cache.chunk(&store, &chunks[0]).unwrap();
        cache.chunk(&store, &chunks[1]).unwrap();
        cache.chunk(&store, &chunks[0]).unwrap();
        cache.chunk(&store, &chunks[2]).unwrap();
        let lru = cache.inner.lock().unwrap();
        assert_eq!(lru.bytes, 20_000);
        assert!(lru.map.contains_key(&chunks[0]) && lru.map.contains_key(&chunks[2]));
    }

    /// Imports `src` as an image and returns the layout of its file `name`.
    fn import_layout(store: &Store, src: &std::path::Path, name: &[u8]) -> FileLayout {
        let img = store
            .import_image(src, Some("t:1"), &Default::default())
            .unwrap();
        let image = store.image(&img.image.unwrap()).unwrap();
        let layer = store.layer(&image.layers[0]).unwrap();
        let tree = store.tree(&layer.root_tree()).unwrap();
        let crate::Kind::File { size, data } = &tree.get(name).unwrap().kind else {
            panic!("not a file")
        };
        store.file_layout(data, *size).unwrap()
    }

    #[test]
    fn prefetched_chunks_are_cached_and_read_back_equal() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(src.join("big"), &data).unwrap();
        let layout = import_layout(&store, &src, b"big");
        let chunks = layout.chunks_in(0, layout.size());
        assert!(chunks.len() > 4, "{} chunks", chunks.len());
        assert_eq!(
            layout.chunks_in(layout.size(), u64::MAX),
            Vec::<Digest>::new()
        );
        let cache = Arc::new(ChunkCache::new(64 << 20));
        let p = Prefetcher::new(store.clone(), cache.clone(), 3, 64).unwrap();
        // One big read: its later chunks go to the prefetch threads, and whichever side
        // gets to a chunk second waits for the first instead of reading it again.
        let mut got = vec![0u8; data.len()];
        let n = layout
            .read_at_with(&store, &cache, Some(&p), 0, &mut got)
            .unwrap();
        assert_eq!(n, data.len());
        assert!(got == data);
        drop(p);
        for d in &chunks {
            assert!(cache.contains(d));
        }
        assert!(cache.lock().inflight.is_empty());
        // Many threads asking for one chunk at once all get it.
        let cache = ChunkCache::new(64 << 20);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let c = cache.chunk(&store, &chunks[0]).unwrap();
                    assert_eq!(&c[..], &data[..c.len()]);
                });
            }
        });
        assert!(cache.lock().inflight.is_empty());
    }

    #[test]
    fn layout_reads_across_segments_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let f = std::fs::File::create(src.join("sparse")).unwrap();
        f.set_len(4 << 20).unwrap();
        let data: Vec<u8> = (0..600_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::os::unix::fs::FileExt::write_all_at(&f, &data, 1 << 20).unwrap();
        drop(f);
        let layout = import_layout(&store, &src, b"sparse");
        assert_eq!(layout.size(), 4 << 20);
        let mut expect = vec![0u8; 4 << 20];
        expect[1 << 20..(1 << 20) + data.len()].copy_from_slice(&data);
        let cache = ChunkCache::new(1 << 20);
        let mut got = vec![0u8; 4 << 20];
        let mut off = 0;
        while off < got.len() {
            let end = (off + 131_072).min(got.len());
            let n = layout
                .read_at(&store, &cache, off as u64, &mut got[off..end])
                .unwrap();
            assert_eq!(n, end - off);
            off = end;
        }
        assert!(got == expect);
        // Holes are found at the importer's granularity: the first data is at or before
        // the first written byte, and everything before it reads as zeros.
        assert!(layout.allocated() < (4 << 20));
        let d = layout.next_data(0).unwrap();
        assert!(d <= 1 << 20 && expect[..d as usize].iter().all(|&b| b == 0));
        assert!(layout.next_hole(d).unwrap() > d);
        // The tail is a hole, so an offset inside it is its own answer.
        assert_eq!(layout.next_hole((4 << 20) - 1), Some((4 << 20) - 1));
        assert_eq!(layout.next_data(4 << 20), None);
    }
}
