//! pjdfstest (the Rust port, crates.io `pjdfstest`) as a conformance peer: the same suite
//! run on a plain directory of the disk, on kernel overlayfs and fuse-overlayfs over a
//! lower directory on that disk, and on a layerfs mount (through `volumed` and `tide`) of
//! an image of the same lower directory, so the four results are measured in one run and
//! compared test by test.
//!
//! pjdfstest runs as root and switches to the users of its `[dummy_auth]` table, so the
//! `tests` user must exist; `.ci/run` installs both. A missing prerequisite panics with
//! what to do: a conformance check that quietly does not run proves nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::tide::{Tide, sh};
use crate::volumed::Volumed;

/// Where `.ci/run` installs pjdfstest (`cargo install --root`); `PJDFSTEST` overrides.
pub const DEFAULT_BIN: &str = "/var/tmp/tidedge-tools/bin/pjdfstest";

/// Seconds pjdfstest sleeps between the two sides of a "did the time change" check. One
/// millisecond (its default) is below ext4's timestamp granularity (the kernel tick,
/// 4 ms here), so the disk itself then fails those tests at random; 10 ms measures
/// semantics rather than clock resolution.
pub const DEFAULT_NAPTIME: f64 = 0.01;

/// Optional features the configuration turns on. pjdfstest's base set plus
/// `posix_fallocate` (the configuration its numbers in issue 3 were measured with).
pub const BASE_FEATURES: &[&str] = &["posix_fallocate"];

/// Everything Linux and ext4 offer beyond the base set: 27 more tests run (ctime on
/// rename, `utimensat`, `UTIME_NOW`) instead of being skipped.
pub const LINUX_FEATURES: &[&str] = &["posix_fallocate", "rename_ctime", "utimensat", "utime_now"];

/// The result of one test case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// `ok`.
    Passed,
    /// `FAILED`.
    Failed,
    /// `skipped` (a missing feature or setting, the reason is in the output).
    Skipped,
}

impl Outcome {
    fn short(self) -> &'static str {
        match self {
            Outcome::Passed => "ok",
            Outcome::Failed => "FAILED",
            Outcome::Skipped => "skip",
        }
    }
}

/// One pjdfstest run.
#[derive(Debug, Clone)]
pub struct Run {
    /// Which filesystem it ran on.
    pub target: String,
    /// Test name → outcome.
    pub results: BTreeMap<String, Outcome>,
    /// pjdfstest's own `Summary:` line.
    pub summary: String,
    /// Everything it printed (failure reasons, backtraces).
    pub output: String,
}

impl Run {
    /// How many tests had `outcome`.
    pub fn count(&self, outcome: Outcome) -> usize {
        self.results.values().filter(|&&o| o == outcome).count()
    }

