//! The front end over TLS: a real `tide-gateway` with certificates made by `openssl`,
//! reached by `curl` and `openssl s_client`, in front of a backend the test runs.
//!
//! A certificate serves the names it lists: an alias's own certificate, a stack's
//! wildcard, and an exact certificate that wins over the wildcard for its name. h2 is
//! offered by ALPN; the backend learns `X-Forwarded-Proto: https`. A name no
//! certificate covers fails the handshake; plain HTTP on the TLS port and a client
//! that never starts its handshake are cut off while others are served. SIGHUP swaps
//! in a rotated certificate, and keeps the old set when the new one does not load.
//! Bad certificate files at start are errors naming the file.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tests::gateway::{Gateway, raw, sample};
use tests::sched::Sched;

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `openssl req` with a new P-256 key into `key` and subject `CN=cn`, writing `out`
/// (a request, or with `-x509` in `extra` a self-signed certificate).
fn req(dir: &Path, key: &str, cn: &str, out: &str, extra: &[&str]) {
    let subj = format!("/CN={cn}");
    let mut args = vec![
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
    ];
    args.extend(["-nodes", "-keyout", key, "-subj", &subj, "-out", out]);
    args.extend(extra);
    openssl(dir, &args);
}

/// A self-signed certificate with subject `CN=cn` and no SAN: `key` and `out`.
fn self_signed(dir: &Path, key: &str, cn: &str, out: &str) {
    req(dir, key, cn, out, &["-x509", "-days", "2"]);
}

/// A key and a certificate for `sans` (DNS names) with subject `CN=cn`, signed by
/// the test CA in `dir`: `name.pem` (chain) and `name.key`.
fn issue(dir: &Path, name: &str, cn: &str, sans: &[&str]) {
    let san = sans
        .iter()
        .map(|s| format!("DNS:{s}"))
        .collect::<Vec<_>>()
        .join(",");
    let (key, csr, pem, ext) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.ext"),
    );
    std::fs::write(dir.join(&ext), format!("subjectAltName={san}\n")).unwrap();
    req(dir, &key, cn, &csr, &[]);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ],
    );
}

/// `cat a b > out`.
fn concat(dir: &Path, parts: &[&str], out: &Path) {
    let mut all = Vec::new();
    for p in parts {
        all.extend(std::fs::read(dir.join(p)).unwrap());
    }
    std::fs::write(out, all).unwrap();
}

/// A backend that answers each request with its request head as the body.
fn echo_backend() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{head}",
                    head.len()
                );
            });
        }
    });
    addr
}

/// `curl` over TLS to `name` at the gateway's TLS port, trusting only the test CA.
fn curl(dir: &Path, tls: &str, name: &str, extra: &[&str]) -> Output {
    let port = tls.rsplit(':').next().unwrap();
    Command::new("curl")
        .current_dir(dir)
        .args(["-sS", "--max-time", "20", "--cacert", "ca.pem"])
        .args(["--resolve", &format!("{name}:{port}:127.0.0.1")])
        .args(["-w", "\nversion=%{http_version}"])
        .args(extra)
        .arg(format!("https://{name}:{port}/path"))
        .output()
        .expect("run curl")
}

