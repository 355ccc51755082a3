//! One virtio-blk request: its descriptor chain checked against guest memory and
//! split into header, data and status ([`parse`]), then carried out on a
//! [`BlockDevice`] ([`execute`]). Everything here comes from the guest and is untrusted:
//! a chain that points outside guest memory, lacks a header or a status byte, or asks
//! for more than [`MAX_DATA`] is refused before anything is read or allocated, and a
//! request outside the device fails with `VIRTIO_BLK_S_IOERR` without touching it.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::block::{BlockDevice, DeviceError, ZeroFlags};

/// virtio-blk's sector: offsets and lengths in requests are counted in these.
pub(crate) const SECTOR: u64 = 512;
/// The most data one request may carry (read or write). Linux sends at most
/// `max_sectors_kb` (1280 KiB by default) per request; this leaves room for a guest that
/// raises it without letting one request make the daemon allocate without bound.
pub(crate) const MAX_DATA: u64 = 32 << 20;
/// The most ranges one discard or write-zeroes request may carry (advertised as
/// `max_discard_seg` and `max_write_zeroes_seg`).
pub(crate) const MAX_RANGES: u32 = 64;
/// Length of the `virtio_blk_outhdr` (type, ioprio, sector) every request starts with.
const HEADER: usize = 16;
/// Length of one `virtio_blk_discard_write_zeroes` range.
const RANGE: usize = 16;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`: the range may be deallocated.
const FLAG_UNMAP: u32 = 1;
/// The device id is at most this long (`VIRTIO_BLK_ID_BYTES`).
pub(crate) const ID_BYTES: usize = 20;

/// A guest-memory range of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub(crate) addr: GuestAddress,
    pub(crate) len: u32,
}

/// A request whose chain is sound: its header, its data ranges and where its status goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    /// `VIRTIO_BLK_T_*`.
    pub(crate) kind: u32,
    /// The header's sector.
    pub(crate) sector: u64,
    /// Device-readable bytes after the header (an OUT's data, discard ranges).
    pub(crate) readable: Vec<Segment>,
    /// Device-writable bytes before the status byte (an IN's buffer, GET_ID's).
    pub(crate) writable: Vec<Segment>,
    /// The status byte.
    pub(crate) status: GuestAddress,
}

/// Why a chain was refused outright.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadChain {
    #[error("a descriptor points outside guest memory ({len} bytes at {addr:#x})")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("no device-writable status byte")]
    NoStatus,
    #[error("the header is {0} bytes, not 16")]
    ShortHeader(usize),
    #[error("the request carries more than {MAX_DATA} bytes")]
    TooLong,
}

/// What a request came to: the status written and the bytes written into guest memory
/// (the used-ring length, status byte included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Done {
    pub(crate) status: u8,
    pub(crate) written: u32,
}

/// A request's kind, for messages.
pub(crate) fn kind_name(kind: u32) -> &'static str {
    match kind {
        VIRTIO_BLK_T_IN => "read",
        VIRTIO_BLK_T_OUT => "write",
        VIRTIO_BLK_T_FLUSH => "flush",
        VIRTIO_BLK_T_GET_ID => "get-id",
        VIRTIO_BLK_T_DISCARD => "discard",
        VIRTIO_BLK_T_WRITE_ZEROES => "write-zeroes",
        _ => "unknown",
    }
}

/// Splits the chain `descs` (address, length, device-writable) into a [`Request`],
/// checking every range against `mem` first.
pub(crate) fn parse<M: GuestMemory>(
    mem: &M,
    descs: impl IntoIterator<Item = (GuestAddress, u32, bool)>,
) -> Result<Request, BadChain> {
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut total = 0u64;
    for (addr, len, write) in descs {
        if len == 0 {
            continue;
        }
        // What the device does with the range: a device-writable one is written to.
        let access = if write {
            Permissions::ReadWrite
        } else {
            Permissions::Read
        };
        if !mem.check_range(addr, len as usize, access) {
            return Err(BadChain::OutsideMemory { addr: addr.0, len });
        }
        total += u64::from(len);
        if total > MAX_DATA + (HEADER + 1) as u64 + u64::from(MAX_RANGES) * RANGE as u64 {
            return Err(BadChain::TooLong);
        }
        let seg = Segment { addr, len };
        if write {
            writable.push(seg)
        } else {
            readable.push(seg)
        }
    }
    // The status is the last device-writable byte.
    let last = writable.last_mut().ok_or(BadChain::NoStatus)?;
    let status = GuestAddress(last.addr.0 + u64::from(last.len) - 1);
    last.len -= 1;
    if last.len == 0 {
        writable.pop();
    }
    // The header is the first 16 device-readable bytes, wherever the driver split them.
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        let Some(seg) = readable.first_mut() else {
            return Err(BadChain::ShortHeader(got));
        };
        let n = (seg.len as usize).min(HEADER - got);
        mem.read_slice(&mut header[got..got + n], seg.addr)
            .map_err(|_| BadChain::OutsideMemory {
                addr: seg.addr.0,
                len: seg.len,
            })?;
        got += n;
        seg.addr = GuestAddress(seg.addr.0 + n as u64);
        seg.len -= n as u32;
        if seg.len == 0 {
            readable.remove(0);
        }
    }
    let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    Ok(Request {
        kind,
        sector,
        readable,
        writable,
        status,
    })
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// The byte range `sector * 512 .. + len` if it lies inside a device of `size` bytes.
fn range(sector: u64, len: u64, size: u64) -> Result<u64, DeviceError> {
    let offset = sector
        .checked_mul(SECTOR)
        .ok_or(DeviceError::Invalid("sector out of range"))?;
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(offset),
        _ => Err(DeviceError::Invalid("request past the end of the device")),
    }
}

/// How a request is carried out, beyond the device.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Exec<'a> {
    /// The device id GET_ID answers.
    pub(crate) id: &'a [u8],
    /// The device refuses writes (advertised as `VIRTIO_BLK_F_RO`).
    pub(crate) read_only: bool,
    /// The guest turned the write cache off (`writeback` = 0): every write is FUA.
    pub(crate) write_through: bool,
    /// Answer a read only if the device can from memory (see
    /// [`BlockDevice::read_in_memory`]); None when it cannot.
    pub(crate) memory_only: bool,
}

/// Whether `req` can be carried out without waiting for I/O (and so on the queue's own
/// thread): a small read the device may answer from memory is tried separately.
pub(crate) fn is_quick(req: &Request, device: &dyn BlockDevice, ex: &Exec<'_>) -> bool {
    match req.kind {
        VIRTIO_BLK_T_GET_ID => true,
        VIRTIO_BLK_T_OUT => {
            let len = total(&req.readable);
            !ex.write_through
                && len <= u64::from(u32::MAX)
                && device.write_is_quick(req.sector.saturating_mul(SECTOR), len as u32)
        }
        k => !matches!(
            k,
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_FLUSH | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
        ),
    }
}

/// Carries out `req` on `device`, writes its status into guest memory, and says what
/// was written. With `ex.memory_only`, a read the device cannot answer from memory at
/// once returns None having written nothing. A device error is reported through
/// `failed` (command, offset, length, error) when it is the device's fault rather than
/// the guest's.
pub(crate) fn execute<M: GuestMemory>(
    mem: &M,
    device: &dyn BlockDevice,
    req: &Request,
    ex: &Exec<'_>,
    failed: &mut dyn FnMut(&'static str, u64, u64, &DeviceError),
) -> Option<Done> {
    let mut written = 0u32;
    let status = match run(mem, device, req, ex, &mut written) {
        Some(Ok(())) => VIRTIO_BLK_S_OK,
        Some(Err(Outcome::Unsupported)) => VIRTIO_BLK_S_UNSUPP,
        Some(Err(Outcome::Device(e))) => {
            if !matches!(e, DeviceError::Invalid(_) | DeviceError::ReadOnly) {
                let len = total(&req.readable).max(total(&req.writable));
                failed(
                    kind_name(req.kind),
                    req.sector.saturating_mul(SECTOR),
                    len,
                    &e,
                );
            }
            written = 0;
            VIRTIO_BLK_S_IOERR
        }
        Some(Err(Outcome::Guest)) => {
            written = 0;
            VIRTIO_BLK_S_IOERR
        }
        None => return None,
    } as u8;
    // The status byte was checked to be in guest memory by `parse`.
    let _ = mem.write_obj(status, req.status);
    Some(Done {
        status,
        written: written + 1,
    })
}

enum Outcome {
    Unsupported,
    Device(DeviceError),
    /// Guest memory refused a copy (it was checked, so only a changed memory map).
    Guest,
}

impl From<DeviceError> for Outcome {
    fn from(e: DeviceError) -> Self {
        Outcome::Device(e)
    }
}

fn run<M: GuestMemory>(
    mem: &M,
    device: &dyn BlockDevice,
    req: &Request,
    ex: &Exec<'_>,
    written: &mut u32,
) -> Option<Result<(), Outcome>> {
    let size = device.size();
    let r = match req.kind {
        VIRTIO_BLK_T_IN => {
            let len = total(&req.writable);
            let offset = match check_data(req.sector, len, size) {
                Ok(o) => o,
                Err(e) => return Some(Err(e.into())),
            };
            let mut buf = vec![0u8; len as usize];
            if ex.memory_only {
                match device.read_in_memory(offset, &mut buf)? {
                    Ok(()) => {}
                    Err(e) => return Some(Err(e.into())),
                }
            } else if let Err(e) = device.read(offset, &mut buf) {
                return Some(Err(e.into()));
            }
            scatter(mem, &req.writable, &buf).map(|()| *written = len as u32)
        }
        VIRTIO_BLK_T_OUT => (|| {
            if ex.read_only {
                return Err(DeviceError::ReadOnly.into());
            }
            let len = total(&req.readable);
            let offset = check_data(req.sector, len, size)?;
            let buf = gather(mem, &req.readable, len)?;
            device.write(offset, &buf, ex.write_through)?;
            Ok(())
        })(),
        VIRTIO_BLK_T_FLUSH => device.flush().map_err(Outcome::from),
        VIRTIO_BLK_T_GET_ID => {
            let room = total(&req.writable).min(ID_BYTES as u64) as usize;
            let mut id = [0u8; ID_BYTES];
            let n = ex.id.len().min(ID_BYTES);
            id[..n].copy_from_slice(&ex.id[..n]);
            scatter(mem, &req.writable, &id[..room]).map(|()| *written = room as u32)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => ranges(mem, device, req, ex, size),
        _ => Err(Outcome::Unsupported),
    };
    Some(r)
}

/// Data requests: a whole number of sectors, inside the device.
fn check_data(sector: u64, len: u64, size: u64) -> Result<u64, DeviceError> {
    if !len.is_multiple_of(SECTOR) {
        return Err(DeviceError::Invalid("length not a multiple of 512"));
    }
    range(sector, len, size)
}

fn ranges<M: GuestMemory>(
    mem: &M,
    device: &dyn BlockDevice,
    req: &Request,
    ex: &Exec<'_>,
    size: u64,
) -> Result<(), Outcome> {
    if ex.read_only {
        return Err(DeviceError::ReadOnly.into());
    }
    let len = total(&req.readable);
    if len == 0 || !len.is_multiple_of(RANGE as u64) || len / RANGE as u64 > u64::from(MAX_RANGES) {
        return Err(DeviceError::Invalid("bad discard/write-zeroes ranges").into());
    }
    let buf = gather(mem, &req.readable, len)?;
    // Check every range before changing anything.
    let mut todo = Vec::new();
    for r in buf.chunks_exact(RANGE) {
        let sector = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
        let sectors = u32::from_le_bytes(r[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(r[12..16].try_into().expect("4 bytes"));
        let bytes = u64::from(sectors) * SECTOR;
        let offset = range(sector, bytes, size)?;
        let allowed = if req.kind == VIRTIO_BLK_T_WRITE_ZEROES {
            FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return Err(Outcome::Unsupported);
        }
        todo.push((offset, bytes, flags & FLAG_UNMAP != 0));
    }
    for (offset, bytes, unmap) in todo {
        if bytes == 0 {
            continue;
        }
        if req.kind == VIRTIO_BLK_T_DISCARD {
            device.trim(offset, bytes, ex.write_through)?;
        } else {
            let flags = ZeroFlags {
                no_hole: !unmap,
                fast: false,
                fua: ex.write_through,
            };
            device.write_zeroes(offset, bytes, flags)?;
        }
    }
    Ok(())
}

fn scatter<M: GuestMemory>(mem: &M, segs: &[Segment], mut data: &[u8]) -> Result<(), Outcome> {
    for s in segs {
        if data.is_empty() {
            break;
        }
        let n = (s.len as usize).min(data.len());
        mem.write_slice(&data[..n], s.addr)
            .map_err(|_| Outcome::Guest)?;
        data = &data[n..];
    }
    Ok(())
}

fn gather<M: GuestMemory>(mem: &M, segs: &[Segment], len: u64) -> Result<Vec<u8>, Outcome> {
    let mut buf = vec![0u8; len as usize];
    let mut at = 0;
    for s in segs {
        let n = s.len as usize;
        mem.read_slice(&mut buf[at..at + n], s.addr)
            .map_err(|_| Outcome::Guest)?;
        at += n;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::MemoryDevice;
    use vm_memory::GuestMemoryMmap;

    const BASE: u64 = 0x10000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(BASE), 1 << 20)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn ex() -> Exec<'static> {
        Exec {
            id: b"layer0",
            read_only: false,
            write_through: false,
            memory_only: false,
        }
    }

    fn none(_: &'static str, _: u64, _: u64, _: &DeviceError) {}

    /// A chain of header (16 bytes at BASE), data at BASE+0x1000, status at BASE+0x100.
    fn chain(data_len: u32, data_write: bool) -> Vec<(GuestAddress, u32, bool)> {
        vec![
            (GuestAddress(BASE), 16, false),
            (GuestAddress(BASE + 0x1000), data_len, data_write),
            (GuestAddress(BASE + 0x100), 1, true),
        ]
    }

    #[test]
    fn write_then_read_round_trips_through_guest_memory() {
        let m = mem();
        let dev = MemoryDevice::new(1 << 20);
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        m.write_slice(&pattern, GuestAddress(BASE + 0x1000))
            .unwrap();
        header(&m, BASE, VIRTIO_BLK_T_OUT, 8);
        let req = parse(&m, chain(4096, false)).unwrap();
        let done = execute(&m, &dev, &req, &ex(), &mut none).unwrap();
        assert_eq!(
            done,
            Done {
                status: 0,
                written: 1
            }
        );
        let mut back = vec![0u8; 4096];
        dev.read(8 * 512, &mut back).unwrap();
        assert_eq!(back, pattern);

        m.write_slice(&[0u8; 4096], GuestAddress(BASE + 0x1000))
            .unwrap();
        header(&m, BASE, VIRTIO_BLK_T_IN, 8);
        let req = parse(&m, chain(4096, true)).unwrap();
        let done = execute(&m, &dev, &req, &ex(), &mut none).unwrap();
        assert_eq!(
            done,
            Done {
                status: 0,
                written: 4097
            }
        );
        let mut got = vec![0u8; 4096];
        m.read_slice(&mut got, GuestAddress(BASE + 0x1000)).unwrap();
        assert_eq!(got, pattern);
    }

    #[test]
    fn a_header_split_over_descriptors_is_read_whole() {
        let m = mem();
        let dev = MemoryDevice::new(1 << 20);
        dev.write(512, &[9u8; 512], false).unwrap();
        header(&m, BASE, VIRTIO_BLK_T_IN, 1);
        // 5 + 11 header bytes, then data and status in one writable descriptor.
        let descs = vec![
            (GuestAddress(BASE), 5, false),
            (GuestAddress(BASE + 5), 11, false),
            (GuestAddress(BASE + 0x1000), 513, true),
        ];
        let req = parse(&m, descs).unwrap();
        assert_eq!((req.kind, req.sector), (VIRTIO_BLK_T_IN, 1));
        assert_eq!(req.status, GuestAddress(BASE + 0x1000 + 512));
        let done = execute(&m, &dev, &req, &ex(), &mut none).unwrap();
        assert_eq!(done.status, 0);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(BASE + 0x1000 + 511)).unwrap(),
            9
        );
    }

    #[test]
    fn chains_outside_memory_or_without_status_are_refused() {
        let m = mem();
        let outside = vec![
            (GuestAddress(BASE), 16, false),
            (GuestAddress(BASE + (1 << 20) - 100), 4096, true),
        ];
        assert!(matches!(
            parse(&m, outside),
            Err(BadChain::OutsideMemory { .. })
        ));
        let below = vec![(GuestAddress(0), 16, false), (GuestAddress(BASE), 1, true)];
        assert!(matches!(
            parse(&m, below),
            Err(BadChain::OutsideMemory { .. })
        ));
        let no_status = vec![(GuestAddress(BASE), 16, false)];
        assert_eq!(parse(&m, no_status), Err(BadChain::NoStatus));
        let short = vec![
            (GuestAddress(BASE), 8, false),
            (GuestAddress(BASE + 0x100), 1, true),
        ];
        assert_eq!(parse(&m, short), Err(BadChain::ShortHeader(8)));
        let huge: Vec<_> = (0..40)
            .map(|_| (GuestAddress(BASE), 1 << 20, true))
            .collect();
        assert_eq!(parse(&m, huge), Err(BadChain::TooLong));
    }

    #[test]
    fn requests_past_the_end_fail_without_touching_the_device() {
        let m = mem();
        let dev = MemoryDevice::new(8192);
        m.write_slice(&[0xAA; 4096], GuestAddress(BASE + 0x1000))
            .unwrap();
        for sector in [15, 16, u64::MAX / 256] {
            header(&m, BASE, VIRTIO_BLK_T_OUT, sector);
            let req = parse(&m, chain(4096, false)).unwrap();
            let done = execute(&m, &dev, &req, &ex(), &mut none).unwrap();
            assert_eq!(done.status, VIRTIO_BLK_S_IOERR as u8, "sector {sector}");
        }
        let mut back = vec![1u8; 8192];
        dev.read(0, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        // Not a whole number of sectors.
        header(&m, BASE, VIRTIO_BLK_T_IN, 0);
        let req = parse(&m, chain(100, true)).unwrap();
        let done = execute(&m, &dev, &req, &ex(), &mut none).unwrap();
        assert_eq!(
            done,
            Done {
                status: VIRTIO_BLK_S_IOERR as u8,
                written: 1
            }
        );
    }

    #[test]
    fn read_only_refuses_writes_and_zeroing() {
        let m = mem();
        let dev = MemoryDevice::new(1 << 20);
        let ro = Exec {
            read_only: true,
            ..ex()
        };
        header(&m, BASE, VIRTIO_BLK_T_OUT, 0);
        let req = parse(&m, chain(512, false)).unwrap();
        let mut failures = 0;
        let done = execute(&m, &dev, &req, &ro, &mut |_, _, _, _| failures += 1).unwrap();
        assert_eq!(done.status, VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(failures, 0, "a guest's mistake is not a device failure");
        header(&m, BASE, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let req = parse(&m, chain(16, false)).unwrap();
        assert_eq!(execute(&m, &dev, &req, &ro, &mut none).unwrap().status, 1);
    }

    #[test]
    fn get_id_discard_write_zeroes_and_unknown_kinds() {
        let m = mem();
        let dev = MemoryDevice::new(1 << 20);
        header(&m, BASE, VIRTIO_BLK_T_GET_ID, 0);
        let req = parse(&m, chain(20, true)).unwrap();
        let done = execute(&m, &dev, &req, &ex(), &mut none).unwrap();
        assert_eq!(
            done,
            Done {
                status: 0,
                written: 21
            }
        );
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(BASE + 0x1000)).unwrap();
        assert_eq!(&id[..7], b"layer0\0");

        dev.write(0, &[5u8; 8192], false).unwrap();
        let mut range = [0u8; 16];
        range[0..8].copy_from_slice(&2u64.to_le_bytes());
        range[8..12].copy_from_slice(&4u32.to_le_bytes());
        range[12..16].copy_from_slice(&FLAG_UNMAP.to_le_bytes());
        m.write_slice(&range, GuestAddress(BASE + 0x1000)).unwrap();
        header(&m, BASE, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let req = parse(&m, chain(16, false)).unwrap();
        assert_eq!(execute(&m, &dev, &req, &ex(), &mut none).unwrap().status, 0);
        let mut back = vec![0u8; 8192];
        dev.read(0, &mut back).unwrap();
        assert!(back[..1024].iter().all(|&b| b == 5));
        assert!(back[1024..3072].iter().all(|&b| b == 0));
        assert!(back[3072..].iter().all(|&b| b == 5));
        // Discard takes no flags.
        header(&m, BASE, VIRTIO_BLK_T_DISCARD, 0);
        let req = parse(&m, chain(16, false)).unwrap();
        assert_eq!(
            execute(&m, &dev, &req, &ex(), &mut none).unwrap().status,
            VIRTIO_BLK_S_UNSUPP as u8
        );
        header(&m, BASE, 99, 0);
        let req = parse(&m, chain(512, true)).unwrap();
        assert_eq!(
            execute(&m, &dev, &req, &ex(), &mut none).unwrap().status,
            VIRTIO_BLK_S_UNSUPP as u8
        );
    }
}
