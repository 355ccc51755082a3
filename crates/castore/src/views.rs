//! Read models for listings and inspection, shared by every front end (the in-process
//! CLI and the daemon's RPC server) so they report the same things the same way.

use serde::Serialize;

use crate::Digest;
use crate::error::{Error, Result};
use crate::store::Store;

/// One named image.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ImageSummary {
    /// `name:tag`.
    pub name: String,
    /// The image it names.
    pub digest: Digest,
    /// Number of layers.
    pub layers: usize,
    /// File bytes of all layers.
    pub size: u64,
}

/// One layer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LayerSummary {
    /// The layer record's digest.
    pub digest: Digest,
    /// OCI `diff_id` when imported from a tar.
    pub diff_id: Option<Digest>,
    /// Entries below the root.
    pub entries: u64,
    /// File bytes.
    pub size: u64,
}

/// Everything `image inspect` shows.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ImageDetail {
    /// The image digest.
    pub digest: Digest,
    /// Every `name:tag` pointing at it.
    pub names: Vec<String>,
    /// Its layers, lowest first.
    pub layers: Vec<LayerSummary>,
    /// File bytes of all layers.
    pub size: u64,
    /// `KEY=VALUE` environment.
    pub env: Vec<String>,
    /// Entrypoint argv.
    pub entrypoint: Vec<String>,
    /// Default arguments.
    pub cmd: Vec<String>,
    /// Working directory.
    pub workdir: String,
    /// User.
    pub user: String,
    /// CPU architecture.
    pub architecture: String,
    /// Operating system.
    pub os: String,
    /// Labels.
    pub labels: Vec<(String, String)>,
}

impl Store {
    /// Every named image, sorted by name.
    pub fn image_summaries(&self) -> Result<Vec<ImageSummary>> {
        let mut out = Vec::new();
        for (name, digest) in self.refs()? {
            let img = self.image(&digest)?;
            let mut size = 0;
            for l in &img.layers {
                size += self.layer(l)?.content_bytes;
            }
            out.push(ImageSummary {
                name,
                digest,
                layers: img.layers.len(),
                size,
            });
        }
        Ok(out)
    }

    /// One layer's summary.
    pub fn layer_summary(&self, digest: Digest) -> Result<LayerSummary> {
        let l = self.layer(&digest)?;
        Ok(LayerSummary {
            digest,
            diff_id: l.diff_id,
            entries: l.entries,
            size: l.content_bytes,
        })
    }

    /// Layers imported on their own.
    pub fn lone_layers(&self) -> Result<Vec<LayerSummary>> {
        self.layer_refs()?
            .into_iter()
            .map(|d| self.layer_summary(d))
            .collect()
    }

    /// The image `spec` resolves to (see [`Store::resolve_image`]), in full.
    pub fn image_detail(&self, spec: &str) -> Result<ImageDetail> {
        let digest = self.resolve_image(spec)?;
        let img = self.image(&digest)?;
        let names = self
            .refs()?
            .into_iter()
            .filter(|(_, d)| *d == digest)
            .map(|(n, _)| n)
            .collect();
        let layers = img
            .layers
            .iter()
            .map(|l| self.layer_summary(*l))
            .collect::<Result<Vec<_>>>()?;
        let c = img.config;
        Ok(ImageDetail {
            digest,
            names,
            size: layers.iter().map(|l| l.size).sum(),
            layers,
            env: c.env,
            entrypoint: c.entrypoint,
            cmd: c.cmd,
            workdir: c.workdir,
            user: c.user,
            architecture: c.architecture,
            os: c.os,
            labels: c.labels,
        })
    }

    /// A layer named by its full digest, or by a unique prefix (6+ hex digits) of the
    /// digest of a lone layer or of a layer of a named image.
    pub fn resolve_layer(&self, spec: &str) -> Result<Digest> {
        if let Some(d) = Digest::parse(spec) {
            return Ok(d);
        }
        let hex = spec.strip_prefix("sha256:").unwrap_or(spec);
        let not_found = || Error::NotFound {
            what: "layer",
            name: spec.to_string(),
        };
        if hex.len() < 6 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(not_found());
        }
        let mut found: Vec<Digest> = self.layer_refs()?;
        for (_, image) in self.refs()? {
            found.extend(self.image(&image)?.layers);
        }
        found.retain(|d| d.to_hex().starts_with(hex));
        found.sort();
        found.dedup();
        match found[..] {
            [d] => Ok(d),
            [] => Err(not_found()),
            _ => Err(Error::Refused(format!("layer prefix {spec} is ambiguous"))),
        }
    }

    /// Removes an image name (`:latest` implied) and returns the image it named.
    pub fn remove_image_name(&self, name: &str) -> Result<Digest> {
        self.remove_ref(&crate::refname::with_default_tag(name))
    }
}
