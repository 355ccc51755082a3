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
    match tokio::time::timeout(HOST_CALL_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| host_err(host, op.to_owned(), &e)),
        Err(_) => Err(Error::Host {
            host: host.to_owned(),
            op: op.to_owned(),
            reason: format!("no answer within {}s", HOST_CALL_TIMEOUT.as_secs()),
        }),
    }
}

pub async fn prepare(client: &host::Client, host: &str, spec: &Spec) -> Result<Prepared> {
    let op = format!("prepare {}", spec.instance);
    let mut req = client.prepare_request();
    wire::set_spec(req.get().init_spec(), spec);
    deadline(host, &op, async move {
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
    deadline(host, &op, async move {
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
