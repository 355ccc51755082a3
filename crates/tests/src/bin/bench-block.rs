//! `bench-block`: layers as block devices (volumed's `layer/DIGEST` EROFS exports,
//! synthesized from the store) against `mkfs.erofs` images of the same trees.
//!
//! **Synthesis.** For each of the three Debian roots of [`tests::roots`] (minbase,
//! python3, flask), the root is imported into a fresh `volumed` as one layer
//! (`tide layer import`). "First byte" is then measured with the daemon just restarted
//! (SIGTERM, start again: no image synthesized, chunk cache empty): from connecting to
//! `DATA/nbd.sock` until the first 4 KiB block of `layer/DIGEST` has arrived (handshake
//! with `NBD_OPT_GO`, synthesis on open, one `NBD_CMD_READ`). The peer is `mkfs.erofs
//! IMAGE ROOT` (erofs-utils, default options: uncompressed, small files and tails
//! inlined in the metadata), timed from spawn to exit; its image size is shown beside
//! ours. Our images never inline file bytes (the metadata is built without reading
//! any file: every file is `FLAT_PLAIN`, its tail in a block of its own), so "metadata"
//! is compared with `mkfs.erofs -Enoinline_data`, the same layout: its image's size
//! minus the blocks of file data (`ceil(size / 4096)` per distinct regular file), which
//! leaves inodes, directories, xattrs, symlink targets; ours is the synthesis's own
//! count of blocks that hold no file data (the same formula would undercount it: files
//! of equal content share their data blocks in our images). Each time is the best of
//! `--runs`.
//!
//! **Guest.** The three roots as one image of three layers (`tests::oci::
//! debian_three_layers`: minbase, +python3 with deletions, +flask with an opaque
//! directory) is imported and booted in QEMU (TCG, one vCPU, 512 MiB, the test guests'
//! kernel and init of [`tests::guest`]) served three ways:
//!
//! - `ours`: the layers' NBD exports on volumed's socket, the daemon restarted before
//!   each boot;
//! - `nbdkit`: `nbdkit file dir=...` on a Unix socket, serving `mkfs.erofs` images of each
//!   layer (made from the layer's own EROFS image, mounted read-only on the host, so the
//!   peer holds exactly the same entries, whiteouts and opaque directories included);
//! - `file`: QEMU opening those `mkfs.erofs` image files itself (the local-file limit);
//! - `nbdkit-noinline`: nbdkit serving `mkfs.erofs -Enoinline_data` images, our layout
//!   (no file bytes in the metadata, every tail in a block of its own): beside `nbdkit`,
//!   it tells what the layout costs apart from the server.
//!
//! Every boot gets a fresh 1 GiB ext4 scratch file (the overlay's upper). Before each
//! boot the host's page cache is dropped. "Boot to manifest" is from QEMU's start until
//! the guest has printed the manifest of its merged root (`tide-manifest`: every entry's
//! metadata and a SHA-256 of every file's content, so it reads the whole tree once).
//! "tar" is then, after `echo 3 > /proc/sys/vm/drop_caches` in the guest, `tar cf - -C
//! /merged . | wc -c` timed with the guest's `/proc/uptime`. The three manifests must
//! be identical, or the run fails.
//!
//! Goals (issue 11): first byte ≤ 1/20 of mkfs.erofs's time; metadata ≤ 1.1x
//! mkfs.erofs's; in-guest tar ≤ nbdkit's and ≤ 1.3x the local file's.
//!
//! Needs root, QEMU, erofs-utils, nbdkit, busybox-static, mkfs.ext4, the Debian roots
//! (built on first use) and the guest kernel (`scripts/fetch-kernel`, run when missing).
//!
//! Usage: `bench-block [--runs N] [--no-guest] [--ways LIST] [--json] [--keep]`

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use tests::bench::{Killed, render_table, run};
use tests::guest::{Disk, Guest, Kernel, Source, begin, end, initramfs};
use tests::volumed::Volumed;

const USAGE: &str = "\
usage: bench-block [--runs N] [--no-guest] [--ways LIST] [--json] [--keep]

