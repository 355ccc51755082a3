//! `bench-ingest`: compares ingest of real Debian roots into castore and into peer tools.
//!
//! For each selected tool, one fresh repository is created and the three Debian bookworm
//! roots of [`tests::roots`] are ingested into it in sequence (`minbase`, `python3`,
//! `flask`; each contains the previous one's packages, so later ingests deduplicate against
//! earlier ones). Then the unchanged `flask` root is ingested once more ("re-import").
//!
//! Tools and what is measured as "stored":
//! - `castore`: the `tide` CLI (`tide --store DIR image import ROOT --name bench:NAME
//!   --json`); stored = `stored_bytes` of `tide --store DIR stats --json` (compressed chunk
//!   bytes).
//! - `restic`: `restic backup --compression auto` into a format-2 repository; stored =
//!   `du -sb` of the repository.
//! - `borg`: `borg create --compression zstd,3` into an unencrypted repository; stored =
//!   `du -sb` of the repository.
//! - `casync`: `casync make --compression=zstd` into a chunk store; stored = `du -sb` of
//!   the store (the `.caidx` indexes are kept next to it).
//!
//! The logical size of the input is the sum of the sizes of the regular files of the three
//! roots (a file with several hardlinks counted once, as castore's `logical_bytes` does),
//! measured by one walker for all tools. Before the first tool runs, that walker also reads every file so that every tool
//! sees a warm page cache. (`tar cf /dev/null` would not do: GNU tar notices it is writing
//! to `/dev/null` and skips reading file data.) Before each timed command, `sync` flushes
//! the previous command's dirty pages, outside the timing.
//!
//! Tools use their defaults otherwise: restic and borg skip unchanged files on re-import
//! through their files caches; casync has no such cache unless asked (`--cache`).
//!
//! Usage: `bench-ingest [--tools castore,restic,borg,casync] [--json] [--keep]`

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use tests::bench::{render_table, run};
use tests::roots;

/// The roots ingested, in order.
const INGEST_ORDER: [&str; 3] = ["minbase", "python3", "flask"];

/// The root ingested a second time, unchanged.
const REIMPORT_ROOT: &str = "flask";

/// Name given to the re-import (archive, snapshot tag, image name, index file).
const REIMPORT_LABEL: &str = "flask-reimport";

/// Directory under which the repositories are created (same disk as the roots).
const WORK_PARENT: &str = "/var/tmp";

/// Bytes per MB in the report (decimal megabytes).
const MB: f64 = 1_000_000.0;

/// Password restic requires; the repositories are throwaway.
const RESTIC_PASSWORD: &str = "tidedge-bench";

const USAGE: &str = "\
usage: bench-ingest [--tools castore,restic,borg,casync] [--json] [--keep]

Ingests the Debian roots minbase, python3 and flask (built on demand by
scripts/make-roots.sh) in sequence into one fresh repository per tool, then
re-imports the unchanged flask root, and reports time, throughput, stored
bytes and dedup ratio per tool.

  --tools LIST   comma-separated subset of castore,restic,borg,casync (default: all)
  --json         print a JSON array instead of a table
  --keep         keep the repositories (their directory is printed on stderr)
  -h, --help     show this help";

/// A tool under comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ToolKind {
    Castore,
    Restic,
    Borg,
    Casync,
}

impl ToolKind {
    /// Every tool, in the default order.
    const ALL: [Self; 4] = [Self::Castore, Self::Restic, Self::Borg, Self::Casync];

    /// The name used on the command line and in reports.
    fn name(self) -> &'static str {
        match self {
            Self::Castore => "castore",
            Self::Restic => "restic",
            Self::Borg => "borg",
            Self::Casync => "casync",
        }
    }

    /// Parses a tool name as given to `--tools`.
    fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .with_context(|| {
                format!(
                    "unknown tool `{name}` (known: {})",
                    Self::ALL.map(Self::name).join(", ")
                )
            })
    }
}

