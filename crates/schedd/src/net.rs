//! Listening and connecting: `HOST:PORT` (TCP, loopback unless allowed) or
//! `unix:/path`, one two-party `RpcSystem` per connection.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use capnp_rpc::{RpcSystem, rpc_twoparty_capnp, twoparty};
use futures::AsyncReadExt;
use schema::sched_capnp::scheduler;

/// Where the scheduler listens, or where a client finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Tcp(a) => write!(f, "{a}"),
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Parses `HOST:PORT` or `unix:/path`.
pub fn parse_addr(s: &str) -> Result<Addr> {
    if let Some(p) = s.strip_prefix("unix:") {
        if p.is_empty() {
            bail!("{s:?}: unix: needs a socket path");
        }
        return Ok(Addr::Unix(PathBuf::from(p)));
    }
    let a = s
        .to_socket_addrs()
        .with_context(|| format!("{s:?}: expected HOST:PORT or unix:/path"))?
        .next()
        .ok_or_else(|| anyhow!("{s:?} resolves to no address"))?;
    Ok(Addr::Tcp(a))
}

/// Refuses a TCP address other machines can reach unless `allow_remote`: the
/// interface has no authentication.
pub fn check_listen(a: &Addr, allow_remote: bool) -> Result<()> {
    if let Addr::Tcp(sa) = a
        && !sa.ip().is_loopback()
        && !allow_remote
    {
        bail!(
            "--listen {sa} is not a loopback address: anyone who reaches it can deploy and remove stacks (no authentication); pass --allow-remote to serve other machines"
        );
    }
    Ok(())
}

/// An `RpcSystem` over `stream`: serving `bootstrap` (server side) or, with `None`,
/// a client's end.
pub fn rpc_system(
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
    bootstrap: Option<capnp::capability::Client>,
) -> RpcSystem<rpc_twoparty_capnp::Side> {
    let (reader, writer) = tokio_util::compat::TokioAsyncReadCompatExt::compat(stream).split();
    let side = if bootstrap.is_some() {
        rpc_twoparty_capnp::Side::Server
    } else {
        rpc_twoparty_capnp::Side::Client
    };
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(reader),
        futures::io::BufWriter::new(writer),
        side,
        Default::default(),
    );
    RpcSystem::new(Box::new(network), bootstrap)
}

/// Connects to a scheduler and returns its bootstrap capability; the connection runs on
/// the current `LocalSet`.
pub async fn connect(addr: &str) -> Result<scheduler::Client> {
    Ok(connect_task(addr).await?.0)
}

/// [`connect`], with the task that runs the connection: aborting it closes the socket.
pub async fn connect_task(addr: &str) -> Result<(scheduler::Client, schedclient::Connection)> {
    let a = schedclient::Addr::parse(addr).map_err(|e| anyhow!(e))?;
    schedclient::connect(&a)
        .await
        .with_context(|| format!("connecting to sched at {a} (is it running?)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_remote_ones_need_consent() {
        assert_eq!(
            parse_addr("unix:/run/sched.sock").unwrap(),
            Addr::Unix("/run/sched.sock".into())
        );
        assert!(parse_addr("unix:").is_err());
        assert!(parse_addr("no-port").is_err());
        let local = parse_addr("127.0.0.1:7700").unwrap();
        assert_eq!(local.to_string(), "127.0.0.1:7700");
        check_listen(&local, false).unwrap();
        check_listen(&parse_addr("[::1]:7700").unwrap(), false).unwrap();
        let any = parse_addr("0.0.0.0:7700").unwrap();
        let e = check_listen(&any, false).unwrap_err().to_string();
        assert!(e.contains("--allow-remote"), "{e}");
        check_listen(&any, true).unwrap();
        check_listen(&Addr::Unix("/x".into()), false).unwrap();
    }
}
