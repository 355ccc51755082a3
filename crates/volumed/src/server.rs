//! The Cap'n Proto servers: `Daemon`, `Store`, `Mounts` and `Mount`. Wire readers and
//! builders stay in this module: requests are turned into owned values, the work runs
//! on a blocking thread against castore/layerfs, and its results are written back.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use capnp::capability::Rc as CapRc;
use castore::{
    Digest, ExportReport, ExportTarget, GcProgress, GcRoots, ImportOptions, ImportReport,
    SourceFormat, Store,
};
use schema::store_capnp::{
    Format, daemon, import_progress, mount, mounts, store, transfer_progress,
};

use crate::error::Error;
use crate::log;
use crate::mounts::{MountInfo, MountRecord, MountTable};
use crate::volume_rpc::{Endpoints, VolumesImpl};
use crate::volumes::Volumes;

/// What every capability of one daemon shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) store: Arc<Store>,
    pub(crate) mounts: Arc<MountTable>,
    pub(crate) volumes: Arc<Volumes>,
    pub(crate) layers: Arc<crate::layers::Layers>,
    pub(crate) endpoints: Endpoints,
    pub(crate) vhost: Arc<crate::vhost::VhostUser>,
    /// This host's id (`--host-id`), recorded with the volumes it pushes to the tier.
    pub(crate) host_id: String,
}

/// Logs request `what` of `client` once it is answered, as one line: `ok`, or what
/// `outcome` says of the result, or `failed: ` and the error's text (what the client is
/// told). Returns `r` as it is.
pub(crate) fn logged<T>(
    client: &str,
    what: &str,
    r: Result<T, capnp::Error>,
    outcome: impl FnOnce(&T) -> String,
) -> Result<T, capnp::Error> {
    match &r {
        Ok(v) => {
            let o = outcome(v);
            log!("{client}: {what}: {}", if o.is_empty() { "ok" } else { &o });
        }
        Err(e) => log!("{client}: {what}: failed: {}", e.extra),
    }
    r
}

/// No more to say of a result than `ok`.
pub(crate) fn ok<T>(_: &T) -> String {
    String::new()
}

/// How often a client's `ImportProgress` is told where an import stands.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// A progress call not answered in this long ends the reports (the import goes on).
const PROGRESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Waits for a progress call's reply, at most [`PROGRESS_TIMEOUT`].
async fn answered<T>(
    promise: impl std::future::Future<Output = Result<T, capnp::Error>>,
) -> Result<(), capnp::Error> {
    match tokio::time::timeout(PROGRESS_TIMEOUT, promise).await {
        Ok(r) => r.map(|_| ()),
        Err(_) => Err(capnp::Error::failed("progress call timed out".into())),
    }
}

/// Tells `sink` what an import's `progress` says.
async fn report_progress(
    sink: &import_progress::Client,
    progress: &castore::Progress,
) -> Result<(), capnp::Error> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut req = sink.update_request();
    let mut p = req.get();
    p.set_files(progress.files.load(Relaxed));
    p.set_bytes(progress.bytes.load(Relaxed));
    p.set_bytes_total(progress.bytes_total.load(Relaxed));
    answered(req.send().promise).await
}

/// Tells `sink` what a push's or pull's `progress` says.
async fn report_transfer(
    sink: &transfer_progress::Client,
    progress: &castore::TierProgress,
) -> Result<(), capnp::Error> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut req = sink.update_request();
    let mut p = req.get();
    p.set_done(progress.done.load(Relaxed));
    p.set_objects(progress.objects.load(Relaxed));
    p.set_bytes(progress.bytes.load(Relaxed));
    answered(req.send().promise).await
}

/// Runs `work`, calling `report` every [`PROGRESS_EVERY`] and once at the end. A report
/// that fails or stalls ends the reports: the work is never held up by its client's
/// progress bar.
async fn with_reports<T, R: std::future::Future<Output = Result<(), capnp::Error>>>(
    report: Option<impl Fn() -> R>,
    work: impl std::future::Future<Output = T>,
) -> T {
    let Some(report) = report else {
        return work.await;
    };
    let mut report = Some(report);
    let mut work = std::pin::pin!(work);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = &mut work => {
                if let Some(f) = &report {
                    let _ = f().await;
                }
                return r;
            }
            _ = tick.tick() => {
                if let Some(f) = &report
                    && f().await.is_err()
                {
                    report = None;
                }
            }
        }
    }
}

/// Runs `work` (an import filling `progress`), reporting to `sink`.
async fn with_progress<T>(
    sink: Option<import_progress::Client>,
    progress: Arc<castore::Progress>,
    work: impl std::future::Future<Output = T>,
) -> T {
    let report = sink.map(|s| {
        move || {
            let (s, p) = (s.clone(), progress.clone());
            async move { report_progress(&s, &p).await }
        }
    });
    with_reports(report, work).await
}

/// Runs `work` (a push or pull filling `progress`), reporting to `sink`.
pub(crate) async fn with_transfer<T>(
    sink: Option<transfer_progress::Client>,
    progress: Arc<castore::TierProgress>,
    work: impl std::future::Future<Output = T>,
) -> T {
    let report = sink.map(|s| {
        move || {
            let (s, p) = (s.clone(), progress.clone());
            async move { report_transfer(&s, &p).await }
        }
    });
    with_reports(report, work).await
}