/// Command-line options.
#[derive(Debug)]
struct Options {
    /// Tools to run, in order, without duplicates.
    tools: Vec<ToolKind>,
    /// Print JSON instead of a table.
    json: bool,
    /// Keep the repositories.
    keep: bool,
}

impl Options {
    /// Parses the arguments (without the program name). Returns `None` for `--help`.
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Self>> {
        let mut options = Self {
            tools: ToolKind::ALL.to_vec(),
            json: false,
            keep: false,
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "-h" | "--help" => return Ok(None),
                "--json" => options.json = true,
                "--keep" => options.keep = true,
                "--tools" => {
                    let list = args.next().context("--tools needs a value")?;
                    options.tools = parse_tool_list(&list)?;
                }
                _ => match arg.strip_prefix("--tools=") {
                    Some(list) => options.tools = parse_tool_list(list)?,
                    None => bail!("unexpected argument `{arg}`\n\n{USAGE}"),
                },
            }
        }
        Ok(Some(options))
    }
}

/// Parses `castore,restic,...` into tools, keeping the first occurrence of each.
fn parse_tool_list(list: &str) -> Result<Vec<ToolKind>> {
    let mut tools = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let tool = ToolKind::parse(name)?;
        if !tools.contains(&tool) {
            tools.push(tool);
        }
    }
    ensure!(!tools.is_empty(), "--tools needs at least one tool");
    Ok(tools)
}

/// Sizes of one tree, as seen by [`scan_tree`].
#[derive(Debug, Default, Clone, Copy)]
struct TreeSize {
    /// Sum of the sizes of regular files, each inode counted once.
    regular_bytes: u64,
    /// Number of regular files (inodes: hardlinks to one file count once).
    regular_files: u64,
    /// Number of entries of any type, the top directory included.
    entries: u64,
}

/// Walks `dir` without following symlinks and sums its regular files' sizes, counting a
/// file with several hardlinks once. With `read_contents`, also reads every regular file
/// to the end (to warm the page cache).
fn scan_tree(dir: &Path, read_contents: bool) -> Result<TreeSize> {
    let mut size = TreeSize {
        entries: 1,
        ..TreeSize::default()
    };
    // (device, inode) of the multiply-linked files already counted.
    let mut linked = HashSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries =
            fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
            let path = entry.path();
            let meta = fs::symlink_metadata(&path)
                .with_context(|| format!("cannot stat {}", path.display()))?;
            size.entries += 1;
            if meta.is_dir() {
                pending.push(path);
            } else if meta.is_file() {
                if meta.nlink() > 1 && !linked.insert((meta.dev(), meta.ino())) {
                    continue;
                }
                size.regular_files += 1;
                size.regular_bytes += meta.len();
                if read_contents {
                    let mut file = fs::File::open(&path)
                        .with_context(|| format!("cannot open {}", path.display()))?;
                    io::copy(&mut file, &mut io::sink())
                        .with_context(|| format!("cannot read {}", path.display()))?;
                }
            }
        }
    }
    Ok(size)
}

/// Runs `cmd` like [`run`] and returns how long it took, from spawn to exit.
fn run_timed(cmd: &mut Command) -> Result<(Duration, Output)> {
    let start = Instant::now();
    let output = run(cmd)?;
    Ok((start.elapsed(), output))
}

/// Flushes dirty pages to disk so that one command's writeback does not land in the next
/// command's timing.
fn sync() -> Result<()> {
    run(&mut Command::new("sync")).map(drop)
}

/// `du -sb PATH`: apparent size in bytes of everything under `path`, directories included.
fn du_bytes(path: &Path) -> Result<u64> {
    let output = run(Command::new("du").arg("-sb").arg(path))?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("cannot parse `du -sb {}` output: {text:?}", path.display()))
}

/// First line of a command's stdout (or stderr, for tools that print versions there).
fn first_line(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    stdout
        .lines()
        .chain(stderr.lines())
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("unknown")
        .to_owned()
}

