//! The HTTP side of the distribution API: one repository of one registry, with its
//! auth handshake, manifests, blobs (read and written).

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use castore::Digest;
use reqwest::StatusCode;
use reqwest::blocking::{RequestBuilder, Response};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, LOCATION, RANGE, WWW_AUTHENTICATE};

use crate::auth::{Challenge, Credentials};
use crate::{Error, Reference, Result};

/// Media types of the documents a pull reads.
pub mod media {
    /// An OCI image index (a manifest per platform).
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// An OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// Docker's manifest list (its index).
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker's image manifest, schema 2.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
}

/// Largest manifest or index read (the distribution spec suggests registries take 4 MiB).
pub(crate) const MAX_MANIFEST: u64 = 4 << 20;

/// How a client connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Credentials for the token service or Basic auth (anonymous if None).
    pub credentials: Option<Credentials>,
    /// Speak plain HTTP (a registry on loopback does so without asking).
    pub plain_http: bool,
    /// Time allowed to connect; also the TCP keepalive interval.
    pub timeout: Duration,
    /// Times a broken blob download is resumed (with `Range`) before it fails.
    pub retries: u32,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            credentials: None,
            plain_http: false,
            timeout: Duration::from_secs(30),
            retries: 3,
        }
    }
}

/// A manifest or index as served, checked against the digest it was asked by (or the
/// digest the registry said it has).
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The document.
    pub bytes: Vec<u8>,
    /// Its media type (`Content-Type`, else the document's `mediaType`).
    pub media_type: String,
    /// SHA-256 of `bytes`.
    pub digest: Digest,
}

/// A client for one repository of one registry. Cheap to clone; the tokens it gets are
/// shared by its clones and its blob readers.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: reqwest::blocking::Client,
    /// `http(s)://HOST`.
    base: String,
    registry: String,
    repository: String,
    creds: Option<Credentials>,
    /// Bearer tokens by scope, and whether the registry asked for Basic auth.
    tokens: Mutex<HashMap<String, String>>,
    basic: std::sync::atomic::AtomicBool,
    retries: u32,
}

/// What a request needs: read only, or read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Pull,
    Push,
}