/// An import's config changes, off the wire.
fn config_override(
    c: schema::store_capnp::config_override::Reader<'_>,
) -> Result<castore::ConfigOverride, capnp::Error> {
    let list =
        |r: capnp::Result<capnp::text_list::Reader<'_>>| -> Result<Vec<String>, capnp::Error> {
            r?.iter().map(text).collect()
        };
    Ok(castore::ConfigOverride {
        entrypoint: c
            .get_has_entrypoint()
            .then(|| list(c.get_entrypoint()))
            .transpose()?,
        cmd: c.get_has_cmd().then(|| list(c.get_cmd())).transpose()?,
        env: list(c.get_env())?,
        workdir: c
            .get_has_workdir()
            .then(|| text(c.get_workdir()))
            .transpose()?,
        user: c.get_has_user().then(|| text(c.get_user())).transpose()?,
    })
}

/// The `progress` capability of a request, if the client sent one.
pub(crate) fn progress_sink<C>(
    has: bool,
    get: impl FnOnce() -> capnp::Result<C>,
) -> Result<Option<C>, capnp::Error> {
    if has { get().map(Some) } else { Ok(None) }
}

/// An import's result, in short.
fn import_outcome(r: &ImportReport) -> String {
    let made = match (r.image, r.layers.last()) {
        (Some(d), _) => format!("image {d}"),
        (None, Some(l)) => format!("layer {l}"),
        (None, None) => "nothing".to_string(),
    };
    format!(
        "{made}, {} files, {} bytes, {} new chunks",
        r.files, r.logical_bytes, r.new_chunks
    )
}

/// An export's result, in short.
fn export_outcome(r: &ExportReport) -> String {
    format!("{} entries, {} bytes", r.entries, r.bytes)
}

/// Runs `f` on tokio's blocking pool so the event loop keeps serving other clients.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, capnp::Error> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Into::into),
        Err(e) => Err(Error::Worker(e.to_string()).into()),
    }
}

pub(crate) fn text(r: capnp::Result<capnp::text::Reader<'_>>) -> capnp::Result<String> {
    Ok(r?
        .to_str()
        .map_err(|_| capnp::Error::failed("text argument is not UTF-8".into()))?
        .to_string())
}

fn abs_path(s: &str, what: &str) -> Result<PathBuf, Error> {
    let p = PathBuf::from(s);
    if !p.is_absolute() {
        return Err(Error::BadRequest(format!(
            "{what} {s:?} must be an absolute path on the daemon's host"
        )));
    }
    Ok(p)
}

fn source_format(f: Result<Format, capnp::NotInSchema>) -> Result<Option<SourceFormat>, Error> {
    match f {
        Ok(Format::Auto) => Ok(None),
        Ok(Format::Dir) => Ok(Some(SourceFormat::Dir)),
        Ok(Format::Tar) => Ok(Some(SourceFormat::Tar)),
        Ok(Format::Oci) => Ok(Some(SourceFormat::Oci)),
        Ok(Format::Docker) => Ok(Some(SourceFormat::Docker)),
        Err(capnp::NotInSchema(n)) => Err(Error::BadRequest(format!("unknown import format {n}"))),
    }
}

/// Who sent one connection's requests, for the log: `pid 4242 (tide)`.
pub(crate) type Client = Rc<str>;

/// The bootstrap capability, one per connection: the capabilities it hands out log their
/// requests with the connection's client.
#[derive(Debug)]
pub(crate) struct DaemonImpl(pub(crate) Rc<Shared>, pub(crate) Client);

impl daemon::Server for DaemonImpl {
    async fn version(
        self: CapRc<Self>,
        _: daemon::VersionParams,
        mut results: daemon::VersionResults,
    ) -> Result<(), capnp::Error> {
        let mut r = results.get();
        r.set_version(schema::store_capnp::VERSION);
        r.set_daemon(concat!("volumed ", env!("CARGO_PKG_VERSION")));
        Ok(())
    }

    async fn store(
        self: CapRc<Self>,
        _: daemon::StoreParams,
        mut results: daemon::StoreResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_store(capnp_rpc::new_client(StoreImpl(
            self.0.clone(),
            self.1.clone(),
        )));
        Ok(())
    }

    async fn mounts(
        self: CapRc<Self>,
        _: daemon::MountsParams,
        mut results: daemon::MountsResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_mounts(capnp_rpc::new_client(MountsImpl(
            self.0.clone(),
            self.1.clone(),
        )));
        Ok(())
    }

    async fn volumes(
        self: CapRc<Self>,
        _: daemon::VolumesParams,
        mut results: daemon::VolumesResults,
    ) -> Result<(), capnp::Error> {
        results
            .get()
            .set_volumes(capnp_rpc::new_client(VolumesImpl {
                volumes: self.0.volumes.clone(),
                exports: crate::exports::HostExports::new(&self.0.volumes, &self.0.layers),
                endpoints: self.0.endpoints.clone(),
                vhost: self.0.vhost.clone(),
                host_id: self.0.host_id.clone(),
                client: self.1.clone(),
            }));
        Ok(())
    }
}

// ---- Store ----

fn export_target(path: &str) -> Result<ExportTarget, Error> {
    if path == "-" {
        return Err(Error::BadRequest(
            "volumed cannot export to stdout: give a directory or FILE.tar path".into(),
        ));
    }
    Ok(ExportTarget::from_path(&abs_path(path, "export target")?))
}