/// A tool set up to work in its own directory.
#[derive(Debug)]
struct Tool {
    kind: ToolKind,
    /// The program to run (`tide`'s full path, or a peer tool's name on `PATH`).
    program: PathBuf,
    /// The tool's working directory; the repository and any cache live under it.
    dir: PathBuf,
    /// The tool's version, as it reports it.
    version: String,
}

impl Tool {
    /// Locates the tool's program and checks that it runs, failing with an explanation if
    /// it is missing.
    fn locate(kind: ToolKind, work: &Path) -> Result<Self> {
        let program = match kind {
            ToolKind::Castore => tests::find_tide_bin()
                .map_err(|e| anyhow::anyhow!("castore is benchmarked through `tide`: {e}"))?,
            ToolKind::Restic => PathBuf::from("restic"),
            ToolKind::Borg => PathBuf::from("borg"),
            ToolKind::Casync => PathBuf::from("casync"),
        };
        let mut tool = Self {
            kind,
            program,
            dir: work.join(kind.name()),
            version: String::new(),
        };
        tool.version = tool.query_version()?;
        Ok(tool)
    }

    /// Asks the tool for its version string, which also checks that the program runs.
    fn query_version(&self) -> Result<String> {
        let mut cmd = self.command();
        match self.kind {
            ToolKind::Restic => cmd.arg("version"),
            _ => cmd.arg("--version"),
        };
        let apt_hint = match self.kind {
            ToolKind::Castore => "",
            ToolKind::Restic => " (apt-get install restic)",
            ToolKind::Borg => " (apt-get install borgbackup)",
            ToolKind::Casync => " (apt-get install casync)",
        };
        match run(&mut cmd) {
            Ok(output) => Ok(first_line(&output)),
            // `tide` may not have a --version flag; it ran, which is all that matters.
            Err(_) if self.kind == ToolKind::Castore && self.program.is_file() => {
                Ok("unknown".to_owned())
            }
            Err(e) => Err(e.context(format!("{} is not usable{apt_hint}", self.kind.name()))),
        }
    }

    /// Where the tool keeps its data: the store or repository directory.
    fn repo(&self) -> PathBuf {
        match self.kind {
            ToolKind::Castore | ToolKind::Casync => self.dir.join("store"),
            ToolKind::Restic | ToolKind::Borg => self.dir.join("repo"),
        }
    }

    /// Directory holding everything needed to restore: for casync the store and the
    /// indexes, for the others the repository.
    fn repo_with_indexes(&self) -> PathBuf {
        match self.kind {
            ToolKind::Casync => self.dir.clone(),
            _ => self.repo(),
        }
    }

