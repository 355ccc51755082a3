//! Helpers shared by the benchmark commands (`src/bin/bench-*.rs`): running a command
//! with its failure explained, and a plain-text table.

use std::fmt::Write as _;
use std::process::{Command, Output, Stdio};

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
    fn failures_name_the_command() {
        let e = run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("`sh -c echo oops >&2; exit 3` failed"), "{e}");
        assert!(e.contains("oops"), "{e}");
    }
}
