//! volumed: the per-host daemon. It owns the host's store (`DATA/store`, castore), runs
//! every FUSE mount through layerfs (scratch under `DATA/scratch/<id>`, live mounts
//! recorded in `DATA/mounts.json`), and serves Cap'n Proto (`schema`'s `store.capnp`,
//! bootstrap `Daemon`) on a Unix socket.
//!
//! The RPC side follows capnp-rpc's examples: a current-thread tokio runtime with a
//! `LocalSet`, one `RpcSystem` per connection. Store work (import, export, gc, fsck, ...)
//! runs on tokio's blocking pool so one long call never stalls other clients. Placement
//! policy and scheduling are not its business: with `--scheduler ADDR` it joins a
//! scheduler as a host (`link`), reporting its inventory and preparing the instances
//! and warm VMs it is asked for (`host`), but it decides nothing about where they run.

mod backup;
mod error;
mod exports;
mod guests;
mod host;
mod host_rpc;
mod layers;
mod link;
mod mounts;
mod scratch;
mod server;
mod vhost;
mod volume_rpc;
mod volumes;

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use capnp_rpc::{RpcSystem, rpc_twoparty_capnp, twoparty};
use clap::Parser;
use futures::AsyncReadExt;
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};

use mounts::MountTable;
use server::{DaemonImpl, Shared};
use volume_rpc::Endpoints;

/// Logs one line to stderr with a UTC timestamp.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("{} volumed: {}", $crate::timestamp(), format_args!($($arg)*))
    };
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for now, without a date crate.
pub(crate) fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        now.subsec_millis()
    )
}

