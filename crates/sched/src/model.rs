//! The resolved view of stacks and variants: which services a variant shares with its
//! parent and which it runs itself, the env cascade, host names and aliases.
//!
//! [`Catalog`] holds what has been deployed and keeps it consistent: every variant's
//! parent and overridden services exist, every alias resolves, no alias chain loops.
//! Each mutation checks before it changes anything, so a refused call leaves the
//! catalog as it was.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::stack::{Pool, Service, Stack, StackFile, Variant, parse_target_syntax};
use crate::types::{Name, check_hostname};

/// How far an alias chain is followed before it is called a loop.
const MAX_ALIAS_DEPTH: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("stack {0:?} has variants ({1}); delete them first")]
    StackHasVariants(Name, String),
    #[error("no stack {0:?}")]
    UnknownStack(Name),
    #[error("stack {stack:?} has no variant {variant:?}")]
    UnknownVariant { stack: Name, variant: Name },
    #[error("stack {stack:?} has no service {service:?}")]
    UnknownService { stack: Name, service: Name },
    #[error(
        "variant {variant:?} of {stack:?} overrides service {service:?}, which the stack lacks"
    )]
    OverrideOfMissingService {
        stack: Name,
        variant: Name,
        service: Name,
    },
    #[error("variant {variant:?} of {stack:?}: services.{service}.instances.{field}: {reason}")]
    InvalidOverride {
        stack: Name,
        variant: Name,
        service: Name,
        field: &'static str,
        reason: String,
    },
    #[error("{0} is longer than the 63 characters of a DNS label")]
    LabelTooLong(String),
    #[error("invalid host name: {0}")]
    BadHostName(String),
    #[error("no service answers to {0:?}")]
    UnknownHost(String),
    #[error("{0:?} is a generated name; an alias cannot replace it")]
    AliasShadowsName(String),
    #[error("alias {alias:?} -> {target:?}: {source}")]
    AliasTarget {
        alias: String,
        target: String,
        source: Box<ModelError>,
    },
    #[error("alias loop: {}", .0.join(" -> "))]
    AliasLoop(Vec<String>),
    #[error("{0:?} is the target of alias {1:?}; remove the alias first")]
    AliasedBy(String, String),
}

/// Whether a variant's service runs its own instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharing {
    /// A stack's own service.
    Own,
    /// Not overridden by the variant: served by the parent stack's instances.
    Shared,
    /// Overridden by the variant: needs instances of its own.
    Unique,
}

/// A service as a stack or variant runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedService {
    pub sharing: Sharing,
    /// The effective service: the variant's patch applied for UNIQUE ones, the
    /// parent's as is for SHARED ones; `env` is the full cascade.
    pub service: Service,
    /// The name it answers to in this stack or variant.
    pub hostname: String,
    /// The key of the instances that serve it (see [`instance_key`]): the parent's for
    /// SHARED services.
    pub instances_of: String,
}

/// A stack or one of its variants, resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub stack: Name,
    pub variant: Option<Name>,
    pub services: Vec<ResolvedService>,
}

impl Deployment {
    /// Services this deployment runs itself (Own or Unique).
    pub fn running(&self) -> impl Iterator<Item = &ResolvedService> {
        self.services
            .iter()
            .filter(|s| s.sharing != Sharing::Shared)
    }

    /// The instances it must keep running beyond what already runs: the sum of `min`
    /// over its Own and Unique services. SHARED services cost nothing.
    pub fn new_instances(&self) -> u32 {
        self.running().map(|s| s.service.instances.min).sum()
    }
}

/// Where an env value came from, lowest precedence first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvSource {
    Stack,
    Service,
    Variant,
    VariantService,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    pub key: String,
    pub value: String,
    pub source: EnvSource,
}

/// What serves a host name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub stack: Name,
    pub variant: Option<Name>,
    pub service: Name,
    /// The variant does not override the service: the parent's instances serve it.
    pub shared_from_parent: bool,
    /// The aliases followed to get here, first one first.
    pub via_aliases: Vec<String>,
}

impl Route {
    /// The key of the instances that answer this route.
    pub fn instances_of(&self) -> String {
        let variant = if self.shared_from_parent {
            None
        } else {
            self.variant.as_ref()
        };
        instance_key(&self.service, &self.stack, variant)
    }
}