Times the first byte of a layer's EROFS export (synthesized by volumed) against
mkfs.erofs of the same Debian root (minbase, python3, flask), compares metadata sizes,
then boots a QEMU guest on the 3-layer flask image served by volumed, by nbdkit (file
plugin, mkfs.erofs images) and from local image files, timing boot to a full manifest
and a tar of the merged root. Needs root.

  --runs N      runs per cell; the best is reported (default 3 for synthesis, and
                the same N guest boots per way)
  --no-guest    only the synthesis table
  --ways LIST   comma-separated subset of ours,nbdkit,file,nbdkit-noinline for the
                guest (default: all)
  --json        print JSON (every sample) instead of tables
  --keep        keep the work directory (printed on stderr)
  -h, --help    show this help";

const ROOTS: [&str; 3] = ["minbase", "python3", "flask"];
/// How the guest's layers may be served (see the module documentation).
const WAYS: [&str; 4] = ["ours", "nbdkit", "file", "nbdkit-noinline"];
const BLOCK: u64 = 4096;

#[derive(Debug)]
struct Options {
    runs: usize,
    guest: bool,
    ways: Vec<String>,
    json: bool,
    keep: bool,
}

impl Options {
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Self>> {
        let mut o = Options {
            runs: 3,
            guest: true,
            ways: WAYS.iter().map(|w| w.to_string()).collect(),
            json: false,
            keep: false,
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "-h" | "--help" => return Ok(None),
                "--json" => o.json = true,
                "--keep" => o.keep = true,
                "--no-guest" => o.guest = false,
                "--ways" => {
                    let v = args.next().context("--ways needs a value")?;
                    o.ways = v.split(',').map(str::to_string).collect();
                    if let Some(w) = o.ways.iter().find(|w| !WAYS.contains(&w.as_str())) {
                        bail!("unknown way `{w}` (known: {})", WAYS.join(", "));
                    }
                }
                "--runs" => {
                    let v = args.next().context("--runs needs a value")?;
                    o.runs =
                        v.parse().ok().filter(|&n| n > 0).with_context(|| {
                            format!("--runs needs a positive number, not `{v}`")
                        })?;
                }
                _ => bail!("unexpected argument `{arg}`\n\n{USAGE}"),
            }
        }
        Ok(Some(o))
    }
}

/// The daemon under test, restartable on one data directory.
struct Daemon {
    data: PathBuf,
    socket: PathBuf,
    v: Option<Volumed>,
}

impl Daemon {
    fn start(work: &Path) -> Daemon {
        let (data, socket) = (work.join("data"), work.join("volumed.sock"));
        let v = Some(Volumed::start(&data, &socket));
        Daemon { data, socket, v }
    }

    fn get(&self) -> &Volumed {
        self.v.as_ref().expect("daemon running")
    }

    /// Stops the daemon (SIGTERM) and starts it again: no image synthesized, caches cold.
    fn restart(&mut self) {
        if let Some(v) = self.v.take() {
            v.signal_and_wait(libc::SIGTERM);
        }
        self.v = Some(Volumed::start(&self.data, &self.socket));
    }

    fn tide_json(&self, args: &[&str]) -> Value {
        self.get().tide().json(args)
    }
}

/// Seconds from connecting to the daemon's NBD socket until block 0 of `export` arrived.
fn first_byte(d: &Daemon, export: &str) -> Result<f64> {
    let t = Instant::now();
    let (mut s, size, _) = tests::nbd::connect(&d.data.join("nbd.sock"), export, true);
    ensure!(size >= BLOCK, "{export} is only {size} bytes");
    std::io::Write::write_all(&mut s, &tests::nbd::request(0, 0, 1, 0, BLOCK as u32))?;
    let (err, data) = tests::nbd::reply(&mut s, true, 1)?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(err == 0, "reading block 0 of {export}: NBD error {err}");
    // An OFFSET_DATA chunk: 8 bytes of offset, then the block.
    ensure!(
        data.len() == 8 + BLOCK as usize,
        "short read of {export}: {} bytes",
        data.len()
    );
    Ok(secs)
}

/// Bytes of the data blocks the distinct regular files below `root` take when every
/// file's tail has a block of its own (`ceil(size / 4096)` blocks each).
fn data_blocks_bytes(root: &Path) -> Result<u64> {
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
            let e = e?;
            let md = e.metadata()?;
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() && seen.insert((md.dev(), md.ino())) {
                total += md.size().div_ceil(BLOCK) * BLOCK;
            }
        }
    }
    Ok(total)
}

