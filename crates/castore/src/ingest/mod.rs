//! Import: directories, tars (plain, gzip, zstd), OCI image layouts and `docker save`
//! archives become layers and images. Nothing is visible until the final write, which
//! commits trees, layers, the image and its name in one synced batch.

mod dir;
mod oci;
mod pipeline;
mod remote;
mod tar;
mod tree;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

pub use pipeline::Progress;
pub use remote::{OpenBlob, RemoteImage, RemoteImportReport, RemoteLayer};

use crate::Digest;
use crate::db::{Batch, Cf};
use crate::digest::HashingReader;
use crate::error::{Error, Result};
use crate::model::{Image, ImageConfig, Kind, Layer};
use crate::store::Store;
use pipeline::Ingest;
use tree::BuildTree;

/// OCI whiteout prefix: `.wh.NAME` deletes `NAME` from lower layers.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// OCI opaque marker: hides everything lower layers have in its directory.
pub const OPAQUE: &[u8] = b".wh..wh..opq";

/// What an import path holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    /// A directory tree (a root filesystem).
    Dir,
    /// A tar archive, plain or gzip- or zstd-compressed.
    Tar,
    /// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/`).
    Oci,
    /// A `docker save` archive (a tar with `manifest.json`).
    Docker,
}

impl SourceFormat {
    /// Parses a format name as users type it.
    pub fn parse(s: &str) -> Option<SourceFormat> {
        match s {
            "dir" => Some(SourceFormat::Dir),
            "tar" => Some(SourceFormat::Tar),
            "oci" => Some(SourceFormat::Oci),
            "docker" => Some(SourceFormat::Docker),
            _ => None,
        }
    }

    /// Looks at `path`: a directory with `oci-layout` is OCI, another directory is a root;
    /// a plain tar whose members include `manifest.json` is a docker archive.
    pub fn detect(path: &Path) -> Result<SourceFormat> {
        let md = std::fs::metadata(path).map_err(|e| Error::io("stat", path, e))?;
        if md.is_dir() {
            return Ok(if path.join("oci-layout").is_file() {
                SourceFormat::Oci
            } else {
                SourceFormat::Dir
            });
        }
        if oci::is_docker_archive(path)? {
            Ok(SourceFormat::Docker)
        } else {
            Ok(SourceFormat::Tar)
        }
    }
}

/// How to import.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Force a format instead of detecting it.
    pub format: Option<SourceFormat>,
    /// Counters to watch from another thread.
    pub progress: Arc<Progress>,
    /// What to change in the image's config (what it runs), over what the input says.
    pub config: ConfigOverride,
}

/// Changes to an image's config given at import (`tide image import --entrypoint ...`),
/// so that a plain directory or tar becomes a runnable image, or an OCI image's config
/// is adjusted. Unset fields keep what the input says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigOverride {
    /// Replaces the entrypoint.
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the default arguments.
    pub cmd: Option<Vec<String>>,
    /// `KEY=VALUE` entries: each replaces the input's entry of that key, or is added.
    pub env: Vec<String>,
    /// Replaces the working directory (absolute).
    pub workdir: Option<String>,
    /// Replaces the user (name, uid or uid:gid).
    pub user: Option<String>,
}

impl ConfigOverride {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == ConfigOverride::default()
    }

    /// Checks every field; the error names the field and the value.
    pub fn validate(&self) -> Result<()> {
        for e in &self.env {
            match e.split_once('=') {
                Some((k, _)) if !k.is_empty() && !k.contains(char::is_whitespace) => {}
                _ => {
                    return Err(Error::Refused(format!(
                        "env {e:?} is not KEY=VALUE (a non-empty key without spaces)"
                    )));
                }
            }
        }
        if let Some(w) = &self.workdir
            && !w.starts_with('/')
        {
            return Err(Error::Refused(format!(
                "workdir {w:?} is not an absolute path"
            )));
        }
        if let Some(u) = &self.user
            && (u.is_empty() || u.contains(char::is_whitespace) || u.matches(':').count() > 1)
        {
            return Err(Error::Refused(format!(
                "user {u:?} is not NAME, UID or UID:GID"
            )));
        }
        for (what, v) in [("entrypoint", &self.entrypoint), ("cmd", &self.cmd)] {
            if v.as_ref().is_some_and(|v| v.iter().any(String::is_empty)) {
                return Err(Error::Refused(format!("{what} holds an empty argument")));
            }
        }
        Ok(())
    }

    /// Applies the changes to `c`.
    pub fn apply(&self, c: &mut ImageConfig) {
        if let Some(e) = &self.entrypoint {
            c.entrypoint = e.clone();
        }
        if let Some(e) = &self.cmd {
            c.cmd = e.clone();
        }
        for e in &self.env {
            let key = e.split_once('=').map_or(e.as_str(), |(k, _)| k);
            match c
                .env
                .iter_mut()
                .find(|x| x.split_once('=').is_some_and(|(k, _)| k == key))
            {
                Some(x) => *x = e.clone(),
                None => c.env.push(e.clone()),
            }
        }
        if let Some(w) = &self.workdir {
            c.workdir = w.clone();
        }
        if let Some(u) = &self.user {
            c.user = u.clone();
        }
    }
}

