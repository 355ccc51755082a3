//! Real guests for the tests and benchmarks: Debian's cloud kernel (fetched into a cache
//! by `scripts/fetch-kernel`, never installed on this host), an initramfs built here
//! (busybox-static, the static `tide-manifest` from `scripts/build-guest`, the kernel
//! modules in dependency order, and an init script), and QEMU booting it with block
//! devices served over NBD.
//!
//! The init ([`INIT`]) mounts the disks it is given the way a Tidedge guest mounts its
//! root: every disk whose virtio serial is `layerN` is an EROFS layer (N counts from
//! the bottom), `scratch` is the ext4 scratch device; the layers are stacked with the
//! kernel's overlayfs under an upper directory on the scratch that carries the image
//! root's mode, owner and mtime (`tide.root=MODE,UID,GID,SEC,NSEC`). It then runs the
//! test's script (`/test.sh`, with the merged root at `/merged`) and powers off. What the
//! script prints goes to a virtio console that QEMU writes to a file; [`Run::section`]
//! reads the parts a script marks with [`begin`]/[`end`] lines.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The modules a guest loads (with their dependencies): see `guest::initramfs`.
pub use guest::initramfs::MODULES;

/// The QEMU machine. `q35`, not `microvm`: a microvm has no HPET or ACPI PM timer, and
/// under TCG on a loaded host the kernel then fails to calibrate the TSC against the
/// PIT now and then and hangs before init (1 boot in 3 here); q35 boots every time,
/// about 0.3 s slower.
pub const MACHINE: &str = "q35";

/// The guest's PID 1 (busybox sh). See the module documentation.
pub const INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m || echo "tide-init: insmod $m failed"; done
root=""; disks=0
for p in $(cat /proc/cmdline); do
  case "$p" in
    tide.root=*) root="${p#tide.root=}" ;;
    tide.disks=*) disks="${p#tide.disks=}" ;;
  esac
done
n=0; tries=0
while [ "$n" -lt "$disks" ] && [ "$tries" -lt 200 ]; do
  n=0; for b in /sys/block/vd*; do [ -e "$b/serial" ] && n=$((n+1)); done
  [ -e /dev/hvc0 ] || n=0
  tries=$((tries+1)); sleep 0.05
done
out=/dev/hvc0
[ -e $out ] || out=/dev/console
exec >$out 2>&1
echo "tide-init: $n of $disks disks"
layers=0
for b in /sys/block/vd*; do
  s=$(cat $b/serial); d=/dev/${b##*/}
  case "$s" in
    layer*) mkdir -p /layers/${s#layer}; mount -t erofs -o ro $d /layers/${s#layer} || echo "tide-init: mount $s failed"; layers=$((layers+1)) ;;
    scratch) mkdir -p /scratch; mount -t ext4 $d /scratch || echo "tide-init: mount scratch failed" ;;
  esac
done
lower=""; i=0
while [ $i -lt $layers ]; do
  if [ -z "$lower" ]; then lower=/layers/$i; else lower=/layers/$i:$lower; fi
  i=$((i+1))
done
mkdir -p /scratch/upper /scratch/work /merged
if [ -n "$root" ]; then
  IFS=, read mode uid gid sec nsec <<EOF
$root
EOF
  tide-manifest --set-meta /scratch/upper $mode $uid $gid $sec $nsec
fi
if [ "$layers" -gt 0 ]; then
  mount -t overlay overlay -o lowerdir=$lower,upperdir=/scratch/upper,workdir=/scratch/work /merged || echo "tide-init: overlay failed"
fi
echo "tide-init: root mounted"
. /test.sh
echo "tide-init: done"
sync
poweroff -f
"#;

/// The line a script prints before section `name`.
pub fn begin(name: &str) -> String {
    format!("echo '==begin {name}'")
}

/// The line a script prints after section `name`.
pub fn end(name: &str) -> String {
    format!("echo '==end {name}'")
}

/// The workspace's root directory.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/tests is two levels down")
        .to_path_buf()
}

/// The cargo target directory this test binary was built in (`TARGET/debug/deps/x`).
fn target_dir() -> PathBuf {
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(t);
    }
    let exe = std::env::current_exe().expect("current exe");
    exe.ancestors()
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n == "debug" || n == "release")
        })
        .and_then(|p| p.parent())
        .expect("test binary under a target directory")
        .to_path_buf()
}

