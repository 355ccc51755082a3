//! The chunk log: chunk bytes written once, where they live, outside RocksDB.
//!
//! **Why.** A chunk put into RocksDB is written twice: into the write-ahead log with its
//! batch, and again into a blob file when its memtable flushes. A volume write of whole
//! extents appends its new chunks here instead, and its RocksDB batch carries only a
//! *pointer* per chunk (the `chunks` value [`POINTER`] ‖ codec ‖ segment ‖ offset ‖
//! length, 22 bytes) next to the index and block map entries, as before.
//!
//! **Files.** `STORE/chunks/SEGMENT` (16 hex digits, ascending), each appended up to
//! [`SEGMENT_BYTES`]. A record is only the stored bytes (raw, or a zstd frame: the codec is
//! in the pointer), starting at a multiple of [`ALIGN`] and zero-padded to one, so the
//! files can be written with `O_DIRECT` where the file system allows it: the bytes go
//! from the caller's buffer to the disk, with no copy into the page cache (and fdatasync
//! then has little left to write). A process never appends to a segment it did not
//! create; the first append after an open starts a new one.
//!
//! **Architecture Invariant (durability):** a pointer reaches RocksDB, logged or not,
//! only after [`ChunkLog::sync`] made the bytes it points at durable (fdatasync of every
//! segment written since the last sync). Whatever RocksDB recovers after a crash (kill
//! -9 or a power cut, whichever of its writes reached the disk) points at durable bytes.
//! Bytes appended but never pointed at (a crash between the data write and the batch,
//! or a write that failed) are dead space, reclaimed with their segment.
//!
//! **Reclaim** (GC, [`crate::Store::gc`]): a log chunk's index entry names its segment,
//! so live bytes per segment are counted from the `chunk_index` family alone; segments
//! with none are removed, and the live chunks of mostly dead ones are moved into RocksDB
//! (verified on the way, in synced batches) before their segment is removed. Appends pin
//! their segment until the caller's batch is in, and reclaim first seals the segment being
//! appended to and waits for the pins of sealed ones, so no pointer to a segment can
//! appear after reclaim counted it.
//!
//! **Seam:** every byte goes through [`ChunkFiles`]; [`crate::testing::FaultyFiles`] makes
//! its writes and syncs fail, come up short, or kill the process at a chosen one.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use crate::error::{Error, Result};

/// First byte of a `chunks` value that points into the chunk log (`0` raw and `1` zstd
/// values hold the bytes themselves).
pub(crate) const POINTER: u8 = 2;

/// Records start at multiples of this and are padded to one (O_DIRECT's alignment on
/// every disk we meet; 4 KiB sectors included).
pub const ALIGN: usize = 4096;

/// A segment is sealed once it holds this much.
pub const SEGMENT_BYTES: u64 = 256 << 20;

/// Where a chunk's stored bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pointer {
    /// The store's codec of the bytes (raw or zstd).
    pub(crate) codec: u8,
    pub(crate) segment: u64,
    pub(crate) offset: u64,
    /// Stored bytes, without the padding.
    pub(crate) len: u32,
}

impl Pointer {
    pub(crate) const LEN: usize = 22;

    /// The `chunks` value.
    pub(crate) fn encode(&self) -> [u8; Self::LEN] {
        let mut v = [0u8; Self::LEN];
        v[0] = POINTER;
        v[1] = self.codec;
        v[2..10].copy_from_slice(&self.segment.to_be_bytes());
        v[10..18].copy_from_slice(&self.offset.to_be_bytes());
        v[18..22].copy_from_slice(&self.len.to_be_bytes());
        v
    }

    /// Decodes a `chunks` value starting with [`POINTER`].
    pub(crate) fn decode(v: &[u8]) -> Option<Pointer> {
        if v.len() != Self::LEN || v[0] != POINTER {
            return None;
        }
        let n = |i: usize| u64::from_be_bytes(v[i..i + 8].try_into().expect("8 bytes"));
        Some(Pointer {
            codec: v[1],
            segment: n(2),
            offset: n(10),
            len: u32::from_be_bytes(v[18..22].try_into().expect("4 bytes")),
        })
    }
}

/// `n` rounded up to a multiple of [`ALIGN`].
pub(crate) fn padded(n: u64) -> u64 {
    n.div_ceil(ALIGN as u64) * ALIGN as u64
}

