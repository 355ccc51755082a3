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

/// The capability a setcap binary in [`corners`] carries: `security.capability`
/// version 2, effective, permitting CAP_DAC_READ_SEARCH (bit 2), so it reads files its
/// user could not.
pub const CAP_DAC_READ_SEARCH: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, // VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE
    0x04, 0x00, 0x00, 0x00, // permitted[0]: 1 << CAP_DAC_READ_SEARCH
    0x00, 0x00, 0x00, 0x00, // inheritable[0]
    0x00, 0x00, 0x00, 0x00, // permitted[1]
    0x00, 0x00, 0x00, 0x00, // inheritable[1]
];

/// A POSIX access ACL (`system.posix_acl_access`, version 2): owner rwx, user 1000 r,
/// group r-x, mask r-x, other r.
fn acl() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 7u16, u32::MAX),
        (0x02, 4, 1000),
        (0x04, 5, u32::MAX),
        (0x10, 5, u32::MAX),
        (0x20, 4, u32::MAX),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// Builds under `root` (which must not exist) a tree of the corner cases a root
/// filesystem image must keep: 255-byte names, a deep tree, a 3000-entry directory,
/// uid/gid above 65535, setuid/setgid/sticky bits, a socket, a FIFO, a 4095-byte
/// symlink, a hardlinked symlink, devices with large major/minor numbers, many xattrs
/// (more than fit beside an inode in a block), an ACL, a setcap copy of busybox
/// (`bin/busybox-cap`) and a file only root may read (`secret`), files of sizes around the
/// block size, a sparse file over 4 GiB, names that are not UTF-8, and mtimes before
/// 1970 and after 2106.
pub fn corners(root: &Path) {
    let p = |s: &str| root.join(s);
    for d in [
        "bin",
        "names",
        "many",
        "modes/setgid",
        "modes/sticky",
        "dev",
        "x",
    ] {
        std::fs::create_dir_all(p(d)).unwrap();
    }
    // 255-byte names: a file and a directory.
    let long = "n".repeat(255);
    std::fs::write(p("names").join(&long), b"long name").unwrap();
    std::fs::create_dir(p("names").join("d".repeat(255))).unwrap();
    std::fs::write(
        p("names").join(std::ffi::OsStr::from_bytes(b"\xff\xfe-not-utf8")),
        b"bytes",
    )
    .unwrap();
    // A deep tree.
    let mut deep = p("deep");
    for i in 0..64 {
        deep.push(format!("level{i:02}"));
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("bottom"), b"deep down\n").unwrap();
    // A directory of 3000 entries (several directory blocks).
    for i in 0..3000 {
        std::fs::write(p("many").join(format!("entry-{i:04}")), i.to_string()).unwrap();
    }
    // Owners above 65535, and the mode bits beyond rwx.
    std::fs::write(p("x/owned"), b"big ids").unwrap();
    std::fs::write(p("modes/suid-sgid"), b"#!/bin/sh\n").unwrap();
    for (path, mode, uid, gid) in [
        ("x/owned", 0o640, 100_000, 4_000_000_000u32),
        ("modes/suid-sgid", 0o6755, 0, 0),
        ("modes/setgid", 0o2775, 0, 50),
        ("modes/sticky", 0o1777, 0, 0),
    ] {
        let cp = c(&p(path));
        // SAFETY: valid path; we are root.
        unsafe {
            assert_eq!(libc::chown(cp.as_ptr(), uid, gid), 0, "chown {path}");
            assert_eq!(libc::chmod(cp.as_ptr(), mode), 0, "chmod {path}");
        }
    }
    // A socket (bound, never listened on) and a FIFO.
    drop(std::os::unix::net::UnixListener::bind(p("x/socket")).unwrap());
    // Symlinks: a 4095-byte target (the longest Linux allows), and a hardlinked one.
    let target: String = "abcdefg/".repeat(512)[..4095].to_string();
    std::os::unix::fs::symlink(&target, p("x/long-link")).unwrap();
    std::os::unix::fs::symlink("names", p("x/sym")).unwrap();
    // link(2) of a symlink links the symlink itself.
    std::fs::hard_link(p("x/sym"), p("x/sym-hardlink")).unwrap();
    for (name, kind, dev) in [
        ("dev/fifo", libc::S_IFIFO, 0),
        ("dev/bigchar", libc::S_IFCHR, libc::makedev(4000, 1_000_000)),
        ("dev/bigblock", libc::S_IFBLK, libc::makedev(259, 65_536)),
    ] {
        let cp = c(&p(name));
        // SAFETY: valid path; we are root.
        let rc = unsafe { libc::mknod(cp.as_ptr(), kind | 0o660, dev) };
        assert_eq!(rc, 0, "mknod {name}");
    }
    // Many xattrs (about 3.3 KiB, near ext4's limit of one block), on a directory and
    // on a 2000-byte file: with the inode, more than a block holds, so the file's tail
    // cannot stay inline beside them.
    std::fs::write(p("x/xattrs"), pseudo_random(2000, 99)).unwrap();
    for target in ["x/xattrs", "x"] {
        for i in 0..28 {
            let value: Vec<u8> = (0..100).map(|b| (b + i) as u8).collect();
            xattr::set(p(target), format!("user.attr{i:02}"), &value).unwrap();
        }
        xattr::set(p(target), "trusted.tidedge", b"trusted value").unwrap();
        xattr::set(p(target), "security.label", b"label").unwrap();
    }
    xattr::set(p("x/owned"), "system.posix_acl_access", &acl()).unwrap();
    // A setcap busybox, and a file only root (or CAP_DAC_READ_SEARCH) may read.
    std::fs::copy("/bin/busybox", p("bin/busybox-cap")).expect("/bin/busybox (busybox-static)");
    xattr::set(
        p("bin/busybox-cap"),
        "security.capability",
        &CAP_DAC_READ_SEARCH,
    )
    .unwrap();
    std::fs::copy("/bin/busybox", p("bin/busybox-plain")).unwrap();
    std::fs::write(p("secret"), b"only root reads this\n").unwrap();
    let cp = c(&p("secret"));
    // SAFETY: valid path.
    unsafe { assert_eq!(libc::chmod(cp.as_ptr(), 0o600), 0) };
    // Sizes around the block size.
    for (i, n) in [0usize, 1, 4095, 4096, 4097, 8191, 8193, 65536]
        .iter()
        .enumerate()
    {
        std::fs::write(p(&format!("x/size-{n}")), pseudo_random(*n, 100 + i as u64)).unwrap();
    }
    // A sparse file over 4 GiB: data at the start, past 4 GiB and at the end.
    let sparse = std::fs::File::create(p("x/sparse-5g")).unwrap();
    sparse.set_len(5 << 30).unwrap();
    for (at, seed) in [(0u64, 7u64), ((4 << 30) + 12345, 8), ((5 << 30) - 3000, 9)] {
        let data = pseudo_random(if seed == 9 { 3000 } else { 100_000 }, seed);
        std::os::unix::fs::FileExt::write_all_at(&sparse, &data, at).unwrap();
    }
    drop(sparse);
    // Times before 1970 and after 2106 (past 32 bits), set last, deepest first.
    for (path, sec, nsec) in [
        ("x/owned", -315_619_200, 1),
        ("x/size-1", 1i64 << 33, 999_999_999),
        ("dev/bigchar", -1, 500_000_000),
        ("x/long-link", 4_102_444_800, 42),
        ("x", 1_700_000_000, 7),
        ("", 1_600_000_000, 123),
    ] {
        set_mtime(&p(path), sec, nsec);
    }
}