/// The subject of the certificate served for SNI `name`.
fn subject(tls: &str, name: &str) -> String {
    let o = Command::new("openssl")
        .args(["s_client", "-connect", tls, "-servername", name])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = String::from_utf8_lossy(&o.stdout);
    text.lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or("")
        .to_string()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn certificates_by_name_h2_by_alpn_and_a_reload_on_sighup() {
    let tmp = tests::tmpdir("tide-gateway-tls");
    let t = tmp.path();
    let ca = t.join("ca");
    std::fs::create_dir(&ca).unwrap();
    self_signed(&ca, "ca.key", "tide test CA", "ca.pem");
    issue(&ca, "wild", "wildcard", &["*.shop.localhost"]);
    issue(&ca, "web", "web-exact", &["web.shop.localhost"]);
    issue(&ca, "www", "www-1", &["www.example.com", "example.com"]);
    // The wildcard: chain and key in one file. The exact one: the key in FILE.key.
    // The alias: in a directory of certificates.
    let wild = t.join("wild.pem");
    concat(&ca, &["wild.pem", "wild.key"], &wild);
    let web = t.join("web.pem");
    concat(&ca, &["web.pem"], &web);
    concat(&ca, &["web.key"], &t.join("web.pem.key"));
    let dir = t.join("certs");
    std::fs::create_dir(&dir).unwrap();
    concat(&ca, &["www.pem", "www.key"], &dir.join("www.pem"));

    let backend = echo_backend();
    let sched = Sched::start(t.join("sched"), t.join("sched.sock"), &[]);
    let addr = sched.addr();
    let mut args = vec!["--header-timeout", "2", "--tls-listen", "127.0.0.1:0"];
    let (wild_s, web_s, dir_s) = (
        wild.to_string_lossy().into_owned(),
        web.to_string_lossy().into_owned(),
        dir.to_string_lossy().into_owned(),
    );
    args.extend([
        "--tls-cert",
        &wild_s,
        "--tls-cert",
        &web_s,
        "--tls-cert",
        &dir_s,
    ]);
    let routes: Vec<String> = [
        "www.example.com",
        "web.shop.localhost",
        "api.shop.localhost",
    ]
    .iter()
    .map(|n| format!("{n}={backend}"))
    .collect();
    for r in &routes {
        args.extend(["--route", r.as_str()]);
    }
    let mut gw = Gateway::start(&addr, t.join("gateway.log"), &args);
    let tls = gw.tls.clone().expect("the gateway names its TLS address");

    // An alias with its own certificate, verified by curl against the CA: h2 by ALPN,
    // and the backend learns the request came over TLS.
    let o = curl(&ca, &tls, "www.example.com", &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("version=2"), "h2 by ALPN: {out}");
    assert!(out.contains("x-forwarded-proto: https"), "{out}");
    assert!(out.contains("proto=https"), "{out}");
    assert!(out.contains("host: www.example.com"), "{out}");
    let o = curl(&ca, &tls, "www.example.com", &["--http1.1"]);
    assert!(text(&o).contains("version=1.1"), "{}", text(&o));

    // The wildcard covers a service it does not name; the exact certificate wins for
    // its own name.
    let o = curl(&ca, &tls, "api.shop.localhost", &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(subject(&tls, "api.shop.localhost").contains("wildcard"));
    let o = curl(&ca, &tls, "web.shop.localhost", &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        subject(&tls, "web.shop.localhost").contains("web-exact"),
        "{}",
        subject(&tls, "web.shop.localhost")
    );

    // No certificate for the name: the handshake fails (curl's 35), nothing served.
    let o = curl(&ca, &tls, "nope.example.org", &[]);
    assert_eq!(o.status.code(), Some(35), "{}", text(&o));
    // A wildcard covers one label only.
    let o = curl(&ca, &tls, "a.api.shop.localhost", &[]);
    assert_eq!(o.status.code(), Some(35), "{}", text(&o));

    // Plain HTTP on the TLS port: no HTTP answer, the connection ends.
    let r = raw(
        &tls,
        b"GET / HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 0, "{r:?}");
    // A client that never starts its handshake is cut off at the header timeout,
    // while another is served meanwhile.
    let mut silent = TcpStream::connect(&tls).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let t0 = Instant::now();
    let o = curl(&ca, &tls, "www.example.com", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let mut b = [0u8; 16];
    let n = silent.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0, "the silent client is closed, not answered");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
        "closed after {waited:?} (header timeout 2 s)"
    );

    // The plain port still speaks plain HTTP, and says so to the backend.
    let r = gw.get("www.example.com", "/");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("x-forwarded-proto: http\r\n"), "{r:?}");

    let m = gw.metrics_text();
    assert!(sample(&m, "tide_gateway_tls_handshakes_total", "outcome=\"ok\"") >= 6.0);
    assert!(
        sample(
            &m,
            "tide_gateway_tls_handshakes_total",
            "outcome=\"failed\""
        ) >= 4.0
    );

    // Rotation: a new certificate for the alias, SIGHUP, new connections get it.
    issue(&ca, "www2", "www-2", &["www.example.com"]);
    concat(&ca, &["www2.pem", "www2.key"], &dir.join("www.pem"));
    hup(&gw);
    wait_log(&gw, "certificates reloaded");
    assert!(subject(&tls, "www.example.com").contains("www-2"));
    // The old certificate's second name is gone with it.
    assert_eq!(curl(&ca, &tls, "example.com", &[]).status.code(), Some(35));
    // A rotation that fails to load (a key that is not the certificate's) keeps the
    // set that serves.
    concat(&ca, &["www.pem", "www2.key"], &dir.join("www.pem"));
    hup(&gw);
    wait_log(&gw, "keeping the old certificates");
    assert!(
        gw.log_text().contains("not the certificate's"),
        "{}",
        gw.log_text()
    );
    assert!(subject(&tls, "www.example.com").contains("www-2"));
    let o = curl(&ca, &tls, "www.example.com", &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(gw.alive());
    drop(sched);
}

fn hup(gw: &Gateway) {
    let s = Command::new("kill")
        .args(["-HUP", &gw.pid().to_string()])
        .status()
        .unwrap();
    assert!(s.success());
}

fn wait_log(gw: &Gateway, what: &str) {
    let t0 = Instant::now();
    while !gw.log_text().contains(what) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no {what:?} in the log:\n{}",
            gw.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bad_certificate_files_stop_the_start_with_the_file_named() {
    let tmp = tests::tmpdir("tide-gateway-tls-bad");
    let t = tmp.path();
    self_signed(t, "ca.key", "tide test CA", "ca.pem");
    issue(t, "a", "a", &["a.example.com"]);
    issue(t, "b", "b", &["b.example.com"]);
    concat(t, &["a.pem", "b.key"], &t.join("mismatch.pem"));
    std::fs::write(t.join("garbage.pem"), "not a certificate\n").unwrap();
    concat(t, &["a.pem"], &t.join("nokey.pem"));
    // A certificate with no DNS name: a CN alone serves nothing.
    self_signed(t, "cn.key", "only.example.com", "cn.crt");
    concat(t, &["cn.crt", "cn.key"], &t.join("cnonly.pem"));
    let empty = t.join("empty");
    std::fs::create_dir(&empty).unwrap();

    for (file, why) in [
        ("missing.pem", "reading it"),
        ("garbage.pem", "no CERTIFICATE"),
        ("nokey.pem", "nokey.pem.key"),
        ("mismatch.pem", "not the certificate's"),
        ("cnonly.pem", "no DNS subject alternative name"),
        ("empty", "no *.pem"),
    ] {
        let path = t.join(file);
        let o = Command::new(tests::gateway_bin())
            .args(["--scheduler", "unix:/nonexistent/sched.sock"])
            .args(["--listen", "127.0.0.1:0", "--tls-listen", "127.0.0.1:0"])
            .arg("--tls-cert")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{file}: started");
        assert!(err.contains(file) && err.contains(why), "{file}: {err}");
    }
    // --tls-listen without a certificate is refused by the argument parser.
    let o = Command::new(tests::gateway_bin())
        .args(["--scheduler", "unix:/nonexistent/sched.sock"])
        .args(["--tls-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--tls-cert"));
}
