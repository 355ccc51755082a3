//! Export: an image (layers merged, whiteouts applied) or a single layer (whiteouts kept
//! as `.wh.` entries) written to a directory or a tar, with every byte verified on read.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::Digest;
use crate::error::{Error, Result};
use crate::ingest::{OPAQUE, WHITEOUT_PREFIX};
use crate::model::{Entry, FileData, Kind, Segment};
use crate::store::Store;
use crate::tarfmt::{TarEntry, TarKind, TarWriter};

/// Where an export goes.
#[derive(Debug, Clone)]
pub enum ExportTarget {
    /// A directory that does not exist yet or is empty.
    Dir(PathBuf),
    /// A tar file (created or truncated); `-` is standard output.
    Tar(PathBuf),
}

impl ExportTarget {
    /// `*.tar` (or `-`) is a tar, anything else a directory.
    pub fn from_path(p: &Path) -> ExportTarget {
        let s = p.as_os_str().as_bytes();
        if s == b"-" || s.ends_with(b".tar") {
            ExportTarget::Tar(p.to_path_buf())
        } else {
            ExportTarget::Dir(p.to_path_buf())
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExportReport {
    /// Entries written (not counting the root).
    pub entries: u64,
    /// File content bytes written.
    pub bytes: u64,
}

trait Sink {
    fn dir_start(&mut self, path: &[u8], e: &Entry) -> Result<()>;
    fn dir_end(&mut self, path: &[u8], e: &Entry) -> Result<()>;
    fn leaf(&mut self, store: &Store, path: &[u8], e: &Entry) -> Result<u64>;
    fn hardlink(&mut self, path: &[u8], target: &[u8], e: &Entry) -> Result<()>;
}

impl Store {
    /// Exports an image with its layers merged.
    pub fn export_image(&self, image: &Digest, target: &ExportTarget) -> Result<ExportReport> {
        let (root, sources) = crate::merge::image_root(self, image)?;
        self.export(root, sources, false, target)
    }

    /// Exports one layer as stored, whiteouts and opaque markers as OCI `.wh.` entries.
    pub fn export_layer(&self, layer: &Digest, target: &ExportTarget) -> Result<ExportReport> {
        let l = self.layer(layer)?;
        self.export(l.root.clone(), vec![(0, l.root_tree())], true, target)
    }

    fn export(
        &self,
        root: Entry,
        sources: Vec<(usize, Digest)>,
        raw: bool,
        target: &ExportTarget,
    ) -> Result<ExportReport> {
        let mut w = Walker {
            store: self,
            raw,
            links: HashMap::new(),
            report: ExportReport::default(),
        };
        match target {
            ExportTarget::Dir(p) => {
                let mut sink = DirSink::new(p)?;
                w.run(&mut sink, root, sources)?;
            }
            ExportTarget::Tar(p) => {
                let out: Box<dyn Write> = if p.as_os_str() == "-" {
                    Box::new(std::io::stdout().lock())
                } else {
                    Box::new(File::create(p).map_err(|e| Error::io("create", p, e))?)
                };
                let mut sink = TarSink {
                    w: Some(TarWriter::new(BufWriter::with_capacity(1 << 20, out))),
                    path: p.clone(),
                };
                w.run(&mut sink, root, sources)?;
                sink.w
                    .take()
                    .expect("writer")
                    .finish()
                    .map_err(|e| Error::io("write", p, e))?;
            }
        }
        Ok(w.report)
    }
}

struct Walker<'s> {
    store: &'s Store,
    raw: bool,
    /// (layer, link group) → first path written.
    links: HashMap<(usize, u64), Vec<u8>>,
    report: ExportReport,
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = parent.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

impl Walker<'_> {
    fn run(
        &mut self,
        sink: &mut dyn Sink,
        root: Entry,
        sources: Vec<(usize, Digest)>,
    ) -> Result<()> {
        sink.dir_start(b"", &root)?;
        self.dir(sink, b"", &root, sources)?;
        sink.dir_end(b"", &root)
    }

    fn dir(
        &mut self,
        sink: &mut dyn Sink,
        path: &[u8],
        me: &Entry,
        sources: Vec<(usize, Digest)>,
    ) -> Result<()> {
        let merged = crate::merge::merge_dir(self.store, &sources, self.raw).map_err(|e| {
            e.context(format!(
                "reading directory /{}",
                String::from_utf8_lossy(path)
            ))
        })?;
        if self.raw && matches!(me.kind, Kind::Dir { opaque: true, .. }) {
            let marker = synthetic(OPAQUE, me);
            sink.leaf(self.store, &join(path, OPAQUE), &marker)?;
            self.report.entries += 1;
        }
        for (name, m) in merged {
            let child = join(path, &name);
            self.report.entries += 1;
            let ctx =
                |e: Error| e.context(format!("exporting /{}", String::from_utf8_lossy(&child)));
            match &m.entry.kind {
                Kind::Dir { .. } => {
                    sink.dir_start(&child, &m.entry).map_err(ctx)?;
                    self.dir(sink, &child, &m.entry, m.sources)?;
                    sink.dir_end(&child, &m.entry).map_err(ctx)?;
                }
                Kind::Whiteout => {
                    let mut wname = WHITEOUT_PREFIX.to_vec();
                    wname.extend_from_slice(&name);
                    let marker = synthetic(&wname, &m.entry);
                    sink.leaf(self.store, &join(path, &wname), &marker)
                        .map_err(ctx)?;
                }
                _ => {
                    if m.entry.link != 0 {
                        if let Some(first) = self.links.get(&(m.layer, m.entry.link)) {
                            sink.hardlink(&child, first, &m.entry).map_err(ctx)?;
                            continue;
                        }
                        self.links.insert((m.layer, m.entry.link), child.clone());
                    }
                    self.report.bytes += sink.leaf(self.store, &child, &m.entry).map_err(ctx)?;
                }
            }
        }
        Ok(())
    }
}

/// An empty regular file standing for a whiteout or opaque marker.
fn synthetic(name: &[u8], like: &Entry) -> Entry {
    Entry {
        name: name.to_vec(),
        kind: Kind::File {
            size: 0,
            data: FileData::Inline(Vec::new()),
        },
        mode: 0,
        uid: like.uid,
        gid: like.gid,
        mtime: like.mtime,
        xattrs: Vec::new(),
        link: 0,
    }
}

struct DirSink {
    root: PathBuf,
}

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Refused(format!("path {} contains NUL", p.display())))
}

