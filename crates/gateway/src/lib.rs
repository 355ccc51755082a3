//! gateway: `tide-gateway`, the HTTP front end. It routes requests by `Host`
//! (`{service}.{stack}[--{variant}].{domain}`, `{stack}.{domain}`, aliases) to the
//! instances the scheduler placed, from a route table the scheduler pushes
//! ([`link`]); starts a scaled-to-zero service on its first request, once for every
//! request that waits ([`proxy`]); and counts requests per service ([`metrics`]).
//!
//! A binary of its own, not part of `sched`: front ends scale with traffic, several run
//! against one scheduler, and a scheduler restart must not drop connections. It needs
//! no store: only `schema` and the HTTP stack (hyper).

pub mod link;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod table;
pub mod tls;

/// Logs one line to stderr, prefixed with Unix time in seconds.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {{
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        eprintln!("{}.{:03} gateway: {}", now.as_secs(), now.subsec_millis(), format_args!($($arg)*))
    }};
}
