//! `bench-gateway`: what the HTTP front end costs, beside nginx and haproxy.
//!
//! One real `sched`, one `volumed` booting guests (QEMU under TCG, Debian's cloud
//! kernel, `tide-init`), the Debian python3 root plus a one-file app layer as the image,
//! and the service `python3 -m http.server` in the guest, reached through the host port
//! QEMU forwards. `wrk` at fixed concurrency GETs the page four ways in one run: direct
//! to the instance's endpoint, through `tide-gateway` (by Host), through `nginx` and
//! through `haproxy` as reverse proxies with equivalent settings (two workers or
//! threads, keep-alive to the backend, X-Forwarded-For set). Each way runs `--rounds`
//! times interleaved; the table shows each way's median round.
//!
//! Under TCG the guest answers in tens of milliseconds and is the bottleneck, so the
//! same four ways run again in front of a backend that is not: nginx serving the page
//! on the host (one worker), which the gateway reaches through a static route
//! (`--route NAME=HOST:PORT`, the same proxy path as an instance's).
//!
//! Then scale from zero: `--starts` stacks with one scaled-to-zero service each, the
//! first request through the gateway (which starts it) against `tide resolve` then a GET
//! to the endpoint, alternating. Printed: the first answer, the start (the gateway's
//! `Scheduler.resolve`, or the `tide resolve` process, both returning once the guest's
//! port accepts) and the time from the start to the answer; their difference is what
//! the front end adds to a boot.
//!
//! Usage: `bench-gateway [--connections N] [--duration S] [--rounds N] [--starts N]`

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tests::bench::render_table;
use tests::gateway::{Gateway, raw, sample};
use tests::guest::{Kernel, guest_host_args, init_initramfs};
use tests::sched::{Sched, json, tide, wait_for, wait_host_up};
use tests::volumed::Volumed;

const USAGE: &str = "\
usage: bench-gateway [--connections N] [--duration S] [--rounds N] [--starts N]

Boots a guest serving a page and loads it with wrk four ways (direct, tide-gateway,
nginx, haproxy), then the same in front of nginx serving the page on the host, then
times starts from zero through the gateway and without it. Needs root, wrk, nginx,
haproxy.

  --connections N   wrk connections (default 16; 2 threads)
  --duration S      seconds per wrk run (default 10)
  --rounds N        wrk runs per way, interleaved (default 3)
  --starts N        starts from zero measured each way (default 3)
  -h, --help        show this help";

const PAGE: &str = "hello from the app layer\n";

const STACK: &str = r#"
[stack]
name = "NAME"
domain = "localhost"

[services.app]
image = "bench/app:1"
port = 8080
command = ["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0", "--directory", "/srv"]

[services.app.instances]
min = MIN
max = 1
scale_to_zero = ZERO
"#;

struct Opts {
    connections: u32,
    duration: u32,
    rounds: usize,
    starts: usize,
}

/// One wrk run: requests/s, p50 and p99 latency (ms), non-2xx answers and socket errors.
#[derive(Debug, Clone, Copy)]
struct Load {
    rps: f64,
    p50: f64,
    p99: f64,
    bad: u64,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// wrk's duration ("635.91us", "1.01ms", "2.00s") in milliseconds.
fn wrk_ms(v: &str) -> Option<f64> {
    let (n, mult) = if let Some(n) = v.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e3)
    } else {
        return None;
    };
    n.parse::<f64>().ok().map(|n| n * mult)
}

