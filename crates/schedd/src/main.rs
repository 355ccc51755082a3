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
    /// Data directory (the state database is DIR/state).
    #[arg(long, env = "SCHED_DATA", value_name = "DIR")]
    data: PathBuf,
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

fn main() {
    let args = Args::parse();
    let opts = schedd::server::Options {
        listen: args.listen,
        data: args.data,
        allow_remote: args.allow_remote,
        host_timeout: args.host_timeout,
    };
    if let Err(e) = schedd::server::run(&opts, None) {
        schedd::log!("error: {e:#}");
        std::process::exit(1);
    }
    schedd::log!("stopped");
}
