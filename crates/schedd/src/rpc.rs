//! The Cap'n Proto servers: `Scheduler` (bootstrap), `Stack` and `HostSession`. Each
//! method reads its parameters through [`crate::wire`], runs a [`crate::daemon`]
//! operation and writes the result back; every error leaves as one `failed` exception
//! (see [`crate::error`]), and the daemon keeps serving.

use std::rc::Rc;

use capnp::capability::Rc as CapRc;
use sched::types::Hypervisor;
use schema::sched_capnp::{host_session, scheduler, stack};

use crate::daemon::{self, Role, Shared};
use crate::error::Error;
use crate::wire::{self, text};

/// The bootstrap capability.
#[derive(Debug)]
pub struct SchedulerImpl(pub Rc<Shared>);

fn hypervisor(s: &str) -> Result<Option<Hypervisor>, Error> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|e| Error::BadRequest(format!("--hypervisor: {e}")))
}

fn stack_client(sh: &Rc<Shared>, name: &str) -> Result<stack::Client, Error> {
    if sh.state.borrow().catalog.stack(name).is_none() {
        return Err(Error::BadRequest(format!("no stack {name:?}")));
    }
    Ok(capnp_rpc::new_client(StackImpl {
        sh: sh.clone(),
        name: name.to_owned(),
    }))
}

impl scheduler::Server for SchedulerImpl {
    async fn version(
        self: CapRc<Self>,
        _: scheduler::VersionParams,
        mut results: scheduler::VersionResults,
    ) -> Result<(), capnp::Error> {
        let mut r = results.get();
        r.set_version(schema::sched_capnp::VERSION);
        r.set_scheduler(concat!("sched ", env!("CARGO_PKG_VERSION")));
        Ok(())
    }

    async fn leader(
        self: CapRc<Self>,
        _: scheduler::LeaderParams,
        mut results: scheduler::LeaderResults,
    ) -> Result<(), capnp::Error> {
        let role = self.0.role.borrow();
        let (leading, leader, store) = match &*role {
            Role::Local => (true, &self.0.advertise, "local"),
            Role::Leader => (true, &self.0.advertise, "etcd"),
            Role::Follower { leader } => (false, leader, "etcd"),
        };
        let mut r = results.get();
        r.set_leading(leading);
        r.set_leader(leader);
        r.set_store(store);
        Ok(())
    }

    async fn deploy(
        self: CapRc<Self>,
        params: scheduler::DeployParams,
        mut results: scheduler::DeployResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let file = text(p.get_file())?;
        let source = text(p.get_source())?;
        let variant = text(p.get_variant())?;
        let hv = hypervisor(&text(p.get_hypervisor())?)?;
        let variant = Some(variant.as_str()).filter(|v| !v.is_empty());
        let report =
            daemon::deploy(&self.0, &file, &source, variant, None, p.get_explain(), hv).await?;
        self.0.durable().await?;
        let st = stack_client(&self.0, &report.stack)?;
        let mut r = results.get();
        wire::set_deploy_report(r.reborrow().init_report(), &report);
        r.set_stack(st);
        Ok(())
    }

    async fn stacks(
        self: CapRc<Self>,
        _: scheduler::StacksParams,
        mut results: scheduler::StacksResults,
    ) -> Result<(), capnp::Error> {
        let views = self.0.state.borrow().stack_views();
        let mut l = results.get().init_stacks(views.len() as u32);
        for (i, v) in views.iter().enumerate() {
            wire::set_stack_summary(l.reborrow().get(i as u32), v);
        }
        Ok(())
    }

    async fn stack(
        self: CapRc<Self>,
        params: scheduler::StackParams,
        mut results: scheduler::StackResults,
    ) -> Result<(), capnp::Error> {
        let name = text(params.get()?.get_name())?;
        results.get().set_stack(stack_client(&self.0, &name)?);
        Ok(())
    }

    async fn instances(
        self: CapRc<Self>,
        _: scheduler::InstancesParams,
        mut results: scheduler::InstancesResults,
    ) -> Result<(), capnp::Error> {
        let views: Vec<_> = {
            let d = self.0.state.borrow();
            d.instances.values().map(|r| d.view(r)).collect()
        };
        let mut l = results.get().init_instances(views.len() as u32);
        for (i, v) in views.iter().enumerate() {
            wire::set_instance_info(l.reborrow().get(i as u32), v);
        }
        Ok(())
    }

