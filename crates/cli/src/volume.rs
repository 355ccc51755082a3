//! `tide volume ...`: block volumes through volumed (`--socket`). Wire replies become the
//! plain types below, which are what `--json` prints.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Result, bail};
use clap::Subcommand;
use schema::store_capnp::{self, attachment_info, snapshot_info, volume_summary};
use serde::Serialize;

use crate::output::{emit, human_bytes, print_json, table};
use crate::remote::{Remote, Wire, text, texts};

#[derive(Debug, Subcommand)]
pub(crate) enum VolumeCmd {
    /// Create a volume (or a per-instance template with --instances).
    Create {
        /// Name: a-z 0-9 . _ - (1 to 128 characters).
        name: String,
        /// Size: bytes or with a unit (512M, 10G, 1T; powers of 1024), a multiple of 512.
        #[arg(long, value_parser = castore::parse_size)]
        size: u64,
        /// rwo (one attachment at a time), rwx (many read-write), rox (many read-only).
        #[arg(long, default_value = "rwo", value_parser = parse_mode)]
        mode: store_capnp::AccessMode,
        /// Per-instance RWO: stamp NAME-0 .. NAME-{N-1}, one per instance.
        #[arg(long)]
        instances: Option<u32>,
        /// Extent size (a power of two, 4K to 256K; default 64K).
        #[arg(long, value_parser = castore::parse_size)]
        extent_size: Option<u64>,
    },
    /// List volumes.
    Ls,
    /// Size, mode, attachments, allocated and unique bytes, snapshots.
    Inspect {
        /// The volume.
        name: String,
    },
    /// Take a crash-consistent snapshot (exported read-only as NAME@SNAP).
    Snapshot {
        /// The volume.
        name: String,
        /// The snapshot's name.
        snapshot: String,
    },
    /// Send a volume to the chunk tier (volumed --tier): a new snapshot `pushed-SECONDS`
    /// taken now, or --snapshot; it becomes the volume's last pushed snapshot, from which
    /// another host pulls it. Chunks the tier holds are not sent again.
    Push {
        /// The volume.
        name: String,
        /// Push this existing snapshot instead of taking one.
        #[arg(long)]
        snapshot: Option<String>,
    },
    /// Make a volume here from the last snapshot of NAME pushed to the tier; its chunks
    /// are fetched when first read.
    Pull {
        /// The volume's name in the tier.
        name: String,
        /// Make it under this name here.
        #[arg(long = "as", value_name = "NAME")]
        as_name: Option<String>,
    },
    /// Show the last snapshot of a volume pushed to the tier: when, by which host.
    Pushed {
        /// The volume's name in the tier.
        name: String,
    },
    /// List a volume's snapshots.
    Snapshots {
        /// The volume.
        name: String,
    },
    /// Make a new volume from a snapshot; it shares every chunk until written.
    Clone {
        /// VOLUME@SNAPSHOT.
        source: String,
        /// The new volume's name.
        name: String,
    },
    /// Grow a volume online, or shrink it (--shrink, discarding the data beyond).
    Resize {
        /// The volume.
        name: String,
        /// New size (bytes or with a unit: 20G).
        #[arg(value_parser = castore::parse_size)]
        size: u64,
        /// Allow shrinking.
        #[arg(long)]
        shrink: bool,
        /// Do not ask for confirmation before shrinking.
        #[arg(long)]
        yes: bool,
    },
    /// Remove volumes (NAME) or snapshots (NAME@SNAP).
    Rm {
        /// What to remove.
        #[arg(required = true)]
        names: Vec<String>,
        /// Also remove snapshots, clones and a template's instances.
        #[arg(long)]
        cascade: bool,
    },
    /// Attach a volume for a holder (kept across restarts until detached).
    Attach {
        /// The volume.
        name: String,
        /// Who holds it (an instance id, a host, a person).
        #[arg(long)]
        holder: String,
        /// A read-only attachment.
        #[arg(long)]
        read_only: bool,
        /// Also serve the attachment as a vhost-user-blk backend on a socket of its own
        /// (printed; kept until detached).
        #[arg(long)]
        vhost_user: bool,
        /// With --vhost-user: the disk's serial as the guest reads it (default: the
        /// volume name's first 20 bytes).
        #[arg(long, requires = "vhost_user")]
        id: Option<String>,
    },
    /// End a persistent attachment.
    Detach {
        /// The volume.
        name: String,
        /// The attachment id (optional when the volume has exactly one).
        id: Option<u64>,
    },
    /// vhost-user-blk sockets: any export served to one VMM at a time in shared memory.
    #[command(subcommand)]
    VhostUser(VhostCmd),
    /// Print the NBD URI of a volume (NAME), snapshot (NAME@SNAP) or attachment (NAME/ID).
    Url {
        /// The export.
        name: String,
        /// nbd://HOST:PORT/... instead of nbd+unix://...
        #[arg(long)]
        tcp: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum VhostCmd {
    /// Serve an export (NAME, NAME/ID, NAME@SNAP, layer/DIGEST) on a new socket, kept
    /// across volumed restarts until stopped; prints the socket. QEMU attaches it with
    /// `-chardev socket,id=c,path=SOCKET,reconnect=1 -device
    /// vhost-user-blk-pci,chardev=c` and memory from `memory-backend-memfd,share=on`.
    Serve {
        /// The export.
        export: String,
        /// The disk's serial as the guest reads it (default: the export's first 20
        /// bytes).
        #[arg(long)]
        id: Option<String>,
    },
    /// Stop the sockets serving an export.
    Stop {
        /// The export.
        export: String,
    },
    /// List the sockets served now (guests' disks too).
    Ls,
}

/// One vhost-user socket, as `vhost-user ls` shows it.
#[derive(Debug, Clone, Serialize)]
struct VhostRow {
    export: String,
    id: String,
    socket: String,
    recorded: bool,
    connected: bool,
    sessions: u64,
}

fn serve_vhost(remote: &Remote, export: &str, id: Option<&str>) -> Result<String> {
    remote.run(async {
        let mut req = remote.volumes.serve_vhost_user_request();
        req.get().set_export(export);
        req.get().set_id(id.unwrap_or(""));
        let reply = req.send().promise.await.w()?;
        text(reply.get().w()?.get_socket())
    })
}

fn run_vhost(remote: &Remote, json: bool, cmd: &VhostCmd) -> Result<()> {
    let vols = &remote.volumes;
    match cmd {
        VhostCmd::Serve { export, id } => {
            let socket = serve_vhost(remote, export, id.as_deref())?;
            if json {
                print_json(&serde_json::json!({ "export": export, "socket": socket }));
            } else {
                println!("{socket}");
            }
        }
        VhostCmd::Stop { export } => {
            let n = remote.run(async {
                let mut req = vols.stop_vhost_user_request();
                req.get().set_export(export);
                let reply = req.send().promise.await.w()?;
                Ok(reply.get().w()?.get_stopped())
            })?;
            if json {
                print_json(&serde_json::json!({ "export": export, "stopped": n }));
            } else {
                println!("stopped {n} vhost-user socket(s) of {export}");
            }
        }
        VhostCmd::Ls => {
            let rows = remote.run(async {
                let reply = vols.vhost_user_request().send().promise.await.w()?;
                reply
                    .get()
                    .w()?
                    .get_sockets()
                    .w()?
                    .iter()
                    .map(|s| {
                        Ok(VhostRow {
                            export: text(s.get_export())?,
                            id: text(s.get_id())?,
                            socket: text(s.get_socket())?,
                            recorded: s.get_recorded(),
                            connected: s.get_connected(),
                            sessions: s.get_sessions(),
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })?;
            if json {
                print_json(&rows);
            } else {
                table(
                    &["EXPORT", "ID", "SOCKET", "KIND", "CONNECTED", "SESSIONS"],
                    rows.iter()
                        .map(|r| {
                            vec![
                                r.export.clone(),
                                r.id.clone(),
                                r.socket.clone(),
                                if r.recorded { "served" } else { "guest" }.into(),
                                if r.connected { "yes" } else { "no" }.into(),
                                r.sessions.to_string(),
                            ]
                        })
                        .collect(),
                );
            }
        }
    }
    Ok(())
}

fn parse_mode(s: &str) -> Result<store_capnp::AccessMode, String> {
    match s.to_ascii_lowercase().as_str() {
        "rwo" => Ok(store_capnp::AccessMode::Rwo),
        "rwx" => Ok(store_capnp::AccessMode::Rwx),
        "rox" => Ok(store_capnp::AccessMode::Rox),
        _ => Err(format!("unknown access mode {s:?} (rwo, rwx, rox)")),
    }
}

fn mode_name(m: Result<store_capnp::AccessMode, capnp::NotInSchema>) -> String {
    match m {
        Ok(store_capnp::AccessMode::Rwo) => "rwo".into(),
        Ok(store_capnp::AccessMode::Rwx) => "rwx".into(),
        Ok(store_capnp::AccessMode::Rox) => "rox".into(),
        Err(capnp::NotInSchema(n)) => format!("mode#{n}"),
    }
}

/// One volume, as `ls` and `--json` show it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct VolumeRow {
    name: String,
    size: u64,
    extent_size: u64,
    mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    instances: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    template: Option<String>,
    generation: u64,
    snapshots: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    origin: Option<String>,
    created: u64,
    attachments: u32,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct SnapshotRow {
    name: String,
    generation: u64,
    size: u64,
    created: u64,
    clones: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct AttachmentRow {
    id: u64,
    volume: String,
    holder: String,
    read_only: bool,
    persistent: bool,
    since: u64,
    export_name: String,
}

#[derive(Debug, Clone, Serialize)]
struct VolumeDetail {
    #[serde(flatten)]
    volume: VolumeRow,
    allocated_bytes: u64,
    unique_bytes: u64,
    snapshot_list: Vec<SnapshotRow>,
    attachment_list: Vec<AttachmentRow>,
}

fn volume_row(r: volume_summary::Reader<'_>) -> Result<VolumeRow> {
    let origin_volume = text(r.get_origin_volume())?;
    Ok(VolumeRow {
        name: text(r.get_name())?,
        size: r.get_size(),
        extent_size: r.get_extent_size(),
        mode: mode_name(r.get_mode()),
        instances: Some(r.get_instances()).filter(|&n| n > 0),
        template: Some(text(r.get_template())?).filter(|t| !t.is_empty()),
        generation: r.get_generation(),
        snapshots: r.get_snapshots(),
        origin: if origin_volume.is_empty() {
            None
        } else {
            Some(format!(
                "{origin_volume}@{}",
                text(r.get_origin_snapshot())?
            ))
        },
        created: r.get_created(),
        attachments: r.get_attachments(),
    })
}

/// What a volume push or pull did (`--json`).
#[derive(Debug, Serialize)]
struct TierRow {
    volume: String,
    tier_name: String,
    snapshot: String,
    manifest: String,
    pushed: u64,
    age_seconds: u64,
    host: String,
    size: u64,
    chunks: u64,
    transferred: u64,
    skipped: u64,
    bytes: u64,
    seconds: f64,
}

fn tier_row(r: store_capnp::volume_tier_report::Reader<'_>) -> Result<TierRow> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(TierRow {
        volume: text(r.get_volume())?,
        tier_name: text(r.get_tier_name())?,
        snapshot: text(r.get_snapshot())?,
        manifest: text(r.get_manifest())?,
        pushed: r.get_pushed(),
        age_seconds: now.saturating_sub(r.get_pushed()),
        host: text(r.get_host())?,
        size: r.get_size(),
        chunks: r.get_chunks(),
        transferred: r.get_transferred(),
        skipped: r.get_skipped(),
        bytes: r.get_bytes(),
        seconds: r.get_seconds(),
    })
}

fn snapshot_row(r: snapshot_info::Reader<'_>) -> Result<SnapshotRow> {
    Ok(SnapshotRow {
        name: text(r.get_name())?,
        generation: r.get_generation(),
        size: r.get_size(),
        created: r.get_created(),
        clones: texts(r.get_clones())?,
    })
}

fn attachment_row(r: attachment_info::Reader<'_>) -> Result<AttachmentRow> {
    Ok(AttachmentRow {
        id: r.get_id(),
        volume: text(r.get_volume())?,
        holder: text(r.get_holder())?,
        read_only: r.get_read_only(),
        persistent: r.get_persistent(),
        since: r.get_since(),
        export_name: text(r.get_export_name())?,
    })
}

/// The calls, one round trip each.
impl Remote {
    fn volume_list(&self) -> Result<Vec<VolumeRow>> {
        self.run(async {
            let reply = self.volumes.list_request().send().promise.await.w()?;
            reply
                .get()
                .w()?
                .get_volumes()
                .w()?
                .iter()
                .map(volume_row)
                .collect()
        })
    }

    fn volume_detail(&self, name: &str) -> Result<VolumeDetail> {
        self.run(async {
            let mut req = self.volumes.inspect_request();
            req.get().set_name(name);
            let reply = req.send().promise.await.w()?;
            let d = reply.get().w()?.get_detail().w()?;
            Ok(VolumeDetail {
                volume: volume_row(d.get_summary().w()?)?,
                allocated_bytes: d.get_allocated_bytes(),
                unique_bytes: d.get_unique_bytes(),
                snapshot_list: d
                    .get_snapshots()
                    .w()?
                    .iter()
                    .map(snapshot_row)
                    .collect::<Result<_>>()?,
                attachment_list: d
                    .get_attachments()
                    .w()?
                    .iter()
                    .map(attachment_row)
                    .collect::<Result<_>>()?,
            })
        })
    }

    fn volume_snapshots(&self, name: &str) -> Result<Vec<SnapshotRow>> {
        self.run(async {
            let mut req = self.volumes.snapshots_request();
            req.get().set_volume(name);
            let reply = req.send().promise.await.w()?;
            reply
                .get()
                .w()?
                .get_snapshots()
                .w()?
                .iter()
                .map(snapshot_row)
                .collect()
        })
    }

    /// (unix socket, tcp address), each possibly empty.
    /// The daemon's NBD URI of `export` (which it checks exists).
    fn nbd_url(&self, export: &str, tcp: bool) -> Result<String> {
        self.run(async {
            let mut req = self.volumes.url_request();
            req.get().set_export(export);
            req.get().set_tcp(tcp);
            let reply = req.send().promise.await.w()?;
            text(reply.get().w()?.get_url())
        })
    }
}

fn print_volumes(json: bool, rows: &[VolumeRow]) {
    if json {
        print_json(&rows);
        return;
    }
    table(
        &["NAME", "SIZE", "MODE", "SNAPSHOTS", "ATTACHED", "ORIGIN"],
        rows.iter()
            .map(|v| {
                let mode = match (&v.instances, &v.template) {
                    (Some(n), _) => format!("{} template x{n}", v.mode),
                    (None, Some(t)) => format!("{} (of {t})", v.mode),
                    _ => v.mode.clone(),
                };
                vec![
                    v.name.clone(),
                    human_bytes(v.size),
                    mode,
                    v.snapshots.to_string(),
                    v.attachments.to_string(),
                    v.origin.clone().unwrap_or_default(),
                ]
            })
            .collect(),
    );
}

fn print_snapshots(rows: &[SnapshotRow]) {
    table(
        &["SNAPSHOT", "SIZE", "GENERATION", "CLONES"],
        rows.iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    human_bytes(s.size),
                    s.generation.to_string(),
                    s.clones.join(","),
                ]
            })
            .collect(),
    );
}

/// Asks on the terminal for the volume's name before a shrink; `--yes` skips it.
fn confirm_shrink(name: &str, from: u64, to: u64, yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "shrinking volume {name} from {} to {} discards the data beyond {}; confirm with --yes",
            human_bytes(from),
            human_bytes(to),
            human_bytes(to)
        );
    }
    eprint!(
        "Shrinking volume {name} from {} to {} discards {} of data beyond the new end.\nType the volume's name to confirm: ",
        human_bytes(from),
        human_bytes(to),
        human_bytes(from - to)
    );
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if answer.trim() != name {
        bail!("not confirmed; volume {name} left at {}", human_bytes(from));
    }
    Ok(())
}

