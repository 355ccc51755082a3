//! Volumes in the chunk tier: a snapshot of a volume sent as its chunks (`chunks/HEX`,
//! shared with images, so what the tier holds already is not sent again) and a manifest
//! of its extents, and a name for the last snapshot pushed. Another host makes a volume
//! of it whose chunks it fetches when first read: the way a volume follows its
//! instance to another host, and the storage admin's off-host copy.
//!
//! | key | value |
//! |---|---|
//! | `volsnaps/HEX` | a snapshot manifest (below), named by its SHA-256 |
//! | `volumes/NAME` | `sha256:HEX` of the last manifest pushed of volume NAME |
//!
//! A manifest: version byte 1; the volume's name and the snapshot's (varint length +
//! UTF-8 each); varints size, extent shift (a byte), access mode (a byte), the snapshot's
//! creation and the push's time (seconds since the epoch), the host that pushed it
//! (length + UTF-8, may be empty); a varint count, then per extent that is not a hole,
//! ascending: a varint of the gap from the previous extent, a kind byte (0 zeroed but
//! allocated, 1 a chunk) and for a chunk its 32-byte digest.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::Digest;
use crate::codec::{DecodeError, Reader, Writer};
use crate::db::Batch;
use crate::error::{Error, ObjectKind, Result, ResultExt};
use crate::store::Store;
use crate::tier::{Sent, TierProgress, parallel, tier_error};
use crate::volume::{AccessMode, Extent, SnapshotShape};

const MANIFEST_VERSION: u8 = 1;

/// Snapshots named by [`Store::push_volume`] start so.
pub const PUSHED_PREFIX: &str = "pushed-";

fn manifest_key(d: &Digest) -> String {
    format!("volsnaps/{}", d.to_hex())
}

fn volume_key(name: &str) -> String {
    format!("volumes/{name}")
}

/// What the tier holds of one volume snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Manifest {
    volume: String,
    snapshot: String,
    shape: SnapshotShape,
    pushed: u64,
    host: String,
    extents: Vec<(u64, Extent)>,
}

impl Manifest {
    /// Extents holding a chunk.
    fn chunks(&self) -> u64 {
        self.extents
            .iter()
            .filter(|(_, x)| matches!(x, Extent::Chunk(_)))
            .count() as u64
    }

    /// A report of this manifest (`digest`) as volume `volume` here, named `tier_name`
    /// in the tier, nothing transferred yet.
    fn report(self, digest: Digest, volume: &str, tier_name: &str) -> VolumeTierReport {
        VolumeTierReport {
            volume: volume.to_string(),
            tier_name: tier_name.to_string(),
            chunks: self.chunks(),
            snapshot: self.snapshot,
            manifest: digest,
            pushed: self.pushed,
            host: self.host,
            size: self.shape.size,
            transferred: 0,
            skipped: 0,
            bytes: 0,
            seconds: 0.0,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(MANIFEST_VERSION);
        w.bytes(self.volume.as_bytes());
        w.bytes(self.snapshot.as_bytes());
        w.varint(self.shape.size);
        w.u8(self.shape.extent_shift);
        w.u8(self.shape.mode as u8);
        w.varint(self.shape.created);
        w.varint(self.pushed);
        w.bytes(self.host.as_bytes());
        w.varint(self.extents.len() as u64);
        let mut next = 0;
        for &(e, x) in &self.extents {
            w.varint(e - next);
            next = e + 1;
            match x {
                Extent::Zero => unreachable!("holes are not listed"),
                Extent::Zeroed => w.u8(0),
                Extent::Chunk(d) => {
                    w.u8(1);
                    w.digest(&d);
                }
            }
        }
        w.finish()
    }

    fn decode(v: &[u8]) -> std::result::Result<Manifest, DecodeError> {
        let mut r = Reader::new(v);
        if r.u8()? != MANIFEST_VERSION {
            return Err(DecodeError);
        }
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| DecodeError);
        let volume = text(r.bytes()?)?;
        let snapshot = text(r.bytes()?)?;
        let size = r.varint()?;
        let extent_shift = r.u8()?;
        let mode = AccessMode::from_u8(r.u8()?).ok_or(DecodeError)?;
        let created = r.varint()?;
        let pushed = r.varint()?;
        let host = text(r.bytes()?)?;
        let n = r.varint()?;
        let mut extents = Vec::with_capacity(n.min(1 << 20) as usize);
        let mut next: u64 = 0;
        for _ in 0..n {
            let e = next.checked_add(r.varint()?).ok_or(DecodeError)?;
            next = e.checked_add(1).ok_or(DecodeError)?;
            let x = match r.u8()? {
                0 => Extent::Zeroed,
                1 => Extent::Chunk(r.digest()?),
                _ => return Err(DecodeError),
            };
            extents.push((e, x));
        }
        r.end()?;
        Ok(Manifest {
            volume,
            snapshot,
            shape: SnapshotShape {
                size,
                extent_shift,
                mode,
                created,
            },
            pushed,
            host,
            extents,
        })
    }
}

