//! The table of live FUSE mounts, its record in `DATA/mounts.json`, and the cleanup of
//! mounts a killed daemon left behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use castore::Digest;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::log;

/// What is recorded about one mount, in memory and in `mounts.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MountRecord {
    pub(crate) id: u64,
    pub(crate) image: String,
    pub(crate) name: String,
    pub(crate) mountpoint: PathBuf,
    pub(crate) read_only: bool,
}

/// A record plus its live `layerfs` mount.
#[derive(Debug)]
struct Live {
    record: MountRecord,
    image: Digest,
    mount: layerfs::Mount,
}

/// One mount as reported to clients.
#[derive(Debug, Clone)]
pub(crate) struct MountInfo {
    pub(crate) record: MountRecord,
    pub(crate) scratch_bytes: u64,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    live: BTreeMap<u64, Live>,
    /// Mountpoints being mounted right now (reserved before layerfs is called).
    pending: Vec<PathBuf>,
    /// Images of mounts in progress, by mount id: GC roots like live mounts' images.
    pinned: BTreeMap<u64, Digest>,
    closed: bool,
}

/// Every mount of this daemon. Shared with worker threads (gc reads its roots).
#[derive(Debug)]
pub(crate) struct MountTable {
    data: PathBuf,
    inner: Mutex<Inner>,
}

