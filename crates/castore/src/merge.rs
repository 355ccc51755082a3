//! Merging one directory across an image's layers, with OCI semantics: later layers win,
//! whiteouts delete lower names, opaque directories hide lower layers' contents, and
//! directories present in several layers merge (the highest one's metadata wins).
//! Shared by export and by layerfs's lazy overlay.

use std::collections::BTreeMap;

use crate::Digest;
use crate::error::Result;
use crate::model::{Entry, Kind};
use crate::store::Store;

/// One name of a merged directory.
#[derive(Debug, Clone)]
pub struct Merged {
    /// The entry from the highest layer that has it.
    pub entry: Entry,
    /// That layer's index (0 is the lowest).
    pub layer: usize,
    /// For directories: the trees of every layer that contributes to it, lowest first,
    /// ready to be passed to [`merge_dir`] again. Empty for other kinds.
    pub sources: Vec<(usize, Digest)>,
}

/// Merges the trees `sources` (layer index, tree digest; lowest layer first) of one
/// directory. With `keep_whiteouts` (exporting a single layer as stored) whiteouts are
/// returned as entries and opaque markers do not hide anything.
pub fn merge_dir(
    store: &Store,
    sources: &[(usize, Digest)],
    keep_whiteouts: bool,
) -> Result<BTreeMap<Vec<u8>, Merged>> {
    let mut out: BTreeMap<Vec<u8>, Merged> = BTreeMap::new();
    for &(layer, d) in sources {
        let tree = store.tree(&d)?;
        for e in tree.entries {
            match &e.kind {
                Kind::Whiteout if !keep_whiteouts => {
                    out.remove(&e.name);
                }
                Kind::Dir { tree, opaque } => {
                    let keep_lower = !opaque && !keep_whiteouts;
                    match out.get_mut(&e.name) {
                        Some(m) if keep_lower && matches!(m.entry.kind, Kind::Dir { .. }) => {
                            m.sources.push((layer, *tree));
                            m.entry = e.clone();
                            m.layer = layer;
                        }
                        _ => {
                            out.insert(
                                e.name.clone(),
                                Merged {
                                    sources: vec![(layer, *tree)],
                                    entry: e,
                                    layer,
                                },
                            );
                        }
                    }
                }
                _ => {
                    out.insert(
                        e.name.clone(),
                        Merged {
                            entry: e,
                            layer,
                            sources: Vec::new(),
                        },
                    );
                }
            }
        }
    }
    Ok(out)
}

/// The root of an image: its metadata (from the highest layer that describes its root)
/// and the root trees to merge (an opaque root drops everything below it).
pub fn image_root(store: &Store, image: &Digest) -> Result<(Entry, Vec<(usize, Digest)>)> {
    let img = store.image(image)?;
    let layers = img
        .layers
        .iter()
        .map(|d| store.layer(d))
        .collect::<Result<Vec<_>>>()?;
    let root = layers
        .iter()
        .rev()
        .find(|l| l.root_described)
        .or(layers.first())
        .map(|l| l.root.clone())
        .ok_or_else(|| crate::Error::Refused(format!("image {image} has no layers")))?;
    let mut sources = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        if matches!(l.root.kind, Kind::Dir { opaque: true, .. }) {
            sources.clear();
        }
        sources.push((i, l.root_tree()));
    }
    Ok((root, sources))
}