    async fn pools(
        self: CapRc<Self>,
        _: scheduler::PoolsParams,
        mut results: scheduler::PoolsResults,
    ) -> Result<(), capnp::Error> {
        let views: Vec<_> = {
            let d = self.0.state.borrow();
            d.pools.values().map(|p| d.pool_view(p)).collect()
        };
        let mut l = results.get().init_pools(views.len() as u32);
        for (i, v) in views.iter().enumerate() {
            wire::set_pool_info(l.reborrow().get(i as u32), v);
        }
        Ok(())
    }

    async fn create_pool(
        self: CapRc<Self>,
        params: scheduler::CreatePoolParams,
        mut results: scheduler::CreatePoolResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let name = text(p.get_name())?;
        let layers = p
            .get_layers()?
            .iter()
            .map(text)
            .collect::<capnp::Result<Vec<_>>>()?;
        let image = text(p.get_image())?;
        let view =
            daemon::create_pool(&self.0, &name, &layers, &image, p.get_min(), p.get_max()).await?;
        self.0.durable().await?;
        wire::set_pool_info(results.get().init_pool(), &view);
        Ok(())
    }

    async fn remove_pool(
        self: CapRc<Self>,
        params: scheduler::RemovePoolParams,
        _: scheduler::RemovePoolResults,
    ) -> Result<(), capnp::Error> {
        let name = text(params.get()?.get_name())?;
        daemon::remove_pool(&self.0, &name).await?;
        self.0.durable().await?;
        Ok(())
    }

    async fn aliases(
        self: CapRc<Self>,
        _: scheduler::AliasesParams,
        mut results: scheduler::AliasesResults,
    ) -> Result<(), capnp::Error> {
        let list: Vec<(String, String)> = self
            .0
            .state
            .borrow()
            .catalog
            .aliases()
            .map(|(d, t)| (d.to_owned(), t.to_owned()))
            .collect();
        let mut l = results.get().init_aliases(list.len() as u32);
        for (i, (d, t)) in list.iter().enumerate() {
            let mut e = l.reborrow().get(i as u32);
            e.set_domain(d);
            e.set_target(t);
        }
        Ok(())
    }

    async fn add_alias(
        self: CapRc<Self>,
        params: scheduler::AddAliasParams,
        _: scheduler::AddAliasResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        daemon::add_alias(&self.0, &text(p.get_domain())?, &text(p.get_target())?).await?;
        self.0.durable().await?;
        Ok(())
    }

    async fn remove_alias(
        self: CapRc<Self>,
        params: scheduler::RemoveAliasParams,
        _: scheduler::RemoveAliasResults,
    ) -> Result<(), capnp::Error> {
        daemon::remove_alias(&self.0, &text(params.get()?.get_domain())?).await?;
        self.0.durable().await?;
        Ok(())
    }

    async fn resolve(
        self: CapRc<Self>,
        params: scheduler::ResolveParams,
        mut results: scheduler::ResolveResults,
    ) -> Result<(), capnp::Error> {
        let hostname = text(params.get()?.get_hostname())?;
        let route = daemon::resolve(&self.0, &hostname).await?;
        if route.started {
            self.0.durable().await?;
        }
        wire::set_route(results.get().init_route(), &route);
        Ok(())
    }

    async fn logs(
        self: CapRc<Self>,
        params: scheduler::LogsParams,
        mut results: scheduler::LogsResults,
    ) -> Result<(), capnp::Error> {
        self.0.lead()?;
        let p = params.get()?;
        let id = text(p.get_instance())?;
        let (data, next, ended) =
            daemon::logs(&self.0, &id, p.get_offset(), p.get_console(), p.get_max()).await?;
        let mut r = results.get();
        r.set_data(&data);
        r.set_next(next);
        r.set_ended(ended);
        Ok(())
    }

    async fn control(
        self: CapRc<Self>,
        params: scheduler::ControlParams,
        mut results: scheduler::ControlResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let id = text(p.get_instance())?;
        let action = text(p.get_action())?;
        self.0.lead()?;
        let v = daemon::control(&self.0, &id, &action).await?;
        self.0.durable().await?;
        wire::set_instance_info(results.get().init_instance(), &v);
        Ok(())
    }

