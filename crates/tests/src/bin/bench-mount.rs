//! `bench-mount`: reads one tree through our FUSE mount (layerfs behind `volumed`) and
//! through three peers, and reports where the mount stands.
//!
//! The tree is the Debian `python3` root of [`tests::roots`] copied to a work directory on
//! the same ext4 disk, plus one file of 1 GiB of incompressible random bytes
//! (`bench-1GiB`) at its top. That one tree is presented four ways:
//!
//! - `ours`: imported into a fresh store with `tide --store DATA/store image import`, then
//!   `volumed --data DATA` is started on it and `tide --socket S mount` mounts the image
//!   (read-write: with its scratch layer, as a VM root is mounted).
//! - `overlayfs`: kernel overlayfs, `lowerdir` = the tree itself, an empty `upperdir`.
//! - `fuse-overlayfs`: the same lower and an empty upper, through `fuse-overlayfs`.
//! - `squashfuse`: a squashfs image made by `mksquashfs` (default options) of the tree.
//!
//! Workloads, each run in the mountpoint with `sh -c`:
//!
//! - `tar c`: `tar cf - . | cat >/dev/null` (GNU tar skips reading file data when its
//!   output is `/dev/null` itself, hence the pipe);
//! - `find -ls`: `find . -ls >/dev/null`;
//! - `1 GiB read`: `dd if=bench-1GiB of=/dev/null bs=1M`.
//!
//! "warm": one untimed run fills the caches, then `--runs` timed runs. "cold": before
//! each of `--runs` timed runs every filesystem is unmounted and mounted again (for ours
//! `volumed` is restarted as well, so its RocksDB and chunk caches start empty, and a
//! FUSE peer's daemon restarts with its mount), then `sync` and
//! `echo 3 > /proc/sys/vm/drop_caches`. Every cell is the best (minimum) of its runs:
//! the machine may be shared, and the minimum is the sample least disturbed by others;
//! `--json` carries every sample.
//!
//! Mount time: from spawning the mount command (`tide mount`, `mount -t overlay`,
//! `fuse-overlayfs`, `squashfuse`) until `lstat` of `usr/bin/dpkg` in the mountpoint
//! succeeds on the new filesystem; "warm" with the page cache (and for ours a running
//! daemon) as the other runs left it, "cold" as the cold runs above (measured in them,
//! before the workload). `mount(2) alone` is the time the kernel spent in the mount
//! system calls themselves, measured by `strace -T` on the process that makes them (for
//! ours, attached to `volumed`), in a separate mount.
//!
//! Every mount is unmounted and the daemon stopped (SIGTERM) on every exit path, errors
//! and panics included. Needs root, `/dev/fuse`, `fuse-overlayfs`, `squashfuse`,
//! `mksquashfs`, `strace`, and `tide` and `volumed` built next to this binary.
//!
//! Usage: `bench-mount [--runs N] [--fs ours,overlayfs,fuse-overlayfs,squashfuse]
//! [--json] [--keep]`

use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use tests::bench::{render_table, run};
use tests::roots;

/// The Debian root the tree is made of.
const ROOT: &str = "python3";

/// Name of the large file added at the top of the tree, and its size.
const BIG_FILE: &str = "bench-1GiB";
const BIG_BYTES: u64 = 1 << 30;

/// The file whose `lstat` says a mount serves.
const PROBE: &str = "usr/bin/dpkg";

/// The image name of the tree in our store.
const IMAGE: &str = "bench:mount";

/// Directory under which the work directory is created (ext4, same disk as the roots).
const WORK_PARENT: &str = "/var/tmp";

/// How long a mount may take to serve before the benchmark gives up.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

const USAGE: &str = "\
usage: bench-mount [--runs N] [--fs LIST] [--json] [--keep]

Copies the Debian python3 root (built on demand by scripts/make-roots.sh) plus a 1 GiB
random file to a work directory, and times tar c, find -ls and a 1 GiB sequential read,
warm and cold, plus mount time, through our mount (tide mount via volumed), kernel
overlayfs, fuse-overlayfs and squashfuse of that tree. Needs root.

  --runs N      timed runs per cell; the best is reported (default 3)
  --fs LIST     comma-separated subset of ours,overlayfs,fuse-overlayfs,squashfuse
                (default: all)
  --json        print JSON (every sample) instead of a table
  --keep        keep the work directory (printed on stderr)
  -h, --help    show this help";

