//! Running the real `volumed` daemon for a test: started on a data directory and a
//! socket, waited for until it serves, killed (SIGKILL) when the handle is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::tide::Tide;

/// A running `volumed`; dropping it kills the process.
#[derive(Debug)]
pub struct Volumed {
    /// The data directory (`--data`): the store is `data/store`.
    pub data: PathBuf,
    /// The Unix socket (`--socket`).
    pub socket: PathBuf,
    /// Where the daemon's stderr goes.
    pub log: PathBuf,
    child: Option<Child>,
}

/// A `volumed --data DATA --socket SOCKET` command, serving NBD on `DATA/nbd.sock` and
/// on a free loopback port (so tests can run side by side).
pub fn command(data: &Path, socket: &Path) -> Command {
    let mut c = Command::new(crate::volumed_bin());
    c.arg("--data")
        .arg(data)
        .arg("--socket")
        .arg(socket)
        .arg("--nbd-listen")
        .arg("127.0.0.1:0");
    c
}

impl Volumed {
    /// Starts the daemon and waits (up to 30 s) until its socket accepts connections;
    /// panics with the daemon's log if it exits or never serves.
    pub fn start(data: impl AsRef<Path>, socket: impl AsRef<Path>) -> Volumed {
        Volumed::start_with(data, socket, &[])
    }

    /// As [`Volumed::start`], with more command-line arguments (e.g. `--scheduler`).
    pub fn start_with(
        data: impl AsRef<Path>,
        socket: impl AsRef<Path>,
        args: &[String],
    ) -> Volumed {
        let data = data.as_ref().to_path_buf();
        let socket = socket.as_ref().to_path_buf();
        let log = data.with_extension("log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("create daemon log");
        let child = command(&data, &socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn volumed");
        let mut v = Volumed {
            data,
            socket,
            log,
            child: Some(child),
        };
        let child = v.child.as_mut().expect("just spawned");
        crate::wait_serving("volumed", child, &v.socket, &v.log);
        v
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("daemon still owned")
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon still owned").id()
    }

    /// `tide --socket SOCKET` commands.
    pub fn tide(&self) -> Tide {
        Tide::remote(&self.socket, self.data.join("store"))
    }

    /// The `nbd+unix://` URI of `export` on the daemon's NBD socket (`DATA/nbd.sock`).
    pub fn nbd_uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.data.join("nbd.sock").display()
        )
    }

    /// What the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child_mut().try_wait().expect("wait volumed").is_none()
    }

    /// Sends `signal` and waits (up to 60 s) for the daemon to exit.
    pub fn signal_and_wait(mut self, signal: i32) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let r = unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
        assert_eq!(r, 0, "kill: {}", std::io::Error::last_os_error());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.child_mut().try_wait().expect("wait volumed") {
                self.child = None;
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "volumed did not exit within 60 s of signal {signal}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Volumed {
    /// Kills the daemon and lazily unmounts what it left mounted below its data
    /// directory (roots of instances and warm VMs). A daemon stopped by
    /// [`Volumed::signal_and_wait`] keeps its mounts, for a restart to find.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            crate::unmount_below(&self.data);
            // Guests it launched run in process groups of their own and outlive a
            // killed daemon: end those of this data directory.
            crate::kill_guests_below(&self.data);
        }
    }
}

/// Runs a second `volumed` to completion (it is expected to fail fast), with a timeout.
pub fn run_expecting_exit(data: &Path, socket: &Path) -> Output {
    let mut child = command(data, socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn volumed");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("second volumed on {} kept running", data.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect output")
}