    async fn move_instance(
        self: CapRc<Self>,
        params: scheduler::MoveInstanceParams,
        mut results: scheduler::MoveInstanceResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let id = text(p.get_instance())?;
        let to = text(p.get_to())?;
        self.0.lead()?;
        let (v, pushed) =
            daemon::move_instance(&self.0, &id, (!to.is_empty()).then_some(to.as_str())).await?;
        self.0.durable().await?;
        let mut r = results.get();
        wire::set_instance_info(r.reborrow().init_instance(), &v);
        wire::set_pulled(r.init_pushed(pushed.len() as u32), &pushed);
        Ok(())
    }

    async fn watch_routes(
        self: CapRc<Self>,
        params: scheduler::WatchRoutesParams,
        mut results: scheduler::WatchRoutesResults,
    ) -> Result<(), capnp::Error> {
        let watcher = params.get()?.get_watcher()?;
        let t = self.0.routes.watch(&self.0.state.borrow(), watcher);
        crate::routes::set_table(results.get().init_table(), &t);
        Ok(())
    }

    async fn routes(
        self: CapRc<Self>,
        _: scheduler::RoutesParams,
        mut results: scheduler::RoutesResults,
    ) -> Result<(), capnp::Error> {
        let t = self.0.routes.refresh(&self.0.state.borrow());
        crate::routes::set_table(results.get().init_table(), &t);
        Ok(())
    }

    async fn report_load(
        self: CapRc<Self>,
        params: scheduler::ReportLoadParams,
        mut results: scheduler::ReportLoadResults,
    ) -> Result<(), capnp::Error> {
        self.0.lead()?;
        let p = params.get()?;
        let front_end = wire::text(p.get_front_end())?;
        if front_end.is_empty() {
            return Err(capnp::Error::failed(
                "reportLoad: frontEnd must name the reporter".into(),
            ));
        }
        let mut loads = std::collections::HashMap::new();
        for l in p.get_loads()? {
            let c = l.get_concurrency();
            if !c.is_finite() || c < 0.0 {
                return Err(capnp::Error::failed(format!(
                    "reportLoad from {front_end}: concurrency {c} is not a count"
                )));
            }
            loads.insert(
                wire::text(l.get_key())?,
                crate::autoscale::Load {
                    concurrency: c,
                    requests: l.get_requests(),
                },
            );
        }
        let busy = p
            .get_busy()?
            .iter()
            .map(wire::text)
            .collect::<Result<Vec<_>, _>>()?;
        self.0.autoscale.report(
            &front_end,
            crate::autoscale::Report {
                loads,
                table_version: p.get_table_version(),
                busy,
            },
        );
        results
            .get()
            .set_interval_ms(crate::autoscale::INTERVAL.as_millis() as u32);
        Ok(())
    }

    async fn hosts(
        self: CapRc<Self>,
        _: scheduler::HostsParams,
        mut results: scheduler::HostsResults,
    ) -> Result<(), capnp::Error> {
        let views = self.0.state.borrow().host_views();
        let mut l = results.get().init_hosts(views.len() as u32);
        for (i, v) in views.iter().enumerate() {
            wire::set_host_info(l.reborrow().get(i as u32), v);
        }
        Ok(())
    }

    async fn register(
        self: CapRc<Self>,
        params: scheduler::RegisterParams,
        mut results: scheduler::RegisterResults,
    ) -> Result<(), capnp::Error> {
        self.0.lead()?;
        let p = params.get()?;
        let client = p.get_host()?;
        let (inv, images) = wire::inventory_from(p.get_inventory()?)?;
        let id = inv.id.clone();
        let session = daemon::register(&self.0, client, inv, images);
        self.0.durable().await?;
        tokio::task::spawn_local(daemon::reconcile(self.0.clone(), id.clone(), session));
        results
            .get()
            .set_session(capnp_rpc::new_client(HostSessionImpl {
                sh: self.0.clone(),
                id,
                session,
            }));
        Ok(())
    }
}

/// One deployed stack.
#[derive(Debug)]
pub struct StackImpl {
    sh: Rc<Shared>,
    name: String,
}

