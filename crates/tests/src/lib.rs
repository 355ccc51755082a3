//! Support library for Tidedge's end-to-end tests and benchmarks.
//!
//! The tests in this crate drive the real binaries (`tide`, and later the daemons) against
//! real data: Debian bookworm root filesystems built with `debootstrap` by
//! `scripts/make-roots.sh` (see [`roots`]). The helpers here locate those inputs and
//! binaries, and fail loudly with an explanation when something is missing: a test that
//! cannot get its inputs panics, it never skips silently.

pub mod fixture;
pub mod fstree;
pub mod roots;
pub mod tide;

use std::path::{Path, PathBuf};

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
    if let Some(path) = std::env::var_os(format!("CARGO_BIN_EXE_{TIDE_BIN_NAME}")) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "CARGO_BIN_EXE_{TIDE_BIN_NAME} is set to {}, which is not a file",
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
        .map(|dir| dir.join(TIDE_BIN_NAME))
        .collect();
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    Err(format!(
        "the `{TIDE_BIN_NAME}` binary was not found (looked at {}); build it first with \
         `cargo build -p cli --bin {TIDE_BIN_NAME}` using the same CARGO_TARGET_DIR and \
         profile, or set CARGO_BIN_EXE_{TIDE_BIN_NAME} to its path",
        display_paths(&candidates)
    ))
}

/// Formats a list of paths as `a, b, c` for error messages.
fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| Path::display(p).to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
