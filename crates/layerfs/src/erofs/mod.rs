//! One layer as a read-only EROFS block device, synthesized from the store.
//!
//! [`Image::build`] walks the layer's trees once and lays out an EROFS filesystem: the
//! metadata (superblock at byte 1024, 64-byte inodes, inline xattrs, directory blocks,
//! symlink targets, castore's inline file bytes) is encoded into one buffer in memory;
//! file data is never copied. Each regular file gets a run of 4 KiB data blocks after
//! the metadata (sparse files a chunk map whose holes have no blocks at all), and
//! [`DataExtent`]s map those blocks back to byte ranges of the file, which a read fetches
//! through castore's verified read path ([`FileLayout::read_at_with`], a shared
//! [`ChunkCache`]). A corrupt chunk is an error for the block that needs it, never bytes.
//!
//! The layer's OCI whiteouts become overlayfs's own form (a character device 0/0) and
//! opaque directories carry `trusted.overlay.opaque=y`, so a guest stacks the layers
//! with the kernel's overlayfs. The image is a pure function of the layer: the same
//! layer gives the same bytes on every host (see `build.rs`).
//!
//! What is written is what Linux 6.1 (Debian bookworm's kernel) mounts: see `format.rs`.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use castore::{ChunkCache, Digest, FileLayout, Prefetcher, Store};

use crate::block::{BlockDevice, BlockSizes, DeviceError, Extent, ZeroFlags};

mod build;
pub use build::sparse_chunk_size;
mod format;

/// Every block of an image is this many bytes.
pub const BLOCK_SIZE: u64 = format::BLOCK;

/// Why a layer has no EROFS image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store could not provide a record of the layer.
    #[error(transparent)]
    Store(#[from] castore::Error),
    /// An entry EROFS (or the 6.1 kernel) cannot hold.
    #[error("{path}: {why}")]
    Unrepresentable {
        /// The entry's path in the layer.
        path: String,
        /// What does not fit.
        why: String,
    },
    /// The layer does not fit one image's block addresses.
    #[error("layer is too large for one EROFS image: {0}")]
    TooLarge(String),
    /// Writing the image out failed.
    #[error("writing the image: {0}")]
    Write(#[source] std::io::Error),
}

/// What a build did, for logs and benchmarks.
#[derive(Debug, Clone, Default)]
pub struct BuildReport {
    /// Inodes written (a hardlink group is one).
    pub inodes: u64,
    /// Bytes of the metadata area (superblock, inodes, xattrs, directories, tails).
    pub metadata_bytes: u64,
    /// Bytes of the data area (whole blocks of file content, addressed, not copied).
    pub data_bytes: u64,
    /// How long the synthesis took.
    pub build_time: Duration,
    /// Xattrs not carried into the image, as `path: name`: names outside the namespaces
    /// EROFS stores (user, trusted, security, the two POSIX ACLs), and the layer's own
    /// `trusted.overlay.*`, which the guest's overlayfs would take as its instructions.
    pub dropped_xattrs: Vec<String>,
}

/// A run of data blocks that holds consecutive bytes of one file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DataExtent {
    /// First block in the image.
    start: u64,
    blocks: u64,
    /// Index into [`Image::files`].
    file: u32,
    /// The file's block at `start`.
    file_block: u64,
}

/// A synthesized EROFS image of one layer: metadata in memory, file data by reference.
#[derive(Debug)]
pub struct Image {
    layer: Digest,
    meta: Vec<u8>,
    /// Total blocks (metadata and data).
    blocks: u64,
    files: Vec<FileLayout>,
    /// Sorted by `start`, not overlapping, covering every data block.
    extents: Vec<DataExtent>,
    report: BuildReport,
}

/// Where an image's file bytes are read from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// The store holding the layer.
    pub store: &'a Store,
    /// Decompressed, verified chunks, shared with other readers.
    pub cache: &'a ChunkCache,
    /// Background fetches of the later chunks a read spans.
    pub prefetch: Option<&'a Prefetcher>,
}

impl Image {
    /// Synthesizes the image of layer `layer` (its metadata; no file byte is read).
    pub fn build(store: &Store, layer: &Digest) -> Result<Image, Error> {
        build::build(store, layer)
    }

