//! schedclient: how a client reaches the scheduler that leads.
//!
//! With its state in etcd, Tidedge runs several schedulers and one of them leads: only
//! the leader changes state, the others answer reads and refuse changes naming the
//! leader. Every client (`tide`, volumed's host link, the front end, the tests' fake
//! hosts) takes a list of addresses (`A,B,C`) and uses [`find`]: it asks each address
//! in turn `Scheduler.leader` and keeps the connection to the one that leads. A
//! scheduler with a local state directory always leads, and one that predates the
//! call counts as leading, so a single address works as it always did.
//!
//! The connection's `RpcSystem` runs as a task on the current `LocalSet` (capnp-rpc is
//! single-threaded); the caller gets its handle, which ends when the connection does.

use std::path::PathBuf;
use std::time::Duration;

use capnp_rpc::{RpcSystem, rpc_twoparty_capnp, twoparty};
use futures::AsyncReadExt;
use schema::sched_capnp::scheduler;

/// How long connecting to one address, or its answer to `leader`, may take.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a scheduler listens: `HOST:PORT` or `unix:/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Tcp(String),
    Unix(PathBuf),
}

impl Addr {
    /// Parses `HOST:PORT` or `unix:/path`.
    pub fn parse(s: &str) -> Result<Addr, String> {
        let s = s.trim();
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path (unix:/path)".into());
            }
            return Ok(Addr::Unix(p.into()));
        }
        match s.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(Addr::Tcp(s.into())),
            _ => Err(format!("{s:?}: expected HOST:PORT or unix:/path")),
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

/// Parses a comma-separated list of addresses (`127.0.0.1:7000,127.0.0.1:7001`).
pub fn parse_list(s: &str) -> Result<Vec<Addr>, String> {
    let list: Vec<Addr> = s
        .split(',')
        .filter(|a| !a.trim().is_empty())
        .map(Addr::parse)
        .collect::<Result<_, _>>()?;
    if list.is_empty() {
        return Err("no scheduler address given".into());
    }
    Ok(list)
}

/// `addrs` as `parse_list` takes them (`A,B,C`).
pub fn join(addrs: &[Addr]) -> String {
    addrs
        .iter()
        .map(Addr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A connection's `RpcSystem`, running on the current `LocalSet`.
pub type Connection = tokio::task::JoinHandle<Result<(), capnp::Error>>;

fn over(
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
) -> (scheduler::Client, Connection) {
    let (r, w) = tokio_util::compat::TokioAsyncReadCompatExt::compat(stream).split();
    let network = Box::new(twoparty::VatNetwork::new(
        futures::io::BufReader::new(r),
        futures::io::BufWriter::new(w),
        rpc_twoparty_capnp::Side::Client,
        Default::default(),
    ));
    let mut rpc = RpcSystem::new(network, None);
    let client = rpc.bootstrap(rpc_twoparty_capnp::Side::Server);
    (client, tokio::task::spawn_local(rpc))
}

/// Connects to one scheduler. Must run on a `LocalSet`.
pub async fn connect(addr: &Addr) -> std::io::Result<(scheduler::Client, Connection)> {
    match addr {
        Addr::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a).await?;
            s.set_nodelay(true)?;
            Ok(over(s))
        }
        Addr::Unix(p) => Ok(over(tokio::net::UnixStream::connect(p).await?)),
    }
}

/// A scheduler's answer to `leader`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub leading: bool,
    /// The leader's address, "" while none is elected.
    pub leader: String,
    /// "local" or "etcd" ("" from a scheduler that predates the call).
    pub store: String,
}

/// Asks `client` whether it leads. A scheduler without the call always leads.
pub async fn ask(client: &scheduler::Client) -> Result<Answer, capnp::Error> {
    match client.leader_request().send().promise.await {
        Ok(r) => {
            let r = r.get()?;
            Ok(Answer {
                leading: r.get_leading(),
                leader: r.get_leader()?.to_string().map_err(capnp::Error::from)?,
                store: r.get_store()?.to_string().map_err(capnp::Error::from)?,
            })
        }
        Err(e) if e.kind == capnp::ErrorKind::Unimplemented => Ok(Answer {
            leading: true,
            leader: String::new(),
            store: String::new(),
        }),
        Err(e) => Err(e),
    }
}

