//! `stats`: how much is stored and how well it deduplicates, for images and volumes
//! apart and for the store as a whole, each side counted the same way.

use std::collections::HashSet;

use crate::db::Cf;
use crate::error::Result;
use crate::store::Store;

/// Sizes of one kind of data, images' files or volumes' extents, counted alike: logical
/// bytes as if every image (every volume and every snapshot) were stored alone, unique
/// and stored bytes of the distinct chunks that data names.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DataStats {
    /// Distinct chunks the data names (and the store holds).
    pub chunks: u64,
    /// Images: the file bytes of every named image and lone layer. Volumes: the bytes of
    /// extents holding a chunk, in every volume and every snapshot (a clone's inherited
    /// extents included).
    pub logical_bytes: u64,
    /// Raw bytes of those chunks.
    pub unique_bytes: u64,
    /// Bytes those chunks take compressed.
    pub stored_bytes: u64,
    /// logical / unique: what deduplication saves (0 when nothing is stored).
    pub dedup_ratio: f64,
    /// logical / stored: deduplication and compression together.
    pub total_ratio: f64,
}

impl DataStats {
    fn add_chunk(&mut self, raw: u64, stored: u64) {
        self.chunks += 1;
        self.unique_bytes += raw;
        self.stored_bytes += stored;
    }

    fn finish(&mut self) {
        self.dedup_ratio = ratio(self.logical_bytes, self.unique_bytes);
        self.total_ratio = ratio(self.logical_bytes, self.stored_bytes);
    }
}

/// Store-wide sizes.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Stats {
    /// Named images (names: two names of one image count twice).
    pub images: u64,
    /// Layer records.
    pub layers: u64,
    /// Tree records.
    pub trees: u64,
    /// Multi-chunk file records.
    pub blobs: u64,
    /// Volumes (per-instance templates and clones included).
    pub volumes: u64,
    /// Snapshots of all volumes.
    pub snapshots: u64,
    /// The whole store, both sides added up: every chunk it holds, whoever names it
    /// (a chunk both sides name once, also those only gc would remove), and both
    /// sides' logical bytes. Flattened: `--json` has its fields at the top level.
    #[serde(flatten)]
    pub store: DataStats,
    /// Bytes of the store directory on disk (database, logs, blob files).
    pub disk_bytes: u64,
    /// Images and lone layers alone.
    pub image_data: DataStats,
    /// Volumes and their snapshots alone.
    pub volume_data: DataStats,
    /// The chunk tier this store caches, if it has one.
    pub tier: Option<TierStats>,
}

/// What a store holds of its chunk tier and has fetched from it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TierStats {
    /// The tier (`s3://BUCKET/PREFIX`, `file:///PATH`).
    pub url: String,
    /// Objects fetched since the store was opened.
    pub fetched_objects: u64,
    /// Their bytes as the tier holds them.
    pub fetched_bytes: u64,
    /// Chunks known to be in the tier (pushed from here, or of images pulled).
    pub tiered_chunks: u64,
    /// Of those, chunks this store does not hold (read from the tier when needed).
    pub remote_chunks: u64,
    /// Stored bytes of the chunks this store holds.
    pub local_bytes: u64,
    /// Of those, bytes of chunks the tier holds too and no volume names: what eviction
    /// may remove.
    pub tiered_bytes: u64,
    /// The rest: chunks not (yet) in the tier, or named by a volume (volumes are
    /// local-only), which stay whatever the limit.
    pub pinned_bytes: u64,
    /// The cache limit (`volumed --cache-size`), if there is one.
    pub cache_limit: Option<u64>,
    /// Chunks evicted since the store was opened.
    pub evicted_chunks: u64,
    /// Their stored bytes.
    pub evicted_bytes: u64,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

fn du(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(path) {
        for e in rd.flatten() {
            if let Ok(md) = e.metadata() {
                total += if md.is_dir() {
                    du(&e.path())
                } else {
                    md.blocks() * 512
                };
            }
        }
    }
    total
}

