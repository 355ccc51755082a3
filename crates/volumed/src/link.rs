//! The link to a scheduler (`--scheduler ADDR`): connect, `Scheduler.register` with a
//! `Host` capability served on the same connection, then heartbeat with the current
//! inventory. When the scheduler goes away (connection closed, a call failing or timing
//! out), reconnect with backoff and register again. The link is one task on the RPC
//! loop: a failing scheduler is logged and retried, never fatal to the daemon.

use std::sync::Arc;
use std::time::Duration;

use capnp_rpc::{RpcSystem, rpc_twoparty_capnp, twoparty};
use futures::AsyncReadExt;
use schema::sched_capnp::{host, scheduler};

use crate::host::Host;
use crate::host_rpc::{HostImpl, set_inventory, store_inventory};
use crate::log;
use crate::volume_rpc::Endpoints;

/// First wait before reconnecting; doubled after each failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Heartbeat interval when neither `--heartbeat-ms` nor the scheduler says.
pub(crate) const DEFAULT_HEARTBEAT_MS: u32 = 2000;
/// A register or heartbeat call unanswered this long counts as a scheduler gone.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the scheduler listens: `HOST:PORT` or `unix:/path`.
#[derive(Debug, Clone)]
pub(crate) enum Addr {
    Tcp(String),
    Unix(std::path::PathBuf),
}

impl Addr {
    pub(crate) fn parse(s: &str) -> Result<Addr, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("--scheduler unix: needs a socket path (unix:/path)".into());
            }
            return Ok(Addr::Unix(p.into()));
        }
        match s.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(Addr::Tcp(s.into())),
            _ => Err(format!(
                "--scheduler {s:?}: expected HOST:PORT or unix:/path"
            )),
        }
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Tcp(a) => f.write_str(a),
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Runs the link for the life of the daemon.
pub(crate) async fn run(
    host: Arc<Host>,
    endpoints: Endpoints,
    addr: Addr,
    heartbeat_ms: Option<u32>,
) {
    let mut backoff = MIN_BACKOFF;
    // The same failure over and over (a scheduler down for an hour) is logged when it
    // starts and then once a minute or so, not at every attempt.
    let mut last = String::new();
    let mut repeats = 0u32;
    loop {
        let e = session(&host, &endpoints, &addr, heartbeat_ms, &mut backoff).await;
        if e == last {
            repeats += 1;
        } else {
            repeats = 0;
        }
        if repeats.is_multiple_of(12) {
            let again = if repeats > 0 {
                format!(" ({} attempts)", repeats + 1)
            } else {
                String::new()
            };
            log!(
                "scheduler {addr}: {e}{again}; reconnecting in {} ms",
                backoff.as_millis()
            );
        }
        last = e;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn rpc_system(
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
) -> RpcSystem<rpc_twoparty_capnp::Side> {
    let (reader, writer) = tokio_util::compat::TokioAsyncReadCompatExt::compat(stream).split();
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(reader),
        futures::io::BufWriter::new(writer),
        rpc_twoparty_capnp::Side::Client,
        Default::default(),
    );
    RpcSystem::new(Box::new(network), None)
}

async fn call<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, capnp::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(format!("{what} failed: {e}")),
        Err(_) => Err(format!(
            "{what} unanswered for {} s",
            CALL_TIMEOUT.as_secs()
        )),
    }
}

