//! Importing a directory tree from the local filesystem.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::pipeline::Producer;
use super::tree::{BuildTree, Meta, Node, NodeKind};
use super::{OPAQUE, WHITEOUT_PREFIX};
use crate::error::{Error, Result};
use crate::model::Timespec;

struct Walk<'p, 'a, 's> {
    producer: &'p Producer<'a, 's>,
    tree: &'p mut BuildTree,
    /// (st_dev, st_ino) of multiply-linked non-directories seen so far.
    seen: HashMap<(u64, u64), Node>,
    root_dev: u64,
}

fn meta_of(md: &std::fs::Metadata, path: &Path) -> Result<Meta> {
    let mut xattrs = Vec::new();
    match xattr::list(path) {
        Ok(names) => {
            for name in names {
                match xattr::get(path, &name) {
                    Ok(Some(v)) => xattrs.push((name.as_bytes().to_vec(), v)),
                    Ok(None) => {}
                    Err(e) => return Err(Error::io("getxattr", path, e)),
                }
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {}
        Err(e) => return Err(Error::io("listxattr", path, e)),
    }
    xattrs.sort();
    Ok(Meta {
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: Timespec {
            sec: md.mtime(),
            nsec: md.mtime_nsec() as u32,
        },
        xattrs,
    })
}

/// Walks `root` into `tree`, queueing regular files on `producer`.
pub(crate) fn walk(producer: &Producer<'_, '_>, root: &Path, tree: &mut BuildTree) -> Result<()> {
    let md = std::fs::symlink_metadata(root).map_err(|e| Error::io("stat", root, e))?;
    if !md.is_dir() {
        return Err(Error::BadInput {
            source_name: root.display().to_string(),
            reason: "not a directory".into(),
        });
    }
    let mut root_node = Node::dir(meta_of(&md, root)?);
    let mut w = Walk {
        producer,
        tree,
        seen: HashMap::new(),
        root_dev: md.dev(),
    };
    w.dir(root, "", &mut root_node)?;
    w.tree.root = root_node;
    w.tree.root_described = true;
    Ok(())
}

impl Walk<'_, '_, '_> {
    fn dir(&mut self, path: &Path, rel: &str, node: &mut Node) -> Result<()> {
        if self.producer.aborted() {
            return Ok(());
        }
        let rd = std::fs::read_dir(path).map_err(|e| Error::io("read directory", path, e))?;
        let mut names = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| Error::io("read directory", path, e))?;
            names.push(ent.file_name());
        }
        let mut opaque = false;
        for name in names {
            let bytes = name.as_bytes();
            let child_path = path.join(&name);
            let child_rel = if rel.is_empty() {
                String::from_utf8_lossy(bytes).into_owned()
            } else {
                format!("{rel}/{}", String::from_utf8_lossy(bytes))
            };
            let md = std::fs::symlink_metadata(&child_path)
                .map_err(|e| Error::io("stat", &child_path, e))?;
            if bytes == OPAQUE {
                opaque = true;
                continue;
            }
            let (name_bytes, whiteout) = match bytes.strip_prefix(WHITEOUT_PREFIX) {
                Some(hidden) if !hidden.is_empty() => (hidden.to_vec(), true),
                _ => (bytes.to_vec(), false),
            };
            let meta = meta_of(&md, &child_path)?;
            let child = if whiteout {
                Node {
                    meta,
                    kind: NodeKind::Whiteout,
                    ino: self.tree.new_ino(),
                }
            } else if md.is_dir() {
                let mut n = Node::dir(meta);
                // Like `tar --one-file-system`: a mount point is kept, its contents are not.
                if md.dev() == self.root_dev {
                    self.dir(&child_path, &child_rel, &mut n)?;
                }
                n
            } else if md.nlink() > 1
                && let Some(first) = self.seen.get(&(md.dev(), md.ino()))
            {
                let n = first.clone();
                self.tree.add_link(n.ino);
                n
            } else {
                let ft = md.file_type();
                let kind = if ft.is_file() {
                    let sparse = md.blocks() * 512 < md.size() && md.size() > 0;
                    let slot = self.producer.file(
                        child_rel.clone(),
                        child_path.clone(),
                        md.size(),
                        sparse,
                    )?;
                    NodeKind::File { slot }
                } else if ft.is_symlink() {
                    let t = std::fs::read_link(&child_path)
                        .map_err(|e| Error::io("readlink", &child_path, e))?;
                    NodeKind::Symlink(t.as_os_str().as_bytes().to_vec())
                } else if ft.is_char_device() {
                    NodeKind::CharDev(md.rdev())
                } else if ft.is_block_device() {
                    NodeKind::BlockDev(md.rdev())
                } else if ft.is_fifo() {
                    NodeKind::Fifo
                } else {
                    NodeKind::Socket
                };
                let n = Node {
                    meta,
                    kind,
                    ino: self.tree.new_ino(),
                };
                if md.nlink() > 1 {
                    self.seen.insert((md.dev(), md.ino()), n.clone());
                }
                n
            };
            let NodeKind::Dir { children, .. } = &mut node.kind else {
                unreachable!("walking a directory node")
            };
            children.insert(name_bytes, child);
        }
        if let NodeKind::Dir { opaque: o, .. } = &mut node.kind {
            *o = opaque;
        }
        Ok(())
    }
}
