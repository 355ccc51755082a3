//! A small tree with every kind of entry and metadata a root filesystem has, made with
//! real syscalls (we are root): for tests that need variety more than volume.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL")
}

fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    ];
    // SAFETY: valid path and times array for the duration of the call.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c(p).as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0, "utimensat {}", p.display());
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// Builds the fixture under `root` (which must not exist).
pub fn build(root: &Path) {
    std::fs::create_dir_all(root.join("etc/deep/er")).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    std::fs::write(root.join("etc/hostname"), b"tidedge\n").unwrap();
    std::fs::write(root.join("etc/empty"), b"").unwrap();
    std::fs::write(root.join("etc/deep/er/medium"), pseudo_random(5000, 1)).unwrap();
    // Several chunks (FastCDC max is 256 KiB).
    std::fs::write(root.join("usr/bin/big"), pseudo_random(3 << 20, 2)).unwrap();
    // A hardlink group of three.
    std::fs::write(root.join("usr/bin/tool"), pseudo_random(70_000, 3)).unwrap();
    std::fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/tool-alias")).unwrap();
    std::fs::hard_link(root.join("usr/bin/tool"), root.join("etc/tool-link")).unwrap();
    // setuid and an unusual owner.
    std::fs::write(root.join("usr/bin/su"), pseudo_random(300, 4)).unwrap();
    let su = c(&root.join("usr/bin/su"));
    // SAFETY: valid path.
    unsafe {
        assert_eq!(libc::chown(su.as_ptr(), 0, 0), 0);
        assert_eq!(libc::chmod(su.as_ptr(), 0o4755), 0);
    }
    let odd = c(&root.join("etc/hostname"));
    // SAFETY: valid path.
    unsafe { assert_eq!(libc::chown(odd.as_ptr(), 1234, 5678), 0) };
    // Symlinks, relative, absolute and dangling.
    std::os::unix::fs::symlink("../usr/bin/big", root.join("etc/big-link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("etc/dangling")).unwrap();
    // Device nodes and a fifo.
    for (name, kind, dev) in [
        ("dev/null", libc::S_IFCHR, libc::makedev(1, 3)),
        ("dev/sda", libc::S_IFBLK, libc::makedev(8, 0)),
        ("dev/fifo", libc::S_IFIFO, 0),
    ] {
        let p = c(&root.join(name));
        // SAFETY: valid path; we are root.
        let rc = unsafe { libc::mknod(p.as_ptr(), kind | 0o640, dev) };
        assert_eq!(rc, 0, "mknod {name}");
    }
    // A sparse file: 8 MiB with 64 KiB of data in the middle.
    let sparse = std::fs::File::create(root.join("usr/sparse")).unwrap();
    sparse.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, &pseudo_random(65536, 5), 4 << 20).unwrap();
    drop(sparse);
    // A name that is not UTF-8.
    std::fs::write(
        root.join(std::ffi::OsStr::from_bytes(b"etc/caf\xe9")),
        b"latin-1 name",
    )
    .unwrap();
    // Extended attributes, including a capability-like binary value.
    xattr::set(root.join("usr/bin/big"), "user.comment", b"hello").unwrap();
    xattr::set(root.join("usr/bin/big"), "trusted.bin", &[0u8, 1, 2, 255]).unwrap();
    xattr::set(root.join("etc"), "user.dir", b"on a directory").unwrap();
    // Times with nanoseconds, set last, deepest first.
    for (i, p) in [
        "etc/hostname",
        "etc/empty",
        "etc/deep/er/medium",
        "usr/bin/big",
        "usr/bin/tool",
        "usr/bin/su",
        "etc/big-link",
        "etc/dangling",
        "dev/null",
        "dev/sda",
        "dev/fifo",
        "usr/sparse",
        "etc/deep/er",
        "etc/deep",
        "etc",
        "usr/bin",
        "usr",
        "dev",
        "",
    ]
    .iter()
    .enumerate()
    {
        set_mtime(
            &root.join(p),
            1_600_000_000 + i as i64 * 1000,
            123_456_789 + i as i64,
        );
    }
}