fn check(rc: libc::c_int, op: &'static str, p: &Path) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::io(op, p, std::io::Error::last_os_error()))
    }
}

impl DirSink {
    fn new(root: &Path) -> Result<DirSink> {
        match std::fs::read_dir(root) {
            Ok(mut rd) => {
                if rd.next().is_some() {
                    return Err(Error::Refused(format!(
                        "export target {} is not empty",
                        root.display()
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(root).map_err(|e| Error::io("create", root, e))?;
            }
            Err(e) => return Err(Error::io("open", root, e)),
        }
        Ok(DirSink {
            root: root.to_path_buf(),
        })
    }

    fn path(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(std::ffi::OsStr::from_bytes(rel))
        }
    }

    /// Owner, mode, xattrs, then times: chown clears setuid bits and capabilities, so it
    /// goes first, and the time goes last because the others change ctime only.
    fn finish_meta(&self, p: &Path, e: &Entry) -> Result<()> {
        let c = cpath(p)?;
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        let rc = unsafe { libc::lchown(c.as_ptr(), e.uid, e.gid) };
        check(rc, "chown", p)?;
        if !matches!(e.kind, Kind::Symlink { .. }) {
            // SAFETY: as above.
            let rc = unsafe { libc::chmod(c.as_ptr(), e.mode) };
            check(rc, "chmod", p)?;
        }
        for (k, v) in &e.xattrs {
            let name = std::ffi::OsStr::from_bytes(k);
            xattr::set(p, name, v).map_err(|err| Error::io("setxattr", p, err))?;
        }
        let times = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            libc::timespec {
                tv_sec: e.mtime.sec,
                tv_nsec: i64::from(e.mtime.nsec),
            },
        ];
        // SAFETY: `c` and `times` outlive the call; AT_FDCWD with an absolute or relative path.
        let rc = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        check(rc, "utimensat", p)
    }
}

impl Sink for DirSink {
    fn dir_start(&mut self, rel: &[u8], _e: &Entry) -> Result<()> {
        if rel.is_empty() {
            return Ok(());
        }
        let p = self.path(rel);
        std::fs::create_dir(&p).map_err(|e| Error::io("mkdir", &p, e))
    }

    fn dir_end(&mut self, rel: &[u8], e: &Entry) -> Result<()> {
        self.finish_meta(&self.path(rel), e)
    }

    fn leaf(&mut self, store: &Store, rel: &[u8], e: &Entry) -> Result<u64> {
        let p = self.path(rel);
        let c = cpath(&p)?;
        let mut written = 0;
        match &e.kind {
            Kind::File { size, data } => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&p)
                    .map_err(|err| Error::io("create", &p, err))?;
                written = write_file(store, &f, &p, *size, data)?;
            }
            Kind::Symlink { target } => {
                let t = CString::new(target.clone())
                    .map_err(|_| Error::Refused("symlink target contains NUL".into()))?;
                // SAFETY: both strings are valid and NUL-terminated.
                let rc = unsafe { libc::symlink(t.as_ptr(), c.as_ptr()) };
                check(rc, "symlink", &p)?;
            }
            Kind::CharDev { rdev } | Kind::BlockDev { rdev } => {
                let t = e.kind.file_type_bits();
                // SAFETY: valid path; mknod reads its arguments only.
                let rc = unsafe { libc::mknod(c.as_ptr(), t | 0o600, *rdev) };
                check(rc, "mknod", &p)?;
            }
            Kind::Fifo | Kind::Socket => {
                let t = e.kind.file_type_bits();
                // SAFETY: as above.
                let rc = unsafe { libc::mknod(c.as_ptr(), t | 0o600, 0) };
                check(rc, "mknod", &p)?;
            }
            Kind::Dir { .. } | Kind::Whiteout => unreachable!("handled by the walker"),
        }
        self.finish_meta(&p, e)?;
        Ok(written)
    }