/// The files of a chunk log. [`ChunkLog`] calls it from many threads at once.
///
/// What a caller may rely on:
/// - `create(s)` makes an empty segment `s` (it did not exist) whose existence is durable
///   when it returns.
/// - `write_at(s, offset, bufs)` writes the concatenation of `bufs` at `offset` and
///   returns how many bytes it wrote; fewer than asked is a failure the caller reports
///   (it does not retry). Offsets, buffer addresses and lengths are multiples of [`ALIGN`].
///   Written bytes are readable at once and durable once a later `sync(s)` returns `Ok`.
/// - `sync(s)` makes every byte written to `s` before the call durable. After it failed,
///   nothing written to `s` before it may be assumed durable, even if a later sync of
///   `s` succeeds (Linux may drop the pages an fsync failed to write).
/// - `read_at(s, offset, buf)` fills `buf` from `offset` or fails (`UnexpectedEof` past
///   the end of the segment).
/// - `segments()` lists every segment with its length in bytes.
/// - `remove(s)` deletes segment `s`; reads of it may fail afterwards.
pub trait ChunkFiles: Send + Sync + fmt::Debug {
    /// Creates segment `segment`.
    fn create(&self, segment: u64) -> io::Result<()>;
    /// Writes `bufs` at `offset` of `segment`.
    fn write_at(&self, segment: u64, offset: u64, bufs: &[&[u8]]) -> io::Result<usize>;
    /// Makes what was written to `segment` durable.
    fn sync(&self, segment: u64) -> io::Result<()>;
    /// Reads `buf.len()` bytes at `offset` of `segment`.
    fn read_at(&self, segment: u64, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Every segment and its length.
    fn segments(&self) -> io::Result<Vec<(u64, u64)>>;
    /// Deletes `segment`.
    fn remove(&self, segment: u64) -> io::Result<()>;
    /// The path of `segment`, for messages.
    fn path(&self, segment: u64) -> PathBuf;
}

/// [`ChunkFiles`] on a directory of the local file system: `O_DIRECT` writes where it
/// allows them (probed once; tmpfs does not), ordinary buffered reads.
#[derive(Debug)]
pub struct DiskFiles {
    dir: PathBuf,
    direct: bool,
    /// Open segments: the file for writing (segments this process created) and for
    /// reading.
    open: RwLock<HashMap<u64, Arc<SegmentFiles>>>,
}

#[derive(Debug)]
struct SegmentFiles {
    write: Option<File>,
    read: File,
}

impl DiskFiles {
    /// The chunk files in `dir` (created if missing).
    pub fn open(dir: &Path) -> io::Result<DiskFiles> {
        if !dir.is_dir() {
            std::fs::create_dir_all(dir)?;
            // The directory's name must survive a crash before a segment in it can.
            if let Some(parent) = dir.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        let probe = dir.join(".direct-probe");
        let direct = match OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe)
        {
            Ok(_) => true,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => false,
            Err(e) => return Err(e),
        };
        let _ = std::fs::remove_file(&probe);
        Ok(DiskFiles {
            dir: dir.to_path_buf(),
            direct,
            open: RwLock::new(HashMap::new()),
        })
    }

    /// Whether writes bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    fn name(segment: u64) -> String {
        format!("{segment:016x}")
    }

    fn segment(&self, segment: u64) -> io::Result<Arc<SegmentFiles>> {
        if let Some(s) = self.open.read().expect("segment table").get(&segment) {
            return Ok(s.clone());
        }
        let read = File::open(self.path(segment))?;
        let mut open = self.open.write().expect("segment table");
        Ok(open
            .entry(segment)
            .or_insert_with(|| Arc::new(SegmentFiles { write: None, read }))
            .clone())
    }
}

impl ChunkFiles for DiskFiles {
    fn create(&self, segment: u64) -> io::Result<()> {
        let path = self.path(segment);
        let mut o = OpenOptions::new();
        o.write(true).create_new(true);
        if self.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let write = o.open(&path)?;
        let read = File::open(&path)?;
        // The new name must survive a crash before any pointer into the file can.
        File::open(&self.dir)?.sync_all()?;
        self.open.write().expect("segment table").insert(
            segment,
            Arc::new(SegmentFiles {
                write: Some(write),
                read,
            }),
        );
        Ok(())
    }