/// `mkfs.erofs --quiet [EXTRA] IMAGE TREE`, timed.
fn mkfs_erofs(image: &Path, tree: &Path, extra: &[&str]) -> Result<f64> {
    let _ = std::fs::remove_file(image);
    let t = Instant::now();
    run(Command::new("mkfs.erofs")
        .arg("--quiet")
        .args(extra)
        .arg(image)
        .arg(tree))?;
    Ok(t.elapsed().as_secs_f64())
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn ms(s: f64) -> String {
    format!("{:.1}", s * 1e3)
}

fn mib(b: u64) -> String {
    format!("{:.2}", b as f64 / (1 << 20) as f64)
}

fn verdict(ok: bool) -> String {
    if ok { "met" } else { "missed" }.to_string()
}

/// Part one: synthesis against mkfs.erofs, per root.
fn synthesis(o: &Options, work: &Path, d: &mut Daemon) -> Result<(Value, String)> {
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for name in ROOTS {
        let root = tests::roots::ensure_debian_root(name)?;
        let imp = d.tide_json(&["layer", "import", root.to_str().context("utf-8 path")?]);
        let layer = imp["layers"][0]
            .as_str()
            .with_context(|| format!("no layer in {imp}"))?
            .to_string();
        let export = format!("layer/{layer}");
        let mut ours = Vec::new();
        for _ in 0..o.runs {
            d.restart();
            ours.push(first_byte(d, &export)?);
        }
        let ours_img = work.join(format!("{name}.ours.erofs"));
        let r = d.tide_json(&["layer", "erofs", &layer, "--to", ours_img.to_str().unwrap()]);
        let synth_ms = r["build_ms"].as_f64().context("build_ms")?;
        let peer_img = work.join(format!("{name}.mkfs.erofs"));
        let mut mkfs = Vec::new();
        for _ in 0..o.runs {
            mkfs.push(mkfs_erofs(&peer_img, &root, &[])?);
        }
        // The same layout as ours: every tail in a block of its own.
        let plain_img = work.join(format!("{name}.mkfs-noinline.erofs"));
        mkfs_erofs(&plain_img, &root, &["-Enoinline_data"])?;
        let data = data_blocks_bytes(&root)?;
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len());
        let (ours_size, peer_size, plain_size) =
            (size(&ours_img)?, size(&peer_img)?, size(&plain_img)?);
        // Ours as synthesis counts it (blocks holding no file data: files of equal
        // content share their data blocks, so the formula would undercount ours).
        let ours_meta = r["metadata_bytes"].as_u64().context("metadata_bytes")?;
        let peer_meta = plain_size.saturating_sub(data);
        let ratio = best(&mkfs) / best(&ours);
        rows.push(vec![
            name.to_string(),
            r["inodes"].to_string(),
            ms(best(&ours)),
            format!("{synth_ms:.1}"),
            ms(best(&mkfs)),
            format!("{ratio:.0}x"),
            mib(ours_size),
            mib(peer_size),
            mib(ours_meta),
            mib(peer_meta),
            format!("{:.2}", ours_meta as f64 / peer_meta as f64),
        ]);
        out.push(json!({
            "root": name, "layer": layer, "inodes": r["inodes"],
            "first_byte_s": ours, "synthesis_ms": synth_ms, "mkfs_s": mkfs,
            "image_bytes": {"ours": ours_size, "mkfs": peer_size, "mkfs_noinline": plain_size},
            "metadata_bytes": {"ours": ours_meta, "mkfs_noinline": peer_meta},
            "data_bytes": {"ours": r["data_bytes"], "files": data},
            "goals": {"first_byte": ratio >= 20.0,
                      "metadata": ours_meta as f64 <= 1.1 * peer_meta as f64},
        }));
    }
    let table = render_table(
        &[
            "root",
            "inodes",
            "first byte ms",
            "(synthesis ms)",
            "mkfs.erofs ms",
            "mkfs/ours",
            "image MiB",
            "mkfs MiB",
            "metadata MiB",
            "noinline meta MiB",
            "meta ratio",
        ],
        &rows,
    );
    let goals = out.iter().all(|r| r["goals"]["first_byte"] == true);
    let meta = out.iter().all(|r| r["goals"]["metadata"] == true);
    let table = format!(
        "{table}goals: first byte <= 1/20 of mkfs.erofs: {}; metadata <= 1.1x mkfs.erofs: {}\n",
        verdict(goals),
        verdict(meta)
    );
    Ok((Value::Array(out), table))
}

