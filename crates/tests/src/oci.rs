//! Multi-layer OCI images made from real trees: layer tars written by GNU tar, upper
//! layers as diffs of two roots (with OCI whiteouts for deletions and opaque markers),
//! and OCI image layouts that share their blobs.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::tide::sh;

/// Writes the tar of `root` (everything, or only `list` when given: NUL-separated
/// `./PATH` entries, not recursed into) to `out`.
pub fn tar(root: &Path, list: Option<&Path>, out: &Path) {
    let files = match list {
        Some(l) => format!("--null --no-recursion -T {}", l.display()),
        None => ".".to_string(),
    };
    sh(&format!(
        "tar --numeric-owner --xattrs --xattrs-include='*' -C {} -cf {} {files}",
        root.display(),
        out.display()
    ));
}

/// How an upper layer differs from its lower root besides what `upper` adds or changes.
#[derive(Debug, Default, Clone)]
pub struct Changes<'a> {
    /// Paths (relative, present in the lower root) the layer deletes: each becomes an
    /// OCI whiteout `.wh.NAME` and nothing below it is in the layer.
    pub delete: &'a [&'a str],
    /// Directories (relative) the layer makes opaque: `.wh..wh..opq` hides everything
    /// the lower layers had there, and the layer carries the directory's whole content.
    pub opaque: &'a [&'a str],
}

/// Writes to `out` the tar of a layer that turns the tree `lower` into `upper` with
/// `changes` applied: every directory of `upper` (so parents exist), every file or link
/// that is new or differs, the whiteouts and the opaque markers. Returns how many
/// non-directories it holds.
pub fn diff_tar(lower: &Path, upper: &Path, changes: &Changes<'_>, out: &Path) -> usize {
    let list = out.with_extension("list");
    let n = diff_list(lower, upper, changes, &list);
    tar(upper, Some(&list), out);
    if changes.delete.is_empty() && changes.opaque.is_empty() {
        return n;
    }
    // The markers are empty files in a staging tree, appended without their parents
    // (the parents are in the tar already, with upper's metadata).
    let staging = out.with_extension("markers");
    let mut markers = Vec::new();
    let mut add = |rel: &Path| {
        let p = staging.join(rel);
        std::fs::create_dir_all(p.parent().expect("a parent")).unwrap();
        std::fs::write(&p, b"").unwrap();
        markers.extend_from_slice(b"./");
        markers.extend_from_slice(rel.as_os_str().as_encoded_bytes());
        markers.push(0);
    };
    for d in changes.delete {
        let rel = Path::new(d);
        assert!(
            std::fs::symlink_metadata(lower.join(rel)).is_ok(),
            "{d} is not in the lower root"
        );
        let name = rel.file_name().expect("a name").to_string_lossy();
        add(&rel.with_file_name(format!(".wh.{name}")));
    }
    for d in changes.opaque {
        add(&Path::new(d).join(".wh..wh..opq"));
    }
    let mlist = out.with_extension("markers.list");
    std::fs::write(&mlist, markers).unwrap();
    sh(&format!(
        "tar --numeric-owner -C {} -rf {} --null --no-recursion -T {}",
        staging.display(),
        out.display(),
        mlist.display()
    ));
    n + changes.delete.len() + changes.opaque.len()
}

/// Writes the entry list of [`diff_tar`] (without the markers) to `out`: NUL-separated
/// `./PATH`. Returns how many non-directories it names.
pub fn diff_list(lower: &Path, upper: &Path, changes: &Changes<'_>, out: &Path) -> usize {
    struct Walk<'a> {
        lower: &'a Path,
        upper: &'a Path,
        changes: &'a Changes<'a>,
        out: Vec<u8>,
        n: usize,
    }
    impl Walk<'_> {
        fn walk(&mut self, rel: &Path, everything: bool) {
            let mut entries: Vec<_> = std::fs::read_dir(self.upper.join(rel))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            entries.sort();
            for name in entries {
                let r = rel.join(&name);
                if self.changes.delete.iter().any(|d| Path::new(d) == r) {
                    continue;
                }
                let all = everything || self.changes.opaque.iter().any(|d| Path::new(d) == r);
                let u = std::fs::symlink_metadata(self.upper.join(&r)).unwrap();
                let l = std::fs::symlink_metadata(self.lower.join(&r)).ok();
                let changed = match &l {
                    None => true,
                    Some(l) => {
                        l.mode() != u.mode()
                            || l.size() != u.size()
                            || l.mtime() != u.mtime()
                            || (u.file_type().is_symlink()
                                && std::fs::read_link(self.lower.join(&r)).ok()
                                    != std::fs::read_link(self.upper.join(&r)).ok())
                    }
                };
                if u.is_dir() || changed || everything {
                    self.out.extend_from_slice(b"./");
                    self.out.extend_from_slice(r.as_os_str().as_encoded_bytes());
                    self.out.push(0);
                    if !u.is_dir() {
                        self.n += 1;
                    }
                }
                if u.is_dir() {
                    self.walk(&r, all);
                }
            }
        }
    }
    let mut w = Walk {
        lower,
        upper,
        changes,
        out: Vec::new(),
        n: 0,
    };
    w.walk(Path::new(""), false);
    std::fs::write(out, &w.out).unwrap();
    w.n
}

