//! The NBD server against clients someone else wrote (libnbd's nbdinfo/nbdcopy, QEMU's
//! qemu-img/qemu-io, fio's nbd engine), over a Unix socket and loopback TCP, plus a
//! handshake/request fuzz in Rust while a real client keeps working.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use layerfs::block::{BlockDevice, BlockSizes, DeviceError, Extent, ZeroFlags};
use layerfs::nbd::{Export, ExportError, Exports, Intent, MemoryDevice, Server, ServerConfig};
use tests::nbd::{
    Fuzz, Rng, connect, expect_closed, fuzz, hello, map_runs, ok, opt, opt_reply, qemu_img_compare,
    random_file, reply, request, run,
};

const MIB: u64 = 1 << 20;

/// Named in-memory exports; `busy` is always held by someone else.
#[derive(Default)]
struct TestExports(HashMap<String, Arc<MemoryDevice>>);

impl Exports for TestExports {
    fn list(&self) -> Result<Vec<(String, Option<String>)>, ExportError> {
        let mut v: Vec<_> = self.0.keys().map(|k| (k.clone(), None)).collect();
        v.sort();
        Ok(v)
    }

    fn open(&self, name: &str, intent: Intent, _: &str) -> Result<Export, ExportError> {
        if name == "busy" && intent == Intent::Serve {
            return Err(ExportError::InUse {
                name: name.into(),
                holder: "vm-7 on host-a".into(),
            });
        }
        let dev = self
            .0
            .get(if name == "busy" { "rw" } else { name })
            .ok_or_else(|| ExportError::NotFound(format!("no export named {name:?}")))?;
        Ok(Export {
            device: dev.clone(),
            description: Some(format!("test export {name}")),
        })
    }
}

/// A device that promises less: no multi-conn, no trim, 512-byte blocks, zeroing that
/// is never fast, and a read that panics.
struct Limited(MemoryDevice);

impl BlockDevice for Limited {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn can_trim(&self) -> bool {
        false
    }
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            min: 512,
            preferred: 65536,
            max: MIB as u32,
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        assert!(offset != 3 * MIB, "a backend bug");
        self.0.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        self.0.write(offset, data, fua)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.0.flush()
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), DeviceError> {
        panic!("trim was not advertised")
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), DeviceError> {
        if flags.fast {
            return Err(DeviceError::NotFast);
        }
        self.0.write_zeroes(offset, len, flags)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        self.0.block_status(offset, len)
    }
}

/// Serves one `Limited` device under any name.
struct OneExport(Arc<Limited>);

impl Exports for OneExport {
    fn list(&self) -> Result<Vec<(String, Option<String>)>, ExportError> {
        Ok(vec![])
    }
    fn open(&self, _: &str, _: Intent, _: &str) -> Result<Export, ExportError> {
        Ok(Export {
            device: self.0.clone(),
            description: None,
        })
    }
}

