//! `bench-cold-host`: an image onto a host that has never seen it, through the chunk
//! tier (issue 15), on a real Garage cluster (three nodes on loopback, replication 3).
//!
//! Host A (`volumed --tier`) imports the flask Debian root as `flask:1` and publishes it
//! (the push is timed from volumed's log). Then, each on a fresh host (an empty store,
//! a new `volumed` talking to another Garage node), the same work: mount `flask:1` and
//! run `chroot MNT python3 -c 'import flask'`, a real program reading what it needs:
//!
//! - `registry pull`: the Docker way. The root as one gzip layer (`gzip -6`) in Debian's
//!   `docker-registry` on loopback; a host without a tier runs `tide image pull
//!   REGISTRY/bench/flask:1` (the whole layer downloaded, decompressed, imported), then
//!   mounts and runs;
//! - `full pull`: `tide image pull flask:1 --all` from the tier first (every chunk),
//!   then mount and run;
//! - `lazy`: mount at once (records only; each chunk fetched when first read) and run;
//!   this first cold host records what it read and sends it as the image's read set
//!   when the mount ends;
//! - `lazy + read set`: mount, which also starts fetching the read set in the
//!   background, and run.
//!
//! Each row: time from the first command to the program's exit, bytes fetched from the
//! tier (`tide stats`: objects as stored, compressed) against the image's stored bytes,
//! and the bytes of chunks the program's reads needed (the lazy host's read set, as
//! stored). Goals: lazy bytes fetched ≤ 1.2x what the program needed; lazy time ≤ 0.5x
//! the full pull's (both the registry's and the tier's are shown).
//!
//! Throughput: our push (volumed's publish) and a full pull, against `rclone copy` of
//! the same root directory to and from the same bucket (16 transfers, as our 16
//! requests in flight), and a raw loop of 256 KiB PUTs and GETs through our S3 client.
//!
//! Needs root, FUSE, `garage` (built by .ci/run), rclone, docker-registry, the flask
//! root (built on first use). Usage: `bench-cold-host [--json] [--keep]`

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use tests::bench::{rclone_copy as rclone, render_table, run};
use tests::volumed::Volumed;
use tier::testing::Garage;

const USAGE: &str = "usage: bench-cold-host [--json] [--keep]";

struct Options {
    json: bool,
    keep: bool,
}

fn parse(args: std::env::Args) -> Result<Option<Options>> {
    let mut o = Options {
        json: false,
        keep: false,
    };
    for a in args {
        match a.as_str() {
            "--json" => o.json = true,
            "--keep" => o.keep = true,
            "-h" | "--help" => return Ok(None),
            _ => bail!("unknown argument {a:?}\n{USAGE}"),
        }
    }
    Ok(Some(o))
}

fn tier_args(g: &Garage, node: usize, prefix: &str) -> Vec<String> {
    let c = g.config(node, prefix);
    vec![
        "--tier".into(),
        c.url,
        "--tier-endpoint".into(),
        c.endpoint.expect("garage configs name the endpoint"),
        "--tier-region".into(),
        c.region.expect("garage configs name the region"),
        "--tier-credentials".into(),
        c.credentials
            .expect("garage configs name the credentials")
            .display()
            .to_string(),
    ]
}

