//! Real Debian root filesystems for tests and benchmarks.
//!
//! `scripts/make-roots.sh` builds them with `debootstrap` (bookworm, from
//! `deb.debian.org`) under [`roots_dir`]: `minbase` (the minimal base variant), `python3`
//! (minbase plus Python 3) and `flask` (minbase plus Python 3, Flask and NumPy). A root is
//! complete when its marker `NAME.done` exists next to it; building takes a few minutes the
//! first time and is a no-op afterwards. Building needs root privileges and network access
//! to the Debian mirror.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The roots `scripts/make-roots.sh` knows how to build, smallest first; each one contains
/// the packages of the one before it.
pub const ROOT_NAMES: [&str; 3] = ["minbase", "python3", "flask"];

/// Environment variable naming the directory that holds the roots.
pub const ROOTS_ENV: &str = "TIDEDGE_ROOTS";

/// Directory used when [`ROOTS_ENV`] is not set.
pub const DEFAULT_ROOTS_DIR: &str = "/var/tmp/tidedge-roots";

/// How many of the script's last output lines an error message quotes.
const ERROR_TAIL_LINES: usize = 40;

/// Directory that holds the roots: `$TIDEDGE_ROOTS`, or `/var/tmp/tidedge-roots`.
pub fn roots_dir() -> PathBuf {
    std::env::var_os(ROOTS_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_ROOTS_DIR), PathBuf::from)
}

/// Path of `scripts/make-roots.sh` in this workspace (two levels above this crate).
pub fn make_roots_script() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .ancestors()
        .nth(2)
        .expect("crates/tests lies two levels below the workspace root")
        .join("scripts/make-roots.sh")
}

/// Path where the root `name` lives once built (it may not exist yet).
pub fn root_path(name: &str) -> PathBuf {
    roots_dir().join(name)
}

/// Path of the marker file whose presence means the root `name` is complete.
pub fn marker_path(name: &str) -> PathBuf {
    roots_dir().join(format!("{name}.done"))
}

/// Whether the root `name` has been completely built.
pub fn is_built(name: &str) -> bool {
    marker_path(name).is_file() && root_path(name).is_dir()
}

/// Returns the path of the Debian root `name` (one of [`ROOT_NAMES`]), building it first
/// with `scripts/make-roots.sh` if it is not complete.
///
/// # Panics
///
/// Panics with the reason and the end of the script's output if the root cannot be built
/// (unknown name, not running as root, `debootstrap` failing, no network, ...). Tests that
/// need a root must fail when it is unavailable, never skip.
pub fn debian_root(name: &str) -> PathBuf {
    ensure_debian_root(name)
        .unwrap_or_else(|e| panic!("cannot provide the Debian root `{name}`: {e:#}"))
}

/// Like [`debian_root`], but returns an error instead of panicking.
///
/// While the script runs, its own progress lines (and any warning or error from
/// `debootstrap`) are echoed to stderr; `debootstrap`'s routine `I:` lines are not, but the
/// last lines of all output are quoted in the error if the build fails.
pub fn ensure_debian_root(name: &str) -> Result<PathBuf> {
    if !ROOT_NAMES.contains(&name) {
        bail!(
            "unknown root `{name}`; known roots: {}",
            ROOT_NAMES.join(", ")
        );
    }
    if is_built(name) {
        return Ok(root_path(name));
    }

    let script = make_roots_script();
    eprintln!(
        "building Debian root `{name}` in {} with {} (takes a few minutes, once)",
        roots_dir().display(),
        script.display()
    );
    let mut child = Command::new("bash")
        .arg(&script)
        .arg(name)
        .env(ROOTS_ENV, roots_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", script.display()))?;

    let mut tail = VecDeque::with_capacity(ERROR_TAIL_LINES);
    let stderr = child
        .stderr
        .take()
        .context("child stderr was not captured")?;
    let mut reader = BufReader::new(stderr);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        let n = reader
            .read_until(b'\n', &mut raw)
            .with_context(|| format!("reading the output of {}", script.display()))?;
        if n == 0 {
            break;
        }
        let line = String::from_utf8_lossy(&raw).trim_end().to_owned();
        if !line.starts_with("I: ") {
            eprintln!("{line}");
        }
        if tail.len() == ERROR_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {}", script.display()))?;

    if !status.success() {
        bail!(
            "{} {name} failed ({status}); last output:\n{}",
            script.display(),
            Vec::from(tail).join("\n")
        );
    }
    if !is_built(name) {
        bail!(
            "{} {name} succeeded but {} or its marker {} is missing",
            script.display(),
            root_path(name).display(),
            marker_path(name).display()
        );
    }
    Ok(root_path(name))
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn the_script_is_found() {
        let script = make_roots_script();
        assert!(script.is_file(), "{} is missing", script.display());
    }

    #[test]
    fn an_unknown_root_is_an_error_not_a_build() {
        let err = ensure_debian_root("no-such-root").unwrap_err().to_string();
        assert!(err.contains("unknown root `no-such-root`"), "{err}");
        assert!(err.contains("minbase, python3, flask"), "{err}");
    }

    #[test]
    #[should_panic(expected = "cannot provide the Debian root `../minbase`")]
    fn debian_root_panics_with_the_reason() {
        debian_root("../minbase");
    }

    #[test]
    fn markers_sit_next_to_the_roots() {
        assert_eq!(marker_path("flask"), roots_dir().join("flask.done"));
        assert_eq!(root_path("flask"), roots_dir().join("flask"));
    }
}