/// Runs a script of `scripts/` and returns the last line it printed (a directory).
fn script(name: &str) -> PathBuf {
    let out = Command::new(workspace().join("scripts").join(name))
        .env("CARGO_TARGET_DIR", target_dir())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("scripts/{name}: {e}"));
    assert!(
        out.status.success(),
        "scripts/{name} failed: {}",
        out.status
    );
    let text = String::from_utf8(out.stdout).expect("utf-8 output");
    PathBuf::from(text.lines().last().expect("a directory").trim())
}

/// The directory of the static guest binaries (`scripts/build-guest`, up to date).
pub fn guest_bins() -> PathBuf {
    script("build-guest")
}

/// The guest kernel and its modules, unpacked in the cache.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `uname -r` of the kernel.
    pub version: String,
    /// The unpacked package's root (`lib/modules/VERSION`, `boot/vmlinuz-VERSION`).
    pub root: PathBuf,
}

impl Kernel {
    /// Fetches the kernel (`scripts/fetch-kernel`) unless the cache has it.
    pub fn get() -> Kernel {
        let cache = script("fetch-kernel");
        let version = std::fs::read_to_string(cache.join("done"))
            .expect("kernel cache marker")
            .trim()
            .to_string();
        Kernel {
            version,
            root: cache.join("root"),
        }
    }

    /// The kernel image QEMU boots.
    pub fn vmlinuz(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.version))
    }

    fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.version)
    }

    /// The module files for `names` and every module they depend on, in load order.
    pub fn modules(&self, names: &[&str]) -> Vec<PathBuf> {
        guest::initramfs::module_order(&self.modules_dir(), names).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Builds an initramfs: busybox with the applets the init and scripts use, the guest
/// binaries, the [`MODULES`], [`INIT`] and `script` as `/test.sh`. Returns its path.
pub fn initramfs(kernel: &Kernel, script: &str, out: &Path) -> PathBuf {
    let busybox = Path::new("/bin/busybox");
    let bytes = std::fs::read(busybox).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (busybox-static is installed by .ci/run)",
            busybox.display()
        )
    });
    let mut fs = guest::initramfs::Initramfs::new();
    fs.file("bin/busybox", 0o755, bytes);
    for applet in [
        "sh", "mount", "umount", "mkdir", "insmod", "cat", "ls", "echo", "sleep", "poweroff",
        "chroot", "cp", "tar", "wc", "sync", "head", "dd", "id", "date", "true", "false",
    ] {
        fs.symlink(&format!("bin/{applet}"), "busybox");
    }
    let bins = guest_bins();
    fs.file(
        "bin/tide-manifest",
        0o755,
        std::fs::read(bins.join("tide-manifest")).expect("tide-manifest built"),
    );
    add_modules(&mut fs, kernel);
    fs.file("init", 0o755, INIT.as_bytes().to_vec());
    fs.file("test.sh", 0o644, script.as_bytes().to_vec());
    finish(fs, out)
}

/// The initramfs of a Tidedge guest: `tide-init` (from `scripts/build-guest`) as
/// `/init`, and the [`MODULES`]; nothing else (the app runs in the image's root). The
/// host drives it over the control port (`guest::control`). Returns its path.
pub fn init_initramfs(kernel: &Kernel, out: &Path) -> PathBuf {
    let mut fs = guest::initramfs::Initramfs::new();
    let init = guest_bins().join("tide-init");
    fs.file(
        "init",
        0o755,
        std::fs::read(&init).unwrap_or_else(|e| panic!("{}: {e}", init.display())),
    );
    add_modules(&mut fs, kernel);
    finish(fs, out)
}

/// The [`MODULES`] (and their dependencies) under `lib/modules`, and `modules.order`
/// listing them in load order.
fn add_modules(fs: &mut guest::initramfs::Initramfs, kernel: &Kernel) {
    fs.modules(&kernel.modules(&MODULES))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// The mount points and console every initramfs has; writes it to `out`.
fn finish(mut fs: guest::initramfs::Initramfs, out: &Path) -> PathBuf {
    fs.base();
    std::fs::write(out, fs.to_bytes()).unwrap();
    out.to_path_buf()
}

/// One block device given to the guest.
#[derive(Debug, Clone)]
pub struct Disk {
    /// The virtio serial the init identifies it by (`layer0`, `scratch`, ...).
    pub serial: String,
    /// Where QEMU reads it.
    pub source: Source,
    /// Attached read-only.
    pub read_only: bool,
}

/// Where a disk's bytes come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// An NBD export on a Unix socket.
    Nbd {
        /// The server's socket.
        socket: PathBuf,
        /// The export name.
        export: String,
    },
    /// A raw image file QEMU opens itself.
    File(PathBuf),
    /// A vhost-user-blk backend's socket (QEMU connects, reconnecting every second if
    /// the backend goes away). The guest's memory is then shared (memfd); the disk's
    /// serial is what the backend answers to GET_ID, not [`Disk::serial`].
    VhostUser(PathBuf),
}

