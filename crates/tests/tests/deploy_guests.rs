//! Instances are real VMs: `tide deploy` of a two-service stack boots QEMU guests from
//! the store (every process real: one `sched`, one `volumed --scheduler --kernel
//! --initramfs`, the guests under TCG), and the service answers through the host port
//! its host forwards.
//!
//! The image is the three Debian layers (minbase, python3, flask). `web` is a Flask app
//! given as the service's `command`: it answers with a variable of the env cascade,
//! calls `api` at the `API_HOST`/`API_PORT` it was given, and writes a file on its RWO
//! volume (`/data`) and one in its root. Then: a restart keeps the volume's file and
//! drops the root's; `tide logs` shows the app's output; a QEMU killed with -9 is seen as
//! failed; bad input (an entrypoint that does not exist, more memory than the host has)
//! is refused with a clear error and leaves no VM, attachment or mount behind; SIGTERM
//! to volumed ends its guests.
//!
//! Needs root, FUSE, `qemu-system-x86_64`, the Debian roots and the guest kernel (fetched
//! into a cache). About 60 s under TCG on two cores.

use serde_json::Value;
use tests::guest::{Kernel, guest_host_args, init_initramfs};
use tests::sched::{Sched, instances, json, tide, wait_for};
use tests::volumed::Volumed;

const STACK: &str = r#"
[stack]
name = "shop"
entrypoint = "web"

[stack.env]
GREETING = "hello from the cascade"

[volumes.data]
size = "64M"
mode = "rwo"

[services.api]
image = "shop/flask:1"
port = 8081
command = ["python3", "-c", """
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = ("pong from " + os.uname().nodename + "\\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
http.server.HTTPServer(("0.0.0.0", 8081), H).serve_forever()
"""]

[services.web]
image = "shop/flask:1"
depends_on = ["api"]
port = 8080
volumes = { data = "/data" }
command = ["python3", "-c", """
import os, urllib.request
from flask import Flask
app = Flask(__name__)
@app.route("/")
def hello():
    return os.environ.get("GREETING", "none") + " (" + os.environ.get("WHO", "?") + ")\\n"
@app.route("/api")
def api():
    url = "http://%s:%s/" % (os.environ["API_HOST"], os.environ["API_PORT"])
    return urllib.request.urlopen(url, timeout=20).read().decode()
@app.route("/write")
def write():
    with open("/data/kept.txt", "w") as f:
        f.write("kept\\n")
    with open("/root-file.txt", "w") as f:
        f.write("gone after a restart\\n")
    os.sync()
    return "written\\n"
@app.route("/read")
def read():
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\\n")
    n, errors = 0, []
    for d, _, names in os.walk("/usr/lib/python3"):
        for name in names:
            p = os.path.join(d, name)
            if os.path.islink(p):
                continue
            try:
                with open(p, "rb") as f:
                    while f.read(1 << 16):
                        pass
                n += 1
            except OSError as e:
                errors.append("%s: %s" % (p, e))
    return "files=%d errors=%d %s\\n" % (n, len(errors), errors[:3])
@app.route("/files")
def files():
    return "data=%s root=%s\\n" % (os.path.exists("/data/kept.txt"), os.path.exists("/root-file.txt"))
print("web: serving", flush=True)
app.run(host="0.0.0.0", port=8080)
"""]

[services.web.env]
WHO = "web"

# Scaled to zero: no instance until a name of it is resolved.
[services.hello]
image = "shop/flask:1"
port = 8082
command = ["python3", "-m", "http.server", "8082", "--bind", "0.0.0.0", "--directory", "/etc"]

[services.hello.instances]
min = 0
max = 1
scale_to_zero = true
"#;

/// One service on the same image: its instance converts the pool's warm VM.
const JOBS: &str = r#"
[stack]
name = "jobs"

[services.worker]
image = "shop/flask:1"
port = 8090
command = ["python3", "-m", "http.server", "8090", "--bind", "0.0.0.0", "--directory", "/etc"]
"#;

/// An entrypoint that does not exist in the image.
const MISSING: &str = r#"
[stack]
name = "broken"

