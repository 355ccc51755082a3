//! Synthesis: one layer's trees → EROFS metadata in memory plus a map from data blocks to
//! file ranges. Three passes over an inode list built breadth-first from the root:
//! walk (read every tree once, decide each inode's content), place (give each inode its
//! offset, hence its nid, and each data-bearing file its blocks), write (encode inodes,
//! xattrs, directory blocks and inline tails into the metadata buffer).
//!
//! Everything is a function of the layer's records: trees are visited in name order,
//! hardlinks become one inode at their first name in that order, the UUID comes from
//! the layer digest and the build time from the layer root's mtime. No file byte is
//! read: file data blocks are only addressed here.

use std::collections::{HashMap, VecDeque};

use castore::{Digest, Entry, FileData, FileLayout, Kind, Layer, Segment, Store, Timespec};

use super::format::{
    self, BLOCK, FEATURE_INCOMPAT_CHUNKED_FILE, INODE_EXTENDED, Inode, LAYOUT_CHUNK_BASED,
    LAYOUT_FLAT_INLINE, LAYOUT_FLAT_PLAIN, NAME_LEN, NULL_ADDR, SLOT, Super, ft,
};
use super::{BuildReport, DataExtent, Error, Image};

/// Inodes start right after the superblock, in block 0: the root's nid is 36.
const FIRST_INODE: u64 = 1152;

/// A sparse file's chunk map is kept to at most this many entries (16 KiB): its chunk
/// size is the smallest power of two (from one block) that keeps it there.
const MAX_CHUNKS: u64 = 4096;

/// The xattr that makes overlayfs treat a lower directory as opaque.
const OPAQUE: (&[u8], &[u8]) = (b"overlay.opaque", b"y");

/// What an inode holds.
#[derive(Debug)]
enum Body {
    /// Children (name, inode), in name order, without `.` and `..`.
    Dir {
        parent: usize,
        children: Vec<(Vec<u8>, usize)>,
    },
    /// A regular file's bytes: castore's inline bytes, or its layout in the store.
    File {
        size: u64,
        content: Content,
    },
    Symlink(Vec<u8>),
    /// A character or block device (kernel encoding), or a whiteout (0).
    Device(u32),
    /// FIFOs and sockets.
    Nothing,
}

#[derive(Debug)]
enum Content {
    Inline(Vec<u8>),
    Stored(FileLayout),
}

#[derive(Debug)]
struct Node {
    /// `S_IFMT` | permission bits.
    mode: u16,
    uid: u32,
    gid: u32,
    mtime: Timespec,
    nlink: u32,
    /// (name index, suffix, value), in the entry's name order.
    xattrs: Vec<(u8, Vec<u8>, Vec<u8>)>,
    body: Body,
}

/// Where an inode's content ended up.
#[derive(Debug, Default, Clone)]
struct Placed {
    /// Byte offset of the inode in the image (nid × 32).
    offset: u64,
    layout: u16,
    size: u64,
    /// `raw_blkaddr` of the first full block, or `NULL_ADDR`.
    blkaddr: u32,
    /// Bytes of content kept right after the inode and its xattrs.
    tail: usize,
    /// Chunk-based files: the chunk size's extra bits and the map entries.
    chunk_bits: u8,
    chunk_map: Vec<u32>,
}

/// Builds the image of `layer_digest`.
pub(super) fn build(store: &Store, layer_digest: &Digest) -> Result<Image, Error> {
    let started = std::time::Instant::now();
    let layer = store.layer(layer_digest)?;
    let mut report = BuildReport::default();
    let nodes = walk(store, &layer, &mut report)?;
    let mut b = Builder {
        nodes,
        placed: Vec::new(),
        extra: Vec::new(),
        files: Vec::new(),
        extents: Vec::new(),
        chunked: false,
    };
    let (meta_blocks, blocks) = b.place()?;
    let meta = b.write(&layer, layer_digest, meta_blocks, blocks);
    report.inodes = b.nodes.len() as u64;
    report.metadata_bytes = meta.len() as u64;
    report.data_bytes = (blocks - meta_blocks) * BLOCK;
    report.build_time = started.elapsed();
    Ok(Image {
        layer: *layer_digest,
        meta,
        blocks,
        files: b.files,
        extents: b.extents,
        report,
    })
}

