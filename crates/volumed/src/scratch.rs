//! Scratch devices: an instance's writable upper layer, a volume that is already an
//! empty ext4 filesystem, so a guest mounts it at once and never formats at boot.
//!
//! One template volume per scratch size (`scratch-template.SIZE`) is formatted once with
//! `mkfs.ext4` (into a sparse file under `DATA/tmp`, whose written extents are copied
//! into the volume: zeros cost nothing) and snapshotted as `formatted`. Each instance's
//! scratch (`scratch.INSTANCE`) is a clone of that snapshot: O(1), no chunk written, and
//! fresh every time one is made, so a restarted instance gets the root it started with.
//! The inode tables and journal are initialised at format time
//! (`lazy_itable_init=0,lazy_journal_init=0`), so the guest's kernel does not zero them
//! in the background through the device.

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use castore::{VolumeError, VolumeSpec};

use crate::error::Error;
use crate::log;
use crate::volumes::Volumes;

/// The snapshot every scratch device is cloned from.
const FORMATTED: &str = "formatted";

/// The filesystem UUID and directory hash seed of every scratch filesystem: fixed, so
/// the template's bytes depend only on its size and the e2fsprogs version.
const FS_UUID: &str = "5c7a3d1e-9b2f-4e61-8a0d-7f3c2b1e4d59";

/// Instances' scratch devices of one size.
#[derive(Debug)]
pub(crate) struct Scratch {
    volumes: Arc<Volumes>,
    size: u64,
    tmp: PathBuf,
    /// Serialises template creation.
    lock: Mutex<()>,
}

/// `10g`, `512m`: the size in the largest binary unit that divides it.
fn size_label(size: u64) -> String {
    for (shift, unit) in [(40, "t"), (30, "g"), (20, "m"), (10, "k")] {
        if size.is_multiple_of(1 << shift) {
            return format!("{}{unit}", size >> shift);
        }
    }
    size.to_string()
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Io(what, e)
}

impl Scratch {
    /// Scratch devices of `size` bytes, formatted under `DATA/tmp`.
    pub(crate) fn new(volumes: Arc<Volumes>, data: &Path, size: u64) -> Scratch {
        Scratch {
            volumes,
            size,
            tmp: data.join("tmp"),
            lock: Mutex::new(()),
        }
    }

    /// The size of every scratch device.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// The template volume's name.
    pub(crate) fn template(&self) -> String {
        format!("scratch-template.{}", size_label(self.size))
    }

    /// The scratch volume of `instance`.
    pub(crate) fn volume_name(instance: &str) -> String {
        format!("scratch.{instance}")
    }

    /// Makes the template if it is missing (or was left half-made by a crash).
    fn ensure_template(&self) -> Result<String, Error> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let name = self.template();
        let store = self.volumes.store();
        match store.volume_snapshots(&name) {
            Ok(s) if s.iter().any(|s| s.name == FORMATTED) => return Ok(name),
            Ok(_) => {
                log!(
                    "scratch: template {name} has no {FORMATTED} snapshot (an earlier run stopped while making it); making it again"
                );
                self.volumes.remove(&name, true)?;
            }
            Err(castore::Error::Volume(VolumeError::NotFound { .. })) => {}
            Err(e) => return Err(e.into()),
        }
        let started = std::time::Instant::now();
        std::fs::create_dir_all(&self.tmp)
            .map_err(io(format!("creating {}", self.tmp.display())))?;
        let file = self.tmp.join(format!("{name}.ext4"));
        let r = self.format(&name, &file);
        let _ = std::fs::remove_file(&file);
        r?;
        log!(
            "scratch: template {name} formatted (ext4, {} bytes) in {:.0} ms",
            self.size,
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(name)
    }

    fn format(&self, name: &str, file: &Path) -> Result<(), Error> {
        self.volumes
            .create(&VolumeSpec::new(name.to_string(), self.size))?;
        let r = mkfs_into(
            &self.volumes,
            name,
            self.size,
            file,
            "scratch",
            Some(FS_UUID),
        )
        .and_then(|()| {
            self.volumes.store().snapshot_volume(name, FORMATTED)?;
            Ok(())
        });
        if r.is_err() {
            let _ = self.volumes.remove(name, true);
        }
        r
    }

