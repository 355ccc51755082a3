//! Snapshots of a directory tree with everything a root filesystem needs to survive
//! (content, type, mode, owner, mtime, xattrs, symlink targets, device numbers, hardlink
//! groups), and a comparison that lists every difference.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// One entry as seen by `lstat` and friends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// `S_IFMT` bits and permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, i64),
    /// Size for files, 0 otherwise.
    pub size: u64,
    /// SHA-256 of a file's content, a symlink's target, or empty.
    pub content: String,
    /// Device number of device nodes.
    pub rdev: u64,
    /// Sorted extended attributes.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// For multiply-linked files: the smallest path of the group (relative), else empty.
    pub link_group: PathBuf,
}

/// Every entry below (and including, as "") `root`, by relative path.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Info> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    walk(root, Path::new(""), &mut out, &mut inodes);
    for (_, paths) in inodes {
        if paths.len() > 1 {
            let first = paths.iter().min().expect("non-empty").clone();
            for p in paths {
                out.get_mut(&p).expect("recorded").link_group = first.clone();
            }
        }
    }
    out
}

fn walk(
    root: &Path,
    rel: &Path,
    out: &mut BTreeMap<PathBuf, Info>,
    inodes: &mut HashMap<(u64, u64), Vec<PathBuf>>,
) {
    let path = root.join(rel);
    let md = std::fs::symlink_metadata(&path)
        .unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
    let ft = md.file_type();
    let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = xattr::list(&path)
        .map(|names| {
            names
                .filter_map(|n| {
                    xattr::get(&path, &n)
                        .ok()
                        .flatten()
                        .map(|v| (n.as_bytes().to_vec(), v))
                })
                .collect()
        })
        .unwrap_or_default();
    xattrs.sort();
    let content = if ft.is_file() {
        let mut f = std::fs::File::open(&path).expect("open");
        let mut h = castore::Hasher::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        h.finish().to_hex()
    } else if ft.is_symlink() {
        String::from_utf8_lossy(
            std::fs::read_link(&path)
                .expect("readlink")
                .as_os_str()
                .as_bytes(),
        )
        .into_owned()
    } else {
        String::new()
    };
    if !ft.is_dir() && md.nlink() > 1 {
        inodes
            .entry((md.dev(), md.ino()))
            .or_default()
            .push(rel.to_path_buf());
    }
    out.insert(
        rel.to_path_buf(),
        Info {
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            mtime: (md.mtime(), md.mtime_nsec()),
            size: if ft.is_file() { md.size() } else { 0 },
            content,
            rdev: if ft.is_block_device() || ft.is_char_device() {
                md.rdev()
            } else {
                0
            },
            xattrs,
            link_group: PathBuf::new(),
        },
    );
    if ft.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(&path)
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        for n in names {
            walk(root, &rel.join(n), out, inodes);
        }
    }
}

/// Every difference between two snapshots, one line each (empty when identical).
pub fn diff(a: &BTreeMap<PathBuf, Info>, b: &BTreeMap<PathBuf, Info>) -> Vec<String> {
    let mut out = Vec::new();
    for (p, x) in a {
        match b.get(p) {
            None => out.push(format!("only in source: /{}", p.display())),
            Some(y) if x != y => out.push(format!("differs: /{}: {x:?} vs {y:?}", p.display())),
            _ => {}
        }
    }
    for p in b.keys() {
        if !a.contains_key(p) {
            out.push(format!("only in copy: /{}", p.display()));
        }
    }
    out
}

/// Panics with the first differences if the trees differ.
pub fn assert_same(a: &Path, b: &Path) {
    let sa = snapshot(a);
    let sb = snapshot(b);
    let d = diff(&sa, &sb);
    assert!(
        d.is_empty(),
        "{} differences between {} and {}; first ones:\n{}",
        d.len(),
        a.display(),
        b.display(),
        d.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(sa.len() > 1, "compared an empty tree");
}
