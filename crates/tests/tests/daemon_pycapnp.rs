//! A client someone else wrote speaks our schema: pycapnp loads `store.capnp` as it is
//! in the repository and calls `Daemon.store().images()` on a real daemon.
//!
//! The Python interpreter with pycapnp is [`tests::python`]: `$TIDEDGE_PYTHON`, else the virtualenv
//! `.ci/run` creates (`/var/tmp/tidedge-pyenv`); without it the test fails and says how
//! to install it.

use tests::fixture;
use tests::volumed::Volumed;

const CLIENT: &str = r#"
import asyncio, sys
import capnp

schema = capnp.load(sys.argv[1])

async def main():
    stream = await capnp.AsyncIoStream.create_unix_connection(sys.argv[2])
    daemon = capnp.TwoPartyClient(stream).bootstrap().cast_as(schema.Daemon)
    v = await daemon.version()
    print("version", v.version, schema.version)
    store = (await daemon.store()).store
    for i in (await store.images()).images:
        print("image", i.name, i.digest, i.layers, i.size)
    try:
        await store.inspect("nope:1")
        print("no error")
    except capnp.KjException as e:
        print("error", e.description)

asyncio.run(capnp.run(main()))
"#;

#[test]
fn pycapnp_lists_images_from_the_schema_file_alone() {
    let tmp = tests::tmpdir("tide-pycapnp");
    let src = tmp.path().join("src");
    fixture::build(&src);
    let daemon = Volumed::start(tmp.path().join("data"), tmp.path().join("v.sock"));
    let r = daemon
        .tide()
        .json(&["image", "import", src.to_str().unwrap(), "--name", "py:1"]);
    let out = tests::run_python_client(CLIENT, "store.capnp", &[&daemon.socket]);
    assert!(out.contains("version 1 1"), "{out}");
    let ls = daemon.tide().json(&["image", "ls"]);
    let want = format!(
        "image py:1 {} {} {}",
        r["image"].as_str().unwrap(),
        ls[0]["layers"],
        ls[0]["size"]
    );
    assert!(out.contains(&want), "want {want:?} in:\n{out}");
    assert!(out.contains("error") && out.contains("nope:1"), "{out}");
}

/// The numbers after a client's output line's first word.
fn numbers(line: &str) -> Vec<u64> {
    line.split_whitespace()
        .skip(1)
        .map(|n| n.parse().unwrap())
        .collect()
}

/// The numbers of every output line starting with `tag`, in order.
fn tagged(out: &str, tag: &str) -> Vec<Vec<u64>> {
    out.lines()
        .filter(|l| l.starts_with(tag))
        .map(numbers)
        .collect()
}

const PROGRESS_CLIENT: &str = r#"
import asyncio, sys
import capnp

schema = capnp.load(sys.argv[1])

class Sink(schema.ImportProgress.Server):
    def __init__(self):
        self.calls = []
    async def update(self, files, bytes, bytesTotal, **kwargs):
        self.calls.append((files, bytes, bytesTotal))

async def main():
    stream = await capnp.AsyncIoStream.create_unix_connection(sys.argv[2])
    daemon = capnp.TwoPartyClient(stream).bootstrap().cast_as(schema.Daemon)
    store = (await daemon.store()).store
    sink = Sink()
    r = (await store.importLayer(sys.argv[3], "auto", sink)).report
    print("report", r.files, r.logicalBytes)
    print("calls", len(sink.calls))
    for c in sink.calls:
        print("call", *c)
    # A client written before `progress` existed sends none; the import still works.
    r = (await store.importLayer(sys.argv[3], "auto")).report
    print("plain", r.files)

asyncio.run(capnp.run(main()))
"#;

