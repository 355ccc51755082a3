//! Real FUSE mounts of imported images: the merged tree equals its source, writes stay
//! in scratch, OCI whiteouts and opaque directories apply, and POSIX namespace
//! operations behave as on a disk.

mod common;

use std::ffi::OsStr;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::{Env, errno, rename2, sh};

#[test]
fn fixture_mounts_identical_to_its_source() {
    let env = Env::new("layerfs-fixture");
    let src = env.path("src");
    tests::fixture::build(&src);
    let img = env.import(&src, "fx:1");
    let m = env.mount(img, "mnt", true);
    tests::fstree::assert_same(&src, m.mountpoint());
    // Hardlinks share an inode and count their names.
    let a = std::fs::metadata(m.mountpoint().join("usr/bin/tool")).unwrap();
    let b = std::fs::metadata(m.mountpoint().join("etc/tool-link")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 3);
    // Directories count their subdirectories; sparse files their stored blocks only.
    let usr = std::fs::metadata(m.mountpoint().join("usr")).unwrap();
    assert_eq!(usr.nlink(), 3);
    let sparse = std::fs::metadata(m.mountpoint().join("usr/sparse")).unwrap();
    assert_eq!(sparse.len(), 8 << 20);
    assert!(
        sparse.blocks() * 512 < 1 << 20,
        "blocks {}",
        sparse.blocks()
    );
    // SEEK_DATA finds the data in the middle of the hole.
    let f = std::fs::File::open(m.mountpoint().join("usr/sparse")).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: lseek on a descriptor we own.
    let data = unsafe { libc::lseek(fd, 0, libc::SEEK_DATA) };
    assert!(data > 0 && data <= 4 << 20, "SEEK_DATA {data}");
    // Busy: try_unmount refuses and the mount keeps working.
    let mut m = m;
    let e = m.try_unmount().unwrap_err();
    assert!(e.to_string().contains("busy"), "{e}");
    assert!(m.mountpoint().join("etc/hostname").is_file());
    drop(f);
    // Writes are refused on a read-only mount.
    assert_eq!(
        errno(std::fs::write(m.mountpoint().join("etc/new"), b"x")),
        libc::EROFS
    );
    m.unmount().unwrap();
}

