//! The link to the scheduler, on a thread of its own (capnp-rpc is single-threaded): it
//! connects, watches routes (`Scheduler.watchRoutes`, a pushed table, no polling),
//! stores each table it is sent where the proxy reads it, and runs `resolve` calls for
//! the proxy (scale from zero). Given several schedulers (etcd-backed, one leads) it
//! connects to the leader; while none leads it takes a follower's table (a follower's
//! view is fed by its etcd watch) and moves to the leader once one is elected. When the
//! scheduler goes away the last table stays in use and the link reconnects (0.2 s,
//! doubling to 2 s).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use capnp::capability::Rc as CapRc;
use schema::sched_capnp::{route_watcher, scheduler};
use tokio::sync::{mpsc, oneshot};

use crate::log;
use crate::table::{Table, text};

/// The schedulers to try (`ADDR[,ADDR...]`, see `schedclient`).
pub type Addrs = Vec<schedclient::Addr>;

/// The table and the number of the connection it came from.
type Slot = Arc<RwLock<(u64, Arc<Table>)>>;

/// The instance a `resolve` answered with.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub id: String,
    pub endpoint: String,
    pub started: bool,
}

/// One service's load over a report interval (see `Scheduler.reportLoad`).
#[derive(Debug, Clone, PartialEq)]
pub struct Load {
    pub key: String,
    pub concurrency: f64,
    pub requests: u64,
}

/// One load report: the services' loads, the route table version they were routed by
/// and the instances with requests in flight (for the scheduler's scale-in drain).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub loads: Vec<Load>,
    pub table_version: u64,
    pub busy: Vec<String>,
}

/// A request to the link thread.
#[derive(Debug)]
enum Cmd {
    Resolve(String, oneshot::Sender<Result<Resolved, String>>),
    Report(Report),
}

/// The proxy's side of the link: the table and a way to ask the scheduler.
#[derive(Debug, Clone)]
pub struct Link {
    table: Slot,
    cmds: mpsc::UnboundedSender<Cmd>,
}

/// How this front end names itself in its load reports.
fn front_end_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("tide-gateway/{}@{}", std::process::id(), host.trim())
}

impl Link {
    /// Starts the link thread for the schedulers at `addr`.
    pub fn start(addr: Addrs) -> Link {
        let table = Arc::new(RwLock::new((0, Arc::new(Table::default()))));
        let (tx, rx) = mpsc::unbounded_channel();
        let t = table.clone();
        std::thread::Builder::new()
            .name("sched-link".into())
            .spawn(move || run(addr, t, rx))
            .expect("spawn the scheduler link thread");
        Link { table, cmds: tx }
    }

    /// The newest table received (empty until the first arrives).
    pub fn table(&self) -> Arc<Table> {
        self.table.read().expect("table lock").1.clone()
    }

    /// Sends this front end's load to the scheduler's autoscaler (dropped while the
    /// scheduler is away: a report is only worth its interval).
    pub fn report(&self, r: Report) {
        let _ = self.cmds.send(Cmd::Report(r));
    }

    /// `Scheduler.resolve(hostname)`: the instance serving it, started if none runs.
    pub async fn resolve(&self, hostname: &str) -> Result<Resolved, String> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Resolve(hostname.to_owned(), tx))
            .map_err(|_| "the scheduler link stopped".to_string())?;
        rx.await
            .map_err(|_| "the scheduler link stopped".to_string())?
    }
}

struct Watcher(Slot, u64);

impl route_watcher::Server for Watcher {
    async fn update(
        self: CapRc<Self>,
        params: route_watcher::UpdateParams,
        _: route_watcher::UpdateResults,
    ) -> Result<(), capnp::Error> {
        let t = Table::read(params.get()?.get_table()?)?;
        store(&self.0, self.1, t);
        Ok(())
    }
}

/// Keeps `t` (of connection `session`) unless it is older than the table held: within
/// a session pushes and the watch call's answer may cross; a newer session's table
/// always wins (a restarted scheduler numbers its tables from 1 again).
fn store(slot: &Slot, session: u64, t: Table) {
    let mut cur = slot.write().expect("table lock");
    if session > cur.0 || t.version >= cur.1.version {
        *cur = (session, Arc::new(t));
    }
}

