//! The Cap'n Proto servers `Volumes` and `Attachment`: wire readers and builders for
//! volumes stay here; the work runs on a blocking thread against [`Volumes`].

use std::sync::Arc;

use capnp::capability::Rc as CapRc;
use castore::{AccessMode, SnapshotInfo, VolumeSpec};
use layerfs::nbd::{Exports, Intent};
use schema::store_capnp::{self, attachment, volumes};

use crate::error::Error;
use crate::exports::HostExports;
use crate::server::{Client, blocking, logged, ok, progress_sink, text, with_transfer};
use crate::vhost::VhostUser;
use crate::volumes::{Attachment, Listed, Volumes, split_snapshot};

/// Where NBD is served, for `Volumes.endpoints` (and `tide volume url`).
#[derive(Debug, Clone, Default)]
pub(crate) struct Endpoints {
    pub(crate) unix_socket: String,
    pub(crate) tcp: String,
}

impl Endpoints {
    /// The `nbd+unix://` URI of `export` on the Unix socket.
    pub(crate) fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.unix_socket)
    }

    /// The `nbd://HOST:PORT/EXPORT` URI of `export`, if NBD is served on TCP.
    fn tcp_uri(&self, export: &str) -> Result<String, Error> {
        if self.tcp.is_empty() {
            return Err(Error::BadRequest(
                "volumed serves NBD only on its Unix socket (started with --nbd-listen none)"
                    .into(),
            ));
        }
        Ok(format!("nbd://{}/{export}", self.tcp))
    }
}

/// The `Volumes` capability.
#[derive(Debug)]
pub(crate) struct VolumesImpl {
    pub(crate) volumes: Arc<Volumes>,
    /// Every export of the host, to check the one `url` names.
    pub(crate) exports: HostExports,
    pub(crate) endpoints: Endpoints,
    /// The host's vhost-user sockets.
    pub(crate) vhost: Arc<VhostUser>,
    /// This host's id, recorded with the volumes it pushes.
    pub(crate) host_id: String,
    /// Whose requests these are, for the log.
    pub(crate) client: Client,
}

fn wire_mode(m: AccessMode) -> store_capnp::AccessMode {
    match m {
        AccessMode::Rwo => store_capnp::AccessMode::Rwo,
        AccessMode::Rwx => store_capnp::AccessMode::Rwx,
        AccessMode::Rox => store_capnp::AccessMode::Rox,
    }
}

fn set_summary(mut b: store_capnp::volume_summary::Builder<'_>, l: &Listed) {
    let v = &l.summary;
    b.set_name(&v.name);
    b.set_size(v.size);
    b.set_extent_size(v.extent_size);
    b.set_mode(wire_mode(v.mode));
    b.set_instances(v.instances.unwrap_or(0));
    b.set_template(l.template.as_deref().unwrap_or(""));
    b.set_generation(v.generation);
    b.set_snapshots(v.snapshots as u32);
    if let Some(o) = &v.origin {
        b.set_origin_volume(&o.volume);
        b.set_origin_snapshot(&o.snapshot);
    }
    b.set_created(v.created);
    b.set_attachments(l.attachments);
}

fn set_snapshot(mut b: store_capnp::snapshot_info::Builder<'_>, s: &SnapshotInfo) {
    b.set_name(&s.name);
    b.set_generation(s.generation);
    b.set_size(s.size);
    b.set_created(s.created);
    let mut c = b.init_clones(s.clones.len() as u32);
    for (i, n) in s.clones.iter().enumerate() {
        c.set(i as u32, n);
    }
}

fn set_attachment(mut b: store_capnp::attachment_info::Builder<'_>, a: &Attachment) {
    b.set_id(a.id);
    b.set_volume(&a.volume);
    b.set_holder(&a.holder);
    b.set_read_only(a.read_only);
    b.set_persistent(a.persistent);
    b.set_since(a.since);
    b.set_export_name(a.export_name());
}

fn split_source(source: &str) -> Result<(String, String), Error> {
    split_snapshot(source)
        .map(|(v, s)| (v.to_string(), s.to_string()))
        .ok_or_else(|| {
            Error::BadRequest(format!(
                "clone source {source:?} must name a snapshot: VOLUME@SNAPSHOT"
            ))
        })
}

