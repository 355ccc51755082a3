//! A tar reader and writer of our own (ustar, GNU long names and old-style sparse files,
//! PAX extended headers with `SCHILY.xattr.*`), so that every limit is ours: archives are
//! untrusted, and a header may not make us allocate more than a small fixed bound.

use std::io::{self, Read, Write};

use crate::model::Timespec;

const BLOCK: usize = 512;
/// Longest GNU long name or link we accept.
const MAX_LONG_NAME: u64 = 64 * 1024;
/// Largest PAX extended header we accept.
const MAX_PAX: u64 = 1 << 20;
/// Most sparse map entries in one file.
const MAX_SPARSE_ENTRIES: usize = 1 << 16;

/// What a tar entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TarKind {
    File,
    HardLink,
    Symlink,
    CharDev,
    BlockDev,
    Dir,
    Fifo,
}

/// One entry's header, after long names and PAX records are applied.
#[derive(Debug, Clone, Default)]
pub(crate) struct TarEntry {
    pub(crate) path: Vec<u8>,
    pub(crate) kind: Option<TarKind>,
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mtime: Timespec,
    pub(crate) link: Vec<u8>,
    pub(crate) dev_major: u32,
    pub(crate) dev_minor: u32,
    /// Bytes of data stored in the archive for this entry.
    pub(crate) data_size: u64,
    /// The file's length (differs from `data_size` for sparse entries).
    pub(crate) size: u64,
    /// For sparse entries: (offset, length) of each data region, in order.
    pub(crate) sparse: Option<Vec<(u64, u64)>>,
    pub(crate) xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Why an archive could not be read, with the byte offset of the header at fault.
#[derive(Debug)]
pub(crate) struct TarError {
    pub(crate) offset: u64,
    /// The entry's path when it was already known.
    pub(crate) entry: Option<Vec<u8>>,
    pub(crate) reason: String,
}

impl TarError {
    fn new(offset: u64, reason: impl Into<String>) -> TarError {
        TarError {
            offset,
            entry: None,
            reason: reason.into(),
        }
    }
}

/// Reads entries one by one; the caller reads or skips each entry's data before `next`.
#[derive(Debug)]
pub(crate) struct TarReader<R> {
    r: R,
    pos: u64,
    /// Data bytes of the current entry not yet consumed, then its padding.
    left: u64,
    pad: u64,
    global: Vec<(String, Vec<u8>)>,
    header_pos: u64,
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    // Base-256 (GNU): high bit of the first byte set.
    if let Some(&first) = field.first()
        && first & 0x80 != 0
    {
        if first == 0xff {
            return None; // negative numbers are never valid here
        }
        let mut v: u64 = u64::from(first & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let s: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ')
        .collect();
    if s.is_empty() {
        return Some(0);
    }
    let mut v: u64 = 0;
    for b in s {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

fn parse_pax(data: &[u8], offset: u64) -> Result<Vec<(String, Vec<u8>)>, TarError> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| TarError::new(offset, "malformed PAX record (no length)"))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| TarError::new(offset, "malformed PAX record length"))?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(TarError::new(offset, "PAX record length out of range"));
        }
        let rec = &rest[sp + 1..len - 1];
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| TarError::new(offset, "malformed PAX record (no '=')"))?;
        let key = String::from_utf8(rec[..eq].to_vec())
            .map_err(|_| TarError::new(offset, "PAX key is not UTF-8"))?;
        out.push((key, rec[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(out)
}

fn parse_pax_time(v: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let mut sec: i64 = int.parse().ok()?;
    let mut digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    while digits.len() < 9 {
        digits.push('0');
    }
    let mut nsec: u32 = digits.parse().ok()?;
    if neg {
        sec = -sec;
        if nsec > 0 {
            sec -= 1;
            nsec = 1_000_000_000 - nsec;
        }
    }
    Some(Timespec { sec, nsec })
}

impl<R: Read> TarReader<R> {
    pub(crate) fn new(r: R) -> TarReader<R> {
        TarReader {
            r,
            pos: 0,
            left: 0,
            pad: 0,
            global: Vec::new(),
            header_pos: 0,
        }
    }

    /// Bytes consumed so far.
    pub(crate) fn position(&self) -> u64 {
        self.pos
    }

    /// The underlying reader (e.g. to drain a decompressor after the end marker).
    pub(crate) fn into_inner(self) -> R {
        self.r
    }

    fn read_exact_at(&mut self, buf: &mut [u8]) -> Result<(), TarError> {
        let at = self.pos;
        self.r.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                TarError::new(at, "archive is truncated")
            } else {
                TarError::new(at, format!("read error: {e}"))
            }
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// Reads one 512-byte block; `Ok(None)` on a clean end of input.
    fn block(&mut self) -> Result<Option<[u8; BLOCK]>, TarError> {
        let mut b = [0u8; BLOCK];
        let mut got = 0;
        while got < BLOCK {
            match self.r.read(&mut b[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TarError::new(self.pos, format!("read error: {e}"))),
            }
        }
        self.pos += got as u64;
        match got {
            0 => Ok(None),
            BLOCK => Ok(Some(b)),
            _ => Err(TarError::new(self.pos - got as u64, "archive is truncated")),
        }
    }

    fn read_small(&mut self, size: u64, limit: u64, what: &str) -> Result<Vec<u8>, TarError> {
        if size > limit {
            return Err(TarError::new(
                self.header_pos,
                format!("{what} of {size} bytes exceeds the limit of {limit}"),
            ));
        }
        let mut v = vec![0u8; size as usize];
        self.read_exact_at(&mut v)?;
        let pad = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        let mut p = vec![0u8; pad as usize];
        self.read_exact_at(&mut p)?;
        Ok(v)
    }

    /// A reader over the current entry's data; fails (never returns short) if the archive
    /// ends early. Call [`TarReader::skip_data`] or `next_entry` afterwards.
    pub(crate) fn data(&mut self) -> EntryData<'_, R> {
        EntryData { t: self }
    }

    /// Skips whatever is left of the current entry's data.
    pub(crate) fn skip_data(&mut self) -> Result<(), TarError> {
        let mut buf = [0u8; 8192];
        while self.left + self.pad > 0 {
            let n = (self.left + self.pad).min(buf.len() as u64) as usize;
            self.read_exact_at(&mut buf[..n])?;
            let from_left = (n as u64).min(self.left);
            self.left -= from_left;
            self.pad -= n as u64 - from_left;
        }
        Ok(())
    }

    /// Reads the current entry's stored data (all `data_size` bytes) and its padding.
    pub(crate) fn read_data(&mut self, out: &mut Vec<u8>) -> Result<(), TarError> {
        out.clear();
        // Grow as data arrives: a header's size is a claim, not a promise.
        let mut buf = [0u8; 64 * 1024];
        while self.left > 0 {
            let n = self.left.min(buf.len() as u64) as usize;
            self.read_exact_at(&mut buf[..n])?;
            out.extend_from_slice(&buf[..n]);
            self.left -= n as u64;
        }
        self.skip_data()
    }

    /// The next entry, or `None` after the end-of-archive marker.
    pub(crate) fn next_entry(&mut self) -> Result<Option<TarEntry>, TarError> {
        self.skip_data()?;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Option<Vec<(String, Vec<u8>)>> = None;
        loop {
            self.header_pos = self.pos;
            let Some(h) = self.block()? else {
                return Err(TarError::new(
                    self.pos,
                    "archive ends without an end-of-archive marker (truncated?)",
                ));
            };
            if h.iter().all(|&b| b == 0) {
                // End of archive: the second zero block is optional in practice.
                return Ok(None);
            }
            let at = self.header_pos;
            let stored_sum = parse_octal(&h[148..156])
                .ok_or_else(|| TarError::new(at, "header checksum field is not a number"))?;
            let unsigned: u64 = h
                .iter()
                .enumerate()
                .map(|(i, &b)| {
                    if (148..156).contains(&i) {
                        32
                    } else {
                        u64::from(b)
                    }
                })
                .sum();
            let signed: i64 = h
                .iter()
                .enumerate()
                .map(|(i, &b)| {
                    if (148..156).contains(&i) {
                        32
                    } else {
                        i64::from(b as i8)
                    }
                })
                .sum();
            if stored_sum != unsigned && stored_sum as i64 != signed {
                return Err(TarError::new(
                    at,
                    "header checksum mismatch (not a tar, or corrupt)",
                ));
            }
            let typeflag = h[156];
            let size = parse_octal(&h[124..136])
                .ok_or_else(|| TarError::new(at, "size field is not a number"))?;
            match typeflag {
                b'L' => {
                    long_name = Some(
                        cstr(&self.read_small(size, MAX_LONG_NAME, "GNU long name")?).to_vec(),
                    );
                    continue;
                }
                b'K' => {
                    long_link = Some(
                        cstr(&self.read_small(size, MAX_LONG_NAME, "GNU long link")?).to_vec(),
                    );
                    continue;
                }
                b'x' => {
                    let data = self.read_small(size, MAX_PAX, "PAX header")?;
                    pax = Some(parse_pax(&data, at)?);
                    continue;
                }
                b'g' => {
                    let data = self.read_small(size, MAX_PAX, "PAX global header")?;
                    self.global = parse_pax(&data, at)?;
                    continue;
                }
                _ => {}
            }
            let magic = &h[257..263];
            let is_ustar = magic == b"ustar\0" || magic == b"ustar ";
            let mut path = cstr(&h[0..100]).to_vec();
            if magic == b"ustar\0" && h[345] != 0 {
                let mut p = cstr(&h[345..500]).to_vec();
                p.push(b'/');
                p.extend_from_slice(&path);
                path = p;
            }
            let num = |range: std::ops::Range<usize>, what: &str| {
                parse_octal(&h[range])
                    .ok_or_else(|| TarError::new(at, format!("{what} field is not a number")))
            };
            let mut e = TarEntry {
                mode: (num(100..108, "mode")? & 0o7777) as u32,
                uid: u32::try_from(num(108..116, "uid")?)
                    .map_err(|_| TarError::new(at, "uid out of range"))?,
                gid: u32::try_from(num(116..124, "gid")?)
                    .map_err(|_| TarError::new(at, "gid out of range"))?,
                mtime: Timespec {
                    sec: i64::try_from(num(136..148, "mtime")?)
                        .map_err(|_| TarError::new(at, "mtime out of range"))?,
                    nsec: 0,
                },
                link: cstr(&h[157..257]).to_vec(),
                data_size: size,
                size,
                ..TarEntry::default()
            };
            if is_ustar {
                e.dev_major = u32::try_from(num(329..337, "devmajor")?)
                    .map_err(|_| TarError::new(at, "devmajor out of range"))?;
                e.dev_minor = u32::try_from(num(337..345, "devminor")?)
                    .map_err(|_| TarError::new(at, "devminor out of range"))?;
            }
            e.kind = Some(match typeflag {
                b'0' | 0 | b'7' => TarKind::File,
                b'1' => TarKind::HardLink,
                b'2' => TarKind::Symlink,
                b'3' => TarKind::CharDev,
                b'4' => TarKind::BlockDev,
                b'5' => TarKind::Dir,
                b'6' => TarKind::Fifo,
                b'S' => TarKind::File,
                other => {
                    return Err(TarError {
                        offset: at,
                        entry: Some(path),
                        reason: format!("unsupported entry type {:?}", other as char),
                    });
                }
            });
            if let Some(n) = long_name.take() {
                e.path = n;
            } else {
                e.path = path;
            }
            if let Some(l) = long_link.take() {
                e.link = l;
            }
            let records: Vec<(String, Vec<u8>)> = self
                .global
                .iter()
                .cloned()
                .chain(pax.take().unwrap_or_default())
                .collect();
            for (k, v) in records {
                let bad = |what: &str| TarError {
                    offset: at,
                    entry: Some(e.path.clone()),
                    reason: format!("bad PAX {what}"),
                };
                let dec = |v: &[u8]| -> Option<u64> { std::str::from_utf8(v).ok()?.parse().ok() };
                match k.as_str() {
                    "path" => e.path = v,
                    "linkpath" => e.link = v,
                    "size" => {
                        e.data_size = dec(&v).ok_or_else(|| bad("size"))?;
                        e.size = e.data_size;
                    }
                    "uid" => {
                        e.uid = dec(&v)
                            .and_then(|x| u32::try_from(x).ok())
                            .ok_or_else(|| bad("uid"))?
                    }
                    "gid" => {
                        e.gid = dec(&v)
                            .and_then(|x| u32::try_from(x).ok())
                            .ok_or_else(|| bad("gid"))?
                    }
                    "mtime" => e.mtime = parse_pax_time(&v).ok_or_else(|| bad("mtime"))?,
                    k if k.starts_with("SCHILY.xattr.") => {
                        let name = k.as_bytes()["SCHILY.xattr.".len()..].to_vec();
                        e.xattrs.retain(|(n, _)| *n != name);
                        e.xattrs.push((name, v));
                    }
                    k if k.starts_with("GNU.sparse.") => {
                        return Err(TarError {
                            offset: at,
                            entry: Some(e.path.clone()),
                            reason: "PAX sparse files are not supported".into(),
                        });
                    }
                    _ => {}
                }
            }
            e.xattrs.sort();
            if typeflag == b'S' {
                self.read_gnu_sparse(&h, &mut e)?;
            }
            if matches!(
                e.kind,
                Some(
                    TarKind::HardLink
                        | TarKind::Symlink
                        | TarKind::Dir
                        | TarKind::Fifo
                        | TarKind::CharDev
                        | TarKind::BlockDev
                )
            ) && typeflag != b'5'
            {
                // Only regular files carry data (directories may, and it is skipped).
                if e.data_size != 0 && e.kind != Some(TarKind::HardLink) {
                    return Err(TarError {
                        offset: at,
                        entry: Some(e.path),
                        reason: "non-file entry carries data".into(),
                    });
                }
            }
            self.left = e.data_size;
            self.pad = (BLOCK as u64 - e.data_size % BLOCK as u64) % BLOCK as u64;
            if e.kind != Some(TarKind::File) {
                self.skip_data()?;
                e.data_size = 0;
                if e.kind != Some(TarKind::HardLink) {
                    e.size = 0;
                }
            }
            return Ok(Some(e));
        }
    }

    fn read_gnu_sparse(&mut self, h: &[u8; BLOCK], e: &mut TarEntry) -> Result<(), TarError> {
        let at = self.header_pos;
        let bad = |what: &str| TarError {
            offset: at,
            entry: Some(e.path.clone()),
            reason: format!("bad GNU sparse header: {what}"),
        };
        let mut map = Vec::new();
        let push = |map: &mut Vec<(u64, u64)>, rec: &[u8]| -> Result<(), TarError> {
            let off = parse_octal(&rec[0..12]).ok_or_else(|| bad("offset"))?;
            let len = parse_octal(&rec[12..24]).ok_or_else(|| bad("length"))?;
            if off == 0 && len == 0 && rec.iter().all(|&b| b == 0) {
                return Ok(());
            }
            if map.len() >= MAX_SPARSE_ENTRIES {
                return Err(bad("too many regions"));
            }
            map.push((off, len));
            Ok(())
        };
        for i in 0..4 {
            let s = 386 + i * 24;
            push(&mut map, &h[s..s + 24])?;
        }
        let real = parse_octal(&h[483..495]).ok_or_else(|| bad("real size"))?;
        let mut extended = h[482] != 0;
        while extended {
            let ext = self.block()?.ok_or_else(|| bad("truncated extension"))?;
            for i in 0..21 {
                push(&mut map, &ext[i * 24..i * 24 + 24])?;
            }
            extended = ext[504] != 0;
        }
        let mut end = 0u64;
        let mut total = 0u64;
        for &(off, len) in &map {
            if off < end {
                return Err(bad("regions overlap or are out of order"));
            }
            end = off
                .checked_add(len)
                .ok_or_else(|| bad("region overflows"))?;
            total += len;
        }
        if end > real || total != e.data_size {
            return Err(bad("regions do not match the sizes"));
        }
        e.size = real;
        e.sparse = Some(map);
        Ok(())
    }
}

impl<R: Read + io::Seek> TarReader<R> {
    /// Skips the current entry's data by seeking instead of reading.
    pub(crate) fn skip_data_fast(&mut self) -> Result<(), TarError> {
        let n = self.left + self.pad;
        if n > 0 {
            let end = self
                .r
                .seek(io::SeekFrom::Current(n as i64))
                .map_err(|e| TarError::new(self.pos, format!("seek error: {e}")))?;
            let len = self
                .r
                .seek(io::SeekFrom::End(0))
                .map_err(|e| TarError::new(self.pos, format!("seek error: {e}")))?;
            if end > len {
                return Err(TarError::new(self.pos, "archive is truncated"));
            }
            self.r
                .seek(io::SeekFrom::Start(end))
                .map_err(|e| TarError::new(self.pos, format!("seek error: {e}")))?;
            self.pos += n;
            self.left = 0;
            self.pad = 0;
        }
        Ok(())
    }
}

/// The data of one entry (see [`TarReader::data`]).
#[derive(Debug)]
pub(crate) struct EntryData<'a, R> {
    t: &'a mut TarReader<R>,
}

impl<R: Read> Read for EntryData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.t.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let n = (self.t.left.min(buf.len() as u64)) as usize;
        let got = self.t.r.read(&mut buf[..n])?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("archive is truncated at byte {}", self.t.pos),
            ));
        }
        self.t.left -= got as u64;
        self.t.pos += got as u64;
        Ok(got)
    }
}

