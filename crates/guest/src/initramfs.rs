//! A deterministic initramfs: the kernel's `newc` cpio format (`Documentation/
//! driver-api/early-userspace/buffer-format.rst`), uncompressed, with every entry's
//! mtime 0 and inode numbers in path order, so the same inputs give the same bytes.

use std::collections::BTreeMap;
use std::io::{self, Write};

#[derive(Debug, Clone)]
enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: Vec<u8> },
    CharDev { mode: u32, major: u32, minor: u32 },
}

/// The archive being built; parents of every path are added as directories (0755).
#[derive(Debug, Default, Clone)]
pub struct Initramfs {
    entries: BTreeMap<String, Node>,
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Initramfs {
        Initramfs::default()
    }

    fn add(&mut self, path: &str, node: Node) {
        let path = path.trim_matches('/').to_string();
        assert!(
            !path.is_empty()
                && !path
                    .split('/')
                    .any(|c| c.is_empty() || c == "." || c == ".."),
            "bad initramfs path {path:?}"
        );
        let mut parent = String::new();
        for c in path
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .expect("non-empty")
            .1
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(c);
            self.entries
                .entry(parent.clone())
                .or_insert(Node::Dir { mode: 0o755 });
        }
        self.entries.insert(path, node);
    }

    /// A directory.
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.add(path, Node::Dir { mode });
        self
    }

    /// A regular file.
    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> &mut Self {
        self.add(path, Node::File { mode, data });
        self
    }

    /// A symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.add(
            path,
            Node::Symlink {
                target: target.as_bytes().to_vec(),
            },
        );
        self
    }

    /// A character device (e.g. `dev/console` 5:1, which the kernel opens for init
    /// before devtmpfs is mounted).
    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> &mut Self {
        self.add(path, Node::CharDev { mode, major, minor });
        self
    }

    /// Writes the archive.
    pub fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let mut w = Writer { out, pos: 0 };
        for (i, (path, node)) in self.entries.iter().enumerate() {
            let ino = i as u32 + 1;
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match node {
                Node::Dir { mode } => (libc::S_IFDIR | mode, &[], (0, 0)),
                Node::File { mode, data } => (libc::S_IFREG | mode, data, (0, 0)),
                Node::Symlink { target } => (libc::S_IFLNK | 0o777, target, (0, 0)),
                Node::CharDev { mode, major, minor } => {
                    (libc::S_IFCHR | mode, &[], (*major, *minor))
                }
            };
            let nlink = if matches!(node, Node::Dir { .. }) {
                2
            } else {
                1
            };
            w.entry(path.as_bytes(), ino, mode, nlink, data, rdev)?;
        }
        w.entry(b"TRAILER!!!", 0, 0, 1, &[], (0, 0))?;
        w.out.flush()
    }

    /// The archive as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write(&mut v).expect("writing to memory");
        v
    }
}

struct Writer<'a> {
    out: &'a mut dyn Write,
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.pos += b.len();
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = self.pos.next_multiple_of(4) - self.pos;
        self.put(&[0u8; 3][..n])
    }

    fn entry(
        &mut self,
        name: &[u8],
        ino: u32,
        mode: u32,
        nlink: u32,
        data: &[u8],
        rdev: (u32, u32),
    ) -> io::Result<()> {
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(data.len())
                .map_err(|_| io::Error::other("initramfs entry over 4 GiB"))?,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut h = String::from("070701");
        for f in fields {
            h.push_str(&format!("{f:08X}"));
        }
        self.put(h.as_bytes())?;
        self.put(name)?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }
}

/// The kernel modules a Tidedge guest loads (with their dependencies): virtio over PCI,
/// block, console and network devices, EROFS, overlayfs. ext4 is built into Debian's
/// cloud kernel.
pub const MODULES: [&str; 6] = [
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "erofs",
    "overlay",
];

/// The files of `names` and of every module they depend on, under `modules_dir`
/// (`lib/modules/VERSION`, with the `modules.dep` depmod writes), in an order that
/// loads each after its dependencies (`modules.dep` lists a module's dependencies so
/// that the last is loaded first).
pub fn module_order(
    modules_dir: &std::path::Path,
    names: &[&str],
) -> Result<Vec<std::path::PathBuf>, String> {
    let dep_path = modules_dir.join("modules.dep");
    let dep = std::fs::read_to_string(&dep_path)
        .map_err(|e| format!("{}: {e} (run depmod)", dep_path.display()))?;
    let table: Vec<(&str, Vec<&str>)> = dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| (m, d.split_whitespace().collect()))
        .collect();
    let stem = |m: &str| -> String {
        let file = m.rsplit('/').next().unwrap_or(m);
        let file = file.split(".ko").next().unwrap_or(file);
        file.replace('-', "_")
    };
    let mut order = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for name in names {
        let want = name.replace('-', "_");
        let (m, deps) = table
            .iter()
            .find(|(m, _)| stem(m) == want)
            .ok_or_else(|| format!("module {name} is not in {}", dep_path.display()))?;
        for d in deps.iter().rev().chain(std::iter::once(m)) {
            if seen.insert(*d) {
                order.push(modules_dir.join(d));
            }
        }
    }
    Ok(order)
}

impl Initramfs {
    /// `modules` (files, in load order) under `lib/modules`, and `modules.order`
    /// naming them in that order (what `tide-init` loads).
    pub fn modules(&mut self, modules: &[std::path::PathBuf]) -> Result<&mut Self, String> {
        let mut order = String::new();
        for m in modules {
            let name = m
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| format!("{}: not a module file name", m.display()))?
                .to_string();
            let bytes = std::fs::read(m).map_err(|e| format!("{}: {e}", m.display()))?;
            self.file(&format!("lib/modules/{name}"), 0o644, bytes);
            order.push_str(&name);
            order.push('\n');
        }
        self.file("modules.order", 0o644, order.into_bytes());
        Ok(self)
    }

    /// The mount points and console every guest's initramfs has.
    pub fn base(&mut self) -> &mut Self {
        for d in ["proc", "sys", "dev", "tmp"] {
            self.dir(d, 0o755);
        }
        self.char_dev("dev/console", 0o600, 5, 1);
        self
    }
}

/// The initramfs of a Tidedge guest: `init` (the static `tide-init`) as `/init` and the
/// [`MODULES`] of the kernel whose modules are in `modules_dir`; nothing else (the app
/// runs in the image's root).
pub fn tidedge(init: Vec<u8>, modules_dir: &std::path::Path) -> Result<Vec<u8>, String> {
    let mut fs = Initramfs::new();
    fs.file("init", 0o755, init);
    fs.modules(&module_order(modules_dir, &MODULES)?)?;
    fs.base();
    Ok(fs.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_lists_the_archive_in_path_order_with_parents() {
        let mut i = Initramfs::new();
        i.file("bin/busybox", 0o755, b"ELF...".to_vec())
            .symlink("bin/sh", "busybox")
            .char_dev("dev/console", 0o600, 5, 1)
            .file("init", 0o755, b"#!/bin/sh\n".to_vec());
        let bytes = i.to_bytes();
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(bytes, i.to_bytes(), "deterministic");
        // GNU cpio reads it back, names in order.
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("a.cpio"), &bytes).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("cpio -it < {}", t.path().join("a.cpio").display()))
            .output()
            .expect("cpio is installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let names = String::from_utf8(out.stdout).unwrap();
        assert_eq!(names, "bin\nbin/busybox\nbin/sh\ndev\ndev/console\ninit\n");
    }
}