fn wait_for_socket(path: &Path, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        if let Some(st) = child.try_wait()? {
            bail!("nbdkit exited with {st}");
        }
        ensure!(
            Instant::now() < deadline,
            "nbdkit never served {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The guest's script: the manifest, then a timed tar of the merged root.
fn guest_script() -> String {
    format!(
        "{}\ntide-manifest /merged\necho \"rc=$?\"\n{}\n\
         sync; echo 3 > /proc/sys/vm/drop_caches\n\
         read t0 rest < /proc/uptime\n\
         n=$(tar cf - -C /merged . 2>/dev/null | wc -c)\n\
         read t1 rest < /proc/uptime\n\
         {}\necho \"$t0 $t1 $n\"\n{}\n",
        begin("manifest"),
        end("manifest"),
        begin("tar"),
        end("tar")
    )
}

fn drop_host_caches() -> Result<()> {
    run(&mut Command::new("sync"))?;
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")
}

/// One boot: (boot to manifest s, tar s, tar bytes, manifest).
fn boot(
    kernel: &Kernel,
    initrd: &Path,
    layers: Vec<Source>,
    work: &Path,
    append: &str,
) -> Result<(f64, f64, u64, String)> {
    let scratch = tests::guest::ext4_file(&work.join("scratch.ext4"), 1 << 30);
    let mut disks: Vec<Disk> = layers
        .into_iter()
        .enumerate()
        .map(|(i, source)| Disk {
            serial: format!("layer{i}"),
            source,
            read_only: true,
        })
        .collect();
    disks.push(Disk {
        serial: "scratch".into(),
        source: Source::File(scratch),
        read_only: false,
    });
    drop_host_caches()?;
    let guest = Guest {
        kernel: kernel.clone(),
        initrd: initrd.to_path_buf(),
        disks,
        append: append.to_string(),
        memory_mib: 512,
        vcpus: 1,
        dir: work.join("qemu"),
        control: None,
    };
    let r = guest.boot(Duration::from_secs(1200));
    let manifest = r.section("manifest");
    let (manifest, rc) = manifest
        .rsplit_once("rc=")
        .context("no exit code after the manifest")?;
    ensure!(rc.trim() == "0", "tide-manifest failed:\n{}", r.tail());
    let tar = r.section("tar");
    let f: Vec<&str> = tar.split_whitespace().collect();
    ensure!(f.len() == 3, "bad tar line {tar:?}");
    let (t0, t1, n): (f64, f64, u64) = (f[0].parse()?, f[1].parse()?, f[2].parse()?);
    Ok((
        r.ended_at("manifest").as_secs_f64(),
        t1 - t0,
        n,
        manifest.to_string(),
    ))
}

/// Part two: the 3-layer image in a guest, three ways.
fn in_guest(o: &Options, work: &Path, d: &mut Daemon) -> Result<(Value, String)> {
    let kernel = Kernel::get();
    let oci = tests::oci::debian_three_layers(&work.join("oci-work"), &work.join("oci"), "flask:3");
    let imp = d.tide_json(&["image", "import", oci.to_str().unwrap()]);
    let layers: Vec<String> = imp["layers"]
        .as_array()
        .with_context(|| format!("no layers in {imp}"))?
        .iter()
        .map(|l| l.as_str().unwrap_or_default().to_string())
        .collect();
    ensure!(layers.len() == 3, "{imp}");
    // The peer's images: mkfs.erofs of each layer's own image, mounted read-only.
    let peers = work.join("peers");
    std::fs::create_dir_all(&peers)?;
    for (i, l) in layers.iter().enumerate() {
        let ours = work.join(format!("layer{i}.ours.erofs"));
        d.tide_json(&["layer", "erofs", l, "--to", ours.to_str().unwrap()]);
        let mnt = work.join(format!("mnt{i}"));
        std::fs::create_dir_all(&mnt)?;
        run(Command::new("mount")
            .args(["-t", "erofs", "-o", "loop,ro"])
            .arg(&ours)
            .arg(&mnt))?;
        let made = mkfs_erofs(&peers.join(format!("layer{i}")), &mnt, &[]).and_then(|_| {
            let plain = peers.join(format!("layer{i}.noinline"));
            mkfs_erofs(&plain, &mnt, &["-Enoinline_data"])
        });
        run(Command::new("umount").arg(&mnt))?;
        made?;
    }
    let root = tests::roots::debian_root("minbase");
    let md = std::fs::symlink_metadata(&root)?;
    let append = Guest::root_param(md.mode(), md.uid(), md.gid(), md.mtime(), md.mtime_nsec());
    let initrd = initramfs(&kernel, &guest_script(), &work.join("bench.cpio"));
    let sock = work.join("nbdkit.sock");
    let mut nbdkit = Command::new("nbdkit");
    nbdkit
        .args(["-r", "-f", "-U"])
        .arg(&sock)
        .arg("file")
        .arg(format!("dir={}", peers.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("nbdkit.log"))?);
    let mut nbdkit = Killed(nbdkit.spawn().context("nbdkit (installed by .ci/run)")?);
    wait_for_socket(&sock, &mut nbdkit.0)?;
    let mut rows = Vec::new();
    let mut out = Vec::new();
    let mut reference: Option<String> = None;
    let mut best_of = std::collections::HashMap::new();
    for way in o.ways.iter().map(String::as_str) {
        let (mut boots, mut tars) = (Vec::new(), Vec::new());
        let mut bytes = 0;
        for _ in 0..o.runs {
            let sources: Vec<Source> = (0..layers.len())
                .map(|i| match way {
                    "ours" => Source::Nbd {
                        socket: d.data.join("nbd.sock"),
                        export: format!("layer/{}", layers[i]),
                    },
                    "nbdkit" => Source::Nbd {
                        socket: sock.clone(),
                        export: format!("layer{i}"),
                    },
                    "nbdkit-noinline" => Source::Nbd {
                        socket: sock.clone(),
                        export: format!("layer{i}.noinline"),
                    },
                    _ => Source::File(peers.join(format!("layer{i}"))),
                })
                .collect();
            if way == "ours" {
                d.restart();
            }
            let (b, t, n, manifest) = boot(&kernel, &initrd, sources, work, &append)?;
            eprintln!("bench-block: {way}: manifest at {b:.2} s, tar {t:.2} s ({n} bytes)");
            match &reference {
                None => reference = Some(manifest),
                Some(want) => {
                    let diff = guest::manifest::diff(want, &manifest);
                    ensure!(
                        diff.is_empty(),
                        "{way}'s guest saw a different tree ({} lines), first:\n{}",
                        diff.len(),
                        diff[..diff.len().min(20)].join("\n")
                    );
                }
            }
            boots.push(b);
            tars.push(t);
            bytes = n;
        }
        best_of.insert(way, best(&tars));
        rows.push(vec![
            way.to_string(),
            format!("{:.2}", best(&boots)),
            format!("{:.2}", best(&tars)),
            mib(bytes),
        ]);
        out.push(
            json!({"way": way, "boot_to_manifest_s": boots, "tar_s": tars, "tar_bytes": bytes}),
        );
    }
    let table = render_table(
        &["served by", "boot to manifest s", "tar s", "tar MiB"],
        &rows,
    );
    let table = match (
        best_of.get("ours"),
        best_of.get("nbdkit"),
        best_of.get("file"),
    ) {
        (Some(ours), Some(nbdkit), Some(file)) => format!(
            "{table}goals: tar <= nbdkit: {} ({:.2}x); tar <= 1.3x local file: {} ({:.2}x)\n",
            verdict(ours <= nbdkit),
            ours / nbdkit,
            verdict(*ours <= 1.3 * file),
            ours / file
        ),
        _ => table,
    };
    Ok((Value::Array(out), table))
}

fn bench(o: &Options) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("bench-block")
        .tempdir_in("/var/tmp")?;
    let work = tmp.path().to_path_buf();
    let _unmount = tests::UnmountBelow(work.clone());
    let mut d = Daemon::start(&work);
    let (synth, synth_table) = synthesis(o, &work, &mut d)?;
    let guest = if o.guest {
        Some(in_guest(o, &work, &mut d)?)
    } else {
        None
    };
    if o.json {
        println!(
            "{}",
            json!({"synthesis": synth, "guest": guest.as_ref().map(|g| &g.0)})
        );
    } else {
        print!("{synth_table}");
        if let Some((_, t)) = &guest {
            println!();
            print!("{t}");
        }
    }
    if o.keep {
        let kept = tmp.keep();
        eprintln!("bench-block: kept {}", kept.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    tests::bench::main("bench-block", USAGE, Options::parse, bench)
}
