//! Fault injection for tests: damage the store the way a bad disk would, through the
//! same RocksDB seam everything else uses; fail or crash the chunk log's I/O through its
//! seam ([`FaultyFiles`]); and deterministic test data. Not for production use.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::chunklog::ChunkFiles;

use crate::Digest;
use crate::chunklog::Pointer;
use crate::db::{Batch, Cf};
use crate::error::{Error, ObjectKind, Result};
use crate::store::Store;

/// `len` pseudo-random bytes (xorshift64 from `seed`, which must not be 0): the same for
/// a seed on every run, and incompressible.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Flips one bit of a stored chunk's bytes (the compressed payload, after the codec byte;
/// for a chunk in the chunk log, in its segment file).
pub fn corrupt_chunk(store: &Store, d: &Digest) -> Result<()> {
    let mut v = store.db.get(Cf::Chunks, &d.0)?.ok_or(Error::Missing {
        kind: ObjectKind::Chunk,
        digest: *d,
    })?;
    if let Some(p) = Pointer::decode(&v) {
        let path = store.log.files().path(p.segment);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        let at = p.offset + u64::from(p.len) / 2;
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, at)
            .and_then(|()| f.write_all_at(&[byte[0] ^ 0x01], at))
            .and_then(|()| f.sync_data())
            .map_err(|e| Error::io("write", &path, e))?;
        return Ok(());
    }
    let i = (v.len() / 2).clamp(1, v.len() - 1);
    v[i] ^= 0x01;
    let mut b = Batch::new();
    b.put(&store.db, Cf::Chunks, &d.0, &v);
    store.db.write(b, true)
}

/// Deletes a chunk's data but not its index entry, as a lost blob file would.
pub fn lose_chunk(store: &Store, d: &Digest) -> Result<()> {
    let mut b = Batch::new();
    b.delete(&store.db, Cf::Chunks, &d.0);
    store.db.write(b, true)
}

/// Deletes a chunk and its index entry, as if it had never arrived: the store then
/// holds a layer whose data is partly present. Counts as a change (`change_count`).
pub fn forget_chunk(store: &Store, d: &Digest) -> Result<()> {
    let mut b = Batch::new();
    b.delete(&store.db, Cf::Chunks, &d.0);
    b.delete(&store.db, Cf::ChunkIndex, &d.0);
    store.db.write(b, true)?;
    store.bump_changes();
    Ok(())
}

/// Every chunk digest in the store.
pub fn chunk_digests(store: &Store) -> Result<Vec<Digest>> {
    let mut out = Vec::new();
    for k in store.db.keys(Cf::ChunkIndex) {
        if let Some(d) = Digest::from_slice(&k?) {
            out.push(d);
        }
    }
    Ok(out)
}

/// How many small-write journal records the store holds (not yet folded into extents).
pub fn journal_records(store: &Store) -> Result<usize> {
    let mut n = 0;
    for k in store.db.keys(Cf::VolumeJournal) {
        k?;
        n += 1;
    }
    Ok(n)
}

/// Writes a raw journal record, as a bug or a foreign store might have left it.
pub fn put_journal_record(store: &Store, key: &[u8], value: &[u8]) -> Result<()> {
    let mut b = Batch::new();
    b.put(&store.db, Cf::VolumeJournal, key, value);
    store.db.write(b, true)
}

/// What [`FaultyFiles`] does to the chunk log's I/O once armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The write fails with EIO (nothing written).
    FailWrite,
    /// The write stores only its first half and reports that.
    ShortWrite,
    /// The sync fails with EIO.
    FailSync,
    /// The process kills itself with SIGKILL right after the sync returned: the bytes
    /// are durable, the batch that would point at them is never written.
    KillAfterSync,
}

/// A [`ChunkFiles`] that passes everything to another one, except that the operation
/// chosen by [`FaultyFiles::arm`] fails (or kills the process).
#[derive(Debug)]
pub struct FaultyFiles {
    inner: Arc<dyn ChunkFiles>,
    /// The armed fault and how many operations of its kind still pass before it hits.
    armed: Mutex<Option<(Fault, u64)>>,
}

impl FaultyFiles {
    /// Wraps `inner`, unarmed. Use with [`Store::open_with_files`].
    pub fn new(inner: Arc<dyn ChunkFiles>) -> Arc<FaultyFiles> {
        Arc::new(FaultyFiles {
            inner,
            armed: Mutex::new(None),
        })
    }

    /// After `pass` more writes (or syncs, as `fault` concerns) succeed, the next one
    /// meets `fault`; it hits once and then the files behave again.
    pub fn arm(&self, fault: Fault, pass: u64) {
        *self.armed.lock().expect("fault plan") = Some((fault, pass));
    }

    /// Whether the armed fault has hit (or nothing was armed).
    pub fn spent(&self) -> bool {
        self.armed.lock().expect("fault plan").is_none()
    }

    /// Whether this operation meets the armed fault (one of `kinds`); counts it down.
    fn hits(&self, kinds: &[Fault]) -> Option<Fault> {
        let mut armed = self.armed.lock().expect("fault plan");
        let (fault, pass) = armed.as_mut()?;
        if !kinds.contains(fault) {
            return None;
        }
        if *pass > 0 {
            *pass -= 1;
            return None;
        }
        let f = *fault;
        *armed = None;
        Some(f)
    }
}

impl ChunkFiles for FaultyFiles {
    fn create(&self, segment: u64) -> io::Result<()> {
        self.inner.create(segment)
    }

    fn write_at(&self, segment: u64, offset: u64, bufs: &[&[u8]]) -> io::Result<usize> {
        match self.hits(&[Fault::FailWrite, Fault::ShortWrite]) {
            Some(Fault::FailWrite) => Err(io::Error::from_raw_os_error(libc::EIO)),
            Some(_) => {
                // Half the buffers (at least one), so the write stays aligned.
                let half = bufs.len().div_ceil(2).min(bufs.len());
                let n = self.inner.write_at(segment, offset, &bufs[..half])?;
                let want: usize = bufs.iter().map(|b| b.len()).sum();
                Ok(n.min(want.saturating_sub(1)))
            }
            None => self.inner.write_at(segment, offset, bufs),
        }
    }

    fn sync(&self, segment: u64) -> io::Result<()> {
        match self.hits(&[Fault::FailSync, Fault::KillAfterSync]) {
            Some(Fault::FailSync) => Err(io::Error::from_raw_os_error(libc::EIO)),
            Some(_) => {
                self.inner.sync(segment)?;
                // SAFETY: kill(2) on our own pid has no memory effects.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                unreachable!("SIGKILL is not caught");
            }
            None => self.inner.sync(segment),
        }
    }

    fn read_at(&self, segment: u64, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(segment, offset, buf)
    }

    fn segments(&self) -> io::Result<Vec<(u64, u64)>> {
        self.inner.segments()
    }

    fn remove(&self, segment: u64) -> io::Result<()> {
        self.inner.remove(segment)
    }

    fn path(&self, segment: u64) -> PathBuf {
        self.inner.path(segment)
    }
}

/// The chunk log's segments and their lengths in bytes.
pub fn chunk_log_segments(store: &Store) -> Result<Vec<(u64, u64)>> {
    store.log.segments()
}
