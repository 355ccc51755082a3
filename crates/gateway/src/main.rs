//! `tide-gateway`: the HTTP front end (see the crate doc).

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use gateway::link::Link;
use gateway::log;
use gateway::proxy::{Config, Gateway};
use gateway::server::{self, Limits};
use gateway::tls;
use std::sync::Arc;
use tokio::signal::unix::{SignalKind, signal};

/// Routes HTTP requests by Host to the instances the scheduler placed.
#[derive(Debug, Parser)]
#[command(name = "tide-gateway", version)]
struct Args {
    /// The scheduler: HOST:PORT or unix:/path; several schedulers sharing etcd as a
    /// comma-separated list (routes from any, starts and load reports to the leader).
    #[arg(long, env = "TIDE_SCHEDULER", value_name = "ADDR[,ADDR...]")]
    scheduler: String,
    /// Where to serve HTTP/1.1 and h2c.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Where to serve HTTPS (HTTP/1.1 and h2 by ALPN); needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_listen: Option<String>,
    /// A PEM file with a certificate chain and its key (or the key in FILE.key), or a
    /// directory of them; each serves the DNS names its certificate lists, wildcards
    /// included. Repeatable. Re-read on SIGHUP.
    #[arg(long = "tls-cert", value_name = "PATH", requires = "tls_listen")]
    tls_cert: Vec<std::path::PathBuf>,
    /// Where to serve GET /metrics (Prometheus text); none if not given.
    #[arg(long)]
    metrics: Option<String>,
    /// Largest request head (request line + headers), bytes (at least 8192).
    #[arg(long, default_value_t = 64 << 10, value_parser = clap::value_parser!(u64).range(8192..=(16 << 20)))]
    max_header_bytes: u64,
    /// Largest request body, bytes.
    #[arg(long, default_value_t = 10 << 20)]
    max_body_bytes: u64,
    /// Seconds a client may take to send a request head.
    #[arg(long, default_value_t = 10)]
    header_timeout: u64,
    /// Seconds a request waits for a service to start from zero (then 504).
    #[arg(long, default_value_t = 120)]
    start_timeout: u64,
    /// Requests that may wait for one service's start (more get 503).
    #[arg(long, default_value_t = 1000)]
    queue: usize,
    /// Seconds an instance may take to send its response head (then 504).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// NAME=HOST:PORT: route a host name to a fixed backend outside the scheduler (a
    /// service not on Tidedge yet); looked up before the scheduler's names. Repeatable.
    #[arg(long = "route", value_name = "NAME=HOST:PORT", value_parser = parse_route)]
    routes: Vec<(String, String)>,
    /// Worker threads, each with a runtime and a connection pool of its own, accepting
    /// on the one listener (default: one per CPU).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: Option<u16>,
}

fn parse_route(s: &str) -> Result<(String, String), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=HOST:PORT"))?;
    let name = gateway::table::normalize(name);
    if name.is_empty() {
        return Err(format!("{s:?}: the name is empty"));
    }
    addr.parse::<std::net::SocketAddr>()
        .map_err(|e| format!("{s:?}: {addr:?} is not HOST:PORT ({e})"))?;
    Ok((name, addr.to_owned()))
}

