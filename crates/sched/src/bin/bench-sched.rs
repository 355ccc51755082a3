//! bench-sched: the placement benchmark.
//!
//! A simulated cluster (1000 hosts by default) with realistic layer sharing: a few
//! distributions, tens of frameworks and thousands of applications, each image
//! `[distribution, framework, dependencies, code]`. Versions of one layer share most of
//! their chunks (a new framework patch release, a new build of an app), so a host that
//! holds one version holds part of the next: the case chunk-level locality sees and
//! image-level locality does not. Hosts start with some layers; each placement is
//! committed, after which the host holds the image's layers (and, through shared
//! chunks, part of their other versions). Instances retire first in, first out, so
//! the cluster stays about half full.
//!
//! The same stream of placements, from a seeded RNG, is run twice through the same
//! `sched::placement::Cluster`: once scoring chunk-level locality (ours), once with
//! kube-scheduler's ImageLocality score (the baseline). The table compares decision
//! throughput and latency and the bytes hosts had to fetch.
//!
//! `cargo run --release -p sched --bin bench-sched -- [--hosts N] [--placements N] [--seed N]`

use std::collections::HashMap;
use std::time::Instant;

use sched::placement::{
    Capacity, Cluster, HostInventory, ImageLayer, ImageSpec, LocalityModel, Policy, Workload,
};
use sched::stack::{HostSelector, Resources};
use sched::types::{Arch, ByteSize, Digest};

const MB: u64 = 1 << 20;
const GB: u64 = 1 << 30;

/// xorshift64*: small, fast, and the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 >= 1.0 - p
    }
}

/// Zipf-like sampling over `n` items by a precomputed cumulative table.
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let cdf = (1..=n)
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect::<Vec<_>>();
        Zipf(cdf.iter().map(|c| c / acc).collect())
    }
    fn sample(&self, rng: &mut Rng) -> usize {
        let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
        self.0.partition_point(|&c| c < u).min(self.0.len() - 1)
    }
}

/// A layer and the family of versions it belongs to.
struct Layer {
    digest: Digest,
    bytes: u64,
    family: usize,
    version: u32,
}

/// Fraction of chunks two versions of a family share, per version apart.
const SHARE: [f64; 3] = [0.85, 0.75, 0.6]; // framework, dependencies, code

struct App {
    framework: usize,
    deps: usize,
    code: usize,
    deps_family: usize,
    code_family: usize,
    resources: Resources,
}

struct World {
    layers: Vec<Layer>,
    families: Vec<(Vec<usize>, f64)>,
    /// Framework → (distribution layer, framework layer) of its current version.
    frameworks: Vec<(usize, usize)>,
    apps: Vec<App>,
}

impl World {
    fn add_layer(&mut self, bytes: u64, family: usize) -> usize {
        let id = self.layers.len();
        let version = self.families[family].0.len() as u32;
        self.layers.push(Layer {
            digest: Digest::new(&format!("sha256:{id:064x}")).expect("valid digest"),
            bytes,
            family,
            version,
        });
        self.families[family].0.push(id);
        id
    }

    fn new_family(&mut self, share: f64) -> usize {
        self.families.push((Vec::new(), share));
        self.families.len() - 1
    }

    fn generate(rng: &mut Rng, apps: usize) -> World {
        let mut w = World {
            layers: Vec::new(),
            families: Vec::new(),
            frameworks: Vec::new(),
            apps: Vec::new(),
        };
        // Distributions: alpine, debian, ubuntu, fedora; 3 versions each.
        let mut distros = Vec::new();
        for size in [4 * MB, 50 * MB, 30 * MB, 70 * MB] {
            let f = w.new_family(0.5);
            let versions: Vec<usize> = (0..3).map(|_| w.add_layer(size, f)).collect();
            distros.push(versions);
        }
        // 30 frameworks (python, node, jvm, go, ruby, php, dotnet, cuda, ...), each on
        // a distribution, 40 MB to 1.5 GB, 4 versions of which the last is current.
        for i in 0..30 {
            let d = &distros[rng.below(distros.len() as u64) as usize];
            let distro = d[rng.below(3) as usize];
            let size = if i % 10 == 7 {
                rng.range(800, 1500) * MB
            } else {
                rng.range(40, 400) * MB
            };
            let f = w.new_family(SHARE[0]);
            let mut cur = 0;
            for _ in 0..4 {
                cur = w.add_layer(size + rng.range(0, 20) * MB, f);
            }
            w.frameworks.push((distro, cur));
        }
        let popular = Zipf::new(30, 1.0);
        for _ in 0..apps {
            let framework = popular.sample(rng);
            let deps_family = w.new_family(SHARE[1]);
            let deps = w.add_layer(rng.range(10, 300) * MB, deps_family);
            let code_family = w.new_family(SHARE[2]);
            let code = w.add_layer(rng.range(1, 50) * MB, code_family);
            let vcpus = [1, 1, 2, 2, 4][rng.below(5) as usize];
            w.apps.push(App {
                framework,
                deps,
                code,
                deps_family,
                code_family,
                resources: Resources {
                    vcpus,
                    memory: ByteSize(u64::from(vcpus) * GB * rng.range(1, 2)),
                    gpus: 0,
                },
            });
        }
        w
    }

