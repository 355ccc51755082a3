//! `bench-deploy`: round-trip latency of `Scheduler.deploy` and `Scheduler.resolve` over
//! loopback TCP against a `sched` daemon (the real server code, on its own thread) with
//! several fake hosts, for both state backends in one run: a local state directory
//! and a three-member etcd cluster (Debian's `etcd`, started here on loopback). Beside
//! them, a bare `version()` round trip on the same connection. Then the failover time
//! of two `sched` processes on that etcd: the leader killed (SIGKILL) to the first
//! deploy that succeeds on the new leader, over `--trials` trials.
//!
//! Each deploy is a new one-service stack, so every call parses, places one instance,
//! has a host prepare it and makes its state durable (a synced batch, or an etcd
//! transaction). Resolve looks up a running instance (no start).
//!
//! `bench-deploy [--hosts N] [--iterations N] [--trials N]`

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use schedd::server::StateOptions;
use schedd::testing::{self, EtcdCluster, FakeHost, FollowingHost, HostConfig};

fn arg(args: &[String], name: &str, default: usize) -> Result<usize> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name}: not a number")),
        None => Ok(default),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn row(name: &str, backend: &str, unit: f64, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<12} {backend:<8} {:>6} {:>10.1} {:>10.1}",
        samples.len(),
        percentile(&samples, 0.50).as_secs_f64() * unit,
        percentile(&samples, 0.99).as_secs_f64() * unit,
    );
}

fn stack_file(name: &str) -> String {
    format!(
        "[stack]\nname = \"{name}\"\n\n[services.web]\nimage = \"bench/web:1\"\n\n[services.web.resources]\nvcpus = 1\nmemory = \"64M\"\n"
    )
}

fn host_config(h: usize) -> HostConfig {
    let layer = format!("sha256:{:064x}", 1);
    let mut cfg = HostConfig::new(&format!("host-{h}"));
    cfg.vcpus = 100_000;
    cfg.memory = 1 << 50;
    cfg.images = vec![(
        "bench/web:1".into(),
        format!("sha256:{:064x}", 2),
        vec![(layer.clone(), 50 << 20)],
    )];
    if h == 0 {
        cfg.layers = vec![(layer, 50 << 20)];
    }
    cfg
}

/// Starts the real server on a thread of its own; returns its address once it leads.
async fn serve(state: StateOptions) -> Result<String> {
    let opts = schedd::server::Options {
        listen: "127.0.0.1:0".into(),
        state,
        advertise: None,
        allow_remote: false,
        host_timeout: Duration::from_secs(30),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Err(e) = schedd::server::run(&opts, Some(tx)) {
            eprintln!("sched: {e:#}");
        }
    });
    let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
        .await?
        .context("sched did not start")?;
    let t = Instant::now();
    loop {
        let c = schedd::net::connect(&addr).await?;
        if schedclient::ask(&c).await?.leading {
            return Ok(addr);
        }
        if t.elapsed() > Duration::from_secs(20) {
            bail!("sched at {addr} did not become the leader");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// version, deploy and resolve latencies against the scheduler at `addr`.
async fn measure(
    addr: &str,
    hosts: usize,
    iterations: usize,
    tag: &str,
) -> Result<([Vec<Duration>; 3], Vec<FakeHost>)> {
    let mut fakes: Vec<FakeHost> = Vec::new();
    for h in 0..hosts {
        fakes.push(FakeHost::start(addr, host_config(h)).await?);
    }
    let s = schedd::net::connect(addr).await?;
    testing::version(&s).await?;
    let mut base = Vec::new();
    for _ in 0..iterations {
        let t = Instant::now();
        testing::version(&s).await?;
        base.push(t.elapsed());
    }
    let mut deploys = Vec::new();
    for i in 0..iterations {
        let src = stack_file(&format!("{tag}-{i}"));
        let t = Instant::now();
        testing::deploy(&s, "bench.toml", &src, "", false, "").await?;
        deploys.push(t.elapsed());
    }
    let mut resolves = Vec::new();
    for i in 0..iterations {
        let name = format!("web.{tag}-{i}.tidedge.local");
        let t = Instant::now();
        testing::resolve(&s, &name).await?;
        resolves.push(t.elapsed());
    }
    let prepared: usize = fakes.iter().map(|f| f.prepared().len()).sum();
    if prepared != iterations {
        bail!("{tag}: {prepared} instances prepared on the fake hosts, {iterations} deploys");
    }
    Ok(([base, deploys, resolves], fakes))
}

fn sched_process(dir: &Path, name: &str, etcd: &str) -> Result<(Child, String)> {
    let bin = std::env::current_exe()?.with_file_name("sched");
    let socket = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&socket);
    let child = Command::new(&bin)
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .args([
            "--etcd",
            etcd,
            "--etcd-prefix",
            "/failover/",
            "--host-timeout",
            "10s",
        ])
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("{} did not start", bin.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child, format!("unix:{}", socket.display())))
}

