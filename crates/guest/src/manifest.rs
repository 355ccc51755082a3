//! A manifest of a directory tree: one line per entry, sorted by path, with everything a
//! root filesystem must keep. Written by the guest over the root it mounted and by the
//! host over the image it expects; equal manifests mean equal trees.
//!
//! Line format, tab-separated:
//! `PATH TYPE MODE UID GID SIZE MTIME NLINK RDEV LINKGROUP CONTENT XATTRS`
//! - `PATH`: `/`-rooted, bytes outside printable ASCII (and `\`) as `\xHH`;
//! - `TYPE`: `d`, `f`, `l`, `c`, `b`, `p`, `s`; `MODE`: octal permission bits;
//! - `SIZE`: bytes for files and symlinks, `-` for others (directory sizes are a
//!   property of each filesystem);
//! - `MTIME`: `SECONDS.NANOSECONDS`; `NLINK`: for non-directories (overlayfs reports 1
//!   for merged directories); `RDEV`: `MAJOR:MINOR` for devices, else `-`;
//! - `LINKGROUP`: for entries with several names, the first (smallest) path of the
//!   group, else `-`;
//! - `CONTENT`: SHA-256 of a file's bytes or a symlink's target; a file over
//!   [`SAMPLE_OVER`] bytes is hashed by samples (its first and last MiB and one 4 KiB
//!   block every 64 MiB), prefixed `sampled:`, so a guest under emulation does not
//!   read gigabytes of holes;
//! - `XATTRS`: `name=HEXVALUE` joined by `,`, sorted, or `-`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Files larger than this are hashed by samples.
pub const SAMPLE_OVER: u64 = 256 << 20;

/// One entry, before its line is written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    kind: char,
    mode: u32,
    uid: u32,
    gid: u32,
    size: Option<u64>,
    mtime: (i64, i64),
    nlink: Option<u64>,
    rdev: Option<(u32, u32)>,
    content: String,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    inode: Option<(u64, u64)>,
}

/// Writes the manifest of the tree at `root` to `out`. Errors name the path.
pub fn write(root: &Path, out: &mut dyn Write) -> io::Result<()> {
    let mut lines: BTreeMap<Vec<u8>, Line> = BTreeMap::new();
    let mut stack = vec![PathBuf::from("/")];
    while let Some(rel) = stack.pop() {
        let path = join(root, &rel);
        let line = entry(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        if line.kind == 'd' {
            let rd = std::fs::read_dir(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            for e in rd {
                let e = e?;
                stack.push(rel.join(e.file_name()));
            }
        }
        lines.insert(rel.as_os_str().as_bytes().to_vec(), line);
    }
    // Link groups: names sharing an inode, by their smallest path.
    let mut groups: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    for (p, l) in &lines {
        if let Some(ino) = l.inode {
            groups.entry(ino).or_insert_with(|| p.clone());
        }
    }
    let mut counts: HashMap<(u64, u64), usize> = HashMap::new();
    for l in lines.values() {
        if let Some(ino) = l.inode {
            *counts.entry(ino).or_default() += 1;
        }
    }
    let mut w = io::BufWriter::new(out);
    for (p, l) in &lines {
        let group = match l.inode {
            Some(ino) if counts[&ino] > 1 => escape(&groups[&ino]),
            _ => "-".into(),
        };
        let xattrs = if l.xattrs.is_empty() {
            "-".to_string()
        } else {
            l.xattrs
                .iter()
                .map(|(n, v)| format!("{}={}", escape(n), hex(v)))
                .collect::<Vec<_>>()
                .join(",")
        };
        writeln!(
            w,
            "{}\t{}\t{:o}\t{}\t{}\t{}\t{}.{:09}\t{}\t{}\t{}\t{}\t{}",
            escape(p),
            l.kind,
            l.mode,
            l.uid,
            l.gid,
            l.size.map_or("-".into(), |s| s.to_string()),
            l.mtime.0,
            l.mtime.1,
            l.nlink.map_or("-".into(), |n| n.to_string()),
            l.rdev.map_or("-".into(), |(a, b)| format!("{a}:{b}")),
            group,
            if l.content.is_empty() {
                "-"
            } else {
                &l.content
            },
            xattrs,
        )?;
    }
    w.flush()
}

/// The manifest of `root` as a string.
pub fn to_string(root: &Path) -> io::Result<String> {
    let mut out = Vec::new();
    write(root, &mut out)?;
    Ok(String::from_utf8(out).expect("escaped to ASCII"))
}

fn join(root: &Path, rel: &Path) -> PathBuf {
    let r = rel.strip_prefix("/").unwrap_or(rel);
    if r.as_os_str().is_empty() {
        root.to_path_buf()
    } else {
        root.join(r)
    }
}

fn entry(path: &Path) -> io::Result<Line> {
    let md = std::fs::symlink_metadata(path)?;
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_file() {
        'f'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else if ft.is_fifo() {
        'p'
    } else {
        's'
    };
    let content = match kind {
        'f' => hash_file(path, md.size())?,
        'l' => hex(&Sha256::digest(
            std::fs::read_link(path)?.as_os_str().as_bytes(),
        )),
        _ => String::new(),
    };
    let rdev = matches!(kind, 'c' | 'b').then(|| {
        let d = md.rdev();
        (libc::major(d), libc::minor(d))
    });
    Ok(Line {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size: matches!(kind, 'f' | 'l').then_some(md.size()),
        mtime: (md.mtime(), md.mtime_nsec()),
        nlink: (kind != 'd').then_some(md.nlink()),
        rdev,
        content,
        xattrs: xattrs(path)?,
        inode: (kind != 'd' && md.nlink() > 1).then_some((md.dev(), md.ino())),
    })
}

fn hash_file(path: &Path, size: u64) -> io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    if size <= SAMPLE_OVER {
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        return Ok(hex(&h.finalize()));
    }
    let mut sample = |off: u64, len: usize, f: &mut std::fs::File| -> io::Result<()> {
        f.seek(SeekFrom::Start(off))?;
        f.read_exact(&mut buf[..len])?;
        h.update(&buf[..len]);
        Ok(())
    };
    sample(0, 1 << 20, &mut f)?;
    let mut off = 64 << 20;
    while off + 4096 <= size {
        sample(off, 4096, &mut f)?;
        off += 64 << 20;
    }
    sample(size - (1 << 20), 1 << 20, &mut f)?;
    Ok(format!("sampled:{}", hex(&h.finalize())))
}

/// Every xattr of `path` (not following symlinks), sorted by name.
fn xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: `c` is a valid path and `names` a writable buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        // Filesystems without xattrs (busybox's initramfs, say) have none to list.
        if e.raw_os_error() == Some(libc::ENOTSUP) {
            return Ok(Vec::new());
        }
        return Err(e);
    }
    let mut out = Vec::new();
    let mut value = vec![0u8; 64 << 10];
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
    {
        let cn = CString::new(name)?;
        // SAFETY: valid path and name, and a writable buffer of the given length.
        let len = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cn.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if len < 0 {
            return Err(io::Error::other(format!(
                "getxattr {}: {}",
                String::from_utf8_lossy(name),
                io::Error::last_os_error()
            )));
        }
        out.push((name.to_vec(), value[..len as usize].to_vec()));
    }
    out.sort();
    Ok(out)
}

fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        if (0x21..0x7f).contains(&b) && b != b'\\' {
            s.push(b as char);
        } else {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The lines of `a` and `b` that differ, as `- LINE` (only in `a`) and `+ LINE` (only
/// in `b`), in path order; empty when the manifests are equal.
pub fn diff(a: &str, b: &str) -> Vec<String> {
    let key = |l: &str| l.split('\t').next().unwrap_or("").to_string();
    let am: BTreeMap<String, &str> = a.lines().map(|l| (key(l), l)).collect();
    let bm: BTreeMap<String, &str> = b.lines().map(|l| (key(l), l)).collect();
    let mut out = Vec::new();
    for (k, l) in &am {
        match bm.get(k) {
            Some(m) if m == l => {}
            Some(m) => {
                out.push(format!("- {l}"));
                out.push(format!("+ {m}"));
            }
            None => out.push(format!("- {l}")),
        }
    }
    for (k, l) in &bm {
        if !am.contains_key(k) {
            out.push(format!("+ {l}"));
        }
    }
    out
}

/// Gives `path` (not following a symlink for the owner and mtime) mode `mode` (permission
/// bits), owner `uid:gid` and mtime `sec.nsec`: what an overlay's upper root takes from
/// the image root's own metadata.
pub fn set_meta(path: &Path, mode: u32, uid: u32, gid: u32, sec: i64, nsec: i64) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
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
    // SAFETY: `path` is a valid C string and `times` a two-element array, for the calls.
    let rc = unsafe {
        if libc::lchown(path.as_ptr(), uid as libc::uid_t, gid as libc::gid_t) != 0
            || libc::chmod(path.as_ptr(), mode as libc::mode_t) != 0
        {
            -1
        } else {
            libc::utimensat(
                libc::AT_FDCWD,
                path.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn a_manifest_lists_every_entry_with_its_metadata() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir(r.join("d")).unwrap();
        std::fs::write(r.join("d/f"), b"hello").unwrap();
        std::fs::hard_link(r.join("d/f"), r.join("g")).unwrap();
        std::os::unix::fs::symlink("d/f", r.join("l")).unwrap();
        std::fs::write(r.join(OsStr::from_bytes(b"caf\xe9 x")), b"").unwrap();
        let m = to_string(r).unwrap();
        let lines: Vec<&str> = m.lines().collect();
        assert_eq!(lines.len(), 6, "{m}");
        assert!(lines[0].starts_with("/\td\t"), "{m}");
        let f = lines.iter().find(|l| l.starts_with("/d/f\t")).unwrap();
        let fields: Vec<&str> = f.split('\t').collect();
        assert_eq!(fields[1], "f");
        assert_eq!(fields[5], "5");
        assert_eq!(fields[7], "2");
        assert_eq!(fields[9], "/d/f");
        assert_eq!(fields[10], hex(&Sha256::digest(b"hello")));
        assert!(m.contains("/caf\\xe9\\x20x\t"), "{m}");
        // Equal trees, equal manifests; a changed file shows as its line changed.
        assert!(diff(&m, &to_string(r).unwrap()).is_empty());
        std::fs::write(r.join("d/f"), b"hellO").unwrap();
        let d = diff(&m, &to_string(r).unwrap());
        assert_eq!(d.len(), 4, "{d:?}");
        assert!(
            d[0].starts_with("- /d/f\t") && d[1].starts_with("+ /d/f\t"),
            "{d:?}"
        );
        assert!(
            d[2].starts_with("- /g\t") && d[3].starts_with("+ /g\t"),
            "{d:?}"
        );
    }
}
