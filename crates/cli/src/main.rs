//! `tide`, the Tidedge command line. Every store command goes through [`api::StoreApi`]:
//! against a store opened in this process (`--store DIR`) or over Cap'n Proto to the
//! host daemon `volumed` (`--socket PATH`, [`remote::Remote`]). Mounts are served only by
//! the daemon. No storage logic lives here.
//!
//! The scheduler commands (`deploy`, `stack`, `variant`, `instance`, `pool`, `alias`,
//! `host`, `resolve`) talk to `sched` (`--scheduler ADDR`), see [`sched`].

mod api;
mod output;
mod remote;
mod sched;
mod traffic;
mod volume;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use castore::{ExportTarget, GcProgress, Progress, SourceFormat, Store};
use clap::{Parser, Subcommand};

use api::{Local, StoreApi};
use output::{human_bytes, print_json, table};
use remote::Remote;

#[derive(Debug, Parser)]
#[command(
    name = "tide",
    version,
    about = "Tidedge: layered VM roots from a deduplicating store"
)]
struct Cli {
    /// Store directory (opened directly; only one process may hold it).
    #[arg(long, global = true, env = "TIDE_STORE", value_name = "DIR")]
    store: Option<PathBuf>,
    /// volumed's Unix socket (the daemon owns the store; needed for mounts).
    #[arg(long, global = true, env = "TIDE_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The scheduler daemon: HOST:PORT or unix:/path; several schedulers sharing etcd
    /// as a comma-separated list (tide talks to the one that leads).
    #[arg(
        long,
        global = true,
        env = "TIDE_SCHEDULER",
        value_name = "ADDR[,ADDR...]"
    )]
    scheduler: Option<String>,
    /// Machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// With --store: the chunk tier that store caches (volumed has its own flags).
    #[command(flatten)]
    tier: tier::TierArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Images: import, list, inspect, export, remove.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Layers imported on their own.
    #[command(subcommand)]
    Layer(LayerCmd),
    /// Delete everything no image, layer or live user references.
    Gc,
    /// Verify every chunk digest and every reference.
    Fsck,
    /// Counts, chunks, logical / unique / stored bytes and dedup ratios: images, volumes,
    /// and the whole store.
    Stats,
    /// Mount an image (layers plus a writable scratch layer) through volumed, or list
    /// mounts with `tide mount ls`.
    Mount(MountArgs),
    /// Unmount a volumed mount and discard its scratch layer.
    Umount {
        /// The mountpoint.
        dir: PathBuf,
    },
    /// Block volumes served over NBD by volumed: create, snapshot, clone, resize, attach.
    #[command(subcommand)]
    Volume(volume::VolumeCmd),
    /// Deploy a stack file (or one of its variants) through the scheduler.
    Deploy {
        /// The stack file (format: crates/sched/examples/shop.toml).
        file: PathBuf,
        /// Also run this variant's UNIQUE services.
        #[arg(long)]
        variant: Option<String>,
        /// Show every host's verdict for each instance placed.
        #[arg(long)]
        explain: bool,
        /// Use this hypervisor for every instance placed (firecracker,
        /// cloud-hypervisor, qemu).
        #[arg(long)]
        hypervisor: Option<String>,
    },
    /// Deployed stacks: list, inspect, remove.
    #[command(subcommand)]
    Stack(sched::StackCmd),
    /// Variants of a stack: create from a file, list, remove.
    #[command(subcommand)]
    Variant(sched::VariantCmd),
    /// Placed instances.
    #[command(subcommand)]
    Instance(sched::InstanceCmd),
    /// Warm VM pools.
    #[command(subcommand)]
    Pool(sched::PoolCmd),
    /// Custom domains.
    #[command(subcommand)]
    Alias(sched::AliasCmd),
    /// Hosts registered with the scheduler.
    #[command(subcommand)]
    Host(sched::HostCmd),
    /// The schedulers given with --scheduler and which of them leads.
    #[command(subcommand)]
    Scheduler(sched::SchedulerCmd),
    /// Services by name, their scaling and serving instances, and (with --gateway) their
    /// traffic.
    #[command(subcommand)]
    Service(sched::ServiceCmd),
    /// Which instance serves a host name (starting one if it is scaled to zero).
    Resolve { hostname: String },
    /// An instance's log: its app's output and its host's lifecycle lines.
    Logs {
        /// The instance id (`tide instance ls`).
        instance: String,
        /// Keep printing what comes, until its VM ends.
        #[arg(short, long)]
        follow: bool,
        /// The guest kernel's console instead.
        #[arg(long)]
        console: bool,
    },
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct MountArgs {
    #[command(subcommand)]
    cmd: Option<MountCmd>,
    /// NAME:TAG, digest or digest prefix.
    #[arg(required = true)]
    image: Option<String>,
    /// Existing directory to mount on.
    #[arg(required = true)]
    dir: Option<PathBuf>,
    /// Refuse every write (no scratch layer).
    #[arg(long)]
    read_only: bool,
}

