//! OCI image layouts and `docker save` archives: their JSON is read into an
//! [`ImageInput`]; the layers themselves are tars ingested like any other.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::tar::{components, tar_error};
use super::{ImageInput, LayerInput};
use crate::Digest;
use crate::error::{Error, Result};
use crate::model::ImageConfig;
use crate::tarfmt::{TarKind, TarReader};

/// Largest JSON document (manifest, index, config) we read.
const MAX_JSON: u64 = 8 << 20;

fn bad(source: &Path, reason: impl Into<String>) -> Error {
    Error::BadInput {
        source_name: source.display().to_string(),
        reason: reason.into(),
    }
}

pub(super) fn parse_json(source: &Path, what: &str, bytes: &[u8]) -> Result<Value> {
    serde_json::from_slice(bytes).map_err(|e| bad(source, format!("{what} is not valid JSON: {e}")))
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The runtime config and diff_ids of an OCI/docker image config document.
pub(super) fn read_config(source: &Path, v: &Value) -> Result<(ImageConfig, Vec<Digest>)> {
    let c = v.get("config").or_else(|| v.get("Config"));
    let get = |k: &str| c.and_then(|c| c.get(k));
    let mut labels: Vec<(String, String)> = get("Labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    labels.sort();
    let config = ImageConfig {
        env: strings(get("Env")),
        entrypoint: strings(get("Entrypoint")),
        cmd: strings(get("Cmd")),
        workdir: get("WorkingDir")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        user: get("User")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        architecture: v
            .get("architecture")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        os: v
            .get("os")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        labels,
    };
    let diff_ids = v
        .get("rootfs")
        .and_then(|r| r.get("diff_ids"))
        .and_then(Value::as_array)
        .ok_or_else(|| bad(source, "image config has no rootfs.diff_ids"))?
        .iter()
        .map(|d| {
            d.as_str()
                .and_then(Digest::parse)
                .ok_or_else(|| bad(source, format!("bad diff_id {d}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((config, diff_ids))
}

fn digest_field(source: &Path, v: &Value, what: &str) -> Result<Digest> {
    let s = v
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(source, format!("{what} has no digest")))?;
    Digest::parse(s).ok_or_else(|| bad(source, format!("{what} digest {s:?} is not sha256:HEX")))
}

/// Reads a blob of an OCI layout, checking its digest.
fn read_blob(root: &Path, d: &Digest) -> Result<Vec<u8>> {
    let path = blob_path(root, d);
    let f = File::open(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            bad(root, format!("blob {d} named by the manifest is missing"))
        } else {
            Error::io("open", &path, e)
        }
    })?;
    let mut bytes = Vec::new();
    f.take(MAX_JSON + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io("read", &path, e))?;
    if bytes.len() as u64 > MAX_JSON {
        return Err(bad(
            root,
            format!("blob {d} is larger than {MAX_JSON} bytes"),
        ));
    }
    if Digest::of(&bytes) != *d {
        return Err(bad(root, format!("blob {d} does not match its digest")));
    }
    Ok(bytes)
}

fn blob_path(root: &Path, d: &Digest) -> PathBuf {
    root.join("blobs").join("sha256").join(d.to_hex())
}

/// Reads an OCI image layout: the first image manifest of `index.json` for this
/// machine's architecture (following nested indexes).
pub(crate) fn read_layout(root: &Path) -> Result<ImageInput<'static>> {
    let index_path = root.join("index.json");
    let index_bytes = std::fs::read(&index_path).map_err(|e| Error::io("read", &index_path, e))?;
    let mut doc = parse_json(root, "index.json", &index_bytes)?;
    let mut name = None;
    for _ in 0..4 {
        let manifests = doc
            .get("manifests")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(root, "index has no manifests"))?;
        let pick = manifests
            .iter()
            .find(|m| {
                m.get("platform")
                    .and_then(|p| p.get("architecture"))
                    .and_then(Value::as_str)
                    .is_none_or(|a| a == super::host_arch())
            })
            .ok_or_else(|| {
                bad(
                    root,
                    format!("no manifest for architecture {}", super::host_arch()),
                )
            })?;
        if name.is_none() {
            name = pick
                .get("annotations")
                .and_then(|a| a.get("org.opencontainers.image.ref.name"))
                .and_then(Value::as_str)
                .map(|r| {
                    // A full reference (`repo/app:v1`) names itself; a bare tag (`v1`) is
                    // taken as a tag of the layout directory's name.
                    if r.contains(':') {
                        r.to_string()
                    } else {
                        let dir = root
                            .file_name()
                            .map(|n| n.to_string_lossy().to_lowercase())
                            .unwrap_or_default();
                        format!("{dir}:{r}")
                    }
                });
        }
        let d = digest_field(root, pick, "manifest")?;
        let bytes = read_blob(root, &d)?;
        let m = parse_json(root, "manifest", &bytes)?;
        if m.get("layers").is_some() {
            return image_from_manifest(
                root,
                &m,
                name.filter(|n| crate::refname::validate(n).is_ok()),
            );
        }
        doc = m;
    }
    Err(bad(root, "image indexes nested too deeply"))
}

fn image_from_manifest(
    root: &Path,
    m: &Value,
    name: Option<String>,
) -> Result<ImageInput<'static>> {
    let config_d = digest_field(root, m.get("config").unwrap_or(&Value::Null), "config")?;
    let config_bytes = read_blob(root, &config_d)?;
    let (config, diff_ids) = read_config(root, &parse_json(root, "config", &config_bytes)?)?;
    let layers = m
        .get("layers")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(root, "manifest has no layers"))?;
    if layers.len() != diff_ids.len() {
        return Err(bad(
            root,
            format!(
                "manifest has {} layers, config has {} diff_ids",
                layers.len(),
                diff_ids.len()
            ),
        ));
    }
    let mut inputs = Vec::new();
    for (l, diff_id) in layers.iter().zip(diff_ids) {
        let d = digest_field(root, l, "layer")?;
        let path = blob_path(root, &d);
        if !path.is_file() {
            return Err(bad(
                root,
                format!("layer blob {d} named by the manifest is missing"),
            ));
        }
        inputs.push(LayerInput {
            name: format!("{} layer {}", root.display(), d.short()),
            open: Box::new(move || {
                Ok(
                    Box::new(File::open(&path).map_err(|e| Error::io("open", &path, e))?)
                        as Box<dyn Read + Send>,
                )
            }),
            blob_digest: Some(d),
            diff_id: Some(diff_id),
        });
    }
    Ok(ImageInput {
        layers: inputs,
        config,
        name,
    })
}