    /// The layer this is an image of.
    pub fn layer(&self) -> &Digest {
        &self.layer
    }

    /// The image's size in bytes (a whole number of 4 KiB blocks).
    pub fn size(&self) -> u64 {
        self.blocks * format::BLOCK
    }

    /// What the build did.
    pub fn report(&self) -> &BuildReport {
        &self.report
    }

    /// Memory the image holds, roughly: the metadata buffer, the extent table and the
    /// files' chunk lists.
    pub fn memory_bytes(&self) -> usize {
        let layouts: usize = self
            .files
            .iter()
            .map(|f| match f {
                FileLayout::Inline(b) => b.len(),
                FileLayout::Segments(s) => s.len() * std::mem::size_of::<(u64, castore::Segment)>(),
            })
            .sum();
        self.meta.len()
            + self.extents.len() * std::mem::size_of::<DataExtent>()
            + self.files.len() * std::mem::size_of::<FileLayout>()
            + layouts
    }

    /// Fills `buf` with the image's bytes at `offset`; `offset + buf.len()` must not pass
    /// [`Image::size`]. File data comes through `src`, verified chunk by chunk.
    pub fn read(&self, src: Source<'_>, offset: u64, buf: &mut [u8]) -> Result<(), castore::Error> {
        self.read_with(offset, buf, |layout, file_off, out| {
            Some(layout.read_at_with(src.store, src.cache, src.prefetch, file_off, out))
        })
        .expect("a read through the store always answers")
    }

    /// As [`Image::read`], but only if every chunk it needs is in `cache` already (the
    /// metadata always is); None otherwise, `buf` then holding nothing meaningful. Never
    /// reads the store: a transport may call it where it must not block.
    pub fn read_cached(&self, cache: &ChunkCache, offset: u64, buf: &mut [u8]) -> Option<()> {
        self.read_with(offset, buf, |layout, file_off, out| {
            layout.read_cached(cache, file_off, out).map(Ok)
        })
        .map(|r| r.expect("a cached read never fails"))
    }