fn set_import_report(mut b: schema::store_capnp::import_report::Builder<'_>, r: &ImportReport) {
    b.set_image(r.image.map(|d| d.to_string()).unwrap_or_default());
    b.set_name(r.name.as_deref().unwrap_or(""));
    let mut l = b.reborrow().init_layers(r.layers.len() as u32);
    for (i, d) in r.layers.iter().enumerate() {
        l.set(i as u32, d.to_string());
    }
    b.set_files(r.files);
    b.set_logical_bytes(r.logical_bytes);
    b.set_chunks(r.chunks);
    b.set_new_chunks(r.new_chunks);
    b.set_new_chunk_bytes(r.new_chunk_bytes);
    b.set_new_stored_bytes(r.new_stored_bytes);
    b.set_seconds(r.seconds);
}

fn set_export_report(mut b: schema::store_capnp::export_report::Builder<'_>, r: &ExportReport) {
    b.set_entries(r.entries);
    b.set_bytes(r.bytes);
}

fn set_layer(mut b: schema::store_capnp::layer_summary::Builder<'_>, l: &castore::LayerSummary) {
    b.set_digest(l.digest.to_string());
    b.set_diff_id(l.diff_id.map(|d| d.to_string()).unwrap_or_default());
    b.set_entries(l.entries);
    b.set_size(l.size);
}

fn set_data_stats(mut b: schema::store_capnp::data_stats::Builder<'_>, d: &castore::DataStats) {
    b.set_chunks(d.chunks);
    b.set_logical_bytes(d.logical_bytes);
    b.set_unique_bytes(d.unique_bytes);
    b.set_stored_bytes(d.stored_bytes);
    b.set_dedup_ratio(d.dedup_ratio);
    b.set_total_ratio(d.total_ratio);
}

fn set_texts(mut b: capnp::text_list::Builder<'_>, v: &[String]) {
    for (i, s) in v.iter().enumerate() {
        b.set(i as u32, s);
    }
}

/// The `Store` capability (and the client whose requests it logs).
#[derive(Debug)]
pub(crate) struct StoreImpl(Rc<Shared>, Client);

impl StoreImpl {
    /// An export request (`what`, logged) to `path`: `export` writes it there on a
    /// blocking thread.
    async fn export(
        &self,
        what: &str,
        path: &str,
        export: impl FnOnce(&Store, &ExportTarget) -> castore::Result<ExportReport> + Send + 'static,
    ) -> Result<ExportReport, capnp::Error> {
        let store = self.0.store.clone();
        let r = async {
            let target = export_target(path)?;
            blocking(move || Ok(export(&store, &target)?)).await
        }
        .await;
        logged(&self.1, what, r, export_outcome)
    }
}

impl store::Server for StoreImpl {
    async fn import_image(
        self: CapRc<Self>,
        params: store::ImportImageParams,
        mut results: store::ImportImageResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (path, name) = (text(p.get_path())?, text(p.get_name())?);
        let what = match name.as_str() {
            "" => format!("import image {path}"),
            n => format!("import image {path} as {n}"),
        };
        let store = self.0.store.clone();
        let progress = Arc::new(castore::Progress::default());
        let r = async {
            let path = abs_path(&path, "import source")?;
            let format = source_format(p.get_format())?;
            let sink = progress_sink(p.has_progress(), || p.get_progress())?;
            let config = if p.has_config() {
                config_override(p.get_config()?)?
            } else {
                castore::ConfigOverride::default()
            };
            let opts = ImportOptions {
                format,
                progress: progress.clone(),
                config,
            };
            let work = blocking(move || {
                let name = (!name.is_empty()).then_some(name.as_str());
                Ok(store.import_image(&path, name, &opts)?)
            });
            with_progress(sink, progress, work).await
        }
        .await;
        let r = logged(&self.1, &what, r, import_outcome)?;
        set_import_report(results.get().init_report(), &r);
        if let Some(image) = r.image {
            publish(
                self.0.store.clone(),
                r.name.clone().unwrap_or(image.to_string()),
            );
        }
        Ok(())
    }

    async fn import_layer(
        self: CapRc<Self>,
        params: store::ImportLayerParams,
        mut results: store::ImportLayerResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let path = text(p.get_path())?;
        let what = format!("import layer {path}");
        let store = self.0.store.clone();
        let progress = Arc::new(castore::Progress::default());
        let r = async {
            let path = abs_path(&path, "import source")?;
            let format = source_format(p.get_format())?;
            let sink = progress_sink(p.has_progress(), || p.get_progress())?;
            let opts = ImportOptions {
                format,
                progress: progress.clone(),
                ..ImportOptions::default()
            };
            let work = blocking(move || Ok(store.import_layer(&path, &opts)?));
            with_progress(sink, progress, work).await
        }
        .await;
        let r = logged(&self.1, &what, r, import_outcome)?;
        set_import_report(results.get().init_report(), &r);
        Ok(())
    }

    async fn images(
        self: CapRc<Self>,
        _: store::ImagesParams,
        mut results: store::ImagesResults,
    ) -> Result<(), capnp::Error> {
        let store = self.0.store.clone();
        let r = blocking(move || Ok(store.image_summaries()?)).await;
        let images = logged(&self.1, "list images", r, |v| format!("{} images", v.len()))?;
        let mut list = results.get().init_images(images.len() as u32);
        for (i, s) in images.iter().enumerate() {
            let mut b = list.reborrow().get(i as u32);
            b.set_name(&s.name);
            b.set_digest(s.digest.to_string());
            b.set_layers(s.layers as u32);
            b.set_size(s.size);
        }
        Ok(())
    }

