//! The edge: Cap'n Proto readers become validated domain values here, and domain values
//! are written into builders here. Nothing past this module sees a wire type, except
//! the `Host` capability the daemon keeps to call back.

use std::collections::HashMap;

use indexmap::IndexMap;
use sched::placement::{Capacity, HostInventory, ImageLayer};
use sched::types::{Arch, Digest, Hypervisor};
use schema::sched_capnp::{
    host_info, instance_info, instance_spec, inventory, pool_info, prepared_instance, route_info,
    stack_summary, warm_vm,
};

use crate::daemon::{DeployReport, HostView, InstanceView, PoolView, RouteView, StackView};
use crate::error::{Error, Result};
use crate::hostcall::WarmReport;
use crate::state::{Disk, GuestRec, ImageRec, Prepared, PulledRec, Spec};

/// A text field as an owned string.
pub fn text(r: capnp::Result<capnp::text::Reader<'_>>) -> capnp::Result<String> {
    Ok(r?
        .to_str()
        .map_err(|_| capnp::Error::failed("text field is not UTF-8".into()))?
        .to_owned())
}

fn texts(r: capnp::Result<capnp::text_list::Reader<'_>>) -> capnp::Result<Vec<String>> {
    r?.iter().map(text).collect()
}

fn set_texts(mut b: capnp::text_list::Builder<'_>, v: &[String]) {
    for (i, s) in v.iter().enumerate() {
        b.set(i as u32, s.as_str());
    }
}

fn bad(host: &str, field: &str, why: impl std::fmt::Display) -> Error {
    Error::BadRequest(format!("inventory of host {host:?}: {field}: {why}"))
}

/// An inventory off the wire, validated: the host id is set, the arch, hypervisors and
/// digests are known values.
pub fn inventory_from(r: inventory::Reader<'_>) -> Result<(HostInventory, Vec<ImageRec>)> {
    let id = text(r.get_host_id())?;
    if id.is_empty() {
        return Err(Error::BadRequest("inventory: hostId is empty".into()));
    }
    let arch: Arch = text(r.get_arch())?
        .parse()
        .map_err(|e| bad(&id, "arch", e))?;
    let cap = r.get_capacity()?;
    let capacity = Capacity {
        vcpus: cap.get_vcpus(),
        memory: cap.get_memory(),
        gpus: cap.get_gpus(),
    };
    let mut hypervisors = Vec::new();
    for h in texts(r.get_hypervisors())? {
        let hv: Hypervisor = h.parse().map_err(|e| bad(&id, "hypervisors", e))?;
        if !hypervisors.contains(&hv) {
            hypervisors.push(hv);
        }
    }
    let mut labels = IndexMap::new();
    for kv in r.get_labels()? {
        labels.insert(text(kv.get_key())?, text(kv.get_value())?);
    }
    let mut layers = HashMap::new();
    for l in r.get_layers()? {
        let d = Digest::new(&text(l.get_digest())?).map_err(|e| bad(&id, "layers", e))?;
        layers.insert(d, l.get_bytes());
    }
    let mut images = Vec::new();
    for i in r.get_images()? {
        let mut il = Vec::new();
        for l in i.get_layers()? {
            il.push(ImageLayer {
                digest: Digest::new(&text(l.get_digest())?).map_err(|e| bad(&id, "images", e))?,
                bytes: l.get_bytes(),
            });
        }
        images.push(ImageRec {
            name: text(i.get_name())?,
            digest: text(i.get_digest())?,
            layers: il,
        });
    }
    let inv = HostInventory {
        id,
        address: text(r.get_address())?,
        arch,
        capacity,
        hypervisors,
        labels,
        layers,
    };
    Ok((inv, images))
}