/// What [`Store::push_volume`] or [`Store::pull_volume`] did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VolumeTierReport {
    /// The volume pushed, or made by the pull.
    pub volume: String,
    /// The volume's name in the tier (a pull may make it under another name).
    pub tier_name: String,
    /// The snapshot sent, or the one the pulled volume starts from.
    pub snapshot: String,
    /// The manifest's digest (`volsnaps/HEX`).
    pub manifest: Digest,
    /// When that snapshot was pushed (seconds since the epoch).
    pub pushed: u64,
    /// The host that pushed it, as it called itself.
    pub host: String,
    /// Size of the volume in bytes.
    pub size: u64,
    /// Extents holding data (a chunk).
    pub chunks: u64,
    /// Chunks sent (push) or already here (pull).
    pub transferred: u64,
    /// Chunks the tier already held (push).
    pub skipped: u64,
    /// Bytes sent (chunks as stored, and the manifest).
    pub bytes: u64,
    /// How long it took.
    pub seconds: f64,
}

impl VolumeTierReport {
    /// How old the snapshot was when this report was made (seconds).
    pub fn age(&self) -> u64 {
        (crate::cache::now_ms() / 1000).saturating_sub(self.pushed)
    }
}

impl Store {
    /// Sends volume `name` to the tier as snapshot `snapshot` (an existing one), or as a
    /// new snapshot `pushed-SECONDS` taken now (every acknowledged write is in it), and
    /// makes it the volume's last pushed snapshot. Chunks the tier holds are not sent
    /// again. `host` is recorded as the pusher.
    pub fn push_volume(
        &self,
        name: &str,
        snapshot: Option<&str>,
        host: &str,
        progress: &TierProgress,
    ) -> Result<VolumeTierReport> {
        let tier = self.need_tier()?;
        let start = Instant::now();
        let snapshot = match snapshot {
            Some(s) => s.to_string(),
            None => self.new_push_snapshot(name)?,
        };
        let (shape, extents) = self.snapshot_extents(name, &snapshot)?;
        let mut chunks: Vec<Digest> = extents
            .iter()
            .filter_map(|(_, x)| match x {
                Extent::Chunk(d) => Some(*d),
                _ => None,
            })
            .collect();
        chunks.sort_unstable();
        chunks.dedup();
        progress
            .objects
            .store(chunks.len() as u64 + 1, Ordering::Relaxed);
        let sent = Sent::default();
        parallel(&chunks, |d| {
            self.send(&*tier, ObjectKind::Chunk, d, &sent, progress)
        })
        .with_context(|| format!("pushing volume {name}@{snapshot}"))?;
        let m = Manifest {
            volume: name.to_string(),
            snapshot: snapshot.clone(),
            shape,
            pushed: crate::cache::now_ms() / 1000,
            host: host.to_string(),
            extents,
        };
        let bytes = m.encode();
        let digest = Digest::of(&bytes);
        Store::tier_put(&*tier, &manifest_key(&digest), &bytes)?;
        Store::tier_put(&*tier, &volume_key(name), digest.to_string().as_bytes())?;
        progress.done.fetch_add(1, Ordering::Relaxed);
        let objects = sent.objects.into_inner();
        let bytes_sent = sent.bytes.into_inner() + bytes.len() as u64;
        Ok(VolumeTierReport {
            transferred: objects,
            skipped: chunks.len() as u64 - objects,
            bytes: bytes_sent,
            seconds: start.elapsed().as_secs_f64(),
            ..m.report(digest, name, name)
        })
    }

