//! A pull: tag → (index →) this machine's manifest → config and layers → the store.

use std::time::Instant;

use castore::{Digest, ImportOptions, RemoteImage, RemoteLayer, Store};
use serde_json::Value;

use crate::client::media;
use crate::{Client, Error, Reference, Result};

/// Largest image config read.
const MAX_CONFIG: u64 = 8 << 20;
/// Indexes pointing at indexes are followed this deep.
const MAX_NESTING: usize = 4;

/// Layer media types a pull reads (compression is found from the bytes).
const LAYER_TYPES: [&str; 5] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
];

/// What a pull did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PullReport {
    /// The reference pulled, as parsed.
    pub reference: String,
    /// Digest of the image manifest used (the platform's, when the tag named an index).
    pub manifest: Digest,
    /// `os/architecture` of that manifest.
    pub platform: String,
    /// Layers of the image.
    pub layers: usize,
    /// Layers the store already held (by `diff_id`): not downloaded.
    pub layers_reused: usize,
    /// Layer blob bytes downloaded (compressed, as served).
    pub fetched_bytes: u64,
    /// Sum of the manifest's sizes of the layers downloaded.
    pub layer_bytes: u64,
    /// The store's side: image digest, name, files, chunks.
    pub import: castore::ImportReport,
    /// Wall-clock seconds, handshake to commit.
    pub seconds: f64,
}

fn bad(client: &Client, reason: String) -> Error {
    Error::Bad {
        registry: client.registry().to_string(),
        reason,
    }
}

fn digest_of(client: &Client, v: &Value, what: &str) -> Result<Digest> {
    let s = v
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(client, format!("{what} has no digest")))?;
    Digest::parse(s).ok_or_else(|| bad(client, format!("{what} digest {s:?} is not sha256:HEX")))
}

/// The image manifest `reference` names for this machine: the manifest itself, or the
/// entry of the index (Docker manifest list) for linux and this architecture. Returns
/// it parsed, with its digest and platform.
pub fn resolve(client: &Client, reference: &Reference) -> Result<(Value, Digest, String)> {
    let arch = castore::host_arch();
    let mut want = reference.manifest_ref();
    let mut platform = None;
    for _ in 0..MAX_NESTING {
        let m = client.manifest(&want)?;
        let doc: Value = serde_json::from_slice(&m.bytes)
            .map_err(|e| bad(client, format!("manifest {want} is not valid JSON: {e}")))?;
        if doc.get("schemaVersion").and_then(Value::as_u64) == Some(1) {
            return Err(bad(
                client,
                format!(
                    "manifest {want} is Docker schema 1, which is not supported (push the image again with a current client)"
                ),
            ));
        }
        let is_index = m.media_type == media::OCI_INDEX
            || m.media_type == media::DOCKER_LIST
            || (doc.get("manifests").is_some() && doc.get("layers").is_none());
        if !is_index {
            if doc.get("layers").is_none() || doc.get("config").is_none() {
                return Err(bad(
                    client,
                    format!(
                        "manifest {want} ({}) has no config and layers",
                        m.media_type
                    ),
                ));
            }
            let platform = platform.unwrap_or_else(|| format!("linux/{arch}"));
            return Ok((doc, m.digest, platform));
        }
        let entries = doc
            .get("manifests")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(client, format!("index {want} has no manifests")))?;
        let plat = |e: &Value, k: &str| {
            e.get("platform")
                .and_then(|p| p.get(k))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let pick = entries.iter().find(|e| {
            plat(e, "os").is_none_or(|o| o == "linux")
                && plat(e, "architecture").is_some_and(|a| a == arch)
        });
        let Some(pick) = pick else {
            let offered: Vec<String> = entries
                .iter()
                .map(|e| {
                    format!(
                        "{}/{}",
                        plat(e, "os").unwrap_or_else(|| "?".into()),
                        plat(e, "architecture").unwrap_or_else(|| "?".into())
                    )
                })
                .collect();
            return Err(bad(
                client,
                format!(
                    "{reference} has no image for linux/{arch} (it has {})",
                    offered.join(", ")
                ),
            ));
        };
        want = digest_of(client, pick, "index entry")?.to_string();
        platform = Some(format!(
            "{}/{}",
            plat(pick, "os").unwrap_or_else(|| "linux".into()),
            arch
        ));
    }
    Err(bad(
        client,
        format!("{reference}: indexes nested too deeply"),
    ))
}

