//! castore: Tidedge's content-addressed store.
//!
//! File bytes are cut into chunks with FastCDC v2020, named by SHA-256, compressed with
//! zstd and kept once in RocksDB, whoever wrote them. Directories are canonical trees
//! named by their digest (identical subtrees are stored once); layers, images and
//! `name:tag` references sit on top. Every read re-hashes what it returns; GC and fsck
//! walk the same graph.
//!
//! castore owns chunking, digests, compression, the RocksDB store, the object model,
//! import, export, block volumes (block maps of chunks, versioned so snapshots and clones
//! are O(1)), GC, fsck, stats, and the inventory of layers (bytes present) and images
//! a host reports, cached until the store changes. It knows nothing of FUSE, NBD,
//! volumes' lifecycle (attachments, access enforcement) or scheduling: those crates build
//! on it, and a test checks that it pulls none of them in. RocksDB is named only in the private `db` module.

mod cache;
mod chunker;
mod chunklog;
mod codec;
mod db;
mod digest;
mod error;
mod export;
mod fsck;
mod gc;
mod ingest;
mod inventory;
pub mod kv;
pub mod merge;
mod model;
mod read;
mod refname;
mod stats;
mod store;
mod tarfmt;
mod tier;
mod views;
mod volume;

pub mod testing;

pub use cache::EvictReport;
pub use chunker::{AVG_SIZE, MAX_SIZE, MIN_SIZE};
pub use chunklog::{ALIGN as CHUNK_LOG_ALIGN, ChunkFiles, DiskFiles, SEGMENT_BYTES};
pub use digest::{Digest, Hasher};
pub use error::{Error, ObjectKind, Result, ResultExt};
pub use export::{ExportReport, ExportTarget};
pub use fsck::{FsckReport, Problem};
pub use gc::{GcProgress, GcReport, GcRoots};
pub use ingest::{
    ConfigOverride, ImportOptions, ImportReport, OPAQUE, OpenBlob, Progress, RemoteImage,
    RemoteImportReport, RemoteLayer, SourceFormat, WHITEOUT_PREFIX, host_arch,
};
pub use inventory::{ImageInventory, Inventory, LayerPresence};
pub use kv::{Kv, KvBatch};
pub use model::{
    Blob, Entry, FileData, INLINE_MAX, Image, ImageConfig, Kind, Layer, Segment, Timespec, Tree,
};
pub use read::{ChunkCache, DEFAULT_CHUNK_CACHE_BYTES, FileLayout, Prefetcher};
pub use refname::validate as validate_ref;
pub use stats::{DataStats, Stats, TierStats};
pub use store::Store;
pub use tier::{
    DirTier, FetchCounters, PUSHED_PREFIX, Tier, TierError, TierProgress, TierReport,
    VolumeTierReport, object_key,
};
pub use views::{ImageDetail, ImageSummary, LayerSummary};
pub use volume::{
    AccessMode, BLOCK_STATUS_MAX_EXTENTS, BlockStatus, DEFAULT_EXTENT_SIZE, DEFAULT_JOURNAL_BUDGET,
    MAX_EXTENT_SIZE, MIN_EXTENT_SIZE, SECTOR_SIZE, SnapshotInfo, Volume, VolumeError, VolumeInfo,
    VolumeOrigin, VolumeSpec, VolumeSummary, parse_size, validate_volume_name,
};