    fn image(&self, app: usize) -> Vec<usize> {
        let a = &self.apps[app];
        let (distro, fw) = self.frameworks[a.framework];
        vec![distro, fw, a.deps, a.code]
    }

    fn workload(&self, app: usize) -> Workload {
        Workload {
            key: format!("app-{app}.bench"),
            image: ImageSpec {
                layers: self
                    .image(app)
                    .into_iter()
                    .map(|l| ImageLayer {
                        digest: self.layers[l].digest.clone(),
                        bytes: self.layers[l].bytes,
                    })
                    .collect(),
            },
            resources: self.apps[app].resources,
            arch: None,
            hypervisor: None,
            hosts: HostSelector::default(),
        }
    }
}

/// The simulation's truth of what each host holds, mirrored into the cluster.
struct Hosts {
    held: Vec<HashMap<usize, u64>>,
}

impl Hosts {
    /// Host `h` now holds `bytes` of layer `l`; through shared chunks it also holds
    /// part of the other versions of `l`'s family.
    fn hold(&mut self, world: &World, cluster: &mut Cluster, h: usize, l: usize, bytes: u64) {
        let layer = &world.layers[l];
        let frac = bytes as f64 / layer.bytes as f64;
        let (members, share) = &world.families[layer.family];
        for &m in members {
            let other = &world.layers[m];
            let dv = other.version.abs_diff(layer.version) as i32;
            let b = (other.bytes as f64 * frac * share.powi(dv)) as u64;
            let cur = self.held[h].entry(m).or_insert(0);
            if b > *cur {
                *cur = b;
                cluster
                    .set_host_layer(&host_id(h), &other.digest, b)
                    .expect("host exists");
            }
        }
    }
}

fn host_id(h: usize) -> String {
    format!("host-{h:04}")
}

struct Outcome {
    decisions: usize,
    failed: usize,
    place_secs: f64,
    latencies_ns: Vec<u64>,
    fetched: u64,
    cold_bytes: u64,
}