fn wrk(url: &str, host: &str, o: &Opts) -> Result<Load> {
    let out = Command::new("wrk")
        .args(["-t2", &format!("-c{}", o.connections)])
        .arg(format!("-d{}s", o.duration))
        .args([
            "--latency",
            "--timeout",
            "30s",
            "-H",
            &format!("Host: {host}"),
            url,
        ])
        .output()
        .context("run wrk (apt install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "wrk {url}: {text}");
    let pct = |p: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p))
            .and_then(|v| wrk_ms(v.trim()))
    };
    let count = |p: &str| -> u64 {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p))
            .map(|v| {
                v.split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0)
    };
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output: {text}"))?;
    Ok(Load {
        rps,
        p50: pct("50%").context("no p50")?,
        p99: pct("99%").context("no p99")?,
        bad: count("Non-2xx or 3xx responses:") + count("Socket errors:"),
    })
}

fn spawn(cmd: &mut Command, what: &str, log: &Path) -> Result<Child> {
    let f = std::fs::File::create(log)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .with_context(|| format!("start {what}"))
}

/// Stops the peers started (by pid) when dropped: SIGTERM, which an nginx master
/// passes on to its workers (SIGKILL would leave them running), then SIGKILL after 5 s.
struct Peers(Vec<Child>);

impl Drop for Peers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SAFETY: kill(2) on a pid we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while matches!(c.try_wait(), Ok(None)) && t0.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An nginx in `d` (its config, pid, logs and temp paths there) with `workers` worker
/// processes and `http` inside its `http {}` block.
fn nginx_in(d: &Path, workers: u32, http: &str) -> Result<Child> {
    std::fs::create_dir_all(d)?;
    let conf = format!(
        "worker_processes {workers};\n\
         daemon off;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
           access_log off;\n\
           client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
           {http}\n\
         }}\n",
        d = d.display()
    );
    let cfg = d.join("nginx.conf");
    std::fs::write(&cfg, conf)?;
    spawn(
        Command::new("nginx")
            .arg("-p")
            .arg(d)
            .arg("-e")
            .arg(d.join("error.log"))
            .arg("-c")
            .arg(&cfg),
        "nginx (apt install nginx-light)",
        &d.join("stderr"),
    )
}

/// nginx as a reverse proxy to `backend` on `port`: two workers, keep-alive upstream.
fn nginx(dir: &Path, port: u16, backend: &str) -> Result<Child> {
    nginx_in(
        &dir.join("nginx"),
        2,
        &format!(
            "upstream app {{ server {backend}; keepalive 64; }}\n\
             server {{\n\
               listen 127.0.0.1:{port};\n\
               location / {{\n\
                 proxy_pass http://app;\n\
                 proxy_http_version 1.1;\n\
                 proxy_set_header Connection \"\";\n\
                 proxy_set_header Host $host;\n\
                 proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
                 proxy_set_header X-Forwarded-Proto $scheme;\n\
               }}\n\
             }}"
        ),
    )
}

fn haproxy(dir: &Path, port: u16, backend: &str) -> Result<Child> {
    let conf = format!(
        "global\n  nbthread 2\n  maxconn 8192\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         \x20 option forwardfor\n  http-reuse always\n\
         frontend web\n  bind 127.0.0.1:{port}\n  default_backend app\n\
         backend app\n  server s1 {backend}\n"
    );
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, conf)?;
    spawn(
        Command::new("haproxy").arg("-db").arg("-f").arg(&cfg),
        "haproxy (apt install haproxy)",
        &dir.join("haproxy.log"),
    )
}