impl Store {
    /// Computes the store's sizes. Reads the chunk index (not the chunks), walks the
    /// trees of every referenced layer (cached per layer) and the volumes' block maps.
    pub fn stats(&self) -> Result<Stats> {
        let mut s = Stats::default();
        for k in self.db.keys(Cf::Layers) {
            k?;
            s.layers += 1;
        }
        for k in self.db.keys(Cf::Trees) {
            k?;
            s.trees += 1;
        }
        for k in self.db.keys(Cf::Blobs) {
            k?;
            s.blobs += 1;
        }
        // Image side: what names and lone layers keep.
        let mut layers = HashSet::new();
        let mut add_layer = |s: &mut Stats, d| {
            if let Ok(layer) = self.layer(&d) {
                s.image_data.logical_bytes += layer.content_bytes;
                layers.insert(d);
            }
        };
        for (_, d) in self.refs()? {
            s.images += 1;
            if let Ok(img) = self.image(&d) {
                for l in img.layers {
                    add_layer(&mut s, l);
                }
            }
        }
        for d in self.layer_refs()? {
            add_layer(&mut s, d);
        }
        let image_chunks = self.chunks_of_layers(&layers);
        // Volume side.
        let v = self.volume_totals()?;
        s.volumes = v.volumes;
        s.snapshots = v.snapshots;
        s.volume_data.logical_bytes = v.logical_bytes;
        let tier = self.tier();
        let mut local = std::collections::HashMap::new();
        for kv in self.db.entries(Cf::ChunkIndex) {
            let (k, v_bytes) = kv?;
            let Some((raw, stored)) = Store::chunk_sizes(&v_bytes) else {
                continue;
            };
            s.store.add_chunk(raw, stored);
            let Some(d) = crate::Digest::from_slice(&k) else {
                continue;
            };
            if tier.is_some() {
                local.insert(d, stored);
            }
            if image_chunks.contains(&d) {
                s.image_data.add_chunk(raw, stored);
            }
            if v.chunks.contains(&d) {
                s.volume_data.add_chunk(raw, stored);
            }
        }
        s.image_data.finish();
        s.volume_data.finish();
        s.store.logical_bytes = s.image_data.logical_bytes + s.volume_data.logical_bytes;
        s.store.finish();
        s.disk_bytes = du(self.path());
        if let Some(tier) = tier {
            let fetched = self.fetched();
            let (evicted_chunks, evicted_bytes) = self.evicted();
            let mut t = TierStats {
                url: tier.url().to_string(),
                fetched_objects: fetched.objects,
                fetched_bytes: fetched.bytes,
                local_bytes: s.store.stored_bytes,
                cache_limit: self.cache_limit(),
                evicted_chunks,
                evicted_bytes,
                ..TierStats::default()
            };
            for d in self.tiered_chunks()? {
                t.tiered_chunks += 1;
                match local.get(&d) {
                    None => t.remote_chunks += 1,
                    Some(&stored) if !v.chunks.contains(&d) => t.tiered_bytes += stored,
                    Some(_) => {}
                }
            }
            t.pinned_bytes = t.local_bytes - t.tiered_bytes;
            s.tier = Some(t);
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::noise;
    use crate::{ImportOptions, Store, VolumeSpec};

    #[test]
    fn images_and_volumes_are_counted_apart_and_alike() {
        let tmp = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(tmp.path().join("store")).unwrap());
        // An image holding one 1 MiB file twice: 2 MiB logical, 1 MiB of chunks.
        let src = tmp.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        let file = noise(1 << 20, 7);
        std::fs::write(src.join("a"), &file).unwrap();
        std::fs::write(src.join("b"), &file).unwrap();
        store
            .import_image(&src, Some("two:1"), &ImportOptions::default())
            .unwrap();
        let before = store.stats().unwrap();
        assert_eq!(before.image_data.logical_bytes, 2 << 20);
        assert_eq!(before.image_data.unique_bytes, 1 << 20);
        assert_eq!(before.volume_data, super::DataStats::default());
        assert_eq!(before.store.logical_bytes, 2 << 20);
        assert!((before.store.dedup_ratio - 2.0).abs() < 1e-9, "{before:?}");

        // A volume with four 64 KiB extents written, a snapshot of it and a clone of
        // that: each counts its four extents, 768 KiB logical over 256 KiB of chunks.
        store.create_volume(&VolumeSpec::new("v", 1 << 20)).unwrap();
        let v = store.open_volume("v").unwrap();
        v.write(0, &noise(256 << 10, 8), true).unwrap();
        store.snapshot_volume("v", "s1").unwrap();
        store.clone_volume("v", "s1", "c").unwrap();
        let s = store.stats().unwrap();
        assert_eq!((s.volumes, s.snapshots), (2, 1));
        assert_eq!(s.volume_data.chunks, 4);
        assert_eq!(s.volume_data.logical_bytes, 3 * (256 << 10));
        assert_eq!(s.volume_data.unique_bytes, 256 << 10);
        assert!((s.volume_data.dedup_ratio - 3.0).abs() < 1e-9, "{s:?}");
        // The image side did not move, and the totals are both sides added up.
        assert_eq!(s.image_data, before.image_data);
        assert_eq!(s.store.chunks, before.store.chunks + 4);
        assert_eq!(s.store.logical_bytes, (2 << 20) + 3 * (256 << 10));
        assert_eq!(s.store.unique_bytes, (1 << 20) + (256 << 10));
        let want = s.store.logical_bytes as f64 / s.store.unique_bytes as f64;
        assert!((s.store.dedup_ratio - want).abs() < 1e-9, "{s:?}");
    }
}