fn set_tier_report(
    mut b: store_capnp::volume_tier_report::Builder<'_>,
    r: &castore::VolumeTierReport,
) {
    b.set_volume(&r.volume);
    b.set_tier_name(&r.tier_name);
    b.set_snapshot(&r.snapshot);
    b.set_manifest(r.manifest.to_string());
    b.set_pushed(r.pushed);
    b.set_host(&r.host);
    b.set_size(r.size);
    b.set_chunks(r.chunks);
    b.set_transferred(r.transferred);
    b.set_skipped(r.skipped);
    b.set_bytes(r.bytes);
    b.set_seconds(r.seconds);
}

impl volumes::Server for VolumesImpl {
    async fn push(
        self: CapRc<Self>,
        params: volumes::PushParams,
        mut results: volumes::PushResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (volume, snapshot) = (text(p.get_volume())?, text(p.get_snapshot())?);
        let sink = progress_sink(p.has_progress(), || p.get_progress())?;
        let what = format!("push volume {volume}");
        let vols = self.volumes.clone();
        let host = self.host_id.clone();
        let progress = Arc::new(castore::TierProgress::default());
        let prog = progress.clone();
        let work = blocking(move || {
            let snap = (!snapshot.is_empty()).then_some(snapshot.as_str());
            Ok(vols.store().push_volume(&volume, snap, &host, &prog)?)
        });
        let r = with_transfer(sink, progress, work).await;
        let r = logged(&self.client, &what, r, |r| {
            format!(
                "snapshot {}, {} of {} chunks sent ({} B) in {:.2} s",
                r.snapshot,
                r.transferred,
                r.transferred + r.skipped,
                r.bytes,
                r.seconds
            )
        })?;
        set_tier_report(results.get().init_report(), &r);
        Ok(())
    }

    async fn pull(
        self: CapRc<Self>,
        params: volumes::PullParams,
        mut results: volumes::PullResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (volume, as_name) = (text(p.get_volume())?, text(p.get_as())?);
        let what = format!("pull volume {volume}");
        let vols = self.volumes.clone();
        let r = blocking(move || {
            let as_name = (!as_name.is_empty()).then_some(as_name.as_str());
            Ok(vols.store().pull_volume(&volume, as_name)?)
        })
        .await;
        let r = logged(&self.client, &what, r, |r| {
            format!(
                "volume {} from snapshot {} pushed by {} {} s ago",
                r.volume,
                r.snapshot,
                r.host,
                r.age()
            )
        })?;
        set_tier_report(results.get().init_report(), &r);
        Ok(())
    }

    async fn pushed(
        self: CapRc<Self>,
        params: volumes::PushedParams,
        mut results: volumes::PushedResults,
    ) -> Result<(), capnp::Error> {
        let volume = text(params.get()?.get_volume())?;
        let what = format!("look up volume {volume} in the tier");
        let vols = self.volumes.clone();
        let r = blocking(move || Ok(vols.store().pushed_volume(&volume)?)).await;
        let r = logged(&self.client, &what, r, |r| {
            format!("snapshot {}", r.snapshot)
        })?;
        set_tier_report(results.get().init_report(), &r);
        Ok(())
    }

    async fn create(
        self: CapRc<Self>,
        params: volumes::CreateParams,
        mut results: volumes::CreateResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let name = text(p.get_name())?;
        let what = format!("create volume {name} ({} bytes)", p.get_size());
        let vols = self.volumes.clone();
        let r = async {
            let mode = match p.get_mode() {
                Ok(store_capnp::AccessMode::Rwo) => AccessMode::Rwo,
                Ok(store_capnp::AccessMode::Rwx) => AccessMode::Rwx,
                Ok(store_capnp::AccessMode::Rox) => AccessMode::Rox,
                Err(capnp::NotInSchema(n)) => {
                    return Err(Error::BadRequest(format!("unknown access mode {n}")).into());
                }
            };
            let mut spec = VolumeSpec::new(name, p.get_size());
            spec.mode = mode;
            spec.instances = Some(p.get_instances()).filter(|&n| n > 0);
            if p.get_extent_size() != 0 {
                spec.extent_size = p.get_extent_size();
            }
            blocking(move || {
                let made = vols.create(&spec)?;
                made.iter().map(|v| vols.listed(&v.name)).collect()
            })
            .await
        }
        .await;
        let made: Vec<Listed> = logged(&self.client, &what, r, |made: &Vec<Listed>| {
            let names: Vec<&str> = made.iter().map(|v| v.summary.name.as_str()).collect();
            format!(
                "created {} ({})",
                names.join(", "),
                made[0].summary.mode.as_str()
            )
        })?;
        let mut l = results.get().init_volumes(made.len() as u32);
        for (i, v) in made.iter().enumerate() {
            set_summary(l.reborrow().get(i as u32), v);
        }
        Ok(())
    }

