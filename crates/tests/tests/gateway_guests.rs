//! The front end in front of real guests: one `sched`, one `volumed` booting QEMU
//! guests under TCG, one `tide-gateway` started before anything is deployed (it learns
//! every route from the scheduler's pushes), and `curl` as the client.
//!
//! `web.shop.localhost` reaches the Flask service (HTTP/1.1 and h2c); the variant
//! `pr-1` overrides `web` (it answers differently) and shares `api` (its name answers
//! from the parent's instance); an alias reaches `web`; the app sees `X-Forwarded-*`,
//! `Forwarded` and the original Host; a body over the limit is refused mid-stream with
//! 413; an HTTP/1.1 upgrade passes through both ways; twenty concurrent first requests
//! to a scaled-to-zero service are all answered by the one instance one start booted;
//! slow clients do not hold up the others; load above `web`'s concurrency target
//! scales it out to `max` (both instances answer) and back in after the quiet period;
//! the idle scale-to-zero service is stopped and starts again on the next request.
//!
//! Needs root, FUSE, `qemu-system-x86_64`, `curl`, the Debian roots and the guest
//! kernel. About 90 s under TCG on two cores.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::gateway::{Gateway, Reply, raw, sample};
use tests::guest::{Kernel, guest_host_args, init_initramfs};
use tests::sched::{Sched, instances, json, tide, wait_for, wait_host_up};
use tests::volumed::Volumed;

const STACK: &str = r#"
[stack]
name = "shop"
domain = "localhost"
entrypoint = "web"

[stack.env]
GREETING = "hello"

[services.api]
image = "shop/flask:1"
port = 8081
command = ["python3", "-c", """
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/ws" and self.headers.get("Upgrade") == "echo":
            self.send_response(101)
            self.send_header("Upgrade", "echo")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            while True:
                line = self.rfile.readline()
                if not line:
                    break
                self.wfile.write(b"echo: " + line)
                self.wfile.flush()
            self.close_connection = True
            return
        b = ("pong from " + os.uname().nodename + "\\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
http.server.ThreadingHTTPServer(("0.0.0.0", 8081), H).serve_forever()
"""]

[services.web]
image = "shop/flask:1"
port = 8080
command = ["python3", "-c", """
import os, time
from flask import Flask, request
app = Flask(__name__)
@app.route("/")
def hello():
    return os.environ.get("GREETING", "none") + " (" + os.environ.get("WHO", "?") + ")\\n"
@app.route("/headers")
def headers():
    h = request.headers
    return "host=%s xff=%s xfh=%s xfp=%s fwd=%s conn=%s\\n" % (
        h.get("Host"), h.get("X-Forwarded-For"), h.get("X-Forwarded-Host"),
        h.get("X-Forwarded-Proto"), h.get("Forwarded"), h.get("X-Secret"))
@app.route("/slow")
def slow():
    time.sleep(1)
    return os.uname().nodename + "\\n"
@app.route("/echo", methods=["POST"])
def echo():
    n = 0
    while True:
        b = request.stream.read(65536)
        if not b:
            break
        n += len(b)
    return "read %d bytes\\n" % n
app.run(host="0.0.0.0", port=8080, threaded=True)
"""]

[services.web.env]
WHO = "web"

# Scaled on load: a second instance when more than two requests per instance are in
# flight, stopped again after five quiet seconds.
[services.web.instances]
min = 1
max = 2
concurrency = 2
scale_in_after = "5s"

# Scaled to zero: no instance until a request comes.
[services.hello]
image = "shop/flask:1"
port = 8082
# `python3 -m http.server` with a listen backlog of 128, not socketserver's 5: twenty
# connections arriving at once through QEMU's user network would otherwise overflow it,
# and a connection slirp has accepted on the host side can then wait a minute or more
# for its retransmitted SYN inside the guest.
command = ["python3", "-c", """
import functools, http.server as h
h.ThreadingHTTPServer.request_queue_size = 128
handler = functools.partial(h.SimpleHTTPRequestHandler, directory="/etc")
h.ThreadingHTTPServer(("0.0.0.0", 8082), handler).serve_forever()
"""]

[services.hello.instances]
min = 0
max = 1
scale_to_zero = true
idle = "15s"

[variants.pr-1.services.web]
env = { WHO = "preview" }

[variants.pr-1.services.web.instances]
min = 0
max = 1
scale_to_zero = true

[aliases]
"www.example.com" = "web.shop"
"#;

