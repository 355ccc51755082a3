//! Serves an in-memory NBD export, for trying clients and measuring the server alone
//! (no store behind it) against, say, `nbdkit memory`:
//!
//! ```text
//! cargo run -p layerfs --example nbd_memory -- /tmp/nbd.sock 1024
//! fio --ioengine=nbd --uri='nbd+unix:///mem?socket=/tmp/nbd.sock' --rw=randread --bs=4k ...
//! ```

use std::sync::Arc;

use layerfs::nbd::{Export, ExportError, Exports, Intent, MemoryDevice, Server, ServerConfig};

/// Every name is the one device.
struct One(Arc<MemoryDevice>);

impl Exports for One {
    fn list(&self) -> Result<Vec<(String, Option<String>)>, ExportError> {
        Ok(vec![("mem".into(), Some("in-memory".into()))])
    }

    fn open(&self, _: &str, _: Intent, _: &str) -> Result<Export, ExportError> {
        Ok(Export {
            device: self.0.clone(),
            description: Some("in-memory".into()),
        })
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(socket), Some(mib)) = (args.next(), args.next().and_then(|m| m.parse::<u64>().ok()))
    else {
        eprintln!("usage: nbd_memory SOCKET SIZE_MIB");
        std::process::exit(2);
    };
    let _ = std::fs::remove_file(&socket);
    let server = Server::new(
        Arc::new(One(Arc::new(MemoryDevice::new(mib << 20)))),
        ServerConfig::default(),
    );
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async {
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        eprintln!("serving {mib} MiB on {socket}");
        if let Err(e) = server.serve_unix(listener).await {
            eprintln!("nbd_memory: {e}");
        }
    });
}
