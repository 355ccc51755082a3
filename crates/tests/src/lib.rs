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

/// Name of the scheduler daemon binary built by the `schedd` crate.
pub const SCHED_BIN_NAME: &str = "sched";

/// Returns the path of the `sched` binary (looked for as [`find_tide_bin`] does), or
/// panics with an explanation of how to build it.
pub fn sched_bin() -> PathBuf {
    find_bin(SCHED_BIN_NAME, "schedd").unwrap_or_else(|e| panic!("{e}"))
}

/// Waits (up to 30 s) until the daemon `name` (process `child`, logging to `log`)
/// accepts connections on `socket`; panics with its log if it exits or never serves.
pub fn wait_serving(name: &str, child: &mut Child, socket: &Path, log: &Path) {
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if UnixStream::connect(socket).is_ok() {
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
