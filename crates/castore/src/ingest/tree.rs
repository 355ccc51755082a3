//! The in-memory tree an import builds before it is encoded into stored trees.

use std::collections::{BTreeMap, HashMap};

use crate::Digest;
use crate::model::{Entry, FileData, INLINE_MAX, Kind, Timespec, Tree};

/// Metadata every node has.
#[derive(Debug, Clone, Default)]
pub(crate) struct Meta {
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mtime: Timespec,
    pub(crate) xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, Clone)]
pub(crate) enum NodeKind {
    Dir {
        children: BTreeMap<Vec<u8>, Node>,
        opaque: bool,
    },
    /// A regular file whose content (and length) is `slot` in the import's file table.
    File {
        slot: usize,
    },
    Symlink(Vec<u8>),
    CharDev(u64),
    BlockDev(u64),
    Fifo,
    Socket,
    Whiteout,
}

/// A node; non-directories carry an inode number shared by their hardlinks.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) meta: Meta,
    pub(crate) kind: NodeKind,
    pub(crate) ino: u64,
}

impl Node {
    pub(crate) fn dir(meta: Meta) -> Node {
        Node {
            meta,
            kind: NodeKind::Dir {
                children: BTreeMap::new(),
                opaque: false,
            },
            ino: 0,
        }
    }

    pub(crate) fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir { .. })
    }
}

/// A layer's tree under construction plus its hardlink bookkeeping.
#[derive(Debug)]
pub(crate) struct BuildTree {
    pub(crate) root: Node,
    pub(crate) root_described: bool,
    next_ino: u64,
    /// How many names each inode has.
    links: HashMap<u64, u32>,
}

impl BuildTree {
    pub(crate) fn new() -> BuildTree {
        BuildTree {
            root: Node::dir(Meta {
                mode: 0o755,
                ..Meta::default()
            }),
            root_described: false,
            next_ino: 1,
            links: HashMap::new(),
        }
    }

    pub(crate) fn new_ino(&mut self) -> u64 {
        let i = self.next_ino;
        self.next_ino += 1;
        self.links.insert(i, 1);
        i
    }

    /// Records one more name for an inode (a hardlink).
    pub(crate) fn add_link(&mut self, ino: u64) {
        *self.links.entry(ino).or_insert(0) += 1;
    }

    fn drop_links(&mut self, node: &Node) {
        match &node.kind {
            NodeKind::Dir { children, .. } => {
                for c in children.values() {
                    self.drop_links(c);
                }
            }
            _ => {
                if let Some(n) = self.links.get_mut(&node.ino) {
                    *n = n.saturating_sub(1);
                }
            }
        }
    }

    /// The directory at `components`, creating missing ones as implicit directories.
    /// Fails with the offending prefix if a component exists and is not a directory.
    pub(crate) fn dir_mut(&mut self, components: &[&[u8]]) -> Result<&mut Node, String> {
        let mut cur = &mut self.root;
        let mut walked: Vec<u8> = Vec::new();
        for c in components {
            if !walked.is_empty() {
                walked.push(b'/');
            }
            walked.extend_from_slice(c);
            let NodeKind::Dir { children, .. } = &mut cur.kind else {
                unreachable!("only directories are descended into")
            };
            let next = children.entry(c.to_vec()).or_insert_with(|| {
                Node::dir(Meta {
                    mode: 0o755,
                    ..Meta::default()
                })
            });
            if !next.is_dir() {
                let what = match next.kind {
                    NodeKind::Symlink(_) => "a symlink",
                    NodeKind::Whiteout => "a whiteout",
                    _ => "not a directory",
                };
                return Err(format!(
                    "parent {} is {what}; refusing to write through it",
                    String::from_utf8_lossy(&walked)
                ));
            }
            cur = next;
        }
        Ok(cur)
    }

    /// Inserts `node` at `components` (last one is the name), replacing what was there as
    /// a later tar entry does. A directory over a directory keeps the children.
    pub(crate) fn insert(&mut self, components: &[&[u8]], mut node: Node) -> Result<(), String> {
        let (name, parents) = components.split_last().expect("non-empty path");
        let parent = self.dir_mut(parents)?;
        let NodeKind::Dir { children, .. } = &mut parent.kind else {
            unreachable!("dir_mut returns directories")
        };
        let mut old = children.remove(*name);
        if let (
            NodeKind::Dir {
                children: new_children,
                opaque: new_opaque,
                ..
            },
            Some(Node {
                kind:
                    NodeKind::Dir {
                        children: old_children,
                        opaque: old_opaque,
                        ..
                    },
                ..
            }),
        ) = (&mut node.kind, old.as_mut())
        {
            *new_children = std::mem::take(old_children);
            *new_opaque |= *old_opaque;
        }
        children.insert(name.to_vec(), node);
        if let Some(old) = old {
            self.drop_links(&old);
        }
        Ok(())
    }

