//! Untrusted archives: each bad input gets a clear error naming what is wrong, and the
//! store keeps exactly what it had (no new name; the old image exports intact; after gc
//! the store is byte-for-byte the same size).

use std::path::{Path, PathBuf};

use tests::fstree::assert_same;
use tests::tide::{Tide, sh};

struct Env {
    tmp: tempfile::TempDir,
    tide: Tide,
    before: serde_json::Value,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("tide-bad")
            .tempdir_in("/var/tmp")
            .unwrap();
        tests::fixture::build(&tmp.path().join("good"));
        let tide = Tide::new(tmp.path().join("store"));
        tide.ok(&[
            "image",
            "import",
            tmp.path().join("good").to_str().unwrap(),
            "--name",
            "good:1",
        ]);
        let before = tide.json(&["stats"]);
        Env { tmp, tide, before }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A tar made by Python's tarfile module from a script body that uses `t` (the open
    /// TarFile) and `info(name, **kw)` / `data(name, bytes)` helpers.
    fn py_tar(&self, name: &str, body: &str) -> PathBuf {
        let out = self.path(name);
        let script = format!(
            r#"
import io, tarfile
t = tarfile.open({out:?}, "w", format=tarfile.PAX_FORMAT)
def info(name, **kw):
    i = tarfile.TarInfo(name)
    for k, v in kw.items(): setattr(i, k, v)
    t.addfile(i)
def data(name, b):
    i = tarfile.TarInfo(name); i.size = len(b); t.addfile(i, io.BytesIO(b))
{body}
t.close()
"#,
            out = out.to_str().unwrap()
        );
        let o = std::process::Command::new("python3")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "python: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    }

    /// Imports `path`, expects failure with every one of `needles` in the message, then
    /// checks nothing stored before changed.
    fn rejects(&self, path: &Path, needles: &[&str]) {
        let err = self
            .tide
            .fails(&["image", "import", path.to_str().unwrap(), "--name", "bad:1"]);
        assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
        for n in needles {
            assert!(err.contains(n), "error {err:?} does not mention {n:?}");
        }
        self.unchanged();
    }

    fn unchanged(&self) {
        let names: Vec<String> = self
            .tide
            .json(&["image", "ls"])
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            names,
            vec!["good:1".to_string()],
            "a half-imported image is visible"
        );
        let out = self.path(&format!("check-{}", rand_suffix()));
        self.tide
            .ok(&["image", "export", "good:1", "--to", out.to_str().unwrap()]);
        assert_same(&self.path("good"), &out);
        std::fs::remove_dir_all(&out).unwrap();
        assert_eq!(
            self.tide.json(&["fsck"])["problems"]
                .as_array()
                .unwrap()
                .len(),
            0
        );
        self.tide.ok(&["gc"]);
        let after = self.tide.json(&["stats"]);
        for k in [
            "chunks",
            "unique_bytes",
            "stored_bytes",
            "images",
            "layers",
            "trees",
            "blobs",
        ] {
            assert_eq!(self.before[k], after[k], "{k} changed");
        }
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn dotdot_component() {
    let e = Env::new();
    let t = e.py_tar(
        "dotdot.tar",
        "data('ok', b'x'*500)\ndata('a/../../evil', b'pwned')",
    );
    e.rejects(&t, &["a/../../evil", ".."]);
}

#[test]
fn absolute_path() {
    let e = Env::new();
    let t = e.py_tar("abs.tar", "data('/etc/passwd', b'root::0:0')");
    e.rejects(&t, &["/etc/passwd", "absolute"]);
}

#[test]
fn symlink_then_write_through_it() {
    let e = Env::new();
    let t = e.py_tar(
        "through.tar",
        "info('escape', type=tarfile.SYMTYPE, linkname='/etc')\ndata('escape/passwd', b'root::0:0')",
    );
    e.rejects(&t, &["escape/passwd", "symlink"]);
}

#[test]
fn hardlink_to_outside_and_to_nothing() {
    let e = Env::new();
    let t = e.py_tar(
        "hl-out.tar",
        "info('h', type=tarfile.LNKTYPE, linkname='../../etc/shadow')",
    );
    e.rejects(&t, &["\"h\"", "hardlink target"]);
    let t = e.py_tar(
        "hl-abs.tar",
        "info('h', type=tarfile.LNKTYPE, linkname='/etc/shadow')",
    );
    e.rejects(&t, &["\"h\"", "absolute"]);
    let t = e.py_tar(
        "hl-missing.tar",
        "info('h', type=tarfile.LNKTYPE, linkname='not/here')",
    );
    e.rejects(&t, &["\"h\"", "not a file earlier in this layer"]);
}

#[test]
fn huge_header_sizes() {
    let e = Env::new();
    // A regular file that claims 1 TiB and then the archive ends.
    let t = e.py_tar("huge.tar", "data('small', b'x'*1000)");
    let mut bytes = std::fs::read(&t).unwrap();
    // Find the header of 'small' and rewrite its size field (octal, 12 bytes at 124).
    let hdr = bytes.windows(6).position(|w| w == b"small\0").unwrap();
    bytes[hdr + 124..hdr + 136].copy_from_slice(b"20000000000\0");
    let sum: u32 = bytes[hdr..hdr + 512]
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum();
    bytes[hdr + 148..hdr + 156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let huge = e.path("huge-size.tar");
    std::fs::write(&huge, &bytes).unwrap();
    e.rejects(&huge, &["truncated"]);
    // A PAX header claiming a gigabyte is refused before anything is allocated.
    let mut pax = vec![0u8; 512];
    pax[..9].copy_from_slice(b"PaxHeader");
    pax[100..108].copy_from_slice(b"0000644\0");
    pax[124..136].copy_from_slice(b"10000000000\0");
    pax[156] = b'x';
    pax[257..263].copy_from_slice(b"ustar\0");
    let sum: u32 = pax
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum();
    pax[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    pax.extend_from_slice(&[b'1'; 4096]);
    let p = e.path("huge-pax.tar");
    std::fs::write(&p, &pax).unwrap();
    e.rejects(&p, &["PAX header", "exceeds the limit"]);
}

#[test]
fn truncated_and_corrupt_gzip_and_zstd() {
    let e = Env::new();
    sh(&format!(
        "cd {} && tar -cf {1}/base.tar . && gzip -k {1}/base.tar && zstd -q -k {1}/base.tar",
        e.path("good").display(),
        e.tmp.path().display()
    ));
    for ext in ["gz", "zst"] {
        let full = std::fs::read(e.path(&format!("base.tar.{ext}"))).unwrap();
        let cut = e.path(&format!("cut.tar.{ext}"));
        std::fs::write(&cut, &full[..full.len() / 2]).unwrap();
        e.rejects(&cut, &[cut.to_str().unwrap()]);
        let mut bad = full.clone();
        let mid = bad.len() / 2;
        for b in &mut bad[mid..mid + 64] {
            *b ^= 0x5a;
        }
        let corrupt = e.path(&format!("corrupt.tar.{ext}"));
        std::fs::write(&corrupt, &bad).unwrap();
        e.rejects(&corrupt, &[corrupt.to_str().unwrap()]);
    }
    // A tar cut in the middle of a member, and garbage that is not a tar at all.
    let full = std::fs::read(e.path("base.tar")).unwrap();
    let cut = e.path("cut.tar");
    std::fs::write(&cut, &full[..full.len() / 3]).unwrap();
    e.rejects(&cut, &["truncated", cut.to_str().unwrap()]);
    let garbage = e.path("garbage.tar");
    std::fs::write(&garbage, vec![0x42u8; 4096]).unwrap();
    e.rejects(&garbage, &["checksum"]);
}

#[test]
fn big_members_cut_or_corrupted_name_the_archive_and_the_entry() {
    // A member above 16 MiB is read as a stream (not into memory), which had its own
    // error path: it named the entry, not the archive.
    let e = Env::new();
    let src = e.path("bigsrc");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("big"), castore::testing::noise(24 << 20, 3)).unwrap();
    sh(&format!(
        "cd {} && tar -cf {1}/big.tar . && gzip -k {1}/big.tar",
        src.display(),
        e.tmp.path().display()
    ));
    for ext in ["tar", "tar.gz"] {
        let full = std::fs::read(e.path(&format!("big.{ext}"))).unwrap();
        let cut = e.path(&format!("cut-big.{ext}"));
        std::fs::write(&cut, &full[..full.len() / 2]).unwrap();
        e.rejects(&cut, &[cut.to_str().unwrap(), "./big"]);
    }
    // Damage in the middle of the member's compressed data: deflate decodes it without
    // noticing, and only the checksum at the end finds it. The message must not place
    // it after the archive's end.
    let mut bad = std::fs::read(e.path("big.tar.gz")).unwrap();
    let mid = bad.len() / 2;
    for b in &mut bad[mid..mid + 64] {
        *b ^= 0x5a;
    }
    let corrupt = e.path("corrupt-big.tar.gz");
    std::fs::write(&corrupt, &bad).unwrap();
    let err = e.tide.fails(&[
        "image",
        "import",
        corrupt.to_str().unwrap(),
        "--name",
        "bad:1",
    ]);
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(
        err.contains(corrupt.to_str().unwrap()) && err.contains("corrupt compressed data"),
        "{err}"
    );
    assert!(!err.contains("after the archive's end"), "{err}");
    e.unchanged();
}

#[test]
fn the_summary_counts_what_the_layer_holds() {
    // `x` is a file, then a directory holding `y`; `h2` is a hardlink to `h`. The layer
    // holds two regular files (y and h, once), 9 bytes.
    let e = Env::new();
    let t = e.py_tar(
        "replaced.tar",
        "data('x', b'abcd')\ninfo('x', type=tarfile.DIRTYPE, mode=0o755)\ndata('x/y', b'efgh')\n\
         data('h', b'12345')\ninfo('h2', type=tarfile.LNKTYPE, linkname='h')",
    );
    let r = e
        .tide
        .json(&["image", "import", t.to_str().unwrap(), "--name", "r:1"]);
    assert_eq!(
        (r["files"].as_u64(), r["logical_bytes"].as_u64()),
        (Some(2), Some(9)),
        "{r}"
    );
    let ls = e.tide.json(&["image", "ls"]);
    let img = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "r:1")
        .unwrap();
    assert_eq!(img["size"], 9, "{ls}");
    e.tide.ok(&["image", "rm", "r:1"]);
    // A one-file layer says "1 file".
    let t = e.py_tar("one.tar", "data('only', b'abcd')");
    let out = e
        .tide
        .ok(&["image", "import", t.to_str().unwrap(), "--name", "one:1"]);
    assert!(out.contains(": 1 file, 4 B in "), "{out}");
    e.tide.ok(&["image", "rm", "one:1"]);
    e.unchanged();
}

/// Writes a one-layer OCI layout whose layer is `layer_tar` (gzip), optionally breaking it.
fn oci_layout(dir: &Path, layer_tar: &Path, break_it: &str) {
    let gz = dir.join("layer.tar.gz");
    sh(&format!(
        "mkdir -p {0}/blobs/sha256 && gzip -c {1} > {2}",
        dir.display(),
        layer_tar.display(),
        gz.display()
    ));
    let diff_id = castore::Digest::of(&std::fs::read(layer_tar).unwrap());
    let layer_bytes = std::fs::read(&gz).unwrap();
    let layer_d = castore::Digest::of(&layer_bytes);
    let put = |bytes: &[u8]| {
        let d = castore::Digest::of(bytes);
        std::fs::write(dir.join("blobs/sha256").join(d.to_hex()), bytes).unwrap();
        d
    };
    if break_it != "missing-layer" {
        put(&layer_bytes);
    }
    let diff = if break_it == "wrong-diff-id" {
        castore::Digest::of(b"other")
    } else {
        diff_id
    };
    let config = serde_json::json!({
        "architecture": castore::host_arch(), "os": "linux",
        "config": {"Env": ["PATH=/usr/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff.to_string()]}
    });
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_d = if break_it == "missing-config" {
        castore::Digest::of(&config_bytes)
    } else {
        put(&config_bytes)
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_d.to_string(), "size": config_bytes.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_d.to_string(), "size": layer_bytes.len()}]
    });
    let m = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": m.to_string(), "size": 1}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

#[test]
fn oci_manifest_naming_missing_blobs_or_wrong_digests() {
    let e = Env::new();
    sh(&format!(
        "cd {} && tar -cf {}/l.tar .",
        e.path("good").display(),
        e.tmp.path().display()
    ));
    let layer_tar = e.path("l.tar");
    for (case, needle) in [
        ("missing-layer", "missing"),
        ("missing-config", "missing"),
        ("wrong-diff-id", "diff_id"),
    ] {
        let dir = e.path(&format!("oci-{case}"));
        oci_layout(&dir, &layer_tar, case);
        e.rejects(&dir, &[needle]);
    }
    // And the unbroken layout imports, to show the cases above fail for their reason.
    let dir = e.path("oci-ok");
    oci_layout(&dir, &layer_tar, "");
    e.tide
        .ok(&["image", "import", dir.to_str().unwrap(), "--name", "oci:ok"]);
    e.tide.ok(&["image", "rm", "oci:ok"]);
    e.unchanged();
}

#[test]
fn docker_archive_naming_a_missing_layer() {
    let e = Env::new();
    let d = e.path("docker");
    std::fs::create_dir_all(&d).unwrap();
    let config = serde_json::json!({"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": [castore::Digest::of(b"x").to_string()]}});
    std::fs::write(d.join("cfg.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    std::fs::write(
        d.join("manifest.json"),
        br#"[{"Config":"cfg.json","RepoTags":["x:1"],"Layers":["abc/layer.tar"]}]"#,
    )
    .unwrap();
    sh(&format!(
        "cd {} && tar -cf ../docker.tar manifest.json cfg.json",
        d.display()
    ));
    e.rejects(&e.path("docker.tar"), &["abc/layer.tar", "missing"]);
}