/// Reads the layer's trees breadth-first and turns every entry into an inode (or, for a
/// further name of a hardlink group, a reference to one).
fn walk(store: &Store, layer: &Layer, report: &mut BuildReport) -> Result<Vec<Node>, Error> {
    let mut nodes = Vec::new();
    let Kind::Dir { tree, opaque } = &layer.root.kind else {
        return Err(Error::Unrepresentable {
            path: "/".into(),
            why: "the layer's root is not a directory".into(),
        });
    };
    // The root is its own parent.
    let root = Body::Dir {
        parent: 0,
        children: Vec::new(),
    };
    nodes.push(node(&layer.root, *opaque, root, b"/", report)?);
    let mut queue = VecDeque::from([(0usize, *tree, b"/".to_vec())]);
    let mut links: HashMap<u64, usize> = HashMap::new();
    while let Some((dir, tree, path)) = queue.pop_front() {
        let t = store.tree(&tree)?;
        let mut children = Vec::with_capacity(t.entries.len());
        let mut subdirs = 0u32;
        for e in t.entries {
            let mut child_path = path.clone();
            if child_path.len() > 1 {
                child_path.push(b'/');
            }
            child_path.extend_from_slice(&e.name);
            if e.name.len() > NAME_LEN {
                return Err(Error::Unrepresentable {
                    path: show(&child_path),
                    why: format!("name is {} bytes; EROFS allows {NAME_LEN}", e.name.len()),
                });
            }
            if e.link != 0
                && !matches!(e.kind, Kind::Dir { .. })
                && let Some(&n) = links.get(&e.link)
            {
                nodes[n].nlink += 1;
                children.push((e.name, n));
                continue;
            }
            let (body, opaque) = match &e.kind {
                Kind::Dir { tree, opaque } => {
                    queue.push_back((nodes.len(), *tree, child_path.clone()));
                    subdirs += 1;
                    // Its children are filled in when the queue reaches it.
                    let body = Body::Dir {
                        parent: dir,
                        children: Vec::new(),
                    };
                    (body, *opaque)
                }
                Kind::File { size, data } => {
                    let content = match data {
                        FileData::Inline(b) => Content::Inline(b.clone()),
                        d => Content::Stored(store.file_layout(d, *size)?),
                    };
                    (
                        Body::File {
                            size: *size,
                            content,
                        },
                        false,
                    )
                }
                Kind::Symlink { target } => {
                    if target.len() >= BLOCK as usize {
                        return Err(Error::Unrepresentable {
                            path: show(&child_path),
                            why: format!(
                                "symlink target is {} bytes; Linux allows 4095",
                                target.len()
                            ),
                        });
                    }
                    (Body::Symlink(target.clone()), false)
                }
                Kind::CharDev { rdev } | Kind::BlockDev { rdev } => {
                    (Body::Device(format::encode_dev(*rdev)), false)
                }
                // overlayfs's own whiteout: a character device 0/0.
                Kind::Whiteout => (Body::Device(0), false),
                Kind::Fifo | Kind::Socket => (Body::Nothing, false),
            };
            let n = nodes.len();
            nodes.push(node(&e, opaque, body, &child_path, report)?);
            if e.link != 0 && !matches!(e.kind, Kind::Dir { .. }) {
                links.insert(e.link, n);
            }
            children.push((e.name, n));
        }
        nodes[dir].nlink = 2 + subdirs;
        if let Body::Dir { children: c, .. } = &mut nodes[dir].body {
            *c = children;
        }
    }
    Ok(nodes)
}

