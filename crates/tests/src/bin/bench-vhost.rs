//! `bench-vhost`: a volume as a guest's disk, served three ways in one run, with `fio`
//! inside a QEMU guest (TCG, one vCPU, 512 MiB, the test guests' kernel and init of
//! [`tests::guest`]):
//!
//! - `vhost-user`: our vhost-user-blk backend (`tide volume vhost-user serve VOLUME`;
//!   QEMU's `vhost-user-blk-pci`, guest memory shared from a memfd);
//! - `nbd`: our NBD export of a volume (QEMU's NBD client on volumed's socket,
//!   `virtio-blk-pci`);
//! - `qsd`: the peer, `qemu-storage-daemon --export type=vhost-user-blk` of a raw file
//!   on the same filesystem as volumed's store (page cache, no O_DIRECT, as ours).
//!
//! Each way gets a fresh volume (or raw file) of `--size` MiB and one guest boot, which
//! runs in order: 1 MiB sequential writes over the whole disk (`end_fsync`: the data is
//! flushed), 4 KiB random reads and random writes for `--runtime` seconds each, and
//! 1 MiB sequential reads of the whole disk; every job `ioengine=libaio direct=1
//! iodepth=16`. fio is the host's (Debian's fio 3.33), given to the guest on a
//! read-only EROFS disk with the shared libraries it links (`mkfs.erofs`), started with
//! the host's dynamic loader.
//!
//! Beside each figure: guest CPU per GiB moved (fio's own usr+sys of the guest's one
//! vCPU) and host CPU per GiB of the backend process (volumed or qemu-storage-daemon)
//! and of QEMU, from `/proc/PID/stat` sampled every 20 ms, between the moments the job
//! started and ended in the guest's output. Under TCG the guest's CPU is emulated: the
//! absolute numbers are far below a KVM host's, and a backend shows most when the guest
//! is not the bottleneck (large sequential requests).
//!
//! Goals (issue 13): vhost-user ≥ qsd on reads and ≥ 0.8x on writes, and ≥ 1.5x our NBD
//! on 4 KiB random reads.
//!
//! Needs root, QEMU (qemu-system-x86, qemu-storage-daemon), fio, erofs-utils,
//! busybox-static and the guest kernel (`scripts/fetch-kernel`, run when missing).
//!
//! Usage: `bench-vhost [--size MIB] [--runtime S] [--ways LIST] [--json] [--keep]`

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use tests::bench::{Killed, process_cpu_seconds, render_table, run};
use tests::guest::{Disk, Guest, Kernel, Source, begin, end, initramfs};
use tests::volumed::Volumed;

const USAGE: &str = "\
usage: bench-vhost [--size MIB] [--runtime S] [--ways LIST] [--json] [--keep]

Runs fio in a QEMU guest on a volume served by our vhost-user-blk backend, by our NBD
export, and by qemu-storage-daemon's vhost-user-blk export of a raw file: 1M sequential
write and read, 4K random read and write (iodepth 16), with guest and host CPU per GiB.
Needs root.

  --size MIB    disk size, written whole and read whole (default 512)
  --runtime S   seconds of each 4K random job (default 15)
  --ways LIST   comma-separated subset of vhost-user,nbd,qsd (default: all)
  --json        print JSON (every figure) instead of the table
  --keep        keep the work directory (printed on stderr)
  -h, --help    show this help";

const WAYS: [&str; 3] = ["vhost-user", "nbd", "qsd"];
const JOBS: [(&str, &str); 4] = [
    ("seqwrite", "1M sequential write"),
    ("randread", "4K random read"),
    ("randwrite", "4K random write"),
    ("seqread", "1M sequential read"),
];
const GIB: f64 = (1u64 << 30) as f64;

struct Options {
    size_mib: u64,
    runtime: u64,
    ways: Vec<String>,
    json: bool,
    keep: bool,
}

impl Options {
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Self>> {
        let mut o = Options {
            size_mib: 512,
            runtime: 15,
            ways: WAYS.iter().map(|w| w.to_string()).collect(),
            json: false,
            keep: false,
        };
        let mut args = args.into_iter();
        let number = |name: &str, v: Option<String>| -> Result<u64> {
            let v = v.with_context(|| format!("{name} needs a value"))?;
            v.parse()
                .ok()
                .filter(|&n| n > 0)
                .with_context(|| format!("{name} needs a positive number, not `{v}`"))
        };
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "-h" | "--help" => return Ok(None),
                "--json" => o.json = true,
                "--keep" => o.keep = true,
                "--size" => o.size_mib = number("--size", args.next())?,
                "--runtime" => o.runtime = number("--runtime", args.next())?,
                "--ways" => {
                    let v = args.next().context("--ways needs a value")?;
                    o.ways = v.split(',').map(str::to_string).collect();
                    if let Some(w) = o.ways.iter().find(|w| !WAYS.contains(&w.as_str())) {
                        bail!("unknown way `{w}` (known: {})", WAYS.join(", "));
                    }
                }
                _ => bail!("unexpected argument `{arg}`\n\n{USAGE}"),
            }
        }
        Ok(Some(o))
    }
}

