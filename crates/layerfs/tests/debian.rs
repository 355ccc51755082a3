//! A real Debian root (minbase + python3) imported, mounted and used as a chroot: the
//! mounted tree equals the source, `dpkg -l`, Python and a shell that writes to /tmp
//! work, `apt-get install` of a package from the Debian mirror writes into scratch, and a
//! remount shows none of the writes.

mod common;

use std::path::{Path, PathBuf};

use common::{Env, sh};

/// Bind mounts of the host's /proc, /dev and /dev/pts into a chroot, which apt and dpkg
/// need; unmounted (innermost first) on drop, so a failing test does not leave the FUSE
/// mount busy.
struct Binds(Vec<PathBuf>);

impl Binds {
    fn new(root: &Path) -> Binds {
        let mut binds = Binds(Vec::new());
        for d in ["proc", "dev", "dev/pts"] {
            let at = root.join(d);
            sh(&format!("mount --bind /{d} {}", at.display()));
            binds.0.push(at);
        }
        binds
    }
}

impl Drop for Binds {
    fn drop(&mut self) {
        for at in self.0.drain(..).rev() {
            let _ = std::process::Command::new("umount").arg(&at).status();
        }
    }
}

#[test]
fn debian_root_runs_in_a_chroot_and_remounts_pristine() {
    let src = tests::roots::debian_root("python3");
    let env = Env::new("layerfs-debian");
    let img = env.import(&src, "deb:m");
    let start = std::time::Instant::now();
    let m = env.mount(img, "mnt", false);
    eprintln!("mount took {:?}", start.elapsed());
    let r = m.mountpoint().display().to_string();
    let dpkg = sh(&format!("chroot {r} /usr/bin/dpkg -l"));
    assert!(
        dpkg.lines().any(|l| l.starts_with("ii  dpkg ")),
        "dpkg -l did not list dpkg:\n{dpkg}"
    );
    let out = sh(&format!(
        "chroot {r} /bin/sh -c 'echo hi > /tmp/x && cat /tmp/x && mkdir -p /var/lib/t && \
         cp /usr/bin/dpkg /var/lib/t/ && /var/lib/t/dpkg --version >/dev/null && \
         mv /etc/hostname /etc/hostname.old && ln -s /etc/passwd /etc/pw && rm -rf /usr/share/doc'"
    ));
    assert_eq!(out, "hi\n");
    let py = sh(&format!(
        "chroot {r} /usr/bin/python3 -c 'import json, sqlite3, hashlib; \
         print(json.dumps(sqlite3.connect(\":memory:\").execute(\"select 6*7\").fetchone()))'"
    ));
    assert_eq!(py, "[42]\n");

    // apt as a user runs it: downloads (as the `_apt` user), dpkg's unpack and rename
    // dance, maintainer scripts. The host's resolver makes the mirror reachable.
    assert!(!m.mountpoint().join("usr/bin/hello").exists());
    std::fs::copy("/etc/resolv.conf", m.mountpoint().join("etc/resolv.conf"))
        .expect("copy resolv.conf into the chroot");
    let binds = Binds::new(m.mountpoint());
    let hello = sh(&format!(
        "chroot {r} /bin/sh -c 'export DEBIAN_FRONTEND=noninteractive; \
         apt-get update -q >/dev/null && apt-get install -y -q hello >/dev/null && \
         dpkg -s hello | grep \"^Status:\" && hello'"
    ));
    assert_eq!(
        hello, "Status: install ok installed\nHello, world!\n",
        "apt-get install hello"
    );
    drop(binds);

    m.unmount().unwrap();
    let m = env.mount(img, "mnt", true);
    assert!(!m.mountpoint().join("tmp/x").exists());
    assert!(!m.mountpoint().join("usr/bin/hello").exists());
    let gone = std::process::Command::new("chroot")
        .arg(m.mountpoint())
        .args(["dpkg", "-s", "hello"])
        .output()
        .expect("spawn chroot");
    assert!(
        !gone.status.success(),
        "hello still installed after remount"
    );
    tests::fstree::assert_same(&src, m.mountpoint());
    drop(m);
}
