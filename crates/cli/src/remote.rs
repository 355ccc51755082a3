//! [`StoreApi`] over Cap'n Proto to `volumed` (`--socket PATH`), plus the mount commands,
//! which only the daemon can serve. Wire types stop here: every reply is converted to
//! the same domain types the in-process store returns, so output is identical.
//!
//! The client runs on a current-thread tokio runtime with a `LocalSet` owned by
//! [`Remote`]; each call blocks the command on it, which is all a CLI needs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use capnp_rpc::{RpcSystem, rpc_twoparty_capnp, twoparty};
use castore::{
    DataStats, Digest, ExportReport, ExportTarget, FsckReport, GcProgress, GcReport, ImportReport,
    Problem, Progress, SourceFormat, Stats,
};
use futures::AsyncReadExt;
use schema::store_capnp::{
    Format, daemon, data_stats, import_progress, import_report, layer_summary, mount_info, mounts,
    store, transfer_progress, volumes,
};
use serde::Serialize;

use crate::api::{ImageDetail, ImageSummary, LayerSummary, StoreApi};

/// One live mount of the daemon, as `tide mount ls` shows it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MountInfo {
    pub(crate) id: u64,
    pub(crate) image: Digest,
    pub(crate) name: String,
    pub(crate) mountpoint: PathBuf,
    pub(crate) read_only: bool,
    pub(crate) scratch_bytes: u64,
}

/// Fills a text list the length of `v` with `v`.
fn set_texts(mut l: capnp::text_list::Builder<'_>, v: &[String]) {
    for (i, s) in v.iter().enumerate() {
        l.set(i as u32, s);
    }
}

/// The daemon's reports of an import's progress, kept in the counters the progress bar
/// reads (the same ones an in-process import fills).
struct ProgressSink(Arc<Progress>);

impl import_progress::Server for ProgressSink {
    async fn update(
        self: capnp::capability::Rc<Self>,
        params: import_progress::UpdateParams,
        _: import_progress::UpdateResults,
    ) -> Result<(), capnp::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let p = params.get()?;
        self.0.files.store(p.get_files(), Relaxed);
        self.0.bytes.store(p.get_bytes(), Relaxed);
        self.0.bytes_total.store(p.get_bytes_total(), Relaxed);
        Ok(())
    }
}

/// The daemon's reports of a push's or pull's progress, kept in the counters the
/// progress bar reads (those an in-process transfer fills).
pub(crate) struct TransferSink(pub(crate) Arc<castore::TierProgress>);

impl transfer_progress::Server for TransferSink {
    async fn update(
        self: capnp::capability::Rc<Self>,
        params: transfer_progress::UpdateParams,
        _: transfer_progress::UpdateResults,
    ) -> Result<(), capnp::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let p = params.get()?;
        self.0.done.store(p.get_done(), Relaxed);
        self.0.objects.store(p.get_objects(), Relaxed);
        self.0.bytes.store(p.get_bytes(), Relaxed);
        Ok(())
    }
}

/// A connection to `volumed`.
pub(crate) struct Remote {
    rt: tokio::runtime::Runtime,
    local: tokio::task::LocalSet,
    store: store::Client,
    mounts: mounts::Client,
    pub(crate) volumes: volumes::Client,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").finish_non_exhaustive()
    }
}

/// `.w()?` on any Cap'n Proto result: [`wire_err`] without the noise.
pub(crate) trait Wire<T> {
    fn w(self) -> Result<T>;
}

impl<T> Wire<T> for capnp::Result<T> {
    fn w(self) -> Result<T> {
        self.map_err(wire_err)
    }
}

/// The one conversion of wire errors: a daemon's `failed` reason is already a full
/// one-line message; other kinds (disconnected, ...) say what happened to the link.
pub(crate) fn wire_err(e: capnp::Error) -> anyhow::Error {
    peer_err("volumed", e)
}

/// [`wire_err`] for any daemon (`volumed`, `sched`).
pub(crate) fn peer_err(peer: &str, e: capnp::Error) -> anyhow::Error {
    // capnp-rpc marks errors that crossed the wire; the daemon's reason follows.
    let reason = e
        .extra
        .strip_prefix("remote exception: ")
        .unwrap_or(&e.extra);
    match e.kind {
        capnp::ErrorKind::Failed => anyhow!("{reason}"),
        capnp::ErrorKind::Disconnected => anyhow!("lost the connection to {peer}: {reason}"),
        _ => anyhow!("{peer}: {:?}: {reason}", e.kind),
    }
}

