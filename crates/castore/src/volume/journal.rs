//! The small-write journal: writes smaller than an extent are appended to the
//! `volume_journal` family (through RocksDB's write-ahead log, like every volume write)
//! and kept in memory as patches over their extent, instead of read-modify-writing the
//! whole extent per request. A *fold* later turns an extent's patches into its new chunk
//! and block map entry and deletes its journal records, in one batch.
//!
//! **Keys:** `volume id ‖ extent ‖ sequence` (8 B big-endian each), so one extent's
//! records are contiguous and in write order. Sequences are per extent: the next record
//! of an extent takes one more than the newest it has (0 for an extent without records);
//! a sequence may be reused after a fold deleted its record, since the put comes after
//! the delete in the log. **Values:** a kind byte, the offset in the extent (4 B BE),
//! then the bytes (kind 0) or a length of zeros (kind 1, 4 B BE).
//!
//! **Crash semantics:** a journal record is written in the batch of its request, so the
//! surviving state after a crash is the block map plus the surviving journal records
//! applied in key order, which is the volume after some prefix of its operations (the
//! log is ordered). A fold replaces records by a chunk holding exactly what they add up
//! to, in one batch, so it never changes what the volume reads. Journal records belong to
//! the volume's current generation: taking a snapshot folds them in the snapshot's own
//! batch.
//!
//! **Architecture Invariant:** the journal holds raw bytes, never chunk references, so
//! GC ignores it; only a fold creates chunks, and it claims them like any volume write.

use std::collections::HashMap;

/// Record kinds.
const KIND_DATA: u8 = 0;
const KIND_ZERO: u8 = 1;

/// At most this many records per extent: the next write folds it, so replay and the
/// journal's disk use stay bounded even for one extent rewritten forever.
pub(crate) const MAX_RECORDS: usize = 256;

/// Default budget of pending journal bytes in memory, over all volumes of a store.
pub const DEFAULT_JOURNAL_BUDGET: usize = 256 << 20;

/// A journal key.
pub(crate) fn key(volume: u64, extent: u64, seq: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&volume.to_be_bytes());
    k[8..16].copy_from_slice(&extent.to_be_bytes());
    k[16..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Splits a journal key into (volume, extent, sequence).
pub(crate) fn parse_key(k: &[u8]) -> Option<(u64, u64, u64)> {
    if k.len() != 24 {
        return None;
    }
    let n = |i: usize| u64::from_be_bytes(k[i..i + 8].try_into().expect("8 bytes"));
    Some((n(0), n(8), n(16)))
}

/// What one record changes in its extent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Patch {
    Data(Vec<u8>),
    Zero(u32),
}

impl Patch {
    pub(crate) fn len(&self) -> usize {
        match self {
            Patch::Data(b) => b.len(),
            Patch::Zero(n) => *n as usize,
        }
    }

    /// Memory it holds.
    fn mem(&self) -> usize {
        match self {
            Patch::Data(b) => b.len() + 32,
            Patch::Zero(_) => 32,
        }
    }

    /// Applies the patch, placed at `off` in its extent, to `out`, which holds the
    /// extent's bytes from `at` on.
    pub(crate) fn overlay(&self, off: usize, out: &mut [u8], at: usize) {
        let lo = off.max(at);
        let hi = (off + self.len()).min(at + out.len());
        if lo >= hi {
            return;
        }
        let dst = &mut out[lo - at..hi - at];
        match self {
            Patch::Data(b) => dst.copy_from_slice(&b[lo - off..hi - off]),
            Patch::Zero(_) => dst.fill(0),
        }
    }
}

/// A record's value.
pub(crate) fn encode(off: u32, patch: &Patch) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + patch.len());
    match patch {
        Patch::Data(b) => {
            v.push(KIND_DATA);
            v.extend_from_slice(&off.to_be_bytes());
            v.extend_from_slice(b);
        }
        Patch::Zero(n) => {
            v.push(KIND_ZERO);
            v.extend_from_slice(&off.to_be_bytes());
            v.extend_from_slice(&n.to_be_bytes());
        }
    }
    v
}

/// Decodes a record's value for an extent of `extent_size` bytes: None unless it is
/// well-formed, non-empty and inside the extent.
pub(crate) fn decode(v: &[u8], extent_size: u64) -> Option<(u32, Patch)> {
    let (&kind, rest) = v.split_first()?;
    let off = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let body = &rest[4..];
    let patch = match kind {
        KIND_DATA => Patch::Data(body.to_vec()),
        KIND_ZERO => Patch::Zero(u32::from_be_bytes(body.try_into().ok()?)),
        _ => return None,
    };
    let end = u64::from(off) + patch.len() as u64;
    (patch.len() > 0 && end <= extent_size).then_some((off, patch))
}

/// An extent with journal records not yet folded: its patches (or, once they cover much
/// of it, its whole new content) and the sequences of its records.
#[derive(Debug)]
pub(crate) struct Dirty {
    /// Sequences of its journal records, ascending: a fold deletes exactly these.
    pub(crate) seqs: Vec<u64>,
    /// The whole extent with every record applied, once materialised.
    pub(crate) full: Option<Vec<u8>>,
    /// Records not yet applied to `full` (all of them while `full` is None), oldest first.
    pub(crate) patches: Vec<(u32, Patch)>,
    /// Bytes of memory held, as counted against the journal budget.
    pub(crate) mem: usize,
    /// When it became dirty (a store-wide counter): folds take the oldest first.
    pub(crate) since: u64,
}

