//! The Cap'n Proto `Host` server (sched.capnp) and the `Inventory` it and the scheduler
//! link send: wire readers and builders for the host side stay here; the work runs on a
//! blocking thread against [`Host`].

use std::sync::Arc;

use capnp::capability::Rc as CapRc;
use castore::AccessMode;
use schema::sched_capnp::{self, host};

use crate::error::Error;
use crate::guests::GuestStatus;
use crate::host::{Host, InstanceRecord, InstanceSpec, Link, VolumeRequest, WarmRecord};
use crate::log;
use crate::server::{blocking, text};
use crate::volume_rpc::Endpoints;

/// The store's inventory (cached by castore until the store changes).
pub(crate) async fn store_inventory(
    host: &Arc<Host>,
) -> Result<Arc<castore::Inventory>, capnp::Error> {
    let h = host.clone();
    blocking(move || Ok(h.store().inventory()?)).await
}

/// Writes the host's inventory: its configuration and the store's layers and images.
pub(crate) fn set_inventory(
    mut b: sched_capnp::inventory::Builder<'_>,
    host: &Host,
    inv: &castore::Inventory,
) {
    let c = &host.config;
    b.set_host_id(&c.host_id);
    b.set_address(&c.address);
    b.set_arch(&c.arch);
    {
        let mut cap = b.reborrow().init_capacity();
        cap.set_vcpus(c.vcpus);
        cap.set_memory(c.memory);
        cap.set_gpus(c.gpus);
    }
    let mut hv = b.reborrow().init_hypervisors(c.hypervisors.len() as u32);
    for (i, h) in c.hypervisors.iter().enumerate() {
        hv.set(i as u32, h);
    }
    let mut labels = b.reborrow().init_labels(c.labels.len() as u32);
    for (i, (k, v)) in c.labels.iter().enumerate() {
        let mut l = labels.reborrow().get(i as u32);
        l.set_key(k);
        l.set_value(v);
    }
    // Layers none of whose chunks are here are left out ("every layer with chunks
    // present"); a layer without chunks (only small, inlined files) is all here.
    let present: Vec<&castore::LayerPresence> = inv
        .layers
        .iter()
        .filter(|l| l.present_bytes > 0 || l.total_bytes == 0)
        .collect();
    let mut layers = b.reborrow().init_layers(present.len() as u32);
    for (i, l) in present.iter().enumerate() {
        let mut lb = layers.reborrow().get(i as u32);
        lb.set_digest(l.digest.to_string());
        lb.set_bytes(l.present_bytes);
    }
    let mut images = b.init_images(inv.images.len() as u32);
    for (i, img) in inv.images.iter().enumerate() {
        let mut ib = images.reborrow().get(i as u32);
        ib.set_name(&img.name);
        ib.set_digest(img.digest.to_string());
        let mut ls = ib.init_layers(img.layers.len() as u32);
        for (j, (d, bytes)) in img.layers.iter().enumerate() {
            let mut lb = ls.reborrow().get(j as u32);
            lb.set_digest(d.to_string());
            lb.set_bytes(*bytes);
        }
    }
}

/// Writes a guest's state (`GuestState`).
pub(crate) fn set_guest(mut b: sched_capnp::guest_state::Builder<'_>, s: &GuestStatus) {
    b.set_phase(s.phase.as_str());
    b.set_launched(s.launched);
    b.set_booted(s.booted);
    b.set_started(s.started);
    b.set_answered(s.answered);
    b.set_ended(s.ended);
    b.set_exit_code(s.code.unwrap_or(0));
    b.set_exit_signal(s.signal.unwrap_or(0));
    b.set_reason(&s.reason);
    b.set_pid(s.pid);
    b.set_restarts(s.restarts);
    b.set_storage(s.storage_ms);
    b.set_converted(s.converted);
}

/// Volumes and the tier snapshots they came from (or went to), on the wire.
fn set_pulled<'a>(
    mut l: capnp::struct_list::Builder<'_, sched_capnp::pulled_volume::Owned>,
    items: impl IntoIterator<Item = (&'a String, &'a crate::host::PulledFrom)>,
) {
    for (i, (volume, p)) in items.into_iter().enumerate() {
        let mut e = l.reborrow().get(i as u32);
        e.set_volume(volume.as_str());
        e.set_snapshot(&p.snapshot);
        e.set_pushed(p.pushed);
        e.set_host(&p.host);
        e.set_manifest(&p.manifest);
    }
}