impl Source {
    /// Parses `nbd+unix:///EXPORT?socket=PATH`, the URIs volumed hands out.
    pub fn from_uri(uri: &str) -> Source {
        let rest = uri
            .strip_prefix("nbd+unix:///")
            .unwrap_or_else(|| panic!("not an nbd+unix URI: {uri}"));
        let (export, socket) = rest
            .split_once("?socket=")
            .unwrap_or_else(|| panic!("no socket in {uri}"));
        Source::Nbd {
            socket: PathBuf::from(socket),
            export: export.to_string(),
        }
    }
}

/// What a guest run printed.
#[derive(Debug)]
pub struct Run {
    /// The virtio console: the init's and the script's output.
    pub output: String,
    /// The serial console: the kernel's messages.
    pub console: String,
    /// From QEMU's start to its exit.
    pub elapsed: Duration,
    /// When each `==end NAME` line first appeared in the output, from QEMU's start
    /// (watched every 20 ms while the guest runs): `(NAME, time)` in output order.
    pub marks: Vec<(String, Duration)>,
}

impl Run {
    /// The lines between `==begin NAME` and `==end NAME`; panics, showing the output,
    /// when the section is missing or unterminated.
    pub fn section(&self, name: &str) -> String {
        let (b, e) = (format!("==begin {name}\n"), format!("==end {name}\n"));
        let start = self.output.find(&b).unwrap_or_else(|| {
            panic!(
                "no section {name} in the guest's output:\n{}\nconsole:\n{}",
                self.tail(),
                self.console
            )
        }) + b.len();
        let len = self.output[start..]
            .find(&e)
            .unwrap_or_else(|| panic!("section {name} never ended:\n{}", self.tail()));
        self.output[start..start + len].to_string()
    }