impl Dirty {
    pub(crate) fn new(since: u64) -> Dirty {
        Dirty {
            seqs: Vec::new(),
            full: None,
            patches: Vec::new(),
            mem: 64,
            since,
        }
    }

    /// The sequence the next record takes.
    pub(crate) fn next_seq(d: Option<&Dirty>) -> u64 {
        d.and_then(|d| d.seqs.last()).map_or(0, |s| s + 1)
    }

    /// Adds record `seq`. Returns the change in memory held.
    pub(crate) fn push(&mut self, seq: u64, off: u32, patch: Patch) -> isize {
        self.seqs.push(seq);
        let before = self.mem;
        match &mut self.full {
            Some(buf) => patch.overlay(off as usize, buf, 0),
            None => {
                self.mem += patch.mem();
                self.patches.push((off, patch));
            }
        }
        self.mem as isize - before as isize
    }

    /// Whether the patches are worth replacing by the whole extent (they hold half an
    /// extent of memory, or are many).
    pub(crate) fn wants_base(&self, extent_size: usize) -> bool {
        self.full.is_none() && (self.mem >= extent_size / 2 || self.patches.len() >= 64)
    }

    /// Applies the patches to the extent's base bytes (None: zeros) and keeps the result.
    /// Returns the change in memory held.
    pub(crate) fn materialise(&mut self, base: Option<&[u8]>, extent_size: usize) -> isize {
        let buf = self.content(base, extent_size);
        self.full = Some(buf);
        self.patches = Vec::new();
        let before = self.mem;
        self.mem = extent_size + 64;
        self.mem as isize - before as isize
    }

    /// Whether reading needs the base (no materialised content).
    pub(crate) fn needs_base(&self) -> bool {
        self.full.is_none()
    }

    /// Copies the extent's bytes from `at` into `out`: the base (None: zeros) with every
    /// record applied.
    pub(crate) fn read(&self, base: Option<&[u8]>, at: usize, out: &mut [u8]) {
        match (&self.full, base) {
            (Some(full), _) => out.copy_from_slice(&full[at..at + out.len()]),
            (None, Some(b)) => out.copy_from_slice(&b[at..at + out.len()]),
            (None, None) => out.fill(0),
        }
        for (off, p) in &self.patches {
            p.overlay(*off as usize, out, at);
        }
    }

    /// The whole new content of the extent.
    pub(crate) fn content(&self, base: Option<&[u8]>, extent_size: usize) -> Vec<u8> {
        let mut buf = vec![0u8; extent_size];
        self.read(base, 0, &mut buf);
        buf
    }
}

/// One stripe of a volume's extents: its lock serialises writes (and folds) of those
/// extents, and it holds their dirty state.
#[derive(Debug, Default)]
pub(crate) struct Stripe {
    pub(crate) dirty: HashMap<u64, Dirty>,
    /// What the current generation's block map says of extents read lately (the whole
    /// clone chain resolved): a read that finds its extent here skips the RocksDB seek.
    /// Filled by reads under this stripe's lock with a cursor made under it; every change
    /// of an extent's current version removes its entry under the same lock.
    pub(crate) map: HashMap<u64, super::record::Extent>,
}

impl Stripe {
    /// The extent dirty for the longest time.
    pub(crate) fn oldest(&self) -> Option<u64> {
        self.dirty
            .iter()
            .min_by_key(|(_, d)| d.since)
            .map(|(&e, _)| e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let es = 64 << 10;
        for (off, p) in [
            (0, Patch::Data(vec![1, 2, 3])),
            (65533, Patch::Data(vec![9; 3])),
            (100, Patch::Zero(4096)),
        ] {
            assert_eq!(decode(&encode(off, &p), es), Some((off, p)));
        }
        assert_eq!(decode(&encode(65534, &Patch::Data(vec![9; 3])), es), None);
        assert_eq!(decode(&encode(0, &Patch::Zero(0)), es), None);
        assert_eq!(decode(&encode(0, &Patch::Data(Vec::new())), es), None);
        assert_eq!(decode(&[2, 0, 0, 0, 0, 1], es), None);
        assert_eq!(decode(&[1, 0, 0, 0, 0, 1], es), None);
        assert_eq!(decode(&[], es), None);
        assert!(key(1, 2, 3) < key(1, 2, 4) && key(1, 2, u64::MAX) < key(1, 3, 0));
        assert_eq!(parse_key(&key(7, 8, 9)), Some((7, 8, 9)));
    }

    #[test]
    fn patches_apply_in_order_over_the_base() {
        let es = 16;
        let base: Vec<u8> = (1..=16).collect();
        let mut d = Dirty::new(0);
        d.push(0, 2, Patch::Data(vec![100; 4]));
        d.push(1, 4, Patch::Zero(6));
        d.push(2, 9, Patch::Data(vec![7]));
        let want = [1, 2, 100, 100, 0, 0, 0, 0, 0, 7, 11, 12, 13, 14, 15, 16];
        assert_eq!(d.content(Some(&base), es), want);
        let mut part = [0u8; 5];
        d.read(Some(&base), 3, &mut part);
        assert_eq!(part, want[3..8]);
        assert_eq!(Dirty::next_seq(Some(&d)), 3);
        d.materialise(Some(&base), es);
        d.push(3, 15, Patch::Data(vec![42]));
        let mut all = [0u8; 16];
        d.read(None, 0, &mut all);
        assert_eq!(all[..15], want[..15]);
        assert_eq!(all[15], 42);
        assert_eq!(d.seqs, vec![0, 1, 2, 3]);
    }
}
