//! The on-disk forms of volumes: the volume record (`volumes` family), block map keys
//! and values (`block_map` family).

use crate::Digest;
use crate::codec::{DecodeError, Reader, Writer};

use super::AccessMode;

const RECORD_VERSION: u8 = 1;

/// The value of a block map entry for an all-zero (trimmed, never written) extent.
pub(crate) const ZERO_MARKER: &[u8] = &[0];
/// Block map value of an extent zeroed with "keep allocated" (NBD's `NO_HOLE`): it reads
/// as zeros and names no chunk, but allocation reports say data, not hole.
pub(crate) const ZEROED_MARKER: &[u8] = &[1];

/// A block map key: volume id ‖ extent index ‖ !generation, each 8 bytes big-endian, so
/// one volume's entries are contiguous, ordered by extent, newest generation first.
pub(crate) fn key(volume: u64, extent: u64, generation: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&volume.to_be_bytes());
    k[8..16].copy_from_slice(&extent.to_be_bytes());
    k[16..].copy_from_slice(&(!generation).to_be_bytes());
    k
}

/// The first key of extent `extent` of `volume` (its newest possible version).
pub(crate) fn extent_start(volume: u64, extent: u64) -> [u8; 24] {
    key(volume, extent, u64::MAX)
}

/// Splits a block map key into (volume, extent, generation).
pub(crate) fn parse_key(k: &[u8]) -> Option<(u64, u64, u64)> {
    if k.len() != 24 {
        return None;
    }
    let n = |i: usize| u64::from_be_bytes(k[i..i + 8].try_into().expect("8 bytes"));
    Some((n(0), n(8), !n(16)))
}

/// What an extent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Extent {
    /// Reads as zeros; no chunk.
    Zero,
    /// Reads as zeros, no chunk, but counts as allocated (zeroed with `no_hole`).
    Zeroed,
    /// The chunk holding its bytes (always a whole extent).
    Chunk(Digest),
}

impl Extent {
    pub(crate) fn decode(v: &[u8]) -> Option<Extent> {
        if v == ZERO_MARKER {
            Some(Extent::Zero)
        } else if v == ZEROED_MARKER {
            Some(Extent::Zeroed)
        } else {
            Digest::from_slice(v).map(Extent::Chunk)
        }
    }
}

/// A snapshot: a name for a past generation of its volume, with the size it had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snap {
    pub(crate) name: String,
    pub(crate) generation: u64,
    pub(crate) size: u64,
    pub(crate) created: u64,
}

/// Everything known about one volume except its block map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) extent_shift: u8,
    pub(crate) mode: AccessMode,
    /// Per-instance template count (0: not a template).
    pub(crate) instances: u32,
    /// For clones: (parent volume id, the parent generation it was cloned from).
    pub(crate) parent: Option<(u64, u64)>,
    /// Writes go to this generation; snapshots name older ones.
    pub(crate) generation: u64,
    pub(crate) created: u64,
    /// Oldest first (ascending generation).
    pub(crate) snapshots: Vec<Snap>,
}

impl Record {
    pub(crate) fn extent_size(&self) -> u64 {
        1 << self.extent_shift
    }

    pub(crate) fn snapshot(&self, name: &str) -> Option<&Snap> {
        self.snapshots.iter().find(|s| s.name == name)
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(RECORD_VERSION);
        w.bytes(self.name.as_bytes());
        w.varint(self.size);
        w.u8(self.extent_shift);
        w.u8(self.mode as u8);
        w.varint(u64::from(self.instances));
        match self.parent {
            None => w.u8(0),
            Some((id, generation)) => {
                w.u8(1);
                w.varint(id);
                w.varint(generation);
            }
        }
        w.varint(self.generation);
        w.varint(self.created);
        w.varint(self.snapshots.len() as u64);
        for s in &self.snapshots {
            w.bytes(s.name.as_bytes());
            w.varint(s.generation);
            w.varint(s.size);
            w.varint(s.created);
        }
        w.finish()
    }

    pub(crate) fn decode(v: &[u8]) -> Result<Record, DecodeError> {
        let mut r = Reader::new(v);
        if r.u8()? != RECORD_VERSION {
            return Err(DecodeError);
        }
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| DecodeError);
        let name = text(r.bytes()?)?;
        let size = r.varint()?;
        let extent_shift = r.u8()?;
        let mode = AccessMode::from_u8(r.u8()?).ok_or(DecodeError)?;
        let instances = u32::try_from(r.varint()?).map_err(|_| DecodeError)?;
        let parent = match r.u8()? {
            0 => None,
            1 => Some((r.varint()?, r.varint()?)),
            _ => return Err(DecodeError),
        };
        let generation = r.varint()?;
        let created = r.varint()?;
        let n = r.varint()?;
        let mut snapshots = Vec::new();
        for _ in 0..n {
            snapshots.push(Snap {
                name: text(r.bytes()?)?,
                generation: r.varint()?,
                size: r.varint()?,
                created: r.varint()?,
            });
        }
        r.end()?;
        if !(super::MIN_EXTENT_SIZE.trailing_zeros()..=super::MAX_EXTENT_SIZE.trailing_zeros())
            .contains(&u32::from(extent_shift))
        {
            return Err(DecodeError);
        }
        Ok(Record {
            name,
            size,
            extent_shift,
            mode,
            instances,
            parent,
            generation,
            created,
            snapshots,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_newest_generation_first() {
        assert!(key(1, 5, 9) < key(1, 5, 3));
        assert!(key(1, 5, 1) < key(1, 6, 9));
        assert!(key(1, u64::MAX, 1) < key(2, 0, 9));
        assert_eq!(parse_key(&key(7, 8, 9)), Some((7, 8, 9)));
    }

    #[test]
    fn record_round_trips() {
        let r = Record {
            name: "data".into(),
            size: 1 << 30,
            extent_shift: 16,
            mode: AccessMode::Rwx,
            instances: 3,
            parent: Some((4, 7)),
            generation: 9,
            created: 1_700_000_000,
            snapshots: vec![Snap {
                name: "s1".into(),
                generation: 8,
                size: 1 << 29,
                created: 1_700_000_001,
            }],
        };
        assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        assert!(Record::decode(&r.encode()[..10]).is_err());
    }
}