impl Client {
    /// A client for `reference`'s repository.
    pub fn new(reference: &Reference, opts: &ClientOptions) -> Result<Client> {
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(opts.timeout)
            // No limit on a whole request (a layer may take minutes); a peer that
            // vanishes is found by TCP keepalive.
            .timeout(None)
            .tcp_keepalive(opts.timeout)
            .user_agent(concat!("tidedge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Http {
                registry: reference.registry.clone(),
                what: "set up the HTTP client".into(),
                source: e,
            })?;
        let scheme = if opts.plain_http || reference.is_loopback() {
            "http"
        } else {
            "https"
        };
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                base: format!("{scheme}://{}", reference.api_host()),
                registry: reference.registry.clone(),
                repository: reference.repository.clone(),
                creds: opts.credentials.clone(),
                tokens: Mutex::new(HashMap::new()),
                basic: std::sync::atomic::AtomicBool::new(false),
                retries: opts.retries,
            }),
        })
    }

    /// The registry host.
    pub fn registry(&self) -> &str {
        &self.inner.registry
    }

    /// Fetches the manifest or index `reference` (a tag or `sha256:HEX`), checked: by a
    /// digest, the bytes must hash to it; by a tag, to the `Docker-Content-Digest` the
    /// registry sends (when it sends one).
    pub fn manifest(&self, reference: &str) -> Result<Manifest> {
        let path = format!("/v2/{}/manifests/{reference}", self.inner.repository);
        let accept = [
            media::OCI_INDEX,
            media::OCI_MANIFEST,
            media::DOCKER_LIST,
            media::DOCKER_MANIFEST,
        ]
        .join(", ");
        let resp = self.send(Access::Pull, "GET", &path, |r| r.header(ACCEPT, &accept))?;
        let what = format!("GET {path}");
        let claimed = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
        let bytes = self.read_limited(resp, &what, MAX_MANIFEST)?;
        let digest = Digest::of(&bytes);
        let expect = match Digest::parse(reference) {
            Some(d) => Some((d, "the digest it was asked for by")),
            None => claimed
                .as_deref()
                .and_then(Digest::parse)
                .map(|d| (d, "the registry's Docker-Content-Digest")),
        };
        if let Some((d, why)) = expect
            && d != digest
        {
            return Err(self.bad(format!(
                "manifest {reference} of {} hashes to {digest}, not to {d} ({why}): refusing it",
                self.inner.repository
            )));
        }
        let doc_type = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| {
                v.get("mediaType")
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
            });
        let media_type = doc_type
            .or(content_type.filter(|c| c != "application/json"))
            .unwrap_or_default();
        Ok(Manifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// Reads a small blob (a config) whole, at most `max` bytes, checked against `d`.
    pub fn blob_bytes(&self, d: &Digest, max: u64) -> Result<Vec<u8>> {
        let path = self.blob_path(d);
        let resp = self.send(Access::Pull, "GET", &path, |r| r)?;
        let bytes = self.read_limited(resp, &format!("GET {path}"), max)?;
        if Digest::of(&bytes) != *d {
            return Err(self.bad(format!(
                "blob {d} of {} does not match its digest",
                self.inner.repository
            )));
        }
        Ok(bytes)
    }

    /// Opens blob `d` of `size` bytes for streaming. A connection that breaks is resumed
    /// where it stopped (`Range`), up to the client's retries; a blob that is shorter or
    /// longer than `size` is an error. The digest is the reader's caller's to check.
    pub fn blob_reader(&self, d: &Digest, size: u64) -> Result<BlobReader> {
        let resp = self.open_blob(d, 0)?;
        Ok(BlobReader {
            client: self.clone(),
            digest: *d,
            size,
            pos: 0,
            resp: Some(resp),
            retries_left: self.inner.retries,
        })
    }

    /// Whether the repository holds blob `d`.
    pub fn has_blob(&self, d: &Digest) -> Result<bool> {
        let path = self.blob_path(d);
        match self.send(Access::Pull, "HEAD", &path, |r| r) {
            Ok(_) => Ok(true),
            Err(Error::Status { status, .. }) if status == StatusCode::NOT_FOUND => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Uploads `bytes` as a blob (monolithic: `POST` an upload, `PUT` it with its
    /// digest) unless the repository has it. Returns its digest.
    pub fn push_blob(&self, bytes: &[u8]) -> Result<Digest> {
        let d = Digest::of(bytes);
        if self.has_blob(&d)? {
            return Ok(d);
        }
        let path = format!("/v2/{}/blobs/uploads/", self.inner.repository);
        let resp = self.send(Access::Push, "POST", &path, |r| r)?;
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| self.bad(format!("POST {path} gave no upload Location")))?
            .to_string();
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{sep}digest={d}");
        self.send(Access::Push, "PUT", &url, |r| {
            r.header(CONTENT_TYPE, "application/octet-stream")
                .body(bytes.to_vec())
        })?;
        Ok(d)
    }

    /// Uploads a manifest or index under `reference` (a tag or its digest).
    pub fn push_manifest(&self, reference: &str, media_type: &str, bytes: &[u8]) -> Result<Digest> {
        let path = format!("/v2/{}/manifests/{reference}", self.inner.repository);
        self.send(Access::Push, "PUT", &path, |r| {
            r.header(CONTENT_TYPE, media_type).body(bytes.to_vec())
        })?;
        Ok(Digest::of(bytes))
    }

    fn blob_path(&self, d: &Digest) -> String {
        format!("/v2/{}/blobs/{d}", self.inner.repository)
    }

    fn open_blob(&self, d: &Digest, from: u64) -> Result<Response> {
        let path = self.blob_path(d);
        let resp = self.send(Access::Pull, "GET", &path, |r| {
            if from > 0 {
                r.header(RANGE, format!("bytes={from}-"))
            } else {
                r
            }
        })?;
        if from > 0 && resp.status() != StatusCode::PARTIAL_CONTENT {
            return Err(self.bad(format!(
                "GET {path} from byte {from}: the registry does not resume downloads ({})",
                resp.status()
            )));
        }
        Ok(resp)
    }

    fn bad(&self, reason: String) -> Error {
        Error::Bad {
            registry: self.inner.registry.clone(),
            reason,
        }
    }

    fn read_limited(&self, resp: Response, what: &str, max: u64) -> Result<Vec<u8>> {
        if resp.content_length().is_some_and(|n| n > max) {
            return Err(self.bad(format!("{what}: larger than {max} bytes")));
        }
        let mut out = Vec::new();
        resp.take(max + 1)
            .read_to_end(&mut out)
            .map_err(|e| self.bad(format!("{what}: reading the body: {e}")))?;
        if out.len() as u64 > max {
            return Err(self.bad(format!("{what}: larger than {max} bytes")));
        }
        Ok(out)
    }

    fn scope(&self, access: Access) -> String {
        match access {
            Access::Pull => format!("repository:{}:pull", self.inner.repository),
            Access::Push => format!("repository:{}:pull,push", self.inner.repository),
        }
    }

    /// Sends a request (`target` a path on the registry or a full URL it gave), with the
    /// auth it needs: a 401 is answered once (a token from the challenge's realm, or Basic
    /// credentials) and the request sent again. A status other than 2xx is an error with
    /// the registry's own error codes.
    fn send(
        &self,
        access: Access,
        method: &str,
        target: &str,
        build: impl Fn(RequestBuilder) -> RequestBuilder,
    ) -> Result<Response> {
        let url = if target.starts_with("http://") || target.starts_with("https://") {
            target.to_string()
        } else if target.starts_with('/') {
            format!("{}{target}", self.inner.base)
        } else {
            format!("{}/{target}", self.inner.base)
        };
        let what = format!("{method} {}", target.split('?').next().unwrap_or(target));
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method name");
        let scope = self.scope(access);
        let mut answered = false;
        loop {
            let mut req = build(self.inner.http.request(method.clone(), &url));
            req = self.authorize(req, &scope);
            let resp = req.send().map_err(|e| Error::Http {
                registry: self.inner.registry.clone(),
                what: what.clone(),
                source: e,
            })?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !answered {
                answered = true;
                self.answer(resp.headers(), &scope)?;
                continue;
            }
            if status.is_success() {
                return Ok(resp);
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                let detail = error_detail(resp);
                let who = match &self.inner.creds {
                    Some(c) => format!("as {}", c.username),
                    None => "anonymously (no credentials given)".to_string(),
                };
                return Err(Error::Auth {
                    registry: self.inner.registry.clone(),
                    reason: format!("{what}: {status}{detail}: access {scope} refused {who}"),
                });
            }
            return Err(Error::Status {
                registry: self.inner.registry.clone(),
                what,
                status,
                detail: error_detail(resp),
            });
        }
    }

    fn authorize(&self, req: RequestBuilder, scope: &str) -> RequestBuilder {
        if let Some(t) = self.inner.tokens.lock().expect("token lock").get(scope) {
            return req.bearer_auth(t);
        }
        match &self.inner.creds {
            Some(c) if self.inner.basic.load(std::sync::atomic::Ordering::Relaxed) => {
                req.basic_auth(&c.username, Some(&c.password))
            }
            _ => req,
        }
    }

    /// Answers a 401's challenge: gets a token for `scope`, or arms Basic auth.
    fn answer(&self, headers: &HeaderMap, scope: &str) -> Result<()> {
        let auth_err = |reason: String| Error::Auth {
            registry: self.inner.registry.clone(),
            reason,
        };
        let challenge = headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(Challenge::parse)
            .find(|c| c.scheme == "bearer" || c.scheme == "basic")
            .ok_or_else(|| auth_err("401 without a Bearer or Basic challenge".into()))?;
        if challenge.scheme == "basic" {
            if self.inner.creds.is_none() {
                return Err(auth_err(
                    "needs credentials (Basic auth): give --creds USER:PASSWORD or an auth file"
                        .into(),
                ));
            }
            self.inner
                .basic
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return Ok(());
        }
        let realm = challenge
            .param("realm")
            .ok_or_else(|| auth_err("Bearer challenge without a realm".into()))?;
        let mut req = self.inner.http.get(realm);
        let mut query = Vec::new();
        if let Some(s) = challenge.param("service") {
            query.push(("service", s.to_string()));
        }
        query.push(("scope", scope.to_string()));
        req = req.query(&query);
        if let Some(c) = &self.inner.creds {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let resp = req.send().map_err(|e| Error::Http {
            registry: self.inner.registry.clone(),
            what: format!("GET token from {realm}"),
            source: e,
        })?;
        let status = resp.status();
        if !status.is_success() {
            let detail = error_detail(resp);
            return Err(auth_err(match &self.inner.creds {
                Some(c) => format!(
                    "the token service {realm} refused the credentials of {}: {status}{detail}",
                    c.username
                ),
                None => format!(
                    "the token service {realm} wants credentials ({status}{detail}): give \
                     --creds USER:PASSWORD or an auth file"
                ),
            }));
        }
        let body = self.read_limited(resp, &format!("GET {realm}"), 1 << 20)?;
        let doc: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| auth_err(format!("the token service {realm} sent no JSON: {e}")))?;
        let token = doc
            .get("token")
            .or_else(|| doc.get("access_token"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| auth_err(format!("the token service {realm} sent no token")))?;
        self.inner
            .tokens
            .lock()
            .expect("token lock")
            .insert(scope.to_string(), token.to_string());
        Ok(())
    }
}

/// `: CODE: message; CODE: message` from a distribution error body, or "".
fn error_detail(resp: Response) -> String {
    let mut body = Vec::new();
    let _ = resp.take(64 << 10).read_to_end(&mut body);
    let doc: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => {
            let text = String::from_utf8_lossy(&body);
            let text = text.trim();
            return if text.is_empty() || text.len() > 200 {
                String::new()
            } else {
                format!(": {text}")
            };
        }
    };
    let errors: Vec<String> = doc
        .get("errors")
        .and_then(|e| e.as_array())
        .map(|a| {
            a.iter()
                .map(|e| {
                    let field = |n: &str| e.get(n).and_then(|v| v.as_str()).unwrap_or("");
                    format!("{}: {}", field("code"), field("message"))
                })
                .collect()
        })
        .unwrap_or_default();
    if errors.is_empty() {
        String::new()
    } else {
        format!(": {}", errors.join("; "))
    }
}

/// A blob being downloaded ([`Client::blob_reader`]).
#[derive(Debug)]
pub struct BlobReader {
    client: Client,
    digest: Digest,
    size: u64,
    pos: u64,
    resp: Option<Response>,
    retries_left: u32,
}

impl BlobReader {
    fn resume(&mut self, why: &str) -> std::io::Result<()> {
        if self.retries_left == 0 {
            return Err(std::io::Error::other(format!(
                "blob {} broke off at byte {} of {}: {why}",
                self.digest, self.pos, self.size
            )));
        }
        self.retries_left -= 1;
        let tries = self.client.inner.retries - self.retries_left;
        std::thread::sleep(Duration::from_millis(200 << tries.min(5)));
        self.resp = None;
        let resp = self.client.open_blob(&self.digest, self.pos).map_err(|e| {
            std::io::Error::other(format!(
                "blob {} broke off at byte {} of {} ({why}) and could not be resumed: {e}",
                self.digest, self.pos, self.size
            ))
        })?;
        self.resp = Some(resp);
        Ok(())
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let Some(resp) = self.resp.as_mut() else {
                return Ok(0);
            };
            match resp.read(buf) {
                Ok(0) if self.pos < self.size => self.resume("the connection ended early")?,
                Ok(0) => return Ok(0),
                Ok(n) => {
                    self.pos += n as u64;
                    if self.pos > self.size {
                        return Err(std::io::Error::other(format!(
                            "blob {} is longer than the {} bytes its manifest says",
                            self.digest, self.size
                        )));
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => self.resume(&e.to_string())?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    use super::*;

    /// A server that breaks the first download of a blob halfway and serves the rest
    /// to a `Range` request; returns its address and the Range headers it saw.
    fn flaky_server(blob: Vec<u8>) -> (String, std::sync::mpsc::Receiver<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for (n, conn) in l.incoming().flatten().enumerate() {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut range = String::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("range:") {
                        range = v.trim().to_string();
                    }
                }
                let _ = tx.send(range.clone());
                let mut conn = conn;
                let from: usize = range
                    .strip_prefix("bytes=")
                    .and_then(|v| v.trim_end_matches('-').parse().ok())
                    .unwrap_or(0);
                if n == 0 {
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", blob.len());
                    let _ = conn.write_all(head.as_bytes());
                    let _ = conn.write_all(&blob[..blob.len() / 2]);
                } else {
                    let head = format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\n\r\n",
                        blob.len() - from,
                        blob.len() - 1,
                        blob.len()
                    );
                    let _ = conn.write_all(head.as_bytes());
                    let _ = conn.write_all(&blob[from..]);
                }
            }
        });
        (addr, rx)
    }

    #[test]
    fn a_broken_blob_download_resumes_where_it_stopped() {
        let blob: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (addr, ranges) = flaky_server(blob.clone());
        let reference = Reference::parse(&format!("{addr}/r/blob:1")).unwrap();
        let client = Client::new(&reference, &ClientOptions::default()).unwrap();
        let d = Digest::of(&blob);
        let mut got = Vec::new();
        client
            .blob_reader(&d, blob.len() as u64)
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got.len(), blob.len());
        assert!(got == blob, "resumed bytes differ");
        assert_eq!(ranges.recv().unwrap(), "");
        let resumed = ranges.recv().unwrap();
        let from: usize = resumed
            .strip_prefix("bytes=")
            .and_then(|v| v.trim_end_matches('-').parse().ok())
            .unwrap_or_else(|| panic!("second request has no Range: {resumed:?}"));
        assert!(from > 0 && from <= blob.len() / 2, "resumed from {from}");
    }
}
