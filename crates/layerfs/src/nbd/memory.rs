//! A sparse in-memory [`BlockDevice`]: 4 KiB pages allocated on first write, dropped by
//! trim. For tests (it is the backend the NBD suite serves) and as the reference for
//! what a device must do.

use std::collections::HashMap;
use std::sync::RwLock;

use super::{BlockDevice, BlockSizes, DeviceError, Extent, ZeroFlags};

const PAGE: u64 = 4096;

/// A sparse in-memory block device. One lock orders every operation, so it is
/// coherent across connections and can honestly claim `CAN_MULTI_CONN`.
#[derive(Debug)]
pub struct MemoryDevice {
    size: u64,
    read_only: bool,
    min_block: u32,
    pages: RwLock<HashMap<u64, Box<[u8]>>>,
}

impl MemoryDevice {
    /// An all-zero device of `size` bytes.
    pub fn new(size: u64) -> Self {
        MemoryDevice {
            size,
            read_only: false,
            min_block: 1,
            pages: RwLock::new(HashMap::new()),
        }
    }

    /// The same, refusing writes.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// The same, requiring every request to be aligned to `min` (a power of two).
    pub fn min_block(mut self, min: u32) -> Self {
        self.min_block = min;
        self
    }

    /// Writes `data` at `offset` directly (to prepare content), even if read-only.
    pub fn fill(&self, offset: u64, data: &[u8]) {
        self.put(offset, data);
    }

    /// Bytes of pages allocated.
    pub fn allocated(&self) -> u64 {
        self.pages.read().unwrap_or_else(|e| e.into_inner()).len() as u64 * PAGE
    }

    /// Copies `buf.len()` bytes at `offset` out of `pages` (absent pages are zeros).
    fn copy_out(pages: &HashMap<u64, Box<[u8]>>, offset: u64, buf: &mut [u8]) {
        Self::for_pages(offset, buf.len() as u64, |page, at, n, pos| {
            match pages.get(&page) {
                Some(p) => buf[pos..pos + n].copy_from_slice(&p[at..at + n]),
                None => buf[pos..pos + n].fill(0),
            }
        });
    }

    /// Calls `f` for each run of `(offset, len)` within a page: the page number, the offset
    /// in it, and the position in the caller's buffer.
    fn for_pages(offset: u64, len: u64, mut f: impl FnMut(u64, usize, usize, usize)) {
        let mut pos = 0u64;
        while pos < len {
            let at = offset + pos;
            let in_page = (at % PAGE) as usize;
            let n = (PAGE - at % PAGE).min(len - pos) as usize;
            f(at / PAGE, in_page, n, pos as usize);
            pos += n as u64;
        }
    }

    fn put(&self, offset: u64, data: &[u8]) {
        let mut pages = self.pages.write().unwrap_or_else(|e| e.into_inner());
        Self::for_pages(offset, data.len() as u64, |page, at, n, pos| {
            let p = pages
                .entry(page)
                .or_insert_with(|| vec![0; PAGE as usize].into_boxed_slice());
            p[at..at + n].copy_from_slice(&data[pos..pos + n]);
        });
    }

    fn zero(&self, offset: u64, len: u64, keep: bool) {
        let mut pages = self.pages.write().unwrap_or_else(|e| e.into_inner());
        Self::for_pages(offset, len, |page, at, n, _| {
            if n as u64 == PAGE && !keep {
                pages.remove(&page);
            } else if let Some(p) = pages.get_mut(&page) {
                p[at..at + n].fill(0);
            } else if keep {
                pages.insert(page, vec![0; PAGE as usize].into_boxed_slice());
            }
        });
    }
}

impl BlockDevice for MemoryDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            min: self.min_block,
            preferred: (PAGE as u32).max(self.min_block),
            ..BlockSizes::default()
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let pages = self.pages.read().unwrap_or_else(|e| e.into_inner());
        Self::copy_out(&pages, offset, buf);
        Ok(())
    }

    /// Everything is in memory: answered unless a writer holds the pages.
    fn read_in_memory(&self, offset: u64, buf: &mut [u8]) -> Option<Result<(), DeviceError>> {
        let pages = self.pages.try_read().ok()?;
        Self::copy_out(&pages, offset, buf);
        Some(Ok(()))
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        self.put(offset, data);
        Ok(())
    }

    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        self.zero(offset, len, false);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        self.zero(offset, len, flags.no_hole);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        let pages = self.pages.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Extent> = Vec::new();
        Self::for_pages(offset, len, |page, _, n, _| {
            let hole = !pages.contains_key(&page);
            match out.last_mut() {
                Some(last) if last.hole == hole => last.len += n as u64,
                _ => out.push(Extent {
                    len: n as u64,
                    hole,
                    zero: hole,
                }),
            }
        });
        Ok(out)
    }
}