    /// Takes snapshot `pushed-SECONDS` of `name` (with `-N` if one of that second exists).
    fn new_push_snapshot(&self, name: &str) -> Result<String> {
        let base = format!("{PUSHED_PREFIX}{}", crate::cache::now_ms() / 1000);
        let mut candidate = base.clone();
        for n in 2.. {
            match self.snapshot_volume(name, &candidate) {
                Ok(_) => return Ok(candidate),
                Err(Error::Volume(crate::VolumeError::SnapshotExists { .. })) if n < 100 => {
                    candidate = format!("{base}-{n}");
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the loop returns")
    }

    /// Whether volume `name` here holds the tier's last pushed snapshot of it: a snapshot
    /// of that name with the same shape and extents (names alone may collide: two hosts
    /// can each take `pushed-T` in the same second). Returns the tier's snapshot too;
    /// None if the tier has no snapshot of `name`.
    pub fn holds_last_pushed(&self, name: &str) -> Result<Option<(bool, VolumeTierReport)>> {
        let (digest, m) = match self.last_pushed(name) {
            Ok(x) => x,
            Err(Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let holds = match self.snapshot_extents(name, &m.snapshot) {
            Ok((shape, extents)) => shape == m.shape && extents == m.extents,
            Err(Error::Volume(crate::VolumeError::SnapshotNotFound { .. })) => false,
            Err(e) => return Err(e),
        };
        Ok(Some((holds, m.report(digest, name, name))))
    }

    /// The last snapshot of volume `tier_name` pushed to the tier: its manifest digest
    /// and what it says, verified.
    fn last_pushed(&self, tier_name: &str) -> Result<(Digest, Manifest)> {
        let tier = self.need_tier()?;
        let key = volume_key(tier_name);
        let v = self
            .tier_get(&*tier, &key)?
            .ok_or_else(|| Error::NotFound {
                what: "volume in the tier",
                name: tier_name.to_string(),
            })?;
        let d = std::str::from_utf8(&v)
            .ok()
            .and_then(|s| Digest::parse(s.trim()))
            .ok_or_else(|| tier_error(&*tier, "get", &key, "not a manifest digest"))?;
        let mkey = manifest_key(&d);
        let bytes = self
            .tier_get(&*tier, &mkey)?
            .ok_or_else(|| tier_error(&*tier, "get", &mkey, "missing (the name points at it)"))?;
        if Digest::of(&bytes) != d {
            return Err(tier_error(
                &*tier,
                "get",
                &mkey,
                format!("corrupt: its bytes do not hash to {d}"),
            ));
        }
        let m = Manifest::decode(&bytes)
            .map_err(|_| tier_error(&*tier, "get", &mkey, "not a volume manifest"))?;
        Ok((d, m))
    }

    /// Makes volume `as_name` (default `tier_name`) here from the last snapshot of
    /// `tier_name` pushed to the tier: its record and block map now, in one synced batch
    /// (the snapshot is kept under its name), its chunks when first read. A volume of
    /// that name here is an error; nothing is replaced.
    pub fn pull_volume(&self, tier_name: &str, as_name: Option<&str>) -> Result<VolumeTierReport> {
        let start = Instant::now();
        let (digest, m) = self.last_pushed(tier_name)?;
        let name = as_name.unwrap_or(tier_name);
        let mut local = 0;
        for (_, x) in &m.extents {
            if let Extent::Chunk(d) = x
                && self.has_chunk(d)?
            {
                local += 1;
            }
        }
        self.insert_snapshot_volume(name, &m.snapshot, &m.shape, &m.extents, |b: &mut Batch| {
            for (_, x) in &m.extents {
                if let Extent::Chunk(d) = x {
                    self.mark_tiered(b, ObjectKind::Chunk, d);
                }
            }
        })?;
        self.bump_changes();
        Ok(VolumeTierReport {
            transferred: local,
            seconds: start.elapsed().as_secs_f64(),
            ..m.report(digest, name, tier_name)
        })
    }

    /// What the tier holds of volume `tier_name`: its last pushed snapshot (without
    /// making a volume of it).
    pub fn pushed_volume(&self, tier_name: &str) -> Result<VolumeTierReport> {
        let (digest, m) = self.last_pushed(tier_name)?;
        let volume = m.volume.clone();
        Ok(m.report(digest, &volume, tier_name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_round_trip_and_damage_is_refused() {
        let m = Manifest {
            volume: "db".into(),
            snapshot: "pushed-1".into(),
            shape: SnapshotShape {
                size: 10 << 20,
                extent_shift: 16,
                mode: AccessMode::Rwo,
                created: 5,
            },
            pushed: 7,
            host: "a".into(),
            extents: vec![
                (0, Extent::Chunk(Digest::of(b"x"))),
                (3, Extent::Zeroed),
                (159, Extent::Chunk(Digest::of(b"y"))),
            ],
        };
        let v = m.encode();
        assert_eq!(Manifest::decode(&v).unwrap(), m);
        for cut in 0..v.len() {
            assert!(Manifest::decode(&v[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = v.clone();
        bad[0] = 9;
        assert!(Manifest::decode(&bad).is_err());
        let mut long = v.clone();
        long.push(0);
        assert!(Manifest::decode(&long).is_err());
    }
}
