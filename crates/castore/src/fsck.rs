//! `fsck`: every chunk re-hashed, every record decoded, every reference followed.

use std::collections::HashSet;

use crossbeam_channel::bounded;

use crate::Digest;
use crate::db::Cf;
use crate::error::{Error, ObjectKind, Result};
use crate::model::{FileData, Kind, Segment};
use crate::store::Store;

/// One thing found broken.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Problem {
    /// What kind of object is affected ("chunk", "tree", "ref", ...).
    pub object: String,
    /// Its name (digest or reference).
    pub name: String,
    /// What is wrong.
    pub problem: String,
}

/// What fsck checked and found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FsckReport {
    /// Chunks verified.
    pub chunks: u64,
    /// Blob records checked.
    pub blobs: u64,
    /// Trees checked.
    pub trees: u64,
    /// Layers checked.
    pub layers: u64,
    /// Images checked.
    pub images: u64,
    /// References checked.
    pub refs: u64,
    /// Volume records checked.
    pub volumes: u64,
    /// Block map entries checked.
    pub extents: u64,
    /// Chunks not in this store that its tier holds (pushed or fetched from it before):
    /// a cache's missing chunks, fetched again when read.
    pub tiered_chunks: u64,
    /// Everything broken; empty means the store is consistent.
    pub problems: Vec<Problem>,
}

impl FsckReport {
    pub(crate) fn problem(&mut self, object: &str, name: impl ToString, problem: impl ToString) {
        self.add(object, name, problem);
    }

    /// Whether nothing is broken.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    fn add(&mut self, object: impl ToString, name: impl ToString, problem: impl ToString) {
        self.problems.push(Problem {
            object: object.to_string(),
            name: name.to_string(),
            problem: problem.to_string(),
        });
    }
}

impl Store {
    /// Checks the whole store. Errors only when the store cannot be read at all; damage
    /// is reported in [`FsckReport::problems`].
    pub fn fsck(&self) -> Result<FsckReport> {
        let mut r = FsckReport::default();
        let mut chunks = self.fsck_chunks(&mut r)?;
        for d in self.tiered_chunks()? {
            if !self.has_chunk(&d)? && chunks.insert(d) {
                r.tiered_chunks += 1;
            }
        }
        let mut blobs = HashSet::new();
        for kv in self.db.entries(Cf::Blobs) {
            let (k, _) = kv?;
            r.blobs += 1;
            let Some(d) = Digest::from_slice(&k) else {
                r.add("blob", hex::encode(&k), "key is not a digest");
                continue;
            };
            match self.blob(&d) {
                Ok(b) => {
                    blobs.insert(d);
                    for s in b.segments {
                        if let Segment::Data { chunk, .. } = s
                            && !chunks.contains(&chunk)
                        {
                            r.add("blob", d, format!("references missing chunk {chunk}"));
                        }
                    }
                }
                Err(e) => r.add("blob", d, e),
            }
        }
        let mut trees = HashSet::new();
        let mut tree_refs: Vec<(Digest, Digest)> = Vec::new();
        for kv in self.db.entries(Cf::Trees) {
            let (k, _) = kv?;
            r.trees += 1;
            let Some(d) = Digest::from_slice(&k) else {
                r.add("tree", hex::encode(&k), "key is not a digest");
                continue;
            };
            match self.tree(&d) {
                Ok(t) => {
                    trees.insert(d);
                    for e in t.entries {
                        let name = String::from_utf8_lossy(&e.name).into_owned();
                        match e.kind {
                            Kind::Dir { tree, .. } => tree_refs.push((d, tree)),
                            Kind::File {
                                data: FileData::Chunk(c),
                                ..
                            } if !chunks.contains(&c) => {
                                r.add(
                                    "tree",
                                    d,
                                    format!("entry {name:?} references missing chunk {c}"),
                                );
                            }
                            Kind::File {
                                data: FileData::Blob(b),
                                ..
                            } if !blobs.contains(&b) => {
                                r.add(
                                    "tree",
                                    d,
                                    format!("entry {name:?} references missing or broken blob {b}"),
                                );
                            }
                            _ => {}
                        }
                    }
                }
                Err(e) => r.add("tree", d, e),
            }
        }
        for (parent, child) in tree_refs {
            if !trees.contains(&child) {
                r.add(
                    "tree",
                    parent,
                    format!("references missing or broken tree {child}"),
                );
            }
        }
        let mut layers = HashSet::new();
        for kv in self.db.entries(Cf::Layers) {
            let (k, _) = kv?;
            r.layers += 1;
            let Some(d) = Digest::from_slice(&k) else {
                r.add("layer", hex::encode(&k), "key is not a digest");
                continue;
            };
            match self.layer(&d) {
                Ok(l) if !trees.contains(&l.root_tree()) => {
                    r.add(
                        "layer",
                        d,
                        format!("root tree {} is missing or broken", l.root_tree()),
                    );
                }
                Ok(_) => {
                    layers.insert(d);
                }
                Err(e) => r.add("layer", d, e),
            }
        }
        let mut images = HashSet::new();
        for kv in self.db.entries(Cf::Images) {
            let (k, _) = kv?;
            r.images += 1;
            let Some(d) = Digest::from_slice(&k) else {
                r.add("image", hex::encode(&k), "key is not a digest");
                continue;
            };
            match self.image(&d) {
                Ok(img) => {
                    let mut ok = true;
                    for l in img.layers {
                        if !layers.contains(&l) {
                            ok = false;
                            r.add("image", d, format!("layer {l} is missing or broken"));
                        }
                    }
                    if ok {
                        images.insert(d);
                    }
                }
                Err(e) => r.add("image", d, e),
            }
        }
        for (name, d) in self.refs()? {
            r.refs += 1;
            if !images.contains(&d) {
                r.add("ref", &name, format!("image {d} is missing or broken"));
            }
        }
        for d in self.layer_refs()? {
            r.refs += 1;
            if !layers.contains(&d) {
                r.add("layer ref", d, "layer is missing or broken");
            }
        }
        self.fsck_volumes(&chunks, &mut r)?;
        Ok(r)
    }

