//! In-process volume I/O costs, without NBD: sequential 1 MiB writes and reads, then
//! random 4 KiB writes and reads from several threads, on a fresh store in a temporary
//! directory under DIR (default /var/tmp). The numbers say what the store alone allows
//! before a protocol is in the way; the NBD benchmark is the headline.
//!
//! `cargo run -p castore --example volume_io -- [DIR] [MiB] [threads] [seconds]`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use castore::{Store, VolumeSpec};

fn noise(seed: u64, buf: &mut [u8]) {
    let mut x = seed | 1;
    for b in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "/var/tmp".into());
    let mib: u64 = args.next().map_or(256, |v| v.parse().expect("MiB"));
    let threads: u64 = args.next().map_or(2, |v| v.parse().expect("threads"));
    let secs: u64 = args.next().map_or(5, |v| v.parse().expect("seconds"));
    let tmp = tempfile_dir(&dir);
    let store = Arc::new(Store::open(&tmp).expect("open store"));
    let size = mib << 20;
    store
        .create_volume(&VolumeSpec::new("bench", size))
        .expect("create");
    let vol = store.open_volume("bench").expect("open");

    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    for i in 0..mib {
        noise(i + 1, &mut buf);
        // Half of each MiB is zeros, so it compresses like ordinary data rather than noise.
        buf[..1 << 19].fill(0);
        buf[1] = 1;
        vol.write(i << 20, &buf, false).expect("write");
    }
    vol.flush().expect("flush");
    let w = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..mib {
        vol.read_at(i << 20, &mut buf).expect("read");
    }
    let r = t.elapsed().as_secs_f64();
    println!(
        "sequential 1 MiB: write {:.0} MiB/s, read {:.0} MiB/s ({mib} MiB)",
        mib as f64 / w,
        mib as f64 / r
    );

    for (name, write) in [("write", true), ("read", false)] {
        let ops = AtomicU64::new(0);
        let stop = Instant::now() + Duration::from_secs(secs);
        std::thread::scope(|s| {
            for th in 0..threads {
                let vol = vol.clone();
                let ops = &ops;
                s.spawn(move || {
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ th;
                    let mut b = [0u8; 4096];
                    while Instant::now() < stop {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let off = (x % (size / 4096)) * 4096;
                        if write {
                            noise(x, &mut b);
                            vol.write(off, &b, false).expect("write");
                        } else {
                            vol.read_at(off, &mut b).expect("read");
                        }
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        println!(
            "random 4 KiB {name}: {:.0} IOPS ({threads} threads)",
            ops.load(Ordering::Relaxed) as f64 / secs as f64
        );
    }
    drop(vol);
    drop(store);
    let _ = std::fs::remove_dir_all(&tmp);
}

fn tempfile_dir(base: &str) -> std::path::PathBuf {
    let p = std::path::Path::new(base).join(format!("volume-io-{}", std::process::id()));
    std::fs::create_dir_all(&p).expect("create temp dir");
    p
}
