//! One request: find the name's instances in the table, pick the one with the fewest
//! requests in flight (or start one from zero, shared by every request that waits for
//! it), forward with hop-by-hop headers removed and `X-Forwarded-*` / `Forwarded` set,
//! and stream both bodies. WebSocket (any HTTP/1.1 upgrade) passes through.
//!
//! Errors a user can act on: no Host 400, an unknown name 404 naming it, a body over
//! the limit 413, a start that failed 503 with the scheduler's reason, too many
//! requests waiting for one start 503, an instance that does not answer 502, a start
//! or an answer that takes too long 504.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::link::{Link, Load, Report, Resolved};
use crate::log;
use crate::metrics::Metrics;
use crate::table::normalize;

pub type BoxError = Box<dyn StdError + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Limits and timeouts.
#[derive(Debug, Clone)]
pub struct Config {
    /// Largest request body forwarded, bytes.
    pub max_body: u64,
    /// How long a request waits for a start from zero before 504.
    pub start_timeout: Duration,
    /// How many requests may wait for one service's start; more get 503.
    pub queue: usize,
    /// How long an instance may take to send its response head before 504.
    pub timeout: Duration,
    /// Names routed to fixed backends (`--route`), outside the scheduler: looked up
    /// first, never started or scaled, counted under their name.
    pub static_routes: HashMap<String, String>,
}

type StartFuture = Shared<BoxFuture<'static, Result<Resolved, String>>>;

struct Start {
    future: StartFuture,
    waiting: Arc<AtomicUsize>,
}

/// The proxy's state, shared by every connection.
pub struct Gateway {
    pub link: Link,
    pub cfg: Config,
    pub metrics: Metrics,
    /// Starts from zero under way, by instance key.
    starts: Mutex<HashMap<String, Start>>,
    /// Requests in flight by instance id.
    inflight: Mutex<HashMap<String, usize>>,
    /// Load by instance key, for the scheduler's autoscaler.
    loads: Mutex<HashMap<String, KeyLoad>>,
}

/// One service's requests since the last load report.
#[derive(Debug, Default)]
struct KeyLoad {
    in_flight: usize,
    requests: u64,
    /// In-flight counts sampled over the interval, and how many samples.
    sum: f64,
    samples: u32,
}

/// Counts a request in its service's load from routing (waiting for a start included)
/// until its response body ends.
struct KeyGuard {
    gw: Arc<Gateway>,
    key: String,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        if let Some(l) = self.gw.loads.lock().expect("loads lock").get_mut(&self.key) {
            l.in_flight -= 1;
        }
    }
}

/// The prefix of a `--route` backend's id in the in-flight counts.
const STATIC: &str = "static:";

/// How often in-flight counts are sampled for the load reports.
const SAMPLE: Duration = Duration::from_millis(100);
/// Samples per report (one report a second).
const SAMPLES_PER_REPORT: u32 = 10;

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Why a request got no instance.
enum NoInstance {
    Full(usize),
    Failed(String),
    Timeout(Duration),
}

/// Decrements an instance's in-flight count when dropped (when the response body ends
/// or is dropped).
struct InFlight {
    gw: Arc<Gateway>,
    id: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut m = self.gw.inflight.lock().expect("inflight lock");
        if let Some(n) = m.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.id);
            }
        }
    }
}

/// Decrements a start's waiter count when a waiting request leaves.
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut m = msg.into();
    m.push('\n');
    let mut r = Response::new(Full::new(Bytes::from(m)).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Headers that belong to one connection (RFC 9110 7.6.1), never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// Removes hop-by-hop headers, those `Connection` names included, and `Upgrade`.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    h.remove(header::UPGRADE);
}

/// The `Upgrade` value of a request that asks for one (`Connection: upgrade`).
fn upgrade_of(h: &HeaderMap) -> Option<HeaderValue> {
    let asks = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    h.get(header::UPGRADE).filter(|_| asks).cloned()
}

