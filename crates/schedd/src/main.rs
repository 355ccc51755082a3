//! `sched`: the Tidedge scheduler daemon. See the `schedd` crate doc and README.md
//! ("The scheduler daemon").

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "sched", version, about = "Tidedge scheduler daemon")]
struct Args {
    /// Where to serve Cap'n Proto: HOST:PORT (loopback unless --allow-remote) or
    /// unix:/path.
    #[arg(long, env = "SCHED_LISTEN", value_name = "ADDR")]
    listen: String,
    /// Data directory (the state database is DIR/state): one scheduler. Exclusive with
    /// --etcd.
    #[arg(
        long,
        env = "SCHED_DATA",
        value_name = "DIR",
        required_unless_present = "etcd",
        conflicts_with = "etcd"
    )]
    data: Option<PathBuf>,
    /// Keep the state in etcd (client URLs, comma-separated): several schedulers run
    /// against one cluster and one of them leads.
    #[arg(long, env = "SCHED_ETCD", value_name = "URLS", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Every etcd key sched uses starts with this.
    #[arg(
        long,
        env = "SCHED_ETCD_PREFIX",
        default_value = "/tidedge/",
        value_name = "PREFIX"
    )]
    etcd_prefix: String,
    /// The leader's etcd lease: a dead leader is replaced this long after its last
    /// keepalive (whole seconds, at least 1s).
    #[arg(long, default_value = "2s", value_parser = parse_lease)]
    lease: Duration,
    /// The address clients are sent to while this scheduler leads (default: the
    /// address bound).
    #[arg(long, value_name = "ADDR")]
    advertise: Option<String>,
    /// Allow a non-loopback TCP address. There is no authentication: anyone who can
    /// reach the port can deploy and remove stacks.
    #[arg(long)]
    allow_remote: bool,
    /// A host that sends no heartbeat for this long is marked down and its instances
    /// move ("10s", "1500ms", "1m").
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    host_timeout: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = sched::stack::parse_duration(s)?;
    if d.is_zero() {
        return Err("the host timeout must be above zero".into());
    }
    Ok(d)
}

fn parse_lease(s: &str) -> Result<Duration, String> {
    let d = sched::stack::parse_duration(s)?;
    if d < Duration::from_secs(1) || d.subsec_nanos() != 0 {
        return Err("the lease is whole seconds, at least 1s (etcd leases are)".into());
    }
    Ok(d)
}

fn main() {
    let args = Args::parse();
    let state = match args.data {
        Some(d) => schedd::server::StateOptions::Local(d),
        None => {
            let mut prefix = args.etcd_prefix;
            if !prefix.ends_with('/') {
                prefix.push('/');
            }
            schedd::server::StateOptions::Etcd(schedd::etcd::EtcdOptions {
                endpoints: args.etcd,
                prefix,
                lease: args.lease,
            })
        }
    };
    let opts = schedd::server::Options {
        listen: args.listen,
        state,
        advertise: args.advertise,
        allow_remote: args.allow_remote,
        host_timeout: args.host_timeout,
    };
    if let Err(e) = schedd::server::run(&opts, None) {
        schedd::log!("error: {e:#}");
        std::process::exit(1);
    }
    schedd::log!("stopped");
}