/// fio, its shared libraries and the dynamic loader in an EROFS image, at the paths
/// the host has them; returns the image and the command that runs fio from it mounted
/// at `/opt`.
fn tools_image(work: &Path) -> Result<(PathBuf, String)> {
    let fio = String::from_utf8(run(Command::new("sh").args(["-c", "command -v fio"]))?.stdout)?
        .trim()
        .to_string();
    ensure!(
        !fio.is_empty(),
        "fio is not installed (.ci/run installs it)"
    );
    let ldd = String::from_utf8(run(Command::new("ldd").arg(&fio))?.stdout)?;
    let mut files = vec![fio.clone()];
    let mut loader = String::new();
    for line in ldd.lines() {
        // `libx.so.1 => /lib/.../libx.so.1 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`
        let Some(path) = line.split_whitespace().find(|w| w.starts_with('/')) else {
            continue;
        };
        if line.trim_start().starts_with('/') {
            loader = path.to_string();
        }
        files.push(path.to_string());
    }
    ensure!(
        !loader.is_empty(),
        "no dynamic loader in ldd's output:\n{ldd}"
    );
    let tree = work.join("tools");
    for f in &files {
        let to = tree.join(f.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().context("a file in a directory")?)?;
        // The file itself, not a symlink (targets would be missing in the image).
        std::fs::copy(f, &to).with_context(|| format!("copying {f}"))?;
    }
    let image = work.join("tools.erofs");
    run(Command::new("mkfs.erofs").arg(&image).arg(&tree))?;
    let mut dirs: Vec<String> = files[1..]
        .iter()
        .filter_map(|f| Path::new(f).parent())
        .map(|d| format!("/opt{}", d.display()))
        .collect();
    dirs.sort();
    dirs.dedup();
    Ok((
        image,
        format!("/opt{loader} --library-path {} /opt{fio}", dirs.join(":")),
    ))
}

