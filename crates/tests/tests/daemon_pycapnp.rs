//! A client someone else wrote speaks our schema: pycapnp loads `store.capnp` as it is
//! in the repository and calls `Daemon.store().images()` on a real daemon.
//!
//! The Python interpreter with pycapnp is [`tests::python`]: `$TIDEDGE_PYTHON`, else the virtualenv
//! `.ci/run` creates (`/var/tmp/tidedge-pyenv`); without it the test fails and says how
//! to install it.

use std::path::PathBuf;
use std::process::Command;

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
    let py = tests::python();
    let tmp = tests::tmpdir("tide-pycapnp");
    let src = tmp.path().join("src");
    fixture::build(&src);
    let daemon = Volumed::start(tmp.path().join("data"), tmp.path().join("v.sock"));
    let r = daemon
        .tide()
        .json(&["image", "import", src.to_str().unwrap(), "--name", "py:1"]);
    let capnp_file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schema/capnp/store.capnp");
    let o = Command::new(py)
        .args(["-c", CLIENT])
        .arg(&capnp_file)
        .arg(&daemon.socket)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "python client failed: {}\n{out}",
        String::from_utf8_lossy(&o.stderr)
    );
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