/// One connection: returns why it ended.
async fn session(
    host: &Arc<Host>,
    endpoints: &Endpoints,
    addr: &Addr,
    heartbeat_ms: Option<u32>,
    backoff: &mut Duration,
) -> String {
    let mut rpc = match addr {
        Addr::Tcp(a) => match tokio::net::TcpStream::connect(a).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                rpc_system(s)
            }
            Err(e) => return format!("cannot connect: {e}"),
        },
        Addr::Unix(p) => match tokio::net::UnixStream::connect(p).await {
            Ok(s) => rpc_system(s),
            Err(e) => return format!("cannot connect: {e}"),
        },
    };
    let scheduler: scheduler::Client = rpc.bootstrap(rpc_twoparty_capnp::Side::Server);
    let mut conn = tokio::task::spawn_local(rpc);
    let why = tokio::select! {
        r = registered(host, endpoints, addr, heartbeat_ms, backoff, &scheduler) => match r {
            Ok(never) => match never {},
            Err(e) => e,
        },
        r = &mut conn => match r {
            Ok(Ok(())) => "connection closed".to_string(),
            Ok(Err(e)) => format!("connection lost: {e}"),
            Err(e) => format!("connection task failed: {e}"),
        },
    };
    conn.abort();
    why
}

/// Registers and heartbeats until something fails.
async fn registered(
    host: &Arc<Host>,
    endpoints: &Endpoints,
    addr: &Addr,
    heartbeat_ms: Option<u32>,
    backoff: &mut Duration,
    scheduler: &scheduler::Client,
) -> Result<std::convert::Infallible, String> {
    let me: host::Client = capnp_rpc::new_client(HostImpl {
        host: host.clone(),
        endpoints: endpoints.clone(),
    });
    let inv = call("inventory", store_inventory(host)).await?;
    let mut req = scheduler.register_request();
    req.get().set_host(me);
    set_inventory(req.get().init_inventory(), host, &inv);
    let reply = call("register", req.send().promise).await?;
    let session = reply
        .get()
        .and_then(|r| r.get_session())
        .map_err(|e| format!("register: {e}"))?;
    log!(
        "registered with scheduler {addr} as host {} ({} layers, {} images)",
        host.config.host_id,
        inv.layers.len(),
        inv.images.len()
    );
    *backoff = MIN_BACKOFF;
    let mut last_change = inv.change;
    loop {
        // A heartbeat right away tells us the scheduler's interval.
        let inv = call("inventory", store_inventory(host)).await?;
        if inv.change != last_change {
            log!(
                "inventory changed: {} layers, {} images",
                inv.layers.len(),
                inv.images.len()
            );
            last_change = inv.change;
        }
        let h = host.clone();
        let (instances, _) = crate::server::blocking(move || Ok(h.list()))
            .await
            .map_err(|e| format!("listing instances: {e}"))?;
        let mut req = session.heartbeat_request();
        set_inventory(req.get().init_inventory(), host, &inv);
        let with_guest: Vec<_> = instances.iter().filter(|r| r.status.is_some()).collect();
        let mut guests = req.get().init_guests(with_guest.len() as u32);
        for (i, r) in with_guest.iter().enumerate() {
            let mut g = guests.reborrow().get(i as u32);
            g.set_instance(&r.instance);
            if let Some(s) = &r.status {
                crate::host_rpc::set_guest(g.init_guest(), s);
            }
        }
        let reply = call("heartbeat", req.send().promise).await?;
        let asked = reply
            .get()
            .map_err(|e| format!("heartbeat: {e}"))?
            .get_interval_ms();
        let ms = match (heartbeat_ms, asked) {
            (Some(ms), _) => ms,
            (None, 0) => DEFAULT_HEARTBEAT_MS,
            (None, ms) => ms,
        };
        // A guest's change (started, exited, failed) is reported at once.
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(u64::from(ms.max(10)))) => {}
            () = host.changed.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_addresses() {
        assert!(
            matches!(Addr::parse("sched.local:7000"), Ok(Addr::Tcp(a)) if a == "sched.local:7000")
        );
        assert!(matches!(Addr::parse("[::1]:7000"), Ok(Addr::Tcp(_))));
        assert!(
            matches!(Addr::parse("unix:/run/sched.sock"), Ok(Addr::Unix(p)) if p == std::path::Path::new("/run/sched.sock"))
        );
        for bad in ["sched", "sched:", ":7000", "sched:99999", "unix:"] {
            assert!(Addr::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Addr::parse("unix:/a").unwrap().to_string(), "unix:/a");
    }
}