fn node(
    e: &Entry,
    opaque: bool,
    body: Body,
    path: &[u8],
    report: &mut BuildReport,
) -> Result<Node, Error> {
    let kind_bits = match &e.kind {
        // A whiteout is stored as overlayfs expects it.
        Kind::Whiteout => libc::S_IFCHR,
        k => k.file_type_bits(),
    };
    let mut xattrs = Vec::with_capacity(e.xattrs.len() + usize::from(opaque));
    for (name, value) in &e.xattrs {
        let Some((index, suffix)) = format::xattr_index(name) else {
            report.dropped_xattrs.push(format!(
                "{}: {}",
                show(path),
                String::from_utf8_lossy(name)
            ));
            continue;
        };
        // overlayfs in the guest reads `trusted.overlay.*` as its own instructions; the
        // 6.1 kernel has no escaped form for an image's own, so they are not passed on.
        if index == 4 && suffix.starts_with(b"overlay.") {
            report.dropped_xattrs.push(format!(
                "{}: {}",
                show(path),
                String::from_utf8_lossy(name)
            ));
            continue;
        }
        if suffix.len() > NAME_LEN || value.len() > usize::from(u16::MAX) {
            return Err(Error::Unrepresentable {
                path: show(path),
                why: format!(
                    "xattr {} ({} bytes of value) is too large for EROFS",
                    String::from_utf8_lossy(name),
                    value.len()
                ),
            });
        }
        xattrs.push((index, suffix.to_vec(), value.clone()));
    }
    if opaque {
        xattrs.push((4, OPAQUE.0.to_vec(), OPAQUE.1.to_vec()));
    }
    Ok(Node {
        mode: (kind_bits | (e.mode & 0o7777)) as u16,
        uid: e.uid,
        gid: e.gid,
        mtime: e.mtime,
        nlink: 1,
        xattrs,
        body,
    })
}

fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

struct Builder {
    nodes: Vec<Node>,
    placed: Vec<Placed>,
    /// Full blocks of metadata kept outside the inode area (directory blocks, tails that
    /// did not fit inline), as (first block index in `extra`, owner inode).
    extra: Vec<(u64, usize)>,
    files: Vec<FileLayout>,
    extents: Vec<DataExtent>,
    chunked: bool,
}

/// A directory entry as laid out: (name, inode, file type).
type DirEntry<'a> = (&'a [u8], usize, u8);

/// A directory's entries (with `.` and `..`) cut into blocks: each block's entries, and
/// the directory's size.
fn dir_blocks<'a>(
    nodes: &'a [Node],
    me: usize,
    parent: usize,
    children: &'a [(Vec<u8>, usize)],
) -> (Vec<Vec<DirEntry<'a>>>, u64) {
    let mut all: Vec<DirEntry<'a>> = Vec::with_capacity(children.len() + 2);
    all.push((b".", me, ft::DIR));
    all.push((b"..", parent, ft::DIR));
    all.extend(
        children
            .iter()
            .map(|(n, c)| (n.as_slice(), *c, file_type(nodes[*c].mode))),
    );
    // `.` and `..` sort among the names by their bytes too.
    all.sort_by(|a, b| a.0.cmp(b.0));
    let mut blocks: Vec<Vec<DirEntry<'a>>> = vec![Vec::new()];
    let mut used = 0usize;
    for e in all {
        let len = format::dirent_len(e.0);
        if used + len > BLOCK as usize {
            blocks.push(Vec::new());
            used = 0;
        }
        used += len;
        blocks.last_mut().expect("one block at least").push(e);
    }
    let size = (blocks.len() as u64 - 1) * BLOCK + used as u64;
    (blocks, size)
}

fn file_type(mode: u16) -> u8 {
    match u32::from(mode) & libc::S_IFMT {
        libc::S_IFREG => ft::REG,
        libc::S_IFDIR => ft::DIR,
        libc::S_IFCHR => ft::CHRDEV,
        libc::S_IFBLK => ft::BLKDEV,
        libc::S_IFIFO => ft::FIFO,
        libc::S_IFSOCK => ft::SOCK,
        _ => ft::SYMLINK,
    }
}