#[test]
fn flags_follow_what_the_device_promises() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = Server::new(
        Arc::new(OneExport(Arc::new(Limited(MemoryDevice::new(4 * MIB))))),
        ServerConfig::default(),
    );
    let listener = rt.block_on(async { tokio::net::UnixListener::bind(&socket).unwrap() });
    rt.spawn(async move { server.serve_unix(listener).await });
    let uri = format!("nbd+unix:///x?socket={}", socket.display());
    let json: serde_json::Value = serde_json::from_str(&ok("nbdinfo", &["--json", &uri])).unwrap();
    let e = &json["exports"][0];
    for (k, v) in [
        ("can_multi_conn", false),
        ("can_trim", false),
        ("can_fast_zero", true),
        ("can_zero", true),
        ("is_read_only", false),
    ] {
        assert_eq!(e[k], v, "{k}: {e}");
    }
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], 65536);
    assert_eq!(e["block_size_maximum"], MIB);
    assert_eq!(
        run("nbdinfo", &["--can", "multi-conn", &uri]).status.code(),
        Some(2)
    );
    // A fast zero the device cannot do fast is ENOTSUP; a plain one works; an
    // unadvertised trim is EINVAL and never reaches the device.
    let (mut s, _, _) = connect(&socket, "x", true);
    s.write_all(&[request(0, 1, 1, 0, 4096), vec![7; 4096]].concat())
        .unwrap();
    assert_eq!(reply(&mut s, true, 1).unwrap().0, 0);
    s.write_all(&request(0x10, 6, 2, 0, 4096)).unwrap();
    assert_eq!(reply(&mut s, true, 2).unwrap().0, 95);
    s.write_all(&request(0, 4, 3, 0, 4096)).unwrap();
    assert_eq!(reply(&mut s, true, 3).unwrap().0, 22);
    s.write_all(&request(0, 0, 4, 0, 4096)).unwrap();
    assert_eq!(reply(&mut s, true, 4).unwrap().1[8..], [7; 4096]);
    s.write_all(&request(0, 6, 5, 0, 4096)).unwrap();
    assert_eq!(reply(&mut s, true, 5).unwrap().0, 0);
    s.write_all(&request(0, 0, 6, 0, 4096)).unwrap();
    assert_eq!(reply(&mut s, true, 6).unwrap().1[8..], [0; 4096]);
    // A panicking backend is EIO for that request only.
    s.write_all(&request(0, 0, 8, 3 * MIB, 4096)).unwrap();
    assert_eq!(reply(&mut s, true, 8).unwrap().0, 5);
    s.write_all(&request(0, 0, 9, 0, 512)).unwrap();
    assert_eq!(reply(&mut s, true, 9).unwrap().1[8..], [0; 512]);
    // Larger than the device's maximum block size.
    s.write_all(&request(0, 0, 7, 0, 2 << 20)).unwrap();
    assert_eq!(reply(&mut s, true, 7).unwrap().0, 22);
    // qemu-io honours the 512-byte minimum by read-modify-write.
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x33 100 1000",
            "-c",
            "read -P 0x33 100 1000",
            "-c",
            "read -P 0 0 100",
            &uri,
        ],
    );
}

/// A server on a temporary Unix socket and a random loopback TCP port.
struct Harness {
    _rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    socket: PathBuf,
    port: u16,
    devices: HashMap<String, Arc<MemoryDevice>>,
}