fn run(model: LocalityModel, hosts_n: usize, placements: usize, seed: u64) -> Outcome {
    let mut rng = Rng::new(seed);
    let mut world = World::generate(&mut rng, 3000);
    let mut cluster = Cluster::new(Policy {
        locality: model,
        ..Policy::default()
    });
    let mut hosts = Hosts {
        held: vec![HashMap::new(); hosts_n],
    };
    let app_pop = Zipf::new(world.apps.len(), 1.1);
    for h in 0..hosts_n {
        cluster.upsert_host(HostInventory::new(
            host_id(h),
            format!("10.0.{}.{}:7000", h / 250, h % 250),
            Arch::X86_64,
            Capacity {
                vcpus: 64,
                memory: 256 * GB,
                gpus: 0,
            },
        ));
        // What the host ran before: a few apps' images, fully.
        for _ in 0..rng.range(3, 10) {
            let app = app_pop.sample(&mut rng);
            for l in world.image(app) {
                hosts.hold(&world, &mut cluster, h, l, world.layers[l].bytes);
            }
        }
    }

    let mut live: std::collections::VecDeque<String> = Default::default();
    let target_live = hosts_n * 14;
    let mut out = Outcome {
        decisions: 0,
        failed: 0,
        place_secs: 0.0,
        latencies_ns: Vec::with_capacity(placements),
        fetched: 0,
        cold_bytes: 0,
    };
    for i in 0..placements {
        let app = app_pop.sample(&mut rng);
        // 4% of deploys are a new build: new code, sometimes new dependencies.
        if rng.chance(0.04) {
            let a = &world.apps[app];
            let (cf, df) = (a.code_family, a.deps_family);
            let code_bytes = world.layers[a.code].bytes;
            let deps_bytes = world.layers[a.deps].bytes;
            let new_deps = rng.chance(0.3);
            let code = world.add_layer(code_bytes, cf);
            let deps = if new_deps {
                Some(world.add_layer(deps_bytes, df))
            } else {
                None
            };
            // Hosts holding an older version hold part of the new one already.
            for h in 0..hosts_n {
                for old in [world.apps[app].code, world.apps[app].deps] {
                    if let Some(&b) = hosts.held[h].get(&old) {
                        hosts.hold(&world, &mut cluster, h, old, b);
                    }
                }
            }
            world.apps[app].code = code;
            if let Some(d) = deps {
                world.apps[app].deps = d;
            }
        }
        let w = world.workload(app);
        let t = Instant::now();
        let placed = cluster.place(&w);
        let dt = t.elapsed();
        out.place_secs += dt.as_secs_f64();
        out.latencies_ns.push(dt.as_nanos() as u64);
        out.decisions += 1;
        out.cold_bytes += w.image.bytes();
        let Ok(p) = placed else {
            out.failed += 1;
            continue;
        };
        let id = format!("i{i}");
        out.fetched += cluster.commit(&id, &w, &p).expect("fresh instance id");
        let h: usize = p.host[5..].parse().expect("host-NNNN");
        for l in world.image(app) {
            hosts.hold(&world, &mut cluster, h, l, world.layers[l].bytes);
        }
        live.push_back(id);
        if live.len() > target_live
            && let Some(old) = live.pop_front()
        {
            cluster.remove_instance(&old).expect("live instance");
        }
    }
    out
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number, got {v:?}"))
        })
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let hosts = arg(&args, "--hosts", 1000) as usize;
    let placements = arg(&args, "--placements", 20_000) as usize;
    let seed = arg(&args, "--seed", 42);
    println!(
        "bench-sched: {hosts} hosts, {placements} placements, 3000 apps on 30 frameworks and 4 distributions, seed {seed}"
    );
    let runs = [
        ("ours: chunk-level locality", LocalityModel::ChunkBytes),
        (
            "baseline: kube ImageLocality",
            LocalityModel::KubeImageLocality,
        ),
    ];
    let mut rows = Vec::new();
    for (name, model) in runs {
        let mut o = run(model, hosts, placements, seed);
        o.latencies_ns.sort_unstable();
        rows.push((name, o));
    }
    println!();
    println!(
        "| {:<30} | {:>12} | {:>9} | {:>9} | {:>13} | {:>14} | {:>6} |",
        "scheduler", "placements/s", "p50 µs", "p99 µs", "fetched GiB", "of cold boots", "failed"
    );
    println!(
        "|{:-<32}|{:->14}|{:->11}|{:->11}|{:->15}|{:->16}|{:->8}|",
        "", "", "", "", "", "", ""
    );
    for (name, o) in &rows {
        println!(
            "| {:<30} | {:>12.0} | {:>9.1} | {:>9.1} | {:>13.1} | {:>13.1}% | {:>6} |",
            name,
            o.decisions as f64 / o.place_secs,
            percentile(&o.latencies_ns, 0.50),
            percentile(&o.latencies_ns, 0.99),
            o.fetched as f64 / GB as f64,
            100.0 * o.fetched as f64 / o.cold_bytes.max(1) as f64,
            o.failed,
        );
    }
    let (ours, base) = (&rows[0].1, &rows[1].1);
    println!();
    println!(
        "ours fetched {:.1}% of the baseline's bytes ({:.1} GiB less)",
        100.0 * ours.fetched as f64 / base.fetched.max(1) as f64,
        (base.fetched as f64 - ours.fetched as f64) / GB as f64
    );
    println!(
        "(\"of cold boots\": fetched bytes / the images' full sizes; placements/s counts decisions, commits excluded)"
    );
}
