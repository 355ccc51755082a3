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
use std::sync::{Arc, Mutex};

use crate::Digest;
use crate::error::Result;
use crate::model::{FileData, Segment};
use crate::store::Store;

/// Default capacity of a [`ChunkCache`]: enough for a few readers streaming at once.
pub const DEFAULT_CHUNK_CACHE_BYTES: usize = 64 << 20;

/// A small LRU of decompressed, verified chunks, shared by threads.
#[derive(Debug)]
pub struct ChunkCache {
    capacity: usize,
    inner: Mutex<Lru>,
}

#[derive(Debug, Default)]
struct Lru {
    bytes: usize,
    tick: u64,
    map: HashMap<Digest, (Arc<Vec<u8>>, u64)>,
    /// Last-use tick → digest; the smallest tick is evicted first.
    order: BTreeMap<u64, Digest>,
}

impl ChunkCache {
    /// A cache holding up to `capacity` bytes of decompressed chunks.
    pub fn new(capacity: usize) -> ChunkCache {
        ChunkCache {
            capacity,
            inner: Mutex::new(Lru::default()),
        }
    }

    /// Bytes currently cached.
    pub fn bytes(&self) -> usize {
        self.inner.lock().expect("chunk cache lock").bytes
    }

    /// The chunk `d`, from the cache or read (and verified) from `store`.
    pub fn chunk(&self, store: &Store, d: &Digest) -> Result<Arc<Vec<u8>>> {
        {
            let mut lru = self.inner.lock().expect("chunk cache lock");
            lru.tick += 1;
            let tick = lru.tick;
            if let Some((data, used)) = lru.map.get_mut(d) {
                let old = std::mem::replace(used, tick);
                let data = data.clone();
                lru.order.remove(&old);
                lru.order.insert(tick, *d);
                return Ok(data);
            }
        }
        // Decompress outside the lock so that readers of other chunks are not held up;
        // two threads missing the same chunk at once both read it, which is harmless.
        let data = Arc::new(store.chunk(d)?);
        let mut lru = self.inner.lock().expect("chunk cache lock");
        if data.len() > self.capacity || lru.map.contains_key(d) {
            return Ok(data);
        }
        lru.tick += 1;
        let tick = lru.tick;
        lru.bytes += data.len();
        lru.map.insert(*d, (data.clone(), tick));
        lru.order.insert(tick, *d);
        while lru.bytes > self.capacity {
            let Some((_, victim)) = lru.order.pop_first() else {
                break;
            };
            if let Some((v, _)) = lru.map.remove(&victim) {
                lru.bytes -= v.len();
            }
        }
        Ok(data)
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
        let img = store
            .import_image(&src, Some("t:1"), &Default::default())
            .unwrap();
        let image = store.image(&img.image.unwrap()).unwrap();
        let layer = store.layer(&image.layers[0]).unwrap();
        let tree = store.tree(&layer.root_tree()).unwrap();
        let e = tree.get(b"sparse").unwrap();
        let crate::Kind::File { size, data: fd } = &e.kind else {
            panic!("not a file")
        };
        let layout = store.file_layout(fd, *size).unwrap();
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