impl Harness {
    fn new(devices: Vec<(&str, MemoryDevice)>) -> Harness {
        let devices: HashMap<String, Arc<MemoryDevice>> = devices
            .into_iter()
            .map(|(n, d)| (n.to_string(), Arc::new(d)))
            .collect();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let server = Server::new(
            Arc::new(TestExports(devices.clone())),
            ServerConfig::default(),
        );
        let port = rt.block_on(async {
            let unix = tokio::net::UnixListener::bind(&socket).unwrap();
            let tcp = Server::bind_tcp("127.0.0.1:0".parse().unwrap(), false)
                .await
                .unwrap();
            let port = tcp.local_addr().unwrap().port();
            let s = server.clone();
            tokio::spawn(async move { s.serve_unix(unix).await });
            tokio::spawn(async move { server.serve_tcp(tcp).await });
            port
        });
        Harness {
            _rt: rt,
            dir,
            socket,
            port,
            devices,
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    fn dev(&self, name: &str) -> &MemoryDevice {
        &self.devices[name]
    }
}

#[test]
fn nbdinfo_shows_exactly_the_advertised_flags() {
    let h = Harness::new(vec![
        ("rw", MemoryDevice::new(64 * MIB)),
        ("ro", MemoryDevice::new(8 * MIB).read_only()),
    ]);
    for uri in [h.uri("rw"), h.tcp_uri("rw")] {
        let json: serde_json::Value =
            serde_json::from_str(&ok("nbdinfo", &["--json", &uri])).unwrap();
        assert_eq!(json["protocol"], "newstyle-fixed");
        assert_eq!(json["structured"], true);
        let e = &json["exports"][0];
        assert_eq!(e["export-name"], "rw");
        assert_eq!(e["export-size"], 64 * MIB);
        assert_eq!(e["contexts"], serde_json::json!(["base:allocation"]));
        for (k, v) in [
            ("is_read_only", false),
            ("is_rotational", false),
            ("can_cache", true),
            ("can_df", true),
            ("can_fast_zero", true),
            ("can_flush", true),
            ("can_fua", true),
            ("can_multi_conn", true),
            ("can_trim", true),
            ("can_zero", true),
        ] {
            assert_eq!(e[k], v, "{k} of {uri}: {e}");
        }
        assert_eq!(e["block_size_minimum"], 1);
        assert_eq!(e["block_size_preferred"], 4096);
        assert_eq!(e["block_size_maximum"], 32 * MIB);
        assert_eq!(e["description"], "test export rw");
    }
    let json: serde_json::Value =
        serde_json::from_str(&ok("nbdinfo", &["--json", &h.uri("ro")])).unwrap();
    let e = &json["exports"][0];
    for (k, v) in [
        ("is_read_only", true),
        ("can_flush", false),
        ("can_fua", false),
        ("can_trim", false),
        ("can_zero", false),
        ("can_fast_zero", false),
        ("can_cache", true),
        ("can_multi_conn", true),
    ] {
        assert_eq!(e[k], v, "{k} of ro: {e}");
    }
    // Exit codes: 0 for yes, 2 for no.
    for (export, what, yes) in [
        ("rw", "flush", true),
        ("rw", "fua", true),
        ("rw", "trim", true),
        ("rw", "zero", true),
        ("rw", "multi-conn", true),
        ("ro", "flush", false),
        ("ro", "trim", false),
        ("ro", "zero", false),
    ] {
        let out = run("nbdinfo", &["--can", what, &h.uri(export)]);
        assert_eq!(
            out.status.code(),
            Some(if yes { 0 } else { 2 }),
            "--can {what} {export}"
        );
    }
    assert_eq!(
        run("nbdinfo", &["--is", "read-only", &h.uri("ro")])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        run("nbdinfo", &["--is", "read-only", &h.uri("rw")])
            .status
            .code(),
        Some(2)
    );
    // OPT_LIST.
    let list = ok("nbdinfo", &["--list", "--json", &h.uri("")]);
    let json: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<_> = json["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["ro", "rw"]);
}

#[test]
fn unknown_and_busy_exports_are_refused_with_the_reason() {
    let h = Harness::new(vec![("rw", MemoryDevice::new(MIB))]);
    let out = run("nbdinfo", &[&h.uri("nope")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // libnbd reports NBD_REP_ERR_UNKNOWN as ENOENT.
    assert!(err.contains("No such file or directory"), "{err}");
    let out = run("qemu-io", &["-f", "raw", "-c", "read 0 4k", &h.uri("busy")]);
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(err.contains("in use by vm-7 on host-a"), "{err}");
}

#[test]
fn tcp_refuses_non_loopback_unless_allowed() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let err = Server::bind_tcp("0.0.0.0:0".parse().unwrap(), false)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not a loopback"), "{err}");
        Server::bind_tcp("0.0.0.0:0".parse().unwrap(), true)
            .await
            .unwrap();
    });
}

#[test]
fn nbdinfo_map_matches_written_and_trimmed_ranges() {
    let h = Harness::new(vec![("rw", MemoryDevice::new(16 * MIB))]);
    let uri = h.uri("rw");
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 1M 2M",
            "-c",
            "write -P 0x22 8M 1M",
            "-c",
            "discard 2M 512k",
            "-c",
            "write -z -u 8M 256k",
            &uri,
        ],
    );
    let got = map_runs(&uri);
    let k = 1024;
    assert_eq!(
        got,
        [
            (0, MIB, 3),
            (MIB, MIB, 0),
            (2 * MIB, 512 * k, 3),
            (2 * MIB + 512 * k, MIB - 512 * k, 0),
            (3 * MIB, 5 * MIB + 256 * k, 3),
            (8 * MIB + 256 * k, MIB - 256 * k, 0),
            (9 * MIB, 7 * MIB, 3),
        ]
    );
    // qemu-io's own pattern checks agree with the map.
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x11 1M 1M",
            "-c",
            "read -P 0 2M 512k",
            "-c",
            "read -P 0x11 2621440 524288",
            "-c",
            "read -P 0 8M 256k",
            "-c",
            "read -P 0x22 8650752 786432",
            &uri,
        ],
    );
}

