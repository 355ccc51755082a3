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

    /// Runs and returns stdout; panics with stderr if tide failed.
    pub fn ok<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "tide {:?} failed ({}): {}",
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>(),
            o.status,
            String::from_utf8_lossy(&o.stderr)
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
