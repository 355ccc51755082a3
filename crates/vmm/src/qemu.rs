//! The QEMU driver: `qemu-system-x86_64 -M q35`, controlled over QMP.
//!
//! q35 rather than microvm: under TCG on a loaded host a microvm kernel sometimes
//! fails to calibrate its TSC without HPET or an ACPI PM timer and hangs before init;
//! q35 boots every time, about 0.3 s slower. Disks are `-blockdev` nodes (NBD over a
//! Unix socket with `reconnect-delay`, so a guest rides out a restart of volumed; or raw
//! files) on virtio-blk-pci devices carrying their serial. Hot-added disks go on PCIe
//! root ports made at launch ([`HOTPLUG_PORTS`]): q35's root bus takes no hot-plug. The
//! control channel is a virtio-serial port named `guest::control::PORT` on a Unix
//! socket QEMU listens on. QEMU runs in a process group of its own, so a signal meant
//! for its parent does not reach it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::qmp::Qmp;
use crate::{Accel, Disk, DiskSource, Error, Exit, Hypervisor, Vm, VmSpec};

/// PCIe root ports made at launch for disks added later.
pub const HOTPLUG_PORTS: usize = 8;

/// How long QEMU may take to serve QMP after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Seconds QEMU's NBD client keeps retrying a lost server before failing requests.
const NBD_RECONNECT_SECS: u64 = 30;

/// The guest's address on QEMU's user-mode network (what the guest's init is to
/// configure, with [`USER_NET_GATEWAY`] and [`USER_NET_DNS`]).
pub const USER_NET_ADDRESS: &str = "10.0.2.15/24";
/// The user-mode network's gateway: the host's loopback as the guest sees it.
pub const USER_NET_GATEWAY: &str = "10.0.2.2";
/// The user-mode network's DNS forwarder.
pub const USER_NET_DNS: &str = "10.0.2.3";

/// The QEMU driver.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// The program (`qemu-system-x86_64`).
    pub program: PathBuf,
}

impl Default for Qemu {
    fn default() -> Self {
        Qemu {
            program: PathBuf::from("qemu-system-x86_64"),
        }
    }
}

/// The `-blockdev` / `blockdev-add` description of `disk` as node `node` (None for a
/// vhost-user disk, whose backend is a chardev: [`vhost_chardev`]).
fn blockdev(disk: &Disk, node: &str) -> Option<Value> {
    Some(match &disk.source {
        DiskSource::VhostUser { .. } => return None,
        DiskSource::Nbd { socket, export } => json!({
            "driver": "nbd",
            "node-name": node,
            "server": {"type": "unix", "path": socket},
            "export": export,
            "read-only": disk.read_only,
            "reconnect-delay": NBD_RECONNECT_SECS,
        }),
        DiskSource::File(path) => json!({
            "driver": "raw",
            "node-name": node,
            "read-only": disk.read_only,
            "file": {"driver": "file", "filename": path},
        }),
    })
}

/// The `-chardev` / `chardev-add` backend of a vhost-user disk: a client socket that
/// reconnects every second when the backend goes away (volumed restarting).
fn vhost_chardev(socket: &Path, id: &str) -> Value {
    json!({
        "id": id,
        "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": socket}},
            "server": false,
            "reconnect": 1,
        }},
    })
}

/// How disk `node`'s device is added: the `-device`/`device_add` properties other than
/// its bus and id. vhost-user disks need a chardev first ([`vhost_chardev`]).
fn disk_device(disk: &Disk, node: &str) -> Value {
    match &disk.source {
        DiskSource::VhostUser { queues, .. } => json!({
            "driver": "vhost-user-blk-pci",
            "chardev": node,
            "num-queues": queues,
        }),
        _ => json!({
            "driver": "virtio-blk-pci",
            "drive": node,
            "serial": disk.serial,
        }),
    }
}

/// `-device` text of `props` (a JSON object of strings and numbers).
fn device_arg(props: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(d) = props.get("driver").and_then(Value::as_str) {
        parts.push(d.to_string());
    }
    for (k, v) in props.as_object().into_iter().flatten() {
        if k == "driver" {
            continue;
        }
        match v {
            Value::String(s) => parts.push(format!("{k}={s}")),
            other => parts.push(format!("{k}={other}")),
        }
    }
    parts.join(",")
}