fn run(addr: Addrs, table: Slot, mut rx: mpsc::UnboundedReceiver<Cmd>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("link runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let name = front_end_name();
        let mut backoff = Duration::from_millis(200);
        for n in 1.. {
            match session(&addr, &table, n, &name, &mut rx).await {
                Ok(()) => return, // the proxy is gone
                Err(e) => log!("scheduler link: {e:#}; retrying in {backoff:?}"),
            }
            // Requests that arrive while the scheduler is away fail at once.
            let sleep = tokio::time::sleep(backoff);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    c = rx.recv() => match c {
                        None => return,
                        Some(Cmd::Resolve(_, reply)) => {
                            let _ = reply.send(Err("the scheduler is unreachable".into()));
                        }
                        Some(Cmd::Report(_)) => {}
                    },
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    });
}

/// One connection: watch, then serve commands until the connection ends (an error) or
/// the proxy drops its side (Ok).
async fn session(
    addr: &Addrs,
    table: &Slot,
    session: u64,
    name: &str,
    rx: &mut mpsc::UnboundedReceiver<Cmd>,
) -> Result<()> {
    let found = schedclient::find(addr, true)
        .await
        .map_err(anyhow::Error::msg)?;
    let (client, mut conn) = (found.client, found.connection);
    let leading = found.leading;
    let mut req = client.watch_routes_request();
    req.get()
        .set_watcher(capnp_rpc::new_client(Watcher(table.clone(), session)));
    let reply = tokio::select! {
        r = req.send().promise => r.context("watchRoutes")?,
        r = &mut conn => bail!("connection closed: {r:?}"),
    };
    let t = Table::read(reply.get()?.get_table()?)?;
    log!(
        "scheduler link up ({}{}): {} names, table version {}",
        found.addr,
        if leading { "" } else { ", a follower" },
        t.names.len(),
        t.version
    );
    store(table, session, t);
    // On a follower, check for an elected leader twice a second and move to it: the
    // follower leads now, or names a leader other than the one it named at connect
    // (which `find` could not reach: a dead leader whose lease has not lapsed yet).
    let named = if leading {
        String::new()
    } else {
        schedclient::ask(&client)
            .await
            .map(|a| a.leader)
            .unwrap_or_default()
    };
    let mut check = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = check.tick(), if !leading => {
                if let Ok(a) = schedclient::ask(&client).await
                    && (a.leading || (!a.leader.is_empty() && a.leader != named))
                {
                    conn.abort();
                    bail!("a leader is elected ({}): moving to it", a.leader);
                }
            }
            r = &mut conn => bail!("connection closed: {}", match r {
                Ok(Ok(())) => "by the scheduler".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            }),
            c = rx.recv() => match c {
                None => return Ok(()),
                Some(Cmd::Resolve(host, reply)) => {
                    let client = client.clone();
                    tokio::task::spawn_local(async move {
                        let _ = reply.send(resolve(&client, &host).await.map_err(|e| reason(&e)));
                    });
                }
                Some(Cmd::Report(r)) => {
                    let mut req = client.report_load_request();
                    let mut p = req.get();
                    p.set_front_end(name);
                    p.set_table_version(r.table_version);
                    let mut b = p.reborrow().init_busy(r.busy.len() as u32);
                    for (i, id) in r.busy.iter().enumerate() {
                        b.set(i as u32, id);
                    }
                    let mut l = p.init_loads(r.loads.len() as u32);
                    for (i, x) in r.loads.iter().enumerate() {
                        let mut e = l.reborrow().get(i as u32);
                        e.set_key(&x.key);
                        e.set_concurrency(x.concurrency);
                        e.set_requests(x.requests);
                    }
                    tokio::task::spawn_local(async move {
                        if let Err(e) = req.send().promise.await {
                            log!("load report: {}", reason(&e));
                        }
                    });
                }
            },
        }
    }
}

async fn resolve(client: &scheduler::Client, host: &str) -> capnp::Result<Resolved> {
    let mut req = client.resolve_request();
    req.get().set_hostname(host);
    let reply = req.send().promise.await?;
    let r = reply.get()?.get_route()?;
    let i = r.get_instance()?;
    Ok(Resolved {
        id: text(i.get_id())?,
        endpoint: text(i.get_endpoint())?,
        started: r.get_started(),
    })
}

/// A scheduler error without capnp's prefix ("remote exception: ...").
fn reason(e: &capnp::Error) -> String {
    let s = e.extra.as_str();
    s.strip_prefix("remote exception: ").unwrap_or(s).to_owned()
}
