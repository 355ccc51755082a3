//! What a host's store holds, in the terms a scheduler places by: for every layer, the
//! bytes of its chunks present here, and for every named image, its layers' total chunk
//! bytes.
//!
//! A host sends this with every heartbeat, so it is cached: the result is kept until the
//! store's change counter moves (imports, name changes, GC), and each layer's chunk list
//! (immutable: a layer is named by its content) is kept for as long as the layer is
//! stored, so a recount after a change only asks the chunk index about presence.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::Digest;
use crate::db::Cf;
use crate::error::Result;
use crate::model::{FileData, Kind, Segment};
use crate::store::Store;

/// One layer of the store and how much of it is here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerPresence {
    /// The layer.
    pub digest: Digest,
    /// Raw bytes of the layer's distinct chunks (its file data outside inlined files).
    pub total_bytes: u64,
    /// Raw bytes of those chunks present in this store. Less than `total_bytes` when a
    /// chunk is missing: the layer's record came without all of its data.
    pub present_bytes: u64,
}

/// A named image and its layers' total chunk bytes, bottom layer first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInventory {
    /// `NAME:TAG`.
    pub name: String,
    /// The image it names.
    pub digest: Digest,
    /// (layer, total chunk bytes), bottom first.
    pub layers: Vec<(Digest, u64)>,
}

/// The store's layers and named images, as of change [`Inventory::change`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Every stored layer, sorted by digest.
    pub layers: Vec<LayerPresence>,
    /// Every named image, sorted by name.
    pub images: Vec<ImageInventory>,
    /// The value of [`Store::change_count`] this was computed at.
    pub change: u64,
}

/// The cache [`Store::inventory`] keeps (a field of the store).
#[derive(Debug, Default)]
pub(crate) struct InventoryCache {
    inner: Mutex<CacheInner>,
}

#[derive(Debug, Default)]
struct CacheInner {
    last: Option<Arc<Inventory>>,
    /// Each known layer's distinct chunks and their raw lengths.
    chunks: HashMap<Digest, Arc<Vec<(Digest, u64)>>>,
}