/// Who sent a request: the peer's address and whether it came over TLS (which the
/// instance learns as `X-Forwarded-Proto: https` and `proto=https`).
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// The peer's address.
    pub addr: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// Appends to the `X-Forwarded-*` and `Forwarded` headers (RFC 7239).
fn set_forwarded(h: &mut HeaderMap, peer: Peer, host: &str) {
    let proto = if peer.tls { "https" } else { "http" };
    let ip = peer.addr.ip().to_string();
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip.clone(),
    };
    let node = if peer.addr.is_ipv6() {
        format!("\"[{ip}]\"")
    } else {
        ip
    };
    let fwd = format!("for={node};host=\"{host}\";proto={proto}");
    let fwd = match h.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {fwd}"),
        None => fwd,
    };
    for (name, value) in [
        ("x-forwarded-for", xff),
        ("x-forwarded-host", host.to_owned()),
        ("x-forwarded-proto", proto.to_owned()),
        ("forwarded", fwd),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), v);
        }
    }
}

fn is_length_limit(e: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(c) = cur {
        if c.is::<LengthLimitError>() {
            return true;
        }
        cur = c.source();
    }
    false
}

fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

type Upstream = Client<Connector, Limited<Incoming>>;

/// Connects to instances, retrying a connect that does not complete quickly with a
/// fresh SYN instead of waiting out the kernel's SYN backoff (1, 3, 7, 15, 31 s).
///
/// QEMU's user network listens for a guest's forwarded port with a backlog of one
/// (libslirp's `listen(s, 1)`; `ss -ltn` shows it), so a burst of connections to a
/// just-started instance (every request that waited for a start from zero, released
/// at once) overflows the accept queue and the kernel drops their SYNs: with the
/// kernel's backoff the last of twenty waited 37 s and some over a minute. A refused
/// connection is not retried (nothing listens: a 502 at once).
#[derive(Clone)]
struct Connector(HttpConnector);

/// The first attempt's limit; each retry doubles it up to [`CONNECT_ATTEMPT_MAX`].
const CONNECT_ATTEMPT: Duration = Duration::from_millis(100);
const CONNECT_ATTEMPT_MAX: Duration = Duration::from_secs(1);
/// All attempts together.
const CONNECT_TOTAL: Duration = Duration::from_secs(10);

impl tower_service::Service<Uri> for Connector {
    type Response = <HttpConnector as tower_service::Service<Uri>>::Response;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(BoxError::from)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut inner = self.0.clone();
        Box::pin(async move {
            let t0 = Instant::now();
            let mut limit = CONNECT_ATTEMPT;
            loop {
                match tokio::time::timeout(limit, inner.call(uri.clone())).await {
                    Ok(r) => return r.map_err(BoxError::from),
                    Err(_) if t0.elapsed() + limit < CONNECT_TOTAL => {
                        limit = (limit * 2).min(CONNECT_ATTEMPT_MAX);
                    }
                    Err(_) => {
                        return Err(format!("no connection within {CONNECT_TOTAL:?}").into());
                    }
                }
            }
        })
    }
}

thread_local! {
    /// The connection pool to instances, one per worker thread: a pooled connection is
    /// driven by the runtime that opened it, so a request on this thread never waits on
    /// another thread's wakeup (each worker runs a runtime of its own, as nginx's
    /// workers do).
    static UPSTREAM: Upstream = {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(Connector(conn))
    };
}

impl Gateway {
    pub fn new(link: Link, cfg: Config) -> Arc<Gateway> {
        Arc::new(Gateway {
            link,
            cfg,
            metrics: Metrics::default(),
            starts: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            loads: Mutex::new(HashMap::new()),
        })
    }

    fn track(self: &Arc<Self>, key: &str) -> KeyGuard {
        let mut m = self.loads.lock().expect("loads lock");
        let l = m.entry(key.to_owned()).or_default();
        l.in_flight += 1;
        l.requests += 1;
        KeyGuard {
            gw: self.clone(),
            key: key.to_owned(),
        }
    }

