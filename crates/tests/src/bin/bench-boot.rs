//! `bench-boot`: how long a guest takes from launch to its service answering, cold and
//! from a warm VM, with its layers served by volumed and by local image files.
//!
//! The guest is the one Tidedge boots (`vmm::qemu`, q35 under TCG, one vCPU, 384 MiB,
//! Debian's cloud kernel, `tide-init`): the Debian python3 root as its base layer and a
//! one-file app layer on top, an ext4 scratch file made fresh before each run, and the
//! app `python3 -m http.server` on a port QEMU forwards to the host. "Answers" is the
//! first `GET /index.html` on that port that returns the app layer's file.
//!
//! - `cold, ours`: both layers as volumed's NBD exports; launch, wait for init's
//!   `ready`, send the config, poll the port. Split: launch to QMP served (VMM start),
//!   to `ready` (kernel and init), to the answer (root mounted, app started, serving).
//! - `cold, files`: the same guest, its layers `mkfs.erofs` images of the same trees on
//!   local disk, no volumed: the peer without Tidedge's storage.
//! - `warm, ours`: a VM booted on the base layer alone and waiting in init (a warm pool
//!   member); the clock starts at the conversion: the app layer is hot-added over QMP,
//!   the config sent, the port polled.
//!
//! Each row is `--runs` runs (default 10): p50 and the worst (p99 of so few runs is
//! their maximum). Under TCG absolute times are slow (the guest's CPU is emulated);
//! the ratios are what carries over to KVM.
//!
//! `--deploy` measures the product path instead: `tide deploy` of a one-service stack
//! (the same two layers as an image, the same app as the service's command) onto one
//! `volumed --kernel --initramfs` host of a real `sched`, until `GET` answers, split from
//! the host's own timestamps into storage (the prepare's exports, scratch, volumes and
//! root, before the launch), VMM start + kernel + init (launch to init's `ready`), app
//! (config to the port answering) and the rest (scheduler, RPC, the client); cold, then
//! from a pool's warm VM (the split there: storage, then conversion to answer), beside
//! the same guest booted by plain QEMU from local `mkfs.erofs` images.
//!
//! Usage: `bench-boot [--runs N] [--deploy] [--json]`

use std::net::{SocketAddr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use guest::control::{self, Config, Event};
use serde_json::json;
use tests::bench::{render_table, run};
use tests::guest::{Control, Kernel, ext4_file, init_initramfs, root_meta};
use tests::volumed::Volumed;
use vmm::{Accel, Disk, DiskSource, Forward, Hypervisor, NetSpec, Vm, VmSpec};

const USAGE: &str = "\
usage: bench-boot [--runs N] [--deploy] [--json]

Boots the python3 root plus an app layer in QEMU (TCG) with tide-init and times launch
to the app's HTTP answer: cold with volumed's layer exports, cold with local mkfs.erofs
images, and the conversion of a warm VM (booted on the base layer, waiting in init).
Needs root.

  --runs N      runs per row (default 10)
  --deploy      through tide deploy (sched + volumed booting guests), split into
                storage, VMM + kernel + init, app and the rest; cold and warm
  --json        print JSON (every sample) instead of a table
  -h, --help    show this help";

const PAGE: &str = "hello from the app layer\n";
const GUEST_PORT: u16 = 8000;

struct Env {
    kernel: Kernel,
    initrd: PathBuf,
    work: PathBuf,
    root: guest::control::RootMeta,
}

fn free_port() -> Result<SocketAddrV4> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    Ok(SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port))
}

fn http_ok(addr: SocketAddrV4) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) =
        std::net::TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(1))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.starts_with("HTTP/1.0 200") && text.ends_with(PAGE)
}

impl Env {
    fn spec(&self, name: &str, disks: Vec<Disk>, port: SocketAddrV4) -> VmSpec {
        let mut all = disks;
        all.push(Disk {
            serial: "scratch".into(),
            source: DiskSource::File(ext4_file(
                &self.work.join(format!("{name}.ext4")),
                256 << 20,
            )),
            read_only: false,
        });
        VmSpec {
            name: name.into(),
            kernel: self.kernel.vmlinuz(),
            initrd: self.initrd.clone(),
            cmdline: "console=ttyS0 quiet panic=-1".into(),
            vcpus: 1,
            memory_mib: 512,
            disks: all,
            control: self.work.join(format!("{name}.ctl")),
            console_log: self.work.join(format!("{name}.console")),
            run_dir: self.work.join(format!("{name}-run")),
            accel: Accel::Tcg,
            net: Some(NetSpec {
                forwards: vec![Forward {
                    host: port,
                    guest_port: GUEST_PORT,
                }],
            }),
            shared_memory: false,
        }
    }