/// What an import did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ImportReport {
    /// The image created (absent for `layer import`).
    pub image: Option<Digest>,
    /// The name it was given.
    pub name: Option<String>,
    /// Its layers, lowest first.
    pub layers: Vec<Digest>,
    /// Regular files the imported layers hold: a hardlinked file once, and a file that
    /// a later entry of the same archive replaced (by a directory, say) not at all.
    pub files: u64,
    /// Content bytes of those files.
    pub logical_bytes: u64,
    /// Chunks cut from everything read (replaced entries' content too).
    pub chunks: u64,
    /// Chunks that were not stored before.
    pub new_chunks: u64,
    /// Raw bytes of those chunks.
    pub new_chunk_bytes: u64,
    /// Bytes they take compressed.
    pub new_stored_bytes: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// One layer to read: a name for messages, how to open its (possibly compressed) tar,
/// and the digests it must match.
pub(crate) struct LayerInput<'a> {
    pub(crate) name: String,
    pub(crate) open: Box<dyn FnMut() -> Result<Box<dyn Read + Send>> + 'a>,
    /// Digest of the bytes as stored (compressed), from the manifest.
    pub(crate) blob_digest: Option<Digest>,
    /// `diff_id`: digest of the uncompressed tar, from the config.
    pub(crate) diff_id: Option<Digest>,
}

/// An image read from OCI or docker metadata, before its layers are ingested.
pub(crate) struct ImageInput<'a> {
    pub(crate) layers: Vec<LayerInput<'a>>,
    pub(crate) config: ImageConfig,
    /// A name the archive suggests (OCI `ref.name` annotation, docker `RepoTags`).
    pub(crate) name: Option<String>,
}

/// Wraps `r` in the decompressor its first bytes call for.
pub(crate) fn decompress<'a>(
    r: impl Read + Send + 'a,
    source_name: &str,
) -> Result<Box<dyn Read + Send + 'a>> {
    let mut br = BufReader::with_capacity(256 * 1024, r);
    let head = br
        .fill_buf()
        .map_err(|e| Error::io("read", source_name, e))?
        .to_vec();
    let bad = |reason: &str| Error::BadInput {
        source_name: source_name.to_string(),
        reason: reason.to_string(),
    };
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(br))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::Decoder::with_buffer(br).map_err(|e| Error::io("zstd", source_name, e))?)
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        return Err(bad(
            "xz-compressed archives are not supported (use gzip or zstd)",
        ));
    } else if head.starts_with(b"BZh") {
        return Err(bad(
            "bzip2-compressed archives are not supported (use gzip or zstd)",
        ));
    } else {
        Box::new(br)
    })
}

/// Reads the rest of a stream so its trailer (gzip CRC, zstd checksum) is verified.
/// That checksum covers the whole stream: a mismatch found here may be damage anywhere
/// in it (deflate often decodes damaged data without noticing), so the message does not
/// place it.
fn drain(r: &mut dyn Read, source_name: &str) -> Result<()> {
    std::io::copy(r, &mut std::io::sink()).map_err(|e| Error::BadInput {
        source_name: source_name.to_string(),
        reason: format!("corrupt compressed data: {e}"),
    })?;
    Ok(())
}