/// Shared OCI blobs; each image is a layout directory hard-linking them.
#[derive(Debug)]
pub struct Blobs {
    dir: PathBuf,
}

impl Blobs {
    /// Blobs kept in `dir` (created).
    pub fn new(dir: &Path) -> Blobs {
        std::fs::create_dir_all(dir).unwrap();
        Blobs {
            dir: dir.to_path_buf(),
        }
    }

    /// Stores `bytes`: (digest, size).
    pub fn put(&self, bytes: &[u8]) -> (castore::Digest, usize) {
        let d = castore::Digest::of(bytes);
        std::fs::write(self.dir.join(d.to_hex()), bytes).unwrap();
        (d, bytes.len())
    }

    /// A layer blob from an uncompressed tar file: (digest, size); the diff id is the
    /// same digest.
    pub fn layer(&self, tar: &Path) -> (castore::Digest, usize) {
        self.put(&std::fs::read(tar).unwrap())
    }

    /// An OCI layout at `dir` of image `name` with `layers` (bottom first).
    pub fn image(&self, dir: &Path, name: &str, layers: &[(castore::Digest, usize)]) {
        let cfg = serde_json::to_vec(&serde_json::json!({
            "architecture": castore::host_arch(), "os": "linux",
            "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers",
                       "diff_ids": layers.iter().map(|l| l.0.to_string()).collect::<Vec<_>>()}
        }))
        .unwrap();
        let c = self.put(&cfg);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": c.0.to_string(), "size": c.1},
            "layers": layers.iter().map(|(d, n)| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": d.to_string(), "size": n})).collect::<Vec<_>>()
        });
        let m = self.put(&serde_json::to_vec(&manifest).unwrap());
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": m.0.to_string(), "size": m.1,
            "annotations": {"org.opencontainers.image.ref.name": name}}]});
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        for d in layers.iter().map(|l| l.0).chain([c.0, m.0]) {
            let hex = d.to_hex();
            let to = blobs.join(&hex);
            if !to.exists() {
                std::fs::hard_link(self.dir.join(&hex), to).unwrap();
            }
        }
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    }
}

/// The three Debian roots as one image of three layers, the upper two real diffs with
/// deletions and an opaque directory: minbase; python3 on top, deleting
/// `/usr/share/man` and `/var/cache/debconf/templates.dat-old` as a slimmed image
/// would; flask on top of that, with `/usr/share/doc` opaque (only the documentation
/// its packages install remains). Writes the layout to `dir` and returns it.
pub fn debian_three_layers(tmp: &Path, dir: &Path, name: &str) -> PathBuf {
    let minbase = crate::roots::debian_root("minbase");
    let python3 = crate::roots::debian_root("python3");
    let flask = crate::roots::debian_root("flask");
    let blobs = Blobs::new(&tmp.join("blobs"));
    let base = tmp.join("minbase.tar");
    tar(&minbase, None, &base);
    let fw = tmp.join("python3.tar");
    let deleted = ["usr/share/man", "var/cache/debconf/templates.dat-old"];
    let changes = Changes {
        delete: &deleted,
        opaque: &[],
    };
    let n = diff_tar(&minbase, &python3, &changes, &fw);
    assert!(n > 100, "python3 adds only {n} files to minbase?");
    let app = tmp.join("flask.tar");
    let changes = Changes {
        delete: &[],
        opaque: &["usr/share/doc"],
    };
    diff_tar(&python3, &flask, &changes, &app);
    let layers = [blobs.layer(&base), blobs.layer(&fw), blobs.layer(&app)];
    blobs.image(dir, name, &layers);
    dir.to_path_buf()
}