    /// Looks a path up without creating anything.
    pub(crate) fn get(&self, components: &[&[u8]]) -> Option<&Node> {
        let mut cur = &self.root;
        for c in components {
            let NodeKind::Dir { children, .. } = &cur.kind else {
                return None;
            };
            cur = children.get(*c)?;
        }
        Some(cur)
    }

    /// Encodes every directory bottom-up. `files` maps file slots to their stored content.
    /// Returns the layer's root entry (empty name) and every tree record with its digest.
    pub(crate) fn encode(
        &self,
        files: &[Option<(FileData, u64)>],
    ) -> (Entry, Vec<(Digest, Vec<u8>)>, LayerCounts) {
        let mut link_ids: HashMap<u64, u64> = HashMap::new();
        let mut out = Vec::new();
        let mut counts = LayerCounts::default();
        let mut seen_inodes = std::collections::HashSet::new();
        let root = self.encode_node(
            b"",
            &self.root,
            files,
            &mut link_ids,
            &mut out,
            &mut counts,
            &mut seen_inodes,
        );
        (root, out, counts)
    }

    #[allow(clippy::too_many_arguments)]
    fn encode_node(
        &self,
        name: &[u8],
        node: &Node,
        files: &[Option<(FileData, u64)>],
        link_ids: &mut HashMap<u64, u64>,
        out: &mut Vec<(Digest, Vec<u8>)>,
        counts: &mut LayerCounts,
        seen_inodes: &mut std::collections::HashSet<u64>,
    ) -> Entry {
        let mut link = 0;
        if !node.is_dir() && self.links.get(&node.ino).copied().unwrap_or(1) > 1 {
            let next = link_ids.len() as u64 + 1;
            link = *link_ids.entry(node.ino).or_insert(next);
        }
        let kind = match &node.kind {
            NodeKind::Dir {
                children, opaque, ..
            } => {
                let entries: Vec<Entry> = children
                    .iter()
                    .map(|(n, c)| {
                        counts.entries += 1;
                        self.encode_node(n, c, files, link_ids, out, counts, seen_inodes)
                    })
                    .collect();
                let bytes = Tree { entries }.encode();
                let d = Digest::of(&bytes);
                out.push((d, bytes));
                Kind::Dir {
                    tree: d,
                    opaque: *opaque,
                }
            }
            NodeKind::File { slot } => {
                let (data, size) = files
                    .get(*slot)
                    .and_then(|f| f.clone())
                    .expect("every file slot is filled before encoding");
                if seen_inodes.insert(node.ino) {
                    counts.files += 1;
                    counts.content_bytes += size;
                }
                debug_assert!(size > INLINE_MAX || matches!(data, FileData::Inline(_)));
                Kind::File { size, data }
            }
            NodeKind::Symlink(t) => Kind::Symlink { target: t.clone() },
            NodeKind::CharDev(r) => Kind::CharDev { rdev: *r },
            NodeKind::BlockDev(r) => Kind::BlockDev { rdev: *r },
            NodeKind::Fifo => Kind::Fifo,
            NodeKind::Socket => Kind::Socket,
            NodeKind::Whiteout => Kind::Whiteout,
        };
        let mut xattrs = node.meta.xattrs.clone();
        xattrs.sort();
        xattrs.dedup_by(|a, b| a.0 == b.0);
        Entry {
            name: name.to_vec(),
            kind,
            mode: node.meta.mode & 0o7777,
            uid: node.meta.uid,
            gid: node.meta.gid,
            mtime: node.meta.mtime,
            xattrs,
            link,
        }
    }
}

/// Sizes of a layer as its tree holds it (entries a later tar entry replaced are gone),
/// for its record and the import's report.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LayerCounts {
    pub(crate) entries: u64,
    /// Regular files, a hardlinked one once.
    pub(crate) files: u64,
    /// Their content bytes.
    pub(crate) content_bytes: u64,
}