    /// A command for the tool's program with its environment set: caches and
    /// configuration under the tool's directory, never in `$HOME`.
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        match self.kind {
            ToolKind::Castore | ToolKind::Casync => {}
            ToolKind::Restic => {
                cmd.env("RESTIC_PASSWORD", RESTIC_PASSWORD)
                    .env("RESTIC_REPOSITORY", self.repo())
                    .env("RESTIC_CACHE_DIR", self.dir.join("cache"));
            }
            ToolKind::Borg => {
                cmd.env("BORG_BASE_DIR", self.dir.join("base"))
                    .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
                    .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes");
            }
        }
        cmd
    }

    /// Creates the tool's directory and an empty repository.
    fn init(&self) -> Result<()> {
        fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        match self.kind {
            // `tide` and `casync` create their store on first use.
            ToolKind::Castore => {}
            ToolKind::Casync => {
                let indexes = self.dir.join("indexes");
                fs::create_dir(&indexes)
                    .with_context(|| format!("cannot create {}", indexes.display()))?;
            }
            ToolKind::Restic => {
                run(self.command().args(["init", "--repository-version", "2"]))?;
            }
            ToolKind::Borg => {
                run(self.command().args(["init", "-e", "none"]).arg(self.repo()))?;
            }
        }
        Ok(())
    }

    /// The command that ingests `root` under the name `label`.
    fn ingest_command(&self, label: &str, root: &Path) -> Command {
        let mut cmd = self.command();
        match self.kind {
            ToolKind::Castore => {
                cmd.arg("--store")
                    .arg(self.repo())
                    .args(["image", "import"])
                    .arg(root)
                    .args(["--name", &format!("bench:{label}"), "--json"]);
            }
            ToolKind::Restic => {
                cmd.args(["backup", "--compression", "auto", "--quiet", "--tag", label])
                    .arg(root);
            }
            ToolKind::Borg => {
                let mut archive = self.repo().into_os_string();
                archive.push(format!("::{label}"));
                cmd.args(["create", "--compression", "zstd,3"])
                    .arg(archive)
                    .arg(root);
            }
            ToolKind::Casync => {
                let mut store = std::ffi::OsString::from("--store=");
                store.push(self.repo());
                cmd.args(["make", "--compression=zstd"])
                    .arg(store)
                    .arg(self.dir.join("indexes").join(format!("{label}.caidx")))
                    .arg(root);
            }
        }
        cmd
    }

    /// Ingests `root` as `label` and returns the wall-clock time it took.
    fn ingest(&self, label: &str, root: &Path) -> Result<Duration> {
        sync()?;
        let (elapsed, output) = run_timed(&mut self.ingest_command(label, root))?;
        if self.kind == ToolKind::Castore {
            serde_json::from_slice::<Value>(&output.stdout).with_context(|| {
                format!(
                    "`tide image import --json` did not print JSON: {}",
                    String::from_utf8_lossy(&output.stdout)
                )
            })?;
        }
        Ok(elapsed)
    }

    /// Stored bytes and, for castore, the full statistics object.
    fn stored(&self) -> Result<(u64, Option<Value>)> {
        match self.kind {
            ToolKind::Castore => {
                let output = run(self
                    .command()
                    .arg("--store")
                    .arg(self.repo())
                    .args(["stats", "--json"]))?;
                let stats: Value = serde_json::from_slice(&output.stdout).with_context(|| {
                    format!(
                        "`tide stats --json` did not print JSON: {}",
                        String::from_utf8_lossy(&output.stdout)
                    )
                })?;
                let stored = stats
                    .get("stored_bytes")
                    .and_then(Value::as_u64)
                    .with_context(|| {
                        format!("`tide stats --json` has no integer `stored_bytes`: {stats}")
                    })?;
                Ok((stored, Some(stats)))
            }
            _ => Ok((du_bytes(&self.repo())?, None)),
        }
    }
}

/// What one tool achieved.
#[derive(Debug)]
struct ToolResult {
    tool: ToolKind,
    version: String,
    /// Ingest time of each root, in [`INGEST_ORDER`].
    ingest: Vec<(&'static str, Duration)>,
    /// Logical bytes of the ingested roots.
    logical_bytes: u64,
    /// Stored bytes after the three ingests.
    stored_bytes: u64,
    /// Regular-file bytes of the repository (and indexes) after the three ingests.
    repo_file_bytes: u64,
    /// Time of the re-import of the unchanged root.
    reimport: Duration,
    /// Change of the stored bytes caused by the re-import.
    reimport_added_bytes: i128,
    /// castore's own statistics after the three ingests.
    tool_stats: Option<Value>,
}

impl ToolResult {
    fn ingest_total(&self) -> Duration {
        self.ingest.iter().map(|(_, d)| *d).sum()
    }

    fn mb_per_second(&self) -> f64 {
        self.logical_bytes as f64 / MB / self.ingest_total().as_secs_f64()
    }

    fn dedup_ratio(&self) -> f64 {
        self.logical_bytes as f64 / self.stored_bytes as f64
    }

