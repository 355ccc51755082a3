//! The overlay model: an image's layers merged with OCI semantics plus a writable scratch
//! layer, as an inode table. No FUSE types here: `fuse.rs` (and later other front ends)
//! adapt it.
//!
//! How it works:
//! - **Lazy lower view.** A directory node remembers the trees of the layers that
//!   contribute to it (`sources`). Its children are merged from those trees only when the
//!   directory is first looked into, so mounting reads only the image and layer records.
//!   Later layers win, whiteouts remove a name, an opaque directory drops the sources
//!   below it: `castore::merge`, the rules export uses too.
//! - **One in-memory namespace.** Once a directory is loaded its entry map is the truth;
//!   deleting a lower name just removes it from the map (that is the whiteout), and
//!   renames move entries between maps. Scratch is discarded on unmount, so none of this
//!   needs to be written anywhere.
//! - **Data copy-up.** Lower file bytes stay in the store until the first write, truncate
//!   or fallocate; then the file is copied (holes kept) to a real file in the scratch
//!   directory, which later serves every read and write (and could be handed to the
//!   kernel for FUSE passthrough). Metadata (mode, owner, times, xattrs) always lives in
//!   the node, so a metadata change needs no copy at all.
//! - **Stable inodes.** A node keeps its number for the mount's lifetime: nodes reachable
//!   from the root are never dropped, only unlinked ones the kernel has forgotten.
//!   Lower hardlinks (same `Entry.link` within one layer) resolve to one node.
//!
//! One mutex guards the table. File bytes are read, written and copied up outside it
//! (lower reads through the chunk cache, scratch through `pread`/`pwrite`), so data
//! transfers run in parallel; directory loads (a few tree reads) hold it.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use castore::merge::{Merged, image_root, merge_dir};
use castore::{
    ChunkCache, Digest, FileData, FileLayout, Kind, Prefetcher, Segment, Store, Timespec,
};

/// Longest name a directory entry may have, as on ext4.
pub(crate) const NAME_MAX: usize = 255;
/// The root directory's inode number (FUSE's `FUSE_ROOT_ID`).
pub(crate) const ROOT_INO: u64 = 1;
/// Longest extended attribute value Linux accepts.
const XATTR_SIZE_MAX: usize = 65536;

/// Readahead of lower files (see [`Overlay::read_ahead`]). A read within `SEQ_SLACK` of
/// where the previous reads of the inode ended counts as sequential (the kernel has
/// several reads in flight and they may arrive out of order); each sequential read
/// doubles the window, from `MIN_WINDOW` up to `MAX_WINDOW` beyond the read's end.
const SEQ_SLACK: u64 = 2 << 20;
const MIN_WINDOW: u64 = 1 << 20;
const MAX_WINDOW: u64 = 8 << 20;
/// Prefetch threads: each has one synchronous chunk read in flight, so with the reader
/// itself about five disk reads run at once (a virtio disk needs several to stream).
const PREFETCH_THREADS: usize = 4;
/// Queued chunk fetches (about 16 MiB of 64 KiB chunks); beyond this requests are dropped.
const PREFETCH_QUEUE: usize = 256;
/// The chunk cache: room for a window ahead of every stream with margin, so prefetched
/// chunks are not evicted before their reader gets there (a window is at most 8 MiB, a
/// FUSE read 1 MiB, and a few files are streamed at once).
const CHUNK_CACHE_BYTES: usize = 128 << 20;
/// Streams tracked at once; beyond it the table is cleared (it only steers prefetching).
const MAX_STREAMS: usize = 4096;

/// Per inode: where sequential reads have got to and how far ahead we fetched.
#[derive(Debug, Clone, Copy, Default)]
struct Stream {
    /// The highest end of a read so far.
    next: u64,
    /// Chunks up to here were handed to the prefetcher.
    ahead: u64,
    /// Current window (0 after a random read).
    window: u64,
}

/// Why an overlay operation failed; [`FsError::to_errno`] is the one mapping to errno.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("name longer than {NAME_MAX} bytes")]
    NameTooLong,
    #[error("read-only mount")]
    ReadOnly,
    #[error("invalid argument")]
    Invalid,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("no such extended attribute")]
    NoAttr,
    #[error("buffer too small")]
    Range,
    #[error("value too large")]
    TooBig,
    #[error("no more data or hole after the offset")]
    NoData,
    #[error("inode {0} is not known")]
    Stale(u64),
    #[error(transparent)]
    Store(#[from] castore::Error),
    #[error("scratch {op} {path}: {source}")]
    Scratch {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FsError {
    /// The errno a caller sees.
    pub(crate) fn to_errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::ReadOnly => libc::EROFS,
            FsError::Invalid => libc::EINVAL,
            FsError::NotPermitted => libc::EPERM,
            FsError::NoAttr => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::TooBig => libc::E2BIG,
            FsError::NoData => libc::ENXIO,
            FsError::Stale(_) => libc::ESTALE,
            // Corrupt or missing chunks: the read fails, the mount stays up.
            FsError::Store(_) => libc::EIO,
            FsError::Scratch { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

type Result<T, E = FsError> = std::result::Result<T, E>;

/// File types as the overlay reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    Dir,
    File,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
    Socket,
}

impl FileKind {
    fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFREG => FileKind::File,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFCHR => FileKind::CharDev,
            libc::S_IFBLK => FileKind::BlockDev,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            _ => return None,
        })
    }
}

/// What `stat` shows of a node.
#[derive(Debug, Clone)]
pub(crate) struct Attr {
    pub(crate) ino: u64,
    pub(crate) kind: FileKind,
    /// Permission bits with setuid, setgid and sticky.
    pub(crate) perm: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) size: u64,
    /// 512-byte blocks actually stored (holes excluded).
    pub(crate) blocks: u64,
    pub(crate) nlink: u32,
    pub(crate) rdev: u64,
    pub(crate) atime: SystemTime,
    pub(crate) mtime: SystemTime,
    pub(crate) ctime: SystemTime,
    /// Whether this node is still exactly as in the image (callers may cache it hard).
    pub(crate) pristine: bool,
}