/// Expands a GNU sparse entry's stored regions into the full content, holes as zeros.
#[derive(Debug)]
pub(crate) struct SparseExpand<D> {
    data: D,
    map: Vec<(u64, u64)>,
    next: usize,
    pos: u64,
    size: u64,
}

impl<D: Read> SparseExpand<D> {
    pub(crate) fn new(data: D, map: Vec<(u64, u64)>, size: u64) -> SparseExpand<D> {
        SparseExpand {
            data,
            map,
            next: 0,
            pos: 0,
            size,
        }
    }
}

impl<D: Read> Read for SparseExpand<D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        // Skip regions that are already consumed.
        while self.next < self.map.len() {
            let (off, len) = self.map[self.next];
            if self.pos >= off + len {
                self.next += 1;
            } else {
                break;
            }
        }
        let (zeros_until, data_until) = match self.map.get(self.next) {
            Some(&(off, len)) => (off, off + len),
            None => (self.size, self.size),
        };
        if self.pos < zeros_until {
            let n = ((zeros_until - self.pos).min(buf.len() as u64)) as usize;
            buf[..n].fill(0);
            self.pos += n as u64;
            return Ok(n);
        }
        let n = ((data_until - self.pos).min(buf.len() as u64)) as usize;
        self.data.read_exact(&mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Writes a file entry's content and returns how many bytes it wrote.
pub(crate) type BodyWriter<'a> = &'a mut dyn FnMut(&mut dyn Write) -> io::Result<u64>;

/// Writes a tar stream: ustar headers, with PAX records for whatever ustar cannot hold
/// (long names, big numbers, nanosecond mtimes, xattrs).
#[derive(Debug)]
pub(crate) struct TarWriter<W: Write> {
    w: W,
}

fn octal(field: &mut [u8], v: u64) -> bool {
    let s = format!("{:0width$o}", v, width = field.len() - 1);
    if s.len() > field.len() - 1 {
        return false;
    }
    field[..s.len()].copy_from_slice(s.as_bytes());
    field[s.len()] = 0;
    true
}

fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    // The length counts itself; find the fixed point.
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

impl<W: Write> TarWriter<W> {
    pub(crate) fn new(w: W) -> TarWriter<W> {
        TarWriter { w }
    }

    fn header(&mut self, e: &TarEntry, typeflag: u8, size: u64) -> io::Result<()> {
        let mut pax = Vec::new();
        let mut h = [0u8; BLOCK];
        if e.path.len() <= 100 {
            h[..e.path.len()].copy_from_slice(&e.path);
        } else {
            pax_record(&mut pax, "path", &e.path);
            let cut = e.path.len().min(100);
            h[..cut].copy_from_slice(&e.path[..cut]);
        }
        octal(&mut h[100..108], u64::from(e.mode));
        if !octal(&mut h[108..116], u64::from(e.uid)) {
            pax_record(&mut pax, "uid", e.uid.to_string().as_bytes());
        }
        if !octal(&mut h[116..124], u64::from(e.gid)) {
            pax_record(&mut pax, "gid", e.gid.to_string().as_bytes());
        }
        if !octal(&mut h[124..136], size) {
            pax_record(&mut pax, "size", size.to_string().as_bytes());
        }
        let sec_fits = e.mtime.sec >= 0 && octal(&mut h[136..148], e.mtime.sec as u64);
        if e.mtime.nsec != 0 || !sec_fits {
            let t = &e.mtime;
            let v = if t.nsec == 0 {
                t.sec.to_string()
            } else if t.sec >= 0 {
                format!("{}.{:09}", t.sec, t.nsec)
            } else {
                // Negative times: the value is sec + nsec/1e9, written with its sign.
                let total = i128::from(t.sec) * 1_000_000_000 + i128::from(t.nsec);
                let a = -total;
                format!("-{}.{:09}", a / 1_000_000_000, a % 1_000_000_000)
            };
            pax_record(&mut pax, "mtime", v.as_bytes());
        }
        h[156] = typeflag;
        if e.link.len() <= 100 {
            h[157..157 + e.link.len()].copy_from_slice(&e.link);
        } else {
            pax_record(&mut pax, "linkpath", &e.link);
        }
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        octal(&mut h[329..337], u64::from(e.dev_major));
        octal(&mut h[337..345], u64::from(e.dev_minor));
        for (k, v) in &e.xattrs {
            let key = format!("SCHILY.xattr.{}", String::from_utf8_lossy(k));
            pax_record(&mut pax, &key, v);
        }
        if !pax.is_empty() {
            let mut ph = [0u8; BLOCK];
            let name = b"././@PaxHeader";
            ph[..name.len()].copy_from_slice(name);
            octal(&mut ph[100..108], 0o644);
            octal(&mut ph[108..116], 0);
            octal(&mut ph[116..124], 0);
            octal(&mut ph[124..136], pax.len() as u64);
            octal(&mut ph[136..148], 0);
            ph[156] = b'x';
            ph[257..263].copy_from_slice(b"ustar\0");
            ph[263..265].copy_from_slice(b"00");
            checksum(&mut ph);
            self.w.write_all(&ph)?;
            self.w.write_all(&pax)?;
            self.pad(pax.len() as u64)?;
        }
        checksum(&mut h);
        self.w.write_all(&h)
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        let pad = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        self.w.write_all(&[0u8; BLOCK][..pad as usize])
    }

    /// Writes an entry; for files, `data` must yield exactly `e.size` bytes.
    pub(crate) fn append(&mut self, e: &TarEntry, data: Option<BodyWriter<'_>>) -> io::Result<()> {
        let kind = e.kind.expect("entry kind");
        let typeflag = match kind {
            TarKind::File => b'0',
            TarKind::HardLink => b'1',
            TarKind::Symlink => b'2',
            TarKind::CharDev => b'3',
            TarKind::BlockDev => b'4',
            TarKind::Dir => b'5',
            TarKind::Fifo => b'6',
        };
        let size = if kind == TarKind::File { e.size } else { 0 };
        self.header(e, typeflag, size)?;
        if kind == TarKind::File {
            let written = match data {
                Some(f) => f(&mut self.w)?,
                None => 0,
            };
            if written != size {
                return Err(io::Error::other(format!(
                    "{}: wrote {written} bytes, header says {size}",
                    String::from_utf8_lossy(&e.path)
                )));
            }
            self.pad(size)?;
        }
        Ok(())
    }

    /// Writes the end-of-archive marker and returns the writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.w.write_all(&[0u8; BLOCK * 2])?;
        self.w.flush()?;
        Ok(self.w)
    }
}

