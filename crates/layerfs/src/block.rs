//! The block device model every transport serves: [`BlockDevice`] and its request
//! flags, extents, block sizes and typed errors. The NBD server (`crate::nbd`) is one
//! transport over it; the EROFS layer images (`crate::erofs`) and volumed's volumes are
//! devices. Each transport maps [`DeviceError`] to its own wire codes in one place.

/// A block device, whatever transport serves it (NBD today; vhost-user-blk next).
///
/// All methods may be called concurrently from several requests and several
/// connections (the server pipelines), and are called on blocking threads, so they may
/// block. The server checks every request against [`BlockDevice::size`], the block
/// sizes and [`BlockDevice::read_only`] before calling: offsets and lengths passed in are
/// always within the device, `len` is never 0, and a read-only device is never asked
/// to write, trim or zero.
pub trait BlockDevice: Send + Sync {
    /// The size in bytes. It must not change while a connection uses the device (a
    /// resize is seen by new connections).
    fn size(&self) -> u64;

    /// Whether writes are refused (the client is told so, and writes get `EPERM`).
    fn read_only(&self) -> bool {
        false
    }

    /// True only when the device guarantees what NBD's `CAN_MULTI_CONN` promises: a
    /// write acknowledged on one connection is seen by reads on every other connection
    /// of the same device, and a flush on any connection makes every write acknowledged
    /// before it (on any connection) durable.
    fn can_multi_conn(&self) -> bool {
        false
    }

    /// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`. The server refuses
    /// requests not aligned to `min` (`EINVAL`) and data requests longer than `max`.
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes::default()
    }

    /// Whether [`BlockDevice::trim`] does anything worth advertising.
    fn can_trim(&self) -> bool {
        true
    }

    /// Whether [`BlockDevice::write_zeroes`] can ever honour `fast`; if not, clients are
    /// not told `SEND_FAST_ZERO`.
    fn can_fast_zero(&self) -> bool {
        true
    }

    /// Fills `buf` with the bytes at `offset`. Unwritten or trimmed ranges read as zeroes.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError>;

    /// Fills `buf` as [`BlockDevice::read`] does, but only if that can be done from
    /// memory at once, without I/O and without waiting for a lock held for long;
    /// otherwise returns None having done nothing. Called on the connection's async
    /// task (not a blocking thread) for small reads, to save a thread hand-off when the
    /// data is cached. The default never answers.
    fn read_in_memory(&self, offset: u64, buf: &mut [u8]) -> Option<Result<(), DeviceError>> {
        let _ = (offset, buf);
        None
    }

    /// Whether a write of `len` bytes at `offset` without FUA returns without waiting
    /// for I/O (a memory update and an unsynced log append), so a transport may serve it
    /// on the connection's own task rather than hand it to a blocking thread. The
    /// default says yes.
    fn write_is_quick(&self, offset: u64, len: u32) -> bool {
        let _ = (offset, len);
        true
    }

    /// Writes `data` at `offset`. When `fua` is set the data must be durable (as after
    /// [`BlockDevice::flush`]) before this returns; otherwise it must be durable after
    /// the next successful flush.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError>;

    /// Makes every write that returned before this call durable.
    fn flush(&self) -> Result<(), DeviceError>;

    /// The client no longer needs `offset..offset + len`: its content becomes
    /// unspecified (a device may keep it, or deallocate it so it reads as zeroes).
    /// `fua` as for [`BlockDevice::write`].
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError>;

    /// Makes `offset..offset + len` read as zeroes. `no_hole`: the range must stay
    /// allocated (no deallocation). `fast`: succeed only if this is faster than writing
    /// zeroes; otherwise return [`DeviceError::NotFast`] without changing anything.
    /// `fua` as for [`BlockDevice::write`].
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), DeviceError>;

    /// Describes allocation from `offset` onwards: a non-empty list of consecutive
    /// extents starting at `offset`, covering at least one byte and at most `len` bytes
    /// (it may stop early). `Extent::zero` may be claimed only for ranges that read as
    /// zeroes.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError>;

    /// A hint that `offset..offset + len` will be read soon. May do nothing.
    fn cache(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let _ = (offset, len);
        Ok(())
    }
}

/// Flags of [`BlockDevice::write_zeroes`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Keep the range allocated.
    pub no_hole: bool,
    /// Fail with [`DeviceError::NotFast`] rather than fall back to a slow write.
    pub fast: bool,
    /// Durable before returning.
    pub fua: bool,
}

/// One extent of [`BlockDevice::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (not 0).
    pub len: u64,
    /// Not allocated.
    pub hole: bool,
    /// Reads as zeroes.
    pub zero: bool,
}

/// Block size constraints (`NBD_INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Every offset and length must be a multiple of this (a power of two, 1..=65536).
    pub min: u32,
    /// The size the device prefers (a power of two, at least `min`).
    pub preferred: u32,
    /// The largest read or write payload accepted (a multiple of `min`).
    pub max: u32,
}

impl Default for BlockSizes {
    fn default() -> Self {
        BlockSizes {
            min: 1,
            preferred: 4096,
            max: 32 << 20,
        }
    }
}

/// Why a device operation failed. Mapped to an NBD error value by the server alone.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device refuses writes (`EPERM`).
    #[error("read-only")]
    ReadOnly,
    /// No space left for the data (`ENOSPC`).
    #[error("no space left")]
    NoSpace,
    /// A fast zero was asked for and zeroing would not be fast (`ENOTSUP`).
    #[error("zeroing this range would not be fast")]
    NotFast,
    /// The request is not valid for this device (`EINVAL`).
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// Anything else, with its cause (`EIO`, or the matching value for an OS error).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The backend failed with an error of its own (`EIO`).
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
}