pub(crate) fn run(remote: &Remote, json: bool, cmd: &VolumeCmd) -> Result<()> {
    let vols = &remote.volumes;
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            mode,
            instances,
            extent_size,
        } => {
            let extent = match extent_size {
                None => 0,
                Some(e) => u32::try_from(*e)
                    .map_err(|_| anyhow::anyhow!("extent size {e} is too large (at most 256K)"))?,
            };
            let made = remote.run(async {
                let mut req = vols.create_request();
                let mut p = req.get();
                p.set_name(name);
                p.set_size(*size);
                p.set_mode(*mode);
                p.set_instances(instances.unwrap_or(0));
                p.set_extent_size(extent);
                let reply = req.send().promise.await.w()?;
                reply
                    .get()
                    .w()?
                    .get_volumes()
                    .w()?
                    .iter()
                    .map(volume_row)
                    .collect::<Result<Vec<_>>>()
            })?;
            if json {
                print_json(&made);
            } else {
                let v = &made[0];
                println!(
                    "created volume {} ({}, {})",
                    v.name,
                    human_bytes(v.size),
                    v.mode
                );
                for s in &made[1..] {
                    println!("created instance volume {}", s.name);
                }
            }
        }
        VolumeCmd::Ls => print_volumes(json, &remote.volume_list()?),
        VolumeCmd::Inspect { name } => {
            let d = remote.volume_detail(name)?;
            if json {
                print_json(&d);
                return Ok(());
            }
            let v = &d.volume;
            println!("volume:      {}", v.name);
            println!("size:        {} ({} bytes)", human_bytes(v.size), v.size);
            println!("mode:        {}", v.mode);
            if let Some(n) = v.instances {
                println!(
                    "template:    {n} instances ({0}-0 .. {0}-{1})",
                    v.name,
                    n - 1
                );
            }
            if let Some(t) = &v.template {
                println!("instance of: {t}");
            }
            if let Some(o) = &v.origin {
                println!("cloned from: {o}");
            }
            println!("extent size: {}", human_bytes(v.extent_size));
            println!("allocated:   {}", human_bytes(d.allocated_bytes));
            println!(
                "unique:      {} (stored, not shared with other volumes)",
                human_bytes(d.unique_bytes)
            );
            println!("attachments: {}", d.attachment_list.len());
            for a in &d.attachment_list {
                println!(
                    "  {:>4}  {}  {}  {}",
                    a.id,
                    if a.read_only { "ro" } else { "rw" },
                    if a.persistent {
                        &a.export_name
                    } else {
                        "(connection)"
                    },
                    a.holder
                );
            }
            println!("snapshots:   {}", d.snapshot_list.len());
            if !d.snapshot_list.is_empty() {
                print_snapshots(&d.snapshot_list);
            }
        }
        VolumeCmd::Snapshot { name, snapshot } => {
            let s = remote.run(async {
                let mut req = vols.snapshot_request();
                req.get().set_volume(name);
                req.get().set_snapshot(snapshot);
                let reply = req.send().promise.await.w()?;
                snapshot_row(reply.get().w()?.get_snapshot().w()?)
            })?;
            emit(json, &s, |s| {
                println!("snapshot {name}@{} taken ({})", s.name, human_bytes(s.size))
            });
        }
        VolumeCmd::Push { name, snapshot } => {
            let progress = std::sync::Arc::new(castore::TierProgress::default());
            let r = crate::with_progress(
                "push",
                || crate::transfer_progress(&progress),
                || {
                    remote.run(async {
                        let mut req = vols.push_request();
                        req.get().set_volume(name);
                        req.get().set_snapshot(snapshot.as_deref().unwrap_or(""));
                        req.get()
                            .set_progress(capnp_rpc::new_client(crate::remote::TransferSink(
                                progress.clone(),
                            )));
                        let reply = req.send().promise.await.w()?;
                        tier_row(reply.get().w()?.get_report().w()?)
                    })
                },
            )?;
            emit(json, &r, |r| {
                println!(
                    "pushed {}@{}: {} of {} chunks sent ({}) in {:.1} s",
                    r.volume,
                    r.snapshot,
                    r.transferred,
                    r.transferred + r.skipped,
                    human_bytes(r.bytes),
                    r.seconds
                )
            });
        }
        VolumeCmd::Pull { name, as_name } => {
            let r = remote.run(async {
                let mut req = vols.pull_request();
                req.get().set_volume(name);
                req.get().set_as(as_name.as_deref().unwrap_or(""));
                let reply = req.send().promise.await.w()?;
                tier_row(reply.get().w()?.get_report().w()?)
            })?;
            emit(json, &r, |r| {
                println!(
                    "pulled volume {} ({}) from snapshot {} pushed by {} {} s ago; {} of {} chunks already here, the rest are read from the tier",
                    r.volume,
                    human_bytes(r.size),
                    r.snapshot,
                    r.host,
                    r.age_seconds,
                    r.transferred,
                    r.chunks
                )
            });
        }
        VolumeCmd::Pushed { name } => {
            let r = remote.run(async {
                let mut req = vols.pushed_request();
                req.get().set_volume(name);
                let reply = req.send().promise.await.w()?;
                tier_row(reply.get().w()?.get_report().w()?)
            })?;
            emit(json, &r, |r| {
                println!(
                    "{}: snapshot {} ({}, {} chunks), pushed by {} {} s ago, manifest {}",
                    r.tier_name,
                    r.snapshot,
                    human_bytes(r.size),
                    r.chunks,
                    r.host,
                    r.age_seconds,
                    r.manifest
                )
            });
        }
        VolumeCmd::Snapshots { name } => {
            emit(json, &remote.volume_snapshots(name)?, |r| {
                print_snapshots(r)
            });
        }
        VolumeCmd::Clone { source, name } => {
            let v = remote.run(async {
                let mut req = vols.clone_snapshot_request();
                req.get().set_source(source);
                req.get().set_name(name);
                let reply = req.send().promise.await.w()?;
                volume_row(reply.get().w()?.get_volume().w()?)
            })?;
            emit(json, &v, |v| {
                println!("cloned {source} as {} ({})", v.name, human_bytes(v.size))
            });
        }
        VolumeCmd::Resize {
            name,
            size,
            shrink,
            yes,
        } => {
            let current = remote.volume_detail(name)?.volume.size;
            if *size < current {
                if !shrink {
                    bail!(
                        "volume {name} is {}; resizing it to {} would discard data: pass --shrink",
                        human_bytes(current),
                        human_bytes(*size)
                    );
                }
                confirm_shrink(name, current, *size, *yes)?;
            }
            let v = remote.run(async {
                let mut req = vols.resize_request();
                req.get().set_name(name);
                req.get().set_size(*size);
                req.get().set_shrink(*shrink);
                let reply = req.send().promise.await.w()?;
                volume_row(reply.get().w()?.get_volume().w()?)
            })?;
            emit(json, &v, |v| {
                println!(
                    "resized volume {name} from {} to {}",
                    human_bytes(current),
                    human_bytes(v.size)
                )
            });
        }
        VolumeCmd::Rm { names, cascade } => {
            let mut all = Vec::new();
            for n in names {
                let removed = remote.run(async {
                    let mut req = vols.remove_request();
                    req.get().set_name(n);
                    req.get().set_cascade(*cascade);
                    let reply = req.send().promise.await.w()?;
                    texts(reply.get().w()?.get_removed())
                })?;
                if !json {
                    for r in &removed {
                        println!("removed {r}");
                    }
                }
                all.extend(removed);
            }
            if json {
                print_json(&serde_json::json!({ "removed": all }));
            }
        }
        VolumeCmd::VhostUser(cmd) => run_vhost(remote, json, cmd)?,
        VolumeCmd::Attach {
            name,
            holder,
            read_only,
            vhost_user,
            id,
        } => {
            let a = remote.run(async {
                let mut req = vols.attach_request();
                req.get().set_name(name);
                req.get().set_holder(holder);
                req.get().set_read_only(*read_only);
                let reply = req.send().promise.await.w()?;
                attachment_row(reply.get().w()?.get_info().w()?)
            })?;
            let url = remote.nbd_url(&a.export_name, false)?;
            let socket = match vhost_user {
                true => {
                    let default = layerfs::vhost::default_id(name);
                    let id = id.as_deref().unwrap_or(&default);
                    match serve_vhost(remote, &a.export_name, Some(id)) {
                        Ok(s) => Some(s),
                        Err(e) => {
                            // Not half done: the attachment goes with the socket.
                            remote.run(async {
                                let mut req = vols.detach_request();
                                req.get().set_name(name);
                                req.get().set_id(a.id);
                                req.send().promise.await.w()?;
                                Ok(())
                            })?;
                            return Err(e.context(format!(
                                "serving {} over vhost-user (attachment {} undone)",
                                a.export_name, a.id
                            )));
                        }
                    }
                }
                false => None,
            };
            if json {
                let mut v = serde_json::to_value(&a)?;
                v["url"] = url.into();
                if let Some(s) = &socket {
                    v["vhost_user_socket"] = s.clone().into();
                }
                print_json(&v);
            } else {
                if let Some(s) = &socket {
                    println!("vhost-user socket: {s}");
                }
                println!(
                    "attached {name} for {} (attachment {}, {}): {url}",
                    a.holder,
                    a.id,
                    if a.read_only {
                        "read-only"
                    } else {
                        "read-write"
                    }
                );
            }
        }
        VolumeCmd::Detach { name, id } => {
            let id = match id {
                Some(id) => *id,
                None => {
                    let atts: Vec<_> = remote
                        .volume_detail(name)?
                        .attachment_list
                        .into_iter()
                        .filter(|a| a.persistent)
                        .collect();
                    match atts.as_slice() {
                        [a] => a.id,
                        [] => bail!("volume {name} has no persistent attachment"),
                        many => bail!(
                            "volume {name} has {} attachments ({}); name one",
                            many.len(),
                            many.iter()
                                .map(|a| a.id.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    }
                }
            };
            remote.run(async {
                let mut req = vols.detach_request();
                req.get().set_name(name);
                req.get().set_id(id);
                req.send().promise.await.w()?;
                Ok(())
            })?;
            if json {
                print_json(&serde_json::json!({ "volume": name, "detached": id }));
            } else {
                println!("detached attachment {id} of {name}");
            }
        }
        VolumeCmd::Url { name, tcp } => {
            let url = remote.nbd_url(name, *tcp)?;
            if json {
                print_json(&serde_json::json!({ "export": name, "url": url }));
            } else {
                println!("{url}");
            }
        }
    }
    Ok(())
}