pub fn set_inventory(mut b: inventory::Builder<'_>, inv: &HostInventory, images: &[ImageRec]) {
    b.set_host_id(&inv.id);
    b.set_address(&inv.address);
    b.set_arch(inv.arch.as_str());
    let mut c = b.reborrow().init_capacity();
    c.set_vcpus(inv.capacity.vcpus);
    c.set_memory(inv.capacity.memory);
    c.set_gpus(inv.capacity.gpus);
    let hvs: Vec<String> = inv.hypervisors.iter().map(|h| h.to_string()).collect();
    set_texts(b.reborrow().init_hypervisors(hvs.len() as u32), &hvs);
    let mut labels = b.reborrow().init_labels(inv.labels.len() as u32);
    for (i, (k, v)) in inv.labels.iter().enumerate() {
        let mut e = labels.reborrow().get(i as u32);
        e.set_key(k);
        e.set_value(v);
    }
    let mut layers: Vec<(&Digest, &u64)> = inv.layers.iter().collect();
    layers.sort();
    let mut lb = b.reborrow().init_layers(layers.len() as u32);
    for (i, (d, n)) in layers.into_iter().enumerate() {
        let mut e = lb.reborrow().get(i as u32);
        e.set_digest(d.as_str());
        e.set_bytes(*n);
    }
    let mut ib = b.init_images(images.len() as u32);
    for (i, img) in images.iter().enumerate() {
        let mut e = ib.reborrow().get(i as u32);
        e.set_name(&img.name);
        e.set_digest(&img.digest);
        let mut l = e.init_layers(img.layers.len() as u32);
        for (j, layer) in img.layers.iter().enumerate() {
            let mut x = l.reborrow().get(j as u32);
            x.set_digest(layer.digest.as_str());
            x.set_bytes(layer.bytes);
        }
    }
}

pub fn set_spec(mut b: instance_spec::Builder<'_>, s: &Spec) {
    b.set_instance(&s.instance);
    b.set_key(&s.key);
    b.set_ordinal(s.ordinal);
    b.set_image(&s.image);
    b.set_hypervisor(s.hypervisor.as_str());
    let mut r = b.reborrow().init_resources();
    r.set_vcpus(s.resources.vcpus);
    r.set_memory(s.resources.memory.0);
    r.set_gpus(s.resources.gpus);
    let mut env = b.reborrow().init_env(s.env.len() as u32);
    for (i, (k, v)) in s.env.iter().enumerate() {
        let mut e = env.reborrow().get(i as u32);
        e.set_key(k);
        e.set_value(v);
    }
    let mut vols = b.reborrow().init_volumes(s.volumes.len() as u32);
    for (i, v) in s.volumes.iter().enumerate() {
        let mut e = vols.reborrow().get(i as u32);
        e.set_name(&v.name);
        e.set_size(v.size);
        e.set_mode(&v.mode);
        e.set_per_instance(v.per_instance);
        e.set_mount_path(&v.mount_path);
    }
    b.set_warm_vm(&s.warm_vm);
    b.set_moved(s.moved);
    b.set_port(s.port.unwrap_or(0));
    if let Some(c) = &s.command {
        set_texts(b.reborrow().init_command(c.len() as u32), c);
    }
    if let Some(a) = &s.args {
        set_texts(b.reborrow().init_args(a.len() as u32), a);
    }
    let mut links = b.init_links(s.links.len() as u32);
    for (i, l) in s.links.iter().enumerate() {
        let mut e = links.reborrow().get(i as u32);
        e.set_service(&l.service);
        e.set_host(&l.host);
        e.set_port(l.port);
    }
}

pub fn guest_from(r: schema::sched_capnp::guest_state::Reader<'_>) -> capnp::Result<GuestRec> {
    Ok(GuestRec {
        phase: text(r.get_phase())?,
        launched: r.get_launched(),
        booted: r.get_booted(),
        started: r.get_started(),
        answered: r.get_answered(),
        ended: r.get_ended(),
        exit_code: r.get_exit_code(),
        exit_signal: r.get_exit_signal(),
        reason: text(r.get_reason())?,
        pid: r.get_pid(),
        restarts: r.get_restarts(),
        storage_ms: r.get_storage(),
        converted: r.get_converted(),
    })
}

pub fn set_guest(mut b: schema::sched_capnp::guest_state::Builder<'_>, g: &GuestRec) {
    b.set_phase(&g.phase);
    b.set_launched(g.launched);
    b.set_booted(g.booted);
    b.set_started(g.started);
    b.set_answered(g.answered);
    b.set_ended(g.ended);
    b.set_exit_code(g.exit_code);
    b.set_exit_signal(g.exit_signal);
    b.set_reason(&g.reason);
    b.set_pid(g.pid);
    b.set_restarts(g.restarts);
    b.set_storage(g.storage_ms);
    b.set_converted(g.converted);
}