#[derive(Debug, Parser)]
#[command(name = "volumed", version, about = "Tidedge host daemon")]
struct Args {
    /// Data directory: the store (DIR/store), scratch layers, the mount record.
    #[arg(long, env = "VOLUMED_DATA", value_name = "DIR")]
    data: PathBuf,
    /// Unix socket to serve Cap'n Proto on.
    #[arg(long, env = "VOLUMED_SOCKET", value_name = "PATH")]
    socket: PathBuf,
    /// Unix socket to serve NBD on (default DATA/nbd.sock).
    #[arg(long, env = "VOLUMED_NBD_SOCKET", value_name = "PATH")]
    nbd_socket: Option<PathBuf>,
    /// TCP address to serve NBD on (port 0 picks a free one; `none` to serve only the
    /// Unix socket). Loopback only, unless --nbd-allow-remote.
    #[arg(
        long,
        env = "VOLUMED_NBD_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:10809"
    )]
    nbd_listen: String,
    /// MiB of decompressed, verified volume extents kept in memory (shared by all
    /// volumes): random reads that hit it cost a copy instead of a read, a hash and a
    /// decompression of a whole extent.
    #[arg(long, env = "VOLUMED_VOLUME_CACHE_MIB", default_value_t = 1024)]
    volume_cache_mib: usize,
    /// MiB of decompressed, verified chunks kept for reads of layer devices (the EROFS
    /// images VMs boot from), shared by all of them. It stands in for the page cache an
    /// image file would have: a guest that drops its own cache and reads its root again
    /// (bench-block's tar) rereads it from here, not from RocksDB through zstd and
    /// SHA-256 again.
    #[arg(long, env = "VOLUMED_LAYER_CACHE_MIB", default_value_t = 1024)]
    layer_cache_mib: usize,
    /// MiB of synthesized EROFS metadata kept for layers no device serves right now
    /// (served ones are always kept; an evicted one is rebuilt in milliseconds).
    #[arg(long, env = "VOLUMED_EROFS_CACHE_MIB", default_value_t = 256)]
    erofs_cache_mib: usize,
    /// Size of each instance's scratch device (its writable upper layer, an ext4
    /// filesystem; sparse: only what the guest writes is stored).
    #[arg(long, env = "VOLUMED_SCRATCH_SIZE", value_name = "SIZE", default_value = "10G", value_parser = castore::parse_size)]
    scratch_size: u64,
    /// MiB of small volume writes held in memory (and in the journal) before they are
    /// folded into extents.
    #[arg(long, env = "VOLUMED_JOURNAL_MIB", default_value_t = 1024)]
    journal_mib: usize,
    /// Allow a non-loopback --nbd-listen address. NBD has no authentication: anyone who
    /// can reach the port can read and write every volume.
    #[arg(long)]
    nbd_allow_remote: bool,
    /// Join the scheduler at ADDR (HOST:PORT or unix:/path) as a host; without it
    /// volumed runs standalone. Several schedulers sharing etcd: a comma-separated
    /// list (ADDR,ADDR,...): the host registers with the one that leads and follows
    /// the leadership when it moves.
    #[arg(long, env = "VOLUMED_SCHEDULER", value_name = "ADDR[,ADDR...]")]
    scheduler: Option<String>,
    /// Milliseconds between heartbeats (default: what the scheduler asks for, else 2000).
    #[arg(long, env = "VOLUMED_HEARTBEAT_MS", value_name = "MS")]
    heartbeat_ms: Option<u32>,
    /// This host's id (default: generated once and kept in DATA/host-id).
    #[arg(long, env = "VOLUMED_HOST_ID", value_name = "ID")]
    host_id: Option<String>,
    /// Where this host's instances are reached (an IP or host name).
    #[arg(
        long,
        env = "VOLUMED_ADDRESS",
        value_name = "HOST",
        default_value = "127.0.0.1"
    )]
    address: String,
    /// vCPUs offered to instances (default: this machine's CPUs).
    #[arg(long, env = "VOLUMED_VCPUS", value_name = "N")]
    vcpus: Option<u32>,
    /// Memory offered to instances, in bytes or with a unit: 512M, 8G, 1.5T (default: all
    /// of this machine's RAM).
    #[arg(long, env = "VOLUMED_MEMORY", value_name = "SIZE", value_parser = castore::parse_size)]
    memory: Option<u64>,
    /// GPUs offered to instances.
    #[arg(long, env = "VOLUMED_GPUS", value_name = "N", default_value_t = 0)]
    gpus: u32,
    /// CPU architecture reported to the scheduler.
    #[arg(long, env = "VOLUMED_ARCH", value_name = "ARCH", default_value = std::env::consts::ARCH)]
    arch: String,
    /// Hypervisors to advertise, comma-separated (`none` for none). Default: those a
    /// driver here can launch on this host (qemu, when `qemu-system-x86_64 --version`
    /// runs). Given explicitly, the list is the operator's word.
    #[arg(
        long,
        env = "VOLUMED_HYPERVISORS",
        value_name = "LIST",
        value_delimiter = ','
    )]
    hypervisors: Option<Vec<String>>,
    /// A label for placement, KEY=VALUE (repeatable; the variable takes a comma list).
    #[arg(
        long = "label",
        env = "VOLUMED_LABELS",
        value_name = "KEY=VALUE",
        value_delimiter = ',',
        value_parser = host::parse_label
    )]
    labels: Vec<(String, String)>,
    /// The guest kernel instances boot (Debian's cloud kernel: `scripts/guest-image`
    /// prints where it put one). With --initramfs, volumed boots a VM for every
    /// instance it prepares; without, it prepares roots and devices only.
    #[arg(
        long,
        env = "VOLUMED_KERNEL",
        value_name = "PATH",
        requires = "initramfs"
    )]
    kernel: Option<PathBuf>,
    /// The guest initramfs (tide-init and the kernel's modules: `scripts/guest-image`).
    #[arg(
        long,
        env = "VOLUMED_INITRAMFS",
        value_name = "PATH",
        requires = "kernel"
    )]
    initramfs: Option<PathBuf>,
    /// How guests' CPUs run: kvm, tcg (emulation), or auto: KVM if a probe guest boots
    /// under it within 20 s (once per kernel; the answer is kept in DATA/accel), else
    /// TCG.
    #[arg(
        long,
        env = "VOLUMED_ACCEL",
        value_name = "ACCEL",
        default_value = "auto"
    )]
    accel: String,
    /// How guests reach their disks: `vhost-user` (a vhost-user-blk socket per disk,
    /// guest memory shared with volumed) or `nbd` (QEMU's NBD client on the NBD
    /// socket). vhost-user by default: in README's bench-vhost it matches or beats NBD
    /// and costs volumed less CPU per GiB.
    #[arg(
        long,
        env = "VOLUMED_DISK_TRANSPORT",
        value_name = "T",
        default_value = "vhost-user"
    )]
    disk_transport: String,
    /// Seconds from a guest's launch until its app must run (and answer on its port,
    /// if its service has one) before the prepare fails.
    #[arg(
        long,
        env = "VOLUMED_BOOT_TIMEOUT",
        value_name = "S",
        default_value_t = 120
    )]
    boot_timeout: u64,
    #[command(flatten)]
    tier: tier::TierArgs,
    /// With --tier: the most bytes of chunks (as stored, compressed) the host keeps.
    /// Chunks the tier holds are evicted least recently used first, in the background,
    /// down to 80% of it; chunks not yet pushed and volumes' chunks are never evicted.
    #[arg(long, env = "VOLUMED_CACHE_SIZE", value_name = "SIZE", value_parser = castore::parse_size)]
    cache_size: Option<u64>,
    /// With --tier: push every volume written since its last push this often (`10m`,
    /// `1h`), so a volume whose host dies is lost only back to then. Off by default.
    #[arg(long, env = "VOLUMED_BACKUP_EVERY", value_name = "DURATION", value_parser = sched::stack::parse_duration)]
    backup_every: Option<std::time::Duration>,
}

