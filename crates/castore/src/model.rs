//! The stored object model: trees of entries, blobs of chunks, layers and images, each
//! with one canonical encoding so that equal objects get equal digests.

use crate::Digest;
use crate::codec::{DecodeError, Reader, Writer};

/// Files up to this many bytes are stored inside their tree entry instead of as a chunk.
pub const INLINE_MAX: u64 = 128;

const TREE_MAGIC: &[u8; 4] = b"TDT1";
const BLOB_MAGIC: &[u8; 4] = b"TDB1";
const LAYER_MAGIC: &[u8; 4] = b"TDL1";
const IMAGE_MAGIC: &[u8; 4] = b"TDI1";

/// A modification time with nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timespec {
    /// Seconds since the epoch (may be negative).
    pub sec: i64,
    /// Nanoseconds, below 1e9.
    pub nsec: u32,
}

/// Where a regular file's bytes live.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FileData {
    /// Small files: the bytes themselves.
    Inline(Vec<u8>),
    /// Files that are exactly one chunk; the chunk digest is also the content digest.
    Chunk(Digest),
    /// Files of several chunks or with holes: a [`Blob`] record.
    Blob(Digest),
}

/// The type of an entry and what only that type has.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A directory; `opaque` hides every lower layer's entries under it (OCI `.wh..wh..opq`).
    Dir {
        /// The directory's own tree.
        tree: Digest,
        /// Whether lower layers are hidden below this directory.
        opaque: bool,
    },
    /// A regular file.
    File {
        /// Length in bytes.
        size: u64,
        /// Its content.
        data: FileData,
    },
    /// A symbolic link; the target is kept as raw bytes.
    Symlink {
        /// What the link points at.
        target: Vec<u8>,
    },
    /// A character device.
    CharDev {
        /// Device number as `makedev(major, minor)`.
        rdev: u64,
    },
    /// A block device.
    BlockDev {
        /// Device number as `makedev(major, minor)`.
        rdev: u64,
    },
    /// A named pipe.
    Fifo,
    /// A Unix socket (kept for directory imports; tar cannot carry one).
    Socket,
    /// An OCI whiteout: this name is deleted from lower layers.
    Whiteout,
}

impl Kind {
    fn tag(&self) -> u8 {
        match self {
            Kind::Dir { .. } => 1,
            Kind::File { .. } => 2,
            Kind::Symlink { .. } => 3,
            Kind::CharDev { .. } => 4,
            Kind::BlockDev { .. } => 5,
            Kind::Fifo => 6,
            Kind::Socket => 7,
            Kind::Whiteout => 8,
        }
    }

    /// The `S_IFMT` bits of this kind (whiteouts report as character devices 0/0, as
    /// overlayfs does).
    pub fn file_type_bits(&self) -> u32 {
        match self {
            Kind::Dir { .. } => libc::S_IFDIR,
            Kind::File { .. } => libc::S_IFREG,
            Kind::Symlink { .. } => libc::S_IFLNK,
            Kind::CharDev { .. } | Kind::Whiteout => libc::S_IFCHR,
            Kind::BlockDev { .. } => libc::S_IFBLK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
        }
    }
}

/// Metadata and content of one name in a directory.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    /// The name, raw bytes (Linux names are bytes), never empty, `.`, `..` or containing `/`.
    pub name: Vec<u8>,
    /// Type and type-specific content.
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time.
    pub mtime: Timespec,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Hardlink group within the layer: entries with the same non-zero value are one inode.
    pub link: u64,
}

impl Entry {
    fn encode(&self, w: &mut Writer) {
        w.bytes(&self.name);
        self.encode_body(w);
    }

