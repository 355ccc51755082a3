//! Images whose blobs come from somewhere else (a registry): the caller hands over the
//! verified config document and a way to open each layer blob; layers whose `diff_id`
//! the store already holds are not opened at all.

use std::collections::HashMap;
use std::collections::HashSet;
use std::io::Read;
use std::time::Instant;

use super::pipeline::Ingest;
use super::{ImportOptions, ImportReport, LayerInput, report};
use crate::Digest;
use crate::db::{Batch, Cf};
use crate::error::{Error, ObjectKind, Result};
use crate::model::Layer;
use crate::store::Store;

/// One layer blob of a remote image, as its manifest names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteLayer {
    /// Digest of the blob (compressed, as the registry serves it).
    pub digest: Digest,
    /// Its size in bytes, as the manifest says.
    pub size: u64,
}

/// An image to import from a remote source: its config document (the JSON whose
/// `rootfs.diff_ids` name the uncompressed layers) and its layer blobs, bottom first.
#[derive(Debug, Clone)]
pub struct RemoteImage {
    /// Where it comes from, for messages (`registry/repo@sha256:...`).
    pub source: String,
    /// The config document's bytes; checked here against `config_digest`.
    pub config: Vec<u8>,
    /// The digest the manifest gives the config.
    pub config_digest: Digest,
    /// The layer blobs, bottom first.
    pub layers: Vec<RemoteLayer>,
}

/// Opens a layer blob for reading; an error is reported naming the layer.
pub type OpenBlob<'a> =
    dyn Fn(&RemoteLayer) -> std::io::Result<Box<dyn Read + Send + 'static>> + Sync + 'a;

/// What [`Store::import_remote`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RemoteImportReport {
    /// The import itself (files, chunks and bytes of the layers read).
    pub import: ImportReport,
    /// Per layer, bottom first: whether it was already stored (by `diff_id`) and so
    /// never downloaded.
    pub reused: Vec<bool>,
    /// Blob bytes read from the source (compressed, as served).
    pub fetched_bytes: u64,
}

impl Store {
    /// Imports a remote image as `name`: each layer whose `diff_id` a stored layer has is
    /// taken from the store; the others are read through `open`, decompressed, checked
    /// against the manifest's blob digest and the config's `diff_id`, and ingested. All
    /// or nothing, as [`Store::import_image`]: a blob with the wrong bytes fails the
    /// import naming it, and nothing becomes visible.
    pub fn import_remote(
        &self,
        image: &RemoteImage,
        name: &str,
        open: &OpenBlob<'_>,
        opts: &ImportOptions,
    ) -> Result<RemoteImportReport> {
        crate::refname::validate(name)?;
        opts.config.validate()?;
        let start = Instant::now();
        let source = std::path::Path::new(&image.source);
        let bad = |reason: String| Error::BadInput {
            source_name: image.source.clone(),
            reason,
        };
        if Digest::of(&image.config) != image.config_digest {
            return Err(bad(format!(
                "config blob does not match its digest {}",
                image.config_digest
            )));
        }
        let doc = super::oci::parse_json(source, "config", &image.config)?;
        let (mut config, diff_ids) = super::oci::read_config(source, &doc)?;
        if diff_ids.len() != image.layers.len() {
            return Err(bad(format!(
                "manifest has {} layers, config has {} diff_ids",
                image.layers.len(),
                diff_ids.len()
            )));
        }
        let ingest = Ingest::new(self, opts.progress.clone());
        let mut batch = Batch::new();
        let stored = self.layers_by_diff_id()?;
        let mut fetched_bytes = 0;
        let mut layers = Vec::new();
        let mut reused = Vec::new();
        for (l, diff_id) in image.layers.iter().zip(&diff_ids) {
            let have = stored
                .get(diff_id)
                .into_iter()
                .flatten()
                .find_map(|d| self.claim_layer(&ingest, d).ok().flatten());
            if let Some(d) = have {
                layers.push(d);
                reused.push(true);
                continue;
            }
            let layer_name = format!("{} layer {}", image.source, l.digest);
            let what = layer_name.clone();
            let input = LayerInput {
                name: layer_name,
                open: Box::new(move || open(l).map_err(|e| Error::io("fetch", &what, e))),
                blob_digest: Some(l.digest),
                diff_id: Some(*diff_id),
            };
            let (layer, read) = self.ingest_input(&ingest, input, &mut batch)?;
            layers.push(layer);
            reused.push(false);
            fetched_bytes += read;
        }
        opts.config.apply(&mut config);
        let digest = self.commit_image(&ingest, batch, layers.clone(), config, name)?;
        Ok(RemoteImportReport {
            import: report(&ingest, Some(digest), Some(name.to_string()), layers, start),
            reused,
            fetched_bytes,
        })
    }

    /// Stored layers by the `diff_id` they were imported from (one scan of the layer
    /// records kept here; a `diff_id` may name several layers when their trees were
    /// cut differently, e.g. before and after a chunker change).
    fn layers_by_diff_id(&self) -> Result<HashMap<Digest, Vec<Digest>>> {
        let mut out: HashMap<Digest, Vec<Digest>> = HashMap::new();
        for kv in self.db.entries(Cf::Layers) {
            let (k, v) = kv?;
            let Ok(d) = <[u8; 32]>::try_from(&k[..]) else {
                continue;
            };
            if let Ok(l) = Layer::decode(&v)
                && let Some(diff_id) = l.diff_id
            {
                out.entry(diff_id).or_default().push(Digest(d));
            }
        }
        Ok(out)
    }

    /// Claims layer `d` and everything under it for `ingest`, so a concurrent GC keeps
    /// them, and checks that all of it is still here (or in the tier): Some(d) if the
    /// layer can be used as it is, None if something under it is gone.
    fn claim_layer(&self, ingest: &Ingest<'_>, d: &Digest) -> Result<Option<Digest>> {
        // Claims come before the reads that check presence: GC either sees the claim or
        // has deleted the object already (then the walk or the check below fails).
        ingest.claims.claim(*d);
        let layer = self.layer(d)?;
        let mut chunks = Vec::new();
        let mut seen = HashSet::new();
        self.walk_tree(layer.root_tree(), &mut seen, &mut |kind, o| {
            ingest.claims.claim(o);
            if kind == ObjectKind::Chunk {
                chunks.push(o);
            }
        })?;
        for c in &chunks {
            if !self.has_chunk(c)? && !self.is_tiered(ObjectKind::Chunk, c)? {
                return Ok(None);
            }
        }
        Ok(Some(*d))
    }
}