/// `service.stack` or `service.stack--variant`: names one set of instances (and is the
/// short form an alias may target).
pub fn instance_key(service: &Name, stack: &Name, variant: Option<&Name>) -> String {
    match variant {
        Some(v) => format!("{service}.{stack}--{v}"),
        None => format!("{service}.{stack}"),
    }
}

/// The env of `service` under the cascade stack < service < variant < variant's
/// override of the service, each value with its origin, in first-written order.
///
/// A SHARED service (a variant that does not override it) runs the parent's instances,
/// so the variant's levels do not apply to it: pass `variant = None` for it (as
/// [`Catalog::effective_env`] does).
///
/// `service` is the stack's own definition (its `env` is the service level).
pub fn effective_env(stack: &Stack, variant: Option<&Variant>, service: &Service) -> Vec<EnvVar> {
    let mut levels = vec![
        (&stack.env, EnvSource::Stack),
        (&service.env, EnvSource::Service),
    ];
    if let Some(v) = variant {
        levels.push((&v.env, EnvSource::Variant));
        if let Some(p) = v.overrides.get(&service.name) {
            levels.push((&p.env, EnvSource::VariantService));
        }
    }
    // A later level replaces the value but keeps the key where it was first written.
    let mut out: IndexMap<&str, (&str, EnvSource)> = IndexMap::new();
    for (env, source) in levels {
        for (k, v) in env {
            out.insert(k, (v, source));
        }
    }
    out.into_iter()
        .map(|(k, (v, source))| EnvVar {
            key: k.to_owned(),
            value: v.to_owned(),
            source,
        })
        .collect()
}

/// Everything deployed: stacks, their variants, pools and aliases.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Catalog {
    stacks: IndexMap<Name, Stack>,
    /// Keyed by (parent stack, variant name).
    variants: IndexMap<(Name, Name), Variant>,
    pools: IndexMap<Name, Pool>,
    /// Alias domain → target, as written (lower case).
    aliases: IndexMap<String, String>,
}

impl Catalog {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stack(&self, name: &str) -> Option<&Stack> {
        self.stacks.get(name)
    }

    pub fn stacks(&self) -> impl Iterator<Item = &Stack> {
        self.stacks.values()
    }

    pub fn variant(&self, stack: &str, variant: &str) -> Option<&Variant> {
        self.variants
            .iter()
            .find(|((s, v), _)| s.as_str() == stack && v.as_str() == variant)
            .map(|(_, v)| v)
    }