    /// Everything but the name (a layer's root has none).
    fn encode_body(&self, w: &mut Writer) {
        w.u8(self.kind.tag());
        w.varint(u64::from(self.mode));
        w.varint(u64::from(self.uid));
        w.varint(u64::from(self.gid));
        w.varint_signed(self.mtime.sec);
        w.varint(u64::from(self.mtime.nsec));
        w.varint(self.xattrs.len() as u64);
        for (k, v) in &self.xattrs {
            w.bytes(k);
            w.bytes(v);
        }
        w.varint(self.link);
        match &self.kind {
            Kind::Dir { tree, opaque } => {
                w.digest(tree);
                w.u8(u8::from(*opaque));
            }
            Kind::File { size, data } => {
                w.varint(*size);
                match data {
                    FileData::Inline(bytes) => {
                        w.u8(0);
                        w.bytes(bytes);
                    }
                    FileData::Chunk(d) => {
                        w.u8(1);
                        w.digest(d);
                    }
                    FileData::Blob(d) => {
                        w.u8(2);
                        w.digest(d);
                    }
                }
            }
            Kind::Symlink { target } => w.bytes(target),
            Kind::CharDev { rdev } | Kind::BlockDev { rdev } => w.varint(*rdev),
            Kind::Fifo | Kind::Socket | Kind::Whiteout => {}
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Entry, DecodeError> {
        let name = r.bytes()?.to_vec();
        if !valid_name(&name) {
            return Err(DecodeError);
        }
        Entry::decode_body(r, name)
    }

    fn decode_body(r: &mut Reader<'_>, name: Vec<u8>) -> Result<Entry, DecodeError> {
        let tag = r.u8()?;
        let mode = u32::try_from(r.varint()?).map_err(|_| DecodeError)?;
        if mode & !0o7777 != 0 {
            return Err(DecodeError);
        }
        let uid = u32::try_from(r.varint()?).map_err(|_| DecodeError)?;
        let gid = u32::try_from(r.varint()?).map_err(|_| DecodeError)?;
        let sec = r.varint_signed()?;
        let nsec = u32::try_from(r.varint()?).map_err(|_| DecodeError)?;
        if nsec >= 1_000_000_000 {
            return Err(DecodeError);
        }
        let n = r.varint()?;
        let mut xattrs = Vec::new();
        for _ in 0..n {
            let k = r.bytes()?.to_vec();
            let v = r.bytes()?.to_vec();
            if xattrs
                .last()
                .is_some_and(|(prev, _): &(Vec<u8>, Vec<u8>)| *prev >= k)
            {
                return Err(DecodeError);
            }
            xattrs.push((k, v));
        }
        let link = r.varint()?;
        let kind = match tag {
            1 => {
                let tree = r.digest()?;
                let opaque = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError),
                };
                Kind::Dir { tree, opaque }
            }
            2 => {
                let size = r.varint()?;
                let data = match r.u8()? {
                    0 => {
                        let b = r.bytes()?;
                        if b.len() as u64 != size {
                            return Err(DecodeError);
                        }
                        FileData::Inline(b.to_vec())
                    }
                    1 => FileData::Chunk(r.digest()?),
                    2 => FileData::Blob(r.digest()?),
                    _ => return Err(DecodeError),
                };
                Kind::File { size, data }
            }
            3 => Kind::Symlink {
                target: r.bytes()?.to_vec(),
            },
            4 => Kind::CharDev { rdev: r.varint()? },
            5 => Kind::BlockDev { rdev: r.varint()? },
            6 => Kind::Fifo,
            7 => Kind::Socket,
            8 => Kind::Whiteout,
            _ => return Err(DecodeError),
        };
        Ok(Entry {
            name,
            kind,
            mode,
            uid,
            gid,
            mtime: Timespec { sec, nsec },
            xattrs,
            link,
        })
    }
}

/// Whether `name` can be a directory entry name.
pub(crate) fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&0)
}

/// A directory: entries sorted by name, names unique.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    /// The entries, sorted by name bytes.
    pub entries: Vec<Entry>,
}

impl Tree {
    /// The canonical bytes whose SHA-256 names the tree. Entries must already be sorted.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.buf.extend_from_slice(TREE_MAGIC);
        w.varint(self.entries.len() as u64);
        for e in &self.entries {
            e.encode(&mut w);
        }
        w.finish()
    }

    /// Decodes and validates (sorted, unique, valid names).
    pub(crate) fn decode(buf: &[u8]) -> Result<Tree, DecodeError> {
        let mut r = Reader::new(buf);
        if r.take(4)? != TREE_MAGIC {
            return Err(DecodeError);
        }
        let n = r.varint()?;
        let mut entries: Vec<Entry> = Vec::with_capacity(n.min(4096) as usize);
        for _ in 0..n {
            let e = Entry::decode(&mut r)?;
            if entries.last().is_some_and(|prev| prev.name >= e.name) {
                return Err(DecodeError);
            }
            entries.push(e);
        }
        r.end()?;
        Ok(Tree { entries })
    }

    /// Finds an entry by name.
    pub fn get(&self, name: &[u8]) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .ok()
            .map(|i| &self.entries[i])
    }
}