    async fn inspect(
        self: CapRc<Self>,
        params: store::InspectParams,
        mut results: store::InspectResults,
    ) -> Result<(), capnp::Error> {
        let spec = text(params.get()?.get_image())?;
        let what = format!("inspect image {spec}");
        let store = self.0.store.clone();
        let r = blocking(move || Ok(store.image_detail(&spec)?)).await;
        let detail = logged(&self.1, &what, r, ok)?;
        let mut b = results.get().init_detail();
        b.set_digest(detail.digest.to_string());
        set_texts(
            b.reborrow().init_names(detail.names.len() as u32),
            &detail.names,
        );
        let mut lb = b.reborrow().init_layers(detail.layers.len() as u32);
        for (i, l) in detail.layers.iter().enumerate() {
            set_layer(lb.reborrow().get(i as u32), l);
        }
        b.set_size(detail.size);
        set_texts(b.reborrow().init_env(detail.env.len() as u32), &detail.env);
        set_texts(
            b.reborrow().init_entrypoint(detail.entrypoint.len() as u32),
            &detail.entrypoint,
        );
        set_texts(b.reborrow().init_cmd(detail.cmd.len() as u32), &detail.cmd);
        b.set_workdir(&detail.workdir);
        b.set_user(&detail.user);
        b.set_architecture(&detail.architecture);
        b.set_os(&detail.os);
        let mut labels = b.init_labels(detail.labels.len() as u32);
        for (i, (k, v)) in detail.labels.iter().enumerate() {
            let mut l = labels.reborrow().get(i as u32);
            l.set_key(k);
            l.set_value(v);
        }
        Ok(())
    }

    async fn export_image(
        self: CapRc<Self>,
        params: store::ExportImageParams,
        mut results: store::ExportImageResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (spec, path) = (text(p.get_image())?, text(p.get_path())?);
        let what = format!("export image {spec} to {path}");
        let r = self
            .export(&what, &path, move |store, target| {
                let d = store.resolve_image(&spec)?;
                store.export_image(&d, target)
            })
            .await?;
        set_export_report(results.get().init_report(), &r);
        Ok(())
    }

    async fn remove_image(
        self: CapRc<Self>,
        params: store::RemoveImageParams,
        mut results: store::RemoveImageResults,
    ) -> Result<(), capnp::Error> {
        let name = text(params.get()?.get_name())?;
        let what = format!("remove image {name}");
        let store = self.0.store.clone();
        let r = blocking(move || Ok(store.remove_image_name(&name)?)).await;
        let d = logged(&self.1, &what, r, |d| format!("was {d}"))?;
        results.get().set_digest(d.to_string());
        Ok(())
    }

    async fn layers(
        self: CapRc<Self>,
        _: store::LayersParams,
        mut results: store::LayersResults,
    ) -> Result<(), capnp::Error> {
        let store = self.0.store.clone();
        let r = blocking(move || Ok(store.lone_layers()?)).await;
        let layers = logged(&self.1, "list layers", r, |v| format!("{} layers", v.len()))?;
        let mut list = results.get().init_layers(layers.len() as u32);
        for (i, l) in layers.iter().enumerate() {
            set_layer(list.reborrow().get(i as u32), l);
        }
        Ok(())
    }

    async fn export_layer(
        self: CapRc<Self>,
        params: store::ExportLayerParams,
        mut results: store::ExportLayerResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (layer, path) = (text(p.get_layer())?, text(p.get_path())?);
        let what = format!("export layer {layer} to {path}");
        let r = self
            .export(&what, &path, move |store, target| {
                let d = store.resolve_layer(&layer)?;
                store.export_layer(&d, target)
            })
            .await?;
        set_export_report(results.get().init_report(), &r);
        Ok(())
    }

    async fn layer_erofs(
        self: CapRc<Self>,
        params: store::LayerErofsParams,
        mut results: store::LayerErofsResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let layer = text(p.get_layer())?;
        let path = PathBuf::from(text(p.get_path())?);
        if !path.is_absolute() {
            return Err(Error::BadRequest(format!(
                "layer erofs: {} is not an absolute path",
                path.display()
            ))
            .into());
        }
        let layers = self.0.layers.clone();
        let store = self.0.store.clone();
        log!("layer erofs {layer} to {}", path.display());
        let (image, bytes) = blocking(move || {
            let d = layers.resolve(&layer)?;
            let image = layers.image(&d)?;
            let bytes = image.write_file(&store, &path).map_err(|e| match e {
                layerfs::erofs::Error::Store(e) => Error::Store(e),
                e => Error::BadRequest(format!("{}: {e}", path.display())),
            })?;
            Ok((image, bytes))
        })
        .await?;
        let r = image.report();
        let mut b = results.get().init_report();
        b.set_layer(image.layer().to_string());
        b.set_bytes(bytes);
        b.set_metadata_bytes(r.metadata_bytes);
        b.set_data_bytes(r.data_bytes);
        b.set_inodes(r.inodes);
        b.set_build_ms(r.build_time.as_secs_f64() * 1e3);
        set_texts(
            b.init_dropped_xattrs(r.dropped_xattrs.len() as u32),
            &r.dropped_xattrs,
        );
        Ok(())
    }