/// Volumes and the tier snapshots they came from or went to, off the wire.
pub fn pulled_from(
    l: capnp::struct_list::Reader<'_, schema::sched_capnp::pulled_volume::Owned>,
) -> capnp::Result<Vec<PulledRec>> {
    l.iter()
        .map(|p| {
            Ok(PulledRec {
                volume: text(p.get_volume())?,
                snapshot: text(p.get_snapshot())?,
                pushed: p.get_pushed(),
                host: text(p.get_host())?,
                manifest: text(p.get_manifest())?,
            })
        })
        .collect()
}

/// The same, onto the wire.
pub fn set_pulled(
    mut l: capnp::struct_list::Builder<'_, schema::sched_capnp::pulled_volume::Owned>,
    items: &[PulledRec],
) {
    for (i, p) in items.iter().enumerate() {
        let mut e = l.reborrow().get(i as u32);
        e.set_volume(&p.volume);
        e.set_snapshot(&p.snapshot);
        e.set_pushed(p.pushed);
        e.set_host(&p.host);
        e.set_manifest(&p.manifest);
    }
}

pub fn prepared_from(r: prepared_instance::Reader<'_>) -> capnp::Result<Prepared> {
    Ok(Prepared {
        instance: text(r.get_instance())?,
        root: text(r.get_root())?,
        image: text(r.get_image())?,
        volumes: texts(r.get_volumes())?,
        hypervisor: text(r.get_hypervisor())?,
        warm_vm: text(r.get_warm_vm())?,
        address: text(r.get_address())?,
        pulled: pulled_from(r.get_pulled()?)?,
        guest: if r.has_guest() {
            guest_from(r.get_guest()?)?
        } else {
            GuestRec::default()
        },
        disks: if r.has_boot() {
            r.get_boot()?
                .get_disks()?
                .iter()
                .map(|d| {
                    Ok(Disk {
                        role: text(d.get_role())?,
                        export: text(d.get_export())?,
                        uri: text(d.get_uri())?,
                        read_only: d.get_read_only(),
                        size: d.get_size(),
                        layer: text(d.get_layer())?,
                        mount_path: text(d.get_mount_path())?,
                    })
                })
                .collect::<capnp::Result<Vec<_>>>()?
        } else {
            Vec::new()
        },
    })
}

pub fn warm_from(r: warm_vm::Reader<'_>) -> capnp::Result<WarmReport> {
    Ok(WarmReport {
        id: text(r.get_id())?,
        pool: text(r.get_pool())?,
        image: text(r.get_image())?,
        layers: texts(r.get_layers())?,
        root: text(r.get_root())?,
    })
}

pub fn set_instance_info(mut b: instance_info::Builder<'_>, v: &InstanceView) {
    let r = &v.rec;
    b.set_id(&r.id);
    b.set_key(&r.key);
    b.set_stack(r.stack.as_str());
    b.set_variant(r.variant.as_ref().map_or("", |v| v.as_str()));
    b.set_service(r.service.as_str());
    b.set_host(&r.host);
    b.set_address(&v.address);
    b.set_hypervisor(r.spec.hypervisor.as_str());
    b.set_state(v.state);
    b.set_root(&r.prepared.root);
    set_texts(
        b.reborrow().init_volumes(r.prepared.volumes.len() as u32),
        &r.prepared.volumes,
    );
    b.set_warm_vm(&r.spec.warm_vm);
    b.set_image(&r.spec.image);
    b.set_endpoint(&r.prepared.address);
    set_guest(b.reborrow().init_guest(), &r.prepared.guest);
    set_pulled(
        b.reborrow().init_pulled(r.prepared.pulled.len() as u32),
        &r.prepared.pulled,
    );
    let mut dl = b.init_disks(r.prepared.disks.len() as u32);
    for (i, d) in r.prepared.disks.iter().enumerate() {
        let mut e = dl.reborrow().get(i as u32);
        e.set_role(&d.role);
        e.set_export(&d.export);
        e.set_uri(&d.uri);
        e.set_read_only(d.read_only);
        e.set_size(d.size);
        e.set_layer(&d.layer);
        e.set_mount_path(&d.mount_path);
    }
}

