//! The ingest pipeline: a producer (directory walker or archive reader) feeds file jobs to
//! one worker per core; each worker chunks, hashes, looks the digest up and compresses
//! only chunks the store lacks; one writer thread batches them into RocksDB.
//!
//! Chunk and blob batches skip the write-ahead log (the data would otherwise be written
//! twice, and replayed at the next open): [`Ingest::make_durable`] flushes those families
//! before the import's final, logged and synced commit. The flush covers everything in
//! the memtables, including chunks another import wrote and this one deduplicated
//! against, so nothing a committed name refers to can be lost in a crash.

use std::cell::RefCell;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::Digest;
use crate::chunker;
use crate::db::{Batch, Cf};
use crate::digest::Hasher;
use crate::error::{Error, Result};
use crate::model::{Blob, FileData, INLINE_MAX, Segment};
use crate::store::{ClaimSet, Store};

thread_local! {
    /// One zstd context per thread that compresses (workers, and the producer for big
    /// archive members).
    static COMPRESSOR: RefCell<zstd::bulk::Compressor<'static>> = RefCell::new(Store::compressor());
}

/// Files larger than this are chunked as a stream instead of read whole into memory.
const STREAM_THRESHOLD: u64 = 64 << 20;
/// A stream is held in memory this many bytes at a time.
const WINDOW: usize = 32 << 20;
/// Content at least this large has its chunks hashed and compressed on every core, not
/// only by the worker that read it (a VM image or a big library would otherwise keep
/// one core busy while the other idles).
const PARALLEL_MIN: usize = 4 << 20;
/// The writer commits a batch when it holds this many bytes.
const BATCH_BYTES: usize = 32 << 20;

/// Live counters of an import, readable from another thread (for a progress bar).
#[derive(Debug, Default)]
pub struct Progress {
    /// Regular files finished.
    pub files: AtomicU64,
    /// Content bytes finished.
    pub bytes: AtomicU64,
    /// Content bytes known so far to be coming (grows while a directory is walked; 0 when
    /// the input is a stream of unknown length).
    pub bytes_total: AtomicU64,
}

/// Every file slot's content and length, filled in by the workers.
pub(crate) type FileTable = Vec<Option<(FileData, u64)>>;

/// Counters an import reports at the end.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Regular files the imported layers hold (counted as each layer is encoded, so a
    /// file that a later entry replaced is not one of them).
    pub(crate) files: AtomicU64,
    /// Their content bytes.
    pub(crate) bytes: AtomicU64,
    pub(crate) chunks: AtomicU64,
    pub(crate) new_chunks: AtomicU64,
    pub(crate) new_chunk_bytes: AtomicU64,
    pub(crate) new_stored_bytes: AtomicU64,
}

/// Where a job's bytes come from.
#[derive(Debug)]
pub(crate) enum Content {
    /// A file on disk; `sparse` when it has fewer blocks than its size needs.
    Path { path: PathBuf, sparse: bool },
    /// Bytes already read (from an archive).
    Bytes(Vec<u8>),
}

#[derive(Debug)]
pub(crate) struct Job {
    slot: usize,
    /// The entry's name, for errors.
    name: String,
    content: Content,
}

enum WriteMsg {
    Chunk {
        digest: Digest,
        raw_len: usize,
        stored: Vec<u8>,
    },
    Record {
        cf: Cf,
        key: Digest,
        value: Vec<u8>,
    },
}

/// One import's shared state: the store, its claims and counters.
#[derive(Debug)]
pub(crate) struct Ingest<'s> {
    pub(crate) store: &'s Store,
    pub(crate) claims: ClaimSet<'s>,
    pub(crate) stats: Stats,
    pub(crate) progress: Arc<Progress>,
    abort: AtomicBool,
    threads: usize,
}

/// Handed to the producer: allocates file slots and queues jobs.
#[derive(Debug)]
pub(crate) struct Producer<'a, 's> {
    ingest: &'a Ingest<'s>,
    tx: Sender<Job>,
    w_tx: Sender<WriteMsg>,
    files: RefCell<Vec<Option<(FileData, u64)>>>,
}

impl Producer<'_, '_> {
    fn slot(&self) -> usize {
        let mut f = self.files.borrow_mut();
        f.push(None);
        f.len() - 1
    }

    /// Whether a worker failed (the producer should stop early).
    pub(crate) fn aborted(&self) -> bool {
        self.ingest.abort.load(Ordering::Relaxed)
    }

    /// Queues a file on disk; returns its slot.
    pub(crate) fn file(
        &self,
        name: String,
        path: PathBuf,
        size: u64,
        sparse: bool,
    ) -> Result<usize> {
        self.ingest
            .progress
            .bytes_total
            .fetch_add(size, Ordering::Relaxed);
        let slot = self.slot();
        if size == 0 {
            self.files.borrow_mut()[slot] = Some((FileData::Inline(Vec::new()), 0));
            self.ingest.done_file(0);
            return Ok(slot);
        }
        self.send(Job {
            slot,
            name,
            content: Content::Path { path, sparse },
        })?;
        Ok(slot)
    }

