//! Running the real HTTP front end (`tide-gateway`) for a test, against a scheduler,
//! on ports the kernel picks; and the raw HTTP/1.1 a test sends it (bad request lines,
//! huge heads, slow clients), where a client library would refuse to.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `tide-gateway`; dropping it kills the process.
#[derive(Debug)]
pub struct Gateway {
    /// Where it serves HTTP (`127.0.0.1:PORT`).
    pub addr: String,
    /// Where it serves `/metrics`.
    pub metrics: String,
    /// Where it serves HTTPS, when started with `--tls-listen`.
    pub tls: Option<String>,
    /// Its stderr.
    pub log: PathBuf,
    child: Child,
}

impl Gateway {
    /// Starts `tide-gateway --scheduler SCHED` with `args` added, on free ports, and
    /// waits (up to 30 s) until it says where it serves and its scheduler link is up.
    pub fn start(sched: &str, log: PathBuf, args: &[&str]) -> Gateway {
        let f = std::fs::File::create(&log).expect("create gateway log");
        let child = Command::new(crate::gateway_bin())
            .args(["--scheduler", sched])
            .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn tide-gateway");
        let mut g = Gateway {
            addr: String::new(),
            metrics: String::new(),
            tls: None,
            log,
            child,
        };
        let t0 = Instant::now();
        loop {
            let text = g.log_text();
            if let Some(line) = text.lines().find(|l| l.contains("serving on ")) {
                let rest = &line[line.find("serving on ").unwrap() + "serving on ".len()..];
                g.addr = rest.split([',', ' ']).next().unwrap().to_string();
                let m = &rest[rest.find("metrics on ").expect("metrics address") + 11..];
                g.metrics = m.split([',', ' ']).next().unwrap().to_string();
                g.tls = rest
                    .find("tls on ")
                    .map(|i| rest[i + 7..].split([',', ' ']).next().unwrap().to_string());
                if text.contains("scheduler link up") {
                    return g;
                }
            }
            if let Ok(Some(st)) = g.child.try_wait() {
                panic!("tide-gateway exited ({st}):\n{text}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "tide-gateway did not come up:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its pid (for a signal).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `GET path` with `Host: host`: status, headers (lowercased names), body.
    pub fn get(&self, host: &str, path: &str) -> Reply {
        raw(
            &self.addr,
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
    }

    /// The Prometheus text it serves.
    pub fn metrics_text(&self) -> String {
        let r = raw(
            &self.metrics,
            b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(r.status, 200, "{r:?}");
        r.body
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 answer.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// The status code; 0 when the connection closed without one.
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    /// The first header named `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `bytes` to `addr` and reads until the server closes (the request should say
/// `Connection: close`, or be one the server answers by closing): the parsed answer.
/// A chunked body is decoded.
pub fn raw(addr: &str, bytes: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    // A server may answer (431, 413) and close before it has read everything: a failed
    // write is not the test's concern, the answer is.
    let _ = s.write_all(bytes);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    parse(&buf)
}

/// Parses one HTTP/1.1 response.
pub fn parse(buf: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(buf);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Reply::default();
    };
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// The value of the Prometheus sample `name{labels}` (labels exactly as printed, e.g.
/// `service="web.shop",code="200"`), 0 when absent.
pub fn sample(metrics: &str, name: &str, labels: &str) -> f64 {
    let want = format!("{name}{{{labels}}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}
