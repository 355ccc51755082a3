//! EROFS images synthesized from layers, checked by the kernel and by erofs-utils:
//! the host kernel mounts the image file and the tree it shows equals the source,
//! `fsck.erofs` accepts it, `mkfs.erofs` of the same tree mounts to the same tree, the
//! bytes are the same in a fresh store, and an entry EROFS cannot hold is refused by path.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use castore::Digest;
use common::Env;
use layerfs::erofs::Image;

/// The only layer of `image`.
fn single_layer(env: &Env, image: Digest) -> Digest {
    let img = env.store.image(&image).expect("image record");
    assert_eq!(img.layers.len(), 1);
    img.layers[0]
}

/// Writes the image of `layer` to a file in the env and returns its path.
fn write_image(env: &Env, layer: &Digest, name: &str) -> (PathBuf, Image) {
    let image = Image::build(&env.store, layer).unwrap_or_else(|e| panic!("build: {e}"));
    let path = env.path(name);
    let mut f = std::fs::File::create(&path).unwrap();
    image.write_to(&env.store, &mut f).unwrap();
    (path, image)
}

/// A kernel mount of an image file; unmounted on drop.
struct KernelMount(PathBuf);

impl KernelMount {
    fn new(image: &Path, at: &Path) -> KernelMount {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "erofs", "-o", "ro"])
            .arg(image)
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount -t erofs {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        KernelMount(at.to_path_buf())
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn fsck(image: &Path) -> String {
    let out = Command::new("fsck.erofs")
        .arg(image)
        .output()
        .expect("fsck.erofs (erofs-utils) is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "fsck.erofs {}: {text}",
        image.display()
    );
    text
}

#[test]
fn fixture_image_mounts_identical_to_its_source() {
    let env = Env::new("erofs-fixture");
    let src = env.path("src");
    tests::fixture::build(&src);
    let img = env.import(&src, "fx:1");
    let layer = single_layer(&env, img);
    let (path, image) = write_image(&env, &layer, "fx.erofs");
    eprintln!("{:?}", image.report());
    fsck(&path);
    let m = KernelMount::new(&path, &env.path("mnt"));
    tests::fstree::assert_same(&src, &m.0);
}

#[test]
fn debian_minbase_image_mounts_identical_to_its_source() {
    let env = Env::new("erofs-debian");
    let src = tests::roots::ensure_debian_root("minbase").expect("minbase root");
    let img = env.import(&src, "minbase:1");
    let layer = single_layer(&env, img);
    let t = std::time::Instant::now();
    let (path, image) = write_image(&env, &layer, "minbase.erofs");
    eprintln!(
        "{:?} written in {:?}, memory {}",
        image.report(),
        t.elapsed(),
        image.memory_bytes()
    );
    eprintln!("{}", fsck(&path));
    let m = KernelMount::new(&path, &env.path("mnt"));
    tests::fstree::assert_same(&src, &m.0);
}

/// Mounts `lowers` (bottom first) with the kernel's overlayfs over an empty upper
/// directory whose root carries `root`'s mode, owner and mtime, as the guest's init
/// sets up its scratch (a layer's own root metadata is not the image's when the layer
/// does not describe its root).
struct OverlayMount(PathBuf);

impl OverlayMount {
    fn new(lowers: &[PathBuf], root: &Path, at: &Path) -> OverlayMount {
        let (upper, work) = (at.with_extension("upper"), at.with_extension("work"));
        for d in [at, &upper, &work] {
            std::fs::create_dir_all(d).unwrap();
        }
        common::sh(&format!(
            "chown --reference={0} {1} && chmod --reference={0} {1} && touch --reference={0} {1}",
            root.display(),
            upper.display()
        ));
        let lowerdir: Vec<String> = lowers
            .iter()
            .rev()
            .map(|p| p.display().to_string())
            .collect();
        let out = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                lowerdir.join(":"),
                upper.display(),
                work.display()
            ))
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount -t overlay: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        OverlayMount(at.to_path_buf())
    }
}

