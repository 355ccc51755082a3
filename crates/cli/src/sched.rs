//! The scheduler commands (`tide deploy`, `stack`, `variant`, `instance`, `pool`,
//! `alias`, `host`, `resolve`), over Cap'n Proto to `sched` (`--scheduler ADDR`:
//! `HOST:PORT` or `unix:/path`). Replies are converted to plain serde rows here, printed
//! as tables or, with `--json`, as JSON. No scheduling logic lives here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;
use schema::sched_capnp::{
    deploy_report, host_info, instance_info, pool_info, route_info, scheduler, stack, stack_summary,
};
use serde::Serialize;

use crate::output::{emit, human_bytes, table};

#[derive(Debug, Subcommand)]
pub(crate) enum StackCmd {
    /// List deployed stacks.
    Ls,
    /// Show a stack's summary and its file as deployed.
    Inspect {
        /// The stack's name.
        name: String,
    },
    /// Remove a stack, its variants and their instances.
    Rm {
        /// The stack's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum VariantCmd {
    /// Deploy a variant file (`[variant]` with name and parent).
    Create {
        /// The variant file.
        file: PathBuf,
        /// Every host's verdict for each instance placed.
        #[arg(long)]
        explain: bool,
    },
    /// List a stack's variants.
    Ls {
        /// The parent stack.
        stack: String,
    },
    /// Remove a variant and its instances.
    Rm {
        /// The parent stack.
        stack: String,
        /// The variant.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum InstanceCmd {
    /// List every placed instance, with its VM's state and where it answers.
    Ls,
    /// Stop an instance's VM (SIGTERM to its app, then the VM); it stays placed.
    Stop {
        /// The instance id.
        id: String,
    },
    /// Restart an instance's VM: the same root (fresh scratch), the same volumes.
    Restart {
        /// The instance id.
        id: String,
    },
    /// Move an instance to another host while its own is up: it is stopped there, its
    /// read-write-once volumes pushed to the chunk tier, and it is prepared on the new
    /// host with them.
    Move {
        /// The instance id.
        id: String,
        /// The host to move it to (default: where placement puts it, not its own).
        #[arg(long)]
        to: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum PoolCmd {
    /// Create a warm pool on a layer stack or an image's layers.
    Create {
        /// The pool's name (a DNS label).
        name: String,
        /// Layer digests, bottom first, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            conflicts_with = "image",
            required_unless_present = "image"
        )]
        layers: Vec<String>,
        /// NAME:TAG whose layers the pool boots.
        #[arg(long)]
        image: Option<String>,
        /// Warm VMs kept booted (refilled after each conversion).
        #[arg(long, default_value_t = 1)]
        min: u32,
        /// At most this many warm VMs.
        #[arg(long, default_value_t = 4)]
        max: u32,
    },
    /// List pools with their warm VMs.
    Ls,
    /// Remove a pool and its warm VMs.
    Rm {
        /// The pool's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum AliasCmd {
    /// Point a custom domain at service.stack[--variant] (or another host name).
    Add {
        /// The custom domain (www.example.com).
        domain: String,
        /// service.stack, service.stack--variant, stack, or another host name.
        target: String,
    },
    /// List aliases.
    Ls,
    /// Remove an alias.
    Rm {
        /// The custom domain.
        domain: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ServiceCmd {
    /// Every service that answers a name: its names, scaling bounds and serving
    /// instances; with --gateway, its traffic as those front ends counted it.
    Ls {
        /// A tide-gateway's metrics address (HOST:PORT, its --metrics); repeatable,
        /// the counts are summed.
        #[arg(long = "gateway", value_name = "HOST:PORT")]
        gateways: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum HostCmd {
    /// List registered hosts with capacity, use and state.
    Ls,
}

#[derive(Debug, Subcommand)]
pub(crate) enum SchedulerCmd {
    /// Each scheduler given with --scheduler: whether it leads, follows (and whom) or
    /// cannot be reached, and where it keeps its state.
    Ls,
}

/// One scheduler's answer to `tide scheduler ls`.
#[derive(Debug, Serialize)]
struct SchedulerRow {
    address: String,
    /// "leader", "follower" or "unreachable".
    role: &'static str,
    /// "local" or "etcd".
    store: String,
    /// The leader it names ("" when none is elected, or unreachable).
    leader: String,
    error: String,
}

async fn scheduler_rows(list: &str) -> Result<Vec<SchedulerRow>> {
    let addrs = schedclient::parse_list(list).map_err(|e| anyhow!("--scheduler: {e}"))?;
    let mut rows = Vec::new();
    for a in addrs {
        let answer = async {
            let (c, conn) =
                tokio::time::timeout(schedclient::ASK_TIMEOUT, schedclient::connect(&a))
                    .await
                    .map_err(|_| "connect timed out".to_string())?
                    .map_err(|e| format!("cannot connect: {e}"))?;
            let r = tokio::time::timeout(schedclient::ASK_TIMEOUT, schedclient::ask(&c))
                .await
                .map_err(|_| "no answer".to_string())?
                .map_err(|e| e.extra.clone());
            conn.abort();
            r
        }
        .await;
        rows.push(match answer {
            Ok(x) => SchedulerRow {
                address: a.to_string(),
                role: if x.leading { "leader" } else { "follower" },
                store: x.store,
                leader: x.leader,
                error: String::new(),
            },
            Err(e) => SchedulerRow {
                address: a.to_string(),
                role: "unreachable",
                store: String::new(),
                leader: String::new(),
                error: e,
            },
        });
    }
    Ok(rows)
}

/// One scheduler command.
#[derive(Debug)]
pub(crate) enum Command<'a> {
    Schedulers,
    Deploy {
        file: &'a Path,
        variant: Option<&'a str>,
        explain: bool,
        hypervisor: Option<&'a str>,
    },
    Stack(&'a StackCmd),
    Variant(&'a VariantCmd),
    Instance(&'a InstanceCmd),
    Pool(&'a PoolCmd),
    Alias(&'a AliasCmd),
    Host(&'a HostCmd),
    Service(&'a ServiceCmd),
    Resolve(&'a str),
    Logs {
        instance: &'a str,
        follow: bool,
        console: bool,
    },
}

// ---- Rows ----

#[derive(Debug, Serialize)]
struct InstanceRow {
    id: String,
    key: String,
    stack: String,
    variant: String,
    service: String,
    host: String,
    address: String,
    hypervisor: String,
    state: String,
    root: String,
    volumes: Vec<String>,
    warm_vm: String,
    image: String,
    disks: Vec<DiskRow>,
    /// HOST:PORT forwarded to its service's port, or "".
    endpoint: String,
    guest: GuestRow,
    /// Volumes its host made from the chunk tier's last pushed snapshot (a move).
    pulled: Vec<PulledRow>,
}

/// A volume made from the tier's last pushed snapshot for an instance.
#[derive(Debug, Serialize)]
struct PulledRow {
    volume: String,
    snapshot: String,
    /// When the snapshot was pushed (Unix seconds).
    pushed: u64,
    /// Its age when this was printed (seconds).
    age_seconds: u64,
    host: String,
    manifest: String,
}

/// An instance's VM (times in Unix milliseconds, 0 until they happen).
#[derive(Debug, Serialize)]
struct GuestRow {
    phase: String,
    launched: u64,
    booted: u64,
    started: u64,
    answered: u64,
    ended: u64,
    exit_code: i32,
    exit_signal: i32,
    reason: String,
    pid: u32,
    restarts: u32,
    /// Milliseconds its host's prepare spent on storage before the launch.
    storage_ms: u32,
    converted: u64,
}

impl InstanceRow {
    /// What the STATE column says: the VM's phase when it has one.
    fn shown_state(&self) -> String {
        let g = &self.guest;
        match (self.state.as_str(), g.phase.as_str()) {
            (_, "") => self.state.clone(),
            ("ready" | "moved", "exited") if g.exit_signal != 0 => {
                format!("exited (signal {})", g.exit_signal)
            }
            ("ready" | "moved", "exited") => format!("exited ({})", g.exit_code),
            ("ready" | "moved", p) => p.to_string(),
            (s, _) => s.to_string(),
        }
    }

    /// How long it has been in its VM's phase.
    fn since(&self) -> String {
        let g = &self.guest;
        let at = [g.ended, g.answered, g.started, g.launched]
            .into_iter()
            .find(|t| *t != 0);
        let Some(at) = at else { return "-".into() };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let s = now.saturating_sub(at) / 1000;
        match s {
            0..120 => format!("{s}s"),
            120..7200 => format!("{}m", s / 60),
            _ => format!("{}h", s / 3600),
        }
    }
}

/// One block device an instance boots from.
#[derive(Debug, Serialize)]
struct DiskRow {
    role: String,
    export: String,
    uri: String,
    read_only: bool,
    size: u64,
    layer: String,
    mount_path: String,
}

#[derive(Debug, Serialize)]
struct VerdictRow {
    host: String,
    eligible: bool,
    reason: String,
    score: f64,
}

#[derive(Debug, Serialize)]
struct PlacedRow {
    instance: InstanceRow,
    reasons: Vec<String>,
    fetch_bytes: u64,
    verdicts: Vec<VerdictRow>,
}

#[derive(Debug, Serialize)]
struct EnvRow {
    key: String,
    value: String,
    source: String,
}

#[derive(Debug, Serialize)]
struct ServiceRow {
    service: String,
    hostname: String,
    sharing: String,
    instances_of: String,
    env: Vec<EnvRow>,
}

#[derive(Debug, Serialize)]
struct DeployRow {
    stack: String,
    variant: String,
    entrypoint: String,
    services: Vec<ServiceRow>,
    placed: Vec<PlacedRow>,
}

#[derive(Debug, Serialize)]
struct StackRow {
    name: String,
    domain: String,
    services: Vec<String>,
    variants: Vec<String>,
    instances: u32,
}

#[derive(Debug, Serialize)]
struct StackDetail {
    #[serde(flatten)]
    summary: StackRow,
    file: String,
    source: String,
}

#[derive(Debug, Serialize)]
struct ServiceLsRow {
    key: String,
    names: Vec<String>,
    min: u32,
    max: u32,
    scale_to_zero: bool,
    instances: u32,
    serving: u32,
    /// From the front ends' metrics (absent without --gateway).
    traffic: Option<crate::traffic::Traffic>,
}

#[derive(Debug, Serialize)]
struct HostRow {
    id: String,
    address: String,
    arch: String,
    up: bool,
    last_seen: u64,
    vcpus: u32,
    memory: u64,
    gpus: u32,
    used_vcpus: u32,
    used_memory: u64,
    hypervisors: Vec<String>,
    layer_bytes: u64,
    instances: u32,
    warm_vms: u32,
}

#[derive(Debug, Serialize)]
struct PoolRow {
    name: String,
    layers: Vec<String>,
    min: u32,
    max: u32,
    warm: u32,
}

#[derive(Debug, Serialize)]
struct AliasRow {
    domain: String,
    target: String,
}

#[derive(Debug, Serialize)]
struct RouteRow {
    hostname: String,
    stack: String,
    variant: String,
    service: String,
    shared_from_parent: bool,
    via_aliases: Vec<String>,
    started: bool,
    instance: InstanceRow,
}

// ---- Wire → rows ----

fn err(e: capnp::Error) -> anyhow::Error {
    crate::remote::peer_err("sched", e)
}

trait W<T> {
    fn w(self) -> Result<T>;
}

impl<T> W<T> for capnp::Result<T> {
    fn w(self) -> Result<T> {
        self.map_err(err)
    }
}

fn t(r: capnp::Result<capnp::text::Reader<'_>>) -> Result<String> {
    Ok(r.w()?
        .to_str()
        .map_err(|_| anyhow!("sched sent text that is not UTF-8"))?
        .to_owned())
}

fn ts(r: capnp::Result<capnp::text_list::Reader<'_>>) -> Result<Vec<String>> {
    r.w()?.iter().map(t).collect()
}

/// Volumes and the tier snapshots they came from (or, for a move, went to).
fn pulled_rows(
    l: capnp::struct_list::Reader<'_, schema::sched_capnp::pulled_volume::Owned>,
    now: u64,
) -> Result<Vec<PulledRow>> {
    l.iter()
        .map(|p| {
            Ok(PulledRow {
                volume: t(p.get_volume())?,
                snapshot: t(p.get_snapshot())?,
                pushed: p.get_pushed(),
                age_seconds: now.saturating_sub(p.get_pushed()),
                host: t(p.get_host())?,
                manifest: t(p.get_manifest())?,
            })
        })
        .collect()
}

/// What `tide instance move` did.
#[derive(Debug, Serialize)]
struct MoveRow {
    instance: InstanceRow,
    /// The snapshots the old host pushed of its RWO volumes.
    pushed: Vec<PulledRow>,
}

fn instance_row(r: instance_info::Reader<'_>) -> Result<InstanceRow> {
    let g = r.get_guest().w()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(InstanceRow {
        pulled: pulled_rows(r.get_pulled().w()?, now)?,
        endpoint: t(r.get_endpoint())?,
        guest: GuestRow {
            phase: t(g.get_phase())?,
            launched: g.get_launched(),
            booted: g.get_booted(),
            started: g.get_started(),
            answered: g.get_answered(),
            ended: g.get_ended(),
            exit_code: g.get_exit_code(),
            exit_signal: g.get_exit_signal(),
            reason: t(g.get_reason())?,
            pid: g.get_pid(),
            restarts: g.get_restarts(),
            storage_ms: g.get_storage(),
            converted: g.get_converted(),
        },
        id: t(r.get_id())?,
        key: t(r.get_key())?,
        stack: t(r.get_stack())?,
        variant: t(r.get_variant())?,
        service: t(r.get_service())?,
        host: t(r.get_host())?,
        address: t(r.get_address())?,
        hypervisor: t(r.get_hypervisor())?,
        state: t(r.get_state())?,
        root: t(r.get_root())?,
        volumes: ts(r.get_volumes())?,
        warm_vm: t(r.get_warm_vm())?,
        image: t(r.get_image())?,
        disks: r
            .get_disks()
            .w()?
            .iter()
            .map(|d| {
                Ok(DiskRow {
                    role: t(d.get_role())?,
                    export: t(d.get_export())?,
                    uri: t(d.get_uri())?,
                    read_only: d.get_read_only(),
                    size: d.get_size(),
                    layer: t(d.get_layer())?,
                    mount_path: t(d.get_mount_path())?,
                })
            })
            .collect::<Result<Vec<_>>>()?,
    })
}

fn deploy_row(r: deploy_report::Reader<'_>) -> Result<DeployRow> {
    let mut services = Vec::new();
    for s in r.get_services().w()? {
        let mut env = Vec::new();
        for e in s.get_env().w()? {
            env.push(EnvRow {
                key: t(e.get_key())?,
                value: t(e.get_value())?,
                source: t(e.get_source())?,
            });
        }
        services.push(ServiceRow {
            service: t(s.get_service())?,
            hostname: t(s.get_hostname())?,
            sharing: t(s.get_sharing())?,
            instances_of: t(s.get_instances_of())?,
            env,
        });
    }
    let mut placed = Vec::new();
    for p in r.get_placed().w()? {
        let mut verdicts = Vec::new();
        for v in p.get_verdicts().w()? {
            verdicts.push(VerdictRow {
                host: t(v.get_host())?,
                eligible: v.get_eligible(),
                reason: t(v.get_reason())?,
                score: v.get_score(),
            });
        }
        placed.push(PlacedRow {
            instance: instance_row(p.get_instance().w()?)?,
            reasons: ts(p.get_reasons())?,
            fetch_bytes: p.get_fetch_bytes(),
            verdicts,
        });
    }
    Ok(DeployRow {
        stack: t(r.get_stack())?,
        variant: t(r.get_variant())?,
        entrypoint: t(r.get_entrypoint())?,
        services,
        placed,
    })
}

fn stack_row(r: stack_summary::Reader<'_>) -> Result<StackRow> {
    Ok(StackRow {
        name: t(r.get_name())?,
        domain: t(r.get_domain())?,
        services: ts(r.get_services())?,
        variants: ts(r.get_variants())?,
        instances: r.get_instances(),
    })
}

fn host_row(r: host_info::Reader<'_>) -> Result<HostRow> {
    let inv = r.get_inventory().w()?;
    let cap = inv.get_capacity().w()?;
    let used = r.get_used().w()?;
    Ok(HostRow {
        id: t(inv.get_host_id())?,
        address: t(inv.get_address())?,
        arch: t(inv.get_arch())?,
        up: r.get_up(),
        last_seen: r.get_last_seen(),
        vcpus: cap.get_vcpus(),
        memory: cap.get_memory(),
        gpus: cap.get_gpus(),
        used_vcpus: used.get_vcpus(),
        used_memory: used.get_memory(),
        hypervisors: ts(inv.get_hypervisors())?,
        layer_bytes: inv.get_layers().w()?.iter().map(|l| l.get_bytes()).sum(),
        instances: r.get_instances(),
        warm_vms: r.get_warm_vms(),
    })
}

fn pool_row(r: pool_info::Reader<'_>) -> Result<PoolRow> {
    Ok(PoolRow {
        name: t(r.get_name())?,
        layers: ts(r.get_layers())?,
        min: r.get_min(),
        max: r.get_max(),
        warm: r.get_warm(),
    })
}

fn route_row(r: route_info::Reader<'_>) -> Result<RouteRow> {
    Ok(RouteRow {
        hostname: t(r.get_hostname())?,
        stack: t(r.get_stack())?,
        variant: t(r.get_variant())?,
        service: t(r.get_service())?,
        shared_from_parent: r.get_shared_from_parent(),
        via_aliases: ts(r.get_via_aliases())?,
        started: r.get_started(),
        instance: instance_row(r.get_instance().w()?)?,
    })
}

// ---- Printing ----

fn print_instances(rows: &[InstanceRow]) {
    table(
        &[
            "INSTANCE",
            "HOST",
            "HYPERVISOR",
            "STATE",
            "SINCE",
            "ENDPOINT",
            "IMAGE",
            "WARM VM",
        ],
        rows.iter()
            .map(|i| {
                vec![
                    i.id.clone(),
                    i.host.clone(),
                    i.hypervisor.clone(),
                    i.shown_state(),
                    i.since(),
                    if i.endpoint.is_empty() {
                        "-".into()
                    } else {
                        i.endpoint.clone()
                    },
                    i.image.clone(),
                    if i.warm_vm.is_empty() {
                        "-".into()
                    } else {
                        i.warm_vm.clone()
                    },
                ]
            })
            .collect(),
    );
    for i in rows {
        for p in &i.pulled {
            if p.snapshot.is_empty() {
                println!(
                    "{}: volume {} was created EMPTY when it moved (its host has no chunk tier)",
                    i.id, p.volume
                );
            } else {
                println!(
                    "{}: volume {} made from the tier's snapshot {}, pushed by {} {} s ago",
                    i.id, p.volume, p.snapshot, p.host, p.age_seconds
                );
            }
        }
    }
}

fn print_deploy(d: &DeployRow) {
    let what = if d.variant.is_empty() {
        format!("stack {}", d.stack)
    } else {
        format!("variant {} of {}", d.variant, d.stack)
    };
    println!("deployed {what}: {} new instance(s)", d.placed.len());
    if !d.entrypoint.is_empty() {
        println!("entrypoint: {}", d.entrypoint);
    }
    table(
        &["SERVICE", "HOSTNAME", "SHARING", "INSTANCES OF"],
        d.services
            .iter()
            .map(|s| {
                vec![
                    s.service.clone(),
                    s.hostname.clone(),
                    s.sharing.clone(),
                    s.instances_of.clone(),
                ]
            })
            .collect(),
    );
    for p in &d.placed {
        println!();
        println!(
            "{} on {} ({}), fetching {}",
            p.instance.id,
            p.instance.host,
            p.instance.hypervisor,
            human_bytes(p.fetch_bytes)
        );
        for r in &p.reasons {
            println!("  - {r}");
        }
        if !p.verdicts.is_empty() {
            table(
                &["  HOST", "ELIGIBLE", "SCORE", "WHY"],
                p.verdicts
                    .iter()
                    .map(|v| {
                        vec![
                            format!("  {}", v.host),
                            if v.eligible { "yes" } else { "no" }.into(),
                            if v.eligible {
                                format!("{:.3}", v.score)
                            } else {
                                "-".into()
                            },
                            v.reason.clone(),
                        ]
                    })
                    .collect(),
            );
        }
    }
}

/// Connects to the scheduler that leads among `list` (`ADDR[,ADDR...]`), or to a
/// follower when none leads (reads work there; a change is refused naming why).
async fn connect(list: &str) -> Result<scheduler::Client> {
    let addrs = schedclient::parse_list(list).map_err(|e| anyhow!("--scheduler: {e}"))?;
    let found = schedclient::find(&addrs, true)
        .await
        .map_err(|e| anyhow!("connecting to sched at {list} (is it running?): {e}"))?;
    Ok(found.client)
}

fn read_file(path: &Path) -> Result<(String, String)> {
    let source =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    Ok((name, source))
}

fn stack_cap(s: &scheduler::Client, name: &str) -> stack::Client {
    let mut req = s.stack_request();
    req.get().set_name(name);
    req.send().pipeline.get_stack()
}

/// The stack a variant file names as its parent (read by the daemon's own parser).
fn variant_parent(file: &str, source: &str) -> Result<String> {
    let parsed = sched::stack::parse(file, source).map_err(|e| anyhow!("{e}"))?;
    match (parsed.stack, parsed.variants.as_slice()) {
        (None, [v]) => Ok(v.parent.to_string()),
        _ => bail!(
            "{file}: a variant file holds one [variant] with a parent and no [stack] (deploy stack files with `tide deploy`)"
        ),
    }
}

/// What a command without a result did: `{"removed": "pool x"}` with `--json`.
fn done(json: bool, verb: &str, what: &str) {
    if json {
        crate::output::print_json(&serde_json::json!({ verb: what }));
    } else {
        println!("{verb} {what}");
    }
}

/// Runs one scheduler command against `addr`.
pub(crate) fn run(addr: &str, json: bool, cmd: Command<'_>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    tokio::task::LocalSet::new().block_on(&rt, async {
        if let Command::Schedulers = cmd {
            let rows = scheduler_rows(addr).await?;
            emit(json, &rows, |rows| {
                table(
                    &["ADDRESS", "ROLE", "STORE", "LEADER", "ERROR"],
                    rows.iter()
                        .map(|r| {
                            vec![
                                r.address.clone(),
                                r.role.to_string(),
                                r.store.clone(),
                                r.leader.clone(),
                                r.error.clone(),
                            ]
                        })
                        .collect(),
                )
            });
            return Ok(());
        }
        let s = connect(addr).await?;
        exec(&s, json, cmd).await
    })
}

async fn exec(s: &scheduler::Client, json: bool, cmd: Command<'_>) -> Result<()> {
    match cmd {
        Command::Deploy {
            file,
            variant,
            explain,
            hypervisor,
        } => {
            let (name, source) = read_file(file)?;
            let mut req = s.deploy_request();
            let mut p = req.get();
            p.set_file(&name);
            p.set_source(&source);
            p.set_variant(variant.unwrap_or(""));
            p.set_explain(explain);
            p.set_hypervisor(hypervisor.unwrap_or(""));
            let reply = req.send().promise.await.w()?;
            let d = deploy_row(reply.get().w()?.get_report().w()?)?;
            emit(json, &d, print_deploy);
        }
        Command::Stack(StackCmd::Ls) => {
            let reply = s.stacks_request().send().promise.await.w()?;
            let rows = reply
                .get()
                .w()?
                .get_stacks()
                .w()?
                .iter()
                .map(stack_row)
                .collect::<Result<Vec<_>>>()?;
            emit(json, &rows, |rows| {
                table(
                    &["STACK", "DOMAIN", "SERVICES", "VARIANTS", "INSTANCES"],
                    rows.iter()
                        .map(|r| {
                            vec![
                                r.name.clone(),
                                r.domain.clone(),
                                r.services.join(","),
                                r.variants.join(","),
                                r.instances.to_string(),
                            ]
                        })
                        .collect(),
                )
            });
        }
        Command::Stack(StackCmd::Inspect { name }) => {
            let st = stack_cap(s, name);
            let summary = st.summary_request().send().promise.await.w()?;
            let source = st.source_request().send().promise.await.w()?;
            let src = source.get().w()?;
            let d = StackDetail {
                summary: stack_row(summary.get().w()?.get_summary().w()?)?,
                file: t(src.get_file())?,
                source: t(src.get_source())?,
            };
            emit(json, &d, |d| {
                println!("stack:     {}", d.summary.name);
                println!("domain:    {}", d.summary.domain);
                println!("services:  {}", d.summary.services.join(", "));
                println!("variants:  {}", d.summary.variants.join(", "));
                println!("instances: {}", d.summary.instances);
                println!("file:      {}", d.file);
                println!();
                print!("{}", d.source);
            });
        }
        Command::Stack(StackCmd::Rm { name }) => {
            stack_cap(s, name)
                .remove_request()
                .send()
                .promise
                .await
                .w()?;
            done(json, "removed", &format!("stack {name}"));
        }
        Command::Variant(VariantCmd::Create { file, explain }) => {
            let (name, source) = read_file(file)?;
            let parent = variant_parent(&name, &source)?;
            let mut req = stack_cap(s, &parent).create_variant_request();
            req.get().set_file(&name);
            req.get().set_source(&source);
            req.get().set_explain(*explain);
            let reply = req.send().promise.await.w()?;
            let d = deploy_row(reply.get().w()?.get_report().w()?)?;
            emit(json, &d, print_deploy);
        }
        Command::Variant(VariantCmd::Ls { stack }) => {
            let reply = stack_cap(s, stack)
                .variants_request()
                .send()
                .promise
                .await
                .w()?;
            let names = ts(reply.get().w()?.get_variants())?;
            emit(json, &names, |names| {
                table(
                    &["VARIANT", "HOSTNAMES"],
                    names
                        .iter()
                        .map(|n| vec![n.clone(), format!("*.{stack}--{n}")])
                        .collect(),
                )
            });
        }
        Command::Variant(VariantCmd::Rm { stack, name }) => {
            let mut req = stack_cap(s, stack).remove_variant_request();
            req.get().set_name(name);
            req.send().promise.await.w()?;
            done(json, "removed", &format!("variant {name} of {stack}"));
        }
        Command::Instance(InstanceCmd::Ls) => {
            let reply = s.instances_request().send().promise.await.w()?;
            let rows = reply
                .get()
                .w()?
                .get_instances()
                .w()?
                .iter()
                .map(instance_row)
                .collect::<Result<Vec<_>>>()?;
            emit(json, &rows, |r| print_instances(r));
        }
        Command::Pool(PoolCmd::Create {
            name,
            layers,
            image,
            min,
            max,
        }) => {
            let mut req = s.create_pool_request();
            let mut p = req.get();
            p.set_name(name);
            let mut l = p.reborrow().init_layers(layers.len() as u32);
            for (i, d) in layers.iter().enumerate() {
                l.set(i as u32, d.as_str());
            }
            p.set_image(image.as_deref().unwrap_or(""));
            p.set_min(*min);
            p.set_max(*max);
            let reply = req.send().promise.await.w()?;
            let row = pool_row(reply.get().w()?.get_pool().w()?)?;
            emit(json, &row, |r| {
                println!(
                    "pool {}: {} warm (min {}, max {})",
                    r.name, r.warm, r.min, r.max
                )
            });
        }
        Command::Pool(PoolCmd::Ls) => {
            let reply = s.pools_request().send().promise.await.w()?;
            let rows = reply
                .get()
                .w()?
                .get_pools()
                .w()?
                .iter()
                .map(pool_row)
                .collect::<Result<Vec<_>>>()?;
            emit(json, &rows, |rows| {
                table(
                    &["POOL", "WARM", "MIN", "MAX", "LAYERS"],
                    rows.iter()
                        .map(|r| {
                            vec![
                                r.name.clone(),
                                r.warm.to_string(),
                                r.min.to_string(),
                                r.max.to_string(),
                                r.layers
                                    .iter()
                                    .map(|l| l.get(..19).unwrap_or(l))
                                    .collect::<Vec<_>>()
                                    .join(","),
                            ]
                        })
                        .collect(),
                )
            });
        }
        Command::Pool(PoolCmd::Rm { name }) => {
            let mut req = s.remove_pool_request();
            req.get().set_name(name);
            req.send().promise.await.w()?;
            done(json, "removed", &format!("pool {name}"));
        }
        Command::Alias(AliasCmd::Add { domain, target }) => {
            let mut req = s.add_alias_request();
            req.get().set_domain(domain);
            req.get().set_target(target);
            req.send().promise.await.w()?;
            done(json, "added", &format!("alias {domain} -> {target}"));
        }
        Command::Alias(AliasCmd::Ls) => {
            let reply = s.aliases_request().send().promise.await.w()?;
            let mut rows = Vec::new();
            for a in reply.get().w()?.get_aliases().w()? {
                rows.push(AliasRow {
                    domain: t(a.get_domain())?,
                    target: t(a.get_target())?,
                });
            }
            emit(json, &rows, |rows| {
                table(
                    &["DOMAIN", "TARGET"],
                    rows.iter()
                        .map(|r| vec![r.domain.clone(), r.target.clone()])
                        .collect(),
                )
            });
        }
        Command::Alias(AliasCmd::Rm { domain }) => {
            let mut req = s.remove_alias_request();
            req.get().set_domain(domain);
            req.send().promise.await.w()?;
            done(json, "removed", &format!("alias {domain}"));
        }
        Command::Service(ServiceCmd::Ls { gateways }) => {
            let reply = s.routes_request().send().promise.await.w()?;
            let routes = reply.get().w()?.get_table().w()?;
            let mut names: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for n in routes.get_names().w()? {
                names
                    .entry(t(n.get_key())?)
                    .or_default()
                    .push(t(n.get_hostname())?);
            }
            let mut traffic = Vec::new();
            for g in gateways {
                traffic.push(crate::traffic::fetch(g)?);
            }
            let mut rows = Vec::new();
            for sr in routes.get_services().w()? {
                let key = t(sr.get_key())?;
                let mut total = 0;
                let mut serving = 0;
                for i in sr.get_instances().w()? {
                    total += 1;
                    serving += u32::from(i.get_serving());
                }
                rows.push(ServiceLsRow {
                    names: names.remove(&key).unwrap_or_default(),
                    traffic: (!gateways.is_empty())
                        .then(|| crate::traffic::Traffic::sum(&traffic, &key)),
                    key,
                    min: sr.get_min(),
                    max: sr.get_max(),
                    scale_to_zero: sr.get_scale_to_zero(),
                    instances: total,
                    serving,
                });
            }
            emit(json, &rows, |rows| {
                let mut header = vec!["SERVICE", "NAMES", "SCALE", "SERVING"];
                if !gateways.is_empty() {
                    header.extend(["REQUESTS", "5XX", "MEAN MS", "COLD STARTS", "MEAN START S"]);
                }
                table(
                    &header,
                    rows.iter()
                        .map(|r| {
                            let mut v = vec![
                                r.key.clone(),
                                match r.names.len() {
                                    0 => "-".into(),
                                    1 => r.names[0].clone(),
                                    n => format!("{} (+{})", r.names[0], n - 1),
                                },
                                format!(
                                    "{}..{}{}",
                                    r.min,
                                    r.max,
                                    if r.scale_to_zero { ", to zero" } else { "" }
                                ),
                                format!("{}/{}", r.serving, r.instances),
                            ];
                            if let Some(x) = &r.traffic {
                                v.extend(x.cells());
                            }
                            v
                        })
                        .collect(),
                )
            });
        }
        Command::Schedulers => unreachable!("answered without one connection, in run"),
        Command::Host(HostCmd::Ls) => {
            let reply = s.hosts_request().send().promise.await.w()?;
            let rows = reply
                .get()
                .w()?
                .get_hosts()
                .w()?
                .iter()
                .map(host_row)
                .collect::<Result<Vec<_>>>()?;
            emit(json, &rows, |rows| {
                table(
                    &[
                        "HOST",
                        "ADDRESS",
                        "ARCH",
                        "STATE",
                        "VCPUS",
                        "MEMORY",
                        "LAYERS",
                        "INSTANCES",
                        "WARM",
                    ],
                    rows.iter()
                        .map(|r| {
                            vec![
                                r.id.clone(),
                                r.address.clone(),
                                r.arch.clone(),
                                if r.up { "up" } else { "down" }.into(),
                                format!("{}/{}", r.used_vcpus, r.vcpus),
                                format!("{}/{}", human_bytes(r.used_memory), human_bytes(r.memory)),
                                human_bytes(r.layer_bytes),
                                r.instances.to_string(),
                                r.warm_vms.to_string(),
                            ]
                        })
                        .collect(),
                )
            });
        }
        Command::Instance(InstanceCmd::Stop { id } | InstanceCmd::Restart { id }) => {
            let action = match cmd {
                Command::Instance(InstanceCmd::Stop { .. }) => "stop",
                _ => "restart",
            };
            let mut req = s.control_request();
            req.get().set_instance(id);
            req.get().set_action(action);
            let reply = req.send().promise.await.w()?;
            let row = instance_row(reply.get().w()?.get_instance().w()?)?;
            emit(json, &row, |r| {
                println!(
                    "{} {}: {}{}",
                    if action == "stop" {
                        "stopped"
                    } else {
                        "restarted"
                    },
                    r.id,
                    r.shown_state(),
                    if r.endpoint.is_empty() {
                        String::new()
                    } else {
                        format!(", answering on {}", r.endpoint)
                    }
                )
            });
        }
        Command::Instance(InstanceCmd::Move { id, to }) => {
            let mut req = s.move_instance_request();
            req.get().set_instance(id);
            req.get().set_to(to.as_deref().unwrap_or(""));
            let reply = req.send().promise.await.w()?;
            let r = reply.get().w()?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let row = MoveRow {
                instance: instance_row(r.get_instance().w()?)?,
                pushed: pulled_rows(r.get_pushed().w()?, now)?,
            };
            emit(json, &row, |m| {
                let i = &m.instance;
                println!(
                    "moved {} to {}: {}{}",
                    i.id,
                    i.host,
                    i.shown_state(),
                    if i.endpoint.is_empty() {
                        String::new()
                    } else {
                        format!(", answering on {}", i.endpoint)
                    }
                );
                for p in &m.pushed {
                    println!(
                        "  volume {} handed over as snapshot {} (manifest {})",
                        p.volume, p.snapshot, p.manifest
                    );
                }
            });
        }
        Command::Logs {
            instance,
            follow,
            console,
        } => {
            use std::io::Write;
            let mut offset = 0u64;
            let mut out = std::io::stdout();
            loop {
                let mut req = s.logs_request();
                req.get().set_instance(instance);
                req.get().set_offset(offset);
                req.get().set_console(console);
                let reply = req.send().promise.await.w()?;
                let r = reply.get().w()?;
                let data = r.get_data().w()?;
                out.write_all(data)?;
                out.flush()?;
                offset = r.get_next();
                if data.is_empty() {
                    if !follow || r.get_ended() {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        }
        Command::Resolve(hostname) => {
            let mut req = s.resolve_request();
            req.get().set_hostname(hostname);
            let reply = req.send().promise.await.w()?;
            let row = route_row(reply.get().w()?.get_route().w()?)?;
            emit(json, &row, |r| {
                let via = if r.via_aliases.is_empty() {
                    String::new()
                } else {
                    format!(" (via {})", r.via_aliases.join(" -> "))
                };
                println!(
                    "{}{via} -> {} on {} ({}){}{}",
                    r.hostname,
                    r.instance.id,
                    r.instance.host,
                    r.instance.address,
                    if r.shared_from_parent {
                        ", shared from the parent stack"
                    } else {
                        ""
                    },
                    if r.started { ", started now" } else { "" },
                );
            });
        }
    }
    Ok(())
}