impl StackImpl {
    fn check(&self) -> Result<(), Error> {
        if self.sh.state.borrow().catalog.stack(&self.name).is_none() {
            return Err(Error::BadRequest(format!(
                "stack {} was removed",
                self.name
            )));
        }
        Ok(())
    }
}

impl stack::Server for StackImpl {
    async fn summary(
        self: CapRc<Self>,
        _: stack::SummaryParams,
        mut results: stack::SummaryResults,
    ) -> Result<(), capnp::Error> {
        let view = self
            .sh
            .state
            .borrow()
            .stack_view(&self.name)
            .ok_or_else(|| Error::BadRequest(format!("stack {} was removed", self.name)))?;
        wire::set_stack_summary(results.get().init_summary(), &view);
        Ok(())
    }

    async fn source(
        self: CapRc<Self>,
        _: stack::SourceParams,
        mut results: stack::SourceResults,
    ) -> Result<(), capnp::Error> {
        self.check()?;
        let f = self
            .sh
            .state
            .borrow()
            .files
            .get(&self.name)
            .cloned()
            .ok_or_else(|| Error::BadRequest(format!("stack {} has no stored file", self.name)))?;
        let mut r = results.get();
        r.set_file(&f.file);
        r.set_source(&f.source);
        Ok(())
    }

    async fn remove(
        self: CapRc<Self>,
        _: stack::RemoveParams,
        _: stack::RemoveResults,
    ) -> Result<(), capnp::Error> {
        daemon::remove_stack(&self.sh, &self.name).await?;
        self.sh.durable().await?;
        Ok(())
    }

    async fn variants(
        self: CapRc<Self>,
        _: stack::VariantsParams,
        mut results: stack::VariantsResults,
    ) -> Result<(), capnp::Error> {
        self.check()?;
        let names: Vec<String> = self
            .sh
            .state
            .borrow()
            .catalog
            .variants_of(&self.name)
            .map(|v| v.name.to_string())
            .collect();
        let mut l = results.get().init_variants(names.len() as u32);
        for (i, n) in names.iter().enumerate() {
            l.set(i as u32, n.as_str());
        }
        Ok(())
    }

    async fn create_variant(
        self: CapRc<Self>,
        params: stack::CreateVariantParams,
        mut results: stack::CreateVariantResults,
    ) -> Result<(), capnp::Error> {
        self.check()?;
        let p = params.get()?;
        let file = text(p.get_file())?;
        let source = text(p.get_source())?;
        let report = daemon::deploy(
            &self.sh,
            &file,
            &source,
            None,
            Some(&self.name),
            p.get_explain(),
            None,
        )
        .await?;
        wire::set_deploy_report(results.get().init_report(), &report);
        Ok(())
    }

    async fn remove_variant(
        self: CapRc<Self>,
        params: stack::RemoveVariantParams,
        _: stack::RemoveVariantResults,
    ) -> Result<(), capnp::Error> {
        let name = text(params.get()?.get_name())?;
        daemon::remove_variant(&self.sh, &self.name, &name).await?;
        self.sh.durable().await?;
        Ok(())
    }
}

/// A registered host's session.
#[derive(Debug)]
pub struct HostSessionImpl {
    sh: Rc<Shared>,
    id: String,
    session: u64,
}

impl host_session::Server for HostSessionImpl {
    async fn heartbeat(
        self: CapRc<Self>,
        params: host_session::HeartbeatParams,
        mut results: host_session::HeartbeatResults,
    ) -> Result<(), capnp::Error> {
        self.sh.lead()?;
        let p = params.get()?;
        let (inv, images) = wire::inventory_from(p.get_inventory()?)?;
        let mut guests = Vec::new();
        if p.has_guests() {
            for g in p.get_guests()? {
                if g.has_guest() {
                    guests.push((text(g.get_instance())?, wire::guest_from(g.get_guest()?)?));
                }
            }
        }
        daemon::heartbeat(&self.sh, &self.id, self.session, inv, images, guests)?;
        let interval = (self.sh.host_timeout / 3)
            .as_millis()
            .clamp(10, u32::MAX as u128);
        results.get().set_interval_ms(interval as u32);
        Ok(())
    }
}
