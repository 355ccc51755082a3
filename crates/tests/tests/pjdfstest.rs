//! pjdfstest on a layerfs mount (through `volumed` and `tide`) against the same suite on
//! the disk, kernel overlayfs and fuse-overlayfs over the same lower directory, run side
//! by side: every test that passes on kernel overlayfs passes on our mount, and none that
//! passes on the disk fails on it (skips aside: see `Run::failures_from`).
//! It runs with every feature Linux has (more tests run, none fewer than with the base
//! set). Missing pjdfstest, the `tests` user or FUSE fail this test; they never skip it.

use tests::pjdfs::{self, DEFAULT_NAPTIME, LINUX_FEATURES, Targets};

#[test]
fn layerfs_passes_every_pjdfstest_case_kernel_overlayfs_and_the_disk_pass() {
    pjdfs::binary();
    pjdfs::check_users();
    let targets = Targets::new();
    let runs = targets.run_all(DEFAULT_NAPTIME, LINUX_FEATURES);
    drop(targets);
    eprintln!("{}", pjdfs::table(&runs, false));
    let (disk, overlay, ours) = (&runs[0], &runs[1], &runs[3]);
    for run in &runs {
        assert!(
            run.results.len() > 300,
            "pjdfstest on {} ran only {} tests: {}",
            run.target,
            run.results.len(),
            run.summary
        );
    }
    for (peer, worse) in [
        (overlay, ours.regressions_from(overlay)),
        (disk, ours.failures_from(disk)),
    ] {
        assert!(
            worse.is_empty(),
            "{} pjdfstest cases pass on {} but not on layerfs:\n{}",
            worse.len(),
            peer.target,
            worse
                .iter()
                .map(|t| ours.reason(t))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