#[derive(Debug, Subcommand)]
enum MountCmd {
    /// List the daemon's live mounts with their scratch usage.
    Ls,
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Import a directory, tar (plain/gzip/zstd), OCI layout or `docker save` archive.
    Import {
        /// What to import.
        path: PathBuf,
        /// NAME:TAG to give the image (optional if the archive names itself).
        #[arg(long)]
        name: Option<String>,
        /// Skip detection: dir, tar, oci or docker.
        #[arg(long, value_parser = parse_format)]
        format: Option<SourceFormat>,
        /// What the image runs: a program, or a JSON array (`'["python3", "app.py"]'`).
        /// Replaces the input's.
        #[arg(long, value_name = "CMD", value_parser = parse_argv)]
        entrypoint: Option<Argv>,
        /// Its default arguments: a word, or a JSON array (`'[]'` clears them).
        #[arg(long, value_name = "ARGS", value_parser = parse_argv)]
        cmd: Option<Argv>,
        /// KEY=VALUE for its environment (repeatable; replaces the input's KEY).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Its working directory (absolute).
        #[arg(long)]
        workdir: Option<String>,
        /// The user it runs as: NAME, UID or UID:GID.
        #[arg(long)]
        user: Option<String>,
    },
    /// List named images.
    Ls,
    /// Show an image's layers and config.
    Inspect {
        /// NAME:TAG, digest or digest prefix.
        image: String,
    },
    /// Write an image (layers merged) to a directory or a .tar file (`-` for stdout).
    Export {
        /// NAME:TAG, digest or digest prefix.
        image: String,
        /// Target directory (new or empty) or FILE.tar.
        #[arg(long)]
        to: PathBuf,
    },
    /// Remove image names; data goes at the next gc.
    Rm {
        /// NAME:TAG to remove.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Send an image to the chunk tier (volumed --tier), so any host can start it.
    Push {
        /// NAME:TAG, digest or digest prefix.
        image: String,
    },
    /// Bring an image from the chunk tier (its records now, its chunks when read), or,
    /// given REGISTRY/REPOSITORY[:TAG][@sha256:HEX], from a container registry.
    Pull {
        /// NAME:TAG (":latest" implied) or sha256:HEX in the tier; or a registry
        /// reference (its first part a host: with a dot or a port, or localhost).
        image: String,
        /// Fetch every chunk now too (the whole image, as a registry pull would).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

/// The options of a pull from a container registry.
#[derive(Debug, clap::Args)]
struct RegistryArgs {
    /// Registry pulls: NAME:TAG to give the image (default REPOSITORY:TAG).
    #[arg(long)]
    name: Option<String>,
    /// Registry pulls: USER:PASSWORD for the registry (else the auth file's).
    #[arg(long, value_name = "USER:PASSWORD")]
    creds: Option<String>,
    /// Registry pulls: Docker-format auth file (default REGISTRY_AUTH_FILE, else
    /// $DOCKER_CONFIG/config.json, else ~/.docker/config.json).
    #[arg(long, value_name = "FILE")]
    authfile: Option<PathBuf>,
    /// Registry pulls: speak plain HTTP (a registry on loopback always does).
    #[arg(long)]
    plain_http: bool,
}

#[derive(Debug, Subcommand)]
enum LayerCmd {
    /// Import a directory or tar as a single layer.
    Import {
        /// What to import.
        path: PathBuf,
        /// Skip detection: dir or tar.
        #[arg(long, value_parser = parse_format)]
        format: Option<SourceFormat>,
    },
    /// List layers imported on their own.
    Ls,
    /// Write one layer (whiteouts as .wh. entries) to a directory or .tar file.
    Export {
        /// Layer digest (or a prefix of a lone layer's digest).
        layer: String,
        /// Target directory or FILE.tar.
        #[arg(long)]
        to: PathBuf,
    },
    /// Forget a lone layer; its data goes at the next gc.
    Rm {
        /// Layer digest or prefix.
        layer: String,
    },
    /// Write the EROFS image of one layer (the bytes its `layer/DIGEST` NBD export
    /// serves guests) to a file, for fsck.erofs, mount or a hypervisor.
    Erofs {
        /// Layer digest, or a unique prefix of a layer of a named image or a lone layer.
        layer: String,
        /// The image file to write (replaced whole).
        #[arg(long)]
        to: PathBuf,
    },
}

/// An argv given on the command line (one value to clap, not a list of values).
#[derive(Debug, Clone)]
struct Argv(Vec<String>);

/// `--entrypoint`/`--cmd`: a JSON array of strings, or one word.
fn parse_argv(s: &str) -> Result<Argv, String> {
    if s.trim_start().starts_with('[') {
        serde_json::from_str::<Vec<String>>(s)
            .map(Argv)
            .map_err(|e| format!("not a JSON array of strings: {e}"))
    } else if s.is_empty() {
        Err("empty: give a program, or a JSON array".into())
    } else {
        Ok(Argv(vec![s.to_string()]))
    }
}

/// One line for a push or a pull: what moved and what the other side had.
fn print_transfer(json: bool, push: bool, tier: &str, r: &castore::TierReport) {
    if json {
        print_json(&serde_json::json!({"tier": tier, "report": r}));
        return;
    }
    let what = r.name.clone().unwrap_or_else(|| r.image.short());
    let (verb, dir) = if push {
        ("pushed", "to")
    } else {
        ("pulled", "from")
    };
    let mut line = format!(
        "{verb} {what} {dir} {tier}: {} of {} objects ({}), {} already there, {:.2} s",
        r.transferred,
        r.objects,
        human_bytes(r.bytes),
        r.skipped,
        r.seconds
    );
    if r.chunks_remote > 0 {
        line.push_str(&format!(
            "; {} chunks stay in the tier until read",
            r.chunks_remote
        ));
    }
    println!("{line}");
}

fn parse_format(s: &str) -> Result<SourceFormat, String> {
    SourceFormat::parse(s).ok_or_else(|| format!("unknown format {s:?} (dir, tar, oci, docker)"))
}

fn open(cli: &Cli) -> Result<Box<dyn StoreApi>> {
    match (&cli.store, &cli.socket) {
        (Some(_), Some(_)) => {
            bail!("give either --store DIR (TIDE_STORE) or --socket PATH (TIDE_SOCKET), not both")
        }
        (Some(dir), None) => {
            let store = Store::open(dir)?;
            if let Some(t) = cli.tier.open()? {
                store.set_tier(t)?;
            }
            Ok(Box::new(Local(store)))
        }
        (None, Some(socket)) => Ok(Box::new(Remote::connect(socket)?)),
        (None, None) => bail!(
            "no store given: pass --store DIR (TIDE_STORE) or --socket PATH (TIDE_SOCKET) of volumed"
        ),
    }
}

/// Mounts and volumes live in the daemon: only `--socket` can serve them.
fn open_remote(cli: &Cli, what: &str) -> Result<Remote> {
    match (&cli.store, &cli.socket) {
        (_, None) => bail!(
            "{what} need the daemon: start volumed and pass --socket PATH (TIDE_SOCKET) instead of --store"
        ),
        (Some(_), Some(_)) => {
            bail!("give either --store DIR (TIDE_STORE) or --socket PATH (TIDE_SOCKET), not both")
        }
        (None, Some(socket)) => Remote::connect(socket),
    }
}

fn run_mount(cli: &Cli) -> Result<i32> {
    let remote = open_remote(cli, "mounts")?;
    match &cli.cmd {
        Cmd::Mount(MountArgs {
            cmd: Some(MountCmd::Ls),
            ..
        }) => {
            let mounts = remote.mounts()?;
            if cli.json {
                print_json(&mounts);
            } else {
                table(
                    &["MOUNTPOINT", "IMAGE", "NAME", "MODE", "SCRATCH"],
                    mounts
                        .iter()
                        .map(|m| {
                            vec![
                                m.mountpoint.display().to_string(),
                                m.image.short(),
                                m.name.clone(),
                                if m.read_only { "ro" } else { "rw" }.to_string(),
                                human_bytes(m.scratch_bytes),
                            ]
                        })
                        .collect(),
                );
            }
        }
        Cmd::Mount(MountArgs {
            image: Some(image),
            dir: Some(dir),
            read_only,
            ..
        }) => {
            let m = remote.mount(image, dir, *read_only)?;
            if cli.json {
                print_json(&m);
            } else {
                println!(
                    "mounted {image} ({}) at {}{}",
                    m.image.short(),
                    m.mountpoint.display(),
                    if m.read_only { " read-only" } else { "" }
                );
            }
        }
        Cmd::Umount { dir } => {
            remote.umount(dir)?;
            if cli.json {
                print_json(&serde_json::json!({"unmounted": dir}));
            } else {
                println!("unmounted {}", dir.display());
            }
        }
        _ => bail!("tide mount needs NAME:TAG DIR, or ls"),
    }
    Ok(0)
}

/// Runs `f` while a progress bar (on a terminal only) reads `poll` every 100 ms.
pub(crate) fn with_progress<T>(
    label: &str,
    poll: impl Fn() -> (u64, u64, String) + Sync,
    f: impl FnOnce() -> T,
) -> T {
    if !std::io::stderr().is_terminal() {
        return f();
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {msg}")
            .expect("valid template"),
    );
    bar.set_prefix(label.to_string());
    let done = std::sync::atomic::AtomicBool::new(false);
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                let (pos, len, msg) = poll();
                bar.set_length(len.max(pos));
                bar.set_position(pos);
                bar.set_message(msg);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let r = f();
        done.store(true, Ordering::Relaxed);
        r
    });
    bar.finish_and_clear();
    r
}

/// One section of `tide stats`.
fn print_data_stats(d: &castore::DataStats) {
    let bytes = |n: u64| format!("{n} ({})", human_bytes(n));
    println!("  chunks:        {}", d.chunks);
    println!("  logical bytes: {}", bytes(d.logical_bytes));
    println!("  unique bytes:  {}", bytes(d.unique_bytes));
    println!("  stored bytes:  {}", bytes(d.stored_bytes));
    println!("  dedup ratio:   {:.2}x", d.dedup_ratio);
    println!(
        "  total ratio:   {:.2}x (dedup and compression)",
        d.total_ratio
    );
}

fn import_progress(p: &Progress) -> (u64, u64, String) {
    let bytes = p.bytes.load(Ordering::Relaxed);
    let total = p.bytes_total.load(Ordering::Relaxed);
    let files = p.files.load(Ordering::Relaxed);
    (
        bytes,
        total,
        format!("{files} files, {}", human_bytes(bytes)),
    )
}

pub(crate) fn transfer_progress(p: &castore::TierProgress) -> (u64, u64, String) {
    let done = p.done.load(Ordering::Relaxed);
    let objects = p.objects.load(Ordering::Relaxed);
    let bytes = p.bytes.load(Ordering::Relaxed);
    (
        done,
        objects,
        format!("{done} of {objects} objects, {}", human_bytes(bytes)),
    )
}

/// The scheduler command `cli.cmd` is, if it is one.
fn sched_command(cmd: &Cmd) -> Option<sched::Command<'_>> {
    Some(match cmd {
        Cmd::Deploy {
            file,
            variant,
            explain,
            hypervisor,
        } => sched::Command::Deploy {
            file,
            variant: variant.as_deref(),
            explain: *explain,
            hypervisor: hypervisor.as_deref(),
        },
        Cmd::Stack(c) => sched::Command::Stack(c),
        Cmd::Variant(c) => sched::Command::Variant(c),
        Cmd::Instance(c) => sched::Command::Instance(c),
        Cmd::Pool(c) => sched::Command::Pool(c),
        Cmd::Alias(c) => sched::Command::Alias(c),
        Cmd::Host(c) => sched::Command::Host(c),
        Cmd::Scheduler(sched::SchedulerCmd::Ls) => sched::Command::Schedulers,
        Cmd::Service(c) => sched::Command::Service(c),
        Cmd::Resolve { hostname } => sched::Command::Resolve(hostname),
        Cmd::Logs {
            instance,
            follow,
            console,
        } => sched::Command::Logs {
            instance,
            follow: *follow,
            console: *console,
        },
        _ => return None,
    })
}

