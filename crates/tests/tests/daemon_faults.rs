//! The daemon under bad input and faults: a second daemon on the same data or a busy
//! NBD port, garbage on the socket, a client killed mid-call, SIGTERM.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tests::tide::{Tide, sh};
use tests::volumed::{Volumed, run_expecting_exit};
use tests::{fixture, tmpdir};

/// Starts `tide image import SRC --name NAME` without waiting for it.
fn spawn_import(tide: &Tide, src: &Path, name: &str) -> Child {
    tide.cmd()
        .args(["image", "import", src.to_str().unwrap(), "--name", name])
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn a_second_daemon_on_the_same_data_fails_clearly() {
    let tmp = tmpdir("tide-daemon-twice");
    let data = tmp.path().join("data");
    let daemon = Volumed::start(&data, tmp.path().join("a.sock"));
    let o = run_expecting_exit(&data, &tmp.path().join("b.sock"));
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("in use by another process") && e.contains(&daemon.pid().to_string()),
        "{e}"
    );
    assert!(!tmp.path().join("b.sock").exists());
    // Nor may another daemon take over a live socket.
    let o = run_expecting_exit(&tmp.path().join("data2"), &daemon.socket);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("served by another process"), "{e}");
    daemon.tide().ok(&["image", "ls"]);
}

#[test]
fn garbage_and_a_client_killed_mid_call_leave_the_daemon_serving() {
    let tmp = tmpdir("tide-daemon-faults");
    let src = tmp.path().join("src");
    fixture::build(&src);
    // A big file keeps the import busy long enough to kill its client mid-call.
    sh(&format!(
        "head -c 300M /dev/urandom > {}/big",
        src.to_str().unwrap()
    ));
    let mut daemon = Volumed::start(tmp.path().join("data"), tmp.path().join("v.sock"));
    let tide = daemon.tide();

    // Garbage: random bytes, then a message header claiming a huge segment.
    for junk in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0xff; 4096],
        [0u32.to_le_bytes(), 0x7fff_ffffu32.to_le_bytes()].concat(),
    ] {
        let mut s = UnixStream::connect(&daemon.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        // The daemon closes the connection (perhaps after an abort message).
        let _ = s.read_to_end(&mut rest);
        assert!(
            daemon.alive(),
            "daemon died on garbage:\n{}",
            daemon.log_text()
        );
    }
    tide.ok(&["image", "ls"]);

    // A client killed while the daemon is importing for it.
    let mut child = spawn_import(&tide, &src, "big:1");
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    // Meanwhile and afterwards, other clients are served.
    tide.ok(&["image", "ls"]);
    tide.ok(&["stats"]);
    assert!(daemon.alive(), "{}", daemon.log_text());
    // The orphaned import runs to its end; then the store is consistent and reusable.
    let r = tide.json(&["image", "import", src.to_str().unwrap(), "--name", "big:2"]);
    assert_eq!(r["name"], "big:2");
    let f = tide.ok(&["fsck"]);
    assert!(f.contains("store is consistent"), "{f}");
}

#[test]
fn the_daemon_keeps_serving_while_a_long_import_runs() {
    let tmp = tmpdir("tide-daemon-concurrent");
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    sh(&format!(
        "head -c 200M /dev/urandom > {}/big",
        src.to_str().unwrap()
    ));
    let daemon = Volumed::start(tmp.path().join("data"), tmp.path().join("v.sock"));
    let tide = daemon.tide();
    let mut child = spawn_import(&tide, &src, "big:1");
    std::thread::sleep(Duration::from_millis(100));
    let t = std::time::Instant::now();
    tide.ok(&["image", "ls"]);
    let during = t.elapsed();
    let st = child.wait().unwrap();
    assert!(st.success());
    assert!(
        during < Duration::from_secs(5),
        "image ls took {during:?} during an import"
    );
    assert!(tide.ok(&["image", "ls"]).contains("big:1"));
}

#[test]
fn sigterm_and_sigint_exit_zero_and_remove_the_socket() {
    let tmp = tmpdir("tide-daemon-term");
    let data = tmp.path().join("data");
    let sock = tmp.path().join("v.sock");
    let src = tmp.path().join("src");
    fixture::build(&src);
    let daemon = Volumed::start(&data, &sock);
    daemon
        .tide()
        .ok(&["image", "import", src.to_str().unwrap(), "--name", "f:1"]);
    let log = daemon.log.clone();
    let st = daemon.signal_and_wait(libc::SIGTERM);
    assert!(
        st.success(),
        "{st}: {}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(!sock.exists(), "socket left behind");
    // The store was flushed and released: it opens in-process and is intact.
    let t = tests::tide::Tide::new(data.join("store"));
    assert!(t.ok(&["image", "ls"]).contains("f:1"));
    assert!(t.ok(&["fsck"]).contains("store is consistent"));
    let daemon = Volumed::start(&data, &sock);
    let st = daemon.signal_and_wait(libc::SIGINT);
    assert!(st.success());
    assert!(!sock.exists());
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let tmp = tmpdir("tide-daemon-stale-sock");
    let sock = tmp.path().join("v.sock");
    // A socket file nobody listens on, as a killed daemon leaves it.
    tests::stale_socket(&sock);
    assert!(sock.exists());
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_err());
    let daemon = Volumed::start(tmp.path().join("data"), &sock);
    daemon.tide().ok(&["image", "ls"]);
}