/// Pulls `reference` into `store` as `name`: the manifest for this machine, its config
/// (verified), and each layer blob the store does not hold by `diff_id`, streamed
/// through the import pipeline and checked against the manifest's digest and the
/// config's `diff_id` before anything is committed.
pub fn pull(
    store: &Store,
    client: &Client,
    reference: &Reference,
    name: &str,
    opts: &ImportOptions,
) -> Result<PullReport> {
    let start = Instant::now();
    let (manifest, manifest_digest, platform) = resolve(client, reference)?;
    let config = manifest.get("config").unwrap_or(&Value::Null);
    let config_digest = digest_of(client, config, "config")?;
    let config_bytes = client.blob_bytes(&config_digest, MAX_CONFIG)?;
    let mut layers = Vec::new();
    for (i, l) in manifest
        .get("layers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let what = format!("layer {i}");
        let media_type = l.get("mediaType").and_then(Value::as_str).unwrap_or("");
        if !LAYER_TYPES.contains(&media_type) {
            return Err(bad(
                client,
                format!("{what} has media type {media_type:?}, which a pull cannot read"),
            ));
        }
        let size = l
            .get("size")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(client, format!("{what} has no size")))?;
        layers.push(RemoteLayer {
            digest: digest_of(client, l, &what)?,
            size,
        });
    }
    let image = RemoteImage {
        source: format!(
            "{}/{}@{manifest_digest}",
            reference.registry, reference.repository
        ),
        config: config_bytes,
        config_digest,
        layers,
    };
    let open = |l: &RemoteLayer| -> std::io::Result<Box<dyn std::io::Read + Send>> {
        let r = client
            .blob_reader(&l.digest, l.size)
            .map_err(std::io::Error::other)?;
        Ok(Box::new(r))
    };
    let r = store.import_remote(&image, name, &open, opts)?;
    let layer_bytes = image
        .layers
        .iter()
        .zip(&r.reused)
        .filter(|(_, reused)| !**reused)
        .map(|(l, _)| l.size)
        .sum();
    Ok(PullReport {
        reference: reference.to_string(),
        manifest: manifest_digest,
        platform,
        layers: r.reused.len(),
        layers_reused: r.reused.iter().filter(|&&x| x).count(),
        fetched_bytes: r.fetched_bytes,
        layer_bytes,
        import: r.import,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// A pull as a user asks for it.
#[derive(Debug, Clone, Default)]
pub struct PullRequest {
    /// `REGISTRY/REPOSITORY[:TAG][@sha256:HEX]`.
    pub reference: String,
    /// NAME:TAG to give the image; default `REPOSITORY:TAG`.
    pub name: Option<String>,
    /// For the token service or Basic auth.
    pub credentials: Option<crate::Credentials>,
    /// Speak HTTP (a loopback registry always does).
    pub plain_http: bool,
}

/// Runs `req` against `store`, counting the import's work in `progress`.
pub fn pull_request(
    store: &Store,
    req: &PullRequest,
    progress: std::sync::Arc<castore::Progress>,
) -> Result<PullReport> {
    let reference = Reference::parse(&req.reference)?;
    let name = match (&req.name, reference.local_name()) {
        (Some(n), _) => n.clone(),
        (None, Some(n)) => n,
        (None, None) => {
            return Err(Error::BadReference {
                reference: req.reference.clone(),
                reason: "a pull by digest alone needs a local name: give --name NAME:TAG".into(),
            });
        }
    };
    castore::validate_ref(&name)?;
    let opts = crate::ClientOptions {
        credentials: req.credentials.clone(),
        plain_http: req.plain_http,
        ..crate::ClientOptions::default()
    };
    let client = Client::new(&reference, &opts)?;
    let import = ImportOptions {
        format: None,
        progress,
        config: castore::ConfigOverride::default(),
    };
    pull(store, &client, &reference, &name, &import)
}