impl Store {
    /// A number that changes whenever what [`Store::inventory`] reports may have changed:
    /// bumped by imports, by adding or removing names and lone layers, and by GC.
    pub fn change_count(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    /// Records a change to layers, images, names or chunks (see [`Store::change_count`]).
    pub(crate) fn bump_changes(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
    }

    /// The distinct chunks of a layer's files and their raw lengths, in the order first
    /// met. Trees or blobs missing from the store are skipped (their chunks are not
    /// here either).
    pub fn layer_chunks(&self, layer: &Digest) -> Result<Vec<(Digest, u64)>> {
        let root = self.layer(layer)?.root_tree();
        let mut out = Vec::new();
        let mut seen_chunks = HashSet::new();
        let mut seen = HashSet::new();
        let mut stack = vec![root];
        let mut add = |out: &mut Vec<(Digest, u64)>, d: Digest, len: u64| {
            if seen_chunks.insert(d) {
                out.push((d, len));
            }
        };
        while let Some(t) = stack.pop() {
            if !seen.insert(t) {
                continue;
            }
            let Ok(tree) = self.tree(&t) else { continue };
            for e in tree.entries {
                match e.kind {
                    Kind::Dir { tree, .. } => stack.push(tree),
                    Kind::File {
                        size,
                        data: FileData::Chunk(c),
                    } => add(&mut out, c, size),
                    Kind::File {
                        data: FileData::Blob(b),
                        ..
                    } if seen.insert(b) => {
                        let Ok(blob) = self.blob(&b) else { continue };
                        for s in blob.segments {
                            if let Segment::Data { chunk, len } = s {
                                add(&mut out, chunk, u64::from(len));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    /// A layer's chunk list from `known`, else walked now; None for a layer record
    /// that cannot be read (it has nothing to offer).
    fn known_layer_chunks(
        &self,
        known: &HashMap<Digest, Arc<Vec<(Digest, u64)>>>,
        layer: &Digest,
    ) -> Option<Arc<Vec<(Digest, u64)>>> {
        match known.get(layer) {
            Some(c) => Some(c.clone()),
            None => self.layer_chunks(layer).ok().map(Arc::new),
        }
    }

    /// The distinct chunks of `layers`' files (through the same per-layer cache as the
    /// inventory: layers are immutable), for `stats`.
    pub(crate) fn chunks_of_layers(&self, layers: &HashSet<Digest>) -> HashSet<Digest> {
        let mut cache = self.inventory.inner.lock().expect("inventory cache lock");
        let mut out = HashSet::new();
        for d in layers {
            if let Some(c) = self.known_layer_chunks(&cache.chunks, d) {
                out.extend(c.iter().map(|(c, _)| *c));
                cache.chunks.insert(*d, c);
            }
        }
        out
    }

    /// Every layer with how many of its chunk bytes are here, and every named image with
    /// its layers' sizes. Cheap while nothing changed: the last answer is returned as it
    /// is (same `Arc`) until [`Store::change_count`] moves.
    pub fn inventory(&self) -> Result<Arc<Inventory>> {
        let mut cache = self.inventory.inner.lock().expect("inventory cache lock");
        // Read before computing: a change made meanwhile bumps past it, so the next
        // call recomputes rather than trusting an answer that may predate it.
        let change = self.change_count();
        if let Some(last) = &cache.last
            && last.change == change
        {
            return Ok(last.clone());
        }
        let mut layers = Vec::new();
        let mut known = HashMap::new();
        for k in self.db.keys(Cf::Layers) {
            let Some(d) = Digest::from_slice(&k?) else {
                continue;
            };
            let Some(chunks) = self.known_layer_chunks(&cache.chunks, &d) else {
                continue;
            };
            let mut present = 0;
            for (c, len) in chunks.iter() {
                if self.db.contains(Cf::ChunkIndex, &c.0)? {
                    present += len;
                }
            }
            layers.push(LayerPresence {
                digest: d,
                total_bytes: chunks.iter().map(|(_, l)| l).sum(),
                present_bytes: present,
            });
            known.insert(d, chunks);
        }
        layers.sort_by_key(|l| l.digest);
        let totals: HashMap<Digest, u64> =
            layers.iter().map(|l| (l.digest, l.total_bytes)).collect();
        let mut images = Vec::new();
        for (name, digest) in self.refs()? {
            let Ok(img) = self.image(&digest) else {
                continue;
            };
            images.push(ImageInventory {
                name,
                digest,
                layers: img
                    .layers
                    .iter()
                    .map(|l| (*l, totals.get(l).copied().unwrap_or(0)))
                    .collect(),
            });
        }
        let inv = Arc::new(Inventory {
            layers,
            images,
            change,
        });
        // Layers GC removed are forgotten with the rest of the old answer.
        cache.chunks = known;
        cache.last = Some(inv.clone());
        Ok(inv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ImportOptions;
    use crate::testing::noise;

    fn tree(dir: &std::path::Path, files: &[(&str, Vec<u8>)]) {
        for (name, bytes) in files {
            let p = dir.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        }
    }

    #[test]
    fn inventory_counts_present_chunks_and_is_cached_until_a_change() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("store")).unwrap();
        let empty = store.inventory().unwrap();
        assert!(empty.layers.is_empty() && empty.images.is_empty());

        // Layer A: a 1 MiB file (several chunks), a one-chunk file and an inlined one.
        let a = tmp.path().join("a");
        tree(
            &a,
            &[
                ("big", noise(1 << 20, 1)),
                ("small", noise(20_000, 2)),
                ("tiny", b"hi".to_vec()),
            ],
        );
        let r = store
            .import_image(&a, Some("shop/web:1"), &ImportOptions::default())
            .unwrap();
        let layer_a = r.layers[0];
        let inv = store.inventory().unwrap();
        assert_eq!(inv.layers.len(), 1);
        let want = (1 << 20) + 20_000;
        assert_eq!(
            inv.layers[0],
            LayerPresence {
                digest: layer_a,
                total_bytes: want,
                present_bytes: want,
            }
        );
        assert_eq!(inv.images.len(), 1);
        assert_eq!(inv.images[0].name, "shop/web:1");
        assert_eq!(inv.images[0].digest, r.image.unwrap());
        assert_eq!(inv.images[0].layers, vec![(layer_a, want)]);

        // Unchanged store: the very same answer.
        assert!(Arc::ptr_eq(&inv, &store.inventory().unwrap()));

        // Layer B shares the big file with A: its bytes are counted in both.
        let b = tmp.path().join("b");
        tree(
            &b,
            &[("copy", noise(1 << 20, 1)), ("other", noise(30_000, 3))],
        );
        let rb = store.import_layer(&b, &ImportOptions::default()).unwrap();
        let layer_b = rb.layers[0];
        let inv2 = store.inventory().unwrap();
        assert!(!Arc::ptr_eq(&inv, &inv2), "an import invalidates the cache");
        let lb = inv2.layers.iter().find(|l| l.digest == layer_b).unwrap();
        assert_eq!(lb.total_bytes, (1 << 20) + 30_000);
        assert_eq!(lb.present_bytes, lb.total_bytes);

        // A chunk of B's own goes missing (as when a layer's record arrived before all
        // of its data): B is partly present, A is untouched.
        let of_a = store.layer_chunks(&layer_a).unwrap();
        let mut lost = 0;
        for (c, len) in store.layer_chunks(&layer_b).unwrap() {
            if !of_a.iter().any(|(d, _)| *d == c) {
                crate::testing::forget_chunk(&store, &c).unwrap();
                lost += len;
            }
        }
        assert_eq!(lost, 30_000);
        let inv3 = store.inventory().unwrap();
        let lb = inv3.layers.iter().find(|l| l.digest == layer_b).unwrap();
        assert_eq!(lb.present_bytes, 1 << 20);
        assert_eq!(lb.total_bytes, (1 << 20) + 30_000);
        let la = inv3.layers.iter().find(|l| l.digest == layer_a).unwrap();
        assert_eq!(la.present_bytes, want);

        // Removing the name and collecting garbage removes A's image and layer.
        store.remove_ref("shop/web:1").unwrap();
        let inv4 = store.inventory().unwrap();
        assert!(inv4.images.is_empty(), "a removed name is gone at once");
        store
            .gc(&crate::GcRoots::default(), &crate::GcProgress::default())
            .unwrap();
        let inv5 = store.inventory().unwrap();
        assert_eq!(
            inv5.layers.iter().map(|l| l.digest).collect::<Vec<_>>(),
            vec![layer_b]
        );
        assert!(inv5.change > inv.change);
    }
}