/// One piece of a blob: a chunk, or a hole that reads as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Segment {
    /// `len` bytes stored in chunk `chunk`.
    Data {
        /// The chunk.
        chunk: Digest,
        /// Its raw length.
        len: u32,
    },
    /// `len` zero bytes not stored anywhere (a sparse file's hole).
    Hole {
        /// Length of the hole.
        len: u64,
    },
}

impl Segment {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match *self {
            Segment::Data { len, .. } => u64::from(len),
            Segment::Hole { len } => len,
        }
    }

    /// Whether the segment is zero bytes long (never stored).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A file's content of more than one chunk (or with holes): the SHA-256 of all its bytes
/// and the ordered segments. Named by the digest of its encoding, so the same bytes with a
/// different hole layout are a different blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    /// SHA-256 of the whole content (holes read as zeros).
    pub content: Digest,
    /// The pieces in order; their lengths sum to the file size.
    pub segments: Vec<Segment>,
}

impl Blob {
    /// Total length.
    pub fn size(&self) -> u64 {
        self.segments.iter().map(Segment::len).sum()
    }

    /// Canonical bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.buf.extend_from_slice(BLOB_MAGIC);
        w.digest(&self.content);
        w.varint(self.segments.len() as u64);
        for s in &self.segments {
            match s {
                Segment::Data { chunk, len } => {
                    w.u8(0);
                    w.digest(chunk);
                    w.varint(u64::from(*len));
                }
                Segment::Hole { len } => {
                    w.u8(1);
                    w.varint(*len);
                }
            }
        }
        w.finish()
    }

    pub(crate) fn decode(buf: &[u8]) -> Result<Blob, DecodeError> {
        let mut r = Reader::new(buf);
        if r.take(4)? != BLOB_MAGIC {
            return Err(DecodeError);
        }
        let content = r.digest()?;
        let n = r.varint()?;
        let mut segments = Vec::with_capacity(n.min(65536) as usize);
        for _ in 0..n {
            segments.push(match r.u8()? {
                0 => Segment::Data {
                    chunk: r.digest()?,
                    len: u32::try_from(r.varint()?).map_err(|_| DecodeError)?,
                },
                1 => Segment::Hole { len: r.varint()? },
                _ => return Err(DecodeError),
            });
        }
        r.end()?;
        Ok(Blob { content, segments })
    }
}

/// A layer: a root directory (with its own metadata) whose tree may hold whiteouts and
/// opaque directories, plus what it was imported from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// The root directory as an entry with an empty name; `Kind::Dir` always.
    pub root: Entry,
    /// Whether the source described the root directory itself (a directory import always
    /// does; a tar may not have a `./` entry). Without it, lower layers' root metadata wins.
    pub root_described: bool,
    /// The OCI `diff_id` (SHA-256 of the uncompressed tar) when imported from one.
    pub diff_id: Option<Digest>,
    /// Number of entries below the root.
    pub entries: u64,
    /// Bytes of regular-file content, each hardlinked inode counted once.
    pub content_bytes: u64,
}

impl Layer {
    /// The digest of the root tree.
    pub fn root_tree(&self) -> Digest {
        match self.root.kind {
            Kind::Dir { tree, .. } => tree,
            _ => unreachable!("a layer root is always a directory"),
        }
    }