    async fn list(
        self: CapRc<Self>,
        _: volumes::ListParams,
        mut results: volumes::ListResults,
    ) -> Result<(), capnp::Error> {
        let vols = self.volumes.clone();
        let r = blocking(move || vols.list()).await;
        let all = logged(&self.client, "list volumes", r, |v| {
            format!("{} volumes", v.len())
        })?;
        let mut l = results.get().init_volumes(all.len() as u32);
        for (i, v) in all.iter().enumerate() {
            set_summary(l.reborrow().get(i as u32), v);
        }
        Ok(())
    }

    async fn inspect(
        self: CapRc<Self>,
        params: volumes::InspectParams,
        mut results: volumes::InspectResults,
    ) -> Result<(), capnp::Error> {
        let name = text(params.get()?.get_name())?;
        let what = format!("inspect volume {name}");
        let vols = self.volumes.clone();
        let r = blocking(move || {
            let info = vols.store().volume_info(&name)?;
            Ok((vols.listed(&name)?, info, vols.attachments(&name)))
        })
        .await;
        let (listed, info, atts) = logged(&self.client, &what, r, ok)?;
        let mut d = results.get().init_detail();
        set_summary(d.reborrow().init_summary(), &listed);
        let mut s = d.reborrow().init_snapshots(info.snapshot_list.len() as u32);
        for (i, snap) in info.snapshot_list.iter().enumerate() {
            set_snapshot(s.reborrow().get(i as u32), snap);
        }
        let mut a = d.reborrow().init_attachments(atts.len() as u32);
        for (i, att) in atts.iter().enumerate() {
            set_attachment(a.reborrow().get(i as u32), att);
        }
        d.set_allocated_bytes(info.allocated_bytes);
        d.set_unique_bytes(info.unique_bytes);
        Ok(())
    }

    async fn snapshot(
        self: CapRc<Self>,
        params: volumes::SnapshotParams,
        mut results: volumes::SnapshotResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (volume, snapshot) = (text(p.get_volume())?, text(p.get_snapshot())?);
        let what = format!("snapshot volume {volume} as {snapshot}");
        let vols = self.volumes.clone();
        let r = blocking(move || Ok(vols.store().snapshot_volume(&volume, &snapshot)?)).await;
        let s = logged(&self.client, &what, r, |s| {
            format!("generation {}, {} bytes", s.generation, s.size)
        })?;
        set_snapshot(results.get().init_snapshot(), &s);
        Ok(())
    }

    async fn snapshots(
        self: CapRc<Self>,
        params: volumes::SnapshotsParams,
        mut results: volumes::SnapshotsResults,
    ) -> Result<(), capnp::Error> {
        let volume = text(params.get()?.get_volume())?;
        let what = format!("list snapshots of {volume}");
        let vols = self.volumes.clone();
        let r = blocking(move || Ok(vols.store().volume_snapshots(&volume)?)).await;
        let all = logged(&self.client, &what, r, |v| format!("{} snapshots", v.len()))?;
        let mut l = results.get().init_snapshots(all.len() as u32);
        for (i, s) in all.iter().enumerate() {
            set_snapshot(l.reborrow().get(i as u32), s);
        }
        Ok(())
    }

