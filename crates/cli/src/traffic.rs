//! A front end's counters, read from its metrics port (`tide-gateway --metrics`, the
//! Prometheus text it serves) for `tide service ls --gateway ADDR`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;

/// One service's counters at one or more front ends.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct Traffic {
    pub(crate) requests: u64,
    pub(crate) errors_5xx: u64,
    /// Sum of request times, seconds (mean = this / requests).
    pub(crate) seconds: f64,
    pub(crate) cold_starts: u64,
    /// Sum of the starts' durations, seconds.
    pub(crate) start_seconds: f64,
}

impl Traffic {
    /// `key`'s counters summed over `fronts`.
    pub(crate) fn sum(fronts: &[HashMap<String, Traffic>], key: &str) -> Traffic {
        let mut t = Traffic::default();
        for f in fronts {
            if let Some(x) = f.get(key) {
                t.requests += x.requests;
                t.errors_5xx += x.errors_5xx;
                t.seconds += x.seconds;
                t.cold_starts += x.cold_starts;
                t.start_seconds += x.start_seconds;
            }
        }
        t
    }

    /// REQUESTS, 5XX, MEAN MS, COLD STARTS, MEAN START S.
    pub(crate) fn cells(&self) -> Vec<String> {
        let mean = |sum: f64, n: u64, scale: f64, digits: usize| {
            if n == 0 {
                "-".to_string()
            } else {
                format!("{:.digits$}", sum / n as f64 * scale)
            }
        };
        vec![
            self.requests.to_string(),
            self.errors_5xx.to_string(),
            mean(self.seconds, self.requests, 1e3, 1),
            self.cold_starts.to_string(),
            mean(self.start_seconds, self.cold_starts, 1.0, 2),
        ]
    }
}

/// Reads the metrics of the front end at `addr`.
pub(crate) fn fetch(addr: &str) -> Result<HashMap<String, Traffic>> {
    let what = || format!("gateway metrics at {addr}");
    let sa = addr
        .to_socket_addrs()
        .with_context(what)?
        .next()
        .with_context(|| format!("{}: no address", what()))?;
    let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(5)).with_context(what)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: tide\r\nConnection: close\r\n\r\n")
        .with_context(what)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).with_context(what)?;
    let text = String::from_utf8_lossy(&buf);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("{}: not an HTTP answer", what());
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "{}: {} (is it a tide-gateway --metrics address?)",
            what(),
            head.lines().next().unwrap_or("")
        );
    }
    Ok(parse(body))
}

/// The per-service counters in a tide-gateway metrics page.
pub(crate) fn parse(body: &str) -> HashMap<String, Traffic> {
    let mut m: HashMap<String, Traffic> = HashMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((name_labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some((name, labels)) = name_labels.split_once('{') else {
            continue;
        };
        let label = |k: &str| {
            let pat = format!("{k}=\"");
            let i = labels.find(&pat)? + pat.len();
            labels[i..].split('"').next()
        };
        let (Some(service), Ok(v)) = (label("service"), value.parse::<f64>()) else {
            continue;
        };
        let t = m.entry(service.to_owned()).or_default();
        match name {
            "tide_gateway_requests_total" => {
                t.requests += v as u64;
                if label("code") == Some("5xx") {
                    t.errors_5xx += v as u64;
                }
            }
            "tide_gateway_request_seconds_sum" => t.seconds += v,
            "tide_gateway_cold_start_seconds_count" => t.cold_starts += v as u64,
            "tide_gateway_cold_start_seconds_sum" => t.start_seconds += v,
            _ => {}
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metrics_page_becomes_per_service_counts() {
        let page = "# TYPE tide_gateway_requests_total counter\n\
            tide_gateway_requests_total{service=\"web.shop\",code=\"2xx\"} 40\n\
            tide_gateway_requests_total{service=\"web.shop\",code=\"5xx\"} 2\n\
            tide_gateway_requests_total{service=\"-\",code=\"4xx\"} 7\n\
            tide_gateway_request_seconds_bucket{service=\"web.shop\",le=\"0.005\"} 30\n\
            tide_gateway_request_seconds_sum{service=\"web.shop\"} 0.84\n\
            tide_gateway_cold_start_seconds_sum{service=\"web.shop\"} 5.5\n\
            tide_gateway_cold_start_seconds_count{service=\"web.shop\"} 1\n";
        let m = parse(page);
        let w = &m["web.shop"];
        assert_eq!((w.requests, w.errors_5xx, w.cold_starts), (42, 2, 1));
        assert_eq!(w.cells(), ["42", "2", "20.0", "1", "5.50"]);
        assert_eq!(m["-"].requests, 7);
        let both = Traffic::sum(&[m.clone(), m], "web.shop");
        assert_eq!(both.requests, 84);
        assert_eq!(both.cells()[2], "20.0", "a mean of means over equal halves");
    }
}
