//! Content-defined chunking: FastCDC v2020 (the `fastcdc` crate, version pinned in the
//! workspace so cut points never move under stored data).

use fastcdc::v2020::FastCDC;

/// Smallest chunk (except a file's last).
pub const MIN_SIZE: u32 = 16 * 1024;
/// Target average chunk size.
pub const AVG_SIZE: u32 = 64 * 1024;
/// Largest chunk.
pub const MAX_SIZE: u32 = 256 * 1024;

/// Cut points of an in-memory buffer, as `(offset, length)` pairs covering it in order.
pub(crate) fn cut_points(data: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    FastCDC::new(data, MIN_SIZE, AVG_SIZE, MAX_SIZE).map(|c| (c.offset, c.length))
}

/// Reads `reader` in windows of about `window` bytes and calls `f` with each window's
/// complete chunks: the bytes and their cut points (relative to those bytes). The cut
/// points are exactly those of [`cut_points`] over the whole stream: a window's last
/// chunk may have been cut short by the window's end, so it is carried into the next
/// window instead of being passed on (FastCDC decides a cut only from the bytes after
/// the previous cut). `window` must be well above [`MAX_SIZE`].
pub(crate) fn for_each_window<E>(
    reader: &mut dyn std::io::Read,
    window: usize,
    read_error: impl Fn(std::io::Error) -> E,
    mut f: impl FnMut(&[u8], &[(usize, usize)]) -> Result<(), E>,
) -> Result<(), E> {
    debug_assert!(window > 2 * MAX_SIZE as usize);
    let mut buf: Vec<u8> = Vec::with_capacity(window);
    let mut eof = false;
    loop {
        while buf.len() < window && !eof {
            let start = buf.len();
            buf.resize(window, 0);
            match reader.read(&mut buf[start..]) {
                Ok(0) => {
                    buf.truncate(start);
                    eof = true;
                }
                Ok(n) => buf.truncate(start + n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => buf.truncate(start),
                Err(e) => return Err(read_error(e)),
            }
        }
        if buf.is_empty() {
            return Ok(());
        }
        let mut cuts: Vec<(usize, usize)> = cut_points(&buf).collect();
        if !eof {
            cuts.pop();
        }
        let done = cuts.last().map_or(0, |&(o, l)| o + l);
        f(&buf[..done], &cuts)?;
        buf.drain(..done);
        if eof && buf.is_empty() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random buffer, so fixtures never change.
    fn fixture(len: usize) -> Vec<u8> {
        crate::testing::noise(len, 0x9E37_79B9_7F4A_7C15)
    }

    #[test]
    fn cut_points_match_fixture() {
        let data = fixture(1 << 20);
        let cuts: Vec<usize> = cut_points(&data).map(|(_, len)| len).collect();
        // Recorded with fastcdc 3.2.1, v2020, 16/64/256 KiB. If this changes, stored data
        // would no longer deduplicate against new imports: do not update it lightly.
        assert_eq!(cuts, FIXTURE_LENGTHS, "FastCDC cut points moved");
        assert_eq!(cuts.iter().sum::<usize>(), data.len());
    }

    #[test]
    fn windows_cut_where_the_whole_buffer_does() {
        let data = fixture(5 << 20);
        let whole: Vec<(usize, usize)> = cut_points(&data).collect();
        for window in [600 * 1024, 1 << 20, 3 << 20, 8 << 20] {
            let mut got = Vec::new();
            let mut base = 0;
            for_each_window::<std::io::Error>(
                &mut &data[..],
                window,
                |e| e,
                |bytes, cuts| {
                    got.extend(cuts.iter().map(|&(o, l)| (base + o, l)));
                    base += bytes.len();
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(got, whole, "window {window}");
        }
    }

    #[test]
    fn small_input_is_one_chunk() {
        let data = fixture(1000);
        assert_eq!(cut_points(&data).collect::<Vec<_>>(), vec![(0, 1000)]);
        assert_eq!(cut_points(&[]).count(), 0);
    }

    const FIXTURE_LENGTHS: &[usize] = &[
        107373, 20054, 68325, 116126, 82734, 225270, 59137, 89965, 123366, 83427, 64556, 8243,
    ];
}