    fn config(&self) -> Config {
        Config {
            hostname: "app-0".into(),
            layers: vec!["layer0".into(), "layer1".into()],
            scratch: "scratch".into(),
            root: self.root.clone(),
            // As volumed runs an image with no user: root, Docker's PATH.
            env: vec![(
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            )],
            uid: 0,
            gid: 0,
            workdir: "/".into(),
            argv: [
                "python3",
                "-m",
                "http.server",
                &GUEST_PORT.to_string(),
                "--bind",
                "0.0.0.0",
                "--directory",
                "/srv",
            ]
            .iter()
            .map(|a| a.to_string())
            .collect(),
            disk_timeout_ms: 30_000,
            network: Some(guest::control::Network {
                address: vmm::qemu::USER_NET_ADDRESS.into(),
                gateway: vmm::qemu::USER_NET_GATEWAY.into(),
                // As volumed gives its guests: without a resolver, http.server's
                // getfqdn() at start waits for a DNS timeout.
                dns: vmm::qemu::USER_NET_DNS.into(),
            }),
            volumes: Vec::new(),
        }
    }
}

/// Waits for `ready` on a fresh control connection.
fn ready(spec: &VmSpec) -> Result<Control> {
    let mut ctl = Control::connect(&spec.control, &spec.name, Duration::from_secs(300));
    match ctl.event() {
        Event::Ready { .. } => Ok(ctl),
        e => bail!("{}: expected ready, got {e:?}", spec.name),
    }
}

