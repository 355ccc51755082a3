//! [`Kv`]: a small ordered key-value store for daemons' own records (the scheduler keeps
//! its state in one), on the same RocksDB seam as the content store but in a database of
//! its own. It knows nothing of chunks, images or volumes.
//!
//! Contract: keys and values are opaque bytes; [`Kv::scan_prefix`] returns keys in byte
//! order; [`Kv::write`] applies a [`KvBatch`] atomically and returns only once it is
//! durable (the write-ahead log is fsynced), so a batch acknowledged before a crash is
//! there after restart, and a batch interrupted by one is there entirely or not at all.
//! Single puts and deletes are one-entry batches with the same guarantee.

use std::path::Path;

use crate::db::{PlainBatch, PlainDb};
use crate::error::{Error, Result};

/// An open key-value store. One process at a time (RocksDB's lock enforces it).
#[derive(Debug)]
pub struct Kv {
    db: PlainDb,
}

/// Puts and deletes applied together by [`Kv::write`], in the order they were added.
#[derive(Debug, Default)]
pub struct KvBatch {
    batch: PlainBatch,
}

impl KvBatch {
    /// An empty batch.
    pub fn new() -> KvBatch {
        KvBatch::default()
    }

    /// Sets `key` to `value`.
    pub fn put(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.batch.put(key.as_ref(), value.as_ref());
    }

    /// Removes `key` (nothing happens if it is absent).
    pub fn delete(&mut self, key: impl AsRef<[u8]>) {
        self.batch.delete(key.as_ref());
    }

    /// Number of operations in the batch.
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    /// Whether the batch holds no operation.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Kv {
    /// Opens the store at `path`, creating the directory and database if missing.
    pub fn open(path: impl AsRef<Path>) -> Result<Kv> {
        let path = path.as_ref();
        std::fs::create_dir_all(path).map_err(|source| Error::Io {
            op: "create",
            path: path.to_path_buf(),
            source,
        })?;
        let db = PlainDb::open(path)?;
        Ok(Kv { db })
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>> {
        self.db.get(key.as_ref())
    }

    /// Sets `key` to `value`, durably.
    pub fn put(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<()> {
        let mut b = KvBatch::new();
        b.put(key, value);
        self.write(b)
    }

    /// Removes `key`, durably.
    pub fn delete(&self, key: impl AsRef<[u8]>) -> Result<()> {
        let mut b = KvBatch::new();
        b.delete(key);
        self.write(b)
    }

    /// Every key that starts with `prefix`, with its value, in byte order of the keys.
    pub fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .db
            .scan_prefix(prefix.as_ref())?
            .into_iter()
            .map(|(k, v)| (k.into_vec(), v.into_vec()))
            .collect())
    }

    /// Applies `batch` atomically; it is durable when this returns.
    pub fn write(&self, batch: KvBatch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.db.write_synced(batch.batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_put_delete() {
        let dir = tempfile::tempdir().unwrap();
        let kv = Kv::open(dir.path().join("state")).unwrap();
        assert_eq!(kv.get("a").unwrap(), None);
        kv.put("a", "1").unwrap();
        assert_eq!(kv.get("a").unwrap().as_deref(), Some(&b"1"[..]));
        kv.put("a", "2").unwrap();
        assert_eq!(kv.get("a").unwrap().as_deref(), Some(&b"2"[..]));
        kv.delete("a").unwrap();
        assert_eq!(kv.get("a").unwrap(), None);
        // Deleting what is absent is not an error.
        kv.delete("a").unwrap();
    }

    #[test]
    fn prefix_scan_is_ordered_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let kv = Kv::open(dir.path()).unwrap();
        for k in ["stack/b", "stack/a", "stacks", "stack0", "stac", "alias/x"] {
            kv.put(k, k.to_uppercase()).unwrap();
        }
        kv.put([0xffu8, 0xff], "high").unwrap();
        let keys: Vec<String> = kv
            .scan_prefix("stack/")
            .unwrap()
            .into_iter()
            .map(|(k, _)| String::from_utf8(k).unwrap())
            .collect();
        assert_eq!(keys, ["stack/a", "stack/b"]);
        let all = kv.scan_prefix("").unwrap();
        assert_eq!(all.len(), 7);
        assert_eq!(all.last().unwrap().0, vec![0xff, 0xff]);
        assert_eq!(kv.scan_prefix([0xffu8]).unwrap().len(), 1);
        assert!(kv.scan_prefix("zzz").unwrap().is_empty());
    }

    #[test]
    fn batches_apply_together_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let kv = Kv::open(dir.path()).unwrap();
            kv.put("old", "x").unwrap();
            let mut b = KvBatch::new();
            b.put("k1", "v1");
            b.put("k2", "v2");
            b.delete("old");
            b.put("k1", "v1b");
            assert_eq!(b.len(), 4);
            kv.write(b).unwrap();
            kv.write(KvBatch::new()).unwrap();
        }
        let kv = Kv::open(dir.path()).unwrap();
        assert_eq!(kv.get("k1").unwrap().as_deref(), Some(&b"v1b"[..]));
        assert_eq!(kv.get("k2").unwrap().as_deref(), Some(&b"v2"[..]));
        assert_eq!(kv.get("old").unwrap(), None);
    }

    #[test]
    fn one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let _kv = Kv::open(dir.path()).unwrap();
        assert!(Kv::open(dir.path()).is_err());
    }
}