    /// Formats volume `name` with ext4 if it is blank (reads as zeros throughout), for
    /// a guest to mount; a volume that already holds ext4 is left alone, one that holds
    /// anything else is refused (never reformatted). Returns whether it formatted.
    pub(crate) fn format_if_blank(&self, name: &str) -> Result<bool, Error> {
        let vol = self.volumes.store().open_volume(name)?;
        let size = vol.size()?;
        let mut sb = vec![0u8; 4096.min(size as usize)];
        vol.read_at(0, &mut sb)?;
        if sb.len() >= 1082 && sb[1080..1082] == [0x53, 0xef] {
            return Ok(false);
        }
        let mut off = 0;
        while off < size {
            for run in vol.block_status(off, size - off)? {
                if !run.zero {
                    return Err(Error::BadRequest(format!(
                        "volume {name} holds data that is not an ext4 filesystem: a guest mounts \
                         volumes as ext4, and volumed formats only blank ones"
                    )));
                }
                off += run.len;
            }
        }
        drop(vol);
        let started = std::time::Instant::now();
        std::fs::create_dir_all(&self.tmp)
            .map_err(io(format!("creating {}", self.tmp.display())))?;
        let file = self.tmp.join(format!("{name}.ext4"));
        let r = mkfs_into(&self.volumes, name, size, &file, "", None);
        let _ = std::fs::remove_file(&file);
        r?;
        log!(
            "volume {name}: blank, formatted ext4 ({size} bytes) in {:.0} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(true)
    }

    /// A fresh scratch device for `instance` (any earlier one is discarded).
    pub(crate) fn create(&self, instance: &str) -> Result<String, Error> {
        let template = self.ensure_template()?;
        let name = Scratch::volume_name(instance);
        self.remove(instance)?;
        self.volumes
            .store()
            .clone_volume(&template, FORMATTED, &name)?;
        Ok(name)
    }

    /// Discards `instance`'s scratch device, if it has one.
    pub(crate) fn remove(&self, instance: &str) -> Result<(), Error> {
        match self.volumes.remove(&Scratch::volume_name(instance), false) {
            Ok(_) | Err(Error::Store(castore::Error::Volume(VolumeError::NotFound { .. }))) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// Runs mkfs.ext4 on a sparse file of `size` bytes at `file` and writes what it wrote
/// into volume `name` (which reads as zeros: zero buffers are skipped).
fn mkfs_into(
    volumes: &Volumes,
    name: &str,
    size: u64,
    file: &Path,
    label: &str,
    uuid: Option<&str>,
) -> Result<(), Error> {
    let f = std::fs::File::create(file).map_err(io(format!("creating {}", file.display())))?;
    f.set_len(size)
        .map_err(io(format!("sizing {}", file.display())))?;
    drop(f);
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-b", "4096", "-m", "0"]);
    if !label.is_empty() {
        cmd.args(["-L", label]);
    }
    let mut ext = "lazy_itable_init=0,lazy_journal_init=0,nodiscard".to_string();
    if let Some(u) = uuid {
        cmd.args(["-U", u]);
        ext.push_str(&format!(",hash_seed={u}"));
    }
    let out = cmd
        .arg("-E")
        .arg(ext)
        .arg(file)
        .output()
        .map_err(io(format!("running mkfs.ext4 (e2fsprogs) for {name}")))?;
    if !out.status.success() {
        return Err(Error::BadRequest(format!(
            "mkfs.ext4 for {name} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let vol = volumes.store().open_volume(name)?;
    let mut f = std::fs::File::open(file).map_err(io(format!("opening {}", file.display())))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    // Only the extents mkfs wrote: the rest of the file is a hole.
    while let Some((start, end)) = next_data(&f, off, size)? {
        let mut pos = start;
        f.seek(SeekFrom::Start(pos))
            .map_err(io(format!("reading {}", file.display())))?;
        while pos < end {
            let n = buf.len().min((end - pos) as usize);
            f.read_exact(&mut buf[..n])
                .map_err(io(format!("reading {}", file.display())))?;
            // mkfs writes its zeroed tables too; a fresh volume reads zeros already.
            if buf[..n].iter().any(|&b| b != 0) {
                vol.write(pos, &buf[..n], false)?;
            }
            pos += n as u64;
        }
        off = end;
    }
    vol.flush()?;
    Ok(())
}

/// The next data extent of `f` at or after `off`: (start, end), or None.
fn next_data(f: &std::fs::File, off: u64, size: u64) -> Result<Option<(u64, u64)>, Error> {
    if off >= size {
        return Ok(None);
    }
    let seek = |at: u64, whence| {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let r = unsafe { libc::lseek(f.as_raw_fd(), at as libc::off_t, whence) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    };
    let start = match seek(off, libc::SEEK_DATA) {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
        Err(e) => return Err(Error::Io("SEEK_DATA in the scratch image".into(), e)),
    };
    let end = seek(start, libc::SEEK_HOLE)
        .map_err(|e| Error::Io("SEEK_HOLE in the scratch image".into(), e))?;
    Ok(Some((start, end.min(size))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_labelled_in_their_largest_unit() {
        assert_eq!(size_label(10 << 30), "10g");
        assert_eq!(size_label(512 << 20), "512m");
        assert_eq!(size_label(1 << 40), "1t");
        assert_eq!(size_label(4097), "4097");
    }
}
