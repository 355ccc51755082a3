//! `bench-volume-tier`: a volume through the chunk tier (issue 15), on a real Garage
//! cluster (three nodes on loopback, replication 3), against `rclone copy` of the same
//! bytes as one file to and from the same bucket.
//!
//! Host A (a castore store on the tier) writes a volume of random bytes and pushes it
//! (`Store::push_volume`, what `tide volume push` and `--backup-every` run); then
//! rewrites 1/16 of it and pushes again (only the changed extents go). Host B (an empty
//! store on another Garage node) pulls it (`pull_volume`: the block map at once) and
//! reads every byte, each chunk fetched and verified on first read: the time a moved
//! instance's volume takes to be all there. The bytes B reads are checked against A's.
//!
//! Needs `garage` (built by .ci/run) and rclone. Usage: `bench-volume-tier [--json]
//! [--mib N]` (default 256 MiB).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail, ensure};
use serde_json::json;
use tests::bench::{rclone_copy, render_table};
use tier::testing::Garage;

const USAGE: &str = "usage: bench-volume-tier [--json] [--mib N]";

struct Options {
    json: bool,
    mib: u64,
}

fn parse(args: std::env::Args) -> Result<Option<Options>> {
    let mut o = Options {
        json: false,
        mib: 256,
    };
    let mut args = args.peekable();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => o.json = true,
            "--mib" => {
                o.mib = match args.next().map(|n| n.parse()) {
                    Some(Ok(n)) if n >= 16 => n,
                    _ => bail!("--mib takes a number of MiB, at least 16\n{USAGE}"),
                }
            }
            "-h" | "--help" => return Ok(None),
            _ => bail!("unknown argument {a:?}\n{USAGE}"),
        }
    }
    Ok(Some(o))
}

fn bench(o: &Options) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("tidedge-bench-volume-tier-")
        .tempdir()?;
    let w: PathBuf = work.path().to_path_buf();
    let g = Garage::start(&w, 3)?;
    let size = o.mib << 20;
    let data = castore::testing::noise(size as usize, 3);

    let a = Arc::new(castore::Store::open(w.join("a"))?);
    a.set_tier(tier::open(&g.config(0, "bench"))?)?;
    a.create_volume(&castore::VolumeSpec::new("db", size))?;
    let v = a.open_volume("db")?;
    for (i, part) in data.chunks(4 << 20).enumerate() {
        v.write((i as u64) << 22, part, false)?;
    }
    v.flush()?;
    let p = castore::TierProgress::default();
    let t = Instant::now();
    let first = a.push_volume("db", None, "a", &p)?;
    let push = t.elapsed().as_secs_f64();
    // A sixteenth rewritten, spread over the volume, then the second push.
    let mut rewritten = 0u64;
    for e in (0..size / (64 << 10)).step_by(16) {
        v.write(e << 16, &castore::testing::noise(64 << 10, 100 + e), false)?;
        rewritten += 64 << 10;
    }
    v.flush()?;
    let t = Instant::now();
    let second = a.push_volume("db", None, "a", &p)?;
    let push2 = t.elapsed().as_secs_f64();
    ensure!(second.transferred < first.transferred);
    let want = v.read(0, size as usize)?;

    let b = Arc::new(castore::Store::open(w.join("b"))?);
    b.set_tier(tier::open(&g.config(1, "bench"))?)?;
    let t = Instant::now();
    let pulled = b.pull_volume("db", None)?;
    let pull_meta = t.elapsed().as_secs_f64();
    let bv = b.open_volume("db")?;
    // Read as a guest's sequential read would, 4 MiB at a time, from 4 readers.
    let parts: Vec<u64> = (0..size / (4 << 20)).collect();
    let got = std::sync::Mutex::new(vec![0u8; size as usize]);
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&part) = parts.get(i) else {
                            return Ok(());
                        };
                        let bytes = bv.read(part << 22, 4 << 20)?;
                        got.lock().expect("read buffer")[(part << 22) as usize..][..4 << 20]
                            .copy_from_slice(&bytes);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().expect("reader")?;
        }
        Ok(())
    })?;
    let pull = t.elapsed().as_secs_f64();
    ensure!(
        *got.lock().expect("read buffer") == want,
        "B read other bytes than A pushed"
    );
    let fetched = b.fetched().bytes;

    // The peer: the same bytes as one file, up and down.
    let file = w.join("volume.img");
    std::fs::write(&file, &want)?;
    let rclone_push = rclone_copy(&g, &w, file.to_str().unwrap_or(""), "garage:tidedge/rc")?;
    let out = w.join("rc-out");
    let rclone_pull = rclone_copy(
        &g,
        &w,
        "garage:tidedge/rc/volume.img",
        out.to_str().unwrap_or(""),
    )?;
    ensure!(std::fs::read(out.join("volume.img"))? == want);

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let total = mib(size);
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "volume_bytes": size,
                "push_seconds": push,
                "push_bytes": first.bytes,
                "second_push_seconds": push2,
                "second_push_chunks": second.transferred,
                "rewritten_bytes": rewritten,
                "pull_metadata_seconds": pull_meta,
                "pull_and_read_seconds": pull,
                "fetched_bytes": fetched,
                "chunks": pulled.chunks,
                "rclone_push_seconds": rclone_push,
                "rclone_pull_seconds": rclone_pull,
            }))?
        );
    } else {
        println!(
            "volume of {total:.0} MiB (random bytes, {} chunks); second push after {:.0} MiB rewritten\n",
            pulled.chunks,
            mib(rewritten)
        );
        let rows = vec![
            vec![
                "push (tide volume push)".to_string(),
                format!("{push:.2}"),
                format!("{:.1}", total / push),
                format!("{rclone_push:.2}"),
                format!("{:.1}", total / rclone_push),
            ],
            vec![
                format!("second push ({} chunks sent)", second.transferred),
                format!("{push2:.2}"),
                format!("{:.1}", mib(rewritten) / push2),
                "-".to_string(),
                "-".to_string(),
            ],
            vec![
                format!("pull + read every byte (block map {pull_meta:.3} s)"),
                format!("{pull:.2}"),
                format!("{:.1}", total / pull),
                format!("{rclone_pull:.2}"),
                format!("{:.1}", total / rclone_pull),
            ],
        ];
        println!(
            "{}",
            render_table(
                &[
                    "",
                    "ours, s",
                    "ours, MiB/s",
                    "rclone copy, s",
                    "rclone, MiB/s"
                ],
                &rows
            )
        );
        println!(
            "fetched {:.1} MiB (as stored) for {total:.0} MiB read",
            mib(fetched)
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    tests::bench::main("bench-volume-tier", USAGE, parse, bench)
}