fn set_prepared(
    mut b: sched_capnp::prepared_instance::Builder<'_>,
    r: &InstanceRecord,
    endpoints: &Endpoints,
) {
    b.set_instance(&r.instance);
    if let Some(s) = &r.status {
        b.set_address(&s.address);
        set_guest(b.reborrow().init_guest(), s);
    }
    b.set_root(r.root.to_string_lossy());
    b.set_image(&r.image);
    b.set_hypervisor(&r.hypervisor);
    b.set_warm_vm(&r.warm_vm);
    let mut v = b.reborrow().init_volumes(r.volumes.len() as u32);
    for (i, a) in r.volumes.iter().enumerate() {
        v.set(
            i as u32,
            endpoints.uri(&format!("{}/{}", a.volume, a.attachment)),
        );
    }
    let pulled: Vec<_> = r
        .volumes
        .iter()
        .filter_map(|a| a.pulled.as_ref().map(|p| (&a.volume, p)))
        .collect();
    set_pulled(b.reborrow().init_pulled(pulled.len() as u32), pulled);
    let spec = &r.boot;
    let mut boot = b.init_boot();
    boot.set_root_mode(spec.root_mode);
    boot.set_root_uid(spec.root_uid);
    boot.set_root_gid(spec.root_gid);
    boot.set_root_mtime(spec.root_mtime);
    boot.set_root_mtime_nsec(spec.root_mtime_nsec);
    boot.set_vcpus(spec.vcpus);
    boot.set_memory(spec.memory);
    let mut disks = boot.init_disks(spec.disks.len() as u32);
    for (i, d) in spec.disks.iter().enumerate() {
        let mut b = disks.reborrow().get(i as u32);
        b.set_role(d.role.as_str());
        b.set_export(&d.export);
        b.set_uri(endpoints.uri(&d.export));
        b.set_read_only(d.read_only);
        b.set_size(d.size);
        b.set_layer(&d.layer);
        b.set_mount_path(&d.mount_path);
    }
}

fn set_warm(mut b: sched_capnp::warm_vm::Builder<'_>, w: &WarmRecord) {
    b.set_id(&w.id);
    b.set_pool(&w.pool);
    b.set_image(&w.image);
    b.set_root(w.root.to_string_lossy());
    let mut l = b.init_layers(w.layers.len() as u32);
    for (i, d) in w.layers.iter().enumerate() {
        l.set(i as u32, d);
    }
}

/// An `InstanceSpec` off the wire, validated.
fn instance_spec(s: sched_capnp::instance_spec::Reader<'_>) -> Result<InstanceSpec, capnp::Error> {
    let instance = text(s.get_instance())?;
    let mut volumes = Vec::new();
    for v in s.get_volumes()? {
        let name = text(v.get_name())?;
        let mode = text(v.get_mode())?;
        let mode = match mode.as_str() {
            "" => AccessMode::Rwo,
            m => AccessMode::parse(m).ok_or_else(|| {
                Error::BadRequest(format!(
                    "instance {instance}: volume {name}: mode {m:?} is not rwo, rwx or rox"
                ))
            })?,
        };
        volumes.push(VolumeRequest {
            name,
            size: v.get_size(),
            mode,
            per_instance: v.get_per_instance(),
            mount_path: text(v.get_mount_path())?,
        });
    }
    let mut env = Vec::new();
    for kv in s.get_env()? {
        env.push((text(kv.get_key())?, text(kv.get_value())?));
    }
    let strings = |l: capnp::text_list::Reader<'_>| -> Result<Vec<String>, capnp::Error> {
        l.iter().map(text).collect()
    };
    let mut links = Vec::new();
    for l in s.get_links()? {
        links.push(Link {
            service: text(l.get_service())?,
            host: text(l.get_host())?,
            port: l.get_port(),
        });
    }
    Ok(InstanceSpec {
        moved: s.get_moved(),
        env,
        port: Some(s.get_port()).filter(|p| *p != 0),
        command: if s.has_command() {
            Some(strings(s.get_command()?)?).filter(|c| !c.is_empty())
        } else {
            None
        },
        args: if s.has_args() {
            Some(strings(s.get_args()?)?)
        } else {
            None
        },
        links,
        key: text(s.get_key())?,
        ordinal: s.get_ordinal(),
        image: text(s.get_image())?,
        hypervisor: text(s.get_hypervisor())?,
        vcpus: if s.has_resources() {
            s.get_resources()?.get_vcpus()
        } else {
            0
        },
        memory: if s.has_resources() {
            s.get_resources()?.get_memory()
        } else {
            0
        },
        gpus: if s.has_resources() {
            s.get_resources()?.get_gpus()
        } else {
            0
        },
        volumes,
        warm_vm: text(s.get_warm_vm())?,
        instance,
    })
}