pub(crate) fn text(r: capnp::Result<capnp::text::Reader<'_>>) -> Result<String> {
    Ok(r.map_err(wire_err)?
        .to_str()
        .map_err(|_| anyhow!("volumed sent text that is not UTF-8"))?
        .to_string())
}

pub(crate) fn texts(r: capnp::Result<capnp::text_list::Reader<'_>>) -> Result<Vec<String>> {
    r.map_err(wire_err)?.iter().map(text).collect()
}

fn digest(r: capnp::Result<capnp::text::Reader<'_>>) -> Result<Digest> {
    let s = text(r)?;
    Digest::parse(&s).ok_or_else(|| anyhow!("volumed sent a malformed digest {s:?}"))
}

fn opt_digest(r: capnp::Result<capnp::text::Reader<'_>>) -> Result<Option<Digest>> {
    let s = text(r)?;
    if s.is_empty() {
        return Ok(None);
    }
    Digest::parse(&s)
        .map(Some)
        .ok_or_else(|| anyhow!("volumed sent a malformed digest {s:?}"))
}

fn wire_format(f: Option<SourceFormat>) -> Format {
    match f {
        None => Format::Auto,
        Some(SourceFormat::Dir) => Format::Dir,
        Some(SourceFormat::Tar) => Format::Tar,
        Some(SourceFormat::Oci) => Format::Oci,
        Some(SourceFormat::Docker) => Format::Docker,
    }
}

/// The daemon resolves paths itself, in its own working directory: send absolute ones.
fn abs(p: &Path) -> Result<String> {
    let a = std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))?;
    a.to_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("path {} is not UTF-8", a.display()))
}

/// An export's report off the wire.
fn export_report(r: schema::store_capnp::export_report::Reader<'_>) -> Result<ExportReport> {
    Ok(ExportReport {
        entries: r.get_entries(),
        bytes: r.get_bytes(),
    })
}

fn export_path(target: &ExportTarget) -> Result<String> {
    let (ExportTarget::Dir(p) | ExportTarget::Tar(p)) = target;
    if p.as_os_str() == "-" {
        bail!("exporting to stdout needs --store; through volumed give a FILE.tar path");
    }
    abs(p)
}

fn import_report(r: import_report::Reader<'_>) -> Result<ImportReport> {
    Ok(ImportReport {
        image: opt_digest(r.get_image())?,
        name: Some(text(r.get_name())?).filter(|n| !n.is_empty()),
        layers: r
            .get_layers()
            .map_err(wire_err)?
            .iter()
            .map(digest)
            .collect::<Result<_>>()?,
        files: r.get_files(),
        logical_bytes: r.get_logical_bytes(),
        chunks: r.get_chunks(),
        new_chunks: r.get_new_chunks(),
        new_chunk_bytes: r.get_new_chunk_bytes(),
        new_stored_bytes: r.get_new_stored_bytes(),
        seconds: r.get_seconds(),
    })
}

fn tier_report(
    r: schema::store_capnp::tier_report::Reader<'_>,
) -> Result<(String, castore::TierReport)> {
    let image = text(r.get_image())?;
    let name = text(r.get_name())?;
    Ok((
        text(r.get_tier())?,
        castore::TierReport {
            image: castore::Digest::parse(&image)
                .ok_or_else(|| anyhow::anyhow!("volumed sent image {image:?}, not a digest"))?,
            name: (!name.is_empty()).then_some(name),
            objects: r.get_objects(),
            transferred: r.get_transferred(),
            skipped: r.get_skipped(),
            bytes: r.get_bytes(),
            content_bytes: r.get_content_bytes(),
            chunks_remote: r.get_chunks_remote(),
            seconds: r.get_seconds(),
        },
    ))
}

fn data_stats(r: data_stats::Reader<'_>) -> DataStats {
    DataStats {
        chunks: r.get_chunks(),
        logical_bytes: r.get_logical_bytes(),
        unique_bytes: r.get_unique_bytes(),
        stored_bytes: r.get_stored_bytes(),
        dedup_ratio: r.get_dedup_ratio(),
        total_ratio: r.get_total_ratio(),
    }
}

