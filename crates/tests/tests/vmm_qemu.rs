//! The QEMU driver (`vmm::qemu`) launching real guests: Debian's cloud kernel with
//! `tide-init`, the minbase layer served by a real `volumed` over NBD, an ext4 scratch
//! file, and the host's end of the control channel played by the test.
//!
//! - A second layer (an app: one file) is hot-added over QMP after the guest says
//!   `ready`, as a warm VM is converted; the app reads the file from the stacked root,
//!   exits, the guest powers off and the driver reports exit code 0.
//! - `stop` ends a guest that ignores the power button within its grace time (QMP
//!   `quit`); no QEMU process is left.
//! - Bad input: a duplicate serial and an export that does not exist are refused
//!   with the reason while the guest runs on; a kernel that does not exist is an early
//!   exit carrying QEMU's message.

use std::time::Duration;

use guest::control::{Command, Config, Event, Stream};
use tests::guest::{Control, Kernel, ext4_file, init_initramfs, root_meta};
use tests::volumed::Volumed;
use vmm::{Accel, Disk, DiskSource, Exit, Hypervisor, VmSpec};

#[test]
fn qemu_driver_boots_hot_adds_a_layer_stops_and_refuses_bad_input() {
    let tmp = tests::tmpdir("tide-vmm-qemu");
    let t = tmp.path();
    let kernel = Kernel::get();
    let initrd = init_initramfs(&kernel, &t.join("init.cpio"));
    let minbase = tests::roots::ensure_debian_root("minbase").expect("minbase root");
    let app = t.join("app");
    std::fs::create_dir_all(app.join("srv")).unwrap();
    std::fs::write(app.join("srv/hello.txt"), "hello from the added layer\n").unwrap();
    let daemon = Volumed::start(t.join("data"), t.join("v.sock"));
    let import = |dir: &std::path::Path| -> String {
        let r = daemon
            .tide()
            .json(&["layer", "import", dir.to_str().unwrap()]);
        r["layers"][0].as_str().unwrap().to_string()
    };
    let (base, top) = (import(&minbase), import(&app));
    let nbd = |layer: &str, serial: &str| Disk {
        serial: serial.into(),
        source: DiskSource::Nbd {
            socket: daemon.data.join("nbd.sock"),
            export: format!("layer/{layer}"),
        },
        read_only: true,
    };
    let root = root_meta(&minbase);
    let config = |argv: &[&str]| Config {
        hostname: "vm".into(),
        layers: vec!["layer0".into(), "layer1".into()],
        scratch: "scratch".into(),
        root: root.clone(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        uid: 0,
        gid: 0,
        workdir: "/".into(),
        argv: argv.iter().map(|a| a.to_string()).collect(),
        disk_timeout_ms: 20_000,
        network: None,
        volumes: Vec::new(),
    };
    let spec = |name: &str| VmSpec {
        name: name.into(),
        kernel: kernel.vmlinuz(),
        initrd: initrd.clone(),
        cmdline: "console=ttyS0 quiet panic=-1".into(),
        vcpus: 1,
        memory_mib: 256,
        disks: vec![
            nbd(&base, "layer0"),
            Disk {
                serial: "scratch".into(),
                source: DiskSource::File(ext4_file(&t.join(format!("{name}.ext4")), 256 << 20)),
                read_only: false,
            },
        ],
        control: t.join(format!("{name}.ctl")),
        console_log: t.join(format!("{name}.console")),
        run_dir: t.join(format!("{name}-run")),
        accel: Accel::Tcg,
        net: None,
        shared_memory: false,
    };
    let qemu = vmm::qemu::Qemu::default();
    let timeout = Duration::from_secs(300);

    // Boot on one layer, hot-add the second, then start the app on both.
    let s = spec("hot");
    let mut vm = qemu.launch(&s).unwrap();
    let mut ctl = Control::connect(&s.control, "hot", timeout);
    assert!(matches!(ctl.event(), Event::Ready { .. }));
    vm.add_disk(&nbd(&top, "layer1")).unwrap();
    // Bad input is refused by name; the guest runs on.
    let e = vm.add_disk(&nbd(&top, "layer1")).unwrap_err();
    assert!(
        e.to_string().contains("two disks with serial \"layer1\""),
        "{e}"
    );
    let e = vm.add_disk(&nbd(&"0".repeat(64), "layer9")).unwrap_err();
    assert!(matches!(e, vmm::Error::Refused { .. }), "{e}");
    assert!(e.to_string().contains("blockdev-add"), "{e}");
    ctl.send(&Command::Config(Box::new(config(&[
        "cat",
        "/srv/hello.txt",
    ]))));
    let ev = ctl.until_end();
    assert!(
        ev.contains(&Event::Log {
            stream: Stream::Stdout,
            line: "hello from the added layer".into()
        }),
        "{ev:?}"
    );
    assert_eq!(
        ev.last(),
        Some(&Event::Exited {
            code: Some(0),
            signal: None
        })
    );
    assert_eq!(vm.wait_timeout(timeout).unwrap(), Some(Exit::Code(0)));

    // stop: the app sleeps and init ignores the power button; quit after the grace.
    let s = spec("stop");
    let mut vm = qemu.launch(&s).unwrap();
    let pid = vm.pid();
    let mut ctl = Control::connect(&s.control, "stop", timeout);
    assert!(matches!(ctl.event(), Event::Ready { .. }));
    vm.add_disk(&nbd(&top, "layer1")).unwrap();
    ctl.send(&Command::Config(Box::new(config(&["sleep", "600"]))));
    assert!(matches!(ctl.event(), Event::Started { .. }));
    let exit = vm.stop(Duration::from_millis(500)).unwrap();
    assert_eq!(exit, Exit::Code(0), "QMP quit ends QEMU cleanly");
    // SAFETY: signal 0 only checks whether the pid exists.
    let alive = unsafe { libc::kill(pid as i32, 0) } == 0;
    assert!(!alive, "QEMU {pid} still runs");

    // A kernel that does not exist: QEMU's own message.
    let mut s = spec("nokernel");
    s.kernel = t.join("no-such-vmlinuz");
    match qemu.launch(&s) {
        Err(vmm::Error::EarlyExit { stderr, .. }) => {
            assert!(stderr.contains("no-such-vmlinuz"), "{stderr}")
        }
        Err(e) => panic!("expected an early exit, got {e}"),
        Ok(_) => panic!("launched without a kernel"),
    }
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(String, String)> {
    tests::http_get(&addr.to_string(), path)
}

/// A service answers: the python3 root's `http.server` in a guest, reached on the
/// host through the port QEMU forwards, until the host stops it.
#[test]
fn a_guest_service_answers_on_its_forwarded_port() {
    let tmp = tests::tmpdir("tide-vmm-http");
    let t = tmp.path();
    let kernel = Kernel::get();
    let initrd = init_initramfs(&kernel, &t.join("init.cpio"));
    let python3 = tests::roots::ensure_debian_root("python3").expect("python3 root");
    let daemon = Volumed::start(t.join("data"), t.join("v.sock"));
    let r = daemon
        .tide()
        .json(&["layer", "import", python3.to_str().unwrap()]);
    let layer = r["layers"][0].as_str().unwrap().to_string();
    // A free loopback port for the forward.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let host: std::net::SocketAddrV4 = format!("127.0.0.1:{port}").parse().unwrap();
    let spec = VmSpec {
        name: "http".into(),
        kernel: kernel.vmlinuz(),
        initrd,
        cmdline: "console=ttyS0 quiet panic=-1".into(),
        vcpus: 1,
        memory_mib: 384,
        disks: vec![
            Disk {
                serial: "layer0".into(),
                source: DiskSource::Nbd {
                    socket: daemon.data.join("nbd.sock"),
                    export: format!("layer/{layer}"),
                },
                read_only: true,
            },
            Disk {
                serial: "scratch".into(),
                source: DiskSource::File(ext4_file(&t.join("http.ext4"), 256 << 20)),
                read_only: false,
            },
        ],
        control: t.join("http.ctl"),
        console_log: t.join("http.console"),
        run_dir: t.join("http-run"),
        accel: Accel::Tcg,
        net: Some(vmm::NetSpec {
            forwards: vec![vmm::Forward {
                host,
                guest_port: 8000,
            }],
        }),
        shared_memory: false,
    };
    let started = std::time::Instant::now();
    let mut vm = vmm::qemu::Qemu::default().launch(&spec).unwrap();
    let mut ctl = Control::connect(&spec.control, "http", Duration::from_secs(300));
    assert!(matches!(ctl.event(), Event::Ready { .. }));
    ctl.send(&Command::Config(Box::new(Config {
        hostname: "app-0".into(),
        layers: vec!["layer0".into()],
        scratch: "scratch".into(),
        root: root_meta(&python3),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        uid: 65534,
        gid: 65534,
        workdir: "/".into(),
        argv: [
            "python3",
            "-m",
            "http.server",
            "8000",
            "--bind",
            "0.0.0.0",
            "--directory",
            "/etc",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect(),
        disk_timeout_ms: 20_000,
        network: Some(guest::control::Network {
            address: vmm::qemu::USER_NET_ADDRESS.into(),
            gateway: vmm::qemu::USER_NET_GATEWAY.into(),
            dns: vmm::qemu::USER_NET_DNS.into(),
        }),
        volumes: Vec::new(),
    })));
    assert!(matches!(ctl.event(), Event::Started { .. }));
    let want = std::fs::read_to_string(python3.join("etc/debian_version")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let (status, body) = loop {
        if let Some(r) = http_get(std::net::SocketAddr::V4(host), "/debian_version") {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the service never answered"
        );
        assert!(vm.try_wait().unwrap().is_none(), "the guest ended");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("http: answered {:?} after launch", started.elapsed());
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, want);
    let (status, _) = http_get(std::net::SocketAddr::V4(host), "/no-such-file").unwrap();
    assert!(status.contains("404"), "{status}");
    ctl.send(&Command::Stop);
    let ev = ctl.until_end();
    assert_eq!(
        ev.last(),
        Some(&Event::Exited {
            code: None,
            signal: Some(15)
        }),
        "{ev:?}"
    );
    assert_eq!(
        vm.wait_timeout(Duration::from_secs(60)).unwrap(),
        Some(Exit::Code(0))
    );
}
