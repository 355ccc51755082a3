//! The FUSE front end: a thin `fuser::Filesystem` adapter over [`Overlay`]. Every error
//! goes through [`FsError::to_errno`]; store errors (a corrupt chunk) are also logged
//! with the digest, and only that request fails.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::overlay::{
    Attr, DirEntry, FileKind, FsError, NAME_MAX, Overlay, RenameMode, SetAttr, SetTime,
};

/// Lower entries never change under a mount, so the kernel may cache them for long.
const LOWER_TTL: Duration = Duration::from_secs(3600);
/// Changed entries also only change through this mount, but a short TTL keeps a bug in
/// our invalidation from living long.
const SCRATCH_TTL: Duration = Duration::from_secs(1);
/// The file handle of opens served by FUSE passthrough (others use 0).
const PASSTHROUGH_FH: FileHandle = FileHandle(1);

/// The adapter; shared by all session threads.
#[derive(Debug)]
pub(crate) struct Fuse {
    overlay: Arc<Overlay>,
    /// Directory handles: a snapshot of the listing taken at opendir, so offsets stay
    /// valid while the directory changes.
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_fh: AtomicU64,
    /// Whether the kernel agreed to FUSE passthrough.
    passthrough: bool,
    /// Per inode: the passthrough backing id of its scratch file and how many open
    /// handles use it (the kernel wants one id per inode, reused by every open).
    backing: Mutex<HashMap<u64, (Arc<BackingId>, u32)>>,
}

impl Fuse {
    pub(crate) fn new(overlay: Arc<Overlay>) -> Fuse {
        Fuse {
            overlay,
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            passthrough: false,
            backing: Mutex::new(HashMap::new()),
        }
    }
}

fn errno(e: &FsError) -> Errno {
    if let FsError::Store(err) = e {
        // The daemon's log must name the digest of what is damaged.
        eprintln!("layerfs: I/O error: {err}");
    }
    Errno::from_i32(e.to_errno())
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::Dir => FileType::Directory,
        FileKind::File => FileType::RegularFile,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        // FUSE carries a 32-bit dev_t in the kernel's new encoding, as glibc's makedev
        // packs it for the numbers Linux uses.
        rdev: a.rdev as u32,
        blksize: 4096,
        flags: 0,
    }
}

fn ttl(a: &Attr) -> Duration {
    if a.pristine { LOWER_TTL } else { SCRATCH_TTL }
}

fn name_bytes(n: &OsStr) -> &[u8] {
    n.as_bytes()
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(t),
    }
}

fn reply_entry(r: Result<Attr, FsError>, reply: ReplyEntry) {
    match r {
        Ok(a) => reply.entry(&ttl(&a), &file_attr(&a), Generation(0)),
        Err(e) => reply.error(errno(&e)),
    }
}

fn reply_empty(r: Result<(), FsError>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn reply_xattr(r: Result<Vec<u8>, FsError>, size: u32, reply: ReplyXattr) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(&e)),
    }
}

