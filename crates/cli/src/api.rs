//! What the CLI asks of a store, as one trait. Today it is served in-process
//! ([`Local`], `--store DIR`); the daemon issue adds a Cap'n Proto implementation
//! (`--socket PATH`) so every command works the same against `volumed`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use castore::{
    Digest, ExportReport, ExportTarget, FsckReport, GcProgress, GcReport, GcRoots, ImportOptions,
    ImportReport, Progress, SourceFormat, Stats, Store,
};
use serde::Serialize;

/// One named image, for listings.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ImageSummary {
    pub(crate) name: String,
    pub(crate) digest: Digest,
    pub(crate) layers: usize,
    pub(crate) size: u64,
}

/// One layer of an image, for `inspect`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LayerSummary {
    pub(crate) digest: Digest,
    pub(crate) diff_id: Option<Digest>,
    pub(crate) entries: u64,
    pub(crate) size: u64,
}

/// Everything `image inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ImageDetail {
    pub(crate) digest: Digest,
    pub(crate) names: Vec<String>,
    pub(crate) layers: Vec<LayerSummary>,
    pub(crate) size: u64,
    pub(crate) env: Vec<String>,
    pub(crate) entrypoint: Vec<String>,
    pub(crate) cmd: Vec<String>,
    pub(crate) workdir: String,
    pub(crate) user: String,
    pub(crate) architecture: String,
    pub(crate) os: String,
    pub(crate) labels: Vec<(String, String)>,
}

/// The store operations behind the commands.
pub(crate) trait StoreApi {
    fn import_image(
        &self,
        path: &Path,
        name: Option<&str>,
        format: Option<SourceFormat>,
        progress: Arc<Progress>,
    ) -> Result<ImportReport>;
    fn import_layer(
        &self,
        path: &Path,
        format: Option<SourceFormat>,
        progress: Arc<Progress>,
    ) -> Result<ImportReport>;
    fn images(&self) -> Result<Vec<ImageSummary>>;
    fn inspect(&self, spec: &str) -> Result<ImageDetail>;
    fn export_image(&self, spec: &str, target: &ExportTarget) -> Result<ExportReport>;
    fn remove_image(&self, name: &str) -> Result<Digest>;
    fn layers(&self) -> Result<Vec<LayerSummary>>;
    fn export_layer(&self, digest: &str, target: &ExportTarget) -> Result<ExportReport>;
    fn remove_layer(&self, digest: &str) -> Result<()>;
    fn gc(&self, progress: &GcProgress) -> Result<GcReport>;
    fn fsck(&self) -> Result<FsckReport>;
    fn stats(&self) -> Result<Stats>;
}

/// The store opened in this process.
#[derive(Debug)]
pub(crate) struct Local(pub(crate) Store);

fn layer_summary(store: &Store, d: Digest) -> Result<LayerSummary> {
    let l = store.layer(&d)?;
    Ok(LayerSummary {
        digest: d,
        diff_id: l.diff_id,
        entries: l.entries,
        size: l.content_bytes,
    })
}

fn parse_layer(store: &Store, s: &str) -> Result<Digest> {
    if let Some(d) = Digest::parse(s) {
        return Ok(d);
    }
    let hex = s.strip_prefix("sha256:").unwrap_or(s);
    let found: Vec<Digest> = store
        .layer_refs()?
        .into_iter()
        .filter(|d| hex.len() >= 6 && d.to_hex().starts_with(hex))
        .collect();
    match found[..] {
        [d] => Ok(d),
        [] => Err(castore::Error::NotFound {
            what: "layer",
            name: s.to_string(),
        }
        .into()),
        _ => anyhow::bail!("layer prefix {s} is ambiguous"),
    }
}

impl StoreApi for Local {
    fn import_image(
        &self,
        path: &Path,
        name: Option<&str>,
        format: Option<SourceFormat>,
        progress: Arc<Progress>,
    ) -> Result<ImportReport> {
        Ok(self
            .0
            .import_image(path, name, &ImportOptions { format, progress })?)
    }

    fn import_layer(
        &self,
        path: &Path,
        format: Option<SourceFormat>,
        progress: Arc<Progress>,
    ) -> Result<ImportReport> {
        Ok(self
            .0
            .import_layer(path, &ImportOptions { format, progress })?)
    }

    fn images(&self) -> Result<Vec<ImageSummary>> {
        let mut out = Vec::new();
        for (name, d) in self.0.refs()? {
            let img = self.0.image(&d)?;
            let mut size = 0;
            for l in &img.layers {
                size += self.0.layer(l)?.content_bytes;
            }
            out.push(ImageSummary {
                name,
                digest: d,
                layers: img.layers.len(),
                size,
            });
        }
        Ok(out)
    }

    fn inspect(&self, spec: &str) -> Result<ImageDetail> {
        let d = self.0.resolve_image(spec)?;
        let img = self.0.image(&d)?;
        let names = self
            .0
            .refs()?
            .into_iter()
            .filter(|(_, x)| *x == d)
            .map(|(n, _)| n)
            .collect();
        let layers = img
            .layers
            .iter()
            .map(|l| layer_summary(&self.0, *l))
            .collect::<Result<Vec<_>>>()?;
        let c = img.config;
        Ok(ImageDetail {
            digest: d,
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

    fn export_image(&self, spec: &str, target: &ExportTarget) -> Result<ExportReport> {
        let d = self.0.resolve_image(spec)?;
        Ok(self.0.export_image(&d, target)?)
    }

    fn remove_image(&self, name: &str) -> Result<Digest> {
        let full = if name.contains(':') {
            name.to_string()
        } else {
            format!("{name}:latest")
        };
        Ok(self.0.remove_ref(&full)?)
    }

    fn layers(&self) -> Result<Vec<LayerSummary>> {
        self.0
            .layer_refs()?
            .into_iter()
            .map(|d| layer_summary(&self.0, d))
            .collect()
    }

    fn export_layer(&self, digest: &str, target: &ExportTarget) -> Result<ExportReport> {
        let d = match Digest::parse(digest) {
            Some(d) => d,
            None => parse_layer(&self.0, digest)?,
        };
        Ok(self.0.export_layer(&d, target)?)
    }

    fn remove_layer(&self, digest: &str) -> Result<()> {
        let d = parse_layer(&self.0, digest)?;
        Ok(self.0.remove_layer_ref(&d)?)
    }

    fn gc(&self, progress: &GcProgress) -> Result<GcReport> {
        Ok(self.0.gc(&GcRoots::default(), progress)?)
    }

    fn fsck(&self) -> Result<FsckReport> {
        Ok(self.0.fsck()?)
    }

    fn stats(&self) -> Result<Stats> {
        Ok(self.0.stats()?)
    }
}