/// A filesystem under comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FsKind {
    Ours,
    Overlayfs,
    FuseOverlayfs,
    Squashfuse,
}

impl FsKind {
    const ALL: [Self; 4] = [
        Self::Ours,
        Self::Overlayfs,
        Self::FuseOverlayfs,
        Self::Squashfuse,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Ours => "ours",
            Self::Overlayfs => "overlayfs",
            Self::FuseOverlayfs => "fuse-overlayfs",
            Self::Squashfuse => "squashfuse",
        }
    }

    fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .with_context(|| {
                format!(
                    "unknown filesystem `{name}` (known: {})",
                    Self::ALL.map(Self::name).join(", ")
                )
            })
    }
}

/// A timed workload.
#[derive(Debug, Clone, Copy)]
struct Workload {
    label: &'static str,
    script: &'static str,
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        label: "tar c",
        script: "tar cf - . | cat >/dev/null",
    },
    Workload {
        label: "find -ls",
        script: "find . -ls >/dev/null",
    },
    Workload {
        label: "1 GiB read",
        script: "dd if=bench-1GiB of=/dev/null bs=1M status=none",
    },
];

/// Command-line options.
#[derive(Debug)]
struct Options {
    runs: usize,
    filesystems: Vec<FsKind>,
    json: bool,
    keep: bool,
}

impl Options {
    /// Parses the arguments (without the program name). Returns `None` for `--help`.
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Self>> {
        let mut options = Self {
            runs: 3,
            filesystems: FsKind::ALL.to_vec(),
            json: false,
            keep: false,
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
                _ => (arg.clone(), None),
            };
            let mut value = |flag: &str| {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .with_context(|| format!("{flag} needs a value"))
            };
            match flag.as_str() {
                "-h" | "--help" => return Ok(None),
                "--json" => options.json = true,
                "--keep" => options.keep = true,
                "--runs" => {
                    let v = value("--runs")?;
                    options.runs =
                        v.parse().ok().filter(|&n| n > 0).with_context(|| {
                            format!("--runs needs a positive number, not `{v}`")
                        })?;
                }
                "--fs" => options.filesystems = parse_fs_list(&value("--fs")?)?,
                _ => bail!("unexpected argument `{arg}`\n\n{USAGE}"),
            }
        }
        Ok(Some(options))
    }
}

/// Parses `ours,squashfuse,...`, keeping the first occurrence of each, in canonical order.
fn parse_fs_list(list: &str) -> Result<Vec<FsKind>> {
    let mut chosen = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        chosen.push(FsKind::parse(name)?);
    }
    ensure!(!chosen.is_empty(), "--fs needs at least one filesystem");
    Ok(FsKind::ALL
        .into_iter()
        .filter(|f| chosen.contains(f))
        .collect())
}

/// `sync`, then drops the page cache, dentries and inodes.
fn drop_caches() -> Result<()> {
    run(&mut Command::new("sync"))?;
    fs::write("/proc/sys/vm/drop_caches", "3\n").context("cannot write /proc/sys/vm/drop_caches")
}

/// Whether `path` is the root of a filesystem other than its parent's.
fn is_mountpoint(path: &Path) -> bool {
    let (Ok(me), Some(Ok(parent))) = (
        fs::symlink_metadata(path),
        path.parent().map(fs::symlink_metadata),
    ) else {
        return false;
    };
    me.dev() != parent.dev()
}

/// The `tide` command, through the daemon on `socket` or on a store directory.
fn tide(args: &[&std::ffi::OsStr]) -> Result<Command> {
    let mut cmd = Command::new(tests::find_tide_bin().map_err(anyhow::Error::msg)?);
    cmd.args(args);
    Ok(cmd)
}

/// A running `volumed`; dropping it stops it with SIGTERM (which unmounts its mounts),
/// or SIGKILL if it does not exit within 30 s.
struct Daemon {
    child: Option<Child>,
}