#[test]
fn nbdcopy_256_mib_in_and_out() {
    let h = Harness::new(vec![("rw", MemoryDevice::new(256 * MIB))]);
    let src = h.dir.path().join("src.raw");
    let dst = h.dir.path().join("dst.raw");
    let data = random_file(&src, 256 * MIB as usize, 0x1234_5678);
    ok("nbdcopy", &[src.to_str().unwrap(), &h.uri("rw")]);
    // Over TCP on the way out, with several connections (multi-conn).
    ok(
        "nbdcopy",
        &["--connections=4", &h.tcp_uri("rw"), dst.to_str().unwrap()],
    );
    assert!(
        std::fs::read(&dst).unwrap() == data,
        "nbdcopy round trip differs"
    );
    let mut direct = vec![0; data.len()];
    h.dev("rw").read(0, &mut direct).unwrap();
    assert!(direct == data);
}

#[test]
fn qemu_img_convert_and_compare() {
    let h = Harness::new(vec![("rw", MemoryDevice::new(32 * MIB))]);
    let src = h.dir.path().join("src.raw");
    let mut data = vec![0u8; 32 * MIB as usize];
    // Data with holes, so qemu-img uses zero writes and block status.
    Rng(7).fill(&mut data[..4 * MIB as usize]);
    Rng(8).fill(&mut data[20 * MIB as usize..21 * MIB as usize]);
    std::fs::write(&src, &data).unwrap();
    let uri = h.uri("rw");
    ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    let same = qemu_img_compare(src.to_str().unwrap(), &uri);
    assert!(same.status.success(), "{same:?}");
    let back = h.dir.path().join("back.raw");
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &h.tcp_uri("rw"),
            back.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&back).unwrap() == data);
}

#[test]
fn qemu_io_patterns() {
    let h = Harness::new(vec![("rw", MemoryDevice::new(16 * MIB))]);
    for uri in [h.uri("rw"), h.tcp_uri("rw")] {
        ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0xab 0 1M",
                "-c",
                "read -P 0xab 0 1M",
                "-c",
                "write -P 0xcd -f 1M 4k",
                "-c",
                "aio_write -P 0x01 2M 64k",
                "-c",
                "aio_write -P 0x02 3M 64k",
                "-c",
                "aio_flush",
                "-c",
                "read -P 0xcd 1M 4k",
                "-c",
                "read -P 0x01 2M 64k",
                "-c",
                "read -P 0x02 3M 64k",
                "-c",
                "write -z 0 512k",
                "-c",
                "read -P 0 0 512k",
                "-c",
                "read -P 0xab 512k 512k",
                "-c",
                "flush",
                &uri,
            ],
        );
    }
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let h = Harness::new(vec![("ro", MemoryDevice::new(4 * MIB).read_only())]);
    h.dev("ro").fill(0, &[0x5a; 4096]);
    ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x5a 0 4k", &h.uri("ro")],
    );
    // Real clients honour the read-only flag themselves (qemu-io will not even open it
    // read-write, and nbdsh is not installed), so the server's own EPERM is checked with
    // the raw client: WRITE, TRIM and WRITE_ZEROES, simple and structured replies.
    let out = run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &h.uri("ro")]);
    assert!(!out.status.success());
    for structured in [false, true] {
        let (mut s, _, flags) = connect(&h.socket, "ro", structured);
        assert_eq!(flags & 2, 2, "READ_ONLY flag");
        s.write_all(&[request(0, 1, 1, 0, 4096), vec![1; 4096]].concat())
            .unwrap();
        assert_eq!(reply(&mut s, structured, 1).unwrap().0, 1);
        s.write_all(&request(1, 4, 2, 0, 4096)).unwrap();
        assert_eq!(reply(&mut s, structured, 2).unwrap().0, 1);
        s.write_all(&request(2, 6, 3, 0, 4096)).unwrap();
        assert_eq!(reply(&mut s, structured, 3).unwrap().0, 1);
    }
    let mut b = [0u8; 4096];
    h.dev("ro").read(0, &mut b).unwrap();
    assert_eq!(b, [0x5a; 4096]);
}