    /// Stores bytes already in memory; small ones are resolved here, others queued.
    pub(crate) fn bytes(&self, name: String, data: Vec<u8>) -> Result<usize> {
        let slot = self.slot();
        let size = data.len() as u64;
        if size <= INLINE_MAX {
            self.files.borrow_mut()[slot] = Some((FileData::Inline(data), size));
            self.ingest.done_file(size);
            return Ok(slot);
        }
        self.send(Job {
            slot,
            name,
            content: Content::Bytes(data),
        })?;
        Ok(slot)
    }

    /// Stores a large stream right here (bounded memory), e.g. a big archive member:
    /// entry `name` of the input `source_name`, which read errors name.
    pub(crate) fn stream(
        &self,
        source_name: &str,
        name: &str,
        reader: &mut dyn Read,
    ) -> Result<usize> {
        let slot = self.slot();
        let read_error = |e: std::io::Error| Error::BadInput {
            source_name: source_name.to_string(),
            reason: e.to_string(),
        };
        let (data, size) = self
            .ingest
            .stream(reader, &read_error, &self.w_tx)
            .map_err(|e| e.context(format!("reading {name}")))?;
        self.files.borrow_mut()[slot] = Some((data, size));
        self.ingest.done_file(size);
        Ok(slot)
    }

    fn send(&self, job: Job) -> Result<()> {
        self.tx
            .send(job)
            .map_err(|_| Error::Refused("import workers stopped".into()))
    }
}