/// The scheduler [`find`] settled on.
pub struct Found {
    pub client: scheduler::Client,
    pub addr: Addr,
    /// False only when [`find`] was allowed to settle for a follower.
    pub leading: bool,
    pub connection: Connection,
}

impl std::fmt::Debug for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Found")
            .field("addr", &self.addr)
            .field("leading", &self.leading)
            .finish_non_exhaustive()
    }
}

/// Connects to `addr` and asks it whether it leads.
async fn try_one(addr: &Addr) -> Result<(Found, Answer), String> {
    let (client, connection) = match tokio::time::timeout(ASK_TIMEOUT, connect(addr)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(format!("{addr}: cannot connect: {e}")),
        Err(_) => return Err(format!("{addr}: connect timed out")),
    };
    match tokio::time::timeout(ASK_TIMEOUT, ask(&client)).await {
        Ok(Ok(a)) => Ok((
            Found {
                client,
                addr: addr.clone(),
                leading: a.leading,
                connection,
            },
            a,
        )),
        Ok(Err(e)) => {
            connection.abort();
            Err(format!("{addr}: {}", e.extra))
        }
        Err(_) => {
            connection.abort();
            Err(format!(
                "{addr}: no answer to `leader` within {ASK_TIMEOUT:?}"
            ))
        }
    }
}

/// Finds the scheduler that leads among `addrs`, following the leader address a
/// follower names even when it is not in the list. With `follower_ok`, a follower is
/// returned when no leader answers (reads work there; changes are refused naming why).
/// The error says what each address answered.
pub async fn find(addrs: &[Addr], follower_ok: bool) -> Result<Found, String> {
    let mut tried: Vec<Addr> = Vec::new();
    let mut queue: std::collections::VecDeque<Addr> = addrs.iter().cloned().collect();
    let mut follower: Option<Found> = None;
    let mut why = Vec::new();
    while let Some(addr) = queue.pop_front() {
        if tried.contains(&addr) {
            continue;
        }
        tried.push(addr.clone());
        match try_one(&addr).await {
            Ok((found, a)) if a.leading => {
                if let Some(f) = follower {
                    f.connection.abort();
                }
                return Ok(found);
            }
            Ok((found, a)) => {
                if a.leader.is_empty() {
                    why.push(format!("{addr}: follows, no leader elected yet"));
                } else {
                    why.push(format!("{addr}: follows the leader at {}", a.leader));
                    if let Ok(l) = Addr::parse(&a.leader) {
                        queue.push_front(l);
                    }
                }
                if follower.is_none() && follower_ok {
                    follower = Some(found);
                } else {
                    found.connection.abort();
                }
            }
            Err(e) => why.push(e),
        }
    }
    follower.ok_or_else(|| format!("no scheduler leads ({})", why.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_bad_entries_are_named() {
        let l = parse_list("127.0.0.1:7000, unix:/run/sched.sock,").unwrap();
        assert_eq!(
            l,
            vec![
                Addr::Tcp("127.0.0.1:7000".into()),
                Addr::Unix("/run/sched.sock".into())
            ]
        );
        assert_eq!(l[1].to_string(), "unix:/run/sched.sock");
        assert_eq!(parse_list(&join(&l)).unwrap(), l);
        let e = parse_list("127.0.0.1:7000,nope").unwrap_err();
        assert!(e.contains("\"nope\""), "{e}");
        assert!(parse_list(" , ").is_err());
        assert!(Addr::parse("unix:").is_err());
        assert!(Addr::parse("host:99999").is_err());
    }

    #[test]
    fn find_names_every_address_it_could_not_use() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        let dir = std::env::temp_dir().join(format!("schedclient-{}", std::process::id()));
        let addrs = vec![
            Addr::Unix(dir.join("none.sock")),
            Addr::Tcp("127.0.0.1:1".into()),
        ];
        let e = local
            .block_on(&rt, find(&addrs, true))
            .map(|_| ())
            .unwrap_err();
        assert!(e.contains("none.sock: cannot connect"), "{e}");
        assert!(e.contains("127.0.0.1:1: cannot connect"), "{e}");
    }
}