impl Store {
    /// Imports `path` as an image named `name` (which may come from the archive itself
    /// for OCI and docker inputs). All or nothing: on error no new name, image or layer
    /// is visible and nothing stored before changed.
    pub fn import_image(
        &self,
        path: &Path,
        name: Option<&str>,
        opts: &ImportOptions,
    ) -> Result<ImportReport> {
        if let Some(n) = name {
            crate::refname::validate(n)?;
        }
        opts.config.validate()?;
        let start = Instant::now();
        let format = match opts.format {
            Some(f) => f,
            None => SourceFormat::detect(path)?,
        };
        let ingest = Ingest::new(self, opts.progress.clone());
        let mut batch = Batch::new();
        let (layers, config, suggested) = match format {
            SourceFormat::Dir | SourceFormat::Tar => {
                let d = self.ingest_plain(&ingest, path, format, &mut batch)?;
                let config = ImageConfig {
                    architecture: host_arch().to_string(),
                    os: "linux".into(),
                    ..ImageConfig::default()
                };
                (vec![d], config, None)
            }
            SourceFormat::Oci | SourceFormat::Docker => {
                let input = if format == SourceFormat::Oci {
                    oci::read_layout(path)?
                } else {
                    oci::read_docker(path)?
                };
                let mut digests = Vec::new();
                for layer in input.layers {
                    digests.push(self.ingest_input(&ingest, layer, &mut batch)?.0);
                }
                (digests, input.config, input.name)
            }
        };
        let name = match (name, suggested) {
            (Some(n), _) => n.to_string(),
            (None, Some(n)) => {
                crate::refname::validate(&n)?;
                n
            }
            (None, None) => {
                return Err(Error::Refused(format!(
                    "{} carries no image name: give one with --name NAME:TAG",
                    path.display()
                )));
            }
        };
        let mut config = config;
        opts.config.apply(&mut config);
        let digest = self.commit_image(&ingest, batch, layers.clone(), config, &name)?;
        Ok(report(&ingest, Some(digest), Some(name), layers, start))
    }

    /// Writes image record and its name with everything `batch` holds: the chunks and
    /// blobs first (they were written without the WAL), then one synced batch with the
    /// trees, layers, image and name. Returns the image's digest.
    fn commit_image(
        &self,
        ingest: &Ingest<'_>,
        mut batch: Batch,
        layers: Vec<Digest>,
        config: ImageConfig,
        name: &str,
    ) -> Result<Digest> {
        let image = Image { layers, config };
        let bytes = image.encode();
        let digest = Digest::of(&bytes);
        ingest.claims.claim(digest);
        batch.put(&self.db, Cf::Images, &digest.0, &bytes);
        batch.put(&self.db, Cf::Refs, name.as_bytes(), &digest.0);
        ingest.make_durable()?;
        self.db.write(batch, true)?;
        self.bump_changes();
        Ok(digest)
    }

    /// Imports a directory or tar as a single layer, kept until `layer rm`.
    pub fn import_layer(&self, path: &Path, opts: &ImportOptions) -> Result<ImportReport> {
        if !opts.config.is_empty() {
            return Err(Error::Refused(
                "a lone layer has no config: give entrypoint, cmd, env, workdir or user to an image import"
                    .into(),
            ));
        }
        let start = Instant::now();
        let format = match opts.format {
            Some(f) => f,
            None => SourceFormat::detect(path)?,
        };
        if !matches!(format, SourceFormat::Dir | SourceFormat::Tar) {
            return Err(Error::Refused(format!(
                "{} is an image archive; use image import",
                path.display()
            )));
        }
        let ingest = Ingest::new(self, opts.progress.clone());
        let mut batch = Batch::new();
        let d = self.ingest_plain(&ingest, path, format, &mut batch)?;
        batch.put(&self.db, Cf::LayerRefs, &d.0, b"");
        ingest.make_durable()?;
        self.db.write(batch, true)?;
        self.bump_changes();
        Ok(report(&ingest, None, None, vec![d], start))
    }