/// A time to set.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SetTime {
    Now,
    At(SystemTime),
}

/// The fields of a `setattr` call; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub(crate) struct SetAttr {
    pub(crate) mode: Option<u32>,
    pub(crate) uid: Option<u32>,
    pub(crate) gid: Option<u32>,
    pub(crate) size: Option<u64>,
    pub(crate) atime: Option<SetTime>,
    pub(crate) mtime: Option<SetTime>,
    pub(crate) ctime: Option<SystemTime>,
}

/// How a rename treats an existing target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RenameMode {
    /// POSIX `rename`: replace a compatible target.
    Replace,
    /// `RENAME_NOREPLACE`: fail with EEXIST if the target exists.
    NoReplace,
    /// `RENAME_EXCHANGE`: swap two existing entries.
    Exchange,
}

/// One directory entry of a listing.
#[derive(Debug, Clone)]
pub(crate) struct DirEntry {
    pub(crate) name: Vec<u8>,
    pub(crate) ino: u64,
    pub(crate) kind: FileKind,
}

/// What `open` found.
#[derive(Debug)]
pub(crate) struct Opened {
    /// The content is still the image's (the kernel may keep its page cache).
    pub(crate) pristine: bool,
    /// The scratch file, for a front end that hands it to the kernel (passthrough).
    pub(crate) scratch: Option<Arc<File>>,
    /// How many other opens of this inode are live.
    pub(crate) others: u32,
}

/// Filesystem totals for `statfs`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StatFs {
    pub(crate) blocks: u64,
    pub(crate) bfree: u64,
    pub(crate) bavail: u64,
    pub(crate) files: u64,
    pub(crate) ffree: u64,
    pub(crate) bsize: u32,
}

#[derive(Debug)]
struct Dir {
    /// The parent directory (the root is its own parent).
    parent: u64,
    /// Name → inode, once loaded from the layers.
    children: Option<BTreeMap<Vec<u8>, u64>>,
    /// Trees of the layers merged into this directory, lowest first.
    sources: Vec<(usize, Digest)>,
    /// Number of child directories (for `st_nlink`), valid once loaded.
    subdirs: u32,
}

#[derive(Debug)]
enum Content {
    Dir(Dir),
    /// Unmodified lower bytes; the layout is resolved on first use.
    Lower {
        data: FileData,
        size: u64,
        layout: Option<FileLayout>,
    },
    /// Copied up or created here: a real file in the scratch directory.
    Scratch {
        file: Arc<File>,
        path: PathBuf,
    },
    Symlink(Vec<u8>),
    /// Devices, fifos and sockets: metadata only.
    Special {
        rdev: u64,
    },
}

#[derive(Debug)]
struct Node {
    kind: FileKind,
    perm: u32,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    /// Links from directories (for directories: computed from `subdirs`).
    nlink: u32,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    content: Content,
    /// Kernel references (lookups not yet forgotten).
    lookups: u64,
    /// Open file handles.
    opens: u32,
    pristine: bool,
}

impl Node {
    fn dir(&self) -> Result<&Dir> {
        match &self.content {
            Content::Dir(d) => Ok(d),
            _ => Err(FsError::NotDir),
        }
    }

    fn dir_mut(&mut self) -> Result<&mut Dir> {
        match &mut self.content {
            Content::Dir(d) => Ok(d),
            _ => Err(FsError::NotDir),
        }
    }

    fn touch_change(&mut self) {
        self.ctime = SystemTime::now();
        self.pristine = false;
    }

    fn touch_modify(&mut self) {
        let now = SystemTime::now();
        self.mtime = now;
        self.ctime = now;
        self.pristine = false;
    }
}

#[derive(Debug)]
struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    /// (layer index, link group) → the node all members of the group share.
    links: HashMap<(usize, u64), u64>,
    /// (layer index, link group) → names the merged image shows of it; computed on
    /// first need by walking the whole image, since any directory may hold one.
    link_counts: Option<HashMap<(usize, u64), u32>>,
}

/// One mount's overlay: the image's layers plus a scratch layer.
#[derive(Debug)]
pub(crate) struct Overlay {
    store: Arc<Store>,
    cache: Arc<ChunkCache>,
    /// Background chunk fetches for sequential readers (none if threads could not start).
    prefetch: Option<Prefetcher>,
    /// Sequential-read detection, per inode with lower content.
    streams: Mutex<HashMap<u64, Stream>>,
    read_only: bool,
    scratch: PathBuf,
    /// The root's trees, lowest layer first (for link counts).
    root_sources: Vec<(usize, Digest)>,
    /// Suffix making scratch file names unique.
    scratch_seq: AtomicU64,
    state: Mutex<State>,
}

fn to_system_time(t: Timespec) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + Duration::from_nanos(t.nsec.into())
    }
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(FsError::Invalid);
    }
    Ok(())
}

/// Counts, over the merged image, the names of every lower link group: a group's
/// `st_nlink` is how many of its names the image shows, not how many its layer has,
/// because upper layers may whiteout, replace or (opaque directories) hide some of them.
fn count_links(
    store: &Store,
    sources: &[(usize, Digest)],
    out: &mut HashMap<(usize, u64), u32>,
) -> Result<()> {
    for m in merge_dir(store, sources, false)?.into_values() {
        if m.entry.link != 0 {
            *out.entry((m.layer, m.entry.link)).or_default() += 1;
        }
        if matches!(m.entry.kind, Kind::Dir { .. }) {
            count_links(store, &m.sources, out)?;
        }
    }
    Ok(())
}