fn check_serial(serial: &str, taken: &[String]) -> Result<(), Error> {
    if serial.is_empty() || serial.len() > 20 || !serial.is_ascii() || serial.contains(',') {
        return Err(Error::BadSpec(format!(
            "disk serial {serial:?}: 1 to 20 ASCII characters without commas"
        )));
    }
    if taken.iter().any(|t| t == serial) {
        return Err(Error::BadSpec(format!("two disks with serial {serial:?}")));
    }
    Ok(())
}

fn check_shared(disk: &Disk, shared_memory: bool) -> Result<(), Error> {
    if matches!(disk.source, DiskSource::VhostUser { .. }) && !shared_memory {
        return Err(Error::BadSpec(format!(
            "disk {}: a vhost-user disk needs the VM's memory shared (shared_memory)",
            disk.serial
        )));
    }
    Ok(())
}

fn exit_of(st: std::process::ExitStatus) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => Exit::Code(c),
        (None, Some(s)) => Exit::Signal(s),
        (None, None) => Exit::Code(-1),
    }
}

impl Qemu {
    /// Whether this host can run the program at all (`PROGRAM --version` succeeds):
    /// what a host checks before it says it can launch QEMU guests.
    pub fn available(&self) -> bool {
        Command::new(&self.program)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The command line for `spec` (QMP on `qmp`).
    fn command(&self, spec: &VmSpec, qmp: &Path) -> Result<Command, Error> {
        let mut c = Command::new(&self.program);
        c.args(["-name", &spec.name, "-M", "q35"]);
        match spec.accel {
            Accel::Kvm => c.args(["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => c.args(["-accel", "tcg"]),
        };
        c.arg("-m")
            .arg(spec.memory_mib.to_string())
            .arg("-smp")
            .arg(spec.vcpus.max(1).to_string())
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", spec.console_log.display()))
            .arg("-kernel")
            .arg(&spec.kernel)
            .arg("-initrd")
            .arg(&spec.initrd)
            .arg("-append")
            .arg(&spec.cmdline)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(["-device", "virtio-serial-pci,id=vser"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=ctl,path={},server=on,wait=off",
                spec.control.display()
            ))
            .arg("-device")
            .arg(format!(
                "virtserialport,bus=vser.0,chardev=ctl,name={}",
                guest::control::PORT
            ));
        if spec.shared_memory {
            // A vhost-user backend maps the guest's RAM: it must be a shareable file.
            c.arg("-object")
                .arg(format!(
                    "memory-backend-memfd,id=ram,size={}M,share=on",
                    spec.memory_mib
                ))
                .args(["-machine", "memory-backend=ram"]);
        }
        let mut taken = Vec::new();
        for (i, d) in spec.disks.iter().enumerate() {
            check_serial(&d.serial, &taken)?;
            check_shared(d, spec.shared_memory)?;
            taken.push(d.serial.clone());
            let node = format!("disk{i}");
            let mut dev = disk_device(d, &node);
            dev["id"] = json!(format!("dev{i}"));
            match &d.source {
                DiskSource::VhostUser { socket, .. } => c.arg("-chardev").arg(format!(
                    "socket,id={node},path={},reconnect=1",
                    socket.display()
                )),
                _ => c
                    .arg("-blockdev")
                    .arg(blockdev(d, &node).unwrap_or_default().to_string()),
            };
            c.arg("-device").arg(device_arg(&dev));
        }
        if let Some(net) = &spec.net {
            // User-mode networking: no host privileges; each forward is a host socket
            // QEMU listens on. The guest reaches the host's loopback at the gateway.
            let mut netdev = "user,id=net0".to_string();
            for f in &net.forwards {
                netdev.push_str(&format!(
                    ",hostfwd=tcp:{}:{}-:{}",
                    f.host.ip(),
                    f.host.port(),
                    f.guest_port
                ));
            }
            c.arg("-netdev")
                .arg(netdev)
                .args(["-device", "virtio-net-pci,netdev=net0,romfile="]);
        }
        for p in 0..HOTPLUG_PORTS {
            c.arg("-device").arg(format!(
                "pcie-root-port,id=hp{p},chassis={},slot={}",
                p + 1,
                p + 1
            ));
        }
        Ok(c)
    }
}

impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, Error> {
        let program = self.program.display().to_string();
        std::fs::create_dir_all(&spec.run_dir).map_err(|e| Error::Spawn {
            program: program.clone(),
            source: e,
        })?;
        let qmp_sock = spec.run_dir.join("qmp.sock");
        for stale in [&qmp_sock, &spec.control] {
            let _ = std::fs::remove_file(stale);
        }
        let log_path = spec.run_dir.join("qemu.log");
        let log = std::fs::File::create(&log_path).map_err(|e| Error::Spawn {
            program: program.clone(),
            source: e,
        })?;
        let mut child = self
            .command(spec, &qmp_sock)?
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| Error::Spawn {
                program: program.clone(),
                source: e,
            })?;
        let start = Instant::now();
        let qmp = loop {
            if let Some(st) = child.try_wait().map_err(Error::Wait)? {
                return Err(Error::EarlyExit {
                    program,
                    exit: exit_of(st),
                    stderr: std::fs::read_to_string(&log_path)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                });
            }
            if qmp_sock.exists() {
                match Qmp::connect(&qmp_sock, Duration::from_secs(10)) {
                    Ok(q) => break q,
                    Err(e) if start.elapsed() > READY_TIMEOUT => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(e);
                    }
                    Err(_) => {}
                }
            }
            if start.elapsed() > READY_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Api(format!(
                    "{program} did not serve QMP within {READY_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Ok(Box::new(QemuVm {
            proc: Proc::Child(child),
            qmp: Some(qmp),
            serials: spec.disks.iter().map(|d| d.serial.clone()).collect(),
            hotplugged: 0,
            needle: qmp_sock.to_string_lossy().into_owned(),
            shared_memory: spec.shared_memory,
        }))
    }
}

