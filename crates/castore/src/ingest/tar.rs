//! Importing a tar stream (already decompressed) as one layer.

use std::io::Read;

use super::pipeline::Producer;
use super::tree::{BuildTree, Meta, Node, NodeKind};
use super::{OPAQUE, WHITEOUT_PREFIX};
use crate::error::{Error, Result};
use crate::model::valid_name;
use crate::tarfmt::{SparseExpand, TarError, TarKind, TarReader};

/// Archive members larger than this are chunked as a stream by the reader thread instead
/// of being handed whole to a worker.
const IN_MEMORY_MAX: u64 = 16 << 20;
/// Most entries one layer may have (bounds the memory a hostile archive can make us use).
const MAX_ENTRIES: u64 = 4_000_000;

/// Splits an archive path into components: `./` and empty parts are dropped; absolute
/// paths and `..` are refused.
pub(crate) fn components(path: &[u8]) -> Result<Vec<&[u8]>, &'static str> {
    if path.first() == Some(&b'/') {
        return Err("absolute path");
    }
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("path contains '..'"),
            c if !valid_name(c) => return Err("invalid name"),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn dev(major: u32, minor: u32) -> u64 {
    libc::makedev(major, minor)
}

pub(crate) fn tar_error(source_name: &str, e: TarError) -> Error {
    match e.entry {
        Some(entry) => Error::BadEntry {
            source_name: source_name.to_string(),
            entry: String::from_utf8_lossy(&entry).into_owned(),
            reason: e.reason,
        },
        None => Error::BadInput {
            source_name: source_name.to_string(),
            reason: format!("{} (at byte {})", e.reason, e.offset),
        },
    }
}

/// Reads every entry of `reader` into `tree`. Returns the reader so the caller can check
/// what follows the end marker (a compressed stream's trailer).
pub(crate) fn read<R: Read>(
    producer: &Producer<'_, '_>,
    reader: R,
    tree: &mut BuildTree,
    source_name: &str,
) -> Result<R> {
    let mut t = TarReader::new(reader);
    let mut count = 0u64;
    let mut buf = Vec::new();
    while let Some(e) = t.next_entry().map_err(|e| tar_error(source_name, e))? {
        if producer.aborted() {
            break;
        }
        count += 1;
        if count > MAX_ENTRIES {
            return Err(Error::BadInput {
                source_name: source_name.to_string(),
                reason: format!("more than {MAX_ENTRIES} entries in one layer"),
            });
        }
        let entry_name = String::from_utf8_lossy(&e.path).into_owned();
        let bad = |reason: String| Error::BadEntry {
            source_name: source_name.to_string(),
            entry: entry_name.clone(),
            reason,
        };
        let comps = components(&e.path).map_err(|r| bad(r.to_string()))?;
        let kind = e.kind.expect("reader sets the kind");
        let meta = Meta {
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            xattrs: e.xattrs.clone(),
        };
        let Some((&last, parents)) = comps.split_last() else {
            // The archive's root directory itself.
            if kind != TarKind::Dir {
                return Err(bad("the archive root must be a directory".into()));
            }
            tree.root.meta = meta;
            tree.root_described = true;
            continue;
        };
        if last == OPAQUE {
            let dir = tree.dir_mut(parents).map_err(bad)?;
            if let NodeKind::Dir { opaque, .. } = &mut dir.kind {
                *opaque = true;
            }
            continue;
        }
        if let Some(hidden) = last.strip_prefix(WHITEOUT_PREFIX) {
            if !valid_name(hidden) {
                return Err(bad("whiteout of an invalid name".into()));
            }
            let mut p: Vec<&[u8]> = parents.to_vec();
            p.push(hidden);
            let node = Node {
                meta,
                kind: NodeKind::Whiteout,
                ino: tree.new_ino(),
            };
            tree.insert(&p, node).map_err(bad)?;
            continue;
        }
        let node = match kind {
            TarKind::Dir => Node::dir(meta),
            TarKind::File => {
                let slot = if let Some(map) = e.sparse.clone() {
                    let mut r = SparseExpand::new(t.data(), map, e.size);
                    producer.stream(source_name, &entry_name, &mut r)?
                } else if e.size > IN_MEMORY_MAX {
                    producer.stream(source_name, &entry_name, &mut t.data())?
                } else {
                    t.read_data(&mut buf).map_err(|e| {
                        tar_error(source_name, e).context(format!("reading {entry_name}"))
                    })?;
                    producer.bytes(entry_name.clone(), std::mem::take(&mut buf))?
                };
                Node {
                    meta,
                    kind: NodeKind::File { slot },
                    ino: tree.new_ino(),
                }
            }
            TarKind::HardLink => {
                let target = components(&e.link).map_err(|r| {
                    bad(format!(
                        "hardlink target {}: {r}",
                        String::from_utf8_lossy(&e.link)
                    ))
                })?;
                let found = tree
                    .get(&target)
                    .filter(|n| !n.is_dir() && !matches!(n.kind, NodeKind::Whiteout));
                let Some(found) = found else {
                    return Err(bad(format!(
                        "hardlink target {} is not a file earlier in this layer",
                        String::from_utf8_lossy(&e.link)
                    )));
                };
                let n = found.clone();
                tree.add_link(n.ino);
                n
            }
            TarKind::Symlink => Node {
                meta,
                kind: NodeKind::Symlink(e.link.clone()),
                ino: tree.new_ino(),
            },
            TarKind::CharDev => Node {
                meta,
                kind: NodeKind::CharDev(dev(e.dev_major, e.dev_minor)),
                ino: tree.new_ino(),
            },
            TarKind::BlockDev => Node {
                meta,
                kind: NodeKind::BlockDev(dev(e.dev_major, e.dev_minor)),
                ino: tree.new_ino(),
            },
            TarKind::Fifo => Node {
                meta,
                kind: NodeKind::Fifo,
                ino: tree.new_ino(),
            },
        };
        tree.insert(&comps, node).map_err(bad)?;
    }
    Ok(t.into_inner())
}

#[cfg(test)]
mod tests {
    use super::components;

    #[test]
    fn path_rules() {
        assert_eq!(
            components(b"./a//b/./c/").unwrap(),
            vec![&b"a"[..], b"b", b"c"]
        );
        assert!(components(b"").unwrap().is_empty());
        assert!(components(b"/etc/passwd").is_err());
        assert!(components(b"a/../../b").is_err());
    }
}