#[test]
fn writes_go_to_scratch_and_a_remount_is_pristine() {
    let env = Env::new("layerfs-scratch");
    let src = env.path("src");
    tests::fixture::build(&src);
    let img = env.import(&src, "fx:1");
    let m = env.mount(img, "mnt", false);
    let root = m.mountpoint().to_path_buf();
    // Copy-up keeps the rest of the file and its metadata.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(root.join("usr/bin/big"))
        .unwrap();
    f.seek(SeekFrom::Start(10)).unwrap();
    f.write_all(b"PATCHED").unwrap();
    drop(f);
    let orig = std::fs::read(src.join("usr/bin/big")).unwrap();
    let now = std::fs::read(root.join("usr/bin/big")).unwrap();
    assert_eq!(now.len(), orig.len());
    assert_eq!(&now[10..17], b"PATCHED");
    assert_eq!(&now[17..], &orig[17..]);
    // Writes (passed through to the scratch file by the kernel) move mtime; utimens sets it.
    let big = root.join("usr/bin/big");
    let mtime = std::fs::metadata(&big).unwrap().mtime();
    assert!(
        mtime > 1_700_000_000,
        "mtime {mtime} not updated by the write"
    );
    sh(&format!("touch -m -d @1234567890 {}", big.display()));
    assert_eq!(std::fs::metadata(&big).unwrap().mtime(), 1_234_567_890);
    assert_eq!(
        xattr::get(root.join("usr/bin/big"), "user.comment").unwrap(),
        Some(b"hello".to_vec())
    );
    // Writing through one hardlink shows through the others.
    std::fs::write(root.join("usr/bin/tool"), b"new tool").unwrap();
    assert_eq!(
        std::fs::read(root.join("etc/tool-link")).unwrap(),
        b"new tool"
    );
    // Metadata changes, xattrs, new files, deletes.
    std::fs::set_permissions(
        root.join("etc/hostname"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::os::unix::fs::chown(root.join("etc/hostname"), Some(42), Some(43)).unwrap();
    let md = std::fs::metadata(root.join("etc/hostname")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid(), md.gid()), (0o600, 42, 43));
    xattr::set(root.join("etc/hostname"), "user.new", b"v").unwrap();
    xattr::remove(root.join("usr/bin/big"), "user.comment").unwrap();
    std::fs::write(root.join("etc/created"), b"fresh").unwrap();
    std::fs::remove_file(root.join("etc/empty")).unwrap();
    std::fs::remove_dir_all(root.join("etc/deep")).unwrap();
    assert!(!root.join("etc/deep").exists());
    // Truncate and sparse writes in scratch.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(root.join("usr/sparse"))
        .unwrap();
    f.set_len(100).unwrap();
    drop(f);
    assert_eq!(
        std::fs::metadata(root.join("usr/sparse")).unwrap().len(),
        100
    );
    assert!(m.scratch_bytes() > 0);
    m.unmount().unwrap();
    assert!(
        !env.path("mnt.scratch").exists(),
        "scratch removed on unmount"
    );
    // The image is untouched.
    let m = env.mount(img, "mnt", false);
    tests::fstree::assert_same(&src, m.mountpoint());
    drop(m);
}

#[test]
fn namespace_operations_behave_like_a_disk() {
    let env = Env::new("layerfs-ns");
    let src = env.path("src");
    tests::fixture::build(&src);
    let img = env.import(&src, "fx:1");
    let m = env.mount(img, "mnt", false);
    let r = m.mountpoint();
    // Rename a lower directory with its contents, then into itself (EINVAL).
    std::fs::rename(r.join("etc/deep"), r.join("moved")).unwrap();
    assert!(r.join("moved/er/medium").is_file());
    assert!(!r.join("etc/deep").exists());
    assert_eq!(
        rename2(&r.join("moved"), &r.join("moved/er/x"), 0),
        libc::EINVAL
    );
    // Directory link counts follow.
    assert_eq!(std::fs::metadata(r).unwrap().nlink(), 2 + 4);
    // RENAME_NOREPLACE and RENAME_EXCHANGE.
    assert_eq!(
        rename2(
            &r.join("etc/hostname"),
            &r.join("etc/empty"),
            libc::RENAME_NOREPLACE
        ),
        libc::EEXIST
    );
    assert_eq!(
        rename2(
            &r.join("etc/hostname"),
            &r.join("etc/empty"),
            libc::RENAME_EXCHANGE
        ),
        0
    );
    assert_eq!(std::fs::read(r.join("etc/empty")).unwrap(), b"tidedge\n");
    assert_eq!(std::fs::read(r.join("etc/hostname")).unwrap(), b"");
    // Replacing a file by rename; a dir over a non-empty dir fails.
    std::fs::rename(r.join("etc/hostname"), r.join("etc/empty")).unwrap();
    assert!(!r.join("etc/hostname").exists());
    assert_eq!(
        rename2(&r.join("usr"), &r.join("moved"), 0),
        libc::ENOTEMPTY
    );
    assert_eq!(
        rename2(&r.join("etc/empty"), &r.join("moved"), 0),
        libc::EISDIR
    );
    // Hardlinks: new ones count, unlink keeps the others.
    std::fs::hard_link(r.join("usr/bin/tool"), r.join("tool2")).unwrap();
    assert_eq!(std::fs::metadata(r.join("tool2")).unwrap().nlink(), 4);
    std::fs::remove_file(r.join("usr/bin/tool")).unwrap();
    assert_eq!(std::fs::metadata(r.join("tool2")).unwrap().nlink(), 3);
    assert_eq!(
        errno(std::fs::hard_link(r.join("usr"), r.join("usr2"))),
        libc::EPERM
    );
    // rmdir rules.
    assert_eq!(errno(std::fs::remove_dir(r.join("usr"))), libc::ENOTEMPTY);
    assert_eq!(errno(std::fs::remove_dir(r.join("tool2"))), libc::ENOTDIR);
    assert_eq!(errno(std::fs::remove_file(r.join("usr"))), libc::EISDIR);
    // Symlinks, fifos, device nodes.
    std::os::unix::fs::symlink("target/../x", r.join("sl")).unwrap();
    assert_eq!(
        std::fs::read_link(r.join("sl")).unwrap(),
        Path::new("target/../x")
    );
    sh(&format!(
        "mkfifo {0}/ff && mknod {0}/nul c 1 3",
        r.display()
    ));
    assert_eq!(
        std::fs::metadata(r.join("nul")).unwrap().rdev(),
        libc::makedev(1, 3)
    );
    assert_eq!(std::fs::read(r.join("nul")).unwrap(), b"");
    // Names are bytes; NAME_MAX is enforced.
    let bad = r.join(OsStr::from_bytes(b"caf\xe9-\xff"));
    std::fs::write(&bad, b"bytes").unwrap();
    assert_eq!(std::fs::read(&bad).unwrap(), b"bytes");
    let listed: Vec<_> = std::fs::read_dir(r)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(listed.iter().any(|n| n.as_bytes() == b"caf\xe9-\xff"));
    let long = r.join("x".repeat(256));
    assert_eq!(errno(std::fs::write(&long, b"")), libc::ENAMETOOLONG);
    std::fs::write(r.join("y".repeat(255)), b"ok").unwrap();
    // Past the maximum file size: EFBIG, as on the disk below.
    let f = std::fs::File::create(r.join("huge")).unwrap();
    assert_eq!(
        errno(std::os::unix::fs::FileExt::write_at(&f, b"x", 1 << 62)),
        libc::EFBIG
    );
    drop(f);
    // mkdir then rmdir, creating in a new dir, and statfs.
    std::fs::create_dir_all(r.join("a/b/c")).unwrap();
    std::fs::write(r.join("a/b/c/f"), b"1").unwrap();
    std::fs::remove_dir_all(r.join("a")).unwrap();
    sh(&format!(
        "df {} >/dev/null && stat -f {} >/dev/null",
        r.display(),
        r.display()
    ));
    m.unmount().unwrap();
}

/// Builds a two-layer OCI layout: layer 2 whites out `a/1`, makes `b` opaque, replaces
/// `c` and adds `d`. Layer 1's `a/2` has four more names: `a/3` stays, while layer 2
/// whites out `a/4`, hides `b/z` (opaque) and replaces `e`, so the image shows two.
fn two_layer_layout(env: &Env) -> std::path::PathBuf {
    let t = env.tmp.path();
    sh(&format!(
        r#"cd {0} && mkdir -p l1/a l1/b l2/a l2/b &&
        echo one > l1/a/1 && echo two > l1/a/2 && echo x > l1/b/x && echo old > l1/c &&
        ln l1/a/2 l1/a/3 && ln l1/a/2 l1/a/4 && ln l1/a/2 l1/b/z && ln l1/a/2 l1/e &&
        touch l2/a/.wh.1 l2/a/.wh.4 l2/b/.wh..wh..opq && echo y > l2/b/y && echo new > l2/c &&
        echo d > l2/d && echo e > l2/e &&
        tar -C l1 -cf l1.tar . && tar -C l2 -cf l2.tar ."#,
        t.display()
    ));
    let oci = t.join("oci");
    std::fs::create_dir_all(oci.join("blobs/sha256")).unwrap();
    let put = |bytes: &[u8]| {
        let d = castore::Digest::of(bytes);
        std::fs::write(oci.join("blobs/sha256").join(d.to_hex()), bytes).unwrap();
        d
    };
    let l1 = std::fs::read(t.join("l1.tar")).unwrap();
    let l2 = std::fs::read(t.join("l2.tar")).unwrap();
    let (d1, d2) = (put(&l1), put(&l2));
    let cfg = serde_json::to_vec(&serde_json::json!({
        "architecture": castore::host_arch(), "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [d1.to_string(), d2.to_string()]}
    }))
    .unwrap();
    let c = put(&cfg);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c.to_string(), "size": cfg.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d1.to_string(), "size": l1.len()},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d2.to_string(), "size": l2.len()}
        ]
    });
    let m = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": m.to_string(), "size": 1}]});
    std::fs::write(oci.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(oci.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    oci
}

#[test]
fn cached_directory_listings_follow_changes() {
    let env = Env::new("layerfs-dircache");
    let src = env.path("src");
    tests::fixture::build(&src);
    let img = env.import(&src, "fx:1");
    let m = env.mount(img, "mnt", false);
    let etc = m.mountpoint().join("etc");
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    // The second listing of a pristine directory comes from the kernel's cache.
    let before = names(&etc);
    assert_eq!(names(&etc), before);
    assert!(before.contains(&"hostname".to_string()));
    // Changes through the mount show in the next listing, every time.
    std::fs::write(etc.join("new-file"), b"x").unwrap();
    let after = names(&etc);
    assert!(after.contains(&"new-file".to_string()), "{after:?}");
    std::fs::remove_file(etc.join("hostname")).unwrap();
    let after = names(&etc);
    assert!(!after.contains(&"hostname".to_string()), "{after:?}");
    std::fs::rename(etc.join("new-file"), etc.join("renamed")).unwrap();
    let after = names(&etc);
    assert!(after.contains(&"renamed".to_string()) && !after.contains(&"new-file".to_string()));
    assert_eq!(names(&etc), after);
}

fn listing(root: &Path) -> Vec<String> {
    let out = sh(&format!(
        "cd {} && find . -mindepth 1 | sort",
        root.display()
    ));
    out.lines().map(str::to_string).collect()
}

#[test]
fn oci_whiteouts_and_opaque_directories_merge() {
    let env = Env::new("layerfs-oci");
    let oci = two_layer_layout(&env);
    let img = env.import(&oci, "two:1");
    let m = env.mount(img, "mnt", false);
    let r = m.mountpoint();
    assert_eq!(
        listing(r),
        ["./a", "./a/2", "./a/3", "./b", "./b/y", "./c", "./d", "./e"]
    );
    assert_eq!(std::fs::read(r.join("c")).unwrap(), b"new\n");
    // The link count is of the names the image shows, not of those in layer 1.
    let nlink = |p: &str| std::fs::symlink_metadata(r.join(p)).unwrap().nlink();
    assert_eq!((nlink("a/2"), nlink("a/3"), nlink("e")), (2, 2, 1));
    // Deleting a lower entry hides it; re-creating it shows the new one only.
    std::fs::remove_file(r.join("a/2")).unwrap();
    assert_eq!(nlink("a/3"), 1);
    std::fs::write(r.join("a/1"), b"again").unwrap();
    assert_eq!(
        listing(r),
        ["./a", "./a/1", "./a/3", "./b", "./b/y", "./c", "./d", "./e"]
    );
    assert_eq!(std::fs::read(r.join("a/1")).unwrap(), b"again");
    m.unmount().unwrap();
}

#[test]
fn concurrent_readers_and_writers_and_independent_mounts() {
    let env = Env::new("layerfs-conc");
    let src = env.path("src");
    tests::fixture::build(&src);
    let img = env.import(&src, "fx:1");
    let m1 = env.mount(img, "m1", false);
    let m2 = env.mount(img, "m2", false);
    let expect = std::fs::read(src.join("usr/bin/big")).unwrap();
    std::thread::scope(|s| {
        for t in 0..4 {
            let (r, expect) = (m1.mountpoint(), &expect);
            s.spawn(move || {
                for _ in 0..5 {
                    let mut got = Vec::new();
                    std::fs::File::open(r.join("usr/bin/big"))
                        .unwrap()
                        .read_to_end(&mut got)
                        .unwrap();
                    assert!(got == *expect, "reader {t} saw different bytes");
                }
            });
            s.spawn(move || {
                let dir = r.join(format!("w{t}"));
                std::fs::create_dir(&dir).unwrap();
                for i in 0..50 {
                    let data = vec![t as u8; 1000 + i * 37];
                    std::fs::write(dir.join(i.to_string()), &data).unwrap();
                    assert_eq!(std::fs::read(dir.join(i.to_string())).unwrap(), data);
                }
            });
        }
    });
    assert_eq!(
        std::fs::read_dir(m1.mountpoint().join("w3"))
            .unwrap()
            .count(),
        50
    );
    // Racing first writes to one lower file: one copy-up wins, no write is lost.
    let big = m1.mountpoint().join("usr/bin/big");
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let big = &big;
            s.spawn(move || {
                let f = std::fs::OpenOptions::new().write(true).open(big).unwrap();
                let data = [0xA0 + t as u8; 100];
                std::os::unix::fs::FileExt::write_all_at(&f, &data, t * 1_000_000).unwrap();
            });
        }
    });
    let now = std::fs::read(&big).unwrap();
    assert_eq!(now.len(), expect.len());
    for t in 0..4usize {
        let at = t * 1_000_000;
        assert!(
            now[at..at + 100].iter().all(|&b| b == 0xA0 + t as u8),
            "write {t} lost"
        );
    }
    assert!(now[100..1_000_000] == expect[100..1_000_000]);
    // The second mount of the same image sees none of it.
    assert!(!m2.mountpoint().join("w0").exists());
    std::fs::write(m2.mountpoint().join("etc/hostname"), b"other").unwrap();
    assert_eq!(
        std::fs::read(m1.mountpoint().join("etc/hostname")).unwrap(),
        b"tidedge\n"
    );
    m1.unmount().unwrap();
    m2.unmount().unwrap();
}

#[test]
fn a_corrupt_chunk_fails_that_read_and_the_mount_stays_up() {
    let env = Env::new("layerfs-corrupt");
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("ok"), vec![7u8; 50_000]).unwrap();
    std::fs::write(src.join("bad"), vec![9u8; 50_000]).unwrap();
    let img = env.import(&src, "c:1");
    // Find the chunk of "bad" (the only chunk whose bytes are nines).
    let bad = castore::testing::chunk_digests(&env.store)
        .unwrap()
        .into_iter()
        .find(|d| env.store.chunk(d).unwrap()[0] == 9)
        .unwrap();
    castore::testing::corrupt_chunk(&env.store, &bad).unwrap();
    let m = env.mount(img, "mnt", true);
    assert_eq!(errno(std::fs::read(m.mountpoint().join("bad"))), libc::EIO);
    assert_eq!(
        std::fs::read(m.mountpoint().join("ok")).unwrap(),
        vec![7u8; 50_000]
    );
    m.unmount().unwrap();
}
