//! Layers as block devices, checked by a real guest kernel: a scheduler and a volumed
//! host (real processes, real sockets), images imported into the host, stacks deployed
//! with `tide deploy`, and every instance's boot spec (`tide instance ls`: its layers'
//! EROFS exports bottom to top, then its scratch device) handed to QEMU as virtio disks
//! over NBD. Debian's cloud kernel (6.1) boots, mounts each layer's EROFS, stacks them
//! with overlayfs on the ext4 scratch and prints a manifest of the merged root, which
//! must equal the manifest of the same instance's root as the host's store presents it
//! (its FUSE root).
//!
//! Images: the three Debian roots as three OCI layers (minbase, +python3 with deletions,
//! +flask with an opaque directory), where the guest also runs `python3 -c 'import
//! flask'` in the merged root; and a tree of corner cases (`tests::fixture::corners`),
//! where an unprivileged user reads a root-only file through a setcap binary (and not
//! through the same binary without the capability).
//!
//! Needs root, FUSE, QEMU, busybox-static, the Debian roots (built on first use) and
//! the kernel cache (`scripts/fetch-kernel`, run here when missing). Under TCG on two
//! cores, about a minute.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tests::guest::{Disk, Guest, Kernel, Source, begin, end, initramfs};
use tests::sched::{Sched, json, wait_for};
use tests::volumed::Volumed;
use tests::{UnmountBelow, tide::sh};

const HOST: &str = "host-g";

fn host_args(addr: &str) -> Vec<String> {
    [
        "--scheduler",
        addr,
        "--host-id",
        HOST,
        "--vcpus",
        "4",
        "--memory",
        "8G",
        "--hypervisors",
        "qemu",
        "--heartbeat-ms",
        "200",
        "--scratch-size",
        "1G",
    ]
    .iter()
    .map(|a| (*a).to_string())
    .collect()
}

fn stack(name: &str, image: &str) -> String {
    format!("[stack]\nname = \"{name}\"\n\n[services.app]\nimage = \"{image}\"\n")
}

/// A two-layer OCI image whose upper layer makes `/srv/app` opaque (the lower's
/// `old.conf` and `keep/` hidden, `new.conf` in their place) and deletes `/etc/gone`
/// (an OCI whiteout). Returns the layout directory.
fn opaque_image(t: &Path) -> std::path::PathBuf {
    let (lower, upper) = (t.join("opq-lower"), t.join("opq-upper"));
    for d in ["srv/app/keep", "etc"] {
        std::fs::create_dir_all(lower.join(d)).unwrap();
    }
    std::fs::write(lower.join("srv/app/old.conf"), b"old\n").unwrap();
    std::fs::write(lower.join("srv/app/keep/x"), b"x\n").unwrap();
    std::fs::write(lower.join("etc/gone"), b"deleted above\n").unwrap();
    std::fs::write(lower.join("etc/stays"), b"kept\n").unwrap();
    for d in ["srv/app", "etc"] {
        std::fs::create_dir_all(upper.join(d)).unwrap();
    }
    std::fs::write(upper.join("srv/app/new.conf"), b"new\n").unwrap();
    std::fs::write(upper.join("srv/app/.wh..wh..opq"), b"").unwrap();
    std::fs::write(upper.join("etc/.wh.gone"), b"").unwrap();
    let blobs = tests::oci::Blobs::new(&t.join("opq-blobs"));
    let layers: Vec<_> = [&lower, &upper]
        .iter()
        .map(|root| {
            let tar = root.with_extension("tar");
            tests::oci::tar(root, None, &tar);
            blobs.layer(&tar)
        })
        .collect();
    let dir = t.join("opq-oci");
    blobs.image(&dir, "opaque:1", &layers);
    dir
}