fn xattr_body_len(n: &Node) -> usize {
    if n.xattrs.is_empty() {
        return 0;
    }
    format::XATTR_IBODY_HEADER
        + n.xattrs
            .iter()
            .map(|(_, s, v)| format::xattr_entry_len(s, v))
            .sum::<usize>()
}

impl Builder {
    /// Gives every inode its offset and content placement, every full metadata block and
    /// every data block its address. Returns (metadata blocks, total blocks).
    fn place(&mut self) -> Result<(u64, u64), Error> {
        let n = self.nodes.len();
        self.placed = vec![Placed::default(); n];
        let mut pos = FIRST_INODE;
        // Metadata blocks outside the inode area, counted from its end.
        let mut extra_blocks = 0u64;
        for i in 0..n {
            let node = &self.nodes[i];
            let xlen = xattr_body_len(node) as u64;
            let (size, mut tail, full_blocks, layout) = match &node.body {
                Body::Dir { parent, children } => {
                    let (_, size) = dir_blocks(&self.nodes, i, *parent, children);
                    let tail = size % BLOCK;
                    (
                        size,
                        tail as usize,
                        size / BLOCK,
                        if tail == 0 {
                            LAYOUT_FLAT_PLAIN
                        } else {
                            LAYOUT_FLAT_INLINE
                        },
                    )
                }
                Body::Symlink(t) => (t.len() as u64, t.len(), 0, LAYOUT_FLAT_INLINE),
                Body::File {
                    size,
                    content: Content::Inline(b),
                } => (*size, b.len(), 0, LAYOUT_FLAT_INLINE),
                Body::File { size, .. } => (*size, 0, 0, LAYOUT_FLAT_PLAIN),
                Body::Device(_) | Body::Nothing => (0, 0, 0, LAYOUT_FLAT_PLAIN),
            };
            // Nothing to keep inline: plain.
            let mut layout = if tail == 0 { LAYOUT_FLAT_PLAIN } else { layout };
            // A sparse file's chunk map lives after the inode like an inline tail.
            let chunk_map = match &node.body {
                Body::File {
                    size,
                    content: Content::Stored(l),
                } if has_holes(l) => {
                    let bits = chunk_bits(*size);
                    let chunks = size.div_ceil(BLOCK << bits);
                    self.placed[i].chunk_bits = bits;
                    layout = LAYOUT_CHUNK_BASED;
                    chunks as usize * 4
                }
                _ => 0,
            };
            let fixed = INODE_EXTENDED as u64 + xlen + chunk_map as u64;
            // An inode never straddles two blocks; inline content never crosses one.
            let fits = |at: u64, tail: usize| {
                let inode_ok = at % BLOCK + INODE_EXTENDED as u64 <= BLOCK;
                let tail_ok = tail == 0 || (at + fixed) % BLOCK + tail as u64 <= BLOCK;
                inode_ok && tail_ok
            };
            if !fits(pos, tail) {
                let next = pos.next_multiple_of(BLOCK);
                if fits(next, tail) {
                    pos = next;
                } else {
                    // Too much to keep inline (large xattrs): the tail gets a block of its
                    // own and the inode stays where it is.
                    tail = 0;
                    layout = LAYOUT_FLAT_PLAIN;
                    if !fits(pos, 0) {
                        pos = next;
                    }
                }
            }
            let mut blocks_out = full_blocks;
            if layout == LAYOUT_FLAT_PLAIN
                && size % BLOCK != 0
                && !matches!(
                    node.body,
                    Body::File {
                        content: Content::Stored(_),
                        ..
                    }
                )
            {
                // Directory, symlink or castore-inline file whose tail went to a block.
                blocks_out = size.div_ceil(BLOCK);
            }
            let p = &mut self.placed[i];
            p.offset = pos;
            p.layout = layout;
            p.size = size;
            p.tail = tail;
            p.blkaddr = NULL_ADDR;
            if blocks_out > 0
                && !matches!(
                    node.body,
                    Body::File {
                        content: Content::Stored(_),
                        ..
                    }
                )
            {
                // Resolved to an absolute address once the inode area's end is known.
                p.blkaddr = extra_blocks as u32;
                self.extra.push((extra_blocks, i));
                extra_blocks += blocks_out;
            }
            pos = (pos + fixed + tail as u64).next_multiple_of(SLOT);
        }
        let inode_blocks = pos.div_ceil(BLOCK);
        for (_, owner) in &self.extra {
            let p = &mut self.placed[*owner];
            p.blkaddr =
                u32::try_from(inode_blocks + u64::from(p.blkaddr)).map_err(|_| too_large())?;
        }
        let meta_blocks = inode_blocks + extra_blocks;
        // File data, in inode order.
        let mut next = meta_blocks;
        for i in 0..n {
            let Body::File {
                size,
                content: Content::Stored(layout),
            } = &self.nodes[i].body
            else {
                continue;
            };
            if *size == 0 {
                continue;
            }
            let file = self.files.len() as u32;
            self.files.push(layout.clone());
            let p = &mut self.placed[i];
            if p.layout == LAYOUT_CHUNK_BASED {
                self.chunked = true;
                let chunk = BLOCK << p.chunk_bits;
                let mut map = Vec::with_capacity(size.div_ceil(chunk) as usize);
                let mut off = 0;
                while off < *size {
                    let len = chunk.min(size - off);
                    if is_hole(layout, off, off + len) {
                        map.push(NULL_ADDR);
                    } else {
                        let blocks = len.div_ceil(BLOCK);
                        map.push(u32::try_from(next).map_err(|_| too_large())?);
                        push_extent(&mut self.extents, next, blocks, file, off / BLOCK);
                        next += blocks;
                    }
                    off += len;
                }
                p.chunk_map = map;
            } else {
                let blocks = size.div_ceil(BLOCK);
                p.blkaddr = u32::try_from(next).map_err(|_| too_large())?;
                push_extent(&mut self.extents, next, blocks, file, 0);
                next += blocks;
            }
        }
        if next >= u64::from(NULL_ADDR) {
            return Err(too_large());
        }
        Ok((meta_blocks, next))
    }

