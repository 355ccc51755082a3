//! Running the real scheduler daemon (`sched`) for a test: started on a Unix socket and
//! a data directory, waited for until it serves, killed with SIGKILL and started again
//! on the same data, killed when the handle is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A running `sched --listen unix:SOCKET --data DATA` (or, given `--etcd`, with no data
/// directory); dropping it kills the process.
#[derive(Debug)]
pub struct Sched {
    /// The data directory (`--data`): the state database is `data/state`.
    pub data: PathBuf,
    /// The Unix socket it serves on.
    pub socket: PathBuf,
    /// Where the daemon's stderr goes (appended to across restarts).
    pub log: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl Sched {
    /// Starts `sched` with `args` added (e.g. `--host-timeout 2s`) and waits (up to
    /// 30 s) until its socket accepts connections; panics with its log otherwise.
    pub fn start(data: impl AsRef<Path>, socket: impl AsRef<Path>, args: &[&str]) -> Sched {
        let mut s = Sched {
            data: data.as_ref().to_path_buf(),
            socket: socket.as_ref().to_path_buf(),
            log: data.as_ref().with_extension("log"),
            args: args.iter().map(|a| (*a).to_string()).collect(),
            child: None,
        };
        s.spawn();
        s
    }

    /// The address clients and hosts use: `unix:SOCKET`.
    pub fn addr(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("create sched log");
        // A killed daemon leaves its socket behind: only a fresh one means "serving".
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = Command::new(crate::sched_bin());
        cmd.arg("--listen").arg(self.addr());
        // With its state in etcd there is no data directory (only the log's name).
        if !self.args.iter().any(|a| a == "--etcd") {
            cmd.arg("--data").arg(&self.data);
        }
        let child = cmd
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn sched");
        let child = self.child.insert(child);
        crate::wait_serving("sched", child, &self.socket, &self.log);
    }

    /// Kills the daemon with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("sched running");
        c.kill().expect("kill -9 sched");
        let st = c.wait().expect("wait sched");
        assert!(!st.success(), "sched exited cleanly when killed: {st}");
    }

    /// Starts the daemon again on the same data directory and socket.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "sched is still running");
        self.spawn();
    }

    /// What the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sched {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `tide --scheduler ADDR ARGS`.
pub fn tide(addr: &str, args: &[&str]) -> std::process::Output {
    Command::new(crate::tide_bin())
        .arg("--scheduler")
        .arg(addr)
        .args(args)
        .output()
        .expect("spawn tide")
}

/// `tide --scheduler ADDR --json ARGS`, which must succeed.
pub fn json(addr: &str, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let o = tide(addr, &a);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "tide {args:?} failed: {}{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("tide {args:?}: not JSON ({e}): {out}"))
}

/// Waits (up to `secs`) until `f` returns Ok; panics with `what` and the last error.
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) => assert!(
                std::time::Instant::now() < deadline,
                "timed out after {secs} s waiting for {what}; last: {last}"
            ),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `tide instance ls --json` at `addr`.
pub fn instances(addr: &str) -> Vec<serde_json::Value> {
    json(addr, &["instance", "ls"]).as_array().unwrap().clone()
}

/// The ids of the hosts `tide host ls` at `addr` shows up.
pub fn hosts_up(addr: &str) -> std::collections::BTreeSet<String> {
    json(addr, &["host", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["up"] == true)
        .map(|h| h["id"].as_str().unwrap().to_string())
        .collect()
}

/// Waits (up to `secs`) until exactly `want` are the hosts up at `addr`.
pub fn wait_hosts_up(addr: &str, want: &std::collections::BTreeSet<String>, secs: u64, what: &str) {
    wait_for(secs, what, || {
        let up = hosts_up(addr);
        if &up == want {
            Ok(())
        } else {
            Err(format!("{up:?}"))
        }
    });
}

/// Waits (up to 30 s) until the scheduler at `addr` lists its first host as up (with
/// the images it reported).
pub fn wait_host_up(addr: &str) {
    wait_for(30, "the host to be up at the scheduler", || {
        let h = json(addr, &["host", "ls"]);
        if h[0]["up"] == true {
            Ok(())
        } else {
            Err(h.to_string())
        }
    });
}
