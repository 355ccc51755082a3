//! Guests: the VMs that run this host's instances, launched through `crates/vmm` from
//! the boot spec [`crate::host`] prepares, and watched until they end.
//!
//! A guest boots the configured kernel and initramfs (`tide-init`, PID 1) with its
//! instance's disks served by this daemon over NBD (layers `layer0`.., `scratch`,
//! volumes `vol0`..). Its init says `ready` on the control channel; the supervisor (one
//! thread per VM) answers with the instance's config (`guest::control::Config`: never on
//! the kernel command line) and records what follows: `started` (running), the app's
//! output (appended to `DATA/vms/ID/app.log` with the host's own lifecycle lines),
//! `exited` or `failed`. A VM that ends without saying why (QEMU killed, a kernel that
//! panics) is failed with the end of its console (`DATA/vms/ID/console.log`). Once the
//! app runs and the instance has a port, a prober connects to the forwarded host port
//! until the guest accepts (QEMU's user network accepts on the host at once and closes
//! the connection when the guest refuses, so a connection that stays open, or data, is
//! what counts) and records when it answered.
//!
//! Every state carries its time ([`GuestStatus`]); waiters ([`GuestVm::wait_ready`])
//! are woken by a condition variable at every change, and [`Guests::on_change`] is told
//! (the scheduler link's heartbeat is sent early).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use guest::control::{self, Command, Config, Event, Stream};
use serde::{Deserialize, Serialize};
use vmm::{Accel, Hypervisor, Vm, VmSpec};

use crate::vhost::VhostUser;

use crate::log;

/// How guests are booted on this host (volumed's flags).
#[derive(Debug, Clone)]
pub(crate) struct GuestConfig {
    pub(crate) kernel: PathBuf,
    pub(crate) initramfs: PathBuf,
    pub(crate) accel: Accel,
    /// The host address guest ports are forwarded on.
    pub(crate) bind: Ipv4Addr,
    /// volumed's NBD socket, which serves every disk given over NBD.
    pub(crate) nbd_socket: PathBuf,
    /// How guests reach their disks.
    pub(crate) transport: Transport,
    /// From launch to the app's port answering (or its start, without a port).
    pub(crate) boot_timeout: Duration,
    /// `DATA/vms`.
    pub(crate) dir: PathBuf,
}

/// How a guest reaches its disks (`volumed --disk-transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Transport {
    /// QEMU's NBD client on volumed's NBD socket.
    #[default]
    Nbd,
    /// A vhost-user-blk socket per disk, in the guest's directory: the guest's queues
    /// are served in its (shared) memory.
    VhostUser,
}

impl Transport {
    pub(crate) fn parse(s: &str) -> Option<Transport> {
        match s {
            "nbd" => Some(Transport::Nbd),
            "vhost-user" => Some(Transport::VhostUser),
            _ => None,
        }
    }
}

/// Where a guest stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Phase {
    #[default]
    Booting,
    Running,
    Exited,
    Failed,
}

impl Phase {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Phase::Booting => "booting",
            Phase::Running => "running",
            Phase::Exited => "exited",
            Phase::Failed => "failed",
        }
    }

    pub(crate) fn ended(self) -> bool {
        matches!(self, Phase::Exited | Phase::Failed)
    }
}

/// A guest's state with the time of each step (Unix milliseconds, 0 until it happens).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GuestStatus {
    pub(crate) phase: Phase,
    pub(crate) launched: u64,
    pub(crate) booted: u64,
    pub(crate) started: u64,
    pub(crate) answered: u64,
    pub(crate) ended: u64,
    pub(crate) code: Option<i32>,
    pub(crate) signal: Option<i32>,
    pub(crate) reason: String,
    pub(crate) pid: u32,
    /// `HOST:PORT` forwarded to the guest's service port, or "".
    pub(crate) address: String,
    pub(crate) restarts: u32,
    /// Milliseconds the prepare spent on storage before the launch or conversion.
    #[serde(default)]
    pub(crate) storage_ms: u32,
    /// When a warm VM's conversion into this instance began.
    #[serde(default)]
    pub(crate) converted: u64,
    /// How its disks are served (what an adoption serves again).
    #[serde(default)]
    pub(crate) transport: Transport,
}

pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What to boot for one instance (kept in its record, to boot it again).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Launch {
    pub(crate) id: String,
    pub(crate) vcpus: u32,
    pub(crate) memory_mib: u64,
    /// Disks by serial, in attach order: (serial, export, read-only).
    pub(crate) disks: Vec<(String, String, bool)>,
    /// The config init gets (its network is filled in here); None for a warm VM,
    /// whose init waits until a conversion sends one.
    pub(crate) config: Option<Config>,
    /// The guest port to forward a host port to.
    pub(crate) port: Option<u16>,
    /// The host port to use (adopting an address); 0 picks a free one.
    pub(crate) host_port: u16,
    pub(crate) restarts: u32,
    /// The VM's directory under `DATA/vms` when it is not `id` (a converted warm VM
    /// keeps the one it was booted in).
    #[serde(default)]
    pub(crate) vm: String,
}

impl Launch {
    /// The VM's directory name under `DATA/vms`.
    fn dir_name(&self) -> &str {
        if self.vm.is_empty() {
            &self.id
        } else {
            &self.vm
        }
    }
}

/// The host's end of the control channel: the writer, whether init said `ready`, and
/// a config waiting for that.
#[derive(Default)]
struct Ctl {
    writer: Option<UnixStream>,
    ready: bool,
    pending: Option<Config>,
}

impl Ctl {
    /// Sends `pending` if init is ready for it.
    fn flush(&mut self) -> Result<(), String> {
        if !self.ready {
            return Ok(());
        }
        let (Some(w), Some(c)) = (self.writer.as_mut(), self.pending.take()) else {
            return Ok(());
        };
        w.write_all(control::encode(&Command::Config(Box::new(c))).as_bytes())
            .map_err(|e| format!("sending the config: {e}"))
    }
}

/// One guest.
pub(crate) struct GuestVm {
    pub(crate) id: String,
    status: Mutex<GuestStatus>,
    changed: Condvar,
    vm: Mutex<Option<Box<dyn Vm>>>,
    ctl: Mutex<Ctl>,
    dir: PathBuf,
    notify: Arc<dyn Fn() + Send + Sync>,
    vhost: Arc<VhostUser>,
}

impl std::fmt::Debug for GuestVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestVm")
            .field("id", &self.id)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The last `n` lines of a file (for failure messages), joined with " | ".
pub(crate) fn tail_lines(path: &Path, n: usize) -> String {
    tail(path, n)
}

/// The uid and gid of `user` as an image gives it (OCI's `User`: "", NAME, UID,
/// NAME:GROUP, UID:GID), names looked up in the image's `/etc/passwd` and `/etc/group`
/// under `root` (its mounted root; a symlinked file is not followed). No user is root.
pub(crate) fn resolve_user(root: &Path, user: &str) -> Result<(u32, u32), String> {
    let read = |name: &str| -> String {
        let etc = root.join("etc");
        let p = etc.join(name);
        let plain =
            |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| !m.file_type().is_symlink());
        if plain(&etc) && plain(&p) {
            std::fs::read_to_string(&p).unwrap_or_default()
        } else {
            String::new()
        }
    };
    // (name, id, primary gid) of each line of a passwd or group file.
    let table = |text: &str| -> Vec<(String, u32, u32)> {
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                let id = f.get(2)?.parse().ok()?;
                let gid = f.get(3).and_then(|g| g.parse().ok()).unwrap_or(id);
                Some((f[0].to_string(), id, gid))
            })
            .collect()
    };
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    if u.is_empty() && g.is_none() {
        return Ok((0, 0));
    }
    let passwd = table(&read("passwd"));
    let (uid, primary) = match u.parse::<u32>() {
        Ok(id) => (id, passwd.iter().find(|e| e.1 == id).map_or(0, |e| e.2)),
        Err(_) if u.is_empty() => (0, 0),
        Err(_) => passwd
            .iter()
            .find(|e| e.0 == u)
            .map(|e| (e.1, e.2))
            .ok_or_else(|| format!("user {u:?} is not in the image's /etc/passwd"))?,
    };
    let gid = match g {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(id) => id,
            Err(_) => table(&read("group"))
                .iter()
                .find(|e| e.0 == g)
                .map(|e| e.1)
                .ok_or_else(|| format!("group {g:?} is not in the image's /etc/group"))?,
        },
    };
    Ok((uid, gid))
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

impl GuestVm {
    /// Its state now.
    pub(crate) fn status(&self) -> GuestStatus {
        lock(&self.status).clone()
    }