/// Deploys a new stack on whichever scheduler leads, retrying every 20 ms for up to
/// 30 s; returns the leader's address.
async fn deploy_on_leader(list: &[schedclient::Addr], n: &mut usize) -> Result<String> {
    let start = Instant::now();
    loop {
        *n += 1;
        let name = format!("f-{n}");
        let ok = async {
            let found = schedclient::find(list, false)
                .await
                .map_err(anyhow::Error::msg)?;
            testing::deploy(&found.client, "f.toml", &stack_file(&name), "", false, "").await?;
            anyhow::Ok(found.addr.to_string())
        }
        .await;
        match ok {
            Ok(a) => return Ok(a),
            Err(e) if start.elapsed() > Duration::from_secs(30) => {
                bail!("no deploy succeeded for 30 s: {e:#}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Leader killed → first successful deploy on the new one, `trials` times; the killed
/// one is started again (a follower) before the next trial.
async fn failover(dir: &Path, etcd: &str, trials: usize) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let mut procs = vec![
        sched_process(dir, "a", etcd)?,
        sched_process(dir, "b", etcd)?,
    ];
    let addrs = format!("{},{}", procs[0].1, procs[1].1);
    let list = schedclient::parse_list(&addrs).map_err(anyhow::Error::msg)?;
    let _host = FollowingHost::start(&addrs, host_config(0))?;
    let mut n = 0;
    let mut leader = deploy_on_leader(&list, &mut n).await?;
    let mut times = Vec::new();
    let mut elected = Vec::new();
    for _ in 0..trials {
        let i = procs
            .iter()
            .position(|p| p.1 == leader)
            .context("the leader")?;
        procs[i].0.kill()?;
        procs[i].0.wait()?;
        let t = Instant::now();
        loop {
            let mut leads = false;
            for a in &list {
                if let Ok((c, conn)) = schedclient::connect(a).await {
                    leads |= schedclient::ask(&c).await.is_ok_and(|x| x.leading);
                    conn.abort();
                }
            }
            if leads {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("no scheduler led within 30 s of the kill");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        elected.push(t.elapsed());
        leader = deploy_on_leader(&list, &mut n).await?;
        times.push(t.elapsed());
        procs[i] = sched_process(dir, if i == 0 { "a" } else { "b" }, etcd)?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for p in &mut procs {
        let _ = p.0.kill();
        let _ = p.0.wait();
    }
    Ok((elected, times))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let hosts = arg(&args, "--hosts", 4)?;
    let iterations = arg(&args, "--iterations", 200)?;
    let trials = arg(&args, "--trials", 20)?;
    let dir = std::env::temp_dir().join(format!("bench-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let r = local.block_on(&rt, async {
        let etcd = EtcdCluster::start(&dir.join("etcd"), 3).await?;
        let local_addr = serve(StateOptions::Local(dir.join("local"))).await?;
        let ([lb, ld, lr], _local_hosts) = measure(&local_addr, hosts, iterations, "local").await?;
        let etcd_addr = serve(StateOptions::Etcd(schedd::etcd::EtcdOptions {
            endpoints: etcd.endpoints(),
            prefix: "/bench/".into(),
            lease: Duration::from_secs(2),
        }))
        .await?;
        let ([eb, ed, er], _etcd_hosts) = measure(&etcd_addr, hosts, iterations, "etcd").await?;
        // The floor under an etcd deploy: one bare 2 KiB put (a Raft commit, every
        // member's fsync), as the deploy's transaction is one.
        let mut c = etcd.client().await?;
        let value = vec![b'x'; 2048];
        let mut puts = Vec::new();
        for i in 0..iterations {
            let t = Instant::now();
            c.put(format!("/bare/{i}"), value.clone(), None).await?;
            puts.push(t.elapsed());
        }
        let (el, fo) = failover(&dir, &etcd.endpoints_arg(), trials).await?;
        println!(
            "sched over loopback TCP, {hosts} fake hosts, {iterations} calls each; etcd: 3 members on loopback"
        );
        println!(
            "{:<12} {:<8} {:>6} {:>10} {:>10}",
            "call", "state", "n", "p50 us", "p99 us"
        );
        row("version()", "local", 1e6, lb);
        row("deploy", "local", 1e6, ld);
        row("resolve", "local", 1e6, lr);
        row("version()", "etcd", 1e6, eb);
        row("deploy", "etcd", 1e6, ed);
        row("resolve", "etcd", 1e6, er);
        row("bare put", "etcd", 1e6, puts);
        println!(
            "{:<12} {:<8} {:>6} {:>10} {:>10}",
            "", "", "", "p50 ms", "p99 ms"
        );
        row("elected", "etcd", 1e3, el);
        row("failover", "etcd", 1e3, fo);
        println!("from the leader's SIGKILL (lease 2 s): elected = another scheduler answers that it leads; failover = the first deploy it answers");
        anyhow::Ok(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    r
}