/// The QEMU process of a VM: our child, or one a previous run of the host started
/// (adopted: its status goes to whoever reaps it, we only see it go).
#[derive(Debug)]
enum Proc {
    Child(Child),
    Adopted { pid: u32 },
}

/// Whether `pid` is a live QEMU whose command line names `needle` (its QMP socket):
/// what tells an adopted VM from a process that reused its pid.
fn is_qemu_of(pid: u32, needle: &str) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesised command name; a zombie has ended.
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmd = String::from_utf8_lossy(&cmd);
    !zombie && cmd.contains("qemu-system") && cmd.contains(needle)
}

impl Qemu {
    /// Takes over the VM of a QEMU a previous run of this host launched from `run_dir`
    /// (the spec's `run_dir`) as `pid`, with `serials` (the disks it has, hot-added ones
    /// last, `hotplugged` of them): reconnects to its QMP socket. Fails if `pid` is not
    /// that QEMU any more.
    pub fn adopt(
        &self,
        pid: u32,
        run_dir: &Path,
        serials: Vec<String>,
        hotplugged: usize,
    ) -> Result<Box<dyn Vm>, Error> {
        let qmp_sock = run_dir.join("qmp.sock");
        if !is_qemu_of(pid, &qmp_sock.to_string_lossy()) {
            return Err(Error::Api(format!(
                "pid {pid} is not the QEMU of {}",
                run_dir.display()
            )));
        }
        let qmp = Qmp::connect(&qmp_sock, Duration::from_secs(10))?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let shared_memory = String::from_utf8_lossy(&cmd).contains("memory-backend-memfd");
        Ok(Box::new(QemuVm {
            proc: Proc::Adopted { pid },
            qmp: Some(qmp),
            serials,
            hotplugged,
            needle: qmp_sock.to_string_lossy().into_owned(),
            shared_memory,
        }))
    }
}

/// A guest QEMU runs.
#[derive(Debug)]
pub struct QemuVm {
    proc: Proc,
    qmp: Option<Qmp>,
    serials: Vec<String>,
    hotplugged: usize,
    /// Its QMP socket's path, as its command line names it.
    needle: String,
    /// Its memory is shared (vhost-user disks can be added).
    shared_memory: bool,
}

