//! The route table front ends watch: every name that answers (sched's
//! [`Catalog::hostnames`](sched::model::Catalog::hostnames)), the instance set behind
//! each and how it scales, with each instance's endpoint and state.
//!
//! Every state write signals [`Routes::changed`]; [`push`] then recomputes the table and,
//! when it differs from the last one, publishes it with a higher version. Each watcher
//! (`Scheduler.watchRoutes`) has its own task that sends the newest table it has not
//! seen, so a slow front end skips versions instead of holding up the others, and a
//! watcher whose update fails (its front end is gone) is dropped.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use schema::sched_capnp::{route_table, route_watcher};
use tokio::sync::{Notify, watch};

use crate::daemon::{Daemon, Shared};
use crate::log;

/// One name of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameView {
    pub hostname: String,
    pub key: String,
    pub stack: String,
    pub variant: String,
    pub service: String,
    pub shared_from_parent: bool,
    pub via_aliases: Vec<String>,
}

/// One instance behind a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInstance {
    pub id: String,
    pub host: String,
    pub endpoint: String,
    pub state: String,
    pub phase: String,
    pub reason: String,
    pub serving: bool,
}

/// Whether requests can go to an instance: placed (ready or moved), its app running, a
/// port forwarded. Front ends balance over these; `tide service ls` counts them.
pub fn serving(state: &str, phase: &str, endpoint: &str) -> bool {
    matches!(state, "ready" | "moved") && phase == "running" && !endpoint.is_empty()
}

/// One instance set (an instance key) and its scaling bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRoute {
    pub key: String,
    pub scale_to_zero: bool,
    pub min: u32,
    pub max: u32,
    /// The autoscaler's settings (not on the wire).
    pub policy: sched::stack::Instances,
    pub instances: Vec<RouteInstance>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    pub version: u64,
    pub names: Vec<NameView>,
    pub services: Vec<ServiceRoute>,
}

/// The published table and the signal that the state changed.
#[derive(Debug)]
pub struct Routes {
    pub changed: Rc<Notify>,
    table: watch::Sender<Rc<RouteTable>>,
}

impl Routes {
    pub fn new(changed: Rc<Notify>) -> Routes {
        Routes {
            changed,
            table: watch::Sender::new(Rc::new(RouteTable::default())),
        }
    }

    /// Recomputes the table from `d`; publishes it (version + 1) if it changed. Returns
    /// the table now published.
    pub fn refresh(&self, d: &Daemon) -> Rc<RouteTable> {
        let mut t = d.route_table();
        self.table.send_if_modified(|cur| {
            t.version = cur.version;
            if **cur == t {
                return false;
            }
            t.version += 1;
            *cur = Rc::new(std::mem::take(&mut t));
            true
        });
        self.table.borrow().clone()
    }

    /// The table last published.
    pub fn current(&self) -> Rc<RouteTable> {
        self.table.borrow().clone()
    }

    /// A new watcher: the current table to return now; its task sends each newer one.
    pub fn watch(&self, d: &Daemon, watcher: route_watcher::Client) -> Rc<RouteTable> {
        let now = self.refresh(d);
        let mut rx = self.table.subscribe();
        rx.mark_unchanged();
        tokio::task::spawn_local(async move {
            while rx.changed().await.is_ok() {
                let t = rx.borrow_and_update().clone();
                let mut req = watcher.update_request();
                set_table(req.get().init_table(), &t);
                if let Err(e) = req.send().promise.await {
                    log!("route watcher dropped: {e}");
                    break;
                }
            }
        });
        now
    }
}