    /// When section `name` ended (see [`Run::marks`]); panics, showing the output, when
    /// it never did.
    pub fn ended_at(&self, name: &str) -> Duration {
        self.marks
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| *t)
            .unwrap_or_else(|| panic!("section {name} never ended:\n{}", self.tail()))
    }

    /// The last 60 lines of the output (for failure messages).
    pub fn tail(&self) -> String {
        let lines: Vec<&str> = self.output.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

/// A guest to boot.
#[derive(Debug, Clone)]
pub struct Guest {
    /// The kernel.
    pub kernel: Kernel,
    /// The initramfs (see [`initramfs`]).
    pub initrd: PathBuf,
    /// The disks, in the order they are attached.
    pub disks: Vec<Disk>,
    /// Extra kernel command line (e.g. `tide.root=...`).
    pub append: String,
    /// Guest memory.
    pub memory_mib: u32,
    /// Virtual CPUs (each vhost-user disk gets a queue per vCPU, at least two).
    pub vcpus: u32,
    /// Where QEMU writes the consoles (`DIR/console`, `DIR/output`).
    pub dir: PathBuf,
    /// A Unix socket QEMU listens on for the guest's control port
    /// (`guest::control::PORT`, a virtio-serial port), if the guest has one.
    pub control: Option<PathBuf>,
}

/// A guest QEMU is running ([`Guest::spawn`]); killed if dropped before it is waited for.
#[derive(Debug)]
pub struct Running {
    child: Option<std::process::Child>,
    started: Instant,
    console: PathBuf,
    output: PathBuf,
    marks: Marks,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Guest {
    /// The `tide.root=` parameter for a root of this mode, owner and mtime.
    pub fn root_param(mode: u32, uid: u32, gid: u32, sec: i64, nsec: i64) -> String {
        format!("tide.root={:o},{uid},{gid},{sec},{nsec}", mode & 0o7777)
    }

    /// Boots the guest under QEMU ([`MACHINE`], TCG) and waits for it to power off; panics
    /// (after killing QEMU) if it runs longer than `timeout`.
    pub fn boot(&self, timeout: Duration) -> Run {
        self.spawn().wait(timeout)
    }

    /// Starts QEMU on the guest and returns at once.
    pub fn spawn(&self) -> Running {
        std::fs::create_dir_all(&self.dir).unwrap();
        let (console, output) = (self.dir.join("console"), self.dir.join("output"));
        let _ = std::fs::remove_file(&output);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-M", MACHINE])
            .args(["-accel", "tcg", "-m"])
            .arg(self.memory_mib.to_string())
            .arg("-smp")
            .arg(self.vcpus.max(1).to_string())
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(self.kernel.vmlinuz())
            .arg("-initrd")
            .arg(&self.initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 {}panic=-1 tide.disks={} {}",
                if std::env::var_os("TIDE_GUEST_VERBOSE").is_some() {
                    ""
                } else {
                    "quiet "
                },
                self.disks.len(),
                self.append
            ))
            .args(["-device", "virtio-serial-pci", "-chardev"])
            .arg(format!("file,id=out,path={}", output.display()))
            .args(["-device", "virtconsole,chardev=out"]);
        if let Some(sock) = &self.control {
            let _ = std::fs::remove_file(sock);
            cmd.arg("-chardev")
                .arg(format!(
                    "socket,id=ctl,path={},server=on,wait=off",
                    sock.display()
                ))
                .arg("-device")
                .arg(format!(
                    "virtserialport,chardev=ctl,name={}",
                    guest::control::PORT
                ));
        }
        if self
            .disks
            .iter()
            .any(|d| matches!(d.source, Source::VhostUser(_)))
        {
            // vhost-user backends map the guest's memory: it must be shareable.
            cmd.arg("-object")
                .arg(format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    self.memory_mib
                ))
                .args(["-machine", "memory-backend=mem"]);
        }
        for (i, d) in self.disks.iter().enumerate() {
            let ro = if d.read_only { "on" } else { "off" };
            let spec = match &d.source {
                Source::VhostUser(socket) => {
                    cmd.arg("-chardev")
                        .arg(format!(
                            "socket,id=vu{i},path={},reconnect=1",
                            socket.display()
                        ))
                        .arg("-device")
                        // A queue per vCPU, and at least two: a backend must accept
                        // more queues than a one-vCPU guest drives.
                        .arg(format!(
                            "vhost-user-blk-pci,chardev=vu{i},num-queues={}",
                            self.vcpus.max(2)
                        ));
                    continue;
                }
                Source::Nbd { socket, export } => format!(
                    "driver=nbd,server.type=unix,server.path={},export={export},read-only={ro},node-name=d{i}",
                    socket.display()
                ),
                Source::File(path) => format!(
                    "driver=raw,file.driver=file,file.filename={},read-only={ro},node-name=d{i}",
                    path.display()
                ),
            };
            cmd.arg("-blockdev")
                .arg(spec)
                .arg("-device")
                .arg(format!("virtio-blk-pci,drive=d{i},serial={}", d.serial));
        }
        let started = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-system-x86_64 (qemu-system-x86, installed by .ci/run)");
        Running {
            child: Some(child),
            started,
            console,
            output,
            marks: Marks::default(),
        }
    }
}