impl QemuVm {
    fn kill(&mut self) {
        match &mut self.proc {
            Proc::Child(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Proc::Adopted { pid } => {
                let pid = *pid;
                if is_qemu_of(pid, &self.needle) {
                    // SAFETY: kill(2) has no memory-safety preconditions; the pid was
                    // just checked to be this VM's QEMU.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while is_qemu_of(pid, &self.needle) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        }
        self.qmp = None;
    }
}

impl QemuVm {
    fn qmp(&mut self) -> Result<&mut Qmp, Error> {
        self.qmp
            .as_mut()
            .ok_or_else(|| Error::Api("QMP: the VM has ended".into()))
    }
}

impl Vm for QemuVm {
    fn pid(&self) -> u32 {
        match &self.proc {
            Proc::Child(c) => c.id(),
            Proc::Adopted { pid } => *pid,
        }
    }

    fn add_disk(&mut self, disk: &Disk) -> Result<(), Error> {
        check_serial(&disk.serial, &self.serials)?;
        if self.hotplugged >= HOTPLUG_PORTS {
            return Err(Error::BadSpec(format!(
                "no free hot-plug port ({HOTPLUG_PORTS} disks added already)"
            )));
        }
        check_shared(disk, self.shared_memory)?;
        let port = self.hotplugged;
        let node = format!("hot{port}");
        let q = self.qmp()?;
        let (add, del, key) = match (&disk.source, blockdev(disk, &node)) {
            (DiskSource::VhostUser { socket, .. }, _) => (
                "chardev-add",
                "chardev-remove",
                vhost_chardev(socket, &node),
            ),
            (_, b) => ("blockdev-add", "blockdev-del", b.unwrap_or_default()),
        };
        q.execute(add, key)?;
        let mut dev = disk_device(disk, &node);
        dev["bus"] = json!(format!("hp{port}"));
        dev["id"] = json!(format!("hotdev{port}"));
        let added = q.execute("device_add", dev);
        if let Err(e) = added {
            let undo = match add {
                "chardev-add" => json!({ "id": node }),
                _ => json!({ "node-name": node }),
            };
            let _ = q.execute(del, undo);
            return Err(e);
        }
        self.hotplugged += 1;
        self.serials.push(disk.serial.clone());
        Ok(())
    }

    fn add_forward(&mut self, f: &crate::Forward) -> Result<(), Error> {
        // QMP has no command for a user-network forward; HMP's `hostfwd_add`, run
        // through QMP, is the one way. It answers "" when done and the error otherwise
        // (nothing is parsed out of it).
        let line = format!(
            "hostfwd_add net0 tcp:{}:{}-:{}",
            f.host.ip(),
            f.host.port(),
            f.guest_port
        );
        let r = self
            .qmp()?
            .execute("human-monitor-command", json!({ "command-line": line }))?;
        match r.as_str() {
            Some("") => Ok(()),
            other => Err(Error::Refused {
                command: line,
                class: "hostfwd_add".into(),
                desc: other.map_or_else(|| r.to_string(), |s| s.trim().to_string()),
            }),
        }
    }

    fn try_wait(&mut self) -> Result<Option<Exit>, Error> {
        let exit = match &mut self.proc {
            Proc::Child(c) => c.try_wait().map_err(Error::Wait)?.map(exit_of),
            Proc::Adopted { pid } => (!is_qemu_of(*pid, &self.needle)).then_some(Exit::Unknown),
        };
        if exit.is_some() {
            self.qmp = None;
        }
        Ok(exit)
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<Exit>, Error> {
        let start = Instant::now();
        loop {
            if let Some(e) = self.try_wait()? {
                return Ok(Some(e));
            }
            if start.elapsed() >= timeout {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(&mut self, grace: Duration) -> Result<Exit, Error> {
        if let Some(e) = self.try_wait()? {
            return Ok(e);
        }
        if let Ok(q) = self.qmp() {
            let _ = q.execute("system_powerdown", json!({}));
        }
        if let Some(e) = self.wait_timeout(grace)? {
            return Ok(e);
        }
        if let Ok(q) = self.qmp() {
            let _ = q.execute("quit", json!({}));
        }
        if let Some(e) = self.wait_timeout(Duration::from_secs(5))? {
            return Ok(e);
        }
        self.kill();
        Ok(self.try_wait()?.unwrap_or(Exit::Signal(libc::SIGKILL)))
    }
}

impl Drop for QemuVm {
    /// A VM is never left running by a dropped handle.
    fn drop(&mut self) {
        if self.try_wait().ok().flatten().is_none() {
            self.kill();
        }
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn spec(disks: Vec<Disk>) -> VmSpec {
        VmSpec {
            name: "t".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: "quiet".into(),
            vcpus: 2,
            memory_mib: 256,
            disks,
            control: "/run/ctl.sock".into(),
            console_log: "/run/console".into(),
            run_dir: "/run".into(),
            accel: Accel::Tcg,
            net: Some(crate::NetSpec {
                forwards: vec![crate::Forward {
                    host: "127.0.0.1:18080".parse().unwrap(),
                    guest_port: 8000,
                }],
            }),
            shared_memory: false,
        }
    }

    fn disk(serial: &str) -> Disk {
        Disk {
            serial: serial.into(),
            source: DiskSource::Nbd {
                socket: "/d/nbd.sock".into(),
                export: "layer/sha256:ab".into(),
            },
            read_only: true,
        }
    }

    #[test]
    fn the_command_line_carries_disks_by_serial_and_the_control_port() {
        let q = Qemu::default();
        let c = q
            .command(
                &spec(vec![disk("layer0"), disk("scratch")]),
                Path::new("/run/qmp.sock"),
            )
            .unwrap();
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-accel tcg"), "{joined}");
        assert!(
            joined.contains("-netdev user,id=net0,hostfwd=tcp:127.0.0.1:18080-:8000"),
            "{joined}"
        );
        assert!(
            joined.contains("-smp 2") && joined.contains("-m 256"),
            "{joined}"
        );
        assert!(joined.contains("name=org.tidedge.control"), "{joined}");
        assert!(
            joined.contains("unix:/run/qmp.sock,server=on,wait=off"),
            "{joined}"
        );
        let bd: Vec<Value> = args
            .windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| serde_json::from_str(&w[1]).unwrap())
            .collect();
        assert_eq!(bd.len(), 2);
        assert_eq!(bd[0]["export"], "layer/sha256:ab");
        assert_eq!(bd[0]["server"]["path"], "/d/nbd.sock");
        assert_eq!(bd[0]["reconnect-delay"], NBD_RECONNECT_SECS);
        assert!(
            joined.contains("virtio-blk-pci,drive=disk1,id=dev1,serial=scratch"),
            "{joined}"
        );
        assert!(!joined.contains("memory-backend"), "{joined}");
        assert_eq!(
            args.iter()
                .filter(|a| a.starts_with("pcie-root-port"))
                .count(),
            HOTPLUG_PORTS
        );
    }

    #[test]
    fn vhost_user_disks_get_a_chardev_and_shared_memory() {
        let vu = Disk {
            serial: "vol".into(),
            source: DiskSource::VhostUser {
                socket: "/d/vu/vol.sock".into(),
                queues: 2,
            },
            read_only: false,
        };
        let q = Qemu::default();
        let mut s = spec(vec![disk("layer0"), vu]);
        let e = q.command(&s, Path::new("/run/qmp.sock")).err().unwrap();
        assert!(e.to_string().contains("shared"), "{e}");
        s.shared_memory = true;
        let c = q.command(&s, Path::new("/run/qmp.sock")).unwrap();
        let joined: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = joined.join(" ");
        assert!(
            joined.contains(
                "-object memory-backend-memfd,id=ram,size=256M,share=on -machine memory-backend=ram"
            ),
            "{joined}"
        );
        assert!(
            joined.contains("-chardev socket,id=disk1,path=/d/vu/vol.sock,reconnect=1 -device vhost-user-blk-pci,chardev=disk1,id=dev1,num-queues=2"),
            "{joined}"
        );
        assert_eq!(joined.matches("-blockdev").count(), 1, "{joined}");
    }

    #[test]
    fn a_program_that_does_not_run_is_not_available() {
        let q = Qemu {
            program: "/nonexistent/qemu-system-x86_64".into(),
        };
        assert!(!q.available());
        let q = Qemu {
            program: "false".into(),
        };
        assert!(!q.available());
    }

    #[test]
    fn bad_serials_are_refused_before_anything_runs() {
        let q = Qemu::default();
        for disks in [
            vec![disk("a"), disk("a")],
            vec![disk("")],
            vec![disk("x".repeat(21).as_str())],
            vec![disk("a,b")],
        ] {
            let e = q.command(&spec(disks), Path::new("/q")).unwrap_err();
            assert!(matches!(e, Error::BadSpec(_)), "{e}");
        }
    }
}