#[test]
fn fio_random_writes_verified() {
    let h = Harness::new(vec![("rw", MemoryDevice::new(64 * MIB))]);
    let help = run("fio", &["--enghelp=nbd"]);
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("uri"),
        "fio lacks the nbd engine"
    );
    let uri = h.uri("rw");
    let out = ok(
        "fio",
        &[
            "--name=randwrite",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=64M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            &format!("--directory={}", h.dir.path().display()),
            "--output-format=json",
        ],
    );
    let json: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    assert_eq!(json["jobs"][0]["error"], 0, "{out}");
}

#[test]
fn fuzzed_handshakes_and_requests_never_hurt_others() {
    // Larger than the maximum payload, so a too-large read can be within the device.
    let size = 64 * MIB;
    let h = Harness::new(vec![
        ("fuzz", MemoryDevice::new(size).min_block(512)),
        ("ro", MemoryDevice::new(MIB).read_only()),
        ("live", MemoryDevice::new(8 * MIB)),
    ]);
    let mut content = vec![0u8; size as usize];
    Rng(99).fill(&mut content[..4 * MIB as usize]);
    h.dev("fuzz").fill(0, &content);
    fuzz(
        Fuzz {
            socket: &h.socket,
            export: "fuzz",
            size,
            content: &content,
            ro_export: "ro",
            live_uri: h.uri("live"),
            map_uri: h.uri("fuzz"),
        },
        4000,
    );
    let mut now = vec![0u8; size as usize];
    h.dev("fuzz").read(0, &mut now).unwrap();
    assert!(now == content, "the garbage changed the export");
    let mut ro = vec![0u8; MIB as usize];
    h.dev("ro").read(0, &mut ro).unwrap();
    assert!(ro.iter().all(|&b| b == 0));
}