fn layer(r: layer_summary::Reader<'_>) -> Result<LayerSummary> {
    Ok(LayerSummary {
        digest: digest(r.get_digest())?,
        diff_id: opt_digest(r.get_diff_id())?,
        entries: r.get_entries(),
        size: r.get_size(),
    })
}

fn mount_info(r: mount_info::Reader<'_>) -> Result<MountInfo> {
    Ok(MountInfo {
        id: r.get_id(),
        image: digest(r.get_image())?,
        name: text(r.get_name())?,
        mountpoint: PathBuf::from(text(r.get_mountpoint())?),
        read_only: r.get_read_only(),
        scratch_bytes: r.get_scratch_bytes(),
    })
}

impl Remote {
    /// Connects to the daemon's socket and fetches its `Store` and `Mounts`.
    pub(crate) fn connect(socket: &Path) -> Result<Remote> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let local = tokio::task::LocalSet::new();
        let (store, mounts, volumes) = local.block_on(&rt, async {
            let stream = tokio::net::UnixStream::connect(socket)
                .await
                .with_context(|| {
                    format!(
                        "connecting to volumed at {} (is it running?)",
                        socket.display()
                    )
                })?;
            let (reader, writer) =
                tokio_util::compat::TokioAsyncReadCompatExt::compat(stream).split();
            let network = Box::new(twoparty::VatNetwork::new(
                futures::io::BufReader::new(reader),
                futures::io::BufWriter::new(writer),
                rpc_twoparty_capnp::Side::Client,
                Default::default(),
            ));
            let mut rpc = RpcSystem::new(network, None);
            let daemon: daemon::Client = rpc.bootstrap(rpc_twoparty_capnp::Side::Server);
            tokio::task::spawn_local(rpc);
            // Pipelined: both capabilities arrive in the same round trip.
            let store = daemon.store_request().send().pipeline.get_store();
            let mounts = daemon.mounts_request().send().pipeline.get_mounts();
            let volumes = daemon.volumes_request().send().pipeline.get_volumes();
            anyhow::Ok((store, mounts, volumes))
        })?;
        Ok(Remote {
            rt,
            local,
            store,
            mounts,
            volumes,
        })
    }

    pub(crate) fn run<T>(&self, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        self.local.block_on(&self.rt, f)
    }

    /// Mounts `image` at `dir` through the daemon.
    pub(crate) fn mount(&self, image: &str, dir: &Path, read_only: bool) -> Result<MountInfo> {
        let dir = dir
            .canonicalize()
            .with_context(|| format!("mountpoint {}", dir.display()))?;
        let dir = abs(&dir)?;
        self.run(async {
            let mut req = self.mounts.mount_request();
            let mut p = req.get();
            p.set_image(image);
            p.set_mountpoint(&dir);
            p.set_read_only(read_only);
            let m = req.send().pipeline.get_mount();
            let reply = m.info_request().send().promise.await.map_err(wire_err)?;
            mount_info(
                reply
                    .get()
                    .map_err(wire_err)?
                    .get_info()
                    .map_err(wire_err)?,
            )
        })
    }

    /// Unmounts whatever the daemon mounted at `dir`.
    pub(crate) fn umount(&self, dir: &Path) -> Result<()> {
        // A dead FUSE mount cannot be canonicalised (ENOTCONN): fall back to the path.
        let dir = abs(&dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()))?;
        self.run(async {
            let mut req = self.mounts.umount_request();
            req.get().set_mountpoint(&dir);
            req.send().promise.await.map_err(wire_err)?;
            Ok(())
        })
    }

    /// Every live mount of the daemon.
    pub(crate) fn mounts(&self) -> Result<Vec<MountInfo>> {
        self.run(async {
            let reply = self
                .mounts
                .list_request()
                .send()
                .promise
                .await
                .map_err(wire_err)?;
            let list = reply
                .get()
                .map_err(wire_err)?
                .get_mounts()
                .map_err(wire_err)?;
            list.iter().map(mount_info).collect()
        })
    }
}

