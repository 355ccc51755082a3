//! fsck of volumes: records decode, names and records agree, clones' parents and base
//! snapshots exist, and every block map entry belongs to a volume, lies at or below its
//! current generation and names a good chunk of exactly one extent; every journal record
//! is well-formed and lies inside a live volume.

use std::collections::{HashMap, HashSet};

use super::extents;
use super::journal;
use super::record::{Extent, Record, parse_key};
use crate::Digest;
use crate::db::Cf;
use crate::error::Result;
use crate::fsck::FsckReport;
use crate::store::Store;

impl Store {
    pub(crate) fn fsck_volumes(&self, chunks: &HashSet<Digest>, r: &mut FsckReport) -> Result<()> {
        let mut recs: HashMap<u64, Record> = HashMap::new();
        for kv in self.db.entries(Cf::Volumes) {
            let (k, v) = kv?;
            r.volumes += 1;
            let Ok(id) = <[u8; 8]>::try_from(k.as_ref()).map(u64::from_be_bytes) else {
                r.problem("volume", hex::encode(&k), "key is not a volume id");
                continue;
            };
            match Record::decode(&v) {
                Ok(rec) => {
                    recs.insert(id, rec);
                }
                Err(_) => r.problem("volume", id, "record cannot be decoded"),
            }
        }
        let mut named = HashSet::new();
        for kv in self.db.entries(Cf::VolumeNames) {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k).into_owned();
            let id = <[u8; 8]>::try_from(v.as_ref()).map(u64::from_be_bytes);
            match id.ok().and_then(|id| recs.get(&id).map(|rec| (id, rec))) {
                Some((id, rec)) if rec.name == name => {
                    named.insert(id);
                }
                _ => r.problem("volume name", &name, "points at no volume of that name"),
            }
        }
        for (id, rec) in &recs {
            if !named.contains(id) {
                r.problem("volume", &rec.name, "has no name entry");
            }
            if rec.snapshots.iter().any(|s| s.generation >= rec.generation) {
                r.problem(
                    "volume",
                    &rec.name,
                    "a snapshot is not older than the volume",
                );
            }
            if let Some((pid, generation)) = rec.parent {
                let base = recs
                    .get(&pid)
                    .and_then(|p| p.snapshots.iter().find(|s| s.generation == generation));
                if base.is_none() {
                    r.problem(
                        "volume",
                        &rec.name,
                        format!("clone of volume id {pid} generation {generation}, which is gone"),
                    );
                }
            }
        }
        let mut sizes: HashMap<Digest, Option<u64>> = HashMap::new();
        for kv in self.db.entries(Cf::BlockMap) {
            let (k, v) = kv?;
            r.extents += 1;
            let Some((id, e, generation)) = parse_key(&k) else {
                r.problem(
                    "block map",
                    hex::encode(&k),
                    "key is not volume ‖ extent ‖ generation",
                );
                continue;
            };
            let name = format!("volume id {id} extent {e} generation {generation}");
            let Some(rec) = recs.get(&id) else {
                r.problem("block map", &name, "belongs to no volume");
                continue;
            };
            if generation == 0 || generation > rec.generation {
                r.problem(
                    "block map",
                    &name,
                    format!(
                        "newer than volume {}'s generation {}",
                        rec.name, rec.generation
                    ),
                );
            }
            match Extent::decode(&v) {
                None => r.problem("block map", &name, "value is neither a digest nor zero"),
                Some(Extent::Zero | Extent::Zeroed) => {}
                Some(Extent::Chunk(d)) if !chunks.contains(&d) => {
                    r.problem(
                        "block map",
                        &name,
                        format!("volume {} references missing or broken chunk {d}", rec.name),
                    );
                }
                Some(Extent::Chunk(d)) => {
                    let raw = match sizes.get(&d) {
                        Some(s) => *s,
                        None => {
                            let s = self
                                .db
                                .get(Cf::ChunkIndex, &d.0)?
                                .and_then(|v| Store::chunk_sizes(&v))
                                .map(|(raw, _)| raw);
                            sizes.insert(d, s);
                            s
                        }
                    };
                    // None: only the tier holds it (the chunk set says so), as a pulled
                    // volume's unread extents.
                    if raw.is_some_and(|raw| raw != rec.extent_size()) {
                        r.problem(
                            "block map",
                            &name,
                            format!(
                                "chunk {d} holds {raw:?} bytes, volume {} has {}-byte extents",
                                rec.name,
                                rec.extent_size()
                            ),
                        );
                    }
                }
            }
        }
        for kv in self.db.entries(Cf::VolumeJournal) {
            let (k, v) = kv?;
            let Some((id, e, seq)) = journal::parse_key(&k) else {
                r.problem(
                    "volume journal",
                    hex::encode(&k),
                    "key is not volume ‖ extent ‖ sequence",
                );
                continue;
            };
            let name = format!("volume id {id} extent {e} record {seq}");
            let Some(rec) = recs.get(&id) else {
                r.problem("volume journal", &name, "belongs to no volume");
                continue;
            };
            if e >= extents(rec.size, rec.extent_shift) {
                r.problem(
                    "volume journal",
                    &name,
                    format!("lies past the end of volume {}", rec.name),
                );
            }
            if journal::decode(&v, rec.extent_size()).is_none() {
                r.problem(
                    "volume journal",
                    &name,
                    "value is not a record inside its extent",
                );
            }
        }
        Ok(())
    }
}
