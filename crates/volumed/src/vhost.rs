//! The host's vhost-user-blk sockets: any export (a volume, an attachment `NAME/ID`, a
//! snapshot, a layer's EROFS image) served to one VMM at a time on a socket of its own
//! (`layerfs::vhost`).
//!
//! A socket opens its export exactly as an NBD client's `OPT_GO` does
//! ([`HostExports::open`] with [`Intent::Serve`]), so access modes hold the same way: an
//! rwo volume served on a socket is held by it, and a second socket, an NBD connection
//! or an attachment for someone else is refused naming the holder. The export stays
//! open, and its device (a GC root while open, as for NBD) alive, until the socket is
//! stopped, across the VMM's reconnects.
//!
//! Two kinds of socket: ones a user asked for (`tide volume vhost`, `tide volume attach
//! --vhost-user`), recorded in `DATA/vhost-user.json` and served again when volumed
//! restarts, under `DATA/vhost/`; and a guest's disks, which live in the guest's
//! directory and are served again by the guest's adoption ([`crate::guests`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use layerfs::nbd::{Exports, Intent};
use layerfs::vhost::{BlkOptions, Served};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::exports::HostExports;
use crate::log;

/// Queues each device offers: QEMU's `num-queues` (a guest's vCPUs, capped at this by
/// the launcher) must not exceed it.
pub(crate) const QUEUES: u16 = 8;

/// One recorded socket (`DATA/vhost-user.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) export: String,
    /// What GET_ID answers (the guest's serial).
    pub(crate) id: String,
    pub(crate) socket: PathBuf,
}

/// A socket being served, as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Socket {
    pub(crate) export: String,
    pub(crate) id: String,
    pub(crate) socket: PathBuf,
    /// Recorded (served again after a restart) rather than a guest's.
    pub(crate) recorded: bool,
    /// A VMM is connected now.
    pub(crate) connected: bool,
    /// VMM sessions so far (a reconnect is one more).
    pub(crate) sessions: u64,
}

struct Entry {
    record: Record,
    recorded: bool,
    served: Served,
}

/// Every vhost-user socket of the host.
pub(crate) struct VhostUser {
    exports: HostExports,
    /// `DATA/vhost`: recorded sockets.
    dir: PathBuf,
    /// `DATA/vhost-user.json`.
    file: PathBuf,
    /// Queues per device (at least the vCPUs of any guest using it: QEMU refuses a
    /// backend with fewer than its `num-queues`).
    queues: u16,
    served: Mutex<BTreeMap<PathBuf, Entry>>,
}

impl std::fmt::Debug for VhostUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUser").field("dir", &self.dir).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a recorded socket for `export` lives: named by a digest of the name, since
/// export names (up to 128 bytes, or `layer/` and 64 hex digits) do not fit in a Unix
/// socket path.
fn recorded_socket(dir: &Path, export: &str) -> PathBuf {
    let hex = castore::Digest::of(export.as_bytes()).to_hex();
    dir.join(format!("{}.sock", &hex[..16]))
}

impl VhostUser {
    /// The registry for the host's `exports`, keeping its records under `data`.
    pub(crate) fn new(exports: HostExports, data: &Path, queues: u16) -> Arc<VhostUser> {
        Arc::new(VhostUser {
            exports,
            dir: data.join("vhost"),
            file: data.join("vhost-user.json"),
            queues: queues.max(1),
            served: Mutex::new(BTreeMap::new()),
        })
    }

