//! The guest's init (`tide-init`, PID 1) driven over its control port by a host, as
//! volumed will: Debian's cloud kernel boots an initramfs holding only `tide-init` and
//! the kernel modules; the Debian minbase root is its one layer, served by a real
//! `volumed` over NBD, with an ext4 scratch file. The test plays the host on the
//! control socket (`guest::control`): it waits for `ready`, sends the config and reads
//! the events until the guest powers off.
//!
//! - An app (`sh -c`) sees the config's env, hostname, workdir and user, writes to
//!   stdout and stderr (both come back as `log` events) and exits 7: `exited` code 7.
//! - `stop` ends a sleeping app with SIGTERM: `exited` by signal 15.
//! - An argv naming no file is a `failed` event naming the program and the error, and
//!   the guest powers off.
//!
//! Needs root, QEMU and the kernel cache (`scripts/fetch-kernel`, run when missing).

use std::path::PathBuf;
use std::time::Duration;

use guest::control::{self, Config, Event, RootMeta, Stream};
use tests::guest::{Control, Disk, Guest, Kernel, Source, ext4_file, init_initramfs, root_meta};
use tests::volumed::Volumed;

struct Host {
    kernel: Kernel,
    initrd: PathBuf,
    layer: Source,
    root: RootMeta,
    dir: PathBuf,
}

impl Host {
    /// A fresh 256 MiB ext4 scratch file.
    fn scratch(&self, name: &str) -> PathBuf {
        ext4_file(&self.dir.join(format!("{name}.ext4")), 256 << 20)
    }

    fn config(&self, argv: &[&str]) -> Config {
        Config {
            hostname: "web-0".into(),
            layers: vec!["layer0".into()],
            scratch: "scratch".into(),
            root: self.root.clone(),
            env: vec![
                ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
                ("GREETING".into(), "hello from the cascade".into()),
            ],
            uid: 65534,
            gid: 65534,
            workdir: "/tmp".into(),
            argv: argv.iter().map(|a| a.to_string()).collect(),
            disk_timeout_ms: 20_000,
            network: None,
            volumes: Vec::new(),
        }
    }

    /// Boots a guest, sends `config` once it is ready and `stop` once the app has
    /// started (if asked), and returns every event until the guest powered off.
    fn run(&self, name: &str, config: &Config, stop: bool) -> Vec<Event> {
        let sock = self.dir.join(format!("{name}.ctl"));
        let guest = Guest {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            disks: vec![
                Disk {
                    serial: "layer0".into(),
                    source: self.layer.clone(),
                    read_only: true,
                },
                Disk {
                    serial: "scratch".into(),
                    source: Source::File(self.scratch(name)),
                    read_only: false,
                },
            ],
            append: String::new(),
            memory_mib: 256,
            vcpus: 1,
            dir: self.dir.join(format!("{name}-qemu")),
            control: Some(sock.clone()),
        };
        let running = guest.spawn();
        let mut ctl = Control::connect(&sock, name, Duration::from_secs(300));
        let mut events = vec![ctl.event()];
        assert!(matches!(events[0], Event::Ready { .. }), "{events:?}");
        ctl.send(&control::Command::Config(Box::new(config.clone())));
        if stop {
            let e = ctl.event();
            assert!(matches!(e, Event::Started { .. }), "{e:?}");
            events.push(e);
            ctl.send(&control::Command::Stop);
        }
        events.extend(ctl.until_end());
        // The guest powers off by itself after its last event.
        let run = running.wait(Duration::from_secs(300));
        eprintln!("{name}: powered off after {:?}", run.elapsed);
        events
    }
}

fn logs(events: &[Event], stream: Stream) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Log { stream: s, line } if *s == stream => Some(line.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn tide_init_runs_the_app_its_host_configures_and_reports_how_it_ended() {
    let tmp = tests::tmpdir("tide-guest-init");
    let t = tmp.path();
    let kernel = Kernel::get();
    let minbase = tests::roots::ensure_debian_root("minbase").expect("minbase root");
    let daemon = Volumed::start(t.join("data"), t.join("v.sock"));
    let imp = daemon
        .tide()
        .json(&["layer", "import", minbase.to_str().unwrap()]);
    let layer = imp["layers"][0].as_str().unwrap().to_string();
    let host = Host {
        initrd: init_initramfs(&kernel, &t.join("init.cpio")),
        kernel,
        layer: Source::Nbd {
            socket: daemon.data.join("nbd.sock"),
            export: format!("layer/{layer}"),
        },
        root: root_meta(&minbase),
        dir: t.to_path_buf(),
    };

    // The app sees what the config says, and its exit code comes back.
    let app = host.config(&[
        "sh",
        "-c",
        "echo \"$GREETING|$(hostname)|$(pwd)|$(id -u):$(id -g)|$(cat /etc/debian_version)\"; \
         echo oops >&2; exit 7",
    ]);
    let ev = host.run("app", &app, false);
    assert!(
        matches!(ev.first(), Some(Event::Ready { kernel, .. }) if kernel.starts_with("6.1")),
        "{ev:?}"
    );
    assert!(
        ev.iter().any(|e| matches!(e, Event::Started { .. })),
        "{ev:?}"
    );
    let debian = std::fs::read_to_string(minbase.join("etc/debian_version")).unwrap();
    assert_eq!(
        logs(&ev, Stream::Stdout),
        vec![format!(
            "hello from the cascade|web-0|/tmp|65534:65534|{}",
            debian.trim()
        )],
        "{ev:?}"
    );
    assert_eq!(logs(&ev, Stream::Stderr), vec!["oops".to_string()]);
    assert_eq!(
        ev.last(),
        Some(&Event::Exited {
            code: Some(7),
            signal: None
        })
    );

    // stop: SIGTERM to the app.
    let sleeper = host.config(&["sleep", "600"]);
    let ev = host.run("stop", &sleeper, true);
    assert_eq!(
        ev.last(),
        Some(&Event::Exited {
            code: None,
            signal: Some(15)
        }),
        "{ev:?}"
    );

    // An argv naming no program: failed, with the reason.
    let missing = host.config(&["/usr/bin/no-such-app", "--serve"]);
    let ev = host.run("missing", &missing, false);
    match ev.last() {
        Some(Event::Failed { reason }) => assert!(
            reason.contains("exec /usr/bin/no-such-app") && reason.contains("No such file"),
            "{reason}"
        ),
        other => panic!("expected failed, got {other:?} in {ev:?}"),
    }
    assert!(
        !ev.iter().any(|e| matches!(e, Event::Started { .. })),
        "{ev:?}"
    );
}