    async fn remove_layer(
        self: CapRc<Self>,
        params: store::RemoveLayerParams,
        _: store::RemoveLayerResults,
    ) -> Result<(), capnp::Error> {
        let layer = text(params.get()?.get_layer())?;
        let what = format!("remove layer {layer}");
        let store = self.0.store.clone();
        let r = blocking(move || {
            let d = store.resolve_layer(&layer)?;
            Ok(store.remove_layer_ref(&d)?)
        })
        .await;
        logged(&self.1, &what, r, ok)
    }

    async fn gc(
        self: CapRc<Self>,
        _: store::GcParams,
        mut results: store::GcResults,
    ) -> Result<(), capnp::Error> {
        let store = self.0.store.clone();
        let mounts = self.0.mounts.clone();
        let layers = self.0.layers.clone();
        let r = blocking(move || {
            // Live mounts' images, and those of mounts in progress, are roots; read after
            // the store's names (gc_with's contract).
            let roots = || GcRoots {
                images: mounts.images(),
                layers: layers.gc_roots(),
                ..GcRoots::default()
            };
            Ok(store.gc_with(roots, &GcProgress::default())?)
        })
        .await;
        let r = logged(&self.1, "gc", r, |r| {
            format!(
                "{} kept, {} chunks ({} bytes) freed",
                r.kept, r.chunks, r.freed_bytes
            )
        })?;
        let mut b = results.get().init_report();
        b.set_kept(r.kept);
        b.set_images(r.images);
        b.set_layers(r.layers);
        b.set_trees(r.trees);
        b.set_blobs(r.blobs);
        b.set_chunks(r.chunks);
        b.set_freed_bytes(r.freed_bytes);
        Ok(())
    }

    async fn fsck(
        self: CapRc<Self>,
        _: store::FsckParams,
        mut results: store::FsckResults,
    ) -> Result<(), capnp::Error> {
        let store = self.0.store.clone();
        let r = blocking(move || Ok(store.fsck()?)).await;
        let r = logged(&self.1, "fsck", r, |r| match r.problems.len() {
            0 => "consistent".to_string(),
            n => format!("{n} problems"),
        })?;
        let mut b = results.get().init_report();
        b.set_chunks(r.chunks);
        b.set_blobs(r.blobs);
        b.set_trees(r.trees);
        b.set_layers(r.layers);
        b.set_images(r.images);
        b.set_refs(r.refs);
        let mut list = b.init_problems(r.problems.len() as u32);
        for (i, p) in r.problems.iter().enumerate() {
            let mut pb = list.reborrow().get(i as u32);
            pb.set_object(&p.object);
            pb.set_name(&p.name);
            pb.set_problem(&p.problem);
        }
        Ok(())
    }

    async fn stats(
        self: CapRc<Self>,
        _: store::StatsParams,
        mut results: store::StatsResults,
    ) -> Result<(), capnp::Error> {
        let store = self.0.store.clone();
        let r = blocking(move || Ok(store.stats()?)).await;
        let s = logged(&self.1, "stats", r, ok)?;
        let mut b = results.get().init_stats();
        b.set_images(s.images);
        b.set_layers(s.layers);
        b.set_trees(s.trees);
        b.set_blobs(s.blobs);
        b.set_chunks(s.store.chunks);
        b.set_logical_bytes(s.store.logical_bytes);
        b.set_unique_bytes(s.store.unique_bytes);
        b.set_stored_bytes(s.store.stored_bytes);
        b.set_dedup_ratio(s.store.dedup_ratio);
        b.set_total_ratio(s.store.total_ratio);
        b.set_disk_bytes(s.disk_bytes);
        b.set_volumes(s.volumes);
        b.set_snapshots(s.snapshots);
        set_data_stats(b.reborrow().init_image_data(), &s.image_data);
        set_data_stats(b.reborrow().init_volume_data(), &s.volume_data);
        if let Some(t) = &s.tier {
            b.set_tier(&t.url);
            b.set_fetched_objects(t.fetched_objects);
            b.set_fetched_bytes(t.fetched_bytes);
            b.set_tiered_chunks(t.tiered_chunks);
            b.set_remote_chunks(t.remote_chunks);
            b.set_local_bytes(t.local_bytes);
            b.set_tiered_bytes(t.tiered_bytes);
            b.set_pinned_bytes(t.pinned_bytes);
            b.set_cache_limit(t.cache_limit.unwrap_or(0));
            b.set_evicted_chunks(t.evicted_chunks);
            b.set_evicted_bytes(t.evicted_bytes);
        }
        Ok(())
    }

    async fn push_image(
        self: CapRc<Self>,
        params: store::PushImageParams,
        mut results: store::PushImageResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let spec = text(p.get_image())?;
        let sink = progress_sink(p.has_progress(), || p.get_progress())?;
        let what = format!("push image {spec}");
        let store = self.0.store.clone();
        let progress = Arc::new(castore::TierProgress::default());
        let prog = progress.clone();
        let work = blocking(move || Ok(store.push_image(&spec, &prog)?));
        let r = with_transfer(sink, progress, work).await;
        let r = logged(&self.1, &what, r, transfer_outcome)?;
        set_tier_report(results.get().init_report(), &self.0.store, &r);
        Ok(())
    }