    fn hardlink(&mut self, rel: &[u8], target: &[u8], _e: &Entry) -> Result<()> {
        let p = self.path(rel);
        std::fs::hard_link(self.path(target), &p).map_err(|e| Error::io("link", &p, e))
    }
}

/// Writes a file's content, leaving holes where the blob has them.
fn write_file(store: &Store, f: &File, p: &Path, size: u64, data: &FileData) -> Result<u64> {
    if let FileData::Blob(d) = data {
        let blob = store.blob(d)?;
        if blob
            .segments
            .iter()
            .any(|s| matches!(s, Segment::Hole { .. }))
        {
            let mut h = crate::digest::Hasher::new();
            let mut off = 0u64;
            let zeros = vec![0u8; 1 << 16];
            for s in &blob.segments {
                match *s {
                    Segment::Data { chunk, .. } => {
                        let c = store.chunk(&chunk)?;
                        h.update(&c);
                        f.write_all_at(&c, off)
                            .map_err(|e| Error::io("write", p, e))?;
                    }
                    Segment::Hole { len } => {
                        let mut left = len;
                        while left > 0 {
                            let k = left.min(zeros.len() as u64) as usize;
                            h.update(&zeros[..k]);
                            left -= k as u64;
                        }
                    }
                }
                off += s.len();
            }
            if h.finish() != blob.content {
                return Err(Error::Corrupt {
                    kind: crate::error::ObjectKind::Blob,
                    digest: *d,
                });
            }
            f.set_len(size).map_err(|e| Error::io("truncate", p, e))?;
            return Ok(size);
        }
    }
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let n = store.read_file(data, &mut w)?;
    w.flush().map_err(|e| Error::io("write", p, e))?;
    Ok(n)
}

