//! fsx-style random operation sequences run on a mount and on a plain directory holding
//! the same files, in lock step: every result (data or errno) must be identical.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

use common::{Env, sh};

/// A small xorshift generator: the sequence is reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const NAMES: [&str; 6] = ["a", "b", "d/c", "d/e", "f", "d"];

/// One random operation on `root`; returns what it observed.
fn step(root: &Path, op: u64, arg: u64, n1: &str, n2: &str) -> String {
    let p1 = root.join(n1);
    let p2 = root.join(n2);
    let code = |r: std::io::Result<()>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(-1)),
    };
    match op {
        0 => {
            let data = vec![(arg % 251) as u8; (arg % 70_000) as usize];
            code(
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&p1)
                    .and_then(|f| f.write_all_at(&data, arg % 300_000)),
            )
        }
        1 => code(
            OpenOptions::new()
                .write(true)
                .open(&p1)
                .and_then(|f| f.set_len(arg % 200_000)),
        ),
        2 => match std::fs::read(&p1) {
            Ok(b) => format!("read {} {}", b.len(), castore::Digest::of(&b)),
            Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(-1)),
        },
        3 => code(std::fs::rename(&p1, &p2)),
        4 => code(std::fs::remove_file(&p1)),
        5 => code(std::fs::hard_link(&p1, &p2)),
        6 => code(std::fs::create_dir(&p1)),
        7 => code(std::fs::remove_dir(&p1)),
        8 => code(std::fs::set_permissions(
            &p1,
            std::fs::Permissions::from_mode((arg % 0o1000) as u32),
        )),
        _ => match std::fs::symlink_metadata(&p1) {
            Ok(m) => format!(
                "stat mode {:o} size {} nlink {}",
                m.mode(),
                if m.is_dir() { 0 } else { m.size() },
                m.nlink()
            ),
            Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(-1)),
        },
    }
}

#[test]
fn random_operations_match_a_plain_directory() {
    let env = Env::new("layerfs-lockstep");
    let src = env.path("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("a"), vec![1u8; 100_000]).unwrap();
    std::fs::write(src.join("d/c"), b"lower c").unwrap();
    std::fs::hard_link(src.join("a"), src.join("d/e")).unwrap();
    let img = env.import(&src, "ls:1");
    let reference = env.path("ref");
    sh(&format!("cp -a {} {}", src.display(), reference.display()));
    let m = env.mount(img, "mnt", false);
    // Guards against a sequence that only ever fails the same way on both sides.
    let mut succeeded = 0;
    for seed in 1..=4u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for i in 0..400 {
            let op = rng.below(10);
            let arg = rng.next();
            let n1 = NAMES[rng.below(NAMES.len() as u64) as usize];
            let n2 = NAMES[rng.below(NAMES.len() as u64) as usize];
            let want = step(&reference, op, arg, n1, n2);
            let got = step(m.mountpoint(), op, arg, n1, n2);
            succeeded += usize::from(!got.starts_with("errno"));
            assert_eq!(
                got, want,
                "seed {seed} step {i}: op {op} on {n1} {n2} (arg {arg})"
            );
        }
    }
    assert!(succeeded > 400, "only {succeeded} operations succeeded");
    m.unmount().unwrap();
}