    fn write_at(&self, segment: u64, offset: u64, bufs: &[&[u8]]) -> io::Result<usize> {
        let s = self.segment(segment)?;
        let f = s.write.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                "segment was not created by this process",
            )
        })?;
        let iov: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let mut done = 0usize;
        // IOV_MAX is 1024 on Linux: write in groups.
        for group in iov.chunks(1024) {
            let want: usize = group.iter().map(|v| v.iov_len).sum();
            // SAFETY: every iovec points into a slice borrowed for this call, and the
            // kernel only reads from them; the fd is open for writing.
            let n = unsafe {
                libc::pwritev(
                    f.as_raw_fd(),
                    group.as_ptr(),
                    group.len() as libc::c_int,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            done += n as usize;
            if (n as usize) < want {
                break;
            }
        }
        Ok(done)
    }

    fn sync(&self, segment: u64) -> io::Result<()> {
        let s = self.segment(segment)?;
        match &s.write {
            Some(f) => f.sync_data(),
            None => s.read.sync_data(),
        }
    }

    fn read_at(&self, segment: u64, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.segment(segment)?.read.read_exact_at(buf, offset)
    }

    fn segments(&self) -> io::Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.len() != 16 {
                continue;
            }
            if let Ok(id) = u64::from_str_radix(name, 16) {
                out.push((id, entry.metadata()?.len()));
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn remove(&self, segment: u64) -> io::Result<()> {
        self.open.write().expect("segment table").remove(&segment);
        std::fs::remove_file(self.path(segment))
    }

    fn path(&self, segment: u64) -> PathBuf {
        self.dir.join(Self::name(segment))
    }
}

/// A buffer whose address and length are multiples of [`ALIGN`], zero-filled.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

impl AlignedBuf {
    fn zeroed(len: usize) -> AlignedBuf {
        let len = padded(len.max(1) as u64) as usize;
        let layout = std::alloc::Layout::from_size_align(len, ALIGN).expect("aligned layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` owns `len` initialised (zeroed) bytes, borrowed mutably here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` owns `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, ALIGN).expect("aligned layout");
        // SAFETY: allocated in `zeroed` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

/// Where appends go.
#[derive(Debug)]
struct Tail {
    /// The segment being appended to (None: the next append creates `next`).
    active: Option<u64>,
    offset: u64,
    next: u64,
    /// Appends whose caller has not released them yet, per segment.
    pins: HashMap<u64, usize>,
}

/// Group fdatasync: the thread that finds none running syncs for everyone waiting.
#[derive(Debug, Default)]
struct Syncs {
    /// Syncs started and finished (numbered from 1).
    started: u64,
    done: u64,
    running: bool,
    /// Segments written since the last sync started.
    dirty: BTreeSet<u64>,
    /// Segments a sync failed for, with the error: nothing in them is trusted to be
    /// durable.
    failed: HashMap<u64, String>,
}

/// The store's chunk log (see the module documentation).
pub(crate) struct ChunkLog {
    files: Arc<dyn ChunkFiles>,
    tail: Mutex<Tail>,
    unpinned: Condvar,
    syncs: Mutex<Syncs>,
    synced: Condvar,
}

impl fmt::Debug for ChunkLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkLog")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// Appended records, pinned in their segment until dropped (after the batch that points
/// at them is written, or given up).
#[derive(Debug)]
pub(crate) struct Appended<'a> {
    log: &'a ChunkLog,
    /// Each part's place, in order.
    pub(crate) places: Vec<(u64, u64)>,
    segment: u64,
}

impl Appended<'_> {
    /// Makes the appended bytes durable (and everything appended before them).
    pub(crate) fn sync(&self) -> Result<()> {
        self.log.sync(self.segment)
    }
}

impl Drop for Appended<'_> {
    fn drop(&mut self) {
        let mut t = self.log.tail.lock().expect("chunk log tail");
        if let Some(n) = t.pins.get_mut(&self.segment) {
            *n -= 1;
            if *n == 0 {
                t.pins.remove(&self.segment);
                self.log.unpinned.notify_all();
            }
        }
    }
}

fn io_err(files: &dyn ChunkFiles, op: &'static str, segment: u64, e: io::Error) -> Error {
    Error::io(op, files.path(segment), e)
}

impl ChunkLog {
    pub(crate) fn open(files: Arc<dyn ChunkFiles>) -> Result<ChunkLog> {
        let segments = files
            .segments()
            .map_err(|e| io_err(files.as_ref(), "list", 0, e))?;
        let next = segments.last().map_or(1, |(s, _)| s + 1);
        Ok(ChunkLog {
            files,
            tail: Mutex::new(Tail {
                active: None,
                offset: 0,
                next,
                pins: HashMap::new(),
            }),
            unpinned: Condvar::new(),
            syncs: Mutex::new(Syncs::default()),
            synced: Condvar::new(),
        })
    }

    pub(crate) fn files(&self) -> &dyn ChunkFiles {
        self.files.as_ref()
    }

    fn tail(&self) -> MutexGuard<'_, Tail> {
        self.tail.lock().expect("chunk log tail")
    }

    /// Reserves `len` bytes (a multiple of [`ALIGN`]) in one segment and pins it.
    fn reserve(&self, len: u64) -> Result<(u64, u64)> {
        let mut t = self.tail();
        let full = t.active.is_some() && t.offset + len > SEGMENT_BYTES.max(len);
        if t.active.is_none() || full {
            let s = t.next;
            self.files
                .create(s)
                .map_err(|e| io_err(self.files.as_ref(), "create", s, e))?;
            t.next = s + 1;
            t.active = Some(s);
            t.offset = 0;
        }
        let s = t.active.expect("an active segment");
        let at = t.offset;
        t.offset += len;
        *t.pins.entry(s).or_default() += 1;
        Ok((s, at))
    }

    /// Appends `parts` contiguously, each as one record; returns where each one is.
    /// Not durable until [`Appended::sync`]. Parts whose address and length are multiples
    /// of [`ALIGN`] are written from where they are; others are copied (and padded).
    pub(crate) fn append(&self, parts: &[&[u8]]) -> Result<Appended<'_>> {
        let total: u64 = parts.iter().map(|p| padded(p.len() as u64)).sum();
        let copy: usize = parts
            .iter()
            .filter(|p| !is_aligned(p))
            .map(|p| padded(p.len() as u64) as usize)
            .sum();
        let mut staging = (copy > 0).then(|| AlignedBuf::zeroed(copy));
        if let Some(buf) = staging.as_mut() {
            let buf = buf.as_mut_slice();
            let mut at = 0;
            for p in parts.iter().filter(|p| !is_aligned(p)) {
                buf[at..at + p.len()].copy_from_slice(p);
                at += padded(p.len() as u64) as usize;
            }
        }
        let (segment, start) = self.reserve(total)?;
        // Pinned from here; an error below drops (and unpins) it.
        let mut appended = Appended {
            log: self,
            places: Vec::new(),
            segment,
        };
        let mut bufs: Vec<&[u8]> = Vec::with_capacity(parts.len());
        let mut places = Vec::with_capacity(parts.len());
        let mut at = start;
        let mut staged = staging.as_ref().map_or(&[][..], AlignedBuf::as_slice);
        for p in parts {
            let n = padded(p.len() as u64);
            if is_aligned(p) {
                bufs.push(p);
            } else {
                let (head, rest) = staged.split_at(n as usize);
                bufs.push(head);
                staged = rest;
            }
            places.push((segment, at));
            at += n;
        }
        let wrote = self
            .files
            .write_at(segment, start, &bufs)
            .map_err(|e| io_err(self.files.as_ref(), "write", segment, e))?;
        if (wrote as u64) < total {
            return Err(io_err(
                self.files.as_ref(),
                "write",
                segment,
                io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short write: {wrote} of {total} bytes at offset {start}"),
                ),
            ));
        }
        self.syncs
            .lock()
            .expect("chunk log syncs")
            .dirty
            .insert(segment);
        appended.places = places;
        Ok(appended)
    }

    /// Makes everything appended to `segment` before the call durable: joins the sync
    /// running now only if it started after the call, else runs or waits for the next.
    fn sync(&self, segment: u64) -> Result<()> {
        let mut s = self.syncs.lock().expect("chunk log syncs");
        let target = s.started + 1;
        loop {
            if let Some(why) = s.failed.get(&segment) {
                return Err(io_err(
                    self.files.as_ref(),
                    "sync",
                    segment,
                    io::Error::other(why.clone()),
                ));
            }
            if s.done >= target {
                return Ok(());
            }
            if s.running {
                s = self.synced.wait(s).expect("chunk log syncs");
                continue;
            }
            s.running = true;
            s.started += 1;
            let me = s.started;
            let dirty = std::mem::take(&mut s.dirty);
            drop(s);
            let mut failed = Vec::new();
            for &seg in &dirty {
                if let Err(e) = self.files.sync(seg) {
                    failed.push((seg, e));
                }
            }
            if !failed.is_empty() {
                // Nothing more goes into a segment whose sync failed.
                let mut t = self.tail();
                if failed.iter().any(|(seg, _)| t.active == Some(*seg)) {
                    t.active = None;
                }
            }
            s = self.syncs.lock().expect("chunk log syncs");
            s.running = false;
            s.done = me;
            // Every waiter on a failed segment (this thread too) gets an error above.
            s.failed
                .extend(failed.into_iter().map(|(seg, e)| (seg, e.to_string())));
            self.synced.notify_all();
        }
    }

    /// The stored bytes at `p`.
    pub(crate) fn read(&self, p: &Pointer) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; p.len as usize];
        self.files
            .read_at(p.segment, p.offset, &mut buf)
            .map_err(|e| io_err(self.files.as_ref(), "read", p.segment, e))?;
        Ok(buf)
    }

    /// Seals the segment being appended to and waits until no append into a sealed
    /// segment is pinned; returns the first segment that may still get appends (every
    /// lower one is final: nothing will point into it that does not already).
    pub(crate) fn seal(&self) -> u64 {
        let mut t = self.tail();
        t.active = None;
        let first_open = t.next;
        while t.pins.keys().any(|&s| s < first_open) {
            t = self.unpinned.wait(t).expect("chunk log tail");
        }
        first_open
    }

    /// Every segment and its length.
    pub(crate) fn segments(&self) -> Result<Vec<(u64, u64)>> {
        self.files
            .segments()
            .map_err(|e| io_err(self.files.as_ref(), "list", 0, e))
    }

    /// Deletes a segment nothing points into any more.
    pub(crate) fn remove(&self, segment: u64) -> Result<()> {
        self.syncs
            .lock()
            .expect("chunk log syncs")
            .failed
            .remove(&segment);
        self.files
            .remove(segment)
            .map_err(|e| io_err(self.files.as_ref(), "remove", segment, e))
    }
}

