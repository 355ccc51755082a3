//! Volumes over vhost-user-blk through the real `volumed`: `tide volume attach
//! --vhost-user` serves an rwo volume's attachment on a socket, a snapshot is served
//! read-only with `tide volume vhost-user serve`, and a QEMU guest (TCG, Debian's cloud
//! kernel) uses both through `vhost-user-blk-pci`:
//!
//! - what the host wrote over NBD, the guest reads over vhost-user;
//! - the guest writes rounds of data, each flushed (`conv=fsync`) before it prints the
//!   round's digest; volumed is killed -9 after the third round and started again on
//!   the same data directory; QEMU reconnects, the guest carries on, and every round it
//!   acknowledged is read back over NBD (`nbdcopy`) byte for byte, then `tide fsck`;
//! - the snapshot refuses the guest's writes;
//! - while the socket holds the rwo volume, a second attachment and an NBD connection
//!   are refused naming the holder; detaching stops the socket and frees the volume;
//! - a device id over 20 bytes and an export that does not exist are refused.
//!
//! Needs root, QEMU, busybox-static, libnbd-bin and the kernel cache
//! (`scripts/fetch-kernel`, run here when missing). About 40 s under TCG.

use std::path::Path;
use std::time::{Duration, Instant};

use tests::guest::{Disk, Guest, Kernel, Source, begin, end, initramfs};
use tests::nbd::{ok, random_file};
use tests::volumed::Volumed;

const MIB: u64 = 1 << 20;
const ROUNDS: usize = 8;
const ROUND: u64 = 256 << 10;

fn start(dir: &Path) -> Volumed {
    Volumed::start(dir.join("data"), dir.join("volumed.sock"))
}

/// The hex SHA-256 `sha256sum` prints.
fn sha256(data: &[u8]) -> String {
    castore::Digest::of(data).to_hex()
}