/// Members of an outer (uncompressed) tar: path → (data offset, size).
fn index_tar(path: &Path) -> Result<HashMap<String, (u64, u64)>> {
    let f = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let source_name = path.display().to_string();
    let mut t = TarReader::new(SeekSkip(BufReader::new(f)));
    let mut out = HashMap::new();
    while let Some(e) = t.next_entry().map_err(|e| tar_error(&source_name, e))? {
        if e.kind == Some(TarKind::File) && e.sparse.is_none() {
            let comps = components(&e.path).map_err(|r| Error::BadEntry {
                source_name: source_name.clone(),
                entry: String::from_utf8_lossy(&e.path).into_owned(),
                reason: r.to_string(),
            })?;
            let key = comps
                .iter()
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect::<Vec<_>>()
                .join("/");
            out.insert(key, (t.position(), e.data_size));
        }
        t.skip_data_fast().map_err(|e| tar_error(&source_name, e))?;
    }
    Ok(out)
}

/// A seekable reader that lets [`TarReader`] skip member data without reading it.
#[derive(Debug)]
pub(crate) struct SeekSkip<R>(pub(crate) R);

impl<R: Read> Read for SeekSkip<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: Seek> Seek for SeekSkip<R> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.0.seek(pos)
    }
}

/// Whether a file is an uncompressed tar with a top-level `manifest.json`.
pub(crate) fn is_docker_archive(path: &Path) -> Result<bool> {
    let mut f = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let mut head = [0u8; 512];
    if f.read_exact(&mut head).is_err() || &head[257..262] != b"ustar" {
        return Ok(false);
    }
    Ok(index_tar(path)
        .map(|m| m.contains_key("manifest.json"))
        .unwrap_or(false))
}

/// Reads a `docker save` archive's `manifest.json` and config; layers are read in place.
pub(crate) fn read_docker(path: &Path) -> Result<ImageInput<'static>> {
    let members = index_tar(path)?;
    let read_member = |name: &str| -> Result<Vec<u8>> {
        let &(off, size) = members
            .get(name)
            .ok_or_else(|| bad(path, format!("{name} named by manifest.json is missing")))?;
        if size > MAX_JSON {
            return Err(bad(path, format!("{name} is larger than {MAX_JSON} bytes")));
        }
        let mut f = File::open(path).map_err(|e| Error::io("open", path, e))?;
        f.seek(SeekFrom::Start(off))
            .map_err(|e| Error::io("seek", path, e))?;
        let mut v = vec![0u8; size as usize];
        f.read_exact(&mut v)
            .map_err(|e| Error::io("read", path, e))?;
        Ok(v)
    };
    let manifest = parse_json(path, "manifest.json", &read_member("manifest.json")?)?;
    let first = manifest
        .as_array()
        .and_then(|a| a.first())
        .ok_or_else(|| bad(path, "manifest.json lists no image"))?;
    let config_name = first
        .get("Config")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(path, "manifest.json has no Config"))?;
    let config_bytes = read_member(config_name)?;
    let (config, diff_ids) = read_config(path, &parse_json(path, config_name, &config_bytes)?)?;
    let layer_names = strings(first.get("Layers"));
    if layer_names.len() != diff_ids.len() {
        return Err(bad(
            path,
            format!(
                "manifest.json has {} layers, config has {} diff_ids",
                layer_names.len(),
                diff_ids.len()
            ),
        ));
    }
    let mut inputs = Vec::new();
    for (lname, diff_id) in layer_names.into_iter().zip(diff_ids) {
        let &(off, size) = members.get(&lname).ok_or_else(|| {
            bad(
                path,
                format!("layer {lname} named by manifest.json is missing"),
            )
        })?;
        let archive = path.to_path_buf();
        inputs.push(LayerInput {
            name: format!("{} member {lname}", path.display()),
            open: Box::new(move || {
                let mut f = File::open(&archive).map_err(|e| Error::io("open", &archive, e))?;
                f.seek(SeekFrom::Start(off))
                    .map_err(|e| Error::io("seek", &archive, e))?;
                Ok(Box::new(f.take(size)) as Box<dyn Read + Send>)
            }),
            blob_digest: None,
            diff_id: Some(diff_id),
        });
    }
    let name = strings(first.get("RepoTags"))
        .into_iter()
        .find(|n| crate::refname::validate(n).is_ok());
    Ok(ImageInput {
        layers: inputs,
        config,
        name,
    })
}
