//! The link to a scheduler (`--scheduler ADDR[,ADDR...]`): find the one that leads
//! (`schedclient::find`), `Scheduler.register` with a `Host` capability served on the
//! same connection, then heartbeat with the current inventory. When the scheduler goes
//! away or stops leading (connection closed, a call failing or timing out, a heartbeat
//! refused by a follower), find the leader again with backoff and register again. The
//! link is one task on the RPC loop: a failing scheduler is logged and retried, never
//! fatal to the daemon.

use std::sync::Arc;
use std::time::Duration;

use schema::sched_capnp::{host, scheduler};

use crate::host::Host;
use crate::host_rpc::{HostImpl, set_inventory, store_inventory};
use crate::log;
use crate::volume_rpc::Endpoints;

/// First wait before reconnecting; doubled after each failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The longest wait with several schedulers: a leader is elected within a lease or
/// two, and hosts should be back with it within a second of that.
const MAX_BACKOFF_HA: Duration = Duration::from_secs(1);
/// Heartbeat interval when neither `--heartbeat-ms` nor the scheduler says.
pub(crate) const DEFAULT_HEARTBEAT_MS: u32 = 2000;
/// A register or heartbeat call unanswered this long counts as a scheduler gone.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// With several schedulers, a heartbeat unanswered this long counts as a leader gone
/// (paused, or cut off from the host while another one takes over): the host looks
/// for the leader again instead of waiting out [`CALL_TIMEOUT`].
const HEARTBEAT_TIMEOUT_HA: Duration = Duration::from_secs(3);

/// Runs the link for the life of the daemon.
pub(crate) async fn run(
    host: Arc<Host>,
    endpoints: Endpoints,
    addrs: Vec<schedclient::Addr>,
    heartbeat_ms: Option<u32>,
) {
    let max_backoff = if addrs.len() > 1 {
        MAX_BACKOFF_HA
    } else {
        MAX_BACKOFF
    };
    let list = schedclient::join(&addrs);
    let mut backoff = MIN_BACKOFF;
    // The same failure over and over (a scheduler down for an hour) is logged when it
    // starts and then once a minute or so, not at every attempt.
    let mut last = String::new();
    let mut repeats = 0u32;
    loop {
        let e = session(&host, &endpoints, &addrs, heartbeat_ms, &mut backoff).await;
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
                "scheduler {list}: {e}{again}; reconnecting in {} ms",
                backoff.as_millis()
            );
        }
        last = e;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(max_backoff);
    }
}

async fn call<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, capnp::Error>>,
) -> Result<T, String> {
    call_within(what, CALL_TIMEOUT, f).await
}

async fn call_within<T>(
    what: &str,
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, capnp::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(format!("{what} failed: {e}")),
        Err(_) => Err(format!("{what} unanswered for {limit:?}")),
    }
}

/// One connection: returns why it ended.
async fn session(
    host: &Arc<Host>,
    endpoints: &Endpoints,
    addrs: &[schedclient::Addr],
    heartbeat_ms: Option<u32>,
    backoff: &mut Duration,
) -> String {
    let found = match schedclient::find(addrs, false).await {
        Ok(f) => f,
        Err(e) => return e,
    };
    let addr = found.addr;
    let scheduler = found.client;
    let beat_limit = if addrs.len() > 1 {
        HEARTBEAT_TIMEOUT_HA
    } else {
        CALL_TIMEOUT
    };
    let mut conn = found.connection;
    let why = tokio::select! {
        r = registered(host, endpoints, &addr, heartbeat_ms, backoff, &scheduler, beat_limit) => match r {
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
    addr: &schedclient::Addr,
    heartbeat_ms: Option<u32>,
    backoff: &mut Duration,
    scheduler: &scheduler::Client,
    beat_limit: Duration,
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
        let reply = call_within("heartbeat", beat_limit, req.send().promise).await?;
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