    /// The one walk of a read over the metadata, file data extents (through `file`, which
    /// fills a file's bytes at an offset and says how many it had, or None to give up)
    /// and the zeros between them.
    fn read_with(
        &self,
        offset: u64,
        buf: &mut [u8],
        mut file: impl FnMut(&FileLayout, u64, &mut [u8]) -> Option<Result<usize, castore::Error>>,
    ) -> Option<Result<(), castore::Error>> {
        let meta_len = self.meta.len() as u64;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let rest = &mut buf[done..];
            let n;
            if off < meta_len {
                n = rest.len().min((meta_len - off) as usize);
                rest[..n].copy_from_slice(&self.meta[off as usize..off as usize + n]);
            } else {
                let block = off / format::BLOCK;
                let i = self
                    .extents
                    .partition_point(|e| e.start + e.blocks <= block);
                match self.extents.get(i) {
                    Some(e) if e.start <= block => {
                        let end = (e.start + e.blocks) * format::BLOCK;
                        n = rest.len().min((end - off) as usize);
                        let file_off =
                            e.file_block * format::BLOCK + (off - e.start * format::BLOCK);
                        let layout = &self.files[e.file as usize];
                        let got = match file(layout, file_off, &mut rest[..n])? {
                            Ok(got) => got,
                            Err(e) => return Some(Err(e)),
                        };
                        // The end of a file's last block.
                        rest[got..n].fill(0);
                    }
                    next => {
                        // Not a file's block (past the end): zeros.
                        let until = next.map_or(self.size(), |e| e.start * format::BLOCK);
                        n = rest.len().min(until.saturating_sub(off).max(1) as usize);
                        rest[..n].fill(0);
                    }
                }
            }
            done += n;
        }
        Some(Ok(()))
    }

    /// Writes the whole image to `out` (for `tide layer erofs`, and peers such as
    /// `fsck.erofs` that read image files). Returns the bytes written.
    pub fn write_to(&self, store: &Store, out: &mut dyn Write) -> Result<u64, Error> {
        self.each_piece(store, |_, piece| out.write_all(piece).map_err(Error::Write))
    }

    /// Reads the whole image in 1 MiB pieces, in order, handing each to `f` with its
    /// offset. Returns the image's size.
    fn each_piece(
        &self,
        store: &Store,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), Error>,
    ) -> Result<u64, Error> {
        let cache = ChunkCache::new(16 << 20);
        let src = Source {
            store,
            cache: &cache,
            prefetch: None,
        };
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        let size = self.size();
        while off < size {
            let n = buf.len().min((size - off) as usize);
            self.read(src, off, &mut buf[..n])?;
            f(off, &buf[..n])?;
            off += n as u64;
        }
        Ok(size)
    }

    /// Writes the image to the file `path` (`tide layer erofs --to`): to a temporary
    /// file beside it, sparse where the image is zero, synced, then renamed over `path`,
    /// so `path` is never a partial image. Returns the image's size.
    pub fn write_file(&self, store: &Store, path: &Path) -> Result<u64, Error> {
        use std::os::unix::fs::FileExt;
        let name = path
            .file_name()
            .ok_or_else(|| Error::Write(std::io::Error::other("the path names no file")))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let result = (|| {
            let f = std::fs::File::create(&tmp).map_err(Error::Write)?;
            f.set_len(self.size()).map_err(Error::Write)?;
            let size = self.each_piece(store, |off, piece| {
                if piece.iter().any(|&b| b != 0) {
                    f.write_all_at(piece, off).map_err(Error::Write)?;
                }
                Ok(())
            })?;
            f.sync_all().map_err(Error::Write)?;
            std::fs::rename(&tmp, path).map_err(Error::Write)?;
            Ok(size)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// An [`Image`] served as a read-only block device; many connections (and guests) may
/// share one, since nothing in it ever changes.
pub struct LayerDevice {
    image: Arc<Image>,
    store: Arc<Store>,
    cache: Arc<ChunkCache>,
    prefetch: Option<Arc<Prefetcher>>,
    /// Dropped with the device: whatever the owner ties to its lifetime.
    _guard: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for LayerDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerDevice")
            .field("layer", &self.image.layer.short())
            .field("size", &self.image.size())
            .finish()
    }
}

impl LayerDevice {
    /// Serves `image`, reading file data from `store` through `cache` (and `prefetch`).
    pub fn new(
        image: Arc<Image>,
        store: Arc<Store>,
        cache: Arc<ChunkCache>,
        prefetch: Option<Arc<Prefetcher>>,
    ) -> LayerDevice {
        LayerDevice {
            image,
            store,
            cache,
            prefetch,
            _guard: None,
        }
    }

    /// Keeps `guard` alive as long as the device (a server drops the device when its
    /// last connection using it ends): e.g. a pin that keeps the layer from GC.
    pub fn with_guard(mut self, guard: impl Send + Sync + 'static) -> LayerDevice {
        self._guard = Some(Box::new(guard));
        self
    }

    /// The image served.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }
}

impl BlockDevice for LayerDevice {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read_only(&self) -> bool {
        true
    }

    /// Nothing changes, so every connection sees the same bytes.
    fn can_multi_conn(&self) -> bool {
        true
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            min: 512,
            preferred: format::BLOCK as u32,
            max: 32 << 20,
        }
    }

    fn can_trim(&self) -> bool {
        false
    }

    fn can_fast_zero(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let src = Source {
            store: &self.store,
            cache: &self.cache,
            prefetch: self.prefetch.as_deref(),
        };
        self.image
            .read(src, offset, buf)
            .map_err(|e| DeviceError::Backend(Box::new(e)))
    }

    /// Served on the connection's task when the metadata and the chunk cache hold it all.
    fn read_in_memory(&self, offset: u64, buf: &mut [u8]) -> Option<Result<(), DeviceError>> {
        self.image.read_cached(&self.cache, offset, buf).map(Ok)
    }

    fn write(&self, _: u64, _: &[u8], _: bool) -> Result<(), DeviceError> {
        Err(DeviceError::ReadOnly)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), DeviceError> {
        Err(DeviceError::ReadOnly)
    }

    fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> Result<(), DeviceError> {
        Err(DeviceError::ReadOnly)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        let _ = offset;
        Ok(vec![Extent {
            len,
            hole: false,
            zero: false,
        }])
    }
}