    pub fn variants_of<'a>(&'a self, stack: &'a str) -> impl Iterator<Item = &'a Variant> + 'a {
        self.variants
            .iter()
            .filter(move |((s, _), _)| s.as_str() == stack)
            .map(|(_, v)| v)
    }

    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.pools.values()
    }

    pub fn aliases(&self) -> impl Iterator<Item = (&str, &str)> {
        self.aliases.iter().map(|(d, t)| (d.as_str(), t.as_str()))
    }

    /// Adds everything a parsed file declares: the stack, then variants, pools and
    /// aliases. Stops at the first refusal; what was added before it stays.
    pub fn load(&mut self, file: StackFile) -> Result<(), ModelError> {
        if let Some(s) = file.stack {
            self.put_stack(s)?;
        }
        for v in file.variants {
            self.put_variant(v)?;
        }
        for p in file.pools {
            self.pools.insert(p.name.clone(), p);
        }
        for a in file.aliases {
            self.put_alias(&a.domain, &a.target)?;
        }
        Ok(())
    }

    /// Adds or replaces (redeploys) a stack. A replacement must keep every service its
    /// variants override, and every alias must still resolve.
    pub fn put_stack(&mut self, stack: Stack) -> Result<(), ModelError> {
        for v in self.variants_of(stack.name.as_str()) {
            check_variant(&stack, v)?;
        }
        let old = self.stacks.insert(stack.name.clone(), stack);
        if let Err(e) = self.check_aliases() {
            let name = self.stacks.last().map(|(n, _)| n.clone());
            match (old, name) {
                (Some(o), _) => {
                    self.stacks.insert(o.name.clone(), o);
                }
                (None, Some(n)) => {
                    self.stacks.shift_remove(&n);
                }
                (None, None) => {}
            }
            return Err(e);
        }
        Ok(())
    }

    /// Adds or replaces a variant; its parent and every service it overrides must
    /// exist, and the overrides must be valid applied to the parent's services.
    pub fn put_variant(&mut self, variant: Variant) -> Result<(), ModelError> {
        let stack = self
            .stacks
            .get(&variant.parent)
            .ok_or_else(|| ModelError::UnknownStack(variant.parent.clone()))?;
        check_variant(stack, &variant)?;
        self.variants
            .insert((variant.parent.clone(), variant.name.clone()), variant);
        Ok(())
    }

    /// Removes a variant unless an alias targets it.
    pub fn remove_variant(&mut self, stack: &str, variant: &str) -> Result<Variant, ModelError> {
        let key = self
            .variants
            .keys()
            .find(|(s, v)| s.as_str() == stack && v.as_str() == variant)
            .cloned()
            .ok_or_else(|| ModelError::UnknownVariant {
                stack: name_lossy(stack),
                variant: name_lossy(variant),
            })?;
        let removed = self.variants.shift_remove(&key).expect("key found above");
        if let Err(e) = self.check_aliases() {
            self.variants.insert(key, removed);
            return Err(e);
        }
        Ok(removed)
    }

    /// Removes a stack that has no variants and no alias pointing into it.
    pub fn remove_stack(&mut self, stack: &str) -> Result<Stack, ModelError> {
        let names: Vec<&str> = self.variants_of(stack).map(|v| v.name.as_str()).collect();
        if !names.is_empty() {
            return Err(ModelError::StackHasVariants(
                name_lossy(stack),
                names.join(", "),
            ));
        }
        let removed = self
            .stacks
            .shift_remove(stack)
            .ok_or_else(|| ModelError::UnknownStack(name_lossy(stack)))?;
        if let Err(e) = self.check_aliases() {
            self.stacks.insert(removed.name.clone(), removed);
            return Err(e);
        }
        Ok(removed)
    }

    /// Adds or replaces an alias, after checking that the domain is a host name that
    /// no stack generates, and that the target resolves without a loop.
    pub fn put_alias(&mut self, domain: &str, target: &str) -> Result<(), ModelError> {
        let domain = normalize(domain);
        let target = normalize(target);
        check_hostname(&domain).map_err(|e| ModelError::BadHostName(e.0))?;
        parse_target_syntax(&target).map_err(ModelError::BadHostName)?;
        if self.resolve_generated(&domain).is_ok() {
            return Err(ModelError::AliasShadowsName(domain));
        }
        let old = self.aliases.insert(domain.clone(), target.clone());
        if let Err(e) = self.resolve(&domain) {
            match old {
                Some(o) => {
                    self.aliases.insert(domain.clone(), o);
                }
                None => {
                    self.aliases.shift_remove(&domain);
                }
            }
            return Err(match e {
                ModelError::AliasLoop(_) | ModelError::AliasTarget { .. } => e,
                other => ModelError::AliasTarget {
                    alias: domain,
                    target,
                    source: Box::new(other),
                },
            });
        }
        Ok(())
    }

    /// Removes an alias unless another alias targets it.
    pub fn remove_alias(&mut self, domain: &str) -> Result<(), ModelError> {
        let domain = normalize(domain);
        if let Some((by, _)) = self.aliases.iter().find(|(_, t)| **t == domain) {
            return Err(ModelError::AliasedBy(domain.clone(), by.clone()));
        }
        self.aliases
            .shift_remove(&domain)
            .map(|_| ())
            .ok_or(ModelError::UnknownHost(domain))
    }

    fn check_aliases(&self) -> Result<(), ModelError> {
        for domain in self.aliases.keys() {
            self.resolve(domain)?;
        }
        Ok(())
    }

    /// A stack (`variant = None`) or one of its variants, with each service marked
    /// Own, Shared or Unique.
    pub fn deployment(&self, stack: &str, variant: Option<&str>) -> Result<Deployment, ModelError> {
        let (s, v) = self.lookup(stack, variant)?;
        let services = s
            .services
            .values()
            .map(|svc| {
                let (sharing, effective, own_variant) = match v {
                    None => (Sharing::Own, svc.clone(), None),
                    Some(v) => match v.overrides.get(&svc.name) {
                        Some(p) => (Sharing::Unique, svc.patched(p), Some(v)),
                        None => (Sharing::Shared, svc.clone(), None),
                    },
                };
                let mut service = effective;
                service.env = effective_env(s, own_variant, svc)
                    .into_iter()
                    .map(|e| (e.key, e.value))
                    .collect();
                ResolvedService {
                    sharing,
                    hostname: hostname(s, v.map(|v| &v.name), &svc.name),
                    instances_of: instance_key(&svc.name, &s.name, own_variant.map(|v| &v.name)),
                    service,
                }
            })
            .collect();
        Ok(Deployment {
            stack: s.name.clone(),
            variant: v.map(|v| v.name.clone()),
            services,
        })
    }

    /// The env a service runs with in a stack or variant, each value with its origin.
    /// For a service the variant shares, that is the parent's env.
    pub fn effective_env(
        &self,
        stack: &str,
        variant: Option<&str>,
        service: &str,
    ) -> Result<Vec<EnvVar>, ModelError> {
        let (s, v) = self.lookup(stack, variant)?;
        let svc = s
            .services
            .get(service)
            .ok_or_else(|| ModelError::UnknownService {
                stack: s.name.clone(),
                service: name_lossy(service),
            })?;
        let v = v.filter(|v| v.overrides.contains_key(service));
        Ok(effective_env(s, v, svc))
    }

    fn lookup(
        &self,
        stack: &str,
        variant: Option<&str>,
    ) -> Result<(&Stack, Option<&Variant>), ModelError> {
        let s = self
            .stacks
            .get(stack)
            .ok_or_else(|| ModelError::UnknownStack(name_lossy(stack)))?;
        let v = match variant {
            None => None,
            Some(name) => {
                Some(
                    self.variant(stack, name)
                        .ok_or_else(|| ModelError::UnknownVariant {
                            stack: s.name.clone(),
                            variant: name_lossy(name),
                        })?,
                )
            }
        };
        Ok((s, v))
    }

    /// What serves `host`: aliases are followed (a loop is an error), then the host is
    /// read as `{service}.{stack}[--{variant}].{domain}` or `{stack}[--{variant}].{domain}`
    /// (the entrypoint). Case and a trailing dot are ignored.
    pub fn resolve(&self, host: &str) -> Result<Route, ModelError> {
        let mut host = normalize(host);
        let mut chain: Vec<String> = Vec::new();
        while let Some(target) = self.aliases.get(&host) {
            if chain.contains(&host) || chain.len() >= MAX_ALIAS_DEPTH {
                chain.push(host);
                return Err(ModelError::AliasLoop(chain));
            }
            chain.push(host);
            host = target.clone();
        }
        let route = if chain.is_empty() {
            self.resolve_generated(&host)
        } else {
            // An alias target may be a full generated name or a short form.
            self.resolve_generated(&host)
                .or_else(|_| self.resolve_short(&host))
        };
        match route {
            Ok(mut r) => {
                r.via_aliases = chain;
                Ok(r)
            }
            Err(e) if !chain.is_empty() => Err(ModelError::AliasTarget {
                alias: chain.last().cloned().unwrap_or_default(),
                target: host,
                source: Box::new(e),
            }),
            Err(e) => Err(e),
        }
    }

    /// Every name that answers, with its route: each stack's and variant's entrypoint
    /// and service names, then every alias. Each route is what [`Catalog::resolve`]
    /// gives for the name, so a front end that looks names up in this table routes as
    /// `resolve` does. A name that no longer resolves (cannot happen while the catalog's
    /// checks hold) is left out.
    pub fn hostnames(&self) -> Vec<(String, Route)> {
        let mut names = Vec::new();
        for s in self.stacks.values() {
            let variants = std::iter::once(None).chain(self.variants_of(s.name.as_str()).map(Some));
            for v in variants {
                let vname = v.map(|v| &v.name);
                names.push(entry_hostname(s, vname));
                names.extend(s.services.keys().map(|svc| hostname(s, vname, svc)));
            }
        }
        names.extend(self.aliases.keys().cloned());
        names
            .into_iter()
            .filter_map(|n| self.resolve(&n).ok().map(|r| (n, r)))
            .collect()
    }

    /// `service.stack[--variant]` or `stack[--variant]`, relative to the stack's domain.
    fn resolve_short(&self, t: &str) -> Result<Route, ModelError> {
        let labels: Vec<&str> = t.split('.').collect();
        match labels.as_slice() {
            [sv] => self.route(sv, None),
            [svc, sv] => self.route(sv, Some(svc)),
            _ => Err(ModelError::UnknownHost(t.to_owned())),
        }
    }

    fn resolve_generated(&self, host: &str) -> Result<Route, ModelError> {
        let labels: Vec<&str> = host.split('.').collect();
        // {service}.{stack}[--{variant}].{domain}
        if labels.len() >= 3 && self.stack_under(labels[1], &labels[2..]) {
            return self.route(labels[1], Some(labels[0]));
        }
        // {stack}[--{variant}].{domain}
        if labels.len() >= 2 && self.stack_under(labels[0], &labels[1..]) {
            return self.route(labels[0], None);
        }
        Err(ModelError::UnknownHost(host.to_owned()))
    }

    /// Whether `label` (`stack` or `stack--variant`) names a known stack whose domain
    /// is `domain`.
    fn stack_under(&self, label: &str, domain: &[&str]) -> bool {
        let stack = label.split_once("--").map_or(label, |(s, _)| s);
        self.stacks.get(stack).is_some_and(|s| {
            let mut parts = s.domain.split('.');
            domain.iter().all(|d| parts.next() == Some(d)) && parts.next().is_none()
        })
    }

    /// The route for a stack label (`stack` or `stack--variant`) and a service label
    /// (`None`: the entrypoint).
    fn route(&self, stack_label: &str, service: Option<&str>) -> Result<Route, ModelError> {
        let (stack, variant) = match stack_label.split_once("--") {
            Some((s, v)) => (s, Some(v)),
            None => (stack_label, None),
        };
        let (s, v) = self.lookup(stack, variant)?;
        let service = match service {
            Some(name) => s
                .services
                .get_key_value(name)
                .map(|(n, _)| n.clone())
                .ok_or_else(|| ModelError::UnknownService {
                    stack: s.name.clone(),
                    service: name_lossy(name),
                })?,
            None => s.entrypoint.clone(),
        };
        Ok(Route {
            stack: s.name.clone(),
            shared_from_parent: v.is_some_and(|v| !v.overrides.contains_key(&service)),
            variant: v.map(|v| v.name.clone()),
            service,
            via_aliases: Vec::new(),
        })
    }
}