    /// Tests that passed on `other` but did not pass here.
    pub fn regressions_from(&self, other: &Run) -> Vec<String> {
        other
            .results
            .iter()
            .filter(|(name, o)| {
                **o == Outcome::Passed && self.results.get(*name) != Some(&Outcome::Passed)
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Tests that passed on `other` but failed (or did not run) here; unlike
    /// [`Run::regressions_from`] a skip is not counted, since pjdfstest decides those
    /// from its configuration and libc's view of the filesystem (glibc knows `LINK_MAX`
    /// only of filesystems it recognises by magic number, never of a FUSE mount).
    pub fn failures_from(&self, other: &Run) -> Vec<String> {
        other
            .results
            .iter()
            .filter(|(name, o)| {
                **o == Outcome::Passed
                    && !matches!(
                        self.results.get(*name),
                        Some(Outcome::Passed | Outcome::Skipped)
                    )
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// pjdfstest's explanation of why `test` failed (the lines after its result).
    pub fn reason(&self, test: &str) -> String {
        let mut lines = self.output.lines().skip_while(|l| !l.starts_with(test));
        let mut out = String::new();
        if let Some(first) = lines.next() {
            out.push_str(first.trim_end());
        }
        for l in lines.take_while(|l| l.starts_with('\t')).take(3) {
            out.push('\n');
            out.push_str(l.trim_end());
        }
        out
    }
}

/// Parses pjdfstest's output: one `NAME <spaces> ok|FAILED|skipped` line per test, and a
/// `Summary:` line at the end.
pub fn parse(output: &str) -> (BTreeMap<String, Outcome>, Option<String>) {
    let mut results = BTreeMap::new();
    let mut summary = None;
    for line in output.lines() {
        if line.starts_with("Summary:") {
            summary = Some(line.trim().to_string());
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(name), Some(result), None) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        if !name.contains("::") {
            continue;
        }
        let outcome = match result {
            "ok" => Outcome::Passed,
            "FAILED" => Outcome::Failed,
            "skipped" => Outcome::Skipped,
            _ => continue,
        };
        results.insert(name.to_string(), outcome);
    }
    (results, summary)
}

/// The pjdfstest binary; panics with how to install it if it is missing.
pub fn binary() -> PathBuf {
    let bin =
        std::env::var_os("PJDFSTEST").map_or_else(|| PathBuf::from(DEFAULT_BIN), PathBuf::from);
    assert!(
        bin.is_file(),
        "pjdfstest is not installed at {} (set PJDFSTEST to its path); install it with \
         `cargo install --locked pjdfstest --root /var/tmp/tidedge-tools` (.ci/run does)",
        bin.display()
    );
    bin
}

/// Panics unless the accounts pjdfstest switches to exist.
pub fn check_users() {
    for (user, group) in [("nobody", "nogroup"), ("tests", "tests")] {
        let o = Command::new("id")
            .args(["-u", user])
            .output()
            .expect("spawn id");
        assert!(
            o.status.success(),
            "pjdfstest needs the user `{user}`; create it with `useradd -U {user}` \
             (.ci/run does)"
        );
        let o = Command::new("getent")
            .args(["group", group])
            .output()
            .expect("spawn getent");
        assert!(
            o.status.success(),
            "pjdfstest needs the group `{group}`; create it with `groupadd {group}`"
        );
    }
}

/// Writes a pjdfstest configuration into `dir` and returns its path.
pub fn write_config(dir: &Path, naptime: f64, features: &[&str]) -> PathBuf {
    let path = dir.join("pjdfstest.toml");
    let mut text = String::from("[features]\n");
    for f in features {
        let _ = writeln!(text, "{f} = {{}}");
    }
    let _ = write!(
        text,
        "\n[settings]\nnaptime = {naptime}\nallow_remount = false\n\n[dummy_auth]\n\
         entries = [[\"nobody\", \"nogroup\"], [\"tests\", \"tests\"]]\n"
    );
    std::fs::write(&path, text).expect("write pjdfstest config");
    path
}

/// Runs the whole suite with `dir` as working directory and test path.
pub fn run(target: &str, config: &Path, dir: &Path) -> Run {
    let o = Command::new(binary())
        .arg("-c")
        .arg(config)
        .arg("-p")
        .arg(dir)
        .current_dir(dir)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("spawn pjdfstest");
    // pjdfstest exits non-zero when any test fails; only a missing summary is an error.
    let mut output = String::from_utf8_lossy(&o.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&o.stderr));
    let (results, summary) = parse(&output);
    let summary = summary.unwrap_or_else(|| {
        let tail: Vec<&str> = output.lines().rev().take(30).collect();
        panic!(
            "pjdfstest on {target} ({}) ended ({}) without a summary:\n{}",
            dir.display(),
            o.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    });
    let run = Run {
        target: target.to_string(),
        results,
        summary,
        output,
    };
    // The per-test lines are what the comparison uses; they must add up to pjdfstest's
    // own totals, or the parser has missed a change in its output format.
    for (outcome, word) in [
        (Outcome::Failed, "failed"),
        (Outcome::Skipped, "skipped"),
        (Outcome::Passed, "passed"),
    ] {
        assert_eq!(
            Some(run.count(outcome)),
            summary_count(&run.summary, word),
            "{target}: parsed {word} tests disagree with `{}`",
            run.summary
        );
    }
    run
}

/// The number before `word` in a `Summary:` line (`Summary: 0 failed, 15 skipped, ...`).
fn summary_count(summary: &str, word: &str) -> Option<usize> {
    let words: Vec<&str> = summary
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .find(|w| w[1] == word)
        .and_then(|w| w[0].parse().ok())
}

/// The four filesystems under test, mounted over one lower directory (the fixture with
/// every kind of entry); dropping it unmounts them all.
#[derive(Debug)]
pub struct Targets {
    /// Name and directory to run in, in table order.
    pub dirs: Vec<(String, PathBuf)>,
    /// Mountpoints to unmount on drop, last first (`tide umount` for ours).
    kernel_mounts: Vec<PathBuf>,
    ours: Option<(Volumed, PathBuf)>,
    // Declared last: removed after everything above is unmounted.
    tmp: tempfile::TempDir,
}

impl Targets {
    /// Builds the lower directory and mounts all four targets; panics (never skips) if a
    /// mount fails.
    pub fn new() -> Targets {
        let tmp = crate::tmpdir("pjdfs");
        let t = &tmp.path().to_path_buf();
        let mut targets = Targets {
            dirs: Vec::new(),
            kernel_mounts: Vec::new(),
            ours: None,
            tmp,
        };
        let lower = t.join("lower");
        crate::fixture::build(&lower);
        for d in [
            "ext4", "upper", "work", "ovl", "fupper", "fwork", "fovl", "mnt",
        ] {
            std::fs::create_dir_all(t.join(d)).expect("create target dir");
        }
        let fstype = sh(&format!("findmnt -n -o FSTYPE --target {}", t.display()));
        targets
            .dirs
            .push((format!("disk ({})", fstype.trim()), t.join("ext4")));

        let opts = |upper: &str, work: &str| {
            format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                t.join(upper).display(),
                t.join(work).display()
            )
        };
        sh(&format!(
            "mount -t overlay overlay -o {} {}",
            opts("upper", "work"),
            t.join("ovl").display()
        ));
        targets.kernel_mounts.push(t.join("ovl"));
        targets
            .dirs
            .push(("kernel overlayfs".into(), t.join("ovl")));

        sh(&format!(
            "fuse-overlayfs -o {} {} 2>&1",
            opts("fupper", "fwork"),
            t.join("fovl").display()
        ));
        targets.kernel_mounts.push(t.join("fovl"));
        targets.dirs.push(("fuse-overlayfs".into(), t.join("fovl")));

        let daemon = Volumed::start(t.join("data"), t.join("sock"));
        let tide = daemon.tide();
        let lower_s = lower.to_str().expect("utf-8 path");
        tide.ok(&["image", "import", lower_s, "--name", "pjdfs:1"]);
        let mnt = t.join("mnt");
        tide.ok(&["mount", "pjdfs:1", mnt.to_str().expect("utf-8 path")]);
        targets.ours = Some((daemon, mnt.clone()));
        targets.dirs.push(("layerfs (ours)".into(), mnt));
        targets
    }

    /// Runs pjdfstest on every target in turn.
    pub fn run_all(&self, naptime: f64, features: &[&str]) -> Vec<Run> {
        let config = write_config(self.tmp.path(), naptime, features);
        self.dirs
            .iter()
            .map(|(name, dir)| run(name, &config, dir))
            .collect()
    }
}

impl Default for Targets {
    fn default() -> Self {
        Targets::new()
    }
}

impl Drop for Targets {
    fn drop(&mut self) {
        if let Some((daemon, mnt)) = self.ours.take() {
            let tide: Tide = daemon.tide();
            let o = tide.run(&["umount", mnt.to_str().unwrap_or_default()]);
            if !o.status.success() {
                eprintln!("tide umount: {}", String::from_utf8_lossy(&o.stderr));
            }
        }
        for mp in self.kernel_mounts.drain(..).rev() {
            let ok = Command::new("umount")
                .arg(&mp)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                // Still busy (a test process that outlived its run): detach it so the
                // temporary directory can go.
                let _ = Command::new("umount").arg("-l").arg(&mp).status();
            }
        }
    }
}

/// A side-by-side table: totals per target, then every test whose outcome differs
/// between targets (all tests with `all`).
pub fn table(runs: &[Run], all: bool) -> String {
    let mut out = String::new();
    let w = runs
        .iter()
        .map(|r| r.target.len())
        .max()
        .unwrap_or(0)
        .max(6);
    let _ = writeln!(
        out,
        "| {:w$} | passed | failed | skipped | total |",
        "target"
    );
    let _ = writeln!(
        out,
        "|{}|-------:|-------:|--------:|------:|",
        "-".repeat(w + 2)
    );
    for r in runs {
        let _ = writeln!(
            out,
            "| {:w$} | {:>6} | {:>6} | {:>7} | {:>5} |",
            r.target,
            r.count(Outcome::Passed),
            r.count(Outcome::Failed),
            r.count(Outcome::Skipped),
            r.results.len()
        );
    }
    let names: std::collections::BTreeSet<&String> =
        runs.iter().flat_map(|r| r.results.keys()).collect();
    let mut rows = Vec::new();
    for name in names {
        let cells: Vec<&str> = runs
            .iter()
            .map(|r| r.results.get(name).map_or("-", |o| o.short()))
            .collect();
        if all || cells.iter().any(|c| *c != cells[0]) {
            rows.push((name, cells));
        }
    }
    if !rows.is_empty() {
        let n = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
        let _ = writeln!(out);
        let widths: Vec<usize> = runs.iter().map(|r| r.target.len().max(6) + 2).collect();
        let mut head = format!("{:n$}", "test");
        for (r, w) in runs.iter().zip(&widths) {
            let _ = write!(head, "{:>w$}", r.target);
        }
        let _ = writeln!(out, "{head}");
        for (name, cells) in rows {
            let mut line = format!("{name:n$}");
            for (c, w) in cells.iter().zip(&widths) {
                let _ = write!(line, "{c:>w$}");
            }
            let _ = writeln!(out, "{line}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_results_and_summary() {
        let out = "chmod::a                       ok\n\
                   chmod::b::char                 FAILED\n\
                   \tTimestamps did not change as expected\n\
                   link::c                  skipped\n\
                   \trequires features: x\n\
                   Backtrace:\n\
                   Summary: 1 failed, 1 skipped, 1 passed, 0 expected failures, 3 total\n";
        let (r, s) = parse(out);
        assert_eq!(r["chmod::a"], Outcome::Passed);
        assert_eq!(r["chmod::b::char"], Outcome::Failed);
        assert_eq!(r["link::c"], Outcome::Skipped);
        assert_eq!(r.len(), 3);
        let s = s.unwrap();
        assert_eq!(summary_count(&s, "failed"), Some(1));
        assert_eq!(summary_count(&s, "passed"), Some(1));
        assert_eq!(summary_count(&s, "total"), Some(3));
    }
}