/// Deploys a one-service stack of `image` and returns its instance.
fn deploy(addr: &str, dir: &Path, name: &str, image: &str) -> Value {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, stack(name, image)).unwrap();
    let d = json(addr, &["deploy", file.to_str().unwrap()]);
    assert_eq!(d["placed"].as_array().map(Vec::len), Some(1), "{d}");
    let all = json(addr, &["instance", "ls"]);
    all.as_array()
        .unwrap()
        .iter()
        .find(|i| i["stack"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no instance of {name}: {all}"))
}

/// The guest disks of an instance's boot spec: layers (serial `layerN`, bottom first)
/// and the scratch device.
fn disks(instance: &Value) -> Vec<Disk> {
    let mut layers = 0;
    let mut out = Vec::new();
    for d in instance["disks"].as_array().expect("disks") {
        let serial = match d["role"].as_str().unwrap() {
            "layer" => {
                layers += 1;
                format!("layer{}", layers - 1)
            }
            "scratch" => "scratch".to_string(),
            other => panic!("unexpected disk role {other}: {d}"),
        };
        out.push(Disk {
            serial,
            source: Source::from_uri(d["uri"].as_str().unwrap()),
            read_only: d["read_only"].as_bool().unwrap(),
        });
    }
    out
}

/// The script run in the guest: the manifest of the merged root, then `extra`.
fn script(extra: &str) -> String {
    format!(
        "{}\ntide-manifest /merged\necho \"rc=$?\"\n{}\n{extra}\n",
        begin("manifest"),
        end("manifest")
    )
}

/// Boots the instance's disks with `script`, compares the guest's manifest with the
/// host's of the instance root, and returns the run.
fn boot_and_compare(
    kernel: &Kernel,
    t: &Path,
    name: &str,
    inst: &Value,
    script: &str,
) -> tests::guest::Run {
    boot_disks_and_compare(kernel, t, name, inst, disks(inst), script)
}

/// As [`boot_and_compare`], with the instance's disks given (over another transport).
fn boot_disks_and_compare(
    kernel: &Kernel,
    t: &Path,
    name: &str,
    inst: &Value,
    disks: Vec<Disk>,
    script: &str,
) -> tests::guest::Run {
    let root = Path::new(inst["root"].as_str().unwrap());
    let meta = std::fs::symlink_metadata(root).unwrap();
    assert!(
        disks
            .iter()
            .filter(|d| d.serial.starts_with("layer"))
            .all(|d| d.read_only)
    );
    let guest = Guest {
        kernel: kernel.clone(),
        initrd: initramfs(kernel, script, &t.join(format!("{name}.cpio"))),
        disks,
        append: Guest::root_param(
            meta.mode(),
            meta.uid(),
            meta.gid(),
            meta.mtime(),
            meta.mtime_nsec(),
        ),
        memory_mib: 512,
        vcpus: 1,
        dir: t.join(format!("{name}-qemu")),
        control: None,
    };
    let run = guest.boot(Duration::from_secs(600));
    eprintln!("{name}: booted and powered off in {:?}", run.elapsed);
    let got = run.section("manifest");
    let (got, rc) = got.rsplit_once("rc=").expect("the manifest's exit code");
    assert_eq!(
        rc.trim(),
        "0",
        "tide-manifest failed in the guest:\n{}",
        run.tail()
    );
    let want = guest::manifest::to_string(root).unwrap();
    let diff = guest::manifest::diff(&want, got);
    assert!(
        diff.is_empty(),
        "{name}: the guest's root differs from the host's in {} lines, first:\n{}",
        diff.len(),
        diff[..diff.len().min(30)].join("\n")
    );
    eprintln!("{name}: {} entries identical", want.lines().count());
    run
}

#[test]
fn layers_boot_a_real_guest_kernel_identical_to_the_store() {
    let tmp = tests::tmpdir("tide-guest-erofs");
    let t = tmp.path();
    let _unmount = UnmountBelow(t.to_path_buf());
    let kernel = Kernel::get();
    let flask = tests::oci::debian_three_layers(&t.join("work"), &t.join("oci"), "flask:3");
    let corners = t.join("corners");
    tests::fixture::corners(&corners);

    let sched = Sched::start(t.join("sched"), t.join("sched.sock"), &[]);
    let addr = sched.addr();
    let host = Volumed::start_with(t.join(HOST), t.join("host.sock"), &host_args(&addr));
    let tide = host.tide();
    let r = tide.json(&["image", "import", flask.to_str().unwrap()]);
    assert_eq!(r["name"], "flask:3", "{r}");
    tide.ok(&[
        "image",
        "import",
        corners.to_str().unwrap(),
        "--name",
        "corners:1",
    ]);
    let opaque = opaque_image(t);
    let r = tide.json(&["image", "import", opaque.to_str().unwrap()]);
    assert_eq!(r["name"], "opaque:1", "{r}");
    wait_for(30, "the host up with both images", || {
        let h = json(&addr, &["host", "ls"]);
        let up = h
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["id"] == HOST && h["layer_bytes"].as_u64() > Some(100 << 20));
        if up { Ok(()) } else { Err(h.to_string()) }
    });

    // The three Debian layers: whiteouts, an opaque directory, and Python importing
    // flask from the merged root.
    let inst = deploy(&addr, t, "debian", "flask:3");
    assert_eq!(disks(&inst).len(), 4, "three layers and a scratch: {inst}");
    let run = boot_and_compare(
        &kernel,
        t,
        "debian",
        &inst,
        &script(&format!(
            "{}\nchroot /merged /usr/bin/python3 -B -c 'import flask, sys; print(\"flask\", flask.__name__, sys.version_info[0])'\necho \"rc=$?\"\n{}",
            begin("python"),
            end("python")
        )),
    );
    let py = run.section("python");
    assert!(
        py.contains("flask flask 3\nrc=0"),
        "python3 in the guest:\n{py}"
    );
    // A deletion (python3's layer deletes /usr/share/man, of which flask's brings back
    // only the pages its packages install) and an opaque directory (flask's
    // /usr/share/doc hides minbase's documentation) took effect on both sides.
    let root = Path::new(inst["root"].as_str().unwrap());
    let count = |dir: &Path| -> usize {
        sh(&format!("find {} | wc -l", dir.display()))
            .trim()
            .parse()
            .unwrap()
    };
    let python3 = tests::roots::debian_root("python3");
    let (before, after) = (
        count(&python3.join("usr/share/man")),
        count(&root.join("usr/share/man")),
    );
    assert!(
        after * 2 < before,
        "usr/share/man: {after} entries left of {before}"
    );
    let manifest = run.section("manifest");
    let in_guest = manifest
        .lines()
        .filter(|l| l.starts_with("/usr/share/man/"))
        .count();
    assert_eq!(in_guest + 1, after, "the guest's /usr/share/man");

    // The same disks over vhost-user-blk, each export on a socket of its own with the
    // serial as its GET_ID: the guest's manifest is the same.
    let vhost: Vec<Disk> = disks(&inst)
        .into_iter()
        .map(|d| {
            let Source::Nbd { export, .. } = &d.source else {
                panic!("an NBD disk: {d:?}")
            };
            let socket = tide.ok(&["volume", "vhost-user", "serve", export, "--id", &d.serial]);
            Disk {
                source: Source::VhostUser(socket.trim().into()),
                ..d
            }
        })
        .collect();
    let vrun = boot_disks_and_compare(
        &kernel,
        t,
        "debian-vhost",
        &inst,
        vhost.clone(),
        &script(""),
    );
    assert_eq!(
        vrun.section("manifest"),
        manifest,
        "over vhost-user and over NBD"
    );
    for d in disks(&inst) {
        let Source::Nbd { export, .. } = &d.source else {
            unreachable!()
        };
        tide.ok(&["volume", "vhost-user", "stop", export]);
    }
    let left = tide.json(&["volume", "vhost-user", "ls", "--json"]);
    assert_eq!(left, serde_json::json!([]), "sockets left: {left}");

    // `tide layer erofs` writes the bytes the exports serve: fsck.erofs accepts each
    // layer's image, and a second write (from the daemon's cache) is the same file.
    for (i, d) in inst["disks"].as_array().unwrap().iter().enumerate() {
        if d["role"] != "layer" {
            continue;
        }
        let layer = d["layer"].as_str().unwrap();
        let (a, b) = (
            t.join(format!("l{i}.erofs")),
            t.join(format!("l{i}-again.erofs")),
        );
        for f in [&a, &b] {
            let r = tide.json(&["layer", "erofs", &layer[..19], "--to", f.to_str().unwrap()]);
            assert_eq!(r["layer"], layer, "{r}");
            assert_eq!(r["bytes"].as_u64(), d["size"].as_u64(), "{r}");
        }
        assert!(
            std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
            "layer {i} differs between writes"
        );
        let fsck = std::process::Command::new("fsck.erofs")
            .arg(&a)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "fsck.erofs {}: {}",
            a.display(),
            String::from_utf8_lossy(&fsck.stderr)
        );
        std::fs::remove_file(&a).unwrap();
        std::fs::remove_file(&b).unwrap();
    }
    let bad = tide.fails(&[
        "layer",
        "erofs",
        "sha256:ffff",
        "--to",
        t.join("x.erofs").to_str().unwrap(),
    ]);
    assert!(bad.contains("ffff"), "{bad}");
    assert!(!t.join("x.erofs").exists());

    // An opaque directory and a whiteout, small enough to name every entry.
    let inst = deploy(&addr, t, "opaque", "opaque:1");
    let run = boot_and_compare(&kernel, t, "opaque", &inst, &script(""));
    let manifest = run.section("manifest");
    let paths: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.split('\t').next())
        .filter(|p| p.starts_with("/srv") || p.starts_with("/etc"))
        .collect::<Vec<_>>();
    assert_eq!(
        paths,
        [
            "/etc",
            "/etc/stays",
            "/srv",
            "/srv/app",
            "/srv/app/new.conf"
        ],
        "{}",
        run.tail()
    );

    // The corner cases, and a capability the guest kernel honours.
    let inst = deploy(&addr, t, "corners", "corners:1");
    let run = boot_and_compare(
        &kernel,
        t,
        "corners",
        &inst,
        &script(&format!(
            "{b}\ntide-manifest --as-user 1000 /merged/bin/busybox-cap cat /merged/secret\necho \"rc=$?\"\n{e}\n{b2}\ntide-manifest --as-user 1000 /merged/bin/busybox-plain cat /merged/secret\necho \"rc=$?\"\n{e2}",
            b = begin("cap"),
            e = end("cap"),
            b2 = begin("nocap"),
            e2 = end("nocap"),
        )),
    );
    assert_eq!(
        run.section("cap"),
        "only root reads this\nrc=0\n",
        "{}",
        run.tail()
    );
    let nocap = run.section("nocap");
    assert!(
        nocap.contains("Permission denied") && !nocap.contains("rc=0"),
        "without the capability user 1000 must not read the secret:\n{nocap}"
    );

    // Instances removed: their scratch devices go, nothing stays mounted.
    for s in ["debian", "opaque", "corners"] {
        json(&addr, &["stack", "rm", s]);
    }
    let left = sh(&format!(
        "findmnt -rn -o TARGET | grep -F {} || true",
        t.display()
    ));
    eprintln!("mounted after removal: {left:?}");
    drop(host);
    drop(sched);
}

/// The harness alone: the kernel boots the initramfs, the init runs the script and
/// powers off, and the script's sections come back.
#[test]
fn a_guest_boots_runs_its_script_and_powers_off() {
    let tmp = tests::tmpdir("tide-guest-smoke");
    let t = tmp.path();
    let kernel = Kernel::get();
    let guest = Guest {
        kernel: kernel.clone(),
        initrd: initramfs(
            &kernel,
            &format!(
                "{}\necho hello from $(cat /proc/sys/kernel/osrelease)\n{}",
                begin("hi"),
                end("hi")
            ),
            &t.join("smoke.cpio"),
        ),
        disks: Vec::new(),
        append: String::new(),
        memory_mib: 512,
        vcpus: 1,
        dir: t.join("qemu"),
        control: None,
    };
    let run = guest.boot(Duration::from_secs(120));
    assert_eq!(
        run.section("hi"),
        format!("hello from {}\n", kernel.version)
    );
    assert!(run.output.contains("tide-init: done"), "{}", run.tail());
}
