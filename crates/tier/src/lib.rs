//! tier: the backends of castore's chunk tier ([`castore::Tier`]).
//!
//! - `s3://BUCKET/PREFIX`: S3-compatible object storage (AWS, Garage, MinIO, Ceph RGW)
//!   through Apache Arrow's `object_store` client: SigV4, path-style requests, retries
//!   with exponential backoff on throttling, 5xx answers and broken connections.
//! - `file:///PATH` or an absolute path: a directory (a shared file system), castore's
//!   [`castore::DirTier`].
//!
//! castore calls the tier from plain threads and from threads inside volumed's tokio
//! runtime alike, so [`S3Tier`] runs its client on a runtime of its own and every call
//! waits on a channel: it never enters a runtime from within one.
//!
//! The tier records its format at `PREFIX/format` when first used; opening a tier that
//! holds another format, or that cannot be read (wrong bucket, credentials, endpoint),
//! fails at start with what the server said, not at the first read.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use castore::{Tier, TierError};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};

pub mod testing;

/// What the tier holds at `PREFIX/format`; a tier with another value is refused.
pub const FORMAT: &str = "tidedge-tier-1";

/// Where the tier is and how to reach it.
#[derive(Debug, Clone, Default)]
pub struct TierConfig {
    /// `s3://BUCKET/PREFIX`, `file:///PATH` or an absolute path.
    pub url: String,
    /// The S3 endpoint (`http://127.0.0.1:3900`); default: `AWS_ENDPOINT_URL`, else AWS.
    pub endpoint: Option<String>,
    /// The S3 region; default: `AWS_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// An AWS shared credentials file (`[default]`, `aws_access_key_id`,
    /// `aws_secret_access_key`); default: the `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` variables.
    pub credentials: Option<PathBuf>,
}

/// The tier flags volumed and `tide --store` share.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TierArgs {
    /// The chunk tier this store caches: s3://BUCKET/PREFIX, file:///PATH or an
    /// absolute path. Images missing here are pulled from it and their chunks fetched
    /// when read; imports are pushed to it.
    #[arg(long = "tier", env = "TIDE_TIER", value_name = "URL", global = true)]
    pub url: Option<String>,
    /// S3 endpoint (default: AWS_ENDPOINT_URL, else AWS).
    #[arg(long = "tier-endpoint", value_name = "URL", global = true)]
    pub endpoint: Option<String>,
    /// S3 region (default: AWS_REGION, else us-east-1).
    #[arg(long = "tier-region", value_name = "REGION", global = true)]
    pub region: Option<String>,
    /// AWS shared credentials file (default: AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY).
    #[arg(long = "tier-credentials", value_name = "FILE", global = true)]
    pub credentials: Option<PathBuf>,
}

impl TierArgs {
    /// The tier these flags name, if any.
    pub fn config(&self) -> Option<TierConfig> {
        Some(TierConfig {
            url: self.url.clone()?,
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            credentials: self.credentials.clone(),
        })
    }

    /// Opens the tier these flags name, if any.
    pub fn open(&self) -> Result<Option<Arc<dyn Tier>>> {
        self.config().map(|c| open(&c)).transpose()
    }
}

/// Opens the tier `cfg` names and checks it can be read and written.
pub fn open(cfg: &TierConfig) -> Result<Arc<dyn Tier>> {
    let tier: Arc<dyn Tier> = if let Some(rest) = cfg.url.strip_prefix("s3://") {
        Arc::new(S3Tier::open(rest, cfg)?)
    } else if let Some(path) = cfg.url.strip_prefix("file://") {
        Arc::new(castore::DirTier::open(path)?)
    } else if cfg.url.starts_with('/') {
        Arc::new(castore::DirTier::open(&cfg.url)?)
    } else {
        bail!(
            "tier {:?}: expected s3://BUCKET/PREFIX, file:///PATH or an absolute path",
            cfg.url
        );
    };
    check_format(&*tier)?;
    Ok(tier)
}

fn check_format(tier: &dyn Tier) -> Result<()> {
    let ctx = || format!("tier {}", tier.url());
    match tier.get("format").with_context(ctx)? {
        Some(v) if v == FORMAT.as_bytes() => Ok(()),
        Some(v) => bail!(
            "tier {} holds format {:?}; this build reads {FORMAT:?}",
            tier.url(),
            String::from_utf8_lossy(&v)
        ),
        None => tier.put("format", FORMAT.as_bytes()).with_context(ctx),
    }
}

/// A tier in an S3 bucket, under a prefix.
#[derive(Debug)]
pub struct S3Tier {
    store: Arc<AmazonS3>,
    prefix: String,
    url: String,
    rt: tokio::runtime::Runtime,
}

