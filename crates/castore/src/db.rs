//! The RocksDB seam: the only module that names RocksDB. Everything above it sees column
//! families as [`Cf`], batches as [`Batch`] and keys as bytes.
//!
//! Column families, one per kind of record (the on-disk format, also in ARCHITECTURE.md):
//!
//! | family | key | value |
//! |---|---|---|
//! | `chunks` | digest (32 B) | codec byte + zstd or raw bytes; kept in RocksDB blob files |
//! | `chunk_index` | digest | varint raw length, varint stored length |
//! | `blobs`, `trees`, `layers`, `images` | digest | canonical encoding (model.rs) |
//! | `refs` | `name:tag` | image digest |
//! | `layer_refs` | layer digest | empty: a layer imported on its own, kept by GC |
//! | `meta` | utf-8 key | format version and other store facts |
//! | `volumes` | volume id (8 B BE) | volume record (volume.rs) |
//! | `volume_names` | volume name | volume id (8 B BE) |
//! | `block_map` | volume id ‖ extent index ‖ !generation (8 B BE each) | chunk digest, or 1 B marker: `0x00` zero (hole), `0x01` zeros kept allocated |
//! | `volume_journal` | volume id ‖ extent index ‖ sequence (8 B BE each) | small write not yet folded into its extent: kind, offset in extent, bytes (volume/journal.rs) |
//! | `tiered` | kind byte ‖ digest | last known read, ms since the epoch (8 B BE; empty in older stores): the object is in the chunk tier (pushed, or fetched from it) (tier/mod.rs, cache.rs) |
//!
//! Later families are added here and nowhere else.
//!
//! [`PlainDb`] is a second, separate kind of database behind the same seam: one default
//! column family of opaque keys and values, for daemons that keep small records of their
//! own (the scheduler's state, through [`crate::kv::Kv`]).

use std::path::Path;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, DBRawIterator,
    IteratorMode, Options, ReadOptions, ReadTier, WriteBatch, WriteOptions,
};

use crate::error::Result;

/// A key and its value as read from the database.
pub(crate) type KeyValue = (Box<[u8]>, Box<[u8]>);

/// A column family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Cf {
    Chunks,
    ChunkIndex,
    Blobs,
    Trees,
    Layers,
    Images,
    Refs,
    LayerRefs,
    Meta,
    Volumes,
    VolumeNames,
    BlockMap,
    VolumeJournal,
    Tiered,
}

impl Cf {
    pub(crate) const ALL: [Cf; 14] = [
        Cf::Chunks,
        Cf::ChunkIndex,
        Cf::Blobs,
        Cf::Trees,
        Cf::Layers,
        Cf::Images,
        Cf::Refs,
        Cf::LayerRefs,
        Cf::Meta,
        Cf::Volumes,
        Cf::VolumeNames,
        Cf::BlockMap,
        Cf::VolumeJournal,
        Cf::Tiered,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Cf::Chunks => "chunks",
            Cf::ChunkIndex => "chunk_index",
            Cf::Blobs => "blobs",
            Cf::Trees => "trees",
            Cf::Layers => "layers",
            Cf::Images => "images",
            Cf::Refs => "refs",
            Cf::LayerRefs => "layer_refs",
            Cf::Meta => "meta",
            Cf::Volumes => "volumes",
            Cf::VolumeNames => "volume_names",
            Cf::BlockMap => "block_map",
            Cf::VolumeJournal => "volume_journal",
            Cf::Tiered => "tiered",
        }
    }
}

/// The open database.
pub(crate) struct Db {
    db: rocksdb::DB,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("path", &self.db.path()).finish()
    }
}

/// Writes applied together: all or none survive a crash.
#[derive(Default)]
pub(crate) struct Batch {
    wb: WriteBatch,
    entries: usize,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("entries", &self.entries)
            .field("bytes", &self.wb.size_in_bytes())
            .finish()
    }
}

impl Batch {
    pub(crate) fn new() -> Batch {
        Batch::default()
    }

    /// A batch with room for `bytes` of keys and values: a batch grown by appending
    /// 64 KiB values reallocates (and page-faults) its buffer over and over, which took a
    /// fifth of a sequential volume write's CPU.
    pub(crate) fn with_capacity(bytes: usize) -> Batch {
        Batch {
            wb: WriteBatch::with_capacity_bytes(bytes),
            entries: 0,
        }
    }