impl Overlay {
    /// Opens `image` lazily: reads only the image and layer records.
    pub(crate) fn new(
        store: Arc<Store>,
        image: &Digest,
        read_only: bool,
        scratch: PathBuf,
    ) -> Result<Overlay, castore::Error> {
        // The root's metadata comes from the highest layer that describes it; castore's
        // merge rules are the one definition export and this overlay share.
        let (root, sources) = image_root(&store, image)?;
        let mtime = to_system_time(root.mtime);
        let root_node = Node {
            kind: FileKind::Dir,
            perm: root.mode,
            uid: root.uid,
            gid: root.gid,
            atime: mtime,
            mtime,
            ctime: mtime,
            nlink: 2,
            xattrs: root.xattrs.into_iter().collect(),
            content: Content::Dir(Dir {
                parent: ROOT_INO,
                children: None,
                sources: sources.clone(),
                subdirs: 0,
            }),
            lookups: 1,
            opens: 0,
            pristine: true,
        };
        let mut nodes = HashMap::new();
        nodes.insert(ROOT_INO, root_node);
        let cache = Arc::new(ChunkCache::new(CHUNK_CACHE_BYTES));
        let prefetch = match Prefetcher::new(
            store.clone(),
            cache.clone(),
            PREFETCH_THREADS,
            PREFETCH_QUEUE,
        ) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("layerfs: no prefetch threads ({e}); reading without readahead");
                None
            }
        };
        Ok(Overlay {
            root_sources: sources,
            scratch_seq: AtomicU64::new(0),
            store,
            cache,
            prefetch,
            streams: Mutex::new(HashMap::new()),
            read_only,
            scratch,
            state: Mutex::new(State {
                nodes,
                next_ino: ROOT_INO + 1,
                links: HashMap::new(),
                link_counts: None,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the table as it was at the panic; keep
        // serving rather than poison every later request.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn scratch_err(
        op: &'static str,
        path: &Path,
    ) -> impl FnOnce(std::io::Error) -> FsError + use<> {
        let path = path.to_path_buf();
        move |source| FsError::Scratch { op, path, source }
    }

    /// Makes sure a directory's children are in the table.
    fn load_dir(&self, st: &mut State, ino: u64) -> Result<()> {
        let node = st.nodes.get(&ino).ok_or(FsError::Stale(ino))?;
        let dir = node.dir()?;
        if dir.children.is_some() {
            return Ok(());
        }
        let sources = dir.sources.clone();
        let merged = merge_dir(&self.store, &sources, false)?;
        let mut children = BTreeMap::new();
        let mut subdirs = 0;
        for (name, m) in merged {
            if matches!(m.entry.kind, Kind::Dir { .. }) {
                subdirs += 1;
            }
            let child = self.lower_node(st, ino, m)?;
            children.insert(name, child);
        }
        let dir = st.nodes.get_mut(&ino).expect("checked").dir_mut()?;
        dir.children = Some(children);
        dir.subdirs = subdirs;
        Ok(())
    }

    /// Creates (or, for a hardlink, finds) the node of a lower entry.
    fn lower_node(&self, st: &mut State, parent: u64, m: Merged) -> Result<u64> {
        let e = m.entry;
        if e.link != 0
            && let Some(&ino) = st.links.get(&(m.layer, e.link))
            && st.nodes.contains_key(&ino)
        {
            return Ok(ino);
        }
        let nlink = if e.link != 0 {
            if st.link_counts.is_none() {
                let mut counts = HashMap::new();
                count_links(&self.store, &self.root_sources, &mut counts)?;
                st.link_counts = Some(counts);
            }
            let counts = st.link_counts.as_ref().expect("computed");
            counts.get(&(m.layer, e.link)).copied().unwrap_or(1)
        } else {
            1
        };
        let (kind, content) = match e.kind {
            Kind::Dir { .. } => (
                FileKind::Dir,
                Content::Dir(Dir {
                    parent,
                    children: None,
                    sources: m.sources,
                    subdirs: 0,
                }),
            ),
            Kind::File { size, data } => (
                FileKind::File,
                Content::Lower {
                    data,
                    size,
                    layout: None,
                },
            ),
            Kind::Symlink { target } => (FileKind::Symlink, Content::Symlink(target)),
            Kind::CharDev { rdev } => (FileKind::CharDev, Content::Special { rdev }),
            Kind::BlockDev { rdev } => (FileKind::BlockDev, Content::Special { rdev }),
            Kind::Fifo => (FileKind::Fifo, Content::Special { rdev: 0 }),
            Kind::Socket => (FileKind::Socket, Content::Special { rdev: 0 }),
            Kind::Whiteout => unreachable!("merge drops whiteouts"),
        };
        let mtime = to_system_time(e.mtime);
        let ino = st.next_ino;
        st.next_ino += 1;
        st.nodes.insert(
            ino,
            Node {
                kind,
                perm: e.mode,
                uid: e.uid,
                gid: e.gid,
                atime: mtime,
                mtime,
                ctime: mtime,
                nlink,
                xattrs: e.xattrs.into_iter().collect(),
                content,
                lookups: 0,
                opens: 0,
                pristine: true,
            },
        );
        if e.link != 0 {
            st.links.insert((m.layer, e.link), ino);
        }
        Ok(ino)
    }

    fn attr(&self, st: &mut State, ino: u64) -> Result<Attr> {
        if st.nodes.get(&ino).ok_or(FsError::Stale(ino))?.kind == FileKind::Dir {
            self.load_dir(st, ino)?;
        }
        let node = st.nodes.get_mut(&ino).ok_or(FsError::Stale(ino))?;
        let mut times = None;
        let (size, blocks, nlink, rdev) = match &mut node.content {
            Content::Dir(d) => (4096, 8, 2 + d.subdirs, 0),
            Content::Lower { data, size, layout } => {
                if layout.is_none() {
                    *layout = Some(self.store.file_layout(data, *size)?);
                }
                let alloc = layout.as_ref().map(FileLayout::allocated).unwrap_or(*size);
                (*size, alloc.div_ceil(512), node.nlink, 0)
            }
            Content::Scratch { file, path } => {
                let md = file.metadata().map_err(Self::scratch_err("stat", path))?;
                // The scratch file's own times are the truth for its data: with FUSE
                // passthrough the kernel writes it without telling us.
                times = Some((
                    md.accessed().unwrap_or(node.atime),
                    md.modified().unwrap_or(node.mtime),
                    UNIX_EPOCH
                        + Duration::new(md.ctime().max(0) as u64, md.ctime_nsec().max(0) as u32),
                ));
                (md.len(), md.blocks(), node.nlink, 0)
            }
            Content::Symlink(t) => (t.len() as u64, 0, node.nlink, 0),
            Content::Special { rdev } => (0, 0, node.nlink, *rdev),
        };
        Ok(Attr {
            ino,
            kind: node.kind,
            perm: node.perm,
            uid: node.uid,
            gid: node.gid,
            size,
            blocks,
            nlink,
            rdev,
            atime: times.map_or(node.atime, |t| t.0),
            mtime: times.map_or(node.mtime, |t| t.1),
            ctime: times.map_or(node.ctime, |t| t.2.max(node.ctime)),
            pristine: node.pristine,
        })
    }

    fn child(&self, st: &mut State, parent: u64, name: &[u8]) -> Result<Option<u64>> {
        self.load_dir(st, parent)?;
        let dir = st.nodes[&parent].dir()?;
        Ok(dir.children.as_ref().expect("loaded").get(name).copied())
    }

    /// Looks a name up and counts a kernel reference to the result.
    pub(crate) fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let mut st = self.lock();
        let ino = match name {
            b"." => parent,
            b".." => {
                st.nodes
                    .get(&parent)
                    .ok_or(FsError::Stale(parent))?
                    .dir()?
                    .parent
            }
            _ => self
                .child(&mut st, parent, name)?
                .ok_or(FsError::NotFound)?,
        };
        let attr = self.attr(&mut st, ino)?;
        st.nodes.get_mut(&ino).expect("exists").lookups += 1;
        Ok(attr)
    }

    /// Drops `n` kernel references; unlinked nodes nobody references go away.
    pub(crate) fn forget(&self, ino: u64, n: u64) {
        let mut st = self.lock();
        if let Some(node) = st.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
        }
        Self::maybe_drop(&mut st, ino);
    }

    fn maybe_drop(st: &mut State, ino: u64) {
        if ino == ROOT_INO {
            return;
        }
        let gone = st
            .nodes
            .get(&ino)
            .is_some_and(|n| n.nlink == 0 && n.lookups == 0 && n.opens == 0);
        if gone
            && let Some(Node {
                content: Content::Scratch { path, .. },
                ..
            }) = st.nodes.remove(&ino)
        {
            let _ = std::fs::remove_file(path);
        }
    }

    pub(crate) fn getattr(&self, ino: u64) -> Result<Attr> {
        let mut st = self.lock();
        self.attr(&mut st, ino)
    }

    /// Copies a lower file's bytes into a scratch file (holes stay holes). The copy runs
    /// with the table unlocked, so a large copy-up does not stall the rest of the mount;
    /// if another thread copied the same file meanwhile, its copy wins and ours is
    /// discarded. Returns the (re-taken) lock.
    fn copy_up<'a>(&'a self, st: MutexGuard<'a, State>, ino: u64) -> Result<MutexGuard<'a, State>> {
        let mut st = st;
        let node = st.nodes.get_mut(&ino).ok_or(FsError::Stale(ino))?;
        let Content::Lower { data, size, layout } = &mut node.content else {
            return match node.kind {
                FileKind::File => Ok(st),
                FileKind::Dir => Err(FsError::IsDir),
                _ => Err(FsError::Invalid),
            };
        };
        if layout.is_none() {
            *layout = Some(self.store.file_layout(data, *size)?);
        }
        let layout = layout.clone().expect("resolved");
        let times = std::fs::FileTimes::new()
            .set_accessed(node.atime)
            .set_modified(node.mtime);
        drop(st);
        let (file, path) = self.new_scratch_file(ino)?;
        // The copy keeps the lower file's times: opening for write changes nothing yet.
        let filled = self.fill(&file, &path, &layout).and_then(|()| {
            file.set_times(times)
                .map_err(Self::scratch_err("utimens", &path))
        });
        let mut st = self.lock();
        let node = st.nodes.get_mut(&ino);
        match (filled, node) {
            (Ok(()), Some(node)) if matches!(node.content, Content::Lower { .. }) => {
                // Writes may now bypass us (passthrough): no more long cache lifetimes.
                node.pristine = false;
                node.content = Content::Scratch {
                    file: Arc::new(file),
                    path,
                };
            }
            (r, _) => {
                let _ = std::fs::remove_file(&path);
                r?;
            }
        }
        Ok(st)
    }

    /// Writes a lower file's bytes into `file`.
    fn fill(&self, file: &File, path: &Path, layout: &FileLayout) -> Result<()> {
        match layout {
            FileLayout::Inline(b) => file
                .write_all_at(b, 0)
                .map_err(Self::scratch_err("write", path))?,
            FileLayout::Segments(segs) => {
                for (off, seg) in segs.iter() {
                    if let Segment::Data { chunk, .. } = seg {
                        let c = self.cache.chunk(&self.store, chunk)?;
                        let n = c.len().min(seg.len() as usize);
                        file.write_all_at(&c[..n], *off)
                            .map_err(Self::scratch_err("write", path))?;
                    }
                }
            }
        }
        file.set_len(layout.size())
            .map_err(Self::scratch_err("truncate", path))
    }

    fn new_scratch_file(&self, ino: u64) -> Result<(File, PathBuf)> {
        // Unique per file version: two racing copy-ups of one inode must not share a file.
        let seq = self.scratch_seq.fetch_add(1, Ordering::Relaxed);
        let path = self.scratch.join(format!("{ino}.{seq}"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(Self::scratch_err("create", &path))?;
        Ok((file, path))
    }

    pub(crate) fn setattr(&self, ino: u64, set: &SetAttr) -> Result<Attr> {
        self.writable()?;
        let mut st = self.lock();
        if let Some(size) = set.size {
            st = self.copy_up(st, ino)?;
            let node = st.nodes.get_mut(&ino).ok_or(FsError::Stale(ino))?;
            if let Content::Scratch { file, path } = &node.content {
                file.set_len(size)
                    .map_err(Self::scratch_err("truncate", path))?;
            }
            node.touch_modify();
        }
        let node = st.nodes.get_mut(&ino).ok_or(FsError::Stale(ino))?;
        if let Some(mode) = set.mode {
            node.perm = mode & 0o7777;
        }
        if let Some(uid) = set.uid {
            node.uid = uid;
        }
        if let Some(gid) = set.gid {
            node.gid = gid;
        }
        let now = SystemTime::now();
        let resolve = |t: SetTime| match t {
            SetTime::Now => now,
            SetTime::At(t) => t,
        };
        let mut file_times = std::fs::FileTimes::new();
        if let Some(t) = set.atime {
            node.atime = resolve(t);
            file_times = file_times.set_accessed(node.atime);
        }
        if let Some(t) = set.mtime {
            node.mtime = resolve(t);
            file_times = file_times.set_modified(node.mtime);
        }
        if let Content::Scratch { file, path } = &node.content
            && (set.atime.is_some() || set.mtime.is_some())
        {
            file.set_times(file_times)
                .map_err(Self::scratch_err("utimens", path))?;
        }
        node.ctime = set.ctime.unwrap_or(now);
        node.pristine = false;
        self.attr(&mut st, ino)
    }

    pub(crate) fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let st = self.lock();
        match &st.nodes.get(&ino).ok_or(FsError::Stale(ino))?.content {
            Content::Symlink(t) => Ok(t.clone()),
            _ => Err(FsError::Invalid),
        }
    }

    /// Adds a new node under `parent`; the name must be free. The arguments are the
    /// new node's fields, the same ones every creating call has.
    #[allow(clippy::too_many_arguments)]
    fn insert(
        &self,
        st: &mut State,
        parent: u64,
        name: &[u8],
        kind: FileKind,
        perm: u32,
        uid: u32,
        gid: u32,
        content: impl FnOnce(u64) -> Result<Content>,
    ) -> Result<Attr> {
        self.writable()?;
        check_name(name)?;
        if self.child(st, parent, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let p = &st.nodes[&parent];
        // BSD group semantics of setgid directories, as Linux filesystems do.
        let (gid, perm) = if p.perm & libc::S_ISGID != 0 {
            let perm = if kind == FileKind::Dir {
                perm | libc::S_ISGID
            } else {
                perm
            };
            (p.gid, perm)
        } else {
            (gid, perm)
        };
        let ino = st.next_ino;
        let content = content(ino)?;
        st.next_ino += 1;
        let now = SystemTime::now();
        st.nodes.insert(
            ino,
            Node {
                kind,
                perm: perm & 0o7777,
                uid,
                gid,
                atime: now,
                mtime: now,
                ctime: now,
                nlink: 1,
                xattrs: BTreeMap::new(),
                content,
                lookups: 1,
                opens: 0,
                pristine: false,
            },
        );
        let p = st.nodes.get_mut(&parent).expect("parent");
        p.touch_modify();
        let dir = p.dir_mut()?;
        dir.children
            .as_mut()
            .expect("loaded")
            .insert(name.to_vec(), ino);
        if kind == FileKind::Dir {
            dir.subdirs += 1;
        }
        self.attr(st, ino)
    }

    /// `mknod` (regular files, devices, fifos, sockets); `mode` includes the type bits.
    pub(crate) fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        let kind = FileKind::from_mode(mode).ok_or(FsError::Invalid)?;
        let mut st = self.lock();
        match kind {
            FileKind::File => self.insert(&mut st, parent, name, kind, mode, uid, gid, |ino| {
                let (file, path) = self.new_scratch_file(ino)?;
                Ok(Content::Scratch {
                    file: Arc::new(file),
                    path,
                })
            }),
            FileKind::Dir | FileKind::Symlink => Err(FsError::Invalid),
            _ => {
                let rdev = if matches!(kind, FileKind::CharDev | FileKind::BlockDev) {
                    rdev
                } else {
                    0
                };
                self.insert(&mut st, parent, name, kind, mode, uid, gid, |_| {
                    Ok(Content::Special { rdev })
                })
            }
        }
    }

    pub(crate) fn mkdir(
        &self,
        parent: u64,
        name: &[u8],
        perm: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        let mut st = self.lock();
        self.insert(&mut st, parent, name, FileKind::Dir, perm, uid, gid, |_| {
            Ok(Content::Dir(Dir {
                parent,
                children: Some(BTreeMap::new()),
                sources: Vec::new(),
                subdirs: 0,
            }))
        })
    }

    pub(crate) fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        let mut st = self.lock();
        self.insert(
            &mut st,
            parent,
            name,
            FileKind::Symlink,
            0o777,
            uid,
            gid,
            |_| Ok(Content::Symlink(target.to_vec())),
        )
    }

    pub(crate) fn link(&self, ino: u64, parent: u64, name: &[u8]) -> Result<Attr> {
        self.writable()?;
        check_name(name)?;
        let mut st = self.lock();
        let node = st.nodes.get(&ino).ok_or(FsError::Stale(ino))?;
        if node.kind == FileKind::Dir {
            return Err(FsError::NotPermitted);
        }
        if self.child(&mut st, parent, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let p = st.nodes.get_mut(&parent).expect("loaded");
        p.touch_modify();
        p.dir_mut()?
            .children
            .as_mut()
            .expect("loaded")
            .insert(name.to_vec(), ino);
        let node = st.nodes.get_mut(&ino).expect("checked");
        node.nlink += 1;
        node.lookups += 1;
        node.touch_change();
        self.attr(&mut st, ino)
    }

    /// Removes a name (`dir` selects rmdir or unlink rules).
    fn remove(&self, parent: u64, name: &[u8], dir: bool) -> Result<()> {
        self.writable()?;
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let mut st = self.lock();
        let ino = self
            .child(&mut st, parent, name)?
            .ok_or(FsError::NotFound)?;
        let is_dir = self.check_removable(&mut st, ino, dir)?;
        let p = st.nodes.get_mut(&parent).expect("loaded");
        p.touch_modify();
        let pd = p.dir_mut()?;
        pd.children.as_mut().expect("loaded").remove(name);
        if is_dir {
            pd.subdirs -= 1;
        }
        Self::drop_link(&mut st, ino);
        Ok(())
    }

    /// Whether `ino` may lose a name to an operation on a directory (`dir`: rmdir, or a
    /// rename of a directory over it) or on a non-directory: the types must agree and a
    /// directory must be empty. Returns whether it is a directory.
    fn check_removable(&self, st: &mut State, ino: u64, dir: bool) -> Result<bool> {
        let is_dir = st.nodes[&ino].kind == FileKind::Dir;
        match (dir, is_dir) {
            (true, false) => Err(FsError::NotDir),
            (false, true) => Err(FsError::IsDir),
            (true, true) => {
                self.load_dir(st, ino)?;
                let dir = st.nodes[&ino].dir()?;
                if dir.children.as_ref().expect("loaded").is_empty() {
                    Ok(true)
                } else {
                    Err(FsError::NotEmpty)
                }
            }
            (false, false) => Ok(false),
        }
    }

    /// Drops one name of `ino` (already removed from its directory).
    fn drop_link(st: &mut State, ino: u64) {
        let node = st.nodes.get_mut(&ino).expect("linked node");
        node.nlink = if node.kind == FileKind::Dir {
            0
        } else {
            node.nlink.saturating_sub(1)
        };
        node.touch_change();
        Self::maybe_drop(st, ino);
    }

    pub(crate) fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.remove(parent, name, false)
    }

    pub(crate) fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.remove(parent, name, true)
    }

    /// Whether `ancestor` is `ino` or one of its parents.
    fn is_ancestor(st: &State, ancestor: u64, mut ino: u64) -> bool {
        loop {
            if ino == ancestor {
                return true;
            }
            match st.nodes.get(&ino).map(|n| &n.content) {
                Some(Content::Dir(d)) if d.parent != ino => ino = d.parent,
                _ => return false,
            }
        }
    }

    pub(crate) fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        mode: RenameMode,
    ) -> Result<()> {
        self.writable()?;
        check_name(name)?;
        check_name(newname)?;
        let mut st = self.lock();
        let src = self
            .child(&mut st, parent, name)?
            .ok_or(FsError::NotFound)?;
        let dst = self.child(&mut st, newparent, newname)?;
        let src_dir = st.nodes[&src].kind == FileKind::Dir;
        // A directory cannot move below itself.
        if src_dir && Self::is_ancestor(&st, src, newparent) {
            return Err(FsError::Invalid);
        }
        match (mode, dst) {
            (RenameMode::Exchange, None) => return Err(FsError::NotFound),
            (RenameMode::NoReplace, Some(_)) => return Err(FsError::Exists),
            (RenameMode::Exchange, Some(dst)) => {
                let dst_dir = st.nodes[&dst].kind == FileKind::Dir;
                if dst_dir && Self::is_ancestor(&st, dst, parent) {
                    return Err(FsError::Invalid);
                }
                self.set_child(&mut st, parent, name, Some(dst));
                self.set_child(&mut st, newparent, newname, Some(src));
                if parent != newparent && src_dir != dst_dir {
                    let (to_new, to_old) = if src_dir { (1, -1) } else { (-1, 1) };
                    Self::adjust_subdirs(&mut st, newparent, to_new);
                    Self::adjust_subdirs(&mut st, parent, to_old);
                }
                Self::reparent(&mut st, src, newparent);
                Self::reparent(&mut st, dst, parent);
                for ino in [src, dst, parent, newparent] {
                    st.nodes.get_mut(&ino).expect("node").touch_change();
                }
                for ino in [parent, newparent] {
                    st.nodes.get_mut(&ino).expect("node").touch_modify();
                }
                return Ok(());
            }
            (_, Some(dst)) if dst == src => return Ok(()),
            (_, Some(dst)) => {
                if self.check_removable(&mut st, dst, src_dir)? {
                    Self::adjust_subdirs(&mut st, newparent, -1);
                }
                self.set_child(&mut st, newparent, newname, None);
                Self::drop_link(&mut st, dst);
            }
            (_, None) => {}
        }
        self.set_child(&mut st, parent, name, None);
        self.set_child(&mut st, newparent, newname, Some(src));
        if src_dir && parent != newparent {
            Self::adjust_subdirs(&mut st, parent, -1);
            Self::adjust_subdirs(&mut st, newparent, 1);
        }
        Self::reparent(&mut st, src, newparent);
        st.nodes.get_mut(&src).expect("src").touch_change();
        for ino in [parent, newparent] {
            st.nodes.get_mut(&ino).expect("node").touch_modify();
        }
        Ok(())
    }

    fn set_child(&self, st: &mut State, parent: u64, name: &[u8], ino: Option<u64>) {
        let children = match &mut st.nodes.get_mut(&parent).expect("parent").content {
            Content::Dir(d) => d.children.as_mut().expect("loaded"),
            _ => unreachable!("parent is a directory"),
        };
        match ino {
            Some(ino) => children.insert(name.to_vec(), ino),
            None => children.remove(name),
        };
    }

    fn adjust_subdirs(st: &mut State, dir: u64, by: i32) {
        if let Some(Content::Dir(d)) = st.nodes.get_mut(&dir).map(|n| &mut n.content) {
            d.subdirs = d.subdirs.saturating_add_signed(by);
        }
    }

    fn reparent(st: &mut State, ino: u64, parent: u64) {
        if let Some(Content::Dir(d)) = st.nodes.get_mut(&ino).map(|n| &mut n.content) {
            d.parent = parent;
        }
    }

    /// Gives a file its scratch copy, as opening it for writing would (a no-op for a
    /// file already in scratch).
    pub(crate) fn copy_up_for_write(&self, ino: u64) -> Result<()> {
        self.writable()?;
        let st = self.lock();
        let node = st.nodes.get(&ino).ok_or(FsError::Stale(ino))?;
        if node.kind == FileKind::Dir {
            return Err(FsError::IsDir);
        }
        self.copy_up(st, ino).map(drop)
    }

    /// Opens a file; writers get a scratch copy first.
    pub(crate) fn open(&self, ino: u64, write: bool) -> Result<Opened> {
        let mut st = self.lock();
        let node = st.nodes.get(&ino).ok_or(FsError::Stale(ino))?;
        if node.kind == FileKind::Dir && write {
            return Err(FsError::IsDir);
        }
        if write {
            self.writable()?;
            st = self.copy_up(st, ino)?;
        }
        let node = st.nodes.get_mut(&ino).ok_or(FsError::Stale(ino))?;
        let others = node.opens;
        node.opens += 1;
        Ok(Opened {
            pristine: matches!(node.content, Content::Lower { .. }),
            scratch: match &node.content {
                Content::Scratch { file, .. } => Some(file.clone()),
                _ => None,
            },
            others,
        })
    }

    pub(crate) fn release(&self, ino: u64) {
        let mut st = self.lock();
        let mut closed = true;
        if let Some(node) = st.nodes.get_mut(&ino) {
            node.opens = node.opens.saturating_sub(1);
            closed = node.opens == 0;
        }
        Self::maybe_drop(&mut st, ino);
        drop(st);
        if closed {
            self.streams
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&ino);
        }
    }

    /// Sequential readahead of lower bytes: when reads of `ino` follow each other, hands
    /// the chunks of the next window (1 MiB, doubling per read up to 8 MiB past the end
    /// of this read) to the prefetch threads, each chunk once. Never blocks on a fetch.
    fn read_ahead(&self, ino: u64, layout: &FileLayout, offset: u64, len: u64) {
        let Some(prefetch) = &self.prefetch else {
            return;
        };
        let end = offset.saturating_add(len).min(layout.size());
        let range = {
            let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
            if streams.len() >= MAX_STREAMS && !streams.contains_key(&ino) {
                streams.clear();
            }
            let s = streams.entry(ino).or_default();
            if offset.abs_diff(s.next) <= SEQ_SLACK {
                s.window = (s.window * 2).clamp(MIN_WINDOW, MAX_WINDOW);
                s.next = s.next.max(end);
            } else {
                *s = Stream {
                    next: end,
                    ahead: end,
                    window: 0,
                };
            }
            let from = s.ahead.max(end);
            let to = end.saturating_add(s.window).min(layout.size());
            if s.window == 0 || from >= to {
                return;
            }
            s.ahead = to;
            (from, to)
        };
        for d in layout.chunks_in(range.0, range.1) {
            if !self.cache.contains(&d) && !prefetch.request(&d) {
                // Queue full: the readers are far behind already; the rest is fetched on
                // demand (and offered again by the next read's window).
                let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(s) = streams.get_mut(&ino) {
                    s.ahead = s.ahead.min(range.0);
                }
                break;
            }
        }
    }

    /// Creates and opens a regular file.
    pub(crate) fn create(
        &self,
        parent: u64,
        name: &[u8],
        perm: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        let attr = self.mknod(parent, name, libc::S_IFREG | (perm & 0o7777), 0, uid, gid)?;
        self.lock().nodes.get_mut(&attr.ino).expect("created").opens += 1;
        Ok(attr)
    }

    pub(crate) fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        enum Src {
            Lower(FileLayout),
            Scratch(Arc<File>, PathBuf),
        }
        let src = {
            let mut st = self.lock();
            let node = st.nodes.get_mut(&ino).ok_or(FsError::Stale(ino))?;
            match &mut node.content {
                Content::Lower { data, size, layout } => {
                    if layout.is_none() {
                        *layout = Some(self.store.file_layout(data, *size)?);
                    }
                    Src::Lower(layout.clone().expect("resolved"))
                }
                Content::Scratch { file, path } => Src::Scratch(file.clone(), path.clone()),
                Content::Dir(_) => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid),
            }
        };
        let mut buf = vec![0u8; size as usize];
        let n = match src {
            Src::Lower(layout) => {
                self.read_ahead(ino, &layout, offset, u64::from(size));
                layout
                    .read_at_with(
                        &self.store,
                        &self.cache,
                        self.prefetch.as_ref(),
                        offset,
                        &mut buf,
                    )
                    .map_err(|e| e.context(format!("reading inode {ino} at {offset}")))?
            }
            Src::Scratch(file, path) => {
                let mut done = 0;
                while done < buf.len() {
                    match file.read_at(&mut buf[done..], offset + done as u64) {
                        Ok(0) => break,
                        Ok(n) => done += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(Self::scratch_err("read", &path)(e)),
                    }
                }
                done
            }
        };
        buf.truncate(n);
        Ok(buf)
    }

    pub(crate) fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<usize> {
        self.writable()?;
        let (file, path) = {
            let mut st = self.copy_up(self.lock(), ino)?;
            let node = st.nodes.get_mut(&ino).ok_or(FsError::Stale(ino))?;
            node.touch_modify();
            match &node.content {
                Content::Scratch { file, path } => (file.clone(), path.clone()),
                _ => return Err(FsError::Invalid),
            }
        };
        file.write_all_at(data, offset)
            .map_err(Self::scratch_err("write", &path))?;
        Ok(data.len())
    }

    /// Every entry of a directory, `.` and `..` first, and whether the directory is still
    /// exactly the image's (its listing never changed through this mount, so a front end
    /// may let the kernel cache it).
    pub(crate) fn readdir(&self, ino: u64) -> Result<(Vec<DirEntry>, bool)> {
        let mut st = self.lock();
        self.load_dir(&mut st, ino)?;
        let node = &st.nodes[&ino];
        let pristine = node.pristine;
        let dir = node.dir()?;
        let mut out = vec![
            DirEntry {
                name: b".".to_vec(),
                ino,
                kind: FileKind::Dir,
            },
            DirEntry {
                name: b"..".to_vec(),
                ino: dir.parent,
                kind: FileKind::Dir,
            },
        ];
        for (name, &child) in dir.children.as_ref().expect("loaded") {
            out.push(DirEntry {
                name: name.clone(),
                ino: child,
                kind: st.nodes[&child].kind,
            });
        }
        Ok((out, pristine))
    }

    pub(crate) fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        let st = self.lock();
        let node = st.nodes.get(&ino).ok_or(FsError::Stale(ino))?;
        node.xattrs.get(name).cloned().ok_or(FsError::NoAttr)
    }

    /// Names, each followed by a NUL, as `listxattr(2)` returns them.
    pub(crate) fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let st = self.lock();
        let node = st.nodes.get(&ino).ok_or(FsError::Stale(ino))?;
        let mut out = Vec::new();
        for k in node.xattrs.keys() {
            out.extend_from_slice(k);
            out.push(0);
        }
        Ok(out)
    }

    pub(crate) fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        self.writable()?;
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(if name.is_empty() {
                FsError::Invalid
            } else {
                FsError::Range
            });
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(FsError::TooBig);
        }
        let mut st = self.lock();
        let node = st.nodes.get_mut(&ino).ok_or(FsError::Stale(ino))?;
        let exists = node.xattrs.contains_key(name);
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(FsError::Exists);
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(FsError::NoAttr);
        }
        node.xattrs.insert(name.to_vec(), value.to_vec());
        node.touch_change();
        Ok(())
    }

    pub(crate) fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        self.writable()?;
        let mut st = self.lock();
        let node = st.nodes.get_mut(&ino).ok_or(FsError::Stale(ino))?;
        node.xattrs.remove(name).ok_or(FsError::NoAttr)?;
        node.touch_change();
        Ok(())
    }

    /// Space as the scratch directory's filesystem has it (that is where writes go).
    pub(crate) fn statfs(&self) -> Result<StatFs> {
        let dir = if self.read_only {
            self.store.path()
        } else {
            &self.scratch
        };
        let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()))
            .map_err(|_| FsError::Invalid)?;
        // SAFETY: `c` is a valid NUL-terminated path and `sv` a writable statvfs that
        // outlives the call.
        let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut sv) };
        if rc != 0 {
            return Err(Self::scratch_err("statfs", dir)(
                std::io::Error::last_os_error(),
            ));
        }
        let files = self.lock().nodes.len() as u64;
        Ok(StatFs {
            blocks: sv.f_blocks,
            bfree: sv.f_bfree,
            bavail: sv.f_bavail,
            files: files + sv.f_ffree,
            ffree: sv.f_ffree,
            bsize: sv.f_bsize as u32,
        })
    }

    /// `SEEK_DATA` / `SEEK_HOLE`.
    pub(crate) fn lseek(&self, ino: u64, offset: i64, whence: i32) -> Result<i64> {
        let mut st = self.lock();
        let node = st.nodes.get_mut(&ino).ok_or(FsError::Stale(ino))?;
        let off = u64::try_from(offset).map_err(|_| FsError::NoData)?;
        match &mut node.content {
            Content::Lower { data, size, layout } => {
                if layout.is_none() {
                    *layout = Some(self.store.file_layout(data, *size)?);
                }
                let l = layout.as_ref().expect("resolved");
                let r = match whence {
                    libc::SEEK_DATA => l.next_data(off),
                    libc::SEEK_HOLE => l.next_hole(off),
                    _ => return Err(FsError::Invalid),
                };
                r.map(|o| o as i64).ok_or(FsError::NoData)
            }
            Content::Scratch { file, path } => {
                // SAFETY: lseek on a descriptor we own; reads and writes use pread/pwrite,
                // so moving the shared file position disturbs nothing.
                let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
                if r < 0 {
                    return Err(Self::scratch_err("lseek", path)(
                        std::io::Error::last_os_error(),
                    ));
                }
                Ok(r)
            }
            _ => Err(FsError::Invalid),
        }
    }

    pub(crate) fn fallocate(&self, ino: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        self.writable()?;
        let mut st = self.copy_up(self.lock(), ino)?;
        let node = st.nodes.get_mut(&ino).ok_or(FsError::Stale(ino))?;
        node.touch_modify();
        let Content::Scratch { file, path } = &node.content else {
            return Err(FsError::Invalid);
        };
        let (o, l) = (
            i64::try_from(offset).map_err(|_| FsError::Invalid)?,
            i64::try_from(len).map_err(|_| FsError::Invalid)?,
        );
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, o, l) };
        if rc != 0 {
            return Err(Self::scratch_err("fallocate", path)(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Bytes the scratch files take on disk.
    pub(crate) fn scratch_bytes(&self) -> u64 {
        let st = self.lock();
        st.nodes
            .values()
            .filter_map(|n| match &n.content {
                Content::Scratch { file, .. } => file.metadata().ok().map(|m| m.blocks() * 512),
                _ => None,
            })
            .sum()
    }
}