/// How often the evictor looks whether the store has grown.
const EVICT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// The longest the evictor goes without a pass.
const EVICT_AT_LEAST_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Keeps the store under its cache limit: a pass whenever chunks were fetched or the
/// store changed since the last one.
fn start_evictor(store: Arc<castore::Store>) {
    std::thread::Builder::new()
        .name("evict".into())
        .spawn(move || {
            let mut seen = None;
            let mut over = false;
            let mut idle = std::time::Duration::ZERO;
            loop {
                let now = (store.fetched().bytes, store.change_count());
                // Also once a minute regardless: volume writes do not move the counters,
                // and the pass writes the read times kept in memory out to the marks.
                if seen != Some(now) || idle >= EVICT_AT_LEAST_EVERY {
                    seen = Some(now);
                    idle = std::time::Duration::ZERO;
                    match store.evict() {
                        Ok(r) => {
                            if r.evicted_chunks > 0 {
                                log!(
                                    "cache: evicted {} chunks ({} B) in {:.2} s; {} B of {} B limit",
                                    r.evicted_chunks,
                                    r.evicted_bytes,
                                    r.seconds,
                                    r.remaining_bytes,
                                    r.limit
                                );
                            }
                            if r.over_limit() != over {
                                over = r.over_limit();
                                if over {
                                    log!(
                                        "cache: {} B held, over the {} B limit: the rest is pinned (not yet in the tier, or volumes')",
                                        r.remaining_bytes,
                                        r.limit
                                    );
                                }
                            }
                        }
                        Err(e) => log!("cache: eviction failed: {e:#}"),
                    }
                }
                std::thread::sleep(EVICT_EVERY);
                idle += EVICT_EVERY;
            }
        })
        .expect("spawning the evictor");
}

