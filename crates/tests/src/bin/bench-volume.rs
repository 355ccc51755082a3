//! `bench-volume`: block I/O through our NBD export (a castore volume behind `volumed`)
//! beside two peers serving a raw file on the same disk, in one run:
//!
//! - `ours`: `volumed` on a fresh data directory, a 1 GiB RWX volume (so fio's jobs may
//!   each open a connection), filled with `nbdcopy` from a file of random bytes;
//! - `qemu-nbd`: `qemu-nbd -f raw --shared=8 -t` serving a copy of that file;
//! - `nbdkit file`: `nbdkit file` serving another copy.
//!
//! Workloads, each `--runtime` seconds (default 10) with fio's nbd engine over the Unix
//! socket: sequential 1 MiB read and write (1 job, iodepth 8), random 4 KiB read and
//! write (2 jobs, iodepth 16); writes use `--refill_buffers` so no target sees repeated
//! data. Then `nbdcopy` of 1 GiB in (from the page-cached random file) and out (to
//! `null:`). Then, for ours only, a snapshot and a clone of the written volume through
//! `tide`, timed as the whole command (process start and RPC included), with the store's
//! chunk count before and after.
//!
//! Beside each throughput: the server's CPU seconds (user + system, all its threads, from
//! `/proc/PID/stat`) per GiB moved by that workload, and ours as a multiple of `nbdkit
//! file`'s figure. Work the kernel does later on a server's behalf (writeback of its
//! page cache by kernel threads) is not charged to it.
//!
//! Usage: `bench-volume [--runtime SECONDS] [--json] [--keep]`. Needs `fio`, `nbdcopy`,
//! `qemu-nbd`, `nbdkit`, and `tide` and `volumed` built next to this binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tests::bench::{process_cpu_seconds, render_table, run};

const SIZE: u64 = 1 << 30;
const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

struct Args {
    runtime: u64,
    json: bool,
    keep: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        runtime: 10,
        json: false,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runtime" => {
                a.runtime = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .context("--runtime needs a number of seconds")?
            }
            "--json" => a.json = true,
            "--keep" => a.keep = true,
            _ => bail!("usage: bench-volume [--runtime SECONDS] [--json] [--keep]"),
        }
    }
    Ok(a)
}

/// A server process killed on drop.
struct Server(Child);

impl Server {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(path: &Path, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not listen on {} within 30 s", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn spawn(cmd: &mut Command, socket: &Path, what: &str) -> Result<Server> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let s = Server(child);
    wait_for(socket, what)?;
    Ok(s)
}

/// One fio run; returns (IOPS, bytes/s, bytes moved).
fn fio(
    uri: &str,
    rw: &str,
    bs: &str,
    jobs: u32,
    depth: u32,
    runtime: u64,
) -> Result<(f64, f64, f64)> {
    let mut c = Command::new("fio");
    c.args([
        "--name=bench",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        &format!("--rw={rw}"),
        &format!("--bs={bs}"),
        &format!("--numjobs={jobs}"),
        &format!("--iodepth={depth}"),
        "--time_based",
        &format!("--runtime={runtime}"),
        "--group_reporting",
        "--output-format=json",
    ]);
    if rw.contains("write") {
        c.arg("--refill_buffers");
    }
    let out = run(&mut c)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text[text.find('{').context("fio printed no JSON")?..])?;
    let side = if rw.contains("write") {
        "write"
    } else {
        "read"
    };
    let j = &v["jobs"][0];
    if j["error"] != 0 {
        bail!("fio {rw} on {uri} failed: {}", j["error"]);
    }
    Ok((
        j[side]["iops"].as_f64().unwrap_or(0.0),
        j[side]["bw_bytes"].as_f64().unwrap_or(0.0),
        j[side]["io_bytes"].as_f64().unwrap_or(0.0),
    ))
}