[services.app]
image = "shop/flask:1"
port = 9000
command = ["/usr/bin/no-such-program"]
"#;

/// More memory than the host offers.
const HUGE: &str = r#"
[stack]
name = "huge"

[services.app]
image = "shop/flask:1"
command = ["sleep", "1000"]

[services.app.resources]
memory = "64G"
"#;

fn instance(addr: &str, service: &str) -> Value {
    instances(addr)
        .into_iter()
        .find(|i| i["service"] == service && i["stack"] == "shop")
        .unwrap_or_else(|| panic!("no {service} instance: {:?}", instances(addr)))
}

fn s(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("not a string: {v}"))
        .to_string()
}

/// GET `path` from the instance's endpoint: the body, asserting a 200.
fn get(endpoint: &str, path: &str) -> String {
    let (status, body) = tests::http_get(endpoint, path)
        .unwrap_or_else(|| panic!("GET {path} on {endpoint}: no answer"));
    assert!(status.contains("200"), "GET {path}: {status}: {body}");
    body
}

/// Every QEMU below `data` is a live instance's or a warm VM's, as the scheduler
/// lists them: nothing a failed deploy booted is left (the pool may have booted a new
/// warm VM for one a failed conversion consumed: waited for).
fn check_vms(addr: &str, data: &std::path::Path) {
    wait_for(60, "the VMs to be the scheduler's", || {
        let live = instances(addr)
            .iter()
            .filter(|i| matches!(i["guest"]["phase"].as_str(), Some("running" | "booting")))
            .count() as u64;
        let warm: u64 = json(addr, &["pool", "ls"])
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["warm"].as_u64().unwrap())
            .sum();
        let qemus = tests::guests_below(data).len() as u64;
        if qemus == live + warm {
            Ok(())
        } else {
            Err(format!(
                "{qemus} QEMUs, {live} live instances, {warm} warm VMs"
            ))
        }
    });
}

