//! The front end against bad input and a scheduler that goes away, with no guests: a
//! real `sched` and a real `tide-gateway` over real sockets.
//!
//! Malformed request lines, a 1 MiB head, a body over the limit, no Host, an unknown
//! Host each get their status code; forty slowloris clients are cut off at the header
//! timeout while another client is answered at once; a service that cannot start
//! (no host to boot it on) gets 503 with the scheduler's reason. Routes are pushed: an
//! alias added with `tide` is known to the front end without a request to the
//! scheduler; with the scheduler killed, the front end keeps its last table, and it
//! reconnects when the scheduler is back.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tests::gateway::{Gateway, raw, sample};
use tests::sched::{Sched, tide, wait_for};

const STACK: &str = r#"
[stack]
name = "shop"
domain = "localhost"
entrypoint = "web"

[services.web]
image = "shop/flask:1"
port = 8080

[services.web.instances]
min = 0
max = 2
scale_to_zero = true
"#;

#[test]
fn bad_requests_get_their_status_and_the_front_end_keeps_serving() {
    let tmp = tests::tmpdir("tide-gateway-bad");
    let t = tmp.path();
    let mut sched = Sched::start(t.join("sched"), t.join("sched.sock"), &[]);
    let addr = sched.addr();
    let stack = t.join("shop.toml");
    std::fs::write(&stack, STACK).unwrap();
    let o = tide(&addr, &["deploy", &stack.to_string_lossy()]);
    assert!(
        o.status.success(),
        "deploy: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut gw = Gateway::start(
        &addr,
        t.join("gateway.log"),
        &[
            "--header-timeout",
            "2",
            "--max-body-bytes",
            "1000",
            "--start-timeout",
            "20",
        ],
    );

    // An unknown name: 404 naming it (port and case do not matter).
    let r = gw.get("Nope.Shop.LocalHost:8080", "/");
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.body.contains("nope.shop.localhost"), "{r:?}");

    // No Host at all (HTTP/1.0 allows that): 400.
    let r = raw(&gw.addr, b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("no Host"), "{r:?}");

    // Malformed request lines: 400 from the HTTP parser, or the connection closed.
    for bad in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\nHost: web.shop.localhost\r\n\r\n",
        b"GET\x00/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost web.shop.localhost\r\n\r\n",
    ] {
        let r = raw(&gw.addr, bad);
        assert!(
            r.status == 400 || r.status == 0,
            "{:?}: {r:?}",
            String::from_utf8_lossy(bad)
        );
    }

    // A 1 MiB head: 431 (the limit is 64 KiB by default).
    let mut big = b"GET / HTTP/1.1\r\nHost: web.shop.localhost\r\n".to_vec();
    for i in 0..1024 {
        big.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "a".repeat(1000)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    let r = raw(&gw.addr, &big);
    assert_eq!(r.status, 431, "{:?}", r.status);

    // A declared body over --max-body-bytes: 413 before anything is forwarded.
    let r = raw(
        &gw.addr,
        b"POST / HTTP/1.1\r\nHost: web.shop.localhost\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 413, "{r:?}");
    assert!(r.body.contains("1000 bytes"), "{r:?}");

    // Slowloris: forty clients that send a head a byte at a time. Another client is
    // answered at once; the slow ones are cut off at the two-second header timeout.
    let started = Instant::now();
    let slow: Vec<_> = (0..40)
        .map(|_| {
            let a = gw.addr.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(&a).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                let head = b"GET / HTTP/1.1\r\nHost: web.shop.localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
                let t0 = Instant::now();
                for b in head {
                    if s.write_all(&[*b]).is_err() {
                        return t0.elapsed();
                    }
                    let mut buf = [0u8; 512];
                    match s.read(&mut buf) {
                        // Closed, or answered (408): the server gave up on us.
                        Ok(_) => return t0.elapsed(),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => return t0.elapsed(),
                    }
                }
                panic!("the whole slow head was accepted ({:?})", t0.elapsed());
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let r = gw.get("other.shop.localhost", "/");
    assert_eq!(r.status, 404, "{r:?}");
    let other = t0.elapsed();
    for h in slow {
        let cut = h.join().unwrap();
        assert!(
            cut >= Duration::from_millis(1500) && cut < Duration::from_secs(10),
            "a slow client was cut off after {cut:?}"
        );
    }
    eprintln!(
        "another client answered in {other:?} while forty slow ones were held (all cut off after {:?})",
        started.elapsed()
    );
    assert!(
        other < Duration::from_secs(1),
        "another client waited {other:?} behind the slow ones"
    );

    // A scaled-to-zero service no host can start: 503 with the scheduler's reason.
    let r = gw.get("web.shop.localhost", "/");
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.body
            .contains("web.shop.localhost: no instance could start"),
        "{r:?}"
    );
    let m = gw.metrics_text();
    assert_eq!(
        sample(
            &m,
            "tide_gateway_requests_total",
            "service=\"web.shop\",code=\"5xx\""
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "tide_gateway_cold_start_failures_total",
            "service=\"web.shop\""
        ),
        1.0,
        "{m}"
    );
    // The two 404s, the 400 for no Host and the 413 reached the router; what the HTTP
    // parser refused (malformed lines, the 1 MiB head) never became a request.
    assert_eq!(
        sample(
            &m,
            "tide_gateway_requests_total",
            "service=\"-\",code=\"4xx\""
        ),
        4.0,
        "{m}"
    );

    // Routes are pushed: an alias added now answers (503, it is web's) without the
    // front end asking.
    assert_eq!(gw.get("www.example.com", "/").status, 404);
    let o = tide(&addr, &["alias", "add", "www.example.com", "web.shop"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_for(10, "the alias to reach the front end", || {
        let r = gw.get("www.example.com", "/");
        if r.status == 503 {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });

    // The scheduler away: the last table still routes (a known name is not a 404),
    // starts fail at once with a reason, and the link comes back with the scheduler.
    sched.kill9();
    let r = gw.get("www.example.com", "/");
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("scheduler"), "{r:?}");
    assert_eq!(gw.get("nope.shop.localhost", "/").status, 404);
    sched.restart();
    wait_for(20, "the front end to reconnect", || {
        let n = gw.log_text().matches("scheduler link up").count();
        if n >= 2 {
            Ok(())
        } else {
            Err(format!("{n} links"))
        }
    });
    assert!(gw.alive(), "{}", gw.log_text());
}
