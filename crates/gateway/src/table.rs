//! The route table as the gateway holds it: host name → instance key, key → the
//! instances behind it. Read from the scheduler's `RouteTable` (see
//! `Scheduler.watchRoutes`); names are matched exactly, after [`normalize`].

use std::collections::HashMap;

use schema::sched_capnp::route_table;

/// One name that answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name {
    pub key: String,
    pub stack: String,
    pub variant: String,
    pub service: String,
}

/// One instance behind a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub endpoint: String,
    pub state: String,
    pub phase: String,
    pub reason: String,
}

impl Instance {
    /// Whether requests can go to it: placed (ready or moved), its app running, a port
    /// forwarded.
    pub fn serving(&self) -> bool {
        matches!(self.state.as_str(), "ready" | "moved")
            && self.phase == "running"
            && !self.endpoint.is_empty()
    }
}

/// One instance set and how it scales.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub key: String,
    pub scale_to_zero: bool,
    pub min: u32,
    pub max: u32,
    pub instances: Vec<Instance>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    pub version: u64,
    pub names: HashMap<String, Name>,
    pub services: HashMap<String, Service>,
}

impl Table {
    pub fn read(r: route_table::Reader<'_>) -> capnp::Result<Table> {
        let mut t = Table {
            version: r.get_version(),
            ..Table::default()
        };
        for n in r.get_names()? {
            t.names.insert(
                normalize(&text(n.get_hostname())?),
                Name {
                    key: text(n.get_key())?,
                    stack: text(n.get_stack())?,
                    variant: text(n.get_variant())?,
                    service: text(n.get_service())?,
                },
            );
        }
        for s in r.get_services()? {
            let instances = s
                .get_instances()?
                .iter()
                .map(|i| {
                    Ok(Instance {
                        id: text(i.get_id())?,
                        endpoint: text(i.get_endpoint())?,
                        state: text(i.get_state())?,
                        phase: text(i.get_phase())?,
                        reason: text(i.get_reason())?,
                    })
                })
                .collect::<capnp::Result<_>>()?;
            let key = text(s.get_key())?;
            t.services.insert(
                key.clone(),
                Service {
                    key,
                    scale_to_zero: s.get_scale_to_zero(),
                    min: s.get_min(),
                    max: s.get_max(),
                    instances,
                },
            );
        }
        Ok(t)
    }

    /// The name `host` (a `Host` header or an authority) answers to, with its service.
    pub fn lookup(&self, host: &str) -> Option<(&Name, Option<&Service>)> {
        let n = self.names.get(&normalize(host))?;
        Some((n, self.services.get(&n.key)))
    }
}

/// A `Host` value as a table key: the port dropped, lower case, no trailing dot.
pub fn normalize(host: &str) -> String {
    let h = host.trim();
    let h = match h.rsplit_once(':') {
        // Not an IPv6 literal's colon: `[::1]:80` keeps its brackets' content whole.
        Some((name, port)) if !name.ends_with(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => h,
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

pub(crate) fn text(r: capnp::Result<capnp::text::Reader<'_>>) -> capnp::Result<String> {
    Ok(r?
        .to_str()
        .map_err(|_| capnp::Error::failed("text field is not UTF-8".into()))?
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_normalized_like_the_scheduler_does() {
        assert_eq!(normalize("Web.Shop.localhost:8080"), "web.shop.localhost");
        assert_eq!(normalize("shop.localhost."), "shop.localhost");
        assert_eq!(normalize("shop.localhost"), "shop.localhost");
        assert_eq!(normalize("[::1]:80"), "[::1]");
        assert_eq!(normalize("a.b:x"), "a.b:x");
    }

    #[test]
    fn serving_needs_a_running_app_and_a_port() {
        let mut i = Instance {
            id: "web.shop-0".into(),
            endpoint: "127.0.0.1:4000".into(),
            state: "ready".into(),
            phase: "running".into(),
            reason: String::new(),
        };
        assert!(i.serving());
        i.phase = "booting".into();
        assert!(!i.serving());
        i.phase = "running".into();
        i.state = "pending".into();
        assert!(!i.serving());
        i.state = "moved".into();
        i.endpoint.clear();
        assert!(!i.serving());
    }
}