/// Binds `path`, replacing a socket file nobody listens on, refusing a live one.
fn bind(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("socket {} is served by another process", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => {
            log!("stopped");
        }
        Err(e) => {
            log!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(args: &Args) -> Result<()> {
    // NBD connections run on a runtime of their own, with a worker per core: the RPC
    // loop below is single-threaded (capnp-rpc is not Send).
    let nbd_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("nbd")
        .build()?;
    // The TCP port first: a second daemon that cannot have it leaves nothing behind.
    let tcp = nbd_rt.block_on(bind_nbd_tcp(args))?;
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating {}", args.data.display()))?;
    let store = Arc::new(castore::Store::open(args.data.join("store"))?);
    store.set_volume_cache_bytes(args.volume_cache_mib << 20);
    store.set_volume_journal_budget(args.journal_mib << 20);
    if let Some(t) = args.tier.open()? {
        log!("chunk tier {}", t.url());
        store.set_tier(t)?;
        if let Some(limit) = args.cache_size {
            log!("cache limit {limit} B");
            store.set_cache_limit(Some(limit));
            start_evictor(store.clone());
        }
    } else if args.cache_size.is_some() {
        bail!("--cache-size needs --tier: without a tier nothing can be evicted");
    } else if args.backup_every.is_some() {
        bail!("--backup-every needs --tier: the tier is where volumes are pushed");
    }
    let mounts = Arc::new(MountTable::new(&args.data));
    mounts
        .recover()
        .with_context(|| format!("cleaning up after the last run in {}", args.data.display()))?;
    let volumes = volumes::Volumes::open(store.clone(), &args.data)
        .with_context(|| format!("loading volume attachments in {}", args.data.display()))?;
    let layers = layers::Layers::new(
        store.clone(),
        args.layer_cache_mib << 20,
        args.erofs_cache_mib << 20,
    );
    let scheduler = args
        .scheduler
        .as_deref()
        .map(schedclient::parse_list)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--scheduler: {e}"))?;
    let config = host_config(args)?;
    if let Some(every) = args.backup_every {
        if every.is_zero() {
            bail!("--backup-every must be longer than 0");
        }
        log!("backup: pushing changed volumes every {every:?}");
        backup::start(store.clone(), every, config.host_id.clone());
    }
    let changed = Arc::new(tokio::sync::Notify::new());
    let exports = exports::HostExports::new(&volumes, &layers);
    let vhost = vhost::VhostUser::new(exports.clone(), &args.data, vhost::QUEUES);
    let guests = guest_config(args, &config)?.map(|c| {
        let n = changed.clone();
        Arc::new(guests::Guests::new(
            c,
            vhost.clone(),
            Arc::new(move || n.notify_one()),
        ))
    });
    // Prepared instances' roots are mounted again before anything is served.
    let scratch = scratch::Scratch::new(volumes.clone(), &args.data, args.scratch_size);
    let host = host::Host::open(
        config,
        store.clone(),
        mounts.clone(),
        volumes.clone(),
        layers.clone(),
        scratch,
        &args.data,
        guests.clone(),
        changed,
    )
    .with_context(|| format!("loading prepared instances in {}", args.data.display()))?;
    let endpoints = nbd_rt.block_on(start_nbd(args, exports, tcp))?;
    // Recorded vhost-user sockets are served again before guests (whose VMMs may be
    // reconnecting to them) are adopted.
    vhost.restore();
    // Recorded instances boot again now that their disks are served.
    host.boot_recorded();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let shared = Rc::new(Shared {
        store: store.clone(),
        mounts: mounts.clone(),
        volumes,
        layers,
        endpoints: endpoints.clone(),
        vhost: vhost.clone(),
        host_id: host.config.host_id.clone(),
    });
    if let Some(addrs) = scheduler {
        log!(
            "joining scheduler {} as host {} ({} vCPUs, {} bytes, {} GPUs, {}, hypervisors: {})",
            schedclient::join(&addrs),
            host.config.host_id,
            host.config.vcpus,
            host.config.memory,
            host.config.gpus,
            host.config.arch,
            if host.config.hypervisors.is_empty() {
                "none".to_string()
            } else {
                host.config.hypervisors.join(",")
            }
        );
        local.spawn_local(link::run(
            host.clone(),
            endpoints.clone(),
            addrs,
            args.heartbeat_ms,
        ));
    }
    // `serve` unmounts instances' roots with every other mount at shutdown; their
    // records stay in DATA/instances.json for the next run.
    let r = local.block_on(&rt, serve(args, shared));
    // Guests end before the disks they read go away.
    if let Some(g) = &guests {
        g.stop_all(host::STOP_GRACE);
    }
    // vhost-user sockets end with their sessions; recorded ones are served again at
    // the next start.
    vhost.stop_all();
    // Stop NBD first: every connection is dropped (its attachment released); requests
    // already on blocking threads finish. Nothing acknowledged is lost: FLUSH and FUA
    // were synced before their replies.
    nbd_rt.shutdown_timeout(std::time::Duration::from_secs(10));
    if !endpoints.unix_socket.is_empty() {
        let _ = std::fs::remove_file(&endpoints.unix_socket);
    }
    // Dropping the LocalSet drops every connection and capability; dropping the runtime
    // waits for blocking work still running (an import finishes or fails first).
    drop(local);
    drop(rt);
    // Our handle is the last one now: dropping it closes RocksDB, flushing the store.
    drop(store);
    r
}

/// How guests boot here (None: --kernel not given, no guests).
fn guest_config(args: &Args, host: &host::HostConfig) -> Result<Option<guests::GuestConfig>> {
    let (Some(kernel), Some(initramfs)) = (&args.kernel, &args.initramfs) else {
        return Ok(None);
    };
    for (flag, p) in [("--kernel", kernel), ("--initramfs", initramfs)] {
        if !p.is_file() {
            bail!("{flag} {}: no such file", p.display());
        }
    }
    let bind: std::net::Ipv4Addr = host.address.parse().with_context(|| {
        format!(
            "--address {:?}: guests' ports are forwarded on it, so it must be an IPv4 address",
            host.address
        )
    })?;
    let nbd = args
        .nbd_socket
        .clone()
        .unwrap_or_else(|| args.data.join("nbd.sock"));
    let dir = args.data.join("vms");
    let transport = guests::Transport::parse(&args.disk_transport).with_context(|| {
        format!(
            "--disk-transport {:?}: expected nbd or vhost-user",
            args.disk_transport
        )
    })?;
    let accel = match args.accel.as_str() {
        "auto" => guests::probe_accel(kernel, initramfs, &args.data),
        a => vmm::Accel::parse(a)
            .with_context(|| format!("--accel {a:?}: expected auto, kvm or tcg"))?,
    };
    log!(
        "guests boot {} with {} under {}",
        kernel.display(),
        initramfs.display(),
        accel.name()
    );
    Ok(Some(guests::GuestConfig {
        kernel: std::path::absolute(kernel)?,
        initramfs: std::path::absolute(initramfs)?,
        accel,
        bind,
        nbd_socket: std::path::absolute(nbd)?,
        transport,
        boot_timeout: std::time::Duration::from_secs(args.boot_timeout.max(1)),
        dir,
    }))
}

/// What this host offers, from the flags and the machine.
fn host_config(args: &Args) -> Result<host::HostConfig> {
    let host_id = match &args.host_id {
        Some(id) if id.trim().is_empty() => bail!("--host-id must not be empty"),
        Some(id) => id.trim().to_string(),
        None => host::persistent_host_id(&args.data)?,
    };
    let vcpus = match args.vcpus {
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
    };
    let memory = match args.memory {
        Some(m) => m,
        None => host::total_memory().context("reading /proc/meminfo (give --memory)")?,
    };
    let hypervisors = match &args.hypervisors {
        Some(list) => list
            .iter()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty() && h != "none")
            .collect(),
        None => host::detect_hypervisors(),
    };
    Ok(host::HostConfig {
        host_id,
        address: args.address.clone(),
        arch: args.arch.clone(),
        vcpus,
        memory,
        gpus: args.gpus,
        hypervisors,
        labels: args.labels.clone(),
    })
}

/// Binds `--nbd-listen` (None for `none`), saying once what to change if it is taken.
async fn bind_nbd_tcp(args: &Args) -> Result<Option<tokio::net::TcpListener>> {
    if args.nbd_listen == "none" {
        return Ok(None);
    }
    let addr: std::net::SocketAddr = args.nbd_listen.parse().with_context(|| {
        format!(
            "--nbd-listen {:?}: expected IP:PORT or none",
            args.nbd_listen
        )
    })?;
    match layerfs::nbd::Server::bind_tcp(addr, args.nbd_allow_remote).await {
        Ok(l) => Ok(Some(l)),
        Err(e @ layerfs::nbd::ListenError::Bind { .. })
            if std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .is_some_and(|s| s.kind() == std::io::ErrorKind::AddrInUse) =>
        {
            Err(anyhow::Error::new(e).context(format!(
                "NBD TCP address {addr} is in use (another volumed?); give another with \
                 --nbd-listen ADDR (port 0 picks a free one, none serves NBD on the Unix \
                 socket only)"
            )))
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("--nbd-listen {addr}"))),
    }
}

/// Binds the NBD Unix listener (before the RPC socket, so a daemon that serves RPC
/// serves NBD) and spawns the accept loops on the current (NBD) runtime, also for the
/// TCP listener bound before.
async fn start_nbd(
    args: &Args,
    exports: exports::HostExports,
    tcp: Option<tokio::net::TcpListener>,
) -> Result<Endpoints> {
    // One line per connection served and per export refused, and one when it ends.
    let server =
        layerfs::nbd::Server::new(Arc::new(exports), layerfs::nbd::ServerConfig::default())
            .on_event(|e| log!("{e}"));
    let path = args
        .nbd_socket
        .clone()
        .unwrap_or_else(|| args.data.join("nbd.sock"));
    let unix = bind(&path)?;
    let mut endpoints = Endpoints {
        unix_socket: std::path::absolute(&path)?.display().to_string(),
        tcp: String::new(),
    };
    let s = server.clone();
    tokio::spawn(async move {
        if let Err(e) = s.serve_unix(unix).await {
            log!("nbd unix listener stopped: {e}");
        }
    });
    if let Some(tcp) = tcp {
        endpoints.tcp = tcp.local_addr()?.to_string();
        tokio::spawn(async move {
            if let Err(e) = server.serve_tcp(tcp).await {
                log!("nbd tcp listener stopped: {e}");
            }
        });
    }
    log!(
        "serving NBD on {}{}",
        endpoints.unix_socket,
        if endpoints.tcp.is_empty() {
            String::new()
        } else {
            format!(" and {}", endpoints.tcp)
        }
    );
    Ok(endpoints)
}

/// One `RpcSystem` serving `bootstrap` over `stream` (a socket, or a pipe in tests).
fn connection(
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
    bootstrap: &schema::store_capnp::daemon::Client,
) -> RpcSystem<rpc_twoparty_capnp::Side> {
    let (reader, writer) = tokio_util::compat::TokioAsyncReadCompatExt::compat(stream).split();
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(reader),
        futures::io::BufWriter::new(writer),
        rpc_twoparty_capnp::Side::Server,
        Default::default(),
    );
    RpcSystem::new(Box::new(network), Some(bootstrap.clone().client))
}