impl StoreApi for Remote {
    fn import_image(
        &self,
        path: &Path,
        name: Option<&str>,
        opts: &castore::ImportOptions,
    ) -> Result<ImportReport> {
        let path = abs(path)?;
        self.run(async {
            let mut req = self.store.import_image_request();
            let mut p = req.get();
            p.set_path(&path);
            p.set_name(name.unwrap_or(""));
            p.set_format(wire_format(opts.format));
            p.set_progress(capnp_rpc::new_client(ProgressSink(opts.progress.clone())));
            let c = &opts.config;
            let mut w = p.init_config();
            if let Some(e) = &c.entrypoint {
                w.set_has_entrypoint(true);
                set_texts(w.reborrow().init_entrypoint(e.len() as u32), e);
            }
            if let Some(e) = &c.cmd {
                w.set_has_cmd(true);
                set_texts(w.reborrow().init_cmd(e.len() as u32), e);
            }
            set_texts(w.reborrow().init_env(c.env.len() as u32), &c.env);
            if let Some(d) = &c.workdir {
                w.set_has_workdir(true);
                w.set_workdir(d);
            }
            if let Some(u) = &c.user {
                w.set_has_user(true);
                w.set_user(u);
            }
            let reply = req.send().promise.await.map_err(wire_err)?;
            import_report(
                reply
                    .get()
                    .map_err(wire_err)?
                    .get_report()
                    .map_err(wire_err)?,
            )
        })
    }

    fn import_layer(
        &self,
        path: &Path,
        format: Option<SourceFormat>,
        progress: Arc<Progress>,
    ) -> Result<ImportReport> {
        let path = abs(path)?;
        self.run(async {
            let mut req = self.store.import_layer_request();
            let mut p = req.get();
            p.set_path(&path);
            p.set_format(wire_format(format));
            p.set_progress(capnp_rpc::new_client(ProgressSink(progress)));
            let reply = req.send().promise.await.map_err(wire_err)?;
            import_report(
                reply
                    .get()
                    .map_err(wire_err)?
                    .get_report()
                    .map_err(wire_err)?,
            )
        })
    }

    fn images(&self) -> Result<Vec<ImageSummary>> {
        self.run(async {
            let reply = self
                .store
                .images_request()
                .send()
                .promise
                .await
                .map_err(wire_err)?;
            let list = reply
                .get()
                .map_err(wire_err)?
                .get_images()
                .map_err(wire_err)?;
            list.iter()
                .map(|i| {
                    Ok(ImageSummary {
                        name: text(i.get_name())?,
                        digest: digest(i.get_digest())?,
                        layers: i.get_layers() as usize,
                        size: i.get_size(),
                    })
                })
                .collect()
        })
    }

    fn inspect(&self, spec: &str) -> Result<ImageDetail> {
        self.run(async {
            let mut req = self.store.inspect_request();
            req.get().set_image(spec);
            let reply = req.send().promise.await.map_err(wire_err)?;
            let d = reply
                .get()
                .map_err(wire_err)?
                .get_detail()
                .map_err(wire_err)?;
            Ok(ImageDetail {
                digest: digest(d.get_digest())?,
                names: texts(d.get_names())?,
                layers: d
                    .get_layers()
                    .map_err(wire_err)?
                    .iter()
                    .map(layer)
                    .collect::<Result<_>>()?,
                size: d.get_size(),
                env: texts(d.get_env())?,
                entrypoint: texts(d.get_entrypoint())?,
                cmd: texts(d.get_cmd())?,
                workdir: text(d.get_workdir())?,
                user: text(d.get_user())?,
                architecture: text(d.get_architecture())?,
                os: text(d.get_os())?,
                labels: d
                    .get_labels()
                    .map_err(wire_err)?
                    .iter()
                    .map(|l| Ok((text(l.get_key())?, text(l.get_value())?)))
                    .collect::<Result<_>>()?,
            })
        })
    }

    fn export_image(&self, spec: &str, target: &ExportTarget) -> Result<ExportReport> {
        let path = export_path(target)?;
        self.run(async {
            let mut req = self.store.export_image_request();
            req.get().set_image(spec);
            req.get().set_path(&path);
            let reply = req.send().promise.await.map_err(wire_err)?;
            export_report(
                reply
                    .get()
                    .map_err(wire_err)?
                    .get_report()
                    .map_err(wire_err)?,
            )
        })
    }