/// `{service}.{stack}[--{variant}].{domain}`.
pub fn hostname(stack: &Stack, variant: Option<&Name>, service: &Name) -> String {
    format!("{service}.{}.{}", stack_label(stack, variant), stack.domain)
}

/// `{stack}[--{variant}].{domain}`: the entrypoint's name.
pub fn entry_hostname(stack: &Stack, variant: Option<&Name>) -> String {
    format!("{}.{}", stack_label(stack, variant), stack.domain)
}

fn stack_label(stack: &Stack, variant: Option<&Name>) -> String {
    match variant {
        Some(v) => format!("{}--{v}", stack.name),
        None => stack.name.to_string(),
    }
}

fn normalize(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// A name for an error message about something that was not found; a string that is
/// not even a valid name is shown as `invalid`.
fn name_lossy(s: &str) -> Name {
    Name::new(s).unwrap_or_else(|_| Name::new("invalid").expect("valid"))
}

fn check_variant(stack: &Stack, v: &Variant) -> Result<(), ModelError> {
    let label = format!("{}--{}", stack.name, v.name);
    if label.len() > 63 {
        return Err(ModelError::LabelTooLong(label));
    }
    for (name, patch) in &v.overrides {
        let base =
            stack
                .services
                .get(name)
                .ok_or_else(|| ModelError::OverrideOfMissingService {
                    stack: stack.name.clone(),
                    variant: v.name.clone(),
                    service: name.clone(),
                })?;
        base.patched(patch)
            .check_instances()
            .map_err(|(field, reason)| ModelError::InvalidOverride {
                stack: stack.name.clone(),
                variant: v.name.clone(),
                service: name.clone(),
                field,
                reason,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::{ServicePatch, parse};

    fn shop() -> Catalog {
        let f = parse("shop.toml", include_str!("../examples/shop.toml")).unwrap();
        let mut c = Catalog::new();
        c.load(f).unwrap();
        c
    }

    fn n(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    #[test]
    fn hostnames_lists_every_name_with_the_route_resolve_gives() {
        let mut c = shop();
        c.put_alias("www.example.com", "web.shop--pr-42").unwrap();
        let names = c.hostnames();
        let variants = c.variants_of("shop").count();
        let services = c.stack("shop").unwrap().services.len();
        // Entrypoint + services for the stack and each variant, plus the alias.
        assert_eq!(
            names.len(),
            (1 + variants) * (1 + services) + c.aliases().count()
        );
        for (n, r) in &names {
            assert_eq!(&c.resolve(n).unwrap(), r, "{n}");
        }
        let alias = names.iter().find(|(n, _)| n == "www.example.com").unwrap();
        assert_eq!(alias.1.via_aliases, vec!["www.example.com".to_string()]);
        assert_eq!(alias.1.variant.as_ref().map(Name::as_str), Some("pr-42"));
    }

    #[test]
    fn variant_overriding_one_of_three_services_needs_one_new_instance() {
        let mut c = shop();
        let mut v = c.variant("shop", "pr-42").unwrap().clone();
        v.name = n("pr-43");
        // Keep the parent's instance bounds (min 2): the new variant runs 2 instances.
        v.overrides[0] = ServicePatch {
            image: Some("shop/web:pr-43".parse().unwrap()),
            min: Some(1),
            ..ServicePatch::default()
        };
        c.put_variant(v).unwrap();
        let d = c.deployment("shop", Some("pr-43")).unwrap();
        let count = |k| d.services.iter().filter(|s| s.sharing == k).count();
        assert_eq!(count(Sharing::Unique), 1);
        assert_eq!(count(Sharing::Shared), 2);
        assert_eq!(d.new_instances(), 1);
        let web = d
            .services
            .iter()
            .find(|s| s.service.name == n("web"))
            .unwrap();
        assert_eq!(web.hostname, "web.shop--pr-43.tidedge.local");
        assert_eq!(web.instances_of, "web.shop--pr-43");
        let db = d
            .services
            .iter()
            .find(|s| s.service.name == n("db"))
            .unwrap();
        assert_eq!(db.instances_of, "db.shop");
        // The parent stack itself runs all three: 2 web + 1 api + 1 db.
        assert_eq!(c.deployment("shop", None).unwrap().new_instances(), 4);
    }

    #[test]
    fn env_cascade_order_and_origins() {
        let c = shop();
        let env = c.effective_env("shop", Some("pr-42"), "web").unwrap();
        let get = |k: &str| env.iter().find(|e| e.key == k).cloned().unwrap();
        // Stack says info, the variant's override of web says debug.
        assert_eq!(get("LOG_LEVEL").value, "debug");
        assert_eq!(get("LOG_LEVEL").source, EnvSource::VariantService);
        assert_eq!(get("SHOP_CURRENCY").source, EnvSource::Stack);
        assert_eq!(get("PUBLIC_URL").source, EnvSource::Service);
        assert_eq!(get("SHOP_BANNER").source, EnvSource::Variant);
        // A shared service runs the parent's instances: no variant levels.
        let api = c.effective_env("shop", Some("pr-42"), "api").unwrap();
        assert!(
            api.iter().all(|e| e.source <= EnvSource::Service),
            "{api:?}"
        );
        assert!(api.iter().any(|e| e.key == "DATABASE_URL"));
        // Service level beats stack level.
        let mut c2 = c.clone();
        let mut s = c2.stack("shop").unwrap().clone();
        s.services[&n("api")]
            .env
            .insert("LOG_LEVEL".into(), "warn".into());
        c2.put_stack(s).unwrap();
        let api = c2.effective_env("shop", None, "api").unwrap();
        let lvl = api.iter().find(|e| e.key == "LOG_LEVEL").unwrap();
        assert_eq!(
            (lvl.value.as_str(), lvl.source),
            ("warn", EnvSource::Service)
        );
    }

    #[test]
    fn names_resolve_to_stack_variant_service() {
        let c = shop();
        let r = c.resolve("api.shop.tidedge.local").unwrap();
        assert_eq!(
            (r.stack.as_str(), r.variant.as_ref(), r.service.as_str()),
            ("shop", None, "api")
        );
        let r = c.resolve("Shop.TideDge.local.").unwrap();
        assert_eq!(r.service.as_str(), "web", "the entrypoint");
        let r = c.resolve("api.shop--pr-42.tidedge.local").unwrap();
        assert!(r.shared_from_parent);
        assert_eq!(r.instances_of(), "api.shop");
        let r = c.resolve("web.shop--pr-42.tidedge.local").unwrap();
        assert!(!r.shared_from_parent);
        assert_eq!(r.instances_of(), "web.shop--pr-42");
        let r = c.resolve("shop--pr-42.tidedge.local").unwrap();
        assert_eq!((r.service.as_str(), r.shared_from_parent), ("web", false));
        assert!(matches!(
            c.resolve("cart.shop.tidedge.local"),
            Err(ModelError::UnknownService { .. })
        ));
        assert!(matches!(
            c.resolve("web.shop--pr-9.tidedge.local"),
            Err(ModelError::UnknownVariant { .. })
        ));
        assert!(matches!(
            c.resolve("web.shop.example.org"),
            Err(ModelError::UnknownHost(_))
        ));
    }

    #[test]
    fn aliases_resolve_and_are_checked_when_created() {
        let mut c = shop();
        let r = c.resolve("preview.shop.example.com").unwrap();
        assert_eq!(r.variant, Some(n("pr-42")));
        assert_eq!(r.service.as_str(), "web");
        assert_eq!(r.via_aliases, vec!["preview.shop.example.com"]);
        // An alias of an alias, and one to a full generated name.
        c.put_alias("www.shop.example.com", "preview.shop.example.com")
            .unwrap();
        c.put_alias("api.shop.example.com", "api.shop.tidedge.local")
            .unwrap();
        assert_eq!(
            c.resolve("www.shop.example.com").unwrap().via_aliases.len(),
            2
        );
        assert_eq!(
            c.resolve("api.shop.example.com").unwrap().service.as_str(),
            "api"
        );
        // Pointing nowhere is refused at creation, and changes nothing.
        let e = c
            .put_alias("x.example.com", "cart.shop--pr-42")
            .unwrap_err();
        assert!(
            matches!(&e, ModelError::AliasTarget { source, .. } if matches!(**source, ModelError::UnknownService { .. })),
            "{e}"
        );
        assert!(c.resolve("x.example.com").is_err());
        // A generated name cannot be taken over.
        assert!(matches!(
            c.put_alias("web.shop.tidedge.local", "api.shop"),
            Err(ModelError::AliasShadowsName(_))
        ));
        // Loops are refused, and the old target is kept.
        let e = c
            .put_alias("preview.shop.example.com", "www.shop.example.com")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "alias loop: preview.shop.example.com -> www.shop.example.com -> preview.shop.example.com"
        );
        assert_eq!(
            c.resolve("www.shop.example.com").unwrap().service.as_str(),
            "web"
        );
        // Removing what an alias needs is refused.
        assert!(c.remove_variant("shop", "pr-42").is_err());
        assert!(c.remove_alias("preview.shop.example.com").is_err());
    }

    #[test]
    fn variants_must_match_their_parent() {
        let mut c = shop();
        let mut v = c.variant("shop", "pr-42").unwrap().clone();
        v.overrides.insert(n("cart"), ServicePatch::default());
        assert!(matches!(
            c.put_variant(v.clone()),
            Err(ModelError::OverrideOfMissingService { .. })
        ));
        v.parent = n("nope");
        assert!(matches!(c.put_variant(v), Err(ModelError::UnknownStack(_))));
        // A redeploy that drops an overridden service is refused.
        let mut s = c.stack("shop").unwrap().clone();
        s.services.shift_remove("web");
        s.entrypoint = n("api");
        assert!(c.put_stack(s).is_err());
        assert!(c.stack("shop").unwrap().services.contains_key("web"));
        assert!(matches!(
            c.remove_stack("shop"),
            Err(ModelError::StackHasVariants(..))
        ));
    }
}