struct TarSink {
    w: Option<TarWriter<BufWriter<Box<dyn Write>>>>,
    path: PathBuf,
}

fn tar_entry(path: &[u8], e: &Entry, kind: TarKind) -> TarEntry {
    let (dev_major, dev_minor) = match e.kind {
        Kind::CharDev { rdev } | Kind::BlockDev { rdev } => (libc::major(rdev), libc::minor(rdev)),
        _ => (0, 0),
    };
    TarEntry {
        path: path.to_vec(),
        kind: Some(kind),
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime: e.mtime,
        dev_major,
        dev_minor,
        xattrs: e.xattrs.clone(),
        ..TarEntry::default()
    }
}

impl TarSink {
    fn writer(&mut self) -> &mut TarWriter<BufWriter<Box<dyn Write>>> {
        self.w.as_mut().expect("writer until finish")
    }
}

impl Sink for TarSink {
    fn dir_start(&mut self, rel: &[u8], e: &Entry) -> Result<()> {
        let mut p = if rel.is_empty() {
            b".".to_vec()
        } else {
            rel.to_vec()
        };
        p.push(b'/');
        let te = tar_entry(&p, e, TarKind::Dir);
        let path = self.path.clone();
        self.writer()
            .append(&te, None)
            .map_err(|err| Error::io("write", &path, err))
    }

    fn dir_end(&mut self, _rel: &[u8], _e: &Entry) -> Result<()> {
        Ok(())
    }

    fn leaf(&mut self, store: &Store, rel: &[u8], e: &Entry) -> Result<u64> {
        let path = self.path.clone();
        let io = |err| Error::io("write", &path, err);
        match &e.kind {
            Kind::File { size, data } => {
                let mut te = tar_entry(rel, e, TarKind::File);
                te.size = *size;
                te.data_size = *size;
                let mut failure: Option<Error> = None;
                let mut body = |w: &mut dyn Write| -> std::io::Result<u64> {
                    store.read_file(data, w).map_err(|err| {
                        let msg = err.to_string();
                        failure = Some(err);
                        std::io::Error::other(msg)
                    })
                };
                let r = self.writer().append(&te, Some(&mut body));
                if let Some(err) = failure {
                    return Err(err);
                }
                r.map_err(io)?;
                Ok(*size)
            }
            Kind::Symlink { target } => {
                let mut te = tar_entry(rel, e, TarKind::Symlink);
                te.link = target.clone();
                self.writer().append(&te, None).map_err(io)?;
                Ok(0)
            }
            Kind::CharDev { .. } => self
                .writer()
                .append(&tar_entry(rel, e, TarKind::CharDev), None)
                .map_err(io)
                .map(|_| 0),
            Kind::BlockDev { .. } => self
                .writer()
                .append(&tar_entry(rel, e, TarKind::BlockDev), None)
                .map_err(io)
                .map(|_| 0),
            Kind::Fifo => self
                .writer()
                .append(&tar_entry(rel, e, TarKind::Fifo), None)
                .map_err(io)
                .map(|_| 0),
            // Tar has no socket type; like GNU tar, a socket is left out.
            Kind::Socket => Ok(0),
            Kind::Dir { .. } | Kind::Whiteout => unreachable!("handled by the walker"),
        }
    }

    fn hardlink(&mut self, rel: &[u8], target: &[u8], e: &Entry) -> Result<()> {
        let mut te = tar_entry(rel, e, TarKind::HardLink);
        te.link = target.to_vec();
        let path = self.path.clone();
        self.writer()
            .append(&te, None)
            .map_err(|err| Error::io("write", &path, err))
    }
}