async fn serve(args: &Args, shared: Rc<Shared>) -> Result<()> {
    let listener = bind(&args.socket)?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    log!(
        "serving {} on {} (pid {})",
        args.data.display(),
        args.socket.display(),
        std::process::id()
    );
    loop {
        tokio::select! {
            _ = term.recv() => { log!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { log!("SIGINT: shutting down"); break; }
            r = listener.accept() => {
                let stream = match r {
                    Ok((s, _)) => s,
                    Err(e) => { log!("accept: {e}"); continue; }
                };
                // One bootstrap per connection, so its requests are logged with its
                // client.
                let client: server::Client = layerfs::nbd::unix_peer_process(&stream)
                    .unwrap_or_else(|| "a client".to_string())
                    .into();
                let bootstrap: schema::store_capnp::daemon::Client =
                    capnp_rpc::new_client(DaemonImpl(shared.clone(), client.clone()));
                let rpc = connection(stream, &bootstrap);
                tokio::task::spawn_local(async move {
                    // A bad message or a vanished client ends this connection only.
                    if let Err(e) = rpc.await {
                        log!("{client}: connection closed: {e}");
                    }
                });
            }
        }
    }
    // Stop accepting first, so no client sees a half-shut daemon.
    drop(listener);
    let _ = std::fs::remove_file(&args.socket);
    for id in shared.mounts.close() {
        if let Err(e) = server::unmount(shared.mounts.clone(), id, true).await {
            log!("unmount {id}: {e}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The servers over an in-memory pipe: replies and errors, without a socket.

    use super::*;
    use schema::store_capnp::daemon;

    /// Runs `f` against a daemon over a fresh store, on a `LocalSet` as `main` does.
    fn with_daemon<F, Fut>(f: F)
    where
        F: FnOnce(daemon::Client, PathBuf) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().to_path_buf();
        let store = Arc::new(castore::Store::open(data.join("store")).unwrap());
        let mounts = Arc::new(MountTable::new(&data));
        mounts.recover().unwrap();
        let volumes = volumes::Volumes::open(store.clone(), &data).unwrap();
        let layers = layers::Layers::new(store.clone(), 16 << 20, 16 << 20);
        let vhost = vhost::VhostUser::new(
            exports::HostExports::new(&volumes, &layers),
            &data,
            vhost::QUEUES,
        );
        let shared = Rc::new(Shared {
            store,
            mounts,
            volumes,
            layers,
            endpoints: Endpoints::default(),
            vhost,
            host_id: "test-host".to_string(),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async move {
            let bootstrap: daemon::Client =
                capnp_rpc::new_client(DaemonImpl(shared, "the test".into()));
            let (server_end, client_end) = tokio::io::duplex(1 << 16);
            tokio::task::spawn_local(connection(server_end, &bootstrap));
            let (r, w) = tokio_util::compat::TokioAsyncReadCompatExt::compat(client_end).split();
            let network = Box::new(twoparty::VatNetwork::new(
                futures::io::BufReader::new(r),
                futures::io::BufWriter::new(w),
                rpc_twoparty_capnp::Side::Client,
                Default::default(),
            ));
            let mut rpc = RpcSystem::new(network, None);
            let client: daemon::Client = rpc.bootstrap(rpc_twoparty_capnp::Side::Server);
            tokio::task::spawn_local(rpc);
            f(client, data).await;
        });
    }

    fn reason(e: capnp::Error) -> String {
        assert_eq!(e.kind, capnp::ErrorKind::Failed, "{e}");
        e.extra
    }

    #[test]
    fn version_and_an_empty_store() {
        with_daemon(|d, _| async move {
            let v = d.version_request().send().promise.await.unwrap();
            assert_eq!(v.get().unwrap().get_version(), schema::store_capnp::VERSION);
            let store = d.store_request().send().pipeline.get_store();
            let r = store.images_request().send().promise.await.unwrap();
            assert_eq!(r.get().unwrap().get_images().unwrap().len(), 0);
            let r = store.stats_request().send().promise.await.unwrap();
            assert_eq!(r.get().unwrap().get_stats().unwrap().get_images(), 0);
        });
    }

    #[test]
    fn bad_requests_get_clear_errors() {
        with_daemon(|d, data| async move {
            let store = d.store_request().send().pipeline.get_store();
            let mut req = store.inspect_request();
            req.get().set_image("nope:1");
            let e = reason(req.send().promise.await.err().unwrap());
            assert!(e.contains("nope:1"), "{e}");

            let mut req = store.import_image_request();
            req.get().set_path("relative/dir");
            let e = reason(req.send().promise.await.err().unwrap());
            assert!(e.contains("must be an absolute path"), "{e}");

            let mut req = store.export_image_request();
            req.get().set_image("nope:1");
            req.get().set_path("-");
            let e = reason(req.send().promise.await.err().unwrap());
            assert!(e.contains("stdout"), "{e}");

            let mounts = d.mounts_request().send().pipeline.get_mounts();
            let mut req = mounts.umount_request();
            req.get().set_mountpoint("/nowhere");
            let e = reason(req.send().promise.await.err().unwrap());
            assert!(e.ends_with("nothing mounted by volumed at /nowhere"), "{e}");

            let mut req = mounts.mount_request();
            req.get().set_image("nope:1");
            req.get().set_mountpoint(data.to_str().unwrap());
            let e = reason(req.send().promise.await.err().unwrap());
            assert!(e.contains("nope:1"), "{e}");
            // A failed mount leaves no reservation, record or scratch behind.
            let r = mounts.list_request().send().promise.await.unwrap();
            assert_eq!(r.get().unwrap().get_mounts().unwrap().len(), 0);
            assert_eq!(std::fs::read_dir(data.join("scratch")).unwrap().count(), 0);

            // The connection still serves after all of that.
            let r = store.images_request().send().promise.await.unwrap();
            assert_eq!(r.get().unwrap().get_images().unwrap().len(), 0);
        });
    }
}
