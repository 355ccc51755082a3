//! Running the real `tide` binary against a store directory or a `volumed` socket.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A store directory and the `tide` commands that use it.
#[derive(Debug)]
pub struct Tide {
    /// The store directory: passed as `--store`, or owned by the daemon behind `socket`.
    pub store: PathBuf,
    /// When set, commands go through `volumed` on this socket (`--socket`) instead.
    pub socket: Option<PathBuf>,
}

impl Tide {
    /// Commands against `store` (created on first use by tide itself).
    pub fn new(store: impl AsRef<Path>) -> Tide {
        Tide {
            store: store.as_ref().to_path_buf(),
            socket: None,
        }
    }

    /// Commands through the daemon serving `socket`, which owns `store`.
    pub fn remote(socket: impl AsRef<Path>, store: impl AsRef<Path>) -> Tide {
        Tide {
            store: store.as_ref().to_path_buf(),
            socket: Some(socket.as_ref().to_path_buf()),
        }
    }

    /// A `tide --store STORE` (or `tide --socket SOCKET`) command to add arguments to.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(crate::tide_bin());
        match &self.socket {
            Some(s) => c.arg("--socket").arg(s),
            None => c.arg("--store").arg(&self.store),
        };
        c
    }

    /// Runs with `args` and returns the output, whatever the exit status.
    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Output {
        self.cmd().args(args).output().expect("spawn tide")
    }

    /// Runs and returns stdout; panics with stderr and stdout if tide failed (a failing
    /// `fsck` reports its problems on stdout).
    pub fn ok<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "tide {:?} failed ({}): {}{}",
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>(),
            o.status,
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs with `--json` and parses stdout.
    pub fn json<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> serde_json::Value {
        let mut all: Vec<std::ffi::OsString> = vec!["--json".into()];
        all.extend(args.iter().map(|a| a.as_ref().to_os_string()));
        let out = self.ok(&all);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("tide printed invalid JSON ({e}): {out}"))
    }

    /// Runs, expects failure, and returns stderr.
    pub fn fails<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> String {
        let o = self.run(args);
        assert!(
            !o.status.success(),
            "tide {:?} succeeded but should have failed: {}",
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>(),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    }
}

/// Runs a shell command (for real tools: tar, gzip, zstd), panicking with its stderr.
pub fn sh(script: &str) -> String {
    let o = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(script)
        .output()
        .expect("spawn bash");
    assert!(
        o.status.success(),
        "shell command failed: {script}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A temporary directory on the same disk as the roots (not tmpfs), removed on drop.
pub fn scratch(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .expect("create a temporary directory in /var/tmp")
}

/// Deterministic pseudo-random numbers (xorshift64) for kill points and the like; seeded
/// per process so repeated runs explore different points.
#[derive(Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator seeded with `seed` mixed with the process id.
    pub fn new(seed: u64) -> XorShift {
        XorShift((seed ^ u64::from(std::process::id())) | 1)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

impl Tide {
    /// Builds the fixture tree at `dir` and imports it as `name`.
    pub fn import_fixture(&self, dir: &Path, name: &str) {
        crate::fixture::build(dir);
        self.ok(&[
            "image",
            "import",
            dir.to_str().expect("utf-8 path"),
            "--name",
            name,
        ]);
    }
}