pub fn set_deploy_report(mut b: schema::sched_capnp::deploy_report::Builder<'_>, r: &DeployReport) {
    b.set_stack(&r.stack);
    b.set_variant(&r.variant);
    b.set_entrypoint(&r.entrypoint);
    let mut sl = b.reborrow().init_services(r.services.len() as u32);
    for (i, s) in r.services.iter().enumerate() {
        let mut e = sl.reborrow().get(i as u32);
        e.set_service(&s.service);
        e.set_hostname(&s.hostname);
        e.set_sharing(s.sharing);
        e.set_instances_of(&s.instances_of);
        let mut env = e.init_env(s.env.len() as u32);
        for (j, v) in s.env.iter().enumerate() {
            let mut x = env.reborrow().get(j as u32);
            x.set_key(&v.key);
            x.set_value(&v.value);
            x.set_source(match v.source {
                sched::model::EnvSource::Stack => "stack",
                sched::model::EnvSource::Service => "service",
                sched::model::EnvSource::Variant => "variant",
                sched::model::EnvSource::VariantService => "variant_service",
            });
        }
    }
    let mut pl = b.init_placed(r.placed.len() as u32);
    for (i, p) in r.placed.iter().enumerate() {
        let mut e = pl.reborrow().get(i as u32);
        set_instance_info(e.reborrow().init_instance(), &p.instance);
        set_texts(
            e.reborrow().init_reasons(p.reasons.len() as u32),
            &p.reasons,
        );
        e.set_fetch_bytes(p.fetch_bytes);
        let mut vl = e.init_verdicts(p.verdicts.len() as u32);
        for (j, v) in p.verdicts.iter().enumerate() {
            let mut x = vl.reborrow().get(j as u32);
            x.set_host(&v.host);
            x.set_eligible(v.eligible);
            x.set_reason(&v.reason);
            x.set_score(v.score);
        }
    }
}

pub fn set_stack_summary(mut b: stack_summary::Builder<'_>, s: &StackView) {
    b.set_name(&s.name);
    b.set_domain(&s.domain);
    set_texts(
        b.reborrow().init_services(s.services.len() as u32),
        &s.services,
    );
    set_texts(
        b.reborrow().init_variants(s.variants.len() as u32),
        &s.variants,
    );
    b.set_instances(s.instances);
}

pub fn set_host_info(mut b: host_info::Builder<'_>, h: &HostView) {
    set_inventory(
        b.reborrow().init_inventory(),
        &h.rec.inventory,
        &h.rec.images,
    );
    b.set_up(h.rec.up);
    b.set_last_seen(h.rec.last_seen);
    let mut u = b.reborrow().init_used();
    u.set_vcpus(h.used.vcpus);
    u.set_memory(h.used.memory);
    u.set_gpus(h.used.gpus);
    b.set_instances(h.instances);
    b.set_warm_vms(h.warm);
}

pub fn set_pool_info(mut b: pool_info::Builder<'_>, p: &PoolView) {
    b.set_name(&p.name);
    set_texts(b.reborrow().init_layers(p.layers.len() as u32), &p.layers);
    b.set_min(p.min);
    b.set_max(p.max);
    b.set_warm(p.warm);
}

pub fn set_route(mut b: route_info::Builder<'_>, r: &RouteView) {
    b.set_hostname(&r.hostname);
    b.set_stack(r.route.stack.as_str());
    b.set_variant(r.route.variant.as_ref().map_or("", |v| v.as_str()));
    b.set_service(r.route.service.as_str());
    b.set_shared_from_parent(r.route.shared_from_parent);
    set_texts(
        b.reborrow()
            .init_via_aliases(r.route.via_aliases.len() as u32),
        &r.route.via_aliases,
    );
    set_instance_info(b.reborrow().init_instance(), &r.instance);
    b.set_started(r.started);
}