fn timed(c: &mut Command) -> Result<f64> {
    let t = Instant::now();
    run(c)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Every workload against `uri` served by process `pid`; `src` is the random file to
/// copy in. Each figure comes with `KEY_cpu`: the server's CPU seconds per GiB moved.
fn measure(uri: &str, src: &Path, runtime: u64, pid: u32) -> Result<Value> {
    let mut out = serde_json::Map::new();
    let mut record = |key: &str, value: f64, bytes: f64, cpu: f64| {
        out.insert(key.into(), json!(value));
        out.insert(format!("{key}_cpu"), json!(cpu / (bytes / GIB)));
    };
    let fio_runs = [
        ("seq_read_mib_s", "read", "1M", 1, 8),
        ("seq_write_mib_s", "write", "1M", 1, 8),
        ("rand_read_iops", "randread", "4k", 2, 16),
        ("rand_write_iops", "randwrite", "4k", 2, 16),
    ];
    for (key, rw, bs, jobs, depth) in fio_runs {
        let cpu = process_cpu_seconds(pid)?;
        let (iops, bw, bytes) = fio(uri, rw, bs, jobs, depth, runtime)?;
        let cpu = process_cpu_seconds(pid)? - cpu;
        let value = if key.ends_with("iops") {
            iops
        } else {
            bw / MIB
        };
        record(key, value, bytes, cpu);
    }
    for (key, from, to) in [
        (
            "nbdcopy_in_mib_s",
            src.as_os_str(),
            std::ffi::OsStr::new(uri),
        ),
        (
            "nbdcopy_out_mib_s",
            std::ffi::OsStr::new(uri),
            "null:".as_ref(),
        ),
    ] {
        let cpu = process_cpu_seconds(pid)?;
        let secs = timed(Command::new("nbdcopy").arg(from).arg(to))?;
        let cpu = process_cpu_seconds(pid)? - cpu;
        record(key, SIZE as f64 / MIB / secs, SIZE as f64, cpu);
    }
    Ok(Value::Object(out))
}

fn tide(data: &Path) -> Command {
    let mut c = Command::new(tests::tide_bin());
    c.arg("--socket").arg(data.join("volumed.sock"));
    c
}

fn chunks(data: &Path) -> Result<u64> {
    let out = run(tide(data).args(["--json", "stats"]))?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    v["chunks"].as_u64().context("stats without chunks")
}

fn bench(work: &Path, a: &Args) -> Result<Value> {
    std::fs::create_dir_all(work)?;
    let src = work.join("random.raw");
    eprintln!("writing 1 GiB of random bytes to {}", src.display());
    run(Command::new("dd").args([
        "if=/dev/urandom",
        &format!("of={}", src.display()),
        "bs=1M",
        "count=1024",
        "status=none",
    ]))?;
    let mut results = serde_json::Map::new();

    // Ours.
    let data = work.join("data");
    let sock = data.join("volumed.sock");
    std::fs::create_dir_all(&data)?;
    let volumed = spawn(
        Command::new(tests::volumed_bin())
            .arg("--data")
            .arg(&data)
            .arg("--socket")
            .arg(&sock)
            .args(["--nbd-listen", "none"]),
        &sock,
        "volumed",
    )?;
    run(tide(&data).args(["volume", "create", "bench", "--size", "1G", "--mode", "rwx"]))?;
    let ours = format!(
        "nbd+unix:///bench?socket={}",
        data.join("nbd.sock").display()
    );
    run(Command::new("nbdcopy").arg(&src).arg(&ours))?;
    eprintln!("measuring ours");
    results.insert(
        "ours".into(),
        measure(&ours, &src, a.runtime, volumed.pid())?,
    );
    let before = chunks(&data)?;
    let snap = timed(tide(&data).args(["volume", "snapshot", "bench", "s1"]))?;
    let after_snap = chunks(&data)?;
    let clone = timed(tide(&data).args(["volume", "clone", "bench@s1", "copy"]))?;
    let after_clone = chunks(&data)?;
    results["ours"]["snapshot_ms"] = json!(snap * 1000.0);
    results["ours"]["snapshot_new_chunks"] = json!(after_snap - before);
    results["ours"]["clone_ms"] = json!(clone * 1000.0);
    results["ours"]["clone_new_chunks"] = json!(after_clone - after_snap);

    // qemu-nbd and nbdkit over copies of the same file.
    for (name, sock_name) in [("qemu-nbd", "qemu.sock"), ("nbdkit file", "nbdkit.sock")] {
        let file = work.join(format!("{}.raw", sock_name.trim_end_matches(".sock")));
        std::fs::copy(&src, &file)?;
        let sock = work.join(sock_name);
        let _ = std::fs::remove_file(&sock);
        let mut cmd = if name == "qemu-nbd" {
            let mut c = Command::new("qemu-nbd");
            c.args(["-f", "raw", "--shared=8", "-t", "-x", "bench", "-k"])
                .arg(&sock)
                .arg(&file);
            c
        } else {
            let mut c = Command::new("nbdkit");
            c.args(["-f", "--exportname", "bench", "--unix"])
                .arg(&sock)
                .arg("file")
                .arg(format!("file={}", file.display()));
            c
        };
        let server = spawn(&mut cmd, &sock, name)?;
        let uri = format!("nbd+unix:///bench?socket={}", sock.display());
        eprintln!("measuring {name}");
        results.insert(name.into(), measure(&uri, &src, a.runtime, server.pid())?);
    }
    Ok(Value::Object(results))
}

fn table(r: &Value) -> String {
    let cols = ["ours", "qemu-nbd", "nbdkit file"];
    let rows = [
        ("sequential 1 MiB read, MiB/s", "seq_read_mib_s"),
        ("sequential 1 MiB write, MiB/s", "seq_write_mib_s"),
        ("random 4 KiB read, IOPS", "rand_read_iops"),
        ("random 4 KiB write, IOPS", "rand_write_iops"),
        ("nbdcopy 1 GiB in, MiB/s", "nbdcopy_in_mib_s"),
        ("nbdcopy 1 GiB out, MiB/s", "nbdcopy_out_mib_s"),
    ];
    let num = |c: &str, key: &str| r[c][key].as_f64().unwrap_or(0.0);
    let ratio = |key: &str| {
        let peer = num("nbdkit file", key);
        match peer > 0.0 {
            true => format!("{:.2}x", num("ours", key) / peer),
            false => "-".into(),
        }
    };
    let mut out: Vec<Vec<String>> = Vec::new();
    for (label, key) in rows {
        let mut row = vec![label.to_string()];
        row.extend(cols.iter().map(|c| format!("{:.0}", num(c, key))));
        row.push(ratio(key));
        out.push(row);
        let cpu = format!("{key}_cpu");
        let mut row = vec!["  server CPU s per GiB".to_string()];
        row.extend(cols.iter().map(|c| format!("{:.2}", num(c, &cpu))));
        row.push(ratio(&cpu));
        out.push(row);
    }
    for (label, ms, new) in [
        (
            "snapshot of the written 1 GiB volume",
            "snapshot_ms",
            "snapshot_new_chunks",
        ),
        ("clone of that snapshot", "clone_ms", "clone_new_chunks"),
    ] {
        out.push(vec![
            label.to_string(),
            format!(
                "{:.1} ms, {} new chunks",
                r["ours"][ms].as_f64().unwrap_or(0.0),
                r["ours"][new]
            ),
            "-".into(),
            "-".into(),
            "-".into(),
        ]);
    }
    let mut header = vec!["workload"];
    header.extend(cols);
    header.push("ours/nbdkit");
    render_table(&header, &out)
}

fn main() -> ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench-volume: {e:#}");
            return ExitCode::from(2);
        }
    };
    // On the disk the store and the peers' files share, not a tmpfs.
    let work = PathBuf::from(format!("/var/tmp/bench-volume-{}", std::process::id()));
    let r = bench(&work, &a);
    if !a.keep {
        let _ = std::fs::remove_dir_all(&work);
    }
    match r {
        Ok(v) => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&v).expect("json"));
            } else {
                print!("{}", table(&v));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-volume: {e:#}");
            ExitCode::FAILURE
        }
    }
}