    /// This interval's loads (services with neither requests nor any in flight left
    /// out and forgotten), the counters started again.
    fn take_loads(&self) -> Vec<Load> {
        let mut m = self.loads.lock().expect("loads lock");
        m.retain(|_, l| l.in_flight > 0 || l.requests > 0 || l.sum > 0.0);
        m.iter_mut()
            .map(|(k, l)| {
                let c = if l.samples == 0 {
                    l.in_flight as f64
                } else {
                    l.sum / f64::from(l.samples)
                };
                let out = Load {
                    key: k.clone(),
                    concurrency: c,
                    requests: l.requests,
                };
                (l.requests, l.sum, l.samples) = (0, 0.0, 0);
                out
            })
            .collect()
    }

    /// The scheduler's instances with requests in flight now.
    fn busy(&self) -> Vec<String> {
        self.inflight
            .lock()
            .expect("inflight lock")
            .keys()
            .filter(|id| !id.starts_with(STATIC))
            .cloned()
            .collect()
    }

    fn sample(&self) {
        for l in self.loads.lock().expect("loads lock").values_mut() {
            l.sum += l.in_flight as f64;
            l.samples += 1;
        }
    }

    /// Samples in-flight counts and reports the averages to the scheduler, forever.
    pub async fn report_loads(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SAMPLE);
        let mut n = 0;
        let mut idle = true;
        loop {
            tick.tick().await;
            self.sample();
            n += 1;
            if n == SAMPLES_PER_REPORT {
                n = 0;
                // The table first: a request routed by an older one is in flight now.
                let table_version = self.link.table().version;
                let busy = self.busy();
                let loads = self.take_loads();
                // An idle front end says so once, then stays quiet.
                if !loads.is_empty() || !idle {
                    idle = loads.is_empty();
                    self.link.report(Report {
                        loads,
                        table_version,
                        busy,
                    });
                }
            }
        }
    }

    /// Answers one request and counts it under its service.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: Peer) -> Response<Body> {
        let t0 = Instant::now();
        let (service, resp) = self.route(req, peer).await;
        self.metrics
            .request(&service, resp.status().as_u16(), t0.elapsed());
        resp
    }

    async fn route(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: Peer,
    ) -> (String, Response<Body>) {
        let none = "-".to_string();
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            });
        let Some(host) = host.map(|h| normalize(&h)).filter(|h| !h.is_empty()) else {
            return (none, text(StatusCode::BAD_REQUEST, "no Host header"));
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.cfg.max_body) {
            return (
                none,
                text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body over the limit of {} bytes", self.cfg.max_body),
                ),
            );
        }
        if let Some(backend) = self.cfg.static_routes.get(&host) {
            let load = self.track(&host);
            let id = format!("{STATIC}{host}");
            let guard = self.enter_one(&id);
            let resp = self.forward(req, peer, &host, backend, load, guard).await;
            return (host, resp);
        }
        let table = self.link.table();
        let Some(name) = table.lookup(&host) else {
            return (
                none,
                text(
                    StatusCode::NOT_FOUND,
                    format!("no service answers to {host}"),
                ),
            );
        };
        let key = name.key.clone();
        let load = self.track(&key);
        let (endpoint, guard) = match self.pick(&key) {
            Some(p) => p,
            None => match self.start(&key, &host).await {
                Ok(r) => {
                    let g = self.enter_one(&r.id);
                    (r.endpoint, g)
                }
                Err(NoInstance::Full(n)) => {
                    return (
                        key,
                        text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("{host}: {n} requests already wait for its start"),
                        ),
                    );
                }
                Err(NoInstance::Failed(why)) => {
                    return (
                        key,
                        text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("{host}: no instance could start: {why}"),
                        ),
                    );
                }
                Err(NoInstance::Timeout(t)) => {
                    return (
                        key,
                        text(
                            StatusCode::GATEWAY_TIMEOUT,
                            format!("{host}: no instance answered within {t:?}"),
                        ),
                    );
                }
            },
        };
        let resp = self.forward(req, peer, &host, &endpoint, load, guard).await;
        (key, resp)
    }

    /// The endpoint of `key`'s serving instance with the fewest requests in flight,
    /// the request counted in flight to it before the lock is let go. The table is read
    /// under the same lock the load report's `busy` list is taken under, after the
    /// report read its table version: an instance a drain took out of the routes is
    /// either not picked or named busy in the report, never neither.
    fn pick(self: &Arc<Self>, key: &str) -> Option<(String, InFlight)> {
        let mut m = self.inflight.lock().expect("inflight lock");
        let table = self.link.table();
        let (id, ep) = table
            .services
            .get(key)?
            .instances
            .iter()
            .filter(|i| i.serving)
            .min_by_key(|i| m.get(&i.id).copied().unwrap_or(0))
            .map(|i| (i.id.clone(), i.endpoint.clone()))?;
        let g = self.enter(&mut m, &id);
        Some((ep, g))
    }

    /// Counts a request in flight to `id` until the guard drops.
    fn enter_one(self: &Arc<Self>, id: &str) -> InFlight {
        self.enter(&mut self.inflight.lock().expect("inflight lock"), id)
    }

    /// Counts a request in flight to `id` (in `m`, the locked counts) until the guard
    /// drops.
    fn enter(self: &Arc<Self>, m: &mut HashMap<String, usize>, id: &str) -> InFlight {
        *m.entry(id.to_owned()).or_default() += 1;
        InFlight {
            gw: self.clone(),
            id: id.to_owned(),
        }
    }

    /// Waits for a start of `key`'s service (by resolving `host`), joining the one under
    /// way if there is one.
    async fn start(self: &Arc<Self>, key: &str, host: &str) -> Result<Resolved, NoInstance> {
        let (future, waiting) = {
            let mut m = self.starts.lock().expect("starts lock");
            let s = m.entry(key.to_owned()).or_insert_with(|| {
                let gw = self.clone();
                let (k, h) = (key.to_owned(), host.to_owned());
                let task = tokio::spawn(async move {
                    let t0 = Instant::now();
                    let r = gw.link.resolve(&h).await;
                    gw.metrics.cold_start(&k, t0.elapsed(), r.is_ok());
                    match &r {
                        Ok(i) => log!(
                            "{h}: instance {} answers at {} ({}, {:.0} ms)",
                            i.id,
                            i.endpoint,
                            if i.started {
                                "started"
                            } else {
                                "already running"
                            },
                            t0.elapsed().as_secs_f64() * 1e3
                        ),
                        Err(e) => log!("{h}: start failed: {e}"),
                    }
                    gw.starts.lock().expect("starts lock").remove(&k);
                    r
                });
                let future = async move {
                    task.await
                        .unwrap_or_else(|e| Err(format!("the start task failed: {e}")))
                }
                .boxed()
                .shared();
                Start {
                    future,
                    waiting: Arc::new(AtomicUsize::new(0)),
                }
            });
            let n = s.waiting.fetch_add(1, Ordering::SeqCst);
            if n >= self.cfg.queue {
                s.waiting.fetch_sub(1, Ordering::SeqCst);
                return Err(NoInstance::Full(n));
            }
            (s.future.clone(), Waiting(s.waiting.clone()))
        };
        let r = tokio::time::timeout(self.cfg.start_timeout, future).await;
        drop(waiting);
        match r {
            Ok(Ok(i)) if i.endpoint.is_empty() => Err(NoInstance::Failed(format!(
                "instance {} has no forwarded port (its host boots no VM?)",
                i.id
            ))),
            Ok(Ok(i)) => Ok(i),
            Ok(Err(e)) => Err(NoInstance::Failed(e)),
            Err(_) => Err(NoInstance::Timeout(self.cfg.start_timeout)),
        }
    }

    async fn forward(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        peer: Peer,
        host: &str,
        endpoint: &str,
        load: KeyGuard,
        guard: InFlight,
    ) -> Response<Body> {
        let id = guard.id.clone();
        let upgrade = upgrade_of(req.headers());
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let pq = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        parts.uri = match Uri::try_from(format!("http://{endpoint}{pq}")) {
            Ok(u) => u,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("bad request target: {e}")),
        };
        // The instance speaks HTTP/1.1 whatever the client spoke.
        parts.version = http::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        set_forwarded(&mut parts.headers, peer, host);
        if let Ok(h) = HeaderValue::from_str(host) {
            parts.headers.insert(header::HOST, h);
        }
        if let Some(u) = &upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, u.clone());
        }
        let out = Request::from_parts(parts, Limited::new(body, self.cfg.max_body as usize));
        let sent = UPSTREAM.with(|c| c.request(out));
        let mut resp = match tokio::time::timeout(self.cfg.timeout, sent).await {
            Err(_) => {
                return text(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "instance {id} at {endpoint} sent no response within {:?}",
                        self.cfg.timeout
                    ),
                );
            }
            Ok(Err(e)) if is_length_limit(&e) => {
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body over the limit of {} bytes", self.cfg.max_body),
                );
            }
            Ok(Err(e)) => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("instance {id} at {endpoint}: {}", chain(&e)),
                );
            }
            Ok(Ok(r)) => r,
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let backend_upgrade = hyper::upgrade::on(&mut resp);
            let what = format!("upgraded connection to {id}");
            tokio::spawn(async move {
                let _guard = (guard, load);
                match futures::future::try_join(client_upgrade, backend_upgrade).await {
                    Ok((c, b)) => {
                        let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
                        if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut b).await {
                            log!("{what}: {e}");
                        }
                    }
                    Err(e) => log!("{what}: {e}"),
                }
            });
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, Empty::new().map_err(|e| match e {}).boxed());
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = body
            .map_frame(move |f| {
                let _ = (&guard, &load);
                f
            })
            .map_err(BoxError::from)
            .boxed();
        Response::from_parts(parts, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["accept"]);
    }

    #[test]
    fn forwarded_headers_append_to_what_came_before() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        let plain = |a: &str| Peer {
            addr: a.parse().unwrap(),
            tls: false,
        };
        set_forwarded(&mut h, plain("192.0.2.1:5555"), "web.shop.localhost");
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 192.0.2.1");
        assert_eq!(h["x-forwarded-host"], "web.shop.localhost");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.1;host=\"web.shop.localhost\";proto=http"
        );
        let tls = Peer {
            tls: true,
            ..plain("[2001:db8::1]:443")
        };
        set_forwarded(&mut h, tls, "a.b");
        assert!(
            h["forwarded"]
                .to_str()
                .unwrap()
                .ends_with(", for=\"[2001:db8::1]\";host=\"a.b\";proto=https")
        );
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn loads_average_the_samples_and_idle_services_drop_out() {
        let link = Link::start(vec![schedclient::Addr::Unix(
            "/nonexistent/sched.sock".into(),
        )]);
        let gw = Gateway::new(
            link,
            Config {
                max_body: 1,
                start_timeout: Duration::from_secs(1),
                queue: 1,
                timeout: Duration::from_secs(1),
                static_routes: HashMap::new(),
            },
        );
        let a = gw.track("web.shop");
        let b = gw.track("web.shop");
        gw.sample();
        drop(b);
        gw.sample();
        let l = gw.take_loads();
        assert_eq!(
            l,
            [Load {
                key: "web.shop".into(),
                concurrency: 1.5,
                requests: 2
            }]
        );
        // Still in flight half the next interval, no new request.
        gw.sample();
        drop(a);
        gw.sample();
        assert_eq!(gw.take_loads()[0].concurrency, 0.5);
        gw.sample();
        assert!(gw.take_loads().is_empty(), "then nothing to say");
    }

    #[test]
    fn an_upgrade_needs_connection_upgrade() {
        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(upgrade_of(&h).is_none());
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert_eq!(upgrade_of(&h).unwrap(), "websocket");
    }
}
