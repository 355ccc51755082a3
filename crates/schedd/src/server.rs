//! Running the daemon: open the state, listen, serve each connection with its own
//! `RpcSystem` on one `LocalSet` (capnp-rpc is single-threaded), watch heartbeats; with
//! etcd, campaign for leadership (see [`crate::etcd`]).

use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use castore::Kv;
use tokio::signal::unix::{SignalKind, signal};

use crate::daemon::{self, Daemon, Role, Shared};
use crate::etcd::{Etcd, EtcdOptions};
use crate::log;
use crate::net::{Addr, check_listen, parse_addr, rpc_system};
use crate::rpc::SchedulerImpl;
use crate::store::Store;

/// Where the state lives.
#[derive(Debug, Clone)]
pub enum StateOptions {
    /// A data directory (state in DATA/state): one scheduler.
    Local(PathBuf),
    /// An etcd cluster several schedulers share.
    Etcd(EtcdOptions),
}

/// What `sched` is started with.
#[derive(Debug, Clone)]
pub struct Options {
    /// `HOST:PORT` or `unix:/path`.
    pub listen: String,
    pub state: StateOptions,
    /// The address clients are sent to when this scheduler leads (default: the address
    /// bound).
    pub advertise: Option<String>,
    pub allow_remote: bool,
    pub host_timeout: Duration,
}

/// Opens the state: the daemon's view, the role it starts in, and the etcd link.
async fn open(opts: &Options) -> Result<(Daemon, Role, Option<Rc<Etcd>>)> {
    let changed = Rc::new(tokio::sync::Notify::new());
    match &opts.state {
        StateOptions::Local(data) => {
            std::fs::create_dir_all(data)
                .with_context(|| format!("creating {}", data.display()))?;
            let kv = Kv::open(data.join("state"))
                .with_context(|| format!("opening {}", data.join("state").display()))?;
            let records = Store::load_local(&kv).context("reading the scheduler state")?;
            let d = Daemon::load(Rc::new(Store::Local(kv)), &records, changed)
                .context("loading the scheduler state")?;
            Ok((d, Role::Local, None))
        }
        StateOptions::Etcd(eo) => {
            let (etcd, loaded) = Etcd::connect(eo.clone()).await?;
            let store = Rc::new(Store::Etcd(etcd.writer.clone()));
            let mut d = Daemon::load(store, &loaded.records, changed)
                .context("loading the scheduler state from etcd")?;
            d.set_follower(true);
            let leader = loaded.leader.map(|l| l.0).unwrap_or_default();
            Ok((d, Role::Follower { leader }, Some(Rc::new(etcd))))
        }
    }
}

fn describe(s: &StateOptions) -> String {
    match s {
        StateOptions::Local(d) => d.display().to_string(),
        StateOptions::Etcd(e) => format!("etcd {} under {}", e.endpoints.join(","), e.prefix),
    }
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let (daemon, role, etcd) = open(opts).await?;
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
        let advertise = opts.advertise.clone().unwrap_or_else(|| bound.clone());
        let sh = Shared::new(daemon, opts.host_timeout, role, advertise);
        if let Some(etcd) = etcd {
            tokio::task::spawn_local(etcd.writer.clone().run());
            tokio::task::spawn_local(crate::etcd::run(sh.clone(), etcd));
        }
        let bootstrap: schema::sched_capnp::scheduler::Client =
            capnp_rpc::new_client(SchedulerImpl(sh.clone()));
        tokio::task::spawn_local(daemon::monitor(sh.clone()));
        tokio::task::spawn_local(crate::routes::push(sh.clone()));
        tokio::task::spawn_local(crate::autoscale::run(sh.clone()));
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        log!(
            "serving {} on {bound} (pid {}, host timeout {:?})",
            describe(&opts.state),
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