    pub(crate) fn put(&mut self, db: &Db, cf: Cf, key: &[u8], value: &[u8]) {
        self.wb.put_cf(db.handle(cf), key, value);
        self.entries += 1;
    }

    pub(crate) fn delete(&mut self, db: &Db, cf: Cf, key: &[u8]) {
        self.wb.delete_cf(db.handle(cf), key);
        self.entries += 1;
    }

    /// Deletes every key in `[from, to)` (one range tombstone).
    pub(crate) fn delete_range(&mut self, db: &Db, cf: Cf, from: &[u8], to: &[u8]) {
        self.wb.delete_range_cf(db.handle(cf), from, to);
        self.entries += 1;
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries == 0
    }

    pub(crate) fn size_in_bytes(&self) -> usize {
        self.wb.size_in_bytes()
    }
}

/// A positioned reader over a key range (see [`Db::cursor`]).
pub(crate) struct Cursor<'a> {
    it: DBRawIterator<'a>,
}

impl std::fmt::Debug for Cursor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cursor").finish_non_exhaustive()
    }
}

impl Cursor<'_> {
    /// Moves to the first key at or after `key`; returns it and its value, if any.
    pub(crate) fn seek(&mut self, key: &[u8]) -> Result<Option<(&[u8], &[u8])>> {
        self.it.seek(key);
        self.current()
    }

    /// Moves to the next key.
    pub(crate) fn next(&mut self) -> Result<Option<(&[u8], &[u8])>> {
        self.it.next();
        self.current()
    }

    /// Moves to the first key of the range.
    pub(crate) fn first(&mut self) -> Result<Option<(&[u8], &[u8])>> {
        self.it.seek_to_first();
        self.current()
    }

    fn current(&self) -> Result<Option<(&[u8], &[u8])>> {
        if self.it.valid() {
            Ok(self.it.key().zip(self.it.value()))
        } else {
            self.it.status()?;
            Ok(None)
        }
    }
}

impl Db {
    pub(crate) fn open(path: &Path) -> std::result::Result<Db, rocksdb::Error> {
        let cache = Cache::new_lru_cache(256 << 20);
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        opts.set_max_background_jobs(2);
        // RocksDB's info log dumps every option at each open (~200 KB); warnings are
        // what an operator needs from it.
        opts.set_log_level(rocksdb::LogLevel::Warn);
        opts.set_keep_log_file_num(2);
        // Chunks sit in blob files in the order they were imported, so reading a file
        // reads its blob file sequentially: let the kernel read ahead (RocksDB's default
        // advises random access, which turns a cold sequential read into one small disk
        // read per chunk).
        opts.set_advise_random_on_open(false);
        // Imports write `chunks` and `chunk_index` without the WAL. Without atomic flush a
        // full `chunks` memtable could reach disk while its `chunk_index` entries did not,
        // and a crash would leave chunk data no index (and so no GC) knows of. Atomic
        // flush writes every family's memtable together, as RocksDB documents for
        // unlogged writes across families.
        opts.set_atomic_flush(true);
        // Volume writes go through the WAL (imports do not). A WAL file is kept until every
        // family with data in it has flushed, and some families (meta, volumes) rarely
        // fill a memtable; past this total RocksDB flushes them, so the WAL a restart
        // replays after a crash stays small.
        opts.set_max_total_wal_size(256 << 20);
        let cfs = Cf::ALL.iter().map(|&cf| {
            let mut o = Options::default();
            let mut table = BlockBasedOptions::default();
            table.set_block_cache(&cache);
            table.set_bloom_filter(10.0, false);
            o.set_block_based_table_factory(&table);
            // With atomic flush, a full `chunks` memtable switches every family's memtable
            // at once; with RocksDB's default of two, the small families (block_map,
            // chunk_index) stopped writes while a volume write's flush was in flight.
            o.set_max_write_buffer_number(6);
            match cf {
                Cf::Chunks => {
                    // Chunk values are already zstd-compressed by us; RocksDB keeps them in
                    // blob files so compactions move only the small keys.
                    o.set_compression_type(DBCompressionType::None);
                    o.set_enable_blob_files(true);
                    // Chunk log pointers (22 bytes) stay in the SST files with their keys:
                    // a blob file would cost a second read per lookup.
                    o.set_min_blob_size(64);
                    o.set_blob_file_size(256 << 20);
                    o.set_blob_compression_type(DBCompressionType::None);
                    // The store only appends between collections; blob GC during ordinary
                    // compactions would rewrite live chunks for nothing. `reclaim` turns it
                    // on for the compaction after a sweep.
                    o.set_enable_blob_gc(false);
                    // Memtables of 64 MiB flush in the background while an import or a
                    // sequential volume write runs, so the flush before an import's commit has
                    // little left to write and writers rarely wait for a flush.
                    o.set_write_buffer_size(64 << 20);
                }
                Cf::ChunkIndex => {
                    o.set_compression_type(DBCompressionType::None);
                }
                Cf::VolumeJournal => {
                    // Journal records live until their extent is folded, usually before
                    // their memtable flushes; compressing them would be wasted work.
                    o.set_compression_type(DBCompressionType::None);
                }
                _ => {
                    o.set_compression_type(DBCompressionType::Lz4);
                }
            }
            ColumnFamilyDescriptor::new(cf.name(), o)
        });
        let db = rocksdb::DB::open_cf_descriptors(&opts, path, cfs)?;
        Ok(Db { db })
    }

