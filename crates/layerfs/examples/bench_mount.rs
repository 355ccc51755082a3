//! Rough timing of a layerfs mount against the directory it was imported from:
//! mount time, `tar cf /dev/null` and `find -ls`, warm (second run) on both.
//! Usage: `cargo run -p layerfs --example bench_mount [ROOT]` (default: the Debian
//! python3 root). Prints one line per measurement, ours beside the source's.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

fn time(cmd: &str, dir: &Path) -> f64 {
    let t = Instant::now();
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("cd {} && {cmd} >/dev/null", dir.display()))
        .status()
        .expect("run sh")
        .success();
    assert!(ok, "{cmd} failed in {}", dir.display());
    t.elapsed().as_secs_f64()
}

fn main() {
    let src = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/var/tmp/tidedge-roots/python3".into());
    let tmp = tempfile::Builder::new()
        .prefix("layerfs-bench")
        .tempdir_in("/var/tmp")
        .expect("temp dir");
    let store = Arc::new(castore::Store::open(tmp.path().join("store")).expect("store"));
    let img = store
        .import_image(Path::new(&src), Some("bench:1"), &Default::default())
        .expect("import")
        .image
        .expect("image");
    let mp = tmp.path().join("mnt");
    std::fs::create_dir(&mp).expect("mountpoint");
    let t = Instant::now();
    let m = layerfs::mount(
        store,
        img,
        &mp,
        layerfs::MountOptions {
            read_only: true,
            scratch_dir: tmp.path().join("scratch"),
        },
    )
    .expect("mount");
    println!("mount: {:.2} ms", t.elapsed().as_secs_f64() * 1000.0);
    for cmd in ["tar cf - . | cat", "find . -ls"] {
        let cold = time(cmd, &mp);
        let warm = time(cmd, &mp);
        let _ = time(cmd, Path::new(&src));
        let direct = time(cmd, Path::new(&src));
        println!(
            "{cmd}: layerfs first {cold:.2} s, warm {warm:.2} s; source dir warm {direct:.2} s"
        );
    }
    m.unmount().expect("unmount");
}
