//! Fault injection for tests: damage the store the way a bad disk would, through the
//! same RocksDB seam everything else uses; and deterministic test data. Not for
//! production use.

use crate::Digest;
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

/// Flips one bit of a stored chunk's bytes (the compressed payload, after the codec byte).
pub fn corrupt_chunk(store: &Store, d: &Digest) -> Result<()> {
    let mut v = store.db.get(Cf::Chunks, &d.0)?.ok_or(Error::Missing {
        kind: ObjectKind::Chunk,
        digest: *d,
    })?;
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