impl Drop for OverlayMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn debian_three_layers_stack_with_overlayfs_as_the_store_merges_them() {
    let env = Env::new("erofs-layers");
    let oci = tests::oci::debian_three_layers(&env.path("work"), &env.path("oci"), "flask:3");
    let img = env.import(&oci, "flask:3");
    let layers = env.store.image(&img).unwrap().layers;
    assert_eq!(layers.len(), 3);
    let mut mounts = Vec::new();
    let mut dirs = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let (path, image) = write_image(&env, l, &format!("l{i}.erofs"));
        eprintln!("layer {i}: {:?}", image.report());
        fsck(&path);
        let at = env.path(&format!("l{i}"));
        mounts.push(KernelMount::new(&path, &at));
        dirs.push(at);
    }
    let expected = env.path("expected");
    env.store
        .export_image(&img, &castore::ExportTarget::Dir(expected.clone()))
        .unwrap();
    let merged = OverlayMount::new(&dirs, &expected, &env.path("merged"));
    let a = tests::fstree::snapshot(&expected);
    let b = tests::fstree::snapshot(&merged.0);
    let diff = tests::fstree::diff(&a, &b);
    assert!(
        diff.is_empty(),
        "{} differences, first: {:#?}",
        diff.len(),
        &diff[..diff.len().min(20)]
    );
    drop(merged);
}

