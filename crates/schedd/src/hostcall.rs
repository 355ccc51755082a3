//! Calls the scheduler makes on a host's `Host` capability, with a deadline: a host
//! that vanishes mid-call fails that call (the link drops), one that hangs is given up
//! on after [`HOST_CALL_TIMEOUT`]. Results come back as domain records.

use std::time::Duration;

use schema::sched_capnp::host;

use crate::error::{Error, Result, host_reason};
use crate::state::{Prepared, Spec};
use crate::wire;

/// How long one host call may take.
pub const HOST_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a `prepare` (or a restart) may take: a host that boots guests answers once
/// the guest's app runs and answers on its port, bounded by its own `--boot-timeout`.
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(300);

/// A warm VM as a host reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmReport {
    pub id: String,
    pub pool: String,
    pub image: String,
    pub layers: Vec<String>,
    pub root: String,
}

fn host_err(host: &str, op: String, e: &capnp::Error) -> Error {
    Error::Host {
        host: host.to_owned(),
        op,
        reason: host_reason(e),
    }
}

async fn deadline<T>(
    host: &str,
    op: &str,
    f: impl std::future::Future<Output = capnp::Result<T>>,
) -> Result<T> {
    deadline_of(HOST_CALL_TIMEOUT, host, op, f).await
}

async fn deadline_of<T>(
    limit: Duration,
    host: &str,
    op: &str,
    f: impl std::future::Future<Output = capnp::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(|e| host_err(host, op.to_owned(), &e)),
        Err(_) => Err(Error::Host {
            host: host.to_owned(),
            op: op.to_owned(),
            reason: format!("no answer within {}s", limit.as_secs()),
        }),
    }
}

/// A chunk of an instance's log: its bytes, the next offset, whether its VM ended.
pub async fn logs(
    client: &host::Client,
    host: &str,
    instance: &str,
    offset: u64,
    console: bool,
    max: u32,
) -> Result<(Vec<u8>, u64, bool)> {
    let op = format!("logs of {instance}");
    let mut req = client.logs_request();
    req.get().set_instance(instance);
    req.get().set_offset(offset);
    req.get().set_console(console);
    req.get().set_max(max);
    deadline(host, &op, async move {
        let reply = req.send().promise.await?;
        let r = reply.get()?;
        Ok((r.get_data()?.to_vec(), r.get_next(), r.get_ended()))
    })
    .await
}

/// Stops or restarts an instance's guest; what the host then reports.
pub async fn control(
    client: &host::Client,
    host: &str,
    instance: &str,
    action: &str,
) -> Result<Prepared> {
    let op = format!("{action} {instance}");
    let mut req = client.control_request();
    req.get().set_instance(instance);
    req.get().set_action(action);
    deadline_of(PREPARE_TIMEOUT, host, &op, async move {
        let reply = req.send().promise.await?;
        wire::prepared_from(reply.get()?.get_prepared()?)
    })
    .await
}

/// How long a host may take to hand an instance over: its guest's stop and the push of
/// its volumes' new data to the tier.
pub const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(600);

/// Asks `host` to give `instance` up for a move (`Host.handOver`): what it pushed.
pub async fn hand_over(
    client: &host::Client,
    host: &str,
    instance: &str,
) -> Result<Vec<crate::state::PulledRec>> {
    let op = format!("hand over {instance}");
    let mut req = client.hand_over_request();
    req.get().set_instance(instance);
    deadline_of(HAND_OVER_TIMEOUT, host, &op, async move {
        let reply = req.send().promise.await?;
        wire::pulled_from(reply.get()?.get_pushed()?)
    })
    .await
}

pub async fn prepare(client: &host::Client, host: &str, spec: &Spec) -> Result<Prepared> {
    let op = format!("prepare {}", spec.instance);
    let mut req = client.prepare_request();
    wire::set_spec(req.get().init_spec(), spec);
    deadline_of(PREPARE_TIMEOUT, host, &op, async move {
        let reply = req.send().promise.await?;
        wire::prepared_from(reply.get()?.get_prepared()?)
    })
    .await
}

pub async fn release(client: &host::Client, host: &str, instance: &str) -> Result<()> {
    let op = format!("release {instance}");
    let mut req = client.release_request();
    req.get().set_instance(instance);
    deadline(host, &op, async move {
        req.send().promise.await?;
        Ok(())
    })
    .await
}

pub async fn boot_warm(
    client: &host::Client,
    host: &str,
    pool: &str,
    image: &str,
) -> Result<WarmReport> {
    let op = format!("bootWarm for pool {pool}");
    let mut req = client.boot_warm_request();
    req.get().set_pool(pool);
    req.get().set_image(image);
    // A host that boots guests answers once the warm VM's init is ready.
    deadline_of(PREPARE_TIMEOUT, host, &op, async move {
        let reply = req.send().promise.await?;
        wire::warm_from(reply.get()?.get_vm()?)
    })
    .await
}

pub async fn instances(
    client: &host::Client,
    host: &str,
) -> Result<(Vec<Prepared>, Vec<WarmReport>)> {
    let req = client.instances_request();
    deadline(host, "instances", async move {
        let reply = req.send().promise.await?;
        let r = reply.get()?;
        let prepared = r
            .get_instances()?
            .iter()
            .map(wire::prepared_from)
            .collect::<capnp::Result<Vec<_>>>()?;
        let warm = r
            .get_warm()?
            .iter()
            .map(wire::warm_from)
            .collect::<capnp::Result<Vec<_>>>()?;
        Ok((prepared, warm))
    })
    .await
}