    async fn clone_snapshot(
        self: CapRc<Self>,
        params: volumes::CloneSnapshotParams,
        mut results: volumes::CloneSnapshotResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (source, name) = (text(p.get_source())?, text(p.get_name())?);
        let what = format!("clone {source} as {name}");
        let vols = self.volumes.clone();
        let r = async {
            let (volume, snapshot) = split_source(&source)?;
            blocking(move || {
                vols.store().clone_volume(&volume, &snapshot, &name)?;
                vols.listed(&name)
            })
            .await
        }
        .await;
        let v = logged(&self.client, &what, r, ok)?;
        set_summary(results.get().init_volume(), &v);
        Ok(())
    }

    async fn resize(
        self: CapRc<Self>,
        params: volumes::ResizeParams,
        mut results: volumes::ResizeResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (name, size, shrink) = (text(p.get_name())?, p.get_size(), p.get_shrink());
        let what = format!(
            "resize volume {name} to {size} bytes{}",
            if shrink { " (shrink allowed)" } else { "" }
        );
        let vols = self.volumes.clone();
        let r = blocking(move || {
            vols.store().resize_volume(&name, size, shrink)?;
            vols.listed(&name)
        })
        .await;
        let v = logged(&self.client, &what, r, ok)?;
        set_summary(results.get().init_volume(), &v);
        Ok(())
    }

    async fn remove(
        self: CapRc<Self>,
        params: volumes::RemoveParams,
        mut results: volumes::RemoveResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (name, cascade) = (text(p.get_name())?, p.get_cascade());
        let what = format!(
            "remove volume {name}{}",
            if cascade { " (cascade)" } else { "" }
        );
        let vols = self.volumes.clone();
        let r = blocking(move || vols.remove(&name, cascade)).await;
        let removed = logged(&self.client, &what, r, |v| {
            format!("removed {}", v.join(", "))
        })?;
        let mut l = results.get().init_removed(removed.len() as u32);
        for (i, n) in removed.iter().enumerate() {
            l.set(i as u32, n);
        }
        Ok(())
    }

    async fn attach(
        self: CapRc<Self>,
        params: volumes::AttachParams,
        mut results: volumes::AttachResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (name, holder, read_only) = (
            text(p.get_name())?,
            text(p.get_holder())?,
            p.get_read_only(),
        );
        let what = format!(
            "attach volume {name} for {holder}{}",
            if read_only { " read-only" } else { "" }
        );
        let vols = self.volumes.clone();
        let r = blocking(move || vols.attach(&name, &holder, read_only)).await;
        let a = logged(&self.client, &what, r, |a| {
            format!("attachment {}, export {}", a.id, a.export_name())
        })?;
        let mut r = results.get();
        set_attachment(r.reborrow().init_info(), &a);
        r.set_attachment(capnp_rpc::new_client(AttachmentImpl {
            volumes: self.volumes.clone(),
            vhost: self.vhost.clone(),
            client: self.client.clone(),
            volume: a.volume,
            id: a.id,
        }));
        Ok(())
    }

    async fn detach(
        self: CapRc<Self>,
        params: volumes::DetachParams,
        _: volumes::DetachResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (name, id) = (text(p.get_name())?, p.get_id());
        let what = format!("detach volume {name} attachment {id}");
        let (vols, vhost) = (self.volumes.clone(), self.vhost.clone());
        let r = blocking(move || detach(&vols, &vhost, &name, id)).await;
        logged(&self.client, &what, r, |a| {
            format!("was held by {}", a.holder)
        })?;
        Ok(())
    }

    async fn endpoints(
        self: CapRc<Self>,
        _: volumes::EndpointsParams,
        mut results: volumes::EndpointsResults,
    ) -> Result<(), capnp::Error> {
        let mut e = results.get().init_endpoints();
        e.set_unix_socket(&self.endpoints.unix_socket);
        e.set_tcp(&self.endpoints.tcp);
        logged(&self.client, "endpoints", Ok(()), ok)
    }

    async fn url(
        self: CapRc<Self>,
        params: volumes::UrlParams,
        mut results: volumes::UrlResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (export, tcp) = (text(p.get_export())?, p.get_tcp());
        let what = format!("url of export {export}{}", if tcp { " (tcp)" } else { "" });
        let exports = self.exports.clone();
        let endpoints = self.endpoints.clone();
        let r = blocking(move || {
            // Opened only to be described: nothing is attached, nothing is held.
            exports
                .open(&export, Intent::Query, "url")
                .map_err(|e| Error::BadRequest(e.to_string()))?;
            match tcp {
                true => endpoints.tcp_uri(&export),
                false => Ok(endpoints.uri(&export)),
            }
        })
        .await;
        let url = logged(&self.client, &what, r, |u| u.clone())?;
        results.get().set_url(&url);
        Ok(())
    }