#[test]
fn an_import_over_the_socket_reports_progress_to_a_client_capability() {
    let tmp = tests::tmpdir("tide-pycapnp-progress");
    let src = tests::roots::ensure_debian_root("minbase").expect("minbase root");
    let daemon = Volumed::start(tmp.path().join("data"), tmp.path().join("v.sock"));
    let out = tests::run_python_client(
        PROGRESS_CLIENT,
        "store.capnp",
        &[daemon.socket.as_os_str(), src.as_os_str()],
    );
    let report = numbers(out.lines().find(|l| l.starts_with("report ")).unwrap());
    let calls = tagged(&out, "call ");
    // minbase takes seconds to import: reports every 200 ms, then a last one.
    assert!(calls.len() >= 2, "{out}");
    for w in calls.windows(2) {
        assert!(w[0][0] <= w[1][0] && w[0][1] <= w[1][1], "went back: {out}");
    }
    let last = calls.last().unwrap();
    assert_eq!(
        last[0], report[0],
        "the last report counts every file: {out}"
    );
    assert_eq!(last[1], report[1], "and every byte: {out}");
    assert!(last[2] >= last[1], "{out}");
    assert!(out.contains(&format!("plain {}", report[0])), "{out}");
}

const TRANSFER_CLIENT: &str = r#"
import asyncio, sys
import capnp

schema = capnp.load(sys.argv[1])

class Sink(schema.TransferProgress.Server):
    def __init__(self):
        self.calls = []
    async def update(self, done, objects, bytes, **kwargs):
        self.calls.append((done, objects, bytes))

async def main():
    stream = await capnp.AsyncIoStream.create_unix_connection(sys.argv[2])
    daemon = capnp.TwoPartyClient(stream).bootstrap().cast_as(schema.Daemon)
    store = (await daemon.store()).store
    sink = Sink()
    r = (await store.pushImage(sys.argv[3], sink)).report
    print("report", r.objects, r.transferred, r.bytes)
    for c in sink.calls:
        print("call", *c)
    vols = (await daemon.volumes()).volumes
    await vols.create("v", 1 << 20, "rwo", 0, 0)
    vsink = Sink()
    v = (await vols.push("v", "", vsink)).report
    print("volume", v.snapshot, v.chunks)
    for c in vsink.calls:
        print("vcall", *c)

asyncio.run(capnp.run(main()))
"#;

#[test]
fn a_push_over_the_socket_reports_progress_to_a_client_capability() {
    let tmp = tests::tmpdir("tide-pycapnp-push");
    let src = tests::roots::ensure_debian_root("minbase").expect("minbase root");
    let tier = format!("file://{}", tmp.path().join("tier").display());
    // Imported before the daemon has a tier, so nothing is published in the background:
    // the push below sends everything.
    let plain = Volumed::start(tmp.path().join("data"), tmp.path().join("v.sock"));
    let r = plain
        .tide()
        .json(&["image", "import", src.to_str().unwrap(), "--name", "deb:12"]);
    let image = r["image"].as_str().unwrap().to_string();
    drop(plain);
    let daemon = Volumed::start_with(
        tmp.path().join("data"),
        tmp.path().join("v.sock"),
        &["--tier".to_string(), tier],
    );
    let out = tests::run_python_client(
        TRANSFER_CLIENT,
        "store.capnp",
        &[daemon.socket.as_os_str(), std::ffi::OsStr::new(&image)],
    );
    let report = numbers(out.lines().find(|l| l.starts_with("report ")).unwrap());
    let calls = tagged(&out, "call ");
    assert!(report[1] > 1000, "minbase is thousands of objects: {out}");
    assert!(!calls.is_empty(), "{out}");
    for w in calls.windows(2) {
        assert!(w[0][0] <= w[1][0] && w[0][2] <= w[1][2], "went back: {out}");
    }
    let last = calls.last().unwrap();
    assert_eq!(
        last[0], report[0],
        "the last report has every object: {out}"
    );
    assert_eq!(last[1], report[0], "{out}");
    assert!(last[2] > 0 && last[2] <= report[2], "{out}");
    // A volume push reports too: an empty volume is its manifest alone.
    assert!(out.contains("volume pushed-"), "{out}");
    let vcalls = tagged(&out, "vcall ");
    assert_eq!(vcalls.last().unwrap()[..2], [1, 1], "{out}");
}