    /// Encodes the metadata area.
    fn write(&self, layer: &Layer, digest: &Digest, meta_blocks: u64, blocks: u64) -> Vec<u8> {
        let mut meta = vec![0u8; (meta_blocks * BLOCK) as usize];
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&digest.0[..16]);
        let mut volume_name = [0u8; 16];
        volume_name[..7].copy_from_slice(b"tidedge");
        Super {
            root_nid: (self.placed[0].offset / SLOT) as u16,
            inos: self.nodes.len() as u64,
            build_time: layer.root.mtime.sec.max(0) as u64,
            build_time_nsec: layer.root.mtime.nsec,
            blocks: blocks as u32,
            uuid,
            volume_name,
            feature_incompat: if self.chunked {
                FEATURE_INCOMPAT_CHUNKED_FILE
            } else {
                0
            },
        }
        .write(&mut meta[..BLOCK as usize]);
        let nid = |i: usize| self.placed[i].offset / SLOT;
        for (i, node) in self.nodes.iter().enumerate() {
            let p = &self.placed[i];
            let at = p.offset as usize;
            let xlen = xattr_body_len(node);
            let i_u = match (&node.body, p.layout) {
                (Body::Device(rdev), _) => *rdev,
                (_, LAYOUT_CHUNK_BASED) => u32::from(p.chunk_bits),
                _ => p.blkaddr,
            };
            Inode {
                layout: p.layout,
                xattr_icount: if xlen == 0 {
                    0
                } else {
                    format::xattr_icount(xlen)
                },
                mode: node.mode,
                size: p.size,
                i_u,
                ino: (i + 1) as u32,
                uid: node.uid,
                gid: node.gid,
                mtime: node.mtime.sec,
                mtime_nsec: node.mtime.nsec,
                nlink: node.nlink,
            }
            .write(&mut meta[at..]);
            let mut cur = at + INODE_EXTENDED;
            if xlen > 0 {
                let entries: Vec<(u8, &[u8], &[u8])> = node
                    .xattrs
                    .iter()
                    .map(|(i, s, v)| (*i, s.as_slice(), v.as_slice()))
                    .collect();
                format::write_xattrs(&mut meta[cur..cur + xlen], &entries);
                cur += xlen;
            }
            for a in &p.chunk_map {
                format::put32(&mut meta, cur, *a);
                cur += 4;
            }
            // Content: full blocks at `blkaddr` (metadata-owned), the tail inline.
            let content: Option<Vec<u8>> = match &node.body {
                Body::Dir { parent, children } => {
                    let (blocks, size) = dir_blocks(&self.nodes, i, *parent, children);
                    let mut bytes = vec![0u8; size.next_multiple_of(BLOCK) as usize];
                    for (b, entries) in blocks.iter().enumerate() {
                        let with_nids: Vec<(&[u8], u64, u8)> =
                            entries.iter().map(|(n, c, t)| (*n, nid(*c), *t)).collect();
                        let start = b * BLOCK as usize;
                        let end = (start + BLOCK as usize).min(size as usize);
                        format::write_dir_block(&mut bytes[start..end], &with_nids);
                    }
                    bytes.truncate(size as usize);
                    Some(bytes)
                }
                Body::Symlink(t) => Some(t.clone()),
                Body::File {
                    content: Content::Inline(b),
                    ..
                } => Some(b.clone()),
                _ => None,
            };
            if let Some(bytes) = content {
                let full = bytes.len() - p.tail;
                if full > 0 {
                    let start = (u64::from(p.blkaddr) * BLOCK) as usize;
                    meta[start..start + full].copy_from_slice(&bytes[..full]);
                }
                meta[cur..cur + p.tail].copy_from_slice(&bytes[full..]);
            }
        }
        meta
    }
}