    async fn serve_vhost_user(
        self: CapRc<Self>,
        params: volumes::ServeVhostUserParams,
        mut results: volumes::ServeVhostUserResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (export, id) = (text(p.get_export())?, text(p.get_id())?);
        let what = format!("serve {export} over vhost-user");
        let vhost = self.vhost.clone();
        let r = blocking(move || {
            vhost.serve_recorded(&export, (!id.is_empty()).then_some(id.as_str()))
        })
        .await;
        let socket = logged(&self.client, &what, r, |s| {
            format!("socket {}", s.display())
        })?;
        results.get().set_socket(socket.to_string_lossy());
        Ok(())
    }

    async fn stop_vhost_user(
        self: CapRc<Self>,
        params: volumes::StopVhostUserParams,
        mut results: volumes::StopVhostUserResults,
    ) -> Result<(), capnp::Error> {
        let export = text(params.get()?.get_export())?;
        let what = format!("stop serving {export} over vhost-user");
        let vhost = self.vhost.clone();
        let r = blocking(move || {
            let n = vhost.stop_recorded(&export);
            if n == 0 {
                return Err(Error::BadRequest(format!(
                    "{export} is not served on a recorded vhost-user socket"
                )));
            }
            Ok(n)
        })
        .await;
        let n = logged(&self.client, &what, r, |n| format!("{n} sockets stopped"))?;
        results.get().set_stopped(n as u32);
        Ok(())
    }

    async fn vhost_user(
        self: CapRc<Self>,
        _: volumes::VhostUserParams,
        mut results: volumes::VhostUserResults,
    ) -> Result<(), capnp::Error> {
        let all = self.vhost.list();
        let mut l = results.get().init_sockets(all.len() as u32);
        for (i, s) in all.iter().enumerate() {
            let mut b = l.reborrow().get(i as u32);
            b.set_export(&s.export);
            b.set_id(&s.id);
            b.set_socket(s.socket.to_string_lossy());
            b.set_recorded(s.recorded);
            b.set_connected(s.connected);
            b.set_sessions(s.sessions);
        }
        Ok(())
    }
}

/// Ends attachment `id` of `volume`, first stopping the vhost-user sockets serving it.
fn detach(vols: &Volumes, vhost: &VhostUser, volume: &str, id: u64) -> Result<Attachment, Error> {
    vhost.stop_export(&format!("{volume}/{id}"));
    vols.detach(volume, id)
}

/// An `Attachment` capability: a persistent attachment by volume and id.
#[derive(Debug)]
struct AttachmentImpl {
    volumes: Arc<Volumes>,
    vhost: Arc<VhostUser>,
    client: Client,
    volume: String,
    id: u64,
}

impl attachment::Server for AttachmentImpl {
    async fn info(
        self: CapRc<Self>,
        _: attachment::InfoParams,
        mut results: attachment::InfoResults,
    ) -> Result<(), capnp::Error> {
        let what = format!("info of volume {} attachment {}", self.volume, self.id);
        let r = self
            .volumes
            .attachment(&self.volume, self.id)
            .map_err(Into::into);
        let a = logged(&self.client, &what, r, ok)?;
        set_attachment(results.get().init_info(), &a);
        Ok(())
    }

    async fn detach(
        self: CapRc<Self>,
        _: attachment::DetachParams,
        _: attachment::DetachResults,
    ) -> Result<(), capnp::Error> {
        let what = format!("detach volume {} attachment {}", self.volume, self.id);
        let (vols, volume, id) = (self.volumes.clone(), self.volume.clone(), self.id);
        let vhost = self.vhost.clone();
        let r = blocking(move || detach(&vols, &vhost, &volume, id)).await;
        logged(&self.client, &what, r, |a| {
            format!("was held by {}", a.holder)
        })?;
        Ok(())
    }
}
