//! `bench-deploy`: round-trip latency of `Scheduler.deploy` and `Scheduler.resolve` over
//! loopback TCP, against a `sched` daemon (the real server code, on its own thread and
//! state directory) with several fake hosts, printed beside a baseline measured on the
//! same connection in the same run: a bare `version()` round trip.
//!
//! Each deploy is a new one-service stack, so every call parses, places one instance,
//! has a host prepare it and writes a synced state batch. Resolve looks up a running
//! instance (no start).
//!
//! `bench-deploy [--hosts N] [--iterations N]`

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use schedd::testing::{self, FakeHost, HostConfig};

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

fn row(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<12} {:>6} {:>10.1} {:>10.1}",
        samples.len(),
        percentile(&samples, 0.50).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
    );
}

fn stack_file(i: usize) -> String {
    format!(
        "[stack]\nname = \"bench-{i}\"\n\n[services.web]\nimage = \"bench/web:1\"\n\n[services.web.resources]\nvcpus = 1\nmemory = \"64M\"\n"
    )
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let hosts = arg(&args, "--hosts", 4)?;
    let iterations = arg(&args, "--iterations", 200)?;
    let dir = std::env::temp_dir().join(format!("bench-deploy-{}", std::process::id()));
    let opts = schedd::server::Options {
        listen: "127.0.0.1:0".into(),
        data: dir.clone(),
        allow_remote: false,
        host_timeout: Duration::from_secs(30),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Err(e) = schedd::server::run(&opts, Some(tx)) {
            eprintln!("sched: {e:#}");
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .context("sched did not start")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let r = local.block_on(&rt, async {
        let layer = format!("sha256:{:064x}", 1);
        let mut fakes: Vec<FakeHost> = Vec::new();
        for h in 0..hosts {
            let mut cfg = HostConfig::new(&format!("host-{h}"));
            cfg.vcpus = 100_000;
            cfg.memory = 1 << 50;
            cfg.images = vec![(
                "bench/web:1".into(),
                format!("sha256:{:064x}", 2),
                vec![(layer.clone(), 50 << 20)],
            )];
            if h == 0 {
                cfg.layers = vec![(layer.clone(), 50 << 20)];
            }
            fakes.push(FakeHost::start(&addr, cfg).await?);
        }
        let s = schedd::net::connect(&addr).await?;
        testing::version(&s).await?;
        let mut base = Vec::new();
        for _ in 0..iterations {
            let t = Instant::now();
            testing::version(&s).await?;
            base.push(t.elapsed());
        }
        let mut deploys = Vec::new();
        for i in 0..iterations {
            let src = stack_file(i);
            let t = Instant::now();
            testing::deploy(&s, "bench.toml", &src, "", false, "").await?;
            deploys.push(t.elapsed());
        }
        let mut resolves = Vec::new();
        for i in 0..iterations {
            let name = format!("web.bench-{i}.tidedge.local");
            let t = Instant::now();
            testing::resolve(&s, &name).await?;
            resolves.push(t.elapsed());
        }
        println!(
            "sched over loopback TCP, {hosts} fake hosts, {iterations} calls each (microseconds)"
        );
        println!("{:<12} {:>6} {:>10} {:>10}", "call", "n", "p50", "p99");
        row("version()", base);
        row("deploy", deploys);
        row("resolve", resolves);
        let prepared: usize = fakes.iter().map(|f| f.prepared().len()).sum();
        println!("instances prepared on the fake hosts: {prepared}");
        anyhow::Ok(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    r
}