fn answers(addr: &str, host: &str) -> bool {
    std::net::TcpStream::connect(addr).is_ok() && {
        let r = raw(
            addr,
            format!("GET /index.html HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        r.status == 200 && r.body == PAGE
    }
}

fn deploy(addr: &str, work: &Path, name: &str, zero: bool) -> Result<()> {
    let file = work.join(format!("{name}.toml"));
    let (min, z) = if zero { ("0", "true") } else { ("1", "false") };
    std::fs::write(
        &file,
        STACK
            .replace("NAME", name)
            .replace("MIN", min)
            .replace("ZERO", z),
    )?;
    let o = tide(addr, &["deploy", file.to_str().context("utf-8")?]);
    ensure!(
        o.status.success(),
        "deploy {name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

fn rm(addr: &str, name: &str) -> Result<()> {
    let o = tide(addr, &["stack", "rm", name]);
    ensure!(
        o.status.success(),
        "stack rm {name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Loads `backend` four ways (direct, the gateway at `gw` by `host`, nginx and haproxy
/// started in `dir` in front of it), `o.rounds` rounds interleaved: the table.
fn compare(
    dir: &Path,
    backend: &str,
    gw: &str,
    host: &str,
    direct: &str,
    o: &Opts,
) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    let (np, hp) = (free_port()?, free_port()?);
    let _peers = Peers(vec![nginx(dir, np, backend)?, haproxy(dir, hp, backend)?]);
    let ways = [
        (direct, backend.to_string()),
        ("tide-gateway", gw.to_string()),
        ("nginx", format!("127.0.0.1:{np}")),
        ("haproxy", format!("127.0.0.1:{hp}")),
    ];
    for (name, a) in &ways {
        wait_for(30, &format!("{name} to answer"), || {
            if answers(a, host) {
                Ok(())
            } else {
                Err(format!("no page from {a}"))
            }
        });
    }
    let mut loads: Vec<Vec<Load>> = vec![Vec::new(); ways.len()];
    for round in 0..o.rounds {
        for (i, (name, a)) in ways.iter().enumerate() {
            let l = wrk(&format!("http://{a}/index.html"), host, o)?;
            eprintln!(
                "bench-gateway: round {} {name}: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, {} bad",
                round + 1,
                l.rps,
                l.p50,
                l.p99,
                l.bad
            );
            loads[i].push(l);
        }
    }
    // The median round of each way (by requests/s), whole: its p50 and p99 with it.
    let picked: Vec<Load> = loads
        .iter()
        .map(|v| {
            let mut v = v.clone();
            v.sort_by(|a, b| a.rps.total_cmp(&b.rps));
            v[v.len() / 2]
        })
        .collect();
    let (d, n) = (picked[0], picked[2]);
    let rows: Vec<Vec<String>> = ways
        .iter()
        .zip(&picked)
        .map(|((name, _), l)| {
            vec![
                (*name).to_string(),
                format!("{:.0}", l.rps),
                format!("{:.3}", l.p50),
                format!("{:.3}", l.p99),
                format!("{:+.3}", l.p50 - d.p50),
                format!("{:.2}x", (l.p50 - d.p50) / (n.p50 - d.p50)),
                format!("{:.2}x", l.p99 / n.p99),
                format!("{:.2}x", l.rps / n.rps),
                l.bad.to_string(),
            ]
        })
        .collect();
    Ok(render_table(
        &[
            "way",
            "req/s",
            "p50 ms",
            "p99 ms",
            "added p50 ms",
            "added p50 / nginx's",
            "p99 / nginx",
            "req/s / nginx",
            "errors",
        ],
        &rows,
    ))
}

/// nginx serving `dir/www` on `port`, one worker: the fast backend.
fn nginx_static(dir: &Path, port: u16) -> Result<Child> {
    nginx_in(
        &dir.join("backend"),
        1,
        &format!(
            "keepalive_requests 1000000;\n\
             server {{ listen 127.0.0.1:{port}; root {}; }}",
            dir.join("www").display()
        ),
    )
}

/// A scale-to-zero stack `name`, its first request through the gateway: (seconds to the
/// answer at the client, seconds of the start as the gateway timed it).
fn from_zero_through(addr: &str, work: &Path, gw: &Gateway, name: &str) -> Result<(f64, f64)> {
    deploy(addr, work, name, true)?;
    let h = format!("app.{name}.localhost");
    // Asking for the name would start it: wait until the pushed table holds it.
    wait_for(10, "the route to reach the gateway", || {
        let want = format!("tide_gateway_instances_serving{{service=\"app.{name}\"}} 0");
        if gw.metrics_text().lines().any(|l| l == want) {
            Ok(())
        } else {
            Err(format!("no {want}"))
        }
    });
    let t0 = Instant::now();
    let r = raw(
        &gw.addr,
        format!("GET /index.html HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let total = t0.elapsed().as_secs_f64();
    ensure!(r.status == 200 && r.body == PAGE, "from zero: {r:?}");
    let m = gw.metrics_text();
    let start = sample(
        &m,
        "tide_gateway_cold_start_seconds_sum",
        &format!("service=\"app.{name}\""),
    );
    ensure!(start > 0.0, "the gateway timed no start for {name}: {m}");
    eprintln!("bench-gateway: from zero through the gateway: {total:.3} s (start {start:.3} s)");
    rm(addr, name)?;
    Ok((total, start))
}

/// The same without a front end: `tide resolve` (which starts it), then GETs to the
/// endpoint until one answers: (seconds to the answer, seconds of the resolve).
fn from_zero_direct(addr: &str, work: &Path, name: &str) -> Result<(f64, f64)> {
    deploy(addr, work, name, true)?;
    let t0 = Instant::now();
    let r = json(addr, &["resolve", &format!("app.{name}.localhost")]);
    let resolved = t0.elapsed().as_secs_f64();
    let ep = r["instance"]["endpoint"]
        .as_str()
        .context("endpoint")?
        .to_string();
    loop {
        let r = raw(
            &ep,
            b"GET /index.html HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
        );
        if r.status == 200 && r.body == PAGE {
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("{ep} never answered");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let total = t0.elapsed().as_secs_f64();
    eprintln!(
        "bench-gateway: from zero without the gateway: {total:.3} s (tide resolve {resolved:.3} s)"
    );
    rm(addr, name)?;
    Ok((total, resolved))
}

fn bench(o: &Opts) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("bench-gateway")
        .tempdir_in("/var/tmp")?;
    let work = tmp.path().to_path_buf();
    let _guests = tests::KillGuestsBelow(work.clone());
    let _unmount = tests::UnmountBelow(work.clone());
    let kernel = Kernel::get();
    let initrd = init_initramfs(&kernel, &work.join("init.cpio"));
    let python3 = tests::roots::ensure_debian_root("python3")?;
    let app = work.join("app");
    std::fs::create_dir_all(app.join("srv"))?;
    std::fs::write(app.join("srv/index.html"), PAGE)?;
    let blobs = tests::oci::Blobs::new(&work.join("blobs"));
    let (base_tar, app_tar) = (work.join("base.tar"), work.join("app.tar"));
    tests::oci::tar(&python3, None, &base_tar);
    tests::oci::tar(&app, None, &app_tar);
    let layers = [blobs.layer(&base_tar), blobs.layer(&app_tar)];
    blobs.image(&work.join("oci"), "bench/app:1", &layers);

    let sched = Sched::start(work.join("sched"), work.join("sched.sock"), &[]);
    let addr = sched.addr();
    let args = guest_host_args(&addr, &kernel, &initrd, &["--memory", "8G"]);
    let daemon = Volumed::start_with(work.join("data"), work.join("v.sock"), &args);
    daemon.tide().json(&[
        "image",
        "import",
        work.join("oci").to_str().context("utf-8")?,
    ]);
    wait_host_up(&addr);
    let gw = Gateway::start(&addr, work.join("gateway.log"), &[]);
    deploy(&addr, &work, "bench", false)?;
    let list = json(&addr, &["instance", "ls"]);
    let endpoint = list
        .as_array()
        .and_then(|l| l.iter().find(|i| i["stack"] == "bench"))
        .and_then(|i| i["endpoint"].as_str())
        .context("the instance's endpoint")?
        .to_string();
    let host = "app.bench.localhost";
    let guest_table = compare(
        &work.join("guest"),
        &endpoint,
        &gw.addr,
        host,
        "direct to the instance",
        o,
    )?;
    // The guest idles on an emulated CPU that still costs host CPU: gone before the
    // host-backend rounds.
    rm(&addr, "bench")?;
    // The same four ways in front of a backend that is not the bottleneck: nginx
    // serving the page from the host (one worker), reached by the gateway through a
    // static route (--route), so what the proxies cost shows.
    let fast = work.join("fast");
    std::fs::create_dir_all(fast.join("www"))?;
    std::fs::write(fast.join("www/index.html"), PAGE)?;
    let bp = free_port()?;
    let _backend = Peers(vec![nginx_static(&fast, bp)?]);
    let backend = format!("127.0.0.1:{bp}");
    let static_host = "app.static.localhost";
    let route = format!("{static_host}={backend}");
    let gw2 = Gateway::start(&addr, work.join("gateway2.log"), &["--route", &route]);
    let host_table = compare(
        &fast,
        &backend,
        &gw2.addr,
        static_host,
        "direct to nginx (static)",
        o,
    )?;
    drop(gw2);
    println!(
        "wrk -t2 -c{} -d{}s --timeout 30s, the median round (by req/s) of {}, ways interleaved",
        o.connections, o.duration, o.rounds
    );
    println!("\nthe instance: python3 -m http.server in a TCG guest, through QEMU's port forward");
    println!("{guest_table}");
    println!("\na host backend: nginx serving the page (1 worker)");
    println!("{host_table}");

    // Scale from zero, the two ways alternating.
    let (mut through, mut direct) = (Vec::new(), Vec::new());
    for i in 0..o.starts {
        through.push(from_zero_through(&addr, &work, &gw, &format!("zero{i}"))?);
        direct.push(from_zero_direct(&addr, &work, &format!("direct{i}"))?);
    }
    let row = |name: &str, v: &[(f64, f64)]| {
        vec![
            name.to_string(),
            format!("{:.3}", median(v.iter().map(|x| x.0).collect())),
            format!("{:.3}", median(v.iter().map(|x| x.1).collect())),
            format!("{:.1}", median(v.iter().map(|x| x.0 - x.1).collect()) * 1e3),
        ]
    };
    let after = |v: &[(f64, f64)]| median(v.iter().map(|x| x.0 - x.1).collect());
    println!(
        "\nscale from zero (a TCG guest booted per start), median of {} starts each",
        o.starts
    );
    println!(
        "{}",
        render_table(
            &[
                "way",
                "first answer s",
                "start s",
                "first answer after the start ms"
            ],
            &[
                row("through tide-gateway", &through),
                row("tide resolve, then GET", &direct),
            ]
        )
    );
    println!(
        "the front end adds {:+.1} ms after the start (goal <= 5 ms); the start is the scheduler's \
         resolve, which returns once the guest's port accepts",
        (after(&through) - after(&direct)) * 1e3
    );
    drop(gw);
    drop(daemon);
    drop(sched);
    Ok(())
}

fn main() -> ExitCode {
    let mut o = Opts {
        connections: 16,
        duration: 10,
        rounds: 3,
        starts: 3,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> Option<u64> {
            let v = args.next().and_then(|v| v.parse().ok()).filter(|&n| n > 0);
            if v.is_none() {
                eprintln!("bench-gateway: {what} needs a positive number\n\n{USAGE}");
            }
            v
        };
        let ok = match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--connections" => num("--connections").map(|n| o.connections = n as u32),
            "--duration" => num("--duration").map(|n| o.duration = n as u32),
            "--rounds" => num("--rounds").map(|n| o.rounds = n as usize),
            "--starts" => num("--starts").map(|n| o.starts = n as usize),
            _ => {
                eprintln!("bench-gateway: unexpected argument `{a}`\n\n{USAGE}");
                None
            }
        };
        if ok.is_none() {
            return ExitCode::from(2);
        }
    }
    match bench(&o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}
