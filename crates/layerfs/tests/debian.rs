//! A real Debian root (minbase + python3) imported, mounted and used as a chroot: the
//! mounted tree equals the source, `dpkg -l`, Python and a shell that writes to /tmp
//! work, and a remount shows none of the writes.

mod common;

use common::{Env, sh};

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
    m.unmount().unwrap();
    let m = env.mount(img, "mnt", true);
    assert!(!m.mountpoint().join("tmp/x").exists());
    tests::fstree::assert_same(&src, m.mountpoint());
    drop(m);
}