impl Filesystem for Fuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Each capability is optional: a kernel without it simply does without.
        for cap in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
        ] {
            let _ = config.add_capabilities(cap);
        }
        // Passthrough: reads and writes of scratch files go straight from the kernel to
        // the real file. Depth 1: the backing files are on a plain filesystem.
        self.passthrough = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        let _ = config.set_max_write(1 << 20);
        // Readahead: the kernel sets the mount's readahead (its bdi's `ra_pages`) to the
        // smaller of what it offered here and what we answer. It offers the bdi's
        // default (128 KiB), so asking for more is refused; we take as much as it
        // allows, and `mount()` raises the bdi's `read_ahead_kb` through sysfs after
        // INIT, which is what really widens readahead. FUSE reads are then up to
        // `max_pages` (from max_write: 1 MiB) each, several in flight.
        if let Err(max) = config.set_max_readahead(crate::READ_AHEAD_KB << 10) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(self.overlay.lookup(parent.0, name_bytes(name)), reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.overlay.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.overlay.getattr(ino.0) {
            Ok(a) => reply.attr(&ttl(&a), &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
            ctime,
        };
        match self.overlay.setattr(ino.0, &set) {
            Ok(a) => reply.attr(&ttl(&a), &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.overlay.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        reply_entry(
            self.overlay.mknod(
                parent.0,
                name_bytes(name),
                mode,
                u64::from(rdev),
                req.uid(),
                req.gid(),
            ),
            reply,
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply_entry(
            self.overlay
                .mkdir(parent.0, name_bytes(name), mode, req.uid(), req.gid()),
            reply,
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.overlay.unlink(parent.0, name_bytes(name)), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.overlay.rmdir(parent.0, name_bytes(name)), reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        reply_entry(
            self.overlay.symlink(
                parent.0,
                name_bytes(link_name),
                target.as_os_str().as_bytes(),
                req.uid(),
                req.gid(),
            ),
            reply,
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mode = if flags.contains(RenameFlags::RENAME_WHITEOUT)
            || flags.contains(RenameFlags::RENAME_NOREPLACE | RenameFlags::RENAME_EXCHANGE)
        {
            return reply.error(Errno::EINVAL);
        } else if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            RenameMode::Exchange
        } else if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            RenameMode::NoReplace
        } else {
            RenameMode::Replace
        };
        reply_empty(
            self.overlay.rename(
                parent.0,
                name_bytes(name),
                newparent.0,
                name_bytes(newname),
                mode,
            ),
            reply,
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply_entry(
            self.overlay.link(ino.0, newparent.0, name_bytes(newname)),
            reply,
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        // Copy up first, without holding the backing table: that may read a large file.
        if write && let Err(e) = self.overlay.copy_up_for_write(ino.0) {
            return reply.error(errno(&e));
        }
        // Counting this open and deciding on passthrough happen under the backing table's
        // lock: otherwise a racing open could count this one, find no backing id yet and
        // open without passthrough, a mix the kernel answers with EIO.
        let mut backing = self.backing.lock().unwrap_or_else(|e| e.into_inner());
        let opened = match self.overlay.open(ino.0, write) {
            Ok(o) => o,
            Err(e) => return reply.error(errno(&e)),
        };
        if opened.pristine {
            // Lower bytes never change: keep the page cache across opens, and spare the
            // kernel a FLUSH round trip per close (there is nothing to flush).
            return reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
            );
        }
        if let Some(file) = opened.scratch
            && let Some(id) = self.backing(&mut backing, ino.0, &file, opened.others, &reply)
        {
            return reply.opened_passthrough(PASSTHROUGH_FH, FopenFlags::empty(), &id);
        }
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.overlay.read(ino.0, offset, size) {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.overlay.write(ino.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes reach the scratch file before they are acknowledged: nothing to flush.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.overlay.release(ino.0);
        if fh != PASSTHROUGH_FH {
            return reply.ok();
        }
        let mut backing = self.backing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, n)) = backing.get_mut(&ino.0) {
            *n -= 1;
            if *n == 0 {
                // Dropping the id closes it in the kernel.
                backing.remove(&ino.0);
            }
        }
        drop(backing);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Scratch is discarded on unmount and on restart, so durability is meaningless;
        // the data is already in the scratch file, visible to every reader.
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.overlay.readdir(ino.0) {
            Ok((list, pristine)) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.dirs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(fh, Arc::new(list));
                // A directory still as in the image: let the kernel keep its listing in
                // the directory's page cache (CACHE_DIR) across opens (KEEP_CACHE), so a
                // second `tar` or `find` costs OPENDIR and RELEASEDIR but no READDIR.
                // Once a directory changes through the mount it is no longer pristine
                // (and never is again): we answer without KEEP_CACHE, and the kernel
                // drops the cached listing at that open (`fuse_dir_open` invalidates the
                // pages); entry changes made through the kernel also bump the
                // directory's i_version, which resets the cache at the next read from
                // offset 0.
                let flags = if pristine {
                    FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                reply.opened(FileHandle(fh), flags);
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(list) = self.listing(fh) else {
            return reply.error(Errno::EBADF);
        };
        for (i, e) in list.iter().enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(e.ino),
                i as u64 + 1,
                file_type(e.kind),
                OsStr::from_bytes(&e.name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(list) = self.listing(fh) else {
            return reply.error(Errno::EBADF);
        };
        for (i, e) in list.iter().enumerate().skip(offset as usize) {
            let dots = e.name == b"." || e.name == b"..";
            // The kernel counts a lookup for every entry but `.` and `..`.
            let attr = if dots {
                self.overlay.getattr(e.ino)
            } else {
                self.overlay.lookup(ino.0, &e.name)
            };
            let Ok(attr) = attr else {
                // Removed since opendir: leave it out.
                continue;
            };
            if reply.add(
                INodeNo(attr.ino),
                i as u64 + 1,
                OsStr::from_bytes(&e.name),
                &ttl(&attr),
                &file_attr(&attr),
                Generation(0),
            ) {
                if !dots {
                    // Not sent after all: give the reference back.
                    self.overlay.forget(attr.ino, 1);
                }
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.overlay.statfs() {
            Ok(s) => reply.statfs(
                s.blocks,
                s.bfree,
                s.bavail,
                s.files,
                s.ffree,
                s.bsize,
                NAME_MAX as u32,
                s.bsize,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            self.overlay.setxattr(ino.0, name_bytes(name), value, flags),
            reply,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply_xattr(self.overlay.getxattr(ino.0, name_bytes(name)), size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply_xattr(self.overlay.listxattr(ino.0), size, reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.overlay.removexattr(ino.0, name_bytes(name)), reply);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Mounted with default_permissions, the kernel checks modes itself and only
        // asks us whether the inode exists.
        reply_empty(self.overlay.getattr(ino.0).map(|_| ()), reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self
            .overlay
            .create(parent.0, name_bytes(name), mode, req.uid(), req.gid())
        {
            Ok(a) => reply.created(
                &ttl(&a),
                &file_attr(&a),
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(self.overlay.fallocate(ino.0, offset, length, mode), reply);
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.overlay.lseek(ino.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

impl Fuse {
    /// The backing id to open `ino` in passthrough mode, if that is possible: the kernel
    /// refuses to mix passthrough and cached opens of one inode, so a scratch file is
    /// passed through only when it has no other open or its other opens are passed
    /// through already.
    fn backing(
        &self,
        backing: &mut HashMap<u64, (Arc<BackingId>, u32)>,
        ino: u64,
        file: &std::fs::File,
        others: u32,
        reply: &ReplyOpen,
    ) -> Option<Arc<BackingId>> {
        if !self.passthrough {
            return None;
        }
        if let Some((id, n)) = backing.get_mut(&ino) {
            *n += 1;
            return Some(id.clone());
        }
        if others != 0 {
            return None;
        }
        match reply.open_backing(file) {
            Ok(id) => {
                let id = Arc::new(id);
                backing.insert(ino, (id.clone(), 1));
                Some(id)
            }
            Err(e) => {
                eprintln!("layerfs: passthrough unavailable for inode {ino}: {e}");
                None
            }
        }
    }

    fn listing(&self, fh: FileHandle) -> Option<Arc<Vec<DirEntry>>> {
        self.dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh.0)
            .cloned()
    }
}