impl Running {
    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits for the guest to power off; panics (after killing QEMU) if it runs longer
    /// than `timeout` from its start, or if QEMU fails.
    pub fn wait(mut self, timeout: Duration) -> Run {
        // TIDE_GUEST_TIMEOUT (seconds) shortens the wait, for debugging a guest.
        let timeout = std::env::var("TIDE_GUEST_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(timeout, Duration::from_secs);
        let mut child = self.child.take().expect("waited once");
        let (output, console) = (self.output.clone(), self.console.clone());
        let status = loop {
            self.marks.scan(&output, self.started.elapsed());
            if let Some(st) = child.try_wait().expect("wait for qemu") {
                break st;
            }
            if self.started.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
                }
                panic!(
                    "the guest ran longer than {timeout:?}; qemu: {stderr}\noutput:\n{}\nconsole:\n{}",
                    std::fs::read_to_string(&output).unwrap_or_default(),
                    std::fs::read_to_string(&console).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let elapsed = self.started.elapsed();
        self.marks.scan(&output, elapsed);
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        let run = Run {
            output: String::from_utf8_lossy(&std::fs::read(&output).unwrap_or_default())
                .replace('\r', ""),
            console: std::fs::read_to_string(&console).unwrap_or_default(),
            elapsed,
            marks: std::mem::take(&mut self.marks.seen),
        };
        assert!(
            status.success(),
            "qemu exited with {status}: {stderr}\noutput:\n{}",
            run.tail()
        );
        run
    }
}

/// Watches a growing output file for `==end NAME` lines.
#[derive(Debug, Default)]
struct Marks {
    /// Bytes of the file already looked at (up to the last complete line).
    offset: u64,
    seen: Vec<(String, Duration)>,
}

impl Marks {
    /// Reads what the file gained since the last call; every complete `==end` line in
    /// it is stamped `now`.
    fn scan(&mut self, path: &Path, now: Duration) {
        use std::io::{Read as _, Seek as _, SeekFrom};
        let Ok(mut f) = std::fs::File::open(path) else {
            return;
        };
        let mut new = Vec::new();
        if f.seek(SeekFrom::Start(self.offset)).is_err() || f.read_to_end(&mut new).is_err() {
            return;
        }
        let Some(last) = new.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        for line in new[..last].split(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(line);
            if let Some(name) = line.trim_end_matches('\r').strip_prefix("==end ") {
                self.seen.push((name.to_string(), now));
            }
        }
        self.offset += last as u64 + 1;
    }
}

/// The host's end of a guest's control channel (`guest::control`), on the Unix socket
/// QEMU listens on.
#[derive(Debug)]
pub struct Control {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
    /// A name for the events printed on stderr.
    name: String,
}

impl Control {
    /// Connects to `socket` (retrying until QEMU serves it, up to `timeout`); each read
    /// may then wait up to `timeout`.
    pub fn connect(socket: &Path, name: &str, timeout: Duration) -> Control {
        let deadline = Instant::now() + timeout;
        let s = loop {
            match std::os::unix::net::UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "no control socket {}: {e}",
                        socket.display()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        s.set_read_timeout(Some(timeout)).unwrap();
        Control {
            writer: s.try_clone().unwrap(),
            reader: std::io::BufReader::new(s),
            name: name.to_string(),
        }
    }

    /// The next event; panics if the channel closes or says something else.
    pub fn event(&mut self) -> guest::control::Event {
        use std::io::BufRead;
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .expect("read the control port");
        assert!(n > 0, "{}: the control channel closed", self.name);
        let e = guest::control::decode(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        eprintln!("{}: {e:?}", self.name);
        e
    }

    /// Sends `c`.
    pub fn send(&mut self, c: &guest::control::Command) {
        use std::io::Write;
        self.writer
            .write_all(guest::control::encode(c).as_bytes())
            .expect("write the control port");
    }

    /// Events until (and with) `exited` or `failed`.
    pub fn until_end(&mut self) -> Vec<guest::control::Event> {
        let mut out = Vec::new();
        loop {
            let e = self.event();
            let last = matches!(
                e,
                guest::control::Event::Exited { .. } | guest::control::Event::Failed { .. }
            );
            out.push(e);
            if last {
                return out;
            }
        }
    }
}

/// The image root metadata a guest's overlay upper takes, from `root` on the host.
pub fn root_meta(root: &Path) -> guest::control::RootMeta {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::symlink_metadata(root).unwrap_or_else(|e| panic!("{}: {e}", root.display()));
    guest::control::RootMeta {
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec(),
    }
}

/// A fresh sparse ext4 file of `bytes` at `path` (a scratch disk), made by mkfs.ext4.
pub fn ext4_file(path: &Path, bytes: u64) -> PathBuf {
    let _ = std::fs::remove_file(path);
    std::fs::File::create(path).unwrap().set_len(bytes).unwrap();
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .output()
        .expect("mkfs.ext4 (e2fsprogs)");
    assert!(
        o.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    path.to_path_buf()
}

/// The `volumed` flags of a host that boots guests for the scheduler at `sched`: this
/// kernel and initramfs under TCG, 16 vCPUs to place, 1 GiB scratch devices; `extra`
/// added (`--host-id`, `--memory`, `--boot-timeout` ...).
pub fn guest_host_args(sched: &str, kernel: &Kernel, initrd: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--scheduler",
        sched,
        "--vcpus",
        "16",
        "--kernel",
        &kernel.vmlinuz().to_string_lossy(),
        "--initramfs",
        &initrd.to_string_lossy(),
        "--accel",
        "tcg",
        "--scratch-size",
        "1G",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    a.extend(extra.iter().map(ToString::to_string));
    a
}