#[test]
fn negotiation_paths_real_clients_do_not_take() {
    let h = Harness::new(vec![("rw", MemoryDevice::new(MIB))]);
    h.dev("rw").fill(0, &[0x42; 512]);
    // Unknown options are NBD_REP_ERR_UNSUP and negotiation goes on; SET_META_CONTEXT
    // before STRUCTURED_REPLY is invalid; STRUCTURED_REPLY with data is invalid.
    let mut s = hello(&h.socket, 1);
    let mut b = Vec::new();
    opt(&mut b, 4242, b"whatever");
    opt(&mut b, 10, &[0, 0, 0, 2, b'r', b'w', 0, 0, 0, 0]);
    opt(&mut b, 8, b"x");
    opt(&mut b, 3, &[]);
    s.write_all(&b).unwrap();
    assert_eq!(opt_reply(&mut s).1, 0x8000_0001);
    assert_eq!(opt_reply(&mut s).1, 0x8000_0003);
    assert_eq!(opt_reply(&mut s).1, 0x8000_0003);
    let (o, typ, d) = opt_reply(&mut s);
    assert_eq!((o, typ), (3, 2));
    assert_eq!(d, [&2u32.to_be_bytes()[..], b"rw"].concat());
    assert_eq!(opt_reply(&mut s).1, 1);
    // An oversized option is skipped and answered NBD_REP_ERR_TOO_BIG.
    let mut b = Vec::new();
    opt(&mut b, 6, &vec![0; 100 << 10]);
    s.write_all(&b).unwrap();
    assert_eq!(opt_reply(&mut s).1, 0x8000_0009);
    // Then the old NBD_OPT_EXPORT_NAME: this client did not ask for NO_ZEROES, so 124
    // zero bytes follow the size and flags.
    let mut b = Vec::new();
    opt(&mut b, 1, b"rw");
    s.write_all(&b).unwrap();
    let mut r = [0; 134];
    s.read_exact(&mut r).unwrap();
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), MIB);
    assert!(r[10..].iter().all(|&b| b == 0));
    s.write_all(&request(0, 0, 9, 0, 512)).unwrap();
    assert_eq!(reply(&mut s, false, 9).unwrap().0, 0);
    let mut d = [0; 512];
    s.read_exact(&mut d).unwrap();
    assert_eq!(d, [0x42; 512]);
    // BLOCK_STATUS without structured replies is EINVAL.
    s.write_all(&request(0, 7, 10, 0, 512)).unwrap();
    assert_eq!(reply(&mut s, false, 10).unwrap().0, 22);
    s.write_all(&request(0, 2, 11, 0, 0)).unwrap();
    expect_closed(s);

    // OPT_EXPORT_NAME for a missing export closes the connection (no error reply exists).
    let mut s = hello(&h.socket, 3);
    let mut b = Vec::new();
    opt(&mut b, 1, b"nope");
    s.write_all(&b).unwrap();
    expect_closed(s);
    // Unknown client flags close it too, as do plain (not fixed) newstyle clients.
    expect_closed(hello(&h.socket, 0x80));
    expect_closed(hello(&h.socket, 0));
    // OPT_ABORT is acknowledged.
    let mut s = hello(&h.socket, 3);
    let mut b = Vec::new();
    opt(&mut b, 2, &[]);
    s.write_all(&b).unwrap();
    assert_eq!(opt_reply(&mut s).1, 1);
    expect_closed(s);
    // LIST_META_CONTEXT with no query lists base:allocation; "base:" too; others nothing.
    for (queries, listed) in [
        (vec![], true),
        (vec!["base:"], true),
        (vec!["qemu:dirty-bitmap:x"], false),
    ] {
        let mut s = hello(&h.socket, 3);
        let mut d = [&2u32.to_be_bytes()[..], b"rw"].concat();
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in &queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        let mut b = Vec::new();
        opt(&mut b, 9, &d);
        s.write_all(&b).unwrap();
        let (_, typ, d) = opt_reply(&mut s);
        if listed {
            assert_eq!(typ, 4);
            assert_eq!(&d[4..], b"base:allocation");
            assert_eq!(opt_reply(&mut s).1, 1);
        } else {
            assert_eq!(typ, 1);
        }
    }
}

#[test]
fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = Server::new(
        Arc::new(TestExports::default()),
        ServerConfig {
            handshake_timeout: Duration::from_millis(200),
            ..ServerConfig::default()
        },
    );
    let listener = rt.block_on(async { tokio::net::UnixListener::bind(&socket).unwrap() });
    rt.spawn(async move { server.serve_unix(listener).await });
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sink = Vec::new();
    let start = std::time::Instant::now();
    s.read_to_end(&mut sink).unwrap();
    assert_eq!(sink.len(), 18, "only the server's greeting");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn many_connections_at_once() {
    let h = Harness::new(vec![("rw", MemoryDevice::new(64 * MIB))]);
    let children: Vec<_> = (0..8u64)
        .map(|i| {
            let uri = if i % 2 == 0 {
                h.uri("rw")
            } else {
                h.tcp_uri("rw")
            };
            let p = format!("{:#x}", 0x10 + i);
            let off = i * 8 * MIB;
            Command::new("qemu-io")
                .args([
                    "-f",
                    "raw",
                    "-c",
                    &format!("aio_write -P {p} {off} 4M"),
                    "-c",
                    &format!("aio_write -P {p} {} 4M", off + 4 * MIB),
                    "-c",
                    "aio_flush",
                    "-c",
                    &format!("read -P {p} {off} 8M"),
                    &uri,
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect::<Vec<_>>();
    // All eight run at once; only now wait for them.
    let children: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for (i, out) in children.iter().enumerate() {
        assert!(
            out.status.success(),
            "client {i}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("verification failed"));
    }
    let mut b = vec![0; 8 * MIB as usize];
    for i in 0..8u64 {
        h.dev("rw").read(i * 8 * MIB, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0x10 + i as u8), "region {i}");
    }
}