impl MountTable {
    pub(crate) fn new(data: &Path) -> MountTable {
        MountTable {
            data: data.to_path_buf(),
            inner: Mutex::new(Inner {
                next_id: 1,
                ..Inner::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the map itself consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_path(&self) -> PathBuf {
        self.data.join("mounts.json")
    }

    pub(crate) fn scratch_dir(&self, id: u64) -> PathBuf {
        self.data.join("scratch").join(id.to_string())
    }

    /// Reserves `mountpoint` and an id, or says why it cannot be mounted.
    pub(crate) fn reserve(&self, mountpoint: &Path) -> Result<u64, Error> {
        let mut g = self.lock();
        if g.closed {
            return Err(Error::ShuttingDown);
        }
        if g.pending.iter().any(|p| p == mountpoint)
            || g.live.values().any(|l| l.record.mountpoint == mountpoint)
        {
            return Err(Error::AlreadyMounted(mountpoint.to_path_buf()));
        }
        g.pending.push(mountpoint.to_path_buf());
        let id = g.next_id;
        g.next_id += 1;
        Ok(id)
    }

    /// Makes `image` a GC root for mount `id` while layerfs mounts it.
    /// Resolves the image to mount and pins it as a GC root in one step under the table
    /// lock. GC reads the store's names first and this table's roots second (under the
    /// same lock), so an image is either pinned by then or was resolved from a name GC saw.
    pub(crate) fn resolve_and_pin<E>(
        &self,
        id: u64,
        resolve: impl FnOnce() -> Result<Digest, E>,
    ) -> Result<Digest, E> {
        let mut g = self.lock();
        let image = resolve()?;
        g.pinned.insert(id, image);
        Ok(image)
    }

    /// Drops a reservation whose mount failed.
    pub(crate) fn release(&self, id: u64, mountpoint: &Path) {
        let mut g = self.lock();
        g.pending.retain(|p| p != mountpoint);
        g.pinned.remove(&id);
    }

    /// Turns a reservation into a live mount and rewrites `mounts.json`.
    pub(crate) fn insert(&self, record: MountRecord, image: Digest, mount: layerfs::Mount) {
        let mut g = self.lock();
        g.pending.retain(|p| *p != record.mountpoint);
        g.pinned.remove(&record.id);
        g.live.insert(
            record.id,
            Live {
                record,
                image,
                mount,
            },
        );
        self.save(&g);
    }

    /// Removes a mount from the table (the caller unmounts it) and rewrites the record.
    pub(crate) fn take(&self, id: u64) -> Option<(MountRecord, Digest, layerfs::Mount)> {
        let mut g = self.lock();
        let l = g.live.remove(&id)?;
        self.save(&g);
        Some((l.record, l.image, l.mount))
    }

    pub(crate) fn id_at(&self, mountpoint: &Path) -> Option<u64> {
        self.lock()
            .live
            .values()
            .find(|l| l.record.mountpoint == mountpoint)
            .map(|l| l.record.id)
    }

    pub(crate) fn info(&self, id: u64) -> Option<MountInfo> {
        self.lock().live.get(&id).map(|l| MountInfo {
            record: l.record.clone(),
            scratch_bytes: l.mount.scratch_bytes(),
        })
    }

    pub(crate) fn list(&self) -> Vec<MountInfo> {
        let mut v: Vec<MountInfo> = self
            .lock()
            .live
            .values()
            .map(|l| MountInfo {
                record: l.record.clone(),
                scratch_bytes: l.mount.scratch_bytes(),
            })
            .collect();
        v.sort_by(|a, b| a.record.mountpoint.cmp(&b.record.mountpoint));
        v
    }

    /// The images of live mounts and of mounts in progress: GC roots.
    pub(crate) fn images(&self) -> Vec<Digest> {
        let g = self.lock();
        g.live
            .values()
            .map(|l| l.image)
            .chain(g.pinned.values().copied())
            .collect()
    }

    /// Refuses new mounts and hands back every live one, for shutdown.
    pub(crate) fn close(&self) -> Vec<u64> {
        let mut g = self.lock();
        g.closed = true;
        g.live.keys().copied().collect()
    }

    /// Writes `mounts.json` atomically (temporary file, fsync, rename).
    fn save(&self, g: &Inner) {
        let records: Vec<&MountRecord> = g.live.values().map(|l| &l.record).collect();
        if let Err(e) = write_atomic(&self.record_path(), &records) {
            log!(
                "cannot record mounts in {}: {e}",
                self.record_path().display()
            );
        }
    }

    /// Cleans up after a daemon that died with mounts: lazily unmounts every recorded
    /// mountpoint that is still a FUSE mount, empties `DATA/scratch` (scratch never
    /// survives a restart) and starts a new, empty record.
    pub(crate) fn recover(&self) -> std::io::Result<()> {
        let path = self.record_path();
        let records: Vec<MountRecord> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                log!("ignoring unreadable {}: {e}", path.display());
                Vec::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let fuse = fuse_mountpoints();
        for r in &records {
            if fuse.contains(&r.mountpoint) {
                log!(
                    "stale mount of {} at {} (daemon was killed): unmounting",
                    r.image,
                    r.mountpoint.display()
                );
                lazy_unmount(&r.mountpoint);
            }
        }
        let scratch = self.data.join("scratch");
        if scratch.exists() {
            std::fs::remove_dir_all(&scratch)?;
        }
        std::fs::create_dir_all(&scratch)?;
        write_atomic(&path, &Vec::<MountRecord>::new())
    }
}

/// Writes `value` as JSON to `path` atomically and durably: a temporary file, fsynced,
/// renamed over `path`, and the directory fsynced so the rename survives a crash.
pub(crate) fn write_atomic<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Mountpoints of FUSE filesystems in this mount namespace (`/proc/self/mountinfo`).
fn fuse_mountpoints() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let fstype = post.split(' ').next()?;
            if !fstype.starts_with("fuse") {
                return None;
            }
            let mp = pre.split(' ').nth(4)?;
            Some(PathBuf::from(unescape_mountinfo(mp)))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `fusermount3 -u -z`, falling back to `umount -l`.
fn lazy_unmount(mp: &Path) {
    for (prog, args) in [("fusermount3", &["-u", "-z"][..]), ("umount", &["-l"][..])] {
        match Command::new(prog).args(args).arg(mp).status() {
            Ok(s) if s.success() => return,
            Ok(s) => log!("{prog} {} failed: {s}", mp.display()),
            Err(e) => log!("cannot run {prog}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