    async fn pull_image(
        self: CapRc<Self>,
        params: store::PullImageParams,
        mut results: store::PullImageResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (spec, chunks) = (text(p.get_image())?, p.get_chunks());
        let sink = progress_sink(p.has_progress(), || p.get_progress())?;
        let what = format!(
            "pull image {spec}{}",
            if chunks { " (all chunks)" } else { "" }
        );
        let store = self.0.store.clone();
        let progress = Arc::new(castore::TierProgress::default());
        let prog = progress.clone();
        let work = blocking(move || Ok(store.pull_image(&spec, chunks, &prog)?));
        let r = with_transfer(sink, progress, work).await;
        let r = logged(&self.1, &what, r, transfer_outcome)?;
        set_tier_report(results.get().init_report(), &self.0.store, &r);
        Ok(())
    }

    async fn pull_registry(
        self: CapRc<Self>,
        params: store::PullRegistryParams,
        mut results: store::PullRegistryResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let reference = text(p.get_reference())?;
        let name = text(p.get_name())?;
        let (username, password) = (text(p.get_username())?, text(p.get_password())?);
        // The password never reaches the log: only the reference and the user do.
        let what = match username.as_str() {
            "" => format!("pull {reference} from its registry"),
            u => format!("pull {reference} from its registry as {u}"),
        };
        let sink = progress_sink(p.has_progress(), || p.get_progress())?;
        let req = registry::PullRequest {
            reference,
            name: (!name.is_empty()).then_some(name),
            credentials: (!username.is_empty())
                .then_some(registry::Credentials { username, password }),
            plain_http: p.get_plain_http(),
        };
        let store = self.0.store.clone();
        let progress = Arc::new(castore::Progress::default());
        let prog = progress.clone();
        let work = blocking(move || Ok(registry::pull_request(&store, &req, prog)?));
        let r = with_progress(sink, progress, work).await;
        let r = logged(&self.1, &what, r, registry_outcome)?;
        set_registry_report(results.get().init_report(), &r);
        if let Some(image) = r.import.image {
            publish(
                self.0.store.clone(),
                r.import.name.clone().unwrap_or(image.to_string()),
            );
        }
        Ok(())
    }
}

/// A registry pull's result, in short.
fn registry_outcome(r: &registry::PullReport) -> String {
    format!(
        "{} ({}), {} of {} layers fetched ({} bytes), {} reused by diff_id; {}",
        r.manifest,
        r.platform,
        r.layers - r.layers_reused,
        r.layers,
        r.fetched_bytes,
        r.layers_reused,
        import_outcome(&r.import)
    )
}

fn set_registry_report(
    mut b: schema::store_capnp::registry_report::Builder<'_>,
    r: &registry::PullReport,
) {
    set_import_report(b.reborrow().init_import(), &r.import);
    b.set_reference(&r.reference);
    b.set_manifest(r.manifest.to_string());
    b.set_platform(&r.platform);
    b.set_layers(r.layers as u32);
    b.set_layers_reused(r.layers_reused as u32);
    b.set_fetched_bytes(r.fetched_bytes);
    b.set_layer_bytes(r.layer_bytes);
    b.set_seconds(r.seconds);
}

/// How often a background publish logs where it stands.
const PUBLISH_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A tiered host publishes what it imports: pushes image `spec` to the tier on a
/// thread of its own, logging where it stands and the outcome (a failed push is
/// finished by `tide image push`, which sends only what is missing).
fn publish(store: Arc<Store>, spec: String) {
    let Some(tier) = store.tier() else { return };
    let spawned = std::thread::Builder::new()
        .name("publish".into())
        .spawn(move || {
            log!("publishing {spec} to {}", tier.url());
            let progress = castore::TierProgress::default();
            let done = std::sync::atomic::AtomicBool::new(false);
            let r = std::thread::scope(|sc| {
                // Where a long publish stands, every few seconds, until it ends.
                sc.spawn(|| {
                    use std::sync::atomic::Ordering::Relaxed;
                    let mut waited = std::time::Duration::ZERO;
                    while !done.load(Relaxed) {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        waited += std::time::Duration::from_millis(100);
                        if waited >= PUBLISH_REPORT_EVERY && !done.load(Relaxed) {
                            waited = std::time::Duration::ZERO;
                            log!(
                                "publishing {spec}: {} of {} objects looked at, {} bytes sent",
                                progress.done.load(Relaxed),
                                progress.objects.load(Relaxed),
                                progress.bytes.load(Relaxed)
                            );
                        }
                    }
                });
                let r = store.push_image(&spec, &progress);
                done.store(true, std::sync::atomic::Ordering::Relaxed);
                r
            });
            match r {
                Ok(r) => log!("published {spec}: {}", transfer_outcome(&r)),
                Err(e) => log!(
                    "publishing {spec} to {} failed: {e}; `tide image push {spec}` sends the rest",
                    tier.url()
                ),
            }
        });
    if let Err(e) = spawned {
        log!("publishing: cannot start a thread: {e}");
    }
}

/// The image `spec` names; one this host lacks is pulled from the tier (if it has one)
/// because something here needs it (a mount, an instance): see [`after_pull`].
pub(crate) fn resolve_or_pull(store: &Arc<Store>, spec: &str) -> castore::Result<Digest> {
    let (d, pulled) = store.resolve_or_pull(spec)?;
    if let Some(r) = pulled {
        after_pull(store, spec, &r);
    }
    Ok(d)
}