    fn update(&self, f: impl FnOnce(&mut GuestStatus)) {
        {
            let mut s = lock(&self.status);
            f(&mut s);
            // Kept beside the VM, for a volumed restarted after a crash to adopt it
            // with what it knew (best effort: a lost update is re-learned).
            let path = self.dir.join("status.json");
            let tmp = self.dir.join("status.json.tmp");
            if let Ok(bytes) = serde_json::to_vec(&*s)
                && std::fs::write(&tmp, bytes).is_ok()
            {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
        self.changed.notify_all();
        (self.notify)();
    }

    /// `DATA/vms/ID/app.log`: the app's output and the host's lifecycle lines.
    pub(crate) fn app_log(&self) -> PathBuf {
        self.dir.join("app.log")
    }

    /// `DATA/vms/ID/console.log`: the guest kernel's console.
    pub(crate) fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// Appends a line to the app log.
    fn say(&self, line: &str) {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.app_log());
        if let Ok(mut f) = f {
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }

    /// The disk `serial` (export `export`) as the hypervisor is to attach it, over the
    /// guest's transport: for vhost-user, a socket in the guest's directory is served
    /// for it now (and stopped when the VM ends, [`GuestVm::release_disks`]).
    fn disk(
        &self,
        config: &GuestConfig,
        vcpus: u32,
        (serial, export, ro): &(String, String, bool),
    ) -> Result<vmm::Disk, String> {
        let source = match self.status().transport {
            Transport::Nbd => vmm::DiskSource::Nbd {
                socket: config.nbd_socket.clone(),
                export: export.clone(),
            },
            Transport::VhostUser => {
                let dir = self.dir.join("vu");
                std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                let socket = dir.join(format!("{serial}.sock"));
                self.vhost
                    .serve_guest(export, serial, &socket)
                    .map_err(|e| format!("serving disk {serial} over vhost-user: {e}"))?;
                vmm::DiskSource::VhostUser {
                    socket,
                    queues: (vcpus.max(1) as u16).min(crate::vhost::QUEUES),
                }
            }
        };
        Ok(vmm::Disk {
            serial: serial.clone(),
            source,
            read_only: *ro,
        })
    }

    /// Stops the vhost-user sockets of its disks (the VM has ended): what they held,
    /// an rwo volume say, is free again.
    fn release_disks(&self) {
        let n = self.vhost.stop_under(&self.dir.join("vu"));
        if n > 0 {
            log!(
                "instance {}: {n} vhost-user disk socket(s) stopped",
                self.id
            );
        }
    }

    /// Records how long the prepare spent on storage before launching it.
    pub(crate) fn set_storage_time(&self, d: Duration) {
        self.update(|s| s.storage_ms = d.as_millis().min(u128::from(u32::MAX)) as u32);
    }

    /// Fails the guest (if it has not ended) with `reason`.
    fn fail(&self, reason: String) {
        let mut first = false;
        self.update(|s| {
            if !s.phase.ended() {
                first = true;
                s.phase = Phase::Failed;
                s.ended = unix_ms();
                s.reason = reason.clone();
            }
        });
        if first {
            self.say(&format!("[tide] failed: {reason}"));
        }
    }

    /// Waits until the app runs and, with a port, answers on it; the status then, or
    /// why not (the guest failed or exited first, or `timeout` passed: the guest is
    /// then failed too).
    pub(crate) fn wait_ready(&self, timeout: Duration) -> Result<GuestStatus, String> {
        let deadline = Instant::now() + timeout;
        let mut s = lock(&self.status);
        loop {
            let ready = s.phase == Phase::Running && (s.address.is_empty() || s.answered != 0);
            if ready {
                return Ok(s.clone());
            }
            match s.phase {
                Phase::Failed => return Err(s.reason.clone()),
                Phase::Exited => {
                    return Err(match (s.code, s.signal) {
                        (_, Some(sig)) => format!("its app was killed by signal {sig} at start"),
                        (c, _) => format!(
                            "its app exited with status {} before it answered",
                            c.unwrap_or(-1)
                        ),
                    });
                }
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                let what = if s.phase == Phase::Booting {
                    "its guest did not start the app"
                } else {
                    "its app did not answer on its port"
                };
                drop(s);
                let reason = format!(
                    "{what} within {} s (console: {})",
                    timeout.as_secs(),
                    tail(&self.console_log(), 3)
                );
                self.fail(reason.clone());
                return Err(reason);
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits until its init says `ready` (a warm VM, booted and waiting for a config).
    pub(crate) fn wait_booted(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut s = lock(&self.status);
        loop {
            if s.booted != 0 {
                return Ok(());
            }
            if s.phase.ended() {
                return Err(s.reason.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                drop(s);
                let reason = format!(
                    "its guest did not boot within {} s (console: {})",
                    timeout.as_secs(),
                    tail(&self.console_log(), 3)
                );
                self.fail(reason.clone());
                return Err(reason);
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Turns this warm VM into an instance's: hot-adds `disks` (the layers it lacks,
    /// the scratch, the volumes), forwards `forward` to it, and sends `config` (now, or
    /// as soon as init says `ready`).
    pub(crate) fn convert(
        &self,
        guests: &GuestConfig,
        vcpus: u32,
        disks: &[(String, String, bool)],
        forward: Option<vmm::Forward>,
        mut config: Config,
    ) -> Result<(), String> {
        self.update(|s| s.converted = unix_ms());
        {
            let mut vm = lock(&self.vm);
            let v = vm.as_mut().ok_or("the warm VM has ended")?;
            for d in disks {
                let disk = self.disk(guests, vcpus, d)?;
                v.add_disk(&disk)
                    .map_err(|e| format!("hot-adding disk {}: {e}", d.0))?;
            }
            if let Some(f) = forward {
                v.add_forward(&f)
                    .map_err(|e| format!("forwarding {}: {e}", f.host))?;
            }
        }
        self.update(|s| {
            s.address = forward.map(|f| f.host.to_string()).unwrap_or_default();
        });
        self.say(&format!(
            "[tide] converted: {} disk(s) hot-added{}",
            disks.len(),
            forward.map_or_else(String::new, |f| format!(
                ", port {} on {}",
                f.guest_port, f.host
            ))
        ));
        config.network = Some(user_network());
        let mut ctl = lock(&self.ctl);
        ctl.pending = Some(config);
        ctl.flush()
    }

    /// Ends the guest: `stop` to its init (SIGTERM to the app; init powers off once it
    /// has exited), up to `grace`, then the hypervisor is ended. Returns once the VM
    /// is gone.
    pub(crate) fn stop(&self, grace: Duration) {
        if let Some(c) = lock(&self.ctl).writer.as_mut() {
            let _ = c.write_all(control::encode(&Command::Stop).as_bytes());
        }
        let mut vm = lock(&self.vm);
        if let Some(v) = vm.as_mut() {
            let ended = v.wait_timeout(grace).ok().flatten().is_some();
            if !ended {
                let _ = v.stop(Duration::from_secs(1));
            }
        }
        *vm = None;
        drop(vm);
        self.release_disks();
        self.update(|s| {
            if !s.phase.ended() {
                s.phase = Phase::Exited;
                s.ended = unix_ms();
                s.reason = "stopped".into();
            }
        });
    }
}

/// This host's guests, by instance id.
pub(crate) struct Guests {
    pub(crate) config: GuestConfig,
    hypervisor: vmm::qemu::Qemu,
    vhost: Arc<VhostUser>,
    vms: Mutex<BTreeMap<String, Arc<GuestVm>>>,
    notify: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Guests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guests")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The guest's side of QEMU's user network.
fn user_network() -> control::Network {
    control::Network {
        address: vmm::qemu::USER_NET_ADDRESS.into(),
        gateway: vmm::qemu::USER_NET_GATEWAY.into(),
        dns: vmm::qemu::USER_NET_DNS.into(),
    }
}

/// A free TCP port on `ip` (bound and let go: QEMU binds it right after).
fn free_port(ip: Ipv4Addr) -> Result<u16, String> {
    std::net::TcpListener::bind(SocketAddrV4::new(ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port on {ip}: {e}"))
}

/// Whether the guest behind a forwarded port accepts: a connection that QEMU does not
/// close at once (or that sends data) is an answer.
fn answers(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

impl Guests {
    /// Guests booted with `config`; `notify` is called at every state change.
    pub(crate) fn new(
        config: GuestConfig,
        vhost: Arc<VhostUser>,
        notify: Arc<dyn Fn() + Send + Sync>,
    ) -> Guests {
        Guests {
            config,
            hypervisor: vmm::qemu::Qemu::default(),
            vhost,
            vms: Mutex::new(BTreeMap::new()),
            notify,
        }
    }

    /// The guest of instance `id`, if it has one.
    pub(crate) fn get(&self, id: &str) -> Option<Arc<GuestVm>> {
        lock(&self.vms).get(id).cloned()
    }

    /// The host port forwarded to `port` of a guest: `host_port`, or a free one.
    pub(crate) fn forward(
        &self,
        port: Option<u16>,
        host_port: u16,
    ) -> Result<Option<vmm::Forward>, String> {
        let Some(guest_port) = port else {
            return Ok(None);
        };
        let port = if host_port != 0 {
            host_port
        } else {
            free_port(self.config.bind)?
        };
        Ok(Some(vmm::Forward {
            host: SocketAddrV4::new(self.config.bind, port),
            guest_port,
        }))
    }

    /// Takes warm VM `warm` out of the table and files it under instance `id` (see
    /// [`GuestVm::convert`]); None if there is no such VM or it has ended.
    pub(crate) fn take_warm(&self, warm: &str, id: &str) -> Option<Arc<GuestVm>> {
        let mut vms = lock(&self.vms);
        let g = vms.remove(warm)?;
        if g.status().phase.ended() {
            return None;
        }
        vms.insert(id.to_string(), g.clone());
        Some(g)
    }

    /// Launches `l` (replacing a guest of that id that has ended) and starts its
    /// supervisor; returns once the hypervisor runs (the guest boots).
    pub(crate) fn launch(&self, mut l: Launch) -> Result<Arc<GuestVm>, String> {
        if let Some(old) = self.get(&l.id)
            && !old.status().phase.ended()
        {
            return Err(format!("instance {} has a guest running already", l.id));
        }
        let dir = self.config.dir.join(l.dir_name());
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let address = self.forward(l.port, l.host_port)?;
        if let Some(c) = l.config.as_mut() {
            c.network = Some(user_network());
        }
        let g = Arc::new(GuestVm {
            id: l.id.clone(),
            status: Mutex::new(GuestStatus {
                phase: Phase::Booting,
                launched: unix_ms(),
                address: address.map(|a| a.host.to_string()).unwrap_or_default(),
                restarts: l.restarts,
                transport: self.config.transport,
                ..GuestStatus::default()
            }),
            changed: Condvar::new(),
            vm: Mutex::new(None),
            ctl: Mutex::new(Ctl::default()),
            dir: dir.clone(),
            notify: self.notify.clone(),
            vhost: self.vhost.clone(),
        });
        let disks = l
            .disks
            .iter()
            .map(|d| g.disk(&self.config, l.vcpus, d))
            .collect::<Result<Vec<_>, _>>();
        let disks = match disks {
            Ok(d) => d,
            Err(e) => {
                g.release_disks();
                return Err(e);
            }
        };
        let spec = VmSpec {
            name: l.id.clone(),
            kernel: self.config.kernel.clone(),
            initrd: self.config.initramfs.clone(),
            cmdline: "console=ttyS0 quiet panic=-1".into(),
            vcpus: l.vcpus.max(1),
            memory_mib: l.memory_mib,
            disks,
            control: dir.join("control.sock"),
            console_log: dir.join("console.log"),
            run_dir: dir.join("run"),
            accel: self.config.accel,
            net: Some(vmm::NetSpec {
                forwards: address.into_iter().collect(),
            }),
            shared_memory: self.config.transport == Transport::VhostUser,
        };
        g.say(&format!(
            "[tide] launching {} ({} vCPU, {} MiB, {} disks{})",
            self.hypervisor.name(),
            spec.vcpus,
            spec.memory_mib,
            spec.disks.len(),
            address.map_or_else(String::new, |a| format!(
                ", port {} on {}",
                a.guest_port, a.host
            ))
        ));
        let vm = match self.hypervisor.launch(&spec) {
            Ok(vm) => vm,
            Err(e) => {
                g.release_disks();
                return Err(format!("launching the VM: {e}"));
            }
        };
        let pid = vm.pid();
        *lock(&g.vm) = Some(vm);
        g.update(|s| s.pid = pid);
        log!("instance {}: guest launched (pid {pid})", l.id);
        lock(&self.vms).insert(l.id.clone(), g.clone());
        let (sup, config, ctl) = (g.clone(), l.config, spec.control);
        let timeout = self.config.boot_timeout;
        std::thread::Builder::new()
            .name(format!("guest {}", l.id))
            .spawn(move || supervise(sup, config, ctl, timeout))
            .map_err(|e| format!("starting the supervisor: {e}"))?;
        Ok(g)
    }

    /// Takes over the guest `l` describes if a previous run of volumed launched it and
    /// its QEMU still runs (volumed was killed; the guest kept running, its NBD client
    /// reconnecting): reconnects to its QMP and control sockets and watches it again,
    /// with the state it recorded. None when there is nothing to adopt (no record, the
    /// VM ended, or its pid is another process now).
    pub(crate) fn adopt(&self, l: &Launch) -> Option<Arc<GuestVm>> {
        let dir = self.config.dir.join(l.dir_name());
        let status: GuestStatus =
            serde_json::from_slice(&std::fs::read(dir.join("status.json")).ok()?).ok()?;
        if status.phase.ended() || status.pid == 0 {
            return None;
        }
        let serials: Vec<String> = l.disks.iter().map(|d| d.0.clone()).collect();
        let vm = match self
            .hypervisor
            .adopt(status.pid, &dir.join("run"), serials, 0)
        {
            Ok(vm) => vm,
            Err(e) => {
                log!("instance {}: not adopting pid {}: {e}", l.id, status.pid);
                return None;
            }
        };
        // An init that said `ready` before the crash is still waiting for its config.
        let ready = status.booted != 0;
        let transport = status.transport;
        let g = Arc::new(GuestVm {
            id: l.id.clone(),
            status: Mutex::new(status),
            changed: Condvar::new(),
            vm: Mutex::new(Some(vm)),
            ctl: Mutex::new(Ctl {
                ready,
                ..Ctl::default()
            }),
            dir: dir.clone(),
            notify: self.notify.clone(),
            vhost: self.vhost.clone(),
        });
        if transport == Transport::VhostUser {
            // Its QEMU is reconnecting to the sockets of its disks every second.
            for d in &l.disks {
                if let Err(e) = g.disk(&self.config, l.vcpus, d) {
                    log!("instance {}: {e}", l.id);
                }
            }
        }
        g.say("[tide] adopted by a restarted volumed (output of the gap is lost)");
        lock(&self.vms).insert(l.id.clone(), g.clone());
        let (sup, ctl) = (g.clone(), dir.join("control.sock"));
        let timeout = self.config.boot_timeout;
        let r = std::thread::Builder::new()
            .name(format!("guest {}", l.id))
            .spawn(move || supervise(sup, None, ctl, timeout));
        if let Err(e) = r {
            log!("instance {}: watching the adopted VM: {e}", l.id);
        }
        // Its app may have come up while nobody watched.
        let s = g.status();
        if s.phase == Phase::Running
            && s.answered == 0
            && let Ok(addr) = s.address.parse::<SocketAddr>()
        {
            let p = g.clone();
            std::thread::spawn(move || probe(&p, addr));
        }
        Some(g)
    }

    /// Stops instance `id`'s guest (see [`GuestVm::stop`]) and forgets it.
    pub(crate) fn remove(&self, id: &str, grace: Duration) {
        let g = lock(&self.vms).remove(id);
        if let Some(g) = g {
            g.stop(grace);
            log!("instance {id}: guest stopped");
        }
    }

    /// Stops every guest (volumed's shutdown), `grace` each, in parallel.
    pub(crate) fn stop_all(&self, grace: Duration) {
        let all: Vec<Arc<GuestVm>> = std::mem::take(&mut *lock(&self.vms))
            .into_values()
            .collect();
        let handles: Vec<_> = all
            .into_iter()
            .map(|g| std::thread::spawn(move || g.stop(grace)))
            .collect();
        for h in handles {
            let _ = h.join();
        }
    }
}

/// How long the KVM probe guest has to say it is ready.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// `--accel auto`: KVM if `/dev/kvm` opens and a guest of `kernel` and `initramfs`
/// boots under it to its init's `ready` within [`PROBE_TIMEOUT`] (some kernels hang
/// under a host's KVM), else TCG. The answer is kept in `DATA/accel` for this kernel
/// and initramfs (path, size, mtime), so only the first start pays for the probe.
pub(crate) fn probe_accel(kernel: &Path, initramfs: &Path, data: &Path) -> Accel {
    let id = |p: &Path| -> String {
        let m = std::fs::metadata(p).ok();
        format!(
            "{} {} {}",
            p.display(),
            m.as_ref().map_or(0, std::fs::Metadata::len),
            m.and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs())
        )
    };
    let key = format!("{} | {}", id(kernel), id(initramfs));
    let cache = data.join("accel");
    if let Ok(text) = std::fs::read_to_string(&cache)
        && let Some((k, a)) = text.trim_end().rsplit_once('\n')
        && k == key
        && let Some(a) = Accel::parse(a)
    {
        return a;
    }
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let accel = if !usable {
        log!("accel: /dev/kvm cannot be opened: guests run under TCG");
        Accel::Tcg
    } else {
        match boot_probe(kernel, initramfs, &data.join("vms").join(".probe")) {
            Ok(t) => {
                log!(
                    "accel: a guest booted under KVM in {:.2} s: guests use KVM",
                    t.as_secs_f64()
                );
                Accel::Kvm
            }
            Err(e) => {
                log!("accel: KVM probe failed ({e}): guests run under TCG");
                Accel::Tcg
            }
        }
    };
    let _ = std::fs::create_dir_all(data);
    let _ = std::fs::write(&cache, format!("{key}\n{}\n", accel.name()));
    accel
}

/// Boots `kernel` + `initramfs` under KVM with no disks until init says `ready`.
fn boot_probe(kernel: &Path, initramfs: &Path, dir: &Path) -> Result<Duration, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let spec = VmSpec {
        name: "accel-probe".into(),
        kernel: kernel.to_path_buf(),
        initrd: initramfs.to_path_buf(),
        cmdline: "console=ttyS0 quiet panic=-1".into(),
        vcpus: 1,
        memory_mib: 256,
        disks: Vec::new(),
        control: dir.join("control.sock"),
        console_log: dir.join("console.log"),
        run_dir: dir.join("run"),
        accel: Accel::Kvm,
        net: None,
        shared_memory: false,
    };
    let start = Instant::now();
    let mut vm = vmm::qemu::Qemu::default()
        .launch(&spec)
        .map_err(|e| e.to_string())?;
    let deadline = start + PROBE_TIMEOUT;
    let result = (|| {
        let s = loop {
            if let Ok(s) = UnixStream::connect(&spec.control) {
                break s;
            }
            if Instant::now() > deadline || vm.try_wait().ok().flatten().is_some() {
                return Err("the probe VM never served its control socket".to_string());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| format!("no ready within {} s: {e}", PROBE_TIMEOUT.as_secs()))?;
        match control::decode::<Event>(&line) {
            Ok(Event::Ready { .. }) => Ok(start.elapsed()),
            Ok(e) => Err(format!("the probe guest said {e:?}")),
            Err(e) => Err(format!("the probe guest: {e}")),
        }
    })();
    let _ = vm.stop(Duration::ZERO);
    let _ = std::fs::remove_dir_all(dir);
    result
}

/// Connects to the control socket QEMU serves, while the VM runs.
fn connect(g: &GuestVm, socket: &Path, timeout: Duration) -> Option<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = UnixStream::connect(socket) {
            return Some(s);
        }
        let ended = lock(&g.vm)
            .as_mut()
            .is_none_or(|v| v.try_wait().ok().flatten().is_some());
        if ended || Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One guest's life: see the module doc.
fn supervise(g: Arc<GuestVm>, config: Option<Config>, socket: PathBuf, timeout: Duration) {
    if let Some(stream) = connect(&g, &socket, timeout) {
        {
            let mut ctl = lock(&g.ctl);
            ctl.writer = stream.try_clone().ok();
            ctl.pending = config;
        }
        converse(&g, stream);
    }
    // The channel closed: the VM is ending (or never served it).
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        let mut vm = lock(&g.vm);
        let Some(v) = vm.as_mut() else {
            break None; // stopped by the host
        };
        match v.try_wait() {
            Ok(Some(e)) => {
                *vm = None;
                break Some(e);
            }
            Ok(None) if Instant::now() > deadline => {
                // Init said its last and the VM did not power off: end it.
                let e = v.stop(Duration::from_secs(1)).ok();
                *vm = None;
                break e;
            }
            Ok(None) => {}
            Err(e) => {
                g.fail(format!("watching the VM: {e}"));
                break None;
            }
        }
        drop(vm);
        std::thread::sleep(Duration::from_millis(50));
    };
    if let Some(e) = exit {
        let how = match e {
            vmm::Exit::Code(c) => format!("status {c}"),
            vmm::Exit::Signal(s) => format!("signal {s}"),
            vmm::Exit::Unknown => "while volumed was not its parent".to_string(),
        };
        g.say(&format!("[tide] VM ended ({how})"));
        g.fail(format!(
            "its VM ended ({how}) before the app did (console: {})",
            tail(&g.console_log(), 3)
        ));
        log!("instance {}: VM ended ({how})", g.id);
    }
    g.release_disks();
}

/// Reads the guest's events until the channel closes.
fn converse(g: &Arc<GuestVm>, stream: UnixStream) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let event = match control::decode::<Event>(&line) {
            Ok(e) => e,
            Err(e) => {
                g.say(&format!("[tide] unreadable control line: {e}"));
                continue;
            }
        };
        match event {
            Event::Ready { kernel, uptime } => {
                g.update(|s| s.booted = unix_ms());
                g.say(&format!(
                    "[tide] guest ready (kernel {kernel}, {uptime:.2} s after it started)"
                ));
                let mut ctl = lock(&g.ctl);
                ctl.ready = true;
                if let Err(e) = ctl.flush() {
                    drop(ctl);
                    g.fail(e);
                }
            }
            Event::Started { pid, .. } => {
                g.update(|s| {
                    s.phase = Phase::Running;
                    s.started = unix_ms();
                });
                g.say(&format!("[tide] app started (pid {pid} in the guest)"));
                let addr = g.status().address;
                if let Ok(addr) = addr.parse::<SocketAddr>() {
                    let p = g.clone();
                    std::thread::spawn(move || probe(&p, addr));
                }
            }
            Event::Log { stream, line } => g.say(&match stream {
                Stream::Stdout => line,
                Stream::Stderr => line,
            }),
            Event::Exited { code, signal } => {
                g.update(|s| {
                    if !s.phase.ended() {
                        s.phase = Phase::Exited;
                        s.ended = unix_ms();
                        s.code = code.or(signal.map(|_| -1));
                        s.signal = signal;
                    }
                });
                g.say(&match signal {
                    Some(sig) => format!("[tide] app killed by signal {sig}"),
                    None => format!("[tide] app exited with status {}", code.unwrap_or(-1)),
                });
            }
            Event::Failed { reason } => g.fail(reason),
        }
    }
}

/// Connects to the forwarded port until the guest answers (or the app ends).
fn probe(g: &GuestVm, addr: SocketAddr) {
    loop {
        if g.status().phase != Phase::Running {
            return;
        }
        if answers(addr) {
            g.update(|s| {
                if s.answered == 0 {
                    s.answered = unix_ms();
                }
            });
            g.say(&format!("[tide] answering on {addr}"));
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_nobody_listens_on_does_not_answer_and_a_listener_does() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert!(
            answers(addr),
            "a listening socket that sends nothing answers"
        );
        drop(l);
        assert!(!answers(addr));
        // A server that closes every connection at once (what QEMU's forward does
        // when the guest refuses) does not answer.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            drop(s);
        });
        assert!(!answers(addr));
        t.join().unwrap();
    }

    #[test]
    fn users_are_looked_up_in_the_image() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("etc")).unwrap();
        std::fs::write(
            t.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33::/var/www:/usr/sbin/nologin\nalice:x:1000:100::/home/alice:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            t.path().join("etc/group"),
            "root:x:0:\nusers:x:100:\nstaff:x:50:\n",
        )
        .unwrap();
        let r = |u: &str| resolve_user(t.path(), u);
        assert_eq!(r(""), Ok((0, 0)));
        assert_eq!(r("www-data"), Ok((33, 33)));
        assert_eq!(r("alice"), Ok((1000, 100)));
        assert_eq!(r("alice:staff"), Ok((1000, 50)));
        assert_eq!(r("1000"), Ok((1000, 100)));
        assert_eq!(r("4242"), Ok((4242, 0)));
        assert_eq!(r("4242:7"), Ok((4242, 7)));
        assert!(
            r("bob")
                .unwrap_err()
                .contains("\"bob\" is not in the image's /etc/passwd")
        );
        assert!(r("alice:wheel").unwrap_err().contains("group \"wheel\""));
        // A symlinked passwd is not followed (it could point out of the image).
        std::fs::remove_file(t.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", t.path().join("etc/passwd")).unwrap();
        assert!(r("root").is_err());
    }

    #[test]
    fn tails_are_the_last_lines() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("c");
        std::fs::write(&p, "a\n\nb\nc\nd\n").unwrap();
        assert_eq!(tail(&p, 2), "c | d");
        assert_eq!(tail(&t.path().join("none"), 2), "");
    }
}