    /// Serves every recorded socket again (volumed's start). One that cannot be served
    /// (its volume was removed, say) is logged and forgotten.
    pub(crate) fn restore(&self) {
        let records: Vec<Record> = match std::fs::read(&self.file) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(r) => r,
                Err(e) => {
                    log!(
                        "{}: not valid ({e}); no vhost-user socket restored",
                        self.file.display()
                    );
                    return;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                log!(
                    "{}: {e}; no vhost-user socket restored",
                    self.file.display()
                );
                return;
            }
        };
        for r in records {
            match self.start(&r.export, &r.id, &r.socket, true) {
                Ok(_) => log!(
                    "vhost-user: serving {} on {} again",
                    r.export,
                    r.socket.display()
                ),
                Err(e) => log!("vhost-user: not serving {} again: {e}", r.export),
            }
        }
        if let Err(e) = self.save(&lock(&self.served)) {
            log!("vhost-user: {e}");
        }
    }

    /// Serves `export` on a recorded socket under `DATA/vhost` (kept across restarts
    /// until [`VhostUser::stop`]); returns the socket.
    pub(crate) fn serve_recorded(&self, export: &str, id: Option<&str>) -> Result<PathBuf, Error> {
        let id = id.map_or_else(|| layerfs::vhost::default_id(export), str::to_string);
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::Io(self.dir.display().to_string(), e))?;
        let socket = recorded_socket(&self.dir, export);
        if let Some(e) = lock(&self.served).get(&socket) {
            return Err(Error::BadRequest(format!(
                "{export} is served on vhost-user socket {} already",
                e.record.socket.display()
            )));
        }
        self.start(export, &id, &socket, true)?;
        let served = lock(&self.served);
        if let Err(e) = self.save(&served) {
            drop(served);
            self.stop(&socket);
            return Err(e);
        }
        Ok(socket)
    }

    /// Serves `export` to a guest on `socket` (in its directory; not recorded).
    pub(crate) fn serve_guest(&self, export: &str, id: &str, socket: &Path) -> Result<(), Error> {
        self.start(export, id, socket, false)
    }

    fn start(&self, export: &str, id: &str, socket: &Path, recorded: bool) -> Result<(), Error> {
        // A socket path is served once: a previous server there (a guest relaunched)
        // ends first, or its shutdown would remove the new socket file.
        let old = lock(&self.served).remove(socket);
        drop(old);
        let holder = format!("vhost-user socket {}", socket.display());
        let opened = self
            .exports
            .open(export, Intent::Serve, &holder)
            .map_err(|e| Error::BadRequest(format!("{export}: {e}")))?;
        let opts = BlkOptions {
            id: id.to_string(),
            queues: self.queues,
            ..BlkOptions::default()
        };
        let name = format!("vhost-user {export}");
        let served = layerfs::vhost::serve(
            socket,
            opened.device,
            opts,
            name,
            Arc::new(|line: String| log!("{line}")),
        )
        .map_err(|e| match e.kind() {
            // The request's fault (an id over 20 bytes), not the daemon's.
            std::io::ErrorKind::InvalidInput => Error::BadRequest(e.to_string()),
            _ => Error::Io(socket.display().to_string(), e),
        })?;
        let record = Record {
            export: export.to_string(),
            id: id.to_string(),
            socket: socket.to_path_buf(),
        };
        lock(&self.served).insert(
            socket.to_path_buf(),
            Entry {
                record,
                recorded,
                served,
            },
        );
        Ok(())
    }

    /// Stops the socket at `socket`; whether there was one.
    pub(crate) fn stop(&self, socket: &Path) -> bool {
        let (entry, saved) = {
            let mut served = lock(&self.served);
            let entry = served.remove(socket);
            let saved = match &entry {
                Some(e) if e.recorded => self.save(&served),
                _ => Ok(()),
            };
            (entry, saved)
        };
        if let Err(e) = saved {
            log!("vhost-user: {e}");
        }
        // Dropped outside the lock: ending a session waits for its thread.
        entry.is_some()
    }

    /// Stops every recorded socket serving `export`; how many there were.
    pub(crate) fn stop_recorded(&self, export: &str) -> usize {
        self.stop_where(|e| e.recorded && e.record.export == export)
    }

    /// Stops every socket serving `export`; how many there were.
    pub(crate) fn stop_export(&self, export: &str) -> usize {
        self.stop_where(|e| e.record.export == export)
    }

    /// Stops every socket under the directory `dir` (a guest's); how many there were.
    pub(crate) fn stop_under(&self, dir: &Path) -> usize {
        self.stop_where(|e| e.record.socket.starts_with(dir))
    }

    fn stop_where(&self, pick: impl Fn(&Entry) -> bool) -> usize {
        let sockets: Vec<PathBuf> = lock(&self.served)
            .values()
            .filter(|e| pick(e))
            .map(|e| e.record.socket.clone())
            .collect();
        sockets.iter().filter(|s| self.stop(s)).count()
    }

    /// Every socket, by path.
    pub(crate) fn list(&self) -> Vec<Socket> {
        lock(&self.served)
            .values()
            .map(|e| Socket {
                export: e.record.export.clone(),
                id: e.record.id.clone(),
                socket: e.record.socket.clone(),
                recorded: e.recorded,
                connected: e.served.connected(),
                sessions: e.served.sessions(),
            })
            .collect()
    }

    /// Stops everything (volumed's shutdown); records stay for the next run.
    pub(crate) fn stop_all(&self) {
        let all = std::mem::take(&mut *lock(&self.served));
        drop(all);
    }

    fn save(&self, served: &BTreeMap<PathBuf, Entry>) -> Result<(), Error> {
        let records: Vec<&Record> = served
            .values()
            .filter(|e| e.recorded)
            .map(|e| &e.record)
            .collect();
        crate::mounts::write_atomic(&self.file, &records)
            .map_err(|e| Error::Io(self.file.display().to_string(), e))
    }
}
