//! What the CLI asks of a store, as one trait. Today it is served in-process
//! ([`Local`], `--store DIR`); the daemon issue adds a Cap'n Proto implementation
//! (`--socket PATH`) so every command works the same against `volumed`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use castore::{
    Digest, ExportReport, ExportTarget, FsckReport, GcProgress, GcReport, GcRoots, ImportOptions,
    ImportReport, Progress, SourceFormat, Stats, Store, TierProgress, TierReport,
};

pub(crate) use castore::{ImageDetail, ImageSummary, LayerSummary};

/// The store operations behind the commands.
pub(crate) trait StoreApi {
    fn import_image(
        &self,
        path: &Path,
        name: Option<&str>,
        opts: &ImportOptions,
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
    /// Writes `layer`'s EROFS image (the bytes its `layer/DIGEST` export serves) to `to`.
    fn layer_erofs(&self, layer: &str, to: &Path) -> Result<ErofsReport>;
    fn gc(&self, progress: &GcProgress) -> Result<GcReport>;
    fn fsck(&self) -> Result<FsckReport>;
    fn stats(&self) -> Result<Stats>;
    /// Sends an image to the store's chunk tier, counting in `progress`.
    fn push_image(&self, spec: &str, progress: &Arc<TierProgress>) -> Result<(String, TierReport)>;
    /// Brings an image from the tier: records, and every chunk with `chunks`.
    fn pull_image(
        &self,
        spec: &str,
        chunks: bool,
        progress: &Arc<TierProgress>,
    ) -> Result<(String, TierReport)>;
    /// Pulls an image from a container registry, counting the import in `progress`.
    fn pull_registry(
        &self,
        req: &registry::PullRequest,
        progress: Arc<Progress>,
    ) -> Result<registry::PullReport>;
}

/// An EROFS image written out by `tide layer erofs`.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ErofsReport {
    pub(crate) layer: String,
    pub(crate) path: String,
    pub(crate) bytes: u64,
    pub(crate) metadata_bytes: u64,
    pub(crate) data_bytes: u64,
    pub(crate) inodes: u64,
    pub(crate) build_ms: f64,
    pub(crate) dropped_xattrs: Vec<String>,
}

/// The store opened in this process.
#[derive(Debug)]
pub(crate) struct Local(pub(crate) Store);

impl StoreApi for Local {
    fn import_image(
        &self,
        path: &Path,
        name: Option<&str>,
        opts: &ImportOptions,
    ) -> Result<ImportReport> {
        Ok(self.0.import_image(path, name, opts)?)
    }

    fn import_layer(
        &self,
        path: &Path,
        format: Option<SourceFormat>,
        progress: Arc<Progress>,
    ) -> Result<ImportReport> {
        Ok(self.0.import_layer(
            path,
            &ImportOptions {
                format,
                progress,
                ..ImportOptions::default()
            },
        )?)
    }

    fn images(&self) -> Result<Vec<ImageSummary>> {
        Ok(self.0.image_summaries()?)
    }

    fn inspect(&self, spec: &str) -> Result<ImageDetail> {
        Ok(self.0.image_detail(spec)?)
    }

    fn export_image(&self, spec: &str, target: &ExportTarget) -> Result<ExportReport> {
        let d = self.0.resolve_image(spec)?;
        Ok(self.0.export_image(&d, target)?)
    }

    fn remove_image(&self, name: &str) -> Result<Digest> {
        Ok(self.0.remove_image_name(name)?)
    }

    fn layers(&self) -> Result<Vec<LayerSummary>> {
        Ok(self.0.lone_layers()?)
    }

    fn export_layer(&self, digest: &str, target: &ExportTarget) -> Result<ExportReport> {
        let d = self.0.resolve_layer(digest)?;
        Ok(self.0.export_layer(&d, target)?)
    }

    fn remove_layer(&self, digest: &str) -> Result<()> {
        let d = self.0.resolve_layer(digest)?;
        Ok(self.0.remove_layer_ref(&d)?)
    }

    fn layer_erofs(&self, layer: &str, to: &Path) -> Result<ErofsReport> {
        let d = self.0.resolve_layer(layer)?;
        let image = layerfs::erofs::Image::build(&self.0, &d)
            .map_err(|e| anyhow::anyhow!("layer {d}: {e}"))?;
        let bytes = image
            .write_file(&self.0, to)
            .map_err(|e| anyhow::anyhow!("{}: {e}", to.display()))?;
        let r = image.report();
        Ok(ErofsReport {
            layer: d.to_string(),
            path: to.display().to_string(),
            bytes,
            metadata_bytes: r.metadata_bytes,
            data_bytes: r.data_bytes,
            inodes: r.inodes,
            build_ms: r.build_time.as_secs_f64() * 1e3,
            dropped_xattrs: r.dropped_xattrs.clone(),
        })
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

    fn push_image(&self, spec: &str, progress: &Arc<TierProgress>) -> Result<(String, TierReport)> {
        let r = self.0.push_image(spec, progress)?;
        Ok((self.tier_url(), r))
    }

    fn pull_image(
        &self,
        spec: &str,
        chunks: bool,
        progress: &Arc<TierProgress>,
    ) -> Result<(String, TierReport)> {
        let r = self.0.pull_image(spec, chunks, progress)?;
        Ok((self.tier_url(), r))
    }

    fn pull_registry(
        &self,
        req: &registry::PullRequest,
        progress: Arc<Progress>,
    ) -> Result<registry::PullReport> {
        Ok(registry::pull_request(&self.0, req, progress)?)
    }
}

impl Local {
    fn tier_url(&self) -> String {
        self.0
            .tier()
            .map(|t| t.url().to_string())
            .unwrap_or_default()
    }
}