/// A second daemon whose NBD TCP port is taken says so once, with the flag to change,
/// and leaves nothing in its data directory: neither a new one nor files in an empty
/// one it was given.
#[test]
fn a_second_daemon_on_a_busy_nbd_port_says_so_once_and_leaves_nothing() {
    let tmp = tmpdir("tide-daemon-port");
    let first = Volumed::start(tmp.path().join("a"), tmp.path().join("a.sock"));
    let port = first
        .log_text()
        .split(" and 127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .map(|p| format!("127.0.0.1:{p}"))
        .unwrap_or_else(|| panic!("no NBD port in:\n{}", first.log_text()));
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    for data in [tmp.path().join("new"), empty.clone()] {
        let sock = tmp.path().join("b.sock");
        let o = Command::new(tests::volumed_bin())
            .arg("--data")
            .arg(&data)
            .arg("--socket")
            .arg(&sock)
            .args(["--nbd-listen", &port])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(e.lines().count(), 1, "{e}");
        assert_eq!(e.matches("Address already in use").count(), 1, "{e}");
        assert!(
            e.contains(&format!("NBD TCP address {port} is in use")) && e.contains("--nbd-listen"),
            "{e}"
        );
        assert!(!sock.exists());
        if data == empty {
            assert_eq!(std::fs::read_dir(&data).unwrap().count(), 0);
        } else {
            assert!(!data.exists());
        }
    }
    first.tide().ok(&["image", "ls"]);
}

/// The first segment's chunk of file `name` at the root of `layer`.
fn first_chunk(store: &castore::Store, layer: &castore::Digest, name: &[u8]) -> castore::Digest {
    let root = store
        .tree(&store.layer(layer).unwrap().root_tree())
        .unwrap();
    let castore::Kind::File {
        data: castore::FileData::Blob(b),
        ..
    } = root.get(name).unwrap().kind.clone()
    else {
        panic!("{} is not a blob", String::from_utf8_lossy(name))
    };
    let castore::Segment::Data { chunk, .. } = store.blob(&b).unwrap().segments[0] else {
        panic!("a hole first")
    };
    chunk
}

#[test]
fn a_corrupt_chunk_fails_only_its_blocks_of_a_layer_export_and_the_daemon_serves_on() {
    let tmp = tmpdir("tide-layer-corrupt");
    let (data, src) = (tmp.path().join("data"), tmp.path().join("src"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("ok"), vec![7u8; 300_000]).unwrap();
    std::fs::write(src.join("bad"), vec![9u8; 600_000]).unwrap();
    let offline = Tide::new(data.join("store"));
    let imp = offline.json(&["layer", "import", src.to_str().unwrap()]);
    let layer = imp["layers"][0].as_str().unwrap().to_string();
    let good = tmp.path().join("good.erofs");
    offline.ok(&["layer", "erofs", &layer, "--to", good.to_str().unwrap()]);
    let good = std::fs::read(&good).unwrap();
    let victim = {
        let store = castore::Store::open(data.join("store")).unwrap();
        let d = castore::Digest::parse(&layer).unwrap();
        let (bad, ok) = (
            first_chunk(&store, &d, b"bad"),
            first_chunk(&store, &d, b"ok"),
        );
        assert_ne!(bad, ok);
        castore::testing::corrupt_chunk(&store, &bad).unwrap();
        bad
    };
    let mut daemon = Volumed::start(&data, tmp.path().join("v.sock"));
    let sock = data.join("nbd.sock");
    let export = format!("layer/{layer}");
    let (mut s, size, _) = tests::nbd::connect(&sock, &export, true);
    assert_eq!(size, good.len() as u64);
    let (mut failed, mut sevens) = (0, 0);
    for (i, want) in good.chunks(4096).enumerate() {
        let cookie = i as u64 + 1;
        s.write_all(&tests::nbd::request(
            0,
            0,
            cookie,
            i as u64 * 4096,
            want.len() as u32,
        ))
        .unwrap();
        let (err, got) = tests::nbd::reply(&mut s, true, cookie).unwrap();
        if err != 0 {
            assert_eq!(err, 5, "block {i}: EIO expected");
            assert!(
                want.iter().all(|&b| b == 9),
                "block {i} failed but holds no byte of the corrupt file"
            );
            failed += 1;
        } else {
            assert_eq!(&got[8..], want, "block {i} differs from the good image");
            sevens += usize::from(want.iter().all(|&b| b == 7));
        }
    }
    assert!(failed >= 1, "no block of the corrupt chunk failed");
    assert!(
        sevens >= 70,
        "the intact file's blocks were not all read ({sevens})"
    );
    // The daemon serves on: a new connection reads block 0, and the log names the chunk.
    let (mut s2, _, _) = tests::nbd::connect(&sock, &export, true);
    s2.write_all(&tests::nbd::request(0, 0, 1, 0, 4096))
        .unwrap();
    let (err, got) = tests::nbd::reply(&mut s2, true, 1).unwrap();
    assert_eq!(err, 0);
    assert_eq!(&got[8..], &good[..4096]);
    assert!(daemon.alive());
    let log = daemon.log_text();
    assert!(log.contains(&victim.to_string()), "{log}");
}