fn checksum(h: &mut [u8; BLOCK]) {
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: TarKind, size: u64) -> TarEntry {
        TarEntry {
            path: path.as_bytes().to_vec(),
            kind: Some(kind),
            mode: 0o644,
            size,
            data_size: size,
            ..TarEntry::default()
        }
    }

    #[test]
    fn round_trip_with_pax() {
        let mut w = TarWriter::new(Vec::new());
        let long = "d/".repeat(80) + "file";
        let mut f = entry(&long, TarKind::File, 5);
        f.mtime = Timespec {
            sec: 1_700_000_000,
            nsec: 123_456_789,
        };
        f.xattrs = vec![(b"user.k".to_vec(), b"v\0\xff".to_vec())];
        f.uid = 3_000_000;
        let mut body = |w: &mut dyn Write| {
            w.write_all(b"hello")?;
            Ok(5)
        };
        w.append(&f, Some(&mut body)).unwrap();
        let mut l = entry("link", TarKind::Symlink, 0);
        l.link = "x".repeat(300).into_bytes();
        w.append(&l, None).unwrap();
        let bytes = w.finish().unwrap();
        let mut r = TarReader::new(&bytes[..]);
        let e = r.next_entry().unwrap().unwrap();
        assert_eq!(e.path, long.as_bytes());
        assert_eq!(e.mtime, f.mtime);
        assert_eq!(e.xattrs, f.xattrs);
        assert_eq!(e.uid, 3_000_000);
        let mut data = Vec::new();
        r.read_data(&mut data).unwrap();
        assert_eq!(data, b"hello");
        let e = r.next_entry().unwrap().unwrap();
        assert_eq!(e.link.len(), 300);
        assert!(r.next_entry().unwrap().is_none());
    }

    #[test]
    fn truncation_and_garbage_are_errors() {
        let mut w = TarWriter::new(Vec::new());
        let f = entry("f", TarKind::File, 1000);
        let mut body = |w: &mut dyn Write| {
            w.write_all(&[7u8; 1000])?;
            Ok(1000)
        };
        w.append(&f, Some(&mut body)).unwrap();
        let bytes = w.finish().unwrap();
        let mut r = TarReader::new(&bytes[..700]);
        r.next_entry().unwrap().unwrap();
        let mut v = Vec::new();
        assert!(
            r.read_data(&mut v)
                .unwrap_err()
                .reason
                .contains("truncated")
        );
        // Cut exactly after the data: no end marker.
        let mut r = TarReader::new(&bytes[..1536]);
        r.next_entry().unwrap().unwrap();
        r.read_data(&mut v).unwrap();
        assert!(
            r.next_entry()
                .unwrap_err()
                .reason
                .contains("end-of-archive")
        );
        let garbage = vec![0x41u8; 1024];
        assert!(
            TarReader::new(&garbage[..])
                .next_entry()
                .unwrap_err()
                .reason
                .contains("checksum")
        );
    }

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time(b"1.5"),
            Some(Timespec {
                sec: 1,
                nsec: 500_000_000
            })
        );
        assert_eq!(
            parse_pax_time(b"-1.25"),
            Some(Timespec {
                sec: -2,
                nsec: 750_000_000
            })
        );
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