fn failed_tide(addr: &str, args: &[&str]) -> String {
    let o = tide(addr, args);
    assert!(!o.status.success(), "tide {args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn attachments(v: &Volumed) -> Vec<Value> {
    v.tide().json(&["volume", "ls"]).as_array().unwrap().clone()
}

#[test]
fn a_deployed_stack_runs_in_real_guests() {
    let tmp = tests::tmpdir("tide-deploy-guests");
    let t = tmp.path();
    let _unmount = tests::UnmountBelow(t.to_path_buf());
    let _guests = tests::KillGuestsBelow(t.to_path_buf());
    let kernel = Kernel::get();
    let initrd = init_initramfs(&kernel, &t.join("initramfs.img"));
    let sched = Sched::start(t.join("sched"), t.join("sched.sock"), &[]);
    let addr = sched.addr();
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
        ],
    );
    let data = t.join("host-a");
    let mut v = Volumed::start_with(&data, t.join("host-a.sock"), &args);
    let oci = tests::oci::debian_three_layers(t, &t.join("oci"), "shop/flask:1");
    v.tide().json(&["image", "import", &oci.to_string_lossy()]);
    wait_for(30, "the image to reach the scheduler", || {
        let h = json(&addr, &["host", "ls"]);
        let ok = h[0]["up"] == true && h[0]["hypervisors"][0] == "qemu";
        if ok { Ok(()) } else { Err(h.to_string()) }
    });
    let stack = t.join("shop.toml");
    std::fs::write(&stack, STACK).unwrap();

    // Deploy: api first (web depends on it), each answering once deploy returns.
    let started = std::time::Instant::now();
    let o = tide(&addr, &["deploy", &stack.to_string_lossy()]);
    assert!(
        o.status.success(),
        "deploy: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        v.log_text()
    );
    eprintln!("deploy took {:.1} s", started.elapsed().as_secs_f64());
    let web = instance(&addr, "web");
    let api = instance(&addr, "api");
    for i in [&web, &api] {
        assert_eq!(i["guest"]["phase"], "running", "{i}");
        assert_ne!(i["guest"]["answered"], 0, "{i}");
        assert!(
            i["endpoint"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{i}"
        );
    }
    let w = s(&web["endpoint"]);
    // The env cascade: the stack's GREETING and the service's WHO.
    assert_eq!(get(&w, "/"), "hello from the cascade (web)\n");
    // web calls api by the names it was given (API_HOST, API_PORT), through the host.
    let pong = get(&w, "/api");
    assert!(pong.starts_with("pong from api"), "{pong}");
    // The human table shows the state and the endpoint.
    let table = String::from_utf8_lossy(&tide(&addr, &["instance", "ls"]).stdout).into_owned();
    assert!(table.contains("running") && table.contains(&w), "{table}");

    // Scale to zero: resolving the name boots an instance and answers once it serves.
    assert!(instances(&addr).iter().all(|i| i["service"] != "hello"));
    let started = std::time::Instant::now();
    let r = json(&addr, &["resolve", "hello.shop.tidedge.local"]);
    eprintln!(
        "resolve from zero took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(r["started"], true, "{r}");
    assert_eq!(r["instance"]["guest"]["phase"], "running", "{r}");
    let hello = s(&r["instance"]["endpoint"]);
    let want =
        std::fs::read_to_string(tests::roots::debian_root("minbase").join("etc/debian_version"))
            .unwrap();
    assert_eq!(get(&hello, "/debian_version"), want, "answering right away");
    let again = json(&addr, &["resolve", "hello.shop.tidedge.local"]);
    assert_eq!(again["started"], false, "{again}");
    assert_eq!(again["instance"]["id"], r["instance"]["id"]);

    // Warm pools are booted guests: a deploy converts one (hot-adds the scratch,
    // forwards the port, sends the config) and the pool boots another.
    json(
        &addr,
        &[
            "pool",
            "create",
            "py",
            "--image",
            "shop/flask:1",
            "--min",
            "1",
            "--max",
            "1",
        ],
    );
    let warm = || json(&addr, &["pool", "ls"])[0]["warm"].as_u64().unwrap();
    wait_for(120, "a warm VM", || {
        if warm() == 1 {
            Ok(())
        } else {
            Err("none".into())
        }
    });
    let jobs = t.join("jobs.toml");
    std::fs::write(&jobs, JOBS).unwrap();
    let started = std::time::Instant::now();
    let d = json(&addr, &["deploy", &jobs.to_string_lossy()]);
    eprintln!(
        "deploy from a warm VM took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let placed = &d["placed"][0];
    assert_ne!(placed["instance"]["warm_vm"], "", "{d}");
    let worker = instances(&addr)
        .into_iter()
        .find(|i| i["stack"] == "jobs")
        .unwrap();
    assert_eq!(worker["guest"]["phase"], "running", "{worker}");
    assert_eq!(
        get(&s(&worker["endpoint"]), "/debian_version"),
        want,
        "the converted VM serves"
    );
    let wlog =
        String::from_utf8_lossy(&tide(&addr, &["logs", &s(&worker["id"])]).stdout).into_owned();
    assert!(
        wlog.contains("[tide] converted: 1 disk(s) hot-added"),
        "{wlog}"
    );
    wait_for(120, "the pool to be refilled", || {
        if warm() == 1 {
            Ok(())
        } else {
            Err("none".into())
        }
    });

    // The volume keeps what the app wrote across a restart; the root does not.
    assert_eq!(get(&w, "/write"), "written\n");
    assert_eq!(get(&w, "/files"), "data=True root=True\n");
    let web_id = s(&web["id"]);
    let r = json(&addr, &["instance", "restart", &web_id]);
    assert_eq!(r["guest"]["phase"], "running", "{r}");
    assert_eq!(r["guest"]["restarts"], 1, "{r}");
    assert_eq!(s(&r["endpoint"]), w, "a restart keeps the host port");
    assert_eq!(get(&w, "/files"), "data=True root=False\n");

    // Logs: the host's lifecycle lines and the app's own output, across the restart.
    let logs = String::from_utf8_lossy(&tide(&addr, &["logs", &web_id]).stdout).into_owned();
    assert_eq!(logs.matches("[tide] app started").count(), 2, "{logs}");
    assert!(logs.contains("web: serving"), "{logs}");
    assert!(logs.contains("GET /files"), "flask's request log: {logs}");
    let console =
        String::from_utf8_lossy(&tide(&addr, &["logs", "--console", &web_id]).stdout).into_owned();
    assert!(
        console.contains("SeaBIOS"),
        "the VM's serial console: {console}"
    );

    // volumed killed with -9 while the guest reads its root: the guest rides it out
    // (QEMU's NBD client reconnects) and the restarted volumed adopts it.
    let reader = {
        let w = w.clone();
        std::thread::spawn(move || get(&w, "/read"))
    };
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let web_pid = json(&addr, &["instance", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["service"] == "web")
        .map(|i| i["guest"]["pid"].clone())
        .unwrap();
    assert!(
        !reader.is_finished(),
        "the guest is still reading when volumed dies"
    );
    v.signal_and_wait(libc::SIGKILL);
    v = Volumed::start_with(&data, t.join("host-a.sock"), &args);
    let read = reader.join().unwrap();
    assert!(
        read.starts_with("files=") && read.contains(" errors=0 "),
        "{read}"
    );
    let files: u64 = read["files=".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(files > 500, "{read}");
    assert!(
        v.log_text()
            .contains(&format!("{web_id}: adopted its running guest")),
        "{}",
        v.log_text()
    );
    wait_for(30, "web to be reported running again", || {
        let i = instance(&addr, "web");
        let ok = i["guest"]["phase"] == "running" && i["guest"]["pid"] == web_pid;
        if ok { Ok(()) } else { Err(i.to_string()) }
    });
    assert_eq!(get(&w, "/files"), "data=True root=False\n");

    // A QEMU killed with -9: the instance is failed, and the scheduler knows.
    let api_pid = api["guest"]["pid"].as_u64().unwrap() as i32;
    assert!(tests::guests_below(&data).contains(&(api_pid as u32)));
    // SAFETY: kill(2) of a QEMU our volumed launched (its pid as reported).
    assert_eq!(unsafe { libc::kill(api_pid, libc::SIGKILL) }, 0);
    let failed = wait_for(30, "api to be failed", || {
        let i = instance(&addr, "api");
        if i["guest"]["phase"] == "failed" {
            Ok(i)
        } else {
            Err(i.to_string())
        }
    });
    let reason = s(&failed["guest"]["reason"]);
    // Adopted after volumed's restart, its QEMU is no child of this volumed: the
    // status went to init, the end is seen all the same.
    assert!(reason.contains("its VM ended"), "{reason}");

    // Bad input: a program that does not exist.
    let bad = t.join("broken.toml");
    std::fs::write(&bad, MISSING).unwrap();
    let e = failed_tide(&addr, &["deploy", &bad.to_string_lossy()]);
    assert!(
        e.contains("app.broken-0") && e.contains("/usr/bin/no-such-program"),
        "{e}"
    );
    check_vms(&addr, &data);
    assert!(!data.join("instances/app.broken-0").exists());
    assert!(
        !data.join("vms/app.broken-0").exists()
            || !data.join("vms/app.broken-0/run/qmp.sock").exists()
    );
    let held: Vec<String> = attachments(&v)
        .iter()
        .filter(|a| a["name"].as_str().is_some_and(|n| n.contains("broken")))
        .map(|a| a.to_string())
        .collect();
    assert!(held.is_empty(), "{held:?}");
    assert!(
        !tests::mounts_below(&data)
            .iter()
            .any(|m| m.contains("broken")),
        "{:?}",
        tests::mounts_below(&data)
    );
    // Bad input: more memory than any host has.
    let huge = t.join("huge.toml");
    std::fs::write(&huge, HUGE).unwrap();
    let e = failed_tide(&addr, &["deploy", &huge.to_string_lossy()]);
    assert!(e.contains("memory"), "{e}");
    check_vms(&addr, &data);

    // volumed's shutdown ends its guests.
    let st = v.signal_and_wait(libc::SIGTERM);
    assert!(st.success(), "{st}");
    wait_for(20, "every guest to end", || {
        let left = tests::guests_below(&data);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });
}