fn assert_no_diff(
    a: &std::collections::BTreeMap<PathBuf, tests::fstree::Info>,
    b: &std::collections::BTreeMap<PathBuf, tests::fstree::Info>,
    what: &str,
) {
    let d = tests::fstree::diff(a, b);
    assert!(
        d.is_empty(),
        "{what}: {} differences; first ones:\n{}",
        d.len(),
        d.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(a.len() > 10, "{what}: compared a near-empty tree");
}

/// `mkfs.erofs` (erofs-utils 1.5) of `src` into `out`, with 4 KiB chunk-based files so
/// sparse files keep their holes, as ours do.
fn mkfs_erofs(src: &Path, out: &Path) {
    let o = Command::new("mkfs.erofs")
        .arg("--chunksize=4096")
        .arg(out)
        .arg(src)
        .output()
        .expect("mkfs.erofs (erofs-utils) is installed");
    assert!(
        o.status.success(),
        "mkfs.erofs: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn mkfs_erofs_of_the_same_tree_mounts_to_the_same_tree() {
    let env = Env::new("erofs-peer");
    let src = env.path("src");
    tests::fixture::corners(&src);
    // mkfs.erofs 1.5 fails on 255-byte names ("Could not format the device"); ours
    // are checked by the guest kernel in tests/guest_erofs.rs.
    for long in ["n", "d"] {
        let p = src.join("names").join(long.repeat(255));
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_dir(&p);
    }
    let img = env.import(&src, "corners:1");
    let layer = single_layer(&env, img);
    let (ours, image) = write_image(&env, &layer, "ours.erofs");
    let theirs = env.path("theirs.erofs");
    mkfs_erofs(&src, &theirs);
    eprintln!(
        "ours: {} B ({} B metadata); mkfs.erofs: {} B",
        image.size(),
        image.report().metadata_bytes,
        std::fs::metadata(&theirs).unwrap().len()
    );
    {
        let a = KernelMount::new(&ours, &env.path("ours"));
        let b = KernelMount::new(&theirs, &env.path("theirs"));
        let sa = tests::fstree::snapshot(&a.0);
        let sb = tests::fstree::snapshot(&b.0);
        assert_no_diff(&sa, &sb, "kernel mounts of our image and mkfs.erofs's");
    }
}

#[test]
fn a_layer_gives_the_same_bytes_in_a_fresh_store() {
    let src_env = Env::new("erofs-same-src");
    let src = src_env.path("src");
    tests::fixture::corners(&src);
    let mut digests = Vec::new();
    for i in 0..2 {
        let env = Env::new(&format!("erofs-same-{i}"));
        let img = env.import(&src, "corners:1");
        let layer = single_layer(&env, img);
        let (path, _) = write_image(&env, &layer, "l.erofs");
        let bytes = std::fs::read(&path).unwrap();
        digests.push((layer, castore::Digest::of(&bytes), bytes.len()));
    }
    assert_eq!(digests[0], digests[1], "two stores gave different images");
}

#[test]
fn a_name_erofs_cannot_hold_is_refused_with_its_path() {
    let env = Env::new("erofs-long-name");
    let tar = env.path("long.tar");
    // A 300-byte name: a PAX tar carries it, castore stores it, EROFS (and Linux) cannot.
    let o = Command::new("python3")
        .arg("-c")
        .arg(
            "import io, sys, tarfile\n\
             t = tarfile.open(sys.argv[1], 'w', format=tarfile.PAX_FORMAT)\n\
             d = tarfile.TarInfo('dir'); d.type = tarfile.DIRTYPE; d.mode = 0o755; t.addfile(d)\n\
             f = tarfile.TarInfo('dir/' + 'n' * 300); f.size = 2; t.addfile(f, io.BytesIO(b'hi'))\n\
             t.close()\n",
        )
        .arg(&tar)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = env.import(&tar, "long:1");
    let layer = single_layer(&env, img);
    let err = Image::build(&env.store, &layer).expect_err("a 300-byte name has no image");
    let text = err.to_string();
    assert!(
        matches!(err, layerfs::erofs::Error::Unrepresentable { .. }),
        "{text}"
    );
    assert!(text.contains(&format!("dir/{}", "n".repeat(300))), "{text}");
    assert!(text.contains("300 bytes") && text.contains("255"), "{text}");
}

/// `fsck.erofs --extract` (erofs-utils 1.5) of the corner-case tree's image gives back
/// the tree, in what 1.5's extraction carries: every entry's type, mode, owner, mtime,
/// device number, symlink target and file content. It writes no xattrs and breaks
/// hardlinks into copies, so those are compared by the kernel mounts above; it chmods
/// before it chowns, so the kernel clears setuid/setgid bits (erofs-utils commit 7e24aaf,
/// first in 1.8.10: those bits are compared by the mounts too, the sticky bit here); and
/// it drops the holes of chunk-based files (it skips unmapped
/// chunks without seeking: erofs-utils commit b063ea3, first in 1.8), so a sparse file's
/// content is checked against the source only where 1.5 can extract it: its extracted
/// bytes must be exactly the source's mapped chunks, in order.
#[test]
fn fsck_erofs_extract_gives_back_the_layer() {
    let env = Env::new("erofs-extract");
    let src = env.path("src");
    tests::fixture::corners(&src);
    let img = env.import(&src, "corners:1");
    let layer = single_layer(&env, img);
    let (path, _) = write_image(&env, &layer, "l.erofs");
    let sparse = extract_and_compare(&path, &src, &env.path("out"));
    assert!(sparse >= 1, "the corner tree has sparse files");
}

/// The same for the Debian minbase root (setuid binaries, hardlinks, every file type
/// a root holds).
#[test]
fn fsck_erofs_extract_of_debian_minbase_gives_back_the_root() {
    let env = Env::new("erofs-extract-debian");
    let src = tests::roots::ensure_debian_root("minbase").expect("minbase root");
    let img = env.import(&src, "minbase:1");
    let layer = single_layer(&env, img);
    let (path, _) = write_image(&env, &layer, "l.erofs");
    extract_and_compare(&path, &src, &env.path("out"));
}

/// Extracts `image` to `out` with `fsck.erofs --extract` and compares it with `src` in
/// what erofs-utils 1.5 carries (see above). Returns how many sparse files it checked.
fn extract_and_compare(image: &Path, src: &Path, out: &Path) -> usize {
    use std::os::unix::fs::MetadataExt as _;
    let o = Command::new("fsck.erofs")
        .arg(format!("--extract={}", out.display()))
        .arg("--preserve")
        .arg(image)
        .output()
        .expect("fsck.erofs (erofs-utils) is installed");
    assert!(
        o.status.success(),
        "fsck.erofs --extract: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let strip = |mut m: std::collections::BTreeMap<PathBuf, tests::fstree::Info>| {
        for i in m.values_mut() {
            i.xattrs.clear();
            i.link_group = PathBuf::new();
            if i.mode & 0o170000 == 0o100000 {
                i.mode &= !0o6000;
            }
        }
        m
    };
    let mut want = strip(tests::fstree::snapshot(src));
    let mut got = strip(tests::fstree::snapshot(out));
    let mut sparse = 0;
    for (rel, info) in want.iter_mut() {
        let md = std::fs::symlink_metadata(src.join(rel)).unwrap();
        if !md.is_file() || md.blocks() * 512 >= md.size() {
            continue;
        }
        sparse += 1;
        let extracted = std::fs::read(out.join(rel)).unwrap();
        let mapped = mapped_chunks(&src.join(rel));
        assert_eq!(
            extracted.len(),
            mapped.len(),
            "{}: 1.5 extracts the mapped chunks",
            rel.display()
        );
        assert!(
            extracted == mapped,
            "{}: extracted bytes differ",
            rel.display()
        );
        // Compared above; the rest of the entry is compared with the others.
        let g = got.get_mut(rel).expect("extracted");
        (info.size, info.content) = (0, String::new());
        (g.size, g.content) = (0, String::new());
    }
    assert_no_diff(&want, &got, "fsck.erofs --extract of our image");
    sparse
}

/// The bytes of `file` in the chunks our image maps, in order, as erofs-utils 1.5
/// extracts them. The fixture's data is random, so a chunk holding data is one with a
/// byte that is not zero.
fn mapped_chunks(file: &Path) -> Vec<u8> {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::File::open(file).unwrap();
    let size = f.metadata().unwrap().len();
    let chunk = layerfs::erofs::sparse_chunk_size(size);
    let mut out = Vec::new();
    let mut buf = vec![0; chunk as usize];
    for off in (0..size).step_by(chunk as usize) {
        let n = chunk.min(size - off) as usize;
        f.read_exact_at(&mut buf[..n], off).unwrap();
        if buf[..n].iter().any(|&b| b != 0) {
            out.extend_from_slice(&buf[..n]);
        }
    }
    out
}

/// The in-memory read (what NBD serves on the connection's task) gives nothing until
/// the chunks it needs are cached, then exactly the bytes a full read gives.
#[test]
fn a_cached_read_answers_only_from_cached_chunks_and_equals_a_full_read() {
    let env = Env::new("erofs-cached");
    let src = env.path("src");
    tests::fixture::build(&src);
    let img = env.import(&src, "fx:1");
    let layer = single_layer(&env, img);
    let image = Image::build(&env.store, &layer).unwrap();
    let cache = castore::ChunkCache::new(256 << 20);
    let size = image.size();
    let mut cached = vec![0u8; size as usize];
    // Block 0 is metadata: always in memory.
    assert!(image.read_cached(&cache, 0, &mut cached[..4096]).is_some());
    // The whole image needs file chunks no one has read yet.
    assert!(image.read_cached(&cache, 0, &mut cached).is_none());
    let mut full = vec![0u8; size as usize];
    let src = layerfs::erofs::Source {
        store: &env.store,
        cache: &cache,
        prefetch: None,
    };
    image.read(src, 0, &mut full).unwrap();
    assert!(image.read_cached(&cache, 0, &mut cached).is_some());
    assert!(cached == full, "a cached read differs from a full read");
    // Block by block too (reads that start inside a file's extent).
    for off in (0..size).step_by(4096) {
        let mut b = [0u8; 4096];
        image.read_cached(&cache, off, &mut b).expect("all cached");
        assert_eq!(
            &b[..],
            &full[off as usize..off as usize + 4096],
            "block at {off}"
        );
    }
}
