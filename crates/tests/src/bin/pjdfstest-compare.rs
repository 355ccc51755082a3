//! Runs pjdfstest on the disk, kernel overlayfs, fuse-overlayfs and a layerfs mount (all
//! over the same lower directory, in one run) and prints the counts and every test whose
//! outcome differs, side by side. Needs root, /dev/fuse, fuse-overlayfs, pjdfstest and
//! the `tests` user (`.ci/run` installs them) and the `tide` and `volumed` binaries:
//!
//! ```text
//! cargo build --workspace --bins && cargo run -p tests --bin pjdfstest-compare \
//!     [-- [--all] [--linux] [--naptime S]]
//! ```
//!
//! `--all` lists every test, not only those whose outcomes differ; `--linux` also turns
//! on the features Linux has beyond pjdfstest's base set (see `pjdfs::LINUX_FEATURES`).

use tests::pjdfs::{self, BASE_FEATURES, DEFAULT_NAPTIME, LINUX_FEATURES, Targets};

fn main() {
    let mut all = false;
    let mut features = BASE_FEATURES;
    let mut naptime = DEFAULT_NAPTIME;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--all" => all = true,
            "--linux" => features = LINUX_FEATURES,
            "--naptime" => {
                naptime = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| usage("--naptime needs a number of seconds"))
            }
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    pjdfs::binary();
    pjdfs::check_users();
    let targets = Targets::new();
    let runs = targets.run_all(naptime, features);
    drop(targets);
    println!(
        "pjdfstest {} (naptime {naptime} s, features {})\n",
        pjdfs::binary().display(),
        features.join(", ")
    );
    print!("{}", pjdfs::table(&runs, all));
    let (overlay, ours) = (&runs[1], &runs[3]);
    let worse = ours.regressions_from(overlay);
    if !worse.is_empty() {
        println!("\npassed on kernel overlayfs but not on layerfs:");
        for t in &worse {
            println!("{}", ours.reason(t));
        }
        std::process::exit(1);
    }
}

fn usage(why: &str) -> ! {
    eprintln!(
        "pjdfstest-compare: {why}\nusage: pjdfstest-compare [--all] [--linux] [--naptime SECONDS]"
    );
    std::process::exit(2);
}