    /// Canonical bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.buf.extend_from_slice(LAYER_MAGIC);
        self.root.encode_body(&mut w);
        w.u8(u8::from(self.root_described));
        match &self.diff_id {
            Some(d) => {
                w.u8(1);
                w.digest(d);
            }
            None => w.u8(0),
        }
        w.varint(self.entries);
        w.varint(self.content_bytes);
        w.finish()
    }

    pub(crate) fn decode(buf: &[u8]) -> Result<Layer, DecodeError> {
        let mut r = Reader::new(buf);
        if r.take(4)? != LAYER_MAGIC {
            return Err(DecodeError);
        }
        let root = Entry::decode_body(&mut r, Vec::new())?;
        if !matches!(root.kind, Kind::Dir { .. }) {
            return Err(DecodeError);
        }
        let root_described = r.u8()? != 0;
        let diff_id = match r.u8()? {
            0 => None,
            1 => Some(r.digest()?),
            _ => return Err(DecodeError),
        };
        let entries = r.varint()?;
        let content_bytes = r.varint()?;
        r.end()?;
        Ok(Layer {
            root,
            root_described,
            diff_id,
            entries,
            content_bytes,
        })
    }
}

/// What an image runs, from its OCI config (all optional).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `KEY=VALUE` strings.
    pub env: Vec<String>,
    /// Entrypoint argv.
    pub entrypoint: Vec<String>,
    /// Default arguments.
    pub cmd: Vec<String>,
    /// Working directory.
    pub workdir: String,
    /// User (name or uid[:gid]).
    pub user: String,
    /// CPU architecture (OCI names: amd64, arm64, ...); empty if unknown.
    pub architecture: String,
    /// Operating system (linux); empty if unknown.
    pub os: String,
    /// Labels, sorted by key.
    pub labels: Vec<(String, String)>,
}

/// An image: layers bottom to top, and its config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// Layer digests, lowest first.
    pub layers: Vec<Digest>,
    /// Runtime configuration.
    pub config: ImageConfig,
}

fn put_strings(w: &mut Writer, v: &[String]) {
    w.varint(v.len() as u64);
    for s in v {
        w.bytes(s.as_bytes());
    }
}

fn get_string(r: &mut Reader<'_>) -> Result<String, DecodeError> {
    String::from_utf8(r.bytes()?.to_vec()).map_err(|_| DecodeError)
}

fn get_strings(r: &mut Reader<'_>) -> Result<Vec<String>, DecodeError> {
    let n = r.varint()?;
    (0..n).map(|_| get_string(r)).collect()
}

impl Image {
    /// Canonical bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.buf.extend_from_slice(IMAGE_MAGIC);
        w.varint(self.layers.len() as u64);
        for l in &self.layers {
            w.digest(l);
        }
        let c = &self.config;
        put_strings(&mut w, &c.env);
        put_strings(&mut w, &c.entrypoint);
        put_strings(&mut w, &c.cmd);
        w.bytes(c.workdir.as_bytes());
        w.bytes(c.user.as_bytes());
        w.bytes(c.architecture.as_bytes());
        w.bytes(c.os.as_bytes());
        w.varint(c.labels.len() as u64);
        for (k, v) in &c.labels {
            w.bytes(k.as_bytes());
            w.bytes(v.as_bytes());
        }
        w.finish()
    }

    pub(crate) fn decode(buf: &[u8]) -> Result<Image, DecodeError> {
        let mut r = Reader::new(buf);
        if r.take(4)? != IMAGE_MAGIC {
            return Err(DecodeError);
        }
        let n = r.varint()?;
        let layers = (0..n).map(|_| r.digest()).collect::<Result<Vec<_>, _>>()?;
        let env = get_strings(&mut r)?;
        let entrypoint = get_strings(&mut r)?;
        let cmd = get_strings(&mut r)?;
        let workdir = get_string(&mut r)?;
        let user = get_string(&mut r)?;
        let architecture = get_string(&mut r)?;
        let os = get_string(&mut r)?;
        let n = r.varint()?;
        let labels = (0..n)
            .map(|_| Ok((get_string(&mut r)?, get_string(&mut r)?)))
            .collect::<Result<Vec<_>, DecodeError>>()?;
        r.end()?;
        Ok(Image {
            layers,
            config: ImageConfig {
                env,
                entrypoint,
                cmd,
                workdir,
                user,
                architecture,
                os,
                labels,
            },
        })
    }
}