    fn remove_image(&self, name: &str) -> Result<Digest> {
        self.run(async {
            let mut req = self.store.remove_image_request();
            req.get().set_name(name);
            let reply = req.send().promise.await.map_err(wire_err)?;
            digest(reply.get().map_err(wire_err)?.get_digest())
        })
    }

    fn layers(&self) -> Result<Vec<LayerSummary>> {
        self.run(async {
            let reply = self
                .store
                .layers_request()
                .send()
                .promise
                .await
                .map_err(wire_err)?;
            let list = reply
                .get()
                .map_err(wire_err)?
                .get_layers()
                .map_err(wire_err)?;
            list.iter().map(layer).collect()
        })
    }

    fn export_layer(&self, digest: &str, target: &ExportTarget) -> Result<ExportReport> {
        let path = export_path(target)?;
        self.run(async {
            let mut req = self.store.export_layer_request();
            req.get().set_layer(digest);
            req.get().set_path(&path);
            let reply = req.send().promise.await.map_err(wire_err)?;
            export_report(
                reply
                    .get()
                    .map_err(wire_err)?
                    .get_report()
                    .map_err(wire_err)?,
            )
        })
    }

    fn layer_erofs(&self, layer: &str, to: &Path) -> Result<crate::api::ErofsReport> {
        let path = abs(to)?;
        self.run(async {
            let mut req = self.store.layer_erofs_request();
            req.get().set_layer(layer);
            req.get().set_path(&path);
            let reply = req.send().promise.await.map_err(wire_err)?;
            let r = reply
                .get()
                .map_err(wire_err)?
                .get_report()
                .map_err(wire_err)?;
            Ok(crate::api::ErofsReport {
                layer: text(r.get_layer())?,
                path: path.clone(),
                bytes: r.get_bytes(),
                metadata_bytes: r.get_metadata_bytes(),
                data_bytes: r.get_data_bytes(),
                inodes: r.get_inodes(),
                build_ms: r.get_build_ms(),
                dropped_xattrs: r
                    .get_dropped_xattrs()
                    .map_err(wire_err)?
                    .iter()
                    .map(text)
                    .collect::<Result<_>>()?,
            })
        })
    }

    fn remove_layer(&self, digest: &str) -> Result<()> {
        self.run(async {
            let mut req = self.store.remove_layer_request();
            req.get().set_layer(digest);
            req.send().promise.await.map_err(wire_err)?;
            Ok(())
        })
    }

    fn gc(&self, _progress: &GcProgress) -> Result<GcReport> {
        self.run(async {
            let reply = self
                .store
                .gc_request()
                .send()
                .promise
                .await
                .map_err(wire_err)?;
            let r = reply
                .get()
                .map_err(wire_err)?
                .get_report()
                .map_err(wire_err)?;
            Ok(GcReport {
                kept: r.get_kept(),
                images: r.get_images(),
                layers: r.get_layers(),
                trees: r.get_trees(),
                blobs: r.get_blobs(),
                chunks: r.get_chunks(),
                freed_bytes: r.get_freed_bytes(),
            })
        })
    }

    fn fsck(&self) -> Result<FsckReport> {
        self.run(async {
            let reply = self
                .store
                .fsck_request()
                .send()
                .promise
                .await
                .map_err(wire_err)?;
            let r = reply
                .get()
                .map_err(wire_err)?
                .get_report()
                .map_err(wire_err)?;
            Ok(FsckReport {
                chunks: r.get_chunks(),
                blobs: r.get_blobs(),
                trees: r.get_trees(),
                layers: r.get_layers(),
                images: r.get_images(),
                refs: r.get_refs(),
                problems: r
                    .get_problems()
                    .map_err(wire_err)?
                    .iter()
                    .map(|p| {
                        Ok(Problem {
                            object: text(p.get_object())?,
                            name: text(p.get_name())?,
                            problem: text(p.get_problem())?,
                        })
                    })
                    .collect::<Result<_>>()?,
                // Volume counts are not in the schema yet (volumed's volume wiring adds
                // them); volume problems do travel in `problems`.
                ..FsckReport::default()
            })
        })
    }