fn main() -> Result<()> {
    let a = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let l = server::bind_shared(resolve(&a.listen, "--listen").await?, "--listen")?;
        let tls = match &a.tls_listen {
            Some(addr) => {
                let at = resolve(addr, "--tls-listen").await?;
                let provider = tls::provider();
                let certs = load_certs(&a.tls_cert, &provider).context("--tls-cert")?;
                let resolver = tls::Resolver::new(certs);
                let cfg = tls::server_config(resolver.clone(), provider.clone())?;
                Some((
                    server::bind_shared(at, "--tls-listen")?,
                    cfg,
                    resolver,
                    provider,
                ))
            }
            None => None,
        };
        let m = match &a.metrics {
            Some(addr) => Some(server::bind(addr, "--metrics").await?),
            None => None,
        };
        let addrs = schedclient::parse_list(&a.scheduler)
            .map_err(|e| anyhow::anyhow!("--scheduler: {e}"))?;
        let link = Link::start(addrs);
        let gw = Gateway::new(
            link,
            Config {
                max_body: a.max_body_bytes,
                start_timeout: Duration::from_secs(a.start_timeout),
                queue: a.queue,
                timeout: Duration::from_secs(a.timeout),
                static_routes: a.routes.iter().cloned().collect(),
            },
        );
        log!(
            "serving on {}{}{} (pid {})",
            l.local_addr()?,
            tls.as_ref()
                .and_then(|t| t.0.local_addr().ok())
                .map(|a| format!(", tls on {a}"))
                .unwrap_or_default(),
            m.as_ref()
                .and_then(|m| m.local_addr().ok())
                .map(|a| format!(", metrics on {a}"))
                .unwrap_or_default(),
            std::process::id()
        );
        tokio::spawn(gw.clone().report_loads());
        if let Some(m) = m {
            tokio::spawn(server::serve_metrics(m, gw.clone()));
        }
        let limits = Limits {
            max_header: a.max_header_bytes as usize,
            header_timeout: Duration::from_secs(a.header_timeout),
        };
        let workers = a.workers.map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get()),
            usize::from,
        );
        // One socket per worker on the same address (SO_REUSEPORT): the kernel spreads
        // connections across them, none waits behind another worker's accept.
        let mut socks = per_worker(l, workers, "--listen", None)?;
        if let Some((tl, cfg, resolver, provider)) = tls {
            socks.extend(per_worker(tl, workers, "--tls-listen", Some(cfg))?);
            tokio::spawn(reload_on_sighup(a.tls_cert.clone(), resolver, provider));
        }
        for (i, (l, tls)) in socks.into_iter().enumerate() {
            let (gw, limits) = (gw.clone(), limits.clone());
            let name = format!(
                "worker-{}{}",
                i % workers,
                if tls.is_some() { "-tls" } else { "" }
            );
            std::thread::Builder::new()
                .name(name)
                .spawn(move || -> Result<()> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async move {
                        let l = tokio::net::TcpListener::from_std(l)?;
                        server::serve(l, gw, limits, tls).await;
                        Ok(())
                    })
                })?;
        }
        tokio::signal::ctrl_c().await?;
        log!("SIGINT: shutting down");
        Ok(())
    })
}

/// The first address `addr` (HOST:PORT) resolves to, the flag named in the error.
async fn resolve(addr: &str, flag: &str) -> Result<std::net::SocketAddr> {
    tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("{flag} {addr}"))?
        .next()
        .with_context(|| format!("{flag} {addr}: no address"))
}

/// Loads the certificates under `paths`, logging what each serves.
fn load_certs(
    paths: &[std::path::PathBuf],
    provider: &rustls::crypto::CryptoProvider,
) -> Result<tls::Certs> {
    let certs = tls::Certs::load(paths, provider)?;
    for line in &certs.summary {
        log!("certificate {line}");
    }
    Ok(certs)
}

type Tls = Option<Arc<rustls::ServerConfig>>;

/// `l` and `workers - 1` more sockets bound to its address, each for a worker thread.
fn per_worker(
    l: tokio::net::TcpListener,
    workers: usize,
    what: &str,
    tls: Tls,
) -> Result<Vec<(std::net::TcpListener, Tls)>> {
    let at = l.local_addr()?;
    let mut socks = vec![(l.into_std()?, tls.clone())];
    for _ in 1..workers {
        socks.push((server::bind_shared(at, what)?.into_std()?, tls.clone()));
    }
    Ok(socks)
}

/// Re-reads the certificates on each SIGHUP. A set that fails to load (a file half
/// written, a key that does not match) is logged and the old set keeps serving.
async fn reload_on_sighup(
    paths: Vec<std::path::PathBuf>,
    resolver: Arc<tls::Resolver>,
    provider: Arc<rustls::crypto::CryptoProvider>,
) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        log!("SIGHUP: cannot install the handler; certificates load only at start");
        return;
    };
    while hup.recv().await.is_some() {
        match load_certs(&paths, &provider) {
            Ok(certs) => {
                log!("SIGHUP: {} certificates reloaded", certs.summary.len());
                resolver.replace(certs);
            }
            Err(e) => log!("SIGHUP: keeping the old certificates: {e:#}"),
        }
    }
}
