//! The route table as the gateway holds it: host name → instance key, key → the
//! instances behind it. Read from the scheduler's `RouteTable` (see
//! `Scheduler.watchRoutes`); names are matched exactly, after [`normalize`].

use std::collections::HashMap;

use schema::sched_capnp::route_table;

/// One name that answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name {
    /// The instance key (`service.stack[--variant]`) whose instances answer it.
    pub key: String,
}

/// One instance behind a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub endpoint: String,
    /// Requests can go to it (the scheduler's judgement: placed, app running, a port).
    pub serving: bool,
}

/// One instance set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
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
                        serving: i.get_serving(),
                    })
                })
                .collect::<capnp::Result<_>>()?;
            t.services.insert(text(s.get_key())?, Service { instances });
        }
        Ok(t)
    }

    /// The name `host` (already [`normalize`]d) answers to.
    pub fn lookup(&self, host: &str) -> Option<&Name> {
        self.names.get(host)
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
}