    fn push_image(
        &self,
        spec: &str,
        progress: &Arc<castore::TierProgress>,
    ) -> Result<(String, castore::TierReport)> {
        self.run(async {
            let mut req = self.store.push_image_request();
            req.get().set_image(spec);
            req.get()
                .set_progress(capnp_rpc::new_client(TransferSink(progress.clone())));
            let reply = req.send().promise.await.map_err(wire_err)?;
            tier_report(
                reply
                    .get()
                    .map_err(wire_err)?
                    .get_report()
                    .map_err(wire_err)?,
            )
        })
    }

    fn pull_image(
        &self,
        spec: &str,
        chunks: bool,
        progress: &Arc<castore::TierProgress>,
    ) -> Result<(String, castore::TierReport)> {
        self.run(async {
            let mut req = self.store.pull_image_request();
            req.get().set_image(spec);
            req.get().set_chunks(chunks);
            req.get()
                .set_progress(capnp_rpc::new_client(TransferSink(progress.clone())));
            let reply = req.send().promise.await.map_err(wire_err)?;
            tier_report(
                reply
                    .get()
                    .map_err(wire_err)?
                    .get_report()
                    .map_err(wire_err)?,
            )
        })
    }

    fn pull_registry(
        &self,
        req: &registry::PullRequest,
        progress: Arc<Progress>,
    ) -> Result<registry::PullReport> {
        self.run(async {
            let mut call = self.store.pull_registry_request();
            let mut p = call.get();
            p.set_reference(&req.reference);
            p.set_name(req.name.as_deref().unwrap_or(""));
            if let Some(c) = &req.credentials {
                p.set_username(&c.username);
                p.set_password(&c.password);
            }
            p.set_plain_http(req.plain_http);
            p.set_progress(capnp_rpc::new_client(ProgressSink(progress)));
            let reply = call.send().promise.await.map_err(wire_err)?;
            let r = reply
                .get()
                .map_err(wire_err)?
                .get_report()
                .map_err(wire_err)?;
            Ok(registry::PullReport {
                import: import_report(r.get_import().map_err(wire_err)?)?,
                reference: text(r.get_reference())?,
                manifest: digest(r.get_manifest())?,
                platform: text(r.get_platform())?,
                layers: r.get_layers() as usize,
                layers_reused: r.get_layers_reused() as usize,
                fetched_bytes: r.get_fetched_bytes(),
                layer_bytes: r.get_layer_bytes(),
                seconds: r.get_seconds(),
            })
        })
    }

    fn stats(&self) -> Result<Stats> {
        self.run(async {
            let reply = self
                .store
                .stats_request()
                .send()
                .promise
                .await
                .map_err(wire_err)?;
            let s = reply
                .get()
                .map_err(wire_err)?
                .get_stats()
                .map_err(wire_err)?;
            Ok(Stats {
                images: s.get_images(),
                layers: s.get_layers(),
                trees: s.get_trees(),
                blobs: s.get_blobs(),
                volumes: s.get_volumes(),
                snapshots: s.get_snapshots(),
                // The wire keeps the store's figures flat (their ordinals predate the
                // two sides').
                store: DataStats {
                    chunks: s.get_chunks(),
                    logical_bytes: s.get_logical_bytes(),
                    unique_bytes: s.get_unique_bytes(),
                    stored_bytes: s.get_stored_bytes(),
                    dedup_ratio: s.get_dedup_ratio(),
                    total_ratio: s.get_total_ratio(),
                },
                disk_bytes: s.get_disk_bytes(),
                image_data: data_stats(s.get_image_data().map_err(wire_err)?),
                volume_data: data_stats(s.get_volume_data().map_err(wire_err)?),
                tier: match text(s.get_tier())? {
                    url if url.is_empty() => None,
                    url => Some(castore::TierStats {
                        url,
                        fetched_objects: s.get_fetched_objects(),
                        fetched_bytes: s.get_fetched_bytes(),
                        tiered_chunks: s.get_tiered_chunks(),
                        remote_chunks: s.get_remote_chunks(),
                        local_bytes: s.get_local_bytes(),
                        tiered_bytes: s.get_tiered_bytes(),
                        pinned_bytes: s.get_pinned_bytes(),
                        cache_limit: Some(s.get_cache_limit()).filter(|&n| n > 0),
                        evicted_chunks: s.get_evicted_chunks(),
                        evicted_bytes: s.get_evicted_bytes(),
                    }),
                },
            })
        })
    }
}