/// Clients each sending `GET /slow` to web (one second to answer) one after another
/// until stopped, keeping every reply.
struct SlowLoad {
    stop: Arc<AtomicBool>,
    replies: Arc<Mutex<Vec<Reply>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl SlowLoad {
    fn start(addr: &str, clients: usize) -> SlowLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let replies = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (a, stop, replies) = (addr.to_owned(), stop.clone(), replies.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let r = raw(
                            &a,
                            b"GET /slow HTTP/1.1\r\nHost: web.shop.localhost\r\nConnection: close\r\n\r\n",
                        );
                        replies.lock().unwrap().push(r);
                    }
                })
            })
            .collect();
        SlowLoad {
            stop,
            replies,
            threads,
        }
    }

    /// The instances that answered so far (the app's body names its instance).
    fn answered_by(&self) -> BTreeSet<String> {
        self.replies
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.status == 200)
            .map(|r| r.body.trim().to_string())
            .collect()
    }

    /// Stops the clients once their requests are answered: every reply.
    fn stop(self) -> Vec<Reply> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        self.replies.lock().unwrap().clone()
    }
}

/// `curl -sS ARGS URL` through the gateway: (status, body).
fn curl(gw: &Gateway, host: &str, path: &str, extra: &[&str]) -> (u16, String) {
    let o = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "300",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
        ])
        .args(["-H", &format!("Host: {host}")])
        .args(extra)
        .arg(format!("http://{}{path}", gw.addr))
        .output()
        .expect("run curl (is it installed? .ci/run installs it)");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    let code = code.trim().parse().unwrap_or_else(|_| {
        panic!(
            "curl {host}{path}: {out}\n{}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (code, body.to_string())
}

fn ok(gw: &Gateway, host: &str, path: &str) -> String {
    let (code, body) = curl(gw, host, path, &[]);
    assert_eq!(code, 200, "{host}{path}: {body}\n{}", gw.log_text());
    body
}

#[test]
fn the_front_end_routes_names_to_real_guests() {
    let tmp = tests::tmpdir("tide-gateway-guests");
    let t = tmp.path();
    let _unmount = tests::UnmountBelow(t.to_path_buf());
    let _guests = tests::KillGuestsBelow(t.to_path_buf());
    let kernel = Kernel::get();
    let initrd = init_initramfs(&kernel, &t.join("initramfs.img"));
    let sched = Sched::start(t.join("sched"), t.join("sched.sock"), &[]);
    let addr = sched.addr();
    let gw = Gateway::start(
        &addr,
        t.join("gateway.log"),
        &["--max-body-bytes", "1000000", "--header-timeout", "3"],
    );
    let args = guest_host_args(
        &addr,
        &kernel,
        &initrd,
        &[
            "--host-id",
            "host-a",
            "--memory",
            "4G",
            "--boot-timeout",
            "240",
            // The default is vhost-user (deploy_guests runs on it): here the guests
            // reach their disks over NBD, so both transports boot real services.
            "--disk-transport",
            "nbd",
        ],
    );
    let v = Volumed::start_with(t.join("host-a"), t.join("host-a.sock"), &args);
    let oci = tests::oci::debian_three_layers(t, &t.join("oci"), "shop/flask:1");
    v.tide().json(&["image", "import", &oci.to_string_lossy()]);
    wait_host_up(&addr);
    let stack = t.join("shop.toml");
    std::fs::write(&stack, STACK).unwrap();
    let o = tide(&addr, &["deploy", &stack.to_string_lossy()]);
    assert!(
        o.status.success(),
        "deploy: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        v.log_text()
    );
    let o = tide(
        &addr,
        &["deploy", &stack.to_string_lossy(), "--variant", "pr-1"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // By name, as a user's DNS would send it: the service, the stack's entrypoint, an
    // alias; HTTP/1.1 and h2c. The gateway never asked: the routes were pushed.
    assert_eq!(ok(&gw, "web.shop.localhost", "/"), "hello (web)\n");
    assert_eq!(ok(&gw, "shop.localhost", "/"), "hello (web)\n");
    assert_eq!(ok(&gw, "WWW.example.com:8080", "/"), "hello (web)\n");
    let (code, body) = curl(&gw, "web.shop.localhost", "/", &["--http2-prior-knowledge"]);
    assert_eq!((code, body.as_str()), (200, "hello (web)\n"), "h2c");
    let pong = ok(&gw, "api.shop.localhost", "/");
    assert!(pong.starts_with("pong from api"), "{pong}");

    // The variant: its own web (booted from zero on this request) answers differently;
    // its api is SHARED, so its name answers from the parent's instance.
    assert_eq!(
        ok(&gw, "web.shop--pr-1.localhost", "/"),
        "hello (preview)\n"
    );
    assert_eq!(ok(&gw, "api.shop--pr-1.localhost", "/"), pong);
    assert_eq!(
        instances(&addr)
            .iter()
            .filter(|i| i["service"] == "api")
            .count(),
        1
    );

    // What the app sees: the original Host, the client in X-Forwarded-For (appended to
    // what came before), and hop-by-hop headers (and those Connection names) removed.
    let (code, seen) = curl(
        &gw,
        "web.shop.localhost",
        "/headers",
        &[
            "-H",
            "X-Forwarded-For: 203.0.113.9",
            "-H",
            "Connection: keep-alive, X-Secret",
            "-H",
            "X-Secret: s3cret",
        ],
    );
    assert_eq!(code, 200);
    assert_eq!(
        seen,
        "host=web.shop.localhost xff=203.0.113.9, 127.0.0.1 xfh=web.shop.localhost \
         xfp=http fwd=for=127.0.0.1;host=\"web.shop.localhost\";proto=http conn=None\n"
    );

    // Bodies stream through; one over the limit, sent chunked (no length to refuse it
    // by up front), is cut off with 413.
    let body = t.join("body");
    std::fs::write(&body, vec![b'x'; 900_000]).unwrap();
    let at = format!("@{}", body.display());
    let (code, read) = curl(
        &gw,
        "web.shop.localhost",
        "/echo",
        &["--data-binary", &at, "-H", "Transfer-Encoding: chunked"],
    );
    assert_eq!((code, read.as_str()), (200, "read 900000 bytes\n"));
    std::fs::write(&body, vec![b'x'; 3_000_000]).unwrap();
    let (code, read) = curl(
        &gw,
        "web.shop.localhost",
        "/echo",
        &["--data-binary", &at, "-H", "Transfer-Encoding: chunked"],
    );
    assert_eq!(code, 413, "{read}");

    // An HTTP/1.1 upgrade passes through: bytes both ways after the 101.
    let mut s = TcpStream::connect(&gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: api.shop.localhost\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        if l == "\r\n" {
            break;
        }
    }
    for msg in ["one\n", "two\n"] {
        s.write_all(msg.as_bytes()).unwrap();
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert_eq!(l, format!("echo: {msg}"));
    }
    drop((r, s));

    // Scale from zero: twenty concurrent first requests share one start and are all
    // answered by its instance.
    assert!(instances(&addr).iter().all(|i| i["service"] != "hello"));
    let want =
        std::fs::read_to_string(tests::roots::debian_root("minbase").join("etc/debian_version"))
            .unwrap();
    let t0 = Instant::now();
    let reqs: Vec<_> = (0..20)
        .map(|_| {
            let a = gw.addr.clone();
            std::thread::spawn(move || {
                let r = raw(
                    &a,
                    b"GET /debian_version HTTP/1.1\r\nHost: hello.shop.localhost\r\nConnection: close\r\n\r\n",
                );
                (r, t0.elapsed())
            })
        })
        .collect();
    let mut took = Vec::new();
    for h in reqs {
        let (r, d) = h.join().unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, want.as_str()), "{r:?}");
        took.push(d);
    }
    eprintln!(
        "20 first requests to a scaled-to-zero service answered in {:.2}..{:.2} s",
        took.iter().min().unwrap().as_secs_f64(),
        took.iter().max().unwrap().as_secs_f64()
    );
    let hello: Vec<Value> = instances(&addr)
        .into_iter()
        .filter(|i| i["service"] == "hello")
        .collect();
    assert_eq!(hello.len(), 1, "{hello:?}");
    let m = gw.metrics_text();
    assert_eq!(
        sample(
            &m,
            "tide_gateway_cold_start_seconds_count",
            "service=\"hello.shop\""
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "tide_gateway_requests_total",
            "service=\"hello.shop\",code=\"2xx\""
        ),
        20.0,
        "{m}"
    );
    let starts = gw
        .log_text()
        .matches("hello.shop.localhost: instance")
        .count();
    assert_eq!(starts, 1, "{}", gw.log_text());

    // Slow clients (heads never finished) do not hold up the others.
    let slow: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(&gw.addr).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: web.shop.localhost\r\nX-Slow: a")
                .unwrap();
            s
        })
        .collect();
    let t0 = Instant::now();
    assert_eq!(ok(&gw, "web.shop.localhost", "/"), "hello (web)\n");
    eprintln!("answered in {:?} beside 20 slow clients", t0.elapsed());
    for mut s in slow {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }

    let m = gw.metrics_text();
    assert!(
        sample(
            &m,
            "tide_gateway_requests_total",
            "service=\"web.shop\",code=\"2xx\""
        ) >= 7.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "tide_gateway_requests_total",
            "service=\"web.shop\",code=\"4xx\""
        ),
        1.0,
        "{m}"
    );

    // Scale out on load: eight clients, each keeping a one-second request in flight,
    // are four per instance against a target of two: the scheduler starts a second
    // instance (max 2) and the gateway balances onto it.
    let web_count = || {
        instances(&addr)
            .iter()
            .filter(|i| i["stack"] == "shop" && i["service"] == "web" && i["variant"] == "")
            .count()
    };
    assert_eq!(web_count(), 1);
    let load = SlowLoad::start(&gw.addr, 8);
    let t0 = Instant::now();
    wait_for(
        240,
        "web to scale out to 2 instances, both answering",
        || {
            let names = load.answered_by();
            if web_count() == 2 && names.len() == 2 {
                Ok(())
            } else {
                Err(format!("{} instances, answers from {names:?}", web_count()))
            }
        },
    );
    eprintln!("scaled out in {:.1} s", t0.elapsed().as_secs_f64());
    for r in load.stop() {
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert!(
        sched
            .log_text()
            .contains("autoscale: web.shop: 1 instance(s)"),
        "{}",
        sched.log_text()
    );
    // Lighter: two clients keep a one-second request each in flight, which one
    // instance carries (target two), so after scale_in_after one instance is stopped.
    // It is drained first: out of the routes, stopped once its requests are answered,
    // so every request of the two clients gets its 200, none a 502 cut off mid-way.
    let light = SlowLoad::start(&gw.addr, 2);
    let t0 = Instant::now();
    wait_for(60, "web to scale back in to 1", || {
        if web_count() == 1 {
            Ok(())
        } else {
            Err(format!("{} instances", web_count()))
        }
    });
    eprintln!(
        "scaled in {:.1} s after the load dropped",
        t0.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(2));
    let statuses: Vec<u16> = light.stop().iter().map(|r| r.status).collect();
    assert!(statuses.len() >= 8, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200),
        "requests during the scale-in: {statuses:?}"
    );
    let log = sched.log_text();
    assert!(log.contains("drained in"), "{log}");
    assert_eq!(ok(&gw, "web.shop.localhost", "/"), "hello (web)\n");

    // Scale to zero: hello had no request for its idle time (15 s): stopped; the next
    // request starts it again.
    wait_for(90, "hello to be stopped when idle", || {
        let n = instances(&addr)
            .iter()
            .filter(|i| i["service"] == "hello")
            .count();
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} instances"))
        }
    });
    assert!(tests::guests_below(t).len() >= 2);
    let r = gw.get("hello.shop.localhost", "/debian_version");
    assert_eq!((r.status, r.body.as_str()), (200, want.as_str()), "{r:?}");
    let m = gw.metrics_text();
    assert_eq!(
        sample(
            &m,
            "tide_gateway_cold_start_seconds_count",
            "service=\"hello.shop\""
        ),
        2.0,
        "{m}"
    );

    // `tide service ls` shows the same: the scheduler's view (names, bounds, serving
    // instances) and the gateway's counts.
    let rows = json(&addr, &["service", "ls", "--gateway", &gw.metrics]);
    let row = |key: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["key"] == key)
            .unwrap_or_else(|| panic!("no {key}: {rows}"))
            .clone()
    };
    let hello = row("hello.shop");
    assert_eq!(hello["scale_to_zero"], true, "{hello}");
    assert_eq!(hello["serving"], 1, "{hello}");
    assert_eq!(hello["traffic"]["cold_starts"], 2, "{hello}");
    assert_eq!(hello["traffic"]["requests"], 21, "{hello}");
    let web = row("web.shop");
    assert_eq!(
        (web["min"].as_u64(), web["max"].as_u64()),
        (Some(1), Some(2))
    );
    assert!(
        web["names"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "www.example.com"),
        "{web}"
    );
    assert_eq!(
        row("api.shop")["names"].as_array().unwrap().len(),
        2,
        "api.shop.localhost and the variant's shared api.shop--pr-1.localhost"
    );
    let human =
        String::from_utf8_lossy(&tide(&addr, &["service", "ls", "--gateway", &gw.metrics]).stdout)
            .into_owned();
    assert!(
        human.contains("COLD STARTS") && human.contains("hello.shop"),
        "{human}"
    );
}