fn is_aligned(p: &[u8]) -> bool {
    (p.as_ptr() as usize).is_multiple_of(ALIGN) && p.len().is_multiple_of(ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> (tempfile::TempDir, ChunkLog) {
        let dir = tempfile::tempdir().unwrap();
        let files = DiskFiles::open(&dir.path().join("chunks")).unwrap();
        (dir, ChunkLog::open(Arc::new(files)).unwrap())
    }

    #[test]
    fn pointers_round_trip() {
        let p = Pointer {
            codec: 1,
            segment: 7,
            offset: 8192,
            len: 65_537,
        };
        assert_eq!(Pointer::decode(&p.encode()), Some(p));
        assert_eq!(Pointer::decode(&p.encode()[..21]), None);
        assert_eq!(Pointer::decode(&[1; 22]), None);
    }

    #[test]
    fn appends_read_back_aligned_and_not() {
        let (_dir, log) = log();
        let mut aligned = AlignedBuf::zeroed(2 * ALIGN);
        aligned.as_mut_slice().fill(7);
        let odd = vec![9u8; 5000];
        let a = log.append(&[aligned.as_slice(), &odd, b"x"]).unwrap();
        a.sync().unwrap();
        let places = a.places.clone();
        drop(a);
        assert_eq!(places[0].1, 0);
        assert_eq!(places[1].1, 2 * ALIGN as u64);
        assert_eq!(places[2].1, 2 * ALIGN as u64 + padded(5000));
        let read = |i: usize, len: usize| {
            log.read(&Pointer {
                codec: 0,
                segment: places[i].0,
                offset: places[i].1,
                len: len as u32,
            })
            .unwrap()
        };
        assert_eq!(read(0, 2 * ALIGN), vec![7u8; 2 * ALIGN]);
        assert_eq!(read(1, 5000), odd);
        assert_eq!(read(2, 1), b"x");
        // A reopened log starts a segment of its own.
        let files = log.files.clone();
        drop(log);
        let log = ChunkLog::open(files).unwrap();
        let b = log.append(&[b"y"]).unwrap();
        assert_eq!(b.places[0], (places[0].0 + 1, 0));
    }

    #[test]
    fn segments_roll_and_seal_waits_for_pins() {
        let (_dir, log) = log();
        let a = log.append(&[b"a"]).unwrap();
        let first = a.places[0].0;
        // Sealing waits for `a`, so release it from another thread.
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(50));
                drop(a);
            });
            assert_eq!(log.seal(), first + 1);
        });
        let b = log.append(&[b"b"]).unwrap();
        assert_eq!(b.places[0], (first + 1, 0));
        drop(b);
        assert_eq!(log.segments().unwrap().len(), 2);
        log.remove(first).unwrap();
        assert_eq!(log.segments().unwrap(), vec![(first + 1, ALIGN as u64)]);
    }

    #[test]
    fn concurrent_syncs_cover_every_append() {
        let (_dir, log) = log();
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let log = &log;
                s.spawn(move || {
                    for i in 0..50u8 {
                        let a = log.append(&[&[t ^ i; 3000]]).unwrap();
                        a.sync().unwrap();
                    }
                });
            }
        });
        let s = log.syncs.lock().unwrap();
        assert!(s.done >= 1 && s.done <= 200 && !s.running && s.failed.is_empty());
    }
}
