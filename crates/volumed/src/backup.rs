//! `--backup-every`: scheduled pushes of the host's volumes to the chunk tier, so that a
//! volume whose host dies is lost only back to its last push. Each round pushes every
//! volume written since its last pushed snapshot (`pushed-SECONDS`, taken by the push:
//! every write acknowledged before it is in it), then drops the older pushed snapshot
//! here (the tier keeps what it was sent). Scratch devices and their template, and
//! per-instance templates, are not pushed: they hold nothing an instance keeps.

use std::sync::Arc;
use std::time::Duration;

use castore::{PUSHED_PREFIX, Store, TierProgress};

use crate::log;

/// Whether volume `name` is one a backup skips (scratch devices, their template).
fn skipped(name: &str) -> bool {
    name.starts_with("scratch.") || name.starts_with("scratch-template.")
}

/// The newest snapshot of `name` a push took, if any.
fn last_pushed(store: &Store, name: &str) -> castore::Result<Option<String>> {
    Ok(store
        .volume_snapshots(name)?
        .into_iter()
        .filter(|s| s.name.starts_with(PUSHED_PREFIX))
        .max_by_key(|s| s.generation)
        .map(|s| s.name))
}

/// One round: pushes what changed. Returns the volumes pushed.
pub(crate) fn round(store: &Store, host: &str) -> castore::Result<Vec<String>> {
    let mut pushed = Vec::new();
    for v in store.volumes()? {
        if v.instances.is_some() || skipped(&v.name) {
            continue;
        }
        let last = last_pushed(store, &v.name)?;
        if let Some(l) = &last
            && !store.volume_changed_since(&v.name, l)?
        {
            continue;
        }
        match store.push_volume(&v.name, None, host, &TierProgress::default()) {
            Ok(r) => {
                log!(
                    "backup: pushed volume {} as {}: {} of {} chunks sent ({} B) in {:.2} s",
                    v.name,
                    r.snapshot,
                    r.transferred,
                    r.transferred + r.skipped,
                    r.bytes,
                    r.seconds
                );
                if let Some(l) = last
                    && let Err(e) = store.delete_snapshot(&v.name, &l, false)
                {
                    log!("backup: keeping snapshot {}@{l}: {e}", v.name);
                }
                pushed.push(v.name);
            }
            // One volume's failure (the tier unreachable, the volume deleted meanwhile)
            // does not stop the others; the next round tries again.
            Err(e) => log!("backup: volume {}: {e}", v.name),
        }
    }
    Ok(pushed)
}

/// Runs [`round`] every `every`, on a thread of its own.
pub(crate) fn start(store: Arc<Store>, every: Duration, host: String) {
    std::thread::Builder::new()
        .name("backup".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                if let Err(e) = round(&store, &host) {
                    log!("backup: {e}");
                }
            }
        })
        .expect("spawning the backup thread");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_pushes_what_changed_and_keeps_one_pushed_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(tmp.path().join("store")).unwrap());
        store
            .set_tier(Arc::new(
                castore::DirTier::open(tmp.path().join("tier")).unwrap(),
            ))
            .unwrap();
        for name in ["db", "scratch.web-0"] {
            store
                .create_volume(&castore::VolumeSpec::new(name, 1 << 20))
                .unwrap();
        }
        let v = store.open_volume("db").unwrap();
        v.write(0, &[7; 4096], true).unwrap();
        assert_eq!(round(&store, "h1").unwrap(), ["db"], "scratch is skipped");
        let first = last_pushed(&store, "db").unwrap().unwrap();
        assert_eq!(
            round(&store, "h1").unwrap(),
            Vec::<String>::new(),
            "unchanged"
        );
        v.write(65536, &[8; 512], false).unwrap();
        assert_eq!(round(&store, "h1").unwrap(), ["db"]);
        let second = last_pushed(&store, "db").unwrap().unwrap();
        assert_ne!(first, second);
        let snaps: Vec<String> = store
            .volume_snapshots("db")
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(
            snaps,
            std::slice::from_ref(&second),
            "the older pushed snapshot is dropped"
        );
        let t = store.pushed_volume("db").unwrap();
        assert_eq!(
            (t.snapshot.as_str(), t.host.as_str()),
            (second.as_str(), "h1")
        );
    }
}
