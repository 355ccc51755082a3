//! Per-service counters in Prometheus' text format (version 0.0.4): requests by status
//! class, a latency histogram, cold starts and their duration.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::table::Table;

/// Histogram bucket bounds, seconds.
const LATENCY: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
const STARTS: [f64; 8] = [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0];

#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Per bucket of its bounds (not cumulative), then +Inf.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len() + 1];
        }
        let i = bounds.iter().position(|b| v <= *b).unwrap_or(bounds.len());
        self.counts[i] += 1;
        self.sum += v;
    }

    fn write(&self, out: &mut String, name: &str, service: &str, bounds: &[f64]) {
        let mut acc = 0;
        for (i, b) in bounds.iter().enumerate() {
            acc += self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "{name}_bucket{{service=\"{service}\",le=\"{b}\"}} {acc}"
            );
        }
        acc += self.counts.get(bounds.len()).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "{name}_bucket{{service=\"{service}\",le=\"+Inf\"}} {acc}"
        );
        let _ = writeln!(out, "{name}_sum{{service=\"{service}\"}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{service=\"{service}\"}} {acc}");
    }
}

#[derive(Debug, Default, Clone)]
struct Service {
    /// Requests by status class ("2xx" ...).
    classes: BTreeMap<&'static str, u64>,
    latency: Histogram,
    starts: Histogram,
    start_failures: u64,
}

/// Every service's counters; `service` is the instance key (`web.shop`) or, for
/// requests no service answers, `-`.
#[derive(Debug, Default)]
pub struct Metrics {
    services: Mutex<BTreeMap<String, Service>>,
    /// TLS handshakes completed and failed (no certificate for the name, a client
    /// that is not speaking TLS, one too slow to finish).
    pub tls_handshakes: AtomicU64,
    pub tls_failures: AtomicU64,
}

fn class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

impl Metrics {
    pub fn request(&self, service: &str, status: u16, took: Duration) {
        let mut m = self.services.lock().expect("metrics lock");
        if !m.contains_key(service) {
            m.insert(service.to_owned(), Service::default());
        }
        let s = m.get_mut(service).expect("inserted");
        *s.classes.entry(class(status)).or_default() += 1;
        s.latency.observe(&LATENCY, took.as_secs_f64());
    }

    /// A start from zero this gateway asked for: how long until the instance answered.
    pub fn cold_start(&self, service: &str, took: Duration, ok: bool) {
        let mut m = self.services.lock().expect("metrics lock");
        let s = m.entry(service.to_owned()).or_default();
        if ok {
            s.starts.observe(&STARTS, took.as_secs_f64());
        } else {
            s.start_failures += 1;
        }
    }

    /// The text exposition, with gauges of the route table `routes` held.
    pub fn render(&self, routes: &Table) -> String {
        let m = self.services.lock().expect("metrics lock");
        let mut out = String::new();
        out.push_str(
            "# HELP tide_gateway_route_table_version The scheduler's route table version held.\n",
        );
        out.push_str("# TYPE tide_gateway_route_table_version gauge\n");
        let _ = writeln!(out, "tide_gateway_route_table_version {}", routes.version);
        out.push_str("# HELP tide_gateway_route_names Host names routed.\n");
        out.push_str("# TYPE tide_gateway_route_names gauge\n");
        let _ = writeln!(out, "tide_gateway_route_names {}", routes.names.len());
        out.push_str(
            "# HELP tide_gateway_instances_serving Instances that can take requests, by service.\n",
        );
        out.push_str("# TYPE tide_gateway_instances_serving gauge\n");
        let mut keys: Vec<&String> = routes.services.keys().collect();
        keys.sort();
        for k in keys {
            let n = routes.services[k]
                .instances
                .iter()
                .filter(|i| i.serving)
                .count();
            let _ = writeln!(out, "tide_gateway_instances_serving{{service=\"{k}\"}} {n}");
        }
        out.push_str("# HELP tide_gateway_tls_handshakes_total TLS handshakes, by outcome.\n");
        out.push_str("# TYPE tide_gateway_tls_handshakes_total counter\n");
        for (outcome, n) in [("ok", &self.tls_handshakes), ("failed", &self.tls_failures)] {
            let _ = writeln!(
                out,
                "tide_gateway_tls_handshakes_total{{outcome=\"{outcome}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP tide_gateway_requests_total Requests answered, by status class.\n");
        out.push_str("# TYPE tide_gateway_requests_total counter\n");
        for (name, s) in m.iter() {
            for (c, n) in &s.classes {
                let _ = writeln!(
                    out,
                    "tide_gateway_requests_total{{service=\"{name}\",code=\"{c}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP tide_gateway_request_seconds Time from request to response head.\n");
        out.push_str("# TYPE tide_gateway_request_seconds histogram\n");
        for (name, s) in m.iter() {
            s.latency
                .write(&mut out, "tide_gateway_request_seconds", name, &LATENCY);
        }
        out.push_str("# HELP tide_gateway_cold_start_seconds Starts from zero: request to an answering instance.\n");
        out.push_str("# TYPE tide_gateway_cold_start_seconds histogram\n");
        for (name, s) in m.iter().filter(|(_, s)| !s.starts.counts.is_empty()) {
            s.starts
                .write(&mut out, "tide_gateway_cold_start_seconds", name, &STARTS);
        }
        out.push_str(
            "# HELP tide_gateway_cold_start_failures_total Starts from zero that failed.\n",
        );
        out.push_str("# TYPE tide_gateway_cold_start_failures_total counter\n");
        for (name, s) in m.iter().filter(|(_, s)| s.start_failures > 0) {
            let _ = writeln!(
                out,
                "tide_gateway_cold_start_failures_total{{service=\"{name}\"}} {}",
                s.start_failures
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_classes_counted() {
        let m = Metrics::default();
        m.request("web.shop", 200, Duration::from_millis(3));
        m.request("web.shop", 204, Duration::from_millis(30));
        m.request("web.shop", 503, Duration::from_secs(20));
        m.cold_start("web.shop", Duration::from_millis(4200), true);
        let t = m.render(&Table::default());
        assert!(
            t.contains("tide_gateway_requests_total{service=\"web.shop\",code=\"2xx\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("tide_gateway_requests_total{service=\"web.shop\",code=\"5xx\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains(
                "tide_gateway_request_seconds_bucket{service=\"web.shop\",le=\"0.005\"} 1\n"
            ),
            "{t}"
        );
        assert!(
            t.contains("tide_gateway_request_seconds_bucket{service=\"web.shop\",le=\"0.05\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("tide_gateway_request_seconds_bucket{service=\"web.shop\",le=\"+Inf\"} 3\n"),
            "{t}"
        );
        assert!(
            t.contains("tide_gateway_cold_start_seconds_bucket{service=\"web.shop\",le=\"5\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("tide_gateway_cold_start_seconds_count{service=\"web.shop\"} 1\n"),
            "{t}"
        );
    }
}
