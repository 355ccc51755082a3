//! `stats`: how much is stored and how well it deduplicates.

use crate::db::Cf;
use crate::error::Result;
use crate::store::Store;

/// Store-wide sizes.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    /// Named images.
    pub images: u64,
    /// Layer records.
    pub layers: u64,
    /// Tree records.
    pub trees: u64,
    /// Multi-chunk file records.
    pub blobs: u64,
    /// Distinct chunks.
    pub chunks: u64,
    /// File bytes of every named image (and lone layer) as if each were stored alone.
    pub logical_bytes: u64,
    /// Raw bytes of the distinct chunks.
    pub unique_bytes: u64,
    /// Bytes the chunks take after compression.
    pub stored_bytes: u64,
    /// logical / unique: what deduplication saves.
    pub dedup_ratio: f64,
    /// logical / stored: deduplication and compression together.
    pub total_ratio: f64,
    /// Bytes of the store directory on disk (database, logs, blob files).
    pub disk_bytes: u64,
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
    /// Computes the store's sizes (reads the chunk index, not the chunks).
    pub fn stats(&self) -> Result<Stats> {
        let mut s = Stats::default();
        for kv in self.db.entries(Cf::ChunkIndex) {
            let (_, v) = kv?;
            if let Some((raw, stored)) = Store::chunk_sizes(&v) {
                s.chunks += 1;
                s.unique_bytes += raw;
                s.stored_bytes += stored;
            }
        }
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
        for (_, d) in self.refs()? {
            s.images += 1;
            if let Ok(img) = self.image(&d) {
                for l in img.layers {
                    if let Ok(layer) = self.layer(&l) {
                        s.logical_bytes += layer.content_bytes;
                    }
                }
            }
        }
        for d in self.layer_refs()? {
            if let Ok(layer) = self.layer(&d) {
                s.logical_bytes += layer.content_bytes;
            }
        }
        s.dedup_ratio = ratio(s.logical_bytes, s.unique_bytes);
        s.total_ratio = ratio(s.logical_bytes, s.stored_bytes);
        s.disk_bytes = du(self.path());
        Ok(s)
    }
}