fn too_large() -> Error {
    Error::TooLarge(format!(
        "more than {} blocks of {BLOCK} bytes",
        u32::MAX - 1
    ))
}

/// Appends a data extent, merged with the previous one when both are contiguous in the
/// device and in the same file.
fn push_extent(extents: &mut Vec<DataExtent>, start: u64, blocks: u64, file: u32, file_block: u64) {
    if let Some(last) = extents.last_mut()
        && last.file == file
        && last.start + last.blocks == start
        && last.file_block + last.blocks == file_block
    {
        last.blocks += blocks;
        return;
    }
    extents.push(DataExtent {
        start,
        blocks,
        file,
        file_block,
    });
}

fn has_holes(l: &FileLayout) -> bool {
    match l {
        FileLayout::Inline(_) => false,
        FileLayout::Segments(s) => s.iter().any(|(_, s)| matches!(s, Segment::Hole { .. })),
    }
}

/// Whether `start..end` of the file is all hole.
fn is_hole(l: &FileLayout, start: u64, end: u64) -> bool {
    let FileLayout::Segments(segs) = l else {
        return false;
    };
    let first = segs.partition_point(|(o, s)| o + s.len() <= start);
    segs[first..]
        .iter()
        .take_while(|(o, _)| *o < end)
        .all(|(_, s)| matches!(s, Segment::Hole { .. }))
}

/// The chunk size of a sparse file of `size` bytes: a chunk the file has any data in is
/// mapped to its blocks, the others are holes.
pub fn sparse_chunk_size(size: u64) -> u64 {
    BLOCK << chunk_bits(size)
}

/// The chunk size bits for a sparse file of `size` bytes (see [`MAX_CHUNKS`]).
fn chunk_bits(size: u64) -> u8 {
    let mut bits = 0u8;
    while size.div_ceil(BLOCK << bits) > MAX_CHUNKS && bits < 31 {
        bits += 1;
    }
    bits
}
