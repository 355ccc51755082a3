//! The listeners: HTTP/1.1 and HTTP/2 (prior knowledge, h2c) on one port, the same
//! over TLS (h2 by ALPN) on another, each connection served on its own task with
//! header limits and a header read timeout (a client that trickles its headers, or its
//! TLS handshake, is cut off), and the metrics port.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::log;
use crate::proxy::{Gateway, Peer};

/// Per-connection limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request head (request line and headers), bytes; at least 8192.
    pub max_header: usize,
    /// How long a client may take to send a request's head.
    pub header_timeout: Duration,
}

/// Serves the proxy on `l` until the process ends; over TLS when `tls` is given.
pub async fn serve(
    l: TcpListener,
    gw: Arc<Gateway>,
    limits: Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header.max(8192));
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header as u32);
    let b = Arc::new(b);
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (stream, addr) = match l.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                log!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (gw, b, tls) = (gw.clone(), b.clone(), tls.clone());
        let timeout = limits.header_timeout;
        tokio::spawn(async move {
            let peer = Peer {
                addr,
                tls: tls.is_some(),
            };
            let svc = {
                let gw = gw.clone();
                service_fn(move |req: Request<Incoming>| {
                    let gw = gw.clone();
                    async move { Ok::<_, Infallible>(gw.handle(req, peer).await) }
                })
            };
            // A malformed or abandoned connection ends only itself (hyper answers
            // what it can: 400 for a bad request line, 431 for a head too large).
            match tls {
                None => {
                    let _ = b
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                }
                Some(acceptor) => {
                    // The handshake gets the header timeout too: a client that
                    // connects and says nothing holds no task for long.
                    let stream = match tokio::time::timeout(timeout, acceptor.accept(stream)).await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(_)) | Err(_) => {
                            gw.metrics.tls_failures.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    };
                    gw.metrics.tls_handshakes.fetch_add(1, Ordering::Relaxed);
                    let _ = b
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                }
            }
        });
    }
}

/// Serves `GET /metrics` (Prometheus text) on `l`.
pub async fn serve_metrics(l: TcpListener, gw: Arc<Gateway>) {
    loop {
        let Ok((stream, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let gw = gw.clone();
                async move {
                    let (status, body) = if req.uri().path() == "/metrics" {
                        (StatusCode::OK, gw.metrics.render(&gw.link.table()))
                    } else {
                        (StatusCode::NOT_FOUND, "GET /metrics\n".to_string())
                    };
                    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
                    *r.status_mut() = status;
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Binds `addr` with `SO_REUSEPORT`, so each worker can have a socket of its own on
/// the same address and the kernel spreads connections across them.
pub fn bind_shared(addr: std::net::SocketAddr, what: &str) -> Result<TcpListener> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .with_context(|| format!("{what}: a socket for {addr}"))?;
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    s.set_nodelay(true)?;
    s.bind(addr)
        .with_context(|| format!("{what}: binding {addr}"))?;
    s.listen(1024)
        .with_context(|| format!("{what}: listening on {addr}"))
}

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: &str, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{what}: binding {addr}"))
}