    fn handle(&self, cf: Cf) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(cf.name())
            .expect("every column family is created at open")
    }

    pub(crate) fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.handle(cf), key)?)
    }

    /// Like [`Db::get`] without RocksDB's own block and blob checksums: for values the
    /// caller verifies anyway (chunks are re-hashed with SHA-256), so corruption is still
    /// caught, once, by the stronger check.
    pub(crate) fn get_verified_by_caller(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_verify_checksums(false);
        Ok(self.db.get_cf_opt(self.handle(cf), key, &ro)?)
    }

    pub(crate) fn contains(&self, cf: Cf, key: &[u8]) -> Result<bool> {
        let h = self.handle(cf);
        // The bloom filter answers most misses without touching a data block.
        if !self.db.key_may_exist_cf(h, key) {
            return Ok(false);
        }
        Ok(self.db.get_pinned_cf(h, key)?.is_some())
    }

    /// Whether `key` is stored durably in every family of `cfs`: present in `cfs[0]` (read
    /// normally, so a recent delete counts) and in no memtable of any of them. A value
    /// still in a memtable may have come from [`Db::write_unlogged`] and be lost in a
    /// crash (and families flush separately, so one family's copy may be on disk while
    /// another's is not); the caller then writes it again, logged. Conservative: a
    /// logged value in a memtable is also reported as not durable.
    pub(crate) fn contains_durable(&self, cfs: &[Cf], key: &[u8]) -> Result<bool> {
        let Some(&first) = cfs.first() else {
            return Ok(false);
        };
        if !self.contains(first, key)? {
            return Ok(false);
        }
        for &cf in cfs {
            let mut ro = ReadOptions::default();
            ro.set_read_tier(ReadTier::Memtable);
            let mut it = self.db.raw_iterator_cf_opt(self.handle(cf), ro);
            it.seek(key);
            if it.valid() && it.key() == Some(key) {
                return Ok(false);
            }
            it.status()?;
        }
        Ok(true)
    }

    /// Makes every logged write so far durable (fsyncs the write-ahead log).
    pub(crate) fn sync_wal(&self) -> Result<()> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    /// A cursor over `[lower, upper)` of a family (unbounded where `None`), for seeks and
    /// short scans (block map lookups).
    pub(crate) fn cursor(&self, cf: Cf, lower: Option<&[u8]>, upper: Option<&[u8]>) -> Cursor<'_> {
        let mut ro = ReadOptions::default();
        if let Some(l) = lower {
            ro.set_iterate_lower_bound(l.to_vec());
        }
        if let Some(u) = upper {
            ro.set_iterate_upper_bound(u.to_vec());
        }
        Cursor {
            it: self.db.raw_iterator_cf_opt(self.handle(cf), ro),
        }
    }

    /// Applies a batch. `sync` makes it, and every write before it, durable before return.
    pub(crate) fn write(&self, batch: Batch, sync: bool) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch.wb, &wo)?;
        Ok(())
    }

    /// Applies a batch without the write-ahead log: fast, but lost in a crash unless
    /// [`Db::flush`] runs before anything durable refers to it.
    pub(crate) fn write_unlogged(&self, batch: Batch) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(batch.wb, &wo)?;
        Ok(())
    }

    /// Writes the memtables of `cfs` to disk and waits: after it, every write made to
    /// those families before the call is durable, logged or not.
    pub(crate) fn flush(&self, cfs: &[Cf]) -> Result<()> {
        let handles: Vec<_> = cfs.iter().map(|&cf| self.handle(cf)).collect();
        let mut fo = rocksdb::FlushOptions::default();
        fo.set_wait(true);
        self.db.flush_cfs_opt(&handles, &fo)?;
        Ok(())
    }

    /// Every key of a family, in order. Values are not read (chunk data stays on disk).
    pub(crate) fn keys(&self, cf: Cf) -> impl Iterator<Item = Result<Box<[u8]>>> + '_ {
        self.db
            .iterator_cf(self.handle(cf), IteratorMode::Start)
            .map(|r| r.map(|(k, _)| k).map_err(Into::into))
    }

    /// Every key and value of a family, in order.
    pub(crate) fn entries(&self, cf: Cf) -> impl Iterator<Item = Result<KeyValue>> + '_ {
        self.db
            .iterator_cf(self.handle(cf), IteratorMode::Start)
            .map(|r| r.map_err(Into::into))
    }

    /// Compacts a family fully so deleted keys, and for blob-file families the values
    /// they pointed at, give their space back. Blob files are rewritten with their live
    /// values only (blob GC is enabled for this one compaction).
    pub(crate) fn reclaim(&self, cf: Cf) -> Result<()> {
        self.reclaim_oldest(cf, 1.0)
    }

    /// [`Db::reclaim`], with blob garbage collection limited to the oldest `share` of
    /// `chunks`' blob files (0.0 to 1.0): what eviction uses, since the least recently
    /// used chunks mostly live in old files, and rewriting every blob file of a large
    /// cache per pass would cost more than the space it gives back.
    pub(crate) fn reclaim_oldest(&self, cf: Cf, share: f64) -> Result<()> {
        let h = self.handle(cf);
        let blobs = cf == Cf::Chunks;
        if blobs {
            let cutoff = format!("{:.2}", share.clamp(0.0, 1.0));
            self.db.set_options_cf(
                h,
                &[
                    ("enable_blob_garbage_collection", "true"),
                    ("blob_garbage_collection_age_cutoff", cutoff.as_str()),
                ],
            )?;
        }
        let mut co = rocksdb::CompactOptions::default();
        co.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        self.db
            .compact_range_cf_opt(h, None::<&[u8]>, None::<&[u8]>, &co);
        if blobs {
            self.db
                .set_options_cf(h, &[("enable_blob_garbage_collection", "false")])?;
        }
        Ok(())
    }
}