impl Daemon {
    fn start(data: &Path, socket: &Path, log: &Path) -> Result<Self> {
        let log_file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let child = tests::volumed::command(data, socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("cannot start volumed")?;
        let mut daemon = Self { child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(socket).is_err() {
            if let Some(status) = daemon.child_mut().try_wait()? {
                bail!(
                    "volumed exited ({status}) before serving; see {}",
                    log.display()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "volumed did not serve {} within 30 s",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(daemon)
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("running")
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                ensure!(status.success(), "volumed exited with {status} on SIGTERM");
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("volumed did not exit within 30 s of SIGTERM; killed it");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("bench-mount: {e:#}");
        }
    }
}

/// Everything the four filesystems are made from.
struct Inputs {
    work: PathBuf,
    /// The tree on ext4 (the overlay lower, the import and mksquashfs source).
    tree: PathBuf,
    /// Our daemon's data directory (the store is `data/store`).
    data: PathBuf,
    squashfs: PathBuf,
}

impl Inputs {
    fn socket(&self) -> PathBuf {
        self.work.join("volumed.sock")
    }

    fn log(&self) -> PathBuf {
        self.work.join("volumed.log")
    }

    fn mountpoint(&self, fs: FsKind) -> PathBuf {
        self.work.join("mnt").join(fs.name())
    }

    /// The command that mounts `fs` (ours through the daemon's socket).
    fn mount_command(&self, fs: FsKind) -> Result<Command> {
        let mp = self.mountpoint(fs);
        let upper = |what: &str| self.work.join(fs.name()).join(what);
        let layers = || {
            let mut o = std::ffi::OsString::from("lowerdir=");
            o.push(&self.tree);
            o.push(",upperdir=");
            o.push(upper("upper"));
            o.push(",workdir=");
            o.push(upper("work"));
            o
        };
        Ok(match fs {
            FsKind::Ours => {
                let mut cmd = tide(&["--socket".as_ref(), self.socket().as_os_str()])?;
                cmd.args(["mount", IMAGE]).arg(mp);
                cmd
            }
            FsKind::Overlayfs => {
                let mut cmd = Command::new("mount");
                cmd.args(["-t", "overlay", "overlay", "-o"])
                    .arg(layers())
                    .arg(mp);
                cmd
            }
            FsKind::FuseOverlayfs => {
                let mut cmd = Command::new("fuse-overlayfs");
                cmd.arg("-o").arg(layers()).arg(mp);
                cmd
            }
            FsKind::Squashfuse => {
                let mut cmd = Command::new("squashfuse");
                cmd.arg(&self.squashfs).arg(mp);
                cmd
            }
        })
    }
}

/// A live mount; dropping it unmounts (lazily if it is busy).
struct MountGuard {
    fs: FsKind,
    mountpoint: PathBuf,
    socket: PathBuf,
    live: bool,
}

impl MountGuard {
    fn unmount(&mut self) -> Result<()> {
        if !std::mem::take(&mut self.live) {
            return Ok(());
        }
        let result = if self.fs == FsKind::Ours {
            tide(&["--socket".as_ref(), self.socket.as_os_str()])
                .and_then(|mut c| run(c.arg("umount").arg(&self.mountpoint)))
        } else {
            run(Command::new("umount").arg(&self.mountpoint))
        };
        if let Err(e) = result {
            let _ = run(Command::new("umount").arg("-l").arg(&self.mountpoint));
            return Err(e.context(format!("unmounting {}", self.mountpoint.display())));
        }
        Ok(())
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            eprintln!("bench-mount: {e:#}");
        }
    }
}

/// For the overlays: a fresh, empty upper layer and work directory.
fn fresh_upper(inputs: &Inputs, fs: FsKind) -> Result<()> {
    if !matches!(fs, FsKind::Overlayfs | FsKind::FuseOverlayfs) {
        return Ok(());
    }
    let dir = inputs.work.join(fs.name());
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot empty {}", dir.display()))?;
    }
    for sub in ["upper", "work"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    Ok(())
}

/// Mounts `fs` and returns the guard and the time until the mount served `lstat(PROBE)`.
fn mount(inputs: &Inputs, fs: FsKind) -> Result<(MountGuard, Duration)> {
    let mp = inputs.mountpoint(fs);
    ensure!(!is_mountpoint(&mp), "{} is still mounted", mp.display());
    fresh_upper(inputs, fs)?;
    let mut cmd = inputs.mount_command(fs)?;
    let start = Instant::now();
    let result = run(&mut cmd);
    // Whatever happened, a mount that exists gets a guard.
    let guard = MountGuard {
        fs,
        mountpoint: mp.clone(),
        socket: inputs.socket(),
        live: result.is_ok() || is_mountpoint(&mp),
    };
    result?;
    let probe = mp.join(PROBE);
    loop {
        if is_mountpoint(&mp) && fs::symlink_metadata(&probe).is_ok() {
            return Ok((guard, start.elapsed()));
        }
        ensure!(
            start.elapsed() < MOUNT_TIMEOUT,
            "{} did not serve {} within {MOUNT_TIMEOUT:?}",
            fs.name(),
            probe.display()
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// The mount system calls strace saw in `log`, and the kernel time they took.
fn mount_syscalls(log: &str) -> (Vec<String>, Duration) {
    const CALLS: [&str; 5] = ["mount(", "fsopen(", "fsconfig(", "fsmount(", "move_mount("];
    let mut calls = Vec::new();
    let mut total = Duration::ZERO;
    for line in log.lines() {
        // `PID call(args) = 0 <0.000123>`, the pid only with -f.
        let call = line
            .split_once(' ')
            .filter(|(pid, _)| pid.bytes().all(|b| b.is_ascii_digit()))
            .map_or(line, |(_, rest)| rest)
            .trim_start();
        if !CALLS.iter().any(|c| call.starts_with(c)) {
            continue;
        }
        let secs = call
            .rsplit_once('<')
            .and_then(|(_, t)| t.trim_end().strip_suffix('>'))
            .and_then(|t| t.parse::<f64>().ok());
        if let Some(secs) = secs {
            total += Duration::from_secs_f64(secs);
            calls.push(call.split('(').next().unwrap_or(call).to_owned());
        }
    }
    (calls, total)
}

/// Time spent in the mount system calls of one mount of `fs`, by `strace -T`.
fn mount_syscall_time(inputs: &Inputs, fs: FsKind, daemon: Option<&Daemon>) -> Result<Duration> {
    const TRACE: &str = "trace=mount,fsopen,fsconfig,fsmount,move_mount";
    let log = inputs.work.join(format!("strace-{}.log", fs.name()));
    let guard = if let Some(daemon) = daemon {
        // Attach to the daemon, which makes the calls in a session thread.
        let mut strace = Command::new("strace")
            .args(["-f", "-qq", "-T", "-e", TRACE, "-o"])
            .arg(&log)
            .arg("-p")
            .arg(daemon.pid().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run strace (apt-get install strace)")?;
        // strace has attached once it has created its log.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !log.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(200));
        let mounted = mount(inputs, fs);
        // SAFETY: kill(2) on our own child's pid; strace detaches on SIGINT.
        unsafe { libc::kill(strace.id() as libc::pid_t, libc::SIGINT) };
        let status = strace.wait()?;
        let (guard, _) = mounted?;
        if !status.success() {
            let mut err = String::new();
            if let Some(mut e) = strace.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            ensure!(!err.contains("Operation not permitted"), "strace: {err}");
        }
        guard
    } else {
        let mp = inputs.mountpoint(fs);
        let cmd = inputs.mount_command(fs)?;
        let mut traced = Command::new("strace");
        traced
            .args(["-f", "-qq", "-T", "-e", TRACE, "-o"])
            .arg(&log)
            .arg(cmd.get_program())
            .args(cmd.get_args());
        fresh_upper(inputs, fs)?;
        // The FUSE peers daemonize; strace -f follows them until they exit at unmount,
        // so it is not waited for here.
        let mut child = traced
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run strace (apt-get install strace)")?;
        let start = Instant::now();
        let guard = loop {
            if is_mountpoint(&mp) {
                break MountGuard {
                    fs,
                    mountpoint: mp.clone(),
                    socket: inputs.socket(),
                    live: true,
                };
            }
            if start.elapsed() > MOUNT_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not mount under strace", fs.name());
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        // Let the log be written, then end the tracer (the traced daemon stays).
        std::thread::sleep(Duration::from_millis(100));
        drop(guard);
        let _ = child.wait();
        return parse_strace_log(&log, fs);
    };
    drop(guard);
    parse_strace_log(&log, fs)
}

fn parse_strace_log(log: &Path, fs: FsKind) -> Result<Duration> {
    let text = fs::read_to_string(log).with_context(|| format!("cannot read {}", log.display()))?;
    let (calls, total) = mount_syscalls(&text);
    ensure!(
        !calls.is_empty(),
        "strace saw no mount system call for {}:\n{text}",
        fs.name()
    );
    eprintln!(
        "{}: mount system calls {} took {:.3} ms",
        fs.name(),
        calls.join(", "),
        total.as_secs_f64() * 1e3
    );
    Ok(total)
}

/// Runs `script` with `sh -c` in `dir` and returns the wall-clock time.
fn time_script(dir: &Path, script: &str) -> Result<Duration> {
    let start = Instant::now();
    run(Command::new("sh").arg("-c").arg(script).current_dir(dir))
        .with_context(|| format!("in {}", dir.display()))?;
    Ok(start.elapsed())
}

/// One row of the report: samples per filesystem.
struct Row {
    label: String,
    samples: Vec<(FsKind, Vec<Duration>)>,
}

impl Row {
    fn new(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            samples: Vec::new(),
        }
    }

    fn push(&mut self, fs: FsKind, d: Duration) {
        match self.samples.iter_mut().find(|(f, _)| *f == fs) {
            Some((_, v)) => v.push(d),
            None => self.samples.push((fs, vec![d])),
        }
    }

    fn best(&self, fs: FsKind) -> Option<Duration> {
        self.samples
            .iter()
            .find(|(f, _)| *f == fs)
            .and_then(|(_, v)| v.iter().min().copied())
    }

    fn ratio(&self, a: FsKind, b: FsKind) -> Option<f64> {
        Some(self.best(a)?.as_secs_f64() / self.best(b)?.as_secs_f64())
    }

    fn to_json(&self) -> Value {
        let per_fs: serde_json::Map<String, Value> = self
            .samples
            .iter()
            .map(|(fs, v)| {
                let secs: Vec<f64> = v.iter().map(Duration::as_secs_f64).collect();
                let best = v.iter().min().map(Duration::as_secs_f64);
                (
                    fs.name().to_owned(),
                    json!({"best_seconds": best, "samples_seconds": secs}),
                )
            })
            .collect();
        json!({
            "measurement": self.label,
            "filesystems": per_fs,
            "ours_over_overlayfs": self.ratio(FsKind::Ours, FsKind::Overlayfs),
            "ours_over_fuse_overlayfs": self.ratio(FsKind::Ours, FsKind::FuseOverlayfs),
        })
    }
}

/// Formats a duration for the table: seconds with 2 decimals, or milliseconds with 2
/// decimals for the mount rows.
fn cell(d: Option<Duration>, millis: bool) -> String {
    match d {
        None => "-".to_owned(),
        Some(d) if millis => format!("{:.2} ms", d.as_secs_f64() * 1e3),
        Some(d) => format!("{:.2} s", d.as_secs_f64()),
    }
}

fn report_table(rows: &[Row], filesystems: &[FsKind], runs: usize, tree: &str) -> String {
    let mut header = vec!["measurement".to_owned()];
    header.extend(filesystems.iter().map(|f| f.name().to_owned()));
    let ratios: Vec<(FsKind, &str)> = [
        (FsKind::Overlayfs, "ours/overlayfs"),
        (FsKind::FuseOverlayfs, "ours/fuse-overlayfs"),
    ]
    .into_iter()
    .filter(|(f, _)| filesystems.contains(&FsKind::Ours) && filesystems.contains(f))
    .collect();
    header.extend(ratios.iter().map(|(_, h)| (*h).to_owned()));
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let millis = row.label.starts_with("mount");
            let mut cells = vec![row.label.clone()];
            cells.extend(filesystems.iter().map(|&f| cell(row.best(f), millis)));
            cells.extend(ratios.iter().map(|&(f, _)| {
                row.ratio(FsKind::Ours, f)
                    .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"))
            }));
            cells
        })
        .collect();
    let mut out =
        format!("{tree}\nbest of {runs} runs per cell; ratios are times (>1: ours slower)\n\n");
    out.push_str(&render_table(&header, &table));
    out
}

/// Copies the root, adds the random file, imports it and builds the squashfs image.
fn prepare(work: &Path, filesystems: &[FsKind]) -> Result<(Inputs, String)> {
    let root = roots::ensure_debian_root(ROOT)?;
    let tree = work.join("tree");
    eprintln!("copying {} to {}", root.display(), tree.display());
    run(Command::new("cp").arg("-a").arg(&root).arg(&tree))?;
    eprintln!("writing {BIG_FILE} ({BIG_BYTES} random bytes)");
    {
        let mut random = fs::File::open("/dev/urandom")?;
        let mut out = fs::File::create(tree.join(BIG_FILE))?;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..BIG_BYTES / buf.len() as u64 {
            random.read_exact(&mut buf)?;
            out.write_all(&buf)?;
        }
        out.sync_all()?;
    }
    let du = run(Command::new("du")
        .args(["-s", "--apparent-size", "-B1"])
        .arg(&tree))?;
    let bytes: u64 = String::from_utf8_lossy(&du.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("cannot parse du output")?;
    let description = format!(
        "tree: Debian {ROOT} root + {BIG_FILE} (random), {:.0} MB apparent, on ext4",
        bytes as f64 / 1e6
    );
    let inputs = Inputs {
        work: work.to_owned(),
        data: work.join("data"),
        squashfs: work.join("tree.sqfs"),
        tree,
    };
    for fs in filesystems {
        fs::create_dir_all(inputs.mountpoint(*fs))?;
    }
    if filesystems.contains(&FsKind::Ours) {
        eprintln!(
            "importing the tree into {}",
            inputs.data.join("store").display()
        );
        let start = Instant::now();
        run(tide(&[
            "--store".as_ref(),
            inputs.data.join("store").as_os_str(),
            "image".as_ref(),
            "import".as_ref(),
            inputs.tree.as_os_str(),
            "--name".as_ref(),
            IMAGE.as_ref(),
        ])?
        .arg("--json"))?;
        eprintln!("imported in {:.1} s", start.elapsed().as_secs_f64());
    }
    if filesystems.contains(&FsKind::Squashfuse) {
        eprintln!(
            "mksquashfs {} {}",
            inputs.tree.display(),
            inputs.squashfs.display()
        );
        run(Command::new("mksquashfs")
            .arg(&inputs.tree)
            .arg(&inputs.squashfs)
            .args(["-noappend", "-quiet", "-no-progress"]))?;
    }
    Ok((inputs, description))
}

/// The measurements, in the report's order.
fn bench(inputs: &Inputs, options: &Options) -> Result<Vec<Row>> {
    let filesystems = &options.filesystems;
    let mut daemon = if filesystems.contains(&FsKind::Ours) {
        Some(Daemon::start(
            &inputs.data,
            &inputs.socket(),
            &inputs.log(),
        )?)
    } else {
        None
    };
    // Guards are declared after the daemon, so they unmount before it stops.
    let mut mounts: Vec<(FsKind, Option<MountGuard>)> =
        filesystems.iter().map(|&f| (f, None)).collect();
    for (fs, guard) in &mut mounts {
        *guard = Some(mount(inputs, *fs)?.0);
    }

    let mut rows = Vec::new();
    let mut mount_cold = Row::new("mount → stat (cold)");
    for w in WORKLOADS {
        let mut warm = Row::new(format!("{} (warm)", w.label));
        for (fs, _) in &mounts {
            let mp = inputs.mountpoint(*fs);
            time_script(&mp, w.script)?;
            for _ in 0..options.runs {
                warm.push(*fs, time_script(&mp, w.script)?);
            }
            eprintln!(
                "{} warm, {}: {:.2} s",
                w.label,
                fs.name(),
                warm.best(*fs).expect("ran").as_secs_f64()
            );
        }
        let mut cold = Row::new(format!("{} (cold)", w.label));
        for (fs, guard) in &mut mounts {
            for _ in 0..options.runs {
                if let Some(mut g) = guard.take() {
                    g.unmount()?;
                }
                if *fs == FsKind::Ours
                    && let Some(d) = daemon.as_mut()
                {
                    d.stop()?;
                    *d = Daemon::start(&inputs.data, &inputs.socket(), &inputs.log())?;
                }
                drop_caches()?;
                let (g, took) = mount(inputs, *fs)?;
                *guard = Some(g);
                mount_cold.push(*fs, took);
                cold.push(*fs, time_script(&inputs.mountpoint(*fs), w.script)?);
            }
            eprintln!(
                "{} cold, {}: {:.2} s",
                w.label,
                fs.name(),
                cold.best(*fs).expect("ran").as_secs_f64()
            );
        }
        rows.push(warm);
        rows.push(cold);
    }

    let mut mount_warm = Row::new("mount → stat (warm)");
    for (fs, guard) in &mut mounts {
        for _ in 0..options.runs {
            if let Some(mut g) = guard.take() {
                g.unmount()?;
            }
            let (g, took) = mount(inputs, *fs)?;
            *guard = Some(g);
            mount_warm.push(*fs, took);
        }
    }
    let mut syscall = Row::new("mount(2) alone (warm)");
    for (fs, guard) in &mut mounts {
        if let Some(mut g) = guard.take() {
            g.unmount()?;
        }
        let d = (*fs == FsKind::Ours).then_some(daemon.as_ref()).flatten();
        syscall.push(*fs, mount_syscall_time(inputs, *fs, d)?);
    }
    rows.extend([mount_warm, mount_cold, syscall]);
    drop(mounts);
    if let Some(mut d) = daemon.take() {
        d.stop()?;
    }
    Ok(rows)
}

fn main() -> ExitCode {
    match run_bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-mount: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_bench() -> Result<()> {
    let Some(options) = Options::parse(std::env::args().skip(1))? else {
        println!("{USAGE}");
        return Ok(());
    };
    // SAFETY: geteuid(2) has no preconditions.
    let euid = unsafe { libc::geteuid() };
    ensure!(euid == 0, "bench-mount needs root (mounts, drop_caches)");
    ensure!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
    let work = tempfile::Builder::new()
        .prefix("tidedge-bench-mount-")
        .tempdir_in(WORK_PARENT)
        .with_context(|| format!("cannot create a work directory in {WORK_PARENT}"))?;
    let (work_dir, _cleanup) = if options.keep {
        let kept = work.keep();
        eprintln!("the work directory will be kept in {}", kept.display());
        (kept, None)
    } else {
        (work.path().to_owned(), Some(work))
    };
    let (inputs, description) = prepare(&work_dir, &options.filesystems)?;
    let rows = bench(&inputs, &options)?;
    if options.json {
        let value = json!({
            "tree": description,
            "runs": options.runs,
            "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!(
            "{}",
            report_table(&rows, &options.filesystems, options.runs, &description)
        );
    }
    Ok(())
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Options>> {
        Options::parse(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn defaults_and_flags() {
        let o = parse(&[]).unwrap().unwrap();
        assert_eq!(o.runs, 3);
        assert_eq!(o.filesystems, FsKind::ALL.to_vec());
        let o = parse(&["--runs=5", "--fs", "squashfuse,ours,ours", "--json"])
            .unwrap()
            .unwrap();
        assert_eq!(o.runs, 5);
        assert_eq!(o.filesystems, [FsKind::Ours, FsKind::Squashfuse]);
        assert!(o.json && !o.keep);
        assert!(parse(&["--runs", "0"]).is_err());
        assert!(parse(&["--fs", "zfs"]).is_err());
        assert!(parse(&["--fs"]).is_err());
        assert!(parse(&["--help"]).unwrap().is_none());
    }

    #[test]
    fn strace_lines_are_summed() {
        let log = "\
123  mount(\"tidedge:ab\", \"/mnt\", \"fuse.layerfs\", MS_NODEV, \"fd=5\") = 0 <0.000250>
123 --- SIGCHLD ---
124 fsopen(\"overlay\", FSOPEN_CLOEXEC) = 3 <0.000010>
124 fsconfig(3, FSCONFIG_CMD_CREATE, NULL, NULL, 0) = 0 <0.001000>
statx(AT_FDCWD, \"/x\", 0) = 0 <0.000002>
";
        let (calls, total) = mount_syscalls(log);
        assert_eq!(calls, ["mount", "fsopen", "fsconfig"]);
        assert_eq!(total, Duration::from_micros(1260));
    }

    #[test]
    fn ratios_use_the_best_samples() {
        let mut row = Row::new("x");
        row.push(FsKind::Ours, Duration::from_secs(3));
        row.push(FsKind::Ours, Duration::from_secs(2));
        row.push(FsKind::Overlayfs, Duration::from_secs(1));
        assert_eq!(row.ratio(FsKind::Ours, FsKind::Overlayfs), Some(2.0));
        assert_eq!(row.ratio(FsKind::Ours, FsKind::FuseOverlayfs), None);
    }
}