/// Reads an AWS shared credentials file: the `AWS_PROFILE` section (default `default`).
fn read_credentials(path: &Path) -> Result<(String, String)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading credentials {}", path.display()))?;
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".to_string());
    let mut section = String::new();
    let (mut id, mut secret) = (None, None);
    for line in text.lines().map(str::trim) {
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.trim().to_string();
        } else if section == profile
            && let Some((k, v)) = line.split_once('=')
        {
            match k.trim() {
                "aws_access_key_id" => id = Some(v.trim().to_string()),
                "aws_secret_access_key" => secret = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    match (id, secret) {
        (Some(i), Some(s)) => Ok((i, s)),
        _ => bail!(
            "credentials {}: no aws_access_key_id and aws_secret_access_key in [{profile}]",
            path.display()
        ),
    }
}

impl S3Tier {
    /// `rest` is `BUCKET/PREFIX` (the prefix may be empty).
    fn open(rest: &str, cfg: &TierConfig) -> Result<S3Tier> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("tier {:?}: no bucket", cfg.url);
        }
        let prefix = prefix.trim_matches('/').to_string();
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_virtual_hosted_style_request(false)
            .with_retry(RetryConfig {
                max_retries: 8,
                retry_timeout: Duration::from_secs(30),
                ..RetryConfig::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(3))
                    .with_timeout(Duration::from_secs(30)),
            );
        let endpoint = cfg
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        if let Some(e) = &endpoint {
            b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
        }
        let region = cfg
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .unwrap_or_else(|| "us-east-1".to_string());
        b = b.with_region(region);
        if let Some(path) = &cfg.credentials {
            let (id, secret) = read_credentials(path)?;
            b = b.with_access_key_id(id).with_secret_access_key(secret);
        }
        let store = b.build().map_err(|e| anyhow!("tier {}: {e}", cfg.url))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tier")
            .enable_all()
            .build()
            .context("starting the tier's runtime")?;
        Ok(S3Tier {
            store: Arc::new(store),
            prefix,
            url: format!("s3://{}", rest.trim_end_matches('/')),
            rt,
        })
    }

    fn path(&self, key: &str) -> object_store::path::Path {
        if self.prefix.is_empty() {
            object_store::path::Path::from(key)
        } else {
            object_store::path::Path::from(format!("{}/{key}", self.prefix))
        }
    }

    /// Runs `fut` on the tier's runtime and waits for it from this (any) thread.
    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .expect("the tier's runtime runs until the tier is dropped")
    }
}

/// object_store's errors name the whole chain; its Display is one line already.
fn tier_error(e: object_store::Error) -> TierError {
    TierError(e.to_string())
}

impl Tier for S3Tier {
    fn url(&self) -> &str {
        &self.url
    }

    fn get(&self, key: &str) -> std::result::Result<Option<Vec<u8>>, TierError> {
        let store = self.store.clone();
        let path = self.path(key);
        self.run(async move {
            match store.get(&path).await {
                Ok(r) => r.bytes().await.map(|b| Some(b.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .map_err(tier_error)
    }

    fn put(&self, key: &str, bytes: &[u8]) -> std::result::Result<(), TierError> {
        let store = self.store.clone();
        let path = self.path(key);
        let payload = PutPayload::from(bytes::Bytes::copy_from_slice(bytes));
        self.run(async move { store.put(&path, payload).await.map(|_| ()) })
            .map_err(tier_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> TierConfig {
        TierConfig {
            url: url.to_string(),
            ..TierConfig::default()
        }
    }

    #[test]
    fn bad_urls_and_credentials_are_refused_with_what_is_wrong() {
        let e = open(&config("ftp://x/y")).unwrap_err().to_string();
        assert!(e.contains("ftp://x/y") && e.contains("s3://BUCKET"), "{e}");
        let e = open(&config("s3:///prefix")).unwrap_err().to_string();
        assert!(e.contains("no bucket"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        std::fs::write(&creds, "[other]\naws_access_key_id = a\n").unwrap();
        let mut c = config("s3://bucket/p");
        c.credentials = Some(creds);
        let e = format!("{:#}", open(&c).unwrap_err());
        assert!(
            e.contains("aws_secret_access_key") && e.contains("credentials"),
            "{e}"
        );
    }

    #[test]
    fn a_directory_tier_records_its_format_and_refuses_another() {
        let dir = tempfile::tempdir().unwrap();
        let t = open(&config(dir.path().to_str().unwrap())).unwrap();
        assert_eq!(t.get("format").unwrap().unwrap(), FORMAT.as_bytes());
        let e = t.get("../escape").unwrap_err().to_string();
        assert!(e.contains("not a relative path"), "{e}");
        std::fs::write(dir.path().join("format"), "tidedge-tier-9").unwrap();
        let url = format!("file://{}", dir.path().display());
        let e = open(&config(&url)).unwrap_err().to_string();
        assert!(e.contains("tidedge-tier-9"), "{e}");
    }
}