/// A database with only the default column family: opaque keys and values, always
/// written through the write-ahead log. The backend of [`crate::kv::Kv`].
pub(crate) struct PlainDb {
    db: rocksdb::DB,
}

impl std::fmt::Debug for PlainDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainDb")
            .field("path", &self.db.path())
            .finish()
    }
}

/// Writes applied together by [`PlainDb::write_synced`].
#[derive(Default)]
pub(crate) struct PlainBatch {
    wb: WriteBatch,
}

impl std::fmt::Debug for PlainBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainBatch")
            .field("entries", &self.wb.len())
            .finish()
    }
}

impl PlainBatch {
    pub(crate) fn put(&mut self, key: &[u8], value: &[u8]) {
        self.wb.put(key, value);
    }

    pub(crate) fn delete(&mut self, key: &[u8]) {
        self.wb.delete(key);
    }

    pub(crate) fn len(&self) -> usize {
        self.wb.len()
    }
}

impl PlainDb {
    pub(crate) fn open(path: &Path) -> std::result::Result<PlainDb, rocksdb::Error> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_log_level(rocksdb::LogLevel::Warn);
        opts.set_keep_log_file_num(2);
        opts.set_compression_type(DBCompressionType::Lz4);
        let db = rocksdb::DB::open(&opts, path)?;
        Ok(PlainDb { db })
    }

    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(key)?)
    }

    /// Every key starting with `prefix` and its value, in key order.
    pub(crate) fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(prefix.to_vec());
        if let Some(upper) = prefix_end(prefix) {
            ro.set_iterate_upper_bound(upper);
        }
        let mut it = self.db.raw_iterator_opt(ro);
        it.seek_to_first();
        let mut out = Vec::new();
        while it.valid() {
            if let (Some(k), Some(v)) = (it.key(), it.value()) {
                out.push((k.into(), v.into()));
            }
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Applies `batch` atomically and fsyncs the write-ahead log before returning.
    pub(crate) fn write_synced(&self, batch: PlainBatch) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch.wb, &wo)?;
        Ok(())
    }
}

/// The smallest key greater than every key starting with `prefix`, or `None` when no
/// such key exists (an empty prefix or one of only 0xff bytes).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}