fn guest_script(o: &Options, fio: &str) -> String {
    let mut s = String::from(
        r#"
for b in /sys/block/vd*; do
  if [ "$(cat $b/serial)" = tools ]; then tools=/dev/${b##*/}; else disk=/dev/${b##*/}; fi
done
mkdir -p /opt && mount -t erofs -o ro $tools /opt || echo "tools not mounted"
echo "disk $disk $(cat /sys/block/${disk##*/}/size) sectors"
"#,
    );
    for (job, _) in JOBS {
        let (rw, bs, time) = match job {
            "seqwrite" => ("write", "1M", String::from(" --end_fsync=1")),
            "seqread" => ("read", "1M", String::new()),
            "randread" => (
                "randread",
                "4k",
                format!(" --time_based --runtime={}", o.runtime),
            ),
            _ => (
                "randwrite",
                "4k",
                format!(" --time_based --runtime={}", o.runtime),
            ),
        };
        s.push_str(&format!(
            "{}\n{}\n{fio} --name={job} --filename=$disk --rw={rw} --bs={bs} --size={}M --ioengine=libaio --direct=1 --iodepth=16 --randrepeat=0 --output-format=json{time}\n{}\n",
            begin(&format!("start-{job}")),
            end(&format!("start-{job}")),
            o.size_mib,
            end(job),
        ));
        // The job's JSON is between `==end start-JOB` and `==end JOB`: a section of its
        // own for `Run::section`.
    }
    s
}

/// When, and each process's CPU seconds then.
type Samples = Arc<Mutex<Vec<(Duration, Vec<f64>)>>>;

/// CPU-seconds samples of some processes, every 20 ms, from a common start.
struct Sampler {
    samples: Samples,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pids: Vec<u32>, t0: Instant) -> Sampler {
        let samples: Samples = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let cpu: Vec<f64> = pids
                    .iter()
                    .map(|&p| process_cpu_seconds(p).unwrap_or(f64::NAN))
                    .collect();
                s.lock().unwrap().push((t0.elapsed(), cpu));
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Sampler {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// CPU seconds each process used between `a` and `b` (the samples nearest them).
    fn between(&self, a: Duration, b: Duration) -> Vec<f64> {
        let s = self.samples.lock().unwrap();
        let at = |t: Duration| {
            s.iter()
                .min_by_key(|(when, _)| when.abs_diff(t))
                .map(|(_, c)| c.clone())
                .unwrap_or_default()
        };
        let (x, y) = (at(a), at(b));
        x.iter().zip(&y).map(|(x, y)| y - x).collect()
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn qsd(work: &Path, size: u64) -> Result<(Killed, PathBuf)> {
    let raw = work.join("qsd.raw");
    std::fs::File::create(&raw)?.set_len(size)?;
    let sock = work.join("qsd.sock");
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={}",
            raw.display()
        ))
        .args(["--blockdev", "driver=raw,node-name=disk0,file=file0"])
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues=2",
            sock.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("qemu-storage-daemon (qemu-system-common, installed by .ci/run)")?;
    let mut k = Killed(child);
    // Waits for the socket file, not a connection: a connection would be a vhost-user
    // session of its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        ensure!(k.0.try_wait()?.is_none(), "qemu-storage-daemon exited");
        ensure!(
            Instant::now() < deadline,
            "qemu-storage-daemon did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((k, sock))
}

/// One way's boot: the fio results per job, with CPU per GiB.
fn one_way(
    o: &Options,
    work: &Path,
    way: &str,
    d: &Volumed,
    kernel: &Kernel,
    tools: &Path,
    initrd: &Path,
) -> Result<Value> {
    let size = o.size_mib << 20;
    let create = |name: &str| {
        d.tide().ok(&[
            "volume",
            "create",
            name,
            "--size",
            &format!("{}M", o.size_mib),
        ])
    };
    let (source, backend_pid, _qsd) = match way {
        "vhost-user" => {
            create("vu");
            let sock = d
                .tide()
                .ok(&["volume", "vhost-user", "serve", "vu", "--id", "bench"]);
            (Source::VhostUser(sock.trim().into()), d.pid(), None)
        }
        "nbd" => {
            create("nb");
            (Source::from_uri(&d.nbd_uri("nb")), d.pid(), None)
        }
        _ => {
            let (k, sock) = qsd(work, size)?;
            let pid = k.0.id();
            (Source::VhostUser(sock), pid, Some(k))
        }
    };
    let guest = Guest {
        kernel: kernel.clone(),
        initrd: initrd.to_path_buf(),
        disks: vec![
            Disk {
                serial: "bench".into(),
                source,
                read_only: false,
            },
            Disk {
                serial: "tools".into(),
                source: Source::File(tools.to_path_buf()),
                read_only: true,
            },
        ],
        append: String::new(),
        memory_mib: 512,
        vcpus: 1,
        dir: work.join(format!("guest-{way}")),
        control: None,
    };
    let t0 = Instant::now();
    let running = guest.spawn();
    let mut sampler = Sampler::start(vec![backend_pid, running.pid()], t0);
    let timeout = Duration::from_secs(600 + 4 * o.runtime);
    let r = running.wait(timeout);
    sampler.finish();
    let mark = |name: &str| -> Result<Duration> {
        r.marks
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| *t)
            .with_context(|| format!("{way}: no mark {name}:\n{}", r.tail()))
    };
    let mut jobs = serde_json::Map::new();
    for (job, _) in JOBS {
        let text = r
            .output
            .split_once(&format!("==end start-{job}\n"))
            .and_then(|(_, rest)| rest.split_once(&format!("==end {job}\n")))
            .map(|(j, _)| j)
            .with_context(|| format!("{way}: no output of {job}:\n{}", r.tail()))?;
        let start = text
            .find('{')
            .with_context(|| format!("{way} {job}: {text}"))?;
        let v: Value = serde_json::from_str(&text[start..])
            .with_context(|| format!("{way} {job}: fio's JSON:\n{text}"))?;
        let j = &v["jobs"][0];
        let side = if job.contains("write") {
            "write"
        } else {
            "read"
        };
        let io = &j[side];
        let bytes = io["io_bytes"].as_f64().unwrap_or(0.0);
        let runtime = io["runtime"].as_f64().unwrap_or(0.0) / 1000.0;
        ensure!(bytes > 0.0 && runtime > 0.0, "{way} {job}: no I/O: {io}");
        let guest_cpu =
            (j["usr_cpu"].as_f64().unwrap_or(0.0) + j["sys_cpu"].as_f64().unwrap_or(0.0)) / 100.0
                * runtime;
        let host = sampler.between(mark(&format!("start-{job}"))?, mark(job)?);
        let gib = bytes / GIB;
        jobs.insert(
            job.into(),
            json!({
                "iops": io["iops"].as_f64(),
                "mib_s": io["bw_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
                "bytes": bytes,
                "seconds": runtime,
                "lat_p50_us": io["clat_ns"]["percentile"]["50.000000"].as_f64().map(|n| n / 1000.0),
                "guest_cpu_s_per_gib": guest_cpu / gib,
                "backend_cpu_s_per_gib": host.first().copied().unwrap_or(f64::NAN) / gib,
                "qemu_cpu_s_per_gib": host.get(1).copied().unwrap_or(f64::NAN) / gib,
            }),
        );
    }
    eprintln!(
        "bench-vhost: {way}: done in {:.1} s",
        r.elapsed.as_secs_f64()
    );
    Ok(Value::Object(jobs))
}

fn table(o: &Options, results: &serde_json::Map<String, Value>) -> String {
    let mut header = vec!["job".to_string()];
    for w in &o.ways {
        header.push(w.clone());
    }
    header.push("vhost-user / qsd".into());
    header.push("vhost-user / nbd".into());
    let mut rows = Vec::new();
    let f = |w: &str, job: &str, k: &str| results[w][job][k].as_f64();
    for (job, title) in JOBS {
        let key = if job.starts_with("rand") {
            "iops"
        } else {
            "mib_s"
        };
        let unit = if key == "iops" { "IOPS" } else { "MiB/s" };
        let mut row = vec![format!("{title} ({unit})")];
        for w in &o.ways {
            row.push(f(w, job, key).map_or("-".into(), |v| format!("{v:.0}")));
        }
        for peer in ["qsd", "nbd"] {
            row.push(
                match (
                    f("vhost-user", job, key),
                    results.get(peer).and(f(peer, job, key)),
                ) {
                    (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                    _ => "-".into(),
                },
            );
        }
        rows.push(row);
        for (k, what) in [
            ("guest_cpu_s_per_gib", "  guest CPU s/GiB"),
            ("backend_cpu_s_per_gib", "  backend CPU s/GiB"),
            ("qemu_cpu_s_per_gib", "  QEMU CPU s/GiB"),
        ] {
            let mut row = vec![what.to_string()];
            for w in &o.ways {
                row.push(f(w, job, k).map_or("-".into(), |v| format!("{v:.2}")));
            }
            row.push(String::new());
            row.push(String::new());
            rows.push(row);
        }
    }
    let mut out = render_table(&header, &rows);
    let ratio = |job: &str, peer: &str| -> Option<f64> {
        let key = if job.starts_with("rand") {
            "iops"
        } else {
            "mib_s"
        };
        Some(f("vhost-user", job, key)? / results.get(peer).and(f(peer, job, key))?)
    };
    let goal = |r: Option<f64>, want: f64| match r {
        Some(r) if r >= want => format!("{r:.2}x (met, goal >= {want}x)"),
        Some(r) => format!("{r:.2}x (missed, goal >= {want}x)"),
        None => "not measured".into(),
    };
    out.push_str(&format!(
        "\ngoals: reads vs qsd: 4K {}, 1M {}\n       writes vs qsd: 4K {}, 1M {}\n       4K reads vs our NBD: {}\n",
        goal(ratio("randread", "qsd"), 1.0),
        goal(ratio("seqread", "qsd"), 1.0),
        goal(ratio("randwrite", "qsd"), 0.8),
        goal(ratio("seqwrite", "qsd"), 0.8),
        goal(ratio("randread", "nbd"), 1.5),
    ));
    out
}

fn bench(o: &Options) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("bench-vhost")
        .tempdir_in("/var/tmp")?;
    let work = tmp.path().to_path_buf();
    let kernel = Kernel::get();
    let (tools, fio) = tools_image(&work)?;
    let initrd = initramfs(&kernel, &guest_script(o, &fio), &work.join("initrd"));
    let d = Volumed::start(work.join("data"), work.join("volumed.sock"));
    let mut results = serde_json::Map::new();
    for way in &o.ways {
        let r = one_way(o, &work, way, &d, &kernel, &tools, &initrd)?;
        results.insert(way.clone(), r);
    }
    if o.json {
        println!("{}", Value::Object(results));
    } else {
        print!("{}", table(o, &results));
    }
    if o.keep {
        let kept = tmp.keep();
        eprintln!("bench-vhost: kept {}", kept.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    tests::bench::main("bench-vhost", USAGE, Options::parse, bench)
}
