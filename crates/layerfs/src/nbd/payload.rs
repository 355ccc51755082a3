//! Write payloads in buffers aligned to [`ALIGN`], so that a device may hand a write's
//! bytes to `O_DIRECT` I/O as they are (volumed's chunk log does) instead of copying them
//! into an aligned buffer first; and recycled per connection ([`Pool`]), because a fresh
//! megabyte-sized allocation per request is a fresh mapping whose every page faults and
//! is zeroed (a sixth of a sequential 1 MiB write's CPU, measured) and then unmapped.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// Alignment of every payload's address.
pub(super) const ALIGN: usize = 4096;

/// Buffers of one connection not in use, by size class (powers of two from [`ALIGN`]).
#[derive(Debug)]
pub(super) struct Pool {
    free: Mutex<Free>,
    /// At most this many bytes are kept.
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct Free {
    bytes: usize,
    classes: Vec<Vec<Buf>>,
}

/// An allocation of `cap` bytes (a power of two, at least [`ALIGN`]), aligned to [`ALIGN`].
#[derive(Debug)]
struct Buf {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: a Buf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for Buf {}

impl Buf {
    fn new(cap: usize) -> Buf {
        let layout = Self::layout(cap);
        // SAFETY: the layout's size is not zero (cap >= ALIGN).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Buf { ptr, cap }
    }

    fn layout(cap: usize) -> Layout {
        Layout::from_size_align(cap, ALIGN).expect("payload sizes are bounded")
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: allocated by `Buf::new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) };
    }
}

impl Pool {
    /// A pool keeping up to `max_bytes` of idle buffers.
    pub(super) fn new(max_bytes: usize) -> Arc<Pool> {
        Arc::new(Pool {
            free: Mutex::new(Free::default()),
            max_bytes,
        })
    }

    fn class(cap: usize) -> usize {
        (cap.trailing_zeros() - ALIGN.trailing_zeros()) as usize
    }

    /// A payload of `len` bytes (their content is unspecified: the caller fills them).
    pub(super) fn take(self: &Arc<Pool>, len: usize) -> Payload {
        if len == 0 {
            return Payload::empty();
        }
        let cap = len.next_power_of_two().max(ALIGN);
        let reused = {
            let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let b = f.classes.get_mut(Self::class(cap)).and_then(Vec::pop);
            if b.is_some() {
                f.bytes -= cap;
            }
            b
        };
        Payload {
            buf: Some(reused.unwrap_or_else(|| Buf::new(cap))),
            len,
            pool: Some(self.clone()),
        }
    }

    fn give_back(&self, b: Buf) {
        let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if f.bytes + b.cap > self.max_bytes {
            return;
        }
        let class = Self::class(b.cap);
        if f.classes.len() <= class {
            f.classes.resize_with(class + 1, Vec::new);
        }
        f.bytes += b.cap;
        f.classes[class].push(b);
    }
}

/// A byte buffer whose address is a multiple of [`ALIGN`]; back to its pool on drop.
#[derive(Debug)]
pub(super) struct Payload {
    buf: Option<Buf>,
    len: usize,
    pool: Option<Arc<Pool>>,
}

impl Payload {
    /// An empty payload (no allocation).
    pub(super) fn empty() -> Payload {
        Payload {
            buf: None,
            len: 0,
            pool: None,
        }
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.buf {
            // SAFETY: the buffer owns `cap >= len` initialised bytes (zeroed when
            // allocated, then only ever written), for as long as `self` lives.
            Some(b) => unsafe { std::slice::from_raw_parts(b.ptr.as_ptr(), self.len) },
            None => &[],
        }
    }
}

impl std::ops::DerefMut for Payload {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.buf {
            // SAFETY: as in `deref`, and `&mut self` makes the borrow exclusive.
            Some(b) => unsafe { std::slice::from_raw_parts_mut(b.ptr.as_ptr(), self.len) },
            None => &mut [],
        }
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        if let (Some(b), Some(pool)) = (self.buf.take(), &self.pool) {
            pool.give_back(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_aligned_writable_and_recycled() {
        let pool = Pool::new(8 << 20);
        for len in [1, 512, 4096, 65536 + 512, 1 << 20] {
            let mut p = pool.take(len);
            assert_eq!(p.len(), len);
            assert_eq!(p.as_ptr() as usize % ALIGN, 0);
            p[len - 1] = 7;
            assert_eq!(p[len - 1], 7);
        }
        assert!(pool.take(0).is_empty());
        // A buffer of the same class comes back instead of a new one.
        let first = pool.take(1 << 20).as_ptr() as usize;
        let again = pool.take((1 << 20) - 4096);
        assert_eq!(again.as_ptr() as usize, first);
        // Past the pool's limit, buffers are freed rather than kept.
        let big: Vec<Payload> = (0..3).map(|_| pool.take(4 << 20)).collect();
        drop(big);
        assert!(pool.free.lock().unwrap().bytes <= 8 << 20);
    }
}
