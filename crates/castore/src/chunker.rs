//! Content-defined chunking: FastCDC v2020 (the `fastcdc` crate, version pinned in the
//! workspace so cut points never move under stored data).

use fastcdc::v2020::{FastCDC, StreamCDC};

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

/// Chunks a stream without holding more than one maximum chunk in memory; the cut points
/// are the same as [`cut_points`] over the whole content.
pub(crate) fn stream_chunks<R: std::io::Read>(
    reader: R,
) -> impl Iterator<Item = std::io::Result<Vec<u8>>> {
    StreamCDC::new(reader, MIN_SIZE, AVG_SIZE, MAX_SIZE).map(|r| {
        r.map(|c| c.data).map_err(|e| match e {
            fastcdc::v2020::Error::IoError(io) => io,
            other => std::io::Error::other(other.to_string()),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random buffer (xorshift), so fixtures never change.
    fn fixture(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
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
    fn stream_and_buffer_agree() {
        let data = fixture(3 << 20);
        let a: Vec<usize> = cut_points(&data).map(|(_, l)| l).collect();
        let b: Vec<usize> = stream_chunks(&data[..]).map(|c| c.unwrap().len()).collect();
        assert_eq!(a, b);
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