    /// Verifies every stored chunk on all cores; returns the set of good ones.
    fn fsck_chunks(&self, r: &mut FsckReport) -> Result<HashSet<Digest>> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let mut good = HashSet::new();
        let mut stored_keys = HashSet::new();
        std::thread::scope(|s| -> Result<()> {
            let (tx, rx) = bounded::<Box<[u8]>>(threads * 16);
            let (res_tx, res_rx) = bounded::<(Digest, std::result::Result<(), Error>)>(1024);
            for _ in 0..threads {
                let rx = rx.clone();
                let res_tx = res_tx.clone();
                s.spawn(move || {
                    for k in rx {
                        if let Some(d) = Digest::from_slice(&k) {
                            let res = self.chunk(&d).map(|_| ());
                            if res_tx.send((d, res)).is_err() {
                                break;
                            }
                        }
                    }
                });
            }
            drop(rx);
            drop(res_tx);
            let collector = s.spawn(move || {
                let mut ok = HashSet::new();
                let mut bad = Vec::new();
                for (d, res) in res_rx {
                    match res {
                        Ok(()) => {
                            ok.insert(d);
                        }
                        Err(e) => bad.push((d, e)),
                    }
                }
                (ok, bad)
            });
            for k in self.db.keys(Cf::ChunkIndex) {
                let k = k?;
                r.chunks += 1;
                if Digest::from_slice(&k).is_none() {
                    r.add("chunk", hex::encode(&k), "index key is not a digest");
                    continue;
                }
                stored_keys.insert(Digest::from_slice(&k).expect("checked"));
                if tx.send(k).is_err() {
                    break;
                }
            }
            drop(tx);
            let (ok, bad) = collector.join().expect("fsck collector panicked");
            good = ok;
            for (d, e) in bad {
                let kind = match e {
                    Error::Missing { .. } => "indexed but its data is missing".to_string(),
                    e => e.to_string(),
                };
                r.add(ObjectKind::Chunk, d, kind);
            }
            Ok(())
        })?;
        // Data without an index entry is invisible to GC: report it.
        for k in self.db.keys(Cf::Chunks) {
            let k = k?;
            if let Some(d) = Digest::from_slice(&k)
                && !stored_keys.contains(&d)
            {
                r.add(ObjectKind::Chunk, d, "stored but not indexed");
            }
        }
        Ok(good)
    }
}