fn wait_log(v: &Volumed, what: &str, secs: u64) -> Result<String> {
    let start = Instant::now();
    loop {
        let log = v.log_text();
        if let Some(line) = log.lines().find(|l| l.contains(what)) {
            return Ok(line.to_string());
        }
        ensure!(
            start.elapsed() < Duration::from_secs(secs),
            "no {what:?} in volumed's log after {secs} s:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn fetched_bytes(v: &Volumed) -> u64 {
    v.tide().json(&["stats"])["tier"]["fetched_bytes"]
        .as_u64()
        .unwrap_or(0)
}

/// One way: a fresh host, `prepare` (a pull, or nothing), mount, the program.
struct Way {
    name: &'static str,
    seconds: f64,
    fetched: u64,
    /// The pull alone (full and registry pulls).
    pull_seconds: f64,
}

/// What a fresh host does before it mounts.
enum Before<'a> {
    /// Nothing: the mount fetches what is read.
    Nothing,
    /// `tide image pull flask:1 --all` from the tier.
    TierPull,
    /// `tide image pull REFERENCE --name flask:1` from the registry (no tier).
    Registry(&'a str),
}

fn cold_host(
    work: &Path,
    g: &Garage,
    name: &'static str,
    before: Before<'_>,
    wait_prefetch: bool,
) -> Result<Way> {
    let dir = work.join(name.replace(' ', "-").replace('+', "and"));
    std::fs::create_dir_all(&dir)?;
    let args = match before {
        Before::Registry(_) => Vec::new(),
        _ => tier_args(g, 1, "bench"),
    };
    let v = Volumed::start_with(dir.join("data"), dir.join("v.sock"), &args);
    let tide = v.tide();
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt)?;
    let start = Instant::now();
    let mut registry_bytes = None;
    match before {
        Before::Nothing => {}
        Before::TierPull => {
            tide.ok(&["image", "pull", "flask:1", "--all"]);
        }
        Before::Registry(reference) => {
            let r = tide.json(&["image", "pull", reference, "--name", "flask:1"]);
            registry_bytes = r["fetched_bytes"].as_u64();
        }
    }
    let pull_seconds = start.elapsed().as_secs_f64();
    tide.ok(&["mount", "flask:1", mnt.to_str().expect("utf-8 path")]);
    let out = run(Command::new("chroot")
        .arg(&mnt)
        .args(["/usr/bin/python3", "-c", "import flask"])
        .stdin(Stdio::null()))?;
    ensure!(out.status.success(), "python3 -c 'import flask' failed");
    let seconds = start.elapsed().as_secs_f64();
    if wait_prefetch {
        wait_log(&v, "prefetched", 120)?;
    }
    let fetched = registry_bytes.unwrap_or_else(|| fetched_bytes(&v));
    tide.ok(&["umount", mnt.to_str().expect("utf-8 path")]);
    if name == "lazy" {
        wait_log(&v, "read set of", 30)?;
    }
    Ok(Way {
        name,
        seconds,
        fetched,
        pull_seconds,
    })
}

/// Our S3 client alone: `n` objects of `size` random bytes PUT, then GET, 16 at a time.
fn raw_loop(g: &Garage, n: usize, size: usize) -> Result<(f64, f64)> {
    let t = tier::open(&g.config(0, "raw"))?;
    let body = castore::testing::noise(size, 11);
    let timed = |f: &(dyn Fn(usize) -> Result<()> + Sync)| -> Result<f64> {
        let next = AtomicUsize::new(0);
        let start = Instant::now();
        std::thread::scope(|s| -> Result<()> {
            let hs: Vec<_> = (0..16)
                .map(|_| {
                    s.spawn(|| -> Result<()> {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= n {
                                return Ok(());
                            }
                            f(i)?;
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().expect("raw loop thread")?;
            }
            Ok(())
        })?;
        Ok(start.elapsed().as_secs_f64())
    };
    let put = timed(&|i| Ok(t.put(&format!("o{i}"), &body)?))?;
    let get = timed(&|i| {
        let v = t.get(&format!("o{i}"))?.context("object vanished")?;
        ensure!(v.len() == size);
        Ok(())
    })?;
    let mib = (n * size) as f64 / (1 << 20) as f64;
    Ok((mib / put, mib / get))
}

fn bench(o: &Options) -> Result<()> {
    // SAFETY: geteuid(2) has no preconditions.
    let euid = unsafe { libc::geteuid() };
    ensure!(euid == 0, "bench-cold-host needs root (FUSE, chroot)");
    let root = tests::roots::debian_root("flask");
    let work = tempfile::Builder::new()
        .prefix("tidedge-bench-cold-host-")
        .tempdir()?;
    let work_path: PathBuf = work.path().to_path_buf();
    let _unmount = tests::UnmountBelow(work_path.clone());
    let g = Garage::start(&work_path, 3)?;

    // Host A imports and publishes.
    let a = Volumed::start_with(
        work_path.join("a-data"),
        work_path.join("a.sock"),
        &tier_args(&g, 0, "bench"),
    );
    a.tide().ok(&[
        "image",
        "import",
        root.to_str().expect("utf-8"),
        "--name",
        "flask:1",
    ]);
    let published = wait_log(&a, "published flask:1", 600)?;
    let stats = a.tide().json(&["stats"]);
    let image_stored = stats["image_data"]["stored_bytes"].as_u64().unwrap_or(0);
    let image_logical = stats["image_data"]["logical_bytes"].as_u64().unwrap_or(0);
    // "... moved (N bytes) ..., S s"
    let push_secs: f64 = published
        .rsplit(", ")
        .next()
        .and_then(|s| s.trim_end_matches(" s").parse().ok())
        .context("push time in volumed's log")?;
    drop(a);

    // The Docker way: the same root as one gzip layer in a distribution registry.
    let reg = registry::testing::Registry::start(&work_path.join("registry"), None);
    let tar = work_path.join("flask.tar");
    tests::oci::tar(&root, None, &tar);
    let layer = registry::testing::TestLayer::from_tar(&tar, "gzip");
    std::fs::remove_file(&tar)?;
    let client = reg.client("bench/flask", None);
    let pushed = registry::testing::push_image(
        &client,
        castore::host_arch(),
        std::slice::from_ref(&layer),
        &["/usr/bin/python3"],
    );
    client.push_manifest("1", registry::media::OCI_MANIFEST, &pushed.bytes)?;
    let layer_bytes = layer.blob.len() as u64;
    drop(layer);
    let reference = format!("{}/bench/flask:1", reg.host);

    let docker = cold_host(
        &work_path,
        &g,
        "registry pull",
        Before::Registry(&reference),
        false,
    )?;
    let full = cold_host(&work_path, &g, "full pull", Before::TierPull, false)?;
    let lazy = cold_host(&work_path, &g, "lazy", Before::Nothing, false)?;
    let set = cold_host(&work_path, &g, "lazy + read set", Before::Nothing, true)?;

    // What the program needed: the lazy host's read set, as stored in the tier.
    let probe = castore::Store::open(work_path.join("probe"))?;
    probe.set_tier(tier::open(&g.config(0, "bench"))?)?;
    let image = probe
        .pull_image("flask:1", false, &castore::TierProgress::default())?
        .image;
    let needed_chunks = probe.readset(&image)?;
    let before = probe.fetched().bytes;
    probe.prefetch(&needed_chunks)?;
    let needed = probe.fetched().bytes - before;

    let rclone_push = rclone(
        &g,
        &work_path,
        root.to_str().expect("utf-8"),
        "garage:tidedge/rclone",
    )?;
    let rclone_pull = rclone(
        &g,
        &work_path,
        "garage:tidedge/rclone",
        work_path.join("rclone-out").to_str().expect("utf-8"),
    )?;
    let (raw_put, raw_get) = raw_loop(&g, 512, 256 << 10)?;

    let full_pull_secs = full.pull_seconds;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let rows: Vec<Vec<String>> = [&docker, &full, &lazy, &set]
        .iter()
        .map(|w| {
            vec![
                w.name.to_string(),
                format!("{:.2}", w.seconds),
                format!("{:.1}", mib(w.fetched)),
                format!("{:.3}", w.fetched as f64 / image_stored as f64),
                format!("{:.2}", w.fetched as f64 / needed.max(1) as f64),
                format!("{:.2}", w.seconds / docker.seconds),
                format!("{:.2}", w.seconds / full.seconds),
            ]
        })
        .collect();
    let logical = mib(image_logical);
    let tput = vec![
        vec![
            "push (ours: volumed's publish)".to_string(),
            format!("{:.1}", logical / push_secs),
            format!("{:.1}", logical / rclone_push),
            format!("{raw_put:.1}"),
        ],
        vec![
            "pull (ours: tide image pull --all)".to_string(),
            format!("{:.1}", logical / full_pull_secs),
            format!("{:.1}", logical / rclone_pull),
            format!("{raw_get:.1}"),
        ],
    ];
    if o.json {
        let way =
            |w: &Way| json!({"way": w.name, "seconds": w.seconds, "fetched_bytes": w.fetched});
        let v: Value = json!({
            "image_stored_bytes": image_stored,
            "image_logical_bytes": image_logical,
            "needed_bytes": needed,
            "ways": [way(&docker), way(&full), way(&lazy), way(&set)],
            "registry_layer_bytes": layer_bytes,
            "registry_pull_seconds": docker.pull_seconds,
            "push_seconds": push_secs,
            "rclone_push_seconds": rclone_push,
            "rclone_pull_seconds": rclone_pull,
            "raw_put_mib_s": raw_put,
            "raw_get_mib_s": raw_get,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "flask:1 ({:.1} MiB of files, {:.1} MiB stored; {:.1} MiB as one gzip layer in the registry); `import flask` needed {:.1} MiB of chunks ({} chunks)\n",
            logical,
            mib(image_stored),
            mib(layer_bytes),
            mib(needed),
            needed_chunks.len()
        );
        println!(
            "{}",
            render_table(
                &[
                    "way",
                    "to exit, s",
                    "fetched MiB",
                    "of image",
                    "of needed",
                    "of registry pull",
                    "of full pull"
                ],
                &rows
            )
        );
        println!(
            "{}",
            render_table(
                &["MiB/s of files", "ours", "rclone copy", "raw 256 KiB loop"],
                &tput
            )
        );
    }
    if o.keep {
        println!("kept {}", work.keep().display());
    }
    Ok(())
}

fn main() -> ExitCode {
    tests::bench::main("bench-cold-host", USAGE, parse, bench)
}
