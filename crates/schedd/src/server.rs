//! Running the daemon: open the state, listen, serve each connection with its own
//! `RpcSystem` on one `LocalSet` (capnp-rpc is single-threaded), watch heartbeats.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use castore::Kv;
use tokio::signal::unix::{SignalKind, signal};

use crate::daemon::{self, Daemon, Shared};
use crate::log;
use crate::net::{Addr, check_listen, parse_addr, rpc_system};
use crate::rpc::SchedulerImpl;

/// What `sched` is started with.
#[derive(Debug, Clone)]
pub struct Options {
    /// `HOST:PORT` or `unix:/path`.
    pub listen: String,
    /// The data directory (state in DATA/state).
    pub data: PathBuf,
    pub allow_remote: bool,
    pub host_timeout: Duration,
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

/// Runs the daemon until SIGTERM or SIGINT. `ready` receives the address actually
/// bound (a TCP port 0 becomes the port picked) once connections are accepted.
pub fn run(opts: &Options, ready: Option<std::sync::mpsc::Sender<String>>) -> Result<()> {
    let addr = parse_addr(&opts.listen).context("--listen")?;
    check_listen(&addr, opts.allow_remote)?;
    std::fs::create_dir_all(&opts.data)
        .with_context(|| format!("creating {}", opts.data.display()))?;
    let kv = Kv::open(opts.data.join("state"))
        .with_context(|| format!("opening {}", opts.data.join("state").display()))?;
    let daemon = Daemon::load(kv).context("loading the scheduler state")?;
    let sh = Shared::new(daemon, opts.host_timeout);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = match &addr {
            Addr::Tcp(a) => Listener::Tcp(
                tokio::net::TcpListener::bind(a)
                    .await
                    .with_context(|| format!("binding {a}"))?,
            ),
            Addr::Unix(p) => {
                if p.exists() {
                    if std::os::unix::net::UnixStream::connect(p).is_ok() {
                        bail!("socket {} is served by another process", p.display());
                    }
                    std::fs::remove_file(p)
                        .with_context(|| format!("removing stale socket {}", p.display()))?;
                }
                Listener::Unix(
                    tokio::net::UnixListener::bind(p)
                        .with_context(|| format!("binding {}", p.display()))?,
                    p.clone(),
                )
            }
        };
        let bound = match &listener {
            Listener::Tcp(l) => l.local_addr()?.to_string(),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        };
        let bootstrap: schema::sched_capnp::scheduler::Client =
            capnp_rpc::new_client(SchedulerImpl(sh.clone()));
        tokio::task::spawn_local(daemon::monitor(sh.clone()));
        tokio::task::spawn_local(crate::routes::push(sh.clone()));
        tokio::task::spawn_local(crate::autoscale::run(sh.clone()));
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        log!(
            "serving {} on {bound} (pid {}, host timeout {:?})",
            opts.data.display(),
            std::process::id(),
            opts.host_timeout
        );
        if let Some(tx) = ready {
            let _ = tx.send(bound);
        }
        loop {
            let rpc = tokio::select! {
                _ = term.recv() => { log!("SIGTERM: shutting down"); break; }
                _ = int.recv() => { log!("SIGINT: shutting down"); break; }
                r = accept(&listener, &bootstrap) => match r {
                    Ok(rpc) => rpc,
                    Err(e) => { log!("accept: {e}"); continue; }
                },
            };
            tokio::task::spawn_local(async move {
                // A bad message or a vanished peer ends this connection only.
                if let Err(e) = rpc.await {
                    log!("connection closed: {e}");
                }
            });
        }
        if let Listener::Unix(_, p) = &listener {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    })
}

async fn accept(
    l: &Listener,
    bootstrap: &schema::sched_capnp::scheduler::Client,
) -> std::io::Result<capnp_rpc::RpcSystem<capnp_rpc::rpc_twoparty_capnp::Side>> {
    let client = Some(bootstrap.clone().client);
    Ok(match l {
        Listener::Tcp(l) => {
            let (s, _) = l.accept().await?;
            s.set_nodelay(true)?;
            rpc_system(s, client)
        }
        Listener::Unix(l, _) => {
            let (s, _) = l.accept().await?;
            rpc_system(s, client)
        }
    })
}