#[test]
fn a_guest_keeps_its_acknowledged_writes_across_a_kill_of_volumed() {
    let t = tests::tmpdir("vhost-user");
    let d = start(t.path());
    let tide = d.tide();
    tide.ok(&["volume", "create", "db", "--size", "64M"]);
    let seed = t.path().join("seed");
    let seed_bytes = random_file(&seed, MIB as usize, 7);
    ok("nbdcopy", &[seed.to_str().unwrap(), &d.nbd_uri("db")]);
    tide.ok(&["volume", "snapshot", "db", "s1"]);

    let long = tide.fails(&[
        "volume",
        "vhost-user",
        "serve",
        "db@s1",
        "--id",
        &"x".repeat(21),
    ]);
    assert!(long.contains("longer than 20 bytes"), "{long}");
    let unknown = tide.fails(&["volume", "vhost-user", "serve", "nosuch"]);
    assert!(unknown.contains("nosuch"), "{unknown}");
    let att = tide.json(&[
        "volume",
        "attach",
        "db",
        "--holder",
        "vm1",
        "--vhost-user",
        "--id",
        "db",
        "--json",
    ]);
    let export = att["export_name"].as_str().unwrap().to_string();
    let socket = att["vhost_user_socket"].as_str().unwrap().to_string();
    let snap_socket = tide.ok(&["volume", "vhost-user", "serve", "db@s1", "--id", "snap"]);
    let snap_socket = snap_socket.trim().to_string();

    // The socket holds the rwo volume: nobody else gets it.
    let refused = tide.fails(&["volume", "attach", "db", "--holder", "other"]);
    assert!(refused.contains("vm1"), "{refused}");
    let nbd = std::process::Command::new("nbdinfo")
        .arg(d.nbd_uri("db"))
        .output()
        .unwrap();
    assert!(!nbd.status.success(), "an NBD client got the held volume");
    let twice = tide.fails(&["volume", "vhost-user", "serve", "db"]);
    assert!(twice.contains("in use"), "{twice}");
    let ls = tide.json(&["volume", "vhost-user", "ls", "--json"]);
    assert_eq!(ls.as_array().unwrap().len(), 2, "{ls}");

    let script = format!(
        r#"
for b in /sys/block/vd*; do
  case "$(cat $b/serial)" in
    db) db=/dev/${{b##*/}} ;;
    snap) snap=/dev/${{b##*/}} ;;
  esac
done
{b_read}
busybox dd if=$db bs=65536 count=16 2>/dev/null | busybox sha256sum
busybox dd if=$snap bs=65536 count=16 2>/dev/null | busybox sha256sum
{e_read}
{b_rounds}
i=0
while [ $i -lt {ROUNDS} ]; do
  busybox dd if=/dev/urandom of=/r bs={ROUND} count=1 2>/dev/null
  if busybox dd if=/r of=$db bs={ROUND} seek=$((8 + i)) conv=fsync 2>/dev/null; then
    echo "round $i $(busybox sha256sum /r | busybox cut -c1-64)"
  else
    echo "round $i failed"
  fi
  i=$((i+1))
done
{e_rounds}
{b_ro}
busybox dd if=/r of=$snap bs=4096 count=1 conv=fsync 2>/dev/null && echo wrote-snapshot || echo refused
{e_ro}
"#,
        b_read = begin("read"),
        e_read = end("read"),
        b_rounds = begin("rounds"),
        e_rounds = end("rounds"),
        b_ro = begin("ro"),
        e_ro = end("ro"),
    );
    let kernel = Kernel::get();
    let guest = Guest {
        kernel: kernel.clone(),
        initrd: initramfs(&kernel, &script, &t.path().join("initrd")),
        disks: vec![
            Disk {
                serial: "db".into(),
                source: Source::VhostUser(socket.clone().into()),
                read_only: false,
            },
            Disk {
                serial: "snap".into(),
                source: Source::VhostUser(snap_socket.clone().into()),
                read_only: true,
            },
        ],
        append: String::new(),
        memory_mib: 256,
        vcpus: 1,
        dir: t.path().join("guest"),
        control: None,
    };
    let running = guest.spawn();
    // Kill volumed once the guest has acknowledged three rounds, then start it again.
    let output = t.path().join("guest/output");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&output)
        .unwrap_or_default()
        .contains("round 2 ")
    {
        assert!(Instant::now() < deadline, "the guest never wrote 3 rounds");
        std::thread::sleep(Duration::from_millis(20));
    }
    d.signal_and_wait(libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(500));
    let d = start(t.path());
    let run = running.wait(Duration::from_secs(180));

    let read = run.section("read");
    let sums: Vec<&str> = read.lines().map(|l| &l[..64]).collect();
    assert_eq!(sums, [sha256(&seed_bytes), sha256(&seed_bytes)], "{read}");

    let rounds = run.section("rounds");
    let acked: Vec<(u64, String)> = rounds
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (_, i, sum) = (w.next()?, w.next()?, w.next()?);
            (sum != "failed").then(|| (i.parse().unwrap(), sum.to_string()))
        })
        .collect();
    assert!(acked.len() >= 3, "{rounds}");
    assert_eq!(
        acked.len(),
        ROUNDS,
        "every round got through after the restart: {rounds}"
    );
    let ro = run.section("ro");
    assert!(ro.contains("refused"), "{ro}");

    // Both volumeds served the guest: QEMU reconnected to the restored socket.
    let log = d.log_text();
    let connected = format!("vhost-user {export}: front end connected");
    assert_eq!(log.matches(&connected).count(), 2, "{log}");
    assert!(
        log.contains(&format!("serving {export} on")),
        "not restored: {log}"
    );
    // Read back what the guest acknowledged, over NBD, after stopping the socket.
    d.tide().ok(&["volume", "vhost-user", "stop", &export]);
    let back = t.path().join("back");
    ok("nbdcopy", &[&d.nbd_uri(&export), back.to_str().unwrap()]);
    let bytes = std::fs::read(&back).unwrap();
    for (i, sum) in &acked {
        let at = ((8 + i) * ROUND) as usize;
        let round = &bytes[at..at + ROUND as usize];
        assert_eq!(&sha256(round), sum, "round {i} after the kill");
    }
    assert!(
        seed_bytes == bytes[..MIB as usize],
        "the data below the rounds changed"
    );
    d.tide().ok(&["volume", "detach", "db"]);
    assert!(!Path::new(&socket).exists(), "detach left the socket");
    d.tide()
        .ok(&["volume", "attach", "db", "--holder", "other"]);
    let fsck = d.tide().ok(&["fsck"]);
    assert!(fsck.contains("store is consistent"), "{fsck}");
}
