//! layerfs: presents an image's layers plus a writable scratch layer as one root.
//!
//! `overlay` is the model (OCI whiteouts, opaque directories, copy-up, no FUSE types);
//! `fuse` adapts it to the kernel through `fuser`; `nbd` is an NBD server (protocol
//! only) that volumed gives its exports. It knows nothing of volumes'
//! lifecycle or scheduling.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use castore::{Digest, Store};

pub mod block;
pub mod erofs;
mod fuse;
pub mod nbd;
mod overlay;
pub mod vhost;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Refuse every write (EROFS); no scratch layer is used.
    pub read_only: bool,
    /// Directory for this mount's scratch layer (created; emptied on unmount).
    pub scratch_dir: PathBuf,
}

/// Why a mount failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store could not provide the image.
    #[error(transparent)]
    Store(#[from] castore::Error),
    /// The kernel refused the mount or another OS call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A live mount; dropping it unmounts and deletes the scratch directory.
#[derive(Debug)]
pub struct Mount {
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
    overlay: Arc<overlay::Overlay>,
    /// The scratch directory to delete on unmount (`None` for read-only mounts).
    scratch: Option<PathBuf>,
}

impl Mount {
    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Bytes used by the scratch layer.
    pub fn scratch_bytes(&self) -> u64 {
        self.overlay.scratch_bytes()
    }

    /// Unmounts and discards the scratch layer. If the mount is in use this fails with
    /// EBUSY and the `Mount`, dropped, detaches lazily (it goes away with its last user);
    /// use [`Mount::try_unmount`] to keep it instead.
    pub fn unmount(mut self) -> Result<(), Error> {
        self.shutdown(false)
    }

    /// Like [`Mount::unmount`], but a busy mount stays mounted and usable, and the call
    /// can be retried. After success the `Mount` only holds its mountpoint.
    pub fn try_unmount(&mut self) -> Result<(), Error> {
        self.shutdown(false)
    }

    fn shutdown(&mut self, lazy: bool) -> Result<(), Error> {
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { op, path, source }
        };
        if let Some(session) = self.session.take() {
            match umount(&self.mountpoint, 0) {
                // EINVAL: already unmounted (by `umount` from a shell, say); the session
                // has ended or is ending.
                Ok(()) => session.join().map_err(io("unmount", &self.mountpoint))?,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    session.join().map_err(io("unmount", &self.mountpoint))?
                }
                Err(e) if lazy => {
                    // Busy and we are being dropped: detach it so it disappears when its
                    // last user leaves; the session thread serves them until then.
                    eprintln!(
                        "layerfs: {} is busy ({e}); detaching it lazily",
                        self.mountpoint.display()
                    );
                    let _ = umount(&self.mountpoint, libc::MNT_DETACH);
                    drop(session);
                }
                Err(e) => {
                    self.session = Some(session);
                    return Err(io("unmount", &self.mountpoint)(e));
                }
            }
        }
        if let Some(dir) = self.scratch.take() {
            std::fs::remove_dir_all(&dir).map_err(io("remove scratch", &dir))?;
        }
        Ok(())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown(true) {
            eprintln!("layerfs: {e}");
        }
    }
}

/// Kernel readahead we want for a mount, in KiB.
pub(crate) const READ_AHEAD_KB: u32 = 8 << 10;

/// Raises the mount's readahead to [`READ_AHEAD_KB`].
///
/// A FUSE mount's readahead is its bdi's (`/sys/class/bdi/0:MINOR`, MINOR of the mount's
/// anonymous `st_dev`), 128 KiB by default and capped at INIT by what the server answers
/// (the kernel only offers that default). At 128 KiB the kernel keeps only one or two
/// 128 KiB reads in flight to us, so a cold sequential read is a chain of small
/// synchronous chunk reads. With 8 MiB, reads arrive as 1 MiB requests (max_pages),
/// several at once, and the prefetcher sees long sequential runs. The `stat` below is
/// served by our own session threads and only returns after INIT has been answered, so
/// INIT cannot lower the value again afterwards. Needs root (volumed is); if sysfs
/// refuses, the mount works as before, with the default.
fn raise_readahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let dev = match std::fs::metadata(mountpoint) {
        Ok(md) => md.dev(),
        Err(e) => {
            eprintln!("layerfs: readahead of {}: {e}", mountpoint.display());
            return;
        }
    };
    // glibc's major()/minor() for Linux's dev_t encoding.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    if major != 0 {
        // Not an anonymous device: not our FUSE mount (the stat did not reach it).
        return;
    }
    let path = format!("/sys/class/bdi/0:{minor}/read_ahead_kb");
    let current = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    if current.is_some_and(|kb| kb >= READ_AHEAD_KB) {
        return;
    }
    if let Err(e) = std::fs::write(&path, READ_AHEAD_KB.to_string()) {
        eprintln!("layerfs: cannot raise readahead ({path}: {e}); keeping the default");
    }
}

/// `umount2(2)`.
fn umount(mountpoint: &Path, flags: libc::c_int) -> std::io::Result<()> {
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Mounts `image` from `store` at `mountpoint` through FUSE.
///
/// Options are those of a root filesystem: `allow_other` (every user of the host or of
/// a chroot sees it), `dev` and `suid` (device nodes and setuid binaries of the image
/// work), and `default_permissions`: the kernel checks modes and owners against the
/// attributes we report with the same code ext4 uses, so permission semantics (sticky
/// directories, ownership for chmod/chown, setgid) match a disk and the overlay does not
/// re-implement them. Root still bypasses them as on any filesystem.
pub fn mount(
    store: Arc<Store>,
    image: Digest,
    mountpoint: &Path,
    opts: MountOptions,
) -> Result<Mount, Error> {
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { op, path, source }
    };
    if !opts.read_only {
        std::fs::create_dir_all(&opts.scratch_dir).map_err(io("create", &opts.scratch_dir))?;
    }
    let overlay = Arc::new(overlay::Overlay::new(
        store,
        &image,
        opts.read_only,
        opts.scratch_dir.clone(),
    )?);
    let mut mount_options = vec![
        fuser::MountOption::FSName(format!("tidedge:{}", image.short())),
        fuser::MountOption::Subtype("layerfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::Dev,
        fuser::MountOption::Suid,
        fuser::MountOption::Exec,
    ];
    mount_options.push(if opts.read_only {
        fuser::MountOption::RO
    } else {
        fuser::MountOption::RW
    });
    let mut config = fuser::Config::default();
    config.mount_options = mount_options;
    config.acl = fuser::SessionACL::All;
    // Two cores here; more threads let a slow store read not block cached lookups.
    config.n_threads = Some(4);
    config.clone_fd = true;
    let session = fuser::spawn_mount(fuse::Fuse::new(overlay.clone()), mountpoint, &config)
        .map_err(io("mount", mountpoint))?;
    raise_readahead(mountpoint);
    Ok(Mount {
        mountpoint: mountpoint.to_path_buf(),
        session: Some(session),
        overlay,
        scratch: (!opts.read_only).then_some(opts.scratch_dir),
    })
}
