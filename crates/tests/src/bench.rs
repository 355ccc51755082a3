//! Helpers shared by the benchmark commands (`src/bin/bench-*.rs`): running a command
//! with its failure explained, a peer process killed when dropped, a plain-text table,
//! and the `main` of a command that parses options and runs.

use std::fmt::Write as _;
use std::process::{Child, Command, ExitCode, Output, Stdio};

use anyhow::{Context, Result, bail};

/// Formats a command for messages: program and arguments, space-separated.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion (stdin closed, output captured); fails with the command and
/// its output if it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}`", describe(cmd)))?;
    if !output.status.success() {
        bail!(
            "`{}` failed ({}):\n{}{}",
            describe(cmd),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// CPU time (user + system, all threads) a running process has used so far, in seconds,
/// from `/proc/PID/stat`: what a benchmark charges to a server between two samples.
pub fn process_cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("{path}: no command name"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14 and stime field 15.
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse::<f64>().ok())
            .with_context(|| format!("{path}: field {i} missing"))
    };
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok((ticks(14)? + ticks(15)?) / hz.max(1) as f64)
}

/// Renders rows as a plain-text table: first column left-aligned, the others
/// right-aligned, two spaces apart.
pub fn render_table<S: AsRef<str>>(header: &[S], rows: &[Vec<String>]) -> String {
    let header: Vec<String> = header.iter().map(|h| h.as_ref().to_owned()).collect();
    let mut widths: Vec<usize> = header.iter().map(String::len).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if i == 0 {
                let _ = write!(line, "{cell:<width$}");
            } else {
                let _ = write!(line, "  {cell:>width$}");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn table_columns_are_aligned() {
        let rows = vec![
            vec!["restic".to_owned(), "9.5".to_owned()],
            vec!["borg".to_owned(), "11.25".to_owned()],
        ];
        let table = render_table(&["tool", "ingest s"], &rows);
        assert_eq!(
            table,
            "tool    ingest s\nrestic       9.5\nborg       11.25\n"
        );
    }

    #[test]
    fn own_cpu_time_is_read_and_grows() {
        let before = process_cpu_seconds(std::process::id()).unwrap();
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_millis(100) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        std::hint::black_box(x);
        let after = process_cpu_seconds(std::process::id()).unwrap();
        assert!(after >= before && after > 0.0, "{before} -> {after}");
        assert!(process_cpu_seconds(u32::MAX).is_err());
    }

    #[test]
    fn failures_name_the_command() {
        let e = run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("`sh -c echo oops >&2; exit 3` failed"), "{e}");
        assert!(e.contains("oops"), "{e}");
    }
}

/// A child process (a peer server) killed when dropped.
#[derive(Debug)]
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `main` of benchmark `name`: `parse` the arguments (None: `--help`, print
/// `usage`), then `bench`. A bad argument exits with 2, a failed run with 1, each
/// error printed after the command's name.
pub fn main<O>(
    name: &str,
    usage: &str,
    parse: impl FnOnce(std::env::Args) -> Result<Option<O>>,
    bench: impl FnOnce(&O) -> Result<()>,
) -> ExitCode {
    let mut args = std::env::args();
    args.next();
    let o = match parse(args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{usage}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{name}: {e:#}");
            return ExitCode::from(2);
        }
    };
    match bench(&o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `rclone copy` between `from` and `to` (paths, or `garage:BUCKET/PATH`) with an S3
/// remote on Garage node 0, 16 transfers at once (as our 16 requests in flight), timed:
/// the peer of the tier benchmarks.
pub fn rclone_copy(
    g: &tier::testing::Garage,
    work: &std::path::Path,
    from: &str,
    to: &str,
) -> Result<f64> {
    let conf = work.join("rclone.conf");
    std::fs::write(
        &conf,
        format!(
            "[garage]\ntype = s3\nprovider = Other\naccess_key_id = {}\nsecret_access_key = {}\n\
             endpoint = {}\nregion = garage\nforce_path_style = true\n",
            g.key_id, g.secret, g.nodes[0].s3
        ),
    )?;
    let start = std::time::Instant::now();
    // rclone's S3 client refuses a custom CA bundle with its own transport, and the
    // endpoint is plain HTTP anyway.
    let out = run(Command::new("rclone")
        .env_remove("AWS_CA_BUNDLE")
        .arg("--config")
        .arg(&conf)
        .args(["copy", "--transfers", "16", "--links", from, to]))?;
    anyhow::ensure!(out.status.success(), "rclone copy {from} {to} failed");
    Ok(start.elapsed().as_secs_f64())
}
