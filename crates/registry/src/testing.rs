//! A real registry for tests: Debian's `docker-registry` (the CNCF distribution
//! registry, 2.8) on loopback with token auth, its tokens issued by a small token
//! service here that signs them (RS256, `x5c` header) with a key made by `openssl`;
//! and images built from tars and pushed with [`Client`]'s upload calls.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use castore::Digest;

use crate::{Client, ClientOptions, Credentials, Reference, client::media};

const SERVICE: &str = "tidedge-test-registry";
const ISSUER: &str = "tidedge-test-token";

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The token service: `GET /token?service=S&scope=repository:NAME:ACTIONS` with Basic
/// credentials of its one user gets a signed token granting what was asked; anything
/// else gets 401.
#[derive(Debug)]
pub struct TokenServer {
    port: u16,
    cert: PathBuf,
    /// Tokens issued.
    pub issued: Arc<AtomicU64>,
    /// Requests refused.
    pub refused: Arc<AtomicU64>,
}

impl TokenServer {
    /// Makes a key and certificate in `dir` and serves tokens to `user`.
    pub fn start(dir: &Path, user: Credentials) -> TokenServer {
        std::fs::create_dir_all(dir).unwrap();
        let key = dir.join("token.key");
        let cert = dir.join("token.crt");
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=tidedge-test-token",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::piped()));
        let der = run(Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let issued = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let (i, r) = (issued.clone(), refused.clone());
        let header = b64url(
            serde_json::json!({"typ": "JWT", "alg": "RS256",
                               "x5c": [base64::engine::general_purpose::STANDARD.encode(&der)]})
            .to_string()
            .as_bytes(),
        );
        let scratch = dir.to_path_buf();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                match serve_token(conn, &user, &key, &header, &scratch) {
                    true => i.fetch_add(1, Ordering::Relaxed),
                    false => r.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
        TokenServer {
            port,
            cert,
            issued,
            refused,
        }
    }

    /// The realm URL.
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(h, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Answers one token request; true if a token was issued.
fn serve_token(
    conn: TcpStream,
    user: &Credentials,
    key: &Path,
    header: &str,
    scratch: &Path,
) -> bool {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut request_line = String::new();
    let _ = reader.read_line(&mut request_line);
    let mut authorization = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("authorization")
        {
            authorization = Some(v.trim().to_string());
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("");
    let query = target.split_once('?').map(|q| q.1).unwrap_or("");
    let param = |n: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == n)
            .map(|(_, v)| percent_decode(v))
    };
    let expect = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", user.username, user.password))
    );
    let mut conn = conn;
    if authorization.as_deref() != Some(expect.as_str())
        || param("service").as_deref() != Some(SERVICE)
    {
        let _ = conn.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: 60\r\nConnection: close\r\n\r\n{\"errors\":[{\"code\":\"UNAUTHORIZED\",\"message\":\"bad login\"}]}",
        );
        return false;
    }
    let access: Vec<serde_json::Value> = param("scope")
        .into_iter()
        .flat_map(|s| {
            s.split(' ')
                .filter_map(|one| {
                    let mut p = one.splitn(3, ':');
                    let (kind, name, actions) = (p.next()?, p.next()?, p.next()?);
                    Some(serde_json::json!({"type": kind, "name": name,
                        "actions": actions.split(',').collect::<Vec<_>>()}))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = b64url(
        serde_json::json!({"iss": ISSUER, "sub": user.username, "aud": SERVICE,
            "exp": now + 600, "nbf": now - 10, "iat": now,
            "jti": format!("{now}-{}", std::process::id()), "access": access})
        .to_string()
        .as_bytes(),
    );
    let signing_input = format!("{header}.{claims}");
    let input_file = tempfile::NamedTempFile::new_in(scratch).unwrap();
    std::fs::write(input_file.path(), &signing_input).unwrap();
    let sig = run(Command::new("openssl")
        .args(["dgst", "-sha256", "-binary", "-sign"])
        .arg(key)
        .arg(input_file.path()));
    let token = format!("{signing_input}.{}", b64url(&sig));
    let body =
        serde_json::json!({"token": token, "access_token": token, "expires_in": 600}).to_string();
    let _ = write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    true
}

/// A `docker-registry` process on loopback, storing under its directory; killed on drop.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub host: String,
    storage: PathBuf,
}

impl Registry {
    /// Starts the registry in `dir`, with token auth from `auth` if given (else open).
    pub fn start(dir: &Path, auth: Option<&TokenServer>) -> Registry {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let storage = dir.join("storage");
        let auth_section = match auth {
            Some(t) => format!(
                "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
                t.realm(),
                t.cert.display()
            ),
            None => String::new(),
        };
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: 127.0.0.1:{port}\n{auth_section}",
                storage.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry (Debian package docker-registry) starts");
        let mut reg = Registry {
            child,
            host: format!("127.0.0.1:{port}"),
            storage,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(s)) = reg.child.try_wait() {
                panic!(
                    "docker-registry exited ({s}): {}",
                    std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "docker-registry did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        reg
    }

    /// A reference to `repo:tag` (or `repo@digest`) on this registry.
    pub fn reference(&self, repo_and_tag: &str) -> Reference {
        Reference::parse(&format!("{}/{repo_and_tag}", self.host)).unwrap()
    }

    /// A client for `repo` with `creds`.
    pub fn client(&self, repo: &str, creds: Option<Credentials>) -> Client {
        let opts = ClientOptions {
            credentials: creds,
            ..ClientOptions::default()
        };
        Client::new(&self.reference(&format!("{repo}:x")), &opts).unwrap()
    }

    /// Where the registry keeps blob `d`'s bytes (to damage them in a test).
    pub fn blob_file(&self, d: &Digest) -> PathBuf {
        let hex = d.to_hex();
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A layer to push: the blob's bytes as pushed (a tar, maybe compressed) and the
/// SHA-256 of the uncompressed tar.
#[derive(Debug, Clone)]
pub struct TestLayer {
    /// The blob.
    pub blob: Vec<u8>,
    /// Its `diff_id`.
    pub diff_id: Digest,
    /// Its media type.
    pub media_type: &'static str,
}

impl TestLayer {
    /// A layer from an uncompressed tar, compressed as `compression` says ("gzip",
    /// "zstd" or "none") by the system's own tool.
    pub fn from_tar(tar: &Path, compression: &str) -> TestLayer {
        let raw = std::fs::read(tar).unwrap();
        let diff_id = Digest::of(&raw);
        let (blob, media_type) = match compression {
            "gzip" => (
                run(Command::new("gzip").args(["-c", "-n", "-6"]).arg(tar)),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            ),
            "zstd" => (
                run(Command::new("zstd").args(["-c", "-q", "-3"]).arg(tar)),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
            _ => (raw, "application/vnd.oci.image.layer.v1.tar"),
        };
        TestLayer {
            blob,
            diff_id,
            media_type,
        }
    }
}

/// A manifest pushed by [`push_image`].
#[derive(Debug, Clone)]
pub struct Pushed {
    /// Its digest.
    pub digest: Digest,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// Pushes an image of `layers` for `arch` (its blobs, config, and an OCI manifest by
/// digest). `cmd` is the config's Cmd.
pub fn push_image(client: &Client, arch: &str, layers: &[TestLayer], cmd: &[&str]) -> Pushed {
    push_with(client, arch, layers, cmd, false)
}

/// As [`push_image`], with Docker's media types (schema 2 manifest, container config,
/// `rootfs.diff.tar.gzip` layers: give gzip layers), as `docker push` writes them.
pub fn push_docker_image(
    client: &Client,
    arch: &str,
    layers: &[TestLayer],
    cmd: &[&str],
) -> Pushed {
    push_with(client, arch, layers, cmd, true)
}

fn push_with(
    client: &Client,
    arch: &str,
    layers: &[TestLayer],
    cmd: &[&str],
    docker: bool,
) -> Pushed {
    let (manifest_type, config_type) = if docker {
        (
            media::DOCKER_MANIFEST,
            "application/vnd.docker.container.image.v1+json",
        )
    } else {
        (media::OCI_MANIFEST, media::OCI_CONFIG)
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": cmd},
        "rootfs": {"type": "layers",
                   "diff_ids": layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>()}
    }))
    .unwrap();
    let config_digest = client.push_blob(&config).unwrap();
    let mut descs = Vec::new();
    for l in layers {
        let d = client.push_blob(&l.blob).unwrap();
        let layer_type = if docker {
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        } else {
            l.media_type
        };
        descs.push(
            serde_json::json!({"mediaType": layer_type, "digest": d.to_string(),
                                      "size": l.blob.len()}),
        );
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": manifest_type,
        "config": {"mediaType": config_type, "digest": config_digest.to_string(),
                   "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    let d = Digest::of(&manifest);
    client
        .push_manifest(&d.to_string(), manifest_type, &manifest)
        .unwrap();
    Pushed {
        digest: d,
        bytes: manifest,
    }
}

/// Pushes an index of `manifests` (each with its architecture) under `tag`.
pub fn push_index(client: &Client, tag: &str, manifests: &[(&Pushed, &str)]) -> Digest {
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": media::OCI_INDEX,
        "manifests": manifests.iter().map(|(m, arch)| serde_json::json!({
            "mediaType": media::OCI_MANIFEST, "digest": m.digest.to_string(),
            "size": m.bytes.len(),
            "platform": {"os": "linux", "architecture": arch}})).collect::<Vec<_>>(),
    }))
    .unwrap();
    client.push_manifest(tag, media::OCI_INDEX, &index).unwrap()
}
