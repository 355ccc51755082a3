//! Support library for Tidedge's end-to-end tests and benchmarks.
//!
//! The tests in this crate drive the real binaries (`tide`, `volumed`, `sched`) against
//! real data: Debian bookworm root filesystems built with `debootstrap` by
//! `scripts/make-roots.sh` (see [`roots`]). The helpers here locate those inputs and
//! binaries, and fail loudly with an explanation when something is missing: a test that
//! cannot get its inputs panics, it never skips silently.

pub mod bench;
pub mod fixture;
pub mod fstree;
pub mod gateway;
pub mod guest;
pub mod nbd;
pub mod oci;
pub mod pjdfs;
pub mod roots;
pub mod sched;
pub mod tide;
pub mod volumed;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Name of the command-line binary built by the `cli` crate.
pub const TIDE_BIN_NAME: &str = "tide";

/// Returns the path of the `tide` binary, or panics with an explanation of how to build it.
///
/// See [`find_tide_bin`] for where it is looked for.
pub fn tide_bin() -> PathBuf {
    find_tide_bin().unwrap_or_else(|e| panic!("{e}"))
}

/// Locates the `tide` binary built by the `cli` crate.
///
/// Looks, in order, at:
/// 1. `$CARGO_BIN_EXE_tide`, if set (it must then name an existing file);
/// 2. the directory of the running executable (`target/<profile>/` for binaries);
/// 3. that directory's parent (`target/<profile>/` again when running from
///    `target/<profile>/deps/`, where cargo puts test executables).
///
/// Cargo does not build another package's binary for this crate's tests, so the error
/// message says how to build it.
pub fn find_tide_bin() -> Result<PathBuf, String> {
    find_bin(TIDE_BIN_NAME, "cli")
}

/// Name of the host daemon binary built by the `volumed` crate.
pub const VOLUMED_BIN_NAME: &str = "volumed";

/// Returns the path of the `volumed` binary (looked for as [`find_tide_bin`] does), or
/// panics with an explanation of how to build it.
pub fn volumed_bin() -> PathBuf {
    find_bin(VOLUMED_BIN_NAME, "volumed").unwrap_or_else(|e| panic!("{e}"))
}

/// Name of the HTTP front end binary built by the `gateway` crate.
pub const GATEWAY_BIN_NAME: &str = "tide-gateway";

/// Returns the path of the `tide-gateway` binary (looked for as [`find_tide_bin`]
/// does), or panics with an explanation of how to build it.
pub fn gateway_bin() -> PathBuf {
    find_bin(GATEWAY_BIN_NAME, "gateway").unwrap_or_else(|e| panic!("{e}"))
}

/// Name of the scheduler daemon binary built by the `schedd` crate.
pub const SCHED_BIN_NAME: &str = "sched";

/// Returns the path of the `sched` binary (looked for as [`find_tide_bin`] does), or
/// panics with an explanation of how to build it.
pub fn sched_bin() -> PathBuf {
    find_bin(SCHED_BIN_NAME, "schedd").unwrap_or_else(|e| panic!("{e}"))
}