/// An image was pulled because something here needs it (a mount, an instance): the
/// first cold host records which chunks it reads until that is up (or its mount ends);
/// later ones fetch that read set in the background, ahead of the reads.
fn after_pull(store: &Arc<Store>, spec: &str, r: &castore::TierReport) {
    log!(
        "pulled image {spec} from the tier: {} records, {} chunks left remote, {:.2} s",
        r.transferred,
        r.chunks_remote,
        r.seconds
    );
    let d = r.image;
    match store.record_reads(&d) {
        Ok(true) => log!("image {spec}: recording the chunks it reads (its read set)"),
        Ok(false) => {
            let store = store.clone();
            let name = spec.to_string();
            let spawned = std::thread::Builder::new()
                .name("prefetch-set".into())
                .spawn(move || {
                    let start = std::time::Instant::now();
                    match store.readset(&d).and_then(|set| store.prefetch(&set)) {
                        Ok(n) => log!(
                            "image {name}: prefetched {n} chunks of its read set in {:.2} s",
                            start.elapsed().as_secs_f64()
                        ),
                        Err(e) => log!("image {name}: prefetching its read set: {e}"),
                    }
                });
            if let Err(e) = spawned {
                log!("image {spec}: no thread to prefetch its read set: {e}");
            }
        }
        Err(e) => log!("image {spec}: cannot record its reads: {e}"),
    }
}

/// Ends the recording of `image`'s reads, if one runs, sending its read set to the tier
/// (on a blocking thread: it is a PUT).
pub(crate) async fn finish_reads_after(store: &Arc<Store>, image: Option<Digest>, why: &str) {
    let Some(d) = image else { return };
    let (store, why) = (store.clone(), why.to_string());
    let _ = tokio::task::spawn_blocking(move || finish_reads(&store, &d, &why)).await;
}

/// [`finish_reads_after`] on the calling thread.
pub(crate) fn finish_reads(store: &Store, d: &Digest, why: &str) {
    match store.finish_reads(d) {
        Ok(0) => {}
        Ok(n) => log!(
            "image {}: read set of {n} chunks sent to the tier ({why})",
            d.short()
        ),
        Err(e) => log!("image {}: sending its read set: {e}", d.short()),
    }
}

fn transfer_outcome(r: &castore::TierReport) -> String {
    format!(
        "{}: {} of {} objects moved ({} bytes), {} already there, {} chunks left remote, {:.2} s",
        r.image.short(),
        r.transferred,
        r.objects,
        r.bytes,
        r.skipped,
        r.chunks_remote,
        r.seconds
    )
}

fn set_tier_report(
    mut b: schema::store_capnp::tier_report::Builder<'_>,
    store: &Store,
    r: &castore::TierReport,
) {
    b.set_tier(
        store
            .tier()
            .map(|t| t.url().to_string())
            .unwrap_or_default(),
    );
    b.set_image(r.image.to_string());
    b.set_name(r.name.as_deref().unwrap_or(""));
    b.set_objects(r.objects);
    b.set_transferred(r.transferred);
    b.set_skipped(r.skipped);
    b.set_bytes(r.bytes);
    b.set_content_bytes(r.content_bytes);
    b.set_chunks_remote(r.chunks_remote);
    b.set_seconds(r.seconds);
}

// ---- Mounts ----

fn set_mount_info(mut b: schema::store_capnp::mount_info::Builder<'_>, m: &MountInfo) {
    b.set_id(m.record.id);
    b.set_image(&m.record.image);
    b.set_name(&m.record.name);
    b.set_mountpoint(m.record.mountpoint.to_string_lossy());
    b.set_read_only(m.record.read_only);
    b.set_scratch_bytes(m.scratch_bytes);
}

/// Unmounts mount `id` on a blocking thread. A busy mount (a process inside it) is
/// put back and the call fails with EBUSY, unless `detach_if_busy` (shutdown): then it
/// is detached lazily and goes away with its last user.
pub(crate) async fn unmount(
    mounts: Arc<MountTable>,
    id: u64,
    detach_if_busy: bool,
) -> Result<Option<Digest>, Error> {
    match tokio::task::spawn_blocking(move || unmount_now(&mounts, id, detach_if_busy)).await {
        Ok(r) => r,
        Err(e) => Err(Error::Worker(e.to_string())),
    }
}

/// [`unmount`] on the calling thread (which may block). Returns the image that was
/// mounted (None: nothing was mounted there).
pub(crate) fn unmount_now(
    mounts: &Arc<MountTable>,
    id: u64,
    detach_if_busy: bool,
) -> Result<Option<Digest>, Error> {
    let Some((record, image, mut mount)) = mounts.take(id) else {
        return Ok(None);
    };
    let scratch = mounts.scratch_dir(id);
    if detach_if_busy {
        // Dropping a busy mount detaches it lazily (and layerfs then drops scratch).
        mount.unmount().map_err(Error::from)?;
        return Ok(Some(image));
    }
    match mount.try_unmount() {
        Ok(()) => {
            // layerfs empties a writable mount's scratch; a read-only one has none.
            let _ = std::fs::remove_dir_all(&scratch);
            Ok(Some(image))
        }
        Err(e) => {
            mounts.insert(record, image, mount);
            Err(e.into())
        }
    }
}