/// The capability volumed hands the scheduler at registration.
#[derive(Debug)]
pub(crate) struct HostImpl {
    pub(crate) host: Arc<Host>,
    pub(crate) endpoints: Endpoints,
}

impl host::Server for HostImpl {
    async fn inventory(
        self: CapRc<Self>,
        _: host::InventoryParams,
        mut results: host::InventoryResults,
    ) -> Result<(), capnp::Error> {
        let inv = store_inventory(&self.host).await?;
        set_inventory(results.get().init_inventory(), &self.host, &inv);
        Ok(())
    }

    async fn prepare(
        self: CapRc<Self>,
        params: host::PrepareParams,
        mut results: host::PrepareResults,
    ) -> Result<(), capnp::Error> {
        let spec = instance_spec(params.get()?.get_spec()?)?;
        let h = self.host.clone();
        let id = spec.instance.clone();
        let r = blocking(move || h.prepare(&spec)).await;
        let r = r.inspect_err(|e| log!("prepare {id} failed: {}", e.extra))?;
        set_prepared(results.get().init_prepared(), &r, &self.endpoints);
        Ok(())
    }

    async fn release(
        self: CapRc<Self>,
        params: host::ReleaseParams,
        _: host::ReleaseResults,
    ) -> Result<(), capnp::Error> {
        let id = text(params.get()?.get_instance())?;
        let h = self.host.clone();
        blocking(move || h.release(&id)).await?;
        Ok(())
    }

    async fn boot_warm(
        self: CapRc<Self>,
        params: host::BootWarmParams,
        mut results: host::BootWarmResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let pool = text(p.get_pool())?;
        let image = text(p.get_image())?;
        let h = self.host.clone();
        let w = blocking(move || h.boot_warm(&pool, &image)).await?;
        set_warm(results.get().init_vm(), &w);
        Ok(())
    }

    async fn logs(
        self: CapRc<Self>,
        params: host::LogsParams,
        mut results: host::LogsResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let id = text(p.get_instance())?;
        let (offset, console) = (p.get_offset(), p.get_console());
        let max = match p.get_max() {
            0 => 64 << 10,
            m => m.min(1 << 20),
        };
        let h = self.host.clone();
        let (data, next, ended) = blocking(move || h.logs(&id, offset, console, max)).await?;
        let mut r = results.get();
        r.set_data(&data);
        r.set_next(next);
        r.set_ended(ended);
        Ok(())
    }

    async fn control(
        self: CapRc<Self>,
        params: host::ControlParams,
        mut results: host::ControlResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let id = text(p.get_instance())?;
        let action = text(p.get_action())?;
        let h = self.host.clone();
        let r = blocking(move || h.control(&id, &action)).await?;
        set_prepared(results.get().init_prepared(), &r, &self.endpoints);
        Ok(())
    }

    async fn hand_over(
        self: CapRc<Self>,
        params: host::HandOverParams,
        mut results: host::HandOverResults,
    ) -> Result<(), capnp::Error> {
        let id = text(params.get()?.get_instance())?;
        let h = self.host.clone();
        let what = id.clone();
        let pushed = blocking(move || h.hand_over(&what))
            .await
            .inspect_err(|e| log!("hand over {id} failed: {}", e.extra))?;
        let l = results.get().init_pushed(pushed.len() as u32);
        set_pulled(l, pushed.iter().map(|(v, p)| (v, p)));
        Ok(())
    }

    async fn instances(
        self: CapRc<Self>,
        _: host::InstancesParams,
        mut results: host::InstancesResults,
    ) -> Result<(), capnp::Error> {
        // The records' lock is held across a prepare's mounts: wait for it off the loop.
        let h = self.host.clone();
        let (instances, warm) = blocking(move || Ok(h.list())).await?;
        let mut r = results.get();
        let mut l = r.reborrow().init_instances(instances.len() as u32);
        for (i, rec) in instances.iter().enumerate() {
            set_prepared(l.reborrow().get(i as u32), rec, &self.endpoints);
        }
        let mut w = r.init_warm(warm.len() as u32);
        for (i, rec) in warm.iter().enumerate() {
            set_warm(w.reborrow().get(i as u32), rec);
        }
        Ok(())
    }
}