/// Waits (up to 30 s) until the daemon `name` (process `child`, logging to `log`)
/// accepts connections on `socket` itself; panics with its log if it exits or never
/// serves.
///
/// A connection is not enough: it must reach a listener the daemon created (the
/// listener's pid, `SO_PEERCRED`, is the child's). A socket this test process bound and
/// dropped can stay connectable after its drop: a child that another test thread is
/// spawning holds a copy of every descriptor between its fork and its exec, and the
/// listener lives on in it until then. A probe that takes such a listener for the
/// daemon returns early, and the next client's connection waits in a backlog nobody
/// accepts from, reset when the child execs ("Connection reset by peer").
pub fn wait_serving(name: &str, child: &mut Child, socket: &Path, log: &Path) {
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if served_by(socket, child.id()) {
            return;
        }
        if let Some(st) = child.try_wait().expect("wait for the daemon") {
            panic!("{name} exited ({st}) before serving:\n{}", log_text());
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not serve {} within 30 s:\n{}",
            socket.display(),
            log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a connection to `socket` reaches a listener that process `pid` created.
pub fn served_by(socket: &Path, pid: u32) -> bool {
    UnixStream::connect(socket)
        .ok()
        .and_then(|s| peer_pid(&s))
        .is_some_and(|p| p == pid)
}

/// The pid of the process that made the listener `stream` is connected to (the peer's
/// credentials as of its `listen(2)`), if the kernel says.
pub fn peer_pid(stream: &UnixStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes passed, and the
    // descriptor belongs to `stream`, which outlives the call.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid as u32)
}

/// Leaves a Unix socket file at `path` that nothing listens on, as a daemon killed with
/// SIGKILL leaves its socket. The socket is bound but never listened on, so no client
/// can ever connect to it: a listener bound and dropped here instead could stay
/// connectable for a moment in a child another thread is spawning (see
/// [`wait_serving`]), and a daemon's stale-socket check would then find it "served".
pub fn stale_socket(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: `addr` is a valid sockaddr_un and the length passed is its size.
    let r = unsafe {
        libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    assert_eq!(
        r,
        0,
        "bind {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// The Python interpreter with pycapnp for the tests that drive the daemons from Python:
/// `$TIDEDGE_PYTHON`, else the virtualenv `.ci/run` creates (`/var/tmp/tidedge-pyenv`).
/// Panics, saying how to install it, when it cannot import `capnp`.
pub fn python() -> PathBuf {
    let py = std::env::var_os("TIDEDGE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/tidedge-pyenv/bin/python"));
    let ok = Command::new(&py)
        .args(["-c", "import capnp"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import pycapnp: run .ci/run, or `python3 -m venv /var/tmp/tidedge-pyenv && \
         /var/tmp/tidedge-pyenv/bin/pip install pycapnp`, or set TIDEDGE_PYTHON",
        py.display()
    );
    py
}

/// Runs `script` with [`python`] as `python -c SCRIPT SCHEMA ARGS...`, where SCHEMA is
/// the repository's `crates/schema/capnp/{schema}` (a client written from the schema
/// file alone); panics with its stderr and stdout unless it succeeds. Returns stdout.
pub fn run_python_client<S: AsRef<std::ffi::OsStr>>(
    script: &str,
    schema: &str,
    args: &[S],
) -> String {
    let capnp_file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../schema/capnp")
        .join(schema);
    let o = Command::new(python())
        .args(["-c", script])
        .arg(&capnp_file)
        .args(args)
        .output()
        .expect("run the python client");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "python client failed: {}\n{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// Locates binary `name` of workspace package `package` (see [`find_tide_bin`]).
fn find_bin(name: &str, package: &str) -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(format!("CARGO_BIN_EXE_{name}")) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "CARGO_BIN_EXE_{name} is set to {}, which is not a file",
                path.display()
            ))
        };
    }

    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the current executable's path: {e}"))?;
    let candidates: Vec<PathBuf> = exe
        .parent()
        .into_iter()
        .flat_map(|dir| [Some(dir), dir.parent()])
        .flatten()
        .map(|dir| dir.join(name))
        .collect();
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    Err(format!(
        "the `{name}` binary was not found (looked at {}); build it first with \
         `cargo build -p {package} --bin {name}` using the same CARGO_TARGET_DIR and \
         profile, or set CARGO_BIN_EXE_{name} to its path",
        display_paths(&candidates)
    ))
}

/// A fresh temporary directory under `/var/tmp` (a real disk: `/tmp` may be tmpfs,
/// which lacks xattrs and holes some tests need), removed when dropped.
pub fn tmpdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .expect("create a temporary directory in /var/tmp")
}

/// Formats a list of paths as `a, b, c` for error messages.
fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| Path::display(p).to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Mount points at or below `dir` (from /proc/self/mountinfo), deepest first.
pub fn mounts_below(dir: &std::path::Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut below: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| std::path::Path::new(m).starts_with(dir))
        .map(str::to_owned)
        .collect();
    below.sort_unstable_by(|a, b| b.cmp(a));
    below
}

/// Lazily unmounts every mount at or below `dir`: a daemon killed with SIGKILL leaves
/// its FUSE roots mounted, and its temporary directory could not be removed.
pub fn unmount_below(dir: &std::path::Path) {
    for m in mounts_below(dir) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(m)
            .status();
    }
}

/// Calls [`unmount_below`] on its directory when dropped (also when a test fails).
#[derive(Debug)]
pub struct UnmountBelow(pub std::path::PathBuf);

impl Drop for UnmountBelow {
    fn drop(&mut self) {
        unmount_below(&self.0);
    }
}

/// The pids of QEMU processes whose command line names a path below `dir` (guests a
/// test's volumed launched from its data directory there).
pub fn guests_below(dir: &std::path::Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.starts_with("qemu-system") && cmd.contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

/// Kills the guests below a directory when dropped (see [`kill_guests_below`]): a test
/// that panics leaves no VM behind.
#[derive(Debug)]
pub struct KillGuestsBelow(pub std::path::PathBuf);

impl Drop for KillGuestsBelow {
    fn drop(&mut self) {
        kill_guests_below(&self.0);
    }
}

/// SIGKILLs every QEMU of [`guests_below`] `dir`.
pub fn kill_guests_below(dir: &std::path::Path) {
    for pid in guests_below(dir) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
}

/// `GET path` from `addr` over HTTP/1.0: the status line and body, or None if nothing
/// answers (yet).
pub fn http_get(addr: &str, path: &str) -> Option<(String, String)> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = addr.parse().ok()?;
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: app\r\n\r\n").as_bytes())
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_listeners_own_process_counts_as_serving() {
        let dir = tmpdir("tide-probe");
        let sock = dir.path().join("s.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(served_by(&sock, std::process::id()));
        // A listener of ours is not a daemon's, whatever the daemon's pid.
        assert!(!served_by(&sock, std::process::id() + 1));
        assert!(!served_by(
            &dir.path().join("none.sock"),
            std::process::id()
        ));
    }

    #[test]
    fn a_stale_socket_file_refuses_every_connection() {
        let dir = tmpdir("tide-stale");
        let sock = dir.path().join("s.sock");
        stale_socket(&sock);
        let md = std::fs::symlink_metadata(&sock).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_socket(&md.file_type()));
        let e = UnixStream::connect(&sock).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    }
}