/// Mounts image `spec` at `mountpoint` (a directory) with a fresh scratch layer (none
/// when `read_only`), records it in the mount table and returns its id and image. Runs
/// on the calling thread (which may block); a failure leaves no reservation, record or
/// scratch behind.
pub(crate) fn mount_image(
    table: &Arc<MountTable>,
    store: &Arc<Store>,
    spec: &str,
    mountpoint: &Path,
    read_only: bool,
) -> Result<(u64, Digest), Error> {
    let id = table.reserve(mountpoint)?;
    let scratch_dir = table.scratch_dir(id);
    let r = (|| -> Result<Digest, Error> {
        check_mountpoint(mountpoint)?;
        // An image this host lacks comes from the tier first (outside the table's lock:
        // a pull waits on the network).
        resolve_or_pull(store, spec)?;
        // A GC root from here on (see `MountTable::resolve_and_pin` for why this is
        // race-free against a concurrent gc).
        let image = table.resolve_and_pin(id, || store.resolve_image(spec))?;
        let m = layerfs::mount(
            store.clone(),
            image,
            mountpoint,
            layerfs::MountOptions {
                read_only,
                scratch_dir: scratch_dir.clone(),
            },
        );
        match m {
            Ok(m) => {
                let name = if spec.contains(':') && Digest::parse(spec).is_none() {
                    spec.to_string()
                } else {
                    String::new()
                };
                let record = MountRecord {
                    id,
                    image: image.to_string(),
                    name,
                    mountpoint: mountpoint.to_path_buf(),
                    read_only,
                };
                table.insert(record, image, m);
                Ok(image)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&scratch_dir);
                Err(Error::from(e))
            }
        }
    })();
    match r {
        Ok(image) => Ok((id, image)),
        Err(e) => {
            table.release(id, mountpoint);
            Err(e)
        }
    }
}

/// The `Mounts` capability (and the client whose requests it logs).
#[derive(Debug)]
pub(crate) struct MountsImpl(Rc<Shared>, Client);

impl mounts::Server for MountsImpl {
    async fn mount(
        self: CapRc<Self>,
        params: mounts::MountParams,
        mut results: mounts::MountResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (spec, mp) = (text(p.get_image())?, text(p.get_mountpoint())?);
        let read_only = p.get_read_only();
        let what = format!(
            "mount {spec} at {mp}{}",
            if read_only { " read-only" } else { "" }
        );
        let table = self.0.mounts.clone();
        let store = self.0.store.clone();
        let r = async {
            let mountpoint = abs_path(&mp, "mountpoint")?;
            blocking(move || mount_image(&table, &store, &spec, &mountpoint, read_only)).await
        }
        .await;
        let (id, _) = logged(&self.1, &what, r, |(id, image)| {
            format!("mount {id}, image {image}")
        })?;
        results.get().set_mount(capnp_rpc::new_client(MountImpl {
            shared: self.0.clone(),
            client: self.1.clone(),
            id,
        }));
        Ok(())
    }

    async fn list(
        self: CapRc<Self>,
        _: mounts::ListParams,
        mut results: mounts::ListResults,
    ) -> Result<(), capnp::Error> {
        let table = self.0.mounts.clone();
        let r = blocking(move || Ok(table.list())).await;
        let list = logged(&self.1, "list mounts", r, |v| format!("{} mounts", v.len()))?;
        let mut b = results.get().init_mounts(list.len() as u32);
        for (i, m) in list.iter().enumerate() {
            set_mount_info(b.reborrow().get(i as u32), m);
        }
        Ok(())
    }

    async fn umount(
        self: CapRc<Self>,
        params: mounts::UmountParams,
        _: mounts::UmountResults,
    ) -> Result<(), capnp::Error> {
        let mp = text(params.get()?.get_mountpoint())?;
        let what = format!("umount {mp}");
        let r = async {
            let mp = abs_path(&mp, "mountpoint")?;
            let Some(id) = self.0.mounts.id_at(&mp) else {
                return Err(Error::NotMounted(mp).into());
            };
            let image = unmount(self.0.mounts.clone(), id, false).await?;
            finish_reads_after(&self.0.store, image, "its mount ended").await;
            Ok(())
        }
        .await;
        logged(&self.1, &what, r, ok)
    }
}

fn check_mountpoint(mp: &Path) -> Result<(), Error> {
    match std::fs::metadata(mp) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::BadRequest(format!(
            "mountpoint {} is not a directory",
            mp.display()
        ))),
        Err(e) => Err(Error::BadRequest(format!(
            "mountpoint {}: {e}",
            mp.display()
        ))),
    }
}

/// One live mount's capability.
#[derive(Debug)]
pub(crate) struct MountImpl {
    shared: Rc<Shared>,
    client: Client,
    id: u64,
}

impl mount::Server for MountImpl {
    async fn info(
        self: CapRc<Self>,
        _: mount::InfoParams,
        mut results: mount::InfoResults,
    ) -> Result<(), capnp::Error> {
        let table = self.shared.mounts.clone();
        let id = self.id;
        let r = match blocking(move || Ok(table.info(id))).await {
            Ok(Some(info)) => Ok(info),
            Ok(None) => Err(Error::BadRequest(format!("mount {id} is no longer mounted")).into()),
            Err(e) => Err(e),
        };
        let info = logged(&self.client, &format!("info of mount {id}"), r, ok)?;
        set_mount_info(results.get().init_info(), &info);
        Ok(())
    }

    async fn umount(
        self: CapRc<Self>,
        _: mount::UmountParams,
        _: mount::UmountResults,
    ) -> Result<(), capnp::Error> {
        let r = match unmount(self.shared.mounts.clone(), self.id, false).await {
            Ok(image) => {
                finish_reads_after(&self.shared.store, image, "its mount ended").await;
                Ok(())
            }
            Err(e) => Err(e),
        };
        let what = format!("umount mount {}", self.id);
        logged(&self.client, &what, r.map_err(Into::into), ok)
    }
}
