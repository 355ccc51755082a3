//! Layers as block devices: every layer of the store served as a read-only EROFS image
//! (`layerfs::erofs`), synthesized on first use and shared by every connection, VM and
//! caller on the host.
//!
//! **Cache.** Synthesized images are kept by layer digest. An image being served is
//! always kept; the others stay until the unserved ones together hold more than the
//! budget (`--erofs-cache-mib`), then the least recently used go first. Rebuilding one
//! costs milliseconds (see the README's `bench-block`), so the budget bounds memory,
//! not correctness. Every image reads file data through one chunk cache and prefetcher
//! of this module, so two VMs reading one layer decompress and verify a chunk once.
//!
//! **GC.** A layer being served is a GC root ([`Layers::gc_roots`]): its pin is taken
//! when the export is opened, under the same lock GC's root callback reads, and dropped
//! with the device (when the last connection using it ends).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use castore::{ChunkCache, Digest, Prefetcher, Store};
use layerfs::erofs::{Image, LayerDevice};

use crate::error::Error;
use crate::log;

/// How many chunk fetchers run ahead of readers of layer devices.
const PREFETCH_THREADS: usize = 4;
const PREFETCH_QUEUE: usize = 256;

#[derive(Debug)]
struct Cached {
    image: Arc<Image>,
    used: u64,
}

#[derive(Debug, Default)]
struct Inner {
    images: HashMap<Digest, Cached>,
    /// Open devices per layer.
    served: HashMap<Digest, usize>,
    tick: u64,
}

/// The host's layer images.
pub(crate) struct Layers {
    store: Arc<Store>,
    cache: Arc<ChunkCache>,
    prefetch: Option<Arc<Prefetcher>>,
    budget: usize,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Layers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layers")
            .field("budget", &self.budget)
            .finish()
    }
}

/// A layer's pin while a device of it is open.
struct Served {
    layers: Arc<Layers>,
    layer: Digest,
}

impl Drop for Served {
    fn drop(&mut self) {
        let mut g = self.layers.lock();
        if let Some(n) = g.served.get_mut(&self.layer) {
            *n -= 1;
            if *n == 0 {
                g.served.remove(&self.layer);
            }
        }
    }
}

impl Layers {
    /// Layer images of `store`: `cache_bytes` of decompressed chunks shared by all of
    /// them, and up to `budget` bytes of unserved images kept synthesized.
    pub(crate) fn new(store: Arc<Store>, cache_bytes: usize, budget: usize) -> Arc<Layers> {
        let cache = Arc::new(ChunkCache::new(cache_bytes));
        let prefetch = match Prefetcher::new(
            store.clone(),
            cache.clone(),
            PREFETCH_THREADS,
            PREFETCH_QUEUE,
        ) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                log!("layer devices: no prefetch threads ({e}); reads fetch their own chunks");
                None
            }
        };
        Arc::new(Layers {
            store,
            cache,
            prefetch,
            budget,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The layer a spec names: `sha256:HEX`, or a unique prefix (6+ hex digits, with or
    /// without `sha256:`) of a layer of a named image or a lone layer.
    pub(crate) fn resolve(&self, spec: &str) -> Result<Digest, Error> {
        let d = self.store.resolve_layer(spec)?;
        // A full digest must still name a layer of this store.
        self.store.layer(&d)?;
        Ok(d)
    }

    /// The image of `layer`, synthesized if it is not cached.
    pub(crate) fn image(&self, layer: &Digest) -> Result<Arc<Image>, Error> {
        {
            let mut g = self.lock();
            g.tick += 1;
            let tick = g.tick;
            if let Some(c) = g.images.get_mut(layer) {
                c.used = tick;
                return Ok(c.image.clone());
            }
        }
        // Built outside the lock: two first users may both build; the first one kept wins
        // (the bytes are the same).
        let image = Arc::new(Image::build(&self.store, layer).map_err(|e| match e {
            layerfs::erofs::Error::Store(e) => Error::Store(e),
            e => Error::BadRequest(format!("layer {layer}: {e}")),
        })?);
        let r = image.report();
        log!(
            "layer {}: EROFS image synthesized in {:.1} ms ({} inodes, {} bytes of metadata, {} of data){}",
            layer.short(),
            r.build_time.as_secs_f64() * 1e3,
            r.inodes,
            r.metadata_bytes,
            r.data_bytes,
            if r.dropped_xattrs.is_empty() {
                String::new()
            } else {
                format!("; xattrs not carried: {}", r.dropped_xattrs.join("; "))
            }
        );
        let mut g = self.lock();
        g.tick += 1;
        let tick = g.tick;
        let kept = g
            .images
            .entry(*layer)
            .or_insert(Cached { image, used: tick })
            .image
            .clone();
        self.evict(&mut g);
        Ok(kept)
    }

    /// Drops least recently used unserved images until those left fit the budget.
    fn evict(&self, g: &mut Inner) {
        loop {
            let unserved: Vec<(&Digest, &Cached)> = g
                .images
                .iter()
                .filter(|(d, _)| !g.served.contains_key(*d))
                .collect();
            let bytes: usize = unserved.iter().map(|(_, c)| c.image.memory_bytes()).sum();
            if bytes <= self.budget {
                return;
            }
            let Some(victim) = unserved
                .iter()
                .min_by_key(|(_, c)| c.used)
                .map(|(d, _)| **d)
            else {
                return;
            };
            g.images.remove(&victim);
        }
    }

    /// Opens `layer`'s device: pinned (a GC root) first, then synthesized if needed.
    pub(crate) fn open(self: &Arc<Self>, layer: &Digest) -> Result<LayerDevice, Error> {
        {
            let mut g = self.lock();
            // Under the lock GC's roots are read with: the layer is pinned before GC can
            // miss it. It must exist now.
            self.store.layer(layer)?;
            *g.served.entry(*layer).or_default() += 1;
        }
        let pin = Served {
            layers: self.clone(),
            layer: *layer,
        };
        let image = self.image(layer)?;
        Ok(LayerDevice::new(
            image,
            self.store.clone(),
            self.cache.clone(),
            self.prefetch.clone(),
        )
        .with_guard(pin))
    }

    /// Layers being served, for GC.
    pub(crate) fn gc_roots(&self) -> Vec<Digest> {
        self.lock().served.keys().copied().collect()
    }
}
