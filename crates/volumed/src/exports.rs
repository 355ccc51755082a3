//! The NBD export names volumed serves, one namespace for both kinds of device:
//! `layer/DIGEST` (or `layer/PREFIX`: 6+ hex digits of a layer's digest) is a layer's
//! read-only EROFS image ([`crate::layers`]); every other name is a volume's
//! ([`crate::volumes`]: `NAME`, `NAME@SNAP`, `NAME/ID`). Volume names cannot contain
//! `/` (nor start with `layer/`), so the two never collide.

use std::sync::Arc;

use layerfs::block::BlockDevice;
use layerfs::nbd::{Export, ExportError, Exports, Intent};

use crate::error::Error;
use crate::layers::Layers;
use crate::volumes::VolumeExports;

/// The prefix of layer export names.
pub(crate) const LAYER_PREFIX: &str = "layer/";

/// The export name of a layer's device.
pub(crate) fn layer_export(layer: &castore::Digest) -> String {
    format!("{LAYER_PREFIX}{layer}")
}

/// Every export of the host.
#[derive(Debug, Clone)]
pub(crate) struct HostExports {
    pub(crate) volumes: VolumeExports,
    pub(crate) layers: Arc<Layers>,
}

impl HostExports {
    /// The exports of `volumes` and `layers`.
    pub(crate) fn new(volumes: &Arc<crate::volumes::Volumes>, layers: &Arc<Layers>) -> Self {
        HostExports {
            volumes: VolumeExports(volumes.clone()),
            layers: layers.clone(),
        }
    }
}

impl Exports for HostExports {
    /// Volumes and snapshots; layers are many and named by digest, so they are not
    /// listed (`tide layer ls` and `tide image inspect` name them).
    fn list(&self) -> Result<Vec<(String, Option<String>)>, ExportError> {
        self.volumes.list()
    }

    fn open(&self, name: &str, intent: Intent, peer: &str) -> Result<Export, ExportError> {
        let Some(spec) = name.strip_prefix(LAYER_PREFIX) else {
            return self.volumes.open(name, intent, peer);
        };
        let layer = self.layers.resolve(spec).map_err(|e| match e {
            Error::Store(castore::Error::NotFound { .. } | castore::Error::Missing { .. }) => {
                ExportError::NotFound(format!("no layer {spec} in this host's store"))
            }
            Error::Store(castore::Error::Refused(m)) => ExportError::NotFound(m),
            e => ExportError::Failed(Box::new(e)),
        })?;
        let device = self
            .layers
            .open(&layer)
            .map_err(|e| ExportError::Failed(Box::new(e)))?;
        let description = format!(
            "EROFS image of layer {layer} ({} bytes, read-only)",
            device.size()
        );
        Ok(Export {
            device: Arc::new(device),
            description: Some(description),
        })
    }
}