fn run(cli: &Cli) -> Result<i32> {
    if let Some(cmd) = sched_command(&cli.cmd) {
        let Some(addr) = &cli.scheduler else {
            bail!(
                "scheduler commands need the scheduler: pass --scheduler ADDR (TIDE_SCHEDULER), HOST:PORT or unix:/path"
            );
        };
        sched::run(addr, cli.json, cmd)?;
        return Ok(0);
    }
    if matches!(cli.cmd, Cmd::Mount(_) | Cmd::Umount { .. }) {
        return run_mount(cli);
    }
    if let Cmd::Volume(cmd) = &cli.cmd {
        volume::run(&open_remote(cli, "volumes")?, cli.json, cmd)?;
        return Ok(0);
    }
    let api = open(cli)?;
    match &cli.cmd {
        Cmd::Image(ImageCmd::Import {
            path,
            name,
            format,
            entrypoint,
            cmd,
            env,
            workdir,
            user,
        }) => {
            let progress = Arc::new(Progress::default());
            let opts = castore::ImportOptions {
                format: *format,
                progress: progress.clone(),
                config: castore::ConfigOverride {
                    entrypoint: entrypoint.clone().map(|a| a.0),
                    cmd: cmd.clone().map(|a| a.0),
                    env: env.clone(),
                    workdir: workdir.clone(),
                    user: user.clone(),
                },
            };
            let r = with_progress(
                "import",
                || import_progress(&progress),
                || api.import_image(path, name.as_deref(), &opts),
            )?;
            if cli.json {
                print_json(&r);
            } else {
                println!(
                    "imported {} as {} ({} layer{}): {} file{}, {} in {:.2}s; {} new chunks, {} stored",
                    path.display(),
                    r.name.as_deref().unwrap_or("?"),
                    r.layers.len(),
                    if r.layers.len() == 1 { "" } else { "s" },
                    r.files,
                    if r.files == 1 { "" } else { "s" },
                    human_bytes(r.logical_bytes),
                    r.seconds,
                    r.new_chunks,
                    human_bytes(r.new_stored_bytes),
                );
                if let Some(d) = r.image {
                    println!("{d}");
                }
            }
        }
        Cmd::Image(ImageCmd::Ls) => {
            let images = api.images()?;
            if cli.json {
                print_json(&images);
            } else {
                table(
                    &["NAME", "IMAGE", "LAYERS", "SIZE"],
                    images
                        .iter()
                        .map(|i| {
                            vec![
                                i.name.clone(),
                                i.digest.short(),
                                i.layers.to_string(),
                                human_bytes(i.size),
                            ]
                        })
                        .collect(),
                );
            }
        }
        Cmd::Image(ImageCmd::Inspect { image }) => {
            let d = api.inspect(image)?;
            if cli.json {
                print_json(&d);
            } else {
                println!("image:        {}", d.digest);
                println!("names:        {}", d.names.join(", "));
                println!("size:         {}", human_bytes(d.size));
                println!("architecture: {}/{}", d.os, d.architecture);
                if !d.entrypoint.is_empty() {
                    println!("entrypoint:   {:?}", d.entrypoint);
                }
                if !d.cmd.is_empty() {
                    println!("cmd:          {:?}", d.cmd);
                }
                if !d.workdir.is_empty() {
                    println!("workdir:      {}", d.workdir);
                }
                if !d.user.is_empty() {
                    println!("user:         {}", d.user);
                }
                for e in &d.env {
                    println!("env:          {e}");
                }
                println!("layers:");
                table(
                    &["  LAYER", "ENTRIES", "SIZE", "DIFF_ID"],
                    d.layers
                        .iter()
                        .map(|l| {
                            vec![
                                format!("  {}", l.digest),
                                l.entries.to_string(),
                                human_bytes(l.size),
                                l.diff_id.map(|d| d.short()).unwrap_or_default(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        Cmd::Image(ImageCmd::Export { image, to }) => {
            let r = api.export_image(image, &ExportTarget::from_path(to))?;
            if cli.json {
                print_json(&r);
            } else if to.as_os_str() != "-" {
                println!(
                    "exported {image} to {}: {} entries, {}",
                    to.display(),
                    r.entries,
                    human_bytes(r.bytes)
                );
            }
        }
        Cmd::Image(ImageCmd::Rm { names }) => {
            let mut removed = Vec::new();
            for n in names {
                let d = api.remove_image(n)?;
                removed.push(serde_json::json!({"name": n, "image": d}));
                if !cli.json {
                    println!("removed {n} ({})", d.short());
                }
            }
            if cli.json {
                print_json(&removed);
            }
        }
        Cmd::Image(ImageCmd::Push { image }) => {
            let progress = Arc::new(castore::TierProgress::default());
            let (tier, r) = with_progress(
                "push",
                || transfer_progress(&progress),
                || api.push_image(image, &progress),
            )?;
            print_transfer(cli.json, true, &tier, &r);
        }
        Cmd::Image(ImageCmd::Pull {
            image,
            all,
            registry: reg,
        }) => {
            if registry::names_registry(image) {
                if *all {
                    bail!("--all is for tier pulls: a registry pull always fetches whole layers");
                }
                pull_from_registry(&*api, cli.json, image, reg)?;
                return Ok(0);
            }
            if reg.name.is_some() || reg.creds.is_some() || reg.authfile.is_some() || reg.plain_http
            {
                bail!(
                    "{image} is not a registry reference (REGISTRY/REPOSITORY[:TAG]): --name, --creds, --authfile and --plain-http are for registry pulls"
                );
            }
            let progress = Arc::new(castore::TierProgress::default());
            let (tier, r) = with_progress(
                "pull",
                || transfer_progress(&progress),
                || api.pull_image(image, *all, &progress),
            )?;
            print_transfer(cli.json, false, &tier, &r);
        }
        Cmd::Layer(LayerCmd::Import { path, format }) => {
            let progress = Arc::new(Progress::default());
            let r = with_progress(
                "import",
                || import_progress(&progress),
                || api.import_layer(path, *format, progress.clone()),
            )?;
            if cli.json {
                print_json(&r);
            } else {
                println!(
                    "imported layer {} from {}: {} file{}, {} in {:.2}s; {} new chunks, {} stored",
                    r.layers[0],
                    path.display(),
                    r.files,
                    if r.files == 1 { "" } else { "s" },
                    human_bytes(r.logical_bytes),
                    r.seconds,
                    r.new_chunks,
                    human_bytes(r.new_stored_bytes),
                );
            }
        }
        Cmd::Layer(LayerCmd::Ls) => {
            let layers = api.layers()?;
            if cli.json {
                print_json(&layers);
            } else {
                table(
                    &["LAYER", "ENTRIES", "SIZE"],
                    layers
                        .iter()
                        .map(|l| {
                            vec![
                                l.digest.to_string(),
                                l.entries.to_string(),
                                human_bytes(l.size),
                            ]
                        })
                        .collect(),
                );
            }
        }
        Cmd::Layer(LayerCmd::Export { layer, to }) => {
            let r = api.export_layer(layer, &ExportTarget::from_path(to))?;
            if cli.json {
                print_json(&r);
            } else if to.as_os_str() != "-" {
                println!(
                    "exported layer to {}: {} entries, {}",
                    to.display(),
                    r.entries,
                    human_bytes(r.bytes)
                );
            }
        }
        Cmd::Layer(LayerCmd::Erofs { layer, to }) => {
            let r = api.layer_erofs(layer, to)?;
            if cli.json {
                print_json(&r);
            } else {
                println!(
                    "wrote the EROFS image of layer {} to {}: {} ({} inodes, {} of metadata, {} of data; synthesized in {:.1} ms)",
                    r.layer,
                    r.path,
                    human_bytes(r.bytes),
                    r.inodes,
                    human_bytes(r.metadata_bytes),
                    human_bytes(r.data_bytes),
                    r.build_ms
                );
                for x in &r.dropped_xattrs {
                    println!(
                        "  not carried (EROFS has no such namespace, or it is overlayfs's own): {x}"
                    );
                }
            }
        }
        Cmd::Layer(LayerCmd::Rm { layer }) => {
            api.remove_layer(layer)?;
            if cli.json {
                print_json(&serde_json::json!({"removed": layer}));
            } else {
                println!("removed layer {layer}");
            }
        }
        Cmd::Gc => {
            let progress = GcProgress::default();
            let r = with_progress(
                "gc",
                || {
                    let m = progress.marked.load(Ordering::Relaxed);
                    let s = progress.swept.load(Ordering::Relaxed);
                    (0, 0, format!("{m} marked, {s} swept"))
                },
                || api.gc(&progress),
            )?;
            if cli.json {
                print_json(&r);
            } else {
                println!(
                    "kept {} objects; removed {} images, {} layers, {} trees, {} blobs, {} chunks ({} freed)",
                    r.kept,
                    r.images,
                    r.layers,
                    r.trees,
                    r.blobs,
                    r.chunks,
                    human_bytes(r.freed_bytes)
                );
            }
        }
        Cmd::Fsck => {
            let r = api.fsck()?;
            if cli.json {
                print_json(&r);
            } else {
                println!(
                    "checked {} chunks, {} blobs, {} trees, {} layers, {} images, {} refs",
                    r.chunks, r.blobs, r.trees, r.layers, r.images, r.refs
                );
                if r.tiered_chunks > 0 {
                    println!("{} chunks are only in the tier", r.tiered_chunks);
                }
                for p in &r.problems {
                    println!("BROKEN {} {}: {}", p.object, p.name, p.problem);
                }
                if r.is_clean() {
                    println!("store is consistent");
                } else {
                    println!("{} problems", r.problems.len());
                }
            }
            return Ok(if r.is_clean() { 0 } else { 1 });
        }
        Cmd::Stats => {
            let s = api.stats()?;
            if cli.json {
                print_json(&s);
            } else {
                let plural = |n: u64, one: &str, many: &str| {
                    format!("{n} {}", if n == 1 { one } else { many })
                };
                println!(
                    "images:          {} ({}, {}, {})",
                    s.images,
                    plural(s.layers, "layer", "layers"),
                    plural(s.trees, "tree", "trees"),
                    plural(s.blobs, "blob", "blobs")
                );
                print_data_stats(&s.image_data);
                println!(
                    "volumes:         {} ({})",
                    s.volumes,
                    plural(s.snapshots, "snapshot", "snapshots")
                );
                print_data_stats(&s.volume_data);
                println!("store:           images and volumes together (a chunk both name, once)");
                print_data_stats(&s.store);
                println!("  on disk:       {}", human_bytes(s.disk_bytes));
                if let Some(t) = &s.tier {
                    println!("tier:            {}", t.url);
                    println!(
                        "  chunks:        {} in the tier, {} of them only there",
                        t.tiered_chunks, t.remote_chunks
                    );
                    println!(
                        "  fetched:       {} objects, {} since the store opened",
                        t.fetched_objects,
                        human_bytes(t.fetched_bytes)
                    );
                    println!(
                        "  cache:         {} local: {} also in the tier, {} pinned; limit {}",
                        human_bytes(t.local_bytes),
                        human_bytes(t.tiered_bytes),
                        human_bytes(t.pinned_bytes),
                        t.cache_limit.map_or("none".to_string(), human_bytes)
                    );
                    if t.evicted_chunks > 0 {
                        println!(
                            "  evicted:       {} chunks, {} since the store opened",
                            t.evicted_chunks,
                            human_bytes(t.evicted_bytes)
                        );
                    }
                }
            }
        }
        Cmd::Mount(_) | Cmd::Umount { .. } | Cmd::Volume(_) => {
            unreachable!("handled by run_mount and volume::run")
        }
        Cmd::Deploy { .. }
        | Cmd::Stack(_)
        | Cmd::Variant(_)
        | Cmd::Instance(_)
        | Cmd::Pool(_)
        | Cmd::Alias(_)
        | Cmd::Host(_)
        | Cmd::Scheduler(_)
        | Cmd::Service(_)
        | Cmd::Resolve { .. }
        | Cmd::Logs { .. } => unreachable!("handled by sched::run"),
    }
    Ok(0)
}

fn main() {
    // Die quietly on a closed pipe (`tide image ls | head -1`) like other Unix tools,
    // instead of panicking in println!.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // castore errors already carry their causes in their message: one line.
            eprintln!("tide: error: {e}");
            std::process::exit(1);
        }
    }
}

/// `tide image pull REGISTRY/REPOSITORY[:TAG]`: credentials from `--creds` or the auth
/// file, the pull done by the store (in-process or the daemon).
fn pull_from_registry(
    api: &dyn StoreApi,
    json: bool,
    image: &str,
    reg: &RegistryArgs,
) -> Result<()> {
    let credentials = match &reg.creds {
        Some(c) => Some(
            registry::Credentials::parse(c)
                .ok_or_else(|| anyhow!("--creds must be USER:PASSWORD"))?,
        ),
        None => {
            let reference = registry::Reference::parse(image)?;
            match reg.authfile.clone().or_else(registry::default_auth_file) {
                Some(f) => registry::credentials_from_file(&f, &reference.registry)?,
                None => None,
            }
        }
    };
    let req = registry::PullRequest {
        reference: image.to_string(),
        name: reg.name.clone(),
        credentials,
        plain_http: reg.plain_http,
    };
    let progress = Arc::new(Progress::default());
    let r = with_progress(
        "pull",
        || import_progress(&progress),
        || api.pull_registry(&req, progress.clone()),
    )?;
    if json {
        print_json(&r);
    } else {
        println!(
            "pulled {} as {} ({}, manifest {}): {} layer{}, {} fetched ({}), {} already here; {} files, {} in {:.2}s; {} new chunks, {} stored",
            r.reference,
            r.import.name.as_deref().unwrap_or(""),
            r.platform,
            r.manifest.short(),
            r.layers,
            if r.layers == 1 { "" } else { "s" },
            r.layers - r.layers_reused,
            human_bytes(r.fetched_bytes),
            r.layers_reused,
            r.import.files,
            human_bytes(r.import.logical_bytes),
            r.seconds,
            r.import.new_chunks,
            human_bytes(r.import.new_stored_bytes),
        );
    }
    Ok(())
}
