//! A Garage cluster on loopback for tests and benchmarks: `garage` (built by `.ci/run`
//! into /var/tmp/tidedge-tools, or `GARAGE` / `PATH`), three nodes with replication 3,
//! each with its own ports and directories under the caller's, one bucket and one key.
//! Dropping it kills the nodes it started (their pids only).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::TierConfig;

/// The `garage` binary: `$GARAGE`, else /var/tmp/tidedge-tools/bin/garage, else `PATH`'s.
pub fn garage_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GARAGE") {
        return p.into();
    }
    let built = Path::new("/var/tmp/tidedge-tools/bin/garage");
    if built.exists() {
        return built.to_path_buf();
    }
    "garage".into()
}

/// One node of a [`Garage`] cluster.
#[derive(Debug)]
pub struct GarageNode {
    /// Its config file.
    pub config: PathBuf,
    /// Its S3 endpoint, `http://127.0.0.1:PORT`.
    pub s3: String,
    rpc: String,
    child: Option<Child>,
}

/// A running cluster.
#[derive(Debug)]
pub struct Garage {
    /// The nodes, in start order.
    pub nodes: Vec<GarageNode>,
    /// The bucket's name.
    pub bucket: String,
    /// The key's id and secret.
    pub key_id: String,
    /// The key's secret.
    pub secret: String,
    /// A credentials file holding the key (AWS shared credentials format).
    pub credentials: PathBuf,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn garage(config: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(garage_bin())
        .arg("-c")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} (built by .ci/run)", garage_bin().display()))?;
    if !out.status.success() {
        bail!(
            "garage {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value after `label` on its line of `garage key create`'s output.
fn field(text: &str, label: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .map(|v| v.trim().to_string())
}

impl Garage {
    /// Starts `n` nodes under `dir` (replication `min(n, 3)`), lays them out in one
    /// zone, and creates bucket `tidedge` with a key that may read and write it.
    pub fn start(dir: &Path, n: usize) -> Result<Garage> {
        let secret = {
            use std::io::Read;
            let mut b = [0u8; 32];
            std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        };
        let mut nodes = Vec::new();
        for i in 0..n {
            let d = dir.join(format!("garage{i}"));
            std::fs::create_dir_all(&d)?;
            let rpc = format!("127.0.0.1:{}", free_port()?);
            let s3 = format!("127.0.0.1:{}", free_port()?);
            let config = d.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    "metadata_dir = {meta:?}\ndata_dir = {data:?}\ndb_engine = \"lmdb\"\n\
                     replication_factor = {rf}\nrpc_bind_addr = \"{rpc}\"\n\
                     rpc_public_addr = \"{rpc}\"\nrpc_secret = \"{secret}\"\n\
                     [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"{s3}\"\n",
                    meta = d.join("meta"),
                    data = d.join("data"),
                    rf = n.min(3),
                ),
            )?;
            // Garage refuses a config holding a secret that others may read.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600))?;
            nodes.push(GarageNode {
                config,
                s3: format!("http://{s3}"),
                rpc,
                child: None,
            });
        }
        let mut g = Garage {
            nodes,
            bucket: "tidedge".to_string(),
            key_id: String::new(),
            secret: String::new(),
            credentials: dir.join("garage-credentials"),
        };
        for i in 0..n {
            g.start_node(i)?;
        }
        let first = g.nodes[0].config.clone();
        let mut ids = Vec::new();
        for node in &g.nodes {
            ids.push(wait_for(|| garage(&node.config, &["node", "id", "-q"]))?);
        }
        for id in &ids[1..] {
            garage(&first, &["node", "connect", id.trim()])?;
        }
        for id in &ids {
            let short = id.trim().split('@').next().unwrap_or_default();
            garage(
                &first,
                &["layout", "assign", "-z", "dc1", "-c", "1G", short],
            )?;
        }
        garage(&first, &["layout", "apply", "--version", "1"])?;
        let key = garage(&first, &["key", "create", "tidedge"])?;
        g.key_id = field(&key, "Key ID:").context("garage key create: no Key ID")?;
        g.secret = field(&key, "Secret key:").context("garage key create: no Secret key")?;
        garage(&first, &["bucket", "create", &g.bucket])?;
        garage(
            &first,
            &[
                "bucket", "allow", "--read", "--write", "--owner", &g.bucket, "--key", "tidedge",
            ],
        )?;
        std::fs::write(
            &g.credentials,
            format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                g.key_id, g.secret
            ),
        )?;
        // The layout takes a moment to reach every node: wait until a write succeeds.
        let tier = wait_for(|| crate::open(&g.config(0, "probe")))?;
        wait_for(|| tier.put("probe", b"ok").map_err(anyhow::Error::from))?;
        Ok(g)
    }

    /// Starts node `i` (again, after [`Garage::kill`]).
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        let log = std::fs::File::create(node.config.with_file_name("log"))?;
        let child = Command::new(garage_bin())
            .arg("-c")
            .arg(&node.config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} (built by .ci/run)", garage_bin().display()))?;
        node.child = Some(child);
        let rpc = node.rpc.clone();
        wait_for(|| Ok(std::net::TcpStream::connect(&rpc)?))?;
        Ok(())
    }

    /// Kills node `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A tier config for `s3://tidedge/PREFIX` through node `i`'s S3 endpoint.
    pub fn config(&self, i: usize, prefix: &str) -> TierConfig {
        TierConfig {
            url: format!("s3://{}/{prefix}", self.bucket),
            endpoint: Some(self.nodes[i].s3.clone()),
            region: Some("garage".to_string()),
            credentials: Some(self.credentials.clone()),
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// Retries `f` for up to 20 s.
fn wait_for<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > Duration::from_secs(20) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