/// Sends the config and polls until the app answers; then stops the VM.
fn serve(env: &Env, mut ctl: Control, vm: &mut Box<dyn Vm>, port: SocketAddrV4) -> Result<()> {
    ctl.send(&control::Command::Config(Box::new(env.config())));
    let deadline = Instant::now() + Duration::from_secs(300);
    while !http_ok(port) {
        ensure!(Instant::now() < deadline, "the app never answered");
        ensure!(vm.try_wait()?.is_none(), "the guest ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn stop(mut vm: Box<dyn Vm>) -> Result<()> {
    vm.stop(Duration::from_millis(0))?;
    Ok(())
}

/// One cold boot: (VMM start, kernel + init, app) seconds.
fn cold(env: &Env, name: &str, layers: [DiskSource; 2]) -> Result<[f64; 3]> {
    let port = free_port()?;
    let disks = layers
        .into_iter()
        .enumerate()
        .map(|(i, source)| Disk {
            serial: format!("layer{i}"),
            source,
            read_only: true,
        })
        .collect();
    let spec = env.spec(name, disks, port);
    let t0 = Instant::now();
    let mut vm = vmm::qemu::Qemu::default().launch(&spec)?;
    let t1 = t0.elapsed().as_secs_f64();
    let ctl = ready(&spec)?;
    let t2 = t0.elapsed().as_secs_f64();
    serve(env, ctl, &mut vm, port)?;
    let t3 = t0.elapsed().as_secs_f64();
    stop(vm)?;
    Ok([t1, t2 - t1, t3 - t2])
}

/// One warm conversion: (hot-add, config to answer) seconds.
fn warm(env: &Env, name: &str, base: DiskSource, app: DiskSource) -> Result<[f64; 2]> {
    let port = free_port()?;
    let spec = env.spec(
        name,
        vec![Disk {
            serial: "layer0".into(),
            source: base,
            read_only: true,
        }],
        port,
    );
    let mut vm = vmm::qemu::Qemu::default().launch(&spec)?;
    let ctl = ready(&spec)?;
    // The pool member waits; the conversion starts now.
    let t0 = Instant::now();
    vm.add_disk(&Disk {
        serial: "layer1".into(),
        source: app,
        read_only: true,
    })?;
    let t1 = t0.elapsed().as_secs_f64();
    serve(env, ctl, &mut vm, port)?;
    let t2 = t0.elapsed().as_secs_f64();
    stop(vm)?;
    Ok([t1, t2 - t1])
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((s.len() as f64 - 1.0) * p).round() as usize;
    s[i.min(s.len() - 1)]
}

fn cell(v: &[f64]) -> String {
    format!("{:.2} / {:.2}", percentile(v, 0.5), percentile(v, 1.0))
}

fn bench(runs: usize, as_json: bool) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("bench-boot")
        .tempdir_in("/var/tmp")?;
    let work = tmp.path().to_path_buf();
    let kernel = Kernel::get();
    let python3 = tests::roots::ensure_debian_root("python3")?;
    let app = work.join("app");
    std::fs::create_dir_all(app.join("srv"))?;
    std::fs::write(app.join("srv/index.html"), PAGE)?;
    let env = Env {
        initrd: init_initramfs(&kernel, &work.join("init.cpio")),
        kernel,
        work: work.clone(),
        root: root_meta(&python3),
    };
    let daemon = Volumed::start(work.join("data"), work.join("v.sock"));
    let import = |dir: &Path| -> Result<String> {
        let r = daemon
            .tide()
            .json(&["layer", "import", dir.to_str().context("utf-8 path")?]);
        Ok(r["layers"][0].as_str().context("no layer")?.to_string())
    };
    let (base, top) = (import(&python3)?, import(&app)?);
    let nbd = |l: &str| DiskSource::Nbd {
        socket: daemon.data.join("nbd.sock"),
        export: format!("layer/{l}"),
    };
    let mut images = Vec::new();
    for (name, dir) in [("base", &python3), ("app", &app)] {
        let img = work.join(format!("{name}.erofs"));
        run(Command::new("mkfs.erofs").arg("--quiet").arg(&img).arg(dir))?;
        images.push(img);
    }
    let (mut ours, mut files, mut conv) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        ours.push(cold(&env, &format!("ours{i}"), [nbd(&base), nbd(&top)])?);
        files.push(cold(
            &env,
            &format!("files{i}"),
            [
                DiskSource::File(images[0].clone()),
                DiskSource::File(images[1].clone()),
            ],
        )?);
        conv.push(warm(&env, &format!("warm{i}"), nbd(&base), nbd(&top))?);
        eprintln!(
            "bench-boot: run {}: cold ours {:.2} s, cold files {:.2} s, warm conversion {:.2} s",
            i + 1,
            ours[i].iter().sum::<f64>(),
            files[i].iter().sum::<f64>(),
            conv[i].iter().sum::<f64>()
        );
    }
    let col = |v: &[[f64; 3]], k: usize| v.iter().map(|r| r[k]).collect::<Vec<f64>>();
    let total = |v: &[[f64; 3]]| v.iter().map(|r| r.iter().sum()).collect::<Vec<f64>>();
    let conv_total: Vec<f64> = conv.iter().map(|r| r[0] + r[1]).collect();
    if as_json {
        println!(
            "{}",
            json!({"cold_ours_s": ours, "cold_files_s": files, "warm_conversion_s": conv})
        );
        return Ok(());
    }
    let rows = vec![
        vec![
            "cold, ours (volumed NBD)".to_string(),
            cell(&col(&ours, 0)),
            cell(&col(&ours, 1)),
            cell(&col(&ours, 2)),
            cell(&total(&ours)),
        ],
        vec![
            "cold, files (mkfs.erofs, local)".to_string(),
            cell(&col(&files, 0)),
            cell(&col(&files, 1)),
            cell(&col(&files, 2)),
            cell(&total(&files)),
        ],
        vec![
            "warm conversion, ours".to_string(),
            format!(
                "hot-add {}",
                cell(&conv.iter().map(|r| r[0]).collect::<Vec<_>>())
            ),
            "-".into(),
            cell(&conv.iter().map(|r| r[1]).collect::<Vec<_>>()),
            cell(&conv_total),
        ],
    ];
    print!(
        "{}",
        render_table(
            &[
                &format!("{runs} runs, p50 / max, seconds"),
                "VMM start",
                "kernel + init",
                "root + app",
                "launch to answer",
            ],
            &rows
        )
    );
    let (o, f, w) = (
        percentile(&total(&ours), 0.5),
        percentile(&total(&files), 0.5),
        percentile(&conv_total, 0.5),
    );
    println!(
        "cold ours / cold files: {:.2}x (goal <= 1.1x); warm / cold ours: {:.2} (goal <= 0.20)",
        o / f,
        w / o
    );
    Ok(())
}

