//! In-process volume I/O costs, without NBD: sequential 1 MiB writes and reads, then
//! random 4 KiB writes and reads with 1 and 2 threads (or the given count), on a fresh
//! store in a temporary directory under DIR (default /var/tmp), then what a snapshot
//! costs with small writes pending (it folds them) and with none. The numbers say what
//! the store alone allows before a protocol is in the way; the NBD benchmark is the
//! headline. BUDGET_MIB sets the small-write journal's memory budget.
//!
//! `cargo run -p castore --example volume_io -- [DIR] [MiB] [threads] [seconds] [BUDGET_MIB]`

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
    let threads: Vec<u64> = args
        .next()
        .map_or(vec![1, 2], |v| vec![v.parse().expect("threads")]);
    let secs: u64 = args.next().map_or(5, |v| v.parse().expect("seconds"));
    let budget: Option<usize> = args.next().map(|v| v.parse::<usize>().expect("MiB") << 20);
    let tmp = tempfile_dir(&dir);
    let store = Arc::new(Store::open(&tmp).expect("open store"));
    if let Some(b) = budget {
        store.set_volume_journal_budget(b);
    }
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

    let runs = threads
        .iter()
        .flat_map(|&t| [("write", true, t), ("read", false, t)]);
    for (name, write, threads) in runs {
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
            "random 4 KiB {name}: {:.0} IOPS ({threads} threads; {} MiB of small writes pending)",
            ops.load(Ordering::Relaxed) as f64 / secs as f64,
            store.volume_journal_bytes() >> 20
        );
    }
    let pending = store.volume_journal_bytes() >> 20;
    let t = Instant::now();
    store.snapshot_volume("bench", "a").expect("snapshot");
    let folded = t.elapsed();
    let t = Instant::now();
    store.snapshot_volume("bench", "b").expect("snapshot");
    store.clone_volume("bench", "b", "copy").expect("clone");
    println!(
        "snapshot folding {pending} MiB pending: {:.1} ms; snapshot + clone with none pending: {:.2} ms",
        folded.as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64() * 1e3
    );
    drop(vol);
    drop(store);
    let _ = std::fs::remove_dir_all(&tmp);
}

fn tempfile_dir(base: &str) -> std::path::PathBuf {
    let p = std::path::Path::new(base).join(format!("volume-io-{}", std::process::id()));
    std::fs::create_dir_all(&p).expect("create temp dir");
    p
}