    fn ingest_plain(
        &self,
        ingest: &Ingest<'_>,
        path: &Path,
        format: SourceFormat,
        batch: &mut Batch,
    ) -> Result<Digest> {
        let source_name = path.display().to_string();
        if format == SourceFormat::Dir {
            let (tree, files) = ingest.run(|p| {
                let mut tree = BuildTree::new();
                dir::walk(p, path, &mut tree)?;
                Ok(tree)
            })?;
            return self.finish_layer(ingest, &tree, &files, None, batch);
        }
        let file = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
        self.ingest_input(
            ingest,
            LayerInput {
                name: source_name,
                open: Box::new(move || {
                    Ok(Box::new(
                        file.try_clone().map_err(|e| Error::io("open", path, e))?,
                    ))
                }),
                blob_digest: None,
                diff_id: None,
            },
            batch,
        )
        .map(|(layer, _)| layer)
    }

    /// Ingests one tar layer, checking the digests the input promises. Returns the
    /// layer's digest and the bytes read from the input (as stored, compressed).
    fn ingest_input(
        &self,
        ingest: &Ingest<'_>,
        mut input: LayerInput<'_>,
        batch: &mut Batch,
    ) -> Result<(Digest, u64)> {
        let name = input.name.clone();
        let raw = (input.open)()?;
        let mut raw = HashingReader::new(raw);
        let (tree, files, diff_id) = {
            let (out, files) = ingest.run(|p| {
                let decompressed = decompress(&mut raw, &name)?;
                let mut plain = HashingReader::new(decompressed);
                let mut tree = BuildTree::new();
                let mut rest = tar::read(p, &mut plain, &mut tree, &name)?;
                drain(&mut rest, &name)?;
                Ok((tree, plain.finish().0))
            })?;
            (out.0, files, out.1)
        };
        drain(&mut raw, &name)?;
        let (blob_digest, read) = raw.finish();
        if let Some(want) = input.blob_digest
            && want != blob_digest
        {
            return Err(Error::BadInput {
                source_name: name,
                reason: format!("content is {blob_digest}, the manifest says {want}"),
            });
        }
        if let Some(want) = input.diff_id
            && want != diff_id
        {
            return Err(Error::BadInput {
                source_name: name,
                reason: format!(
                    "uncompressed content is {diff_id}, the config's diff_id says {want}"
                ),
            });
        }
        let layer = self.finish_layer(ingest, &tree, &files, Some(diff_id), batch)?;
        Ok((layer, read))
    }

    /// Encodes a built tree: new trees and the layer record go into `batch`.
    fn finish_layer(
        &self,
        ingest: &Ingest<'_>,
        tree: &BuildTree,
        files: &[Option<(crate::model::FileData, u64)>],
        diff_id: Option<Digest>,
        batch: &mut Batch,
    ) -> Result<Digest> {
        let (root, trees, counts) = tree.encode(files);
        debug_assert!(matches!(root.kind, Kind::Dir { .. }));
        use std::sync::atomic::Ordering::Relaxed;
        ingest.stats.files.fetch_add(counts.files, Relaxed);
        ingest.stats.bytes.fetch_add(counts.content_bytes, Relaxed);
        for (d, bytes) in trees {
            if ingest.claims.claim(d) && !self.db.contains(Cf::Trees, &d.0)? {
                batch.put(&self.db, Cf::Trees, &d.0, &bytes);
            }
        }
        let layer = Layer {
            root,
            root_described: tree.root_described,
            diff_id,
            entries: counts.entries,
            content_bytes: counts.content_bytes,
        };
        let bytes = layer.encode();
        let d = Digest::of(&bytes);
        ingest.claims.claim(d);
        batch.put(&self.db, Cf::Layers, &d.0, &bytes);
        Ok(d)
    }
}

fn report(
    ingest: &Ingest<'_>,
    image: Option<Digest>,
    name: Option<String>,
    layers: Vec<Digest>,
    start: Instant,
) -> ImportReport {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &ingest.stats;
    ImportReport {
        image,
        name,
        layers,
        files: s.files.load(Relaxed),
        logical_bytes: s.bytes.load(Relaxed),
        chunks: s.chunks.load(Relaxed),
        new_chunks: s.new_chunks.load(Relaxed),
        new_chunk_bytes: s.new_chunk_bytes.load(Relaxed),
        new_stored_bytes: s.new_stored_bytes.load(Relaxed),
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// This machine's architecture in OCI's words.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}