impl Daemon {
    /// The route table as the state now is (version 0; [`Routes::refresh`] numbers it).
    pub fn route_table(&self) -> RouteTable {
        let names: Vec<NameView> = self
            .catalog
            .hostnames()
            .into_iter()
            .map(|(hostname, r)| NameView {
                hostname,
                key: r.instances_of(),
                stack: r.stack.to_string(),
                variant: r
                    .variant
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                service: r.service.to_string(),
                shared_from_parent: r.shared_from_parent,
                via_aliases: r.via_aliases,
            })
            .collect();
        let mut services: BTreeMap<String, ServiceRoute> = BTreeMap::new();
        for n in &names {
            if services.contains_key(&n.key) {
                continue;
            }
            let variant = (!n.shared_from_parent && !n.variant.is_empty()).then_some(&*n.variant);
            let Some(rs) = self
                .catalog
                .deployment(&n.stack, variant)
                .ok()
                .and_then(|d| {
                    d.services
                        .into_iter()
                        .find(|s| s.service.name.as_str() == n.service)
                })
            else {
                continue;
            };
            let instances = self
                .instances
                .values()
                .filter(|r| r.key == n.key)
                .map(|r| {
                    let v = self.view(r);
                    RouteInstance {
                        id: r.id.clone(),
                        host: r.host.clone(),
                        endpoint: r.prepared.address.clone(),
                        state: v.state.to_owned(),
                        phase: r.prepared.guest.phase.clone(),
                        reason: r.prepared.guest.reason.clone(),
                        serving: serving(v.state, &r.prepared.guest.phase, &r.prepared.address)
                            && !self.draining.contains(&r.id),
                    }
                })
                .collect();
            let i = rs.service.instances;
            services.insert(
                n.key.clone(),
                ServiceRoute {
                    key: n.key.clone(),
                    scale_to_zero: i.scale_to_zero,
                    min: i.min,
                    max: i.max,
                    policy: i,
                    instances,
                },
            );
        }
        RouteTable {
            version: 0,
            names,
            services: services.into_values().collect(),
        }
    }
}

/// Publishes the table at start and a new one after each burst of state changes (10 ms
/// apart at most).
pub async fn push(sh: Rc<Shared>) {
    // The state loaded at start, before any change.
    sh.routes.refresh(&sh.state.borrow());
    loop {
        sh.routes.changed.notified().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        sh.routes.refresh(&sh.state.borrow());
    }
}

pub fn set_table(mut b: route_table::Builder<'_>, t: &RouteTable) {
    b.set_version(t.version);
    let mut names = b.reborrow().init_names(t.names.len() as u32);
    for (i, n) in t.names.iter().enumerate() {
        let mut e = names.reborrow().get(i as u32);
        e.set_hostname(&n.hostname);
        e.set_key(&n.key);
        e.set_stack(&n.stack);
        e.set_variant(&n.variant);
        e.set_service(&n.service);
        e.set_shared_from_parent(n.shared_from_parent);
        let mut a = e.init_via_aliases(n.via_aliases.len() as u32);
        for (j, s) in n.via_aliases.iter().enumerate() {
            a.set(j as u32, s.as_str());
        }
    }
    let mut services = b.init_services(t.services.len() as u32);
    for (i, s) in t.services.iter().enumerate() {
        let mut e = services.reborrow().get(i as u32);
        e.set_key(&s.key);
        e.set_scale_to_zero(s.scale_to_zero);
        e.set_min(s.min);
        e.set_max(s.max);
        let mut l = e.init_instances(s.instances.len() as u32);
        for (j, inst) in s.instances.iter().enumerate() {
            let mut x = l.reborrow().get(j as u32);
            x.set_id(&inst.id);
            x.set_host(&inst.host);
            x.set_endpoint(&inst.endpoint);
            x.set_state(&inst.state);
            x.set_phase(&inst.phase);
            x.set_reason(&inst.reason);
            x.set_serving(inst.serving);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::serving;

    #[test]
    fn serving_needs_a_placed_instance_a_running_app_and_a_port() {
        assert!(serving("ready", "running", "127.0.0.1:4000"));
        assert!(serving("moved", "running", "127.0.0.1:4000"));
        assert!(!serving("ready", "booting", "127.0.0.1:4000"));
        assert!(!serving("pending", "running", "127.0.0.1:4000"));
        assert!(!serving("moved", "running", ""));
    }
}