/// The stack `--deploy` runs: the app as the service's command.
const DEPLOY_STACK: &str = r#"
[stack]
name = "NAME"

[services.app]
image = "bench/app:1"
port = 8000
command = ["python3", "-m", "http.server", "8000", "--bind", "0.0.0.0", "--directory", "/srv"]
"#;

/// One deploy's split, seconds: storage, VMM + kernel + init, app, rest, total.
fn deploy_once(addr: &str, work: &Path, name: &str) -> Result<[f64; 5]> {
    let file = work.join(format!("{name}.toml"));
    std::fs::write(&file, DEPLOY_STACK.replace("NAME", name))?;
    let start = Instant::now();
    let o = tests::sched::tide(addr, &["deploy", file.to_str().context("utf-8")?]);
    ensure!(
        o.status.success(),
        "deploy: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let list = tests::sched::json(addr, &["instance", "ls"]);
    let i = list
        .as_array()
        .context("instances")?
        .iter()
        .find(|i| i["stack"] == name)
        .context("no instance")?
        .clone();
    let endpoint: SocketAddrV4 = i["endpoint"].as_str().context("endpoint")?.parse()?;
    while !http_ok(endpoint) {
        ensure!(start.elapsed() < Duration::from_secs(300), "no answer");
        std::thread::sleep(Duration::from_millis(5));
    }
    let total = start.elapsed().as_secs_f64();
    let g = &i["guest"];
    let ms = |k: &str| g[k].as_u64().unwrap_or(0) as f64 / 1e3;
    let storage = ms("storage_ms");
    let (boot, app) = if ms("converted") > 0.0 {
        (0.0, ms("answered") - ms("converted"))
    } else {
        (ms("booted") - ms("launched"), ms("answered") - ms("booted"))
    };
    let rest = total - storage - boot - app;
    let o = tests::sched::tide(addr, &["stack", "rm", name]);
    ensure!(
        o.status.success(),
        "stack rm: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok([storage, boot, app, rest, total])
}

fn bench_deploy(runs: usize, as_json: bool) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("bench-boot")
        .tempdir_in("/var/tmp")?;
    let work = tmp.path().to_path_buf();
    let _guests = tests::KillGuestsBelow(work.clone());
    let kernel = Kernel::get();
    let python3 = tests::roots::ensure_debian_root("python3")?;
    let app = work.join("app");
    std::fs::create_dir_all(app.join("srv"))?;
    std::fs::write(app.join("srv/index.html"), PAGE)?;
    let env = Env {
        initrd: init_initramfs(&kernel, &work.join("init.cpio")),
        kernel,
        work: work.clone(),
        root: root_meta(&python3),
    };
    // The image: the python3 root and the app layer, an OCI layout of two tar layers.
    let blobs = tests::oci::Blobs::new(&work.join("blobs"));
    let (base_tar, app_tar) = (work.join("base.tar"), work.join("app.tar"));
    tests::oci::tar(&python3, None, &base_tar);
    tests::oci::tar(&app, None, &app_tar);
    let layers = [blobs.layer(&base_tar), blobs.layer(&app_tar)];
    blobs.image(&work.join("oci"), "bench/app:1", &layers);
    let sched = tests::sched::Sched::start(work.join("sched"), work.join("sched.sock"), &[]);
    let addr = sched.addr();
    let args = tests::guest::guest_host_args(&addr, &env.kernel, &env.initrd, &[]);
    let daemon = Volumed::start_with(work.join("data"), work.join("v.sock"), &args);
    daemon.tide().json(&[
        "image",
        "import",
        work.join("oci").to_str().context("utf-8")?,
    ]);
    tests::sched::wait_host_up(&addr);
    let mut images = Vec::new();
    for (name, dir) in [("base", &python3), ("app", &app)] {
        let img = work.join(format!("{name}.erofs"));
        run(Command::new("mkfs.erofs").arg("--quiet").arg(&img).arg(dir))?;
        images.push(img);
    }
    let files = |i: usize| -> Result<[f64; 3]> {
        cold(
            &env,
            &format!("files{i}"),
            [
                DiskSource::File(images[0].clone()),
                DiskSource::File(images[1].clone()),
            ],
        )
    };
    let (mut cold_runs, mut warm_runs, mut peer) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        cold_runs.push(deploy_once(&addr, &work, &format!("cold{i}"))?);
        peer.push(files(i)?.iter().sum::<f64>());
        eprintln!(
            "bench-boot: cold deploy {}: {:.2} s (storage {:.3} s); plain QEMU {:.2} s",
            i + 1,
            cold_runs[i][4],
            cold_runs[i][0],
            peer[i]
        );
    }
    tests::sched::json(
        &addr,
        &[
            "pool",
            "create",
            "warm",
            "--image",
            "bench/app:1",
            "--min",
            "1",
            "--max",
            "1",
        ],
    );
    let warm_count = || tests::sched::json(&addr, &["pool", "ls"])[0]["warm"].as_u64();
    for i in 0..runs {
        tests::sched::wait_for(120, "a warm VM", || {
            if warm_count() == Some(1) {
                Ok(())
            } else {
                Err("none".into())
            }
        });
        // The pool's VM has booted and waits in init.
        std::thread::sleep(Duration::from_millis(200));
        warm_runs.push(deploy_once(&addr, &work, &format!("warm{i}"))?);
        eprintln!(
            "bench-boot: warm deploy {}: {:.2} s (storage {:.3} s)",
            i + 1,
            warm_runs[i][4],
            warm_runs[i][0]
        );
    }
    if as_json {
        println!(
            "{}",
            json!({"cold_deploy_s": cold_runs, "warm_deploy_s": warm_runs, "plain_qemu_s": peer})
        );
        return Ok(());
    }
    let p = |v: &[[f64; 5]], k: usize, q: f64| {
        percentile(&v.iter().map(|r| r[k]).collect::<Vec<_>>(), q)
    };
    let cells = |v: &[[f64; 5]], k: usize| format!("{:.3} / {:.3}", p(v, k, 0.5), p(v, k, 0.99));
    let rows = vec![
        vec![
            "cold deploy".to_string(),
            cells(&cold_runs, 0),
            cells(&cold_runs, 1),
            cells(&cold_runs, 2),
            cells(&cold_runs, 3),
            cells(&cold_runs, 4),
        ],
        vec![
            "warm deploy (conversion)".to_string(),
            cells(&warm_runs, 0),
            "-".into(),
            cells(&warm_runs, 2),
            cells(&warm_runs, 3),
            cells(&warm_runs, 4),
        ],
        vec![
            "plain QEMU, mkfs.erofs files".to_string(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            format!(
                "{:.3} / {:.3}",
                percentile(&peer, 0.5),
                percentile(&peer, 0.99)
            ),
        ],
    ];
    print!(
        "{}",
        render_table(
            &[
                &format!("{runs} runs, p50 / p99, seconds"),
                "storage",
                "VMM + kernel + init",
                "app",
                "sched + RPC",
                "deploy to answer",
            ],
            &rows
        )
    );
    let (c, w, f) = (
        p(&cold_runs, 4, 0.5),
        p(&warm_runs, 4, 0.5),
        percentile(&peer, 0.5),
    );
    println!(
        "storage p50 {:.1} ms (goal <= 20 ms); cold deploy / plain QEMU: {:.2}x (goal <= 1.1x); warm / cold: {:.2} (goal <= 0.20)",
        p(&cold_runs, 0, 0.5) * 1e3,
        c / f,
        w / c
    );
    drop(daemon);
    drop(sched);
    Ok(())
}

fn main() -> ExitCode {
    let mut runs = 10;
    let mut as_json = false;
    let mut deploy = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--json" => as_json = true,
            "--deploy" => deploy = true,
            "--runs" => match args.next().and_then(|v| v.parse().ok()).filter(|&n| n > 0) {
                Some(n) => runs = n,
                None => {
                    eprintln!("bench-boot: --runs needs a positive number\n\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            _ => {
                eprintln!("bench-boot: unexpected argument `{a}`\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let r = if deploy {
        bench_deploy(runs, as_json)
    } else {
        bench(runs, as_json)
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-boot: {e:#}");
            ExitCode::FAILURE
        }
    }
}