impl<'s> Ingest<'s> {
    pub(crate) fn new(store: &'s Store, progress: Arc<Progress>) -> Ingest<'s> {
        Ingest {
            store,
            claims: store.claims(),
            stats: Stats::default(),
            progress,
            abort: AtomicBool::new(false),
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }

    /// Makes every chunk and blob written so far durable. Call before committing
    /// anything that refers to them.
    pub(crate) fn make_durable(&self) -> Result<()> {
        self.store
            .db
            .flush(&[Cf::Chunks, Cf::ChunkIndex, Cf::Blobs])
    }

    fn done_file(&self, size: u64) {
        self.progress.files.fetch_add(1, Ordering::Relaxed);
        self.progress.bytes.fetch_add(size, Ordering::Relaxed);
    }

    /// Runs `produce` with workers and a writer behind it. Returns what it built and the
    /// content of every file slot; every chunk and blob is written (not yet synced).
    pub(crate) fn run<T>(
        &self,
        produce: impl FnOnce(&Producer<'_, 's>) -> Result<T>,
    ) -> Result<(T, FileTable)> {
        std::thread::scope(|s| {
            let (tx, rx) = bounded::<Job>(self.threads * 8);
            let (w_tx, w_rx) = bounded::<WriteMsg>(64);
            let writer = s.spawn(move || self.writer(w_rx));
            let workers: Vec<_> = (0..self.threads)
                .map(|_| {
                    let rx = rx.clone();
                    let w_tx = w_tx.clone();
                    s.spawn(move || self.worker(rx, w_tx))
                })
                .collect();
            drop(rx);
            let producer = Producer {
                ingest: self,
                tx,
                w_tx,
                files: RefCell::new(Vec::new()),
            };
            let produced = produce(&producer);
            if produced.is_err() {
                self.abort.store(true, Ordering::Relaxed);
            }
            let Producer {
                tx, w_tx, files, ..
            } = producer;
            drop(tx);
            drop(w_tx);
            let mut files = files.into_inner();
            let mut first_err: Option<Error> = None;
            for w in workers {
                match w.join().expect("ingest worker panicked") {
                    Ok(results) => {
                        for (slot, data) in results {
                            files[slot] = Some(data);
                        }
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            let written = writer.join().expect("ingest writer panicked");
            // The producer's error explains best what went wrong (workers only see a
            // closed channel after it); then a worker's; then the writer's.
            let value = produced?;
            if let Some(e) = first_err {
                return Err(e);
            }
            written?;
            Ok((value, files))
        })
    }

    fn worker(
        &self,
        rx: Receiver<Job>,
        w_tx: Sender<WriteMsg>,
    ) -> Result<Vec<(usize, (FileData, u64))>> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        for job in rx {
            if self.abort.load(Ordering::Relaxed) {
                break;
            }
            match self.process(&job, &mut buf, &w_tx) {
                Ok(r) => {
                    self.done_file(r.1);
                    out.push((job.slot, r));
                }
                Err(e) => {
                    self.abort.store(true, Ordering::Relaxed);
                    return Err(e.context(format!("importing {}", job.name)));
                }
            }
        }
        Ok(out)
    }

    fn writer(&self, rx: Receiver<WriteMsg>) -> Result<()> {
        let db = &self.store.db;
        // Room for one batch and the chunk that takes it over the mark.
        let fresh = || Batch::with_capacity(BATCH_BYTES + (1 << 20));
        let mut batch = fresh();
        for msg in rx {
            match msg {
                WriteMsg::Chunk {
                    digest,
                    raw_len,
                    stored,
                } => Store::put_chunk(&mut batch, db, &digest, raw_len, &stored),
                WriteMsg::Record { cf, key, value } => batch.put(db, cf, &key.0, &value),
            }
            if batch.size_in_bytes() >= BATCH_BYTES
                && let Err(e) = db.write_unlogged(std::mem::replace(&mut batch, fresh()))
            {
                self.abort.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
        if !batch.is_empty() {
            db.write_unlogged(batch)?;
        }
        Ok(())
    }

    fn process(
        &self,
        job: &Job,
        buf: &mut Vec<u8>,
        w_tx: &Sender<WriteMsg>,
    ) -> Result<(FileData, u64)> {
        match &job.content {
            Content::Bytes(data) => self.buffer(data, w_tx),
            Content::Path { path, sparse } => {
                let mut f = File::open(path).map_err(|e| Error::io("open", path, e))?;
                let len = f.metadata().map_err(|e| Error::io("stat", path, e))?.len();
                if *sparse {
                    return self.sparse(&mut f, path, len, buf, w_tx);
                }
                if len > STREAM_THRESHOLD {
                    return self.stream(&mut f, &|e| Error::io("read", path, e), w_tx);
                }
                buf.clear();
                f.read_to_end(buf).map_err(|e| Error::io("read", path, e))?;
                self.buffer(buf, w_tx)
            }
        }
    }

    /// Stores one chunk unless this import or the store already has it.
    fn chunk(&self, data: &[u8], w_tx: &Sender<WriteMsg>) -> Result<Digest> {
        let d = Digest::of(data);
        self.stats.chunks.fetch_add(1, Ordering::Relaxed);
        // Claim before looking: a concurrent GC then either keeps it or has already
        // deleted it, in which case the lookup misses and we write it again.
        if self.claims.claim(d) && !self.store.has_chunk(&d)? {
            let stored = COMPRESSOR.with_borrow_mut(|zc| Store::encode_chunk(zc, data));
            self.stats.new_chunks.fetch_add(1, Ordering::Relaxed);
            self.stats
                .new_chunk_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            self.stats
                .new_stored_bytes
                .fetch_add(stored.len() as u64, Ordering::Relaxed);
            w_tx.send(WriteMsg::Chunk {
                digest: d,
                raw_len: data.len(),
                stored,
            })
            .map_err(|_| Error::Refused("import writer stopped".into()))?;
        }
        Ok(d)
    }

    fn blob(&self, blob: Blob, w_tx: &Sender<WriteMsg>) -> Result<FileData> {
        let bytes = blob.encode();
        let d = Digest::of(&bytes);
        if self.claims.claim(d) && !self.store.db.contains(Cf::Blobs, &d.0)? {
            w_tx.send(WriteMsg::Record {
                cf: Cf::Blobs,
                key: d,
                value: bytes,
            })
            .map_err(|_| Error::Refused("import writer stopped".into()))?;
        }
        Ok(FileData::Blob(d))
    }

    /// Stores the chunks of `data` at `cuts` (in order) and feeds `data` to `hasher`.
    /// Enough data is spread over every core: the chunks in contiguous groups, one
    /// thread each, while this thread hashes the whole.
    fn chunks_of(
        &self,
        data: &[u8],
        cuts: &[(usize, usize)],
        hasher: Option<&mut Hasher>,
        w_tx: &Sender<WriteMsg>,
    ) -> Result<Vec<Segment>> {
        let one = |&(off, len): &(usize, usize)| {
            self.chunk(&data[off..off + len], w_tx)
                .map(|chunk| Segment::Data {
                    chunk,
                    len: len as u32,
                })
        };
        if data.len() < PARALLEL_MIN || self.threads < 2 || cuts.len() < 2 {
            if let Some(h) = hasher {
                h.update(data);
            }
            return cuts.iter().map(one).collect();
        }
        let per = cuts.len().div_ceil(self.threads);
        let one = &one;
        std::thread::scope(|s| {
            let groups: Vec<_> = cuts
                .chunks(per)
                .map(|group| s.spawn(move || group.iter().map(one).collect::<Result<Vec<_>>>()))
                .collect();
            if let Some(h) = hasher {
                h.update(data);
            }
            let mut out = Vec::with_capacity(cuts.len());
            for g in groups {
                out.extend(g.join().expect("chunk thread panicked")?);
            }
            Ok(out)
        })
    }

    /// Content held in memory.
    fn buffer(&self, data: &[u8], w_tx: &Sender<WriteMsg>) -> Result<(FileData, u64)> {
        let size = data.len() as u64;
        if size <= INLINE_MAX {
            return Ok((FileData::Inline(data.to_vec()), size));
        }
        let cuts: Vec<(usize, usize)> = chunker::cut_points(data).collect();
        if cuts.len() == 1 {
            // One chunk: its digest is the content digest.
            return Ok((FileData::Chunk(self.chunk(data, w_tx)?), size));
        }
        let mut hasher = Hasher::new();
        let segments = self.chunks_of(data, &cuts, Some(&mut hasher), w_tx)?;
        let blob = Blob {
            content: hasher.finish(),
            segments,
        };
        Ok((self.blob(blob, w_tx)?, size))
    }

    /// Content read as a stream, a window at a time; `read_error` says what a failed
    /// read was reading.
    fn stream(
        &self,
        reader: &mut dyn Read,
        read_error: &dyn Fn(std::io::Error) -> Error,
        w_tx: &Sender<WriteMsg>,
    ) -> Result<(FileData, u64)> {
        let mut segments = Vec::new();
        let mut hasher = Hasher::new();
        let mut size = 0u64;
        let mut small: Option<Vec<u8>> = None;
        chunker::for_each_window(reader, WINDOW, read_error, |bytes, cuts| -> Result<()> {
            if size == 0 && bytes.len() as u64 <= INLINE_MAX {
                small = Some(bytes.to_vec());
            }
            size += bytes.len() as u64;
            segments.extend(self.chunks_of(bytes, cuts, Some(&mut hasher), w_tx)?);
            Ok(())
        })?;
        if size <= INLINE_MAX {
            return Ok((FileData::Inline(small.unwrap_or_default()), size));
        }
        if let [Segment::Data { chunk, .. }] = segments[..] {
            return Ok((FileData::Chunk(chunk), size));
        }
        let blob = Blob {
            content: hasher.finish(),
            segments,
        };
        Ok((self.blob(blob, w_tx)?, size))
    }

    /// A sparse file: data regions are chunked, holes become hole segments.
    fn sparse(
        &self,
        f: &mut File,
        path: &std::path::Path,
        len: u64,
        buf: &mut Vec<u8>,
        w_tx: &Sender<WriteMsg>,
    ) -> Result<(FileData, u64)> {
        use std::io::{Seek, SeekFrom};
        let regions = data_regions(f, len).map_err(|e| Error::io("seek", path, e))?;
        let mut segments = Vec::new();
        let mut hasher = Hasher::new();
        let zeros = vec![0u8; 1 << 16];
        let mut pos = 0u64;
        let hole = |hasher: &mut Hasher, segments: &mut Vec<Segment>, n: u64| {
            let mut left = n;
            while left > 0 {
                let k = left.min(zeros.len() as u64) as usize;
                hasher.update(&zeros[..k]);
                left -= k as u64;
            }
            if n > 0 {
                segments.push(Segment::Hole { len: n });
            }
        };
        for (start, end) in regions {
            hole(&mut hasher, &mut segments, start - pos);
            f.seek(SeekFrom::Start(start))
                .map_err(|e| Error::io("seek", path, e))?;
            let mut left = end - start;
            while left > 0 {
                // Regions are read in bounded pieces; a cut at a piece boundary only
                // costs some dedup across differently-laid-out copies.
                let piece = left.min(STREAM_THRESHOLD);
                buf.clear();
                f.by_ref()
                    .take(piece)
                    .read_to_end(buf)
                    .map_err(|e| Error::io("read", path, e))?;
                if buf.len() as u64 != piece {
                    return Err(Error::io(
                        "read",
                        path,
                        std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "file shrank while read",
                        ),
                    ));
                }
                let cuts: Vec<(usize, usize)> = chunker::cut_points(buf).collect();
                segments.extend(self.chunks_of(buf, &cuts, Some(&mut hasher), w_tx)?);
                left -= piece;
            }
            pos = end;
        }
        hole(&mut hasher, &mut segments, len - pos);
        let blob = Blob {
            content: hasher.finish(),
            segments,
        };
        Ok((self.blob(blob, w_tx)?, len))
    }
}

/// The data regions of a file as `[start, end)` pairs, from SEEK_DATA/SEEK_HOLE.
fn data_regions(f: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let len = len as i64;
    while pos < len {
        // SAFETY: lseek on a descriptor owned by `f` for its whole lifetime.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos: the rest is a hole
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let end = hole.min(len);
        if data >= end {
            break;
        }
        out.push((data as u64, end as u64));
        pos = end;
    }
    Ok(out)
}