    fn to_json(&self) -> Value {
        let per_root: serde_json::Map<String, Value> = self
            .ingest
            .iter()
            .map(|(name, d)| ((*name).to_owned(), json!(d.as_secs_f64())))
            .collect();
        let mut value = json!({
            "tool": self.tool.name(),
            "version": self.version,
            "ingest_seconds": self.ingest_total().as_secs_f64(),
            "ingest_seconds_per_root": per_root,
            "logical_bytes": self.logical_bytes,
            "mb_per_second": self.mb_per_second(),
            "stored_bytes": self.stored_bytes,
            "repo_file_bytes": self.repo_file_bytes,
            "dedup_ratio": self.dedup_ratio(),
            "reimport_root": REIMPORT_ROOT,
            "reimport_seconds": self.reimport.as_secs_f64(),
            "reimport_added_bytes": self.reimport_added_bytes,
        });
        if let Some(stats) = &self.tool_stats {
            value["tool_stats"] = stats.clone();
        }
        value
    }
}

/// Runs the whole sequence for one tool.
fn bench_tool(tool: &Tool, roots: &[(&'static str, PathBuf)], logical: u64) -> Result<ToolResult> {
    let name = tool.kind.name();
    eprintln!(
        "{name}: {}; working in {}",
        tool.version,
        tool.dir.display()
    );
    tool.init()?;

    let mut ingest = Vec::new();
    for (root_name, root) in roots {
        let elapsed = tool
            .ingest(root_name, root)
            .with_context(|| format!("{name}: ingest of {root_name}"))?;
        eprintln!(
            "{name}: ingested {root_name} in {:.2} s",
            elapsed.as_secs_f64()
        );
        ingest.push((*root_name, elapsed));
    }
    let (stored_bytes, tool_stats) = tool.stored()?;
    let repo_file_bytes = scan_tree(&tool.repo_with_indexes(), false)?.regular_bytes;

    let (_, reimport_root) = roots
        .iter()
        .find(|(n, _)| *n == REIMPORT_ROOT)
        .context("the re-imported root is not among the ingested roots")?;
    let reimport = tool
        .ingest(REIMPORT_LABEL, reimport_root)
        .with_context(|| format!("{name}: re-import of {REIMPORT_ROOT}"))?;
    eprintln!(
        "{name}: re-imported {REIMPORT_ROOT} in {:.2} s",
        reimport.as_secs_f64()
    );
    let (stored_after, _) = tool.stored()?;

    Ok(ToolResult {
        tool: tool.kind,
        version: tool.version.clone(),
        ingest,
        logical_bytes: logical,
        stored_bytes,
        repo_file_bytes,
        reimport,
        reimport_added_bytes: i128::from(stored_after) - i128::from(stored_bytes),
        tool_stats,
    })
}

/// The plain-text report.
fn report_table(results: &[ToolResult], roots: &[(&'static str, TreeSize)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ingest of {} in sequence into one fresh repository per tool, then re-import of \
         unchanged {REIMPORT_ROOT}",
        INGEST_ORDER.join(", ")
    );
    for (name, size) in roots {
        let _ = writeln!(
            out,
            "  {name}: {:.1} MB in {} regular files ({} entries)",
            size.regular_bytes as f64 / MB,
            size.regular_files,
            size.entries
        );
    }
    let logical: u64 = roots.iter().map(|(_, s)| s.regular_bytes).sum();
    let _ = writeln!(
        out,
        "  logical total: {:.1} MB (1 MB = 10^6 bytes); dedup = logical / stored\n",
        logical as f64 / MB
    );
    let header = [
        "tool",
        "ingest s",
        "MB/s",
        "stored MB",
        "dedup",
        "repo files MB",
        "re-import s",
        "re-import +MB",
    ];
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.tool.name().to_owned(),
                format!("{:.2}", r.ingest_total().as_secs_f64()),
                format!("{:.1}", r.mb_per_second()),
                format!("{:.1}", r.stored_bytes as f64 / MB),
                format!("{:.2}", r.dedup_ratio()),
                format!("{:.1}", r.repo_file_bytes as f64 / MB),
                format!("{:.2}", r.reimport.as_secs_f64()),
                format!("{:.2}", r.reimport_added_bytes as f64 / MB),
            ]
        })
        .collect();
    out.push_str(&render_table(&header, &rows));
    out.push_str(
        "\nstored: castore = stats stored_bytes (compressed chunks); others = du -sb of the \
         repository (casync: of the chunk store).\nrepo files: regular-file bytes of the \
         repository (casync: store and .caidx indexes).\n",
    );
    out
}

fn main() -> ExitCode {
    match run_bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole chain of causes on one line, without a backtrace.
            eprintln!("bench-ingest: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parses the arguments, runs the benchmark and prints the report.
fn run_bench() -> Result<()> {
    let Some(options) = Options::parse(std::env::args().skip(1))? else {
        println!("{USAGE}");
        return Ok(());
    };

    // Locate every tool before the long part, so that a missing one fails immediately.
    let work = tempfile::Builder::new()
        .prefix("tidedge-bench-ingest-")
        .tempdir_in(WORK_PARENT)
        .with_context(|| format!("cannot create a work directory in {WORK_PARENT}"))?;
    // With --keep, the directory is detached from its guard at once, so that it survives
    // a failed run too; otherwise the guard removes it when main returns.
    let (work_dir, _cleanup) = if options.keep {
        let kept = work.keep();
        eprintln!("repositories will be kept in {}", kept.display());
        (kept, None)
    } else {
        (work.path().to_owned(), Some(work))
    };
    let tools = options
        .tools
        .iter()
        .map(|&kind| Tool::locate(kind, &work_dir))
        .collect::<Result<Vec<_>>>()?;

    let mut roots = Vec::new();
    for name in INGEST_ORDER {
        roots.push((name, roots::ensure_debian_root(name)?));
    }

    eprintln!("reading the roots once to warm the page cache");
    let mut sizes = Vec::new();
    for (name, path) in &roots {
        sizes.push((*name, scan_tree(path, true)?));
    }
    let logical: u64 = sizes.iter().map(|(_, s)| s.regular_bytes).sum();

    let mut results = Vec::new();
    for tool in &tools {
        results.push(bench_tool(tool, &roots, logical)?);
    }

    if options.json {
        let array: Vec<Value> = results.iter().map(ToolResult::to_json).collect();
        println!("{}", serde_json::to_string_pretty(&array)?);
    } else {
        print!("{}", report_table(&results, &sizes));
    }

    if options.keep {
        eprintln!("kept the repositories in {}", work_dir.display());
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
    fn defaults_run_every_tool() {
        let options = parse(&[]).unwrap().unwrap();
        assert_eq!(options.tools, ToolKind::ALL.to_vec());
        assert!(!options.json && !options.keep);
    }

    #[test]
    fn tools_are_a_deduplicated_ordered_subset() {
        let options = parse(&["--tools", "borg,restic,borg", "--json", "--keep"])
            .unwrap()
            .unwrap();
        assert_eq!(options.tools, [ToolKind::Borg, ToolKind::Restic]);
        assert!(options.json && options.keep);
        let options = parse(&["--tools=casync"]).unwrap().unwrap();
        assert_eq!(options.tools, [ToolKind::Casync]);
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(parse(&["--tools", "zfs"]).is_err());
        assert!(parse(&["--tools", ","]).is_err());
        assert!(parse(&["--tools"]).is_err());
        assert!(parse(&["--frobnicate"]).is_err());
        assert!(parse(&["--help"]).unwrap().is_none());
    }

    #[test]
    fn scan_counts_regular_files_once() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), b"12345").unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/b"), b"123").unwrap();
        std::os::unix::fs::symlink("a", dir.path().join("link")).unwrap();
        fs::hard_link(dir.path().join("a"), dir.path().join("sub/hardlink")).unwrap();
        let size = scan_tree(dir.path(), true).unwrap();
        assert_eq!(size.regular_bytes, 8);
        assert_eq!(size.regular_files, 2);
        assert_eq!(size.entries, 6);
    }
}
